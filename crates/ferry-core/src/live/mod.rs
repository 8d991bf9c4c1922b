//! Live memory of a running process tree, read without stopping it: the
//! pre-copy source on kernels without soft-dirty tracking (like this one).
//!
//! Which pages: exactly those CRIU would dump (criu/mem.c), so that the
//! destination can lay out a pages image before the final dump: pages of
//! private mappings that are present or swapped, of private file mappings
//! only those copied on write, never the kernel's shared zero page; and the
//! pages of shared anonymous mappings. Untouched address space costs
//! nothing. How: contiguous
//! runs of populated pages are copied with `process_vm_readv` into a buffer
//! of up to [`READ_CHUNK_PAGES`] pages, and each page is digested there.
//! Without dirty bits, "changed since the last round" means "its digest is
//! not one the destination holds": every round reads all populated memory
//! (about 0.3 s per GiB here) and sends only new content, so pages
//! rewritten with the same bytes, zero pages and duplicates cost nothing.
//!
//! A page read while the application writes it may be torn; that is fine:
//! what is sent matches its digest, and the final (frozen) dump decides
//! what the destination restores.

#![forbid(unsafe_code)]

mod maps;
mod scan;

pub use maps::{dumpable_regions, Region};
pub use scan::{scan_tree, LayoutSink, PageSink, ScanStats};

/// Pages copied per `process_vm_readv` (1 MiB).
pub(crate) const READ_CHUNK_PAGES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("cannot read the memory map of pid {pid}")]
    Maps {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the pagemap of pid {pid}")]
    Pagemap {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the memory of pid {pid} at {addr:#x}")]
    Read {
        pid: i32,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
}
