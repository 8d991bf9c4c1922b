//! The agent's content-addressed page store: one append-only file of
//! records `digest u128 LE | 4096 bytes`, indexed in memory by digest.
//!
//! A page is stored once however many checkpoints, sessions or processes
//! hold it. Records are appended with one positioned write per batch; a
//! batch that does not fit (ENOSPC) is cut off again, so the file never
//! holds a partial record that the index points to. At start the file is
//! read back and every record's digest checked: a torn or damaged tail is
//! truncated away. Digests are keyed by the cluster key
//! ([`ferry_transport::Secret::page_key`]): after a key change, no record
//! verifies, and the store starts empty.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use ferry_image::page::{Digest, PageKey};
use ferry_sys::PAGE_SIZE;

const DIGEST_BYTES: usize = 16;
const RECORD_BYTES: usize = DIGEST_BYTES + PAGE_SIZE;
pub(crate) const PAGES_FILE: &str = "pages.dat";

pub struct PageStore {
    key: PageKey,
    path: PathBuf,
    reader: RwLock<File>,
    writer: Mutex<(File, u64)>,
    index: RwLock<HashMap<Digest, u64>>,
}

impl PageStore {
    /// Opens (or creates) the store in `dir`, its digests under `key`.
    pub fn open(dir: &Path, key: PageKey) -> io::Result<PageStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(PAGES_FILE);
        let writer = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut index = HashMap::new();
        let mut good = 0u64;
        let mut r = BufReader::with_capacity(1 << 20, writer.try_clone()?);
        let mut rec = vec![0u8; RECORD_BYTES];
        loop {
            match r.read_exact(&mut rec) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
            let mut d = [0u8; DIGEST_BYTES];
            d.copy_from_slice(&rec[..DIGEST_BYTES]);
            let digest = u128::from_le_bytes(d);
            if key.digest(&rec[DIGEST_BYTES..]) != digest {
                break;
            }
            index.insert(digest, good + DIGEST_BYTES as u64);
            good += RECORD_BYTES as u64;
        }
        let len = writer.metadata()?.len();
        if len != good {
            tracing::warn!(path = %path.display(), dropped = len - good, "page store: dropping a damaged or torn tail, or pages of another cluster key");
            writer.set_len(good)?;
        }
        Ok(PageStore {
            key,
            reader: RwLock::new(File::open(&path)?),
            path,
            writer: Mutex::new((writer, good)),
            index: RwLock::new(index),
        })
    }

    /// The key of its digests.
    pub fn key(&self) -> &PageKey {
        &self.key
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.index.read().map(|i| i.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, d: Digest) -> bool {
        self.index
            .read()
            .map(|i| i.contains_key(&d))
            .unwrap_or(false)
    }

    /// Stores the pages not yet held; returns how many were new. The
    /// digests must already have been checked against the data.
    pub(crate) fn put_batch(&self, digests: &[Digest], data: &[u8]) -> io::Result<u64> {
        let mut w = self
            .writer
            .lock()
            .map_err(|_| io::Error::other("page store lock poisoned"))?;
        let mut buf = Vec::with_capacity(digests.len() * RECORD_BYTES);
        let mut fresh = Vec::new();
        {
            let index = self
                .index
                .read()
                .map_err(|_| io::Error::other("page store index poisoned"))?;
            let mut seen = std::collections::HashSet::new();
            for (d, p) in digests.iter().zip(data.chunks_exact(PAGE_SIZE)) {
                if index.contains_key(d) || !seen.insert(*d) {
                    continue;
                }
                fresh.push((*d, w.1 + buf.len() as u64 + DIGEST_BYTES as u64));
                buf.extend_from_slice(&d.to_le_bytes());
                buf.extend_from_slice(p);
            }
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let at = w.1;
        if let Err(e) = w.0.write_all_at(&buf, at) {
            let _ = w.0.set_len(at);
            return Err(e);
        }
        w.1 += buf.len() as u64;
        let n = fresh.len() as u64;
        self.index
            .write()
            .map_err(|_| io::Error::other("page store index poisoned"))?
            .extend(fresh);
        Ok(n)
    }

    /// A read-only view of the records written so far, for rebuilding many
    /// pages at once. Appends after the call are not in it; the only
    /// truncation the store ever does removes a failed batch's records,
    /// which no index entry (and so no reader) points to.
    pub fn view(&self) -> io::Result<StoreView<'_>> {
        let reader = self
            .reader
            .read()
            .map_err(|_| io::Error::other("page store reader poisoned"))?;
        Ok(StoreView {
            map: ferry_sys::mmap::map_readonly(&reader, false)?,
            store: self,
        })
    }

    /// Bytes the store's file holds.
    pub fn bytes(&self) -> u64 {
        self.writer.lock().map(|w| w.1).unwrap_or(0)
    }

    /// Keeps only the newest records, at most `keep` bytes of them (the
    /// store is a cache for deduplication: a page dropped is sent again
    /// the next time a migration needs it). The file is rewritten beside
    /// the old one and renamed over it. No view or session may be using
    /// the store (the agent compacts only while none runs). Returns the
    /// pages dropped.
    pub(crate) fn compact(&self, keep: u64) -> io::Result<usize> {
        let poisoned = || io::Error::other("page store lock poisoned");
        let mut w = self.writer.lock().map_err(|_| poisoned())?;
        let mut index = self.index.write().map_err(|_| poisoned())?;
        let mut reader = self.reader.write().map_err(|_| poisoned())?;
        let keep = keep / RECORD_BYTES as u64 * RECORD_BYTES as u64;
        let len = w.1;
        if len <= keep {
            return Ok(0);
        }
        let start = len - keep;
        let tmp = self.path.with_extension("dat.compacting");
        {
            let mut out = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            let mut from = File::open(&self.path)?;
            io::Seek::seek(&mut from, io::SeekFrom::Start(start))?;
            io::copy(&mut Read::take(from, keep), &mut out)?;
            out.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        *w = (
            OpenOptions::new().read(true).write(true).open(&self.path)?,
            keep,
        );
        *reader = File::open(&self.path)?;
        let before = index.len();
        index.retain(|_, off| *off >= start);
        for off in index.values_mut() {
            *off -= start;
        }
        Ok(before - index.len())
    }

    /// Copies page `d` into `out`; false when it is not held.
    pub(crate) fn read_page(&self, d: Digest, out: &mut [u8]) -> io::Result<bool> {
        let Some(off) = self.index.read().ok().and_then(|i| i.get(&d).copied()) else {
            return Ok(false);
        };
        self.reader
            .read()
            .map_err(|_| io::Error::other("page store reader poisoned"))?
            .read_exact_at(&mut out[..PAGE_SIZE], off)?;
        Ok(true)
    }
}

/// See [`PageStore::view`].
pub struct StoreView<'a> {
    map: memmap2::Mmap,
    store: &'a PageStore,
}

