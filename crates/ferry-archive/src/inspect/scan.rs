//! Classifying dumped pages: all-zero, already seen, or new.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;

use rayon::prelude::*;

use ferry_image::page::PageKey;
use ferry_image::ImageError;
use ferry_sys::mmap::map_or_read;
use ferry_sys::PAGE_SIZE;

/// Pages handed to one rayon task: large enough to amortise scheduling,
/// small enough to spread a 1 GiB file over all cores.
const PAGES_PER_TASK: usize = 256;

/// Content fingerprints of the pages scanned so far (across files), so that
/// a page repeating one from another process counts as a duplicate too.
#[derive(Debug)]
pub struct PageScan {
    seen: HashSet<u128>,
    /// A key of this scan's own: the counts it reports are not something a
    /// process can skew with pages crafted to collide.
    key: PageKey,
}

impl Default for PageScan {
    fn default() -> Self {
        // Without the kernel's random source, a key of this process's
        // own making: the counts are a report, not an identity.
        let key = PageKey::random().unwrap_or_else(|_| {
            let seed = format!("{:?} {}", std::time::SystemTime::now(), std::process::id());
            PageKey::derive(seed.as_bytes())
        });
        PageScan {
            seen: HashSet::new(),
            key,
        }
    }
}

impl PageScan {
    /// Scans the first `pages` pages of a pages file; returns (zero pages,
    /// duplicate pages). The file's length was checked by validation.
    pub(crate) fn scan_file(&mut self, path: &Path, pages: u64) -> Result<(u64, u64), ImageError> {
        if pages == 0 {
            return Ok((0, 0));
        }
        let file = File::open(path).map_err(|e| ImageError::io(path, e))?;
        let map = map_or_read(&file, true).map_err(|e| ImageError::io(path, e))?;
        let len = (pages as usize * PAGE_SIZE).min(map.len());
        Ok(self.scan_bytes(&map[..len]))
    }

    /// Scans whole pages held in memory; returns (zero pages, duplicate pages).
    pub fn scan_bytes(&mut self, bytes: &[u8]) -> (u64, u64) {
        let prints: Vec<Option<u128>> = bytes
            .par_chunks(PAGE_SIZE * PAGES_PER_TASK)
            .flat_map_iter(|chunk| chunk.chunks(PAGE_SIZE).map(|p| self.key.fingerprint(p)))
            .collect();
        let mut zero = 0;
        let mut dup = 0;
        for p in prints {
            match p {
                None => zero += 1,
                Some(h) if !self.seen.insert(h) => dup += 1,
                Some(_) => {}
            }
        }
        (zero, dup)
    }

    /// Distinct non-zero page contents seen.
    pub fn unique(&self) -> u64 {
        self.seen.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_zero_and_duplicate_pages() {
        let mut bytes = vec![0u8; PAGE_SIZE * 5];
        bytes[PAGE_SIZE] = 1; // page 1: unique
        bytes[PAGE_SIZE * 3] = 1; // page 3: same as page 1
        bytes[PAGE_SIZE * 4 + 4095] = 7; // page 4: unique, last byte set
        let mut scan = PageScan::default();
        assert_eq!(scan.scan_bytes(&bytes), (2, 1));
        assert_eq!(scan.unique(), 2);
        // Across files: the same pages again are all duplicates.
        assert_eq!(scan.scan_bytes(&bytes[PAGE_SIZE..PAGE_SIZE * 2]), (0, 1));
    }
}
