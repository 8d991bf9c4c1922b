//! Pre-copy rounds: send the running application's memory, then what
//! changed, until the rest fits the downtime budget.
//!
//! Round 1 asks the agent which pages it already holds (from an earlier
//! migration or checkpoint) before sending, in groups of [`QUERY_PAGES`];
//! later rounds send every page whose content is new since (the agent has
//! never seen content that did not exist before). The prediction: the
//! pages that changed during the last round will have changed again by
//! the final copy, so its transfer takes `changed wire bytes / bandwidth`,
//! with the bandwidth measured on round 1.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use super::report::{RoundReport, StopReason};
use super::streams::PageSender;
use super::{Event, MigrateOptions, PrecopyError};

/// A scan event every this many pages read (32 MiB).
const SCAN_EVENT_PAGES: u64 = 8192;
use ferry_core::live;
use ferry_image::page::Digest;
use ferry_sys::PAGE_SIZE;
use ferry_transport::pages::ZERO_PAGE;
use ferry_transport::{pages, Conn, Msg, TransportError};

/// Pages per "which do you hold?" query in round 1 (16 MiB buffered).
const QUERY_PAGES: usize = 4096;
/// A round whose changed pages are at least this fraction of the previous
/// round's has stopped converging.
const CONVERGENCE_RATIO: f64 = 0.9;

pub struct Precopy {
    pid: i32,
    /// Digests the destination holds (sent, or it said it had them).
    pub known: HashSet<Digest>,
    /// The last round's view of each process's pages image: addresses and
    /// digests (ZERO_PAGE for zeros) in the order CRIU will write them.
    pub layout: BTreeMap<i32, (Vec<u64>, Vec<Digest>)>,
    pub rounds: Vec<RoundReport>,
    bandwidth: f64,
    key: ferry_image::page::PageKey,
}

impl Precopy {
    pub fn new(pid: i32, key: ferry_image::page::PageKey) -> Precopy {
        Precopy {
            key,
            pid,
            known: HashSet::new(),
            layout: BTreeMap::new(),
            rounds: Vec::new(),
            bandwidth: 0.0,
        }
    }

    pub fn run(
        &mut self,
        control: &mut Conn,
        sender: &mut PageSender,
        opts: &MigrateOptions,
    ) -> Result<StopReason, PrecopyError> {
        let budget_ms = opts.max_downtime.as_secs_f64() * 1e3;
        let mut prev_start: Option<Instant> = None;
        let total_bytes = ferry_image::process::tree_rss_bytes(self.pid).unwrap_or(0);
        loop {
            if opts.cancel.requested() {
                return Err(PrecopyError::Cancelled);
            }
            let round = self.rounds.len() as u32 + 1;
            let started = Instant::now();
            let r = self.round(round, Some(control), sender, prev_start, opts, total_bytes)?;
            opts.events.emit(Event::Round {
                round,
                changed_bytes: r.changed_pages * PAGE_SIZE as u64,
                wire_bytes: sender.wire_bytes(),
                dirty_rate_mb_s: r.dirty_rate_mb_s,
                predicted_final_ms: r.predicted_final_ms,
                ms: r.ms,
            });
            prev_start = Some(started);
            if round == 1 {
                ferry_core::fault::point("migrate-after-round-1");
            }
            tracing::info!(
                round,
                changed = r.changed_pages,
                sent = r.sent_pages,
                ms = r.ms,
                predicted_ms = r.predicted_final_ms,
                "pre-copy round"
            );
            let prev_changed = self.rounds.last().map(|p| p.changed_pages);
            let (changed, predicted) = (r.changed_pages, r.predicted_final_ms);
            self.rounds.push(r);
            if round >= 2 && predicted <= budget_ms {
                return Ok(StopReason::Converged);
            }
            if round >= opts.max_rounds {
                return Ok(StopReason::MaxRounds);
            }
            if round >= 3 {
                if let Some(p) = prev_changed {
                    if changed as f64 >= CONVERGENCE_RATIO * p as f64 {
                        return Ok(StopReason::NotConverging);
                    }
                }
            }
        }
    }

