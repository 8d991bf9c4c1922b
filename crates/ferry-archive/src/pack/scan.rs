//! The page scan: each page's digest and whether it is zero or random-
//! looking, computed by the pool in batches queued ahead of the planner.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::format::{Digest, PageKey};
use crate::ArchiveError;
use ferry_image::page::looks_random;
use ferry_sys::PAGE_SIZE;

use super::*;

/// A page scanned: zero, or its digest and whether it looks random.
pub(super) type Scan = Option<(Digest, bool)>;

pub(super) fn scan(key: &PageKey, pages: &[u8]) -> Vec<Scan> {
    pages
        .chunks(PAGE_SIZE)
        .map(|p| key.fingerprint(p).map(|d| (d, looks_random(p))))
        .collect()
}

/// Scans `bytes` in batches of [`DIGEST_BATCH_PAGES`] pages and hands each
/// batch, in order, to `take`. With one thread, this thread scans. With
/// more, the pool scans a few batches ahead of `take`, as tasks queued
/// between the chunks being compressed: hashing, bound by memory
/// bandwidth, then runs beside compressing instead of on every thread at
/// once before it.
pub(super) fn scan_in_batches(
    pool: &rayon::ThreadPool,
    key: &PageKey,
    bytes: &[u8],
    mut take: impl FnMut(Vec<Scan>) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let batches: Vec<&[u8]> = bytes.chunks(DIGEST_BATCH_PAGES * PAGE_SIZE).collect();
    let threads = pool.current_num_threads();
    if threads == 1 {
        return batches.into_iter().try_for_each(|b| take(scan(key, b)));
    }
    let ahead = SCAN_AHEAD;
    let arrivals = Arrivals::default();
    pool.in_place_scope(|s| {
        let spawn = |k: usize| {
            let (arrivals, b) = (&arrivals, batches[k]);
            s.spawn(move |_| arrivals.put(k, std::panic::catch_unwind(|| scan(key, b))));
        };
        for k in 0..ahead.min(batches.len()) {
            spawn(k);
        }
        for k in 0..batches.len() {
            if k + ahead < batches.len() {
                spawn(k + ahead);
            }
            let scanned = arrivals.take(k, (k + SCAN_WAKE).min(batches.len()));
            take(scanned.unwrap_or_else(|panic| std::panic::resume_unwind(panic)))?;
        }
        Ok(())
    })
}

/// Results that arrive out of order, taken in order. A taker that has to
/// wait is woken once a run of them is there, not for each one: every
/// wakeup of the planner preempts a compressing thread.
pub(super) struct Arrivals<T> {
    pub(super) state: Mutex<Arrived<T>>,
    pub(super) ready: std::sync::Condvar,
}

pub(super) struct Arrived<T> {
    pub(super) items: HashMap<usize, T>,
    /// What a waiting taker needs before it is woken.
    pub(super) awaited: Option<std::ops::Range<usize>>,
}

impl<T> Default for Arrivals<T> {
    fn default() -> Self {
        Arrivals {
            state: Mutex::new(Arrived {
                items: HashMap::new(),
                awaited: None,
            }),
            ready: std::sync::Condvar::new(),
        }
    }
}

impl<T> Arrivals<T> {
    pub(super) fn put(&self, k: usize, v: T) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.items.insert(k, v);
        if let Some(r) = g.awaited.clone() {
            if r.into_iter().all(|j| g.items.contains_key(&j)) {
                g.awaited = None;
                self.ready.notify_one();
            }
        }
    }

    /// Result `k`; when it has not arrived, waits for all of `k..until`
    /// (each of them must come).
    pub(super) fn take(&self, k: usize, until: usize) -> T {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !g.items.contains_key(&k) {
            g.awaited = Some(k..until.max(k + 1));
            g = self
                .ready
                .wait_while(g, |g| g.awaited.is_some())
                .unwrap_or_else(|p| p.into_inner());
        }
        g.items.remove(&k).expect("woken once it arrived")
    }
}
