//! VERSION, FEATURE_CHECK and CHECK requests.

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;

use criu_proto as pb;
use serde::Serialize;

use super::{Criu, CriuError, NoHooks, RequestKind, DEFAULT_LOG_LEVEL};

/// Log file of the CHECK request, in its scratch directory.
const CHECK_LOG: &str = "check.log";

/// CRIU's version as it reports it over RPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Version {
    pub major: i32,
    pub minor: i32,
    pub sublevel: i32,
    pub gitid: Option<String>,
    pub name: Option<String>,
}

impl Version {
    /// `major.minor.sublevel` as one comparable number (4.1.1 -> 40101).
    pub fn code(&self) -> i64 {
        i64::from(self.major) * 10_000 + i64::from(self.minor) * 100 + i64::from(self.sublevel)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if self.sublevel != 0 {
            write!(f, ".{}", self.sublevel)?;
        }
        if let Some(g) = self.gitid.as_deref().filter(|g| !g.is_empty()) {
            write!(f, " ({g})")?;
        }
        Ok(())
    }
}

/// Optional CRIU features, as FEATURE_CHECK answers on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Features {
    /// Memory change tracking (soft-dirty): pre-dump and `track_mem`.
    pub mem_track: bool,
    /// Lazy pages (userfaultfd post-copy).
    pub lazy_pages: bool,
    /// pidfd store (safe pid reuse detection across pre-dumps).
    pub pidfd_store: bool,
}

impl Criu {
    /// Asks CRIU for its version.
    pub fn version(&self) -> Result<Version, CriuError> {
        let req = pb::CriuReq {
            r#type: pb::CriuReqType::Version as i32,
            ..Default::default()
        };
        let resp = self
            .connect()?
            .request(RequestKind::Version, req, &mut NoHooks, None)?
            .response;
        let v = resp.version.ok_or_else(|| CriuError::UnexpectedResponse {
            request: RequestKind::Version,
            got: "VERSION response without a version".into(),
        })?;
        Ok(Version {
            major: v.major_number,
            minor: v.minor_number,
            sublevel: v.sublevel.unwrap_or(0),
            gitid: v.gitid,
            name: v.name,
        })
    }

    /// Asks CRIU which optional features work on this kernel.
    pub fn features(&self) -> Result<Features, CriuError> {
        let req = pb::CriuReq {
            r#type: pb::CriuReqType::FeatureCheck as i32,
            features: Some(pb::CriuFeatures {
                mem_track: Some(true),
                lazy_pages: Some(true),
                pidfd_store: Some(true),
            }),
            ..Default::default()
        };
        let resp = self
            .connect()?
            .request(RequestKind::FeatureCheck, req, &mut NoHooks, None)?
            .response;
        let f = resp.features.unwrap_or_default();
        Ok(Features {
            mem_track: f.mem_track.unwrap_or(false),
            lazy_pages: f.lazy_pages.unwrap_or(false),
            pidfd_store: f.pidfd_store.unwrap_or(false),
        })
    }

    /// Runs CRIU's own basic check (what `criu check` does). CRIU sets up
    /// its options (and log) from the request, so the check gets a scratch
    /// directory of its own; its log is quoted on failure.
    pub fn check(&self) -> Result<(), CriuError> {
        let scratch = tempfile::Builder::new()
            .prefix("ferry-criu-check-")
            .tempdir()
            .map_err(|source| CriuError::ImagesDir {
                path: std::env::temp_dir(),
                source,
            })?;
        let dir = File::open(scratch.path()).map_err(|source| CriuError::ImagesDir {
            path: scratch.path().to_path_buf(),
            source,
        })?;
        let log = scratch.path().join(CHECK_LOG);
        let req = pb::CriuReq {
            r#type: pb::CriuReqType::Check as i32,
            opts: Some(pb::CriuOpts {
                images_dir_fd: dir.as_raw_fd(),
                log_file: Some(CHECK_LOG.into()),
                log_level: Some(i32::from(DEFAULT_LOG_LEVEL)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let result = self
            .connect()?
            .request(RequestKind::Check, req, &mut NoHooks, Some(&log))
            .map(|_| ());
        // The scratch directory goes away; keep the quoted lines, drop the path.
        result.map_err(|e| match e {
            CriuError::Failed {
                request,
                errno,
                errmsg,
                log_errors,
                ..
            } => CriuError::Failed {
                request,
                errno,
                errmsg,
                log: None,
                log_errors,
            },
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_orders_and_prints() {
        let v = Version {
            major: 4,
            minor: 1,
            sublevel: 1,
            gitid: None,
            name: None,
        };
        assert_eq!(v.to_string(), "4.1.1");
        assert!(v.code() > 3_17_00);
        assert!(v.code() >= 40_000);
    }
}
