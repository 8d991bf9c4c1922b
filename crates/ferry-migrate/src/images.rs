//! The final dump's images as the destination gets them: metadata images
//! whole, pages images as recipes (one digest per page), of whose pages
//! only those the destination lacks are sent.
//!
//! CRIU dumps into ferry's image capture ([`ferry_criu::capture`]);
//! [`StreamedImages`] digests each pages image and queues its new pages for
//! the destination while CRIU is still dumping, and nothing is written to
//! disk. Where the images may be needed here afterwards (one kernel: the
//! source is killed before the destination restores; or `--keep-images`),
//! each image is also written to a directory as it streams, from the same
//! bytes that were digested.
//!
//! Not kept by reference: the pipe carries the dumped process's own pages,
//! and the kernel still writes to some of them after the dump (the rseq
//! area's CPU numbers when a thread next runs; each thread's cleared tid
//! word and robust futexes when the process is killed), so a duplicate of
//! the pipe (`tee`) would not be the dump.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;

use rayon::prelude::*;

use super::streams::PageSender;
use super::FinalError;
use ferry_criu::capture::ImageCapture;
use ferry_image::dir::classify_name;
use ferry_image::page::{Digest, PageKey};
use ferry_image::FileClass;
use ferry_sys::PAGE_SIZE;
use ferry_transport::msg::ImageEntry;
use ferry_transport::pages::{self, ZERO_PAGE};
use ferry_transport::TransportError;

/// How much of a pages image is digested at once before its new pages are
/// handed to the senders.
const SEND_BLOCK: usize = 16 << 20;
/// How much of a block one task reads and digests.
const HASH_CHUNK: usize = 1 << 20;
/// Blocks of a streamed pages image in flight between the thread reading
/// CRIU's pipe and the one digesting (so CRIU keeps dumping meanwhile).
const STREAM_BLOCKS: usize = 3;

/// What goes to the destination, file by file in name order.
#[derive(Default)]
pub(crate) struct Outgoing {
    pub entries: Vec<ImageEntry>,
    /// Each file's content, or its recipe for a pages image.
    pub blobs: Vec<Vec<u8>>,
}

/// Pages counted while the images were digested.
#[derive(Debug, Default, Clone, Copy)]
pub struct PageCounts {
    pub in_images: u64,
    pub zero: u64,
    pub sent: u64,
}

/// Where new pages go: the senders, past the digests the destination holds.
struct Outbox<'a> {
    sender: &'a mut PageSender,
    known: &'a mut HashSet<Digest>,
    counts: PageCounts,
}

/// One pages image, learned block by block.
#[derive(Default)]
struct Recipe {
    /// Checksum leaves (one per page, plus any tail).
    leaves: Vec<u128>,
    digests: Vec<Digest>,
    bytes: u64,
}

impl Recipe {
    /// Takes `block` (a whole number of pages, but for an image's last
    /// block) with its pages' digests and leaves ([`digest_chunk`] of each
    /// [`HASH_CHUNK`]), and queues the pages the destination lacks.
    fn take(
        &mut self,
        block: &[u8],
        hashed: Vec<Vec<(Digest, u128)>>,
        out: &mut Outbox<'_>,
    ) -> Result<(), TransportError> {
        for ((d, leaf), p) in hashed.into_iter().flatten().zip(block.chunks(PAGE_SIZE)) {
            self.leaves.push(leaf);
            if p.len() < PAGE_SIZE {
                continue; // a tail: not a page
            }
            self.digests.push(d);
            out.counts.in_images += 1;
            if d == ZERO_PAGE {
                out.counts.zero += 1;
            } else if out.known.insert(d) {
                out.sender.push(d, p)?;
                out.counts.sent += 1;
            }
        }
        self.bytes += block.len() as u64;
        Ok(())
    }

    /// The image's checksum and its recipe.
    fn finish(self) -> (u128, Vec<u8>) {
        (
            pages::combine_leaves(&self.leaves),
            pages::encode_digests(&self.digests),
        )
    }
}

