//! ferry's checkpoint archive: one file holding a whole CRIU images
//! directory, compressed, deduplicated and checksummed.
//!
//! ```text
//!  offset 0   +--------------------------------------------------------------+
//!             | header (40 B)                                                |
//!             |  "FERRYARC" | major u16 | minor u16 | flags u32              |
//!             |  archive id (16 B random) | xxh3-64 of the 32 bytes before   |
//!             +--------------------------------------------------------------+
//!             | chunk 0 (32 B header + payload)                              |
//!             |  "FCHK" | codec u8 | kind u8 | 0u16 | raw_len u32            |
//!             |  stored_len u32 | checksum u64 | 8 zero bytes                |
//!             |  payload: stored_len bytes (zstd frame, or raw)              |
//!             | chunk 1 ...                                                  |
//!             +--------------------------------------------------------------+
//!             | index: zstd(protobuf `Index`)                                |
//!             |  chunks: offset, lengths, codec, kind, checksum, file, slot |
//!             |  files: name, size, checksum, layout                         |
//!             |  slot digests, parent reference and ancestry, pack stats     |
//!             +--------------------------------------------------------------+
//!             | trailer (48 B)                                               |
//!             |  "FERRYEND" | index offset u64 | index len u64               |
//!             |  index raw len u64 | index xxh3-64 u64 | xxh3-64 of the 40 B |
//!  EOF        +--------------------------------------------------------------+
//! ```
//!
//! All integers are little-endian. Every byte is covered by a checksum: the
//! header's and the trailer's by their own, each chunk's header fields and
//! payload by the chunk checksum (xxh3-64), the index by the trailer's, and
//! the chunks tile the space between header and index exactly, so one
//! flipped byte anywhere is found and named.
//!
//! **Pages images** (`pages-*.img`) are cut into 4 KiB pages. Each page is
//! either all zero (recorded, never stored), or equal by content (xxh3-128
//! digest) to a page already stored in this archive or one of its ancestors
//! (referenced), or new: new pages get consecutive *slots* and are stored in
//! chunks of up to [`CHUNK_PAGES`] pages, compressed independently (zstd, or
//! raw when zstd would not save space). A pages image's layout is a list of
//! runs `(source, length, first slot)`, source 0 meaning zero pages and
//! `1 + g` generation `g` (0 this archive, 1 its parent, ...).
//! **Other images** are stored as consecutive compressed chunks of up to
//! [`CHUNK_PAGES`] × 4 KiB.
//!
//! Each file's checksum is xxh3-128 over the xxh3-128 digests of its 4 KiB
//! blocks and its size ([`format::file_checksum`]): computed in parallel when
//! packing, and checked on unpack from verified page digests.
//!
//! The writer makes one pass and only appends, so an archive can be written
//! to a pipe or socket; readers of a file use the trailer and index for
//! random access. Incremental archives name their parent by id and path;
//! readers check the ids of the whole chain before restoring anything.
//! A reader refuses a major version other than [`format::VERSION_MAJOR`].

#![forbid(unsafe_code)]

pub mod chain;
pub mod format;
pub mod holes;
pub mod inspect;
pub mod pack;
pub mod read;
pub mod stream;
pub mod unpack;

use std::io;
use std::path::PathBuf;

pub use chain::Chain;
pub use format::{ArchiveId, Index};
pub use holes::{ZeroPages, MIN_INNER_RUN};
pub use pack::{pack_dir, pack_to_file, PackOptions, PackReport};
pub use read::{Archive, ArchiveFile, ChunkBuf, ReadAt};
pub use unpack::{unpack, unpack_to_dir, update, UnpackReport};

/// Pages per chunk (1 MiB raw): large enough for zstd to find redundancy,
/// small enough to spread a 1 GiB image over all cores and to bound what a
/// reader holds per thread.
pub(crate) const CHUNK_PAGES: usize = 256;

/// Default zstd level: chosen from `ferry bench compress` (see docs/benchmarks.md).
pub const DEFAULT_LEVEL: i32 = 1;

/// A pool of `threads` threads (at least one) for packing or reading.
fn thread_pool(threads: usize) -> Result<rayon::ThreadPool, ArchiveError> {
    build_pool(threads, None)
}

/// Nice value of the threads that decompress for a restoring CRIU.
const FEEDER_NICE: i32 = 10;

/// A pool whose threads give way to CRIU when both want a CPU: CRIU
/// restores memory on one thread, and every slice it loses to a
/// decompressing thread is added to the restore's wall time, while the
/// decompression only has to stay ahead of it.
fn feeder_pool(threads: usize) -> Result<rayon::ThreadPool, ArchiveError> {
    build_pool(threads, Some(FEEDER_NICE))
}

