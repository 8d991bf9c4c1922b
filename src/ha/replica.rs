//! Replication of a service's checkpoints from its leader to its standbys.
//!
//! The leader offers each new checkpoint ([`send`]); the standby
//! ([`serve_offer`]) refuses it unless its fencing token is the leader key's
//! current revision in etcd (a deposed leader cannot replicate),
//! says what it already holds of the chain, receives the missing archives
//! (each written under a temporary name, renamed when complete), verifies
//! the whole chain by unpacking it (every chunk's checksum) into a ready
//! directory, and only then makes it its newest checkpoint and publishes it
//! in etcd. A failover restores straight from the ready directory.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::keys::{self, CheckpointRecord, ClusterView, HostRecord, StandbyRecord};
use super::{HaError, Member};
use crate::archive::{self, Chain, NoProgress};
use crate::checkpoint::staging;
use crate::transport::msg::ArchiveFile;
use crate::transport::{Conn, Msg};

/// Archives travel in blobs of at most this size.
const PIECE: usize = 8 << 20;
/// Time to connect and authenticate to a standby.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a standby's answer (it verifies the chain first).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Prefix of the ready directories (swept like the agent's staging).
const READY_PREFIX: &str = "ferry-agent-";

/// A standby's newest verified checkpoint of one service.
pub struct Holding {
    pub checkpoint: CheckpointRecord,
    /// Archives of the chain, oldest (the full one) first.
    pub chain: Vec<(u64, PathBuf)>,
    /// The chain unpacked and verified: CRIU images ready to restore.
    pub ready: tempfile::TempDir,
}

fn archive_name(generation: u64) -> String {
    format!("gen-{generation:08}.fry")
}

/// Where the leader keeps its own archives of `service`.
pub fn leader_dir(member: &Member, service: &str) -> PathBuf {
    member.service_dir(service).join("leader")
}

/// A standby keeps each leader's chain apart (one directory per fencing
/// token): generations of two leaders may share numbers, and a late
/// transfer from a deposed leader must never overwrite the current chain.
fn standby_dir(member: &Member, service: &str, token: i64) -> PathBuf {
    member
        .service_dir(service)
        .join("standby")
        .join(format!("t{token}"))
}

/// The path of generation `g`'s archive in `dir`.
pub fn archive_path(dir: &Path, g: u64) -> PathBuf {
    dir.join(archive_name(g))
}

