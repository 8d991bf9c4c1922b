//! Read-only file mappings (page images are read through these).

use std::fs::File;
use std::io;

use memmap2::{Mmap, MmapOptions};

/// Maps `file` read-only; `populate` faults every page in at once (faster
/// than one fault per page when the whole file will be read).
///
/// The caller must only map files that no other process truncates while the
/// map lives: ferry maps CRIU images that CRIU has finished writing, and
/// archives, which are written under a temporary name and only renamed into
/// place when complete; ferry modifies neither.
pub fn map_readonly(file: &File, populate: bool) -> io::Result<Mmap> {
    let mut opts = MmapOptions::new();
    if populate {
        opts.populate();
    }
    // SAFETY: memmap2 requires that the file not be truncated or modified
    // while mapped; the contract above passes that duty to callers, who map
    // only finished CRIU images and archives. An empty file yields an empty
    // map.
    unsafe { opts.map(file) }
}

/// Maps `file` read-write (shared: writes reach the file).
///
/// The caller must own the file exclusively while the map lives (ferry maps
/// files it has just created in a directory of its own).
/// `populate` maps (and allocates) every page at once, for files about to
/// be written whole.
pub fn map_writable(file: &File, populate: bool) -> io::Result<memmap2::MmapMut> {
    let mut opts = MmapOptions::new();
    if populate {
        opts.populate();
    }
    // SAFETY: memmap2 requires that no one else truncate or modify the file
    // while mapped; callers map only files they created themselves and keep
    // to themselves until the map is dropped.
    unsafe { opts.map_mut(file) }
}
