//! The bytes of an archive: fixed-size header, chunk header and trailer,
//! the protobuf index, and the digests that tie them together.

use prost::Message;
use xxhash_rust::xxh3::xxh3_64;

/// First bytes of every archive.
pub const MAGIC: &[u8; 8] = b"FERRYARC";
/// Tag opening every chunk.
pub(crate) const CHUNK_TAG: &[u8; 4] = b"FCHK";
/// Tag opening the trailer.
pub(crate) const TRAILER_TAG: &[u8; 8] = b"FERRYEND";

/// Readers refuse archives of another major version.
pub const VERSION_MAJOR: u16 = 2;
/// Newer minor versions only add fields readers may ignore.
pub const VERSION_MINOR: u16 = 0;

pub const HEADER_LEN: usize = 40;
pub(crate) const CHUNK_HEADER_LEN: usize = 32;
pub const TRAILER_LEN: usize = 48;

/// Largest raw chunk a reader accepts: bounds what a damaged or hostile
/// archive can make a reader allocate.
pub(crate) const MAX_CHUNK_RAW: usize = 16 << 20;
/// Largest decoded index a reader accepts.
pub(crate) const MAX_INDEX_RAW: usize = 1 << 30;

/// Archive identity: 16 random bytes chosen when the archive is written.
pub type ArchiveId = [u8; 16];

/// How a chunk's payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Codec {
    /// Stored as is (chosen when zstd would not save space).
    Raw = 0,
    Zstd = 1,
}

impl Codec {
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// What a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum ChunkKind {
    /// Consecutive unique pages (slots) of a pages image.
    Pages = 1,
    /// A consecutive piece of another file.
    FileData = 2,
}

impl ChunkKind {
    pub fn from_u8(v: u8) -> Option<ChunkKind> {
        match v {
            1 => Some(ChunkKind::Pages),
            2 => Some(ChunkKind::FileData),
            _ => None,
        }
    }
}

/// The fixed header at byte 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub major: u16,
    pub minor: u16,
    pub flags: u32,
    pub id: ArchiveId,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&self.major.to_le_bytes());
        b[10..12].copy_from_slice(&self.minor.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..32].copy_from_slice(&self.id);
        let sum = xxh3_64(&b[..32]);
        b[32..40].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes a header. Magic and checksum are checked here, the version by
    /// the caller (so it can say which version it found).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, HeaderFault> {
        if &b[0..8] != MAGIC {
            return Err(HeaderFault::Magic);
        }
        if xxh3_64(&b[..32]) != le_u64(&b[32..40]) {
            return Err(HeaderFault::Checksum);
        }
        Ok(Header {
            major: u16::from_le_bytes([b[8], b[9]]),
            minor: u16::from_le_bytes([b[10], b[11]]),
            flags: le_u32(&b[12..16]),
            id: b[16..32].try_into().unwrap_or_default(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderFault {
    Magic,
    Checksum,
}

/// The fixed header of each chunk; its checksum covers these fields and
/// the payload that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkHeader {
    pub codec: Codec,
    pub kind: ChunkKind,
    pub raw_len: u32,
    pub stored_len: u32,
    pub checksum: u64,
}

impl ChunkHeader {
    /// The checksum of a chunk: its header fields, then its payload.
    pub(crate) fn checksum_of(codec: Codec, kind: ChunkKind, raw_len: u32, payload: &[u8]) -> u64 {
        let mut fields = [0u8; 12];
        fields[0] = codec as u8;
        fields[1] = kind as u8;
        fields[4..8].copy_from_slice(&raw_len.to_le_bytes());
        fields[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&fields);
        h.update(payload);
        h.digest()
    }

    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[0..4].copy_from_slice(CHUNK_TAG);
        b[4] = self.codec as u8;
        b[5] = self.kind as u8;
        b[8..12].copy_from_slice(&self.raw_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.stored_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    /// Decodes the fields; `None` if the tag or an enum is not valid.
    pub fn decode(b: &[u8; CHUNK_HEADER_LEN]) -> Option<ChunkHeader> {
        if &b[0..4] != CHUNK_TAG || b[6..8] != [0, 0] || b[24..32] != [0u8; 8] {
            return None;
        }
        Some(ChunkHeader {
            codec: Codec::from_u8(b[4])?,
            kind: ChunkKind::from_u8(b[5])?,
            raw_len: le_u32(&b[8..12]),
            stored_len: le_u32(&b[12..16]),
            checksum: le_u64(&b[16..24]),
        })
    }
}

/// The fixed trailer at the end: where the index is and its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub index_offset: u64,
    pub index_len: u64,
    pub index_raw_len: u64,
    pub index_checksum: u64,
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[0..8].copy_from_slice(TRAILER_TAG);
        b[8..16].copy_from_slice(&self.index_offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.index_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.index_raw_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.index_checksum.to_le_bytes());
        let sum = xxh3_64(&b[..40]);
        b[40..48].copy_from_slice(&sum.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; TRAILER_LEN]) -> Option<Trailer> {
        if &b[0..8] != TRAILER_TAG || xxh3_64(&b[..40]) != le_u64(&b[40..48]) {
            return None;
        }
        Some(Trailer {
            index_offset: le_u64(&b[8..16]),
            index_len: le_u64(&b[16..24]),
            index_raw_len: le_u64(&b[24..32]),
            index_checksum: le_u64(&b[32..40]),
        })
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().unwrap_or_default())
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap_or_default())
}

