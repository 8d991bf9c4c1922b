//! One service's role on this host, played by the member's loop every
//! poll: lead it (run, publish, checkpoint, replicate, move), take it over
//! when it has no leader and this host holds the newest checkpoint, or
//! make sure no stale copy of it runs here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::copy::{self, HostCopy};
use super::etcd::{delete_op, put_op};
use super::keys::{
    self, AddressRecord, CheckpointRecord, ClusterView, HostRecord, LeaderRecord, ScheduleRecord,
    ServiceSpec, ServiceView,
};
use super::member::{Led, Member};
use super::replica::{self, Holding, Link};
use super::replicator::Replicator;
use super::schedule;
use crate::archive::{NoProgress, PackOptions};
use crate::checkpoint;
use crate::criu::NoHooks;

/// Archives per chain before the next full one. A standby applies a full
/// archive as cheaply as an incremental one (only changed pages are
/// written), but the leader compresses and sends all of the memory.
const CHAIN_LENGTH: usize = 30;
/// A failed checkpoint (e.g. a client connection open at the freeze) is
/// retried after this, not after a whole interval.
const RETRY: Duration = Duration::from_millis(300);
/// Tries of a planned switchover's live migration before it is given up.
const MOVE_TRIES: u32 = 3;
/// Without a leader for this long, any live eligible host campaigns, not
/// only the one holding the newest checkpoint.
const CAMPAIGN_GRACE: Duration = Duration::from_secs(3);
/// zstd level of the periodic checkpoints (fast: they happen often).
const LEVEL: i32 = 1;
/// How long a new leader waits for its copy to accept connections before
/// it leaves the publishing of the address to the role loop.
const ACCEPT_WAIT: Duration = Duration::from_millis(500);
/// How often it tries meanwhile.
const ACCEPT_POLL: Duration = Duration::from_millis(5);
/// What a first checkpoint's dump is taken to last.
const FIRST_DUMP_ESTIMATE: Duration = Duration::from_millis(300);

struct Leading {
    token: i64,
    copy: HostCopy,
    /// Archives of the current chain, oldest first (a chain restored from
    /// a standby's holding goes on here).
    chain: Vec<Link>,
    /// The newest checkpoint of the chain.
    last: Option<CheckpointRecord>,
    next_generation: u64,
    next_checkpoint: Instant,
    /// Whether the last schedule kept the interval as a bound on lost work
    /// (a change is logged).
    interval_holds: bool,
    /// Sends each checkpoint to the standbys.
    replicator: Replicator,
    address: AddressRecord,
    address_published: bool,
    /// How long the last checkpoint's dump took.
    last_dump: Duration,
    /// Whether a checkpoint was taken since the lease's renewals stopped
    /// getting through (one is taken at once: fencing may follow).
    saved_while_overdue: bool,
}

pub struct ServiceRun {
    name: String,
    leading: Option<Leading>,
    leaderless_since: Option<Instant>,
    waiting_logged: bool,
}

impl ServiceRun {
    pub fn new(name: &str) -> ServiceRun {
        ServiceRun {
            name: name.to_string(),
            leading: None,
            leaderless_since: None,
            waiting_logged: false,
        }
    }

    /// Whether this host leads the service.
    pub fn is_leading(&self) -> bool {
        self.leading.is_some()
    }

