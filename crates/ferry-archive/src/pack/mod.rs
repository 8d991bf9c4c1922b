//! Writing an archive from an images directory in one pass.
//!
//! One pipeline, three kinds of work running at once:
//! - the caller's thread plans: it has the pool compute the digests of a
//!   pages image, then decides page by page (zero, already stored here or
//!   in an ancestor, or new) and cuts the new pages into chunk jobs;
//! - the pool compresses each job as soon as it is planned, and whichever
//!   thread finishes the next chunk in job order appends it (and those
//!   after it that are ready) to the output.
//!
//! At most `IN_FLIGHT_PER_THREAD` × threads + `IN_FLIGHT_EXTRA` jobs are
//! between "planned" and "written", which bounds memory without making
//! threads wait for each other. The output only ever grows, so it may be a
//! pipe or a socket. On 2 vCPUs every wakeup of a thread that is not
//! compressing preempts one that is, so the planner is woken once per run
//! of scan results and once per half window, and no thread only writes.

mod compress;
mod input;
mod output;
mod pipeline;
mod plan;
mod scan;

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::chain::Chain;
use crate::format::{
    ArchiveId, Digest, FileEntry, Header, Index, PackStats, ParentRef, VERSION_MAJOR, VERSION_MINOR,
};
use crate::{ArchiveError, Progress};
use ferry_sys::PAGE_SIZE;

use compress::*;
use input::*;
use output::*;
use pipeline::*;
use plan::*;
use scan::*;

/// Jobs per thread between "planned" and "written": enough to keep every
/// thread busy, few enough to bound memory (up to 2 MiB each).
const IN_FLIGHT_PER_THREAD: usize = 8;
/// Jobs in flight beyond the per-thread share: chunks are written in
/// order, and one slow chunk (text) among fast ones (random pages, given
/// up on after a probe) must not hold the planner back while the threads
/// idle. Each costs at most one chunk of memory.
const IN_FLIGHT_EXTRA: usize = 32;
/// Pages scanned (zero check, digest, entropy class) in one task: small
/// enough that the scan of a file spreads over all threads and runs
/// between the chunks being compressed.
const DIGEST_BATCH_PAGES: usize = 1024;
/// Scan tasks queued ahead of the planner (64 MiB of pages): the pool runs
/// tasks in the order they come, so a scan queued only just ahead waits
/// behind every chunk in flight, and the planner sleeps until it is done
/// (a wakeup that preempts a compressing thread). Their results are small.
const SCAN_AHEAD: usize = 16;
/// Scan results the planner waits for at once when it has caught up.
const SCAN_WAKE: usize = 8;
/// A chunk of random-looking pages is compressed only if its first
/// `PROBE_BYTES` compress: zstd spends as long finding nothing in random
/// bytes as compressing text, and such chunks are nearly always stored raw.
const PROBE_BYTES: usize = 64 << 10;
/// Bytes of a mapped file unmapped at once behind the writer.
const RELEASE_STEP: usize = 64 << 20;
/// zstd level of the index. It is mostly page digests, which do not
/// compress, and runs, which do by repetition: a negative level finds the
/// repetitions but skips entropy coding, which spent its time on the
/// digests for nothing (12 ms of a 1 GiB pack, after all chunks, when
/// nothing else runs).
const INDEX_LEVEL: i32 = -1;
/// A chunk is stored raw unless zstd saves at least 1/32 of it.
const MIN_SAVING_DIVISOR: usize = 32;
/// Files up to this size are read into memory; larger ones are mapped.
const READ_LIMIT: u64 = 1 << 20;

/// How to pack.
#[derive(Clone)]
pub struct PackOptions<'a> {
    pub level: i32,
    /// Worker threads (compression and hashing); at least 1.
    pub threads: usize,
    /// The parent archive, for an incremental archive.
    pub parent: Option<PathBuf>,
    /// Free text recorded in the index (what was archived).
    pub source: String,
    pub progress: &'a dyn Progress,
}

/// What a pack did.
#[derive(Debug, Clone, Serialize)]
pub struct PackReport {
    #[serde(serialize_with = "ferry_image::units::serde_micros")]
    pub wall: Duration,
    pub level: i32,
    pub threads: usize,
    pub files: usize,
    pub chunks: usize,
    /// Bytes of the images directory.
    pub raw_bytes: u64,
    /// Bytes of pages images.
    pub pages_raw_bytes: u64,
    /// Bytes of the archive.
    pub archive_bytes: u64,
    pub pages: u64,
    pub zero_pages: u64,
    /// Pages equal to an earlier page of this archive.
    pub duplicate_pages: u64,
    /// Pages found in an ancestor archive (not stored again).
    pub parent_pages: u64,
    /// Pages stored (unique, non-zero, not in an ancestor).
    pub new_pages: u64,
    pub id: String,
    pub parent: Option<String>,
}

