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

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use memmap2::Mmap;
use prost::Message;
use rayon::prelude::*;
use serde::Serialize;

use super::chain::Chain;
use super::format::{
    self, digest, file_checksum, ArchiveId, ChunkEntry, ChunkHeader, ChunkKind, Codec, Digest,
    FileEntry, Header, Index, PackStats, ParentRef, Trailer, SOURCE_GEN_BASE, SOURCE_ZERO,
    VERSION_MAJOR, VERSION_MINOR,
};
use super::{ArchiveError, Progress, CHUNK_PAGES};
use ferry_image::page::{fingerprint, looks_random};
use ferry_sys::mmap::{map_or_read, release_range, FileBytes};
use ferry_sys::PAGE_SIZE;

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
/// complete and synced: `path` never holds a partial archive. A `path`
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
    let mut planner = Planner::new(parent.as_ref());
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

/// A file being packed.
struct Source {
    name: String,
    pages: bool,
    bytes: Bytes,
}

/// A file's bytes: read when small, mapped when large (and only this user
/// can change it).
enum Bytes {
    Owned(Vec<u8>),
    Mapped(Mmap),
}

impl Bytes {
    fn load(path: &Path, size: u64) -> Result<Bytes, ArchiveError> {
        if size <= READ_LIMIT {
            return fs::read(path)
                .map(Bytes::Owned)
                .map_err(|e| ArchiveError::io("read", path, e));
        }
        let f = File::open(path).map_err(|e| ArchiveError::io("open", path, e))?;
        match map_or_read(&f, false) {
            Ok(FileBytes::Mapped(m)) => Ok(Bytes::Mapped(m)),
            Ok(FileBytes::Read(v)) => Ok(Bytes::Owned(v)),
            Err(e) => Err(ArchiveError::io("map", path, e)),
        }
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped(m) => m,
        }
    }
}

/// Hashes digests by their low 64 bits: they are already uniform.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type DigestMap<V> = HashMap<Digest, V, BuildHasherDefault<DigestHasher>>;

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    pages: u64,
    zero: u64,
    duplicate: u64,
    parent: u64,
    new: u64,
}

/// What to compress: pages of a pages image, or a byte range of a file.
enum Job {
    Pages {
        file: usize,
        first_slot: u32,
        pages: Vec<u32>,
        /// Every page looked random: see [`PROBE_BYTES`].
        random: bool,
        /// No later job of the file reads below this offset.
        done_below: usize,
    },
    Data {
        file: usize,
        start: usize,
        len: usize,
    },
}

/// A page scanned: zero, or its digest and whether it looks random.
type Scan = Option<(Digest, bool)>;

fn scan(pages: &[u8]) -> Vec<Scan> {
    pages
        .chunks(PAGE_SIZE)
        .map(|p| fingerprint(p).map(|d| (d, looks_random(p))))
        .collect()
}

/// Scans `bytes` in batches of [`DIGEST_BATCH_PAGES`] pages and hands each
/// batch, in order, to `take`. With one thread, this thread scans. With
/// more, the pool scans a few batches ahead of `take`, as tasks queued
/// between the chunks being compressed: hashing, bound by memory
/// bandwidth, then runs beside compressing instead of on every thread at
/// once before it.
fn scan_in_batches(
    pool: &rayon::ThreadPool,
    bytes: &[u8],
    mut take: impl FnMut(Vec<Scan>) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let batches: Vec<&[u8]> = bytes.chunks(DIGEST_BATCH_PAGES * PAGE_SIZE).collect();
    let threads = pool.current_num_threads();
    if threads == 1 {
        return batches.into_iter().try_for_each(|b| take(scan(b)));
    }
    let ahead = SCAN_AHEAD;
    let arrivals = Arrivals::default();
    pool.in_place_scope(|s| {
        let spawn = |k: usize| {
            let (arrivals, b) = (&arrivals, batches[k]);
            s.spawn(move |_| arrivals.put(k, std::panic::catch_unwind(|| scan(b))));
        };
        for k in 0..ahead.min(batches.len()) {
            spawn(k);
        }
        for k in 0..batches.len() {
            if k + ahead < batches.len() {
                spawn(k + ahead);
            }
            let scanned = arrivals.take(k, (k + SCAN_WAKE).min(batches.len()));
            take(scanned.unwrap_or_else(|panic| std::panic::resume_unwind(panic)))?;
        }
        Ok(())
    })
}

