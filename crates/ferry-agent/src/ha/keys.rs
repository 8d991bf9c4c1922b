//! The cluster's state in etcd: key layout and the JSON records kept there.
//!
//! Under `/ferry/<cluster>/`:
//!
//! | key                              | lease  | written by |
//! |----------------------------------|--------|------------|
//! | `hosts/<host>`                   | host's | each agent, every heartbeat |
//! | `services/<svc>/spec`            | none   | `ferry ha run` |
//! | `services/<svc>/leader`          | leader's | the winner of the election (create-if-absent) |
//! | `services/<svc>/address`         | leader's | the leader, fenced |
//! | `services/<svc>/checkpoint`      | none   | the leader, fenced, after each checkpoint |
//! | `services/<svc>/standbys/<host>` | host's | each standby, after verifying a checkpoint |
//! | `services/<svc>/move`            | none   | `ferry ha move`; the leader acts and deletes it |
//!
//! `spec` and `move` decide what agents run as root, so they are **sealed
//! with the cluster key** ([`seal`], [`open`]): the record's JSON travels
//! as a string beside a keyed BLAKE3 tag over the cluster, the service,
//! the leaf and those exact bytes. An agent ignores, and logs, one it
//! cannot verify: write access to etcd alone runs nothing.
//!
//! The revision of the leader key's last write is the service's **fencing
//! token**: the key is written only by an election (create-if-absent) or a
//! handover (`ha move`, guarded by the current token), so the token grows
//! with every change of leader and only the current leader holds it.

use std::collections::BTreeMap;

use ferry_transport::msg::{OfferedCheckpoint, OfferedSchedule};
use serde::{Deserialize, Serialize};

use super::etcd::Entry;

pub(crate) fn cluster_prefix(cluster: &str) -> String {
    format!("/ferry/{cluster}/")
}

pub(crate) fn host_key(cluster: &str, host: &str) -> String {
    format!("/ferry/{cluster}/hosts/{host}")
}

/// Written by each agent with every lease renewal that counts (see
/// [`VouchRecord`]).
pub(crate) fn vouch_key(cluster: &str, host: &str) -> String {
    format!("/ferry/{cluster}/vouch/{host}")
}

/// What an agent writes at [`vouch_key`] with every renewal of its lease
/// that it counts (the deadline of its copies moves on only once this
/// write, guarded by the tokens of the services it leads, got through):
/// the TTL its copies are held to. A standby that has seen no new vouch of
/// a leader's host for that TTL knows the leader's copies are dead (their
/// guard deadline is earlier), and unseats the leader at once instead of
/// waiting for etcd's lease expiry (up to 0.5 s later: etcd revokes
/// expired leases on a 500 ms tick).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VouchRecord {
    pub ttl_ms: u64,
}

pub fn service_key(cluster: &str, svc: &str, leaf: &str) -> String {
    format!("/ferry/{cluster}/services/{svc}/{leaf}")
}

pub(crate) fn standby_key(cluster: &str, svc: &str, host: &str) -> String {
    format!("/ferry/{cluster}/services/{svc}/standbys/{host}")
}

/// A record sealed with the cluster key: its JSON, exactly as tagged, and
/// the tag (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Sealed {
    record: String,
    seal: String,
}

const SEAL_CONTEXT: &str = "ferry ha record v1";

/// `record` as stored at `services/<svc>/<leaf>` of `cluster`, sealed.
pub fn seal<T: Serialize>(
    secret: &ferry_transport::Secret,
    cluster: &str,
    svc: &str,
    leaf: &str,
    record: &T,
) -> Vec<u8> {
    let json = serde_json::to_string(record).unwrap_or_default();
    let tag = secret.tag(
        SEAL_CONTEXT,
        &[
            cluster.as_bytes(),
            svc.as_bytes(),
            leaf.as_bytes(),
            json.as_bytes(),
        ],
    );
    to_json(&Sealed {
        record: json,
        seal: tag.iter().map(|b| format!("{b:02x}")).collect(),
    })
}

/// Why a sealed record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("not sealed with a cluster key (written without `ferry ha ... --key`, or by something else)")]
    NotSealed,
    #[error("its seal does not verify with this agent's cluster key (another key, or altered)")]
    BadSeal,
    #[error("sealed, but its record does not parse: {0}")]
    Unreadable(String),
}

