//! Streaming an archive chain's images to a restoring CRIU (through
//! [`ferry_criu::streamer`]), so that a restore from an archive writes no
//! images anywhere: each pages image goes out in windows of
//! [`WINDOW_PAGES`] pages, whose chunks are decompressed on all threads
//! while the previous window goes into the pipe. Pages are spliced into
//! the pipe straight from the decompressed chunks, and zero pages from a
//! static zero block ([`ferry_sys::pipe`]): no page is copied by ferry, only
//! by CRIU as it reads. Chunk buffers are reused once the pipe is done with
//! them (fresh memory is the slowest thing a restore touches here).
//! The zero pages of plain private anonymous memory are not sent at all
//! unless asked for ([`super::holes`]).
//!
//! What is checked, and when: every pages image's layout against its
//! manifest checksum ([`StreamSource::check_layouts`]) before the first
//! image goes to CRIU; every chunk of every generation against its checksum
//! as stored ([`StreamSource::check_chunks`]) while CRIU reads the other
//! images, and before the first page goes to it (a pages image waits for
//! that check); each other file against its checksum before a byte of it
//! is sent; while streaming, each page against its digest as its chunk is
//! decompressed. A damaged archive is therefore refused before any memory
//! is restored; a page that passes its chunk's checksum yet fails its
//! digest (a crafted archive) closes the stream, and CRIU's restore fails
//! and kills what it began.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::chain::Chain;
use super::format::SOURCE_GEN_BASE;
use super::holes::ZeroPages;
use super::read::ChunkBuf;
use super::{ArchiveError, Corruption, Progress};
use ferry_criu::streamer::{ImageSink, ImageSource};
use ferry_sys::pipe::{PageBuf, Segment};
use ferry_sys::PAGE_SIZE;

/// Pages per window: 4 MiB.
pub(crate) const WINDOW_PAGES: usize = 1024;
/// Decompressed chunks kept between windows (pages repeated across the
/// image, such as deduplicated ones, refer back to earlier chunks).
const CACHE_CHUNKS: usize = 16;
/// Size of a fresh chunk buffer (pack writes chunks of up to 1 MiB).
const CHUNK_BYTES: usize = 1 << 20;
/// Windows assembled ahead of the one in the pipe.
const WINDOWS_AHEAD: usize = 2;

/// A page of a pages image: zero, or (generation, slot).
pub(crate) type PageSource = Option<(u32, u32)>;

/// An archive chain to stream, once [`StreamSource::check_layouts`] has
/// passed (and, for its pages, [`StreamSource::check_chunks`]).
pub struct StreamSource<'c> {
    chain: &'c Chain,
    pool: rayon::ThreadPool,
    progress: &'c dyn Progress,
    zero_pages: ZeroPages,
    /// Set by a passing [`StreamSource::check_layouts`].
    checked: OnceLock<Checked>,
    /// The outcome of [`StreamSource::check_chunks`], which pages images
    /// wait for.
    chunks: ChunkCheck,
    chunks_read: AtomicUsize,
}

/// The outcome of the check of every stored chunk, awaited by whoever
/// streams a pages image.
#[derive(Default)]
struct ChunkCheck {
    state: Mutex<ChunkState>,
    done: Condvar,
}

#[derive(Default)]
enum ChunkState {
    #[default]
    Pending,
    Passed,
    /// The finding goes to whoever ran the check.
    Failed,
}

/// What [`StreamSource::check_layouts`] prepared.
struct Checked {
    /// Per file of the head: the source of each page streamed (pages
    /// images only).
    layouts: Vec<Option<Vec<PageSource>>>,
    /// Pagemaps rewritten to leave zero pages out (see [`super::holes`]).
    pagemaps: HashMap<usize, Vec<u8>>,
    zero_pages_left_out: u64,
}

