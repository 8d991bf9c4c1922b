//! Leading a service: keeping its copy running, publishing its address,
//! scheduling its checkpoints, serving planned moves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::etcd::{delete_op, put_op};
use super::super::keys::{self, ClusterView, ScheduleRecord, ServiceSpec, ServiceView};
use super::super::member::Member;
use super::super::schedule;
use super::*;

impl ServiceRun {
    pub(super) fn lead(
        &mut self,
        m: &Arc<Member>,
        view: &ClusterView,
        sv: &ServiceView,
        spec: &ServiceSpec,
    ) {
        if matches!(spec.app, keys::App::Process { .. }) {
            crate::ha::copy::rotate_log(&crate::ha::copy::service_log(m.cluster(), &self.name));
        }
        let key = keys::service_key(m.cluster(), &self.name, "leader");
        let Some(l) = self.leading.as_mut() else {
            return;
        };
        let killed = m.killed_and_renewed(&self.name);
        if killed || m.led.lock().is_ok_and(|led| !led.contains_key(&self.name)) {
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
        let l_token = l.token;
        if (!l.address_published || sv.address.as_ref().map(|a| a.token) != Some(l.token))
            && !self.publish_address(m, Duration::ZERO)
        {
            return;
        }
        if let Some(mv) = &sv.move_to {
            if mv.token.is_some_and(|t| t != l_token) {
                // Asked of an earlier leader: carried out by this one,
                // under its own token (the destination keeps what the
                // migration brings only while the key has it).
                let request = keys::MoveRequest {
                    to: mv.to.clone(),
                    token: Some(l_token),
                };
                let key = keys::service_key(m.cluster(), &self.name, "move");
                let leader_key = keys::service_key(m.cluster(), &self.name, "leader");
                let sealed = keys::seal(&m.secret, m.cluster(), &self.name, "move", &request);
                let _ = m
                    .etcd
                    .fenced(&leader_key, l_token, vec![put_op(&key, sealed, 0)]);
                return;
            }
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
    pub(super) fn publish_address(&mut self, m: &Member, wait: Duration) -> bool {
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
}
