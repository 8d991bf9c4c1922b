//! NVML, read through a small trait so that the same conversion code runs on
//! the real library and on recorded data (the tests, and hosts without GPUs).

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::struct_wrappers::device::{MemoryInfo, ProcessInfo};
use nvml_wrapper::structs::device::MigMode;
use nvml_wrapper::Nvml;
use serde::Serialize;

use super::{GpuDevice, GpuInventory, GpuProcess, ProcessKind};

/// One device as NVML's own types describe it.
#[derive(Debug, Clone)]
pub struct RawDevice {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory: MemoryInfo,
    pub mig: Option<MigMode>,
    pub compute: Vec<ProcessInfo>,
    pub graphics: Vec<ProcessInfo>,
}

/// NVML's errors, as nvml-wrapper gives them.
pub(crate) type NvmlError = nvml_wrapper::error::NvmlError;

/// What ferry asks NVML.
pub trait NvmlSource {
    fn driver_version(&self) -> Result<String, NvmlError>;
    /// NVML's encoding: 1000 * major + 10 * minor.
    fn cuda_version(&self) -> Result<i32, NvmlError>;
    fn devices(&self) -> Result<Vec<RawDevice>, NvmlError>;
}

/// The real NVML.
pub(crate) struct RealNvml(Nvml);

impl NvmlSource for RealNvml {
    fn driver_version(&self) -> Result<String, NvmlError> {
        self.0.sys_driver_version()
    }
    fn cuda_version(&self) -> Result<i32, NvmlError> {
        self.0.sys_cuda_driver_version()
    }
    fn devices(&self) -> Result<Vec<RawDevice>, NvmlError> {
        let n = self.0.device_count()?;
        (0..n)
            .map(|i| {
                let d = self.0.device_by_index(i)?;
                Ok(RawDevice {
                    index: i,
                    name: d.name()?,
                    uuid: d.uuid()?,
                    memory: d.memory_info()?,
                    // Not every device supports MIG: absent then.
                    mig: d.mig_mode().ok(),
                    compute: d.running_compute_processes().unwrap_or_default(),
                    graphics: d.running_graphics_processes().unwrap_or_default(),
                })
            })
            .collect()
    }
}

/// NVML's answer: an inventory, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum GpuProbe {
    Available(GpuInventory),
    Unavailable { reason: String },
}

impl GpuProbe {
    pub fn inventory(&self) -> Option<&GpuInventory> {
        match self {
            GpuProbe::Available(i) => Some(i),
            GpuProbe::Unavailable { .. } => None,
        }
    }
}

/// Probes this host's NVML.
pub fn probe() -> GpuProbe {
    match Nvml::init() {
        Ok(nvml) => from_source(&RealNvml(nvml)),
        Err(e) => GpuProbe::Unavailable {
            reason: format!("NVML is not available: {e}"),
        },
    }
}

/// The inventory `src` describes (the path real and recorded data share).
pub(crate) fn from_source(src: &dyn NvmlSource) -> GpuProbe {
    let unavailable = |e: NvmlError| GpuProbe::Unavailable {
        reason: format!("NVML: {e}"),
    };
    let driver_version = match src.driver_version() {
        Ok(v) => v,
        Err(e) => return unavailable(e),
    };
    let devices = match src.devices() {
        Ok(d) => d,
        Err(e) => return unavailable(e),
    };
    let cuda_version = src.cuda_version().ok().map(|v| {
        format!(
            "{}.{}",
            nvml_wrapper::cuda_driver_version_major(v),
            nvml_wrapper::cuda_driver_version_minor(v)
        )
    });
    GpuProbe::Available(GpuInventory {
        driver_version,
        cuda_version,
        devices: devices.into_iter().map(convert).collect(),
    })
}

