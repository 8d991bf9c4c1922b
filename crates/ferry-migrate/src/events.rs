//! What a migration reports while it runs (`ferry migrate` shows it live:
//! a progress display on a terminal, JSON lines with `--json`), and how it
//! is told to stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;

/// One step of a running migration.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Within a pre-copy round: memory read so far of what the tree holds.
    Scan {
        round: u32,
        scanned_bytes: u64,
        /// The tree's resident memory when the migration began.
        total_bytes: u64,
        /// On the data streams so far (all rounds, compressed).
        wire_bytes: u64,
    },
    /// A pre-copy round ended.
    Round {
        round: u32,
        /// Memory that changed since the round before: what is left to send.
        changed_bytes: u64,
        wire_bytes: u64,
        dirty_rate_mb_s: f64,
        /// The final transfer as the round predicts it (ferry's estimate
        /// from the changed bytes and the measured bandwidth).
        predicted_final_ms: f64,
        ms: f64,
    },
    /// The frozen phase's steps: `freezing`, `transfer`, `restore`,
    /// `committed`.
    Phase { phase: &'static str },
    /// Before the freeze: the frozen phase is predicted to exceed
    /// `--max-downtime`, and the user accepted it.
    DowntimeMiss { predicted_ms: f64, limit_ms: f64 },
    /// Post-copy: pages the destination fetched from the frozen source.
    PostCopy {
        pages_served: u64,
        /// The tree's resident pages at the dump (an estimate of the total).
        pages_resident: u64,
    },
}

type Sink = Arc<dyn Fn(&Event) + Send + Sync>;

/// Where events go (nowhere by default).
#[derive(Clone, Default)]
pub struct Events(Option<Sink>);

impl Events {
    pub fn new(sink: impl Fn(&Event) + Send + Sync + 'static) -> Events {
        Events(Some(Arc::new(sink)))
    }

    pub fn emit(&self, e: Event) {
        if let Some(sink) = &self.0 {
            sink(&e);
        }
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Events(on)"
        } else {
            "Events(off)"
        })
    }
}

/// Set (by SIGINT or SIGTERM in `ferry migrate`) to cancel: before the
/// freeze the migration stops and the application runs on; while frozen,
/// before the commit, the source is resumed; after the commit it is too
/// late and the migration completes.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Option<Arc<AtomicBool>>);

impl Cancel {
    pub fn new(flag: Arc<AtomicBool>) -> Cancel {
        Cancel(Some(flag))
    }

    pub fn requested(&self) -> bool {
        self.0.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
    }
}
