//! Errors of the CRIU client.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

/// The RPC request a failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Dump,
    Restore,
    Check,
    Version,
    FeatureCheck,
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RequestKind::Dump => "dump",
            RequestKind::Restore => "restore",
            RequestKind::Check => "check",
            RequestKind::Version => "version",
            RequestKind::FeatureCheck => "feature check",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("CRIU binary '{}' not found (install CRIU >= 4 with scripts/setup.sh, or name it with --criu or $FERRY_CRIU)", name.display())]
    NotFound { name: PathBuf },
    #[error("cannot start '{} swrk'", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to the CRIU service socket {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open images directory {}", path.display())]
    ImagesDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CRIU RPC transport failed during {request}")]
    Transport {
        request: RequestKind,
        #[source]
        source: io::Error,
    },
    #[error("CRIU sent a {request} response that is not valid protobuf")]
    Decode {
        request: RequestKind,
        #[source]
        source: prost::DecodeError,
    },
    #[error("CRIU answered a {request} request with an unexpected {got} response")]
    UnexpectedResponse { request: RequestKind, got: String },
    #[error("the criu lazy-pages daemon did not start: {why} (log: {})", log.display())]
    LazyPages { why: String, log: PathBuf },
    #[error("cannot give a lazy dump its page-server socket: {why}")]
    LazySocket { why: String },
    #[error("CRIU exited during {request} ({status}){}", log_hint(log.as_deref()))]
    Died {
        request: RequestKind,
        status: String,
        log: Option<PathBuf>,
        log_errors: Vec<String>,
    },
    #[error("CRIU {request} failed{}{}{}", errmsg.as_ref().map(|m| format!(": {m}")).unwrap_or_default(), errno_text(*errno), log_hint(log.as_deref()))]
    Failed {
        request: RequestKind,
        errno: Option<i32>,
        errmsg: Option<String>,
        log: Option<PathBuf>,
        log_errors: Vec<String>,
    },
    #[error("ferry's {script} hook failed; CRIU was told to abort")]
    HookFailed {
        script: String,
        #[source]
        source: super::HookError,
    },
}

impl CriuError {
    /// Error lines CRIU wrote to its log for this failure, if any.
    pub fn log_errors(&self) -> &[String] {
        match self {
            CriuError::Died { log_errors, .. } | CriuError::Failed { log_errors, .. } => log_errors,
            _ => &[],
        }
    }

    /// Names another copy of CRIU's log (when the original goes away with a
    /// staging directory).
    pub fn with_log(mut self, path: PathBuf) -> CriuError {
        if let CriuError::Died { log, .. } | CriuError::Failed { log, .. } = &mut self {
            *log = Some(path);
        }
        self
    }

    /// The path of CRIU's log for this failure, if there is one.
    pub fn log_path(&self) -> Option<&Path> {
        match self {
            CriuError::Died { log, .. } | CriuError::Failed { log, .. } => log.as_deref(),
            _ => None,
        }
    }
}

fn errno_text(errno: Option<i32>) -> String {
    match errno {
        Some(e) if e != 0 => format!(" (errno {e}: {})", nix::errno::Errno::from_raw(e).desc()),
        _ => String::new(),
    }
}

fn log_hint(log: Option<&Path>) -> String {
    match log {
        Some(p) => format!("; CRIU's log: {}", p.display()),
        None => String::new(),
    }
}

/// Errors CRIU logs that do not make an operation fail: quoting them as the
/// cause would mislead (CRIU's `cr_errmsg` is its *first* error message).
const HARMLESS_ERRORS: &[&str] = &[
    // Hosts (VMs, containers) that refuse raising the fd limit.
    "Can't setup RLIMIT_NOFILE",
];

/// Whether a CRIU error message is one CRIU logs without failing.
pub(crate) fn is_harmless(line: &str) -> bool {
    HARMLESS_ERRORS.iter().any(|h| line.contains(h))
}

/// CRIU's own message for a failure, unless it is one of the harmless
/// errors; then the first meaningful error line of the log stands in.
pub(crate) fn cause(errmsg: Option<&str>, log_errors: &[String]) -> Option<String> {
    errmsg
        .map(str::trim)
        .filter(|m| !m.is_empty() && !is_harmless(m))
        .map(str::to_string)
        .or_else(|| log_errors.first().cloned())
}

/// Most error lines quoted from CRIU's log in an error.
const MAX_LOG_ERRORS: usize = 8;

/// The last error lines of a CRIU log ("Error (file:line): ..." and BUG
/// reports), with CRIU's timestamp prefix removed.
pub(crate) fn log_errors(log: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(log) else {
        return Vec::new();
    };
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| l.contains("Error (") || l.contains("BUG") || l.contains("Error:"))
        .filter(|l| !is_harmless(l))
        .map(|l| match l.split_once(") ") {
            Some((stamp, rest)) if stamp.starts_with('(') => rest.to_string(),
            _ => l.to_string(),
        })
        .collect();
    if lines.len() > MAX_LOG_ERRORS {
        lines.drain(..lines.len() - MAX_LOG_ERRORS);
    }
    lines
}

pub(crate) fn describe_status(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) => s.to_string(),
        None => "exit status unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_error_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dump.log");
        std::fs::write(
            &log,
            "(00.000) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self\n\
             (00.001) Dumping\n(00.002) Error (criu/cr-dump.c:1): Can't seize 4\n(00.003) Warn  x\n",
        )
        .unwrap();
        assert_eq!(
            log_errors(&log),
            vec!["Error (criu/cr-dump.c:1): Can't seize 4"]
        );
    }

    #[test]
    fn harmless_errmsg_gives_way_to_the_log() {
        let lines = vec!["Error (files-reg.c:1): Can't open file x".to_string()];
        let rlimit = "Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self\n";
        assert_eq!(
            cause(Some(rlimit), &lines).as_deref(),
            Some(lines[0].as_str())
        );
        assert_eq!(cause(Some("real\n"), &lines).as_deref(), Some("real"));
        assert_eq!(cause(None, &[]), None);
    }

    #[test]
    fn failure_names_errno_and_log() {
        let e = CriuError::Failed {
            request: RequestKind::Dump,
            errno: Some(3),
            errmsg: Some("bad pid".into()),
            log: Some(PathBuf::from("/x/dump.log")),
            log_errors: vec![],
        };
        let s = e.to_string();
        assert!(s.contains("CRIU dump failed: bad pid"), "{s}");
        assert!(s.contains("errno 3"), "{s}");
        assert!(s.contains("/x/dump.log"), "{s}");
    }
}
