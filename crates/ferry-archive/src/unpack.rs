//! Rebuilding the images directory from an archive chain, in parallel.
//!
//! Nothing is trusted before it is checked: the layout of every pages image
//! is checked against its manifest checksum (from the recorded page digests)
//! before a byte is written; each chunk is checked against its checksum when
//! read and each page against its digest when decompressed; other files are
//! checked against their checksums once written. Zero pages are left as
//! holes of sparse files. Deduplicated pages are written wherever they occur.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use super::chain::Chain;
use super::format::{file_checksum, Digest, SOURCE_GEN_BASE};
use super::read::ChunkBuf;
use super::{ArchiveError, Corruption, Progress};
use ferry_sys::mmap::map_writable;
use ferry_sys::PAGE_SIZE;

/// What an unpack did.
#[derive(Debug, Clone, Serialize)]
pub struct UnpackReport {
    #[serde(serialize_with = "ferry_image::units::serde_micros")]
    pub wall: Duration,
    pub threads: usize,
    pub files: usize,
    /// Size of the rebuilt directory.
    pub bytes: u64,
    /// Bytes written (zero pages are holes, not written).
    pub bytes_written: u64,
    pub chunks_read: usize,
    pub generations: usize,
    /// Of a streamed restore: zero pages of plain private anonymous memory
    /// left out of what CRIU was given (they read as zero unwritten; see
    /// [`super::holes`]). 0 for an unpack, which writes every file whole.
    pub zero_pages_left_out: u64,
}

/// One non-zero page to place: from slot `slot` of generation `gen`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PageRef {
    gen: u32,
    slot: u32,
    file: u32,
    page: u32,
}

enum Job<'m> {
    Data {
        file: usize,
        chunk: usize,
        offset: u64,
        /// Position of this chunk among the file's chunks.
        seq: usize,
    },
    Pages {
        gen: usize,
        chunk: usize,
        /// Where each referenced page goes: (slot, file, page, the page's
        /// bytes in the mapped pages image).
        targets: Vec<(u32, u32, u32, &'m mut [u8])>,
    },
}

/// Unpacks the chain's head into `dest`, an existing empty directory. On
/// error `dest` holds partial files: callers unpack into a staging
/// directory they remove on failure (see [`unpack_to_dir`]).
///
/// Pages images are written through shared mappings: each page is written
/// by exactly one job, so the jobs own disjoint page slices and write in
/// parallel without contending for the file's lock as `pwrite` would.
pub fn unpack(
    chain: &Chain,
    dest: &Path,
    threads: usize,
    progress: &dyn Progress,
) -> Result<UnpackReport, ArchiveError> {
    place(chain, None, dest, threads, progress)
}

/// Brings `dest`, which holds an unpack of `held`'s head (checked when it
/// was made), to an unpack of `chain`'s head: a pages image of the same
/// name and size is patched where its pages differ by digest, every other
/// file is written afresh, files of `held` absent from `chain` are removed.
/// Everything written is checked as [`unpack`] checks it; the pages left in
/// place were checked when `held` was unpacked. On error `dest` is left
/// half-updated: callers must not restore from it.
pub fn update(
    chain: &Chain,
    held: &Chain,
    dest: &Path,
    threads: usize,
    progress: &dyn Progress,
) -> Result<UnpackReport, ArchiveError> {
    let report = place(chain, Some(held), dest, threads, progress)?;
    let keep: std::collections::HashSet<&str> = chain
        .head()
        .index()
        .files
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    for f in &held.head().index().files {
        if !keep.contains(f.name.as_str()) {
            let p = dest.join(&f.name);
            fs::remove_file(&p).map_err(|e| ArchiveError::io("remove", &p, e))?;
        }
    }
    Ok(report)
}

