//! Post-copy from a lazy dump: the frozen phase moves no memory at all.
//!
//! 1. CRIU dumps the tree with `--lazy-pages`: every image but the lazily
//!    restorable memory, which stays where it is, in the dumped tree; CRIU
//!    keeps the tree frozen and waits on its page server (loopback), where
//!    ferry connects at once ([`LazyDumpLink`]).
//! 2. The images (about a megabyte for a 1 GiB process) go to the agent,
//!    which restores with `criu restore --lazy-pages` and a `criu
//!    lazy-pages` daemon whose page server is ferry's, and resumes the tree
//!    on commit: the downtime ends there.
//! 3. The daemon fetches every page the tree faults on, and then the rest:
//!    each request comes over the session's page-source connection, and
//!    ferry reads the pages out of the frozen source tree
//!    (`process_vm_readv`). Zero pages are named, not sent.
//! 4. When the daemon has every page, the agent says so and ferry ends
//!    CRIU's transfer: CRIU kills the source tree and the dump returns.
//!
//! Until every page has moved the source tree, frozen as dumped, is the
//! whole application; the destination's copy is not. So any failure, before
//! or after the commit, fails CRIU's transfer, and CRIU resumes the tree
//! here (ferry's own death too: its link to CRIU resets); the agent kills
//! its copy when it is not committed, or when its page relay fails (the
//! copy could not go on). After a commit, what the application did on the
//! destination is lost that way, and the source must survive until the end:
//! post-copy's risk, documented with `--lazy-pages`.
//!
//! The source tree keeps its pids until the end, so on one kernel (lab
//! namespaces) this route needs a tree that is the init of a pid namespace
//! of its own (it is restored in a new one); [`blocker`] says when it is
//! not.
//!
//! **The hybrid route** (`--hybrid`) runs pre-copy first, then this final
//! phase with pre-copy's state ([`Hybrid`]):
//! - a page asked for whose content the destination's store holds
//!   (unchanged since pre-copy) is named by its digest;
//! - meanwhile ferry reads the frozen tree once more (a last pre-copy
//!   round: what changed goes to the store on the data streams) and sends
//!   the agent the tree's final map (every page's address and digest);
//! - once the map covers every lazy page of the images the agent serves
//!   the rest out of its store and says so (`MapInstalled`): the source is
//!   released then, without waiting for every page to be fetched.

use std::collections::{HashMap, HashSet};

use std::time::{Duration, Instant};

use super::final_copy::{
    final_dump_request, log_kept, restore_and_commit, source_staging, unexpected, Source,
};
use super::images;
use super::report::FinalReport;
use super::{Fate, FinalError, MigrateError, MigrateOptions, MigrateTarget};
use ferry_criu::page_server::{LazyDumpLink, PageServerError, PAGE};
use ferry_criu::{Criu, DumpRequest, HookError, LazySocket, Notification, Script};
use ferry_image::process;
use ferry_transport::msg::RestoreOpts;
use ferry_transport::recent::SentPages;
use ferry_transport::{Conn, Msg, TransportError};

/// Room for a lazy dump's images (no memory in them) and CRIU's log.
const STAGING_BYTES: u64 = 64 << 20;
/// Longest wait for CRIU's page server after the dump began.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest post-copy: every page resident on the destination.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(600);

/// Why a final phase from a lazy dump cannot move this target (None: it
/// can): it must be a process tree whose pids the destination can give it
/// while the source keeps them (another kernel, or a tree that is its own
/// pid namespace's init).
pub fn blocker(target: &MigrateTarget, pid: i32, same_kernel: bool) -> Option<&'static str> {
    if !matches!(target, MigrateTarget::Process { .. }) {
        return Some("a container is restored by its engine, which has no lazy-pages restore");
    }
    if same_kernel && !process::is_pid_namespace_init(pid) {
        return Some("both ends share one kernel and the tree is not the init of a pid namespace of its own: the frozen source keeps its pids until every page has moved, and the restore needs them");
    }
    None
}

/// What the page source did after the commit.
#[derive(Debug, Default)]
struct Served {
    requests: u64,
    pages: u64,
    zero_pages: u64,
    /// Pages named by their number among those recently sent in full.
    repeated_pages: u64,
    /// Pages named by digest: held in the destination's store (hybrid).
    stored_pages: u64,
    /// The agent installed the final map: the source went before every
    /// page was fetched.
    released_by_map: bool,
    /// The agent's count of the time until all memory was resident.
    ms: f64,
    /// Bytes this side sent on the page-source connection.
    wire_bytes: u64,
}

