//! Post-copy from a lazy dump, the agent's half: the `criu lazy-pages`
//! daemon's page server is ferry, at the other end of a connection handed
//! to the daemon as a descriptor (`--ps-socket`), and every page it
//! asks for comes from the source over the session's page-source
//! connection (`Msg::PageSource`; see `migrate::post_copy`).

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_criu::page_server::{self, Served, PAGE};
use ferry_transport::recent::ReceivedPages;
use ferry_transport::{Conn, Msg};

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
}

/// The thread relaying the daemon's requests to the source.
pub(crate) struct PageRelay {
    thread: JoinHandle<Result<Served, RelayError>>,
}

impl PageRelay {
    /// Relays the daemon at the other end of `daemon` over `conn` until
    /// it has every page; then tells the source.
    pub fn start(mut conn: Conn, mut daemon: std::net::TcpStream) -> PageRelay {
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let result = relay(&mut conn, &mut daemon);
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

fn relay(conn: &mut Conn, daemon: &mut std::net::TcpStream) -> Result<Served, RelayError> {
    // The source answers each request at once: silence means it is gone.
    conn.set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(RelayError::Timeout)?;
    let mut recent = ReceivedPages::default();
    page_server::serve_lazy_daemon(daemon, &mut |pid, vaddr, pages, buf| {
        conn.send_msg(&Msg::PageGet { pid, vaddr, pages })?;
        let (zero, repeat) = match conn.recv_msg()? {
            Msg::PageData { zero, repeat } => (zero, repeat),
            other => return Err(AnswerError::Unexpected(other.kind()).into()),
        };
        let data = conn.recv_blob()?;
        fill(buf, &zero, &repeat, &data, &mut recent)?;
        Ok(())
    })
    .map_err(RelayError::from)
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
) -> Result<(), AnswerError> {
    enum From {
        Data,
        Zero,
        Recent(u64),
    }
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