/// Results that arrive out of order, taken in order. A taker that has to
/// wait is woken once a run of them is there, not for each one: every
/// wakeup of the planner preempts a compressing thread.
struct Arrivals<T> {
    state: Mutex<Arrived<T>>,
    ready: std::sync::Condvar,
}

struct Arrived<T> {
    items: HashMap<usize, T>,
    /// What a waiting taker needs before it is woken.
    awaited: Option<std::ops::Range<usize>>,
}

impl<T> Default for Arrivals<T> {
    fn default() -> Self {
        Arrivals {
            state: Mutex::new(Arrived {
                items: HashMap::new(),
                awaited: None,
            }),
            ready: std::sync::Condvar::new(),
        }
    }
}

impl<T> Arrivals<T> {
    fn put(&self, k: usize, v: T) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.items.insert(k, v);
        if let Some(r) = g.awaited.clone() {
            if r.into_iter().all(|j| g.items.contains_key(&j)) {
                g.awaited = None;
                self.ready.notify_one();
            }
        }
    }

    /// Result `k`; when it has not arrived, waits for all of `k..until`
    /// (each of them must come).
    fn take(&self, k: usize, until: usize) -> T {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !g.items.contains_key(&k) {
            g.awaited = Some(k..until.max(k + 1));
            g = self
                .ready
                .wait_while(g, |g| g.awaited.is_some())
                .unwrap_or_else(|p| p.into_inner());
        }
        g.items.remove(&k).expect("woken once it arrived")
    }
}

/// Hands a planned job to the pipeline; returns its chunk id.
type Emit<'e> = dyn FnMut(Job) -> Result<u32, ArchiveError> + 'e;

/// The page decisions: which digests are stored where.
struct Planner {
    /// Where each digest is stored: (source, slot) in an ancestor, or
    /// (SOURCE_GEN_BASE, id) here, the id's slot in `slot_of`.
    known: DigestMap<(u32, u32)>,
    /// The slot of each page stored here, by id (ids are given in page
    /// order, slots in chunk order).
    slot_of: Vec<u32>,
    slot_digests: Vec<Digest>,
    counts: Counts,
}

/// New pages of one entropy class waiting for a chunk.
#[derive(Default)]
struct Pending {
    random: bool,
    pages: Vec<u32>,
    ids: Vec<u32>,
    digests: Vec<Digest>,
}

impl Planner {
    fn new(parent: Option<&Chain>) -> Planner {
        let mut known = DigestMap::default();
        if let Some(chain) = parent {
            // Nearer generations win: insert the oldest first.
            for g in (0..chain.generations()).rev() {
                let a = chain.generation(g);
                let source = SOURCE_GEN_BASE + 1 + g as u32;
                for slot in 0..a.slots() {
                    if let Some(d) = a.slot_digest(slot) {
                        known.insert(d, (source, slot as u32));
                    }
                }
            }
        }
        Planner {
            known,
            slot_of: Vec::new(),
            slot_digests: Vec::new(),
            counts: Counts::default(),
        }
    }