/// Leader side: offers `checkpoint` to `host` and sends what it lacks of
/// `chain` (generation, path; oldest first, ending with the checkpoint).
/// Returns the verification time the standby reported.
pub fn send(
    member: &Member,
    host: &HostRecord,
    service: &str,
    checkpoint: &CheckpointRecord,
    chain: &[(u64, PathBuf)],
) -> Result<f64, HaError> {
    let mut conn = Conn::connect(&host.agent, &member.secret, CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    conn.send_msg(&Msg::Offer {
        service: service.to_string(),
        checkpoint: checkpoint.clone(),
    })?;
    let have = match conn.recv_msg()? {
        Msg::Have {
            token,
            base,
            generation,
        } => (token == checkpoint.token && base == checkpoint.base).then_some(generation),
        other => return Err(unexpected("Have", &other)),
    };
    let send: Vec<&(u64, PathBuf)> = chain
        .iter()
        .filter(|(g, _)| have.is_none_or(|h| *g > h))
        .collect();
    let mut files = Vec::new();
    for (g, path) in &send {
        let size = fs::metadata(path)
            .map_err(|source| HaError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        files.push(ArchiveFile {
            generation: *g,
            size,
        });
    }
    conn.send_msg(&Msg::Archives { files })?;
    let mut buf = vec![0u8; PIECE];
    for (_, path) in send {
        let mut f = File::open(path).map_err(|source| HaError::Io {
            path: path.clone(),
            source,
        })?;
        loop {
            let n = f.read(&mut buf).map_err(|source| HaError::Io {
                path: path.clone(),
                source,
            })?;
            if n == 0 {
                break;
            }
            conn.send_blob(&buf[..n])?;
        }
    }
    match conn.recv_msg()? {
        Msg::Replicated {
            generation,
            verify_ms,
        } if generation == checkpoint.generation => Ok(verify_ms),
        other => Err(unexpected("Replicated", &other)),
    }
}

fn unexpected(want: &str, got: &Msg) -> HaError {
    HaError::Refused {
        why: format!(
            "expected {want}, got {}",
            serde_json::to_string(got).unwrap_or_default()
        ),
    }
}

/// Standby side: serves one `Offer` (already read) on `conn`.
pub fn serve_offer(
    member: &Member,
    conn: &mut Conn,
    service: &str,
    checkpoint: CheckpointRecord,
) -> Result<(), HaError> {
    match receive(member, conn, service, &checkpoint) {
        Ok(verify_ms) => {
            conn.send_msg(&Msg::Replicated {
                generation: checkpoint.generation,
                verify_ms,
            })?;
            Ok(())
        }
        Err(e) => {
            let message = crate::units::chain(&e);
            tracing::warn!(service, generation = checkpoint.generation, from = %checkpoint.leader, error = %message, "checkpoint refused");
            let _ = conn.send_msg(&Msg::Error { message });
            Err(e)
        }
    }
}

fn receive(
    member: &Member,
    conn: &mut Conn,
    service: &str,
    cp: &CheckpointRecord,
) -> Result<f64, HaError> {
    super::valid_name(service)?;
    // One transfer per service at a time.
    let _busy = Busy::claim(member, service)?;
    admit(member, service, cp)?;
    let (have_token, have_base, have_gen, mut chain) = match member.holdings.lock() {
        Ok(h) => match h.get(service) {
            Some(h) => (
                h.checkpoint.token,
                h.checkpoint.base,
                h.checkpoint.generation,
                h.chain.clone(),
            ),
            None => (0, 0, 0, Vec::new()),
        },
        Err(_) => (0, 0, 0, Vec::new()),
    };
    let continues = have_token == cp.token && have_base == cp.base;
    conn.send_msg(&Msg::Have {
        token: have_token,
        base: have_base,
        generation: have_gen,
    })?;
    let files = match conn.recv_msg()? {
        Msg::Archives { files } => files,
        other => return Err(unexpected("Archives", &other)),
    };
    // The files must extend what is held (or start the chain afresh) and
    // end with the offered generation.
    let first = files.first().map(|f| f.generation);
    let starts_ok = match first {
        Some(g) if continues => g == have_gen + 1 || g == cp.base,
        Some(g) => g == cp.base,
        None => false,
    };
    let consecutive = files
        .windows(2)
        .all(|w| w[1].generation == w[0].generation + 1);
    if !starts_ok || !consecutive || files.last().map(|f| f.generation) != Some(cp.generation) {
        return Err(HaError::Refused {
            why: format!(
                "archives {:?} do not extend the chain held (base {have_base}, generation {have_gen}) to generation {}",
                files.iter().map(|f| f.generation).collect::<Vec<_>>(),
                cp.generation
            ),
        });
    }
    let dir = standby_dir(member, service, cp.token);
    fs::create_dir_all(&dir).map_err(|source| HaError::Io {
        path: dir.clone(),
        source,
    })?;
    if first == Some(cp.base) {
        chain.clear();
    }
    let need: u64 = files.iter().map(|f| f.size).sum();
    let free = staging::available(&dir).unwrap_or(0);
    if free < need.saturating_mul(2) {
        return Err(HaError::Refused {
            why: format!(
                "no room: {} needed in {}, {} free",
                crate::units::bytes(need * 2),
                dir.display(),
                crate::units::bytes(free)
            ),
        });
    }
    for f in &files {
        let path = archive_path(&dir, f.generation);
        write_archive(conn, &dir, &path, f.size)?;
        chain.push((f.generation, path));
    }
    // Verify: open the chain and unpack it (every chunk is checked).
    let t = Instant::now();
    let head = &chain.last().expect("the chain holds the offered archive").1;
    let bad = |source| HaError::Archive {
        path: head.clone(),
        source,
    };
    let opened = Chain::open(head, None).map_err(bad)?;
    let size: u64 = opened.head().index().files.iter().map(|f| f.size).sum();
    let ready = staging::create(READY_PREFIX, size, None).map_err(|source| HaError::Io {
        path: staging::base_for(size, None),
        source,
    })?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    archive::unpack(&opened, ready.path(), threads, &NoProgress).map_err(bad)?;
    let verify_ms = t.elapsed().as_secs_f64() * 1e3;
    // The leader may have changed while the chain travelled: check again,
    // and never replace a newer holding with an older one.
    admit(member, service, cp)?;
    let keep: Vec<PathBuf> = chain.iter().map(|(_, p)| p.clone()).collect();
    let record = StandbyRecord {
        host: member.name().to_string(),
        checkpoint: cp.clone(),
        verified_unix_ms: keys::now_unix_ms(),
    };
    if let Ok(mut h) = member.holdings.lock() {
        if let Some(cur) = h.get(service) {
            let (have, offered) = (
                (cur.checkpoint.token, cur.checkpoint.generation),
                (cp.token, cp.generation),
            );
            if have > offered {
                return Err(HaError::Refused {
                    why: format!(
                        "a newer checkpoint {have:?} is held than the offered {offered:?}"
                    ),
                });
            }
        }
        h.insert(
            service.to_string(),
            Holding {
                checkpoint: cp.clone(),
                chain,
                ready,
            },
        );
    }
    remove_other_archives(&dir, &keep);
    publish(member, service, &record);
    tracing::info!(service, generation = cp.generation, token = cp.token, leader = %cp.leader, verify_ms, "checkpoint verified; newest held here");
    Ok(verify_ms)
}

/// Refuses a checkpoint whose leader is not the current one.
fn admit(member: &Member, service: &str, cp: &CheckpointRecord) -> Result<(), HaError> {
    let prefix = keys::service_key(member.cluster(), service, "");
    let (entries, rev) = member.etcd.get_prefix(&prefix)?;
    let view = ClusterView::parse(member.cluster(), &entries, rev);
    let sv = view.services.get(service);
    let Some(spec) = sv.and_then(|s| s.spec.as_ref()) else {
        return Err(HaError::NoService {
            service: service.to_string(),
            cluster: member.cluster().to_string(),
        });
    };
    if !spec.eligible(member.name()) {
        return Err(HaError::Refused {
            why: format!("host {} is not eligible for {service}", member.name()),
        });
    }
    let sv = sv.expect("checked above");
    let current = sv.leader.as_ref().map(|l| (l.host.as_str(), sv.token));
    if current != Some((cp.leader.as_str(), cp.token)) {
        return Err(HaError::Refused {
            why: format!(
                "stale leader: checkpoint from {} with token {}, but the leader is {}",
                cp.leader,
                cp.token,
                match current {
                    Some((h, t)) => format!("{h} with token {t}"),
                    None => "nobody".into(),
                }
            ),
        });
    }
    if let Ok(mut t) = member.tokens.lock() {
        let seen = t.entry(service.to_string()).or_insert(0);
        if cp.token < *seen {
            return Err(HaError::Refused {
                why: format!("token {} is older than {} seen before", cp.token, *seen),
            });
        }
        *seen = cp.token;
    }
    if member.led.lock().is_ok_and(|l| l.contains_key(service)) {
        return Err(HaError::Refused {
            why: format!("{} leads {service} itself", member.name()),
        });
    }
    Ok(())
}

/// Publishes this host's newest verified checkpoint of `service`.
pub fn publish(member: &Member, service: &str, record: &StandbyRecord) {
    let Some(lease) = member.lease_id() else {
        return;
    };
    if let Err(e) = member.etcd.put(
        &keys::standby_key(member.cluster(), service, member.name()),
        keys::to_json(record),
        lease,
    ) {
        tracing::warn!(service, error = %e, "cannot publish the verified checkpoint");
    }
}

fn write_archive(conn: &mut Conn, dir: &Path, path: &Path, size: u64) -> Result<(), HaError> {
    let io = |source| HaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".incoming-")
        .tempfile_in(dir)
        .map_err(io)?;
    let mut got = 0u64;
    while got < size {
        let blob = conn.recv_blob()?;
        got += blob.len() as u64;
        if got > size {
            return Err(HaError::Refused {
                why: format!(
                    "{} is longer than the {size} bytes announced",
                    path.display()
                ),
            });
        }
        tmp.write_all(&blob).map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Marks a service's transfer in progress on this standby.
struct Busy<'a> {
    member: &'a Member,
    service: String,
}

impl<'a> Busy<'a> {
    fn claim(member: &'a Member, service: &str) -> Result<Busy<'a>, HaError> {
        let mut set = member.receiving.lock().map_err(|_| HaError::Refused {
            why: "internal lock poisoned".into(),
        })?;
        if !set.insert(service.to_string()) {
            return Err(HaError::Refused {
                why: format!("another checkpoint of {service} is being received"),
            });
        }
        Ok(Busy {
            member,
            service: service.to_string(),
        })
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.member.receiving.lock() {
            set.remove(&self.service);
        }
    }
}

/// Removes the archives in `dir` outside `keep`, and the directories of
/// other leaders' chains beside it.
fn remove_other_archives(dir: &Path, keep: &[PathBuf]) {
    if let Some(parent) = dir.parent() {
        for e in fs::read_dir(parent).into_iter().flatten().flatten() {
            if e.path() != dir && e.file_name().to_string_lossy().starts_with('t') {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("gen-") && name.ends_with(".fry") && !keep.contains(&p) {
            let _ = fs::remove_file(&p);
        }
    }
}
