//! One pass over a running tree's memory.

use std::time::{Duration, Instant};

use super::{dumpable_regions, LiveError, Region, READ_CHUNK_PAGES};
use ferry_image::page::{self, Digest};
use ferry_sys::procmem::{self, Pagemap, PM_FILE, PM_PFN_MASK, PM_PRESENT, PM_SWAPPED};
use ferry_sys::PAGE_SIZE;
use rayon::prelude::*;

/// Runs of at least this many pages are digested in parallel.
const PARALLEL_PAGES: usize = 32;

/// What one pass saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScanStats {
    /// Pages of the dumpable regions (address space).
    pub region_pages: u64,
    /// Pages holding data (present or swapped), i.e. read.
    pub populated_pages: u64,
    pub zero_pages: u64,
    /// Non-zero pages whose digest `wanted` declined (already held).
    pub known_pages: u64,
    /// Pages handed to the sink.
    pub new_pages: u64,
    #[serde(skip)]
    pub elapsed: Duration,
}

/// Receives each wanted page: `(digest, 4 KiB of content)`.
pub type PageSink<'a, E> = dyn FnMut(Digest, &[u8]) -> Result<(), E> + 'a;

/// Receives, in order, every page CRIU would write to a process's pages
/// image: `(pid, address, digest)`, the digest `None` for a zero page.
pub type LayoutSink<'a> = dyn FnMut(i32, u64, Option<Digest>) + 'a;

/// Whether CRIU would dump the page with pagemap entry `e` of `region`
/// (criu/mem.c: present or swapped; of a private file mapping only pages
/// copied on write; not the kernel's shared zero page).
fn dumpable(region: &Region, e: u64, zero_pfn: Option<u64>) -> bool {
    if region.vdso {
        return true;
    }
    let present = e & PM_PRESENT != 0;
    if !present && e & PM_SWAPPED == 0 {
        return false;
    }
    if !region.private {
        return true;
    }
    if region.file_backed && e & PM_FILE != 0 {
        return false;
    }
    !(present && zero_pfn.is_some_and(|z| e & PM_PFN_MASK == z))
}