fn place(
    chain: &Chain,
    held: Option<&Chain>,
    dest: &Path,
    threads: usize,
    progress: &dyn Progress,
) -> Result<UnpackReport, ArchiveError> {
    let start = Instant::now();
    let pool = super::thread_pool(threads)?;
    let threads = pool.current_num_threads();
    let head = chain.head();
    let files = &head.index().files;
    // A pages image of `held` with the same name and size is patched in
    // place: its page digests say which pages to leave.
    let mut kept: Vec<Option<Vec<Digest>>> = vec![None; files.len()];
    if let Some(held) = held {
        let old = &held.head().index().files;
        for (fi, f) in files.iter().enumerate().filter(|(_, f)| f.pages) {
            if let Some(oi) = old
                .iter()
                .position(|o| o.pages && o.name == f.name && o.size == f.size)
            {
                kept[fi] = Some(layout_digests(held, oi)?);
            }
        }
    }
    let zero = head.page_key().zero_page_digest();
    let mut refs = Vec::new();
    // Pages that were data in `held` and are zero now.
    let mut zeroed: Vec<(usize, usize)> = Vec::new();
    for (fi, f) in files.iter().enumerate().filter(|(_, f)| f.pages) {
        let digests = check_layout(chain, fi)?;
        let old = kept[fi].as_deref();
        let same = |p: usize| old.is_some_and(|o| o[p] == digests[p]);
        let mut page = 0u32;
        for r in 0..f.run_sources.len() {
            let (src, len, slot) = (f.run_sources[r], f.run_lens[r], f.run_slots[r]);
            for k in 0..len {
                let p = (page + k) as usize;
                if same(p) {
                    continue;
                }
                if src >= SOURCE_GEN_BASE {
                    refs.push(PageRef {
                        gen: src - SOURCE_GEN_BASE,
                        slot: slot + k,
                        file: fi as u32,
                        page: page + k,
                    });
                } else if old.is_some_and(|o| o[p] != zero) {
                    zeroed.push((fi, p));
                }
            }
            page += len;
        }
    }
    pool.install(|| refs.par_sort_unstable());
    tracing::debug!(elapsed = ?start.elapsed(), refs = refs.len(), "unpack: layout checked");

    let mut handles = Vec::with_capacity(files.len());
    let mut maps: Vec<Option<memmap2::MmapMut>> = Vec::with_capacity(files.len());
    for (fi, f) in files.iter().enumerate() {
        let path = dest.join(&f.name);
        let file = if kept[fi].is_some() {
            File::options()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| ArchiveError::io("open", &path, e))?
        } else {
            if held.is_some() {
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(ArchiveError::io("replace", &path, e))
                    }
                    _ => {}
                }
            }
            let file = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| ArchiveError::io("create", &path, e))?;
            file.set_len(f.size)
                .map_err(|e| ArchiveError::io("size", &path, e))?;
            file
        };
        let map = if f.pages && f.size > 0 {
            Some(map_writable(&file, false).map_err(|e| ArchiveError::io("map", &path, e))?)
        } else {
            None
        };
        maps.push(map);
        handles.push(file);
    }
    let mut views: Vec<Vec<Option<&mut [u8]>>> = maps
        .iter_mut()
        .map(|m| match m {
            Some(m) => m.chunks_mut(PAGE_SIZE).map(Some).collect(),
            None => Vec::new(),
        })
        .collect();
    for &(fi, p) in &zeroed {
        if let Some(v) = views[fi].get_mut(p).and_then(Option::take) {
            v.fill(0);
        }
    }
    let mut written = (refs.len() + zeroed.len()) as u64 * PAGE_SIZE as u64;

    let mut jobs = Vec::new();
    for (fi, f) in files.iter().enumerate().filter(|(_, f)| !f.pages) {
        written += f.size;
        let mut offset = 0u64;
        for (seq, &c) in f.data_chunks.iter().enumerate() {
            jobs.push(Job::Data {
                file: fi,
                chunk: c as usize,
                offset,
                seq,
            });
            offset += u64::from(head.index().chunks[c as usize].raw_len);
        }
    }
    let mut i = 0;
    while i < refs.len() {
        let gen = refs[i].gen as usize;
        let archive = chain.generation(gen);
        let chunk = archive
            .chunk_of_slot(u64::from(refs[i].slot))
            .ok_or_else(|| missing_slot(chain, refs[i]))?;
        let entry = &archive.index().chunks[chunk];
        let end_slot = u64::from(entry.first_slot) + u64::from(entry.raw_len) / PAGE_SIZE as u64;
        let mut targets = Vec::new();
        while i < refs.len() && refs[i].gen as usize == gen && u64::from(refs[i].slot) < end_slot {
            let r = refs[i];
            let view = views[r.file as usize]
                .get_mut(r.page as usize)
                .and_then(Option::take)
                .ok_or_else(|| missing_slot(chain, r))?;
            targets.push((r.slot, r.file, r.page, view));
            i += 1;
        }
        jobs.push(Job::Pages {
            gen,
            chunk,
            targets,
        });
    }
    let chunks_read = jobs.len();
    tracing::debug!(elapsed = ?start.elapsed(), jobs = chunks_read, "unpack: planned");

    let data_digests: Vec<(usize, usize, Vec<Digest>)> = pool.install(|| {
        jobs.into_par_iter()
            .map_init(ChunkBuf::default, |buf, job| {
                run(chain, &handles, dest, job, buf, progress)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.into_iter().flatten().collect())
    })?;
    drop(views);
    for (m, f) in maps.iter().zip(files) {
        if let Some(m) = m {
            m.flush()
                .map_err(|e| ArchiveError::io("write", dest.join(&f.name), e))?;
        }
    }
    check_data_files(chain, data_digests)?;
    tracing::debug!(elapsed = ?start.elapsed(), "unpack: written");

    let bytes = files.iter().map(|f| f.size).sum();
    Ok(UnpackReport {
        wall: start.elapsed(),
        threads,
        files: files.len(),
        bytes,
        bytes_written: written,
        chunks_read,
        generations: chain.generations(),
        zero_pages_left_out: 0,
    })
}