fn build_pool(threads: usize, nice: Option<i32>) -> Result<rayon::ThreadPool, ArchiveError> {
    let threads = threads.max(1);
    let mut builder = rayon::ThreadPoolBuilder::new().num_threads(threads);
    if let Some(nice) = nice {
        builder = builder.start_handler(move |_| {
            // Advisory: at normal priority the work is only slower.
            let _ = ferry_sys::sched::set_this_thread_nice(nice);
        });
    }
    builder
        .build()
        .map_err(|source| ArchiveError::Threads { threads, source })
}

/// Receives progress (raw bytes done) from long packs and unpacks.
pub trait Progress: Sync {
    fn advance(&self, bytes: u64);
}

/// Progress that goes nowhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn advance(&self, _: u64) {}
}

/// Everything that can go wrong writing or reading an archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    GpuRecord(Box<ferry_image::gpu_record::GpuRecordError>),
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: declares {pages} pages of memory; keeping track of them alone takes {needs} bytes, more than half of what this host has available ({available} bytes): refused before allocating", path.display())]
    TooManyPages {
        path: PathBuf,
        pages: u64,
        needs: u64,
        available: u64,
    },
    #[error("{}: declares {pages} pages ({memory} bytes) of memory, more than twice all this host has ({host} bytes of RAM and swap): refused before allocating", path.display())]
    MoreMemoryThanHost {
        path: PathBuf,
        pages: u64,
        memory: u64,
        host: u64,
    },
    #[error("{}: not a ferry archive (no FERRYARC magic)", path.display())]
    NotAnArchive { path: PathBuf },
    #[error("{}: not a regular file (a FIFO, device, socket or directory is never read as an archive)", path.display())]
    NotAFile { path: PathBuf },
    #[error("{}: archive format {major}.{minor}, but this ferry reads {supported}.x: {}", path.display(), version_advice(*major, *supported))]
    OtherVersion {
        path: PathBuf,
        major: u16,
        minor: u16,
        supported: u16,
    },
    #[error("{}: {what}", path.display())]
    Corrupt { path: PathBuf, what: Corruption },
    #[error("{}: parent archive {} not found (recorded as {recorded}); give it with --parent", path.display(), tried.display())]
    ParentMissing {
        path: PathBuf,
        tried: PathBuf,
        recorded: String,
    },
    #[error("{}: its recorded parent {} belongs to uid {owner}, not to this user: not followed (give the parent with --parent if it is the one)", path.display(), parent.display())]
    ParentNotOwned {
        path: PathBuf,
        parent: PathBuf,
        owner: u32,
    },
    #[error("{}: parent {} is not the archive this one was made from (expected id {expected}, found {found})", path.display(), parent.display())]
    ParentMismatch {
        path: PathBuf,
        parent: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{}: pages image {file} is {size} bytes, not a whole number of pages", path.display())]
    PagesNotAligned {
        path: PathBuf,
        file: String,
        size: u64,
    },
    #[error("{}: {problem}", path.display())]
    Destination {
        path: PathBuf,
        problem: &'static str,
    },
    #[error("zstd failed at level {level}")]
    Compress {
        level: i32,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {threads} worker threads")]
    Threads {
        threads: usize,
        #[source]
        source: rayon::ThreadPoolBuildError,
    },
}

impl From<ferry_image::gpu_record::GpuRecordError> for ArchiveError {
    fn from(e: ferry_image::gpu_record::GpuRecordError) -> Self {
        ArchiveError::GpuRecord(Box::new(e))
    }
}

/// How an archive is damaged. Each names what it could: the chunk, the
/// file it belongs to, the byte offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("header damaged (checksum mismatch)")]
    Header,
    #[error("archive is {len} bytes, too short to be complete (truncated?)")]
    TooShort { len: u64 },
    #[error("no valid trailer at the end: the archive is truncated or its trailer is damaged")]
    Trailer,
    #[error("index damaged: {detail}")]
    Index { detail: String },
    #[error("chunk {chunk} of {file} at byte {offset}: {detail}")]
    Chunk {
        chunk: usize,
        file: String,
        offset: u64,
        detail: String,
    },
    #[error("{file}: page {page} does not match its recorded digest (chunk {chunk}, slot {slot})")]
    Page {
        file: String,
        page: u64,
        chunk: usize,
        slot: u64,
    },
    #[error("{file}: content does not match the checksum in the manifest")]
    FileChecksum { file: String },
}

impl ArchiveError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ArchiveError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, what: Corruption) -> Self {
        ArchiveError::Corrupt {
            path: path.into(),
            what,
        }
    }
}

/// Hex form of an archive id, for messages and reports.
pub fn id_hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;

fn version_advice(major: u16, supported: u16) -> &'static str {
    if major > supported {
        "upgrade ferry"
    } else {
        "written by an older ferry, whose page digests could be collided; unpack it with that ferry and pack it again"
    }
}
