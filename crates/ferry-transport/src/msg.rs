//! Control messages (JSON in `Msg` frames). A migration, as the source
//! (client) drives it over its first connection (the control stream):
//!
//! ```text
//! source                                   agent
//!   Begin{session, target, bytes} ------->  checks room, GPUs; creates the session
//!                           <-------------  Accepted{host, boot_id, free} | Error
//!   (data streams: Join{session} -> Accepted, then Pages frames, Flush -> Flushed)
//!   Query + Blob(digests) --------------->  which of these pages are missing?
//!                           <-------------  Missing + Blob(bitmap)
//!   ... pre-copy rounds ...
//!   Layout{pid} + Blob(addresses, digests) -> lays out the pages image ahead
//!                           <-------------  LayoutReady{ms}
//!   ... the final dump ...
//!   Images{files} + one Blob per file --->  metadata files; page files as recipes
//!   Rebuild ----------------------------->  writes the images, checks every checksum
//!                           <-------------  Rebuilt{ms, bytes}
//!   Restore{opts} ----------------------->  restores, leaves the tree stopped
//!                           <-------------  Restored{pid, ms, stats}
//!   Commit ------------------------------>  journals the commit, resumes the tree
//!                           <-------------  Committed | Error (aborted meanwhile)
//! ```
//!
//! If the answer to `Restore` or `Commit` is lost, the source stays stopped
//! and asks on new connections until it has the outcome:
//!
//! ```text
//!   Outcome{session} -------------------->  committed? else aborts now (copy removed)
//!                           <-------------  Decided{committed, pid}
//! ```
//!
//! HA replication (a leader to a standby, one connection per checkpoint):
//!
//! ```text
//! leader                                   standby agent
//!   Offer{service, checkpoint} ---------->  checks the token against etcd
//!                           <-------------  Have{ids of the chain held} | Error
//!   Archives{keep, files} + blobs -------->  keeps the first `keep` archives it holds,
//!                                            writes the rest, verifies the chain by
//!                                            updating its restorable images
//!                           <-------------  Replicated{generation} | Error
//! ```
//!
//! If the control stream ends before `Commit`, the agent aborts the session
//! (kills what it restored, still stopped); the source resumes its own copy
//! only on that answer.

use serde::{Deserialize, Serialize};

/// What is being moved, as the destination needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// A process tree (restored into the agent's own namespaces).
    Process { pid: i32 },
    /// A runc container, restored through `runc restore` under this id in
    /// the agent's runc root, with this bundle (None: the one recorded).
    Runc {
        id: String,
        bundle: Option<std::path::PathBuf>,
    },
    /// A Docker container, restored through the agent's dockerd under this
    /// name (created from the recorded configuration when it does not exist).
    Docker { name: String },
}

/// One CRIU image file of the final dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageEntry {
    pub name: String,
    pub size: u64,
    /// [`super::pages::file_checksum`] of the whole file, 32 hex digits.
    pub checksum: String,
    /// The blob is a page recipe (a page file), not the file's bytes.
    pub recipe: bool,
}

/// One archive of a replicated checkpoint chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveFile {
    pub generation: u64,
    pub size: u64,
    /// The archive's id (hex): what its children name it by.
    pub id: String,
}

/// The GPU state an application needs on the destination (the wire's own
/// copy of what a checkpoint's GPU record says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuNeeds {
    /// The processes whose GPU state is carried (host pids at dump time).
    pub pids: Vec<i32>,
    pub model: String,
    pub count: u32,
    pub uuids: Vec<String>,
    /// GPU memory the processes held, per device UUID.
    pub memory_in_use: Vec<(String, u64)>,
    pub driver_version: String,
    pub cuda_version: Option<String>,
    /// What carries the GPU state.
    pub carried_by: String,
}

impl From<&ferry_image::gpu_record::GpuRecord> for GpuNeeds {
    fn from(r: &ferry_image::gpu_record::GpuRecord) -> GpuNeeds {
        GpuNeeds {
            pids: r.pids.clone(),
            model: r.model.clone(),
            count: r.count,
            uuids: r.uuids.clone(),
            memory_in_use: r.memory_in_use.clone(),
            driver_version: r.driver_version.clone(),
            cuda_version: r.cuda_version.clone(),
            carried_by: r.carried_by.name().to_string(),
        }
    }
}

impl TryFrom<GpuNeeds> for ferry_image::gpu_record::GpuRecord {
    type Error = ferry_image::gpu_record::GpuRecordError;
    fn try_from(n: GpuNeeds) -> Result<Self, Self::Error> {
        use ferry_image::gpu_record::{CarriedBy, GpuRecordError};
        Ok(ferry_image::gpu_record::GpuRecord {
            carried_by: CarriedBy::from_name(&n.carried_by)
                .ok_or(GpuRecordError::UnknownCarrier(n.carried_by))?,
            pids: n.pids,
            model: n.model,
            count: n.count,
            uuids: n.uuids,
            memory_in_use: n.memory_in_use,
            driver_version: n.driver_version,
            cuda_version: n.cuda_version,
        })
    }
}

