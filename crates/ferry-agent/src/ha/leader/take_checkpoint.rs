//! One checkpoint of a running service: dumped while fenced, packed into
//! the chain, recorded in etcd and sent to the standbys.

use std::sync::Arc;

use super::super::copy::{self};
use super::super::etcd::put_op;
use super::super::keys::{
    self, CheckpointRecord, ClusterView, HostRecord, ScheduleRecord, ServiceSpec,
};
use super::super::member::Member;
use super::super::replica::{self, Link};
use super::*;
use ferry_archive::{NoProgress, PackOptions};
use ferry_core::checkpoint;
use ferry_criu::NoHooks;

/// Takes one checkpoint while the service runs, records it (fenced) and
/// sends it to the standbys. Returns whether the checkpoint was taken.
pub(super) fn checkpoint_and_replicate(
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
            tracing::warn!(service, generation, error = %ferry_image::units::chain(&e), "nothing to checkpoint");
            return false;
        }
    };
    // Staged under the agent's prefix: a killed agent's leftovers are swept
    // when it starts again.
    let stage = match ferry_core::checkpoint::staging::create(replica::STAGING_PREFIX, 0, None) {
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
    // A container's files (writable layer, volumes) go into every replica.
    let scope = ferry_core::target::fs::FsScope::default();
    let dumped = checkpoint::dump_any(
        &m.criu,
        container.as_ref().map(|c| (c, &scope)),
        &req,
        &mut NoHooks,
    );
    drop(dumping);
    let d = match dumped.and_then(|dump| {
        checkpoint::pack_images(&req.images_dir, &path, &pack).map(|pack| (dump, pack))
    }) {
        Ok((dump, pack)) => checkpoint::ArchiveDump {
            dump,
            pack,
            files: None,
        },
        Err(e) => {
            crate::metrics::get()
                .checkpoint_failures
                .get_or_create(&crate::metrics::ServiceLabel {
                    service: service.to_string(),
                })
                .inc();
            // A retry comes soon: the log line is all that is kept (the
            // staging directory goes with `stage`).
            tracing::warn!(service, generation, error = %ferry_image::units::chain(&e), "checkpoint failed; the service keeps running; retrying soon");
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
    let label = crate::metrics::ServiceLabel {
        service: service.to_string(),
    };
    let metrics = crate::metrics::get();
    metrics.checkpoints.get_or_create(&label).inc();
    metrics
        .checkpoint_frozen_seconds
        .get_or_create(&label)
        .observe(frozen_ms / 1e3);
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
pub(super) fn adopt(chain: &[Link], dir: &std::path::Path) -> Vec<Link> {
    replica::link_into(chain, dir).unwrap_or_else(|e| {
        tracing::warn!(error = %ferry_image::units::chain(&e), "cannot keep the restored chain: the next checkpoint is a full one");
        Vec::new()
    })
}
