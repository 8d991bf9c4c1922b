//! What to do about a tree's GPU state before a dump: nothing (no GPU),
//! carry it (NVIDIA's `cuda-checkpoint`, or CRIU's CUDA plugin, when
//! installed), ignore it (`--ignore-gpu`, loudly) or refuse.

use ferry_image::gpu_record::CarriedBy;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;

use super::involvement::{uses, GpuUse, TreeProcess};
use super::{GpuInventory, GpuRecord};
use ferry_image::units::bytes;

/// Where CRIU looks for plugins (its compiled-in library directory).
pub(crate) const CRIU_PLUGIN_DIRS: &[&str] = &[
    "/usr/lib/criu",
    "/usr/local/lib/criu",
    "/opt/ferry/criu/usr/lib/criu",
];
/// CRIU's CUDA plugin file.
pub(crate) const CUDA_PLUGIN: &str = "cuda_plugin.so";

/// What can carry GPU state through a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "kebab-case")]
pub enum Carrier {
    /// NVIDIA's utility: `--toggle` moves a process's GPU state into host
    /// memory (and back), so CRIU dumps it with the rest.
    CudaCheckpoint(PathBuf),
    /// CRIU's plugin: CRIU drives cuda-checkpoint itself.
    CriuCudaPlugin(PathBuf),
}

impl Carrier {
    pub fn name(&self) -> &'static str {
        self.carried_by().name()
    }

    /// What a record says carried the state.
    pub fn carried_by(&self) -> CarriedBy {
        match self {
            Carrier::CudaCheckpoint(_) => CarriedBy::CudaCheckpoint,
            Carrier::CriuCudaPlugin(_) => CarriedBy::CriuCudaPlugin,
        }
    }

    /// Finds a carrier on this host: CRIU's plugin first (CRIU then handles
    /// everything), else `cuda-checkpoint` on PATH.
    pub fn find() -> Option<Carrier> {
        find_in(
            CRIU_PLUGIN_DIRS.iter().map(Path::new),
            ferry_sys::which("cuda-checkpoint"),
        )
    }
}

fn find_in<'a>(
    plugin_dirs: impl Iterator<Item = &'a Path>,
    cuda_checkpoint: Option<PathBuf>,
) -> Option<Carrier> {
    for d in plugin_dirs {
        let p = d.join(CUDA_PLUGIN);
        if p.is_file() {
            return Some(Carrier::CriuCudaPlugin(p));
        }
    }
    cuda_checkpoint.map(Carrier::CudaCheckpoint)
}

/// The decision for one dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuPlan {
    /// The tree holds no GPU state.
    None,
    /// GPU state is carried by `carrier`.
    Carry {
        carrier: Carrier,
        uses: Vec<GpuUse>,
        record: GpuRecord,
    },
    /// `--ignore-gpu`: the dump goes on without the GPU state.
    Ignored {
        uses: Vec<GpuUse>,
        record: GpuRecord,
    },
}

