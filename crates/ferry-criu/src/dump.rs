//! The DUMP request: checkpoint a process tree into an images directory.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criu_proto as pb;

use super::notify::Timeline;
use super::{Criu, CriuError, NotifyHook, RequestKind};
use ferry_image::DumpStats;

/// What to dump and how. Flag names follow criu's and runc's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpRequest {
    /// Root of the tree to dump.
    pub pid: i32,
    pub images_dir: PathBuf,
    /// Resume the tree after the dump instead of killing it.
    pub leave_running: bool,
    pub tcp_established: bool,
    pub shell_job: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    /// CRIU log verbosity, 0 (none) to 4 (debug).
    pub log_level: u8,
    /// Log file name, inside `images_dir`.
    pub log_file: String,
    /// Set when the tree is a container's.
    pub container: Option<ContainerDump>,
    /// ferry's policy, not CRIU's: dump even when GPU state would be lost.
    pub ignore_gpu: bool,
    /// Leave the tree stopped (SIGSTOP) after the dump instead of killing
    /// or resuming it (CRIU `--leave-stopped`): a migration decides later.
    pub leave_stopped: bool,
    /// Leave out TCP connections still being set up (in a listening
    /// socket's accept queue): their clients retry (CRIU `--skip-in-flight`).
    pub tcp_skip_in_flight: bool,
    /// Write the images to an image streamer listening in `images_dir`
    /// (CRIU `--stream`; see [`super::capture`]) instead of to files. As
    /// for a streamed restore, CRIU's RPC refuses streaming, so this one
    /// request runs `criu dump` itself: no NOTIFY hooks, the timeline holds
    /// only the total.
    pub stream: bool,
    /// A lazy dump (CRIU `--lazy-pages`): the images leave out the memory
    /// that can be restored lazily; CRIU keeps the tree frozen and serves
    /// as a page server on this connected socket (given to it as a
    /// descriptor, `ps-socket`) until the peer at its other end ends the
    /// transfer ([`super::page_server::LazyDumpLink`]). It sends the
    /// `status-ready` notification when it starts serving. The request
    /// returns only when the transfer ends. Needs a `criu swrk` of ferry's
    /// own (a CRIU service cannot be handed a descriptor).
    pub lazy_socket: Option<LazySocket>,
    /// CRIU's own options the user passed through, applied over ferry's.
    pub options: super::CriuOptions,
}

/// The page server's end of a lazy dump's connection; CRIU takes it once.
#[derive(Debug, Clone)]
pub struct LazySocket(std::sync::Arc<std::sync::Mutex<Option<OwnedFd>>>);

impl LazySocket {
    pub fn new(fd: OwnedFd) -> LazySocket {
        LazySocket(std::sync::Arc::new(std::sync::Mutex::new(Some(fd))))
    }

    fn take(&self) -> Option<OwnedFd> {
        self.0.lock().ok()?.take()
    }
}

impl PartialEq for LazySocket {
    fn eq(&self, other: &LazySocket) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for LazySocket {}

/// The descriptor a lazy dump's `criu swrk` finds its page-server socket on.
const LAZY_SOCKET_CHILD_FD: i32 = 4;

/// What CRIU needs to dump a container (the options runc gives it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerDump {
    /// The container's root filesystem, as the host sees it.
    pub root: PathBuf,
    /// External mounts: (mount point inside the container, key in the images).
    pub ext_mounts: Vec<(String, String)>,
    /// External resources, CRIU syntax (e.g. `net[4026532]:extRootNetNS`).
    pub external: Vec<String>,
    /// Freeze through this cgroup instead of ptrace-stopping each task.
    pub freeze_cgroup: Option<PathBuf>,
    /// Dump the container's own network namespace empty: its interfaces
    /// and their configuration belong to the engine, which recreates them
    /// (CLONE_NEWNET, as runc passes it).
    pub empty_net_ns: bool,
}

