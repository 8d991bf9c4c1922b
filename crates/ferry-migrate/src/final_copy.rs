//! The frozen phase: dump (left stopped), send what the destination lacks,
//! rebuild there, restore there, commit; or put the application back.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::images::{self, Outgoing, StreamedImages};
use super::report::FinalReport;
use super::streams::PageSender;
use super::{Fate, FinalError, MigrateError, MigrateOptions, MigrateTarget};
use ferry_core::checkpoint::{self, staging, CheckpointError};
use ferry_core::target::runc::{self, RestoreFlags};
use ferry_core::target::ContainerRef;
use ferry_criu::capture::Capture;
use ferry_criu::streamer::StreamError;
use ferry_criu::{Criu, DumpOutcome, DumpRequest, NoHooks, RestoreRequest};
use ferry_image::page::Digest;
use ferry_image::process;
use ferry_transport::msg::RestoreOpts;
use ferry_transport::{Conn, Msg, TransportError};

/// Name prefix of the source's staging directories.
const STAGING_PREFIX: &str = "ferry-migrate-";
/// Room a streamed dump's staging needs when nothing is written out there:
/// CRIU's log and statistics.
const STREAM_STAGING: u64 = 16 << 20;
/// How long the source's killed pids may take to be reaped (same kernel).
const PID_FREE_WAIT: Duration = Duration::from_secs(5);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The application being moved, as the final phase acts on it.
pub struct Source<'a> {
    pub target: &'a MigrateTarget,
    /// The container's files that move with it.
    pub files: &'a ferry_core::target::fs::FsScope,
    /// Microseconds the last dump spent capturing them (while frozen).
    pub files_capture_us: std::sync::atomic::AtomicU64,
    /// Root of its process tree (a container's init, as this host sees it).
    pub pid: i32,
}

impl Source<'_> {
    pub(super) fn dump(
        &self,
        criu: &Criu,
        req: &DumpRequest,
    ) -> Result<DumpOutcome, CheckpointError> {
        self.dump_with(criu, req, &mut NoHooks)
    }

    /// [`Source::dump`], CRIU's notifications going to `hooks`.
    pub(super) fn dump_with(
        &self,
        criu: &Criu,
        req: &DumpRequest,
        hooks: &mut dyn ferry_criu::NotifyHook,
    ) -> Result<DumpOutcome, CheckpointError> {
        match self.container() {
            None => checkpoint::dump(criu, req, hooks),
            Some(c) => checkpoint::dump_container(criu, &c, req, self.files, hooks).map(|o| {
                self.files_capture_us
                    .store(o.files_capture.as_micros() as u64, Ordering::Relaxed);
                o.dump
            }),
        }
    }

    /// The container, unless the target is a plain process tree.
    fn container(&self) -> Option<ContainerRef> {
        container_of(self.target)
    }

    /// Ends the (stopped) source copy for good.
    fn kill(&self, pids: &[i32]) {
        match self.target {
            MigrateTarget::Process { .. } => process::kill_all(pids),
            MigrateTarget::Runc { id, root, .. } => {
                if let Err(e) = runc::delete(root, id) {
                    tracing::warn!(error = %e, "cannot delete the source container; killing its tasks");
                    process::kill_all(pids);
                }
            }
            MigrateTarget::Docker { name, socket, .. } => {
                if let Err(e) = ferry_core::target::docker::remove(socket, name) {
                    tracing::warn!(error = %e, "cannot remove the source container; killing its tasks");
                    process::kill_all(pids);
                }
            }
        }
    }

    /// Same kernel, source gone, destination failed: restore here from the
    /// images that were sent. A stopped process holding one of the tree's
    /// pids can only be the destination's unfinished copy: it is killed.
    fn restore_here(
        &self,
        criu: &Criu,
        opts: &MigrateOptions,
        images: &Path,
        pids: &[i32],
    ) -> Fate {
        let restored = match self.container() {
            None => {
                for p in pids {
                    if matches!(process::ProcessInfo::read(*p), Ok(i) if i.is_stopped()) {
                        let _ = process::signal(*p, Signal::SIGKILL);
                    }
                    process::wait_pid_free(*p, PID_FREE_WAIT);
                }
                let req = RestoreRequest {
                    tcp_established: opts.restore.tcp_established,
                    shell_job: opts.restore.shell_job,
                    ext_unix_sk: opts.restore.ext_unix_sk,
                    file_locks: opts.restore.file_locks,
                    log_level: opts.restore.log_level,
                    log_file: "restore-fallback.log".into(),
                    ..RestoreRequest::new(images)
                };
                checkpoint::restore(criu, &req, &mut NoHooks).map(|o| o.pid)
            }
            Some(c) => checkpoint::restore_container(
                &c,
                checkpoint::Source::Dir(images),
                None,
                RestoreFlags {
                    tcp_established: opts.restore.tcp_established,
                    ext_unix_sk: opts.restore.ext_unix_sk,
                    file_locks: opts.restore.file_locks,
                    consume_images: false,
                },
            )
            .map(|o| o.pid),
        };
        match restored {
            Ok(pid) => Fate::RestoredHere { pid },
            Err(e) => Fate::Lost {
                images: images.to_path_buf(),
                why: ferry_image::units::chain(&e),
            },
        }
    }
}

