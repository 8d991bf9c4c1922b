//! Opening an archive: header, trailer and index checked, chunks read and
//! verified on demand (random access, thread-safe).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use prost::Message;
use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use super::format::{
    ArchiveId, ChunkHeader, ChunkKind, Codec, Digest, Header, HeaderFault, Index, PageKey, Trailer,
    CHUNK_HEADER_LEN, HEADER_LEN, MAX_CHUNK_RAW, MAX_INDEX_RAW, SOURCE_GEN_BASE, TRAILER_LEN,
    VERSION_MAJOR,
};
use super::{ArchiveError, Corruption};
use ferry_sys::PAGE_SIZE;

/// Positioned reads, so that worker threads read chunks concurrently.
pub trait ReadAt: Sync {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn size(&self) -> io::Result<u64>;
    /// The bytes at `offset`, in place, where the reader holds them in
    /// memory (None: read them with [`ReadAt::read_exact_at`]).
    fn bytes_at(&self, _offset: u64, _len: usize) -> Option<&[u8]> {
        None
    }
    /// Brings the bytes at `offset` into memory at once, where the reader
    /// maps them (one call instead of a page fault every few pages).
    fn prefault(&self, _offset: u64, _len: usize) {}
}

/// An archive file: memory-mapped where it can be, so that chunks are
/// checked and decompressed where they lie instead of being copied out
/// first; read with positioned reads otherwise (a pipe, a file that cannot
/// be mapped).
#[derive(Debug)]
pub struct ArchiveFile {
    file: File,
    map: Option<memmap2::Mmap>,
}

impl ArchiveFile {
    pub fn new(file: File) -> ArchiveFile {
        let map = ferry_sys::mmap::map_readonly(&file, false).ok();
        ArchiveFile { file, map }
    }
}

impl ReadAt for ArchiveFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.map {
            Some(map) => map[..].read_exact_at(buf, offset),
            None => FileExt::read_exact_at(&self.file, buf, offset),
        }
    }
    fn size(&self) -> io::Result<u64> {
        match &self.map {
            Some(map) => Ok(map.len() as u64),
            None => Ok(self.file.metadata()?.len()),
        }
    }
    fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        self.map.as_ref()?.bytes_at(offset, len)
    }
    fn prefault(&self, offset: u64, len: usize) {
        if let (Some(map), Ok(offset)) = (&self.map, usize::try_from(offset)) {
            if offset.checked_add(len).is_some_and(|end| end <= map.len()) {
                // Only an optimisation: a kernel without it faults as before.
                let _ = map.advise_range(memmap2::Advice::PopulateRead, offset, len);
            }
        }
    }
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        self.get(start..start.checked_add(len)?)
    }
}

/// Reusable buffers and decompression state for reading chunks.
#[derive(Default)]
pub struct ChunkBuf {
    stored: Vec<u8>,
    raw: Vec<u8>,
    dctx: Option<zstd::bulk::Decompressor<'static>>,
}

/// An open, structurally valid archive.
#[derive(Debug)]
pub struct Archive<R: ReadAt + ?Sized = ArchiveFile> {
    path: PathBuf,
    header: Header,
    index: Index,
    len: u64,
    /// Pages chunks as (first slot, chunk index), ascending.
    slot_chunks: Vec<(u64, usize)>,
    slots: u64,
    page_key: PageKey,
    reader: Box<R>,
}

