//! The pipeline that runs the planner while the pool compresses: a window
//! of jobs in flight, chunks appended in order by whichever thread finishes
//! the next one, and the release of mapped input behind them.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::Mutex;

use crate::ArchiveError;
use ferry_sys::mmap::release_range;

use super::*;

/// Runs `plan` (which emits jobs) while the pool compresses them and a
/// writer thread appends them in order. With one thread, each job is
/// compressed and written where it is emitted.
pub(super) fn run_pipeline<'a, W, T>(
    pool: &rayon::ThreadPool,
    writer: ChunkWriter<'a, W>,
    threads: usize,
    level: i32,
    files: &[Source],
    plan: impl FnOnce(&mut Emit) -> Result<T, ArchiveError>,
) -> Result<(ChunkWriter<'a, W>, T), ArchiveError>
where
    W: Write + Send,
{
    let workers = Workers {
        files,
        level,
        buffers: Reuse::new(),
        scratches: Reuse::new(),
    };
    if threads == 1 {
        let mut out = Output {
            writer,
            next: 0,
            released: Released::new(files),
            failed: None,
        };
        let planned = plan(&mut |job: Job| {
            out.append(workers.compress(&job)?, &workers)?;
            out.next += 1;
            Ok(out.next as u32 - 1)
        })?;
        return Ok((out.writer, planned));
    }
    let in_flight = threads * IN_FLIGHT_PER_THREAD + IN_FLIGHT_EXTRA;
    let order = InOrder {
        pending: Mutex::new(BTreeMap::new()),
        out: Mutex::new(Output {
            writer,
            next: 0,
            released: Released::new(files),
            failed: None,
        }),
        window: Window::new(in_flight),
    };
    let mut emitted = 0usize;
    let planned = {
        let (workers, order, next) = (&workers, &order, &mut emitted);
        pool.in_place_scope(|scope| {
            plan(&mut |job: Job| {
                if !order.window.enter() {
                    // Appending failed: its error is the one returned.
                    return Err(ArchiveError::io(
                        "write archive to",
                        "output",
                        io::Error::other("writer stopped"),
                    ));
                }
                let k = *next;
                *next += 1;
                scope.spawn(move |_| order.finish(k, workers.compress(&job), workers));
                Ok(k as u32)
            })
        })
    };
    let Output {
        writer,
        failed,
        next: appended,
        ..
    } = order.out.into_inner().map_err(|_| {
        ArchiveError::io(
            "write archive to",
            "output",
            io::Error::other("a thread appending chunks panicked"),
        )
    })?;
    match (failed, planned) {
        (Some(e), _) | (None, Err(e)) => Err(e),
        // Never an archive with a chunk missing.
        (None, Ok(_)) if appended != emitted => Err(ArchiveError::io(
            "write archive to",
            "output",
            io::Error::other(format!(
                "{appended} of {emitted} chunks appended (a bug in ferry's pack)"
            )),
        )),
        (None, Ok(p)) => Ok((writer, p)),
    }
}

/// Chunks compressed out of order, appended in order by whichever
/// compressing thread finishes the next one: no writer thread to wake for
/// every chunk (each wakeup preempted a compressing thread on 2 vCPUs).
pub(super) struct InOrder<'a, 'f, W: Write> {
    pub(super) pending: Mutex<BTreeMap<usize, Result<Compressed, ArchiveError>>>,
    pub(super) out: Mutex<Output<'a, 'f, W>>,
    pub(super) window: Window,
}

pub(super) struct Output<'a, 'f, W: Write> {
    pub(super) writer: ChunkWriter<'a, W>,
    /// The next job to append.
    pub(super) next: usize,
    pub(super) released: Released<'f>,
    /// The first error; later chunks are dropped.
    pub(super) failed: Option<ArchiveError>,
}

impl<W: Write> Output<'_, '_, W> {
    /// Appends a chunk, gives its buffer back, and releases what no later
    /// job reads.
    pub(super) fn append(&mut self, c: Compressed, workers: &Workers) -> Result<(), ArchiveError> {
        let (file, done_below) = (c.file, c.done_below);
        workers.buffers.give(self.writer.append(c)?);
        self.released.written(file, done_below);
        Ok(())
    }
}

impl<W: Write> InOrder<'_, '_, W> {
    /// Job `k` is compressed: appends it and every job after it that is
    /// ready, unless another thread is appending (it takes them then).
    pub(super) fn finish(&self, k: usize, c: Result<Compressed, ArchiveError>, workers: &Workers) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(k, c);
        }
        loop {
            let Ok(mut out) = self.out.try_lock() else {
                return;
            };
            let mut appended = 0;
            loop {
                let next = out.next;
                let Some(c) = self.pending.lock().ok().and_then(|mut p| p.remove(&next)) else {
                    break;
                };
                if out.failed.is_none() {
                    if let Err(e) = c.and_then(|c| out.append(c, workers)) {
                        out.failed = Some(e);
                        self.window.stop();
                    }
                }
                out.next += 1;
                appended += 1;
            }
            let next = out.next;
            drop(out);
            self.window.leave(appended);
            // A job that arrived while this thread held the output found
            // it taken and left its chunk here: take it.
            if !self.pending.lock().is_ok_and(|p| p.contains_key(&next)) {
                return;
            }
        }
    }
}

