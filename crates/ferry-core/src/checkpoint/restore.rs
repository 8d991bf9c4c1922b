//! Restoring a process tree: validate the images, check the pids, restore.

use ferry_image::gpu_record::CarriedBy;
use std::time::Duration;

use super::CheckpointError;
use crate::gpu::{self, Carrier, GpuRecord};
use ferry_criu::{Criu, NotifyHook, RestoreOutcome, RestoreRequest};
use ferry_image::process::{self, ProcessInfo};
use ferry_image::{ImagesDir, Validated};

/// How long a restore waits for a pid held by a zombie to be reaped. PID 1
/// of some hosts reaps adopted children only after ~2 s.
const ZOMBIE_REAP_WAIT: Duration = Duration::from_secs(4);

/// Restores the tree in `req.images_dir`; the restored root is detached from
/// ferry (reparented away once CRIU exits).
pub fn restore(
    criu: &Criu,
    req: &RestoreRequest,
    hooks: &mut dyn NotifyHook,
) -> Result<RestoreOutcome, CheckpointError> {
    let bad = |source| CheckpointError::BadImages {
        path: req.images_dir.clone(),
        source,
    };
    let validated = ImagesDir::open(&req.images_dir)
        .and_then(|d| d.validate())
        .map_err(bad)?;
    let gpu_record = gpu_gate(&req.images_dir)?;
    restore_validated(criu, req, &validated, gpu_record, hooks)
}

/// Restores images already validated: checks that their pids are free,
/// restores, gives GPU state back.
fn restore_validated(
    criu: &Criu,
    req: &RestoreRequest,
    validated: &Validated,
    gpu_record: Option<GpuRecord>,
    hooks: &mut dyn NotifyHook,
) -> Result<RestoreOutcome, CheckpointError> {
    check_pids_free(validated)?;
    let outcome = criu
        .restore(req, hooks)
        .map_err(|source| CheckpointError::RestoreFailed {
            path: req.images_dir.clone(),
            source,
        })?;
    after_restore(outcome, gpu_record.as_ref())
}

/// Before CRIU restores a tree: every pid it needs is free here.
pub(super) fn check_pids_free(validated: &Validated) -> Result<(), CheckpointError> {
    // A tree whose root was pid 1 is a pid namespace of its own: CRIU
    // restores it in a new one, where its pids are free.
    let own_pid_ns = validated.tree.iter().any(|e| e.pid == 1);
    for entry in validated.tree.iter().filter(|_| !own_pid_ns) {
        let mut ids = entry.threads.clone();
        ids.push(entry.pid);
        for id in ids {
            check_pid_free(id)?;
        }
    }
    Ok(())
}

/// After CRIU restored a tree: it runs, and has its GPU state back.
pub(super) fn after_restore(
    outcome: RestoreOutcome,
    gpu_record: Option<&GpuRecord>,
) -> Result<RestoreOutcome, CheckpointError> {
    if !process::is_alive(outcome.pid) {
        return Err(CheckpointError::RestoredNotRunning { pid: outcome.pid });
    }
    if let Some(record) = gpu_record {
        give_back_gpu(record)?;
    }
    Ok(outcome)
}

/// Before a restore: a checkpoint that carries GPU state needs GPUs here
/// that can take it. Returns the record when there is one.
pub(crate) fn gpu_gate(images: &std::path::Path) -> Result<Option<GpuRecord>, CheckpointError> {
    let Some(record) = GpuRecord::read(images)? else {
        return Ok(None);
    };
    if record.carried_by == CarriedBy::Ignored {
        tracing::warn!("this checkpoint was taken with --ignore-gpu: its GPU state was not saved");
        return Ok(Some(record));
    }
    gpu::check_compatible(&record, &gpu::probe())?;
    Ok(Some(record))
}

/// After restoring processes whose GPU state `cuda-checkpoint` moved into
/// host memory: move it back onto the GPU (CRIU's plugin does this itself).
fn give_back_gpu(record: &GpuRecord) -> Result<(), CheckpointError> {
    if record.carried_by != CarriedBy::CudaCheckpoint {
        return Ok(());
    }
    if let Some(Carrier::CudaCheckpoint(tool)) = Carrier::find() {
        for &pid in &record.pids {
            gpu::decide::toggle(&tool, pid)?;
        }
    }
    Ok(())
}

fn check_pid_free(pid: u32) -> Result<(), CheckpointError> {
    let Ok(holder) = ProcessInfo::read(pid as i32) else {
        return Ok(());
    };
    if holder.is_zombie() && process::wait_pid_free(pid as i32, ZOMBIE_REAP_WAIT) {
        return Ok(());
    }
    let hint = if holder.is_zombie() {
        " (a zombie its parent has not reaped)"
    } else {
        " (is the dumped process still running here? stop it, or restore on another host)"
    };
    Err(CheckpointError::PidInUse {
        pid,
        holder: holder.comm,
        hint,
    })
}
