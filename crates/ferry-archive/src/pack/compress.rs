//! The compressing threads: each job compressed (or stored raw when zstd
//! saves too little), its checksum taken while its bytes are in cache.

use std::sync::Mutex;

use crate::format::{ChunkHeader, ChunkKind, Codec};
use crate::{ArchiveError, CHUNK_PAGES};
use ferry_sys::PAGE_SIZE;

use super::*;

/// A compressed chunk ready to append.
pub(super) struct Compressed {
    pub(super) file: usize,
    pub(super) kind: ChunkKind,
    pub(super) codec: Codec,
    pub(super) raw_len: u32,
    pub(super) first_slot: u32,
    /// No later job of the file reads below this offset.
    pub(super) done_below: usize,
    pub(super) payload: Vec<u8>,
    /// The chunk header's checksum, taken by the compressing thread while
    /// the payload is still in its cache.
    pub(super) checksum: u64,
}

/// A small pool of reusable values (output buffers, compressor state):
/// fresh 1 MiB allocations cost page faults that serialise threads on the
/// process's memory map, and zstd contexts are worth keeping.
pub(super) struct Reuse<T>(Mutex<Vec<T>>);

impl<T> Reuse<T> {
    pub(super) fn new() -> Self {
        Reuse(Mutex::new(Vec::new()))
    }
    pub(super) fn take(&self) -> Option<T> {
        self.0.lock().ok().and_then(|mut v| v.pop())
    }
    pub(super) fn give(&self, t: T) {
        if let Ok(mut v) = self.0.lock() {
            v.push(t);
        }
    }
}

/// A compressing thread's reusable state.
pub(super) struct Scratch {
    pub(super) cz: zstd::bulk::Compressor<'static>,
    pub(super) raw: Vec<u8>,
}

impl Scratch {
    pub(super) fn new(level: i32) -> Result<Scratch, ArchiveError> {
        Ok(Scratch {
            cz: zstd::bulk::Compressor::new(level)
                .map_err(|source| ArchiveError::Compress { level, source })?,
            raw: Vec::with_capacity(CHUNK_PAGES * PAGE_SIZE),
        })
    }
}

/// Shared state of the compressing threads.
pub(super) struct Workers<'f> {
    pub(super) files: &'f [Source],
    pub(super) level: i32,
    pub(super) buffers: Reuse<Vec<u8>>,
    pub(super) scratches: Reuse<Scratch>,
}

impl Workers<'_> {
    pub(super) fn compress(&self, job: &Job) -> Result<Compressed, ArchiveError> {
        let mut scratch = match self.scratches.take() {
            Some(s) => s,
            None => Scratch::new(self.level)?,
        };
        let result = self.compress_with(&mut scratch, job);
        self.scratches.give(scratch);
        result
    }

    pub(super) fn compress_with(
        &self,
        scratch: &mut Scratch,
        job: &Job,
    ) -> Result<Compressed, ArchiveError> {
        let raw = &mut scratch.raw;
        raw.clear();
        let (file, kind, first_slot, done_below, probe) = match job {
            Job::Pages {
                file,
                first_slot,
                pages,
                random,
                done_below,
            } => {
                let src = &self.files[*file].bytes;
                let mut i = 0;
                while i < pages.len() {
                    // Copy runs of consecutive pages in one go.
                    let mut j = i + 1;
                    while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                        j += 1;
                    }
                    let a = pages[i] as usize * PAGE_SIZE;
                    let b = (pages[j - 1] as usize + 1) * PAGE_SIZE;
                    raw.extend_from_slice(&src[a..b]);
                    i = j;
                }
                (*file, ChunkKind::Pages, *first_slot, *done_below, *random)
            }
            Job::Data { file, start, len } => {
                raw.extend_from_slice(&self.files[*file].bytes[*start..*start + *len]);
                (*file, ChunkKind::FileData, 0, *start + *len, false)
            }
        };
        let mut out = self.buffers.take().unwrap_or_default();
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        let compress = |input: &[u8], out: &mut Vec<u8>, cz: &mut zstd::bulk::Compressor| {
            out.clear();
            cz.compress_to_buffer(input, out)
                .map_err(|source| ArchiveError::Compress {
                    level: self.level,
                    source,
                })
                .map(|_| input.len() > out.len() + input.len() / MIN_SAVING_DIVISOR)
        };
        let worth = if probe && raw.len() > PROBE_BYTES {
            compress(&raw[..PROBE_BYTES], &mut out, &mut scratch.cz)?
                && compress(raw.as_slice(), &mut out, &mut scratch.cz)?
        } else {
            compress(raw.as_slice(), &mut out, &mut scratch.cz)?
        };
        let raw_len = raw.len() as u32;
        let codec = if worth {
            Codec::Zstd
        } else {
            // Not worth it: the raw bytes become the payload (a swap, not a
            // copy) and the scratch keeps the other buffer.
            std::mem::swap(&mut out, raw);
            Codec::Raw
        };
        let checksum = ChunkHeader::checksum_of(codec, kind, raw_len, &out);
        Ok(Compressed {
            file,
            kind,
            codec,
            raw_len,
            first_slot,
            done_below,
            payload: out,
            checksum,
        })
    }
}
