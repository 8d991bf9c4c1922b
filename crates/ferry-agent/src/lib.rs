//! `ferry agent`: the receiving end of migrations and of HA replication,
//! and the host's member of an HA cluster ([`ha`]).
//!
//! It listens on a TCP address, authenticates every peer with the shared
//! secret (see [`ferry_transport`]) before reading anything else, and keeps
//! under its store directory:
//! - `pages.dat`: the content-addressed page store ([`store`]); a page is
//!   kept once, whatever sent it, and is never asked for again;
//! - with `--keep-images`, `checkpoints/<session>/images`: the CRIU images
//!   of each committed migration.
//!
//! A migration's images are rebuilt ([`rebuild`]) in a staging directory
//! (tmpfs when it fits) byte-identical to the source's (every file's size
//! and checksum are checked) from the metadata files sent as they are and
//! from page recipes that name pages of the store.
//!
//! One thread per connection. A migration's control connection
//! ([`session`]) drives the rebuild, the restore (left stopped) and the
//! commit (resume); if it ends before the commit, what was restored is
//! killed, so an application never runs on both hosts. Data connections
//! (`Join`) only bring pages. SIGTERM or SIGINT: stop accepting, close
//! every connection (which aborts uncommitted sessions), exit.

#![forbid(unsafe_code)]

mod final_map;
pub mod guard;
pub mod metrics;
mod page_source;
mod rebuild;
mod server;
pub(crate) mod session;
pub mod store;

pub mod ha;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

pub use server::{run, Agent};
pub use store::PageStore;

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    pub key: PathBuf,
    pub store: PathBuf,
    /// CRIU binary (None: `criu` on PATH) and optional service socket.
    pub criu: Option<PathBuf>,
    pub criu_service: Option<PathBuf>,
    /// runc's state directory for containers restored here.
    pub runc_root: PathBuf,
    /// dockerd's API socket for Docker containers restored here.
    pub docker_socket: PathBuf,
    /// Where images are rebuilt for a restore (default: tmpfs when it fits).
    pub staging: Option<PathBuf>,
    /// Keep each committed migration's images under
    /// `STORE/checkpoints/<session>/images` (for checks; costs disk).
    pub keep_images: bool,
    /// Join an HA cluster (see [`crate::ha`]).
    pub ha: Option<crate::ha::HaConfig>,
    /// Serve Prometheus metrics on this address ([`crate::metrics`]).
    pub metrics: Option<SocketAddr>,
    /// Bound on the page store's size: past it, while no migration is
    /// being received, the store keeps only its newest half.
    pub store_max: Option<u64>,
}

/// Where a started agent can be reached.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    pub listen: SocketAddr,
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the page store in {}", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Transport(#[from] ferry_transport::TransportError),
    #[error("cannot join the HA cluster")]
    Ha(#[from] crate::ha::HaError),
    #[error(transparent)]
    Criu(#[from] ferry_criu::CriuError),
    #[error("cannot install the SIGTERM handler")]
    Signals(#[source] io::Error),
}