pub fn run(
    criu: &Criu,
    source: &Source<'_>,
    opts: &MigrateOptions,
    control: &mut Conn,
    session: &str,
    hybrid: Option<Hybrid<'_>>,
) -> Result<(FinalReport, i32), MigrateError> {
    let pid = source.pid;
    // Answers name what the store held when the final phase began; the
    // final round adds to pre-copy's own set meanwhile.
    let known_then = hybrid.as_ref().map(|h| h.pre.known.clone());
    let known = known_then.as_ref();
    let stage = source_staging(opts, STAGING_BYTES)?;
    let images = stage.path().join("images");
    std::fs::create_dir_all(&images).map_err(|e| MigrateError::Staging {
        path: images.clone(),
        source: e,
    })?;
    // CRIU's page server and ferry talk over a connection ferry made
    // itself: no port for another local user to reach first.
    let (ours, theirs) = ferry_sys::net::loopback_pair().map_err(|e| MigrateError::Staging {
        path: images.clone(),
        source: e,
    })?;
    let req = DumpRequest {
        lazy_socket: Some(LazySocket::new(theirs.into())),
        ..final_dump_request(opts, pid, &images)
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();

    let mut report = FinalReport {
        lazy_dump: true,
        ..FinalReport::default()
    };
    let frozen_at = Instant::now();
    opts.events.emit(crate::Event::Phase { phase: "freezing" });
    let resident = process::tree_rss_bytes(pid).unwrap_or(0) / PAGE as u64;
    let committed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let dumping = s.spawn(|| {
            // CRIU says `status-ready` when its page server starts: the
            // images are written then.
            let mut hooks = move |n: &mut Notification| -> Result<(), HookError> {
                if n.script == Script::StatusReady {
                    let _ = ready_tx.send(());
                }
                Ok(())
            };
            source.dump_with(criu, &req, &mut hooks)
        });
        let ready = wait_ready(&ready_rx, LISTEN_TIMEOUT, &mut || !dumping.is_finished());
        let link = match ready.map(|()| LazyDumpLink::new(ours)) {
            Ok(link) => link,
            Err(e) => {
                // The dump failed (CRIU resumed the tree), or never got
                // this far: its error says why.
                return Err(match dumping.join() {
                    Ok(Err(dump)) => MigrateError::Dump(Box::new(log_kept(dump))),
                    _ => MigrateError::Final {
                        after: resume_after_abort(pid),
                        source: FinalError::PageServer(e),
                    },
                });
            }
        };
        report.dump_ms = ms(frozen_at.elapsed());
        // The tree as dumped: frozen now, so no child comes or goes (one
        // listed before the freeze could have missed a child forked since).
        let pids = process::tree(pid).unwrap_or_else(|_| vec![pid]);
        // Task pids as the images name them (innermost namespace) -> here.
        let by_vpid: HashMap<u64, i32> = pids
            .iter()
            .map(|&p| {
                let inner = process::ns_pids(p).last().copied().unwrap_or(p as u32);
                (u64::from(inner), p)
            })
            .collect();
        // The hybrid route: the final round and map, while the agent
        // restores.
        let mapping = hybrid.map(|h| s.spawn(move || final_map(h, opts, session)));

        // Everything up to the commit; the page source serves from the
        // moment the agent may ask (the lazy restore itself faults on a few
        // pages), in a thread of its own.
        let mut serving = None;
        let mut sock = None;
        let key = opts.secret.page_key();
        let frozen = (if opts.cancel.requested() {
            Err(FinalError::Cancelled)
        } else {
            opts.events.emit(crate::Event::Phase { phase: "transfer" });
            send_images(&key, control, &images, &mut report)
        })
        .and_then(|()| page_source(opts, session))
        .and_then(|mut pages_conn| {
            sock = pages_conn.socket_handle().ok();
            let committed = &committed;
            let events = (opts.events.clone(), resident);
            serving = Some(s.spawn(move || {
                serve_pages(key, &mut pages_conn, &by_vpid, committed, events, known)
            }));
            opts.events.emit(crate::Event::Phase { phase: "restore" });
            let restore = RestoreOpts {
                remote_pages: true,
                lazy_pages: true,
                ..opts.restore.clone()
            };
            restore_and_commit(
                control,
                restore,
                &mut report,
                &opts.to,
                &opts.secret,
                session,
                opts.outcome_wait,
            )
        });
        let restored = match frozen {
            Ok(restored) => {
                committed.store(true, std::sync::atomic::Ordering::Release);
                opts.events.emit(crate::Event::Phase { phase: "committed" });
                restored
            }
            Err(e) => {
                link.abort();
                if let Some(sock) = &sock {
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                }
                if let Some(t) = serving {
                    let _ = t.join();
                }
                let dumped = dumping.join();
                tracing::debug!(?dumped, "lazy dump aborted");
                let after = match &e {
                    FinalError::Undecided(_) => Fate::Undecided(Box::new(crate::Unsettled {
                        to: opts.to.clone(),
                        session: session.to_string(),
                        pid: Some(pid),
                    })),
                    _ => resume_after_abort(pid),
                };
                return Err(MigrateError::Final { after, source: e });
            }
        };
        report.frozen_ms = ms(frozen_at.elapsed());
        tracing::info!(
            frozen_ms = report.frozen_ms,
            "post-copy: the application runs on the destination"
        );

        // Committed: the application runs there; its memory follows.
        let t = Instant::now();
        let served = match serving.map(|t| t.join()) {
            Some(Ok(served)) => served,
            _ => Err(FinalError::PageServer(PageServerError::Fetch {
                pid: 0,
                vaddr: 0,
                pages: 0,
                source: "the page source thread panicked".into(),
            })),
        };
        report.post_copy_ms = ms(t.elapsed());
        if let Some(m) = mapping {
            match m.join() {
                Ok(Ok(round)) => report.final_round = Some(round),
                Ok(Err(e)) => {
                    tracing::warn!(error = %ferry_image::units::chain(&e), "the final page map did not reach the destination: it fetched every page from here")
                }
                Err(_) => tracing::warn!("the final page map's thread panicked"),
            }
        }
        let served = match served {
            Ok(served) => served,
            Err(e) => {
                // Part of the memory never reached the destination, whose
                // copy cannot go on (its agent kills it when the relay
                // fails). The source still holds all of it as it was at
                // the dump: it resumes from there; what the application
                // did on the destination since is lost.
                tracing::error!(error = %ferry_image::units::chain(&e), "post-copy failed after the resume on the destination; resuming the source from the dump");
                link.abort();
                let _ = dumping.join();
                resume_after_abort(pid);
                return Err(MigrateError::Final {
                    after: Fate::ResumedLosingWork,
                    source: e,
                });
            }
        };
        // Every page is on the destination: the transfer ends and CRIU
        // kills the source tree.
        let closed = link.close();
        report.source_released_ms = ms(t.elapsed());
        let dumped = dumping.join();
        if let Err(e) = &closed {
            tracing::error!(error = %ferry_image::units::chain(e), "cannot end CRIU's lazy transfer; killing the source tree");
            process::kill_all(&pids);
        }
        match dumped {
            Ok(Ok(out)) => {
                let mut stats = out
                    .stats
                    .as_ref()
                    .and_then(|s| serde_json::to_value(s).ok());
                // CRIU never stops its frozen-time clock in a lazy dump
                // (4.2.1 reports tens of minutes): not a figure to show.
                if let Some(s) = stats.as_mut().and_then(|s| s.as_object_mut()) {
                    s.remove("frozen");
                }
                report.criu_dump = stats;
            }
            other => {
                tracing::warn!(
                    ?other,
                    "the lazy dump did not end cleanly; killing the source tree"
                );
                process::kill_all(&pids);
            }
        }
        report.post_copy_requests = served.requests;
        report.post_copy_pages = served.pages;
        report.zero_pages = served.zero_pages;
        report.post_copy_repeated_pages = served.repeated_pages;
        report.post_copy_stored_pages = served.stored_pages;
        report.released_by_map = served.released_by_map;
        report.pages_sent =
            served.pages - served.zero_pages - served.repeated_pages - served.stored_pages;
        report.pages_in_images = served.pages;
        if let Some(r) = &report.final_round {
            // The map named every page; those it found changed went to
            // the store in full.
            report.pages_sent += r.sent_pages;
            if served.released_by_map {
                report.pages_in_images = r.populated_pages;
            }
        }
        report.wire_bytes += served.wire_bytes;
        report.post_copy_wire_bytes = served.wire_bytes;
        tracing::info!(
            pages = served.pages,
            requests = served.requests,
            agent_ms = served.ms,
            "post-copy complete: all memory resident on the destination"
        );
        if let Some(keep) = &opts.keep_images {
            // The lazy dump's images (its memory is in none of them).
            if let Err(e) = super::final_copy::copy_dir(&images, keep) {
                tracing::error!(dir = %keep.display(), error = %e, "migrated, but cannot keep the images");
            }
        }
        Ok((report, restored))
    })
}

