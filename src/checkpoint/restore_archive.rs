//! Restoring from an archive without unpacking it: resolve and check the
//! whole chain (every chunk's checksum, every pages image's layout, every
//! metadata image), validate the images as a directory restore would, then
//! restore with CRIU reading its images from ferry's image streamer
//! ([`crate::criu::streamer`]): the pages go from the archive, decompressed
//! in parallel and checked page by page, through a pipe straight into
//! CRIU's copy of the process memory. No pages image is written anywhere,
//! so the restore touches the memory it restores and little else.
//! A damaged archive or a missing parent is refused before anything is
//! restored. The staging directory holds only the metadata images, the
//! streamer's socket and CRIU's log, and is removed afterwards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::restore::{gpu_gate, restore_validated};
use super::{staging, CheckpointError};
use crate::archive::stream::StreamSource;
use crate::archive::{Chain, Progress, UnpackReport};
use crate::criu::streamer::{StreamError, Streamer};
use crate::criu::{Criu, NotifyHook, RestoreOutcome, RestoreRequest};
use crate::image::dir::classify_name;
use crate::image::{ImageFile, ImagesDir};

/// Room the staging directory needs beyond the metadata images.
const STAGING_SLACK: u64 = 16 << 20;

/// A restore from an archive.
#[derive(Debug, Clone)]
pub struct ArchiveRestore {
    /// How the images reached CRIU: `wall` is the time from checking the
    /// archive to the last image streamed, `bytes_written` what was
    /// streamed (nothing is unpacked to disk).
    pub unpack: UnpackReport,
    pub restore: RestoreOutcome,
    /// From opening the archive to the restored tree running.
    pub wall: Duration,
    /// Where the metadata images and CRIU's log were staged (removed
    /// afterwards).
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
    let opened = start.elapsed();
    let source = StreamSource::new(&chain, opts.threads, opts.progress).map_err(bad)?;
    let head = chain.head();
    let mut listing = Vec::new();
    let mut contents = BTreeMap::new();
    for (fi, f) in head.index().files.iter().enumerate() {
        listing.push(ImageFile {
            name: f.name.clone(),
            bytes: f.size,
            class: classify_name(&f.name),
        });
        if !f.pages {
            contents.insert(f.name.clone(), head.file_data(fi).map_err(bad)?);
        }
    }
    let validated = ImagesDir::in_memory(archive.to_path_buf(), listing, contents.clone())
        .and_then(|d| d.validate())
        .map_err(|source| CheckpointError::BadImages {
            path: archive.to_path_buf(),
            source,
        })?;
    let need = contents.values().map(|c| c.len() as u64).sum::<u64>() + STAGING_SLACK;
    let dir = staging::create("ferry-restore-", need, opts.staging).map_err(|source| {
        CheckpointError::Staging {
            path: staging::base_for(need, opts.staging),
            source,
        }
    })?;
    let images = dir.path().to_path_buf();
    for (name, bytes) in &contents {
        let path = images.join(name);
        std::fs::write(&path, bytes).map_err(|source| CheckpointError::Staging {
            path: path.clone(),
            source,
        })?;
    }
    let staged = start.elapsed();
    let gpu_record = gpu_gate(&images)?;
    let streamer = Streamer::listen(&images).map_err(stream_error(archive))?;
    let prepared = start.elapsed();
    let mut req = req.clone();
    req.images_dir = images.clone();
    req.consume_images = false;
    req.stream = true;
    let ended = AtomicBool::new(false);
    let (restored, served) = std::thread::scope(|s| {
        // The archive is checked while CRIU starts, before it is given its
        // first image: a damaged archive drops the streamer, whose socket
        // closes, and CRIU fails before it has restored anything.
        let (src, end) = (&source, &ended);
        let serving = s.spawn(move || {
            let check = src.check().map_err(|source| StreamError::Source {
                name: "the archive".into(),
                source,
            })?;
            streamer.serve(src, end).map(|served| (check, served))
        });
        let restored = restore_validated(criu, &req, &validated, gpu_record, hooks);
        ended.store(true, Ordering::Release);
        let served = serving.join().unwrap_or_else(|_| {
            Err(StreamError::Protocol {
                what: "the streaming thread panicked".into(),
                source: std::io::Error::other("panic"),
            })
        });
        (restored, served)
    });
    // A page that failed its check says more than CRIU's short read; a
    // broken pipe only echoes CRIU's own failure, reported below.
    let served = match served {
        Err(StreamError::Source {
            source: source @ crate::archive::ArchiveError::Corrupt { .. },
            ..
        }) => return Err(bad(source)),
        other => other,
    };
    let outcome = match restored {
        Ok(outcome) => outcome,
        Err(CheckpointError::RestoreFailed { source, .. }) => {
            let stem = archive
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "archive".into());
            let source = match staging::keep_log(&req.log_path(), &format!("restore-{stem}")) {
                Some(kept) => source.with_log(kept),
                None => source,
            };
            return Err(CheckpointError::RestoreFailed {
                path: archive.to_path_buf(),
                source,
            });
        }
        Err(e) => return Err(e),
    };
    let (check, served) = served.map_err(stream_error(archive))?;
    tracing::debug!(?opened, ?staged, ?prepared, ?check, stream = ?served.wall, criu = ?outcome.wall, "restore from archive: phases");
    if let Ok(u) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
        tracing::debug!(
            user_ms = ms(u.user_time()),
            sys_ms = ms(u.system_time()),
            "restore from archive: ferry's own CPU"
        );
    }
    let unpack = UnpackReport {
        wall: served.wall + check,
        threads: source.threads(),
        files: served.files,
        bytes: head.index().files.iter().map(|f| f.size).sum(),
        bytes_written: served.bytes,
        chunks_read: source.chunks_read(),
        generations: chain.generations(),
    };
    Ok(ArchiveRestore {
        unpack,
        restore: outcome,
        wall: start.elapsed(),
        staging: images,
    })
}

fn stream_error(
    archive: &Path,
) -> impl Fn(StreamError<crate::archive::ArchiveError>) -> CheckpointError + '_ {
    move |e| CheckpointError::Stream {
        path: archive.to_path_buf(),
        detail: e.to_string(),
    }
}