impl PackReport {
    /// Raw bytes packed per second, in MB/s (10^6).
    pub fn throughput_mb_s(&self) -> f64 {
        self.raw_bytes as f64 / 1e6 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Packs `dir` into `path`, written under a temporary name and renamed when
/// complete and synced, then the directory synced: `path` never holds a
/// partial archive, and once this returns the archive survives a crash. A `path`
/// that is a device, a FIFO or a socket (`/dev/null`, a named pipe) is
/// written in place: renaming over it would replace it with a file.
pub fn pack_to_file(
    dir: &Path,
    path: &Path,
    opts: &PackOptions,
) -> Result<PackReport, ArchiveError> {
    if let Ok(meta) = fs::metadata(path) {
        if !meta.is_file() && !meta.is_dir() {
            let out = fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| ArchiveError::io("open", path, e))?;
            return pack_dir(dir, BufWriter::with_capacity(1 << 16, out), None, opts);
        }
    }
    let parent_dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "archive".into());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.partial-"))
        .tempfile_in(parent_dir)
        .map_err(|e| ArchiveError::io("create archive in", parent_dir, e))?;
    let file = tmp
        .reopen()
        .map_err(|e| ArchiveError::io("open", tmp.path(), e))?;
    // Chunks are mostly larger than the buffer and bypass it; it gathers
    // the small ones and the chunk headers.
    let report = pack_dir(
        dir,
        BufWriter::with_capacity(1 << 16, file),
        Some(path),
        opts,
    )?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| ArchiveError::io("sync", tmp.path(), e))?;
    tmp.persist(path)
        .map_err(|e| ArchiveError::io("rename archive to", path, e.error))?;
    // The rename is on stable storage only once the directory is.
    fs::File::open(parent_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ArchiveError::io("sync the directory", parent_dir, e))?;
    Ok(report)
}

