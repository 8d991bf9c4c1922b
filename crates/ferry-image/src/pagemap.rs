//! `pagemap-<pid>.img` / `pagemap-shmem-<id>.img`: which virtual pages a dump
//! holds and where their contents are (the pages file, the parent dump, or
//! the lazy-pages server).

use std::path::Path;

use criu_proto as pb;

use super::framing::{self, PAGEMAP};
use super::{ImageError, Problem};
use ferry_sys::PAGE_SIZE;

/// Pages are in the parent snapshot (`--prev-images-dir` / `parent_img`).
pub(crate) const PE_PARENT: u32 = 1 << 0;
/// Pages may be restored lazily (post-copy).
pub const PE_LAZY: u32 = 1 << 1;
/// Pages are stored in this dump's `pages-<id>.img`.
pub const PE_PRESENT: u32 = 1 << 2;

/// A run of consecutive pages in one pagemap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    pub vaddr: u64,
    pub nr_pages: u64,
    pub flags: u32,
}

impl PageRange {
    /// Stored in this dump's pages file.
    pub fn is_present(&self) -> bool {
        self.flags & PE_PRESENT != 0
    }
    pub fn is_in_parent(&self) -> bool {
        self.flags & PE_PARENT != 0
    }
    pub fn is_lazy(&self) -> bool {
        self.flags & PE_LAZY != 0
    }
    pub fn bytes(&self) -> u64 {
        self.nr_pages.saturating_mul(PAGE_SIZE as u64)
    }
}

/// A decoded, validated pagemap image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    /// Which `pages-<id>.img` holds the present pages.
    pub pages_id: u32,
    pub ranges: Vec<PageRange>,
}

impl Pagemap {
    /// Decodes and validates a pagemap image held in memory.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Pagemap, ImageError> {
        let body = framing::body(path, bytes, PAGEMAP)?;
        let entries = framing::entries(path, body, 8)?;
        let Some(((head_at, head), rest)) = entries.split_first() else {
            return Err(ImageError::EntryCount {
                path: path.to_path_buf(),
                message: "pagemap_head",
                found: 0,
            });
        };
        let head: pb::PagemapHead = framing::decode_at(path, *head_at, head, "pagemap_head")?;
        let mut ranges = Vec::with_capacity(rest.len());
        for (offset, payload) in rest {
            let e: pb::PagemapEntry = framing::decode_at(path, *offset, payload, "pagemap_entry")?;
            let flags = match e.flags {
                Some(f) => f,
                // Images older than the flags field: in_parent or present.
                None if e.in_parent.unwrap_or(false) => PE_PARENT,
                None => PE_PRESENT,
            };
            // CRIU 4.2+ counts pages in a 64-bit field and leaves the old
            // one 0; older CRIU fills only the old one.
            let nr_pages = match e.nr_pages64 {
                Some(n) if e.nr_pages == 0 => n,
                _ => u64::from(e.nr_pages),
            };
            ranges.push(PageRange {
                vaddr: e.vaddr,
                nr_pages,
                flags,
            });
        }
        validate(&ranges).map_err(|problem| ImageError::Inconsistent {
            path: path.to_path_buf(),
            problem,
        })?;
        Ok(Pagemap {
            pages_id: head.pages_id,
            ranges,
        })
    }

    pub fn read(path: &Path) -> Result<Pagemap, ImageError> {
        let bytes = std::fs::read(path).map_err(|e| ImageError::io(path, e))?;
        Pagemap::parse(path, &bytes)
    }

    /// Pages whose contents are in this dump's pages file.
    pub fn present_pages(&self) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.is_present())
            .map(|r| r.nr_pages)
            .sum()
    }

    /// Pages whose contents are in the parent dump.
    pub fn parent_pages(&self) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.is_in_parent())
            .map(|r| r.nr_pages)
            .sum()
    }

    /// Pages marked for lazy restore.
    pub fn lazy_pages(&self) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.is_lazy())
            .map(|r| r.nr_pages)
            .sum()
    }
}

/// `bytes`, a pagemap image, rewritten so that every range's pages are in
/// the parent dump; with the pagemap it was. None when a range's pages are
/// in no dump (lazy and not present: they are on a page server). CRIU
/// marks present pages lazy too (they could be) in every dump.
pub fn in_parent(path: &Path, bytes: &[u8]) -> Result<Option<(Pagemap, Vec<u8>)>, ImageError> {
    let pagemap = Pagemap::parse(path, bytes)?;
    if pagemap
        .ranges
        .iter()
        .any(|r| !r.is_present() && !r.is_in_parent())
    {
        return Ok(None);
    }
    let (entries, mut out) = rewrite(path, bytes)?;
    let mut push = |payload: &[u8]| push_entry(&mut out, payload);
    for (i, (offset, payload)) in entries.into_iter().enumerate() {
        if i == 0 {
            push(payload);
            continue;
        }
        let mut e: pb::PagemapEntry = framing::decode_at(path, offset, payload, "pagemap_entry")?;
        e.flags = Some(PE_PARENT);
        e.in_parent = None;
        push(&prost::Message::encode_to_vec(&e));
    }
    Ok(Some((pagemap, out)))
}