impl GpuPlan {
    pub fn record(&self) -> Option<&GpuRecord> {
        match self {
            GpuPlan::None => None,
            GpuPlan::Carry { record, .. } | GpuPlan::Ignored { record, .. } => Some(record),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("{}", refusal(.uses))]
    Refused { uses: Vec<GpuUse> },
    #[error("cuda-checkpoint --toggle failed for pid {pid}: {detail}")]
    Toggle { pid: i32, detail: String },
}

fn refusal(uses: &[GpuUse]) -> String {
    let what: Vec<String> = uses
        .iter()
        .map(|u| match (&u.name, u.device_index) {
            (Some(name), Some(i)) => format!(
                "pid {} uses GPU {i} ({name}, {}) with {}",
                u.pid,
                u.uuid.as_deref().unwrap_or("?"),
                u.used_memory
                    .map(bytes)
                    .unwrap_or_else(|| "unknown memory".into())
            ),
            _ => format!("pid {} holds {}", u.pid, u.device_files.join(", ")),
        })
        .collect();
    format!(
        "the process tree holds GPU state that a CPU-only checkpoint would lose: {}. \
         Install NVIDIA's cuda-checkpoint (driver >= 550) or CRIU's CUDA plugin so ferry can carry it, \
         or pass --ignore-gpu if the application can survive losing its GPU state",
        what.join("; ")
    )
}

/// Decides for the tree `tree` given this host's GPUs, the carrier found
/// and `--ignore-gpu`.
pub fn decide(
    tree: &[TreeProcess],
    inventory: Option<&GpuInventory>,
    carrier: Option<Carrier>,
    ignore_gpu: bool,
) -> Result<GpuPlan, GpuError> {
    let uses = uses(tree, inventory);
    if uses.is_empty() {
        return Ok(GpuPlan::None);
    }
    let mk_record = |carried_by| record(&uses, inventory, carried_by);
    match (carrier, ignore_gpu) {
        (Some(carrier), _) => {
            let record = mk_record(carrier.carried_by());
            Ok(GpuPlan::Carry {
                carrier,
                uses,
                record,
            })
        }
        (None, true) => {
            let record = mk_record(CarriedBy::Ignored);
            Ok(GpuPlan::Ignored { uses, record })
        }
        (None, false) => Err(GpuError::Refused { uses }),
    }
}

/// Probes NVML, reads the tree and decides.
pub fn assess(pids: &[i32], ignore_gpu: bool) -> Result<GpuPlan, GpuError> {
    let tree: Vec<TreeProcess> = pids.iter().map(|p| TreeProcess::read(*p)).collect();
    let probe = super::probe();
    decide(&tree, probe.inventory(), Carrier::find(), ignore_gpu)
}

fn record(uses: &[GpuUse], inventory: Option<&GpuInventory>, carried_by: CarriedBy) -> GpuRecord {
    let mut uuids: Vec<String> = uses.iter().filter_map(|u| u.uuid.clone()).collect();
    uuids.sort();
    uuids.dedup();
    let mut memory: Vec<(String, u64)> = Vec::new();
    for u in uses {
        if let (Some(uuid), Some(m)) = (&u.uuid, u.used_memory) {
            match memory.iter_mut().find(|(id, _)| id == uuid) {
                Some((_, total)) => *total += m,
                None => memory.push((uuid.clone(), m)),
            }
        }
    }
    let mut pids: Vec<i32> = uses.iter().map(|u| u.pid).collect();
    pids.dedup();
    GpuRecord {
        pids,
        model: uses
            .iter()
            .find_map(|u| u.name.clone())
            .unwrap_or_else(|| "unknown (no NVML)".into()),
        count: uuids.len().max(1) as u32,
        uuids,
        memory_in_use: memory,
        driver_version: inventory
            .map(|i| i.driver_version.clone())
            .unwrap_or_default(),
        cuda_version: inventory.and_then(|i| i.cuda_version.clone()),
        carried_by,
    }
}

/// `cuda-checkpoint --toggle --pid PID`: moves the process's GPU state to
/// host memory (before a dump) or back to the GPU (after a dump that left it
/// running, and after a restore).
pub(crate) fn toggle(tool: &Path, pid: i32) -> Result<(), GpuError> {
    let out = Command::new(tool)
        .args(["--toggle", "--pid", &pid.to_string()])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| GpuError::Toggle {
            pid,
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(GpuError::Toggle {
            pid,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::probe::{from_source, recorded::*, GpuProbe};

    fn inv() -> GpuInventory {
        match from_source(&two_h100s()) {
            GpuProbe::Available(i) => i,
            GpuProbe::Unavailable { reason } => panic!("{reason}"),
        }
    }

    fn cuda_tree() -> Vec<TreeProcess> {
        vec![
            TreeProcess {
                pid: 4242,
                ns_pids: vec![4242],
                gpu_devices: vec!["/dev/nvidia0".into(), "/dev/nvidiactl".into()],
            },
            TreeProcess {
                pid: 4243,
                ns_pids: vec![4243],
                gpu_devices: vec![],
            },
        ]
    }

    #[test]
    fn no_gpu_means_no_plan() {
        let t = vec![TreeProcess {
            pid: 1,
            ns_pids: vec![1],
            gpu_devices: vec![],
        }];
        assert_eq!(
            decide(&t, Some(&inv()), None, false).unwrap(),
            GpuPlan::None
        );
        assert_eq!(decide(&t, None, None, false).unwrap(), GpuPlan::None);
    }

    #[test]
    fn refuses_naming_processes_gpus_memory_and_remedy() {
        let err = decide(&cuda_tree(), Some(&inv()), None, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pid 4242 uses GPU 0 (NVIDIA H100 80GB HBM3"),
            "{err}"
        );
        assert!(err.contains("30.0 GiB"), "{err}");
        assert!(
            err.contains("cuda-checkpoint") && err.contains("--ignore-gpu"),
            "{err}"
        );
    }

    #[test]
    fn carries_with_an_installed_carrier_and_records_it() {
        let carrier = Carrier::CudaCheckpoint("/usr/bin/cuda-checkpoint".into());
        let plan = decide(&cuda_tree(), Some(&inv()), Some(carrier.clone()), false).unwrap();
        let GpuPlan::Carry {
            carrier: c,
            record,
            uses,
        } = plan
        else {
            panic!("not carried")
        };
        assert_eq!(c, carrier);
        assert_eq!(uses.len(), 1);
        assert_eq!(record.model, "NVIDIA H100 80GB HBM3");
        assert_eq!(record.count, 1);
        assert_eq!(record.total_memory(), 30 * GIB);
        assert_eq!(record.driver_version, "550.54.15");
        assert_eq!(record.carried_by, CarriedBy::CudaCheckpoint);
    }

    #[test]
    fn ignore_gpu_goes_on_and_says_so() {
        let plan = decide(&cuda_tree(), Some(&inv()), None, true).unwrap();
        assert!(
            matches!(plan, GpuPlan::Ignored { ref record, .. } if record.carried_by == CarriedBy::Ignored)
        );
    }

    #[test]
    fn device_files_alone_refuse_without_nvml() {
        let err = decide(&cuda_tree(), None, None, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pid 4242 holds /dev/nvidia0, /dev/nvidiactl"),
            "{err}"
        );
    }

    #[test]
    fn the_criu_plugin_wins_over_the_utility() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(find_in([d.path()].into_iter(), None), None);
        assert_eq!(
            find_in([d.path()].into_iter(), Some("/x/cuda-checkpoint".into())),
            Some(Carrier::CudaCheckpoint("/x/cuda-checkpoint".into()))
        );
        std::fs::write(d.path().join(CUDA_PLUGIN), b"").unwrap();
        assert!(matches!(
            find_in([d.path()].into_iter(), Some("/x/cuda-checkpoint".into())),
            Some(Carrier::CriuCudaPlugin(_))
        ));
    }
}
