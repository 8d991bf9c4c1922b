//! What pack reads: the files of an images directory, read when small,
//! mapped when large.

use std::fs::{self, File};
use std::path::Path;

use memmap2::Mmap;

use crate::ArchiveError;
use ferry_sys::mmap::{map_or_read, FileBytes};

use super::*;

/// A file being packed.
pub(super) struct Source {
    pub(super) name: String,
    pub(super) pages: bool,
    pub(super) bytes: Bytes,
}

/// A file's bytes: read when small, mapped when large (and only this user
/// can change it).
pub(super) enum Bytes {
    Owned(Vec<u8>),
    Mapped(Mmap),
}

impl Bytes {
    pub(super) fn load(path: &Path, size: u64) -> Result<Bytes, ArchiveError> {
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