/// `bytes`, a pagemap image, with the present pages for which
/// `leave_out(vaddr, index)` holds taken out (`index`: the page's place in
/// the pages image); a range is split around the pages taken out of it,
/// and one left with none is dropped. A run of such pages inside a range
/// (pages kept on both sides) is taken out only if it is at least
/// `min_inner_run` pages long: each such run splits its range in two, and
/// a reader pays for every range. Ranges in the parent or only lazy keep
/// their place. Returns the new image and, per page of the pages image,
/// whether it stays in. It takes a flag per present page: callers bound
/// that (a restore by the length of the pages image).
pub fn without_pages(
    path: &Path,
    bytes: &[u8],
    min_inner_run: usize,
    mut leave_out: impl FnMut(u64, usize) -> bool,
) -> Result<(Vec<u8>, Vec<bool>), ImageError> {
    let pagemap = Pagemap::parse(path, bytes)?;
    let (entries, mut out) = rewrite(path, bytes)?;
    let mut push = |payload: &[u8]| push_entry(&mut out, payload);
    let mut kept = Vec::with_capacity(pagemap.present_pages() as usize);
    for (i, (offset, payload)) in entries.into_iter().enumerate() {
        // The head, then one entry per range (as parsed above).
        let range = match i.checked_sub(1) {
            Some(r) if pagemap.ranges[r].is_present() => pagemap.ranges[r],
            _ => {
                push(payload);
                continue;
            }
        };
        let e: pb::PagemapEntry = framing::decode_at(path, offset, payload, "pagemap_entry")?;
        let wide = e.nr_pages == 0 && e.nr_pages64.is_some();
        let first = kept.len();
        for k in 0..range.nr_pages {
            let vaddr = range.vaddr + k * PAGE_SIZE as u64;
            kept.push(!leave_out(vaddr, first + k as usize));
        }
        keep_short_inner_runs(&mut kept[first..], min_inner_run);
        let mut k = 0;
        while k < range.nr_pages as usize {
            if !kept[first + k] {
                k += 1;
                continue;
            }
            let run = kept[first + k..first + range.nr_pages as usize]
                .iter()
                .take_while(|&&keep| keep)
                .count();
            let mut piece = e;
            piece.vaddr = range.vaddr + (k * PAGE_SIZE) as u64;
            if wide {
                piece.nr_pages64 = Some(run as u64);
            } else {
                piece.nr_pages = run as u32;
            }
            push(&prost::Message::encode_to_vec(&piece));
            k += run;
        }
    }
    Ok((out, kept))
}

/// Puts back (marks kept) every run of pages left out of `range` that has
/// pages kept on both sides and is shorter than `min_run`.
fn keep_short_inner_runs(range: &mut [bool], min_run: usize) {
    let Some(first_kept) = range.iter().position(|&k| k) else {
        return;
    };
    let mut k = first_kept;
    while k < range.len() {
        if range[k] {
            k += 1;
            continue;
        }
        let run = range[k..].iter().take_while(|&&keep| !keep).count();
        if k + run < range.len() && run < min_run {
            range[k..k + run].fill(true);
        }
        k += run;
    }
}

/// An image's entries: (offset, payload), in order.
type Entries<'b> = Vec<(usize, &'b [u8])>;

/// For a rewrite of a pagemap image: its entries (the head first) and a
/// buffer holding its magic, to append entries to with [`push_entry`].
fn rewrite<'b>(path: &Path, bytes: &'b [u8]) -> Result<(Entries<'b>, Vec<u8>), ImageError> {
    let header = 8;
    let entries = framing::entries(path, &bytes[header..], header)?;
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..header]);
    Ok((entries, out))
}

