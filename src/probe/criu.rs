//! Is CRIU there, which version, which features, does its own check pass?

use serde::Serialize;

use crate::criu::{Criu, CriuError, Features};

/// The oldest CRIU ferry is built and tested against.
pub const MIN_TESTED_VERSION_CODE: i64 = 4_01_00;

#[derive(Debug, Clone, Serialize)]
pub struct CriuProbe {
    /// Binary path or service socket.
    pub endpoint: Option<String>,
    pub version: Option<String>,
    pub version_code: Option<i64>,
    pub features: Option<Features>,
    /// CRIU's own CHECK passed.
    pub check_passed: bool,
    /// ferry can dump and restore with this CRIU.
    pub usable: bool,
    /// Why CRIU is not usable, or what is doubtful about it.
    pub problems: Vec<String>,
    /// What to do about the problems.
    pub remedy: Option<String>,
}

const REMEDY_INSTALL: &str = "run scripts/setup.sh as root: it installs CRIU >= 4 (the distribution's package where it works, otherwise CRIU 4.1.1 from Debian 13 in a private prefix with a `criu` wrapper on PATH)";

impl CriuProbe {
    pub fn run(criu: Result<Criu, CriuError>) -> CriuProbe {
        let mut probe = CriuProbe {
            endpoint: None,
            version: None,
            version_code: None,
            features: None,
            check_passed: false,
            usable: false,
            problems: Vec::new(),
            remedy: None,
        };
        let criu = match criu {
            Ok(c) => c,
            Err(e) => {
                probe.problems.push(e.to_string());
                probe.remedy = Some(REMEDY_INSTALL.into());
                return probe;
            }
        };
        probe.endpoint = Some(criu.describe());
        match criu.version() {
            Ok(v) => {
                if v.code() < MIN_TESTED_VERSION_CODE {
                    probe.problems.push(format!(
                        "CRIU {v} is older than 4.1, the version ferry is tested with"
                    ));
                }
                probe.version_code = Some(v.code());
                probe.version = Some(v.to_string());
            }
            Err(e) => {
                probe
                    .problems
                    .push(format!("CRIU does not answer VERSION: {}", chain(&e)));
                probe.remedy = Some(REMEDY_INSTALL.into());
                return probe;
            }
        }
        match criu.features() {
            Ok(f) => probe.features = Some(f),
            Err(e) => probe
                .problems
                .push(format!("CRIU does not answer FEATURE_CHECK: {}", chain(&e))),
        }
        match criu.check() {
            Ok(()) => probe.check_passed = true,
            Err(e) => {
                probe.problems.push(format!(
                    "CRIU's own check fails on this kernel: {}",
                    chain(&e)
                ));
                probe.remedy = Some(REMEDY_INSTALL.into());
            }
        }
        probe.usable = probe.check_passed;
        probe
    }
}

fn chain(e: &CriuError) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    for line in e.log_errors() {
        s.push_str("\n    criu: ");
        s.push_str(line);
    }
    s
}
