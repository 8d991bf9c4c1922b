//! What a failed command left behind, for scripts: the exit status that
//! names it and, under `--json`, the error as a JSON object on stdout.
//!
//! The statuses a script most needs to tell apart are where the
//! application is after a failure: it never stopped (4), it stopped and
//! runs here again (5), it is not running or lost what it did after the
//! commit (6), or only the destination knows (7, `ferry resolve` asks).

use std::io::Write;

use ferry_core::checkpoint::{CheckpointError, TargetAfterFailure};
use ferry_migrate::{Fate, MigrateError};
use serde::Serialize;

use super::{exit, CliError, Command};

/// Version of the JSON error object (`{"format_version", "error": {...}}`).
pub const ERROR_FORMAT_VERSION: u32 = 1;

/// Where a failure left the application, and the exit status that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The command line was wrong; nothing was done.
    Usage,
    /// Failed or refused before anything was frozen: the application ran
    /// on untouched.
    RefusedBeforeFreezing,
    /// Failed after the application was frozen; it was resumed (or
    /// restored) here and runs.
    FailedResumed,
    /// The application is not running, or it resumed from an older state
    /// and what it did since is lost.
    WorkLost,
    /// Only the destination knows whether it committed: the application
    /// is left stopped here until `ferry resolve` settles it.
    Undecided,
    /// Any other failure (a restore, an archive, an agent, etcd).
    Failed,
}

impl Kind {
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Usage => exit::USAGE,
            Kind::RefusedBeforeFreezing => exit::REFUSED,
            Kind::FailedResumed => exit::RESUMED,
            Kind::WorkLost => exit::WORK_LOST,
            Kind::Undecided => exit::UNDECIDED,
            Kind::Failed => exit::FAILED,
        }
    }
}

/// After a dump that froze the application: it runs again, or is gone.
fn after_dump(after: &TargetAfterFailure) -> Kind {
    match after {
        TargetAfterFailure::Running
        | TargetAfterFailure::Resumed(_)
        | TargetAfterFailure::Thawed => Kind::FailedResumed,
        TargetAfterFailure::Gone => Kind::WorkLost,
    }
}

/// A failed dump: refused before CRIU froze anything, or after.
fn dump(e: &CheckpointError) -> Kind {
    use CheckpointError as C;
    match e {
        C::DumpFailed { after, .. } | C::NotDurable { after, .. } | C::PackFailed { after, .. } => {
            after_dump(after)
        }
        // The images were written (the dump succeeded); packing them failed.
        C::Pack { .. } => Kind::Failed,
        // Everything else is checked before CRIU is asked to freeze.
        _ => Kind::RefusedBeforeFreezing,
    }
}

fn fate(after: &Fate) -> Kind {
    match after {
        Fate::ResumedHere | Fate::RestoredHere { .. } => Kind::FailedResumed,
        Fate::ResumedLosingWork => Kind::WorkLost,
        Fate::Lost { .. } => Kind::WorkLost,
        Fate::Undecided(_) => Kind::Undecided,
    }
}

/// Classifies a failure of `command` by where it left the application.
pub fn kind(command: &Command, e: &CliError) -> Kind {
    let freezes = matches!(command, Command::Dump(_) | Command::Migrate(_));
    match e {
        CliError::Usage(_) => Kind::Usage,
        CliError::Checkpoint(c) if freezes => dump(c),
        CliError::Migrate(m) => match m.as_ref() {
            MigrateError::Dump(c) => match dump(c) {
                Kind::RefusedBeforeFreezing | Kind::Failed => Kind::FailedResumed,
                k => k,
            },
            MigrateError::DumpStream(_) => Kind::FailedResumed,
            MigrateError::Final { after, .. } => fate(after),
            // Every other failure comes before the final dump: pre-copy
            // reads memory while the application runs.
            _ => Kind::RefusedBeforeFreezing,
        },
        // A dump or a migration fails this way (CRIU not found, a key
        // unreadable) only before it freezes anything.
        _ if freezes => Kind::RefusedBeforeFreezing,
        _ => Kind::Failed,
    }
}

