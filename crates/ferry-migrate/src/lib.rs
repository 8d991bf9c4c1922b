//! `ferry migrate`: move a running process tree, runc container or Docker
//! container to another host's agent.
//!
//! 1. **Begin**: connect and authenticate (control stream), say what comes
//!    and how big; the agent checks its room and GPUs. Open the data
//!    streams ([`streams`]).
//! 2. **Pre-copy** ([`precopy`]) while the application runs: read its
//!    memory live ([`ferry_core::live`]; no soft-dirty tracking needed), send
//!    pages whose content the destination lacks, repeat while the changed
//!    bytes shrink, stop when the predicted final transfer fits
//!    `--max-downtime` or after `--max-rounds`.
//!    Then the agent lays out each process's pages image ahead, in the
//!    order CRIU writes it, from the last round's layout.
//! 3. **Final copy** ([`final_copy`]): CRIU dumps the tree and leaves it
//!    *stopped*; the images stream into ferry as CRIU writes them
//!    ([`images`]: digested on the way, nothing written to disk). Only
//!    pages the destination lacks are sent,
//!    the rest is named by digest in page recipes; the agent patches the
//!    images laid out ahead (or rebuilds them), checks them byte-identical
//!    (checksums) and restores them (a process tree stopped; a container
//!    through its engine); on `Restored` ferry commits: the agent resumes
//!    its copy and the source's is killed.
//! 4. **Post-copy** (`--lazy-pages`) of a process tree whose pids the
//!    destination can give it while the source keeps them (another kernel,
//!    or a tree that is its own pid namespace's init) skips 2 and 3: CRIU
//!    dumps lazily and the destination fetches the memory from the frozen
//!    source after the resume ([`post_copy`]). Other trees pre-copy, then
//!    restore lazily from the rebuilt images (userfaultfd).
//!
//! **Nothing is lost.** Before the commit the source copy is only stopped,
//! so any failure (agent gone, link cut, restore failed, no room) resumes
//! it. One exception is forced by physics: when both ends share a kernel
//! (lab namespaces; detected by equal boot ids) they share one pid space,
//! and the restore needs the source's pids, so the source is killed just
//! before the restore; if the restore then fails ferry restores the
//! application locally from the destination's rebuilt images (same host,
//! kept whole by the agent, checked against what was sent).

#![forbid(unsafe_code)]

pub mod events;
mod files;
mod final_copy;
mod images;
pub mod outcome;
pub mod plan;
mod post_copy;
mod precopy;
mod report;
pub mod streams;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_core::checkpoint::CheckpointError;
use ferry_core::live::LiveError;
use ferry_criu::Criu;
use ferry_transport::msg::{RestoreOpts, Target};
use ferry_transport::{Conn, Msg, Secret, TransportError};

pub use events::{Cancel, Event, Events};
pub use report::{FinalReport, MigrateReport, RoundReport, Route, StopReason};

/// What moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrateTarget {
    /// A process tree, by its root's pid.
    Process { pid: i32 },
    /// A runc container; `bundle` names its bundle on the destination
    /// (default: the same path as here).
    Runc {
        id: String,
        root: PathBuf,
        bundle: Option<PathBuf>,
        /// The id on the destination (default: the same id).
        new_id: Option<String>,
    },
    /// A Docker container (through `socket`), restored on the destination
    /// under `new_name` (default: the same name).
    Docker {
        name: String,
        socket: PathBuf,
        new_name: Option<String>,
    },
}

