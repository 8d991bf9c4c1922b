//! GPU awareness: never lose GPU state silently.
//!
//! A CPU-only checkpoint of a process holding a CUDA context restores into a
//! broken process. So before anything is frozen ferry finds out, through
//! NVML, whether the tree uses a GPU ([`probe`], [`involvement`]); if it does,
//! it carries the GPU state with NVIDIA's `cuda-checkpoint` or CRIU's CUDA
//! plugin when either is installed, and otherwise refuses, naming the
//! processes, GPUs and memory ([`decide`]); `--ignore-gpu` overrides, loudly.
//! Checkpoints that involved a GPU carry a [`GpuRecord`] (model, count,
//! UUIDs, memory, driver), and a restore first checks that this host's GPUs
//! can take it ([`compat`]). A host without NVML is a normal state.

#![forbid(unsafe_code)]

pub mod compat;
pub mod decide;
pub(crate) mod involvement;
pub mod probe;

use serde::{Deserialize, Serialize};

pub use compat::{check_compatible, Incompatible};
pub use decide::{assess, Carrier, GpuError, GpuPlan};
pub use probe::{probe, GpuProbe, NvmlSource};

pub use ferry_image::gpu_record::{GpuRecord, RECORD_FILE};

/// What NVML says about this host's GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInventory {
    pub driver_version: String,
    /// CUDA driver API version, e.g. "12.4".
    pub cuda_version: Option<String>,
    pub devices: Vec<GpuDevice>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDevice {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total: u64,
    pub memory_used: u64,
    pub memory_free: u64,
    /// MIG mode, when the device supports it.
    pub mig_enabled: Option<bool>,
    pub processes: Vec<GpuProcess>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessKind {
    Compute,
    Graphics,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    /// As NVML reports it (the pid in NVML's caller's pid namespace).
    pub pid: u32,
    pub kind: ProcessKind,
    /// GPU memory the process holds, when NVML knows.
    pub used_memory: Option<u64>,
}