    fn plan_pages(
        &mut self,
        pool: &rayon::ThreadPool,
        file: usize,
        src: &Source,
        emit: &mut Emit,
    ) -> Result<FileEntry, ArchiveError> {
        let zero = format::zero_page_digest();
        let total = src.bytes.len() / PAGE_SIZE;
        self.known.reserve(total);
        self.slot_digests.reserve(total);
        let mut scanned: Vec<Scan> = Vec::with_capacity(total);
        // Per page: zero, stored in an ancestor (source, slot), or stored
        // here (SOURCE_GEN_BASE, id), its slot known once its chunk is
        // planned.
        let mut refs: Vec<(u32, u32)> = Vec::with_capacity(total);
        let mut pending = [
            Pending::default(),
            Pending {
                random: true,
                ..Pending::default()
            },
        ];
        // The decisions, page by page on this thread, batch after batch as
        // the pool scans them, while it compresses the chunks decided.
        scan_in_batches(pool, &src.bytes, |batch| {
            let from = scanned.len();
            scanned.extend_from_slice(&batch);
            for (i, p) in batch.into_iter().enumerate() {
                let i = from + i;
                self.counts.pages += 1;
                let Some((d, random)) = p else {
                    self.counts.zero += 1;
                    refs.push((SOURCE_ZERO, 0));
                    continue;
                };
                if let Some(&stored) = self.known.get(&d) {
                    if stored.0 == SOURCE_GEN_BASE {
                        self.counts.duplicate += 1;
                    } else {
                        self.counts.parent += 1;
                    }
                    refs.push(stored);
                    continue;
                }
                let id = self.slot_of.len() as u32;
                self.slot_of.push(u32::MAX);
                self.known.insert(d, (SOURCE_GEN_BASE, id));
                self.counts.new += 1;
                refs.push((SOURCE_GEN_BASE, id));
                // Random-looking pages go into chunks of their own: zstd then
                // gives up on them quickly, and the other pages compress
                // better without them.
                let [plain, rand] = &mut pending;
                let (group, other) = if random { (rand, plain) } else { (plain, rand) };
                group.pages.push(i as u32);
                group.ids.push(id);
                group.digests.push(d);
                if group.pages.len() == CHUNK_PAGES {
                    // Later jobs read the other group's pages and those not
                    // planned yet, nothing below.
                    let below = other
                        .pages
                        .first()
                        .map_or(i as u32 + 1, |&p| p.min(i as u32 + 1));
                    self.plan_chunk(file, group, below, emit)?;
                }
            }
            Ok(())
        })?;
        let [plain, rand] = &mut pending;
        let below = rand.pages.first().map_or(total as u32, |&p| p);
        self.plan_chunk(file, plain, below, emit)?;
        self.plan_chunk(file, rand, total as u32, emit)?;
        let mut runs = Runs::default();
        for &(source, at) in &refs {
            let slot = if source == SOURCE_GEN_BASE {
                self.slot_of[at as usize]
            } else {
                at
            };
            runs.push(source, slot);
        }
        let size = src.bytes.len() as u64;
        let checksum = file_checksum(scanned.iter().map(|p| p.map_or(zero, |(d, _)| d)), size);
        Ok(FileEntry {
            name: src.name.clone(),
            size,
            checksum: checksum.to_le_bytes().to_vec(),
            pages: true,
            data_chunks: Vec::new(),
            run_sources: runs.sources,
            run_lens: runs.lens,
            run_slots: runs.slots,
        })
    }

    /// Gives the pending pages the next slots, in order, and emits them as
    /// one chunk job, after which no job of the file reads below page
    /// `below`.
    fn plan_chunk(
        &mut self,
        file: usize,
        group: &mut Pending,
        below: u32,
        emit: &mut Emit,
    ) -> Result<(), ArchiveError> {
        if group.pages.is_empty() {
            return Ok(());
        }
        let first_slot = self.slot_digests.len() as u32;
        for (k, &id) in group.ids.iter().enumerate() {
            self.slot_of[id as usize] = first_slot + k as u32;
        }
        self.slot_digests.append(&mut group.digests);
        group.ids.clear();
        emit(Job::Pages {
            file,
            first_slot,
            pages: std::mem::take(&mut group.pages),
            random: group.random,
            done_below: below as usize * PAGE_SIZE,
        })?;
        Ok(())
    }

    fn plan_data(
        &mut self,
        pool: &rayon::ThreadPool,
        file: usize,
        src: &Source,
        emit: &mut Emit,
    ) -> Result<FileEntry, ArchiveError> {
        let digests: Vec<Digest> = if src.bytes.len() > READ_LIMIT as usize {
            pool.install(|| {
                src.bytes
                    .par_chunks(PAGE_SIZE)
                    .with_max_len(DIGEST_BATCH_PAGES)
                    .map(digest)
                    .collect()
            })
        } else {
            src.bytes.chunks(PAGE_SIZE).map(digest).collect()
        };
        let size = src.bytes.len() as u64;
        let step = CHUNK_PAGES * PAGE_SIZE;
        let mut data_chunks = Vec::new();
        let mut start = 0;
        while start < src.bytes.len() {
            let len = step.min(src.bytes.len() - start);
            data_chunks.push(emit(Job::Data { file, start, len })?);
            start += len;
        }
        Ok(FileEntry {
            name: src.name.clone(),
            size,
            checksum: file_checksum(digests, size).to_le_bytes().to_vec(),
            pages: false,
            data_chunks,
            run_sources: Vec::new(),
            run_lens: Vec::new(),
            run_slots: Vec::new(),
        })
    }
}