/// Opens a sealed record read from `services/<svc>/<leaf>` of `cluster`;
/// `secret: None` reads it without checking the seal (for display only).
pub(crate) fn open<T: for<'de> Deserialize<'de>>(
    secret: Option<&ferry_transport::Secret>,
    cluster: &str,
    svc: &str,
    leaf: &str,
    bytes: &[u8],
) -> Result<T, SealError> {
    let sealed: Sealed = serde_json::from_slice(bytes).map_err(|_| SealError::NotSealed)?;
    if let Some(secret) = secret {
        let tag = parse_hex32(&sealed.seal).ok_or(SealError::BadSeal)?;
        let parts: [&[u8]; 4] = [
            cluster.as_bytes(),
            svc.as_bytes(),
            leaf.as_bytes(),
            sealed.record.as_bytes(),
        ];
        if !secret.verify_tag(SEAL_CONTEXT, &parts, &tag) {
            return Err(SealError::BadSeal);
        }
    }
    serde_json::from_str(&sealed.record).map_err(|e| SealError::Unreadable(e.to_string()))
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// How the sealed records of a view were checked.
#[derive(Debug, Clone, Copy)]
pub enum Seals<'a> {
    /// Against the cluster key: a record that fails is left out of the
    /// view and listed in [`ServiceView::refused`].
    Verify(&'a ferry_transport::Secret),
    /// Not checked (`ha status` without `--key`): shown as they claim.
    Unchecked,
}

/// A host's registration and health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    /// Where its agent listens (replication, migration).
    pub agent: String,
    /// The address services on this host are reached at.
    pub ip: String,
    pub boot_id: String,
    /// The lease that keeps this registration (handover attaches the leader
    /// key to it).
    pub lease: i64,
    pub mem_available_bytes: u64,
    pub disk_free_bytes: u64,
    /// "none" when NVML is absent, else the GPU count and names.
    pub gpu: String,
    pub heartbeat_unix_ms: u64,
}

/// What to keep available (`ferry ha run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    /// What runs.
    pub app: App,
    /// The port the service listens on; its address is `<host ip>:<port>`.
    pub port: u16,
    pub interval_ms: u64,
    pub standbys: usize,
    /// Hosts that may run it (empty: all).
    pub hosts: Vec<String>,
    /// `ferry ha stop`: no copy runs anywhere; the checkpoints are kept and
    /// `ferry ha start` resumes from the newest a standby verified.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
}

impl ServiceSpec {
    pub(crate) fn eligible(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| h == host)
    }
}

/// What a service runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum App {
    /// A runc container from this bundle (config.json and rootfs), at the
    /// same path on every eligible host.
    Runc { bundle: std::path::PathBuf },
    /// A process tree: this command, started as pid 1 of a pid namespace
    /// and the leader of a session of its own, stdio on /dev/null. Its
    /// files must be at the same paths on every eligible host.
    Process { command: Vec<String> },
    /// A Docker container from this image (on every eligible host's
    /// engine) running this command (the image's own when empty), in the
    /// host's network.
    Docker { image: String, command: Vec<String> },
}

impl std::fmt::Display for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            App::Runc { bundle } => write!(f, "runc bundle {}", bundle.display()),
            App::Process { command } => write!(f, "process tree `{}`", command.join(" ")),
            App::Docker { image, command } => {
                write!(f, "Docker image {image}")?;
                if !command.is_empty() {
                    write!(f, " running `{}`", command.join(" "))?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub host: String,
    pub since_unix_ms: u64,
    /// A process-tree service handed over by `ha move`: the pid of the
    /// copy the destination runs (it adopts it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddressRecord {
    pub host: String,
    pub addr: String,
    pub token: i64,
    /// The checkpoint generation the service was restored from (0: started
    /// fresh or moved live).
    pub restored_generation: u64,
    /// When that checkpoint was taken.
    pub restored_taken_unix_ms: u64,
    /// From noticing the old leader gone to the service running here.
    pub takeover_ms: f64,
    pub since_unix_ms: u64,
}

/// A checkpoint as the leader reports it, and as a standby holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub generation: u64,
    pub token: i64,
    pub leader: String,
    pub taken_unix_ms: u64,
    pub frozen_ms: f64,
    pub archive_bytes: u64,
    /// Bytes the standbys were sent for it (incremental).
    pub raw_bytes: u64,
    /// Generation of the full archive this one's chain starts at.
    pub base: u64,
    /// How the leader was scheduling checkpoints when it took this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleRecord>,
}

