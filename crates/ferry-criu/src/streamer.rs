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
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use criu_proto as pb;
use prost::Message;

use ferry_sys::pipe::{PagePipe, Segment, Watch};

/// The socket a restoring CRIU connects to, in its images directory.
pub(crate) const SERVE_SOCKET: &str = "streamer-serve.sock";
/// Largest request ferry accepts (a file name).
const MAX_REQUEST: u32 = 4096;
/// Pipe capacity asked for each image (the default 64 KiB makes CRIU and
/// the streamer take turns too often).
const PIPE_BYTES: i32 = 1 << 20;
/// How often the accept loop looks whether the restore ended without
/// connecting.
const ACCEPT_POLL: Duration = Duration::from_millis(1);
/// How long CRIU may take nothing from an image's pipe before the restore
/// is abandoned: it reads each image as soon as it has asked for it, so
/// this only ever passes when it has stopped.
pub(crate) const STALL: Duration = Duration::from_secs(30);

/// Where a streamed restore's images come from.
pub trait ImageSource: Sync {
    type Error: std::error::Error + Send + Sync + 'static;
    fn has(&self, name: &str) -> bool;
    /// The bytes [`ImageSource::write_image`] will write for `name`, where
    /// known without producing them.
    fn size(&self, name: &str) -> Option<u64>;
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
    stall: Duration,
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
        Ok(Streamer {
            socket,
            stall: STALL,
        })
    }

    /// How long CRIU may take nothing from an image's pipe before the
    /// restore is abandoned (default [`STALL`]).
    #[cfg(test)]
    pub(crate) fn stall_limit(mut self, stall: Duration) -> Streamer {
        self.stall = stall;
        self
    }

    /// Serves one CRIU until it closes the connection. Returns at once with
    /// nothing served if `ended` is set before CRIU connected (the restore
    /// failed early).
    ///
    /// CRIU does not read each image to its end before asking for the next
    /// (it reads a pagemap's header, asks for the pages image, and only
    /// then reads the rest of the pagemap), so no image is written on the
    /// loop that answers requests unless it fits in its pipe: larger ones
    /// get a writer thread each, and the loop goes back to CRIU at once.
    ///
    /// A source error, or CRIU taking nothing from a pipe for the stall
    /// limit, ends the exchange: the connection is shut down and every
    /// pipe closed, so CRIU's restore fails and kills what it had
    /// restored; that error is returned.
    pub fn serve<S: ImageSource>(
        &self,
        source: &S,
        ended: &AtomicBool,
    ) -> Result<Served, StreamError<S::Error>> {
        let Some(conn) = self.socket.accept(ended)? else {
            return Ok(Served::default());
        };
        let shared = Shared {
            watch: Watch::new(self.stall),
            failure: Mutex::new(None),
            served: Mutex::new(Served::default()),
            first_request: OnceLock::new(),
            conn: conn
                .try_clone()
                .map_err(protocol_error("duplicate the connection"))?,
        };
        let answered = std::thread::scope(|s| {
            let answered = answer_requests(s, conn, source, &shared);
            if answered.is_err() {
                shared.abandon();
            }
            answered
        });
        if let Some(failed) = shared
            .failure
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
        {
            return Err(failed);
        }
        answered?;
        Ok(shared
            .served
            .into_inner()
            .unwrap_or_else(|p| p.into_inner()))
    }
}

/// What the request loop and the writer threads of one exchange share.
struct Shared<E: std::error::Error + 'static> {
    watch: Watch,
    /// The first writer's failure.
    failure: Mutex<Option<StreamError<E>>>,
    served: Mutex<Served>,
    first_request: OnceLock<Instant>,
    /// A second handle on CRIU's connection, to shut it down on failure.
    conn: UnixStream,
}

impl<E: std::error::Error + 'static> Shared<E> {
    /// Stops every writer and ends the exchange with CRIU.
    fn abandon(&self) {
        self.watch.cancel.store(true, Ordering::Release);
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
    }

    fn failed(&self) -> bool {
        self.watch.cancel.load(Ordering::Acquire)
    }

    /// Records a writer's failure (the first one is kept) and abandons
    /// the exchange. A writer stopped because the exchange was already
    /// abandoned records nothing: the cause is elsewhere.
    fn fail(&self, e: StreamError<E>) {
        if self.failed() {
            return;
        }
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(e);
        }
        self.abandon();
    }

    fn wrote(&self, bytes: u64) {
        if let Ok(mut s) = self.served.lock() {
            s.files += 1;
            s.bytes += bytes;
            if let Some(start) = self.first_request.get() {
                s.wall = s.wall.max(start.elapsed());
            }
        }
    }
}

