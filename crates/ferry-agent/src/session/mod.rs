//! One migration as the agent sees it: the control connection's messages
//! (room check, digest queries, images, rebuild, restore, commit), the
//! restore ([`restore`]) and the data connections that bring pages
//! ([`data`]). Errors are typed up to the reply: each is turned into text
//! once, where the session answers the source with it.

mod data;
pub(crate) mod outcome;
mod restore;

pub use data::serve_data;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::page_source::PageRelay;
use crate::rebuild::RebuildError;
use crate::server::Agent;
use crate::AgentError;
use ferry_core::checkpoint::{staging, CheckpointError};
use ferry_core::target::ContainerRef;
use ferry_image::units;
use ferry_transport::msg::{ImageEntry, Target};
use ferry_transport::pages;
use ferry_transport::{Conn, Msg, TransportError};

/// A connection silent for this long is dead (a pre-copy round of a large
/// application over a slow link keeps the control stream quiet for a while).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a restored (stopped) copy waits for the source's commit
/// before it is killed.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Name prefix of the agent's staging directories.
pub const STAGING_PREFIX: &str = ferry_core::checkpoint::staging::AGENT_PREFIX;
/// Longest time post-copy may take to make all memory resident.
const LAZY_COMPLETION_TIMEOUT: Duration = Duration::from_secs(600);
/// Room kept free beyond what a migration says it needs.
const ROOM_MARGIN_BYTES: u64 = 64 << 20;