impl<'c> StreamSource<'c> {
    /// Prepares the chain for streaming on `threads` threads; nothing is
    /// streamed before [`StreamSource::check_layouts`] has passed.
    pub fn new(
        chain: &'c Chain,
        threads: usize,
        progress: &'c dyn Progress,
    ) -> Result<StreamSource<'c>, ArchiveError> {
        Ok(StreamSource {
            chain,
            pool: super::feeder_pool(threads)?,
            progress,
            zero_pages: ZeroPages::default(),
            checked: OnceLock::new(),
            chunks: ChunkCheck::default(),
            chunks_read: AtomicUsize::new(0),
        })
    }

    /// Whether the zero pages of plain private anonymous memory are
    /// written (by default they are left out: see [`super::holes`]).
    pub fn zero_pages(mut self, zero_pages: ZeroPages) -> Self {
        self.zero_pages = zero_pages;
        self
    }

    /// Checks the whole chain ([`StreamSource::check_layouts`], then
    /// [`StreamSource::check_chunks`]); returns how long it took.
    pub fn check(&self) -> Result<Duration, ArchiveError> {
        let start = Instant::now();
        self.check_layouts()?;
        self.check_chunks()?;
        Ok(start.elapsed())
    }

    /// Checks every pages image's layout against its manifest checksum and
    /// finds the zero pages to leave out; nothing is streamed before this
    /// has passed. Returns how long it took.
    pub fn check_layouts(&self) -> Result<Duration, ArchiveError> {
        let start = Instant::now();
        let files = &self.chain.head().index().files;
        // A page's place in the layout, its digest in the check.
        self.chain.head().check_page_table(32)?;
        let mut layouts = Vec::with_capacity(files.len());
        for (fi, f) in files.iter().enumerate() {
            if !f.pages {
                layouts.push(None);
                continue;
            }
            super::unpack::check_layout(self.chain, fi)?;
            let mut pages = Vec::with_capacity((f.size / PAGE_SIZE as u64) as usize);
            for r in 0..f.run_sources.len() {
                let (src, len, slot) = (f.run_sources[r], f.run_lens[r], f.run_slots[r]);
                for k in 0..len {
                    pages.push((src >= SOURCE_GEN_BASE).then(|| (src - SOURCE_GEN_BASE, slot + k)));
                }
            }
            layouts.push(Some(pages));
        }
        let holes = super::holes::plan(self.chain, &layouts, self.zero_pages)?;
        for (fi, kept) in &holes.kept {
            if let Some(pages) = &mut layouts[*fi] {
                let mut keep = kept.iter();
                pages.retain(|_| keep.next().copied().unwrap_or(true));
            }
        }
        let _ = self.checked.set(Checked {
            layouts,
            pagemaps: holes.pagemaps,
            zero_pages_left_out: holes.pages,
        });
        Ok(start.elapsed())
    }

    /// Checks every chunk of every generation against its checksum as
    /// stored (without decompressing). Pages images are streamed only once
    /// this has passed; the other images need not wait for it (each is
    /// checked against its own checksum as it is read), so it can run
    /// while CRIU reads them. Returns how long it took.
    pub fn check_chunks(&self) -> Result<Duration, ArchiveError> {
        let start = Instant::now();
        // At normal priority: the pages, and so CRIU, wait for it.
        let result = super::build_pool(self.pool.current_num_threads(), None).and_then(|pool| {
            pool.install(|| {
                (0..self.chain.generations())
                    .try_for_each(|g| self.chain.generation(g).check_stored_chunks())
            })
        });
        let mut state = self.chunks.state.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = match result {
            Ok(()) => {
                *state = ChunkState::Passed;
                Ok(start.elapsed())
            }
            Err(e) => {
                *state = ChunkState::Failed;
                Err(e)
            }
        };
        self.chunks.done.notify_all();
        outcome
    }

    /// Waits for the chunk check to pass; if it failed (its finding goes
    /// to whoever ran it), no page is streamed.
    fn chunks_checked(&self) -> Result<(), ArchiveError> {
        let mut state = self.chunks.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match *state {
                ChunkState::Pending => {
                    state = self
                        .chunks
                        .done
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner())
                }
                ChunkState::Passed => return Ok(()),
                ChunkState::Failed => {
                    return Err(ArchiveError::corrupt(
                        self.chain.head().path(),
                        Corruption::Index {
                            detail: "a chunk failed its check: no page is streamed".into(),
                        },
                    ))
                }
            }
        }
    }

    /// Zero pages left out of the pagemaps CRIU reads (0 before
    /// [`StreamSource::check_layouts`]).
    pub fn zero_pages_left_out(&self) -> u64 {
        self.checked.get().map_or(0, |c| c.zero_pages_left_out)
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

    /// Decompresses one chunk into `dst` and checks every page in it
    /// against its digest.
    fn load_chunk(
        &self,
        name: &str,
        (gen, chunk): (u32, usize),
        buf: &mut ChunkBuf,
        dst: &mut [u8],
    ) -> Result<(), ArchiveError> {
        let archive = self.chain.generation(gen as usize);
        let n = archive.read_checked_chunk_to(chunk, buf, dst)?;
        let first = u64::from(archive.index().chunks[chunk].first_slot);
        for (i, page) in dst[..n].chunks(PAGE_SIZE).enumerate() {
            let slot = first + i as u64;
            if Some(archive.page_key().digest(page)) != archive.slot_digest(slot) {
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
        Ok(())
    }

    /// Streams pages image `fi`: each window's chunks are decompressed on
    /// the pool while this thread sends the previous window, straight from
    /// the decompressed chunks (no copy: see [`ferry_sys::pipe`]).
    fn stream_pages(
        &self,
        name: &str,
        pages: &[PageSource],
        out: &mut dyn ImageSink,
    ) -> Result<u64, ArchiveError> {
        let (tx, rx) = mpsc::sync_channel::<(Vec<Segment>, usize)>(WINDOWS_AHEAD);
        std::thread::scope(|s| {
            let producer = s.spawn(move || self.assemble_windows(name, pages, &tx));
            let mut written = 0u64;
            let mut failed = None;
            for (segments, len) in rx.iter() {
                if let Err(e) = out.send_pages(&segments) {
                    failed = Some(self.io_error(name, e));
                    break;
                }
                written += len as u64;
                self.progress.advance(len as u64);
            }
            // Unblocks the producer if this side stopped early.
            drop(rx);
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

    /// Decompresses, window after window, the chunks the window's pages
    /// are in, and describes the window as segments of those chunks (and
    /// zeros). A chunk's buffer is filled again only once nothing shares
    /// it (no window in flight, no pipe still holding its pages).
    fn assemble_windows(
        &self,
        name: &str,
        pages: &[PageSource],
        tx: &mpsc::SyncSender<(Vec<Segment>, usize)>,
    ) -> Result<(), ArchiveError> {
        // (generation, chunk) -> (pages, window last used)
        let mut cache: HashMap<(u32, usize), (PageBuf, usize)> = HashMap::new();
        let mut spares: Vec<PageBuf> = Vec::new();
        let bufs = BufPool::default();
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
                    None => {
                        let (gen, chunk) = k;
                        let raw = self.chain.generation(gen as usize).index().chunks[chunk].raw_len;
                        let buf = unshared_spare(&mut spares, raw as usize)
                            .map_err(|e| self.io_error(name, e))?;
                        missing.push((k, buf));
                    }
                }
            }
            let loaded: Vec<((u32, usize), PageBuf)> = self.pool.install(|| {
                missing
                    .into_par_iter()
                    .map_init(
                        || bufs.take(),
                        |cb, (k, mut buf)| {
                            let dst = Arc::get_mut(&mut buf).expect("a spare is unshared");
                            self.load_chunk(name, k, cb, dst).map(|()| (k, buf))
                        },
                    )
                    .collect::<Result<_, _>>()
            })?;
            for (k, d) in loaded {
                cache.insert(k, (d, w));
            }
            let mut segments = Vec::new();
            for src in window {
                match *src {
                    None => Segment::push_zeros(&mut segments, PAGE_SIZE),
                    Some((gen, slot)) => {
                        let chunk = self.chunk_of(gen, slot)?;
                        let first =
                            self.chain.generation(gen as usize).index().chunks[chunk].first_slot;
                        let at = (slot - first) as usize * PAGE_SIZE;
                        Segment::push_buf(&mut segments, &cache[&(gen, chunk)].0, at, PAGE_SIZE);
                    }
                }
            }
            if tx.send((segments, window.len() * PAGE_SIZE)).is_err() {
                return Ok(()); // the sender stopped; it reports why
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

/// A buffer of at least `len` bytes that nothing else shares: a spare one
/// if any is free, else fresh memory.
fn unshared_spare(spares: &mut Vec<PageBuf>, len: usize) -> std::io::Result<PageBuf> {
    let free = spares
        .iter_mut()
        .position(|b| b.len() >= len && Arc::get_mut(b).is_some());
    match free {
        Some(i) => Ok(spares.swap_remove(i)),
        None => ferry_sys::pipe::page_buffer(len.max(CHUNK_BYTES)),
    }
}

/// Chunk buffers (and decompression contexts) lent to the pool's threads
/// window after window, so that none is allocated and touched afresh.
#[derive(Default)]
struct BufPool(std::sync::Mutex<Vec<ChunkBuf>>);

impl BufPool {
    fn take(&self) -> Lent<'_> {
        let buf = self.0.lock().ok().and_then(|mut v| v.pop());
        Lent(buf.unwrap_or_default(), self)
    }
}

/// A buffer from a [`BufPool`], given back when dropped.
struct Lent<'p>(ChunkBuf, &'p BufPool);

impl std::ops::Deref for Lent<'_> {
    type Target = ChunkBuf;
    fn deref(&self) -> &ChunkBuf {
        &self.0
    }
}

impl std::ops::DerefMut for Lent<'_> {
    fn deref_mut(&mut self) -> &mut ChunkBuf {
        &mut self.0
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Ok(mut v) = (self.1).0.lock() {
            v.push(std::mem::take(&mut self.0));
        }
    }
}

impl ImageSource for StreamSource<'_> {
    type Error = ArchiveError;

    fn has(&self, name: &str) -> bool {
        self.chain.head().file_index(name).is_some()
    }

    fn size(&self, name: &str) -> Option<u64> {
        let head = self.chain.head();
        let fi = head.file_index(name)?;
        let checked = self.checked.get()?;
        if let Some(rewritten) = checked.pagemaps.get(&fi) {
            return Some(rewritten.len() as u64);
        }
        match &checked.layouts[fi] {
            Some(pages) => Some((pages.len() * PAGE_SIZE) as u64),
            None => Some(head.index().files[fi].size),
        }
    }

    fn write_image(&self, name: &str, out: &mut dyn ImageSink) -> Result<u64, ArchiveError> {
        let head = self.chain.head();
        let fi = head.file_index(name).ok_or_else(|| {
            self.io_error(
                name,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not in the archive"),
            )
        })?;
        let Some(checked) = self.checked.get() else {
            return Err(self.io_error(
                name,
                std::io::Error::other("the archive was not checked before streaming"),
            ));
        };
        if let Some(rewritten) = checked.pagemaps.get(&fi) {
            out.write_all(rewritten)
                .map_err(|e| self.io_error(name, e))?;
            self.progress.advance(head.index().files[fi].size);
            return Ok(rewritten.len() as u64);
        }
        match &checked.layouts[fi] {
            Some(pages) => {
                self.chunks_checked()?;
                let n = self.stream_pages(name, pages, out)?;
                // Pages left out count as done.
                let size = head.index().files[fi].size;
                self.progress.advance(size.saturating_sub(n));
                Ok(n)
            }
            None => {
                let data = head.file_data(fi)?;
                out.write_all(&data).map_err(|e| self.io_error(name, e))?;
                self.progress.advance(data.len() as u64);
                Ok(data.len() as u64)
            }
        }
    }
}
