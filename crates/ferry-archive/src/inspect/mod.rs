//! `ferry inspect`: what a dump is made of, for people measuring dump size.
//!
//! Built from a validated [`ImagesDir`]: the process tree with commands, per
//! process the pagemap entries and the pages dumped, how many of them are all
//! zero and how many repeat a page seen earlier in the dump (the savings an
//! archive with zero elision and dedup gets), per file sizes, totals split
//! into metadata and pages, and CRIU's own dump statistics. Page contents are
//! scanned in parallel (rayon) from read-only mappings of the pages files.

#![forbid(unsafe_code)]

mod archive;
mod render;
mod scan;

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use ferry_image::{DumpStats, FileClass, ImageError, ImageFile, ImagesDir, Pagemap, RestoreStats};
use ferry_sys::PAGE_SIZE;

pub use archive::{ArchiveFileReport, ArchiveReport, ArchiveTotals};
pub use render::render_human;
pub use scan::PageScan;

/// Version of the JSON layout of [`DumpReport`]; bumped on any incompatible change.
pub const REPORT_FORMAT_VERSION: u32 = 1;

/// The dump-size report of one images directory.
#[derive(Debug, Clone, Serialize)]
pub struct DumpReport {
    pub format_version: u32,
    pub images_dir: String,
    pub image_version: u32,
    pub arch: Option<String>,
    pub processes: Vec<ProcessReport>,
    pub shmem: Vec<ShmemReport>,
    pub files: Vec<ImageFile>,
    pub totals: Totals,
    pub criu_dump_stats: Option<DumpStats>,
    pub criu_restore_stats: Option<RestoreStats>,
    /// Present when the dump was read from a ferry archive.
    pub archive: Option<ArchiveReport>,
    /// The GPU state the checkpoint carries, if any.
    pub gpu: Option<ferry_image::gpu_record::GpuRecord>,
}

/// One dumped process.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessReport {
    pub pid: u32,
    pub ppid: u32,
    pub pgid: u32,
    pub sid: u32,
    pub comm: String,
    pub threads: usize,
    /// VMAs and the bytes of address space they span (all / anonymous).
    pub vmas: usize,
    pub mapped_bytes: u64,
    pub anon_mapped_bytes: u64,
    pub pages: PageStats,
}

/// One shared-memory object's pages.
#[derive(Debug, Clone, Serialize)]
pub struct ShmemReport {
    pub file: String,
    pub pages: PageStats,
}

/// Page counts of one pagemap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PageStats {
    pub pagemap_entries: usize,
    /// Pages stored in this dump's pages file.
    pub dumped: u64,
    /// Pages referred to the parent dump.
    pub in_parent: u64,
    /// Pages marked lazy.
    pub lazy: u64,
    /// Dumped pages whose 4096 bytes are all zero.
    pub zero: u64,
    /// Dumped non-zero pages whose contents already appeared earlier in the dump.
    pub duplicate: u64,
    /// Bytes of dumped pages.
    pub bytes: u64,
}

/// Totals over the whole directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub files: usize,
    pub bytes: u64,
    pub pages_bytes: u64,
    pub metadata_bytes: u64,
    pub stats_bytes: u64,
    pub log_bytes: u64,
    pub other_bytes: u64,
    pub pages: u64,
    pub zero_pages: u64,
    pub duplicate_pages: u64,
    /// Distinct non-zero page contents: what a zero-eliding, deduplicating
    /// store has to keep.
    pub unique_pages: u64,
}

/// Errors building a report.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Archive(#[from] crate::ArchiveError),
    #[error(transparent)]
    GpuRecord(#[from] ferry_image::gpu_record::GpuRecordError),
}

/// Counts, for one pagemap's pages, how many are zero and how many repeat
/// a page seen earlier in the dump.
pub(crate) trait PageCounter {
    fn count(&mut self, dir: &ImagesDir, pm: &Pagemap) -> Result<(u64, u64), InspectError>;
    /// Distinct non-zero contents seen so far.
    fn unique(&self) -> u64;
}

/// Builds the report of `path`: an images directory, or a ferry archive.
pub fn inspect(path: &Path) -> Result<DumpReport, InspectError> {
    if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return archive::inspect_archive(path);
    }
    let dir = ImagesDir::open(path)?;
    let mut report = build(&dir, &mut PageScan::default())?;
    report.gpu = ferry_image::gpu_record::GpuRecord::read(path)?;
    Ok(report)
}

