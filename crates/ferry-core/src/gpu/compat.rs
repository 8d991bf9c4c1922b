//! Can this host take a checkpoint's GPU state? Checked before a restore,
//! a migration or a failover touches anything: same model, enough devices,
//! enough free memory, a driver no older than the one it was taken with.

use super::{GpuInventory, GpuProbe, GpuRecord};
use ferry_image::units::bytes;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incompatible {
    #[error(
        "the checkpoint carries GPU state ({model}) but this host has no usable GPU: {reason}"
    )]
    NoGpu { model: String, reason: String },
    #[error("the checkpoint needs {needed} x {model}; this host has {found}")]
    TooFew {
        model: String,
        needed: u32,
        found: u32,
    },
    #[error("the checkpoint needs {} of free GPU memory on {model}; this host has {}", bytes(*.needed), bytes(*.free))]
    Memory {
        model: String,
        needed: u64,
        free: u64,
    },
    #[error("the checkpoint was taken with NVIDIA driver {recorded}; this host runs older driver {found}")]
    Driver { recorded: String, found: String },
}

fn major(version: &str) -> Option<u32> {
    version.split('.').next()?.parse().ok()
}

/// Checks `record` against this host's `probe`.
pub fn check_compatible(record: &GpuRecord, probe: &GpuProbe) -> Result<(), Incompatible> {
    let inv: &GpuInventory = match probe {
        GpuProbe::Available(i) => i,
        GpuProbe::Unavailable { reason } => {
            return Err(Incompatible::NoGpu {
                model: record.model.clone(),
                reason: reason.clone(),
            })
        }
    };
    let same: Vec<_> = inv
        .devices
        .iter()
        .filter(|d| d.name == record.model)
        .collect();
    if (same.len() as u32) < record.count {
        return Err(Incompatible::TooFew {
            model: record.model.clone(),
            needed: record.count,
            found: same.len() as u32,
        });
    }
    // The largest demands need the freest devices.
    let mut needs: Vec<u64> = record.memory_in_use.iter().map(|(_, m)| *m).collect();
    needs.sort_unstable_by(|a, b| b.cmp(a));
    let mut free: Vec<u64> = same.iter().map(|d| d.memory_free).collect();
    free.sort_unstable_by(|a, b| b.cmp(a));
    for (need, have) in needs.iter().zip(&free) {
        if need > have {
            return Err(Incompatible::Memory {
                model: record.model.clone(),
                needed: *need,
                free: *have,
            });
        }
    }
    if let (Some(rec), Some(found)) = (major(&record.driver_version), major(&inv.driver_version)) {
        if found < rec {
            return Err(Incompatible::Driver {
                recorded: record.driver_version.clone(),
                found: inv.driver_version.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::probe::{from_source, recorded::*};

    fn record(count: u32, mem: u64, driver: &str) -> GpuRecord {
        GpuRecord {
            pids: vec![4242],
            model: "NVIDIA H100 80GB HBM3".into(),
            count,
            uuids: vec![],
            memory_in_use: (0..count).map(|i| (format!("GPU-{i}"), mem)).collect(),
            driver_version: driver.into(),
            cuda_version: Some("12.4".into()),
            carried_by: ferry_image::gpu_record::CarriedBy::CudaCheckpoint,
        }
    }

    #[test]
    fn a_matching_host_is_compatible() {
        // The recorded host: one H100 with 50 GiB free, one with 80 GiB.
        let p = from_source(&two_h100s());
        check_compatible(&record(1, 40 * GIB, "550.54.15"), &p).unwrap();
        check_compatible(&record(2, 45 * GIB, "535.1"), &p).unwrap();
    }

    #[test]
    fn incompatible_hosts_say_why() {
        let p = from_source(&two_h100s());
        let e = check_compatible(&record(3, GIB, "550"), &p).unwrap_err();
        assert!(
            matches!(
                e,
                Incompatible::TooFew {
                    needed: 3,
                    found: 2,
                    ..
                }
            ),
            "{e}"
        );
        let e = check_compatible(&record(2, 60 * GIB, "550"), &p).unwrap_err();
        assert!(e.to_string().contains("60.0 GiB"), "{e}");
        let e = check_compatible(&record(1, GIB, "555.1"), &p).unwrap_err();
        assert!(matches!(e, Incompatible::Driver { .. }), "{e}");
        let mut other = record(1, GIB, "550");
        other.model = "NVIDIA A100-SXM4-40GB".into();
        assert!(matches!(
            check_compatible(&other, &p),
            Err(Incompatible::TooFew { found: 0, .. })
        ));
        let none = GpuProbe::Unavailable {
            reason: "no NVML".into(),
        };
        assert!(matches!(
            check_compatible(&record(1, GIB, "550"), &none),
            Err(Incompatible::NoGpu { .. })
        ));
    }
}
