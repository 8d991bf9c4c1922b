//! [`Prober`]: the downtime an application's clients see, measured from the
//! outside.
//!
//! The bundled workload (`ferry-workload --heartbeat ADDR`) sends one small
//! UDP datagram per tick (every 1 ms by default) carrying its pid and tick
//! counter ([`crate::workload::heartbeat`]). The prober binds a UDP socket
//! (in a lab: on the gateway address, reachable from every host), and one
//! thread stamps each datagram with `Instant::now()` the moment `recv_from`
//! returns it. Whatever a migration does, the application-observed downtime
//! is the longest silence between two consecutive heartbeats; the counters
//! on both sides of it tell whether the process resumed where it stopped.
//!
//! The receive thread does nothing but receive, stamp and push onto a
//! vector (24 bytes per datagram, ~86 MB per hour at 1 kHz), so it keeps up
//! with thousands of datagrams per second; the socket's receive buffer is
//! raised to [`RECV_BUFFER_BYTES`] to absorb scheduling hiccups. It wakes
//! at least every [`READ_TIMEOUT`] to check its stop flag, so
//! [`Prober::stop`] returns within that bound.

use std::collections::BTreeSet;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};
use serde::Serialize;

use super::LabError;
use crate::workload::parse_heartbeat;
use ferry_image::units::serde_micros;

/// Longest the receive thread blocks before checking its stop flag.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_millis(20);
/// Receive buffer asked of the kernel: a few thousand heartbeats (each
/// datagram is charged its buffer's true size, ~1 KB), seconds of a 1 kHz
/// sender, so a stalled receive thread loses nothing. As root it is forced
/// past `net.core.rmem_max` (208 KB by default, ~200 heartbeats).
pub(crate) const RECV_BUFFER_BYTES: usize = 4 << 20;
/// Pause after a receive error other than a timeout, so a persistent
/// error cannot spin the thread.
const ERROR_BACKOFF: Duration = Duration::from_millis(1);
/// Larger than any heartbeat, so an oversized datagram is seen as such.
const DATAGRAM_BUFFER_BYTES: usize = 64;

/// One heartbeat's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Heartbeat {
    pub pid: u32,
    pub counter: u64,
}

/// A silence between two consecutive heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Gap {
    /// When the silence began (arrival of `before`), from the prober's start.
    #[serde(serialize_with = "serde_micros")]
    pub start: Duration,
    /// How long it lasted (until the arrival of `after`).
    #[serde(serialize_with = "serde_micros")]
    pub length: Duration,
    /// The last heartbeat before the silence.
    pub before: Heartbeat,
    /// The first heartbeat after it.
    pub after: Heartbeat,
}

#[derive(Debug, Clone, Copy)]
struct Arrival {
    at: Duration,
    beat: Heartbeat,
}

/// What the receive thread collected.
#[derive(Debug, Default)]
struct Log {
    arrivals: Vec<Arrival>,
    malformed: u64,
    recv_errors: u64,
}

/// A running heartbeat receiver; see the module docs. Dropping it stops it.
#[derive(Debug)]
pub struct Prober {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<Log>>,
}