/// Answers CRIU's requests until it closes the connection (or the exchange
/// is abandoned), handing each image that may not fit in its pipe to a
/// writer thread of `scope`.
fn answer_requests<'scope, 'env, S: ImageSource>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    mut conn: UnixStream,
    source: &'env S,
    shared: &'env Shared<S::Error>,
) -> Result<(), StreamError<S::Error>> {
    let proto = protocol_error;
    loop {
        let request = read_request(&mut conn);
        if shared.failed() {
            return Ok(()); // the writer's failure is the error
        }
        let Some(name) = request.map_err(proto("read a request"))? else {
            return Ok(());
        };
        shared.first_request.get_or_init(Instant::now);
        let exists = source.has(&name);
        let reply = pb::ImgStreamerReplyEntry { exists };
        write_framed(&mut conn, &reply.encode_to_vec()).map_err(proto("reply"))?;
        if !exists {
            continue;
        }
        let pipe = ferry_sys::unix_fd::recv_one_fd(&conn)
            .map_err(proto(&format!("receive the pipe for {name}")))?;
        grow_pipe(&pipe);
        let out = PagePipe::new(File::from(pipe), shared.watch.clone())
            .map_err(proto(&format!("set up the pipe for {name}")))?;
        // Half the capacity: a page sent from memory that is not
        // page-aligned may take two slots of the pipe.
        let fits = match (source.size(&name), out.capacity()) {
            (Some(size), Ok(capacity)) => size <= capacity as u64 / 2,
            _ => false,
        };
        if fits {
            write_one(source, &name, out, shared);
        } else {
            scope.spawn(move || write_one(source, &name, out, shared));
        }
    }
}

/// Writes image `name` into its pipe, which is closed afterwards; a failure
/// abandons the exchange.
fn write_one<S: ImageSource>(source: &S, name: &str, mut out: PagePipe, shared: &Shared<S::Error>) {
    match source.write_image(name, &mut out) {
        Ok(n) => shared.wrote(n),
        // CRIU closed this image before its end: it did not want the
        // rest, or it failed, which its own error will say.
        Err(e) if caused_by(&e, io::ErrorKind::BrokenPipe) => {
            tracing::debug!(name, "CRIU closed an image before its end")
        }
        Err(source) => shared.fail(StreamError::Source {
            name: name.to_string(),
            source,
        }),
    }
}