    pub fn step(&mut self, m: &Arc<Member>, view: &ClusterView, sv: &ServiceView) {
        let Some(spec) = sv.spec.as_ref() else { return };
        if !spec.eligible(m.name()) {
            return;
        }
        let copy = HostCopy::of(m, spec);
        // While this host cannot vouch for its lease (renewals failing),
        // fencing alone acts; roles change only on what etcd says.
        let Some(lease) = m.lease_id() else { return };
        let mine = sv
            .leader
            .as_ref()
            .is_some_and(|l| l.host == m.name() && sv.leader_lease == lease);
        if sv.leader.is_some() {
            self.leaderless_since = None;
        }
        match (&self.leading, mine) {
            (Some(l), true) if l.token == sv.token => self.lead(m, view, sv, spec),
            (Some(_), _) => {
                tracing::warn!(service = %self.name, "no longer the leader: stopping this copy");
                self.stop_leading(m, &copy);
            }
            (None, true) => {
                // The key names this host: a handover by `ha move`, or a
                // leader that lost track of itself. Adopt or restore.
                if let (Some(pid), false) = (sv.leader.as_ref().and_then(|l| l.pid), copy.exists())
                {
                    // A process tree moved here live: its pid came with
                    // the key.
                    if let Err(e) = copy.adopt(pid) {
                        tracing::warn!(service = %self.name, pid, error = %crate::units::chain(&e), "cannot adopt the moved process tree");
                    }
                }
                let running = copy.exists();
                tracing::info!(service = %self.name, token = sv.token, running, "this host holds the leader key");
                self.become_leader(m, sv, spec, sv.token, Instant::now(), running);
            }
            (None, false) => {
                // Never a copy here without the key: a healed partition or
                // a crashed agent may have left one.
                // (A planned switchover to this host restores the copy
                // before the leader key is handed over: it stays.)
                let moving_here = sv.move_to.as_ref().is_some_and(|mv| mv.to == m.name());
                if !moving_here
                    && !m.led.lock().is_ok_and(|l| l.contains_key(&self.name))
                    && copy.exists()
                {
                    tracing::warn!(service = %self.name, "a copy runs here without leadership: deleting it");
                    copy.delete();
                }
                if sv.leader.is_none() {
                    self.maybe_campaign(m, view, sv, spec);
                } else {
                    self.keep_standby_record(m, sv);
                }
            }
        }
    }

    fn stop_leading(&mut self, m: &Member, copy: &HostCopy) {
        if let Ok(mut led) = m.led.lock() {
            led.remove(&self.name);
        }
        copy.delete();
        self.leading = None;
    }

    /// Re-publishes this host's verified checkpoint if etcd lost it (e.g.
    /// the host's lease was renewed under a new id).
    fn keep_standby_record(&self, m: &Member, sv: &ServiceView) {
        let Ok(h) = m.holdings.lock() else { return };
        let Some(held) = h.get(&self.name) else {
            return;
        };
        let published = sv
            .standbys
            .get(m.name())
            .is_some_and(|r| r.checkpoint == held.checkpoint);
        if !published {
            let record = keys::StandbyRecord {
                host: m.name().to_string(),
                checkpoint: held.checkpoint.clone(),
                verified_unix_ms: keys::now_unix_ms(),
            };
            drop(h);
            replica::publish(m, &self.name, &record);
        }
    }

    /// Campaigns when this host holds the newest verified checkpoint among
    /// the live eligible hosts (ties: the first name), or after a grace
    /// period in any case.
    fn maybe_campaign(
        &mut self,
        m: &Member,
        view: &ClusterView,
        sv: &ServiceView,
        spec: &ServiceSpec,
    ) {
        let since = *self.leaderless_since.get_or_insert_with(Instant::now);
        let held = m
            .holdings
            .lock()
            .ok()
            .and_then(|h| h.get(&self.name).map(|h| h.checkpoint.generation))
            .unwrap_or(0);
        // What each live host holds: this host knows; for the others, their
        // record counts only under their current lease (a restarted agent's
        // old record lingers until its old lease expires).
        let generation_of = |host: &str| {
            if host == m.name() {
                return held;
            }
            let current = view.hosts.get(host).map(|h| h.lease);
            match (sv.standbys.get(host), sv.standby_leases.get(host)) {
                (Some(r), Some(lease)) if Some(*lease) == current => r.checkpoint.generation,
                _ => 0,
            }
        };
        let best = view
            .hosts
            .keys()
            .filter(|h| spec.eligible(h))
            .max_by(|a, b| {
                generation_of(a)
                    .cmp(&generation_of(b))
                    .then_with(|| b.cmp(a))
            });
        let first_choice = best.map(String::as_str) == Some(m.name());
        if !first_choice && since.elapsed() < CAMPAIGN_GRACE {
            if !self.waiting_logged {
                tracing::info!(service = %self.name, best = ?best, best_generation = best.map_or(0, |b| generation_of(b)), held, "no leader: waiting for the host with the newest checkpoint");
                self.waiting_logged = true;
            }
            return;
        }
        self.waiting_logged = false;
        let Some(lease) = m.lease_id() else { return };
        let record = LeaderRecord {
            host: m.name().to_string(),
            since_unix_ms: keys::now_unix_ms(),
            pid: None,
        };
        let key = keys::service_key(m.cluster(), &self.name, "leader");
        match m.etcd.create(&key, keys::to_json(&record), lease) {
            Ok(Some(token)) => {
                tracing::info!(service = %self.name, token, held, "elected leader");
                self.become_leader(m, sv, spec, token, since, false);
            }
            Ok(None) => tracing::info!(service = %self.name, "another host was elected first"),
            Err(e) => tracing::warn!(service = %self.name, error = %e, "campaign failed"),
        }
    }