/// The container `target` names, unless it is a plain process tree.
pub(crate) fn container_of(target: &MigrateTarget) -> Option<ContainerRef> {
    match target {
        MigrateTarget::Process { .. } => None,
        MigrateTarget::Runc { id, root, .. } => Some(ContainerRef::Runc {
            id: id.clone(),
            root: root.clone(),
        }),
        MigrateTarget::Docker { name, socket, .. } => Some(ContainerRef::Docker {
            name: name.clone(),
            socket: socket.clone(),
        }),
    }
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    criu: &Criu,
    source: &Source<'_>,
    opts: &MigrateOptions,
    control: &mut Conn,
    sender: &mut PageSender,
    known: &mut HashSet<Digest>,
    same_kernel: bool,
    session: &str,
) -> Result<(FinalReport, i32), MigrateError> {
    let pid = source.pid;
    // Its images are written here too (to staging, as they stream) only
    // if they are to be kept. On one kernel the source goes before the
    // destination restores; if that restore fails, the source restores
    // from the destination's own rebuilt images (same host), checked first.
    let copy = opts.keep_images.is_some();
    let rss = process::tree_rss_bytes(pid).unwrap_or(0);
    let room = if copy { rss } else { STREAM_STAGING };
    let stage = source_staging(opts, room)?;
    let images = stage.path().join("images");
    let req = DumpRequest {
        leave_stopped: true,
        stream: true,
        ..final_dump_request(opts, pid, &images)
    };
    let mut report = FinalReport::default();
    let frozen_at = Instant::now();
    let wire_before = sender.wire_bytes();
    // The images stream into ferry as CRIU writes them: digested on the
    // way, the new pages queued for the destination, nothing written out.
    let sink = StreamedImages::new(
        sender,
        known,
        copy.then(|| images.clone()),
        opts.secret.page_key(),
    );
    opts.events.emit(crate::Event::Phase { phase: "freezing" });
    let dumped = dump_streamed(criu, source, &req, &sink)?;
    // The tree as dumped: CRIU left it stopped, so no child comes or goes
    // now. Listed before the freeze it could miss a child forked since,
    // which would then outlive the source and hold a pid the restore
    // needs on one kernel.
    let pids = process::tree(pid).unwrap_or_else(|_| vec![pid]);
    let (outgoing, counts) = match sink.finish(&images) {
        Ok(done) => done,
        Err(e) => {
            process::continue_tree(pid);
            return Err(MigrateError::Final {
                after: Fate::ResumedHere,
                source: e,
            });
        }
    };
    report.dump_ms = ms(dumped.wall);
    report.criu_dump = dumped
        .stats
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok());
    report.pages_in_images = counts.in_images;
    report.zero_pages = counts.zero;
    report.pages_sent = counts.sent;

    report.files_capture_ms = source.files_capture_us.load(Ordering::Relaxed) as f64 / 1e3;
    report.files_frozen_bytes = outgoing
        .entries
        .iter()
        .filter(|e| ferry_core::target::fs::is_fs_file(&e.name))
        .map(|e| e.size)
        .sum();
    // From here the source is stopped: every failure path decides its fate.
    let entries = outgoing.entries.clone();
    let mut progress = Progress::default();
    let result = transfer_and_restore(
        opts,
        session,
        control,
        sender,
        outgoing,
        &mut report,
        same_kernel,
        source,
        &pids,
        &mut progress,
    );
    report.wire_bytes += sender.wire_bytes() - wire_before;
    match result {
        Ok(restored) => {
            report.frozen_ms = ms(frozen_at.elapsed());
            opts.events.emit(crate::Event::Phase { phase: "committed" });
            if !progress.source_killed {
                source.kill(&pids);
            }
            if let Some(keep) = &opts.keep_images {
                // The migration is done: a failed copy only costs the copy.
                if let Err(e) = copy_dir(&images, keep) {
                    tracing::error!(dir = %keep.display(), error = %e, "migrated, but cannot keep the images");
                }
            }
            Ok((report, restored))
        }
        Err(cause @ FinalError::Undecided(_)) => {
            // Neither resumed nor restored here: the destination may run it.
            let _ = stage.keep();
            Err(MigrateError::Final {
                after: Fate::Undecided(Box::new(crate::Unsettled {
                    to: opts.to.clone(),
                    session: session.to_string(),
                    pid: (!progress.source_killed).then_some(pid),
                })),
                source: cause,
            })
        }
        Err(cause) => {
            let after = if !progress.source_killed {
                process::continue_tree(pid);
                Fate::ResumedHere
            } else if copy {
                source.restore_here(criu, opts, &images, &pids)
            } else {
                match progress.dest_images.as_deref() {
                    Some(dir) => match images::verify_dir(&opts.secret.page_key(), dir, &entries) {
                        Ok(()) => source.restore_here(criu, opts, dir, &pids),
                        Err(why) => Fate::Lost {
                            images: dir.to_path_buf(),
                            why: format!(
                                "the destination's images cannot be used: {}",
                                ferry_image::units::chain(&why)
                            ),
                        },
                    },
                    None => Fate::Lost {
                        images: images.clone(),
                        why: "the destination rebuilt no images".into(),
                    },
                }
            };
            if let Fate::Lost { .. } = after {
                // Keep the images: they are all that is left.
                let _ = stage.keep();
            }
            Err(MigrateError::Final {
                after,
                source: cause,
            })
        }
    }
}

