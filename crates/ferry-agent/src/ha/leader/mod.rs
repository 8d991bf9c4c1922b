//! One service's role on this host, played by the member's loop every
//! poll: lead it (run, publish, checkpoint, replicate, move), take it over
//! when it has no leader and this host holds the newest checkpoint, or
//! make sure no stale copy of it runs here.
//!
//! One file per part of the role: [`election`] (campaigning and becoming
//! the leader), [`lead`] (running, publishing, scheduling), [`restore`]
//! (a new leader's copy from the newest checkpoint), [`moves`] (planned
//! switchovers), [`take_checkpoint`] (one checkpoint, recorded and
//! replicated); this file holds the per-service state and the step the
//! member's loop calls.

mod election;
mod lead;
mod moves;
mod restore;
mod take_checkpoint;

use take_checkpoint::{adopt, checkpoint_and_replicate};

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_sys::clock::BootInstant;

use super::copy::HostCopy;
use super::etcd::delete_op;
use super::keys::{self, AddressRecord, CheckpointRecord, ClusterView, ServiceSpec, ServiceView};
use super::member::Member;
use super::replica::{self, Link};
use super::replicator::Replicator;

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
/// Slack past a silent leader's TTL before it is unseated.
const UNSEAT_MARGIN: Duration = Duration::from_millis(20);
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

pub(crate) struct ServiceRun {
    name: String,
    leading: Option<Leading>,
    leaderless_since: Option<Instant>,
    waiting_logged: bool,
    /// Another host leads: (its token, the revision of its host's newest
    /// vouch, when this host first learned of that vouch).
    silent: Option<(i64, i64, BootInstant)>,
    /// When [`ServiceRun::watch_leader`] next has something to do.
    pub(crate) due: Option<BootInstant>,
}

impl ServiceRun {
    pub fn new(name: &str) -> ServiceRun {
        ServiceRun {
            name: name.to_string(),
            leading: None,
            leaderless_since: None,
            waiting_logged: false,
            silent: None,
            due: None,
        }
    }

    /// Whether this host leads the service.
    pub(crate) fn is_leading(&self) -> bool {
        self.leading.is_some()
    }

