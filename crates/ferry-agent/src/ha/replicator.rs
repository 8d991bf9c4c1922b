//! The leader's replication workers: one thread per standby, each sending
//! that standby the newest checkpoint whenever it is free.
//!
//! Checkpoints are taken on their own schedule and never wait for a
//! transfer: a standby that is slow (it restarted and needs the whole
//! chain, or its link is slow) is sent the newest checkpoint when it is
//! done with the last one, and the checkpoints in between travel with it
//! (a chain is sent from the first archive the standby lacks). The others
//! keep receiving every checkpoint.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::keys::{self, CheckpointRecord, HostRecord};
use super::replica::{self, Link};
use super::Member;

/// A checkpoint waiting for a standby.
struct Pending {
    host: HostRecord,
    record: CheckpointRecord,
    chain: Vec<Link>,
}

#[derive(Default)]
struct State {
    stop: bool,
    /// Per standby, the newest checkpoint not yet sent to it.
    pending: HashMap<String, Pending>,
    /// Per standby, the newest generation it verified; absent after a
    /// failed transfer.
    acked: HashMap<String, u64>,
    /// The newest generation whose lag is in `lags`.
    lag_generation: u64,
    /// Of the last [`LAG_WINDOW`] checkpoints verified by a standby in
    /// sync, the time from each one's taking to the first such
    /// verification, oldest first.
    lags: VecDeque<Duration>,
}

/// How many recent replication lags the estimate looks at.
const LAG_WINDOW: usize = 10;

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// Replication of one service's checkpoints while this host leads it.
/// Dropping it stops the workers (a transfer in progress ends first).
pub(crate) struct Replicator {
    service: String,
    shared: Arc<Shared>,
    workers: HashMap<String, std::thread::JoinHandle<()>>,
}

impl Replicator {
    pub fn new(service: &str) -> Replicator {
        Replicator {
            service: service.to_string(),
            shared: Arc::default(),
            workers: HashMap::new(),
        }
    }

    /// Hands `record` (the last archive of `chain`) to `host`'s worker,
    /// replacing a checkpoint it has not started sending.
    pub fn post(
        &mut self,
        member: &Arc<Member>,
        host: &HostRecord,
        record: &CheckpointRecord,
        chain: &[Link],
    ) {
        if let Ok(mut s) = self.shared.state.lock() {
            s.pending.insert(
                host.name.clone(),
                Pending {
                    host: host.clone(),
                    record: record.clone(),
                    chain: chain.to_vec(),
                },
            );
        }
        self.shared.wake.notify_all();
        let alive = self
            .workers
            .get(&host.name)
            .is_some_and(|w| !w.is_finished());
        if !alive {
            let (m, shared, service, name) = (
                Arc::clone(member),
                Arc::clone(&self.shared),
                self.service.clone(),
                host.name.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-replicate-{name}"))
                .spawn(move || work(&m, &shared, &service, &name));
            match spawned {
                Ok(h) => {
                    self.workers.insert(host.name.clone(), h);
                }
                Err(e) => {
                    tracing::warn!(service = %self.service, standby = %host.name, error = %e, "cannot start a replication thread")
                }
            }
        }
    }

    /// Whether `host` verified a checkpoint of this leader's and its last
    /// transfer did not fail.
    pub(crate) fn in_sync(&self, host: &str) -> bool {
        self.shared
            .state
            .lock()
            .is_ok_and(|s| s.acked.contains_key(host))
    }

    /// The replication lag to plan with, from the recent times from a
    /// checkpoint's taking to its verification by a standby in sync (the
    /// first one: from then on a failover restores it). None before any.
    pub(crate) fn lag_estimate(&self) -> Option<Duration> {
        let s = self.shared.state.lock().ok()?;
        plan_lag(s.lags.iter().copied())
    }
}

/// The longest of `lags` but one, when there are at least three: a single
/// outlier (a transfer held up while etcd was away, since a standby admits
/// a checkpoint only after reading the leader key) says nothing of the
/// next checkpoint, while two slow ones in ten do.
fn plan_lag(lags: impl Iterator<Item = Duration>) -> Option<Duration> {
    let mut v: Vec<Duration> = lags.collect();
    v.sort_unstable();
    match v.len() {
        0 => None,
        1 | 2 => v.last().copied(),
        n => Some(v[n - 2]),
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        if let Ok(mut s) = self.shared.state.lock() {
            s.stop = true;
            s.pending.clear();
        }
        self.shared.wake.notify_all();
    }
}

/// One standby's worker: sends the newest pending checkpoint, again and
/// again, until the replicator stops.
fn work(m: &Member, shared: &Shared, service: &str, standby: &str) {
    loop {
        let job = {
            let Ok(mut s) = shared.state.lock() else {
                return;
            };
            loop {
                if s.stop {
                    return;
                }
                if let Some(p) = s.pending.remove(standby) {
                    break p;
                }
                s = match shared.wake.wait(s) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
        };
        let t = Instant::now();
        let outcome = replica::send(m, &job.host, service, &job.record, &job.chain);
        let Ok(mut s) = shared.state.lock() else {
            return;
        };
        match outcome {
            Ok(sent) => {
                s.acked.insert(standby.to_string(), job.record.generation);
                let lag_ms = keys::now_unix_ms().saturating_sub(job.record.taken_unix_ms);
                crate::metrics::get()
                    .replication_lag_seconds
                    .get_or_create(&crate::metrics::ServiceLabel {
                        service: service.to_string(),
                    })
                    .set(lag_ms as f64 / 1e3);
                // The lag to plan with is that of a standby in sync, sent
                // this checkpoint alone: one catching up (it restarted, or
                // a new leader's chain) says nothing of the next one's.
                if sent.archives == 1 && job.record.generation > s.lag_generation {
                    s.lag_generation = job.record.generation;
                    if s.lags.len() == LAG_WINDOW {
                        s.lags.pop_front();
                    }
                    s.lags.push_back(Duration::from_millis(lag_ms));
                }
                tracing::info!(
                    service,
                    standby,
                    generation = job.record.generation,
                    archives = sent.archives,
                    bytes = sent.bytes,
                    ms = t.elapsed().as_millis() as u64,
                    verify_ms = format!("{:.0}", sent.verify_ms),
                    lag_ms,
                    "checkpoint replicated"
                );
            }
            Err(e) => {
                crate::metrics::get()
                    .replication_failures
                    .get_or_create(&crate::metrics::ServiceLabel {
                        service: service.to_string(),
                    })
                    .inc();
                s.acked.remove(standby);
                if !s.stop {
                    tracing::warn!(service, standby, generation = job.record.generation, error = %ferry_image::units::chain(&e), "replication failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn one_outlier_is_ignored_two_are_not() {
        assert_eq!(plan_lag(ms(&[]).into_iter()), None);
        assert_eq!(
            plan_lag(ms(&[400, 4000]).into_iter()),
            Some(Duration::from_millis(4000))
        );
        assert_eq!(
            plan_lag(ms(&[400, 450, 4000, 420]).into_iter()),
            Some(Duration::from_millis(450))
        );
        assert_eq!(
            plan_lag(ms(&[400, 3000, 4000, 420]).into_iter()),
            Some(Duration::from_millis(3000))
        );
    }
}