/// Each page's digest (the zero digest for zero pages) and checksum leaf.
/// One pass: a page's digest is also its leaf.
fn digest_chunk(key: &PageKey, chunk: &[u8]) -> Vec<(Digest, u128)> {
    chunk
        .chunks(pages::CHECKSUM_LEAF_BYTES)
        .map(|p| match key.fingerprint(p) {
            _ if p.len() < PAGE_SIZE => (ZERO_PAGE, pages::leaf_hash(key, p)),
            Some(d) => (d, d),
            None => (ZERO_PAGE, key.zero_page_digest()),
        })
        .collect()
}

fn entry(name: String, size: u64, checksum: u128, recipe: bool) -> ImageEntry {
    ImageEntry {
        name,
        size,
        checksum: format!("{checksum:032x}"),
        recipe,
    }
}

/// The image files of a dump directory to send (CRIU's logs stay here).
fn image_files(dir: &Path) -> io::Result<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| classify_name(n) != FileClass::Log)
        .collect();
    names.sort();
    Ok(names)
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot read it from CRIU")]
    Read(#[source] io::Error),
    #[error("cannot copy it to the local images")]
    Copy(#[source] io::Error),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// A captured image.
enum Captured {
    Whole(Vec<u8>),
    Pages(Recipe),
}

/// The images of a streamed dump, taken as CRIU writes them.
pub(crate) struct StreamedImages<'a> {
    key: PageKey,
    out: Mutex<Outbox<'a>>,
    /// Where each image is also written as it streams, if anywhere.
    copy_to: Option<PathBuf>,
    images: Mutex<BTreeMap<String, Captured>>,
}

impl<'a> StreamedImages<'a> {
    pub fn new(
        sender: &'a mut PageSender,
        known: &'a mut HashSet<Digest>,
        copy_to: Option<PathBuf>,
        key: PageKey,
    ) -> StreamedImages<'a> {
        StreamedImages {
            key,
            out: Mutex::new(Outbox {
                sender,
                known,
                counts: PageCounts::default(),
            }),
            copy_to,
            images: Mutex::new(BTreeMap::new()),
        }
    }

    /// What to send, with the files CRIU wrote to `dir` itself (its
    /// statistics) and any ferry wrote there (the GPU record).
    pub fn finish(self, dir: &Path) -> Result<(Outgoing, PageCounts), FinalError> {
        let counts = self.out.into_inner().map(|o| o.counts).unwrap_or_default();
        let mut images = self.images.into_inner().unwrap_or_default();
        let io = |source| FinalError::Images {
            path: dir.to_path_buf(),
            source,
        };
        for name in image_files(dir).map_err(io)? {
            if let std::collections::btree_map::Entry::Vacant(slot) = images.entry(name) {
                let bytes = fs::read(dir.join(slot.key())).map_err(io)?;
                slot.insert(Captured::Whole(bytes));
            }
        }
        let mut outgoing = Outgoing::default();
        for (name, image) in images {
            match image {
                Captured::Whole(bytes) => {
                    let sum = pages::file_checksum(&self.key, &bytes);
                    outgoing
                        .entries
                        .push(entry(name, bytes.len() as u64, sum, false));
                    outgoing.blobs.push(bytes);
                }
                Captured::Pages(recipe) => {
                    let size = recipe.bytes;
                    let (sum, blob) = recipe.finish();
                    outgoing.entries.push(entry(name, size, sum, true));
                    outgoing.blobs.push(blob);
                }
            }
        }
        Ok((outgoing, counts))
    }

    /// The file an image is copied to, if images are copied.
    fn copy_file(&self, name: &str) -> Result<Option<File>, CaptureError> {
        self.copy_to
            .as_ref()
            .map(|dir| File::create(dir.join(name)).map_err(CaptureError::Copy))
            .transpose()
    }

    /// Reads a pages image from CRIU's pipe in blocks, digesting and
    /// queuing each block while the next is read (and copied, if images
    /// are copied).
    fn capture_pages(&self, name: &str, mut pipe: File) -> Result<Recipe, CaptureError> {
        let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(STREAM_BLOCKS);
        let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(STREAM_BLOCKS);
        for _ in 0..STREAM_BLOCKS {
            let _ = empty_tx.send(Vec::new());
        }
        let mut copy = self.copy_file(name)?;
        std::thread::scope(|s| {
            let reader = s.spawn(move || -> Result<(), CaptureError> {
                // Ends when the digesting side stops taking blocks (it
                // failed): dropping the pipe then breaks CRIU's dump.
                while let Ok(mut buf) = empty_rx.recv() {
                    buf.resize(SEND_BLOCK, 0);
                    let n = read_full(&mut pipe, &mut buf).map_err(CaptureError::Read)?;
                    if let Some(f) = copy.as_mut() {
                        f.write_all(&buf[..n]).map_err(CaptureError::Copy)?;
                    }
                    if n == 0 || full_tx.send((buf, n)).is_err() {
                        break;
                    }
                    if ferry_core::fault::fails("migrate-capture-fails") {
                        return Err(CaptureError::Read(io::Error::other("injected fault")));
                    }
                    if n < SEND_BLOCK {
                        break;
                    }
                }
                Ok(())
            });
            let mut recipe = Recipe::default();
            let digested = (|| {
                for (buf, n) in full_rx.iter() {
                    let block = &buf[..n];
                    let hashed: Vec<Vec<(Digest, u128)>> = block
                        .par_chunks(HASH_CHUNK)
                        .map(|c| digest_chunk(&self.key, c))
                        .collect();
                    {
                        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
                        recipe.take(block, hashed, &mut out)?;
                    }
                    let _ = empty_tx.send(buf);
                }
                Ok::<_, CaptureError>(())
            })();
            drop(full_rx);
            drop(empty_tx);
            let read = reader
                .join()
                .unwrap_or_else(|_| Err(CaptureError::Read(io::Error::other("reader panicked"))));
            digested?;
            read?;
            Ok(recipe)
        })
    }
}