impl Archive<ArchiveFile> {
    /// Opens an archive file and checks its header, trailer and index.
    /// Only a regular file is read: a FIFO or a device named as an archive
    /// (or recorded as a parent) is refused without blocking on it.
    pub fn open(path: &Path) -> Result<Archive<ArchiveFile>, ArchiveError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
            .open(path)
            .map_err(|e| ArchiveError::io("open archive", path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| ArchiveError::io("open archive", path, e))?;
        if !meta.file_type().is_file() {
            return Err(ArchiveError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        Archive::from_reader(path, Box::new(ArchiveFile::new(file)))
    }
}

impl Archive<[u8]> {
    /// Opens an archive held in memory (`label` names it in errors).
    pub fn from_bytes(label: &Path, bytes: &[u8]) -> Result<Archive<[u8]>, ArchiveError> {
        Archive::from_reader(label, bytes.to_vec().into_boxed_slice())
    }
}

impl<R: ReadAt + ?Sized> Archive<R> {
    pub(crate) fn from_reader(path: &Path, reader: Box<R>) -> Result<Archive<R>, ArchiveError> {
        let path = path.to_path_buf();
        let corrupt = |what| ArchiveError::corrupt(&path, what);
        let len = reader
            .size()
            .map_err(|e| ArchiveError::io("read archive", &path, e))?;
        let mut hb = [0u8; HEADER_LEN];
        if len < HEADER_LEN as u64 {
            if len >= 8 {
                reader
                    .read_exact_at(&mut hb[..8], 0)
                    .map_err(|e| ArchiveError::io("read archive", &path, e))?;
                if &hb[..8] == super::format::MAGIC {
                    return Err(corrupt(Corruption::TooShort { len }));
                }
            }
            return Err(ArchiveError::NotAnArchive { path });
        }
        reader
            .read_exact_at(&mut hb, 0)
            .map_err(|e| ArchiveError::io("read archive", &path, e))?;
        let header = match Header::decode(&hb) {
            Ok(h) => h,
            Err(HeaderFault::Magic) => return Err(ArchiveError::NotAnArchive { path }),
            Err(HeaderFault::Checksum) => return Err(corrupt(Corruption::Header)),
        };
        if header.major != VERSION_MAJOR {
            return Err(ArchiveError::OtherVersion {
                path,
                major: header.major,
                minor: header.minor,
                supported: VERSION_MAJOR,
            });
        }
        if len < (HEADER_LEN + TRAILER_LEN) as u64 {
            return Err(corrupt(Corruption::TooShort { len }));
        }
        let mut tb = [0u8; TRAILER_LEN];
        reader
            .read_exact_at(&mut tb, len - TRAILER_LEN as u64)
            .map_err(|e| ArchiveError::io("read archive", &path, e))?;
        let trailer = Trailer::decode(&tb).ok_or_else(|| corrupt(Corruption::Trailer))?;
        let index = read_index(&*reader, &trailer, len)
            .map_err(|detail| corrupt(Corruption::Index { detail }))?;
        let (slot_chunks, slots) =
            validate(&index, &trailer).map_err(|detail| corrupt(Corruption::Index { detail }))?;
        let page_key = <[u8; 32]>::try_from(index.page_key.as_slice())
            .map(PageKey::new)
            .map_err(|_| {
                corrupt(Corruption::Index {
                    detail: format!("page key of {} bytes, not 32", index.page_key.len()),
                })
            })?;
        Ok(Archive {
            path,
            header,
            index,
            len,
            slot_chunks,
            slots,
            page_key,
            reader,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn id(&self) -> ArchiveId {
        self.header.id
    }
    pub fn header(&self) -> &Header {
        &self.header
    }
    /// The key its page digests are made with.
    pub fn page_key(&self) -> &PageKey {
        &self.page_key
    }
    pub fn index(&self) -> &Index {
        &self.index
    }
    /// Bytes of the whole archive.
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Unique pages stored in this archive.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// Pages its pages images declare, zero runs and pages of earlier
    /// generations included: what a restore from it puts in memory. A few
    /// kilobytes of index can declare terabytes.
    pub fn declared_pages(&self) -> u64 {
        self.index
            .files
            .iter()
            .filter(|f| f.pages)
            .map(|f| f.size / PAGE_SIZE as u64)
            .sum()
    }

    /// Refuses, before anything is allocated or computed for them,
    /// declared pages that no process on this host could have held (more
    /// than twice its RAM and swap: a checkpoint holds only pages that were
    /// resident), or whose per-page bookkeeping (`bytes_per_page` each)
    /// would take more than half the memory available now.
    pub(crate) fn check_page_table(&self, bytes_per_page: u64) -> Result<(), ArchiveError> {
        let pages = self.declared_pages();
        let memory = pages.saturating_mul(PAGE_SIZE as u64);
        let host = ferry_sys::host::mem_total_with_swap().unwrap_or(u64::MAX);
        if memory > host.saturating_mul(2) {
            return Err(ArchiveError::MoreMemoryThanHost {
                path: self.path.clone(),
                pages,
                memory,
                host,
            });
        }
        let needs = pages.saturating_mul(bytes_per_page);
        let available = ferry_sys::host::mem_available().unwrap_or(u64::MAX);
        if needs > available / 2 {
            return Err(ArchiveError::TooManyPages {
                path: self.path.clone(),
                pages,
                needs,
                available,
            });
        }
        Ok(())
    }

    /// The recorded digest of a slot's page.
    pub(crate) fn slot_digest(&self, slot: u64) -> Option<Digest> {
        let at = usize::try_from(slot).ok()?.checked_mul(16)?;
        let b = self.index.slot_digests.get(at..at + 16)?;
        Some(u128::from_le_bytes(b.try_into().ok()?))
    }

    /// The pages chunk holding `slot`.
    pub fn chunk_of_slot(&self, slot: u64) -> Option<usize> {
        if slot >= self.slots {
            return None;
        }
        let i = self
            .slot_chunks
            .partition_point(|(first, _)| *first <= slot);
        self.slot_chunks.get(i.checked_sub(1)?).map(|(_, c)| *c)
    }

    /// The name of the file a chunk belongs to.
    pub(crate) fn chunk_file_name(&self, chunk: usize) -> String {
        self.index
            .chunks
            .get(chunk)
            .and_then(|c| self.index.files.get(c.file as usize))
            .map(|f| f.name.clone())
            .unwrap_or_else(|| "?".into())
    }

    /// Reads, verifies and decompresses one chunk.
    pub(crate) fn read_chunk(&self, chunk: usize) -> Result<Vec<u8>, ArchiveError> {
        let mut buf = ChunkBuf::default();
        self.read_chunk_into(chunk, &mut buf)?;
        Ok(buf.raw)
    }

    /// Like [`Archive::read_chunk`], into reusable buffers: returns the raw
    /// bytes, which live in `buf`.
    pub(crate) fn read_chunk_into<'b>(
        &self,
        chunk: usize,
        buf: &'b mut ChunkBuf,
    ) -> Result<&'b [u8], ArchiveError> {
        let fail = |detail: String| self.chunk_error(chunk, detail);
        let ChunkBuf { stored, raw, dctx } = buf;
        let (h, payload) = self.read_stored(chunk, stored, true)?;
        raw.clear();
        match h.codec {
            Codec::Raw => raw.extend_from_slice(payload),
            Codec::Zstd => {
                raw.reserve(h.raw_len as usize);
                decompressor(dctx)
                    .and_then(|d| d.decompress_to_buffer(payload, raw))
                    .map_err(|err| fail(format!("zstd cannot decompress it: {err}")))?;
            }
        }
        if raw.len() != h.raw_len as usize {
            return Err(fail(format!(
                "decompressed to {} bytes, expected {}",
                raw.len(),
                h.raw_len
            )));
        }
        Ok(raw)
    }

    /// Decompresses into `dst` (at least the chunk's raw length) a chunk
    /// whose stored checksum [`Archive::check_stored_chunks`] has already
    /// checked: its header is still checked against the index, its payload
    /// is not hashed again (the streaming reader checks every page's digest
    /// instead). Returns the raw length.
    pub(crate) fn read_checked_chunk_to(
        &self,
        chunk: usize,
        buf: &mut ChunkBuf,
        dst: &mut [u8],
    ) -> Result<usize, ArchiveError> {
        let fail = |detail: String| self.chunk_error(chunk, detail);
        let ChunkBuf { stored, dctx, .. } = buf;
        let (h, payload) = self.read_stored(chunk, stored, false)?;
        let raw_len = h.raw_len as usize;
        let room = dst.len();
        let dst = dst
            .get_mut(..raw_len)
            .ok_or_else(|| fail(format!("{raw_len} bytes do not fit a buffer of {room}")))?;
        let n = match h.codec {
            Codec::Raw if payload.len() == raw_len => {
                dst.copy_from_slice(payload);
                raw_len
            }
            Codec::Raw => payload.len(),
            Codec::Zstd => decompressor(dctx)
                .and_then(|d| d.decompress_to_buffer(payload, dst))
                .map_err(|err| fail(format!("zstd cannot decompress it: {err}")))?,
        };
        if n != raw_len {
            return Err(fail(format!(
                "decompressed to {n} bytes, expected {raw_len}"
            )));
        }
        Ok(n)
    }

    /// Chunk `chunk` is damaged: `detail` says how.
    fn chunk_error(&self, chunk: usize, detail: String) -> ArchiveError {
        ArchiveError::corrupt(
            &self.path,
            Corruption::Chunk {
                chunk,
                file: self.chunk_file_name(chunk),
                offset: self.index.chunks[chunk].offset,
                detail,
            },
        )
    }

    /// Reads one chunk as stored and checks its header against the index
    /// and (with `verify`) its checksum, without decompressing it.
    fn read_stored<'b>(
        &'b self,
        chunk: usize,
        stored: &'b mut Vec<u8>,
        verify: bool,
    ) -> Result<(ChunkHeader, &'b [u8]), ArchiveError> {
        let e = &self.index.chunks[chunk];
        let fail = |detail: String| self.chunk_error(chunk, detail);
        let len = CHUNK_HEADER_LEN + e.stored_len as usize;
        if verify {
            self.reader.prefault(e.offset, len);
        }
        let stored: &[u8] = match self.reader.bytes_at(e.offset, len) {
            Some(bytes) => bytes,
            None => {
                stored.resize(len, 0);
                self.reader
                    .read_exact_at(stored, e.offset)
                    .map_err(|err| fail(format!("cannot read: {err}")))?;
                stored
            }
        };
        let (hb, payload) = stored.split_at(CHUNK_HEADER_LEN);
        let hb: &[u8; CHUNK_HEADER_LEN] = hb.try_into().map_err(|_| fail("short header".into()))?;
        let h = ChunkHeader::decode(hb).ok_or_else(|| fail("chunk header damaged".into()))?;
        if h.stored_len != e.stored_len
            || h.raw_len != e.raw_len
            || h.checksum != e.checksum
            || h.codec as u32 != e.codec
            || h.kind as u32 != e.kind
        {
            return Err(fail("chunk header does not match the index".into()));
        }
        if verify && ChunkHeader::checksum_of(h.codec, h.kind, h.raw_len, payload) != h.checksum {
            return Err(fail("checksum mismatch".into()));
        }
        Ok((h, payload))
    }

    /// Checks every chunk's header and checksum as stored, on all threads
    /// of the current pool, without decompressing anything: what a reader
    /// that decompresses later (streaming) checks up front.
    pub(crate) fn check_stored_chunks(&self) -> Result<(), ArchiveError> {
        (0..self.index.chunks.len())
            .into_par_iter()
            .try_for_each_init(Vec::new, |stored, c| {
                self.read_stored(c, stored, true).map(|_| ())
            })
    }

    /// The content of a non-pages file, verified against its checksum.
    pub fn file_data(&self, file: usize) -> Result<Vec<u8>, ArchiveError> {
        let f = &self.index.files[file];
        let mut out = Vec::with_capacity(f.size as usize);
        for &c in &f.data_chunks {
            out.extend_from_slice(&self.read_chunk(c as usize)?);
        }
        let digests = out.chunks(PAGE_SIZE).map(|b| self.page_key.digest(b));
        if super::format::file_checksum(digests, f.size).to_le_bytes()[..] != f.checksum[..] {
            return Err(ArchiveError::corrupt(
                &self.path,
                Corruption::FileChecksum {
                    file: f.name.clone(),
                },
            ));
        }
        Ok(out)
    }

    /// Reads and checks every chunk, on all threads of the current pool.
    pub fn verify_chunks(&self) -> Result<(), ArchiveError> {
        (0..self.index.chunks.len())
            .into_par_iter()
            .try_for_each_init(ChunkBuf::default, |buf, c| {
                self.read_chunk_into(c, buf).map(|_| ())
            })
    }

    /// Position of a file in the index.
    pub(crate) fn file_index(&self, name: &str) -> Option<usize> {
        self.index.files.iter().position(|f| f.name == name)
    }
}

/// The reusable zstd decompression context, started on first use.
fn decompressor<'d>(
    dctx: &'d mut Option<zstd::bulk::Decompressor<'static>>,
) -> io::Result<&'d mut zstd::bulk::Decompressor<'static>> {
    match dctx {
        Some(d) => Ok(d),
        None => Ok(dctx.insert(zstd::bulk::Decompressor::new()?)),
    }
}

fn read_index<R: ReadAt + ?Sized>(reader: &R, t: &Trailer, len: u64) -> Result<Index, String> {
    let end = len - TRAILER_LEN as u64;
    if t.index_offset < HEADER_LEN as u64 || t.index_offset.checked_add(t.index_len) != Some(end) {
        return Err(format!(
            "trailer places the index at {}+{}, but it must end at byte {end}",
            t.index_offset, t.index_len
        ));
    }
    if t.index_raw_len > MAX_INDEX_RAW as u64 {
        return Err(format!(
            "index claims {} bytes, more than allowed",
            t.index_raw_len
        ));
    }
    let mut stored = vec![0u8; t.index_len as usize];
    reader
        .read_exact_at(&mut stored, t.index_offset)
        .map_err(|e| format!("cannot read: {e}"))?;
    if xxh3_64(&stored) != t.index_checksum {
        return Err(format!(
            "checksum mismatch (bytes {}..{end})",
            t.index_offset
        ));
    }
    let raw = zstd::bulk::Decompressor::new()
        .and_then(|mut d| d.decompress(&stored, t.index_raw_len as usize))
        .map_err(|e| format!("cannot decompress: {e}"))?;
    Index::decode(raw.as_slice()).map_err(|e| format!("cannot decode: {e}"))
}

/// Structural checks of an index. Returns the slot map and the slot count.
fn validate(index: &Index, trailer: &Trailer) -> Result<(Vec<(u64, usize)>, u64), String> {
    if index.page_size as usize != PAGE_SIZE {
        return Err(format!("page size {} is not {PAGE_SIZE}", index.page_size));
    }
    if index.ancestry.iter().any(|id| id.len() != 16) {
        return Err("an ancestor id is not 16 bytes".into());
    }
    match &index.parent {
        Some(p) if index.ancestry.first() != Some(&p.id) => {
            return Err("parent id differs from the first ancestor".into())
        }
        None if !index.ancestry.is_empty() => return Err("ancestry without a parent".into()),
        _ => {}
    }
    let mut at = HEADER_LEN as u64;
    let mut slots = 0u64;
    let mut slot_chunks = Vec::new();
    for (i, c) in index.chunks.iter().enumerate() {
        let ctx = |what: &str| format!("chunk {i}: {what}");
        if c.offset != at {
            return Err(ctx(&format!("at byte {}, expected {at}", c.offset)));
        }
        if c.raw_len == 0 || c.raw_len as usize > MAX_CHUNK_RAW {
            return Err(ctx(&format!("raw length {} out of range", c.raw_len)));
        }
        let codec = u8::try_from(c.codec).ok().and_then(Codec::from_u8);
        let kind = u8::try_from(c.kind).ok().and_then(ChunkKind::from_u8);
        let (Some(codec), Some(kind)) = (codec, kind) else {
            return Err(ctx("unknown codec or kind"));
        };
        if codec == Codec::Raw && c.stored_len != c.raw_len {
            return Err(ctx("raw chunk with stored length != raw length"));
        }
        if c.stored_len as usize > MAX_CHUNK_RAW + (MAX_CHUNK_RAW >> 7) + 1024 {
            return Err(ctx("stored length out of range"));
        }
        if c.file as usize >= index.files.len() {
            return Err(ctx("belongs to no file"));
        }
        if kind == ChunkKind::Pages {
            if !(c.raw_len as usize).is_multiple_of(PAGE_SIZE) {
                return Err(ctx("pages chunk is not whole pages"));
            }
            if u64::from(c.first_slot) != slots {
                return Err(ctx(&format!("first slot {} is not {slots}", c.first_slot)));
            }
            slot_chunks.push((slots, i));
            slots += u64::from(c.raw_len) / PAGE_SIZE as u64;
        }
        at = c.offset + (CHUNK_HEADER_LEN as u64) + u64::from(c.stored_len);
    }
    if at != trailer.index_offset {
        return Err(format!(
            "chunks end at byte {at}, but the index starts at {}",
            trailer.index_offset
        ));
    }
    if index.slot_digests.len() as u64 != slots * 16 {
        return Err(format!(
            "{} slot digests for {slots} slots",
            index.slot_digests.len() / 16
        ));
    }
    let mut names = HashSet::new();
    let gens = index.ancestry.len() as u32;
    for (fi, f) in index.files.iter().enumerate() {
        let ctx = |what: &str| format!("file {:?}: {what}", f.name);
        if f.name.is_empty()
            || f.name.contains('/')
            || f.name == "."
            || f.name == ".."
            || f.name.contains('\0')
        {
            return Err(ctx("not a plain file name"));
        }
        if !names.insert(f.name.as_str()) {
            return Err(ctx("listed twice"));
        }
        if f.checksum.len() != 16 {
            return Err(ctx("checksum is not 16 bytes"));
        }
        if f.pages {
            if f.size % PAGE_SIZE as u64 != 0 {
                return Err(ctx("pages image is not whole pages"));
            }
            let n = f.run_sources.len();
            if f.run_lens.len() != n || f.run_slots.len() != n {
                return Err(ctx("page runs are inconsistent"));
            }
            let mut pages = 0u64;
            for r in 0..n {
                let (src, len, slot) = (f.run_sources[r], f.run_lens[r], f.run_slots[r]);
                if src > SOURCE_GEN_BASE + gens {
                    return Err(ctx(&format!(
                        "run {r} refers to generation {} of {gens}",
                        src - 1
                    )));
                }
                if src == SOURCE_GEN_BASE && u64::from(slot) + u64::from(len) > slots {
                    return Err(ctx(&format!("run {r} refers to slots past {slots}")));
                }
                pages += u64::from(len);
            }
            if pages * PAGE_SIZE as u64 != f.size {
                return Err(ctx("page runs do not cover the file"));
            }
        } else {
            // Each chunk once, in order: a chunk listed twice would repeat
            // its bytes in the file.
            if f.data_chunks.windows(2).any(|w| w[0] >= w[1]) {
                return Err(ctx("lists its chunks out of order or twice"));
            }
            let mut size = 0u64;
            for &c in &f.data_chunks {
                let Some(chunk) = index.chunks.get(c as usize) else {
                    return Err(ctx("refers to a missing chunk"));
                };
                if chunk.kind != ChunkKind::FileData as u32 || chunk.file as usize != fi {
                    return Err(ctx("refers to a chunk of another file"));
                }
                size += u64::from(chunk.raw_len);
            }
            if size != f.size {
                return Err(ctx(&format!(
                    "chunks hold {size} bytes, the file {}",
                    f.size
                )));
            }
        }
    }
    Ok((slot_chunks, slots))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An index whose file lists a chunk twice (or out of order) is refused,
    /// though each entry alone is valid.
    #[test]
    fn a_file_listing_a_chunk_twice_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // A data file of three chunks.
        let big: Vec<u8> = (0..(2 * crate::CHUNK_PAGES * PAGE_SIZE + 100))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(dir.path().join("data.img"), &big).unwrap();
        let mut bytes = Vec::new();
        let opts = crate::PackOptions {
            level: 1,
            threads: 1,
            parent: None,
            source: "test".into(),
            progress: &crate::NoProgress,
        };
        crate::pack_dir(dir.path(), &mut bytes, None, &opts).unwrap();
        let archive = Archive::from_bytes(Path::new("a.ferry"), &bytes).unwrap();
        let index = archive.index().clone();
        let last = index.chunks.last().unwrap();
        let trailer = Trailer {
            index_offset: last.offset + CHUNK_HEADER_LEN as u64 + u64::from(last.stored_len),
            index_len: 0,
            index_raw_len: 0,
            index_checksum: 0,
        };
        assert!(validate(&index, &trailer).is_ok());
        let fi = index
            .files
            .iter()
            .position(|f| f.name == "data.img")
            .unwrap();
        assert!(index.files[fi].data_chunks.len() >= 2);
        for chunks in [
            vec![0, 0, 1],
            vec![1, 0, 2],
            index.files[fi].data_chunks.iter().rev().copied().collect(),
        ] {
            let mut bad = index.clone();
            bad.files[fi].data_chunks = chunks;
            let e = validate(&bad, &trailer).unwrap_err();
            assert!(e.contains("out of order or twice"), "{e}");
        }
    }
}