/// Whether `e`, or an error it was caused by, is an I/O error of `kind`.
pub fn caused_by(e: &(dyn std::error::Error + 'static), kind: io::ErrorKind) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == kind)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Asks for a pipe of [`PIPE_BYTES`], or of the largest size this host
/// allows an unprivileged process (`/proc/sys/fs/pipe-max-size`) where
/// that is refused; a pipe left at the default 64 KiB only makes CRIU and
/// the writer take turns more often.
fn grow_pipe(pipe: &std::os::fd::OwnedFd) {
    use nix::fcntl::{fcntl, FcntlArg};
    if fcntl(pipe, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES)).is_ok() {
        return;
    }
    let max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|&m| m < PIPE_BYTES);
    if let Some(max) = max {
        if let Err(e) = fcntl(pipe, FcntlArg::F_SETPIPE_SZ(max)) {
            tracing::debug!(error = %e, max, "cannot grow an image pipe");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::IoSlice;
    use std::os::fd::AsRawFd;
    use std::sync::mpsc;

    /// Images held in memory; `fail` names one that cannot be produced.
    struct Memory {
        images: HashMap<String, Vec<u8>>,
        fail: Option<String>,
    }

    impl ImageSource for Memory {
        type Error = io::Error;
        fn has(&self, name: &str) -> bool {
            self.images.contains_key(name)
        }
        fn size(&self, name: &str) -> Option<u64> {
            self.images.get(name).map(|b| b.len() as u64)
        }
        fn write_image(&self, name: &str, out: &mut dyn ImageSink) -> Result<u64, io::Error> {
            if self.fail.as_deref() == Some(name) {
                return Err(io::Error::other("this image is damaged"));
            }
            let bytes = &self.images[name];
            out.write_all(bytes)?;
            Ok(bytes.len() as u64)
        }
    }

    /// The restoring side of the protocol, as CRIU speaks it.
    struct FakeCriu(UnixStream);

    impl FakeCriu {
        fn connect(dir: &Path) -> FakeCriu {
            let conn = UnixStream::connect(dir.join(SERVE_SOCKET)).unwrap();
            // A streamer that stops answering fails the test, not hangs it.
            conn.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            FakeCriu(conn)
        }

        /// Asks for `name`; its pipe's read end if the streamer has it.
        fn open(&mut self, name: &str) -> io::Result<Option<std::io::PipeReader>> {
            let req = pb::ImgStreamerRequestEntry {
                filename: name.into(),
            };
            write_framed(&mut self.0, &req.encode_to_vec())?;
            let mut len = [0u8; 4];
            self.0.read_exact(&mut len)?;
            let mut msg = vec![0u8; u32::from_le_bytes(len) as usize];
            self.0.read_exact(&mut msg)?;
            let reply = pb::ImgStreamerReplyEntry::decode(msg.as_slice())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if !reply.exists {
                return Ok(None);
            }
            let (r, w) = std::io::pipe()?;
            let fds = [w.as_raw_fd()];
            nix::sys::socket::sendmsg::<()>(
                self.0.as_raw_fd(),
                &[IoSlice::new(&[0])],
                &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                nix::sys::socket::MsgFlags::empty(),
                None,
            )?;
            Ok(Some(r))
        }
    }

    fn image(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i / 4096) as u8 ^ seed).collect()
    }

    /// Serves `source` from a streamer in `dir` on a thread of its own.
    fn serving(
        dir: &Path,
        source: Memory,
        stall: Duration,
    ) -> mpsc::Receiver<Result<Served, StreamError<io::Error>>> {
        let streamer = Streamer::listen::<io::Error>(dir)
            .unwrap()
            .stall_limit(stall);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(streamer.serve(&source, &AtomicBool::new(false)));
        });
        rx
    }

    /// CRIU reads a pagemap's header, asks for the pages image and reads
    /// it whole, and only then reads the rest of the pagemap: a pagemap
    /// larger than its pipe must not hold the answer to the second request.
    #[test]
    fn an_image_larger_than_its_pipe_does_not_block_the_next_request() {
        let dir = tempfile::tempdir().unwrap();
        let (pagemap, pages) = (image(3 << 20, 1), image(5 << 20, 2));
        let source = Memory {
            images: HashMap::from([
                ("pagemap-1.img".to_string(), pagemap.clone()),
                ("pages-1.img".to_string(), pages.clone()),
                ("core-1.img".to_string(), image(100, 3)),
            ]),
            fail: None,
        };
        let served = serving(dir.path(), source, STALL);
        let mut criu = FakeCriu::connect(dir.path());
        let mut pm = criu.open("pagemap-1.img").unwrap().unwrap();
        let mut head = vec![0u8; 100];
        pm.read_exact(&mut head).unwrap();
        let mut pg = criu.open("pages-1.img").unwrap().unwrap();
        let mut got_pages = Vec::new();
        pg.read_to_end(&mut got_pages).unwrap();
        let mut rest = Vec::new();
        pm.read_to_end(&mut rest).unwrap();
        assert!(criu.open("absent.img").unwrap().is_none());
        let mut core = Vec::new();
        criu.open("core-1.img")
            .unwrap()
            .unwrap()
            .read_to_end(&mut core)
            .unwrap();
        drop(criu);
        assert!(got_pages == pages, "the pages image arrived changed");
        head.extend_from_slice(&rest);
        assert!(head == pagemap, "the pagemap arrived changed");
        assert_eq!(core.len(), 100);
        let served = served
            .recv_timeout(Duration::from_secs(20))
            .expect("the streamer did not end with the connection")
            .unwrap();
        assert_eq!(served.files, 3);
        assert_eq!(served.bytes, (8 << 20) + 100);
    }

    /// A CRIU that asks for an image and never reads it: the streamer gives
    /// up once the stall limit has passed, says why, and shuts the
    /// connection (CRIU's next read ends), instead of hanging.
    #[test]
    fn a_reader_that_stalls_ends_the_exchange_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let source = Memory {
            images: HashMap::from([("pages-1.img".to_string(), image(4 << 20, 5))]),
            fail: None,
        };
        let served = serving(dir.path(), source, Duration::from_millis(300));
        let mut criu = FakeCriu::connect(dir.path());
        let _unread = criu.open("pages-1.img").unwrap().unwrap();
        let err = served
            .recv_timeout(Duration::from_secs(20))
            .expect("a stalled reader hung the streamer")
            .unwrap_err();
        let text = format!("{err}: {:?}", err);
        assert!(text.contains("pages-1.img"), "{text}");
        assert!(text.contains("took nothing"), "{text}");
        let mut byte = [0u8; 1];
        assert_eq!(
            criu.0.read(&mut byte).unwrap(),
            0,
            "the connection stayed open"
        );
    }

    /// An image that cannot be produced ends the exchange with that error;
    /// CRIU sees its pipe end early and the connection close.
    #[test]
    fn a_source_error_ends_the_exchange() {
        let dir = tempfile::tempdir().unwrap();
        let source = Memory {
            images: HashMap::from([
                ("core-1.img".to_string(), image(100, 1)),
                ("pages-1.img".to_string(), image(2 << 20, 2)),
            ]),
            fail: Some("pages-1.img".into()),
        };
        let served = serving(dir.path(), source, STALL);
        let mut criu = FakeCriu::connect(dir.path());
        // An image closed before its end does not end the exchange.
        drop(criu.open("core-1.img").unwrap().unwrap());
        let mut core = Vec::new();
        let mut again = criu.open("core-1.img").unwrap().unwrap();
        again.read_to_end(&mut core).unwrap();
        assert_eq!(core.len(), 100);
        let mut pages = criu.open("pages-1.img").unwrap().unwrap();
        let mut got = Vec::new();
        pages.read_to_end(&mut got).unwrap();
        assert!(got.is_empty());
        let err = served
            .recv_timeout(Duration::from_secs(20))
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
        assert!(
            criu.open("core-1.img").is_err(),
            "the connection stayed open"
        );
    }
}
