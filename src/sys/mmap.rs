//! Read-only file mappings (page images are read through these).

use std::fs::File;
use std::io;

use memmap2::Mmap;

/// Maps `file` read-only.
///
/// The caller must only map files that no other process truncates while the
/// map lives: ferry maps CRIU images that CRIU has finished writing and that
/// ferry itself does not modify.
pub fn map_readonly(file: &File) -> io::Result<Mmap> {
    // SAFETY: memmap2 requires that the file not be truncated or modified
    // while mapped; the contract above passes that duty to callers, who map
    // only finished CRIU images. An empty file yields an empty map.
    unsafe { Mmap::map(file) }
}