/// Reads every populated page of every process in `pids`; for each non-zero
/// page whose digest `wanted` accepts, calls `sink(digest, page)`.
/// Processes or regions that vanish meanwhile are skipped.
pub fn scan_tree<E: From<LiveError>>(
    pids: &[i32],
    key: &page::PageKey,
    wanted: &mut dyn FnMut(Digest) -> bool,
    sink: &mut PageSink<'_, E>,
    layout: &mut LayoutSink<'_>,
) -> Result<ScanStats, E> {
    let start = Instant::now();
    let mut stats = ScanStats::default();
    let mut buf = vec![0u8; READ_CHUNK_PAGES * PAGE_SIZE];
    let mut entries = Vec::new();
    let mut populated = Vec::new();
    let zero_pfn = procmem::zero_page_pfn();
    let mut fps: Vec<Option<Digest>> = Vec::with_capacity(READ_CHUNK_PAGES);
    for &pid in pids {
        let regions = match dumpable_regions(pid) {
            Ok(r) => r,
            Err(_) if !ferry_image::process::is_alive(pid) => continue,
            Err(e) => return Err(e.into()),
        };
        // A process of the tree may exit at any moment (a shell's short
        // children): one gone since it was listed has nothing to scan.
        let pagemap = match Pagemap::open(pid) {
            Ok(p) => p,
            Err(_) if !ferry_image::process::is_alive(pid) => continue,
            Err(source) => return Err(LiveError::Pagemap { pid, source }.into()),
        };
        // CRIU runs its parasite from the first executable mapping, which
        // copies that mapping's first page on write: it dumps it.
        let parasite_page = regions.iter().find(|r| r.exec).map(|r| r.start);
        for region in regions {
            stats.region_pages += region.pages() as u64;
            let mut at = region.start;
            while at < region.end {
                let pages = (((region.end - at) / PAGE_SIZE as u64) as usize).min(READ_CHUNK_PAGES);
                if pagemap.entries(at, pages, &mut entries).is_err() {
                    break; // the region went away
                }
                populated.clear();
                populated.extend(entries.iter().map(|e| dumpable(&region, *e, zero_pfn)));
                if Some(at) == parasite_page {
                    if let Some(first) = populated.first_mut() {
                        *first = entries[0] & (PM_PRESENT | PM_SWAPPED) != 0;
                    }
                }
                let mut i = 0;
                while i < pages {
                    if !populated[i] {
                        i += 1;
                        continue;
                    }
                    let run_start = i;
                    while i < pages && populated[i] {
                        i += 1;
                    }
                    let run = &mut buf[..(i - run_start) * PAGE_SIZE];
                    let addr = at + (run_start * PAGE_SIZE) as u64;
                    let got = match procmem::read(pid, addr, run) {
                        Ok(n) => n / PAGE_SIZE,
                        // EFAULT: unmapped meanwhile; ESRCH: exited.
                        Err(e) if matches!(e.raw_os_error(), Some(libc::EFAULT | libc::ESRCH)) => 0,
                        Err(source) => return Err(LiveError::Read { pid, addr, source }.into()),
                    };
                    // Digested on every core: the read is a copy, the
                    // digest most of the work.
                    let read = &run[..got * PAGE_SIZE];
                    if got >= PARALLEL_PAGES {
                        read.par_chunks_exact(PAGE_SIZE)
                            .map(|p| key.fingerprint(p))
                            .collect_into_vec(&mut fps);
                    } else {
                        fps.clear();
                        fps.extend(read.chunks_exact(PAGE_SIZE).map(|p| key.fingerprint(p)));
                    }
                    for (k, (p, &fp)) in read.chunks_exact(PAGE_SIZE).zip(&fps).enumerate() {
                        stats.populated_pages += 1;
                        if region.private {
                            layout(pid, addr + (k * PAGE_SIZE) as u64, fp);
                        }
                        match fp {
                            None => stats.zero_pages += 1,
                            Some(d) if wanted(d) => {
                                stats.new_pages += 1;
                                sink(d, p)?;
                            }
                            Some(_) => stats.known_pages += 1,
                        }
                    }
                }
                at += (pages * PAGE_SIZE) as u64;
            }
        }
    }
    stats.elapsed = start.elapsed();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_memory_and_sees_a_change() {
        let mut backing = vec![0u8; 65 * PAGE_SIZE];
        let align = (PAGE_SIZE - backing.as_ptr() as usize % PAGE_SIZE) % PAGE_SIZE;
        let block = &mut backing[align..align + 64 * PAGE_SIZE];
        for (i, b) in block.iter_mut().enumerate().step_by(PAGE_SIZE) {
            *b = (i / PAGE_SIZE) as u8 + 1;
        }
        let me = std::process::id() as i32;
        let key = page::PageKey::new([3; 32]);
        let target = key.digest(&block[..PAGE_SIZE]);
        let mut seen = std::collections::HashSet::new();
        let s = scan_tree::<LiveError>(
            &[me],
            &key,
            &mut |d| seen.insert(d),
            &mut |_, _| Ok(()),
            &mut |_, _, _| {},
        )
        .unwrap();
        assert!(s.populated_pages >= 64 && s.new_pages >= 64, "{s:?}");
        assert!(seen.contains(&target));
        block[0] = 200;
        let changed = key.digest(&block[..PAGE_SIZE]);
        let mut fresh = Vec::new();
        scan_tree::<LiveError>(
            &[me],
            &key,
            &mut |d| !seen.contains(&d),
            &mut |d, _| {
                fresh.push(d);
                Ok(())
            },
            &mut |_, _, _| {},
        )
        .unwrap();
        assert!(fresh.contains(&changed));
        std::hint::black_box(&backing);
    }
}