/// What to do next, where ferry knows more than the message says.
pub fn hint(e: &CliError) -> Option<String> {
    if let CliError::Migrate(m) = e {
        match m.as_ref() {
            MigrateError::Connect { to, .. } => {
                return Some(format!(
                    "is `ferry agent` running on {to}, reachable from here, and started with the same --key?"
                ))
            }
            MigrateError::Final {
                after: Fate::Undecided(u),
                ..
            } => {
                let pid = u.pid.map(|p| format!(" --pid {p}")).unwrap_or_default();
                return Some(format!(
                    "once {} answers: ferry resolve --to {} --session {}{pid}",
                    u.to, u.to, u.session
                ));
            }
            MigrateError::Final {
                after: Fate::Lost { images, .. },
                ..
            } => {
                return Some(format!(
                    "restore it by hand: ferry restore -D {}",
                    images.display()
                ))
            }
            _ => {}
        }
    }
    if let CliError::Usage(_) = e {
        return Some("see `ferry help` and `ferry <command> --help`".into());
    }
    e.criu_failure()
        .and_then(|c| c.log_path())
        .map(|p| format!("CRIU's log: {}", p.display()))
}

#[derive(Serialize)]
struct ErrorReport<'a> {
    format_version: u32,
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    kind: Kind,
    exit_code: u8,
    /// The error and its causes, outermost first.
    message: String,
    causes: Vec<String>,
    hint: Option<String>,
    criu_log: Option<String>,
    criu_errors: &'a [String],
}

/// Writes `e` as one JSON object (for `--json`).
pub fn write_json(out: &mut dyn Write, command: &Command, e: &CliError) -> std::io::Result<()> {
    let k = kind(command, e);
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        causes.push(s.to_string());
        source = s.source();
    }
    let criu = e.criu_failure();
    let report = ErrorReport {
        format_version: ERROR_FORMAT_VERSION,
        error: ErrorBody {
            kind: k,
            exit_code: k.exit_code(),
            message: e.to_string(),
            causes,
            hint: hint(e),
            criu_log: criu
                .and_then(|c| c.log_path())
                .map(|p| p.display().to_string()),
            criu_errors: criu.map(|c| c.log_errors()).unwrap_or_default(),
        },
    };
    serde_json::to_writer_pretty(&mut *out, &report)?;
    writeln!(out)
}

/// Writes a command-line error (from clap) as the same JSON object.
pub fn write_usage_json(out: &mut dyn Write, message: &str) -> std::io::Result<()> {
    let report = ErrorReport {
        format_version: ERROR_FORMAT_VERSION,
        error: ErrorBody {
            kind: Kind::Usage,
            exit_code: exit::USAGE,
            message: message.trim().to_string(),
            causes: Vec::new(),
            hint: Some("see `ferry help` and `ferry <command> --help`".into()),
            criu_log: None,
            criu_errors: &[],
        },
    };
    serde_json::to_writer_pretty(&mut *out, &report)?;
    writeln!(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_status() {
        let kinds = [
            Kind::Usage,
            Kind::RefusedBeforeFreezing,
            Kind::FailedResumed,
            Kind::WorkLost,
            Kind::Undecided,
            Kind::Failed,
        ];
        let mut codes: Vec<u8> = kinds.iter().map(|k| k.exit_code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), kinds.len());
        assert!(!codes.contains(&exit::OK));
        assert!(!codes.contains(&exit::HOST_NOT_READY));
    }

    #[test]
    fn a_lost_commit_answer_is_undecided_with_the_resolve_command() {
        let e = CliError::Migrate(Box::new(MigrateError::Final {
            after: Fate::Undecided(Box::new(ferry_migrate::Unsettled {
                to: "10.0.0.2:7070".into(),
                session: "s1".into(),
                pid: Some(42),
            })),
            source: ferry_migrate::FinalError::Images {
                path: "/x".into(),
                source: std::io::Error::other("gone"),
            },
        }));
        let cmd = Command::Guard;
        assert_eq!(kind(&cmd, &e), Kind::Undecided);
        let mut out = Vec::new();
        write_json(&mut out, &cmd, &e).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["kind"], "undecided");
        assert_eq!(v["error"]["exit_code"], exit::UNDECIDED);
        assert_eq!(
            v["error"]["hint"],
            "once 10.0.0.2:7070 answers: ferry resolve --to 10.0.0.2:7070 --session s1 --pid 42"
        );
        assert_eq!(v["error"]["causes"][0], "cannot read the final dump's /x");
    }
}