pub use ferry_image::page::{Digest, PageKey};

/// A file's checksum: the digest of its block digests and its size. Files
/// are cut in 4 KiB blocks (the last may be short) so that the checksum of a
/// pages image can be computed in parallel, and checked on unpack from the
/// page digests without reading the file back.
pub fn file_checksum(block_digests: impl IntoIterator<Item = Digest>, size: u64) -> Digest {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for d in block_digests {
        h.update(&d.to_le_bytes());
    }
    h.update(&size.to_le_bytes());
    h.digest128()
}

/// Source of a run of pages in a pages image's layout.
pub(crate) const SOURCE_ZERO: u32 = 0;
/// Source `1 + g` is generation `g`: 0 this archive, 1 its parent, 2 the
/// grandparent, ...
pub(crate) const SOURCE_GEN_BASE: u32 = 1;

/// The index: everything a reader needs to find any file or chunk.
#[derive(Clone, PartialEq, Message)]
pub struct Index {
    #[prost(message, repeated, tag = "1")]
    pub chunks: Vec<ChunkEntry>,
    #[prost(message, repeated, tag = "2")]
    pub files: Vec<FileEntry>,
    /// Digest of each unique page stored here (slot order), 16 bytes LE each.
    #[prost(bytes = "vec", tag = "3")]
    pub slot_digests: Vec<u8>,
    /// The direct parent, for incremental archives.
    #[prost(message, optional, tag = "4")]
    pub parent: Option<ParentRef>,
    /// Ids of every ancestor, parent first: generation `g` is `ancestry[g-1]`.
    #[prost(bytes = "vec", repeated, tag = "5")]
    pub ancestry: Vec<Vec<u8>>,
    #[prost(message, optional, tag = "6")]
    pub stats: Option<PackStats>,
    #[prost(string, tag = "7")]
    pub ferry_version: String,
    #[prost(uint64, tag = "8")]
    pub created_unix_ms: u64,
    /// What was archived (e.g. "pid 1234 on host-a"), free text.
    #[prost(string, tag = "9")]
    pub source: String,
    #[prost(uint32, tag = "10")]
    pub page_size: u32,
    /// GPU state the checkpoint carries (format 1.1).
    #[prost(message, optional, tag = "11")]
    pub gpu: Option<GpuRecordEntry>,
    /// The key of the page digests (keyed BLAKE3, see
    /// [`ferry_image::page::PageKey`]): 32 random bytes chosen when the
    /// first archive of a chain is written, inherited by its incremental
    /// archives (format 2).
    #[prost(bytes = "vec", tag = "12")]
    pub page_key: Vec<u8>,
}

