//! Dumping a process tree: pre-flight, CRIU, and clean-up after failure.

use std::fs;
use std::io::{self, ErrorKind};
use std::path::Path;

use super::{CheckpointError, TargetAfterFailure};
use crate::gpu::{self, Carrier, GpuPlan};
use crate::target::preflight::{self, Allow};
use ferry_criu::{Criu, DumpOutcome, DumpRequest, NotifyHook};
use ferry_image::process::{self, ProcessError, ProcessInfo};
use ferry_image::FileClass;

/// Dumps the tree rooted at `req.pid` into `req.images_dir` (created if
/// absent). See the module docs for what is checked and guaranteed.
pub fn dump(
    criu: &Criu,
    req: &DumpRequest,
    hooks: &mut dyn NotifyHook,
) -> Result<DumpOutcome, CheckpointError> {
    check_target(req.pid)?;
    preflight::check(
        req.pid,
        Allow {
            // --tcp-close: CRIU dumps established connections as closed.
            tcp_established: req.tcp_established || req.options.tcp_close,
            ext_unix_sk: req.ext_unix_sk,
        },
    )?;
    let pids =
        process::tree(req.pid).map_err(|_| CheckpointError::NoSuchProcess { pid: req.pid })?;
    let plan = gpu::assess(&pids, req.ignore_gpu)?;
    let kept = prepare_dir(&req.images_dir)?;
    // Stopped by the application itself (job control, a tracer of its
    // own): a failed dump resumes everything but these.
    let stopped_before = process::stopped_in_tree(req.pid);
    if let GpuPlan::Ignored { uses, .. } = &plan {
        tracing::warn!(
            pids = ?uses.iter().map(|u| u.pid).collect::<Vec<_>>(),
            "--ignore-gpu: dumping WITHOUT the GPU state these processes hold; they will restore with a broken GPU context"
        );
    }
    let toggled = suspend_gpu(&plan)?;
    // Stop mode (neither left running nor stopped): CRIU leaves the tree
    // stopped, and ferry kills it only once the images are on stable
    // storage. Until then a crash of the host leaves the application
    // where it was, not lost.
    let stop_mode = !req.leave_running && !req.leave_stopped;
    let criu_req = DumpRequest {
        leave_stopped: req.leave_stopped || stop_mode,
        ..req.clone()
    };
    let result = criu.dump(&criu_req, hooks);
    // The GPU state goes back to the GPU wherever the processes still run.
    if req.leave_running || result.is_err() {
        resume_gpu(&toggled);
    }
    match result {
        Ok(outcome) => {
            let durable = (|| {
                if let Some(record) = plan.record() {
                    let path = req.images_dir.join(gpu::RECORD_FILE);
                    let text = serde_json::to_string_pretty(record).unwrap_or_default();
                    std::fs::write(&path, text)?;
                }
                if stop_mode {
                    sync_dir(&req.images_dir)?;
                }
                Ok(())
            })();
            if let Err(source) = durable {
                if stop_mode {
                    resume_gpu(&toggled);
                }
                let after = if stop_mode || req.leave_stopped {
                    settle_stopped(req.pid, &stopped_before)
                } else {
                    TargetAfterFailure::Running
                };
                return Err(CheckpointError::NotDurable {
                    path: req.images_dir.clone(),
                    after,
                    source,
                });
            }
            if stop_mode {
                kill_dumped(req.pid);
            }
            Ok(outcome)
        }
        Err(source) => {
            let after = settle_target(req.pid, &stopped_before);
            remove_partial_images(&req.images_dir, &req.log_file, &kept);
            Err(CheckpointError::DumpFailed {
                pid: req.pid,
                after,
                source,
            })
        }
    }
}

/// With `cuda-checkpoint` as carrier: moves each GPU-using process's state
/// into host memory before CRIU freezes it. Returns what to toggle back.
fn suspend_gpu(plan: &GpuPlan) -> Result<Vec<(std::path::PathBuf, i32)>, CheckpointError> {
    let GpuPlan::Carry {
        carrier: Carrier::CudaCheckpoint(tool),
        record,
        ..
    } = plan
    else {
        return Ok(Vec::new());
    };
    let mut done = Vec::new();
    for &pid in &record.pids {
        if let Err(e) = gpu::decide::toggle(tool, pid) {
            resume_gpu(&done);
            return Err(e.into());
        }
        done.push((tool.clone(), pid));
    }
    Ok(done)
}