impl Prober {
    /// Binds `bind` (port 0 picks a free one) and starts receiving.
    pub fn start(bind: SocketAddr) -> Result<Prober, LabError> {
        let socket =
            UdpSocket::bind(bind).map_err(|source| LabError::ProbeBind { addr: bind, source })?;
        let addr = socket
            .local_addr()
            .and_then(|a| socket.set_read_timeout(Some(READ_TIMEOUT)).map(|()| a))
            .map_err(|source| LabError::ProbeBind { addr: bind, source })?;
        let forced = setsockopt(&socket, sockopt::RcvBufForce, &RECV_BUFFER_BYTES);
        if let Err(e) = forced.or_else(|_| setsockopt(&socket, sockopt::RcvBuf, &RECV_BUFFER_BYTES))
        {
            // The kernel's default buffer still holds ~200 heartbeats.
            tracing::debug!(%addr, error = %e, "cannot raise the prober's receive buffer");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let thread = thread::Builder::new()
            .name(format!("ferry-prober-{}", addr.port()))
            .spawn({
                let stop = Arc::clone(&stop);
                let received = Arc::clone(&received);
                move || receive(&socket, started, &stop, &received)
            })
            .map_err(|source| LabError::ProbeThread { addr, source })?;
        Ok(Prober {
            addr,
            stop,
            received,
            thread: Some(thread),
        })
    }

    /// The bound address (with the port actually chosen).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Heartbeats received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Waits until at least `count` heartbeats have arrived; false on
    /// timeout.
    pub fn wait_received(&self, count: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.received() < count {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Stops receiving and reports.
    pub fn stop(mut self) -> ProbeReport {
        ProbeReport::from_log(self.finish())
    }

    fn finish(&mut self) -> Log {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(log)) => log,
            Some(Err(_)) => {
                tracing::warn!(addr = %self.addr, "the prober's receive thread panicked");
                Log::default()
            }
            None => Log::default(),
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.finish();
        }
    }
}

fn receive(socket: &UdpSocket, started: Instant, stop: &AtomicBool, received: &AtomicU64) -> Log {
    let mut log = Log::default();
    let mut buf = [0u8; DATAGRAM_BUFFER_BYTES];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => {
                let at = started.elapsed();
                match parse_heartbeat(&buf[..n]) {
                    Some((pid, counter)) if n == crate::workload::HEARTBEAT_BYTES => {
                        log.arrivals.push(Arrival {
                            at,
                            beat: Heartbeat { pid, counter },
                        });
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => log.malformed += 1,
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                log.recv_errors += 1;
                tracing::debug!(error = %e, "prober receive error");
                thread::sleep(ERROR_BACKOFF);
            }
        }
    }
    log
}

/// What a prober heard, offsets counted from its start.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// Valid heartbeats received.
    pub received: u64,
    /// Datagrams that were not heartbeats.
    pub malformed: u64,
    /// Receive calls that failed (not counting timeouts).
    pub recv_errors: u64,
    /// Arrival of the first heartbeat.
    #[serde(serialize_with = "serde_opt_micros")]
    pub first: Option<Duration>,
    /// Arrival of the last heartbeat.
    #[serde(serialize_with = "serde_opt_micros")]
    pub last: Option<Duration>,
    /// The longest silence between two heartbeats (None with fewer than two).
    pub longest_gap: Option<Gap>,
    /// How many distinct pids sent heartbeats.
    pub distinct_pids: usize,
    #[serde(skip)]
    arrivals: Vec<Arrival>,
}

impl ProbeReport {
    fn from_log(log: Log) -> ProbeReport {
        let arrivals = log.arrivals;
        let pids: BTreeSet<u32> = arrivals.iter().map(|a| a.beat.pid).collect();
        let longest_gap = gaps(&arrivals).max_by_key(|g| g.length);
        ProbeReport {
            received: arrivals.len() as u64,
            malformed: log.malformed,
            recv_errors: log.recv_errors,
            first: arrivals.first().map(|a| a.at),
            last: arrivals.last().map(|a| a.at),
            longest_gap,
            distinct_pids: pids.len(),
            arrivals,
        }
    }

    /// Every silence longer than `threshold`, in time order.
    #[cfg(test)]
    pub(crate) fn gaps_over(&self, threshold: Duration) -> Vec<Gap> {
        gaps(&self.arrivals)
            .filter(|g| g.length > threshold)
            .collect()
    }

    /// The distinct pids heard, in increasing order.
    pub fn pids(&self) -> Vec<u32> {
        let pids: BTreeSet<u32> = self.arrivals.iter().map(|a| a.beat.pid).collect();
        pids.into_iter().collect()
    }
}

fn gaps(arrivals: &[Arrival]) -> impl Iterator<Item = Gap> + '_ {
    arrivals.windows(2).map(|w| Gap {
        start: w[0].at,
        length: w[1].at.saturating_sub(w[0].at),
        before: w[0].beat,
        after: w[1].beat,
    })
}

