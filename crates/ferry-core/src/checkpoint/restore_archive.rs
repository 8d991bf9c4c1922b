//! Restoring from an archive without unpacking it: resolve and check the
//! whole chain (every pages image's layout, every metadata image) and
//! validate the images as a directory restore would, while CRIU starts,
//! and before it is given any image; every chunk's checksum is checked
//! while CRIU reads the metadata images, and before it is given any page
//! (so a damaged archive fails CRIU before any memory is restored, while
//! it sets the processes up, and CRIU removes what it began). CRIU reads its
//! images from ferry's image streamer
//! ([`ferry_criu::streamer`]): the pages go from the archive, decompressed
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

use super::restore::{after_restore, check_pids_free, gpu_gate};
use super::{staging, CheckpointError};
use ferry_archive::stream::StreamSource;
use ferry_archive::{Chain, Progress, UnpackReport, ZeroPages};
use ferry_criu::streamer::{StreamError, Streamer};
use ferry_criu::{Criu, NotifyHook, RestoreOutcome, RestoreRequest};
use ferry_image::dir::classify_name;
use ferry_image::{ImageFile, ImagesDir};

/// Room the staging directory needs beyond the metadata images.
const STAGING_SLACK: u64 = 16 << 20;
/// How long a refusal waits for the processes CRIU began to restore to be
/// reaped (their new parent, init, may take a few seconds on some hosts).
const LATE_REFUSAL_REAP: Duration = Duration::from_secs(10);

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
    /// Whether the zero pages of plain private anonymous memory are written
    /// (see [`ferry_archive::holes`]).
    pub zero_pages: ZeroPages,
    pub progress: &'a dyn Progress,
}

/// Restores the tree archived in `archive`. `req.images_dir` is replaced by
/// the staging directory; its other fields apply. When CRIU fails, its log
/// is copied beside the system's temporary files and named in the error.
///
/// CRIU is started first: it takes about 100 ms to ask for its first
/// image, and the archive is opened, validated and checked meanwhile, by
/// the thread that then serves the images. Whatever that finds wrong
/// closes the streamer before CRIU has been given anything, so CRIU fails
/// having restored nothing, and that finding is the error returned.
pub fn restore_from_archive(
    criu: &Criu,
    archive: &Path,
    req: &RestoreRequest,
    opts: &ArchiveRestoreOptions,
    hooks: &mut dyn NotifyHook,
) -> Result<ArchiveRestore, CheckpointError> {
    let start = Instant::now();
    // The metadata images are not known before the archive is open; they
    // are small beside the slack (and were they not, writing them would
    // fail with a clear error).
    let dir = staging::create("ferry-restore-", STAGING_SLACK, opts.staging).map_err(|source| {
        CheckpointError::Staging {
            path: staging::base_for(STAGING_SLACK, opts.staging),
            source,
        }
    })?;
    let images = dir.path().to_path_buf();
    let streamer = Streamer::listen(&images).map_err(stream_error(archive))?;
    let mut req = req.clone();
    req.images_dir = images.clone();
    req.consume_images = false;
    req.stream = true;
    let ended = AtomicBool::new(false);
    let (restored, served) = std::thread::scope(|s| {
        let (end, images) = (&ended, &images);
        let serving = s.spawn(move || serve_archive(archive, images, opts, &streamer, end, start));
        let restored = criu.restore(&req, hooks);
        ended.store(true, Ordering::Release);
        let served = serving.join().unwrap_or_else(|_| {
            Err(Served::refused(CheckpointError::Stream {
                path: archive.to_path_buf(),
                detail: "the streaming thread panicked".into(),
            }))
        });
        (restored, served)
    });
    // What the archive, its images or this host were found to lack: CRIU
    // was given nothing, and its failure only echoes this.
    let served = match served {
        Ok(prepared) => Ok(prepared),
        Err(Served::Refused(e)) => return Err(*e),
        Err(Served::RefusedLate(e, pids)) => {
            // CRIU may have started the processes before it asked for
            // their pages; it killed them, and they are gone once reaped.
            for pid in pids {
                if !ferry_image::process::wait_pid_free(pid, LATE_REFUSAL_REAP) {
                    tracing::warn!(pid, "a process CRIU began to restore is still there");
                }
            }
            return Err(*e);
        }
        Err(Served::Stream(e)) => Err(e),
    };
    let outcome = match restored {
        Ok(outcome) => outcome,
        Err(source) => {
            let stem = archive
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "archive".into());
            let kept = staging::keep_log(&req.log_path(), &format!("restore-{stem}"));
            // CRIU failed because ferry gave up on it, not the other way.
            if let Err(e) = served {
                if stalled(&e) {
                    return Err(CheckpointError::Stalled {
                        path: archive.to_path_buf(),
                        log: kept,
                        source: Box::new(e),
                    });
                }
            }
            let source = match kept {
                Some(kept) => source.with_log(kept),
                None => source,
            };
            return Err(CheckpointError::RestoreFailed {
                path: archive.to_path_buf(),
                source,
            });
        }
    };
    // Past CRIU's own failure (reported above, a broken pipe echoing it).
    let served = served.map_err(stream_error(archive))?;
    let outcome = after_restore(outcome, served.gpu_record.as_ref())?;
    tracing::debug!(opened = ?served.opened, staged = ?served.staged, check = ?served.check, stream = ?served.wall, criu = ?outcome.wall, "restore from archive: phases");
    if let Ok(u) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
        tracing::debug!(
            user_ms = ms(u.user_time()),
            sys_ms = ms(u.system_time()),
            "restore from archive: ferry's own CPU"
        );
    }
    Ok(ArchiveRestore {
        unpack: served.unpack,
        restore: outcome,
        wall: start.elapsed(),
        staging: images,
    })
}

