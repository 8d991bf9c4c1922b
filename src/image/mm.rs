//! `mm-<pid>.img`: a process's memory layout (its VMAs).

use std::path::Path;

use criu_proto as pb;

use super::framing::{self, MM};
use super::ImageError;

/// VMA status bits of anonymous memory (criu/include/image.h).
const VMA_ANON_SHARED: u32 = 1 << 8;
const VMA_ANON_PRIVATE: u32 = 1 << 9;

/// One virtual memory area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub status: u32,
}

impl Vma {
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn is_anonymous(&self) -> bool {
        self.status & (VMA_ANON_SHARED | VMA_ANON_PRIVATE) != 0
    }
}

/// A process's VMAs as CRIU recorded them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryMap {
    pub vmas: Vec<Vma>,
}

impl MemoryMap {
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<MemoryMap, ImageError> {
        let mm: pb::MmEntry = framing::decode_one(path, bytes, MM, "mm_entry")?;
        Ok(MemoryMap {
            vmas: mm
                .vmas
                .into_iter()
                .map(|v| Vma {
                    start: v.start,
                    end: v.end,
                    status: v.status,
                })
                .collect(),
        })
    }

    /// Bytes of address space mapped, and of it anonymous.
    pub fn mapped_bytes(&self) -> (u64, u64) {
        let total = self.vmas.iter().map(Vma::len).sum();
        let anon = self
            .vmas
            .iter()
            .filter(|v| v.is_anonymous())
            .map(Vma::len)
            .sum();
        (total, anon)
    }
}
