//! An agent as a member of an HA cluster: its lease (renewal and the
//! fencing that hangs on it), its registration, and the loop that plays
//! each service's role on this host.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_sys::clock::BootInstant;

use super::copy::HostCopy;
use super::etcd::Etcd;
use super::keys::{self, ClusterView, HostRecord};
use super::leader::ServiceRun;
use super::replica::Holding;
use super::{HaConfig, HaError};
use crate::guard::GuardLink;
use ferry_criu::Criu;
use ferry_transport::Secret;

/// How often the member reads the cluster and acts.
pub(super) const POLL: Duration = Duration::from_millis(100);
/// How long joining may wait for etcd.
const JOIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How often fencing looks at the lease.
const FENCE_POLL: Duration = Duration::from_millis(20);
/// A read of the cluster longer than this is logged (etcd slow or unreachable).
const SLOW_POLL: Duration = Duration::from_millis(300);
/// How often the host's health record is rewritten.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A renewal is overdue this long after the next one was due (renewals go
/// every quarter TTL): etcd is taken to be away.
const RENEWAL_MARGIN: Duration = Duration::from_millis(100);

/// The lease as this host knows it.
#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    ttl: Duration,
    /// Send time of the last renewal etcd confirmed, on the clock that
    /// goes on during suspend (a host that slept past its lease's expiry
    /// must find it expired).
    renewed: BootInstant,
}

impl Lease {
    fn deadline(&self) -> BootInstant {
        self.renewed + self.ttl
    }

    /// When fencing pauses the led services without a renewal.
    fn pause_at(&self) -> BootInstant {
        self.renewed + self.ttl * 3 / 4
    }

    /// When the guard kills the led copies without a renewal: a twentieth
    /// of the TTL before the deadline, for the kill to land.
    fn guard_at(&self) -> BootInstant {
        self.renewed + self.ttl * 19 / 20
    }
}

/// A service this host leads, as the fencing sees it.
#[derive(Debug, Clone)]
pub struct Led {
    pub copy: HostCopy,
    /// The fencing token it is led under: every vouch of this host is
    /// written only while the service's leader key still has it.
    pub token: i64,
    pub paused: bool,
    /// CRIU is dumping the copy (a checkpoint): fencing holds off pausing
    /// it until the dump ends ([`Member::dumping`]).
    pub dumping: bool,
    /// A planned switchover is migrating it (the migration freezes it):
    /// fencing does not pause it, but still deletes it (and the guard
    /// still kills it) if the lease runs out.
    pub moving: bool,
    /// A pause or resume of it is under way (on a thread of its own).
    busy: bool,
    /// Its deletion is under way.
    deleting: bool,
    /// The guard killed it (the lease's deadline passed without renewal):
    /// it stays here until fencing deletes it at the deadline, or, if a
    /// renewal gets through after all, the leader brings the service back
    /// ([`Member::killed_and_renewed`]).
    pub killed: bool,
}

impl Led {
    /// A copy that runs, as fencing first sees it.
    pub fn running(copy: HostCopy, token: i64) -> Led {
        Led {
            copy,
            token,
            paused: false,
            dumping: false,
            moving: false,
            busy: false,
            deleting: false,
            killed: false,
        }
    }
}

/// What fencing does to one copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FenceAction {
    Pause,
    Resume,
    Delete,
}

/// Marks a led service's copy as being dumped; unmarks it when dropped.
pub struct Dumping<'m> {
    member: &'m Member,
    service: String,
}

impl Drop for Dumping<'_> {
    fn drop(&mut self) {
        if let Ok(mut led) = self.member.led.lock() {
            if let Some(l) = led.get_mut(&self.service) {
                l.dumping = false;
            }
        }
    }
}

