//! Streaming an archive chain's images to a restoring CRIU (through
//! [`crate::criu::streamer`]), so that a restore from an archive writes no
//! images anywhere: each pages image goes out in windows of
//! [`WINDOW_PAGES`] pages, whose chunks are decompressed on all threads
//! while the previous window is in the pipe, into buffers that are reused
//! (fresh memory is the slowest thing a restore touches).
//!
//! What is checked, and when: before CRIU is started, every chunk of every
//! generation against its checksum as stored and every pages image's layout
//! against its manifest checksum ([`StreamSource::new`]); while streaming,
//! each page against its digest as its chunk is decompressed, and each
//! other file against its checksum before a byte of it is sent. A damaged
//! archive is therefore refused before anything is restored; a page that
//! passes its chunk's checksum yet fails its digest (a crafted archive)
//! closes the stream, and CRIU's restore fails and kills what it began.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::chain::Chain;
use super::format::{digest, SOURCE_GEN_BASE};
use super::read::ChunkBuf;
use super::{ArchiveError, Corruption, Progress};
use crate::criu::streamer::ImageSource;
use crate::PAGE_SIZE;

/// Pages per window: 16 MiB.
pub const WINDOW_PAGES: usize = 4096;
/// Decompressed chunks kept between windows (pages repeated across the
/// image, such as deduplicated ones, refer back to earlier chunks).
const CACHE_CHUNKS: usize = 64;
/// Windows assembled ahead of the one in the pipe.
const WINDOWS_AHEAD: usize = 2;

/// A page of a pages image: zero, or (generation, slot).
type PageSource = Option<(u32, u32)>;

/// An archive chain checked and ready to stream.
pub struct StreamSource<'c> {
    chain: &'c Chain,
    pool: rayon::ThreadPool,
    progress: &'c dyn Progress,
    /// Per file of the head: the source of each page (pages images only).
    layouts: Vec<Option<Vec<PageSource>>>,
    chunks_read: AtomicUsize,
    /// Time spent checking the chain up front.
    pub check_wall: Duration,
}

