//! CRIU's image files, page digests and `/proc`, read and validated into
//! ferry's own types (the lowest crate that sees CRIU's protobufs).
//!
//! CRIU writes a dump as a directory of image files (criu.org/Images):
//!
//! ```text
//!   inventory.img      INVENTORY_MAGIC  { u32 len, inventory_entry }
//!   pstree.img         IMG_COMMON_MAGIC PSTREE_MAGIC { u32 len, pstree_entry }*
//!   core-<tid>.img     IMG_COMMON_MAGIC CORE_MAGIC   { u32 len, core_entry }
//!   mm-<pid>.img       IMG_COMMON_MAGIC MM_MAGIC     { u32 len, mm_entry }
//!   pagemap-<pid>.img  IMG_COMMON_MAGIC PAGEMAP_MAGIC { u32 len, pagemap_head }
//!                                                    { u32 len, pagemap_entry }*
//!   pages-<id>.img     raw 4 KiB pages, in pagemap order, for PE_PRESENT entries
//!   stats-dump         IMG_SERVICE_MAGIC STATS_MAGIC { u32 len, stats_entry }
//! ```
//!
//! All integers are little-endian (host order on x86-64/arm64). This module
//! owns the raw protobuf types of those files: [`framing`] splits a file into
//! entries, the per-file modules decode and validate them into domain types,
//! and [`ImagesDir`] ties a directory together and checks that it is complete
//! and consistent before anything restores from it.

#![forbid(unsafe_code)]

pub mod core;
pub mod dir;
pub mod framing;
pub mod gpu_record;
pub mod inventory;
pub mod mm;
pub mod page;
pub mod pagemap;
pub mod process;
pub mod pstree;
pub mod referring;
pub mod stats;
pub mod units;

use std::io;
use std::path::PathBuf;

pub use self::core::TaskCore;
pub use dir::{FileClass, ImageFile, ImagesDir, Validated};
pub use framing::Magic;
pub use inventory::Inventory;
pub use mm::{MemoryMap, Vma};
pub use pagemap::{PageRange, Pagemap};
pub use pstree::PstreeEntry;
pub use stats::{DumpStats, RestoreStats};

/// Everything that can be wrong with an image file or an images directory.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} is empty: no CRIU images to read")]
    EmptyDirectory { path: PathBuf },
    #[error("{dir} is not a CRIU images directory: {file} is missing")]
    Missing { dir: PathBuf, file: String },
    #[error("{path}: file is {len} bytes, too short for its {need}-byte magic header")]
    NoHeader {
        path: PathBuf,
        len: usize,
        need: usize,
    },
    #[error("{path}: bad magic {found:#010x}, expected {expected} ({expected_value:#010x})")]
    BadMagic {
        path: PathBuf,
        found: u32,
        expected: &'static str,
        expected_value: u32,
    },
    #[error("{path}: truncated at byte {offset}: {what}")]
    Truncated {
        path: PathBuf,
        offset: usize,
        what: String,
    },
    #[error("{path}: entry at byte {offset} is not a valid {message}")]
    Decode {
        path: PathBuf,
        offset: usize,
        message: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{path}: expected exactly one {message} entry, found {found}")]
    EntryCount {
        path: PathBuf,
        message: &'static str,
        found: usize,
    },
    #[error("{path}: {problem}")]
    Inconsistent { path: PathBuf, problem: Problem },
}

/// A consistency problem found inside otherwise well-framed images.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("pagemap entry {index} at {vaddr:#x} is not page aligned")]
    UnalignedRange { index: usize, vaddr: u64 },
    #[error("pagemap entry {index} at {vaddr:#x} has no pages")]
    EmptyRange { index: usize, vaddr: u64 },
    #[error("pagemap entry {index} at {vaddr:#x} overlaps or precedes the entry before it")]
    UnorderedRange { index: usize, vaddr: u64 },
    #[error("pagemap entry {index} at {vaddr:#x} runs past the end of the address space")]
    RangeOverflow { index: usize, vaddr: u64 },
    #[error("pages file holds {actual} bytes but its pagemaps reference {expected} bytes")]
    PagesSize { expected: u64, actual: u64 },
    #[error("pstree.img holds no process")]
    EmptyTree,
    #[error("pid {pid} appears twice in pstree.img")]
    DuplicatePid { pid: u32 },
    #[error("process {pid} has no {file}")]
    MissingProcessImage { pid: u32, file: String },
    #[error("image version {found} is not one this ferry reads (expected {expected})")]
    Version { found: u32, expected: u32 },
}

impl ImageError {
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        ImageError::Io {
            path: path.into(),
            source,
        }
    }
}