/// Page runs being built: consecutive pages from consecutive slots of one
/// source (or zero pages) extend the last run.
#[derive(Default)]
struct Runs {
    sources: Vec<u32>,
    lens: Vec<u32>,
    slots: Vec<u32>,
}

impl Runs {
    fn push(&mut self, source: u32, slot: u32) {
        if let (Some(&s), Some(len), Some(&first)) =
            (self.sources.last(), self.lens.last_mut(), self.slots.last())
        {
            if s == source && (source == SOURCE_ZERO || first.wrapping_add(*len) == slot) {
                *len += 1;
                return;
            }
        }
        self.sources.push(source);
        self.lens.push(1);
        self.slots
            .push(if source == SOURCE_ZERO { 0 } else { slot });
    }
}

/// A compressed chunk ready to append.
struct Compressed {
    file: usize,
    kind: ChunkKind,
    codec: Codec,
    raw_len: u32,
    first_slot: u32,
    /// No later job of the file reads below this offset.
    done_below: usize,
    payload: Vec<u8>,
    /// The chunk header's checksum, taken by the compressing thread while
    /// the payload is still in its cache.
    checksum: u64,
}

/// A small pool of reusable values (output buffers, compressor state):
/// fresh 1 MiB allocations cost page faults that serialise threads on the
/// process's memory map, and zstd contexts are worth keeping.
struct Reuse<T>(Mutex<Vec<T>>);

impl<T> Reuse<T> {
    fn new() -> Self {
        Reuse(Mutex::new(Vec::new()))
    }
    fn take(&self) -> Option<T> {
        self.0.lock().ok().and_then(|mut v| v.pop())
    }
    fn give(&self, t: T) {
        if let Ok(mut v) = self.0.lock() {
            v.push(t);
        }
    }
}

/// A compressing thread's reusable state.
struct Scratch {
    cz: zstd::bulk::Compressor<'static>,
    raw: Vec<u8>,
}

impl Scratch {
    fn new(level: i32) -> Result<Scratch, ArchiveError> {
        Ok(Scratch {
            cz: zstd::bulk::Compressor::new(level)
                .map_err(|source| ArchiveError::Compress { level, source })?,
            raw: Vec::with_capacity(CHUNK_PAGES * PAGE_SIZE),
        })
    }
}

/// Shared state of the compressing threads.
struct Workers<'f> {
    files: &'f [Source],
    level: i32,
    buffers: Reuse<Vec<u8>>,
    scratches: Reuse<Scratch>,
}

impl Workers<'_> {
    fn compress(&self, job: &Job) -> Result<Compressed, ArchiveError> {
        let mut scratch = match self.scratches.take() {
            Some(s) => s,
            None => Scratch::new(self.level)?,
        };
        let result = self.compress_with(&mut scratch, job);
        self.scratches.give(scratch);
        result
    }

    fn compress_with(&self, scratch: &mut Scratch, job: &Job) -> Result<Compressed, ArchiveError> {
        let raw = &mut scratch.raw;
        raw.clear();
        let (file, kind, first_slot, done_below, probe) = match job {
            Job::Pages {
                file,
                first_slot,
                pages,
                random,
                done_below,
            } => {
                let src = &self.files[*file].bytes;
                let mut i = 0;
                while i < pages.len() {
                    // Copy runs of consecutive pages in one go.
                    let mut j = i + 1;
                    while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                        j += 1;
                    }
                    let a = pages[i] as usize * PAGE_SIZE;
                    let b = (pages[j - 1] as usize + 1) * PAGE_SIZE;
                    raw.extend_from_slice(&src[a..b]);
                    i = j;
                }
                (*file, ChunkKind::Pages, *first_slot, *done_below, *random)
            }
            Job::Data { file, start, len } => {
                raw.extend_from_slice(&self.files[*file].bytes[*start..*start + *len]);
                (*file, ChunkKind::FileData, 0, *start + *len, false)
            }
        };
        let mut out = self.buffers.take().unwrap_or_default();
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        let compress = |input: &[u8], out: &mut Vec<u8>, cz: &mut zstd::bulk::Compressor| {
            out.clear();
            cz.compress_to_buffer(input, out)
                .map_err(|source| ArchiveError::Compress {
                    level: self.level,
                    source,
                })
                .map(|_| input.len() > out.len() + input.len() / MIN_SAVING_DIVISOR)
        };
        let worth = if probe && raw.len() > PROBE_BYTES {
            compress(&raw[..PROBE_BYTES], &mut out, &mut scratch.cz)?
                && compress(raw.as_slice(), &mut out, &mut scratch.cz)?
        } else {
            compress(raw.as_slice(), &mut out, &mut scratch.cz)?
        };
        let raw_len = raw.len() as u32;
        let codec = if worth {
            Codec::Zstd
        } else {
            // Not worth it: the raw bytes become the payload (a swap, not a
            // copy) and the scratch keeps the other buffer.
            std::mem::swap(&mut out, raw);
            Codec::Raw
        };
        let checksum = ChunkHeader::checksum_of(codec, kind, raw_len, &out);
        Ok(Compressed {
            file,
            kind,
            codec,
            raw_len,
            first_slot,
            done_below,
            payload: out,
            checksum,
        })
    }
}