    pub fn step(&mut self, m: &Arc<Member>, view: &ClusterView, sv: &ServiceView) {
        // Set again below only while another host leads.
        self.due = None;
        let Some(spec) = sv.spec.as_ref() else { return };
        if !spec.eligible(m.name()) {
            return;
        }
        let copy = HostCopy::of(m, spec);
        if spec.stopped {
            self.stopped(m, sv, &copy);
            return;
        }
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
                        tracing::warn!(service = %self.name, pid, error = %ferry_image::units::chain(&e), "cannot adopt the moved process tree");
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
                let move_here = sv.move_to.as_ref().filter(|mv| mv.to == m.name());
                // The leader that asked for the move still holds the key:
                // the copy its migration brings waits for the handover.
                let awaiting_handover = move_here.is_some_and(|mv| {
                    sv.leader.is_some() && mv.token.is_none_or(|t| t == sv.token)
                });
                // That leader is gone without handing over, after its
                // migration committed here: this copy is the newest state
                // of the service (the source froze before the commit, and
                // the leader's copies are past their guard's deadline).
                // Found through the journal: the move's commit here names
                // the service (runc and Docker restore running before the
                // commit, and an uncommitted copy is removed by its
                // session; a moved tree is not yet this host's copy).
                let orphaned_move = move_here.is_some()
                    && sv.leader.is_none()
                    && match crate::session::outcome::committed_for(&m.store, &self.name) {
                        Some(pid) if copy.init_pid() == Some(pid) => copy.runs(),
                        Some(pid) if matches!(copy, HostCopy::Process { .. }) && !copy.exists() => {
                            copy.adopt(pid).is_ok() && copy.runs()
                        }
                        _ => false,
                    };
                if !awaiting_handover
                    && !orphaned_move
                    && !m.led.lock().is_ok_and(|l| l.contains_key(&self.name))
                    && copy.exists()
                {
                    tracing::warn!(service = %self.name, "a copy runs here without leadership: deleting it");
                    copy.delete();
                }
                if sv.leader.is_none() {
                    self.silent = None;
                    self.due = None;
                    self.maybe_campaign(m, view, sv, spec, orphaned_move);
                } else {
                    self.keep_standby_record(m, sv);
                    self.due = self.watch_leader(m, view, sv);
                }
            }
        }
    }

    /// Unseats the leader if its host has vouched for nothing (see
    /// [`keys::VouchRecord`]) for its TTL since this host first learned of
    /// its newest vouch: every copy it leads is dead by then (the guard's
    /// deadline is 19/20 of the TTL after a renewal sent before that vouch
    /// was written), so the service is taken over at once rather than
    /// when etcd gets round to revoking the lease. The deletion is guarded
    /// by the leader's token and its vouch's revision: a vouch written
    /// meanwhile keeps it. Returns when to look again.
    fn watch_leader(
        &mut self,
        m: &Member,
        view: &ClusterView,
        sv: &ServiceView,
    ) -> Option<BootInstant> {
        let leader = sv.leader.as_ref()?;
        let Some((revision, vouch)) = view.vouches.get(&leader.host) else {
            // A host that does not vouch: etcd's expiry alone decides.
            self.silent = None;
            return None;
        };
        let now = BootInstant::now();
        let since = match self.silent {
            Some((token, r, since)) if token == sv.token && r == *revision => since,
            _ => {
                let at = m
                    .vouch_seen(&leader.host, *revision)
                    .filter(|at| *at <= now)
                    .unwrap_or(now);
                self.silent = Some((sv.token, *revision, at));
                at
            }
        };
        let due = since + Duration::from_millis(vouch.ttl_ms) + UNSEAT_MARGIN;
        if now < due {
            return Some(due);
        }
        self.silent = None;
        let leader_key = keys::service_key(m.cluster(), &self.name, "leader");
        let vouch_key = keys::vouch_key(m.cluster(), &leader.host);
        match m.etcd.unseat(&leader_key, sv.token, &vouch_key, *revision) {
            Ok(true) => tracing::warn!(
                service = %self.name,
                host = %leader.host,
                silent_ms = (now - since).as_millis() as u64,
                "the leader's host vouched for nothing for its lease's TTL: unseated it (its copies are past their guard's deadline)"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(service = %self.name, error = %e, "cannot unseat a silent leader")
            }
        }
        None
    }

    fn stop_leading(&mut self, m: &Member, copy: &HostCopy) {
        copy.delete();
        m.unlead(&self.name);
        self.leading = None;
    }

    /// `ferry ha stop`: no copy runs here, the leader key is given up, and
    /// nobody campaigns; the checkpoints held stay for `ferry ha start`.
    fn stopped(&mut self, m: &Member, sv: &ServiceView, copy: &HostCopy) {
        self.due = None;
        self.leaderless_since = None;
        if let Some(l) = self.leading.take() {
            tracing::info!(service = %self.name, "service stopped (ha stop): ending this copy and giving up the leadership");
            copy.delete();
            m.unlead(&self.name);
            let key = keys::service_key(m.cluster(), &self.name, "leader");
            let _ = m.etcd.fenced(&key, l.token, vec![delete_op(&key)]);
        } else if copy.exists() && !m.led.lock().is_ok_and(|l| l.contains_key(&self.name)) {
            copy.delete();
        }
        // A leader key left by a leader that died meanwhile goes with its
        // lease; one of this host's (an agent restarted) goes now.
        if sv.leader.as_ref().is_some_and(|l| l.host == m.name()) {
            let key = keys::service_key(m.cluster(), &self.name, "leader");
            let _ = m.etcd.fenced(&key, sv.token, vec![delete_op(&key)]);
        }
    }

    /// `ferry ha rm`: the service's keys are gone. What this host ran or
    /// held of it goes too.
    pub(crate) fn retire(mut self, m: &Member, last: Option<&ServiceSpec>) {
        if self.leading.take().is_some() {
            tracing::info!(service = %self.name, "service removed (ha rm): ending this copy");
            if let Some(spec) = last {
                HostCopy::of(m, spec).delete();
            }
            m.unlead(&self.name);
        }
        if let Ok(mut h) = m.holdings.lock() {
            h.remove(&self.name);
        }
        let dir = m.service_dir(&self.name);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(service = %self.name, dir = %dir.display(), error = %e, "cannot remove what was held of a removed service");
            }
        }
        tracing::info!(service = %self.name, "service removed (ha rm): its checkpoints here are deleted");
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
}

/// Whether the service accepts TCP connections at `addr`.
fn accepts(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>()
        .ok()
        .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(100)).ok())
        .is_some()
}