impl DumpRequest {
    /// A stop-mode dump of `pid` into `images_dir` with CRIU's defaults.
    pub fn new(pid: i32, images_dir: impl Into<PathBuf>) -> Self {
        DumpRequest {
            pid,
            images_dir: images_dir.into(),
            leave_running: false,
            tcp_established: false,
            shell_job: false,
            ext_unix_sk: false,
            file_locks: false,
            log_level: DEFAULT_LOG_LEVEL,
            log_file: "dump.log".into(),
            container: None,
            ignore_gpu: false,
            leave_stopped: false,
            tcp_skip_in_flight: false,
            stream: false,
            lazy_socket: None,
            options: super::CriuOptions::default(),
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.images_dir.join(&self.log_file)
    }
}

/// CRIU's own default verbosity (errors and warnings).
pub const DEFAULT_LOG_LEVEL: u8 = 2;

/// A successful dump.
#[derive(Debug, Clone)]
pub struct DumpOutcome {
    /// From sending the request to CRIU's answer, as ferry measured it.
    pub wall: Duration,
    /// CRIU's `stats-dump` (freeze, frozen, memdump, memwrite, pages).
    pub stats: Option<DumpStats>,
    pub timeline: Timeline,
    pub log: PathBuf,
}

impl Criu {
    /// Dumps the tree rooted at `req.pid`. On failure CRIU resumes the tree.
    pub fn dump(
        &self,
        req: &DumpRequest,
        hooks: &mut dyn NotifyHook,
    ) -> Result<DumpOutcome, CriuError> {
        let dir = File::open(&req.images_dir).map_err(|source| CriuError::ImagesDir {
            path: req.images_dir.clone(),
            source,
        })?;
        if req.stream {
            return self.dump_streamed(req);
        }
        let mut opts = pb::CriuOpts {
            images_dir_fd: dir.as_raw_fd(),
            pid: Some(req.pid),
            leave_running: Some(req.leave_running),
            leave_stopped: req.leave_stopped.then_some(true),
            tcp_established: Some(req.tcp_established),
            tcp_skip_in_flight: req.tcp_skip_in_flight.then_some(true),
            shell_job: Some(req.shell_job),
            ext_unix_sk: Some(req.ext_unix_sk),
            file_locks: Some(req.file_locks),
            log_level: Some(i32::from(req.log_level)),
            log_file: Some(req.log_file.clone()),
            notify_scripts: Some(true),
            ..Default::default()
        };
        // CRIU's RPC takes a page-server descriptor only for a page server
        // that sends (`ps.fd` is ignored with `lazy_pages`), so a lazy dump
        // gets it from an RPC configuration file, which CRIU applies over
        // the request: `ps-socket N`, N as the swrk child sees it.
        let (mut lazy_fd, mut conf_dir) = (None, None);
        if let Some(socket) = &req.lazy_socket {
            let fd = socket.take().ok_or(CriuError::LazySocket {
                why: "the lazy dump's socket was already used".into(),
            })?;
            let conf = tempfile::Builder::new()
                .prefix("ferry-lazy-dump-")
                .tempdir()
                .map_err(|e| CriuError::LazySocket {
                    why: format!("cannot make a directory for CRIU's configuration: {e}"),
                })?;
            let path = conf.path().join("rpc.conf");
            // CRIU reads one configuration file for a request: the user's
            // (--criu-config) goes in it first.
            let theirs = match &req.options.config_file {
                Some(f) => std::fs::read_to_string(f).map_err(|e| CriuError::LazySocket {
                    why: format!("cannot read CRIU configuration {}: {e}", f.display()),
                })?,
                None => String::new(),
            };
            std::fs::write(
                &path,
                format!("{theirs}\nps-socket {LAZY_SOCKET_CHILD_FD}\n"),
            )
            .map_err(|e| CriuError::LazySocket {
                why: format!("cannot write {}: {e}", path.display()),
            })?;
            opts.lazy_pages = Some(true);
            opts.config_file = Some(path.display().to_string());
            lazy_fd = Some(fd);
            conf_dir = Some(conf);
        }
        if let Some(c) = &req.container {
            opts.root = Some(c.root.display().to_string());
            opts.manage_cgroups = Some(true);
            opts.orphan_pts_master = Some(true);
            opts.ext_mnt = c
                .ext_mounts
                .iter()
                .map(|(key, val)| pb::ExtMountMap {
                    key: key.clone(),
                    val: val.clone(),
                })
                .collect();
            opts.external = c.external.clone();
            opts.freeze_cgroup = c.freeze_cgroup.as_ref().map(|p| p.display().to_string());
            if c.empty_net_ns {
                opts.empty_ns = Some(libc::CLONE_NEWNET as u32);
            }
        }
        // The user's CRIU options on top of ferry's; a lazy dump keeps its
        // own configuration file, which includes the user's.
        req.options.apply(&mut opts);
        if let Some(conf) = &conf_dir {
            opts.config_file = Some(conf.path().join("rpc.conf").display().to_string());
        }
        let msg = pb::CriuReq {
            r#type: pb::CriuReqType::Dump as i32,
            opts: Some(opts),
            ..Default::default()
        };
        let log = req.log_path();
        let start = Instant::now();
        // Only CRIU holds the page server's end from here: its exit ends
        // the connection.
        let mut connection = match lazy_fd.take() {
            Some(fd) => self.connect_with_fd(fd, LAZY_SOCKET_CHILD_FD)?,
            None if req.container.is_none() => self.connect_for_dump()?,
            None => self.connect()?,
        };
        let exchange = connection.request(RequestKind::Dump, msg, hooks, Some(&log))?;
        drop(conf_dir);
        let wall = start.elapsed();
        drop(dir);
        Ok(DumpOutcome {
            wall,
            stats: stats_of(req),
            timeline: exchange.timeline,
            log,
        })
    }

