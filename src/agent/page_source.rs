//! Post-copy from a lazy dump, the agent's half: the `criu lazy-pages`
//! daemon's page server is ferry's loopback listener, and every page it
//! asks for comes from the source over the session's page-source
//! connection (`Msg::PageSource`; see `migrate::post_copy`).

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::criu::page_server::{self, PageSourceListener, Served, PAGE};
use crate::transport::recent::ReceivedPages;
use crate::transport::{Conn, Msg};

/// How long the daemon may take to connect to ferry's page server.
const DAEMON_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest wait for the source's answer to one page request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The thread relaying the daemon's requests to the source.
pub struct PageRelay {
    thread: JoinHandle<Result<Served, String>>,
}

impl PageRelay {
    /// Relays the daemon that connects to `listener` over `conn` until it
    /// has every page; then tells the source.
    pub fn start(mut conn: Conn, listener: PageSourceListener) -> PageRelay {
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let result = relay(&mut conn, &listener);
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
                        message: format!("post-copy failed on the destination: {why}"),
                    });
                }
            }
            result
        });
        PageRelay { thread }
    }

    /// Waits for the relay's end.
    pub fn join(self) -> Result<Served, String> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err("the page relay panicked".into()))
    }
}

fn relay(conn: &mut Conn, listener: &PageSourceListener) -> Result<Served, String> {
    // The source answers each request at once: silence means it is gone.
    conn.set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| crate::units::chain(&e))?;
    let mut daemon = listener
        .accept(DAEMON_CONNECT_TIMEOUT)
        .map_err(|e| crate::units::chain(&e))?;
    let mut recent = ReceivedPages::default();
    page_server::serve_lazy_daemon(&mut daemon, &mut |pid, vaddr, pages, buf| {
        conn.send_msg(&Msg::PageGet { pid, vaddr, pages })?;
        let (zero, repeat) = match conn.recv_msg()? {
            Msg::PageData { zero, repeat } => (zero, repeat),
            other => {
                return Err(format!("the source answered a page request with {other:?}").into())
            }
        };
        let data = conn.recv_blob()?;
        fill(buf, &zero, &repeat, &data, &mut recent)?;
        Ok(())
    })
    .map_err(|e| crate::units::chain(&e))
}

/// Lays out a request's pages: those named in `zero` are zeros, those in
/// `repeat` come from `recent`, the others follow one another in `data`
/// (and are remembered in `recent`, in order, as the source did).
fn fill(
    buf: &mut [u8],
    zero: &[u32],
    repeat: &[(u32, u64)],
    data: &[u8],
    recent: &mut ReceivedPages,
) -> Result<(), String> {
    enum From {
        Data,
        Zero,
        Recent(u64),
    }
    let pages = buf.len() / PAGE;
    let mut from: Vec<From> = (0..pages).map(|_| From::Data).collect();
    let mut named = |i: u32, f: From| -> Result<(), String> {
        let slot = from
            .get_mut(i as usize)
            .ok_or_else(|| format!("page {i} of a {pages}-page request"))?;
        *slot = f;
        Ok(())
    };
    for &z in zero {
        named(z, From::Zero)?;
    }
    for &(i, n) in repeat {
        named(i, From::Recent(n))?;
    }
    let full = from.iter().filter(|f| matches!(f, From::Data)).count();
    if data.len() != full * PAGE {
        return Err(format!(
            "the source sent {} bytes for {full} pages in full",
            data.len()
        ));
    }
    let mut next = data.chunks_exact(PAGE);
    for (page, f) in buf.chunks_exact_mut(PAGE).zip(from) {
        match f {
            From::Zero => page.fill(0),
            From::Recent(n) => page.copy_from_slice(
                recent
                    .get(n)
                    .ok_or_else(|| format!("the source named page {n}, no longer held here"))?,
            ),
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
        let mut buf = vec![9u8; 3 * PAGE];
        let data: Vec<u8> = [vec![1u8; PAGE], vec![3u8; PAGE]].concat();
        fill(&mut buf, &[1], &[], &data, &mut recent).unwrap();
        assert!(buf[..PAGE].iter().all(|&b| b == 1));
        assert!(buf[PAGE..2 * PAGE].iter().all(|&b| b == 0));
        assert!(buf[2 * PAGE..].iter().all(|&b| b == 3));
        // The second page sent in full (number 1) named again.
        let mut again = vec![9u8; 2 * PAGE];
        fill(&mut again, &[0], &[(1, 1)], &[], &mut recent).unwrap();
        assert!(again[..PAGE].iter().all(|&b| b == 0));
        assert!(again[PAGE..].iter().all(|&b| b == 3));
        assert!(fill(&mut buf, &[1], &[], &data[..PAGE], &mut recent).is_err());
        assert!(fill(&mut buf, &[7], &[], &data, &mut recent).is_err());
        assert!(fill(&mut again, &[], &[(0, 99)], &data[..PAGE], &mut recent).is_err());
    }
}