impl<'c> StreamSource<'c> {
    /// Checks the chain (see the module docs) on `threads` threads.
    pub fn new(
        chain: &'c Chain,
        threads: usize,
        progress: &'c dyn Progress,
    ) -> Result<StreamSource<'c>, ArchiveError> {
        let start = Instant::now();
        let pool = super::thread_pool(threads)?;
        pool.install(|| {
            (0..chain.generations()).try_for_each(|g| chain.generation(g).check_stored_chunks())
        })?;
        let files = &chain.head().index().files;
        let mut layouts = Vec::with_capacity(files.len());
        for (fi, f) in files.iter().enumerate() {
            if !f.pages {
                layouts.push(None);
                continue;
            }
            super::unpack::check_layout(chain, fi)?;
            let mut pages = Vec::with_capacity((f.size / PAGE_SIZE as u64) as usize);
            for r in 0..f.run_sources.len() {
                let (src, len, slot) = (f.run_sources[r], f.run_lens[r], f.run_slots[r]);
                for k in 0..len {
                    pages.push((src >= SOURCE_GEN_BASE).then(|| (src - SOURCE_GEN_BASE, slot + k)));
                }
            }
            layouts.push(Some(pages));
        }
        Ok(StreamSource {
            chain,
            pool,
            progress,
            layouts,
            chunks_read: AtomicUsize::new(0),
            check_wall: start.elapsed(),
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Chunks decompressed so far.
    pub fn chunks_read(&self) -> usize {
        self.chunks_read.load(Ordering::Relaxed)
    }

    fn io_error(&self, name: &str, e: std::io::Error) -> ArchiveError {
        ArchiveError::io("stream", std::path::Path::new(name), e)
    }

    /// The chunk of generation `gen` holding `slot`.
    fn chunk_of(&self, gen: u32, slot: u32) -> Result<usize, ArchiveError> {
        self.chain
            .generation(gen as usize)
            .chunk_of_slot(u64::from(slot))
            .ok_or_else(|| {
                ArchiveError::corrupt(
                    self.chain.head().path(),
                    Corruption::Index {
                        detail: format!("generation {gen} has no slot {slot}"),
                    },
                )
            })
    }

    /// Decompresses one chunk into `spare` and checks every page in it
    /// against its digest.
    fn load_chunk(
        &self,
        name: &str,
        (gen, chunk): (u32, usize),
        buf: &mut ChunkBuf,
        spare: Vec<u8>,
    ) -> Result<Vec<u8>, ArchiveError> {
        let archive = self.chain.generation(gen as usize);
        let data = archive.read_chunk_into(chunk, buf)?;
        let first = u64::from(archive.index().chunks[chunk].first_slot);
        for (i, page) in data.chunks(PAGE_SIZE).enumerate() {
            let slot = first + i as u64;
            if Some(digest(page)) != archive.slot_digest(slot) {
                return Err(ArchiveError::corrupt(
                    archive.path(),
                    Corruption::Page {
                        file: name.to_string(),
                        page: 0,
                        chunk,
                        slot,
                    },
                ));
            }
        }
        self.chunks_read.fetch_add(1, Ordering::Relaxed);
        Ok(buf.swap_raw(spare))
    }

    /// Streams pages image `fi`: windows are assembled on the pool while
    /// this thread writes the previous one.
    fn stream_pages(
        &self,
        name: &str,
        pages: &[PageSource],
        out: &mut dyn Write,
    ) -> Result<u64, ArchiveError> {
        let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(WINDOWS_AHEAD);
        let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
        for _ in 0..=WINDOWS_AHEAD {
            let _ = empty_tx.send(Vec::new());
        }
        std::thread::scope(|s| {
            let producer = s.spawn(move || self.assemble_windows(name, pages, &full_tx, &empty_rx));
            let mut written = 0u64;
            let mut failed = None;
            for (buf, len) in full_rx.iter() {
                if let Err(e) = out.write_all(&buf[..len]) {
                    failed = Some(self.io_error(name, e));
                    break;
                }
                written += len as u64;
                self.progress.advance(len as u64);
                let _ = empty_tx.send(buf);
            }
            // Unblocks the producer if this side stopped early.
            drop(full_rx);
            drop(empty_tx);
            let produced = producer.join().unwrap_or_else(|_| {
                Err(ArchiveError::io(
                    "stream",
                    std::path::Path::new(name),
                    std::io::Error::other("the window assembler panicked"),
                ))
            });
            match (produced, failed) {
                (Err(e), _) | (Ok(()), Some(e)) => Err(e),
                (Ok(()), None) => Ok(written),
            }
        })
    }

    fn assemble_windows(
        &self,
        name: &str,
        pages: &[PageSource],
        full: &mpsc::SyncSender<(Vec<u8>, usize)>,
        empty: &mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), ArchiveError> {
        // (generation, chunk) -> (pages, window last used)
        let mut cache: HashMap<(u32, usize), (Vec<u8>, usize)> = HashMap::new();
        let mut spares: Vec<Vec<u8>> = Vec::new();
        for (w, window) in pages.chunks(WINDOW_PAGES).enumerate() {
            let mut keys: Vec<(u32, usize)> = Vec::new();
            for &(gen, slot) in window.iter().flatten() {
                keys.push((gen, self.chunk_of(gen, slot)?));
            }
            keys.sort_unstable();
            keys.dedup();
            let mut missing = Vec::new();
            for k in keys {
                match cache.get_mut(&k) {
                    Some(entry) => entry.1 = w,
                    None => missing.push((k, spares.pop().unwrap_or_default())),
                }
            }
            let loaded: Vec<((u32, usize), Vec<u8>)> = self.pool.install(|| {
                missing
                    .into_par_iter()
                    .map_init(ChunkBuf::default, |buf, (k, spare)| {
                        self.load_chunk(name, k, buf, spare).map(|d| (k, d))
                    })
                    .collect::<Result<_, _>>()
            })?;
            for (k, d) in loaded {
                cache.insert(k, (d, w));
            }
            let Ok(mut buf) = empty.recv() else {
                return Ok(()); // the writer stopped; it reports why
            };
            let len = window.len() * PAGE_SIZE;
            buf.resize(len, 0);
            self.pool.install(|| {
                buf.par_chunks_mut(PAGE_SIZE)
                    .zip(window.par_iter())
                    .try_for_each(|(dst, src)| -> Result<(), ArchiveError> {
                        match *src {
                            None => dst.fill(0),
                            Some((gen, slot)) => {
                                let chunk = self.chunk_of(gen, slot)?;
                                let first = self.chain.generation(gen as usize).index().chunks
                                    [chunk]
                                    .first_slot;
                                let at = (slot - first) as usize * PAGE_SIZE;
                                let data = &cache[&(gen, chunk)].0;
                                dst.copy_from_slice(&data[at..at + PAGE_SIZE]);
                            }
                        }
                        Ok(())
                    })
            })?;
            if full.send((buf, len)).is_err() {
                return Ok(());
            }
            while cache.len() > CACHE_CHUNKS {
                let Some((&k, _)) = cache
                    .iter()
                    .filter(|(_, (_, used))| *used < w)
                    .min_by_key(|(_, (_, used))| *used)
                else {
                    break;
                };
                if let Some((d, _)) = cache.remove(&k) {
                    spares.push(d);
                }
            }
        }
        Ok(())
    }
}

impl ImageSource for StreamSource<'_> {
    type Error = ArchiveError;

    fn has(&self, name: &str) -> bool {
        self.chain.head().file_index(name).is_some()
    }

    fn write_image(&self, name: &str, out: &mut dyn Write) -> Result<u64, ArchiveError> {
        let head = self.chain.head();
        let fi = head.file_index(name).ok_or_else(|| {
            self.io_error(
                name,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not in the archive"),
            )
        })?;
        match &self.layouts[fi] {
            Some(pages) => self.stream_pages(name, pages, out),
            None => {
                let data = head.file_data(fi)?;
                out.write_all(&data).map_err(|e| self.io_error(name, e))?;
                self.progress.advance(data.len() as u64);
                Ok(data.len() as u64)
            }
        }
    }
}
