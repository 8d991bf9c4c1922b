//! The RESTORE request: bring a dumped tree back to life.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criu_proto as pb;

use super::dump::DEFAULT_LOG_LEVEL;
use super::notify::Timeline;
use super::{Criu, CriuError, NotifyHook, RequestKind};
use ferry_image::RestoreStats;

/// What to restore and how. Flag names follow criu's and runc's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequest {
    pub images_dir: PathBuf,
    pub tcp_established: bool,
    pub shell_job: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    pub log_level: u8,
    /// Log file name, inside `images_dir`.
    pub log_file: String,
    /// Punch each page out of the pages images as soon as it is restored
    /// (CRIU `--auto-dedup`): memory moves from the images to the process
    /// instead of being needed twice. Destroys the images: only for copies
    /// staged for this restore.
    pub consume_images: bool,
    /// Leave the restored tree stopped (SIGSTOP) until the caller resumes
    /// it (CRIU `--leave-stopped`): a migration's two-phase commit.
    pub leave_stopped: bool,
    /// Restore anonymous memory lazily (userfaultfd): a `criu lazy-pages`
    /// daemon on the images directory must be running (CRIU `--lazy-pages`).
    pub lazy_pages: bool,
    /// Read the images from an image streamer listening in `images_dir`
    /// (CRIU `--stream`; see [`super::streamer`]) instead of from files.
    /// CRIU's RPC refuses streaming (it opens the images directory with no
    /// mode, and aborts), so this one request runs `criu restore` itself:
    /// no NOTIFY hooks, and the timeline holds only the total.
    pub stream: bool,
    /// CRIU's own options the user passed through, applied over ferry's.
    pub options: super::CriuOptions,
}

/// Where a streamed restore's CRIU writes the restored root's pid.
const STREAM_PIDFILE: &str = "restored.pid";

impl RestoreRequest {
    pub fn new(images_dir: impl Into<PathBuf>) -> Self {
        RestoreRequest {
            images_dir: images_dir.into(),
            tcp_established: false,
            shell_job: false,
            ext_unix_sk: false,
            file_locks: false,
            log_level: DEFAULT_LOG_LEVEL,
            log_file: "restore.log".into(),
            consume_images: false,
            leave_stopped: false,
            lazy_pages: false,
            stream: false,
            options: super::CriuOptions::default(),
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.images_dir.join(&self.log_file)
    }
}

/// A successful restore.
#[derive(Debug, Clone)]
pub struct RestoreOutcome {
    /// Pid of the restored tree's root. CRIU restores it detached: once the
    /// request completes it is no child of ferry's.
    pub pid: i32,
    pub wall: Duration,
    pub stats: Option<RestoreStats>,
    pub timeline: Timeline,
    pub log: PathBuf,
}

impl Criu {
    /// Restores the tree dumped in `req.images_dir`.
    pub fn restore(
        &self,
        req: &RestoreRequest,
        hooks: &mut dyn NotifyHook,
    ) -> Result<RestoreOutcome, CriuError> {
        let dir = File::open(&req.images_dir).map_err(|source| CriuError::ImagesDir {
            path: req.images_dir.clone(),
            source,
        })?;
        if req.stream {
            return self.restore_streamed(req);
        }
        let mut opts = pb::CriuOpts {
            images_dir_fd: dir.as_raw_fd(),
            tcp_established: Some(req.tcp_established),
            shell_job: Some(req.shell_job),
            ext_unix_sk: Some(req.ext_unix_sk),
            file_locks: Some(req.file_locks),
            log_level: Some(i32::from(req.log_level)),
            log_file: Some(req.log_file.clone()),
            notify_scripts: Some(true),
            auto_dedup: Some(req.consume_images),
            leave_stopped: req.leave_stopped.then_some(true),
            lazy_pages: req.lazy_pages.then_some(true),
            ..Default::default()
        };
        req.options.apply(&mut opts);
        let msg = pb::CriuReq {
            r#type: pb::CriuReqType::Restore as i32,
            opts: Some(opts),
            ..Default::default()
        };
        let log = req.log_path();
        let start = Instant::now();
        let mut conn = self.connect()?;
        let exchange = conn.request(RequestKind::Restore, msg, hooks, Some(&log))?;
        let wall = start.elapsed();
        // Let the swrk child exit now, so the restored tree is reparented away
        // from it before the caller looks at it.
        drop(conn);
        drop(dir);
        let pid = exchange.response.restore.map(|r| r.pid).ok_or_else(|| {
            CriuError::UnexpectedResponse {
                request: RequestKind::Restore,
                got: "RESTORE response without a pid".into(),
            }
        })?;
        let stats = stats_of(req);
        Ok(RestoreOutcome {
            pid,
            wall,
            stats,
            timeline: exchange.timeline,
            log,
        })
    }
}

impl Criu {
    /// `criu restore --stream --restore-detached`, for [`RestoreRequest::stream`].
    fn restore_streamed(&self, req: &RestoreRequest) -> Result<RestoreOutcome, CriuError> {
        let log = req.log_path();
        let pidfile = req.images_dir.join(STREAM_PIDFILE);
        let mut args: Vec<OsString> = vec![
            "--stream".into(),
            "--restore-detached".into(),
            "-D".into(),
            req.images_dir.clone().into(),
            "-o".into(),
            req.log_file.clone().into(),
            format!("-v{}", req.log_level).into(),
            "--pidfile".into(),
            pidfile.clone().into(),
        ];
        for (on, flag) in [
            (req.tcp_established, "--tcp-established"),
            (req.shell_job, "--shell-job"),
            (req.ext_unix_sk, "--ext-unix-sk"),
            (req.file_locks, "--file-locks"),
            (req.leave_stopped, "--leave-stopped"),
            (req.lazy_pages, "--lazy-pages"),
        ] {
            if on {
                args.push(flag.into());
            }
        }
        args.extend(req.options.args());
        let wall = self.run_cli(RequestKind::Restore, "restore", args, &log, false)?;
        let pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .ok_or_else(|| CriuError::UnexpectedResponse {
                request: RequestKind::Restore,
                got: format!("no pid in {}", pidfile.display()),
            })?;
        let stats = stats_of(req);
        Ok(RestoreOutcome {
            pid,
            wall,
            stats,
            timeline: Timeline::default(),
            log,
        })
    }
}

/// CRIU's restore statistics, when it wrote them.
fn stats_of(req: &RestoreRequest) -> Option<RestoreStats> {
    RestoreStats::read(&req.images_dir.join("stats-restore"))
        .ok()
        .flatten()
}