/// The final dump's request as the migration's options make it (both
/// routes add their own mode).
pub(super) fn final_dump_request(opts: &MigrateOptions, pid: i32, images: &Path) -> DumpRequest {
    DumpRequest {
        tcp_established: opts.restore.tcp_established,
        shell_job: opts.restore.shell_job,
        ext_unix_sk: opts.restore.ext_unix_sk,
        file_locks: opts.restore.file_locks,
        log_level: opts.restore.log_level,
        ignore_gpu: opts.ignore_gpu,
        // Connections not yet accepted are left out; their clients retry.
        tcp_skip_in_flight: true,
        options: opts.criu_options.clone(),
        ..DumpRequest::new(pid, images)
    }
}

/// A staging directory for the source's final dump, with room for `room`
/// bytes (tmpfs when it fits), after sweeping what dead migrations left.
pub(super) fn source_staging(
    opts: &MigrateOptions,
    room: u64,
) -> Result<tempfile::TempDir, MigrateError> {
    staging::sweep_stale(
        STAGING_PREFIX,
        opts.staging.as_deref(),
        staging::SWEEP_GRACE,
    );
    staging::create(STAGING_PREFIX, room, opts.staging.as_deref()).map_err(|source| {
        MigrateError::Staging {
            path: staging::base_for(room, opts.staging.as_deref()),
            source,
        }
    })
}