/// Bounds the jobs between "planned" and "appended". The planner, once
/// the window is full, sleeps until it is half empty: one wakeup per
/// half window instead of one per chunk.
pub(super) struct Window {
    pub(super) state: Mutex<(usize, bool)>,
    pub(super) room: std::sync::Condvar,
    pub(super) max: usize,
}

impl Window {
    pub(super) fn new(max: usize) -> Window {
        Window {
            state: Mutex::new((0, false)),
            room: std::sync::Condvar::new(),
            max,
        }
    }

    /// Takes a place for one job; false once writing has failed.
    pub(super) fn enter(&self) -> bool {
        let Ok(mut g) = self.state.lock() else {
            return false;
        };
        if g.0 >= self.max {
            let low = self.max / 2;
            g = match self
                .room
                .wait_while(g, |(n, stopped)| *n > low && !*stopped)
            {
                Ok(g) => g,
                Err(_) => return false,
            };
        }
        if g.1 {
            return false;
        }
        g.0 += 1;
        true
    }

    /// `n` jobs were appended.
    pub(super) fn leave(&self, n: usize) {
        if n == 0 {
            return;
        }
        if let Ok(mut g) = self.state.lock() {
            let was = g.0;
            g.0 -= n.min(g.0);
            let low = self.max / 2;
            if was > low && g.0 <= low {
                self.room.notify_one();
            }
        }
    }

    pub(super) fn stop(&self) {
        if let Ok(mut g) = self.state.lock() {
            g.1 = true;
            self.room.notify_one();
        }
    }
}

/// Unmaps the parts of mapped files that every job has finished reading,
/// in steps of [`RELEASE_STEP`], as their chunks are written: the page
/// tables of a 1 GiB image then go while the pool compresses, rather than
/// in one 30 ms munmap after the last chunk. Large steps keep the TLB
/// shootdowns few (one call per job cost more than it saved on 2 vCPUs).
pub(super) struct Released<'f> {
    pub(super) files: &'f [Source],
    pub(super) upto: Vec<usize>,
}

impl<'f> Released<'f> {
    pub(super) fn new(files: &'f [Source]) -> Self {
        Released {
            files,
            upto: vec![0; files.len()],
        }
    }

    /// A chunk of `file` was written, and every job before it is done:
    /// nothing below `done_below` is read again. (Were it read, it would
    /// only fault in again from the file: the release is advisory.)
    pub(super) fn written(&mut self, file: usize, done_below: usize) {
        let Bytes::Mapped(map) = &self.files[file].bytes else {
            return;
        };
        let from = self.upto[file];
        if done_below >= from + RELEASE_STEP {
            // A range left mapped goes with the whole map.
            let _ = release_range(map, from..done_below);
            self.upto[file] = done_below;
        }
    }
}
