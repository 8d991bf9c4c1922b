//! Dumping a runc or Docker container over CRIU RPC: find its state, dump
//! it (pre-flight included) with the container options, record what runc needs
//! (`descriptors.json`) and what a restore elsewhere needs
//! (`ferry-target.json`). In stop mode a runc container is then deleted so
//! its id is free for the restore, as `runc checkpoint` does.

use std::fs;

use super::{dump, CheckpointError, TargetAfterFailure};
use crate::target::container::ContainerState;
use crate::target::fs::{self as files, FsManifest, FsScope, FsSource, RootKind};
use crate::target::{
    docker, podman, runc, ContainerRef, TargetRecord, DESCRIPTORS_FILE, TARGET_FILE,
};
use ferry_criu::{Criu, DumpOutcome, DumpRequest, Notification, NotifyHook, Script};

/// A dumped container.
#[derive(Debug, Clone)]
pub struct ContainerDumpOutcome {
    pub dump: DumpOutcome,
    pub record: TargetRecord,
    pub init_pid: i32,
    /// The container's files captured with it (None: none were asked for).
    pub files: Option<FsManifest>,
    /// Time spent capturing them, while the container was frozen.
    pub files_capture: std::time::Duration,
}

/// Dumps `container` into `req.images_dir` (`req.pid` is ignored: the
/// container's init is the root), with the files `scope` names, captured
/// while the container is frozen.
pub fn dump_container(
    criu: &Criu,
    container: &ContainerRef,
    req: &DumpRequest,
    scope: &FsScope,
    hooks: &mut dyn NotifyHook,
) -> Result<ContainerDumpOutcome, CheckpointError> {
    let (state, record, sources) = match container {
        ContainerRef::Runc { id, root } => {
            let state = runc::locate(root, id)?;
            let record = TargetRecord::Runc {
                id: id.clone(),
                bundle: state.bundle.clone(),
                rootfs: state.rootfs.clone(),
            };
            let sources = runc_sources(&state, scope)?;
            (state, record, sources)
        }
        ContainerRef::Docker { name, socket } => {
            let c = docker::locate(socket, name)?;
            let sources = c.storage.sources(scope)?;
            let record = TargetRecord::Docker {
                spec: c.spec,
                rootfs: c.state.rootfs.clone(),
            };
            (c.state, record, sources)
        }
        ContainerRef::Podman { name } => {
            let c = podman::locate(name)?;
            let sources = c.storage.sources(scope)?;
            let record = TargetRecord::Podman {
                id: c.id,
                name: c.name,
                rootfs: c.state.rootfs.clone(),
            };
            (c.state, record, sources)
        }
    };
    let mut req = req.clone();
    req.pid = state.init_pid;
    req.container = Some(state.dump_options()?);
    let mut captured = None;
    let mut capture_took = std::time::Duration::ZERO;
    let dumped = {
        let dir = req.images_dir.clone();
        let mut hook = |n: &mut Notification| -> Result<(), ferry_criu::HookError> {
            // Frozen, dumped, not yet resumed or killed: the files are
            // those of the instant the memory was taken.
            if n.script == Script::PostDump && !sources.is_empty() {
                std::fs::create_dir_all(&dir)?;
                let t = std::time::Instant::now();
                captured = Some(files::capture(&sources, &dir, scope.base.as_deref())?);
                capture_took = t.elapsed();
            }
            hooks.notify(n)
        };
        dump(criu, &req, &mut hook)
    };
    let outcome = match dumped {
        Ok(o) => o,
        Err(e) => return Err(thawed(&state, e)),
    };
    if captured.is_none() && !sources.is_empty() {
        // A dump through CRIU's command line (streamed) has no `post-dump`
        // notification: the container is stopped now (it never runs on
        // after a streamed dump), so its files are still those of the dump.
        if req.leave_running {
            return Err(files::FsError::NotCaptured.into());
        }
        std::fs::create_dir_all(&req.images_dir)
            .map_err(files::FsError::io("create", &req.images_dir))?;
        let t = std::time::Instant::now();
        captured = Some(files::capture(
            &sources,
            &req.images_dir,
            scope.base.as_deref(),
        )?);
        capture_took = t.elapsed();
    }
    write_records(&req, &state, &record)?;
    if !req.leave_running && !req.leave_stopped {
        if let ContainerRef::Runc { id, root } = container {
            runc::delete(root, id)?;
        }
    }
    Ok(ContainerDumpOutcome {
        dump: outcome,
        record,
        init_pid: state.init_pid,
        files: captured,
        files_capture: capture_took,
    })
}

/// The trees of `container` that `scope` names, where they are now.
pub fn container_files(
    container: &ContainerRef,
    scope: &FsScope,
) -> Result<Vec<FsSource>, CheckpointError> {
    match container {
        ContainerRef::Runc { id, root } => runc_sources(&runc::locate(root, id)?, scope),
        ContainerRef::Docker { name, socket } => {
            Ok(docker::locate(socket, name)?.storage.sources(scope)?)
        }
        ContainerRef::Podman { name } => Ok(podman::locate(name)?.storage.sources(scope)?),
    }
}

/// A runc container's trees: its bundle's rootfs when asked for (runc has
/// no writable layer of its own), and the bind mounts named.
fn runc_sources(state: &ContainerState, scope: &FsScope) -> Result<Vec<FsSource>, CheckpointError> {
    let mut out = Vec::new();
    if scope.runc_rootfs {
        out.push(FsSource {
            kind: RootKind::Rootfs,
            path: state.rootfs.clone(),
        });
    }
    for b in &scope.binds {
        let path = state
            .bind_source(b)
            .ok_or_else(|| files::FsError::NoSuchBind {
                destination: b.clone(),
            })?;
        out.push(FsSource {
            kind: RootKind::Bind {
                destination: b.clone(),
            },
            path,
        });
    }
    Ok(out)
}

/// After a failed dump: a container left frozen by its freezer is thawed,
/// and the error says so.
fn thawed(state: &ContainerState, err: CheckpointError) -> CheckpointError {
    if !state.frozen() {
        return err;
    }
    match (state.thaw(), err) {
        (Ok(()), CheckpointError::DumpFailed { pid, source, .. }) => CheckpointError::DumpFailed {
            pid,
            after: TargetAfterFailure::Thawed,
            source,
        },
        (_, err) => err,
    }
}

fn write_records(
    req: &DumpRequest,
    state: &ContainerState,
    record: &TargetRecord,
) -> Result<(), CheckpointError> {
    let write = |name: &str, text: String| {
        let path = req.images_dir.join(name);
        fs::write(&path, text).map_err(|source| CheckpointError::Record { path, source })
    };
    write(
        DESCRIPTORS_FILE,
        serde_json::to_string(&state.external_descriptors).unwrap_or_else(|_| "[]".into()),
    )?;
    write(
        TARGET_FILE,
        serde_json::to_string_pretty(record).unwrap_or_else(|_| "{}".into()),
    )
}
