//! The planner: page by page, zero, already stored (here or in an
//! ancestor) or new; new pages cut into chunk jobs, random-looking pages in
//! chunks of their own.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use rayon::prelude::*;

use crate::chain::Chain;
use crate::format::{file_checksum, Digest, FileEntry, PageKey, SOURCE_GEN_BASE, SOURCE_ZERO};
use crate::{ArchiveError, CHUNK_PAGES};
use ferry_sys::PAGE_SIZE;

use super::*;

/// Hashes digests by their low 64 bits: they are already uniform.
#[derive(Default)]
pub(super) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

pub(super) type DigestMap<V> = HashMap<Digest, V, BuildHasherDefault<DigestHasher>>;

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counts {
    pub(super) pages: u64,
    pub(super) zero: u64,
    pub(super) duplicate: u64,
    pub(super) parent: u64,
    pub(super) new: u64,
}

/// What to compress: pages of a pages image, or a byte range of a file.
pub(super) enum Job {
    Pages {
        file: usize,
        first_slot: u32,
        pages: Vec<u32>,
        /// Every page looked random: see [`PROBE_BYTES`].
        random: bool,
        /// No later job of the file reads below this offset.
        done_below: usize,
    },
    Data {
        file: usize,
        start: usize,
        len: usize,
    },
}

/// Hands a planned job to the pipeline; returns its chunk id.
pub(super) type Emit<'e> = dyn FnMut(Job) -> Result<u32, ArchiveError> + 'e;

/// The page decisions: which digests are stored where.
pub(super) struct Planner {
    /// Where each digest is stored: (source, slot) in an ancestor, or
    /// (SOURCE_GEN_BASE, id) here, the id's slot in `slot_of`.
    pub(super) known: DigestMap<(u32, u32)>,
    /// The slot of each page stored here, by id (ids are given in page
    /// order, slots in chunk order).
    pub(super) slot_of: Vec<u32>,
    pub(super) slot_digests: Vec<Digest>,
    pub(super) counts: Counts,
    /// The digests' key: the parent's, or a new one for a first archive.
    pub(super) key: PageKey,
}

/// New pages of one entropy class waiting for a chunk.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) random: bool,
    pub(super) pages: Vec<u32>,
    pub(super) ids: Vec<u32>,
    pub(super) digests: Vec<Digest>,
}

impl Planner {
    pub(super) fn new(parent: Option<&Chain>) -> Result<Planner, ArchiveError> {
        let key = match parent {
            Some(chain) => *chain.head().page_key(),
            None => PageKey::random()
                .map_err(|e| ArchiveError::io("read", std::path::Path::new("/dev/urandom"), e))?,
        };
        let mut known = DigestMap::default();
        if let Some(chain) = parent {
            // Nearer generations win: insert the oldest first.
            for g in (0..chain.generations()).rev() {
                let a = chain.generation(g);
                let source = SOURCE_GEN_BASE + 1 + g as u32;
                for slot in 0..a.slots() {
                    if let Some(d) = a.slot_digest(slot) {
                        known.insert(d, (source, slot as u32));
                    }
                }
            }
        }
        Ok(Planner {
            known,
            slot_of: Vec::new(),
            slot_digests: Vec::new(),
            counts: Counts::default(),
            key,
        })
    }

