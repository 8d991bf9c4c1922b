//! One migration as the agent sees it: the control connection's messages
//! (room check, digest queries, images, rebuild, restore, commit) and the
//! data connections that bring pages.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::page_source::PageRelay;
use super::server::{msg_name, Agent};
use super::AgentError;
use crate::checkpoint::staging;
use crate::criu::page_server::PageSourceListener;
use crate::criu::{Criu, NoHooks, RestoreRequest};
use crate::target::runc::RestoreFlags;
use crate::target::ContainerRef;
use crate::transport::msg::{ImageEntry, RestoreOpts, Target};
use crate::transport::pages;
use crate::transport::{Conn, Incoming, Msg, TransportError};

/// A connection silent for this long is dead (a pre-copy round of a large
/// application over a slow link keeps the control stream quiet for a while).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a restored (stopped) copy waits for the source's commit
/// before it is killed.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Name prefix of the agent's staging directories.
pub const STAGING_PREFIX: &str = "ferry-agent-";
/// Longest time post-copy may take to make all memory resident.
const LAZY_COMPLETION_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the lazy-pages daemon may run before the restore starts
/// anyway (each takes ~35 ms to come up here; CRIU needs the daemon's
/// socket near the end of that).
const LAZY_HEAD_START: Duration = Duration::from_millis(10);
/// How long the lazy-pages daemon may take to listen.
const LAZY_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a lazy restore waits for its page-source connection.
const PAGE_SOURCE_WAIT: Duration = Duration::from_secs(10);
/// Room kept free beyond what a migration says it needs.
const ROOM_MARGIN_BYTES: u64 = 64 << 20;

pub struct Begin {
    pub id: String,
    pub target: Target,
    pub expected_bytes: u64,
    pub source_host: String,
    /// The source runs on this kernel (lab namespaces): it is killed before
    /// the restore, and if the restore fails it restores from this
    /// session's images, which must then stay whole.
    pub same_kernel: bool,
    pub gpu: Option<Box<crate::gpu::GpuRecord>>,
}