/// Packs `dir` into `out` in one pass. `archive_path`, when known, lets the
/// parent be recorded relative to the archive.
pub fn pack_dir<W: Write + Send>(
    dir: &Path,
    out: W,
    archive_path: Option<&Path>,
    opts: &PackOptions,
) -> Result<PackReport, ArchiveError> {
    let start = Instant::now();
    let pool = super::thread_pool(opts.threads)?;
    let threads = pool.current_num_threads();
    let parent = opts
        .parent
        .as_deref()
        .map(|p| Chain::open(p, None))
        .transpose()?;
    let mut files = Vec::new();
    for (name, size) in list_files(dir)? {
        let pages = is_pages_image(&name);
        if pages && size % PAGE_SIZE as u64 != 0 {
            return Err(ArchiveError::PagesNotAligned {
                path: dir.to_path_buf(),
                file: name,
                size,
            });
        }
        let bytes = Bytes::load(&dir.join(&name), size)?;
        files.push(Source { name, pages, bytes });
    }
    let id = new_id(dir);
    let header = Header {
        major: VERSION_MAJOR,
        minor: VERSION_MINOR,
        flags: 0,
        id,
    };
    let writer = ChunkWriter::new(out, header, opts.progress)?;
    let mut planner = Planner::new(parent.as_ref())?;
    let parent_ref = parent.as_ref().map(|c| {
        let head = c.head();
        ParentRef {
            id: head.id().to_vec(),
            path: record_path(head.path(), archive_path),
            slots: head.slots(),
        }
    });
    let (mut writer, (index, raw_bytes)) =
        run_pipeline(&pool, writer, threads, opts.level, &files, |emit| {
            let entries = files
                .iter()
                .enumerate()
                .map(|(fi, f)| {
                    if f.pages {
                        planner.plan_pages(&pool, fi, f, emit)
                    } else {
                        planner.plan_data(&pool, fi, f, emit)
                    }
                })
                .collect::<Result<Vec<FileEntry>, ArchiveError>>()?;
            // While the pool compresses the last chunks: all of the index
            // but the chunk list and the statistics, encoded and compressed.
            let raw_bytes: u64 = entries.iter().map(|f| f.size).sum();
            let ancestry: Vec<Vec<u8>> = match &parent {
                Some(c) => std::iter::once(c.head().id().to_vec())
                    .chain(c.head().index().ancestry.iter().cloned())
                    .collect(),
                None => Vec::new(),
            };
            let head = Index {
                files: entries,
                slot_digests: digest_bytes(&planner.slot_digests),
                parent: parent_ref.clone(),
                ancestry,
                ferry_version: env!("CARGO_PKG_VERSION").to_string(),
                created_unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                source: opts.source.clone(),
                page_size: PAGE_SIZE as u32,
                gpu: ferry_image::gpu_record::GpuRecord::read(dir)?
                    .as_ref()
                    .map(Into::into),
                page_key: planner.key.bytes().to_vec(),
                ..Default::default()
            };
            Ok((IndexEncoder::start(&head)?, raw_bytes))
        })?;
    tracing::debug!(elapsed = ?start.elapsed(), "pack: chunks written");
    let counts = planner.counts;
    // Protobuf reads concatenated encodings of a message as one message
    // with the fields of both: the rest of the index follows the head.
    let rest = Index {
        chunks: std::mem::take(&mut writer.chunks),
        stats: Some(PackStats {
            wall_us: start.elapsed().as_micros() as u64,
            level: opts.level,
            threads: threads as u32,
            raw_bytes,
            stored_bytes: writer.offset,
        }),
        ..Default::default()
    };
    let chunks = rest.chunks.len();
    let archive_bytes = writer.finish(index.finish(&rest)?)?;
    tracing::debug!(elapsed = ?start.elapsed(), "pack: index written");
    Ok(PackReport {
        wall: start.elapsed(),
        level: opts.level,
        threads,
        files: files.len(),
        chunks,
        raw_bytes,
        pages_raw_bytes: counts.pages * PAGE_SIZE as u64,
        archive_bytes,
        pages: counts.pages,
        zero_pages: counts.zero,
        duplicate_pages: counts.duplicate,
        parent_pages: counts.parent,
        new_pages: counts.new,
        id: super::id_hex(&id),
        parent: parent_ref.map(|p| super::id_hex(&p.id)),
    })
}

/// Regular files of `dir`, sorted by name.
fn list_files(dir: &Path) -> Result<Vec<(String, u64)>, ArchiveError> {
    let rd = fs::read_dir(dir).map_err(|e| ArchiveError::io("read images directory", dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| ArchiveError::io("read images directory", dir, e))?;
        let meta = entry
            .metadata()
            .map_err(|e| ArchiveError::io("stat", entry.path(), e))?;
        if meta.is_file() {
            out.push((entry.file_name().to_string_lossy().into_owned(), meta.len()));
        } else {
            tracing::warn!(path = %entry.path().display(), "not a regular file: left out of the archive");
        }
    }
    out.sort();
    Ok(out)
}

pub fn is_pages_image(name: &str) -> bool {
    ferry_image::dir::classify_name(name) == ferry_image::FileClass::Pages
}

fn digest_bytes(digests: &[Digest]) -> Vec<u8> {
    let mut out = Vec::with_capacity(digests.len() * 16);
    for d in digests {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out
}

/// A fresh archive id: 16 bytes from the kernel's random pool.
fn new_id(dir: &Path) -> ArchiveId {
    ferry_sys::random_bytes().unwrap_or_else(|_| {
        // No /dev/urandom: time, pid and directory still make ids distinct.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let seed = format!("{now} {} {}", std::process::id(), dir.display());
        xxhash_rust::xxh3::xxh3_128(seed.as_bytes()).to_le_bytes()
    })
}

/// How a child records its parent's path: relative to the child's
/// directory when the parent lies under it, else absolute.
fn record_path(parent: &Path, archive: Option<&Path>) -> String {
    let parent_abs = fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
    let child_dir = archive
        .and_then(|a| std::path::absolute(a).ok())
        .and_then(|a| a.parent().map(Path::to_path_buf))
        .and_then(|d| fs::canonicalize(d).ok());
    match child_dir.and_then(|d| parent_abs.strip_prefix(&d).ok().map(Path::to_path_buf)) {
        Some(rel) => rel.display().to_string(),
        None => parent_abs.display().to_string(),
    }
}

fn write_err(source: io::Error) -> ArchiveError {
    ArchiveError::io("write archive to", "output", source)
}