/// How to migrate.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    pub target: MigrateTarget,
    /// A container's files that move with it.
    pub files: ferry_core::target::fs::FsScope,
    /// The destination agent, HOST:PORT.
    pub to: String,
    pub secret: Secret,
    pub max_downtime: Duration,
    pub max_rounds: u32,
    /// Data streams (default: one per core).
    pub streams: usize,
    pub restore: RestoreOpts,
    /// The hybrid route: pre-copy, then a lazy dump whose pages the
    /// destination takes from its store where pre-copy brought them and
    /// they have not changed (falls back to pre-copy where a lazy dump
    /// cannot move the target, saying why).
    pub hybrid: bool,
    /// When the route's predicted frozen time exceeds `max_downtime`: go
    /// on (the miss is announced before the freeze and marked in the
    /// report) instead of refusing.
    pub accept_downtime_miss: bool,
    /// When pre-copy's final phase is predicted to miss `max_downtime`,
    /// the miss is not accepted, and the hybrid route fits: take it.
    pub switch_route: bool,
    pub ignore_gpu: bool,
    /// Where the final dump is staged (default: tmpfs when it fits).
    pub staging: Option<PathBuf>,
    /// Keep a copy of the final dump's images here (for checks).
    pub keep_images: Option<PathBuf>,
    /// Longest wait for the destination's answer or for a send to go out
    /// (a dead agent or a cut link fails the migration after this).
    pub io_timeout: Duration,
    /// After a lost answer to the restore or commit, how long to keep
    /// asking the destination for the outcome before leaving the
    /// application stopped here for `ferry resolve`.
    pub outcome_wait: Duration,
    /// CRIU options the user passed: the source's dump applies them all;
    /// the destination's restore those [`RestoreOpts::criu`] carries.
    pub criu_options: ferry_criu::CriuOptions,
    /// Most bytes per second on the data streams (None: as fast as the
    /// link goes).
    pub max_bandwidth: Option<u64>,
    /// Live progress.
    pub events: Events,
    /// Cancellation (SIGINT/SIGTERM).
    pub cancel: Cancel,
}

