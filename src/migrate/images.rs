//! The final dump's images as the destination gets them: metadata images
//! whole, pages images as recipes (one digest per page), of whose pages
//! only those the destination lacks are sent.
//!
//! CRIU dumps into ferry's image capture ([`crate::criu::capture`]);
//! [`StreamedImages`] digests each pages image and queues its new pages for
//! the destination while CRIU is still dumping, and nothing is written to
//! disk. Where the images may be needed here afterwards (one kernel: the
//! source is killed before the destination restores; or `--keep-images`),
//! the pages are held by reference ([`crate::sys::hold`]) and written out
//! only then.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Mutex;

use rayon::prelude::*;

use super::streams::PageSender;
use super::FinalError;
use crate::criu::capture::ImageCapture;
use crate::image::dir::classify_name;
use crate::image::FileClass;
use crate::page::{self, Digest};
use crate::sys::hold::{Held, HeldReader};
use crate::transport::msg::ImageEntry;
use crate::transport::pages::{self, ZERO_PAGE};
use crate::transport::TransportError;
use crate::PAGE_SIZE;

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
pub struct Outgoing {
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
fn digest_chunk(chunk: &[u8]) -> Vec<(Digest, u128)> {
    chunk
        .chunks(pages::CHECKSUM_LEAF_BYTES)
        .map(|p| match page::fingerprint(p) {
            _ if p.len() < PAGE_SIZE => (ZERO_PAGE, pages::leaf_hash(p)),
            Some(d) => (d, d),
            None => (ZERO_PAGE, page::zero_page_digest()),
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
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// A captured image.
enum Captured {
    Whole(Vec<u8>),
    Pages { recipe: Recipe, held: Option<Held> },
}

/// The images of a streamed dump, taken as CRIU writes them.
pub struct StreamedImages<'a> {
    out: Mutex<Outbox<'a>>,
    /// Keep the pages (by reference) to write the images out later.
    hold: bool,
    images: Mutex<BTreeMap<String, Captured>>,
}

impl<'a> StreamedImages<'a> {
    pub fn new(
        sender: &'a mut PageSender,
        known: &'a mut HashSet<Digest>,
        hold: bool,
    ) -> StreamedImages<'a> {
        StreamedImages {
            out: Mutex::new(Outbox {
                sender,
                known,
                counts: PageCounts::default(),
            }),
            hold,
            images: Mutex::new(BTreeMap::new()),
        }
    }

    /// What to send, with the files CRIU wrote to `dir` itself (its
    /// statistics) and any ferry wrote there (the GPU record), and what
    /// can write the images out here.
    pub fn finish(self, dir: &Path) -> Result<(Outgoing, PageCounts, KeptImages), FinalError> {
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
        let mut kept = KeptImages::default();
        for (name, image) in images {
            match image {
                Captured::Whole(bytes) => {
                    let sum = pages::file_checksum(&bytes);
                    outgoing
                        .entries
                        .push(entry(name.clone(), bytes.len() as u64, sum, false));
                    kept.files.push((name, Kept::Bytes(bytes.clone())));
                    outgoing.blobs.push(bytes);
                }
                Captured::Pages { recipe, held } => {
                    let size = recipe.bytes;
                    let (sum, blob) = recipe.finish();
                    outgoing.entries.push(entry(name.clone(), size, sum, true));
                    outgoing.blobs.push(blob);
                    if let Some(held) = held {
                        kept.files.push((name, Kept::Held(held)));
                    } else {
                        kept.complete = false;
                    }
                }
            }
        }
        Ok((outgoing, counts, kept))
    }

    /// Reads a pages image from CRIU's pipe in blocks, digesting and
    /// queuing each block while the next is read.
    fn capture_pages(&self, pipe: File) -> Result<(Recipe, Option<Held>), CaptureError> {
        let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(STREAM_BLOCKS);
        let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(STREAM_BLOCKS);
        for _ in 0..STREAM_BLOCKS {
            let _ = empty_tx.send(Vec::new());
        }
        std::thread::scope(|s| {
            let hold = self.hold;
            let reader = s.spawn(move || -> Result<Option<Held>, CaptureError> {
                let mut src = if hold {
                    Source::Held(HeldReader::new(pipe))
                } else {
                    Source::Plain(pipe)
                };
                // Ends when the digesting side stops taking blocks (it
                // failed): dropping the pipe then breaks CRIU's dump.
                while let Ok(mut buf) = empty_rx.recv() {
                    buf.resize(SEND_BLOCK, 0);
                    let n = read_full(&mut src, &mut buf).map_err(CaptureError::Read)?;
                    if n == 0 || full_tx.send((buf, n)).is_err() {
                        break;
                    }
                    if crate::fault::fails("migrate-capture-fails") {
                        return Err(CaptureError::Read(io::Error::other("injected fault")));
                    }
                    if n < SEND_BLOCK {
                        break;
                    }
                }
                Ok(match src {
                    Source::Held(r) => Some(r.into_held()),
                    Source::Plain(_) => None,
                })
            });
            let mut recipe = Recipe::default();
            let digested = (|| {
                for (buf, n) in full_rx.iter() {
                    let block = &buf[..n];
                    let hashed: Vec<Vec<(Digest, u128)>> =
                        block.par_chunks(HASH_CHUNK).map(digest_chunk).collect();
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
            let held = reader
                .join()
                .unwrap_or_else(|_| Err(CaptureError::Read(io::Error::other("reader panicked"))));
            digested?;
            Ok((recipe, held?))
        })
    }
}

impl ImageCapture for StreamedImages<'_> {
    type Error = CaptureError;

    fn capture(&self, name: &str, mut pipe: File) -> Result<u64, CaptureError> {
        let (image, bytes) = if classify_name(name) == FileClass::Pages {
            let (recipe, held) = self.capture_pages(pipe)?;
            let bytes = recipe.bytes;
            (Captured::Pages { recipe, held }, bytes)
        } else {
            let mut bytes = Vec::new();
            pipe.read_to_end(&mut bytes).map_err(CaptureError::Read)?;
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

enum Source {
    Plain(File),
    Held(HeldReader),
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Plain(f) => f.read(buf),
            Source::Held(r) => r.read(buf),
        }
    }
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

/// A streamed dump's images, to be written out here if needed.
pub struct KeptImages {
    files: Vec<(String, Kept)>,
    /// Whether every pages image was held (`hold` was set).
    complete: bool,
}

impl Default for KeptImages {
    fn default() -> Self {
        KeptImages {
            files: Vec::new(),
            complete: true,
        }
    }
}

enum Kept {
    Bytes(Vec<u8>),
    Held(Held),
}

impl KeptImages {
    /// Writes every image into `dir` (existing files of the same name are
    /// replaced). Once: the held pages are consumed.
    pub fn write_dir(self, dir: &Path) -> io::Result<()> {
        if !self.complete {
            return Err(io::Error::other("the dump's pages were not kept"));
        }
        fs::create_dir_all(dir)?;
        for (name, kept) in self.files {
            let path = dir.join(&name);
            match kept {
                Kept::Bytes(b) => fs::write(&path, b)?,
                Kept::Held(h) => {
                    let file = File::create(&path)?;
                    h.write_to(&file)?;
                }
            }
        }
        Ok(())
    }
}
