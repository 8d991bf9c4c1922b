//! Post-copy from a lazy dump, the agent's half: the `criu lazy-pages`
//! daemon's page server is ferry's loopback listener, and every page it
//! asks for comes from the source over the session's page-source
//! connection (`Msg::PageSource`; see `migrate::post_copy`).

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::criu::page_server::{self, PageSourceListener, Served, PAGE};
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
    page_server::serve_lazy_daemon(&mut daemon, &mut |pid, vaddr, pages, buf| {
        conn.send_msg(&Msg::PageGet { pid, vaddr, pages })?;
        let zero = match conn.recv_msg()? {
            Msg::PageData { zero } => zero,
            other => {
                return Err(format!("the source answered a page request with {other:?}").into())
            }
        };
        let data = conn.recv_blob()?;
        fill(buf, &zero, &data)?;
        Ok(())
    })
    .map_err(|e| crate::units::chain(&e))
}

/// Lays out a request's pages: those named in `zero` are zeros, the others
/// follow one another in `data`.
fn fill(buf: &mut [u8], zero: &[u32], data: &[u8]) -> Result<(), String> {
    let pages = buf.len() / PAGE;
    let mut zeros = vec![false; pages];
    for &z in zero {
        *zeros
            .get_mut(z as usize)
            .ok_or_else(|| format!("zero page {z} of a {pages}-page request"))? = true;
    }
    let expected = (pages - zero.len()) * PAGE;
    if data.len() != expected {
        return Err(format!(
            "the source sent {} bytes for {} non-zero pages",
            data.len(),
            pages - zero.len()
        ));
    }
    let mut next = data.chunks_exact(PAGE);
    for (page, is_zero) in buf.chunks_exact_mut(PAGE).zip(zeros) {
        if is_zero {
            page.fill(0);
        } else if let Some(d) = next.next() {
            page.copy_from_slice(d);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_filled_in_between_the_sent_ones() {
        let mut buf = vec![9u8; 3 * PAGE];
        let data: Vec<u8> = [vec![1u8; PAGE], vec![3u8; PAGE]].concat();
        fill(&mut buf, &[1], &data).unwrap();
        assert!(buf[..PAGE].iter().all(|&b| b == 1));
        assert!(buf[PAGE..2 * PAGE].iter().all(|&b| b == 0));
        assert!(buf[2 * PAGE..].iter().all(|&b| b == 3));
        assert!(fill(&mut buf, &[1], &data[..PAGE]).is_err());
        assert!(fill(&mut buf, &[7], &data).is_err());
    }
}
