//! A migration's restore on the agent: into a container through its engine,
//! or a process tree through CRIU (post-copy: with the lazy-pages daemon,
//! its pages relayed from the source or read from the rebuilt images). The
//! restored copy stays stopped until the source commits.

use std::path::Path;
use std::time::{Duration, Instant};

use super::outcome::Copy;
use super::{Session, SessionError};
use crate::page_source::PageRelay;
use ferry_core::checkpoint::{self, Source};
use ferry_core::target::runc::RestoreFlags;
use ferry_core::target::ContainerRef;
use ferry_criu::{Criu, RestoreRequest};
use ferry_transport::msg::RestoreOpts;
use ferry_transport::{Conn, Msg};

/// How long the lazy-pages daemon may run before the restore starts
/// anyway (each takes ~35 ms to come up here; CRIU needs the daemon's
/// socket near the end of that).
const LAZY_HEAD_START: Duration = Duration::from_millis(10);
/// How long the lazy-pages daemon may take to listen.
const LAZY_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a lazy restore waits for its page-source connection.
const PAGE_SOURCE_WAIT: Duration = Duration::from_secs(10);

impl Session<'_> {
    /// Restores what the source sent, stopped until the commit.
    pub(super) fn restore(&mut self, opts: &RestoreOpts) -> Result<Msg, SessionError> {
        if self.restored.is_some() {
            return Err(SessionError::AlreadyRestored);
        }
        let Some(images) = self.images.as_ref().map(|t| t.path().to_path_buf()) else {
            return Err(SessionError::NotRebuilt);
        };
        let start = Instant::now();
        let container = self.container();
        if container.is_some() && opts.lazy_pages {
            return Err(SessionError::LazyContainer);
        }
        // Journaled first: an agent that dies during the restore removes
        // the copy when it starts again.
        let copy = match &container {
            Some((c, _)) => Copy::container(c),
            None => Copy::Tree { pid: 0, start: 0 },
        };
        self.agent
            .outcomes
            .restoring(&self.id, copy.clone())
            .map_err(SessionError::Decided)?;
        let restored = match container {
            Some((container, bundle)) => self
                .restore_container(&images, &container, bundle.as_deref(), opts)
                .map(|pid| (pid, None)),
            None => self.restore_tree(&images, opts),
        };
        let (pid, stats) = match restored {
            Ok(r) => r,
            Err(e) => {
                self.agent.outcomes.restored(&self.id, None);
                return Err(e);
            }
        };
        let copy = match copy {
            Copy::Tree { .. } => Copy::tree(pid),
            c => c,
        };
        self.agent.outcomes.restored(&self.id, Some(copy));
        self.restored = Some(pid);
        self.ha_service = opts.ha_service.clone();
        crate::metrics::get()
            .migration_phase_seconds
            .get_or_create(&crate::metrics::PhaseLabel { phase: "restore" })
            .observe(start.elapsed().as_secs_f64());
        Ok(Msg::Restored {
            pid,
            ms: start.elapsed().as_secs_f64() * 1e3,
            stats,
        })
    }

    /// Hands the images to the container's engine (runc restores running:
    /// it has no leave-stopped).
    fn restore_container(
        &self,
        images: &Path,
        container: &ContainerRef,
        bundle: Option<&Path>,
        opts: &RestoreOpts,
    ) -> Result<i32, SessionError> {
        if !opts.criu.is_empty() {
            return Err(SessionError::Decided(
                "CRIU options are not passed through runc or Docker on a container's restore"
                    .into(),
            ));
        }
        let restored = checkpoint::restore_container(
            container,
            Source::Dir(images),
            bundle,
            RestoreFlags {
                tcp_established: opts.tcp_established,
                ext_unix_sk: opts.ext_unix_sk,
                file_locks: opts.file_locks,
                consume_images: false,
            },
        )
        .map_err(|e| SessionError::Restore(Box::new(e)))?;
        tracing::info!(session = %self.id, container = %container.describe(), pid = restored.pid, "container restored");
        Ok(restored.pid)
    }

    /// Restores a process tree with CRIU, left stopped; post-copy starts
    /// the lazy-pages daemon first.
    fn restore_tree(
        &mut self,
        images: &Path,
        opts: &RestoreOpts,
    ) -> Result<(i32, Option<serde_json::Value>), SessionError> {
        let criu = Criu::locate(
            self.agent.config.criu.as_deref(),
            self.agent.config.criu_service.as_deref(),
        )?;
        // An HA service moved here: CRIU reopens its log by path.
        if let (Some(svc), Some(m)) = (&opts.ha_service, &self.agent.ha) {
            let log = crate::ha::copy::service_log(m.cluster(), svc);
            if let Err(e) = crate::ha::copy::open_log(&log) {
                tracing::warn!(service = %svc, error = %ferry_image::units::chain(&e), "cannot create the moved service's log");
            }
        }
        if opts.lazy_pages {
            self.start_lazy(&criu, images, opts.remote_pages)?;
        }
        let req = RestoreRequest {
            tcp_established: opts.tcp_established,
            shell_job: opts.shell_job,
            ext_unix_sk: opts.ext_unix_sk,
            file_locks: opts.file_locks,
            log_level: opts.log_level,
            leave_stopped: true,
            lazy_pages: opts.lazy_pages,
            // The staged images serve this restore only (unless they are
            // to be kept, or a lazy restore reads them later): each page
            // is punched out as CRIU restores it, so the memory it frees
            // is what the next pages are restored into. A failed restore
            // needs them no more: the source still has the application
            // (but on one kernel, where the source is gone and restores
            // from these images if this restore fails).
            consume_images: !opts.lazy_pages && !self.agent.config.keep_images && !self.same_kernel,
            options: criu_options(&opts.criu)?,
            ..RestoreRequest::new(images)
        };
        if let Some(lazy) = self.lazy.as_mut() {
            // A head start: the daemon usually listens before CRIU needs it
            // then, and a lost race costs a whole second restore.
            let _ = lazy.wait_listening(LAZY_HEAD_START);
        }
        let daemon_was_up = self.lazy.as_ref().is_none_or(|l| l.listening());
        // CRIU names the restored root at `post-restore` and waits for
        // the answer; an agent that died before answering makes CRIU's
        // restore fail, which kills the tree. So the root is journaled
        // before the answer: an agent killed after it (CRIU then finishes
        // and leaves the tree stopped) kills that tree when it starts
        // again.
        let (outcomes, id) = (&self.agent.outcomes, self.id.clone());
        let mut journal_root =
            move |n: &mut ferry_criu::Notification| -> Result<(), ferry_criu::HookError> {
                if let (ferry_criu::Script::PostRestore, Some(pid)) = (&n.script, n.pid) {
                    outcomes.restoring_root(&id, Copy::tree(pid))?;
                }
                Ok(())
            };
        let mut restored = checkpoint::restore(&criu, &req, &mut journal_root);
        if let (Err(e), false, Some(lazy)) = (&restored, daemon_was_up, self.lazy.as_mut()) {
            tracing::info!(session = %self.id, error = %ferry_image::units::chain(e), "the lazy restore may have come before its daemon listened; trying again once it does");
            lazy.wait_listening(LAZY_START_TIMEOUT)?;
            restored = checkpoint::restore(&criu, &req, &mut journal_root);
        }
        let outcome = restored.map_err(|e| SessionError::Restore(Box::new(e)))?;
        ferry_core::fault::point("agent-after-criu-restore");
        tracing::info!(session = %self.id, pid = outcome.pid, "restored (stopped until commit)");
        let stats = outcome
            .stats
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok());
        Ok((outcome.pid, stats))
    }

    /// Post-copy: starts the lazy-pages daemon, its pages relayed from the
    /// source's frozen tree (a lazy dump) or read from the rebuilt images.
    ///
    /// Hardly waited for: CRIU's restore takes about as long to need the
    /// daemon's socket as the daemon takes to make it (~35 ms each), so
    /// they start 10 ms apart. Should CRIU get there first, it fails
    /// before it restored anything, and the restore is tried again.
    fn start_lazy(
        &mut self,
        criu: &Criu,
        images: &Path,
        remote_pages: bool,
    ) -> Result<(), SessionError> {
        let page_source = if remote_pages {
            let conn = self.take_page_source()?;
            // The daemon gets its end as a descriptor: no port for another
            // local user to reach first.
            let (ours, theirs) =
                ferry_sys::net::loopback_pair().map_err(SessionError::PageSourceListen)?;
            self.relay = Some(PageRelay::start(
                conn,
                ours,
                crate::page_source::Local {
                    store: std::sync::Arc::clone(&self.agent.store),
                    maps: std::sync::Arc::clone(&self.agent.page_maps),
                    session: self.id.clone(),
                    images: images.to_path_buf(),
                },
            ));
            Some(theirs.into())
        } else {
            None
        };
        self.lazy = Some(criu.spawn_lazy_pages(images, page_source)?);
        Ok(())
    }

    /// The page-source connection the source opened for this session
    /// (it comes on a connection of its own, just before the restore).
    fn take_page_source(&self) -> Result<Conn, SessionError> {
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
                return Err(SessionError::NoPageSource(PAGE_SOURCE_WAIT));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The CRIU restore options the source sent, each checked (they come from
/// the network).
fn criu_options(
    f: &ferry_transport::msg::CriuRestoreFlags,
) -> Result<ferry_criu::CriuOptions, SessionError> {
    use ferry_criu::options::{CgroupMode, FileValidation, NetworkLock};
    let bad = |e: String| SessionError::Decided(format!("bad CRIU option from the source: {e}"));
    let lsm_profile = match &f.lsm_profile {
        Some(p) if p.len() > 256 || p.contains(['\n', '\0']) => {
            return Err(bad("lsm-profile too long or not one line".into()))
        }
        p => p.clone(),
    };
    Ok(ferry_criu::CriuOptions {
        manage_cgroups: match f.manage_cgroups.as_deref() {
            None => None,
            Some("") => Some(None),
            Some(m) => Some(Some(CgroupMode::parse(m).map_err(bad)?)),
        },
        tcp_close: f.tcp_close,
        weak_sysctls: f.weak_sysctls,
        network_lock: f
            .network_lock
            .as_deref()
            .map(NetworkLock::parse)
            .transpose()
            .map_err(bad)?,
        file_validation: f
            .file_validation
            .as_deref()
            .map(FileValidation::parse)
            .transpose()
            .map_err(bad)?,
        skip_file_rwx_check: f.skip_file_rwx_check,
        mntns_compat_mode: f.mntns_compat_mode,
        lsm_profile,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_transport::msg::CriuRestoreFlags;

    #[test]
    fn restore_options_from_the_source_are_checked() {
        let good = CriuRestoreFlags {
            manage_cgroups: Some("soft".into()),
            network_lock: Some("skip".into()),
            tcp_close: true,
            ..Default::default()
        };
        let o = criu_options(&good).unwrap();
        assert_eq!(
            o.manage_cgroups,
            Some(Some(ferry_criu::options::CgroupMode::Soft))
        );
        assert!(o.tcp_close);
        for bad in [
            CriuRestoreFlags {
                network_lock: Some("pf".into()),
                ..Default::default()
            },
            CriuRestoreFlags {
                manage_cgroups: Some("hard".into()),
                ..Default::default()
            },
            CriuRestoreFlags {
                lsm_profile: Some("apparmor:x\nexec-cmd y".into()),
                ..Default::default()
            },
        ] {
            assert!(criu_options(&bad).is_err(), "{bad:?} accepted");
        }
    }
}