fn convert(d: RawDevice) -> GpuDevice {
    let procs = |list: Vec<ProcessInfo>, kind| {
        list.into_iter().map(move |p| GpuProcess {
            pid: p.pid,
            kind,
            used_memory: match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => Some(b),
                UsedGpuMemory::Unavailable => None,
            },
        })
    };
    let mut processes: Vec<GpuProcess> = procs(d.compute, ProcessKind::Compute).collect();
    processes.extend(procs(d.graphics, ProcessKind::Graphics));
    GpuDevice {
        index: d.index,
        uuid: d.uuid,
        name: d.name,
        memory_total: d.memory.total,
        memory_used: d.memory.used,
        memory_free: d.memory.free,
        mig_enabled: d.mig.map(|m| m.current == 1),
        processes,
    }
}

#[cfg(test)]
pub(crate) mod recorded {
    //! NVML answers recorded from a host with two H100s, one running a CUDA
    //! job (pid 4242, 30 GiB), fed through the same conversion as real NVML.

    use super::*;

    pub(crate) const GIB: u64 = 1 << 30;

    pub(crate) struct Recorded {
        pub driver: Result<String, NvmlError>,
        pub devices: Vec<RawDevice>,
    }

    impl NvmlSource for Recorded {
        fn driver_version(&self) -> Result<String, NvmlError> {
            match &self.driver {
                Ok(v) => Ok(v.clone()),
                Err(_) => Err(NvmlError::DriverNotLoaded),
            }
        }
        fn cuda_version(&self) -> Result<i32, NvmlError> {
            Ok(12040)
        }
        fn devices(&self) -> Result<Vec<RawDevice>, NvmlError> {
            Ok(self.devices.clone())
        }
    }

    pub fn process(pid: u32, bytes: u64) -> ProcessInfo {
        ProcessInfo {
            pid,
            used_gpu_memory: UsedGpuMemory::Used(bytes),
            gpu_instance_id: None,
            compute_instance_id: None,
        }
    }

    pub fn device(index: u32, used: u64, compute: Vec<ProcessInfo>) -> RawDevice {
        RawDevice {
            index,
            name: "NVIDIA H100 80GB HBM3".into(),
            uuid: format!("GPU-0000000{index}-aaaa-bbbb-cccc-dddddddddddd"),
            memory: MemoryInfo {
                free: 80 * GIB - used,
                reserved: 0,
                total: 80 * GIB,
                used,
                version: 0,
            },
            mig: Some(MigMode {
                current: 0,
                pending: 0,
            }),
            compute,
            graphics: Vec::new(),
        }
    }

    pub(crate) fn two_h100s() -> Recorded {
        Recorded {
            driver: Ok("550.54.15".into()),
            devices: vec![
                device(0, 30 * GIB, vec![process(4242, 30 * GIB)]),
                device(1, 0, vec![]),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::recorded::*;
    use super::*;

    #[test]
    fn converts_recorded_nvml_answers() {
        let GpuProbe::Available(inv) = from_source(&two_h100s()) else {
            panic!("unavailable")
        };
        assert_eq!(inv.driver_version, "550.54.15");
        assert_eq!(inv.cuda_version.as_deref(), Some("12.4"));
        assert_eq!(inv.devices.len(), 2);
        let d = &inv.devices[0];
        assert_eq!(d.memory_free, 50 * GIB);
        assert_eq!(d.mig_enabled, Some(false));
        assert_eq!(
            d.processes,
            vec![GpuProcess {
                pid: 4242,
                kind: ProcessKind::Compute,
                used_memory: Some(30 * GIB)
            }]
        );
    }

    #[test]
    fn a_failing_nvml_is_unavailable_not_an_error() {
        let src = Recorded {
            driver: Err(NvmlError::DriverNotLoaded),
            devices: vec![],
        };
        assert!(
            matches!(from_source(&src), GpuProbe::Unavailable { reason } if reason.starts_with("NVML: "))
        );
    }

    #[test]
    fn this_host_answers_either_way() {
        // Without a GPU the probe says why; with one it lists devices.
        match probe() {
            GpuProbe::Available(inv) => assert!(!inv.driver_version.is_empty()),
            GpuProbe::Unavailable { reason } => assert!(!reason.is_empty()),
        }
    }
}