/// Dumps the process tree into `sink` through CRIU's image streamer: the
/// pages are digested and what the destination lacks is queued while CRIU
/// dumps. A failure of either side fails both (a broken pipe fails CRIU's
/// dump; CRIU gone ends the capture), and the tree runs on.
fn dump_streamed(
    criu: &Criu,
    source: &Source<'_>,
    req: &DumpRequest,
    sink: &StreamedImages<'_>,
) -> Result<DumpOutcome, MigrateError> {
    std::fs::create_dir_all(&req.images_dir).map_err(|source| MigrateError::Staging {
        path: req.images_dir.clone(),
        source,
    })?;
    let capture = Capture::listen(&req.images_dir).map_err(MigrateError::DumpStream)?;
    let ended = AtomicBool::new(false);
    let (dumped, captured) = std::thread::scope(|s| {
        let taking = s.spawn(|| capture.capture(sink, &ended));
        let dumped = source.dump(criu, req);
        ended.store(true, Ordering::Release);
        let captured = taking.join().unwrap_or_else(|_| {
            Err(StreamError::Protocol {
                what: "the capture thread panicked".into(),
                source: std::io::Error::other("panic"),
            })
        });
        (dumped, captured)
    });
    drop(capture);
    match (dumped, captured) {
        (Ok(dumped), Ok(captured)) => {
            tracing::debug!(files = captured.files, bytes = captured.bytes, wall = ?captured.wall, "final dump streamed");
            Ok(dumped)
        }
        // The capture's failure (the destination gone, say) is the cause;
        // CRIU's broken pipe only follows from it.
        (dumped, Err(e)) => {
            if dumped.is_ok() {
                process::continue_tree(req.pid);
            }
            Err(MigrateError::DumpStream(e))
        }
        (Err(e), Ok(_)) => Err(MigrateError::Dump(Box::new(log_kept(e)))),
    }
}

/// How far the frozen phase got, for deciding the application's fate.
#[derive(Default)]
struct Progress {
    /// One kernel: the source was killed for its pids.
    source_killed: bool,
    /// Where the destination rebuilt the images (on its host).
    dest_images: Option<std::path::PathBuf>,
}

#[allow(clippy::too_many_arguments)]
fn transfer_and_restore(
    opts: &MigrateOptions,
    session: &str,
    control: &mut Conn,
    sender: &mut PageSender,
    outgoing: Outgoing,
    report: &mut FinalReport,
    same_kernel: bool,
    source: &Source<'_>,
    pids: &[i32],
    progress: &mut Progress,
) -> Result<i32, FinalError> {
    // Cancelled while frozen: before the commit, the source resumes.
    if opts.cancel.requested() {
        return Err(FinalError::Cancelled);
    }
    opts.events.emit(crate::Event::Phase { phase: "transfer" });
    let t = Instant::now();
    let control_before = control.sent_bytes();
    sender.flush()?;
    tracing::debug!(
        flushed_ms = ms(t.elapsed()),
        "final copy: the pages that were queued are all sent"
    );
    control.send_msg(&Msg::Images {
        files: outgoing.entries,
    })?;
    for b in &outgoing.blobs {
        control.send_blob(b)?;
    }
    report.wire_bytes = control.sent_bytes() - control_before;
    report.transfer_ms = ms(t.elapsed());

    control.send_msg(&Msg::Rebuild)?;
    match control.recv_msg()? {
        Msg::Rebuilt {
            ms,
            pages_in_place,
            images,
            ..
        } => {
            report.rebuild_ms = ms;
            report.pages_in_place = pages_in_place;
            progress.dest_images = (!images.is_empty()).then(|| images.into());
        }
        other => return Err(unexpected(control, other, "Rebuilt")),
    }
    if opts.cancel.requested() {
        return Err(FinalError::Cancelled);
    }
    opts.events.emit(crate::Event::Phase { phase: "restore" });
    if same_kernel {
        // One pid space (a process tree needs its pids) and one cgroup
        // tree (a container needs its cgroups): the source goes first.
        // A tree whose root is the init of a pid namespace of its own (a
        // container, or a process tree started so) comes back in a new
        // namespace: its pids here need not be free, and waiting for them
        // would wait for whoever reaps the killed init (a slow PID 1 here
        // took about 1.3 s).
        let t = Instant::now();
        let own_pid_ns = pids
            .first()
            .is_some_and(|&p| process::is_pid_namespace_init(p));
        source.kill(pids);
        progress.source_killed = true;
        if !own_pid_ns {
            for p in pids {
                process::wait_pid_free(*p, PID_FREE_WAIT);
            }
        }
        report.pid_wait_ms = ms(t.elapsed());
    }
    restore_and_commit(
        control,
        opts.restore.clone(),
        report,
        &opts.to,
        &opts.secret,
        session,
        opts.outcome_wait,
    )
}

