//! ferry's CRIU client: RPC (dump, restore, notifications), the image
//! streamer, the capture of a dump's images, and CRIU's page servers.
//!
//! ferry drives CRIU through its RPC protocol (criu.org/RPC), never through
//! its command line. A request goes to either
//! - a private `criu swrk <fd>` child, spawned per operation over a
//!   `SOCK_SEQPACKET` socketpair (the default, what runc does), or
//! - a running `criu service --address PATH`, when the user names its socket.
//!
//! Each request and response is one datagram holding one protobuf message
//! (`criu_req` / `criu_resp` from `criu-proto`). While a dump or restore runs,
//! CRIU reports its progress with `NOTIFY` responses (`pre-dump`,
//! `network-lock`, `post-dump`, `post-restore`, ...); [`Connection`] answers
//! each after giving it to the caller's [`NotifyHook`], so later features can
//! act at those points. A failed request becomes a [`CriuError::Failed`]
//! carrying CRIU's `cr_errno`/`cr_errmsg`, the path of CRIU's log and the
//! error lines found in it.
//!
//! Raw protobuf types stop here: callers pass [`DumpRequest`] /
//! [`RestoreRequest`] and get [`DumpOutcome`] / [`RestoreOutcome`] back.

#![forbid(unsafe_code)]

pub mod capture;
mod connection;
mod dump;
mod error;
mod lazy;
mod notify;
pub mod options;
pub mod page_server;
mod restore;
pub mod streamer;
mod version;

use std::env;
use std::path::{Path, PathBuf};

pub use connection::Connection;
pub use dump::{ContainerDump, DumpOutcome, DumpRequest, LazySocket};
pub use error::{CriuError, RequestKind};
use ferry_sys::which;
pub use lazy::LazyPages;
pub use notify::{HookError, NoHooks, Notification, NotifyHook, Script, Timeline};
pub use options::CriuOptions;
pub use restore::{RestoreOutcome, RestoreRequest};
pub use version::{Features, Version};

pub use dump::DEFAULT_LOG_LEVEL;

/// Environment variable naming the CRIU binary when `--criu` is not given.
pub const CRIU_ENV: &str = "FERRY_CRIU";

/// How ferry reaches CRIU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Criu {
    /// Spawn `BINARY swrk <fd>` for each operation.
    Swrk { binary: PathBuf },
    /// Connect to `criu service --address SOCKET`.
    Service { socket: PathBuf },
}

impl Criu {
    /// Finds CRIU: the service socket if one is named, else the binary named
    /// by `binary`, `$FERRY_CRIU`, or `criu` on `$PATH`.
    pub fn locate(binary: Option<&Path>, service: Option<&Path>) -> Result<Criu, CriuError> {
        if let Some(socket) = service {
            return Ok(Criu::Service {
                socket: socket.to_path_buf(),
            });
        }
        let named = binary
            .map(Path::to_path_buf)
            .or_else(|| env::var_os(CRIU_ENV).map(PathBuf::from));
        let found = match named {
            Some(p) if p.components().count() > 1 => p.is_file().then_some(p.clone()).ok_or(p),
            Some(p) => which(&p.to_string_lossy()).ok_or(p),
            None => which("criu").ok_or_else(|| PathBuf::from("criu")),
        };
        found
            .map(|binary| Criu::Swrk { binary })
            .map_err(|name| CriuError::NotFound { name })
    }

    /// Opens a connection for one or more requests.
    pub fn connect(&self) -> Result<Connection, CriuError> {
        match self {
            Criu::Swrk { binary } => Connection::spawn_swrk(binary, None, false),
            Criu::Service { socket } => Connection::connect_service(socket),
        }
    }

    /// [`Criu::connect`] for a process tree's dump: the `criu swrk` child
    /// runs in a process group of its own, so a terminal's Ctrl-C reaches
    /// ferry (which cancels where it safely can), not CRIU mid-dump. Not
    /// for a restore (a tree left stopped in an orphaned process group is
    /// sent SIGHUP when CRIU exits), nor for a container's dump (runc
    /// could not restore a container dumped so: its old cgroups stayed
    /// busy); CRIU killed there fails the dump, which resumes or thaws the
    /// application.
    pub fn connect_for_dump(&self) -> Result<Connection, CriuError> {
        match self {
            Criu::Swrk { binary } => Connection::spawn_swrk(binary, None, true),
            Criu::Service { socket } => Connection::connect_service(socket),
        }
    }

    /// A `criu swrk` child that also finds `fd` as its descriptor
    /// `child_fd` (a CRIU service cannot be handed one: an error).
    pub(crate) fn connect_with_fd(
        &self,
        fd: std::os::fd::OwnedFd,
        child_fd: i32,
    ) -> Result<Connection, CriuError> {
        match self {
            Criu::Swrk { binary } => Connection::spawn_swrk(binary, Some((fd, child_fd)), true),
            Criu::Service { socket } => Err(CriuError::LazySocket {
                why: format!(
                    "a CRIU service ({}) cannot be handed a socket: run without --criu-service",
                    socket.display()
                ),
            }),
        }
    }

    /// The binary to run as a command line (for what CRIU's RPC cannot
    /// do): the one named, or `criu` on `$PATH` when ferry talks to a
    /// service.
    pub(crate) fn cli_binary(&self) -> Result<PathBuf, CriuError> {
        match self {
            Criu::Swrk { binary } => Ok(binary.clone()),
            Criu::Service { .. } => which("criu").ok_or(CriuError::NotFound {
                name: PathBuf::from("criu"),
            }),
        }
    }

    /// Runs CRIU's command line `criu ACTION ARGS` (a streamed dump or
    /// restore: what CRIU's RPC cannot do) to its end; returns how long it
    /// ran. A failure names CRIU's exit status, what it printed before its
    /// log was open (a refused option, say) and the errors in `log`.
    pub(crate) fn run_cli(
        &self,
        request: RequestKind,
        action: &str,
        args: Vec<std::ffi::OsString>,
        log: &Path,
        own_group: bool,
    ) -> Result<std::time::Duration, CriuError> {
        let binary = self.cli_binary()?;
        let start = std::time::Instant::now();
        let mut cmd = std::process::Command::new(&binary);
        if own_group {
            // As for a tree's dump over `criu swrk` (`Criu::connect_for_dump`).
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let out = cmd
            .arg(action)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .map_err(|source| CriuError::Spawn {
                binary: binary.clone(),
                source,
            })?;
        let wall = start.elapsed();
        if out.status.success() {
            return Ok(wall);
        }
        let printed = String::from_utf8_lossy(&out.stderr);
        let printed: Vec<&str> = printed.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = printed[printed.len().saturating_sub(3)..].join(" / ");
        Err(CriuError::Failed {
            request,
            errno: None,
            errmsg: Some(if tail.is_empty() {
                format!("criu {action}: {}", out.status)
            } else {
                format!("criu {action}: {}: {tail}", out.status)
            }),
            log: Some(log.to_path_buf()),
            log_errors: error::log_errors(log),
        })
    }

    /// The binary or socket, for reports.
    pub fn describe(&self) -> String {
        match self {
            Criu::Swrk { binary } => binary.display().to_string(),
            Criu::Service { socket } => format!("service at {}", socket.display()),
        }
    }
}