fn missing_slot(chain: &Chain, r: PageRef) -> ArchiveError {
    ArchiveError::corrupt(
        chain.head().path(),
        Corruption::Index {
            detail: format!(
                "generation {} has no slot {} (or page {} twice)",
                r.gen, r.slot, r.page
            ),
        },
    )
}

/// The pages image's manifest checksum must match its layout and the
/// recorded page digests, before anything is written. Returns the digest of
/// each page.
pub(super) fn check_layout(chain: &Chain, fi: usize) -> Result<Vec<Digest>, ArchiveError> {
    let f = &chain.head().index().files[fi];
    let digests = layout_digests(chain, fi)?;
    if file_checksum(digests.iter().copied(), f.size).to_le_bytes()[..] != f.checksum[..] {
        return Err(ArchiveError::corrupt(
            chain.head().path(),
            Corruption::FileChecksum {
                file: f.name.clone(),
            },
        ));
    }
    Ok(digests)
}

/// The digest of each page of the head's pages image `fi`, from its layout.
fn layout_digests(chain: &Chain, fi: usize) -> Result<Vec<Digest>, ArchiveError> {
    let f = &chain.head().index().files[fi];
    chain
        .head()
        .check_page_table(std::mem::size_of::<Digest>() as u64)?;
    let zero = chain.head().page_key().zero_page_digest();
    let mut digests = Vec::with_capacity((f.size / PAGE_SIZE as u64) as usize);
    for r in 0..f.run_sources.len() {
        let (src, len, slot) = (f.run_sources[r], f.run_lens[r], f.run_slots[r]);
        for k in 0..len {
            let d = if src < SOURCE_GEN_BASE {
                zero
            } else {
                let gen = src - SOURCE_GEN_BASE;
                let r = PageRef {
                    gen,
                    slot: slot + k,
                    file: fi as u32,
                    page: 0,
                };
                chain
                    .slot_digest(gen as usize, u64::from(slot + k))
                    .ok_or_else(|| missing_slot(chain, r))?
            };
            digests.push(d);
        }
    }
    Ok(digests)
}

