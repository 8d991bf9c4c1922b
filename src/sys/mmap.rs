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

/// Drops the page-table entries of `range` of a read-only file mapping
/// (`MADV_DONTNEED`). The file is untouched: a later read of the range
/// faults the same bytes in again from the page cache. `range` is rounded
/// inwards to whole pages.
pub fn release_range(map: &Mmap, range: std::ops::Range<usize>) -> io::Result<()> {
    let page = crate::PAGE_SIZE;
    let start = range.start.div_ceil(page) * page;
    let end = (range.end.min(map.len()) / page) * page;
    if start >= end {
        return Ok(());
    }
    // SAFETY: `map` is a shared, read-only mapping of a file (see
    // `map_readonly`); MADV_DONTNEED on it only unmaps the pages, and any
    // later access through `map` reads the file's unchanged contents again,
    // so no borrowed slice of `map` observes a change.
    unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_released_range_reads_the_same_bytes_again() {
        let page = crate::PAGE_SIZE;
        let bytes: Vec<u8> = (0..8 * page).map(|i| (i * 31 % 251) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bytes).unwrap();
        let map = map_readonly(&f, false).unwrap();
        assert_eq!(&map[..], &bytes[..]);
        // Unaligned ends are rounded inwards; out-of-range ends are clipped.
        release_range(&map, page + 1..5 * page + 7).unwrap();
        release_range(&map, 6 * page..100 * page).unwrap();
        release_range(&map, 3..4).unwrap();
        assert_eq!(&map[..], &bytes[..]);
    }
}
