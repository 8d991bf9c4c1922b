//! What a migration reports: per pre-copy round and for the final phase.

use std::io::{self, Write};

use serde::Serialize;

use ferry_image::units;

/// One pre-copy round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    /// Pages read (populated pages of the tree).
    pub populated_pages: u64,
    pub zero_pages: u64,
    /// Non-zero pages whose content the destination did not hold yet.
    pub changed_pages: u64,
    /// Of those, pages actually sent (the rest it held from earlier).
    pub sent_pages: u64,
    /// Bytes on the wire (compressed frames).
    pub wire_bytes: u64,
    pub scan_ms: f64,
    pub ms: f64,
    /// Wire throughput of this round, MB/s.
    pub bandwidth_mb_s: f64,
    /// New content per second since the previous round began, MB/s.
    pub dirty_rate_mb_s: f64,
    /// Transfer time the final copy would need if it started now.
    pub predicted_final_ms: f64,
}

/// Why pre-copy stopped.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The predicted final transfer fits --max-downtime.
    Converged,
    /// --max-rounds reached.
    MaxRounds,
    /// The changed bytes stopped shrinking: the application dirties memory
    /// about as fast as the link carries it.
    NotConverging,
    /// No pre-copy: post-copy from a lazy dump fetches the memory on
    /// demand after the destination resumed the application.
    PostCopy,
}

/// How the application moved.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// Pre-copy, then CRIU's full dump while frozen.
    Precopy,
    /// Pre-copy, then a full dump restored lazily from the rebuilt images.
    PrecopyLazyRestore,
    /// A lazy dump, every page fetched from the frozen source afterwards.
    PostCopy,
    /// Pre-copy, then a lazy dump: pages unchanged since pre-copy come out
    /// of the destination's store, the changed ones from the frozen source.
    Hybrid,
}

/// The frozen phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FinalReport {
    /// CRIU's dump, its images streamed into ferry: from the request
    /// (freeze) to the last image taken, digesting the pages and queuing
    /// those the destination lacks included (nothing is written to disk).
    pub dump_ms: f64,
    /// CRIU's own statistics of the dump.
    pub criu_dump: Option<serde_json::Value>,
    /// Sending what was queued and the images' metadata and recipes.
    pub transfer_ms: f64,
    pub pages_in_images: u64,
    pub zero_pages: u64,
    pub pages_sent: u64,
    pub wire_bytes: u64,
    /// Destination: writing and verifying the images.
    pub rebuild_ms: f64,
    /// Pages the destination found in place in images laid out ahead.
    pub pages_in_place: u64,
    /// Source side, one kernel only: waiting for the source's pids to free.
    pub pid_wait_ms: f64,
    /// Destination: CRIU restore (left stopped).
    pub restore_ms: f64,
    pub criu_restore: Option<serde_json::Value>,
    /// Commit round trip (the destination resumes the application).
    pub commit_ms: f64,
    /// From the dump request (freeze) to the destination's resume: the
    /// application's downtime as ferry measured it (an upper bound: CRIU
    /// freezes a little after the request).
    pub frozen_ms: f64,
    /// A container's files captured while frozen (all of them, or what
    /// changed since they went ahead), in bytes sent with the images.
    pub files_frozen_bytes: u64,
    /// Time that capture took (part of `dump_ms`).
    pub files_capture_ms: f64,
    /// Post-copy from a lazy dump: the images held no lazy memory, which
    /// the destination fetched from the frozen source afterwards.
    pub lazy_dump: bool,
    /// From the resume to every page resident on the destination.
    pub post_copy_ms: f64,
    /// Page requests the destination made after the dump, and the pages.
    pub post_copy_requests: u64,
    pub post_copy_pages: u64,
    /// Of those, pages named by number: their content had gone over in
    /// full shortly before.
    pub post_copy_repeated_pages: u64,
    /// Of those, pages named by digest (hybrid route): the destination's
    /// store held them from pre-copy, unchanged since.
    pub post_copy_stored_pages: u64,
    /// Bytes the source sent answering page requests after the resume
    /// (part of `wire_bytes`).
    pub post_copy_wire_bytes: u64,
    /// The hybrid route: the last round over the frozen tree, whose map
    /// let the agent serve the rest from its store.
    pub final_round: Option<RoundReport>,
    /// The agent installed that map, and the source was released before
    /// every page had been fetched.
    pub released_by_map: bool,
    /// From a lazy dump: from the resume to the source's release (the
    /// frozen source held the only whole copy until then), ferry's timer.
    pub source_released_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    /// A container's files sent while it ran, before the freeze (what
    /// changed since went with the images: `final.files_frozen_bytes`).
    pub files_ahead: Option<crate::files::FilesAhead>,
    pub destination: String,
    pub destination_host: String,
    /// Both ends run on one kernel (lab namespaces): the source is stopped
    /// for good before the destination restores, pids being shared.
    pub same_kernel: bool,
    /// Post-copy (`--lazy-pages`): the destination restored before the
    /// application's memory was resident.
    pub post_copy: bool,
    /// The route taken.
    pub route: Route,
    /// Why the route asked for was not taken, when it was not.
    pub route_fallback: Option<String>,
    pub streams: usize,
    pub rounds: Vec<RoundReport>,
    pub stop_reason: StopReason,
    pub precopy_ms: f64,
    /// Agent time laying out the pages images ahead (part of pre-copy).
    pub layout_ms: f64,
    #[serde(rename = "final")]
    pub final_phase: FinalReport,
    pub restored_pid: i32,
    pub total_ms: f64,
    /// `--max-downtime`: the limit, the prediction made before freezing
    /// and the frozen time measured.
    pub downtime: crate::plan::DowntimeCheck,
}