    /// Starts leading: adopts the running container, or restores the
    /// newest checkpoint held here, or starts the service fresh when the
    /// cluster never checkpointed it.
    fn become_leader(
        &mut self,
        m: &Member,
        sv: &ServiceView,
        spec: &ServiceSpec,
        token: i64,
        since: Instant,
        running: bool,
    ) {
        let copy = HostCopy::of(m, spec);
        let holding: Option<Holding> = m
            .holdings
            .lock()
            .ok()
            .and_then(|mut h| h.remove(&self.name));
        let mut restored = (0u64, 0u64);
        let started = if running {
            Ok(())
        } else {
            copy.delete();
            match &holding {
                Some(h) => copy
                    .restore(spec, h.ready.path(), &m.criu)
                    .map(|(pid, wall)| {
                        restored = (h.checkpoint.generation, h.checkpoint.taken_unix_ms);
                        tracing::info!(service = %self.name, generation = h.checkpoint.generation, pid, restore_ms = wall.as_secs_f64() * 1e3, "restored from the newest checkpoint held here");
                    })
                .map_err(|e| crate::units::chain(&e)),
                None => {
                    if sv.checkpoint.is_some() {
                        tracing::error!(service = %self.name, "no checkpoint of the service survives on a live host: starting it fresh (its state is lost)");
                    }
                    copy.start(spec)
                        .map(|pid| tracing::info!(service = %self.name, pid, "started the service"))
                        .map_err(|e| crate::units::chain(&e))
                }
            }
        };
        if let Err(why) = started {
            tracing::error!(service = %self.name, error = %why, "cannot run the service here: resigning");
            // Keep the checkpoint: another try, here or elsewhere.
            if let (Some(h), Ok(mut hs)) = (holding, m.holdings.lock()) {
                hs.insert(self.name.clone(), h);
            }
            let key = keys::service_key(m.cluster(), &self.name, "leader");
            let _ = m.etcd.fenced(&key, token, vec![delete_op(&key)]);
            return;
        }
        if let Ok(mut led) = m.led.lock() {
            led.insert(self.name.clone(), Led::running(copy.clone()));
        }
        let _ = m
            .etcd
            .delete(&keys::standby_key(m.cluster(), &self.name, m.name()));
        let next_generation = sv
            .checkpoint
            .as_ref()
            .map_or(0, |c| c.generation)
            .max(restored.0)
            + 1;
        // The chain restored from goes on: the first checkpoint is
        // incremental on it, and the standbys keep what they hold of it.
        let dir = replica::leader_dir(m, &self.name);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        let (chain, last) = match holding.filter(|_| restored.0 > 0) {
            Some(h) => {
                let chain = adopt(&h.chain, &dir);
                let _ = std::fs::remove_dir_all(m.service_dir(&self.name).join("standby"));
                (chain, Some(h.checkpoint.clone()))
            }
            None => (Vec::new(), None),
        };
        let host_ip = m.config.ip;
        self.leading = Some(Leading {
            token,
            copy,
            chain,
            last,
            next_generation,
            // A first checkpoint soon, so standbys hold something.
            next_checkpoint: Instant::now() + Duration::from_millis(200),
            interval_holds: true,
            replicator: Replicator::new(&self.name),
            address: AddressRecord {
                host: m.name().to_string(),
                addr: std::net::SocketAddr::new(host_ip, spec.port).to_string(),
                token,
                restored_generation: restored.0,
                restored_taken_unix_ms: restored.1,
                takeover_ms: since.elapsed().as_secs_f64() * 1e3,
                since_unix_ms: keys::now_unix_ms(),
            },
            address_published: false,
            last_dump: FIRST_DUMP_ESTIMATE,
            saved_while_overdue: false,
        });
        self.leaderless_since = None;
        // Clients wait for this: publish now rather than on the role
        // loop's next round (which first reads the whole cluster).
        self.publish_address(m, ACCEPT_WAIT);
    }

