//! The kernel features ferry's memory transfer strategies depend on.

use serde::Serialize;

use ferry_sys::kernel;

#[derive(Debug, Clone, Serialize)]
pub struct KernelProbe {
    pub release: String,
    /// Soft-dirty page tracking (`CONFIG_MEM_SOFT_DIRTY`): CRIU's pre-dump
    /// and `--track-mem` need it.
    pub soft_dirty: Feature,
    /// userfaultfd with the non-cooperative events CRIU's lazy pages need.
    pub userfaultfd: Feature,
    /// The `PAGEMAP_SCAN` ioctl (Linux 6.7+): find present/written pages fast.
    pub pagemap_scan: Feature,
}

/// A probed feature: present or not, and why when the probe itself failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Feature {
    pub present: bool,
    pub detail: Option<String>,
}

impl Feature {
    fn from(result: std::io::Result<bool>) -> Feature {
        match result {
            Ok(present) => Feature {
                present,
                detail: None,
            },
            Err(e) => Feature {
                present: false,
                detail: Some(e.to_string()),
            },
        }
    }
}

impl KernelProbe {
    pub fn run() -> KernelProbe {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let userfaultfd = match kernel::userfaultfd() {
            Ok(info) => Feature {
                present: info.non_cooperative(),
                detail: Some(format!(
                    "features {:#x}{}",
                    info.features,
                    if info.non_cooperative() {
                        ", non-cooperative events present"
                    } else {
                        ", non-cooperative events missing"
                    }
                )),
            },
            Err(e) => Feature {
                present: false,
                detail: Some(e.to_string()),
            },
        };
        KernelProbe {
            release,
            soft_dirty: Feature::from(kernel::soft_dirty_tracking()),
            userfaultfd,
            pagemap_scan: Feature::from(kernel::pagemap_scan()),
        }
    }
}
