//! Replication of a service's checkpoints from its leader to its standbys.
//!
//! The leader offers each new checkpoint ([`send`]); the standby
//! ([`serve_offer`]) refuses it unless its fencing token is the leader key's
//! current revision in etcd (a deposed leader cannot replicate), says which
//! archives it holds (by id), receives the missing ones (each written under
//! a temporary name, renamed when complete), and verifies the chain by
//! bringing its ready directory (the CRIU images of its newest checkpoint,
//! restorable as they are) to the new checkpoint: only the pages that
//! changed are read, checked against their checksums and digests, and
//! written ([`archive::update`]); the first checkpoint is unpacked whole.
//! Only then is it the standby's newest checkpoint, published in etcd. A
//! failover restores straight from the ready directory.
//!
//! A chain outlives its leader: a new leader restored from a standby's
//! chain continues it (its first checkpoint is incremental on that chain's
//! newest archive), and the other standbys keep what they hold of it.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::keys::{self, CheckpointRecord, ClusterView, HostRecord, StandbyRecord};
use super::{HaError, Member};
use ferry_archive::{self as archive, Chain, NoProgress};
use ferry_core::checkpoint::staging;
use ferry_transport::msg::ArchiveFile;
use ferry_transport::{Conn, Msg};

/// Archives travel in blobs of at most this size.
const PIECE: usize = 8 << 20;
/// Time to connect and authenticate to a standby.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a standby's answer (it verifies the chain first).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a received checkpoint waits for etcd to check its token.
const ADMIT_WAIT: Duration = Duration::from_secs(5);
/// How often it asks meanwhile.
const ADMIT_RETRY: Duration = Duration::from_millis(50);
/// Prefix of the ready directories and of the leader's dump staging: the
/// agent's own, so that an agent restarted after being killed sweeps what
/// it left.
pub const STAGING_PREFIX: &str = ferry_core::checkpoint::staging::AGENT_PREFIX;

/// One archive of a checkpoint chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub generation: u64,
    /// The archive's id (hex).
    pub id: String,
    pub path: PathBuf,
}

/// A standby's newest verified checkpoint of one service.
pub struct Holding {
    pub checkpoint: CheckpointRecord,
    /// Archives of the chain, oldest (the full one) first.
    pub chain: Vec<Link>,
    /// The chain unpacked and verified: CRIU images ready to restore.
    pub ready: tempfile::TempDir,
}

fn archive_name(generation: u64) -> String {
    format!("gen-{generation:08}.fry")
}

/// Where the leader keeps its own archives of `service`.
pub(crate) fn leader_dir(member: &Member, service: &str) -> PathBuf {
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

/// Links (or copies) a chain's archives into `dir` under their usual
/// names; returns the chain as it lies there.
pub(crate) fn link_into(chain: &[Link], dir: &Path) -> Result<Vec<Link>, HaError> {
    let mut out = Vec::with_capacity(chain.len());
    for l in chain {
        let path = archive_path(dir, l.generation);
        if path != l.path {
            let _ = fs::remove_file(&path);
            fs::hard_link(&l.path, &path)
                .or_else(|_| fs::copy(&l.path, &path).map(drop))
                .map_err(|source| HaError::Io {
                    path: path.clone(),
                    source,
                })?;
        }
        out.push(Link { path, ..l.clone() });
    }
    Ok(out)
}

/// The path of generation `g`'s archive in `dir`.
pub fn archive_path(dir: &Path, g: u64) -> PathBuf {
    dir.join(archive_name(g))
}

/// What one replication sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sent {
    pub archives: usize,
    pub bytes: u64,
    /// The standby's verification time.
    pub verify_ms: f64,
}

