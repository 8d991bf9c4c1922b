//! The data streams: several authenticated connections, one thread each,
//! so that compressing and sending pages use every core. Pages are cut
//! into batches of [`BATCH_PAGES`] and dealt round-robin; a flush waits
//! until every stream's agent has stored everything sent before it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_image::page::Digest;
use ferry_sys::PAGE_SIZE;
use ferry_transport::{pages, Conn, Msg, Secret, TransportError};

/// Pages per batch (1 MiB of pages: big enough for zstd and for the link,
/// small enough to spread over the streams).
pub(crate) const BATCH_PAGES: usize = 256;
/// Batches queued per stream before `push` waits (bounded memory).
const QUEUE_BATCHES: usize = 4;

enum Job {
    Batch(Vec<u8>),
    Flush(SyncSender<Result<(), String>>),
}

pub(crate) struct PageSender {
    txs: Vec<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
    next: usize,
    digests: Vec<Digest>,
    data: Vec<u8>,
    wire: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    peer: String,
    /// `--max-bandwidth`: bytes per second, and what was dispatched since.
    cap: Option<(u64, std::time::Instant, u64)>,
}

impl PageSender {
    /// Opens `n` data streams to `addr` joined to `session`.
    pub fn open(
        addr: &str,
        secret: &Secret,
        session: &str,
        n: usize,
        timeout: Duration,
        io_timeout: Duration,
    ) -> Result<PageSender, TransportError> {
        let wire = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let mut txs = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..n.max(1) {
            let mut conn = Conn::connect(addr, secret, timeout)?;
            conn.send_msg(&Msg::Join {
                session: session.to_string(),
            })?;
            match conn.recv_msg()? {
                Msg::Accepted { .. } => {}
                other => {
                    return Err(TransportError::Unexpected {
                        peer: addr.to_string(),
                        got: format!("{other:?}"),
                        expected: "Accepted",
                    })
                }
            }
            conn.set_read_timeout(Some(io_timeout))?;
            let (tx, rx) = mpsc::sync_channel(QUEUE_BATCHES);
            let wire = Arc::clone(&wire);
            let failure = Arc::clone(&failure);
            threads.push(std::thread::spawn(move || {
                stream_loop(conn, rx, &wire, &failure)
            }));
            txs.push(tx);
        }
        Ok(PageSender {
            txs,
            threads,
            next: 0,
            digests: Vec::with_capacity(BATCH_PAGES),
            data: Vec::with_capacity(BATCH_PAGES * PAGE_SIZE),
            wire,
            failure,
            peer: addr.to_string(),
            cap: None,
        })
    }

    /// Keeps the streams under `bytes_per_s` (None: no cap).
    pub fn cap(&mut self, bytes_per_s: Option<u64>) {
        self.cap = bytes_per_s
            .filter(|&b| b > 0)
            .map(|b| (b, std::time::Instant::now(), 0));
    }

    pub fn streams(&self) -> usize {
        self.txs.len()
    }

    /// The counter behind [`PageSender::wire_bytes`], to read while the
    /// sender is busy.
    pub fn wire_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.wire)
    }

    /// Bytes written to all data streams so far.
    pub fn wire_bytes(&self) -> u64 {
        self.wire.load(Ordering::Relaxed)
    }

    /// Queues one page for sending.
    pub fn push(&mut self, digest: Digest, page: &[u8]) -> Result<(), TransportError> {
        self.digests.push(digest);
        self.data.extend_from_slice(page);
        if self.digests.len() >= BATCH_PAGES {
            self.dispatch()?;
        }
        Ok(())
    }

    fn dispatch(&mut self) -> Result<(), TransportError> {
        if self.digests.is_empty() {
            return Ok(());
        }
        let batch = pages::encode_batch(&self.digests, &self.data);
        self.digests.clear();
        self.data.clear();
        if let Some((rate, since, sent)) = &mut self.cap {
            // A batch goes when the cap allows it: sent bytes never run
            // ahead of rate x time by more than one batch.
            let due = Duration::from_secs_f64(*sent as f64 / *rate as f64);
            let elapsed = since.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
            *sent += batch.len() as u64;
        }
        let i = self.next % self.txs.len();
        self.next += 1;
        self.txs[i]
            .send(Job::Batch(batch))
            .map_err(|_| self.failed())
    }

    fn failed(&self) -> TransportError {
        let why = self
            .failure
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_else(|| "a data stream ended".into());
        TransportError::Remote {
            peer: self.peer.clone(),
            message: why,
        }
    }

    /// Sends what is queued and waits until the agent stored all of it.
    pub fn flush(&mut self) -> Result<(), TransportError> {
        self.dispatch()?;
        let mut waits = Vec::new();
        for tx in &self.txs {
            let (done_tx, done_rx) = mpsc::sync_channel(1);
            tx.send(Job::Flush(done_tx)).map_err(|_| self.failed())?;
            waits.push(done_rx);
        }
        for w in waits {
            match w.recv() {
                Ok(Ok(())) => {}
                Ok(Err(message)) => {
                    return Err(TransportError::Remote {
                        peer: self.peer.clone(),
                        message,
                    })
                }
                Err(_) => return Err(self.failed()),
            }
        }
        Ok(())
    }
}

impl Drop for PageSender {
    fn drop(&mut self) {
        self.txs.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn stream_loop(
    mut conn: Conn,
    rx: Receiver<Job>,
    wire: &AtomicU64,
    failure: &Mutex<Option<String>>,
) {
    let fail = |e: &TransportError| {
        if let Ok(mut f) = failure.lock() {
            f.get_or_insert_with(|| ferry_image::units::chain(e));
        }
    };
    for job in rx {
        match job {
            Job::Batch(batch) => {
                let before = conn.sent_bytes();
                if let Err(e) = conn.send_pages(&batch, true) {
                    fail(&e);
                    return;
                }
                wire.fetch_add(conn.sent_bytes() - before, Ordering::Relaxed);
            }
            Job::Flush(done) => {
                let r = conn.send_msg(&Msg::Flush).and_then(|_| conn.recv_msg());
                let reply = match r {
                    Ok(Msg::Flushed { .. }) => Ok(()),
                    Ok(other) => Err(format!("expected Flushed, got {other:?}")),
                    Err(e) => {
                        fail(&e);
                        Err(ferry_image::units::chain(&e))
                    }
                };
                let failed = reply.is_err();
                let _ = done.send(reply);
                if failed {
                    return;
                }
            }
        }
    }
}
