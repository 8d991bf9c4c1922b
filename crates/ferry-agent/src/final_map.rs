//! The hybrid route's final page map: after the lazy dump, the source
//! reads its frozen tree once more, sends the pages this agent lacks on the
//! data streams, and then the whole tree's map (every page's address and
//! digest, as the images name the processes) on a connection of its own
//! (`Msg::PageMap`). Once the map covers every lazy page of the images,
//! the page relay serves the `criu lazy-pages` daemon out of the store,
//! tells the source (`Msg::MapInstalled`), and the source is released
//! without waiting for the daemon to fetch everything.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use ferry_image::page::Digest;
use ferry_image::pagemap::Pagemap;
use ferry_sys::PAGE_SIZE;
use ferry_transport::pages::{self, ZERO_PAGE};
use ferry_transport::{Conn, Msg};

use crate::server::Agent;
use crate::store::PageStore;

/// Most pages one map may name (1 TiB of memory).
const MAX_MAP_PAGES: u64 = 1 << 28;

/// Each process's pages (by its pid in the images): addresses in
/// ascending order, and their digests (ZERO_PAGE for zeros).
#[derive(Debug, Default)]
pub(crate) struct FinalMap {
    by_pid: HashMap<u64, (Vec<u64>, Vec<Digest>)>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum MapError {
    #[error("no migration session '{0}' here")]
    NoSession(String),
    #[error("the map names more than {MAX_MAP_PAGES} pages")]
    TooLarge,
    #[error("the map of pid {pid} is not in ascending address order")]
    Order { pid: i32 },
    #[error("the map of pid {pid}")]
    Layout {
        pid: i32,
        #[source]
        source: pages::PagesFault,
    },
    #[error("the map names a page this store lacks")]
    NotStored,
    #[error("unexpected {0} in a page map")]
    Unexpected(&'static str),
    #[error(transparent)]
    Transport(#[from] ferry_transport::TransportError),
}

/// Receives a map on `conn` for `session` and files it for the session's
/// page relay.
pub(crate) fn receive(agent: &Agent, conn: &mut Conn, session: String) -> Result<(), MapError> {
    let open = agent
        .sessions
        .lock()
        .map(|s| s.contains_key(&session))
        .unwrap_or(false);
    let received = if open {
        read_map(conn, &agent.store)
    } else {
        Err(MapError::NoSession(session.clone()))
    };
    match received {
        Ok(map) => {
            if let Ok(mut m) = agent.page_maps.lock() {
                m.insert(session, Arc::new(map));
            }
            conn.send_msg(&Msg::MapReady)?;
            Ok(())
        }
        Err(e) => {
            let _ = conn.send_msg(&Msg::Error {
                message: ferry_image::units::chain(&e),
            });
            Err(e)
        }
    }
}

fn read_map(conn: &mut Conn, store: &PageStore) -> Result<FinalMap, MapError> {
    let mut map = FinalMap::default();
    let mut total = 0u64;
    loop {
        match conn.recv_msg()? {
            Msg::Layout { pid, count } => {
                total = total.saturating_add(count);
                if total > MAX_MAP_PAGES {
                    return Err(MapError::TooLarge);
                }
                let blob = conn.recv_blob()?;
                let (vaddrs, digests) = pages::decode_layout(count, &blob)
                    .map_err(|source| MapError::Layout { pid, source })?;
                if vaddrs.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(MapError::Order { pid });
                }
                if digests
                    .iter()
                    .any(|d| *d != ZERO_PAGE && !store.contains(*d))
                {
                    return Err(MapError::NotStored);
                }
                map.by_pid.insert(pid as u64, (vaddrs, digests));
            }
            Msg::MapEnd => return Ok(map),
            other => return Err(MapError::Unexpected(other.kind())),
        }
    }
}

impl FinalMap {
    /// The digests of `pages` pages from `vaddr` of `pid`, if the map
    /// holds every one of them.
    fn run(&self, pid: u64, vaddr: u64, pages: usize) -> Option<&[Digest]> {
        let (vaddrs, digests) = self.by_pid.get(&pid)?;
        let i = vaddrs.binary_search(&vaddr).ok()?;
        let last = vaddr.checked_add((pages as u64).checked_sub(1)? * PAGE_SIZE as u64)?;
        // Ascending and distinct: the run is whole when its last page
        // sits `pages - 1` entries on.
        (vaddrs.get(i + pages - 1) == Some(&last)).then(|| &digests[i..i + pages])
    }

    /// Whether the map names every lazy page of the images in `dir`
    /// (pagemap-PID.img of each process it names, and no other).
    pub(crate) fn covers_lazy_pages(&self, dir: &Path) -> Result<(), String> {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("pagemap-")
                .and_then(|r| r.strip_suffix(".img"))
                .and_then(|p| p.parse::<u64>().ok())
            else {
                continue;
            };
            let pm = Pagemap::read(&e.path()).map_err(|e| ferry_image::units::chain(&e))?;
            for r in pm.ranges.iter().filter(|r| r.is_lazy()) {
                let pages = usize::try_from(r.nr_pages).map_err(|_| "a huge range")?;
                if pages > 0 && self.run(pid, r.vaddr, pages).is_none() {
                    return Err(format!(
                        "pid {pid}: {pages} lazy pages at {:#x} are not all in the map",
                        r.vaddr
                    ));
                }
            }
        }
        Ok(())
    }

    /// Fills `buf` with the pages at `vaddr` of `pid` out of `store`;
    /// false when the map does not hold them all.
    pub(crate) fn fill(
        &self,
        store: &PageStore,
        pid: u64,
        vaddr: u64,
        buf: &mut [u8],
    ) -> Result<bool, MapError> {
        let Some(digests) = self.run(pid, vaddr, buf.len() / PAGE_SIZE) else {
            return Ok(false);
        };
        for (page, d) in buf.chunks_exact_mut(PAGE_SIZE).zip(digests) {
            if *d == ZERO_PAGE {
                page.fill(0);
            } else if !store.read_page(*d, page).map_err(|_| MapError::NotStored)? {
                return Err(MapError::NotStored);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_found_only_when_whole() {
        let mut m = FinalMap::default();
        let p = PAGE_SIZE as u64;
        m.by_pid
            .insert(1, (vec![0x1000, 0x1000 + p, 0x1000 + 3 * p], vec![7, 8, 9]));
        assert_eq!(m.run(1, 0x1000, 2), Some(&[7u128, 8][..]));
        assert_eq!(m.run(1, 0x1000 + p, 1), Some(&[8u128][..]));
        // A hole at 0x1000 + 2p.
        assert_eq!(m.run(1, 0x1000, 3), None);
        assert_eq!(m.run(1, 0x1000 + 3 * p, 2), None);
        assert_eq!(m.run(2, 0x1000, 1), None);
        assert_eq!(m.run(1, 0x1000, 0), None);
    }
}