/// Runs `plan` (which emits jobs) while the pool compresses them and a
/// writer thread appends them in order. With one thread, each job is
/// compressed and written where it is emitted.
fn run_pipeline<'a, W, T>(
    pool: &rayon::ThreadPool,
    writer: ChunkWriter<'a, W>,
    threads: usize,
    level: i32,
    files: &[Source],
    plan: impl FnOnce(&mut Emit) -> Result<T, ArchiveError>,
) -> Result<(ChunkWriter<'a, W>, T), ArchiveError>
where
    W: Write + Send,
{
    let workers = Workers {
        files,
        level,
        buffers: Reuse::new(),
        scratches: Reuse::new(),
    };
    if threads == 1 {
        let mut out = Output {
            writer,
            next: 0,
            released: Released::new(files),
            failed: None,
        };
        let planned = plan(&mut |job: Job| {
            out.append(workers.compress(&job)?, &workers)?;
            out.next += 1;
            Ok(out.next as u32 - 1)
        })?;
        return Ok((out.writer, planned));
    }
    let in_flight = threads * IN_FLIGHT_PER_THREAD + IN_FLIGHT_EXTRA;
    let order = InOrder {
        pending: Mutex::new(BTreeMap::new()),
        out: Mutex::new(Output {
            writer,
            next: 0,
            released: Released::new(files),
            failed: None,
        }),
        window: Window::new(in_flight),
    };
    let mut emitted = 0usize;
    let planned = {
        let (workers, order, next) = (&workers, &order, &mut emitted);
        pool.in_place_scope(|scope| {
            plan(&mut |job: Job| {
                if !order.window.enter() {
                    // Appending failed: its error is the one returned.
                    return Err(ArchiveError::io(
                        "write archive to",
                        "output",
                        io::Error::other("writer stopped"),
                    ));
                }
                let k = *next;
                *next += 1;
                scope.spawn(move |_| order.finish(k, workers.compress(&job), workers));
                Ok(k as u32)
            })
        })
    };
    let Output {
        writer,
        failed,
        next: appended,
        ..
    } = order.out.into_inner().map_err(|_| {
        ArchiveError::io(
            "write archive to",
            "output",
            io::Error::other("a thread appending chunks panicked"),
        )
    })?;
    match (failed, planned) {
        (Some(e), _) | (None, Err(e)) => Err(e),
        // Never an archive with a chunk missing.
        (None, Ok(_)) if appended != emitted => Err(ArchiveError::io(
            "write archive to",
            "output",
            io::Error::other(format!(
                "{appended} of {emitted} chunks appended (a bug in ferry's pack)"
            )),
        )),
        (None, Ok(p)) => Ok((writer, p)),
    }
}

/// Chunks compressed out of order, appended in order by whichever
/// compressing thread finishes the next one: no writer thread to wake for
/// every chunk (each wakeup preempted a compressing thread on 2 vCPUs).
struct InOrder<'a, 'f, W: Write> {
    pending: Mutex<BTreeMap<usize, Result<Compressed, ArchiveError>>>,
    out: Mutex<Output<'a, 'f, W>>,
    window: Window,
}

struct Output<'a, 'f, W: Write> {
    writer: ChunkWriter<'a, W>,
    /// The next job to append.
    next: usize,
    released: Released<'f>,
    /// The first error; later chunks are dropped.
    failed: Option<ArchiveError>,
}

impl<W: Write> Output<'_, '_, W> {
    /// Appends a chunk, gives its buffer back, and releases what no later
    /// job reads.
    fn append(&mut self, c: Compressed, workers: &Workers) -> Result<(), ArchiveError> {
        let (file, done_below) = (c.file, c.done_below);
        workers.buffers.give(self.writer.append(c)?);
        self.released.written(file, done_below);
        Ok(())
    }
}

impl<W: Write> InOrder<'_, '_, W> {
    /// Job `k` is compressed: appends it and every job after it that is
    /// ready, unless another thread is appending (it takes them then).
    fn finish(&self, k: usize, c: Result<Compressed, ArchiveError>, workers: &Workers) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(k, c);
        }
        loop {
            let Ok(mut out) = self.out.try_lock() else {
                return;
            };
            let mut appended = 0;
            loop {
                let next = out.next;
                let Some(c) = self.pending.lock().ok().and_then(|mut p| p.remove(&next)) else {
                    break;
                };
                if out.failed.is_none() {
                    if let Err(e) = c.and_then(|c| out.append(c, workers)) {
                        out.failed = Some(e);
                        self.window.stop();
                    }
                }
                out.next += 1;
                appended += 1;
            }
            let next = out.next;
            drop(out);
            self.window.leave(appended);
            // A job that arrived while this thread held the output found
            // it taken and left its chunk here: take it.
            if !self.pending.lock().is_ok_and(|p| p.contains_key(&next)) {
                return;
            }
        }
    }
}