    fn lead(&mut self, m: &Arc<Member>, view: &ClusterView, sv: &ServiceView, spec: &ServiceSpec) {
        let key = keys::service_key(m.cluster(), &self.name, "leader");
        let Some(l) = self.leading.as_mut() else {
            return;
        };
        if m.led.lock().is_ok_and(|led| !led.contains_key(&self.name)) {
            // Fencing deleted this copy while the lease lapsed (etcd was
            // unreachable), yet the lease is valid again and the key still
            // names this host: nobody else took over. Bring the service
            // back from the newest checkpoint taken here.
            let since = Instant::now();
            let token = l.token;
            if !self.restore_own(m, spec) {
                let _ = m.etcd.fenced(&key, token, vec![delete_op(&key)]);
                self.leading = None;
                return;
            }
            if let Some(l) = self.leading.as_mut() {
                l.address.takeover_ms = since.elapsed().as_secs_f64() * 1e3;
                l.address.since_unix_ms = keys::now_unix_ms();
                l.address_published = false;
            }
            return;
        }
        if (!l.address_published || sv.address.as_ref().map(|a| a.token) != Some(l.token))
            && !self.publish_address(m, Duration::ZERO)
        {
            return;
        }
        if let Some(mv) = &sv.move_to {
            if mv.to != m.name() {
                let to = view.hosts.get(&mv.to).cloned();
                self.move_to(m, spec, &mv.to, to.as_ref());
                return;
            }
            let _ = m
                .etcd
                .delete(&keys::service_key(m.cluster(), &self.name, "move"));
        }
        let Some(l) = self.leading.as_mut() else {
            return;
        };
        // A lease whose renewals stop getting through (etcd away, or this
        // host cut off) may end in fencing: the service's newest state is
        // saved at once, if the dump can end before fencing pauses it.
        let overdue = m.renewal_overdue();
        if !overdue {
            l.saved_while_overdue = false;
        }
        let due = if overdue && !l.saved_while_overdue {
            m.unfenced_for(l.last_dump)
        } else {
            Instant::now() >= l.next_checkpoint && m.lease_valid_for(Duration::from_millis(100))
        };
        if due {
            l.saved_while_overdue |= overdue;
            // The interval bounds lost work: the next checkpoint starts
            // early enough to be verified by a standby before this one is
            // an interval old ([`schedule`]).
            let started = Instant::now();
            let interval = Duration::from_millis(spec.interval_ms);
            let lag = l.replicator.lag_estimate();
            let plan = schedule::period(interval, lag);
            let planned = ScheduleRecord {
                period_ms: plan.period.as_millis() as u64,
                lag_ms: lag.map(|d| d.as_millis() as u64),
                holds: plan.holds,
            };
            if plan.holds != l.interval_holds {
                l.interval_holds = plan.holds;
                let lag_ms = planned.lag_ms.unwrap_or(0);
                if plan.holds {
                    tracing::info!(service = %self.name, lag_ms, period_ms = planned.period_ms, "replication is fast enough again to bound lost work by the interval");
                } else {
                    tracing::warn!(service = %self.name, lag_ms, interval_ms = spec.interval_ms, period_ms = planned.period_ms, "replication lag too long for the interval: lost work may exceed it (checkpoints come at a quarter of the interval)");
                }
            }
            let ok = checkpoint_and_replicate(m, &self.name, spec, view, l, planned);
            l.next_checkpoint = if ok {
                (started + plan.period).max(Instant::now())
            } else {
                Instant::now() + RETRY
            };
        }
    }