    /// `criu dump --stream`, for [`DumpRequest::stream`].
    fn dump_streamed(&self, req: &DumpRequest) -> Result<DumpOutcome, CriuError> {
        let log = req.log_path();
        let mut args: Vec<OsString> = vec![
            "--stream".into(),
            "-t".into(),
            req.pid.to_string().into(),
            "-D".into(),
            req.images_dir.clone().into(),
            "-o".into(),
            req.log_file.clone().into(),
            format!("-v{}", req.log_level).into(),
        ];
        for (on, flag) in [
            (req.leave_running, "--leave-running"),
            (req.leave_stopped, "--leave-stopped"),
            (req.tcp_established, "--tcp-established"),
            (req.tcp_skip_in_flight, "--skip-in-flight"),
            (req.shell_job, "--shell-job"),
            (req.ext_unix_sk, "--ext-unix-sk"),
            (req.file_locks, "--file-locks"),
        ] {
            if on {
                args.push(flag.into());
            }
        }
        if let Some(c) = &req.container {
            // What the RPC request above says, in CRIU's command-line words
            // (but orphan_pts_master, which has none: it acts on restore).
            args.extend([
                "--root".into(),
                c.root.clone().into(),
                "--manage-cgroups".into(),
            ]);
            for (key, val) in &c.ext_mounts {
                args.extend(["--ext-mount-map".into(), format!("{key}:{val}").into()]);
            }
            for e in &c.external {
                args.extend(["--external".into(), e.into()]);
            }
            if let Some(cg) = &c.freeze_cgroup {
                args.extend(["--freeze-cgroup".into(), cg.clone().into()]);
            }
            if c.empty_net_ns {
                args.extend(["--empty-ns".into(), "net".into()]);
            }
        }
        args.extend(req.options.args());
        let own_group = req.container.is_none();
        let wall = self.run_cli(RequestKind::Dump, "dump", args, &log, own_group)?;
        Ok(DumpOutcome {
            wall,
            stats: stats_of(req),
            timeline: Timeline::default(),
            log,
        })
    }
}

/// CRIU's dump statistics. CRIU always writes them after a successful dump
/// (to the directory, even when streaming); a missing or unreadable file is
/// reported as absent rather than failing the dump.
fn stats_of(req: &DumpRequest) -> Option<DumpStats> {
    DumpStats::read(&req.images_dir.join("stats-dump"))
        .ok()
        .flatten()
}
