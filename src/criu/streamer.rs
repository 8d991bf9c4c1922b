//! The serving half of CRIU's image streamer protocol: a restore with
//! `--stream` reads its images from ferry instead of an images directory.
//!
//! CRIU connects to [`SERVE_SOCKET`] in its images directory and, for each
//! image it opens, sends the file name (`img_streamer_request_entry`); the
//! streamer answers whether it exists (`img_streamer_reply_entry`); if it
//! does, CRIU passes the write end of a fresh pipe (`SCM_RIGHTS`, with one
//! byte) and reads the image from the other end until the streamer closes
//! it. Messages are framed as in image files: a little-endian u32 length,
//! then the protobuf message. CRIU asks for the images one at a time, in
//! the order it restores them, each once.
//!
//! ferry uses it to restore from an archive without writing the images
//! anywhere: the pages go from the archive, decompressed in parallel,
//! through the pipe into CRIU's copy of the process memory.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criu_proto as pb;
use prost::Message;

use crate::sys::pipe::{PagePipe, Segment};

/// The socket a restoring CRIU connects to, in its images directory.
pub const SERVE_SOCKET: &str = "streamer-serve.sock";
/// Largest request ferry accepts (a file name).
const MAX_REQUEST: u32 = 4096;
/// Pipe capacity asked for each image (the default 64 KiB makes CRIU and
/// the streamer take turns too often).
const PIPE_BYTES: i32 = 1 << 20;
/// How often the accept loop looks whether the restore ended without
/// connecting.
const ACCEPT_POLL: Duration = Duration::from_millis(1);

/// Where a streamed restore's images come from.
pub trait ImageSource: Sync {
    type Error: std::error::Error + Send + Sync + 'static;
    fn has(&self, name: &str) -> bool;
    /// Writes the whole image to `out`, checked on the way; returns its size.
    fn write_image(&self, name: &str, out: &mut dyn ImageSink) -> Result<u64, Self::Error>;
}

/// Where an image is written: CRIU's pipe (pages go in by reference, see
/// [`PagePipe`]), or memory.
pub trait ImageSink: Write {
    /// Sends `segments` in order.
    fn send_pages(&mut self, segments: &[Segment]) -> io::Result<()>;
}

impl ImageSink for PagePipe {
    fn send_pages(&mut self, segments: &[Segment]) -> io::Result<()> {
        self.send(segments)
    }
}

impl ImageSink for Vec<u8> {
    fn send_pages(&mut self, segments: &[Segment]) -> io::Result<()> {
        for s in segments {
            match s {
                Segment::Zeros(n) => self.resize(self.len() + n, 0),
                Segment::Buf(b, r) => self.extend_from_slice(&b[r.clone()]),
            }
        }
        Ok(())
    }
}

/// What a streamer served.
#[derive(Debug, Clone, Default)]
pub struct Served {
    pub files: usize,
    pub bytes: u64,
    /// From CRIU's first request to the last image written.
    pub wall: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError<E: std::error::Error + 'static> {
    #[error("image streamer socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("image streamer: {what}: {source}")]
    Protocol { what: String, source: io::Error },
    #[error("image streamer: cannot produce {name}: {source}")]
    Source { name: String, source: E },
}

/// A listening streamer; its socket is removed when dropped.
pub struct Streamer {
    socket: CriuSocket,
}

/// The socket a CRIU connects to in its images directory (either mode);
/// removed when dropped.
pub(super) struct CriuSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl CriuSocket {
    /// Binds a non-blocking listener on `name` in `images_dir`.
    pub(super) fn bind<E: std::error::Error>(
        images_dir: &Path,
        name: &str,
    ) -> Result<CriuSocket, StreamError<E>> {
        let path = images_dir.join(name);
        let fail = |source| StreamError::Socket {
            path: path.clone(),
            source,
        };
        let listener = UnixListener::bind(&path).map_err(fail)?;
        listener.set_nonblocking(true).map_err(fail)?;
        Ok(CriuSocket { listener, path })
    }

    /// CRIU's connection, in blocking mode; None if `ended` was set before
    /// CRIU connected (its dump or restore failed early).
    pub(super) fn accept<E: std::error::Error>(
        &self,
        ended: &AtomicBool,
    ) -> Result<Option<UnixStream>, StreamError<E>> {
        let fail = |source| StreamError::Socket {
            path: self.path.clone(),
            source,
        };
        loop {
            match self.listener.accept() {
                Ok((conn, _)) => {
                    conn.set_nonblocking(false).map_err(fail)?;
                    return Ok(Some(conn));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if ended.load(Ordering::Acquire) {
                        return Ok(None);
                    }
                    std::thread::sleep(ACCEPT_POLL);
                }
                Err(e) => return Err(fail(e)),
            }
        }
    }
}

impl Drop for CriuSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Streamer {
    /// Listens on [`SERVE_SOCKET`] in `images_dir`.
    pub fn listen<E: std::error::Error>(images_dir: &Path) -> Result<Streamer, StreamError<E>> {
        let socket = CriuSocket::bind(images_dir, SERVE_SOCKET)?;
        Ok(Streamer { socket })
    }

    /// Serves one CRIU until it closes the connection. Returns at once with
    /// nothing served if `ended` is set before CRIU connected (the restore
    /// failed early). A source error closes the connection: CRIU's restore
    /// then fails and kills what it had restored.
    pub fn serve<S: ImageSource>(
        &self,
        source: &S,
        ended: &AtomicBool,
    ) -> Result<Served, StreamError<S::Error>> {
        let Some(mut conn) = self.socket.accept(ended)? else {
            return Ok(Served::default());
        };
        let proto = protocol_error;
        let mut served = Served::default();
        let mut start = None;
        while let Some(name) = read_request(&mut conn).map_err(proto("read a request"))? {
            let start = *start.get_or_insert_with(Instant::now);
            let exists = source.has(&name);
            let reply = pb::ImgStreamerReplyEntry { exists };
            write_framed(&mut conn, &reply.encode_to_vec()).map_err(proto("reply"))?;
            if !exists {
                continue;
            }
            let pipe = crate::sys::unix_fd::recv_one_fd(&conn)
                .map_err(proto(&format!("receive the pipe for {name}")))?;
            let _ = nix::fcntl::fcntl(&pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
            let mut out = PagePipe::new(File::from(pipe));
            let n = source
                .write_image(&name, &mut out)
                .map_err(|source| StreamError::Source {
                    name: name.clone(),
                    source,
                })?;
            served.files += 1;
            served.bytes += n;
            served.wall = start.elapsed();
        }
        Ok(served)
    }
}

/// Maps an I/O error of the exchange with CRIU to a [`StreamError`] saying
/// what was being done.
pub(super) fn protocol_error<E: std::error::Error>(
    what: &str,
) -> impl Fn(io::Error) -> StreamError<E> {
    let what = what.to_string();
    move |source| StreamError::Protocol {
        what: what.clone(),
        source,
    }
}

/// The next requested file name; None when CRIU closed the connection.
pub(super) fn read_request(conn: &mut UnixStream) -> io::Result<Option<String>> {
    let mut len = [0u8; 4];
    match conn.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a request of {len} bytes"),
        ));
    }
    let mut msg = vec![0u8; len as usize];
    conn.read_exact(&mut msg)?;
    let req = pb::ImgStreamerRequestEntry::decode(msg.as_slice())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some(req.filename))
}

fn write_framed(conn: &mut UnixStream, msg: &[u8]) -> io::Result<()> {
    let mut framed = Vec::with_capacity(4 + msg.len());
    framed.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    framed.extend_from_slice(msg);
    conn.write_all(&framed)
}