/// The session's directory under the store.
fn session_dir(agent: &Agent, id: &str) -> PathBuf {
    agent.config.store.join("checkpoints").join(id)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Serves a migration's control connection until commit or failure.
pub fn serve_control(agent: &Agent, mut conn: Conn, begin: Begin) -> Result<(), AgentError> {
    if let Err(why) = admit(agent, &begin) {
        tracing::warn!(session = %begin.id, from = %begin.source_host, %why, "migration refused");
        conn.send_msg(&Msg::Error { message: why })?;
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
        restored: None,
        lazy: None,
        relay: None,
        ahead: Default::default(),
        expected_bytes: begin.expected_bytes,
        same_kernel: begin.same_kernel,
    };
    let result = session.run(&mut conn);
    if let Ok(mut s) = agent.sessions.lock() {
        s.remove(&begin.id);
    }
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
                tracing::error!(session = %begin.id, %why, "post-copy FAILED: the page relay to the source broke; killing the restored copy (the source resumes from the dump)");
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
    match (&result, session.restored) {
        (Ok(true), Some(pid)) => {
            tracing::info!(session = %begin.id, pid, "migration committed; the application runs here");
        }
        (_, Some(pid)) => {
            // Restored but never committed: the source may resume, so this
            // copy must not run.
            tracing::warn!(session = %begin.id, pid, "session ended before commit: killing the restored copy");
            session.discard(pid);
        }
        (_, None) => tracing::info!(session = %begin.id, "session ended without a restore"),
    }
    result.map(|_| ())
}

/// Whether this host can take the migration: room for its pages, GPUs.
fn admit(agent: &Agent, begin: &Begin) -> Result<(), String> {
    if !valid_id(&begin.id) {
        return Err(format!("bad session id '{}'", begin.id));
    }
    let free = free_bytes(&agent.config.store);
    // Pages go to the store and again into the rebuilt images.
    let need = begin.expected_bytes.saturating_mul(2) + ROOM_MARGIN_BYTES;
    if free < need {
        return Err(format!(
            "no room: the migration needs about {} in {} and {} is free",
            crate::units::bytes(need),
            agent.config.store.display(),
            crate::units::bytes(free)
        ));
    }
    if let Some(record) = &begin.gpu {
        if record.carried_by != "ignored" {
            crate::gpu::check_compatible(record, &crate::gpu::probe())
                .map_err(|e| format!("GPUs here cannot take this application: {e}"))?;
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
    restored: Option<i32>,
    /// Post-copy: the daemon still delivering the restored tree's memory.
    lazy: Option<crate::criu::LazyPages>,
    /// Post-copy from a lazy dump: the relay of the daemon's page requests
    /// to the source.
    relay: Option<PageRelay>,
    /// Pages images laid out ahead, by pid.
    ahead: std::collections::HashMap<i32, super::rebuild::Ahead>,
    expected_bytes: u64,
    same_kernel: bool,
}

impl Session<'_> {
    /// Ok(true) once committed.
    fn run(&mut self, conn: &mut Conn) -> Result<bool, AgentError> {
        conn.send_msg(&Msg::Accepted {
            host: self.agent.host.clone(),
            boot_id: self.agent.boot_id.clone(),
            free_bytes: free_bytes(&self.agent.config.store),
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
                    let reply = match self.lay_out(pid, count, &blob) {
                        Ok(r) => r,
                        Err(message) => Msg::Error { message },
                    };
                    conn.send_msg(&reply)?;
                }
                Msg::Images { files } => {
                    self.files.clear();
                    for f in files {
                        if f.name.contains('/') || f.name.starts_with('.') || f.name.is_empty() {
                            return Err(self.bad(conn, format!("bad image name '{}'", f.name)));
                        }
                        let blob = conn.recv_blob()?;
                        self.files.push((f, blob));
                    }
                }
                Msg::Rebuild => {
                    crate::fault::point("agent-before-rebuild");
                    let reply = match self.rebuild() {
                        Ok(r) => r,
                        Err(message) => Msg::Error { message },
                    };
                    conn.send_msg(&reply)?;
                }
                Msg::Restore { opts } => {
                    let reply = match self.restore(&opts) {
                        Ok(r) => r,
                        Err(message) => Msg::Error { message },
                    };
                    conn.send_msg(&reply)?;
                    conn.set_read_timeout(Some(COMMIT_TIMEOUT))?;
                }
                Msg::Commit => {
                    crate::fault::point("agent-before-commit");
                    let Some(pid) = self.restored else {
                        conn.send_msg(&Msg::Error {
                            message: "commit before a restore".into(),
                        })?;
                        continue;
                    };
                    // A process tree was restored stopped; runc restores
                    // containers running (it has no leave-stopped).
                    crate::process::continue_tree(pid);
                    conn.send_msg(&Msg::Committed)?;
                    self.keep();
                    return Ok(true);
                }
                other => {
                    let m = format!("unexpected {} in a migration", msg_name(&other));
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
    fn staging(&mut self, need: u64) -> Result<&Path, String> {
        if self.images.is_none() {
            let stage = staging::create(STAGING_PREFIX, need, self.agent.config.staging.as_deref())
                .map_err(|e| format!("cannot create a staging directory: {e}"))?;
            self.images = Some(stage);
        }
        Ok(self
            .images
            .as_ref()
            .map(|t| t.path())
            .unwrap_or(Path::new("/")))
    }

    fn lay_out(&mut self, pid: i32, count: u64, blob: &[u8]) -> Result<Msg, String> {
        let start = Instant::now();
        let n = count as usize;
        if blob.len() != n * 24 {
            return Err(format!(
                "layout of pid {pid}: {} bytes for {n} pages",
                blob.len()
            ));
        }
        let vaddrs = blob[..n * 8]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let digests = pages::decode_digests(&blob[n * 8..]).map_err(|e| e.to_string())?;
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
    fn rebuild(&mut self) -> Result<Msg, String> {
        let start = Instant::now();
        let need: u64 = self.files.iter().map(|(f, _)| f.size).sum();
        let dir = self.staging(need)?.to_path_buf();
        let done = super::rebuild::rebuild(&self.agent.store, &self.files, &dir, &mut self.ahead);
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                self.images = None;
                return Err(e);
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

    /// The page-source connection the source opened for this session
    /// (it comes on a connection of its own, just before the restore).
    fn take_page_source(&self) -> Result<Conn, String> {
        let deadline = Instant::now() + PAGE_SOURCE_WAIT;
        loop {
            if let Some(conn) = self
                .agent
                .page_sources
                .lock()
                .ok()
                .and_then(|mut p| p.remove(&self.id))
            {
                return Ok(conn);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "post-copy from a lazy dump, but no page-source connection came within {PAGE_SOURCE_WAIT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn restore(&mut self, opts: &RestoreOpts) -> Result<Msg, String> {
        if self.restored.is_some() {
            return Err("already restored".into());
        }
        let Some(images) = &self.images else {
            return Err("restore before the images were rebuilt".into());
        };
        let criu = Criu::locate(
            self.agent.config.criu.as_deref(),
            self.agent.config.criu_service.as_deref(),
        )
        .map_err(|e| crate::units::chain(&e))?;
        let req = RestoreRequest {
            tcp_established: opts.tcp_established,
            shell_job: opts.shell_job,
            ext_unix_sk: opts.ext_unix_sk,
            file_locks: opts.file_locks,
            log_level: opts.log_level,
            leave_stopped: true,
            ..RestoreRequest::new(images.path())
        };
        let start = Instant::now();
        if let Some((container, bundle)) = self.container() {
            if opts.lazy_pages {
                return Err("post-copy is not supported for containers".into());
            }
            let restored = crate::checkpoint::restore_container(
                &container,
                crate::checkpoint::Source::Dir(images.path()),
                bundle.as_deref(),
                RestoreFlags {
                    tcp_established: opts.tcp_established,
                    ext_unix_sk: opts.ext_unix_sk,
                    file_locks: opts.file_locks,
                    consume_images: false,
                },
            )
            .map_err(|e| crate::units::chain(&e))?;
            self.restored = Some(restored.pid);
            tracing::info!(session = %self.id, container = %container.describe(), pid = restored.pid, "container restored");
            return Ok(Msg::Restored {
                pid: restored.pid,
                ms: start.elapsed().as_secs_f64() * 1e3,
                stats: None,
            });
        }
        if opts.lazy_pages {
            // From a lazy dump the pages come from the source's frozen
            // tree, relayed by ferry; otherwise from the rebuilt images.
            let page_source = if opts.remote_pages {
                let conn = self.take_page_source()?;
                let listener = PageSourceListener::bind()
                    .map_err(|e| format!("cannot listen for the lazy-pages daemon: {e}"))?;
                let port = listener
                    .port()
                    .map_err(|e| format!("cannot listen for the lazy-pages daemon: {e}"))?;
                self.relay = Some(PageRelay::start(conn, listener));
                Some(port)
            } else {
                None
            };
            // Hardly waited for: CRIU's restore takes about as long to
            // need the daemon's socket as the daemon takes to make it
            // (~35 ms each), so they start 10 ms apart. Should CRIU get
            // there first, it fails before it restored anything, and the
            // restore is tried again below.
            self.lazy = Some(
                criu.spawn_lazy_pages(images.path(), page_source)
                    .map_err(|e| crate::units::chain(&e))?,
            );
        }
        let req = RestoreRequest {
            lazy_pages: opts.lazy_pages,
            // The staged images serve this restore only (unless they are
            // to be kept, or a lazy restore reads them later): each page
            // is punched out as CRIU restores it, so the memory it frees
            // is what the next pages are restored into. A failed restore
            // needs them no more: the source still has the application
            // (but on one kernel, where the source is gone and restores
            // from these images if this restore fails).
            consume_images: !opts.lazy_pages && !self.agent.config.keep_images && !self.same_kernel,
            ..req
        };
        if let Some(lazy) = self.lazy.as_mut() {
            // A head start: the daemon usually listens before CRIU needs it
            // then, and a lost race costs a whole second restore.
            let _ = lazy.wait_listening(LAZY_HEAD_START);
        }
        let daemon_was_up = self.lazy.as_ref().is_none_or(|l| l.listening());
        let mut restored = crate::checkpoint::restore(&criu, &req, &mut NoHooks);
        if let (Err(e), false, Some(lazy)) = (&restored, daemon_was_up, self.lazy.as_mut()) {
            tracing::info!(session = %self.id, error = %crate::units::chain(e), "the lazy restore may have come before its daemon listened; trying again once it does");
            lazy.wait_listening(LAZY_START_TIMEOUT)
                .map_err(|e| crate::units::chain(&e))?;
            restored = crate::checkpoint::restore(&criu, &req, &mut NoHooks);
        }
        let outcome = restored.map_err(|e| {
            let lines = e
                .criu()
                .map(|c| c.log_errors().join("; "))
                .unwrap_or_default();
            format!("{} {lines}", crate::units::chain(&e))
        })?;
        self.restored = Some(outcome.pid);
        tracing::info!(session = %self.id, pid = outcome.pid, "restored (stopped until commit)");
        Ok(Msg::Restored {
            pid: outcome.pid,
            ms: start.elapsed().as_secs_f64() * 1e3,
            stats: outcome
                .stats
                .as_ref()
                .and_then(|s| serde_json::to_value(s).ok()),
        })
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
                crate::target::runc::delete(&root, &id).map_err(|e| e.to_string())
            }
            Some((ContainerRef::Docker { name, socket }, _)) => {
                crate::target::docker::remove(&socket, &name).map_err(|e| e.to_string())
            }
            None => Err(String::new()),
        };
        if let Err(e) = removed {
            if !e.is_empty() {
                tracing::warn!(error = %e, "cannot remove the restored container; killing its tasks");
            }
            kill_tree(pid);
        }
    }
}

fn kill_tree(pid: i32) {
    crate::process::kill_all(&crate::process::tree(pid).unwrap_or_else(|_| vec![pid]));
}

/// A data connection: page batches, each checked, into the store.
pub fn serve_data(agent: &Agent, mut conn: Conn, session: &str) -> Result<(), AgentError> {
    let counter = agent
        .sessions
        .lock()
        .ok()
        .and_then(|s| s.get(session).cloned());
    let Some(counter) = counter else {
        conn.send_msg(&Msg::Error {
            message: format!("no open session '{session}'"),
        })?;
        return Ok(());
    };
    conn.send_msg(&Msg::Accepted {
        host: agent.host.clone(),
        boot_id: agent.boot_id.clone(),
        free_bytes: free_bytes(&agent.config.store),
    })?;
    loop {
        match conn.recv() {
            Ok(Some(Incoming::Pages(batch))) => {
                let (digests, data) = match pages::decode_batch(&batch) {
                    Ok(x) => x,
                    Err(e) => {
                        let message = format!("bad page batch: {e}");
                        conn.send_msg(&Msg::Error {
                            message: message.clone(),
                        })?;
                        return Err(TransportError::BadFrame {
                            peer: conn.peer().to_string(),
                            what: message,
                        }
                        .into());
                    }
                };
                if let Err(e) = agent.store.put_batch(&digests, data) {
                    let message = format!(
                        "cannot store pages in {}: {e}",
                        agent.store.path().display()
                    );
                    conn.send_msg(&Msg::Error { message })?;
                    return Ok(());
                }
                counter.fetch_add(digests.len() as u64, Ordering::Relaxed);
            }
            Ok(Some(Incoming::Msg(Msg::Flush))) => {
                conn.send_msg(&Msg::Flushed {
                    pages: counter.load(Ordering::Relaxed),
                })?;
            }
            Ok(Some(other)) => {
                let what = format!("unexpected {other:?} on a data stream");
                conn.send_msg(&Msg::Error {
                    message: what.clone(),
                })?;
                return Err(TransportError::BadFrame {
                    peer: conn.peer().to_string(),
                    what,
                }
                .into());
            }
            Ok(None) | Err(TransportError::Closed { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}