impl StoreView<'_> {
    /// Page `d`, if held (and written before the view was taken).
    pub fn page(&self, d: Digest) -> Option<&[u8]> {
        let off = self.store.index.read().ok()?.get(&d).copied()? as usize;
        self.map.get(off..off + PAGE_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    #[test]
    fn stores_once_and_survives_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let s = PageStore::open(dir.path(), PageKey::new([1; 32])).unwrap();
        let data = [page_of(1), page_of(2), page_of(1)].concat();
        let ds: Vec<_> = data.chunks(PAGE_SIZE).map(|p| s.key().digest(p)).collect();
        assert_eq!(s.put_batch(&ds, &data).unwrap(), 2);
        assert_eq!(s.put_batch(&ds, &data).unwrap(), 0);
        let mut out = page_of(0);
        assert!(s.read_page(ds[1], &mut out).unwrap());
        assert_eq!(out, page_of(2));
        drop(s);
        let f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(PAGES_FILE))
            .unwrap();
        f.write_all_at(&[9u8; 100], 2 * RECORD_BYTES as u64)
            .unwrap();
        let s = PageStore::open(dir.path(), PageKey::new([1; 32])).unwrap();
        assert_eq!(s.len(), 2);
        assert!(s.contains(ds[0]));
        drop(s);
        // Another key: nothing in it verifies, so nothing is served.
        let s = PageStore::open(dir.path(), PageKey::new([2; 32])).unwrap();
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn compaction_keeps_the_newest_pages_and_their_contents() {
        let dir = tempfile::tempdir().unwrap();
        let s = PageStore::open(dir.path(), PageKey::new([2; 32])).unwrap();
        let data: Vec<u8> = (1..=8u8).flat_map(page_of).collect();
        let ds: Vec<_> = data.chunks(PAGE_SIZE).map(|p| s.key().digest(p)).collect();
        s.put_batch(&ds, &data).unwrap();
        assert_eq!(s.bytes(), 8 * RECORD_BYTES as u64);
        // Room for three records and a half: three stay, the newest.
        let dropped = s.compact(3 * RECORD_BYTES as u64 + 100).unwrap();
        assert_eq!(dropped, 5);
        assert_eq!(s.len(), 3);
        assert_eq!(s.bytes(), 3 * RECORD_BYTES as u64);
        let mut out = page_of(0);
        assert!(!s.read_page(ds[4], &mut out).unwrap());
        for (i, d) in ds.iter().enumerate().skip(5) {
            assert!(s.read_page(*d, &mut out).unwrap());
            assert_eq!(out, page_of(i as u8 + 1));
        }
        // New pages go on after the kept ones, and all survive a reopen.
        let more = page_of(9);
        let d9 = s.key().digest(&more);
        s.put_batch(&[d9], &more).unwrap();
        drop(s);
        let s = PageStore::open(dir.path(), PageKey::new([2; 32])).unwrap();
        assert_eq!(s.len(), 4);
        assert!(s.read_page(d9, &mut out).unwrap());
        assert_eq!(out, more);
    }
}