/// A checkpoint an HA leader offers a standby (the wire's own copy of
/// what the leader records in etcd).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfferedCheckpoint {
    pub generation: u64,
    /// The leader's fencing token when it took the checkpoint.
    pub token: i64,
    pub leader: String,
    pub taken_unix_ms: u64,
    pub frozen_ms: f64,
    pub archive_bytes: u64,
    /// Bytes the standbys are sent for it (incremental).
    pub raw_bytes: u64,
    /// Generation of the full archive this one's chain starts at.
    pub base: u64,
    /// How the leader was scheduling checkpoints when it took this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<OfferedSchedule>,
}

/// The leader's checkpoint schedule, as offered with a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferedSchedule {
    pub period_ms: u64,
    pub lag_ms: Option<u64>,
    pub holds: bool,
}

/// CRIU restore flags carried from the source's command line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreOpts {
    pub tcp_established: bool,
    pub shell_job: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    pub log_level: u8,
    /// Post-copy: restore before memory is resident (see `ferry migrate
    /// --lazy-pages`).
    #[serde(default)]
    pub lazy_pages: bool,
    /// Post-copy from a lazy dump: the memory stays in the source's frozen
    /// tree and the destination fetches it over the session's page-source
    /// connection ([`Msg::PageSource`]) as the restored tree faults.
    #[serde(default)]
    pub remote_pages: bool,
    /// The HA service an `ha move` carries: the destination journals it
    /// with the commit, so that if the moving leader goes before it hands
    /// the service over, this host finds the copy the move brought.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha_service: Option<String>,
    /// CRIU restore options from the source's command line (CRIU's names).
    #[serde(default, skip_serializing_if = "CriuRestoreFlags::is_empty")]
    pub criu: CriuRestoreFlags,
}

/// The CRIU restore options a migration carries to the destination, as
/// words in CRIU's vocabulary: the destination checks each before CRIU sees
/// it. Options that name local paths or commands (a configuration file,
/// `--exec-cmd`, `--root`) are not carried.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriuRestoreFlags {
    /// `--manage-cgroups[=MODE]` ("" for CRIU's default mode).
    pub manage_cgroups: Option<String>,
    pub tcp_close: bool,
    pub weak_sysctls: bool,
    pub network_lock: Option<String>,
    pub file_validation: Option<String>,
    pub skip_file_rwx_check: bool,
    pub mntns_compat_mode: bool,
    pub lsm_profile: Option<String>,
}

impl CriuRestoreFlags {
    pub fn is_empty(&self) -> bool {
        *self == CriuRestoreFlags::default()
    }
}

/// Where the source holds its kernel proof
/// (`ferry_sys::host::KernelProof`): its pid and the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofLocator {
    pub pid: u32,
    pub fd: i32,
}