/// Pre-copy's state, for the hybrid route's final phase.
pub(crate) struct Hybrid<'a> {
    pub pre: &'a mut super::precopy::Precopy,
    pub sender: &'a mut super::streams::PageSender,
}

/// The hybrid route's last round over the frozen tree, then its map to
/// the agent.
fn final_map(
    h: Hybrid<'_>,
    opts: &MigrateOptions,
    session: &str,
) -> Result<super::report::RoundReport, FinalError> {
    let round = h
        .pre
        .final_round(h.sender, opts)
        .map_err(|e| FinalError::FinalRound(Box::new(e)))?;
    // Tests: a map that comes after the commit.
    ferry_core::fault::point("hybrid-before-map");
    if ferry_core::fault::fails("hybrid-map-withheld") {
        // Tests: the destination fetches every page from here, named by
        // digest where its store holds it.
        return Err(FinalError::Transport(TransportError::Closed {
            peer: "fault hybrid-map-withheld injected".into(),
        }));
    }
    let mut conn = Conn::connect(&opts.to, &opts.secret, super::CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(opts.io_timeout))?;
    conn.send_msg(&Msg::PageMap {
        session: session.to_string(),
    })?;
    super::precopy::send_map(&mut conn, &h.pre.layout)?;
    Ok(round)
}

