//! Restoring from an archive: resolve and check the whole chain, unpack it
//! in parallel into a staging directory (tmpfs when it has room), restore,
//! remove the staging directory. A damaged archive or a missing parent is
//! refused before anything is restored, and leaves no staging behind.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{restore, staging, CheckpointError};
use crate::archive::{self, Chain, Progress, UnpackReport};
use crate::criu::{Criu, NotifyHook, RestoreOutcome, RestoreRequest};

/// A restore from an archive.
#[derive(Debug, Clone)]
pub struct ArchiveRestore {
    pub unpack: UnpackReport,
    pub restore: RestoreOutcome,
    /// From opening the archive to the restored tree running.
    pub wall: Duration,
    /// Where the images were staged (removed afterwards).
    pub staging: PathBuf,
}

/// Options of a restore from an archive.
#[derive(Clone, Copy)]
pub struct ArchiveRestoreOptions<'a> {
    /// Where the direct parent is, overriding the recorded path.
    pub parent: Option<&'a Path>,
    pub threads: usize,
    /// Base directory for staging, overriding the tmpfs/tempdir choice.
    pub staging: Option<&'a Path>,
    pub progress: &'a dyn Progress,
}

/// Restores the tree archived in `archive`. `req.images_dir` is replaced by
/// the staging directory; its other fields apply. When CRIU fails, its log
/// is copied beside the system's temporary files and named in the error.
pub fn restore_from_archive(
    criu: &Criu,
    archive: &Path,
    req: &RestoreRequest,
    opts: &ArchiveRestoreOptions,
    hooks: &mut dyn NotifyHook,
) -> Result<ArchiveRestore, CheckpointError> {
    let start = Instant::now();
    let bad = |source| CheckpointError::Archive {
        path: archive.to_path_buf(),
        source,
    };
    let chain = Chain::open(archive, opts.parent).map_err(bad)?;
    let need: u64 = chain.head().index().files.iter().map(|f| f.size).sum();
    let dir = staging::create("ferry-restore-", need, opts.staging).map_err(|source| {
        CheckpointError::Staging {
            path: staging::base_for(need, opts.staging),
            source,
        }
    })?;
    let images = dir.path().to_path_buf();
    let unpack = archive::unpack(&chain, &images, opts.threads, opts.progress).map_err(bad)?;
    drop(chain);
    let mut req = req.clone();
    req.images_dir = images.clone();
    req.consume_images = true;
    match restore(criu, &req, hooks) {
        Ok(outcome) => Ok(ArchiveRestore {
            unpack,
            restore: outcome,
            wall: start.elapsed(),
            staging: images,
        }),
        Err(CheckpointError::RestoreFailed { source, .. }) => {
            let source = match keep_log(&req, archive) {
                Some(kept) => source.with_log(kept),
                None => source,
            };
            Err(CheckpointError::RestoreFailed {
                path: archive.to_path_buf(),
                source,
            })
        }
        Err(e) => Err(e),
    }
}

/// Copies CRIU's restore log out of the staging directory before it goes;
/// returns where it was kept.
fn keep_log(req: &RestoreRequest, archive: &Path) -> Option<PathBuf> {
    let log = req.log_path();
    if !log.exists() {
        return None;
    }
    let stem = archive
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "archive".into());
    let kept =
        std::env::temp_dir().join(format!("ferry-restore-{stem}-{}.log", std::process::id()));
    match std::fs::copy(&log, &kept) {
        Ok(_) => Some(kept),
        Err(e) => {
            tracing::warn!(error = %e, "cannot keep CRIU's restore log");
            None
        }
    }
}
