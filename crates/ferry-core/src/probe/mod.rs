//! `ferry check`: what this host can do, probed for real.
//!
//! - CRIU: found how ferry would use it, asked for its VERSION, its optional
//!   FEATURES and to run its own CHECK, all over RPC. CRIU is *usable* when it
//!   answers and its check passes; otherwise the report says why and what to do.
//! - The kernel: soft-dirty tracking, userfaultfd and `PAGEMAP_SCAN`, probed
//!   by ferry itself on its own memory (see `sys::kernel`).
//! - Container engines and coordination (runc, dockerd, podman, etcd): found
//!   on `$PATH` and asked for their versions.
//! - NVML: loaded through nvml-wrapper; a host without it is a normal state.

#![forbid(unsafe_code)]

mod criu;
mod kernel;
mod nvml;
mod tools;

use serde::Serialize;

use ferry_criu::Criu;

pub use self::criu::{hold_inet_socket, CriuProbe, MIN_TESTED_VERSION_CODE};
pub use kernel::KernelProbe;
pub use nvml::NvmlProbe;
pub use tools::ToolProbe;

/// Version of the JSON layout of [`HostReport`].
pub const REPORT_FORMAT_VERSION: u32 = 1;

/// Everything `ferry check` found.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub format_version: u32,
    pub criu: CriuProbe,
    pub kernel: KernelProbe,
    pub tools: Vec<ToolProbe>,
    pub nvml: NvmlProbe,
}

impl HostReport {
    /// Probes everything. `criu` is how ferry reaches CRIU, or the error of
    /// finding it.
    pub fn gather(criu: Result<Criu, ferry_criu::CriuError>) -> HostReport {
        HostReport {
            format_version: REPORT_FORMAT_VERSION,
            criu: CriuProbe::run(criu),
            kernel: KernelProbe::run(),
            tools: tools::probe_all(),
            nvml: NvmlProbe::run(),
        }
    }

    /// ferry can dump and restore on this host.
    pub fn usable(&self) -> bool {
        self.criu.usable
    }
}