/// Why the agent refuses or fails a step of a migration (sent to the
/// source as the text of an `Error`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("bad session id '{0}'")]
    BadId(String),
    #[error("no room: the migration needs about {} in {} and {} is free", units::bytes(*need), dir.display(), units::bytes(*free))]
    NoRoom { need: u64, free: u64, dir: PathBuf },
    #[error("the GPU state the application needs does not say how it is carried")]
    GpuRecord(#[source] ferry_image::gpu_record::GpuRecordError),
    #[error("GPUs here cannot take this application")]
    Gpu(#[source] ferry_core::gpu::Incompatible),
    #[error("cannot create a staging directory")]
    Staging(#[source] std::io::Error),
    #[error("layout of pid {pid}")]
    LayoutDigests {
        pid: i32,
        #[source]
        source: pages::PagesFault,
    },
    #[error(transparent)]
    Rebuild(#[from] RebuildError),
    #[error("already restored")]
    AlreadyRestored,
    #[error("restore before the images were rebuilt")]
    NotRebuilt,
    #[error("post-copy is not supported for containers")]
    LazyContainer,
    #[error("post-copy from a lazy dump, but no page-source connection came within {0:?}")]
    NoPageSource(Duration),
    #[error("cannot connect a page source for the lazy-pages daemon")]
    PageSourceListen(#[source] std::io::Error),
    #[error(transparent)]
    Criu(#[from] ferry_criu::CriuError),
    #[error("the restore failed")]
    Restore(#[source] Box<CheckpointError>),
    #[error("restore refused: {0}")]
    Decided(String),
    #[error("a container's files: {what}")]
    Files { what: String },
}

impl SessionError {
    /// The text sent to the source: the whole chain of causes, and CRIU's
    /// own error lines where CRIU failed.
    fn reply(&self) -> String {
        let criu_lines = match self {
            SessionError::Restore(e) => e
                .criu()
                .map(|c| c.log_errors().join("; "))
                .unwrap_or_default(),
            _ => String::new(),
        };
        let text = units::chain(self);
        if criu_lines.is_empty() {
            text
        } else {
            format!("{text} {criu_lines}")
        }
    }
}

pub struct Begin {
    pub id: String,
    pub target: Target,
    pub expected_bytes: u64,
    pub source_host: String,
    /// The source runs on this kernel (lab namespaces): it is killed before
    /// the restore, and if the restore fails it restores from this
    /// session's images, which must then stay whole.
    pub same_kernel: bool,
    /// The answer to the source's kernel proof (set exactly when
    /// `same_kernel` is).
    pub kernel_proof: Option<String>,
    pub gpu: Option<Box<ferry_transport::msg::GpuNeeds>>,
}

/// The session's directory under the store.
fn session_dir(agent: &Agent, id: &str) -> PathBuf {
    agent.config.store.join("checkpoints").join(id)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Serves a migration's control connection until commit or failure.
pub(crate) fn serve_control(agent: &Agent, mut conn: Conn, begin: Begin) -> Result<(), AgentError> {
    if let Err(why) = admit(agent, &begin) {
        let message = why.reply();
        tracing::warn!(session = %begin.id, from = %begin.source_host, why = %message, "migration refused");
        conn.send_msg(&Msg::Error { message })?;
        return Ok(());
    }
    let counter = Arc::new(AtomicU64::new(0));
    if let Ok(mut s) = agent.sessions.lock() {
        s.insert(begin.id.clone(), Arc::clone(&counter));
    }
    tracing::info!(session = %begin.id, from = %begin.source_host, target = ?begin.target, "migration begins");
    let mut session = Session {
        agent,
        target: begin.target.clone(),
        id: begin.id.clone(),
        dir: session_dir(agent, &begin.id),
        files: Vec::new(),
        images: None,
        prepared: Vec::new(),
        restored: None,
        ha_service: None,
        final_at: None,
        lazy: None,
        relay: None,
        ahead: Default::default(),
        expected_bytes: begin.expected_bytes,
        same_kernel: begin.same_kernel,
        kernel_proof: begin.kernel_proof.clone(),
    };
    let metrics = crate::metrics::get();
    metrics.sessions_active.inc();
    let began = Instant::now();
    let result = session.run(&mut conn);
    metrics.sessions_active.dec();
    if let Ok(mut p) = agent.page_sources.lock() {
        p.remove(&begin.id);
    }
    if let (Ok(true), Some(lazy)) = (&result, session.lazy.as_mut()) {
        // Post-copy: the images must outlive the daemon serving them.
        let t = Instant::now();
        // From a lazy dump the relay ends when the daemon has every page,
        // or when the source is gone or cut off: then this copy cannot go
        // on (part of its memory is only there) and the source resumes
        // from the dump, so this copy is killed.
        let relay_failed = match session.relay.take().map(PageRelay::join) {
            Some(Ok(served)) => {
                tracing::info!(session = %begin.id, requests = served.requests, pages = served.pages, "the source served every page the daemon asked for");
                false
            }
            Some(Err(why)) => {
                tracing::error!(session = %begin.id, why = %units::chain(&why), "post-copy FAILED: the page relay to the source broke; killing the restored copy (the source resumes from the dump)");
                true
            }
            None => false,
        };
        if relay_failed {
            if let Some(pid) = session.restored.take() {
                session.discard(pid);
            }
        } else if lazy.wait(LAZY_COMPLETION_TIMEOUT) {
            tracing::info!(session = %begin.id, ms = t.elapsed().as_millis() as u64, "post-copy complete: all memory resident");
        } else {
            tracing::error!(session = %begin.id, log = %lazy.log().display(), "post-copy FAILED: the lazy-pages daemon did not deliver every page; the application is broken");
        }
    }
    // Open until post-copy ends: the hybrid route's final map may come
    // after the commit.
    if let Ok(mut s) = agent.sessions.lock() {
        s.remove(&begin.id);
    }
    if let Ok(mut p) = agent.page_maps.lock() {
        p.remove(&begin.id);
    }
    let outcome = match (&result, session.restored) {
        (Ok(true), Some(_)) => "committed",
        (Err(_), None) => "failed",
        _ => "aborted",
    };
    metrics
        .migrations
        .get_or_create(&crate::metrics::OutcomeLabel { outcome })
        .inc();
    metrics
        .migration_phase_seconds
        .get_or_create(&crate::metrics::PhaseLabel { phase: "session" })
        .observe(began.elapsed().as_secs_f64());
    match (&result, session.restored) {
        (Ok(true), Some(pid)) => {
            tracing::info!(session = %begin.id, pid, "migration committed; the application runs here");
        }
        (_, Some(pid)) => {
            // Restored but never committed: the source may resume (once it
            // learns this), so this copy must not run.
            tracing::warn!(session = %begin.id, pid, "session ended before commit: aborting it, the restored copy removed");
            let _ = agent.outcomes.abort(&begin.id);
        }
        (_, None) => tracing::info!(session = %begin.id, "session ended without a restore"),
    }
    result.map(|_| ())
}

/// Whether this host can take the migration: room for its pages, GPUs.
fn admit(agent: &Agent, begin: &Begin) -> Result<(), SessionError> {
    if !valid_id(&begin.id) {
        return Err(SessionError::BadId(begin.id.clone()));
    }
    let free = free_bytes(&agent.config.store);
    // Pages go to the store and again into the rebuilt images.
    let need = begin
        .expected_bytes
        .saturating_mul(2)
        .saturating_add(ROOM_MARGIN_BYTES);
    if free < need {
        return Err(SessionError::NoRoom {
            need,
            free,
            dir: agent.config.store.clone(),
        });
    }
    if let Some(needs) = &begin.gpu {
        let record = ferry_image::gpu_record::GpuRecord::try_from((**needs).clone())
            .map_err(SessionError::GpuRecord)?;
        if record.carried_by != ferry_image::gpu_record::CarriedBy::Ignored {
            ferry_core::gpu::check_compatible(&record, &ferry_core::gpu::probe())
                .map_err(SessionError::Gpu)?;
        }
    }
    Ok(())
}

pub fn free_bytes(dir: &Path) -> u64 {
    let _ = fs::create_dir_all(dir);
    staging::available(dir).unwrap_or(0)
}

struct Session<'a> {
    agent: &'a Agent,
    target: Target,
    id: String,
    dir: PathBuf,
    files: Vec<(ImageEntry, Vec<u8>)>,
    /// The rebuilt images (staging, removed when the session ends).
    images: Option<tempfile::TempDir>,
    /// A container's files unpacked ahead of the restore, in its engine's
    /// own temporary directory (moved into place by the restore; what is
    /// left goes with the session).
    prepared: Vec<tempfile::TempDir>,
    restored: Option<i32>,
    /// The HA service an `ha move` carries here (journaled with the commit).
    ha_service: Option<String>,
    /// When the final images arrived (the frozen phase, as seen here).
    final_at: Option<Instant>,
    /// Post-copy: the daemon still delivering the restored tree's memory.
    lazy: Option<ferry_criu::LazyPages>,
    /// Post-copy from a lazy dump: the relay of the daemon's page requests
    /// to the source.
    relay: Option<PageRelay>,
    /// Pages images laid out ahead, by pid.
    ahead: std::collections::HashMap<i32, super::rebuild::Ahead>,
    expected_bytes: u64,
    same_kernel: bool,
    kernel_proof: Option<String>,
}

impl Session<'_> {
    /// Ok(true) once committed.
    fn run(&mut self, conn: &mut Conn) -> Result<bool, AgentError> {
        conn.send_msg(&Msg::Accepted {
            host: self.agent.host.clone(),
            boot_id: self.agent.boot_id.clone(),
            free_bytes: free_bytes(&self.agent.config.store),
            kernel_proof: self.kernel_proof.clone(),
        })?;
        loop {
            let msg = match conn.recv_msg() {
                Ok(m) => m,
                Err(TransportError::Closed { .. }) => return Ok(false),
                Err(e) => return Err(e.into()),
            };
            match msg {
                Msg::Query { count } => {
                    let digests = pages::decode_digests(&conn.recv_blob()?)
                        .map_err(|e| self.bad(conn, e.to_string()))?;
                    if digests.len() as u64 != count {
                        return Err(self.bad(conn, "digest count mismatch".into()));
                    }
                    let missing: Vec<bool> = digests
                        .iter()
                        .map(|d| !self.agent.store.contains(*d))
                        .collect();
                    conn.send_msg(&Msg::Missing { count })?;
                    conn.send_blob(&pages::encode_bitmap(&missing))?;
                }
                Msg::Layout { pid, count } => {
                    let blob = conn.recv_blob()?;
                    let reply = self.lay_out(pid, count, &blob);
                    conn.send_msg(&answer(reply))?;
                }
                Msg::FilesBase { name, bytes } => {
                    let reply = self.files_base(conn, &name, bytes);
                    conn.send_msg(&answer(reply))?;
                }
                Msg::Images { files } => {
                    self.final_at = Some(Instant::now());
                    self.files.clear();
                    for f in files {
                        if f.name.contains('/') || f.name.starts_with('.') || f.name.is_empty() {
                            return Err(self.bad(conn, format!("bad image name '{}'", f.name)));
                        }
                        let blob = conn.recv_blob()?;
                        crate::metrics::get()
                            .received_bytes
                            .inc_by(blob.len() as u64);
                        self.files.push((f, blob));
                    }
                }
                Msg::Rebuild => {
                    ferry_core::fault::point("agent-before-rebuild");
                    let reply = self.rebuild();
                    conn.send_msg(&answer(reply))?;
                }
                Msg::Restore { opts } => {
                    let reply = self.restore(&opts);
                    conn.send_msg(&answer(reply))?;
                    conn.set_read_timeout(Some(COMMIT_TIMEOUT))?;
                }
                Msg::Commit => {
                    ferry_core::fault::point("agent-before-commit");
                    let Some(pid) = self.restored else {
                        conn.send_msg(&Msg::Error {
                            message: "commit before a restore".into(),
                        })?;
                        continue;
                    };
                    // Journaled before the copy may run: once this returns
                    // the source is told, however late, that it committed.
                    let service = self.ha_service.as_deref();
                    if self.agent.outcomes.commit(&self.id, pid, service)
                        == outcome::Decision::Aborted
                    {
                        conn.send_msg(&Msg::Error {
                            message: "the migration was aborted here before its commit (its outcome was asked for); the restored copy is gone".into(),
                        })?;
                        self.restored = None;
                        return Ok(false);
                    }
                    ferry_core::fault::point("agent-after-commit-journaled");
                    // A process tree was restored stopped; runc restores
                    // containers running (it has no leave-stopped).
                    ferry_image::process::continue_tree(pid);
                    if ferry_core::fault::fails("agent-drop-committed") {
                        // As if the answer were lost on the way.
                        self.keep();
                        return Ok(true);
                    }
                    conn.send_msg(&Msg::Committed)?;
                    if let Some(t) = self.final_at {
                        crate::metrics::get()
                            .migration_phase_seconds
                            .get_or_create(&crate::metrics::PhaseLabel { phase: "final" })
                            .observe(t.elapsed().as_secs_f64());
                    }
                    self.keep();
                    return Ok(true);
                }
                other => {
                    let m = format!("unexpected {} in a migration", other.kind());
                    return Err(self.bad(conn, m));
                }
            }
        }
    }

    fn bad(&self, conn: &mut Conn, message: String) -> AgentError {
        let _ = conn.send_msg(&Msg::Error {
            message: message.clone(),
        });
        AgentError::Transport(TransportError::BadFrame {
            peer: conn.peer().to_string(),
            what: message,
        })
    }

    /// The staging directory of this session's images, made on first use.
    fn staging(&mut self, need: u64) -> Result<&Path, SessionError> {
        if self.images.is_none() {
            let stage = staging::create(STAGING_PREFIX, need, self.agent.config.staging.as_deref())
                .map_err(SessionError::Staging)?;
            self.images = Some(stage);
        }
        Ok(self
            .images
            .as_ref()
            .map(|t| t.path())
            .unwrap_or(Path::new("/")))
    }

    /// A container's files as they were while it ran, kept beside the
    /// images as `name` (the final images name it as their base).
    fn files_base(&mut self, conn: &mut Conn, name: &str, bytes: u64) -> Result<Msg, SessionError> {
        let limit = bytes.saturating_add(bytes / 2).saturating_add(16 << 20);
        let dir = self
            .staging(limit.saturating_add(self.expected_bytes))?
            .to_path_buf();
        let path = dir.join(name);
        let bad = |what: String| SessionError::Files { what };
        if !name.starts_with(ferry_core::target::fs::BASE_PREFIX)
            || !ferry_core::target::fs::is_fs_file(name)
        {
            return Err(bad(format!(
                "'{name}' is not a name for a container's files"
            )));
        }
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| bad(format!("cannot create {}: {e}", path.display())))?;
        let mut got = 0u64;
        loop {
            let blob = conn
                .recv_blob()
                .map_err(|e| bad(format!("receiving '{name}': {e}")))?;
            if blob.is_empty() {
                break;
            }
            got += blob.len() as u64;
            if got > limit {
                return Err(bad(format!(
                    "'{name}' passed {got} bytes, announced {bytes}: refused"
                )));
            }
            std::io::Write::write_all(&mut file, &blob)
                .map_err(|e| bad(format!("cannot write {}: {e}", path.display())))?;
        }
        crate::metrics::get().received_bytes.inc_by(got);
        drop(file);
        tracing::info!(session = %self.id, name, bytes = got, "a container's files arrived ahead of the freeze");
        self.prepare_files(&path);
        Ok(Msg::FilesStored { bytes: got })
    }

    /// Unpacks a Docker container's files that arrived ahead into the
    /// engine's temporary directory (the filesystem of its layers and
    /// volumes), linked beside the tar: the restore then moves the tree
    /// into place instead of unpacking it while the container is frozen.
    /// Where that cannot be done, the restore unpacks the tar itself.
    fn prepare_files(&mut self, tar: &Path) {
        use ferry_core::target::fs as files;
        if !matches!(self.target, Target::Docker { .. }) {
            return;
        }
        let t = Instant::now();
        let prepared = ferry_core::target::docker::engine_tmp(&self.agent.config.docker_socket)
            .map_err(|e| e.to_string())
            .and_then(|tmp| {
                std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
                let dir = tempfile::Builder::new()
                    .prefix("ferry-files-")
                    .tempdir_in(&tmp)
                    .map_err(|e| e.to_string())?;
                let tree = dir.path().join("tree");
                files::prepare(tar, &tree).map_err(|e| units::chain(&e))?;
                let mut link = tar.as_os_str().to_owned();
                link.push(files::PREPARED_SUFFIX);
                std::os::unix::fs::symlink(&tree, &link).map_err(|e| e.to_string())?;
                Ok(dir)
            });
        match prepared {
            Ok(dir) => {
                tracing::info!(session = %self.id, tar = %tar.display(), ms = t.elapsed().as_secs_f64() * 1e3, "a container's files unpacked ahead of the restore");
                self.prepared.push(dir);
            }
            Err(e) => {
                tracing::warn!(session = %self.id, tar = %tar.display(), error = %e, "cannot unpack a container's files ahead: the restore unpacks them")
            }
        }
    }

    fn lay_out(&mut self, pid: i32, count: u64, blob: &[u8]) -> Result<Msg, SessionError> {
        let start = Instant::now();
        let (vaddrs, digests) = pages::decode_layout(count, blob)
            .map_err(|source| SessionError::LayoutDigests { pid, source })?;
        let need = self.expected_bytes;
        let path = self.staging(need)?.join(format!("ahead-{pid}.pages"));
        let ahead = super::rebuild::lay_out(&self.agent.store, &path, vaddrs, digests)?;
        self.ahead.insert(pid, ahead);
        Ok(Msg::LayoutReady {
            ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Writes every image file, page files from the store, and checks
    /// every checksum. Nothing is left behind on failure.
    fn rebuild(&mut self) -> Result<Msg, SessionError> {
        let start = Instant::now();
        let need: u64 = self.files.iter().map(|(f, _)| f.size).sum();
        let dir = self.staging(need)?.to_path_buf();
        let done = super::rebuild::rebuild(&self.agent.store, &self.files, &dir, &mut self.ahead);
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                self.images = None;
                return Err(e.into());
            }
        };
        tracing::info!(session = %self.id, files = self.files.len(), bytes = done.bytes, in_place = done.pages_in_place, from_store = done.pages_from_store, "images rebuilt and verified");
        Ok(Msg::Rebuilt {
            ms: start.elapsed().as_secs_f64() * 1e3,
            bytes: done.bytes,
            pages_from_store: done.pages_from_store,
            pages_in_place: done.pages_in_place,
            images: dir.display().to_string(),
        })
    }

    /// With `--keep-images`: the committed images go under the store, as
    /// `images` once complete (copied beside it first, then renamed).
    fn keep(&self) {
        let (true, Some(stage)) = (self.agent.config.keep_images, &self.images) else {
            return;
        };
        let to = self.dir.join("images");
        let partial = self.dir.join("images.partial");
        let copied = fs::create_dir_all(&partial).and_then(|_| {
            for e in fs::read_dir(stage.path())? {
                let e = e?;
                // Files only: a lazy restore leaves its daemon's socket.
                if e.file_type()?.is_file() {
                    fs::copy(e.path(), partial.join(e.file_name()))?;
                }
            }
            fs::rename(&partial, &to)
        });
        if let Err(e) = copied {
            tracing::warn!(session = %self.id, error = %e, "cannot keep the images");
        }
    }
}

impl Session<'_> {
    /// The container to restore into (and the runc bundle), unless the
    /// target is a process tree.
    fn container(&self) -> Option<(ContainerRef, Option<std::path::PathBuf>)> {
        match &self.target {
            Target::Process { .. } => None,
            Target::Runc { id, bundle } => Some((
                ContainerRef::Runc {
                    id: id.clone(),
                    root: self.agent.config.runc_root.clone(),
                },
                bundle.clone(),
            )),
            Target::Docker { name } => Some((
                ContainerRef::Docker {
                    name: name.clone(),
                    socket: self.agent.config.docker_socket.clone(),
                },
                None,
            )),
        }
    }

    /// Removes an uncommitted restored copy.
    fn discard(&self, pid: i32) {
        let removed = match self.container() {
            Some((ContainerRef::Runc { id, root }, _)) => {
                ferry_core::target::runc::delete(&root, &id).map_err(|e| units::chain(&e))
            }
            Some((ContainerRef::Docker { name, socket }, _)) => {
                ferry_core::target::docker::remove(&socket, &name).map_err(|e| units::chain(&e))
            }
            Some((ContainerRef::Podman { .. }, _)) | None => return kill_tree(pid),
        };
        if let Err(e) = removed {
            tracing::warn!(error = %e, "cannot remove the restored container; killing its tasks");
            kill_tree(pid);
        }
    }
}

/// A step's reply: its message, or the error's text.
fn answer(step: Result<Msg, SessionError>) -> Msg {
    step.unwrap_or_else(|e| Msg::Error { message: e.reply() })
}

fn kill_tree(pid: i32) {
    ferry_image::process::kill_all(&ferry_image::process::tree(pid).unwrap_or_else(|_| vec![pid]));
}