    /// One more round over the tree frozen by a lazy dump (the hybrid
    /// route): what changed goes to the destination's store; `layout` is
    /// then the whole tree's final map.
    pub fn final_round(
        &mut self,
        sender: &mut PageSender,
        opts: &MigrateOptions,
    ) -> Result<RoundReport, PrecopyError> {
        let round = self.rounds.len() as u32 + 1;
        let total = ferry_image::process::tree_rss_bytes(self.pid).unwrap_or(0);
        self.round(round, None, sender, None, opts, total)
    }

    fn round(
        &mut self,
        round: u32,
        control: Option<&mut Conn>,
        sender: &mut PageSender,
        prev_start: Option<Instant>,
        opts: &MigrateOptions,
        total_bytes: u64,
    ) -> Result<RoundReport, PrecopyError> {
        let start = Instant::now();
        let wire_before = sender.wire_bytes();
        let wire_counter = sender.wire_counter();
        let mut scanned = 0u64;
        let pids = ferry_image::process::tree(self.pid).unwrap_or_else(|_| vec![self.pid]);
        let key = self.key;
        let known = &mut self.known;
        let layout = &mut self.layout;
        layout.clear();
        let events = &opts.events;
        let cancel = &opts.cancel;
        let mut record = |pid: i32, vaddr: u64, d: Option<Digest>| {
            scanned += 1;
            if scanned.is_multiple_of(SCAN_EVENT_PAGES) {
                events.emit(Event::Scan {
                    round,
                    scanned_bytes: scanned * PAGE_SIZE as u64,
                    total_bytes,
                    wire_bytes: wire_counter.load(std::sync::atomic::Ordering::Relaxed),
                });
            }
            let (vaddrs, digests) = layout.entry(pid).or_default();
            vaddrs.push(vaddr);
            digests.push(d.unwrap_or(ZERO_PAGE));
        };
        let mut sent = 0u64;
        let stats = if let (1, Some(control)) = (round, control) {
            let mut pending: Vec<Digest> = Vec::new();
            let mut data: Vec<u8> = Vec::new();
            let stats = live::scan_tree(
                &pids,
                &key,
                &mut |d| known.insert(d),
                &mut |d, page| {
                    if cancel.requested() {
                        return Err(PrecopyError::Cancelled);
                    }
                    pending.push(d);
                    data.extend_from_slice(page);
                    if pending.len() >= QUERY_PAGES {
                        sent += query_and_send(control, sender, &pending, &data)?;
                        pending.clear();
                        data.clear();
                    }
                    Ok::<(), PrecopyError>(())
                },
                &mut record,
            )?;
            sent += query_and_send(control, sender, &pending, &data)?;
            stats
        } else {
            live::scan_tree(
                &pids,
                &key,
                &mut |d| known.insert(d),
                &mut |d, page| {
                    if cancel.requested() {
                        return Err(PrecopyError::Cancelled);
                    }
                    sent += 1;
                    sender.push(d, page).map_err(PrecopyError::from)
                },
                &mut record,
            )?
        };
        let scan_ms = stats.elapsed.as_secs_f64() * 1e3;
        sender.flush()?;
        let secs = start.elapsed().as_secs_f64();
        let wire = sender.wire_bytes() - wire_before;
        let bandwidth = if secs > 0.0 {
            wire as f64 / secs / 1e6
        } else {
            0.0
        };
        if round == 1 || bandwidth > self.bandwidth {
            self.bandwidth = bandwidth;
        }
        let changed_bytes = (stats.new_pages * PAGE_SIZE as u64) as f64;
        let since_prev = prev_start
            .map(|p| p.elapsed().as_secs_f64())
            .unwrap_or(secs);
        // Wire bytes per changed byte, as this round compressed them.
        let ratio = if sent > 0 {
            wire as f64 / (sent * PAGE_SIZE as u64) as f64
        } else {
            1.0
        };
        let predicted_final_ms = if self.bandwidth > 0.0 {
            changed_bytes * ratio / (self.bandwidth * 1e6) * 1e3
        } else {
            f64::INFINITY
        };
        Ok(RoundReport {
            round,
            populated_pages: stats.populated_pages,
            zero_pages: stats.zero_pages,
            changed_pages: stats.new_pages,
            sent_pages: sent,
            wire_bytes: wire,
            scan_ms,
            ms: secs * 1e3,
            bandwidth_mb_s: bandwidth,
            dirty_rate_mb_s: if round == 1 {
                0.0
            } else {
                changed_bytes / since_prev / 1e6
            },
            predicted_final_ms,
        })
    }
}