/// The lazy dump's images, whole, to the agent, which writes them out.
fn send_images(
    key: &ferry_image::page::PageKey,
    control: &mut Conn,
    images: &std::path::Path,
    report: &mut FinalReport,
) -> Result<(), FinalError> {
    let t = Instant::now();
    let (entries, blobs) =
        images::whole_files(key, images).map_err(|source| FinalError::Images {
            path: images.to_path_buf(),
            source,
        })?;
    let before = control.sent_bytes();
    control.send_msg(&Msg::Images { files: entries })?;
    for b in &blobs {
        control.send_blob(b)?;
    }
    report.wire_bytes = control.sent_bytes() - before;
    report.transfer_ms = ms(t.elapsed());
    control.send_msg(&Msg::Rebuild)?;
    match control.recv_msg()? {
        Msg::Rebuilt { ms, .. } => report.rebuild_ms = ms,
        other => return Err(unexpected(control, other, "Rebuilt")),
    }
    Ok(())
}

fn page_source(opts: &MigrateOptions, session: &str) -> Result<Conn, FinalError> {
    let mut conn = Conn::connect(&opts.to, &opts.secret, super::CONNECT_TIMEOUT)?;
    conn.send_msg(&Msg::PageSource {
        session: session.to_string(),
    })?;
    conn.set_read_timeout(Some(opts.io_timeout))?;
    Ok(conn)
}