/// What the serving thread did, for the report.
struct Prepared {
    opened: Duration,
    staged: Duration,
    check: Duration,
    wall: Duration,
    gpu_record: Option<crate::gpu::GpuRecord>,
    unpack: UnpackReport,
}

/// Why the serving thread stopped early.
enum Served {
    /// Before a byte went to CRIU: the archive, its images or this host
    /// cannot restore.
    Refused(Box<CheckpointError>),
    /// The same, found once CRIU had read the metadata images but before
    /// it was given any page: it may have started these processes.
    RefusedLate(Box<CheckpointError>, Vec<i32>),
    /// While streaming.
    Stream(StreamError<ferry_archive::ArchiveError>),
}

impl Served {
    fn refused(e: CheckpointError) -> Served {
        Served::Refused(Box::new(e))
    }
}

/// Opens, validates and checks the archive, stages its metadata images,
/// then serves every image to CRIU.
fn serve_archive(
    archive: &Path,
    images: &Path,
    opts: &ArchiveRestoreOptions,
    streamer: &Streamer,
    ended: &AtomicBool,
    start: Instant,
) -> Result<Prepared, Served> {
    let bad = |source| {
        Served::refused(CheckpointError::Archive {
            path: archive.to_path_buf(),
            source: Box::new(source),
        })
    };
    let chain = Chain::open(archive, opts.parent).map_err(bad)?;
    let opened = start.elapsed();
    let source = StreamSource::new(&chain, opts.threads, opts.progress)
        .map_err(bad)?
        .zero_pages(opts.zero_pages);
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
        .map_err(|source| {
            Served::refused(CheckpointError::BadImages {
                path: archive.to_path_buf(),
                source,
            })
        })?;
    for (name, bytes) in &contents {
        let path = images.join(name);
        std::fs::write(&path, bytes)
            .map_err(|source| Served::refused(CheckpointError::Staging { path, source }))?;
    }
    let gpu_record = gpu_gate(images).map_err(Served::refused)?;
    check_pids_free(&validated).map_err(Served::refused)?;
    let staged = start.elapsed();
    let mut check = source.check_layouts().map_err(bad)?;
    // The chunks are checked while CRIU reads the metadata images (and
    // starts the processes); no pages image is streamed before they pass.
    let (chunks, served) = std::thread::scope(|s| {
        let chunks = s.spawn(|| source.check_chunks());
        let served = streamer.serve(&source, ended);
        (chunks.join(), served)
    });
    match chunks {
        Ok(Ok(took)) => check += took,
        Ok(Err(finding)) => {
            let error = CheckpointError::Archive {
                path: archive.to_path_buf(),
                source: Box::new(finding),
            };
            // (A tree of its own pid namespace is restored in a new one.)
            let own_pid_ns = validated.tree.iter().any(|e| e.pid == 1);
            let pids = validated
                .tree
                .iter()
                .filter(|_| !own_pid_ns)
                .flat_map(|e| e.threads.iter().copied().chain([e.pid]))
                .filter_map(|p| i32::try_from(p).ok())
                .collect();
            return Err(Served::RefusedLate(Box::new(error), pids));
        }
        Err(_) => {
            return Err(Served::refused(CheckpointError::Stream {
                path: archive.to_path_buf(),
                detail: "the chunk check panicked".into(),
            }))
        }
    }
    let served = served.map_err(|e| match e {
        // A page that failed its check says more than CRIU's short read.
        StreamError::Source {
            source: source @ ferry_archive::ArchiveError::Corrupt { .. },
            ..
        } => bad(source),
        e => Served::Stream(e),
    })?;
    Ok(Prepared {
        opened,
        staged,
        check,
        wall: served.wall,
        gpu_record,
        unpack: UnpackReport {
            wall: served.wall + check,
            threads: source.threads(),
            files: served.files,
            bytes: head.index().files.iter().map(|f| f.size).sum(),
            bytes_written: served.bytes,
            chunks_read: source.chunks_read(),
            generations: chain.generations(),
            zero_pages_left_out: source.zero_pages_left_out(),
        },
    })
}

/// Whether the streamer gave up because CRIU stopped reading an image.
fn stalled(e: &StreamError<ferry_archive::ArchiveError>) -> bool {
    ferry_criu::streamer::caused_by(e, std::io::ErrorKind::TimedOut)
}

fn stream_error(
    archive: &Path,
) -> impl Fn(StreamError<ferry_archive::ArchiveError>) -> CheckpointError + '_ {
    move |e| CheckpointError::Stream {
        path: archive.to_path_buf(),
        detail: e.to_string(),
    }
}