    pub(super) fn plan_pages(
        &mut self,
        pool: &rayon::ThreadPool,
        file: usize,
        src: &Source,
        emit: &mut Emit,
    ) -> Result<FileEntry, ArchiveError> {
        let zero = self.key.zero_page_digest();
        let total = src.bytes.len() / PAGE_SIZE;
        self.known.reserve(total);
        self.slot_digests.reserve(total);
        let mut scanned: Vec<Scan> = Vec::with_capacity(total);
        // Per page: zero, stored in an ancestor (source, slot), or stored
        // here (SOURCE_GEN_BASE, id), its slot known once its chunk is
        // planned.
        let mut refs: Vec<(u32, u32)> = Vec::with_capacity(total);
        let mut pending = [
            Pending::default(),
            Pending {
                random: true,
                ..Pending::default()
            },
        ];
        // The decisions, page by page on this thread, batch after batch as
        // the pool scans them, while it compresses the chunks decided.
        let key = self.key;
        scan_in_batches(pool, &key, &src.bytes, |batch| {
            let from = scanned.len();
            scanned.extend_from_slice(&batch);
            for (i, p) in batch.into_iter().enumerate() {
                let i = from + i;
                self.counts.pages += 1;
                let Some((d, random)) = p else {
                    self.counts.zero += 1;
                    refs.push((SOURCE_ZERO, 0));
                    continue;
                };
                if let Some(&stored) = self.known.get(&d) {
                    if stored.0 == SOURCE_GEN_BASE {
                        self.counts.duplicate += 1;
                    } else {
                        self.counts.parent += 1;
                    }
                    refs.push(stored);
                    continue;
                }
                let id = self.slot_of.len() as u32;
                self.slot_of.push(u32::MAX);
                self.known.insert(d, (SOURCE_GEN_BASE, id));
                self.counts.new += 1;
                refs.push((SOURCE_GEN_BASE, id));
                // Random-looking pages go into chunks of their own: zstd then
                // gives up on them quickly, and the other pages compress
                // better without them.
                let [plain, rand] = &mut pending;
                let (group, other) = if random { (rand, plain) } else { (plain, rand) };
                group.pages.push(i as u32);
                group.ids.push(id);
                group.digests.push(d);
                if group.pages.len() == CHUNK_PAGES {
                    // Later jobs read the other group's pages and those not
                    // planned yet, nothing below.
                    let below = other
                        .pages
                        .first()
                        .map_or(i as u32 + 1, |&p| p.min(i as u32 + 1));
                    self.plan_chunk(file, group, below, emit)?;
                }
            }
            Ok(())
        })?;
        let [plain, rand] = &mut pending;
        let below = rand.pages.first().map_or(total as u32, |&p| p);
        self.plan_chunk(file, plain, below, emit)?;
        self.plan_chunk(file, rand, total as u32, emit)?;
        let mut runs = Runs::default();
        for &(source, at) in &refs {
            let slot = if source == SOURCE_GEN_BASE {
                self.slot_of[at as usize]
            } else {
                at
            };
            runs.push(source, slot);
        }
        let size = src.bytes.len() as u64;
        let checksum = file_checksum(scanned.iter().map(|p| p.map_or(zero, |(d, _)| d)), size);
        Ok(FileEntry {
            name: src.name.clone(),
            size,
            checksum: checksum.to_le_bytes().to_vec(),
            pages: true,
            data_chunks: Vec::new(),
            run_sources: runs.sources,
            run_lens: runs.lens,
            run_slots: runs.slots,
        })
    }

    /// Gives the pending pages the next slots, in order, and emits them as
    /// one chunk job, after which no job of the file reads below page
    /// `below`.
    pub(super) fn plan_chunk(
        &mut self,
        file: usize,
        group: &mut Pending,
        below: u32,
        emit: &mut Emit,
    ) -> Result<(), ArchiveError> {
        if group.pages.is_empty() {
            return Ok(());
        }
        let first_slot = self.slot_digests.len() as u32;
        for (k, &id) in group.ids.iter().enumerate() {
            self.slot_of[id as usize] = first_slot + k as u32;
        }
        self.slot_digests.append(&mut group.digests);
        group.ids.clear();
        emit(Job::Pages {
            file,
            first_slot,
            pages: std::mem::take(&mut group.pages),
            random: group.random,
            done_below: below as usize * PAGE_SIZE,
        })?;
        Ok(())
    }

    pub(super) fn plan_data(
        &mut self,
        pool: &rayon::ThreadPool,
        file: usize,
        src: &Source,
        emit: &mut Emit,
    ) -> Result<FileEntry, ArchiveError> {
        let digests: Vec<Digest> = if src.bytes.len() > READ_LIMIT as usize {
            pool.install(|| {
                src.bytes
                    .par_chunks(PAGE_SIZE)
                    .with_max_len(DIGEST_BATCH_PAGES)
                    .map(|b| self.key.digest(b))
                    .collect()
            })
        } else {
            src.bytes
                .chunks(PAGE_SIZE)
                .map(|b| self.key.digest(b))
                .collect()
        };
        let size = src.bytes.len() as u64;
        let step = CHUNK_PAGES * PAGE_SIZE;
        let mut data_chunks = Vec::new();
        let mut start = 0;
        while start < src.bytes.len() {
            let len = step.min(src.bytes.len() - start);
            data_chunks.push(emit(Job::Data { file, start, len })?);
            start += len;
        }
        Ok(FileEntry {
            name: src.name.clone(),
            size,
            checksum: file_checksum(digests, size).to_le_bytes().to_vec(),
            pages: false,
            data_chunks,
            run_sources: Vec::new(),
            run_lens: Vec::new(),
            run_slots: Vec::new(),
        })
    }
}

/// Page runs being built: consecutive pages from consecutive slots of one
/// source (or zero pages) extend the last run.
#[derive(Default)]
pub(super) struct Runs {
    pub(super) sources: Vec<u32>,
    pub(super) lens: Vec<u32>,
    pub(super) slots: Vec<u32>,
}

impl Runs {
    pub(super) fn push(&mut self, source: u32, slot: u32) {
        if let (Some(&s), Some(len), Some(&first)) =
            (self.sources.last(), self.lens.last_mut(), self.slots.last())
        {
            if s == source && (source == SOURCE_ZERO || first.wrapping_add(*len) == slot) {
                *len += 1;
                return;
            }
        }
        self.sources.push(source);
        self.lens.push(1);
        self.slots
            .push(if source == SOURCE_ZERO { 0 } else { slot });
    }
}