/// The leader's checkpoint schedule ([`super::schedule`]), as recorded
/// with each checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRecord {
    /// From one checkpoint's start to the next one's.
    pub period_ms: u64,
    /// The replication lag planned with (none before a standby verified a
    /// checkpoint of this leader's).
    pub lag_ms: Option<u64>,
    /// Whether the interval bounds lost work with that lag.
    pub holds: bool,
}

impl From<&CheckpointRecord> for OfferedCheckpoint {
    fn from(r: &CheckpointRecord) -> OfferedCheckpoint {
        OfferedCheckpoint {
            generation: r.generation,
            token: r.token,
            leader: r.leader.clone(),
            taken_unix_ms: r.taken_unix_ms,
            frozen_ms: r.frozen_ms,
            archive_bytes: r.archive_bytes,
            raw_bytes: r.raw_bytes,
            base: r.base,
            schedule: r.schedule.as_ref().map(|s| OfferedSchedule {
                period_ms: s.period_ms,
                lag_ms: s.lag_ms,
                holds: s.holds,
            }),
        }
    }
}

impl From<OfferedCheckpoint> for CheckpointRecord {
    fn from(o: OfferedCheckpoint) -> CheckpointRecord {
        CheckpointRecord {
            generation: o.generation,
            token: o.token,
            leader: o.leader,
            taken_unix_ms: o.taken_unix_ms,
            frozen_ms: o.frozen_ms,
            archive_bytes: o.archive_bytes,
            raw_bytes: o.raw_bytes,
            base: o.base,
            schedule: o.schedule.map(|s| ScheduleRecord {
                period_ms: s.period_ms,
                lag_ms: s.lag_ms,
                holds: s.holds,
            }),
        }
    }
}

/// A standby's newest verified checkpoint of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandbyRecord {
    pub host: String,
    pub checkpoint: CheckpointRecord,
    pub verified_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRequest {
    pub to: String,
    /// The leader's fencing token when the move was asked for: the
    /// destination keeps the copy a migration brings only while that
    /// leader still holds the key (None: a request from an older ferry,
    /// kept while any leader does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<i64>,
}

/// A service's state as read from etcd.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceView {
    pub spec: Option<ServiceSpec>,
    pub leader: Option<LeaderRecord>,
    /// The fencing token: the revision of the leader key's last write.
    pub token: i64,
    /// The lease the leader key hangs on.
    pub leader_lease: i64,
    pub address: Option<AddressRecord>,
    pub checkpoint: Option<CheckpointRecord>,
    pub standbys: BTreeMap<String, StandbyRecord>,
    /// The lease each standby record hangs on (a record left by a dead
    /// agent outlives it until its old lease expires).
    #[serde(skip)]
    pub standby_leases: BTreeMap<String, i64>,
    #[serde(rename = "move")]
    pub move_to: Option<MoveRequest>,
    /// Sealed records refused: (leaf, etcd revision of its last write,
    /// why). An agent ignores them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<(String, i64, String)>,
}

/// The whole cluster as read from etcd at one revision.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterView {
    pub revision: i64,
    pub hosts: BTreeMap<String, HostRecord>,
    /// Each host's last vouch: the etcd revision of its write, and what it
    /// says.
    #[serde(skip)]
    pub vouches: BTreeMap<String, (i64, VouchRecord)>,
    pub services: BTreeMap<String, ServiceView>,
}

