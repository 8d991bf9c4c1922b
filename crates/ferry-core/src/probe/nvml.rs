//! NVML presence: the driver and how many GPUs it sees.

use nvml_wrapper::Nvml;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct NvmlProbe {
    pub available: bool,
    pub driver_version: Option<String>,
    pub devices: Option<u32>,
    /// Why NVML is not available (a host without NVIDIA's driver is normal).
    pub detail: Option<String>,
}

impl NvmlProbe {
    pub fn run() -> NvmlProbe {
        match Nvml::init() {
            Ok(nvml) => NvmlProbe {
                available: true,
                driver_version: nvml.sys_driver_version().ok(),
                devices: nvml.device_count().ok(),
                detail: None,
            },
            Err(e) => NvmlProbe {
                available: false,
                driver_version: None,
                devices: None,
                detail: Some(e.to_string()),
            },
        }
    }
}