fn resume_gpu(toggled: &[(std::path::PathBuf, i32)]) {
    for (tool, pid) in toggled {
        if let Err(e) = gpu::decide::toggle(tool, *pid) {
            tracing::error!(pid, error = %e, "cannot give the GPU state back to the process");
        }
    }
}

fn check_target(pid: i32) -> Result<(), CheckpointError> {
    match ProcessInfo::read(pid) {
        Ok(p) if p.is_zombie() => Err(CheckpointError::Zombie { pid, comm: p.comm }),
        // CRIU cannot dump a task whose session it cannot see.
        Ok(p) if p.session == 0 => Err(CheckpointError::SessionOutside { pid, comm: p.comm }),
        Ok(_) => Ok(()),
        Err(ProcessError::NotFound { .. }) => Err(CheckpointError::NoSuchProcess { pid }),
        // /proc unreadable for another reason: let CRIU report it.
        Err(_) => Ok(()),
    }
}

/// Makes sure `dir` can take a dump; the names already in it (kept, and
/// never removed: a log, a note, zdtm's `dump.cropt`).
fn prepare_dir(dir: &Path) -> Result<Vec<std::ffi::OsString>, CheckpointError> {
    let not_writable = |source| CheckpointError::DirNotWritable {
        path: dir.to_path_buf(),
        source,
    };
    let mut kept = Vec::new();
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(CheckpointError::NotADirectory {
                path: dir.to_path_buf(),
            })
        }
        Ok(_) => {
            // Images of another dump would mix with this one's: refused.
            // Anything else (CRIU logs, the user's files) stays, untouched.
            // A streamed dump's capture listens in the directory already.
            let mut images = 0;
            for entry in fs::read_dir(dir).map_err(not_writable)? {
                let name = entry.map_err(not_writable)?.file_name();
                if name == ferry_criu::capture::CAPTURE_SOCKET {
                    continue;
                }
                match ferry_image::dir::classify_name(&name.to_string_lossy()) {
                    FileClass::Pages | FileClass::Metadata | FileClass::Stats => images += 1,
                    FileClass::Log | FileClass::Other => kept.push(name),
                }
            }
            if images > 0 {
                return Err(CheckpointError::DirNotEmpty {
                    path: dir.to_path_buf(),
                    entries: images,
                });
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(not_writable)?;
        }
        Err(e) => return Err(not_writable(e)),
    }
    // Root ignores permission bits; a read-only mount or immutable directory
    // still refuses, so try for real.
    let probe = dir.join(".ferry-write-test");
    fs::write(&probe, b"").map_err(not_writable)?;
    fs::remove_file(&probe).map_err(not_writable)?;
    Ok(kept)
}

/// Every regular file of `dir`, then `dir` itself, on stable storage.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    if crate::fault::fails("dump-sync-fails") {
        return Err(io::Error::other("injected fault"));
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fs::File::open(entry.path())?.sync_all()?;
        }
    }
    fs::File::open(dir)?.sync_all()
}

/// Ends a tree CRIU dumped and left stopped, now that its images are safe.
pub(super) fn kill_dumped(pid: i32) {
    let pids = process::tree(pid).unwrap_or_else(|_| vec![pid]);
    process::kill_all(&pids);
}

/// A tree CRIU left stopped whose images could not be kept: resumed.
pub(super) fn settle_stopped(pid: i32, stopped_before: &[i32]) -> TargetAfterFailure {
    if !process::is_alive(pid) {
        return TargetAfterFailure::Gone;
    }
    TargetAfterFailure::Resumed(process::continue_tree_except(pid, stopped_before))
}

/// After a failed dump: make sure nothing of the tree is left stopped.
fn settle_target(pid: i32, stopped_before: &[i32]) -> TargetAfterFailure {
    if !process::is_alive(pid) {
        return TargetAfterFailure::Gone;
    }
    let resumed = process::resume_stopped_except(pid, stopped_before);
    if resumed.is_empty() {
        TargetAfterFailure::Running
    } else {
        TargetAfterFailure::Resumed(resumed)
    }
}

/// Removes what a failed dump wrote, except CRIU's log and what was there
/// before (`kept`).
fn remove_partial_images(dir: &Path, log_file: &str, kept: &[std::ffi::OsString]) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if kept.contains(&entry.file_name()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_log = name == log_file || ferry_image::dir::classify_name(&name) == FileClass::Log;
        if !is_log {
            if let Err(e) = remove(&entry.path()) {
                tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove partial image");
            }
        }
    }
}

fn remove(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}
