//! `mm-<pid>.img`: a process's memory layout (its VMAs).

use std::path::Path;

use criu_proto as pb;

use super::framing::{self, MM};
use super::ImageError;

/// VMA status bits (criu/include/image.h).
const VMA_AREA_REGULAR: u32 = 1 << 0;
const VMA_AREA_STACK: u32 = 1 << 1;
const VMA_AREA_HEAP: u32 = 1 << 5;
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
    pub(crate) fn is_anonymous(&self) -> bool {
        self.status & (VMA_ANON_SHARED | VMA_ANON_PRIVATE) != 0
    }

    /// Plain private anonymous memory (a heap, a stack, an anonymous
    /// mapping) and nothing special (no vDSO, AIO ring, socket, SysV or
    /// memfd mapping, no file behind it). CRIU restores such an area into
    /// fresh anonymous memory, and drops from a child's copy of an
    /// inherited one every page the child's pagemap does not list: a page
    /// its pagemap leaves out reads as zero.
    pub fn is_plain_private_anonymous(&self) -> bool {
        const PLAIN: u32 = VMA_AREA_REGULAR | VMA_AREA_STACK | VMA_AREA_HEAP | VMA_ANON_PRIVATE;
        self.status & (VMA_AREA_REGULAR | VMA_ANON_PRIVATE) == VMA_AREA_REGULAR | VMA_ANON_PRIVATE
            && self.status & !PLAIN == 0
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

    /// The VMA holding `addr` (CRIU records them in address order).
    pub fn vma_at(&self, addr: u64) -> Option<&Vma> {
        let i = self.vmas.partition_point(|v| v.end <= addr);
        self.vmas.get(i).filter(|v| v.start <= addr && addr < v.end)
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

#[cfg(test)]
mod tests {
    use super::*;

    const VDSO: u32 = 1 << 3;
    const FILE_PRIVATE: u32 = 1 << 6;
    const AIORING: u32 = 1 << 13;

    fn vma(start: u64, end: u64, status: u32) -> Vma {
        Vma { start, end, status }
    }

    #[test]
    fn plain_private_anonymous_memory_is_told_apart() {
        let plain = VMA_AREA_REGULAR | VMA_ANON_PRIVATE;
        for status in [plain, plain | VMA_AREA_HEAP, plain | VMA_AREA_STACK] {
            assert!(
                vma(0, 1, status).is_plain_private_anonymous(),
                "{status:#x}"
            );
        }
        for status in [
            VMA_ANON_PRIVATE,
            VMA_AREA_REGULAR | FILE_PRIVATE,
            VMA_AREA_REGULAR | VMA_ANON_SHARED,
            plain | VDSO,
            plain | AIORING,
        ] {
            assert!(
                !vma(0, 1, status).is_plain_private_anonymous(),
                "{status:#x}"
            );
        }
    }

    #[test]
    fn finds_the_vma_holding_an_address() {
        let mm = MemoryMap {
            vmas: vec![vma(0x1000, 0x3000, 1), vma(0x5000, 0x6000, 2)],
        };
        let at = |a| mm.vma_at(a).map(|v| v.status);
        assert_eq!(at(0x0fff), None);
        assert_eq!(at(0x1000), Some(1));
        assert_eq!(at(0x2fff), Some(1));
        assert_eq!(at(0x3000), None);
        assert_eq!(at(0x5800), Some(2));
        assert_eq!(at(0x6000), None);
    }
}
