//! CRIU's page-server wire protocol, the two parts post-copy across hosts
//! needs (see `ferry migrate --lazy-pages`):
//!
//! - **the source's lazy dump** ([`LazyDumpLink`]): `criu dump
//!   --lazy-pages` writes every image but the lazy memory, then keeps the
//!   dumped tree frozen and serves as a page server until its peer says
//!   the transfer is over. ferry is that peer, over a connection it made
//!   itself and handed to CRIU as a descriptor (no port anyone else could
//!   reach first; see [`ferry_sys::net::loopback_pair`]); once the
//!   destination holds every page it sends `CLOSE`, after which CRIU kills
//!   the tree. To fail the
//!   transfer (CRIU then resumes the tree) it sends a command CRIU does not
//!   know; the link resets when closed, because CRIU 4.2 takes an orderly
//!   end without `CLOSE` for success and would kill the tree.
//!   ferry never asks CRIU's server for pages (its `tee` of the page pipes
//!   is refused on this kernel, see docs/migration.md): it reads the frozen
//!   tree's memory itself.
//! - **the destination's page source** ([`serve_lazy_daemon`]): `criu
//!   lazy-pages --page-server` asks a page server for each page a restored
//!   task faults on, and for the rest in the background. ferry answers,
//!   over a connection it handed the daemon the same way
//!   (`--ps-socket`), from the source's memory, fetched over its own
//!   authenticated link.
//!
//! Every message starts with a 32-byte header (CRIU 4.x layout, native
//! endianness, the compiler's padding after `cmd`):
//! `u32 cmd, u32 pad, u64 nr_pages, u64 vaddr, u64 dst_id`. `cmd` holds the
//! command in its low 16 bits and page flags above. A `GET` names the
//! task by its pid in the images (`dst_id`); the answer is `ADD_F` with
//! `PE_PRESENT` and the same fields, then `nr_pages` pages. `CLOSE` is
//! answered with an `i32` status (0).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Bytes of one header.
pub const HEADER_LEN: usize = 32;
/// Bytes of a page.
pub const PAGE: usize = 4096;
/// The most pages ferry serves in one answer (CRIU's background requests
/// are far smaller; this only bounds a hostile or broken request).
pub(crate) const MAX_PAGES_PER_GET: u64 = 4 << 10;

const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_GET: u32 = 7;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_CMD_MASK: u32 = 0xffff;
/// No CRIU command: CRIU's page server fails its session on it.
const PS_ABORT: u32 = 0xfff0;
const PE_PRESENT: u32 = 1 << 2;

/// One header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Iov {
    pub cmd: u32,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: u64,
}