/// Appends an entry as CRIU frames it: its length (u32, little-endian),
/// then the message.
fn push_entry(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

fn validate(ranges: &[PageRange]) -> Result<(), Problem> {
    let mut prev_end = 0u64;
    for (index, r) in ranges.iter().enumerate() {
        let vaddr = r.vaddr;
        if vaddr % PAGE_SIZE as u64 != 0 {
            return Err(Problem::UnalignedRange { index, vaddr });
        }
        if r.nr_pages == 0 {
            return Err(Problem::EmptyRange { index, vaddr });
        }
        let end = r
            .nr_pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|b| vaddr.checked_add(b))
            .ok_or(Problem::RangeOverflow { index, vaddr })?;
        if index > 0 && vaddr < prev_end {
            return Err(Problem::UnorderedRange { index, vaddr });
        }
        prev_end = end;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use prost::Message;
    use std::path::PathBuf;

    /// Builds a pagemap image the way CRIU frames one.
    pub(crate) fn image(pages_id: u32, ranges: &[(u64, u32, u32)]) -> Vec<u8> {
        image_with(pages_id, ranges, false)
    }

    /// As CRIU 4.2 writes it (`wide`: count in field 5, field 2 zero) or as
    /// older CRIU does.
    pub(crate) fn image_with(pages_id: u32, ranges: &[(u64, u32, u32)], wide: bool) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&framing::IMG_COMMON_MAGIC.to_le_bytes());
        out.extend_from_slice(&framing::PAGEMAP_MAGIC.to_le_bytes());
        let mut push = |payload: Vec<u8>| {
            out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            out.extend_from_slice(&payload);
        };
        push(pb::PagemapHead { pages_id }.encode_to_vec());
        for &(vaddr, nr_pages, flags) in ranges {
            push(
                pb::PagemapEntry {
                    vaddr,
                    nr_pages: if wide { 0 } else { nr_pages },
                    in_parent: None,
                    flags: Some(flags),
                    nr_pages64: wide.then_some(u64::from(nr_pages)),
                }
                .encode_to_vec(),
            );
        }
        out
    }

    #[test]
    fn decodes_ranges_and_counts() {
        let p = PathBuf::from("pagemap-1.img");
        let bytes = image(
            3,
            &[
                (0x1000, 4, PE_PRESENT),
                (0x10000, 2, PE_PARENT),
                (0x20000, 8, PE_PRESENT | PE_LAZY),
            ],
        );
        let pm = Pagemap::parse(&p, &bytes).unwrap();
        assert_eq!(pm.pages_id, 3);
        assert_eq!(pm.present_pages(), 12);
        assert_eq!(pm.parent_pages(), 2);
        assert_eq!(pm.lazy_pages(), 8);
    }

    #[test]
    fn reads_criu_4_2_wide_counts() {
        let p = PathBuf::from("pagemap-1.img");
        let pm = Pagemap::parse(&p, &image_with(1, &[(0x1000, 7, PE_PRESENT)], true)).unwrap();
        assert_eq!(pm.ranges[0].nr_pages, 7);
        assert_eq!(pm.present_pages(), 7);
    }

    #[test]
    fn refuses_unaligned_and_overlapping() {
        let p = PathBuf::from("pagemap-1.img");
        let err = Pagemap::parse(&p, &image(1, &[(0x1001, 1, PE_PRESENT)])).unwrap_err();
        assert!(err.to_string().contains("not page aligned"), "{err}");
        let err = Pagemap::parse(
            &p,
            &image(1, &[(0x1000, 4, PE_PRESENT), (0x2000, 1, PE_PRESENT)]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");
        let err = Pagemap::parse(&p, &image(1, &[(0x1000, 0, PE_PRESENT)])).unwrap_err();
        assert!(err.to_string().contains("no pages"), "{err}");
    }

    #[test]
    fn refuses_missing_head() {
        let p = PathBuf::from("pagemap-1.img");
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&framing::IMG_COMMON_MAGIC.to_le_bytes());
        bytes.extend_from_slice(&framing::PAGEMAP_MAGIC.to_le_bytes());
        let err = Pagemap::parse(&p, &bytes).unwrap_err();
        assert!(
            matches!(err, ImageError::EntryCount { found: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn rewrites_every_range_into_the_parent_and_keeps_the_counts() {
        let p = PathBuf::from("pagemap-1.img");
        for wide in [false, true] {
            let bytes = image_with(
                5,
                &[
                    (0x1000, 4, PE_PRESENT),
                    (0x10000, 2, PE_PARENT),
                    (0x20000, 9, PE_PRESENT | PE_LAZY),
                ],
                wide,
            );
            let (before, out) = in_parent(&p, &bytes).unwrap().unwrap();
            assert_eq!(before.present_pages(), 13);
            let after = Pagemap::parse(&p, &out).unwrap();
            assert_eq!(after.pages_id, 5);
            assert_eq!(after.present_pages(), 0);
            assert_eq!(after.parent_pages(), 15);
            let spans = |m: &Pagemap| {
                m.ranges
                    .iter()
                    .map(|r| (r.vaddr, r.nr_pages))
                    .collect::<Vec<_>>()
            };
            assert_eq!(spans(&after), spans(&before));
        }
    }

    #[test]
    fn leaves_out_pages_and_splits_ranges_around_them() {
        let p = PathBuf::from("pagemap-1.img");
        let flags = PE_PRESENT | PE_LAZY;
        for wide in [false, true] {
            let bytes = image_with(
                7,
                &[
                    (0x1000, 4, flags),
                    (0x10000, 2, PE_PARENT),
                    (0x20000, 3, PE_PRESENT),
                ],
                wide,
            );
            let mut asked = Vec::new();
            let (out, kept) = without_pages(&p, &bytes, 1, |vaddr, i| {
                asked.push((vaddr, i));
                [1, 2, 4].contains(&i)
            })
            .unwrap();
            assert_eq!(
                asked,
                [
                    (0x1000, 0),
                    (0x2000, 1),
                    (0x3000, 2),
                    (0x4000, 3),
                    (0x20000, 4),
                    (0x21000, 5),
                    (0x22000, 6)
                ]
            );
            assert_eq!(kept, [true, false, false, true, false, true, true]);
            let after = Pagemap::parse(&p, &out).unwrap();
            assert_eq!(after.pages_id, 7);
            let ranges: Vec<_> = after
                .ranges
                .iter()
                .map(|r| (r.vaddr, r.nr_pages, r.flags))
                .collect();
            assert_eq!(
                ranges,
                [
                    (0x1000, 1, flags),
                    (0x4000, 1, flags),
                    (0x10000, 2, PE_PARENT),
                    (0x21000, 2, PE_PRESENT)
                ]
            );
            // Counted in the field the image used.
            let again = without_pages(&p, &out, 1, |_, _| false).unwrap().0;
            assert_eq!(again, out);
        }
    }

    #[test]
    fn a_range_left_with_no_pages_is_dropped() {
        let p = PathBuf::from("pagemap-1.img");
        let bytes = image(2, &[(0x1000, 2, PE_PRESENT), (0x8000, 1, PE_PRESENT)]);
        let (out, kept) = without_pages(&p, &bytes, 1, |vaddr, _| vaddr < 0x8000).unwrap();
        assert_eq!(kept, [false, false, true]);
        let after = Pagemap::parse(&p, &out).unwrap();
        assert_eq!(after.ranges.len(), 1);
        assert_eq!((after.ranges[0].vaddr, after.present_pages()), (0x8000, 1));
    }

    #[test]
    fn a_lazy_pagemap_is_not_rewritten() {
        let p = PathBuf::from("pagemap-1.img");
        let bytes = image(1, &[(0x1000, 4, PE_PRESENT), (0x20000, 8, PE_LAZY)]);
        assert!(in_parent(&p, &bytes).unwrap().is_none());
    }

    /// Runs of pages to leave out inside a range are left out only when at
    /// least `min_inner_run` long; runs at either end of a range, and a
    /// whole range, always go.
    #[test]
    fn short_runs_inside_a_range_stay() {
        let p = PathBuf::from("pagemap-1.img");
        // Pages left out: 0-1 (start), 4 (1), 7-8 (2), 11-13 (3), 16-19
        // (4), 22-23 (end); and the whole second range.
        let out_of_first = [0, 1, 4, 7, 8, 11, 12, 13, 16, 17, 18, 19, 22, 23];
        let bytes = image(3, &[(0x0, 24, PE_PRESENT), (0x100000, 3, PE_PRESENT)]);
        let spans = |out: &[u8]| {
            Pagemap::parse(&p, out)
                .unwrap()
                .ranges
                .iter()
                .map(|r| ((r.vaddr / 0x1000) as usize, r.nr_pages as usize))
                .collect::<Vec<_>>()
        };
        let leave = |vaddr: u64, i: usize| vaddr >= 0x100000 || out_of_first.contains(&i);
        let (out, kept) = without_pages(&p, &bytes, 1, leave).unwrap();
        assert_eq!(spans(&out), [(2, 2), (5, 2), (9, 2), (14, 2), (20, 2)]);
        assert_eq!(kept.iter().filter(|k| !**k).count(), 17);
        let (out, kept) = without_pages(&p, &bytes, 3, leave).unwrap();
        assert_eq!(spans(&out), [(2, 9), (14, 2), (20, 2)]);
        assert_eq!(kept.iter().filter(|k| !**k).count(), 14);
        let (out, _) = without_pages(&p, &bytes, 5, leave).unwrap();
        assert_eq!(spans(&out), [(2, 20)]);
        // A range every page of which goes is dropped whatever the minimum.
        let (out, kept) = without_pages(&p, &bytes, usize::MAX, |_, _| true).unwrap();
        assert!(spans(&out).is_empty());
        assert!(kept.iter().all(|k| !k));
    }
}
