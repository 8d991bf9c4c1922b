//! What pack writes: chunks with their headers, and the index, compressed
//! as its parts are encoded.

use std::io::{self, Write};

use prost::Message;

use crate::format::{self, ChunkEntry, ChunkHeader, Header, Index, Trailer};
use crate::{ArchiveError, Progress};

use super::*;

/// Appends chunks to the output, recording where each went.
pub(super) struct ChunkWriter<'a, W: Write> {
    pub(super) out: W,
    pub(super) offset: u64,
    pub(super) chunks: Vec<ChunkEntry>,
    pub(super) progress: &'a dyn Progress,
}

impl<'a, W: Write> ChunkWriter<'a, W> {
    pub(super) fn new(
        mut out: W,
        header: Header,
        progress: &'a dyn Progress,
    ) -> Result<Self, ArchiveError> {
        out.write_all(&header.encode()).map_err(write_err)?;
        Ok(ChunkWriter {
            out,
            offset: format::HEADER_LEN as u64,
            chunks: Vec::new(),
            progress,
        })
    }

    /// Appends a chunk; gives its payload buffer back for reuse.
    pub(super) fn append(&mut self, c: Compressed) -> Result<Vec<u8>, ArchiveError> {
        let checksum = c.checksum;
        let h = ChunkHeader {
            codec: c.codec,
            kind: c.kind,
            raw_len: c.raw_len,
            stored_len: c.payload.len() as u32,
            checksum,
        };
        self.out.write_all(&h.encode()).map_err(write_err)?;
        self.out.write_all(&c.payload).map_err(write_err)?;
        self.chunks.push(ChunkEntry {
            offset: self.offset,
            stored_len: h.stored_len,
            raw_len: h.raw_len,
            codec: h.codec as u32,
            kind: h.kind as u32,
            checksum,
            file: c.file as u32,
            first_slot: c.first_slot,
        });
        self.offset += (format::CHUNK_HEADER_LEN + c.payload.len()) as u64;
        self.progress.advance(u64::from(c.raw_len));
        Ok(c.payload)
    }

    /// Writes index and trailer; returns the archive's length.
    pub(super) fn finish(mut self, (stored, raw_len): (Vec<u8>, u64)) -> Result<u64, ArchiveError> {
        tracing::debug!(
            raw = raw_len,
            stored = stored.len(),
            "pack: index compressed"
        );
        let trailer = Trailer {
            index_offset: self.offset,
            index_len: stored.len() as u64,
            index_raw_len: raw_len,
            index_checksum: xxhash_rust::xxh3::xxh3_64(&stored),
        };
        self.out.write_all(&stored).map_err(write_err)?;
        self.out.write_all(&trailer.encode()).map_err(write_err)?;
        self.out.flush().map_err(write_err)?;
        Ok(self.offset + stored.len() as u64 + format::TRAILER_LEN as u64)
    }
}

/// The index, compressed as its parts are encoded.
pub(super) struct IndexEncoder {
    pub(super) zstd: zstd::stream::write::Encoder<'static, Vec<u8>>,
    pub(super) raw_len: u64,
}

impl IndexEncoder {
    pub(super) fn start(head: &Index) -> Result<IndexEncoder, ArchiveError> {
        let raw = head.encode_to_vec();
        let mut zstd =
            zstd::stream::write::Encoder::new(Vec::with_capacity(raw.len()), INDEX_LEVEL)
                .map_err(index_compress_err)?;
        zstd.write_all(&raw).map_err(index_compress_err)?;
        Ok(IndexEncoder {
            zstd,
            raw_len: raw.len() as u64,
        })
    }

    /// Appends `rest` and ends the frame: (compressed, raw length).
    pub(super) fn finish(mut self, rest: &Index) -> Result<(Vec<u8>, u64), ArchiveError> {
        let raw = rest.encode_to_vec();
        self.zstd.write_all(&raw).map_err(index_compress_err)?;
        let stored = self.zstd.finish().map_err(index_compress_err)?;
        Ok((stored, self.raw_len + raw.len() as u64))
    }
}

pub(super) fn index_compress_err(source: io::Error) -> ArchiveError {
    ArchiveError::Compress {
        level: INDEX_LEVEL,
        source,
    }
}
