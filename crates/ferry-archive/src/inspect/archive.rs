//! The dump-size report of a ferry archive: the same report as for an
//! images directory (its metadata images are read from the archive, its
//! page counts come from the archive's page layout, without decompressing
//! a page), plus what the archive adds: stored vs raw bytes per file, pages
//! elided, deduplicated or left to the parent, ratio and pack time.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Serialize;

use super::{build, DumpReport, InspectError, PageCounter};
use crate::format::{SOURCE_GEN_BASE, VERSION_MAJOR};
use crate::{id_hex, Archive};
use ferry_image::{dir::classify_name, ImageFile, ImagesDir, Pagemap};
use ferry_sys::PAGE_SIZE;

/// What an archive adds to the dump report.
#[derive(Debug, Clone, Serialize)]
pub struct ArchiveReport {
    pub path: String,
    pub bytes: u64,
    pub id: String,
    pub format: String,
    pub ferry_version: String,
    pub created_unix_ms: u64,
    pub source: String,
    /// Id and recorded path of the direct parent, for incremental archives.
    pub parent_id: Option<String>,
    pub parent_path: Option<String>,
    /// Ancestors the archive depends on (0 for a full archive).
    pub ancestors: usize,
    pub pack_wall_us: Option<u64>,
    pub pack_level: Option<i32>,
    pub pack_threads: Option<u32>,
    pub files: Vec<ArchiveFileReport>,
    pub totals: ArchiveTotals,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArchiveFileReport {
    pub name: String,
    pub raw_bytes: u64,
    /// Bytes of this file's chunks in the archive (headers included).
    pub stored_bytes: u64,
    /// Pages images: how the pages are kept.
    pub pages: Option<PageKinds>,
}

/// How the pages of a pages image are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PageKinds {
    pub total: u64,
    /// All zero: recorded, not stored.
    pub zero: u64,
    /// Same content as an earlier page of the dump: stored once.
    pub duplicate: u64,
    /// Found in an ancestor archive: not stored here.
    pub in_parent: u64,
    /// Stored in this archive.
    pub stored: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ArchiveTotals {
    pub raw_bytes: u64,
    pub archive_bytes: u64,
    /// raw / archive.
    pub ratio: f64,
    pub pages: PageKinds,
    pub bytes_saved_zero: u64,
    pub bytes_saved_dedup: u64,
    pub bytes_saved_by_parent: u64,
    /// Raw pages bytes over pack wall time, MB/s.
    pub pack_throughput_mb_s: Option<f64>,
}

/// Page counts from the archive's layout: a page is a duplicate when its
/// (generation, slot) was already referenced earlier in the dump, the
/// same rule the directory scan applies to contents.
struct LayoutCounter<'a> {
    archive: &'a Archive,
    seen: HashSet<(u32, u32)>,
}

impl PageCounter for LayoutCounter<'_> {
    fn count(&mut self, _: &ImagesDir, pm: &Pagemap) -> Result<(u64, u64), InspectError> {
        let name = format!("pages-{}.img", pm.pages_id);
        let Some(fi) = self.archive.file_index(&name) else {
            return Ok((0, 0));
        };
        let f = &self.archive.index().files[fi];
        let (mut zero, mut dup) = (0, 0);
        for r in 0..f.run_sources.len() {
            let (src, len, slot) = (f.run_sources[r], f.run_lens[r], f.run_slots[r]);
            if src < SOURCE_GEN_BASE {
                zero += u64::from(len);
                continue;
            }
            for k in 0..len {
                if !self.seen.insert((src, slot + k)) {
                    dup += 1;
                }
            }
        }
        Ok((zero, dup))
    }

    fn unique(&self) -> u64 {
        self.seen.len() as u64
    }
}

