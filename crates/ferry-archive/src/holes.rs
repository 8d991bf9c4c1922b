//! Zero pages a streamed restore need not write.
//!
//! CRIU writes every page a pagemap lists into the restored memory, zero
//! pages included: a zero page the application once wrote costs a restore
//! a fresh page of memory, a fault and a 4 KiB copy, as any other page. An
//! archive knows its zero pages (they are recorded, not stored), so a
//! restore from it can leave out of the pagemap CRIU reads the zero pages
//! of plain private anonymous memory
//! ([`ferry_image::mm::Vma::is_plain_private_anonymous`]): there a page
//! the pagemap does not list reads as zero after the restore, as it did
//! before the dump. The restored tree holds the same bytes; it just does
//! not hold those pages resident until it touches them again.
//!
//! Zero pages anywhere else (a private file mapping, shared memory, a
//! special area) are written as they are, since leaving them out would show
//! whatever lies beneath. So is every page of a process whose images
//! cannot be matched up (no memory map, a pages image of another length):
//! those the restore gets exactly as dumped, and CRIU judges them.

use std::collections::HashMap;
use std::path::Path;

use super::chain::Chain;
use super::stream::PageSource;
use super::ArchiveError;
use ferry_image::mm::{MemoryMap, Vma};
use ferry_image::pagemap;

/// Whether a streamed restore writes the zero pages of plain private
/// anonymous memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ZeroPages {
    /// Left out of the pagemap where that is cheaper for CRIU than
    /// writing them: a run of them at either end of a page range, or one
    /// of at least [`MIN_INNER_RUN`] pages inside it. They read as zero,
    /// unwritten.
    #[default]
    LeaveOut,
    /// Every one left out, however short its run (to measure what the
    /// rule of [`ZeroPages::LeaveOut`] saves).
    LeaveOutEvery,
    /// Written, as a restore from the images directory does (for an
    /// application that wants them resident).
    Write,
}

/// Shortest run of zero pages left out inside a page range. Each such run
/// splits the range in two, and CRIU pays for every range it reads (a
/// read from the image pipe, and its bookkeeping) about as much as for
/// writing this many zero pages: shorter runs cost less written than
/// left out. The figure comes from `ferry bench compress`
/// (docs/benchmarks.md, "Zero pages left out of a restore").
pub const MIN_INNER_RUN: usize = 4;

impl ZeroPages {
    /// The shortest run of zero pages left out inside a page range, if any
    /// are left out.
    fn min_inner_run(self) -> Option<usize> {
        match self {
            ZeroPages::LeaveOut => Some(MIN_INNER_RUN),
            ZeroPages::LeaveOutEvery => Some(1),
            ZeroPages::Write => None,
        }
    }
}

/// What a restore leaves out, by file of the chain's head.
#[derive(Debug, Default)]
pub(crate) struct Holes {
    /// The rewritten pagemap images.
    pub pagemaps: HashMap<usize, Vec<u8>>,
    /// Of each pages image with pages left out: whether each page stays.
    pub kept: HashMap<usize, Vec<bool>>,
    /// Pages left out in all.
    pub pages: u64,
}

/// Finds the zero pages of plain private anonymous memory in the head's
/// pages images (`layouts`: where each page comes from, `None` for zero)
/// that `policy` leaves out.
pub(crate) fn plan(
    chain: &Chain,
    layouts: &[Option<Vec<PageSource>>],
    policy: ZeroPages,
) -> Result<Holes, ArchiveError> {
    let head = chain.head();
    let mut holes = Holes::default();
    let Some(min_inner_run) = policy.min_inner_run() else {
        return Ok(holes);
    };
    for (fi, f) in head.index().files.iter().enumerate() {
        let Some(pid) = f
            .name
            .strip_prefix("pagemap-")
            .and_then(|s| s.strip_suffix(".img"))
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Some(mm_fi) = head.file_index(&format!("mm-{pid}.img")) else {
            continue;
        };
        let (pm_bytes, mm_bytes) = (head.file_data(fi)?, head.file_data(mm_fi)?);
        let pm_path = Path::new(&f.name);
        let mm_path = Path::new(&head.index().files[mm_fi].name);
        let (Ok(pm), Ok(mm)) = (
            pagemap::Pagemap::parse(pm_path, &pm_bytes),
            MemoryMap::parse(mm_path, &mm_bytes),
        ) else {
            tracing::debug!(pid, "images do not parse: every zero page is written");
            continue;
        };
        let pages_fi = head.file_index(&format!("pages-{}.img", pm.pages_id));
        let Some((pages_fi, Some(pages))) = pages_fi.map(|i| (i, &layouts[i])) else {
            continue;
        };
        if pages.len() as u64 != pm.present_pages() || holes.kept.contains_key(&pages_fi) {
            tracing::debug!(
                pid,
                "pagemap and pages image disagree: every zero page is written"
            );
            continue;
        }
        let zero_in_plain = |vaddr: u64, i: usize| {
            pages[i].is_none()
                && mm
                    .vma_at(vaddr)
                    .is_some_and(Vma::is_plain_private_anonymous)
        };
        let Ok((rewritten, kept)) =
            pagemap::without_pages(pm_path, &pm_bytes, min_inner_run, zero_in_plain)
        else {
            continue;
        };
        let left_out = kept.iter().filter(|&&k| !k).count() as u64;
        if left_out > 0 {
            holes.pages += left_out;
            holes.pagemaps.insert(fi, rewritten);
            holes.kept.insert(pages_fi, kept);
        }
    }
    Ok(holes)
}
