//! Dumping a runc or Docker container over CRIU RPC: find its state, dump
//! it (pre-flight included) with the container options, record what runc needs
//! (`descriptors.json`) and what a restore elsewhere needs
//! (`ferry-target.json`). In stop mode a runc container is then deleted so
//! its id is free for the restore, as `runc checkpoint` does.

use std::fs;

use super::{dump, CheckpointError, TargetAfterFailure};
use crate::target::container::ContainerState;
use crate::target::{docker, runc, ContainerRef, TargetRecord, DESCRIPTORS_FILE, TARGET_FILE};
use ferry_criu::{Criu, DumpOutcome, DumpRequest, NotifyHook};

/// A dumped container.
#[derive(Debug, Clone)]
pub struct ContainerDumpOutcome {
    pub dump: DumpOutcome,
    pub record: TargetRecord,
    pub init_pid: i32,
}

/// Dumps `container` into `req.images_dir` (`req.pid` is ignored: the
/// container's init is the root).
pub fn dump_container(
    criu: &Criu,
    container: &ContainerRef,
    req: &DumpRequest,
    hooks: &mut dyn NotifyHook,
) -> Result<ContainerDumpOutcome, CheckpointError> {
    let (state, record) = match container {
        ContainerRef::Runc { id, root } => {
            let state = runc::locate(root, id)?;
            let record = TargetRecord::Runc {
                id: id.clone(),
                bundle: state.bundle.clone(),
                rootfs: state.rootfs.clone(),
            };
            (state, record)
        }
        ContainerRef::Docker { name, socket } => {
            let c = docker::locate(socket, name)?;
            let record = TargetRecord::Docker {
                spec: c.spec,
                rootfs: c.state.rootfs.clone(),
            };
            (c.state, record)
        }
    };
    let mut req = req.clone();
    req.pid = state.init_pid;
    req.container = Some(state.dump_options()?);
    let outcome = match dump(criu, &req, hooks) {
        Ok(o) => o,
        Err(e) => return Err(thawed(&state, e)),
    };
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
    })
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
