//! A planned switchover (`ferry ha move`): live-migrate the running copy to
//! the chosen host, then hand it the leadership.

use std::time::Duration;

use super::super::copy::{self};
use super::super::etcd::{delete_op, put_op};
use super::super::keys::{self, AddressRecord, HostRecord, LeaderRecord, ServiceSpec};
use super::super::member::Member;
use super::*;

impl ServiceRun {
    /// Planned switchover: live-migrate the container to `to`, then hand
    /// the leader key over to that host's lease in one fenced transaction.
    pub(super) fn move_to(
        &mut self,
        m: &Member,
        spec: &ServiceSpec,
        to: &str,
        host: Option<&HostRecord>,
    ) {
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
            ferry_migrate::MigrateTarget::Process { pid } => Some(pid),
            _ => None,
        };
        tracing::info!(service = %self.name, to, "planned switchover: live migration");
        let opts = ferry_migrate::MigrateOptions {
            target,
            files: Default::default(),
            to: host.agent.clone(),
            secret: m.secret.clone(),
            max_downtime: Duration::from_millis(300),
            max_rounds: 8,
            streams: std::thread::available_parallelism().map_or(1, |n| n.get()),
            restore: ferry_transport::msg::RestoreOpts {
                ha_service: Some(self.name.clone()),
                ..Default::default()
            },
            hybrid: false,
            // A planned switchover keeps its route and goes on: the
            // service is fenced and moves whatever the frozen time.
            accept_downtime_miss: true,
            switch_route: false,
            ignore_gpu: false,
            staging: None,
            keep_images: None,
            io_timeout: Duration::from_secs(30),
            outcome_wait: ferry_migrate::outcome::OUTCOME_WAIT,
            criu_options: Default::default(),
            max_bandwidth: None,
            events: Default::default(),
            cancel: Default::default(),
        };
        // While it moves, fencing must not pause it (the migration freezes
        // it itself), but it stays fenced: a lease that runs out deletes
        // it, and the guard kills it, mid-migration or not.
        m.set_moving(&self.name, true);
        let token = l.token;
        // A failed migration leaves the service running here, so a few
        // tries are safe: one fails when, say, a client connection is open
        // at the freeze.
        let mut outcome = ferry_migrate::migrate(&m.criu, &opts);
        for attempt in 2..=MOVE_TRIES {
            let Err(e) = &outcome else { break };
            if !resumed_here(e) {
                break;
            }
            tracing::warn!(service = %self.name, to = %host.name, attempt, error = %ferry_image::units::chain(e), "move failed; the service runs here; trying again");
            std::thread::sleep(RETRY);
            outcome = ferry_migrate::migrate(&m.criu, &opts);
        }
        match outcome {
            Ok(report) => {
                let key = keys::service_key(m.cluster(), &self.name, "leader");
                // The tree's pid as the new host sees it.
                let record = LeaderRecord {
                    host: host.name.clone(),
                    since_unix_ms: keys::now_unix_ms(),
                    pid: moved_pid.map(|_| report.restored_pid),
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
                // The copy here is gone (the migration ended it).
                m.unlead(&self.name);
                self.leading = None;
            }
            Err(e) if resumed_here(&e) => {
                tracing::error!(service = %self.name, to = %host.name, error = %ferry_image::units::chain(&e), "move failed; the service keeps running here");
                m.set_moving(&self.name, false);
                let _ = m.etcd.delete(&move_key);
            }
            Err(ferry_migrate::MigrateError::Final {
                after: ferry_migrate::Fate::RestoredHere { pid },
                source,
            }) => {
                // One kernel: the source was gone, ferry restored it here
                // from the final dump; it is this host's copy again.
                tracing::error!(service = %self.name, to = %host.name, pid, error = %ferry_image::units::chain(&source), "move failed; the service was restored here and keeps running here");
                let copy = l.copy.clone();
                if let Err(e) = copy.adopt(pid) {
                    tracing::error!(service = %self.name, error = %e, "cannot record the restored copy");
                }
                m.unlead(&self.name);
                m.lead_copy(&self.name, copy, l.token);
                let _ = m.etcd.delete(&move_key);
            }
            Err(e) => {
                // Not resumed here: the destination's outcome is unknown
                // (it may run the service) or the copy here is gone. This
                // copy must not run again: it is deleted, the request
                // withdrawn (the destination then deletes whatever it
                // restored without the key) and the leadership given up,
                // so the service comes back from its newest checkpoint.
                tracing::error!(service = %self.name, to = %host.name, error = %ferry_image::units::chain(&e), "move failed and the service was not resumed here: deleting this copy and resigning");
                l.copy.delete();
                m.unlead(&self.name);
                let _ = m.etcd.delete(&move_key);
                // The destination's role loop sees the request gone (and
                // deletes what it restored) before anyone can be elected.
                std::thread::sleep(super::super::member::POLL * 5);
                let key = keys::service_key(m.cluster(), &self.name, "leader");
                let _ = m.etcd.fenced(&key, token, vec![delete_op(&key)]);
                self.leading = None;
            }
        }
    }
}

/// Whether a failed migration left the service running here.
fn resumed_here(e: &ferry_migrate::MigrateError) -> bool {
    !matches!(
        e,
        ferry_migrate::MigrateError::Final { after, .. }
            if *after != ferry_migrate::Fate::ResumedHere
    )
}