/// Answers the agent's page requests until it reports every page resident.
fn serve_pages(
    key: ferry_image::page::PageKey,
    conn: &mut Conn,
    by_vpid: &HashMap<u64, i32>,
    committed: &std::sync::atomic::AtomicBool,
    (events, resident): (crate::Events, u64),
    known: Option<&HashSet<ferry_image::page::Digest>>,
) -> Result<Served, FinalError> {
    let mut served = Served::default();
    let mut sent = SentPages::new(key);
    let deadline = Instant::now() + COMPLETION_TIMEOUT;
    let mut buf = Vec::new();
    loop {
        if Instant::now() > deadline {
            return Err(FinalError::PageServer(PageServerError::Fetch {
                pid: 0,
                vaddr: 0,
                pages: 0,
                source: format!("post-copy took longer than {COMPLETION_TIMEOUT:?}").into(),
            }));
        }
        match conn.recv_msg()? {
            Msg::PageGet { pid, vaddr, pages } => {
                // A read failing after the commit (tests: the exit status
                // and report of work lost).
                let injected = committed.load(std::sync::atomic::Ordering::Acquire)
                    && ferry_core::fault::fails("post-copy-read-fails");
                let fetched = by_vpid
                    .get(&pid)
                    .ok_or_else(|| format!("no task with pid {pid} in the dumped tree"))
                    .and_then(|real| match injected {
                        true => Err("fault post-copy-read-fails injected".to_string()),
                        false => Ok(real),
                    })
                    .and_then(|&real| {
                        buf.resize(pages as usize * PAGE, 0);
                        read_all(real, vaddr, &mut buf).map_err(|e| e.to_string())
                    });
                if let Err(why) = fetched {
                    let _ = conn.send_msg(&Msg::Error {
                        message: why.clone(),
                    });
                    return Err(FinalError::PageServer(PageServerError::Fetch {
                        pid,
                        vaddr,
                        pages,
                        source: why.into(),
                    }));
                }
                let mut zero = Vec::new();
                let mut repeat = Vec::new();
                let (mut stored, mut digests) = (Vec::new(), Vec::new());
                let mut data = Vec::with_capacity(buf.len());
                for (i, page) in buf.chunks_exact(PAGE).enumerate() {
                    if page.iter().all(|&b| b == 0) {
                        zero.push(i as u32);
                    } else if let Some(d) = known
                        .map(|k| (k, key.digest(page)))
                        .and_then(|(k, d)| k.contains(&d).then_some(d))
                    {
                        stored.push(i as u32);
                        digests.push(d);
                    } else if let Some(n) = sent.reference_or_record(page) {
                        repeat.push((i as u32, n));
                    } else {
                        data.extend_from_slice(page);
                    }
                }
                served.requests += 1;
                if served.requests.is_multiple_of(64) {
                    events.emit(crate::Event::PostCopy {
                        pages_served: served.pages + pages,
                        pages_resident: resident,
                    });
                }
                served.pages += pages;
                served.zero_pages += zero.len() as u64;
                served.repeated_pages += repeat.len() as u64;
                served.stored_pages += stored.len() as u64;
                let any_stored = !stored.is_empty();
                conn.send_msg(&Msg::PageData {
                    zero,
                    repeat,
                    stored,
                })?;
                conn.send_blob(&data)?;
                if any_stored {
                    conn.send_blob(&ferry_transport::pages::encode_digests(&digests))?;
                }
            }
            Msg::PagesDone { ms, .. } => {
                served.ms = ms;
                served.wire_bytes = conn.sent_bytes();
                return Ok(served);
            }
            Msg::MapInstalled => {
                served.released_by_map = true;
                served.wire_bytes = conn.sent_bytes();
                return Ok(served);
            }
            other => {
                return Err(FinalError::Transport(TransportError::Unexpected {
                    peer: conn.peer().to_string(),
                    got: format!("{other:?}"),
                    expected: "PageGet or PagesDone",
                }))
            }
        }
    }
}

/// Reads `buf.len()` bytes at `addr` of `pid`'s memory.
fn read_all(pid: i32, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = ferry_sys::procmem::read(pid, addr + done as u64, &mut buf[done..])?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "pid {pid}: nothing readable at {:#x}",
                addr + done as u64
            )));
        }
        done += n;
    }
    Ok(())
}

/// After an abort CRIU resumes the tree itself; make sure of it.
fn resume_after_abort(pid: i32) -> Fate {
    process::continue_tree(pid);
    Fate::ResumedHere
}

/// Waits for CRIU's page server to say it is ready, or `timeout`, or the
/// dump to end (`alive` false: it failed before serving).
fn wait_ready(
    ready: &std::sync::mpsc::Receiver<()>,
    timeout: Duration,
    alive: &mut dyn FnMut() -> bool,
) -> Result<(), PageServerError> {
    let start = Instant::now();
    loop {
        match ready.recv_timeout(Duration::from_millis(1)) {
            Ok(()) => return Ok(()),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                if start.elapsed() < timeout && alive() => {}
            Err(_) => {
                return Err(PageServerError::NeverReady {
                    waited: start.elapsed(),
                })
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