/// Bounds the jobs between "planned" and "appended". The planner, once
/// the window is full, sleeps until it is half empty: one wakeup per
/// half window instead of one per chunk.
struct Window {
    state: Mutex<(usize, bool)>,
    room: std::sync::Condvar,
    max: usize,
}

impl Window {
    fn new(max: usize) -> Window {
        Window {
            state: Mutex::new((0, false)),
            room: std::sync::Condvar::new(),
            max,
        }
    }

    /// Takes a place for one job; false once writing has failed.
    fn enter(&self) -> bool {
        let Ok(mut g) = self.state.lock() else {
            return false;
        };
        if g.0 >= self.max {
            let low = self.max / 2;
            g = match self
                .room
                .wait_while(g, |(n, stopped)| *n > low && !*stopped)
            {
                Ok(g) => g,
                Err(_) => return false,
            };
        }
        if g.1 {
            return false;
        }
        g.0 += 1;
        true
    }

    /// `n` jobs were appended.
    fn leave(&self, n: usize) {
        if n == 0 {
            return;
        }
        if let Ok(mut g) = self.state.lock() {
            let was = g.0;
            g.0 -= n.min(g.0);
            let low = self.max / 2;
            if was > low && g.0 <= low {
                self.room.notify_one();
            }
        }
    }

    fn stop(&self) {
        if let Ok(mut g) = self.state.lock() {
            g.1 = true;
            self.room.notify_one();
        }
    }
}

/// Unmaps the parts of mapped files that every job has finished reading,
/// in steps of [`RELEASE_STEP`], as their chunks are written: the page
/// tables of a 1 GiB image then go while the pool compresses, rather than
/// in one 30 ms munmap after the last chunk. Large steps keep the TLB
/// shootdowns few (one call per job cost more than it saved on 2 vCPUs).
struct Released<'f> {
    files: &'f [Source],
    upto: Vec<usize>,
}

impl<'f> Released<'f> {
    fn new(files: &'f [Source]) -> Self {
        Released {
            files,
            upto: vec![0; files.len()],
        }
    }

    /// A chunk of `file` was written, and every job before it is done:
    /// nothing below `done_below` is read again. (Were it read, it would
    /// only fault in again from the file: the release is advisory.)
    fn written(&mut self, file: usize, done_below: usize) {
        let Bytes::Mapped(map) = &self.files[file].bytes else {
            return;
        };
        let from = self.upto[file];
        if done_below >= from + RELEASE_STEP {
            // A range left mapped goes with the whole map.
            let _ = release_range(map, from..done_below);
            self.upto[file] = done_below;
        }
    }
}