/// The manifest's copy of [`ferry_image::gpu_record::GpuRecord`].
#[derive(Clone, PartialEq, Message)]
pub struct GpuRecordEntry {
    #[prost(int32, repeated, tag = "1")]
    pub pids: Vec<i32>,
    #[prost(string, tag = "2")]
    pub model: String,
    #[prost(uint32, tag = "3")]
    pub count: u32,
    #[prost(string, repeated, tag = "4")]
    pub uuids: Vec<String>,
    #[prost(message, repeated, tag = "5")]
    pub memory: Vec<GpuMemoryEntry>,
    #[prost(string, tag = "6")]
    pub driver_version: String,
    #[prost(string, optional, tag = "7")]
    pub cuda_version: Option<String>,
    #[prost(string, tag = "8")]
    pub carried_by: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct GpuMemoryEntry {
    #[prost(string, tag = "1")]
    pub uuid: String,
    #[prost(uint64, tag = "2")]
    pub bytes: u64,
}

impl From<&ferry_image::gpu_record::GpuRecord> for GpuRecordEntry {
    fn from(r: &ferry_image::gpu_record::GpuRecord) -> Self {
        GpuRecordEntry {
            pids: r.pids.clone(),
            model: r.model.clone(),
            count: r.count,
            uuids: r.uuids.clone(),
            memory: r
                .memory_in_use
                .iter()
                .map(|(uuid, bytes)| GpuMemoryEntry {
                    uuid: uuid.clone(),
                    bytes: *bytes,
                })
                .collect(),
            driver_version: r.driver_version.clone(),
            cuda_version: r.cuda_version.clone(),
            carried_by: r.carried_by.name().to_string(),
        }
    }
}

impl TryFrom<&GpuRecordEntry> for ferry_image::gpu_record::GpuRecord {
    type Error = ferry_image::gpu_record::GpuRecordError;
    fn try_from(e: &GpuRecordEntry) -> Result<Self, Self::Error> {
        use ferry_image::gpu_record::{CarriedBy, GpuRecordError};
        Ok(ferry_image::gpu_record::GpuRecord {
            pids: e.pids.clone(),
            model: e.model.clone(),
            count: e.count,
            uuids: e.uuids.clone(),
            memory_in_use: e.memory.iter().map(|m| (m.uuid.clone(), m.bytes)).collect(),
            driver_version: e.driver_version.clone(),
            cuda_version: e.cuda_version.clone(),
            carried_by: CarriedBy::from_name(&e.carried_by)
                .ok_or_else(|| GpuRecordError::UnknownCarrier(e.carried_by.clone()))?,
        })
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct ChunkEntry {
    #[prost(uint64, tag = "1")]
    pub offset: u64,
    #[prost(uint32, tag = "2")]
    pub stored_len: u32,
    #[prost(uint32, tag = "3")]
    pub raw_len: u32,
    #[prost(uint32, tag = "4")]
    pub codec: u32,
    #[prost(uint32, tag = "5")]
    pub kind: u32,
    #[prost(uint64, tag = "6")]
    pub checksum: u64,
    /// Index of the file this chunk belongs to.
    #[prost(uint32, tag = "7")]
    pub file: u32,
    /// Pages chunks: the first slot they hold.
    #[prost(uint32, tag = "8")]
    pub first_slot: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct FileEntry {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub size: u64,
    /// [`file_checksum`], 16 bytes LE.
    #[prost(bytes = "vec", tag = "3")]
    pub checksum: Vec<u8>,
    /// True for pages images, laid out by `run_*`; else by `data_chunks`.
    #[prost(bool, tag = "4")]
    pub pages: bool,
    #[prost(uint32, repeated, tag = "5")]
    pub data_chunks: Vec<u32>,
    /// Page runs: source ([`SOURCE_ZERO`] or generation + 1), length, first slot.
    #[prost(uint32, repeated, tag = "6")]
    pub run_sources: Vec<u32>,
    #[prost(uint32, repeated, tag = "7")]
    pub run_lens: Vec<u32>,
    #[prost(uint32, repeated, tag = "8")]
    pub run_slots: Vec<u32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ParentRef {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    /// Where the parent was: relative to this archive's directory when it
    /// could be expressed so, else absolute.
    #[prost(string, tag = "2")]
    pub path: String,
    #[prost(uint64, tag = "3")]
    pub slots: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct PackStats {
    #[prost(uint64, tag = "1")]
    pub wall_us: u64,
    #[prost(int32, tag = "2")]
    pub level: i32,
    #[prost(uint32, tag = "3")]
    pub threads: u32,
    #[prost(uint64, tag = "4")]
    pub raw_bytes: u64,
    #[prost(uint64, tag = "5")]
    pub stored_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_detects_flips() {
        let h = Header {
            major: 1,
            minor: 0,
            flags: 0,
            id: [7; 16],
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b), Ok(h));
        for i in 0..HEADER_LEN {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert!(Header::decode(&bad).is_err(), "flip at {i} not seen");
        }
    }

    #[test]
    fn trailer_and_chunk_header_round_trip() {
        let t = Trailer {
            index_offset: 40,
            index_len: 100,
            index_raw_len: 300,
            index_checksum: 5,
        };
        assert_eq!(Trailer::decode(&t.encode()), Some(t));
        let mut bad = t.encode();
        bad[20] ^= 1;
        assert_eq!(Trailer::decode(&bad), None);
        let c = ChunkHeader {
            codec: Codec::Zstd,
            kind: ChunkKind::Pages,
            raw_len: 4096,
            stored_len: 10,
            checksum: 99,
        };
        assert_eq!(ChunkHeader::decode(&c.encode()), Some(c));
    }

    #[test]
    fn chunk_checksum_covers_fields_and_payload() {
        let a = ChunkHeader::checksum_of(Codec::Zstd, ChunkKind::Pages, 4096, b"abc");
        assert_ne!(
            a,
            ChunkHeader::checksum_of(Codec::Raw, ChunkKind::Pages, 4096, b"abc")
        );
        assert_ne!(
            a,
            ChunkHeader::checksum_of(Codec::Zstd, ChunkKind::FileData, 4096, b"abc")
        );
        assert_ne!(
            a,
            ChunkHeader::checksum_of(Codec::Zstd, ChunkKind::Pages, 8192, b"abc")
        );
        assert_ne!(
            a,
            ChunkHeader::checksum_of(Codec::Zstd, ChunkKind::Pages, 4096, b"abd")
        );
    }

    #[test]
    fn file_checksum_depends_on_size_and_order() {
        let a = file_checksum([1, 2], 8192);
        assert_ne!(a, file_checksum([2, 1], 8192));
        assert_ne!(a, file_checksum([1, 2], 8000));
    }
}