    /// Publishes the service's address (fenced by the token) once the
    /// copy accepts connections: clients are sent only to a service that
    /// answers (one just started may still be initialising). Waits up to
    /// `wait` for it to accept. Returns whether the address is published.
    fn publish_address(&mut self, m: &Member, wait: Duration) -> bool {
        let Some(l) = self.leading.as_mut() else {
            return false;
        };
        if !l.address_published {
            let deadline = Instant::now() + wait;
            while !accepts(&l.address.addr) {
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(ACCEPT_POLL);
            }
        }
        let Some(lease) = m.lease_id() else {
            return false;
        };
        let key = keys::service_key(m.cluster(), &self.name, "leader");
        let addr_key = keys::service_key(m.cluster(), &self.name, "address");
        match m.etcd.fenced(
            &key,
            l.token,
            vec![put_op(&addr_key, keys::to_json(&l.address), lease)],
        ) {
            Ok(true) => {
                l.address_published = true;
                tracing::info!(service = %self.name, addr = %l.address.addr, token = l.token, takeover_ms = l.address.takeover_ms, "service address published");
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish the address");
                false
            }
        }
    }

    /// After fencing: restores this host's own newest checkpoint (the
    /// leader keeps its archives). Returns whether the service runs again.
    fn restore_own(&mut self, m: &Member, spec: &ServiceSpec) -> bool {
        let Some(l) = self.leading.as_mut() else {
            return false;
        };
        let (Some(cp), Some(path)) = (l.last.clone(), l.chain.last().map(|k| k.path.clone()))
        else {
            tracing::error!(service = %self.name, "fenced before any checkpoint: resigning");
            return false;
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        l.copy.delete();
        // Unpacked under the agent's staging prefix (swept if it is killed).
        let restored = crate::archive::Chain::open(&path, None)
            .map_err(|e| crate::units::chain(&e))
            .and_then(|chain| {
                let size = chain.head().index().files.iter().map(|f| f.size).sum();
                let stage = crate::checkpoint::staging::create(replica::STAGING_PREFIX, size, None)
                    .map_err(|e| e.to_string())?;
                crate::archive::unpack(&chain, stage.path(), threads, &NoProgress)
                    .map_err(|e| crate::units::chain(&e))?;
                l.copy
                    .restore(spec, stage.path(), &m.criu)
                    .map_err(|e| crate::units::chain(&e))
            });
        match restored {
            Ok((pid, _)) => {
                tracing::warn!(service = %self.name, generation = cp.generation, pid, "fenced copy brought back from this host's newest checkpoint");
                l.address.restored_generation = cp.generation;
                l.address.restored_taken_unix_ms = cp.taken_unix_ms;
                if let Ok(mut led) = m.led.lock() {
                    led.insert(self.name.clone(), Led::running(l.copy.clone()));
                }
                true
            }
            Err(e) => {
                tracing::error!(service = %self.name, error = %e, "cannot restore this host's own checkpoint: resigning");
                false
            }
        }
    }

    /// Planned switchover: live-migrate the container to `to`, then hand
    /// the leader key over to that host's lease in one fenced transaction.
    fn move_to(&mut self, m: &Member, spec: &ServiceSpec, to: &str, host: Option<&HostRecord>) {
        let move_key = keys::service_key(m.cluster(), &self.name, "move");
        let Some(host) = host else {
            tracing::error!(service = %self.name, to, "move refused: the host is not a live member");
            let _ = m.etcd.delete(&move_key);
            return;
        };
        let Some(l) = self.leading.as_ref() else {
            return;
        };
        let dest_id = copy::container_name(m.cluster(), &spec.name, &host.name);
        let Some(target) = l.copy.migrate_target(spec, dest_id) else {
            tracing::error!(service = %self.name, to, "move refused: no copy runs here");
            let _ = m.etcd.delete(&move_key);
            return;
        };
        let moved_pid = match target {
            crate::migrate::MigrateTarget::Process { pid } => Some(pid),
            _ => None,
        };
        tracing::info!(service = %self.name, to, "planned switchover: live migration");
        let opts = crate::migrate::MigrateOptions {
            target,
            to: host.agent.clone(),
            secret: m.secret.clone(),
            max_downtime: Duration::from_millis(300),
            max_rounds: 8,
            streams: std::thread::available_parallelism().map_or(1, |n| n.get()),
            restore: Default::default(),
            ignore_gpu: false,
            staging: None,
            keep_images: None,
            io_timeout: Duration::from_secs(30),
        };
        // While it moves, fencing must not pause it (the migration freezes
        // it itself); it is re-registered if the move fails.
        if let Ok(mut led) = m.led.lock() {
            led.remove(&self.name);
        }
        let token = l.token;
        let copy = l.copy.clone();
        // A failed migration leaves the service running here, so a few
        // tries are safe: one fails when, say, a client connection is open
        // at the freeze.
        let mut outcome = crate::migrate::migrate(&m.criu, &opts);
        for attempt in 2..=MOVE_TRIES {
            let Err(e) = &outcome else { break };
            tracing::warn!(service = %self.name, to = %host.name, attempt, error = %crate::units::chain(e), "move failed; the service runs here; trying again");
            std::thread::sleep(RETRY);
            outcome = crate::migrate::migrate(&m.criu, &opts);
        }
        match outcome {
            Ok(report) => {
                let key = keys::service_key(m.cluster(), &self.name, "leader");
                let record = LeaderRecord {
                    host: host.name.clone(),
                    since_unix_ms: keys::now_unix_ms(),
                    pid: moved_pid,
                };
                let handed = m.etcd.fenced(
                    &key,
                    token,
                    vec![
                        put_op(&key, keys::to_json(&record), host.lease),
                        // Clients follow at once; the new leader re-publishes
                        // it with its token when it adopts the service.
                        put_op(
                            &keys::service_key(m.cluster(), &self.name, "address"),
                            keys::to_json(&AddressRecord {
                                host: host.name.clone(),
                                addr: std::net::SocketAddr::new(
                                    host.ip.parse().unwrap_or(m.config.ip),
                                    spec.port,
                                )
                                .to_string(),
                                token: 0,
                                restored_generation: 0,
                                restored_taken_unix_ms: 0,
                                takeover_ms: report.final_phase.frozen_ms,
                                since_unix_ms: keys::now_unix_ms(),
                            }),
                            host.lease,
                        ),
                        delete_op(&move_key),
                    ],
                );
                match handed {
                    Ok(true) => {
                        tracing::info!(service = %self.name, to = %host.name, frozen_ms = report.final_phase.frozen_ms, "moved live; leadership handed over")
                    }
                    other => {
                        // Leadership was lost meanwhile: the moved copy must
                        // not outlive the request (its host then deletes it).
                        tracing::error!(service = %self.name, to = %host.name, outcome = ?other, "moved, but the leader key could not be handed over");
                        let _ = m.etcd.delete(&move_key);
                    }
                }
                self.leading = None;
            }
            Err(e) => {
                tracing::error!(service = %self.name, to = %host.name, error = %crate::units::chain(&e), "move failed; the service keeps running here");
                if let Ok(mut led) = m.led.lock() {
                    led.insert(self.name.clone(), Led::running(copy));
                }
                let _ = m.etcd.delete(&move_key);
            }
        }
    }
}

/// Whether the service accepts TCP connections at `addr`.
fn accepts(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>()
        .ok()
        .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(100)).ok())
        .is_some()
}

