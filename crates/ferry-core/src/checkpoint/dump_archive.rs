//! Dumping a process tree straight into an archive: CRIU dumps into a
//! staging directory (tmpfs when it has room), ferry packs it, the staging
//! directory goes away. The archive appears only when complete.

use std::path::Path;

use super::{dump, dump_container, staging, CheckpointError, TargetAfterFailure};
use crate::target::fs::FsScope;
use crate::target::ContainerRef;
use ferry_archive::{pack_to_file, PackOptions, PackReport};
use ferry_criu::{Criu, DumpOutcome, DumpRequest, NotifyHook};
use ferry_image::process;

/// A dump written as an archive.
#[derive(Debug, Clone)]
pub struct ArchiveDump {
    pub dump: DumpOutcome,
    pub pack: PackReport,
    /// A container's files captured with it.
    pub files: Option<crate::target::fs::FsManifest>,
}

/// Dumps `req.pid` and packs the images into `archive`. `req.images_dir` is
/// used as is when `keep_images` is set (the images stay there); otherwise a
/// staging directory replaces it and is removed afterwards. A container
/// comes with the scope of its files to carry.
pub fn dump_to_archive(
    criu: &Criu,
    container: Option<(&ContainerRef, &FsScope)>,
    req: &DumpRequest,
    keep_images: bool,
    archive: &Path,
    pack: &PackOptions,
    hooks: &mut dyn NotifyHook,
) -> Result<ArchiveDump, CheckpointError> {
    let mut req = req.clone();
    let mut staging_dir = None;
    if !keep_images {
        // A container's size is not known before it is found: assume the
        // worst case fits wherever the staging lands.
        let estimate = match container {
            Some(_) => 0,
            None => process::tree_rss_bytes(req.pid)
                .map_err(|_| CheckpointError::NoSuchProcess { pid: req.pid })?,
        };
        let dir = staging::create("ferry-dump-", estimate, None).map_err(|source| {
            CheckpointError::Staging {
                path: staging::base_for(estimate, None),
                source,
            }
        })?;
        req.images_dir = dir.path().join("images");
        staging_dir = Some(dir);
    }
    // Stop mode: the tree stays stopped until the archive is on stable
    // storage, and runs on if it cannot be packed.
    let stop_mode = !req.leave_running && !req.leave_stopped;
    req.leave_stopped |= stop_mode;
    // What the application had stopped itself stays stopped if packing
    // fails (a container's tree is found by the dump: none known).
    let stopped_before = match container {
        None => ferry_image::process::stopped_in_tree(req.pid),
        Some(_) => Vec::new(),
    };
    let dumped = match container {
        Some((c, scope)) => dump_container::dump_container(criu, c, &req, scope, hooks)
            .map(|o| (o.dump, o.init_pid, o.files)),
        None => dump::dump(criu, &req, hooks).map(|o| (o, req.pid, None)),
    };
    let (outcome, root_pid, files) = match dumped {
        Ok(o) => o,
        Err(e) => {
            // Only CRIU's log is left in the staging directory: keep it, the
            // error names it.
            if let Some(dir) = staging_dir.take() {
                let _ = dir.keep();
            }
            return Err(e);
        }
    };
    let pack = match pack_to_file(&req.images_dir, archive, pack) {
        Ok(p) => p,
        Err(source) => {
            // The images may be all that is left of a stopped tree: never
            // delete them when they could not be packed.
            if let Some(dir) = staging_dir.take() {
                let _ = dir.keep();
            }
            let after = if stop_mode {
                dump::settle_stopped(root_pid, &stopped_before)
            } else {
                TargetAfterFailure::Running
            };
            return Err(CheckpointError::PackFailed {
                images: req.images_dir.clone(),
                after,
                source: Box::new(source),
            });
        }
    };
    if stop_mode {
        dump::kill_dumped(root_pid);
        if let Some((ContainerRef::Runc { id, root }, _)) = container {
            crate::target::runc::delete(root, id)?;
        }
    }
    Ok(ArchiveDump {
        dump: outcome,
        pack,
        files,
    })
}

/// Dumps the container (with the files `scope` names), or the process
/// tree `req.pid` when there is none.
pub fn dump_any(
    criu: &Criu,
    container: Option<(&ContainerRef, &FsScope)>,
    req: &DumpRequest,
    hooks: &mut dyn NotifyHook,
) -> Result<DumpOutcome, CheckpointError> {
    match container {
        Some((c, scope)) => dump_container(criu, c, req, scope, hooks).map(|o| o.dump),
        None => dump(criu, req, hooks),
    }
}

/// Packs the images CRIU wrote in `images` into `archive`.
pub fn pack_images(
    images: &Path,
    archive: &Path,
    pack: &PackOptions,
) -> Result<PackReport, CheckpointError> {
    pack_to_file(images, archive, pack).map_err(|source| CheckpointError::Pack {
        images: images.to_path_buf(),
        source: Box::new(source),
    })
}