/// Leader side: offers `checkpoint` to `host` and sends what it lacks of
/// `chain` (oldest first, ending with the checkpoint).
pub fn send(
    member: &Member,
    host: &HostRecord,
    service: &str,
    checkpoint: &CheckpointRecord,
    chain: &[Link],
) -> Result<Sent, HaError> {
    let mut conn = Conn::connect(&host.agent, &member.secret, CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    conn.send_msg(&Msg::Offer {
        service: service.to_string(),
        checkpoint: checkpoint.into(),
    })?;
    let held = match conn.recv_msg()? {
        Msg::Have { ids } => ids,
        other => return Err(unexpected("Have", &other)),
    };
    // The standby keeps the longest start of the chain it already holds.
    let keep = chain
        .iter()
        .zip(&held)
        .take_while(|(l, id)| l.id == **id)
        .count()
        .min(chain.len().saturating_sub(1));
    let send = &chain[keep..];
    let mut files = Vec::new();
    for l in send {
        let size = fs::metadata(&l.path)
            .map_err(|source| HaError::Io {
                path: l.path.clone(),
                source,
            })?
            .len();
        files.push(ArchiveFile {
            generation: l.generation,
            size,
            id: l.id.clone(),
        });
    }
    let sent = (files.len(), files.iter().map(|f| f.size).sum::<u64>());
    conn.send_msg(&Msg::Archives { keep, files })?;
    let mut buf = vec![0u8; PIECE];
    for l in send {
        let path = &l.path;
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
        } if generation == checkpoint.generation => Ok(Sent {
            archives: sent.0,
            bytes: sent.1,
            verify_ms,
        }),
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
pub(crate) fn serve_offer(
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
            let message = ferry_image::units::chain(&e);
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
    match admit(member, service, cp) {
        // etcd away: the checkpoint travels now and is admitted (or
        // refused) once etcd answers, before it counts as held.
        Err(HaError::Etcd { detail, .. }) => {
            tracing::debug!(
                service,
                generation = cp.generation,
                detail,
                "etcd unreachable: receiving the checkpoint before its token is checked"
            )
        }
        admitted => admitted?,
    }
    let held: Vec<Link> = member
        .holdings
        .lock()
        .ok()
        .and_then(|h| h.get(service).map(|h| h.chain.clone()))
        .unwrap_or_default();
    conn.send_msg(&Msg::Have {
        ids: held.iter().map(|l| l.id.clone()).collect(),
    })?;
    let (keep, files) = match conn.recv_msg()? {
        Msg::Archives { keep, files } => (keep, files),
        other => return Err(unexpected("Archives", &other)),
    };
    // The chain: what is kept of the one held, then the files, in
    // increasing generations, ending with the offered one.
    let mut gens = held
        .iter()
        .take(keep)
        .map(|l| l.generation)
        .chain(files.iter().map(|f| f.generation));
    let increasing = gens.clone().zip(gens.clone().skip(1)).all(|(a, b)| b > a);
    if keep > held.len()
        || files.is_empty()
        || !increasing
        || gens.next_back() != Some(cp.generation)
    {
        return Err(HaError::Refused {
            why: format!(
                "archives {:?} after {keep} of the {} held do not make a chain ending with generation {}",
                files.iter().map(|f| f.generation).collect::<Vec<_>>(),
                held.len(),
                cp.generation
            ),
        });
    }
    let dir = standby_dir(member, service, cp.token);
    fs::create_dir_all(&dir).map_err(|source| HaError::Io {
        path: dir.clone(),
        source,
    })?;
    let need: u64 = files.iter().map(|f| f.size).sum();
    let free = staging::available(&dir).unwrap_or(0);
    if free < need.saturating_mul(2) {
        return Err(HaError::Refused {
            why: format!(
                "no room: {} needed in {}, {} free",
                ferry_image::units::bytes(need * 2),
                dir.display(),
                ferry_image::units::bytes(free)
            ),
        });
    }
    // The archives kept from another leader's chain join this one's
    // directory (they name each other by file name).
    let mut chain = link_into(&held[..keep], &dir)?;
    for f in &files {
        let path = archive_path(&dir, f.generation);
        write_archive(conn, &dir, &path, f.size)?;
        chain.push(Link {
            generation: f.generation,
            id: f.id.clone(),
            path,
        });
    }
    // Verify: the chain's ids, then every page that changed.
    let t = Instant::now();
    let head = chain.last().expect("the chain holds the offered archive");
    let bad = |source| HaError::Archive {
        path: head.path.clone(),
        source,
    };
    let opened = Chain::open(&head.path, None).map_err(bad)?;
    let ids_match = (0..opened.generations())
        .all(|g| chain[chain.len() - 1 - g].id == archive::id_hex(&opened.generation(g).id()));
    if opened.generations() != chain.len() || !ids_match {
        return Err(HaError::Refused {
            why: format!(
                "the archives received do not form the announced chain of {} ending with {}",
                chain.len(),
                head.path.display()
            ),
        });
    }
    // The leader may have changed while the chain travelled: check again.
    admit_when_etcd_answers(member, service, cp)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let record = StandbyRecord {
        host: member.name().to_string(),
        checkpoint: cp.clone(),
        verified_unix_ms: 0,
    };
    // Patch the held images in place, under the lock: a failover waits for
    // it rather than restore half-patched images.
    let mut holdings = member.holdings.lock().map_err(|_| HaError::Refused {
        why: "internal lock poisoned".into(),
    })?;
    if let Some(cur) = holdings.get(service) {
        let (have, offered) = (
            (cur.checkpoint.token, cur.checkpoint.generation),
            (cp.token, cp.generation),
        );
        if have > offered {
            return Err(HaError::Refused {
                why: format!("a newer checkpoint {have:?} is held than the offered {offered:?}"),
            });
        }
    }
    let mut patched = None;
    if let Some(cur) = holdings.get_mut(service) {
        let updated = cur
            .chain
            .last()
            .ok_or_else(|| "an empty chain is held".to_string())
            .and_then(|h| Chain::open(&h.path, None).map_err(|e| ferry_image::units::chain(&e)))
            .and_then(|held| {
                archive::update(&opened, &held, cur.ready.path(), threads, &NoProgress)
                    .map_err(|e| ferry_image::units::chain(&e))
            });
        match updated {
            Ok(_) => {
                cur.checkpoint = cp.clone();
                cur.chain = chain.clone();
                patched = Some(());
            }
            Err(why) => {
                // Never restore from half-patched images: unpack afresh.
                tracing::warn!(service, error = %why, "cannot update the held images: unpacking the chain whole");
                holdings.remove(service);
            }
        }
    }
    if patched.is_none() {
        drop(holdings);
        let size: u64 = opened.head().index().files.iter().map(|f| f.size).sum();
        let ready = staging::create(STAGING_PREFIX, size, None).map_err(|source| HaError::Io {
            path: staging::base_for(size, None),
            source,
        })?;
        archive::unpack(&opened, ready.path(), threads, &NoProgress).map_err(bad)?;
        admit_when_etcd_answers(member, service, cp)?;
        holdings = member.holdings.lock().map_err(|_| HaError::Refused {
            why: "internal lock poisoned".into(),
        })?;
        if let Some(cur) = holdings.get(service) {
            if (cur.checkpoint.token, cur.checkpoint.generation) > (cp.token, cp.generation) {
                return Err(HaError::Refused {
                    why: "a newer checkpoint arrived meanwhile".into(),
                });
            }
        }
        holdings.insert(
            service.to_string(),
            Holding {
                checkpoint: cp.clone(),
                chain: chain.clone(),
                ready,
            },
        );
    }
    drop(holdings);
    let verify_ms = t.elapsed().as_secs_f64() * 1e3;
    let keep: Vec<PathBuf> = chain.iter().map(|l| l.path.clone()).collect();
    remove_other_archives(&dir, &keep);
    publish(
        member,
        service,
        &StandbyRecord {
            verified_unix_ms: keys::now_unix_ms(),
            ..record
        },
    );
    tracing::info!(service, generation = cp.generation, token = cp.token, leader = %cp.leader, kept = keep.len() - files.len(), received = files.len(), verify_ms, "checkpoint verified; newest held here");
    Ok(verify_ms)
}

/// [`admit`], waiting (up to [`ADMIT_WAIT`]) while etcd cannot be read: a
/// checkpoint a leader took while etcd was away is admitted as soon as
/// etcd answers again, if that leader's key is still the current one.
fn admit_when_etcd_answers(
    member: &Member,
    service: &str,
    cp: &CheckpointRecord,
) -> Result<(), HaError> {
    let deadline = Instant::now() + ADMIT_WAIT;
    loop {
        match admit(member, service, cp) {
            Err(HaError::Etcd { .. }) if Instant::now() < deadline => {
                std::thread::sleep(ADMIT_RETRY)
            }
            done => return done,
        }
    }
}

/// Refuses a checkpoint whose leader is not the current one.
fn admit(member: &Member, service: &str, cp: &CheckpointRecord) -> Result<(), HaError> {
    let prefix = keys::service_key(member.cluster(), service, "");
    let (entries, rev) = member.etcd.get_prefix(&prefix)?;
    let view = ClusterView::parse(
        member.cluster(),
        &entries,
        rev,
        keys::Seals::Verify(&member.secret),
    );
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
pub(crate) fn publish(member: &Member, service: &str, record: &StandbyRecord) {
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