/// Takes one checkpoint while the service runs, records it (fenced) and
/// sends it to the standbys. Returns whether the checkpoint was taken.
fn checkpoint_and_replicate(
    m: &Arc<Member>,
    service: &str,
    spec: &ServiceSpec,
    view: &ClusterView,
    l: &mut Leading,
    schedule: ScheduleRecord,
) -> bool {
    let generation = l.next_generation;
    let dir = replica::leader_dir(m, service);
    let path = replica::archive_path(&dir, generation);
    let full = l.chain.len() >= CHAIN_LENGTH || l.chain.is_empty();
    let parent = if full {
        None
    } else {
        l.chain.last().map(|k| k.path.clone())
    };
    let (container, pid) = match l.copy.dump_target() {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(service, generation, error = %crate::units::chain(&e), "nothing to checkpoint");
            return false;
        }
    };
    // Staged under the agent's prefix: a killed agent's leftovers are swept
    // when it starts again.
    let stage = match crate::checkpoint::staging::create(replica::STAGING_PREFIX, 0, None) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(service, generation, error = %e, "no staging directory for the checkpoint");
            return false;
        }
    };
    let req = copy::running_dump(pid, &stage.path().join("images"));
    let taken_unix_ms = keys::now_unix_ms();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pack = PackOptions {
        level: LEVEL,
        threads,
        parent,
        source: format!("ha service {service} generation {generation}"),
        progress: &NoProgress,
    };
    // A paused copy is not checkpointed (restored, it would stay paused),
    // and fencing does not pause it while CRIU dumps it.
    let Some(dumping) = m.dumping(service) else {
        tracing::debug!(service, generation, "paused by fencing: no checkpoint now");
        return false;
    };
    let dumped = checkpoint::dump_any(&m.criu, container.as_ref(), &req, &mut NoHooks);
    drop(dumping);
    let d = match dumped.and_then(|dump| {
        checkpoint::pack_images(&req.images_dir, &path, &pack).map(|pack| (dump, pack))
    }) {
        Ok((dump, pack)) => checkpoint::ArchiveDump { dump, pack },
        Err(e) => {
            // A retry comes soon: the log line is all that is kept (the
            // staging directory goes with `stage`).
            tracing::warn!(service, generation, error = %crate::units::chain(&e), "checkpoint failed; the service keeps running; retrying soon");
            return false;
        }
    };
    l.last_dump = d.dump.wall;
    let frozen_ms = d
        .dump
        .stats
        .as_ref()
        .map_or(d.dump.wall.as_secs_f64() * 1e3, |s| {
            s.frozen.as_secs_f64() * 1e3
        });
    if full {
        for old in l.chain.drain(..) {
            let _ = std::fs::remove_file(old.path);
        }
    }
    let base = l.chain.first().map_or(generation, |k| k.generation);
    let record = CheckpointRecord {
        generation,
        token: l.token,
        leader: m.name().to_string(),
        taken_unix_ms,
        frozen_ms,
        archive_bytes: d.pack.archive_bytes,
        raw_bytes: d.pack.raw_bytes,
        base,
        schedule: Some(schedule),
    };
    l.chain.push(Link {
        generation,
        id: d.pack.id.clone(),
        path,
    });
    l.last = Some(record.clone());
    l.next_generation += 1;
    // Standbys: live eligible hosts other than this one, those already in
    // sync first, then by name. Each gets the checkpoint from its own
    // worker: checkpoints never wait for a transfer.
    let mut targets: Vec<&HostRecord> = view
        .hosts
        .values()
        .filter(|h| h.name != m.name() && spec.eligible(&h.name))
        .collect();
    targets.sort_by_key(|h| (!l.replicator.in_sync(&h.name), h.name.clone()));
    targets.truncate(spec.standbys);
    for host in &targets {
        l.replicator.post(m, host, &record, &l.chain);
    }
    // The record in etcd is for `ha status`; standbys check the token
    // themselves. While etcd is away the write could only time out.
    if !m.renewal_overdue() {
        let key = keys::service_key(m.cluster(), service, "leader");
        let cp_key = keys::service_key(m.cluster(), service, "checkpoint");
        match m.etcd.fenced(
            &key,
            l.token,
            vec![put_op(&cp_key, keys::to_json(&record), 0)],
        ) {
            Ok(true) => {}
            Ok(false) => tracing::warn!(service, "the leader key changed under this checkpoint"),
            Err(e) => tracing::warn!(service, error = %e, "cannot record the checkpoint in etcd"),
        }
    }
    tracing::info!(
        service,
        generation,
        frozen_ms = format!("{frozen_ms:.1}"),
        dump_ms = d.dump.wall.as_millis() as u64,
        pack_ms = d.pack.wall.as_millis() as u64,
        archive_bytes = record.archive_bytes,
        base,
        standbys = %targets.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(" "),
        "checkpoint taken"
    );
    true
}

/// Keeps a restored chain in `dir` (the leader's own); empty when it
/// cannot (the next checkpoint is then a full one).
fn adopt(chain: &[Link], dir: &std::path::Path) -> Vec<Link> {
    replica::link_into(chain, dir).unwrap_or_else(|e| {
        tracing::warn!(error = %crate::units::chain(&e), "cannot keep the restored chain: the next checkpoint is a full one");
        Vec::new()
    })
}