/// The answer to a kernel proof: a digest of its nonce (hex), which only a
/// reader of the nonce, on the source's own kernel, can give.
pub fn kernel_proof_answer(nonce: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"ferry kernel proof v1\0");
    h.update(nonce);
    h.finalize().to_hex().to_string()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    Begin {
        session: String,
        target: Target,
        /// Resident bytes the migration may bring (room check).
        expected_bytes: u64,
        boot_id: String,
        host: String,
        /// GPU state the application needs on the destination, if any.
        gpu: Option<Box<GpuNeeds>>,
        /// With an equal boot id, the challenge that proves one kernel.
        #[serde(default)]
        kernel_proof: Option<ProofLocator>,
    },
    Join {
        session: String,
    },
    Accepted {
        host: String,
        boot_id: String,
        free_bytes: u64,
        /// [`kernel_proof_answer`] of the source's nonce, when the agent
        /// read it: the two run on one kernel.
        #[serde(default)]
        kernel_proof: Option<String>,
    },
    Query {
        count: u64,
    },
    Missing {
        count: u64,
    },
    Flush,
    Flushed {
        pages: u64,
    },
    /// A process's pages as pre-copy last saw them (then a blob: `count`
    /// addresses u64, then `count` digests u128): the agent lays out its
    /// pages image ahead of the final copy.
    Layout {
        pid: i32,
        count: u64,
    },
    LayoutReady {
        ms: f64,
    },
    Images {
        files: Vec<ImageEntry>,
    },
    Rebuild,
    Rebuilt {
        ms: f64,
        bytes: u64,
        pages_from_store: u64,
        /// Pages already in place in the images laid out ahead.
        #[serde(default)]
        pages_in_place: u64,
        /// Where the images are on the agent's host (kept whole until the
        /// session ends; a source on the same kernel restores from them if
        /// the destination's restore fails).
        #[serde(default)]
        images: String,
    },
    Restore {
        opts: RestoreOpts,
    },
    Restored {
        pid: i32,
        ms: f64,
        stats: Option<serde_json::Value>,
    },
    Commit,
    Committed,
    /// Asked on a new connection when the session's own answer to
    /// `Commit` (or to `Restore`) was lost: the agent decides the session
    /// now (aborting it, its copy removed, unless it was committed) and
    /// answers with `Decided`.
    Outcome {
        session: String,
    },
    /// The session's final outcome; `pid` is the restored copy's when
    /// committed.
    Decided {
        committed: bool,
        pid: i32,
    },
    /// HA: a service's checkpoint, offered by its leader to a standby.
    Offer {
        service: String,
        checkpoint: OfferedCheckpoint,
    },
    /// HA: the ids of the archives of the chain the standby holds, oldest
    /// (the full one) first; empty when it holds none.
    Have {
        ids: Vec<String>,
    },
    /// HA: the chain offered is the first `keep` archives the standby holds
    /// followed by `files`, which follow in this order, each as blobs
    /// totalling its size.
    Archives {
        keep: usize,
        files: Vec<ArchiveFile>,
    },
    /// HA: the standby verified the chain and holds this generation.
    Replicated {
        generation: u64,
        verify_ms: f64,
    },
    Error {
        message: String,
    },
    /// Post-copy from a lazy dump: this connection is the session's page
    /// source. The agent sends `PageGet`s on it; the source answers each
    /// with `PageData` and a blob of the pages that are neither all zero,
    /// nor recently sent, nor held in the agent's store, in order (then
    /// the digests of those held, as a second blob); `PagesDone` ends it.
    PageSource {
        session: String,
    },
    PageGet {
        /// The task, by its pid in the images.
        pid: u64,
        vaddr: u64,
        pages: u64,
    },
    PageData {
        /// Indices (within the request) of the pages that are all zero:
        /// they are not in the blob.
        zero: Vec<u32>,
        /// Pages (index within the request, number) whose content went
        /// over in full recently: not in the blob either (see
        /// [`super::recent`]).
        #[serde(default)]
        repeat: Vec<(u32, u64)>,
        /// Indices of pages the destination's page store holds (the
        /// hybrid route: sent during pre-copy and unchanged since): not
        /// in the blob; a second blob follows with their digests, in
        /// order, when there is any.
        #[serde(default)]
        stored: Vec<u32>,
    },
    /// The restored tree's memory is all resident.
    PagesDone {
        requests: u64,
        pages: u64,
        ms: f64,
    },
    /// The hybrid route: this connection carries the frozen tree's final
    /// page map (`Layout` + blob per process, as images name them, then
    /// `MapEnd`; the agent answers `MapReady`). Every page it names is in
    /// the agent's store (sent on the data streams before).
    PageMap {
        session: String,
    },
    MapEnd,
    MapReady,
    /// On the page-source connection, from the agent: the final map
    /// covers every lazy page of the images; the relay serves them all
    /// from the store and will ask the source for nothing more.
    MapInstalled,
    /// A container's files as they were while it ran (a migration sends
    /// them before the freeze): blobs follow, an empty one ends them. The
    /// agent keeps them beside the session's images as `name`; `bytes` is
    /// the source's estimate, and more than half again is refused.
    FilesBase {
        name: String,
        bytes: u64,
    },
    FilesStored {
        bytes: u64,
    },
}

impl Msg {
    /// The message's type, as its JSON names it (for logs and errors).
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Begin { .. } => "begin",
            Msg::Join { .. } => "join",
            Msg::Accepted { .. } => "accepted",
            Msg::Query { .. } => "query",
            Msg::Missing { .. } => "missing",
            Msg::Flush => "flush",
            Msg::Flushed { .. } => "flushed",
            Msg::Layout { .. } => "layout",
            Msg::LayoutReady { .. } => "layout_ready",
            Msg::Images { .. } => "images",
            Msg::Rebuild => "rebuild",
            Msg::Rebuilt { .. } => "rebuilt",
            Msg::Restore { .. } => "restore",
            Msg::Restored { .. } => "restored",
            Msg::Commit => "commit",
            Msg::Committed => "committed",
            Msg::Outcome { .. } => "outcome",
            Msg::Decided { .. } => "decided",
            Msg::Offer { .. } => "offer",
            Msg::Have { .. } => "have",
            Msg::Archives { .. } => "archives",
            Msg::Replicated { .. } => "replicated",
            Msg::Error { .. } => "error",
            Msg::PageSource { .. } => "page_source",
            Msg::PageGet { .. } => "page_get",
            Msg::PageData { .. } => "page_data",
            Msg::PagesDone { .. } => "pages_done",
            Msg::PageMap { .. } => "page_map",
            Msg::MapEnd => "map_end",
            Msg::FilesBase { .. } => "files_base",
            Msg::FilesStored { .. } => "files_stored",
            Msg::MapReady => "map_ready",
            Msg::MapInstalled => "map_installed",
        }
    }
}