pub(crate) fn inspect_archive(path: &Path) -> Result<DumpReport, InspectError> {
    let archive = Archive::open(path)?;
    let index = archive.index();
    let mut listing = Vec::with_capacity(index.files.len());
    let mut contents = BTreeMap::new();
    for (fi, f) in index.files.iter().enumerate() {
        listing.push(ImageFile {
            name: f.name.clone(),
            bytes: f.size,
            class: classify_name(&f.name),
        });
        if !f.pages {
            contents.insert(f.name.clone(), archive.file_data(fi)?);
        }
    }
    let dir = ImagesDir::in_memory(path.to_path_buf(), listing, contents)?;
    let mut counter = LayoutCounter {
        archive: &archive,
        seen: HashSet::new(),
    };
    let mut report = build(&dir, &mut counter)?;
    report.images_dir = format!("{} (archive)", path.display());
    report.archive = Some(archive_report(&archive));
    report.gpu = archive
        .index()
        .gpu
        .as_ref()
        .map(TryInto::try_into)
        .transpose()?;
    Ok(report)
}

fn archive_report(archive: &Archive) -> ArchiveReport {
    let index = archive.index();
    let mut stored: Vec<u64> = vec![0; index.files.len()];
    for c in &index.chunks {
        if let Some(s) = stored.get_mut(c.file as usize) {
            *s += u64::from(c.stored_len) + crate::format::CHUNK_HEADER_LEN as u64;
        }
    }
    let mut seen = HashSet::new();
    let mut totals = ArchiveTotals::default();
    let mut files = Vec::with_capacity(index.files.len());
    for (fi, f) in index.files.iter().enumerate() {
        let pages = f.pages.then(|| {
            let mut k = PageKinds::default();
            for r in 0..f.run_sources.len() {
                let (src, len, slot) = (f.run_sources[r], f.run_lens[r], f.run_slots[r]);
                k.total += u64::from(len);
                if src < SOURCE_GEN_BASE {
                    k.zero += u64::from(len);
                    continue;
                }
                for j in 0..len {
                    if !seen.insert((src, slot + j)) {
                        k.duplicate += 1;
                    } else if src == SOURCE_GEN_BASE {
                        k.stored += 1;
                    } else {
                        k.in_parent += 1;
                    }
                }
            }
            k
        });
        if let Some(k) = pages {
            totals.pages.total += k.total;
            totals.pages.zero += k.zero;
            totals.pages.duplicate += k.duplicate;
            totals.pages.in_parent += k.in_parent;
            totals.pages.stored += k.stored;
        }
        totals.raw_bytes += f.size;
        files.push(ArchiveFileReport {
            name: f.name.clone(),
            raw_bytes: f.size,
            stored_bytes: stored[fi],
            pages,
        });
    }
    let page = PAGE_SIZE as u64;
    totals.archive_bytes = archive.len();
    totals.ratio = totals.raw_bytes as f64 / totals.archive_bytes.max(1) as f64;
    totals.bytes_saved_zero = totals.pages.zero * page;
    totals.bytes_saved_dedup = totals.pages.duplicate * page;
    totals.bytes_saved_by_parent = totals.pages.in_parent * page;
    let stats = index.stats.as_ref();
    totals.pack_throughput_mb_s = stats
        .filter(|s| s.wall_us > 0)
        .map(|s| s.raw_bytes as f64 / s.wall_us as f64);
    ArchiveReport {
        path: archive.path().display().to_string(),
        bytes: archive.len(),
        id: id_hex(&archive.id()),
        format: format!(
            "{}.{}",
            archive.header().major.min(VERSION_MAJOR),
            archive.header().minor
        ),
        ferry_version: index.ferry_version.clone(),
        created_unix_ms: index.created_unix_ms,
        source: index.source.clone(),
        parent_id: index.parent.as_ref().map(|p| id_hex(&p.id)),
        parent_path: index.parent.as_ref().map(|p| p.path.clone()),
        ancestors: index.ancestry.len(),
        pack_wall_us: stats.map(|s| s.wall_us),
        pack_level: stats.map(|s| s.level),
        pack_threads: stats.map(|s| s.threads),
        files,
        totals,
    }
}