impl MigrateReport {
    pub fn render(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "migrated to {} ({}) as pid {}{}",
            self.destination,
            self.destination_host,
            self.restored_pid,
            if self.same_kernel {
                " [same kernel]"
            } else {
                ""
            }
        )?;
        writeln!(
            out,
            "pre-copy: {} round(s) in {} over {} stream(s), stopped: {:?}",
            self.rounds.len(),
            units::millis(std::time::Duration::from_secs_f64(self.precopy_ms / 1e3)),
            self.streams,
            self.stop_reason
        )?;
        writeln!(
            out,
            "  {:>5} {:>10} {:>10} {:>10} {:>10} {:>9} {:>11} {:>11} {:>10}",
            "round",
            "populated",
            "changed",
            "sent",
            "wire",
            "ms",
            "bw MB/s",
            "dirty MB/s",
            "pred ms"
        )?;
        for r in &self.rounds {
            writeln!(
                out,
                "  {:>5} {:>10} {:>10} {:>10} {:>10} {:>9.1} {:>11.1} {:>11.1} {:>10.1}",
                r.round,
                r.populated_pages,
                r.changed_pages,
                r.sent_pages,
                units::bytes(r.wire_bytes),
                r.ms,
                r.bandwidth_mb_s,
                r.dirty_rate_mb_s,
                r.predicted_final_ms
            )?;
        }
        let f = &self.final_phase;
        writeln!(out, "route: {:?}", self.route)?;
        if let Some(why) = &self.route_fallback {
            writeln!(out, "  (the route asked for was not taken: {why})")?;
        }
        if f.lazy_dump {
            writeln!(
                out,
                "final (ferry's phase timers): lazy dump {:.1} ms, images {:.1} ms ({} on the wire), rebuild {:.1} ms, restore {:.1} ms, commit {:.1} ms",
                f.dump_ms, f.transfer_ms, units::bytes(f.wire_bytes.saturating_sub(f.post_copy_wire_bytes)), f.rebuild_ms, f.restore_ms, f.commit_ms
            )?;
            writeln!(
                out,
                "after the resume: {} pages asked of the source in {} requests ({} sent in full in all), {} zero, {} repeated, {} from the destination's store; {} on the wire; source released {:.1} ms after the resume",
                f.post_copy_pages, f.post_copy_requests, f.pages_sent, f.zero_pages, f.post_copy_repeated_pages, f.post_copy_stored_pages, units::bytes(f.post_copy_wire_bytes), f.source_released_ms
            )?;
            if let Some(r) = &f.final_round {
                writeln!(
                    out,
                    "final map: {} pages read from the frozen tree in {:.1} ms, {} changed since pre-copy (sent in full, {} on the wire); {}",
                    r.populated_pages, r.ms, r.sent_pages, units::bytes(r.wire_bytes),
                    if f.released_by_map { "installed: the rest came from the destination's store" } else { "not installed: every page was asked of the source" }
                )?;
            }
        } else {
            writeln!(
                out,
                "final (ferry's phase timers): dump {:.1} ms, transfer {:.1} ms ({} of {} pages sent, {} zero, {} on the wire), rebuild {:.1} ms ({} pages in place), pid wait {:.1} ms, restore {:.1} ms, commit {:.1} ms",
                f.dump_ms, f.transfer_ms, f.pages_sent, f.pages_in_images, f.zero_pages,
                units::bytes(f.wire_bytes), f.rebuild_ms, f.pages_in_place, f.pid_wait_ms, f.restore_ms, f.commit_ms
            )?;
        }
        if let Some(a) = &self.files_ahead {
            writeln!(
                out,
                "container files: {} tree(s), {} sent ahead of the freeze in {:.1} ms; while frozen {} captured in {:.1} ms (what changed since)",
                a.trees,
                units::bytes(a.bytes),
                a.ms,
                units::bytes(f.files_frozen_bytes),
                f.files_capture_ms
            )?;
        }
        let d = &self.downtime;
        writeln!(
            out,
            "frozen (downtime, ferry's timer from the dump request to the resume): {:.1} ms; limit {:.0} ms, predicted {:.0} ms{}; total {:.1} ms",
            f.frozen_ms,
            d.limit_ms,
            d.predicted.total_ms,
            match (d.missed, d.announced) {
                (true, true) => " (LIMIT MISSED, as announced before the freeze)",
                (true, false) => " (LIMIT MISSED)",
                _ => "",
            },
            self.total_ms
        )
    }
}
