//! File mappings (page images, archives and ferry's own files are read and
//! written through these).
//!
//! A mapping is only sound while nobody else truncates or writes the file:
//! the raw functions ([`map_readonly_unchecked`], [`map_writable_unchecked`])
//! leave that to their caller. The checked ones ([`map_readonly`],
//! [`map_writable`]) map only a regular file owned by this process's user
//! that no other user may write: the only processes that could change it
//! then run as the user ferry runs as (root), which is ferry's own trust
//! domain (they could as well write ferry's memory), and ferry itself does
//! not change a file it has mapped. Anything else is refused with
//! [`io::ErrorKind::PermissionDenied`]; callers read such files instead.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;

use memmap2::{Mmap, MmapMut, MmapOptions};

/// Whether `file` is a regular file owned by this process's user that no
/// other user may write (see the module docs).
fn check_private(file: &File) -> io::Result<()> {
    let meta = file.metadata()?;
    let refuse = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("not mapped: {why}"),
        ))
    };
    if !meta.file_type().is_file() {
        return refuse("not a regular file");
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return refuse("owned by another user");
    }
    if meta.mode() & 0o022 != 0 {
        return refuse("writable by other users");
    }
    Ok(())
}

/// Maps `file` read-only, after checking that only this process's user can
/// change it; `populate` faults every page in at once (faster than one
/// fault per page when the whole file will be read).
pub fn map_readonly(file: &File, populate: bool) -> io::Result<Mmap> {
    check_private(file)?;
    // SAFETY: only this user can truncate or write the file (checked
    // above), and ferry does not change a file while it has it mapped.
    unsafe { map_readonly_unchecked(file, populate) }
}

/// A whole file's bytes: mapped where [`map_readonly`] allows, else read.
pub enum FileBytes {
    Mapped(Mmap),
    Read(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Read(v) => v,
        }
    }
}

/// The bytes of `file`: mapped (see [`map_readonly`]), or read whole when
/// another user could change it.
pub fn map_or_read(file: &File, populate: bool) -> io::Result<FileBytes> {
    match map_readonly(file, populate) {
        Ok(m) => Ok(FileBytes::Mapped(m)),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            // From its start, wherever the file's offset is.
            let len = usize::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
            let mut bytes = vec![0; len];
            std::os::unix::fs::FileExt::read_exact_at(file, &mut bytes, 0)?;
            Ok(FileBytes::Read(bytes))
        }
        Err(e) => Err(e),
    }
}

/// Maps `file` read-only.
///
/// # Safety
///
/// Nothing may truncate or write the file while the map lives: the bytes
/// it returns are borrowed as immutable, and a truncation turns reads into
/// SIGBUS.
pub(crate) unsafe fn map_readonly_unchecked(file: &File, populate: bool) -> io::Result<Mmap> {
    let mut opts = MmapOptions::new();
    if populate {
        opts.populate();
    }
    // SAFETY: the caller guarantees the file stays as it is while mapped.
    // An empty file yields an empty map.
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

/// Maps `file` read-write (shared: writes reach the file), after checking
/// that only this process's user can change it. `populate` maps (and
/// allocates) every page at once, for files about to be written whole.
pub fn map_writable(file: &File, populate: bool) -> io::Result<MmapMut> {
    check_private(file)?;
    // SAFETY: only this user can truncate or write the file (checked
    // above); ferry maps only files it created for itself, and writes them
    // only through this map while it lives.
    unsafe { map_writable_unchecked(file, populate) }
}

/// Maps `file` read-write (shared: writes reach the file).
///
/// # Safety
///
/// Nothing else may truncate, write or map the file while the map lives.
pub(crate) unsafe fn map_writable_unchecked(file: &File, populate: bool) -> io::Result<MmapMut> {
    let mut opts = MmapOptions::new();
    if populate {
        opts.populate();
    }
    // SAFETY: the caller guarantees no one else changes the file while
    // mapped.
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

    /// A file other users may write is not mapped, only read.
    #[test]
    fn a_file_others_may_write_is_read_not_mapped() {
        use std::os::unix::fs::PermissionsExt;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"some bytes").unwrap();
        assert!(matches!(
            map_or_read(&f, false).unwrap(),
            FileBytes::Mapped(_)
        ));
        f.set_permissions(std::fs::Permissions::from_mode(0o666))
            .unwrap();
        let e = map_readonly(&f, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(map_writable(&f, false).is_err());
        let bytes = map_or_read(&f, false).unwrap();
        assert!(matches!(bytes, FileBytes::Read(_)));
        assert_eq!(&bytes[..], b"some bytes");
    }
}