/// Runs one job; data jobs return their block digests for the file check.
fn run(
    chain: &Chain,
    handles: &[File],
    dest: &Path,
    job: Job,
    buf: &mut ChunkBuf,
    progress: &dyn Progress,
) -> Result<Option<(usize, usize, Vec<Digest>)>, ArchiveError> {
    match job {
        Job::Data {
            file,
            chunk,
            offset,
            seq,
        } => {
            let data = chain.head().read_chunk_into(chunk, buf)?;
            handles[file].write_all_at(data, offset).map_err(|e| {
                ArchiveError::io(
                    "write",
                    dest.join(&chain.head().index().files[file].name),
                    e,
                )
            })?;
            progress.advance(data.len() as u64);
            Ok(Some((
                file,
                seq,
                data.chunks(PAGE_SIZE)
                    .map(|b| chain.head().page_key().digest(b))
                    .collect(),
            )))
        }
        Job::Pages {
            gen,
            chunk,
            targets,
        } => {
            let archive = chain.generation(gen);
            let data = archive.read_chunk_into(chunk, buf)?;
            let first = archive.index().chunks[chunk].first_slot;
            // Targets come sorted by slot: check each page against its
            // recorded digest once, then copy it wherever it goes.
            let mut checked = u32::MAX;
            for (slot, file, page, target) in targets {
                let at = (slot - first) as usize * PAGE_SIZE;
                let src = &data[at..at + PAGE_SIZE];
                if slot != checked {
                    if Some(archive.page_key().digest(src)) != archive.slot_digest(u64::from(slot))
                    {
                        return Err(ArchiveError::corrupt(
                            archive.path(),
                            Corruption::Page {
                                file: chain.head().index().files[file as usize].name.clone(),
                                page: u64::from(page),
                                chunk,
                                slot: u64::from(slot),
                            },
                        ));
                    }
                    checked = slot;
                }
                target.copy_from_slice(src);
                progress.advance(PAGE_SIZE as u64);
            }
            Ok(None)
        }
    }
}

/// Non-pages files: the digests of what was written must give the manifest
/// checksum.
fn check_data_files(
    chain: &Chain,
    mut parts: Vec<(usize, usize, Vec<Digest>)>,
) -> Result<(), ArchiveError> {
    let files = &chain.head().index().files;
    parts.sort_unstable_by_key(|(f, seq, _)| (*f, *seq));
    let mut digests: Vec<Vec<Digest>> = vec![Vec::new(); files.len()];
    for (f, _, d) in parts {
        digests[f].extend(d);
    }
    for (fi, f) in files.iter().enumerate().filter(|(_, f)| !f.pages) {
        let d = std::mem::take(&mut digests[fi]);
        if file_checksum(d, f.size).to_le_bytes()[..] != f.checksum[..] {
            return Err(ArchiveError::corrupt(
                chain.head().path(),
                Corruption::FileChecksum {
                    file: f.name.clone(),
                },
            ));
        }
    }
    Ok(())
}

/// Unpacks into `dest` (absent, or an empty directory) through a staging
/// directory beside it, renamed into place only when complete and synced;
/// on failure the staging directory is removed and `dest` is untouched.
pub fn unpack_to_dir(
    chain: &Chain,
    dest: &Path,
    threads: usize,
    progress: &dyn Progress,
) -> Result<UnpackReport, ArchiveError> {
    match fs::read_dir(dest) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(ArchiveError::Destination {
                    path: dest.to_path_buf(),
                    problem: "exists and is not empty",
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(ArchiveError::Destination {
                path: dest.to_path_buf(),
                problem: "exists and is not a directory",
            })
        }
        Err(e) => return Err(ArchiveError::io("read", dest, e)),
    }
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "images".into());
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}.unpack-"))
        .tempdir_in(parent)
        .map_err(|e| ArchiveError::io("create staging directory in", parent, e))?;
    let report = unpack(chain, staging.path(), threads, progress)?;
    for f in &chain.head().index().files {
        let p = staging.path().join(&f.name);
        File::open(&p)
            .and_then(|h| h.sync_all())
            .map_err(|e| ArchiveError::io("sync", &p, e))?;
    }
    if dest.exists() {
        fs::remove_dir(dest).map_err(|e| ArchiveError::io("replace empty directory", dest, e))?;
    }
    fs::rename(staging.path(), dest)
        .map_err(|e| ArchiveError::io("rename staging directory to", dest, e))?;
    Ok(report)
}