/// The destination's restore (left stopped) and the commit that resumes
/// it; the restored pid. Once the restore was asked for, a failure is
/// final only on the destination's word: if its answer is lost, it is asked
/// again (on new connections) until it says whether it committed; with no
/// answer at all the error is [`FinalError::Undecided`], and the caller
/// must leave the application stopped.
pub(super) fn restore_and_commit(
    control: &mut Conn,
    restore: RestoreOpts,
    report: &mut FinalReport,
    to: &str,
    secret: &ferry_transport::Secret,
    session: &str,
    outcome_wait: std::time::Duration,
) -> Result<i32, FinalError> {
    let t = Instant::now();
    let attempt = || -> Result<i32, FinalError> {
        control.send_msg(&Msg::Restore { opts: restore })?;
        let restored = match control.recv_msg()? {
            Msg::Restored { pid, ms, stats } => {
                report.restore_ms = ms;
                report.criu_restore = stats;
                pid
            }
            other => return Err(unexpected(control, other, "Restored")),
        };
        let t = Instant::now();
        control.send_msg(&Msg::Commit)?;
        ferry_core::fault::point("migrate-after-commit-sent");
        match control.recv_msg()? {
            Msg::Committed => {}
            other => return Err(unexpected(control, other, "Committed")),
        }
        report.commit_ms = ms(t.elapsed());
        Ok(restored)
    };
    let cause = match attempt() {
        Ok(pid) => return Ok(pid),
        Err(e) => e,
    };
    tracing::warn!(error = %ferry_image::units::chain(&cause), %session, "no answer from the destination to the restore or commit: asking it for the outcome (the application stays stopped meanwhile)");
    match crate::outcome::ask(to, secret, session, outcome_wait) {
        Ok(crate::outcome::Outcome::Committed { pid }) => {
            tracing::warn!(%session, pid, "the destination committed: its answer had been lost");
            report.commit_ms = ms(t.elapsed());
            Ok(pid)
        }
        Ok(crate::outcome::Outcome::Aborted) => Err(cause),
        Err(source) => Err(FinalError::Undecided(Box::new(crate::Unanswered {
            to: to.to_string(),
            session: session.to_string(),
            waited: outcome_wait,
            source,
        }))),
    }
}

/// A failed dump's CRIU log, copied out of the staging directory that is
/// about to go, and named in the error.
pub(super) fn log_kept(e: CheckpointError) -> CheckpointError {
    match e {
        CheckpointError::DumpFailed { pid, after, source } => {
            let source = match source
                .log_path()
                .and_then(|l| staging::keep_log(l, "migrate-dump"))
            {
                Some(kept) => source.with_log(kept),
                None => source,
            };
            CheckpointError::DumpFailed { pid, after, source }
        }
        e => e,
    }
}

pub(super) fn unexpected(control: &Conn, got: Msg, expected: &'static str) -> FinalError {
    FinalError::Transport(TransportError::Unexpected {
        peer: control.peer().to_string(),
        got: format!("{got:?}"),
        expected,
    })
}

pub(super) fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_file() {
            fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}