/// Appends chunks to the output, recording where each went.
struct ChunkWriter<'a, W: Write> {
    out: W,
    offset: u64,
    chunks: Vec<ChunkEntry>,
    progress: &'a dyn Progress,
}

impl<'a, W: Write> ChunkWriter<'a, W> {
    fn new(mut out: W, header: Header, progress: &'a dyn Progress) -> Result<Self, ArchiveError> {
        out.write_all(&header.encode()).map_err(write_err)?;
        Ok(ChunkWriter {
            out,
            offset: format::HEADER_LEN as u64,
            chunks: Vec::new(),
            progress,
        })
    }

    /// Appends a chunk; gives its payload buffer back for reuse.
    fn append(&mut self, c: Compressed) -> Result<Vec<u8>, ArchiveError> {
        let checksum = c.checksum;
        let h = ChunkHeader {
            codec: c.codec,
            kind: c.kind,
            raw_len: c.raw_len,
            stored_len: c.payload.len() as u32,
            checksum,
        };
        self.out.write_all(&h.encode()).map_err(write_err)?;
        self.out.write_all(&c.payload).map_err(write_err)?;
        self.chunks.push(ChunkEntry {
            offset: self.offset,
            stored_len: h.stored_len,
            raw_len: h.raw_len,
            codec: h.codec as u32,
            kind: h.kind as u32,
            checksum,
            file: c.file as u32,
            first_slot: c.first_slot,
        });
        self.offset += (format::CHUNK_HEADER_LEN + c.payload.len()) as u64;
        self.progress.advance(u64::from(c.raw_len));
        Ok(c.payload)
    }

    /// Writes index and trailer; returns the archive's length.
    fn finish(mut self, (stored, raw_len): (Vec<u8>, u64)) -> Result<u64, ArchiveError> {
        tracing::debug!(
            raw = raw_len,
            stored = stored.len(),
            "pack: index compressed"
        );
        let trailer = Trailer {
            index_offset: self.offset,
            index_len: stored.len() as u64,
            index_raw_len: raw_len,
            index_checksum: xxhash_rust::xxh3::xxh3_64(&stored),
        };
        self.out.write_all(&stored).map_err(write_err)?;
        self.out.write_all(&trailer.encode()).map_err(write_err)?;
        self.out.flush().map_err(write_err)?;
        Ok(self.offset + stored.len() as u64 + format::TRAILER_LEN as u64)
    }
}

/// The index, compressed as its parts are encoded.
struct IndexEncoder {
    zstd: zstd::stream::write::Encoder<'static, Vec<u8>>,
    raw_len: u64,
}

impl IndexEncoder {
    fn start(head: &Index) -> Result<IndexEncoder, ArchiveError> {
        let raw = head.encode_to_vec();
        let mut zstd =
            zstd::stream::write::Encoder::new(Vec::with_capacity(raw.len()), INDEX_LEVEL)
                .map_err(index_compress_err)?;
        zstd.write_all(&raw).map_err(index_compress_err)?;
        Ok(IndexEncoder {
            zstd,
            raw_len: raw.len() as u64,
        })
    }

    /// Appends `rest` and ends the frame: (compressed, raw length).
    fn finish(mut self, rest: &Index) -> Result<(Vec<u8>, u64), ArchiveError> {
        let raw = rest.encode_to_vec();
        self.zstd.write_all(&raw).map_err(index_compress_err)?;
        let stored = self.zstd.finish().map_err(index_compress_err)?;
        Ok((stored, self.raw_len + raw.len() as u64))
    }
}

fn index_compress_err(source: io::Error) -> ArchiveError {
    ArchiveError::Compress {
        level: INDEX_LEVEL,
        source,
    }
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
    use std::io::Read;
    let mut id = [0u8; 16];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .is_err()
    {
        // No /dev/urandom: time, pid and directory still make ids distinct.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let seed = format!("{now} {} {}", std::process::id(), dir.display());
        id = xxhash_rust::xxh3::xxh3_128(seed.as_bytes()).to_le_bytes();
    }
    id
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
