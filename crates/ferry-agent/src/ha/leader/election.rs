//! Taking a leaderless service over: who campaigns, and becoming its
//! leader (the fencing token, the chain to restore from, the first run).

use std::time::{Duration, Instant};

use super::super::copy::HostCopy;
use super::super::etcd::delete_op;
use super::super::keys::{
    self, AddressRecord, ClusterView, LeaderRecord, ServiceSpec, ServiceView,
};
use super::super::member::Member;
use super::super::replica::{self, Holding};
use super::super::replicator::Replicator;
use super::*;

impl ServiceRun {
    /// Campaigns when this host holds the newest verified checkpoint among
    /// the live eligible hosts (ties: the first name), or after a grace
    /// period in any case. A host where a move's migration committed the
    /// copy before its leader went (`adopt`) campaigns at once and keeps
    /// that copy; while a move names another live host, this one waits the
    /// grace period, so that host can.
    pub(super) fn maybe_campaign(
        &mut self,
        m: &Member,
        view: &ClusterView,
        sv: &ServiceView,
        spec: &ServiceSpec,
        adopt: bool,
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
        let moving_elsewhere = sv
            .move_to
            .as_ref()
            .is_some_and(|mv| mv.to != m.name() && view.hosts.contains_key(&mv.to));
        let first_choice =
            adopt || (!moving_elsewhere && best.map(String::as_str) == Some(m.name()));
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
                tracing::info!(service = %self.name, token, held, adopt, "elected leader");
                if adopt {
                    tracing::warn!(service = %self.name, "the leader that moved the service here went before handing over: keeping the moved copy");
                }
                self.become_leader(m, sv, spec, token, since, adopt);
            }
            Ok(None) => tracing::info!(service = %self.name, "another host was elected first"),
            Err(e) => tracing::warn!(service = %self.name, error = %e, "campaign failed"),
        }
    }

    /// Starts leading: adopts the running container, or restores the
    /// newest checkpoint held here, or starts the service fresh when the
    /// cluster never checkpointed it.
    pub(super) fn become_leader(
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
                .map_err(|e| ferry_image::units::chain(&e)),
                None => {
                    if sv.checkpoint.is_some() {
                        tracing::error!(service = %self.name, "no checkpoint of the service survives on a live host: starting it fresh (its state is lost)");
                    }
                    copy.start(spec, &m.config.ferry)
                        .map(|pid| tracing::info!(service = %self.name, pid, "started the service"))
                        .map_err(|e| ferry_image::units::chain(&e))
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
        m.lead_copy(&self.name, copy.clone(), token);
        let from = match (running, restored.0) {
            (true, _) => "running",
            (false, 0) => "fresh",
            (false, _) => "checkpoint",
        };
        crate::metrics::get()
            .takeovers
            .get_or_create(&crate::metrics::TakeoverLabel {
                service: self.name.clone(),
                from,
            })
            .inc();
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
}