impl PageCounter for PageScan {
    fn count(&mut self, dir: &ImagesDir, pm: &Pagemap) -> Result<(u64, u64), InspectError> {
        Ok(self.scan_file(&dir.pages_file(pm.pages_id), pm.present_pages())?)
    }
    fn unique(&self) -> u64 {
        PageScan::unique(self)
    }
}

/// The report of validated images, with page contents counted by `scan`.
pub(crate) fn build(
    dir: &ImagesDir,
    scan: &mut dyn PageCounter,
) -> Result<DumpReport, InspectError> {
    let v = dir.validate()?;
    let mut processes = Vec::with_capacity(v.tree.len());
    for p in &v.tree {
        let core = v.cores.get(&p.pid);
        let (vmas, mapped, anon) = match core {
            Some(c) if c.has_memory() => {
                let mm = dir.mm(p.pid)?;
                let (mapped, anon) = mm.mapped_bytes();
                (mm.vmas.len(), mapped, anon)
            }
            _ => (0, 0, 0),
        };
        let pages = match v.pagemaps.get(&p.pid) {
            Some(pm) => scan_pagemap(dir, pm, scan)?,
            None => PageStats::default(),
        };
        processes.push(ProcessReport {
            pid: p.pid,
            ppid: p.ppid,
            pgid: p.pgid,
            sid: p.sid,
            comm: core.map(|c| c.comm.clone()).unwrap_or_default(),
            threads: p.threads.len().max(1),
            vmas,
            mapped_bytes: mapped,
            anon_mapped_bytes: anon,
            pages,
        });
    }
    let mut shmem = Vec::new();
    for (file, pm) in &v.shmem_pagemaps {
        shmem.push(ShmemReport {
            file: file.clone(),
            pages: scan_pagemap(dir, pm, scan)?,
        });
    }
    let totals = totals(dir.files(), &processes, &shmem, scan.unique());
    Ok(DumpReport {
        format_version: REPORT_FORMAT_VERSION,
        images_dir: dir.path().display().to_string(),
        image_version: v.inventory.img_version,
        arch: v
            .tree
            .first()
            .and_then(|p| v.cores.get(&p.pid))
            .map(|c| c.arch.to_string()),
        processes,
        shmem,
        files: dir.files().to_vec(),
        totals,
        criu_dump_stats: dir.dump_stats()?,
        criu_restore_stats: dir.restore_stats()?,
        archive: None,
        gpu: None,
    })
}

fn scan_pagemap(
    dir: &ImagesDir,
    pm: &Pagemap,
    scan: &mut dyn PageCounter,
) -> Result<PageStats, InspectError> {
    let dumped = pm.present_pages();
    let (zero, duplicate) = scan.count(dir, pm)?;
    Ok(PageStats {
        pagemap_entries: pm.ranges.len(),
        dumped,
        in_parent: pm.parent_pages(),
        lazy: pm.lazy_pages(),
        zero,
        duplicate,
        bytes: dumped * PAGE_SIZE as u64,
    })
}

fn totals(
    files: &[ImageFile],
    processes: &[ProcessReport],
    shmem: &[ShmemReport],
    unique_pages: u64,
) -> Totals {
    let mut by_class: BTreeMap<FileClass, u64> = BTreeMap::new();
    for f in files {
        *by_class.entry(f.class).or_default() += f.bytes;
    }
    let class = |c| by_class.get(&c).copied().unwrap_or(0);
    let pages = processes
        .iter()
        .map(|p| &p.pages)
        .chain(shmem.iter().map(|s| &s.pages));
    let (mut n, mut zero, mut dup) = (0, 0, 0);
    for p in pages {
        n += p.dumped;
        zero += p.zero;
        dup += p.duplicate;
    }
    Totals {
        files: files.len(),
        bytes: files.iter().map(|f| f.bytes).sum(),
        pages_bytes: class(FileClass::Pages),
        metadata_bytes: class(FileClass::Metadata),
        stats_bytes: class(FileClass::Stats),
        log_bytes: class(FileClass::Log),
        other_bytes: class(FileClass::Other),
        pages: n,
        zero_pages: zero,
        duplicate_pages: dup,
        unique_pages,
    }
}