/// Shared by the member's threads and the agent's connections.
pub struct Member {
    pub config: HaConfig,
    pub etcd: Etcd,
    pub agent_addr: String,
    pub runc_root: PathBuf,
    pub store: PathBuf,
    pub secret: Secret,
    pub criu: Criu,
    pub boot_id: String,
    lease: Mutex<Option<Lease>>,
    /// Services led here, by name: what fencing must stop.
    pub led: Mutex<HashMap<String, Led>>,
    /// Newest verified checkpoint held per service (as a standby).
    pub holdings: Mutex<HashMap<String, Holding>>,
    /// Highest fencing token seen per service.
    pub tokens: Mutex<HashMap<String, i64>>,
    /// Services whose checkpoint is being received now.
    pub receiving: Mutex<std::collections::HashSet<String>>,
    /// The fencing guard ([`crate::guard`]): kills the led copies if this
    /// agent dies, hangs or stops renewing.
    guard: Mutex<Option<Arc<GuardLink>>>,
    /// Set when a key of the cluster is deleted (a leader's lease revoked):
    /// the roles are played again at once instead of at the next tick.
    nudge: Arc<super::etcd::Nudge>,
    stop: AtomicBool,
}

impl Member {
    /// Joins the cluster: connects to etcd and takes a lease (failing here
    /// is fatal: an agent asked to join must not run outside the cluster).
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        config: HaConfig,
        agent_addr: String,
        runc_root: PathBuf,
        store: PathBuf,
        secret: Secret,
        criu: Criu,
        boot_id: String,
    ) -> Result<Arc<Member>, HaError> {
        super::valid_name(&config.cluster)?;
        super::valid_name(&config.name)?;
        let etcd = Etcd::connect(&config.etcd)?;
        let want = config.lease_ttl.as_secs().max(1) as i64;
        // etcd may be starting or busy: keep asking for a while.
        let deadline = Instant::now() + JOIN_TIMEOUT;
        let (renewed, (id, granted)) = loop {
            let sent = BootInstant::now();
            match etcd.grant(want) {
                Ok(g) => break (sent, g),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::info!(error = %e, "etcd not answering yet; retrying");
                    std::thread::sleep(POLL);
                }
            }
        };
        if granted != want {
            tracing::warn!(
                asked = want,
                granted,
                "etcd granted a longer lease than asked (its minimum TTL is 1.5 x its election timeout)"
            );
        }
        tracing::info!(cluster = %config.cluster, host = %config.name, lease = id, ttl_s = granted, etcd = %etcd.endpoints(), "joined the cluster");
        let ha_dir = store.join("ha");
        std::fs::create_dir_all(&ha_dir).map_err(|source| HaError::Io {
            path: ha_dir.clone(),
            source,
        })?;
        let lease = Lease {
            id,
            ttl: Duration::from_secs(granted.max(1) as u64),
            renewed,
        };
        // No leading without a guard: a copy led by an agent that then
        // died would run on beside its successor.
        let guard = spawn_guard(&config.ferry, &lease).map_err(|e| HaError::Copy {
            what: "start the fencing guard".into(),
            source: Box::new(e),
        })?;
        tracing::info!(pid = guard.pid, "fencing guard started");
        let nudge = Arc::new(super::etcd::Nudge::default());
        etcd.watch_deletions(
            &keys::cluster_prefix(&config.cluster),
            Arc::downgrade(&nudge),
        );
        Ok(Arc::new(Member {
            config,
            etcd,
            agent_addr,
            runc_root,
            store,
            secret,
            criu,
            boot_id,
            lease: Mutex::new(Some(lease)),
            led: Mutex::new(HashMap::new()),
            holdings: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            receiving: Mutex::new(std::collections::HashSet::new()),
            guard: Mutex::new(Some(Arc::new(guard))),
            nudge,
            stop: AtomicBool::new(false),
        }))
    }

    /// When this agent's watch first showed `host`'s vouch at `revision`.
    pub(crate) fn vouch_seen(&self, host: &str, revision: i64) -> Option<BootInstant> {
        self.nudge.vouch_seen(host, revision)
    }

    fn guard(&self) -> Option<Arc<GuardLink>> {
        self.guard.lock().ok().and_then(|g| g.clone())
    }

    /// Registers `copy` as led here: fencing (and the guard) stop it
    /// whenever this host cannot vouch for its lease.
    pub(crate) fn lead_copy(&self, service: &str, copy: HostCopy, token: i64) {
        let pid = copy.init_pid();
        let cgroup = copy.killable_cgroup();
        if let Ok(mut led) = self.led.lock() {
            led.insert(service.to_string(), Led::running(copy, token));
        }
        match (pid, self.guard()) {
            (Some(pid), Some(g)) => match g.watch(service, pid, cgroup.as_deref()) {
                Ok(()) => {
                    tracing::info!(service, pid, guard = g.pid, cgroup = ?cgroup, "the fencing guard holds the copy")
                }
                Err(e) => {
                    tracing::error!(service, pid, error = %e, "the fencing guard cannot take the copy")
                }
            },
            (None, _) => tracing::warn!(
                service,
                "no init pid for the copy: the guard cannot hold it"
            ),
            (_, None) => tracing::error!(service, "no fencing guard"),
        }
    }

    /// Takes `service`'s copy out of fencing (it was deleted or moved).
    pub(crate) fn unlead(&self, service: &str) -> Option<Led> {
        let led = self.led.lock().ok()?.remove(service);
        if let Some(g) = self.guard() {
            let _ = g.release(service);
        }
        led
    }

    /// Whether the guard killed `service`'s copy and a renewal got through
    /// since (nobody else can have taken over: the copy is taken out of
    /// fencing, and the leader may bring the service back).
    pub(crate) fn killed_and_renewed(&self, service: &str) -> bool {
        let killed = self
            .led
            .lock()
            .is_ok_and(|l| l.get(service).is_some_and(|l| l.killed && !l.deleting));
        if killed && self.unfenced_for(Duration::ZERO) {
            if let Some(l) = self.unlead(service) {
                l.copy.delete();
            }
            return true;
        }
        false
    }

    /// Marks `service`'s copy as moving (or not): fencing does not pause
    /// it meanwhile, but deletes it if the lease runs out.
    pub(crate) fn set_moving(&self, service: &str, moving: bool) {
        if let Ok(mut led) = self.led.lock() {
            if let Some(l) = led.get_mut(service) {
                l.moving = moving;
            }
        }
    }

    /// Hands the guard the lease's new deadline.
    fn arm_guard(&self, lease: &Lease) {
        if let Some(g) = self.guard() {
            if let Err(e) = g.deadline(lease.guard_at()) {
                tracing::error!(error = %e, "cannot reach the fencing guard");
            }
        }
    }

    /// Follows what the guard kills; starts a new guard if it dies.
    fn watch_guard(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            let Some(g) = self.guard() else { return };
            while let Some(service) = g.next_kill() {
                tracing::error!(service = %service, "the fencing guard killed this copy (lease not renewed in time)");
                // Not removed here: the lease may still look valid for a
                // twentieth of its TTL, and a leader missing its copy then
                // would restore one that another host may also restore.
                if let Ok(mut led) = self.led.lock() {
                    if let Some(l) = led.get_mut(&service) {
                        l.killed = true;
                    }
                }
            }
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            tracing::error!(pid = g.pid, "the fencing guard is gone: starting another");
            let Some(lease) = self.lease() else {
                std::thread::sleep(POLL);
                continue;
            };
            match spawn_guard(&self.config.ferry, &lease) {
                Ok(new) => {
                    let new = Arc::new(new);
                    if let Ok(mut slot) = self.guard.lock() {
                        *slot = Some(Arc::clone(&new));
                    }
                    let copies: Vec<(String, HostCopy)> = self
                        .led
                        .lock()
                        .map(|l| l.iter().map(|(s, l)| (s.clone(), l.copy.clone())).collect())
                        .unwrap_or_default();
                    for (service, copy) in copies {
                        if let Some(pid) = copy.init_pid() {
                            let _ = new.watch(&service, pid, copy.killable_cgroup().as_deref());
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a fencing guard");
                    std::thread::sleep(POLL);
                }
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn cluster(&self) -> &str {
        &self.config.cluster
    }

    /// The lease as this host knows it, if it has one.
    fn lease(&self) -> Option<Lease> {
        self.lease.lock().ok().and_then(|l| *l)
    }

    /// The lease id while the lease is valid by this host's reckoning.
    pub(crate) fn lease_id(&self) -> Option<i64> {
        let lease = self.lease()?;
        (BootInstant::now() < lease.deadline()).then_some(lease.id)
    }

    /// Whether the lease has time left for an action of `need`.
    pub(crate) fn lease_valid_for(&self, need: Duration) -> bool {
        self.lease()
            .is_some_and(|l| BootInstant::now() + need < l.deadline())
    }

    /// Whether a renewal of the lease is overdue (etcd away or out of
    /// reach); false without a lease (there is nothing to renew).
    pub(crate) fn renewal_overdue(&self) -> bool {
        self.lease()
            .is_some_and(|l| l.renewed.elapsed() > l.ttl / 4 + RENEWAL_MARGIN)
    }

    /// Whether fencing leaves the led services alone (does not pause them)
    /// for `need` from now, on the renewals confirmed so far.
    pub fn unfenced_for(&self, need: Duration) -> bool {
        self.lease()
            .is_some_and(|l| BootInstant::now() + need < l.pause_at())
    }

    /// Marks `service`'s copy as being dumped, if it is led here and runs
    /// (None while fencing holds it paused, or once fencing deleted it).
    /// Until the mark is dropped fencing does not pause the copy: CRIU
    /// holds it stopped meanwhile, and a pause under CRIU ends up in the
    /// images (CRIU restores a stopped task stopped: a copy restored from
    /// them would never answer) or, for a container, puts the cgroup
    /// freezer between CRIU and the engine. A lease that runs out still
    /// deletes the copy, dump or not.
    pub fn dumping(&self, service: &str) -> Option<Dumping<'_>> {
        let mut led = self.led.lock().ok()?;
        let l = led.get_mut(service).filter(|l| !l.paused)?;
        l.dumping = true;
        Some(Dumping {
            member: self,
            service: service.to_string(),
        })
    }

    /// The directory of one service's HA files.
    pub(crate) fn service_dir(&self, service: &str) -> PathBuf {
        self.store.join("ha").join(service)
    }

    /// Starts the lease keeper and the role loop; returns their handles.
    pub fn start(self: &Arc<Member>) -> Vec<std::thread::JoinHandle<()>> {
        let keeper = Arc::clone(self);
        let looper = Arc::clone(self);
        let fencer = Arc::clone(self);
        let guarded = Arc::clone(self);
        vec![
            std::thread::Builder::new()
                .name("ferry-ha-guard".into())
                .spawn(move || guarded.watch_guard())
                .expect("spawn the guard watcher"),
            // Fencing on a clock of its own: an etcd call stuck on a cut
            // link must never delay it.
            std::thread::Builder::new()
                .name("ferry-ha-fence".into())
                .spawn(move || {
                    while !fencer.stop.load(Ordering::Relaxed) {
                        fencer.fence();
                        std::thread::sleep(FENCE_POLL);
                    }
                })
                .expect("spawn the fencing thread"),
            std::thread::Builder::new()
                .name("ferry-ha-lease".into())
                .spawn(move || keeper.keep_lease())
                .expect("spawn the lease thread"),
            std::thread::Builder::new()
                .name("ferry-ha-roles".into())
                .spawn(move || looper.play_roles())
                .expect("spawn the HA thread"),
        ]
    }

    /// Stops the member: services led here are stopped (their standbys
    /// take over), then the lease is revoked so that happens at once.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let led: Vec<(String, Led)> = self
            .led
            .lock()
            .map(|mut l| l.drain().collect())
            .unwrap_or_default();
        for (svc, l) in led {
            tracing::info!(service = %svc, "agent stopping: stopping the service it leads");
            l.copy.delete();
            if let Some(g) = self.guard() {
                let _ = g.release(&svc);
            }
        }
        // Ends the guard, and the thread that follows it.
        if let Some(g) = self.guard() {
            g.close();
        }
        if let Some(id) = self.lease().map(|l| l.id) {
            if let Err(e) = self.etcd.revoke(id) {
                tracing::warn!(error = %e, "cannot revoke the lease; it expires by itself");
            }
        }
    }

    /// Renews the lease every quarter TTL (fencing acts on what it finds).
    fn keep_lease(self: &Arc<Self>) {
        let mut failing = false;
        while !self.stop.load(Ordering::Relaxed) {
            let Some(lease) = self.lease() else {
                self.regain_lease();
                std::thread::sleep(POLL);
                continue;
            };
            let sent = BootInstant::now();
            // (alive, vouched): a renewal counts only once vouched for.
            let renewed = self
                .etcd
                .keep_alive(lease.id, lease.ttl / 2)
                .and_then(|alive| Ok((alive, alive && self.vouch(&lease)?)));
            match renewed {
                Ok((true, false)) => {
                    crate::metrics::get().lease_renewal_failures.inc();
                    if !failing {
                        tracing::warn!(lease = lease.id, "lease renewed, but the vouch could not be written: the renewal does not count");
                        failing = true;
                    }
                }
                Ok((true, true)) => {
                    let took = BootInstant::now()
                        .as_nanos()
                        .saturating_sub(sent.as_nanos());
                    crate::metrics::get()
                        .lease_renewal_seconds
                        .observe(took as f64 / 1e9);
                    if failing {
                        tracing::info!(lease = lease.id, "lease renewals get through again");
                        failing = false;
                    }
                    let renewed = Lease {
                        renewed: sent,
                        ..lease
                    };
                    if let Ok(mut l) = self.lease.lock() {
                        *l = Some(renewed);
                    }
                    self.arm_guard(&renewed);
                }
                Ok((false, _)) => {
                    crate::metrics::get().lease_renewal_failures.inc();
                    tracing::warn!(lease = lease.id, "the lease expired");
                    if let Ok(mut l) = self.lease.lock() {
                        *l = None;
                    }
                }
                Err(e) => {
                    crate::metrics::get().lease_renewal_failures.inc();
                    if !failing {
                        tracing::warn!(lease = lease.id, error = %e, "lease renewal failed");
                        failing = true;
                    }
                }
            }
            let next = sent + lease.ttl / 4;
            let now = BootInstant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }
    }

    /// Writes this host's vouch under the renewed `lease`, guarded by the
    /// token of every service led here; only then does the renewal count
    /// (the deadline of the copies moves on). A service whose key no
    /// longer has its token (a standby unseated this host, or a handover
    /// moved it) is deleted here at once, and the vouch written for the
    /// others. Returns whether the vouch was written.
    fn vouch(self: &Arc<Self>, lease: &Lease) -> Result<bool, HaError> {
        let key = keys::vouch_key(self.cluster(), self.name());
        let value = keys::to_json(&keys::VouchRecord {
            ttl_ms: lease.ttl.as_millis() as u64,
        });
        let held = |m: &Member| -> Vec<(String, String, i64)> {
            m.led
                .lock()
                .map(|l| {
                    l.iter()
                        .filter(|(_, l)| !l.deleting)
                        .map(|(s, l)| {
                            (
                                s.clone(),
                                keys::service_key(m.cluster(), s, "leader"),
                                l.token,
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let timeout = lease.ttl / 4;
        for _ in 0..2 {
            let services = held(self);
            let guards: Vec<(String, i64)> =
                services.iter().map(|(_, k, t)| (k.clone(), *t)).collect();
            if self
                .etcd
                .vouch(&key, value.clone(), lease.id, &guards, timeout)?
            {
                return Ok(true);
            }
            for (svc, leader_key, token) in services {
                if self.etcd.mod_revision(&leader_key)? != token {
                    self.lost_leadership(&svc, token);
                }
            }
        }
        Ok(false)
    }

    /// `service`'s leader key no longer has `token`: its copy here must not
    /// run on. It is deleted on a thread of its own (renewals go on); the
    /// guard holds it until then.
    fn lost_leadership(self: &Arc<Self>, service: &str, token: i64) {
        let copy = self.led.lock().ok().and_then(|mut led| {
            let l = led
                .get_mut(service)
                .filter(|l| l.token == token && !l.deleting)?;
            l.deleting = true;
            // A moving copy was handed over (or the move fails on the
            // token): the move's own code ends it.
            (!l.moving).then(|| l.copy.clone())
        });
        let Some(copy) = copy else { return };
        tracing::error!(
            service,
            token,
            "the leader key no longer has this host's token: deleting this copy"
        );
        let member = Arc::clone(self);
        let svc = service.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("ferry-fence-{svc}"))
            .spawn(move || member.fence_one(&svc, &copy, FenceAction::Delete));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a fencing thread");
        }
    }

    fn regain_lease(&self) {
        let sent = BootInstant::now();
        let want = self.config.lease_ttl.as_secs().max(1) as i64;
        match self.etcd.grant(want) {
            Ok((id, ttl)) => {
                tracing::info!(lease = id, "took a new lease");
                let lease = Lease {
                    id,
                    ttl: Duration::from_secs(ttl.max(1) as u64),
                    renewed: sent,
                };
                if let Ok(mut l) = self.lease.lock() {
                    *l = Some(lease);
                }
                self.arm_guard(&lease);
            }
            Err(e) => tracing::warn!(error = %e, "cannot take a new lease"),
        }
    }

    /// Pauses, deletes or thaws the led services by the lease's state: at
    /// 3/4 of the TTL without renewal they are paused (a copy CRIU is
    /// dumping, once the dump ends; a moving one never), at the deadline
    /// deleted, and thawed when a renewal gets through in time. Each action
    /// runs on a thread of its own, with the engine's command bounded in
    /// time: no copy's fencing waits on another's, and none holds the led
    /// map while an engine answers. (The guard kills every copy at the
    /// deadline whatever the engines do.)
    fn fence(self: &Arc<Self>) {
        let lease = self.lease();
        let now = BootInstant::now();
        let (doubt, lost) = match lease {
            Some(l) => (now >= l.pause_at(), now >= l.deadline()),
            None => (true, true),
        };
        let mut actions = Vec::new();
        if let Ok(mut led) = self.led.lock() {
            for (svc, l) in led.iter_mut() {
                let action = if lost {
                    (!l.deleting).then(|| {
                        l.deleting = true;
                        FenceAction::Delete
                    })
                } else if l.busy || l.deleting || l.killed {
                    None
                } else if doubt && !l.paused && !l.dumping && !l.moving {
                    Some(FenceAction::Pause)
                } else if !doubt && l.paused {
                    Some(FenceAction::Resume)
                } else {
                    None
                };
                if let Some(a) = action {
                    l.busy |= a != FenceAction::Delete;
                    actions.push((svc.clone(), l.copy.clone(), a));
                }
            }
        }
        for (svc, copy, action) in actions {
            let member = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-fence-{svc}"))
                .spawn(move || member.fence_one(&svc, &copy, action));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a fencing thread");
            }
        }
    }

    fn fence_one(&self, svc: &str, copy: &HostCopy, action: FenceAction) {
        let done = match action {
            FenceAction::Delete => {
                tracing::error!(service = %svc, "lease lost: deleting this copy of the service (fencing)");
                copy.delete();
                self.unlead(svc);
                return;
            }
            FenceAction::Pause => {
                tracing::warn!(service = %svc, "lease not renewed for 3/4 of its TTL: pausing the service (fencing)");
                copy.pause()
            }
            FenceAction::Resume => {
                tracing::info!(service = %svc, "lease renewed: resuming the service");
                copy.resume()
            }
        };
        if let Err(e) = &done {
            tracing::error!(service = %svc, action = ?action, error = %ferry_image::units::chain(e), "fencing action failed");
        }
        if let Ok(mut led) = self.led.lock() {
            if let Some(l) = led.get_mut(svc).filter(|l| l.copy == *copy) {
                l.busy = false;
                if done.is_ok() {
                    l.paused = action == FenceAction::Pause;
                }
            }
        }
    }

    /// Reads the whole cluster.
    pub fn view(&self) -> Result<ClusterView, HaError> {
        self.view_within(super::etcd::CALL_TIMEOUT)
    }

    /// [`Member::view`], waiting at most `timeout`.
    fn view_within(&self, timeout: Duration) -> Result<ClusterView, HaError> {
        let (entries, revision) = self
            .etcd
            .get_prefix_within(&keys::cluster_prefix(self.cluster()), timeout)?;
        Ok(ClusterView::parse(
            self.cluster(),
            &entries,
            revision,
            keys::Seals::Verify(&self.secret),
        ))
    }

    /// How long the role loop waits for its read of the cluster: a leader
    /// no longer than a quarter TTL, so that it notices an overdue renewal
    /// in time to checkpoint before fencing (a read that times out only
    /// means a round on the last view).
    fn view_timeout(&self, leading: bool) -> Duration {
        match self.lease().map(|l| l.ttl) {
            Some(ttl) if leading => (ttl / 4).min(super::etcd::CALL_TIMEOUT),
            _ => super::etcd::CALL_TIMEOUT,
        }
    }

    fn heartbeat(&self, lease: i64) -> Result<(), HaError> {
        let (mem, disk) = health(&self.store);
        let record = HostRecord {
            name: self.name().to_string(),
            agent: self.agent_addr.clone(),
            ip: self.config.ip.to_string(),
            boot_id: self.boot_id.clone(),
            lease,
            mem_available_bytes: mem,
            disk_free_bytes: disk,
            gpu: gpu_summary(),
            heartbeat_unix_ms: keys::now_unix_ms(),
        };
        self.etcd.put(
            &keys::host_key(self.cluster(), self.name()),
            keys::to_json(&record),
            lease,
        )
    }

    fn play_roles(self: Arc<Member>) {
        let mut runs: HashMap<String, ServiceRun> = HashMap::new();
        let mut last_beat: Option<(Instant, i64)> = None;
        let mut last_view: Option<ClusterView> = None;
        // Refused records already logged: (service, leaf, revision).
        let mut refused_logged: std::collections::HashSet<(String, String, i64)> =
            Default::default();
        while !self.stop.load(Ordering::Relaxed) {
            let tick = Instant::now();
            // Only a service stepped in this round says when it is due.
            for r in runs.values_mut() {
                r.due = None;
            }
            // While a renewal is overdue etcd is taken to be away: no call
            // to it holds up the leaders (each would wait its timeout).
            let away = self.renewal_overdue();
            if let Some(lease) = self.lease_id().filter(|_| !away) {
                let due = last_beat.is_none_or(|(t, id)| id != lease || t.elapsed() >= HEARTBEAT);
                if due {
                    match self.heartbeat(lease) {
                        Ok(()) => last_beat = Some((Instant::now(), lease)),
                        Err(e) => tracing::debug!(error = %e, "heartbeat not written"),
                    }
                }
            }
            let view = if away {
                None
            } else {
                let t_view = Instant::now();
                let leading = runs.values().any(ServiceRun::is_leading);
                let read = self.view_within(self.view_timeout(leading));
                if t_view.elapsed() > SLOW_POLL {
                    tracing::info!(
                        ms = t_view.elapsed().as_millis() as u64,
                        ok = read.is_ok(),
                        "slow read of the cluster state"
                    );
                }
                read.map_err(|e| tracing::debug!(error = %e, "cannot read the cluster"))
                    .ok()
            };
            match view {
                Some(view) => {
                    for (name, sv) in &view.services {
                        for (leaf, revision, why) in &sv.refused {
                            if refused_logged.insert((name.clone(), leaf.clone(), *revision)) {
                                tracing::error!(
                                    service = %name,
                                    record = %leaf,
                                    revision,
                                    "refused an HA record from etcd: {why}; nothing of it is run"
                                );
                            }
                        }
                        if sv.spec.is_none() {
                            continue;
                        }
                        let run = runs
                            .entry(name.clone())
                            .or_insert_with(|| ServiceRun::new(name));
                        run.step(&self, &view, sv);
                    }
                    // Removed (`ha rm`): the spec was last seen stopped (a
                    // sealed stop comes first) and is gone now. A spec that
                    // vanishes without a stop (a read that came back short,
                    // a forged delete) or whose seal is refused removes
                    // nothing: the checkpoints held stay.
                    let last_stopped = |n: &String| {
                        last_view
                            .as_ref()
                            .and_then(|v| v.services.get(n))
                            .and_then(|s| s.spec.as_ref())
                            .is_some_and(|s| s.stopped)
                    };
                    let gone: Vec<String> = runs
                        .keys()
                        .filter(|n| last_stopped(n))
                        .filter(|n| {
                            view.services.get(*n).is_none_or(|sv| {
                                sv.spec.is_none()
                                    && !sv.refused.iter().any(|(leaf, ..)| leaf == "spec")
                            })
                        })
                        .cloned()
                        .collect();
                    for name in gone {
                        if let Some(run) = runs.remove(&name) {
                            let last = last_view
                                .as_ref()
                                .and_then(|v| v.services.get(&name))
                                .and_then(|s| s.spec.as_ref());
                            run.retire(&self, last);
                        }
                    }
                    last_view = Some(view);
                }
                None => {
                    // While etcd is away nobody's role can change, and a
                    // leader whose lease is valid by its own reckoning
                    // goes on checkpointing on the last view it read (its
                    // standbys admit those checkpoints once etcd answers
                    // again); every other role waits for etcd.
                    if let Some(view) = &last_view {
                        for (name, sv) in &view.services {
                            if let Some(run) = runs.get_mut(name).filter(|r| r.is_leading()) {
                                run.step(&self, view, sv);
                            }
                        }
                    }
                }
            }
            // Sooner when a silent leader is due to be unseated.
            let now = BootInstant::now();
            let until_due = runs
                .values()
                .filter_map(|r| r.due)
                .map(|d| if d > now { d - now } else { Duration::ZERO })
                .min();
            let spent = tick.elapsed();
            let wait = POLL.saturating_sub(spent);
            let wait = until_due.map_or(wait, |d| wait.min(d));
            if !wait.is_zero() {
                self.nudge.wait(wait);
            }
        }
    }
}

/// Starts a fencing guard armed with `lease`'s deadline.
fn spawn_guard(ferry: &std::path::Path, lease: &Lease) -> std::io::Result<GuardLink> {
    let guard = GuardLink::spawn(ferry)?;
    guard.deadline(lease.guard_at())?;
    Ok(guard)
}

/// Available memory and free disk under `store`.
fn health(store: &std::path::Path) -> (u64, u64) {
    let mem = ferry_sys::host::mem_available().unwrap_or(0);
    let disk = ferry_core::checkpoint::staging::available(store).unwrap_or(0);
    (mem, disk)
}

/// One line about this host's GPUs, computed once.
fn gpu_summary() -> String {
    static SUMMARY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SUMMARY
        .get_or_init(|| match ferry_core::gpu::probe::probe() {
            ferry_core::gpu::probe::GpuProbe::Available(inv) => {
                let names: Vec<&str> = inv.devices.iter().map(|d| d.name.as_str()).collect();
                format!("{} GPU(s): {}", names.len(), names.join(", "))
            }
            ferry_core::gpu::probe::GpuProbe::Unavailable { reason } => format!("none ({reason})"),
        })
        .clone()
}