/// Time allowed to connect and authenticate.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot capture the container's files ahead of the freeze; nothing was frozen, the application keeps running here")]
    FilesAhead(#[source] Box<CheckpointError>),
    #[error("the container's files could not go to the destination ahead of the freeze; nothing was frozen, the application keeps running here")]
    FilesAheadSent(#[source] TransportError),
    #[error("no process with pid {pid} to migrate")]
    NoSuchProcess { pid: i32 },
    #[error(transparent)]
    Runc(#[from] ferry_core::target::runc::RuncError),
    #[error(transparent)]
    Docker(#[from] ferry_core::target::docker::DockerError),
    #[error(
        "post-copy (--lazy-pages) is not supported for containers yet: their engine restores them"
    )]
    LazyContainer,
    #[error("cancelled before anything was frozen; the application keeps running here")]
    Cancelled,
    #[error("the frozen phase is predicted to take {:.0} ms ({:?}: dump {:.0} ms, transfer {:.0} ms, restore {:.0} ms), over --max-downtime {:.0} ms{}; nothing was frozen, the application keeps running here (--accept-downtime-miss goes on anyway)", predicted.total_ms, predicted.route, predicted.dump_ms, predicted.transfer_ms, predicted.restore_ms, limit_ms, no_switch.as_ref().map(|w| format!(", and no route that fits can take it ({w})")).unwrap_or_default())]
    DowntimeMiss {
        predicted: plan::Prediction,
        limit_ms: f64,
        /// Why no other route was taken.
        no_switch: Option<String>,
    },
    #[error("pre-flight check refused the migration; nothing was frozen")]
    Preflight(#[from] ferry_core::target::preflight::PreflightError),
    #[error("GPU check refused the migration; nothing was frozen")]
    Gpu(#[from] ferry_core::gpu::GpuError),
    #[error("cannot reach the destination agent {to}; the application keeps running here")]
    Connect {
        to: String,
        #[source]
        source: TransportError,
    },
    #[error("the destination refused the migration; the application keeps running here")]
    Refused(#[source] TransportError),
    #[error("pre-copy failed; the application keeps running here")]
    Precopy(#[source] PrecopyError),
    #[error("the final dump failed; the application keeps running here")]
    Dump(#[source] Box<CheckpointError>),
    #[error("the final dump failed while its images streamed to ferry; the application keeps running here")]
    DumpStream(#[source] ferry_criu::streamer::StreamError<images::CaptureError>),
    #[error("cannot create staging in {}", path.display())]
    Staging {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the final copy failed; {after}")]
    Final {
        after: Fate,
        #[source]
        source: FinalError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PrecopyError {
    #[error(transparent)]
    Live(#[from] LiveError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cancelled (SIGINT or SIGTERM) before anything was frozen")]
    Cancelled,
}

#[derive(Debug, thiserror::Error)]
pub enum FinalError {
    #[error("cannot read the final dump's {}", path.display())]
    Images {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    PageServer(#[from] ferry_criu::page_server::PageServerError),
    #[error(transparent)]
    Undecided(Box<Unanswered>),
    #[error("cancelled (SIGINT or SIGTERM) before the commit")]
    Cancelled,
    #[error("the hybrid route's last read of the frozen tree failed")]
    FinalRound(#[source] Box<PrecopyError>),
}

/// The destination never said whether it committed.
#[derive(Debug, thiserror::Error)]
#[error("the destination's answer to the restore or commit was lost, and asking {to} again for session {session}'s outcome failed for {} s", waited.as_secs())]
pub struct Unanswered {
    pub to: String,
    pub session: String,
    pub waited: Duration,
    #[source]
    pub source: TransportError,
}

/// Where the application is after a failed final copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// The source copy was resumed.
    ResumedHere,
    /// Same kernel: the source was gone, ferry restored it here as `pid`.
    RestoredHere { pid: i32 },
    /// Post-copy failed after the commit: the source resumed from the
    /// dump, and what the application did on the destination is lost.
    ResumedLosingWork,
    /// Everything failed; the images to restore by hand are at `images`.
    Lost { images: PathBuf, why: String },
    /// The destination's outcome is unknown: the application is left
    /// stopped here (or, on one kernel, was already gone), and `ferry
    /// resolve` settles it once the destination answers.
    Undecided(Box<Unsettled>),
}

/// A migration whose outcome only the destination knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsettled {
    pub to: String,
    pub session: String,
    /// The stopped tree here, if it still exists.
    pub pid: Option<i32>,
}

impl std::fmt::Display for Fate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fate::ResumedHere => f.write_str("the application was resumed here"),
            Fate::ResumedLosingWork => f.write_str(
                "the application was resumed here from the dump; WHAT IT DID ON THE DESTINATION SINCE THE COMMIT IS LOST"
            ),
            Fate::RestoredHere { pid } => write!(
                f,
                "the application was restored here from the final dump as pid {pid}"
            ),
            Fate::Lost { images, why } => write!(
                f,
                "THE APPLICATION IS NOT RUNNING: the local restore failed too ({why}); its images are kept in {}",
                images.display()
            ),
            Fate::Undecided(u) => match u.as_ref() {
            Unsettled {
                to,
                session,
                pid: Some(pid),
            } => write!(
                f,
                "THE APPLICATION IS LEFT STOPPED HERE (pid {pid}): whether it runs on the destination is not known; once {to} answers, `ferry resolve --to {to} --session {session} --pid {pid}` kills or resumes it"
            ),
            Unsettled { to, session, pid: None } => write!(
                f,
                "THE APPLICATION MAY RUN ON THE DESTINATION ONLY: the source was gone and whether the destination committed is not known; `ferry resolve --to {to} --session {session}` asks"
            ),
            },
        }
    }
}

/// Migrates `opts.pid` to the agent at `opts.to`.
pub fn migrate(criu: &Criu, opts: &MigrateOptions) -> Result<MigrateReport, MigrateError> {
    let start = Instant::now();
    let (pid, target) = match &opts.target {
        MigrateTarget::Process { pid } => (*pid, Target::Process { pid: *pid }),
        MigrateTarget::Runc {
            id,
            root,
            bundle,
            new_id,
        } => {
            if opts.restore.lazy_pages {
                return Err(MigrateError::LazyContainer);
            }
            let state = ferry_core::target::runc::locate(root, id)?;
            (
                state.init_pid,
                Target::Runc {
                    id: new_id.clone().unwrap_or_else(|| id.clone()),
                    bundle: bundle.clone(),
                },
            )
        }
        MigrateTarget::Docker {
            name,
            socket,
            new_name,
        } => {
            if opts.restore.lazy_pages {
                return Err(MigrateError::LazyContainer);
            }
            let c = ferry_core::target::docker::locate(socket, name)?;
            (
                c.state.init_pid,
                Target::Docker {
                    name: new_name.clone().unwrap_or_else(|| name.clone()),
                },
            )
        }
    };
    if !ferry_image::process::is_alive(pid) {
        return Err(MigrateError::NoSuchProcess { pid });
    }
    ferry_core::target::preflight::check(
        pid,
        ferry_core::target::preflight::Allow {
            tcp_established: opts.restore.tcp_established || opts.criu_options.tcp_close,
            ext_unix_sk: opts.restore.ext_unix_sk,
        },
    )?;
    let pids = ferry_image::process::tree(pid).map_err(|_| MigrateError::NoSuchProcess { pid })?;
    let plan = ferry_core::gpu::assess(&pids, opts.ignore_gpu)?;
    let rss = ferry_image::process::tree_rss_bytes(pid).unwrap_or(0);

    let session = session_id();
    // Held until the agent has answered it.
    let proof = ferry_sys::host::KernelProof::new()
        .map_err(|e| tracing::warn!(error = %e, "cannot make a kernel proof: the destination will be treated as another host"))
        .ok();
    let connect_err = |source| MigrateError::Connect {
        to: opts.to.clone(),
        source,
    };
    let mut control =
        Conn::connect(&opts.to, &opts.secret, CONNECT_TIMEOUT).map_err(connect_err)?;
    control
        .send_msg(&Msg::Begin {
            session: session.clone(),
            target,
            expected_bytes: rss,
            boot_id: ferry_sys::host::boot_id(),
            host: ferry_sys::host::hostname(),
            gpu: plan.record().map(|r| Box::new(r.into())),
            kernel_proof: proof.as_ref().map(|p| {
                let (pid, fd) = p.locator();
                ferry_transport::msg::ProofLocator { pid, fd }
            }),
        })
        .map_err(connect_err)?;
    let (dest_host, dest_boot, answer) = match control.recv_msg() {
        Ok(Msg::Accepted {
            host,
            boot_id,
            kernel_proof,
            ..
        }) => (host, boot_id, kernel_proof),
        Ok(other) => {
            return Err(MigrateError::Refused(TransportError::Unexpected {
                peer: opts.to.clone(),
                got: format!("{other:?}"),
                expected: "Accepted",
            }))
        }
        Err(e) => return Err(MigrateError::Refused(e)),
    };
    control
        .set_read_timeout(Some(opts.io_timeout))
        .map_err(connect_err)?;
    // One kernel only when the agent read the nonce this process holds: an
    // equal boot id alone (VMs cloned from one snapshot) is not enough.
    let same_boot = !dest_boot.is_empty() && dest_boot == ferry_sys::host::boot_id();
    let proved = match (&proof, &answer) {
        (Some(p), Some(a)) => *a == ferry_transport::msg::kernel_proof_answer(p.nonce()),
        _ => false,
    };
    if same_boot && !proved {
        tracing::warn!(to = %opts.to, "the destination has this kernel's boot id but did not prove it runs on it: treated as another host");
    }
    let same_kernel = same_boot && proved;
    if same_kernel {
        // On one kernel the source is gone before the restore: a file it
        // writes whose size another process can change would fail the
        // restore and the way back alike.
        let shared = ferry_core::target::preflight::shared_written_files(pid)?;
        if !shared.is_empty() {
            return Err(
                ferry_core::target::preflight::PreflightError::Unsafe { findings: shared }.into(),
            );
        }
    }
    let mut sender = streams::PageSender::open(
        &opts.to,
        &opts.secret,
        &session,
        opts.streams,
        CONNECT_TIMEOUT,
        opts.io_timeout,
    )
    .map_err(connect_err)?;
    sender.cap(opts.max_bandwidth);
    tracing::info!(%session, to = %opts.to, %dest_host, same_kernel, streams = sender.streams(), "migration begins");

    // A container's files go first, while it runs: the final dump then
    // captures only what changed since.
    let (scope, files_ahead) = match final_copy::container_of(&opts.target) {
        Some(c) if !opts.restore.lazy_pages && !opts.hybrid => {
            let (scope, ahead) = files::send_ahead(&mut control, &c, &opts.files)?;
            (scope, Some(ahead))
        }
        _ => (opts.files.clone(), None),
    };
    let source = final_copy::Source {
        target: &opts.target,
        files: &scope,
        files_capture_us: Default::default(),
        pid,
    };
    if opts.cancel.requested() {
        return Err(MigrateError::Cancelled);
    }
    let limit_ms = opts.max_downtime.as_secs_f64() * 1e3;
    let ended = Ended {
        to: opts.to.clone(),
        dest_host,
        same_kernel,
        streams: sender.streams(),
        start,
        limit_ms,
    };
    let costs_path = plan::costs_path();
    let mut costs = plan::Costs::load(&costs_path);
    let lazy_blocker = post_copy::blocker(&opts.target, pid, same_kernel);
    if opts.restore.lazy_pages && !opts.hybrid && lazy_blocker.is_none() {
        // Post-copy from a lazy dump: no pre-copy, no memory moved while
        // frozen; the destination fetches it on demand afterwards.
        let predicted = costs.lazy(Route::PostCopy, rss / ferry_sys::PAGE_SIZE as u64);
        let announced = keep_promise(opts, predicted, limit_ms, None)?;
        let (final_phase, restored_pid) =
            post_copy::run(criu, &source, opts, &mut control, &session, None)?;
        learn(&mut costs, &costs_path, &final_phase);
        let taken = Taken {
            route: Route::PostCopy,
            route_fallback: None,
            rounds: Vec::new(),
            stop_reason: StopReason::PostCopy,
            precopy_ms: 0.0,
            layout_ms: 0.0,
            predicted,
            announced,
        };
        return Ok(ended.report(taken, final_phase, restored_pid));
    }
    let mut hybrid = opts.hybrid && lazy_blocker.is_none();
    let mut route_fallback = match (opts.hybrid, lazy_blocker) {
        (true, Some(why)) => {
            tracing::warn!(why, "the hybrid route cannot move this target: pre-copy instead");
            Some(format!("hybrid: {why}; pre-copy instead"))
        }
        (false, Some(why)) if opts.restore.lazy_pages => Some(format!(
            "post-copy from a lazy dump: {why}; pre-copy, then a lazy restore from the rebuilt images"
        )),
        _ => None,
    };
    let pre_start = Instant::now();
    let mut pre = precopy::Precopy::new(pid, opts.secret.page_key());
    let stop_reason = pre
        .run(&mut control, &mut sender, opts)
        .map_err(|e| match e {
            PrecopyError::Cancelled => MigrateError::Cancelled,
            e => MigrateError::Precopy(e),
        })?;
    if opts.cancel.requested() {
        return Err(MigrateError::Cancelled);
    }
    // The promise: the whole frozen phase predicted before freezing.
    let last = pre.rounds.last();
    let full = costs.precopy(
        last.map_or(0, |r| r.populated_pages),
        last.map_or(0.0, |r| r.predicted_final_ms),
    );
    let lazy = costs.lazy(Route::Hybrid, last.map_or(0, |r| r.populated_pages));
    let mut predicted = if hybrid { lazy } else { full };
    let mut no_switch = None;
    if !hybrid && full.total_ms > limit_ms {
        no_switch = match lazy_blocker {
            Some(why) => Some(format!("hybrid: {why}")),
            None if opts.restore.lazy_pages => {
                Some("--lazy-pages asked for a lazy restore from the rebuilt images".to_string())
            }
            None if !opts.switch_route => Some("route switching is off".to_string()),
            // Consent to a miss keeps the route asked for.
            None if opts.accept_downtime_miss => {
                Some("--accept-downtime-miss keeps the route asked for".to_string())
            }
            None if lazy.total_ms > limit_ms => {
                Some(format!("hybrid: predicted {:.0} ms", lazy.total_ms))
            }
            None => None,
        };
        if no_switch.is_none() {
            tracing::warn!(
                precopy_ms = full.total_ms,
                hybrid_ms = lazy.total_ms,
                limit_ms,
                "pre-copy's final phase would miss --max-downtime: taking the hybrid route"
            );
            route_fallback = Some(format!(
                "pre-copy's final phase was predicted to take {:.0} ms, over --max-downtime {limit_ms:.0} ms: the hybrid route instead (predicted {:.0} ms)",
                full.total_ms, lazy.total_ms
            ));
            hybrid = true;
            predicted = lazy;
        }
    }
    let announced = keep_promise(opts, predicted, limit_ms, no_switch)?;
    if hybrid {
        // The final phase from a lazy dump: what pre-copy brought and
        // has not changed since comes out of the destination's store.
        let precopy_ms = pre_start.elapsed().as_secs_f64() * 1e3;
        let (final_phase, restored_pid) = post_copy::run(
            criu,
            &source,
            opts,
            &mut control,
            &session,
            Some(post_copy::Hybrid {
                pre: &mut pre,
                sender: &mut sender,
            }),
        )?;
        learn(&mut costs, &costs_path, &final_phase);
        let taken = Taken {
            route: Route::Hybrid,
            route_fallback,
            rounds: pre.rounds,
            stop_reason,
            precopy_ms,
            layout_ms: 0.0,
            predicted,
            announced,
        };
        return Ok(ended.report(taken, final_phase, restored_pid));
    }
    let layout_ms = precopy::send_layouts(&mut control, &pre.layout)
        .map_err(|e| MigrateError::Precopy(e.into()))?;
    let precopy_ms = pre_start.elapsed().as_secs_f64() * 1e3;

    let (final_phase, restored_pid) = final_copy::run(
        criu,
        &source,
        opts,
        &mut control,
        &mut sender,
        &mut pre.known,
        same_kernel,
        &session,
    )?;
    learn(&mut costs, &costs_path, &final_phase);
    let taken = Taken {
        route: if opts.restore.lazy_pages {
            Route::PrecopyLazyRestore
        } else {
            Route::Precopy
        },
        route_fallback,
        rounds: pre.rounds,
        stop_reason,
        precopy_ms,
        layout_ms,
        predicted,
        announced,
    };
    let mut report = ended.report(taken, final_phase, restored_pid);
    report.files_ahead = files_ahead;
    Ok(report)
}

/// What every report of this migration shares.
struct Ended {
    to: String,
    dest_host: String,
    same_kernel: bool,
    streams: usize,
    start: Instant,
    limit_ms: f64,
}

/// The route a migration took up to its final phase, and its promise.
struct Taken {
    route: Route,
    route_fallback: Option<String>,
    rounds: Vec<RoundReport>,
    stop_reason: StopReason,
    precopy_ms: f64,
    layout_ms: f64,
    predicted: plan::Prediction,
    announced: bool,
}

impl Ended {
    fn report(&self, t: Taken, final_phase: FinalReport, restored_pid: i32) -> MigrateReport {
        MigrateReport {
            downtime: plan::DowntimeCheck::new(
                self.limit_ms,
                t.predicted,
                t.announced,
                final_phase.frozen_ms,
            ),
            destination: self.to.clone(),
            destination_host: self.dest_host.clone(),
            same_kernel: self.same_kernel,
            post_copy: t.route != Route::Precopy,
            route: t.route,
            route_fallback: t.route_fallback,
            streams: self.streams,
            rounds: t.rounds,
            stop_reason: t.stop_reason,
            precopy_ms: t.precopy_ms,
            layout_ms: t.layout_ms,
            final_phase,
            restored_pid,
            total_ms: self.start.elapsed().as_secs_f64() * 1e3,
            files_ahead: None,
        }
    }
}

/// Before freezing: a predicted miss of `--max-downtime` refuses the
/// migration, or, with `--accept-downtime-miss`, is announced (returns
/// true) and the migration goes on.
fn keep_promise(
    opts: &MigrateOptions,
    predicted: plan::Prediction,
    limit_ms: f64,
    no_switch: Option<String>,
) -> Result<bool, MigrateError> {
    if predicted.total_ms <= limit_ms {
        return Ok(false);
    }
    if !opts.accept_downtime_miss {
        return Err(MigrateError::DowntimeMiss {
            predicted,
            limit_ms,
            no_switch,
        });
    }
    tracing::warn!(
        predicted_ms = predicted.total_ms,
        limit_ms,
        route = ?predicted.route,
        "the frozen phase is predicted to miss --max-downtime; going on (--accept-downtime-miss)"
    );
    opts.events.emit(Event::DowntimeMiss {
        predicted_ms: predicted.total_ms,
        limit_ms,
    });
    Ok(true)
}

/// Learns this host's costs from a migration that completed.
fn learn(costs: &mut plan::Costs, path: &std::path::Path, f: &FinalReport) {
    costs.learn(f);
    if let Err(e) = costs.save(path) {
        tracing::debug!(path = %path.display(), error = %e, "cannot keep the measured costs");
    }
}

fn session_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!("m{t:x}-{:x}-{:08x}", std::process::id(), fastrand::u32(..))
}