impl ClusterView {
    /// Parses every key under the cluster's prefix; records that do not
    /// parse are skipped with a warning (a newer ferry may write more).
    pub fn parse(cluster: &str, entries: &[Entry], revision: i64, seals: Seals) -> ClusterView {
        let secret = match seals {
            Seals::Verify(s) => Some(s),
            Seals::Unchecked => None,
        };
        let prefix = cluster_prefix(cluster);
        let mut view = ClusterView {
            revision,
            ..Default::default()
        };
        for e in entries {
            let Some(rest) = e.key.strip_prefix(&prefix) else {
                continue;
            };
            let parts: Vec<&str> = rest.split('/').collect();
            let ok = match parts.as_slice() {
                ["hosts", h] => parse_into(&e.value, |r: HostRecord| {
                    view.hosts.insert(h.to_string(), r);
                }),
                ["vouch", h] => parse_into(&e.value, |r: VouchRecord| {
                    view.vouches.insert(h.to_string(), (e.mod_revision, r));
                }),
                ["services", s, leaf @ ..] => {
                    let svc = view.services.entry(s.to_string()).or_default();
                    let mut refuse = |leaf: &str, why: SealError| {
                        svc.refused
                            .push((leaf.to_string(), e.mod_revision, why.to_string()));
                        true
                    };
                    match leaf {
                        ["spec"] => match open::<ServiceSpec>(secret, cluster, s, "spec", &e.value)
                        {
                            // The name inside is the one sealed; the key's
                            // must agree with it.
                            Ok(r) if r.name == *s => {
                                svc.spec = Some(r);
                                true
                            }
                            Ok(r) => refuse(
                                "spec",
                                SealError::Unreadable(format!("it names service {}", r.name)),
                            ),
                            Err(why) => refuse("spec", why),
                        },
                        ["move"] => match open(secret, cluster, s, "move", &e.value) {
                            Ok(r) => {
                                svc.move_to = Some(r);
                                true
                            }
                            Err(why) => refuse("move", why),
                        },
                        ["leader"] => parse_into(&e.value, |r| {
                            svc.leader = Some(r);
                            svc.token = e.mod_revision;
                            svc.leader_lease = e.lease;
                        }),
                        ["address"] => parse_into(&e.value, |r| svc.address = Some(r)),
                        ["checkpoint"] => parse_into(&e.value, |r| svc.checkpoint = Some(r)),
                        ["standbys", h] => parse_into(&e.value, |r: StandbyRecord| {
                            svc.standbys.insert(h.to_string(), r);
                            svc.standby_leases.insert(h.to_string(), e.lease);
                        }),
                        _ => true,
                    }
                }
                _ => true,
            };
            if !ok {
                tracing::warn!(key = %e.key, "unreadable record in etcd; ignored");
            }
        }
        view
    }
}

fn parse_into<T: for<'de> Deserialize<'de>>(bytes: &[u8], put: impl FnOnce(T)) -> bool {
    match serde_json::from_slice(bytes) {
        Ok(v) => {
            put(v);
            true
        }
        Err(_) => false,
    }
}

