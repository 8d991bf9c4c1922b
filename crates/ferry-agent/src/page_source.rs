//! Post-copy from a lazy dump, the agent's half: the `criu lazy-pages`
//! daemon's page server is ferry, at the other end of a connection handed
//! to the daemon as a descriptor (`--ps-socket`), and every page it
//! asks for comes from the source over the session's page-source
//! connection (`Msg::PageSource`; see `migrate::post_copy`). On the hybrid
//! route (pre-copy, then a lazy dump) the source names each page that
//! pre-copy brought here and that has not changed since: it comes out of
//! this agent's page store, only its digest crossed the link.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_criu::page_server::{self, Served, PAGE};
use ferry_transport::recent::ReceivedPages;
use ferry_transport::{pages, Conn, Msg};

use crate::final_map::FinalMap;
use crate::store::PageStore;

/// The hybrid route's final maps by session (see [`crate::final_map`]).
pub(crate) type PageMaps = Arc<Mutex<HashMap<String, Arc<FinalMap>>>>;

/// What the relay can serve without the source.
pub(crate) struct Local {
    pub store: Arc<PageStore>,
    pub maps: PageMaps,
    pub session: String,
    /// The images restored (their lazy pagemaps say what the daemon will
    /// ask for).
    pub images: PathBuf,
}