impl Iov {
    /// A header that is only a command.
    pub fn bare(cmd: u32) -> Iov {
        Iov {
            cmd,
            nr_pages: 0,
            vaddr: 0,
            dst_id: 0,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.cmd.to_ne_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_ne_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_ne_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_ne_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Iov {
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_ne_bytes(w)
        };
        Iov {
            cmd: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        }
    }

    fn command(&self) -> u32 {
        self.cmd & PS_CMD_MASK
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PageServerError {
    #[error("CRIU's lazy page server never became ready (waited {waited:?})")]
    NeverReady { waited: Duration },
    #[error("CRIU's lazy page server did not confirm the end of the transfer")]
    Close {
        #[source]
        source: io::Error,
    },
    #[error("CRIU's lazy page server answered the end of the transfer with status {status}")]
    CloseStatus { status: i32 },
    #[error("talking to the criu lazy-pages daemon")]
    Daemon(#[source] io::Error),
    #[error("the criu lazy-pages daemon sent command {cmd:#x}, which ferry does not serve")]
    UnknownCommand { cmd: u32 },
    #[error(
        "the criu lazy-pages daemon asked for {pages} pages at once (at most {MAX_PAGES_PER_GET})"
    )]
    TooLarge { pages: u64 },
    #[error("cannot fetch {pages} pages at {vaddr:#x} of pid {pid} from the source")]
    Fetch {
        pid: u64,
        vaddr: u64,
        pages: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// ferry's connection to the page server of a running `criu dump
/// --lazy-pages` (source side).
pub struct LazyDumpLink {
    stream: TcpStream,
}

impl LazyDumpLink {
    /// ferry's end of the connection whose other end the lazy dump's page
    /// server was given ([`super::DumpRequest::lazy_socket`]).
    pub fn new(stream: TcpStream) -> LazyDumpLink {
        let _ = stream.set_nodelay(true);
        // CRIU takes an orderly end of this connection for the end of the
        // transfer (and kills the tree): ferry dying must reset it
        // instead, which fails the dump and resumes the tree.
        if let Err(e) = ferry_sys::net::reset_on_close(&stream, true) {
            tracing::warn!(error = %e, "cannot make the lazy dump's link reset on close");
        }
        LazyDumpLink { stream }
    }

    /// Ends the transfer: CRIU then kills the dumped tree and the dump
    /// succeeds.
    pub fn close(mut self) -> Result<(), PageServerError> {
        let err = |source| PageServerError::Close { source };
        let hdr = Iov::bare(PS_IOV_CLOSE);
        self.stream.write_all(&hdr.encode()).map_err(err)?;
        self.stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(err)?;
        let mut status = [0u8; 4];
        self.stream.read_exact(&mut status).map_err(err)?;
        match i32::from_ne_bytes(status) {
            0 => {}
            status => return Err(PageServerError::CloseStatus { status }),
        }
        // CRIU reads once more after its answer and takes a reset for a
        // failure (it would resume the tree): end the connection in order
        // and wait for CRIU's end.
        ferry_sys::net::reset_on_close(&self.stream, false).map_err(err)?;
        self.stream
            .shutdown(std::net::Shutdown::Write)
            .map_err(err)?;
        let mut rest = Vec::new();
        let _ = self.stream.read_to_end(&mut rest);
        Ok(())
    }

    /// Fails the transfer: CRIU fails the dump and resumes the tree. (An
    /// orderly end without `CLOSE` would count as success for CRIU 4.2,
    /// which would then kill the tree; an unknown command fails it, and
    /// the connection is reset, not ended.)
    pub fn abort(mut self) {
        let bogus = Iov::bare(PS_ABORT);
        let _ = self.stream.write_all(&bogus.encode());
        let _ = self.stream.flush();
        // Give CRIU the command before the reset can discard it.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fills a buffer with `pages` pages of task `pid` (as the images name
/// it) from `vaddr`: `(pid, vaddr, pages, buf)`.
pub(crate) type FetchPages<'a> = dyn FnMut(u64, u64, u64, &mut [u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    + 'a;

/// What a served daemon session amounted to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    pub requests: u64,
    pub pages: u64,
}

/// Answers the daemon on `stream` until it closes the transfer: each `GET`
/// is fetched with `fetch(pid, vaddr, pages, buf)` (which fills `buf`,
/// `pages` pages long). Requests are answered in order, as CRIU expects.
pub fn serve_lazy_daemon(
    stream: &mut TcpStream,
    fetch: &mut FetchPages<'_>,
) -> Result<Served, PageServerError> {
    let mut served = Served::default();
    let mut buf = Vec::new();
    loop {
        let mut raw = [0u8; HEADER_LEN];
        stream
            .read_exact(&mut raw)
            .map_err(PageServerError::Daemon)?;
        let req = Iov::decode(&raw);
        match req.command() {
            PS_IOV_GET => {
                if req.nr_pages == 0 || req.nr_pages > MAX_PAGES_PER_GET {
                    return Err(PageServerError::TooLarge {
                        pages: req.nr_pages,
                    });
                }
                buf.resize(req.nr_pages as usize * PAGE, 0);
                fetch(req.dst_id, req.vaddr, req.nr_pages, &mut buf).map_err(|source| {
                    PageServerError::Fetch {
                        pid: req.dst_id,
                        vaddr: req.vaddr,
                        pages: req.nr_pages,
                        source,
                    }
                })?;
                let answer = Iov {
                    cmd: (PE_PRESENT << 16) | PS_IOV_ADD_F,
                    ..req
                };
                stream
                    .write_all(&answer.encode())
                    .and_then(|()| stream.write_all(&buf))
                    .map_err(PageServerError::Daemon)?;
                served.requests += 1;
                served.pages += req.nr_pages;
            }
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                stream
                    .write_all(&0i32.to_ne_bytes())
                    .map_err(PageServerError::Daemon)?;
                return Ok(served);
            }
            cmd => return Err(PageServerError::UnknownCommand { cmd }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_with_cmd_padding() {
        let iov = Iov {
            cmd: PS_IOV_GET,
            nr_pages: 3,
            vaddr: 0x7f00_dead_b000,
            dst_id: 1,
        };
        let raw = iov.encode();
        assert_eq!(&raw[4..8], &[0, 0, 0, 0]);
        assert_eq!(Iov::decode(&raw), iov);
    }

    /// A fake daemon asks for pages and closes; the server answers with the
    /// fetched bytes and CRIU's ADD_F|PE_PRESENT header, then status 0.
    #[test]
    fn the_daemon_gets_what_it_asked_for_then_a_close_status() {
        let (mut stream, mut s) = ferry_sys::net::loopback_pair().unwrap();
        let daemon = std::thread::spawn(move || {
            let get = Iov {
                cmd: PS_IOV_GET,
                nr_pages: 2,
                vaddr: 0x1000,
                dst_id: 7,
            };
            s.write_all(&get.encode()).unwrap();
            let mut hdr = [0u8; HEADER_LEN];
            s.read_exact(&mut hdr).unwrap();
            let got = Iov::decode(&hdr);
            assert_eq!(got.cmd, (PE_PRESENT << 16) | PS_IOV_ADD_F);
            assert_eq!((got.nr_pages, got.vaddr, got.dst_id), (2, 0x1000, 7));
            let mut data = vec![0u8; 2 * PAGE];
            s.read_exact(&mut data).unwrap();
            assert!(data.iter().all(|&b| b == 7));
            let close = Iov::bare(PS_IOV_CLOSE);
            s.write_all(&close.encode()).unwrap();
            let mut status = [0u8; 4];
            s.read_exact(&mut status).unwrap();
            i32::from_ne_bytes(status)
        });
        let served = serve_lazy_daemon(&mut stream, &mut |pid, _, _, buf| {
            buf.fill(pid as u8);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            served,
            Served {
                requests: 1,
                pages: 2
            }
        );
        assert_eq!(daemon.join().unwrap(), 0);
    }
}