pub(crate) fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: impl Serialize, rev: i64) -> Entry {
        Entry {
            key: key.into(),
            value: to_json(&value),
            mod_revision: rev,
            lease: 0,
        }
    }

    #[test]
    fn a_checkpoint_record_without_a_schedule_still_parses() {
        let json = r#"{"generation":1,"token":2,"leader":"a","taken_unix_ms":3,"frozen_ms":4.0,"archive_bytes":5,"raw_bytes":6,"base":1}"#;
        let cp: CheckpointRecord = serde_json::from_str(json).unwrap();
        assert_eq!(cp.schedule, None);
        let with = CheckpointRecord {
            schedule: Some(ScheduleRecord {
                period_ms: 1500,
                lag_ms: Some(400),
                holds: true,
            }),
            ..cp
        };
        let back: CheckpointRecord = serde_json::from_slice(&to_json(&with)).unwrap();
        assert_eq!(back, with);
    }

    #[test]
    fn parses_a_cluster() {
        let c = "c1";
        let cp = CheckpointRecord {
            generation: 3,
            token: 7,
            leader: "a".into(),
            taken_unix_ms: 1,
            frozen_ms: 2.0,
            archive_bytes: 3,
            raw_bytes: 4,
            base: 1,
            schedule: None,
        };
        let entries = vec![
            entry(
                &service_key(c, "web", "leader"),
                LeaderRecord {
                    host: "a".into(),
                    since_unix_ms: 5,
                    pid: None,
                },
                7,
            ),
            entry(
                &standby_key(c, "web", "b"),
                StandbyRecord {
                    host: "b".into(),
                    checkpoint: cp.clone(),
                    verified_unix_ms: 9,
                },
                8,
            ),
            Entry {
                key: service_key(c, "web", "address"),
                value: b"not json".to_vec(),
                mod_revision: 9,
                lease: 0,
            },
            entry("/ferry/other/hosts/x", "ignored", 1),
            entry(&vouch_key(c, "a"), VouchRecord { ttl_ms: 1000 }, 6),
        ];
        let v = ClusterView::parse(c, &entries, 10, Seals::Unchecked);
        let web = &v.services["web"];
        assert_eq!(v.vouches["a"], (6, VouchRecord { ttl_ms: 1000 }));
        assert_eq!(web.token, 7);
        assert_eq!(web.leader.as_ref().unwrap().host, "a");
        assert_eq!(web.standbys["b"].checkpoint, cp);
        assert!(web.address.is_none());
        assert!(v.hosts.is_empty());
    }

    fn spec(name: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            app: App::Process {
                command: vec!["/bin/true".into()],
            },
            port: 80,
            interval_ms: 1000,
            standbys: 1,
            hosts: vec![],
            stopped: false,
        }
    }

    /// Only a spec sealed with the cluster key, for this cluster, service
    /// and leaf, unaltered, reaches the view; every other is refused with
    /// its reason.
    #[test]
    fn only_specs_sealed_with_the_cluster_key_are_taken() {
        let key = ferry_transport::Secret::from_bytes(b"the cluster key, 32 bytes long..");
        let other = ferry_transport::Secret::from_bytes(b"another key, just as long as it.");
        let c = "c1";
        let view = |value: Vec<u8>, svc: &str| {
            let e = Entry {
                key: service_key(c, svc, "spec"),
                value,
                mod_revision: 4,
                lease: 0,
            };
            ClusterView::parse(c, &[e], 5, Seals::Verify(&key))
                .services
                .remove(svc)
                .unwrap()
        };
        let good = view(seal(&key, c, "web", "spec", &spec("web")), "web");
        assert_eq!(good.spec, Some(spec("web")));
        assert!(good.refused.is_empty());

        let refused = |sv: ServiceView, why: &str| {
            assert!(sv.spec.is_none());
            assert_eq!(sv.refused.len(), 1, "{:?}", sv.refused);
            assert!(sv.refused[0].2.contains(why), "{:?}", sv.refused);
        };
        // Plain JSON, as before sealing existed (or as an intruder writes).
        refused(view(to_json(&spec("web")), "web"), "not sealed");
        // Sealed with another key.
        refused(
            view(seal(&other, c, "web", "spec", &spec("web")), "web"),
            "does not verify",
        );
        // Sealed for another cluster, service or leaf, then copied here.
        refused(
            view(seal(&key, "c2", "web", "spec", &spec("web")), "web"),
            "does not verify",
        );
        refused(
            view(seal(&key, c, "db", "spec", &spec("web")), "web"),
            "does not verify",
        );
        refused(
            view(seal(&key, c, "web", "move", &spec("web")), "web"),
            "does not verify",
        );
        // Altered after sealing: the command swapped.
        let mut tampered: serde_json::Value =
            serde_json::from_slice(&seal(&key, c, "web", "spec", &spec("web"))).unwrap();
        tampered["record"] = tampered["record"]
            .as_str()
            .unwrap()
            .replace("/bin/true", "/bin/evil")
            .into();
        refused(view(to_json(&tampered), "web"), "does not verify");
        // Sealed, but naming another service than its key.
        refused(
            view(seal(&key, c, "web", "spec", &spec("db")), "web"),
            "names service db",
        );
        // Unchecked (ha status without a key): shown as it claims.
        let e = Entry {
            key: service_key(c, "web", "spec"),
            value: seal(&other, c, "web", "spec", &spec("web")),
            mod_revision: 4,
            lease: 0,
        };
        let v = ClusterView::parse(c, &[e], 5, Seals::Unchecked);
        assert_eq!(v.services["web"].spec, Some(spec("web")));
    }
}