/// Longest wait for the source's answer to one page request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why post-copy's page relay stopped before the daemon had every page.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    #[error("cannot time the source's answers")]
    Timeout(#[source] ferry_transport::TransportError),
    #[error("serving the criu lazy-pages daemon")]
    Daemon(#[from] page_server::PageServerError),
    #[error("the page relay panicked")]
    Panicked,
    #[error("the daemon asked for {pages} pages at {vaddr:#x} of pid {pid}, outside the final map, after the source was released")]
    OutsideMap { pid: u64, vaddr: u64, pages: u64 },
    #[error("serving from the final map")]
    Map(#[from] crate::final_map::MapError),
}

/// What the source sent that does not fit the request it answers.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AnswerError {
    #[error("the source answered a page request with {0}")]
    Unexpected(&'static str),
    #[error("the source named page {index} of a {pages}-page request")]
    OutOfRange { index: u32, pages: usize },
    #[error("the source sent {bytes} bytes for {pages} pages in full")]
    Length { bytes: usize, pages: usize },
    #[error("the source named page {0}, no longer held here")]
    Forgotten(u64),
    #[error("the source named {named} pages held here but sent {digests} digests")]
    StoredCount { named: usize, digests: usize },
    #[error("the source sent bad digests")]
    Digests(#[source] pages::PagesFault),
    #[error("the source named a page as held here by a digest this store lacks")]
    NotStored,
    #[error("cannot read the page store")]
    Store(#[source] std::io::Error),
}

/// The thread relaying the daemon's requests to the source.
pub(crate) struct PageRelay {
    thread: JoinHandle<Result<Served, RelayError>>,
}

impl PageRelay {
    /// Relays the daemon at the other end of `daemon` over `conn` until
    /// it has every page; then tells the source.
    pub fn start(mut conn: Conn, mut daemon: std::net::TcpStream, local: Local) -> PageRelay {
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let result = relay(&mut conn, &mut daemon, &local);
            match &result {
                Ok(served) => {
                    let _ = conn.send_msg(&Msg::PagesDone {
                        requests: served.requests,
                        pages: served.pages,
                        ms: start.elapsed().as_secs_f64() * 1e3,
                    });
                }
                Err(why) => {
                    let _ = conn.send_msg(&Msg::Error {
                        message: format!(
                            "post-copy failed on the destination: {}",
                            ferry_image::units::chain(why)
                        ),
                    });
                }
            }
            result
        });
        PageRelay { thread }
    }

    /// Waits for the relay's end.
    pub fn join(self) -> Result<Served, RelayError> {
        self.thread.join().unwrap_or(Err(RelayError::Panicked))
    }
}

fn relay(
    conn: &mut Conn,
    daemon: &mut std::net::TcpStream,
    local: &Local,
) -> Result<Served, RelayError> {
    // The source answers each request at once: silence means it is gone.
    conn.set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(RelayError::Timeout)?;
    let store = &local.store;
    let mut recent = ReceivedPages::default();
    // The final map, once it came and covers every lazy page.
    let mut map: Option<Arc<FinalMap>> = None;
    let mut map_refused = false;
    page_server::serve_lazy_daemon(daemon, &mut |pid, vaddr, pages, buf| {
        if map.is_none() && !map_refused {
            let came = local
                .maps
                .lock()
                .ok()
                .and_then(|m| m.get(&local.session).cloned());
            if let Some(m) = came {
                match m.covers_lazy_pages(&local.images) {
                    Ok(()) => {
                        // Between two requests: nothing is asked of the
                        // source any more, which may go.
                        conn.send_msg(&Msg::MapInstalled)?;
                        tracing::info!(session = %local.session, "final page map installed: the rest of the memory comes from the store");
                        map = Some(m);
                    }
                    Err(why) => {
                        tracing::warn!(session = %local.session, why, "the final page map does not cover the lazy pages: every page is asked of the source");
                        map_refused = true;
                    }
                }
            }
        }
        if let Some(m) = &map {
            return match m.fill(store, pid, vaddr, buf) {
                Ok(true) => Ok(()),
                Ok(false) => Err(RelayError::OutsideMap { pid, vaddr, pages }.into()),
                Err(e) => Err(RelayError::Map(e).into()),
            };
        }
        conn.send_msg(&Msg::PageGet { pid, vaddr, pages })?;
        let (zero, repeat, stored) = match conn.recv_msg()? {
            Msg::PageData {
                zero,
                repeat,
                stored,
            } => (zero, repeat, stored),
            other => return Err(AnswerError::Unexpected(other.kind()).into()),
        };
        let data = conn.recv_blob()?;
        let held = if stored.is_empty() {
            Vec::new()
        } else {
            let digests =
                pages::decode_digests(&conn.recv_blob()?).map_err(AnswerError::Digests)?;
            if digests.len() != stored.len() {
                return Err(AnswerError::StoredCount {
                    named: stored.len(),
                    digests: digests.len(),
                }
                .into());
            }
            stored.into_iter().zip(digests).collect()
        };
        let answer = Answer {
            zero: &zero,
            repeat: &repeat,
            stored: &held,
            data: &data,
        };
        fill(
            buf,
            &answer,
            &mut recent,
            &mut |d, page| match store.read_page(d, page) {
                Ok(true) => Ok(()),
                Ok(false) => Err(AnswerError::NotStored),
                Err(e) => Err(AnswerError::Store(e)),
            },
        )?;
        Ok(())
    })
    .map_err(RelayError::from)
}

/// Reads a page of the store by digest into the buffer given.
type StoreRead<'a> =
    dyn FnMut(ferry_image::page::Digest, &mut [u8]) -> Result<(), AnswerError> + 'a;

/// The source's answer to one request.
struct Answer<'a> {
    zero: &'a [u32],
    repeat: &'a [(u32, u64)],
    /// (index, digest) of pages this agent's store holds.
    stored: &'a [(u32, ferry_image::page::Digest)],
    data: &'a [u8],
}

/// Lays out a request's pages: those named in `zero` are zeros, those in
/// `repeat` come from `recent`, those in `stored` from the page store
/// (`read`), the others follow one another in `data` (and are remembered
/// in `recent`, in order, as the source did).
fn fill(
    buf: &mut [u8],
    answer: &Answer<'_>,
    recent: &mut ReceivedPages,
    read: &mut StoreRead<'_>,
) -> Result<(), AnswerError> {
    enum From {
        Data,
        Zero,
        Recent(u64),
        Stored(ferry_image::page::Digest),
    }
    let Answer {
        zero,
        repeat,
        stored,
        data,
    } = *answer;
    let pages = buf.len() / PAGE;
    let mut from: Vec<From> = (0..pages).map(|_| From::Data).collect();
    let mut named = |i: u32, f: From| -> Result<(), AnswerError> {
        let slot = from
            .get_mut(i as usize)
            .ok_or(AnswerError::OutOfRange { index: i, pages })?;
        *slot = f;
        Ok(())
    };
    for &z in zero {
        named(z, From::Zero)?;
    }
    for &(i, n) in repeat {
        named(i, From::Recent(n))?;
    }
    for &(i, d) in stored {
        named(i, From::Stored(d))?;
    }
    let full = from.iter().filter(|f| matches!(f, From::Data)).count();
    if data.len() != full * PAGE {
        return Err(AnswerError::Length {
            bytes: data.len(),
            pages: full,
        });
    }
    let mut next = data.chunks_exact(PAGE);
    for (page, f) in buf.chunks_exact_mut(PAGE).zip(from) {
        match f {
            From::Zero => page.fill(0),
            From::Recent(n) => {
                page.copy_from_slice(recent.get(n).ok_or(AnswerError::Forgotten(n))?)
            }
            From::Stored(d) => read(d, page)?,
            From::Data => {
                if let Some(d) = next.next() {
                    page.copy_from_slice(d);
                    recent.record(d);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_repeated_pages_are_filled_in_between_the_sent_ones() {
        let mut recent = ReceivedPages::default();
        let no_store = &mut |_d, _p: &mut [u8]| Err(AnswerError::NotStored);
        let answer = |zero: &'static [u32], repeat: &'static [(u32, u64)], data| Answer {
            zero,
            repeat,
            stored: &[],
            data,
        };
        let mut buf = vec![9u8; 3 * PAGE];
        let data: Vec<u8> = [vec![1u8; PAGE], vec![3u8; PAGE]].concat();
        fill(&mut buf, &answer(&[1], &[], &data), &mut recent, no_store).unwrap();
        assert!(buf[..PAGE].iter().all(|&b| b == 1));
        assert!(buf[PAGE..2 * PAGE].iter().all(|&b| b == 0));
        assert!(buf[2 * PAGE..].iter().all(|&b| b == 3));
        // The second page sent in full (number 1) named again.
        let mut again = vec![9u8; 2 * PAGE];
        fill(
            &mut again,
            &answer(&[0], &[(1, 1)], &[]),
            &mut recent,
            no_store,
        )
        .unwrap();
        assert!(again[..PAGE].iter().all(|&b| b == 0));
        assert!(again[PAGE..].iter().all(|&b| b == 3));
        assert!(fill(
            &mut buf,
            &answer(&[1], &[], &data[..PAGE]),
            &mut recent,
            no_store
        )
        .is_err());
        assert!(fill(&mut buf, &answer(&[7], &[], &data), &mut recent, no_store).is_err());
        assert!(fill(
            &mut again,
            &answer(&[], &[(0, 99)], &data[..PAGE]),
            &mut recent,
            no_store
        )
        .is_err());
    }

    #[test]
    fn stored_pages_come_from_the_store_and_unknown_digests_fail() {
        let mut recent = ReceivedPages::default();
        let mut buf = vec![9u8; 3 * PAGE];
        let data = vec![5u8; PAGE];
        let stored = [(0u32, 7u128), (2, 8)];
        let answer = Answer {
            zero: &[],
            repeat: &[],
            stored: &stored,
            data: &data,
        };
        let mut read = |d: u128, page: &mut [u8]| {
            page.fill(d as u8);
            Ok(())
        };
        fill(&mut buf, &answer, &mut recent, &mut read).unwrap();
        assert!(buf[..PAGE].iter().all(|&b| b == 7));
        assert!(buf[PAGE..2 * PAGE].iter().all(|&b| b == 5));
        assert!(buf[2 * PAGE..].iter().all(|&b| b == 8));
        let mut missing = |_d: u128, _p: &mut [u8]| Err(AnswerError::NotStored);
        assert!(matches!(
            fill(&mut buf, &answer, &mut recent, &mut missing),
            Err(AnswerError::NotStored)
        ));
        // A stored page's content is not in the data: one page too many.
        let long = vec![5u8; 2 * PAGE];
        let wrong = Answer {
            data: &long,
            ..answer
        };
        assert!(fill(&mut buf, &wrong, &mut recent, &mut read).is_err());
    }
}