fn serde_opt_micros<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => serde_micros(d, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::heartbeat;

    const LOCAL: &str = "127.0.0.1:0";

    fn send(to: SocketAddr, pid: u32, counters: std::ops::Range<u64>, tick: Duration) {
        let sock = UdpSocket::bind(LOCAL).expect("bind sender");
        for c in counters {
            sock.send_to(&heartbeat(pid, c), to)
                .expect("send heartbeat");
            thread::sleep(tick);
        }
    }

    #[test]
    fn measures_a_deliberate_pause() {
        let prober = Prober::start(LOCAL.parse().unwrap()).expect("start prober");
        let to = prober.local_addr();
        let tick = Duration::from_millis(1);
        let pause = Duration::from_millis(50);
        send(to, 7, 0..100, tick);
        thread::sleep(pause);
        send(to, 7, 100..200, tick);
        assert!(
            prober.wait_received(200, Duration::from_secs(5)),
            "only {} of 200 heartbeats arrived",
            prober.received()
        );
        let report = prober.stop();
        assert_eq!(report.received, 200);
        assert_eq!(report.distinct_pids, 1);
        assert_eq!(report.malformed, 0);
        // The pause plus the last tick's sleep; a busy machine may add more.
        let deliberate = report
            .gaps_over(pause - Duration::from_millis(5))
            .into_iter()
            .find(|g| g.before.counter == 99)
            .unwrap_or_else(|| panic!("no gap after counter 99: {report:?}"));
        assert_eq!(deliberate.after.counter, 100);
        assert!(deliberate.length >= pause, "{deliberate:?}");
        assert!(deliberate.length < pause * 10, "{deliberate:?}");
        let longest = report.longest_gap.expect("a longest gap");
        assert!(longest.length >= deliberate.length);
        let first = report.first.expect("first arrival");
        let last = report.last.expect("last arrival");
        assert!(deliberate.start > first && deliberate.start < last);
        assert!(last - first >= pause + Duration::from_millis(150));
    }

    #[test]
    fn counts_pids_and_malformed_datagrams() {
        let prober = Prober::start(LOCAL.parse().unwrap()).expect("start prober");
        let to = prober.local_addr();
        send(to, 1, 0..3, Duration::ZERO);
        send(to, 2, 0..3, Duration::ZERO);
        let sock = UdpSocket::bind(LOCAL).expect("bind sender");
        sock.send_to(b"not a heartbeat", to).expect("send junk");
        let mut long = heartbeat(3, 3).to_vec();
        long.push(0);
        sock.send_to(&long, to).expect("send oversized");
        assert!(prober.wait_received(6, Duration::from_secs(5)));
        // The junk was sent after the heartbeats; give it time to land.
        thread::sleep(Duration::from_millis(50));
        let report = prober.stop();
        assert_eq!(report.received, 6);
        assert_eq!(report.malformed, 2);
        assert_eq!(report.pids(), vec![1, 2]);
        assert_eq!(report.distinct_pids, 2);
        let json = serde_json::to_value(&report).expect("serialize");
        assert_eq!(json["received"], 6);
    }

    #[test]
    fn silence_gives_an_empty_report_and_stops_promptly() {
        let prober = Prober::start(LOCAL.parse().unwrap()).expect("start prober");
        let t = Instant::now();
        let report = prober.stop();
        assert!(t.elapsed() < READ_TIMEOUT * 10, "{:?}", t.elapsed());
        assert_eq!(report.received, 0);
        assert_eq!(report.first, None);
        assert_eq!(report.longest_gap, None);
        assert!(report.gaps_over(Duration::ZERO).is_empty());
    }

    #[test]
    fn binding_a_foreign_address_names_it() {
        // TEST-NET-3: never assigned to this machine.
        let addr: SocketAddr = "203.0.113.7:0".parse().unwrap();
        match Prober::start(addr) {
            Err(LabError::ProbeBind { addr: a, .. }) => assert_eq!(a, addr),
            other => panic!("expected ProbeBind, got {other:?}"),
        }
    }
}
