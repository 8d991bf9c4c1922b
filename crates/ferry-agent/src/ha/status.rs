//! What `ferry ha run | status | move` do with etcd, and how the cluster's
//! state is shown.

use std::io::{self, Write};

use super::etcd::Etcd;
pub use super::keys::Seals;
use super::keys::{self, ClusterView, MoveRequest, ServiceSpec};
use super::HaError;
use ferry_transport::Secret;

/// How long a command line's read keeps trying a slow or restarting etcd
/// (each try times out as the agents' calls do).
const READ_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads cluster `cluster`, retrying a failed read for up to 5 s; its
/// sealed records checked as `seals` says.
pub fn read(etcd: &Etcd, cluster: &str, seals: Seals) -> Result<ClusterView, HaError> {
    super::valid_name(cluster)?;
    let deadline = std::time::Instant::now() + READ_PATIENCE;
    loop {
        match etcd.get_prefix(&keys::cluster_prefix(cluster)) {
            Ok((entries, revision)) => {
                return Ok(ClusterView::parse(cluster, &entries, revision, seals))
            }
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// Declares (or redeclares) a service, its spec sealed with the cluster
/// key.
pub fn declare(
    etcd: &Etcd,
    cluster: &str,
    spec: &ServiceSpec,
    secret: &Secret,
) -> Result<(), HaError> {
    super::valid_name(cluster)?;
    super::valid_name(&spec.name)?;
    for h in &spec.hosts {
        super::valid_name(h)?;
    }
    etcd.put(
        &keys::service_key(cluster, &spec.name, "spec"),
        keys::seal(secret, cluster, &spec.name, "spec", spec),
        0,
    )
}

/// `ferry ha stop` / `start`: the service's spec sealed again with
/// `stopped` set or cleared. Returns the spec as it now is.
pub fn set_stopped(
    etcd: &Etcd,
    cluster: &str,
    service: &str,
    stopped: bool,
    secret: &Secret,
) -> Result<ServiceSpec, HaError> {
    let view = read(etcd, cluster, Seals::Verify(secret))?;
    let spec = view
        .services
        .get(service)
        .and_then(|s| s.spec.clone())
        .ok_or_else(|| HaError::NoService {
            service: service.into(),
            cluster: cluster.into(),
        })?;
    let spec = ServiceSpec { stopped, ..spec };
    declare(etcd, cluster, &spec, secret)?;
    Ok(spec)
}

/// The host leading `service`, if any copy of it runs.
pub fn leader_of(etcd: &Etcd, cluster: &str, service: &str) -> Result<Option<String>, HaError> {
    let view = read(etcd, cluster, Seals::Unchecked)?;
    Ok(view
        .services
        .get(service)
        .and_then(|s| s.leader.as_ref())
        .map(|l| l.host.clone()))
}

/// `ferry ha rm`: every key of `service` deleted (its agents then drop what
/// they hold of it). Stop it first, so that no copy is left running.
pub fn remove(etcd: &Etcd, cluster: &str, service: &str) -> Result<(), HaError> {
    super::valid_name(cluster)?;
    super::valid_name(service)?;
    etcd.delete_prefix(&keys::service_key(cluster, service, ""))
}

/// Asks the leader of `service` to move it live to `to` (the request
/// sealed with the cluster key).
pub fn request_move(
    etcd: &Etcd,
    cluster: &str,
    service: &str,
    to: &str,
    secret: &Secret,
) -> Result<(), HaError> {
    let view = read(etcd, cluster, Seals::Verify(secret))?;
    if view.services.get(service).is_none_or(|s| s.spec.is_none()) {
        return Err(HaError::NoService {
            service: service.into(),
            cluster: cluster.into(),
        });
    }
    let token = view
        .services
        .get(service)
        .filter(|s| s.leader.is_some())
        .map(|s| s.token);
    if !view.hosts.contains_key(to) {
        return Err(HaError::NoHost {
            host: to.into(),
            cluster: cluster.into(),
        });
    }
    etcd.put(
        &keys::service_key(cluster, service, "move"),
        keys::seal(
            secret,
            cluster,
            service,
            "move",
            &MoveRequest {
                to: to.into(),
                token,
            },
        ),
        0,
    )
}

fn age(now_ms: u64, then_ms: u64) -> String {
    format!("{:.1} s ago", now_ms.saturating_sub(then_ms) as f64 / 1e3)
}

/// The cluster for people.
pub fn render(cluster: &str, view: &ClusterView, out: &mut dyn Write) -> io::Result<()> {
    let now = keys::now_unix_ms();
    writeln!(out, "cluster {cluster} (etcd revision {})", view.revision)?;
    writeln!(out, "hosts ({} live):", view.hosts.len())?;
    for (name, h) in &view.hosts {
        writeln!(
            out,
            "  {name:<12} agent {:<21} mem free {:>10}  disk free {:>10}  gpu {}  heartbeat {}",
            h.agent,
            ferry_image::units::bytes(h.mem_available_bytes),
            ferry_image::units::bytes(h.disk_free_bytes),
            h.gpu,
            age(now, h.heartbeat_unix_ms)
        )?;
    }
    for (name, s) in &view.services {
        writeln!(out, "service {name}:")?;
        if let Some(spec) = &s.spec {
            writeln!(
                out,
                "  {}, port {}, checkpoint every {} ms, {} standby(s), hosts {}",
                spec.app,
                spec.port,
                spec.interval_ms,
                spec.standbys,
                if spec.hosts.is_empty() {
                    "all".into()
                } else {
                    spec.hosts.join(",")
                }
            )?;
        }
        match &s.leader {
            Some(l) => writeln!(
                out,
                "  leader {} (fencing token {}), since {}",
                l.host,
                s.token,
                age(now, l.since_unix_ms)
            )?,
            None if s.spec.as_ref().is_some_and(|s| s.stopped) => {
                writeln!(out, "  STOPPED (ferry ha start resumes it): no copy runs")?
            }
            None => writeln!(out, "  leader: none (election pending)")?,
        }
        match &s.address {
            Some(a) => writeln!(
                out,
                "  address {} on {} (token {}; {})",
                a.addr,
                a.host,
                a.token,
                if a.restored_generation > 0 {
                    format!(
                        "restored from generation {} in {:.0} ms",
                        a.restored_generation, a.takeover_ms
                    )
                } else {
                    "started or moved, not restored".into()
                }
            )?,
            None => writeln!(out, "  address: none")?,
        }
        if let Some(c) = &s.checkpoint {
            writeln!(
                out,
                "  newest checkpoint: generation {} by {} {} (frozen {:.1} ms, archive {})",
                c.generation,
                c.leader,
                age(now, c.taken_unix_ms),
                c.frozen_ms,
                ferry_image::units::bytes(c.archive_bytes)
            )?;
            if let (Some(p), Some(spec)) = (&c.schedule, &s.spec) {
                let plan = match (p.lag_ms, p.holds) {
                    (None, _) => "no replication lag measured yet".to_string(),
                    (Some(l), true) => format!(
                        "planned for a replication lag of {l} ms: lost work stays within the {} ms interval",
                        spec.interval_ms
                    ),
                    (Some(l), false) => format!(
                        "replication lag {l} ms, too long for the {} ms interval: lost work may exceed it",
                        spec.interval_ms
                    ),
                };
                writeln!(
                    out,
                    "  schedule: a checkpoint every {} ms, {plan}",
                    p.period_ms
                )?;
            }
        }
        if s.standbys.is_empty() {
            writeln!(out, "  standbys: none holds a checkpoint")?;
        }
        for (h, r) in &s.standbys {
            writeln!(
                out,
                "  standby {h:<12} generation {} (token {}), taken {}, verified {}",
                r.checkpoint.generation,
                r.checkpoint.token,
                age(now, r.checkpoint.taken_unix_ms),
                age(now, r.verified_unix_ms)
            )?;
        }
        if let Some(m) = &s.move_to {
            writeln!(out, "  move to {} requested", m.to)?;
        }
        for (leaf, revision, why) in &s.refused {
            writeln!(
                out,
                "  REFUSED {leaf} (etcd revision {revision}): {why}; agents ignore it"
            )?;
        }
    }
    Ok(())
}