/// Asks which of `digests` the agent lacks, and sends those pages.
fn query_and_send(
    control: &mut Conn,
    sender: &mut PageSender,
    digests: &[Digest],
    data: &[u8],
) -> Result<u64, TransportError> {
    if digests.is_empty() {
        return Ok(0);
    }
    control.send_msg(&Msg::Query {
        count: digests.len() as u64,
    })?;
    control.send_blob(&pages::encode_digests(digests))?;
    let missing = match control.recv_msg()? {
        Msg::Missing { count } if count == digests.len() as u64 => {
            pages::decode_bitmap(&control.recv_blob()?, digests.len())
        }
        _ => None,
    }
    .ok_or_else(|| TransportError::BadFrame {
        peer: control.peer().to_string(),
        what: "bad answer to a page query".into(),
    })?;
    let mut sent = 0;
    for ((d, page), missing) in digests
        .iter()
        .zip(data.chunks_exact(PAGE_SIZE))
        .zip(missing)
    {
        if missing {
            sender.push(*d, page)?;
            sent += 1;
        }
    }
    Ok(sent)
}

/// Sends the frozen tree's final map on its own connection (the hybrid
/// route): every page's address and digest, by the pids the images use.
pub(crate) fn send_map(
    conn: &mut Conn,
    layout: &BTreeMap<i32, (Vec<u64>, Vec<Digest>)>,
) -> Result<(), TransportError> {
    for (pid, (vaddrs, digests)) in layout {
        let pid = ferry_image::process::ns_pids(*pid)
            .last()
            .map_or(*pid, |p| *p as i32);
        control_layout(conn, pid, vaddrs, digests)?;
    }
    conn.send_msg(&Msg::MapEnd)?;
    match conn.recv_msg()? {
        Msg::MapReady => Ok(()),
        other => Err(TransportError::Unexpected {
            peer: conn.peer().to_string(),
            got: format!("{other:?}"),
            expected: "MapReady",
        }),
    }
}

fn control_layout(
    conn: &mut Conn,
    pid: i32,
    vaddrs: &[u64],
    digests: &[Digest],
) -> Result<(), TransportError> {
    conn.send_msg(&Msg::Layout {
        pid,
        count: vaddrs.len() as u64,
    })?;
    conn.send_blob(&pages::encode_layout(vaddrs, digests))
}

/// Sends the last round's layouts, so that the agent lays out the pages
/// images now, while the application still runs; returns the agent's time.
pub(crate) fn send_layouts(
    control: &mut Conn,
    layout: &BTreeMap<i32, (Vec<u64>, Vec<Digest>)>,
) -> Result<f64, TransportError> {
    let mut ms = 0.0;
    for (pid, (vaddrs, digests)) in layout {
        // Images name a container's processes by their pid inside it.
        let pid = ferry_image::process::ns_pids(*pid)
            .last()
            .map_or(*pid, |p| *p as i32);
        control_layout(control, pid, vaddrs, digests)?;
        match control.recv_msg()? {
            Msg::LayoutReady { ms: t } => ms += t,
            other => {
                return Err(TransportError::Unexpected {
                    peer: control.peer().to_string(),
                    got: format!("{other:?}"),
                    expected: "LayoutReady",
                })
            }
        }
    }
    Ok(ms)
}
