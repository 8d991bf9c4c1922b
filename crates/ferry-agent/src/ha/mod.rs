//! High availability: keep a service running across hosts, coordinated
//! through etcd (a real etcd server; ferry brings no consensus of its own).
//!
//! Every `ferry agent` started with `--etcd` joins a cluster ([`member`]):
//! - it registers `hosts/<name>` under a lease it renews every quarter of
//!   the lease's TTL, with its health (memory, disk, GPU, heartbeat);
//! - for each service ([`keys::ServiceSpec`], put by `ferry ha run`) it may
//!   run, it takes part in the election: the leader is whoever created
//!   `services/<svc>/leader` under its own lease. The revision of that key's
//!   last write is the **fencing token**;
//! - the leader ([`leader`]) runs the service (a runc or Docker container,
//!   or a process tree in a pid namespace of its own: [`copy`]), publishes
//!   its address, checkpoints it while it runs (incremental, compressed
//!   archives) often enough that the newest checkpoint a standby verified
//!   is never older than the service's interval ([`schedule`]), and hands
//!   each checkpoint to one worker per
//!   standby ([`replicator`]); the standbys ([`replica`]) check the token
//!   against etcd, verify the checkpoint by patching the changed pages into
//!   their restorable images, and only then publish it as their newest;
//! - when the leader key disappears (the leader's lease expired: host or
//!   agent dead, or cut off), the standby holding the newest verified
//!   checkpoint creates the key, restores the service from that checkpoint
//!   and publishes the new address. Clients find the service through
//!   `services/<svc>/address`.
//!
//! **Fencing.** A leader counts its lease as valid until the send time of
//! its last successful renewal plus the TTL, which is never later than when
//! etcd expires it. Once three quarters of that time has passed without a
//! renewal it freezes the service (`runc pause`, `docker pause`, SIGSTOP);
//! at the deadline it deletes it; if a renewal gets through first it thaws
//! it. So the old copy is
//! stopped before etcd can let anyone else take over, and a healed
//! partition finds it gone. Every replicated checkpoint carries the token;
//! a standby refuses one whose token is not the leader key's current create
//! revision. Writes of the leader's records are etcd transactions guarded
//! by the token.
//!
//! A lease of 1 s needs an etcd whose minimum lease TTL allows it: etcd
//! grants at least 1.5 × its election timeout (default 1 s, so 2 s); run
//! it with `--election-timeout 500 --heartbeat-interval 50` for 1 s leases.
//! The agent logs the TTL etcd granted.

pub(crate) mod copy;
pub mod etcd;
pub mod keys;
mod leader;
pub mod member;
pub(crate) mod replica;
mod replicator;
mod schedule;
pub mod status;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use copy::HostCopy;
pub use member::Member;

/// How an agent joins a cluster.
#[derive(Debug, Clone)]
pub struct HaConfig {
    pub etcd: etcd::EtcdAccess,
    pub cluster: String,
    /// This host's name in the cluster.
    pub name: String,
    /// The address services here are reached at (and peers reach the agent
    /// at, with the agent's port).
    pub ip: std::net::IpAddr,
    pub lease_ttl: Duration,
    /// dockerd's API socket, for Docker services.
    pub docker_socket: PathBuf,
    /// The ferry binary: the fencing guard is started from it
    /// (`ferry guard`).
    pub ferry: PathBuf,
}

impl HaConfig {
    pub(crate) fn agent_addr(&self, listen: SocketAddr) -> String {
        SocketAddr::new(self.ip, listen.port()).to_string()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error("etcd at {endpoints}: cannot {what}: {detail}")]
    Etcd {
        endpoints: String,
        what: String,
        detail: String,
    },
    #[error("cannot reach etcd as asked: {what}")]
    EtcdAccess { what: String },
    #[error("cannot start the etcd client's runtime")]
    Runtime(#[source] io::Error),
    #[error("bad name '{name}': use letters, digits and '-' (at most 40)")]
    BadName { name: String },
    #[error("service '{service}' is not declared in cluster '{cluster}'")]
    NoService { service: String, cluster: String },
    #[error("host '{host}' is not a live member of cluster '{cluster}'")]
    NoHost { host: String, cluster: String },
    #[error(transparent)]
    Transport(#[from] ferry_transport::TransportError),
    #[error("replication refused: {why}")]
    Refused { why: String },
    #[error("checkpoint archive {} does not verify", path.display())]
    Archive {
        path: PathBuf,
        #[source]
        source: ferry_archive::ArchiveError,
    },
    #[error("cannot {what}")]
    Copy {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot write {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Names of clusters, hosts and services become etcd keys and container ids.
pub(crate) fn valid_name(name: &str) -> Result<(), HaError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    ok.then_some(()).ok_or_else(|| HaError::BadName {
        name: name.to_string(),
    })
}
