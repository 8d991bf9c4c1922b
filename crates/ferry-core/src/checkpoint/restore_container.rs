//! Restoring a container through its engine: the images are checked first,
//! then handed to `runc restore` or `docker start --checkpoint`. From an
//! archive, the images are unpacked into a staging directory first and
//! removed once the engine has restored from them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{staging, CheckpointError};
use crate::target::fs::{self as files, FsManifest};
use crate::target::runc::RestoreFlags;
use crate::target::{docker, podman, runc, ContainerRef, TargetRecord};
use ferry_archive::{self as archive, Chain, Progress, UnpackReport};
use ferry_image::ImagesDir;

/// Where the images come from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    Dir(&'a Path),
    Archive {
        path: &'a Path,
        parent: Option<&'a Path>,
        staging: Option<&'a Path>,
        threads: usize,
        progress: &'a dyn Progress,
    },
}

/// A restored container.
#[derive(Debug, Clone)]
pub struct ContainerRestore {
    pub pid: i32,
    pub wall: Duration,
    pub unpack: Option<UnpackReport>,
}

/// Restores `container` (the name or id to restore into) from `source`.
/// `bundle` overrides the runc bundle recorded at dump time.
pub fn restore_container(
    container: &ContainerRef,
    source: Source,
    bundle: Option<&Path>,
    flags: RestoreFlags,
) -> Result<ContainerRestore, CheckpointError> {
    let start = Instant::now();
    let (dir, unpack, _staging) = match source {
        Source::Dir(d) => (d.to_path_buf(), None, None),
        Source::Archive {
            path,
            parent,
            staging: base,
            threads,
            progress,
        } => {
            let bad = |source| CheckpointError::Archive {
                path: path.to_path_buf(),
                source: Box::new(source),
            };
            let chain = Chain::open(path, parent).map_err(bad)?;
            let need: u64 = chain.head().index().files.iter().map(|f| f.size).sum();
            let tmp = staging::create("ferry-restore-", need, base).map_err(|source| {
                CheckpointError::Staging {
                    path: staging::base_for(need, base),
                    source,
                }
            })?;
            let report = archive::unpack(&chain, tmp.path(), threads, progress).map_err(bad)?;
            (tmp.path().to_path_buf(), Some(report), Some(tmp))
        }
    };
    ImagesDir::open(&dir)
        .and_then(|d| d.validate())
        .map_err(|source| CheckpointError::BadImages {
            path: dir.clone(),
            source,
        })?;
    // Containers restore through their engine, whose CRIU needs its CUDA
    // plugin to bring GPU state back; the GPUs here must fit it first.
    super::restore::gpu_gate(&dir)?;
    let record = TargetRecord::read(&dir)?;
    let consume = unpack.is_some();
    let pid = match container {
        ContainerRef::Runc { id, root } => {
            let bundle: PathBuf = match (bundle, &record) {
                (Some(b), _) => b.to_path_buf(),
                (
                    None,
                    Some(TargetRecord::Runc {
                        bundle: Some(b), ..
                    }),
                ) => b.clone(),
                _ => {
                    return Err(CheckpointError::NoBundle {
                        images: dir.clone(),
                    })
                }
            };
            if let Some(m) = FsManifest::read(&dir)? {
                files::restore(&m, &dir, |k| runc::bundle_destination(&bundle, k))?;
            }
            runc::restore(
                root,
                id,
                &bundle,
                &dir,
                RestoreFlags {
                    consume_images: consume,
                    ..flags
                },
            )?
        }
        ContainerRef::Docker { name, socket } => {
            let spec = match &record {
                Some(TargetRecord::Docker { spec, .. }) => Some(spec),
                _ => None,
            };
            docker::restore(socket, name, &dir, spec)?
        }
        ContainerRef::Podman { name } => podman::restore(name, &dir)?,
    };
    Ok(ContainerRestore {
        pid,
        wall: start.elapsed(),
        unpack,
    })
}