impl ImageCapture for StreamedImages<'_> {
    type Error = CaptureError;

    fn capture(&self, name: &str, mut pipe: File) -> Result<u64, CaptureError> {
        let (image, bytes) = if classify_name(name) == FileClass::Pages {
            let recipe = self.capture_pages(name, pipe)?;
            let bytes = recipe.bytes;
            (Captured::Pages(recipe), bytes)
        } else {
            let mut bytes = Vec::new();
            pipe.read_to_end(&mut bytes).map_err(CaptureError::Read)?;
            if let Some(mut f) = self.copy_file(name)? {
                f.write_all(&bytes).map_err(CaptureError::Copy)?;
            }
            let n = bytes.len() as u64;
            (Captured::Whole(bytes), n)
        };
        self.images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), image);
        Ok(bytes)
    }
}

/// Why images in a directory are not the ones that were sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VerifyError {
    #[error("cannot read {}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{name} is not the image that was sent ({len} bytes, expected {expected})")]
    Differs {
        name: String,
        len: u64,
        expected: u64,
    },
}

/// Checks that `dir` holds every image of `entries` with its size and
/// checksum (a source on the destination's kernel, before it restores from
/// the destination's images).
pub(crate) fn verify_dir(
    key: &PageKey,
    dir: &Path,
    entries: &[ImageEntry],
) -> Result<(), VerifyError> {
    for e in entries {
        let path = dir.join(&e.name);
        let read = |source| VerifyError::Read {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(read)?;
        let len = file.metadata().map_err(read)?.len();
        let sum = if len == 0 {
            pages::file_checksum(key, &[])
        } else {
            let map = ferry_sys::mmap::map_or_read(&file, true).map_err(read)?;
            pages::file_checksum(key, &map)
        };
        if len != e.size || format!("{sum:032x}") != e.checksum {
            return Err(VerifyError::Differs {
                name: e.name.clone(),
                len,
                expected: e.size,
            });
        }
    }
    Ok(())
}

/// Fills `buf` unless the stream ends first; returns the bytes read.
fn read_full(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Every image file of a dump directory, whole (a lazy dump's images: its
/// memory is not in them), with their entries.
pub(crate) fn whole_files(
    key: &PageKey,
    dir: &Path,
) -> io::Result<(Vec<ImageEntry>, Vec<Vec<u8>>)> {
    let mut entries = Vec::new();
    let mut blobs = Vec::new();
    for name in image_files(dir)? {
        let bytes = fs::read(dir.join(&name))?;
        entries.push(entry(
            name,
            bytes.len() as u64,
            pages::file_checksum(key, &bytes),
            false,
        ));
        blobs.push(bytes);
    }
    Ok((entries, blobs))
}
