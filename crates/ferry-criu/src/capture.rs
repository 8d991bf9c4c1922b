//! The capturing half of CRIU's image streamer protocol: a dump with
//! `--stream` writes its images to ferry instead of an images directory.
//!
//! CRIU connects to [`CAPTURE_SOCKET`] in its images directory and, for each
//! image it creates, sends the file name (`img_streamer_request_entry`,
//! framed as in [`super::streamer`]) and then the read end of a fresh pipe
//! (`SCM_RIGHTS`); it writes the image into the pipe and closes it. Unlike a
//! restore, a dump keeps several images open at once (a process's pagemap
//! while its pages go out, the files image for the whole dump): each image
//! is read by a thread of its own, or CRIU and ferry would wait on each
//! other. CRIU moves pages into the pipe with `splice`, so a streamed dump
//! never writes the process memory anywhere: ferry reads it straight from
//! the pipe. CRIU's log and `stats-dump` are still written to the directory.

#![forbid(unsafe_code)]

use std::fs::File;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::streamer::{protocol_error, read_request, CriuSocket, StreamError};

/// The socket a dumping CRIU connects to, in its images directory.
pub const CAPTURE_SOCKET: &str = "streamer-capture.sock";
/// Pipe capacity asked for each image (as for serving, the default 64 KiB
/// makes CRIU and ferry take turns too often).
const PIPE_BYTES: i32 = 1 << 20;

/// Where a streamed dump's images go.
pub trait ImageCapture: Sync {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Takes the whole image `name`: reads `pipe` until CRIU closes it.
    /// Returning early (an error) breaks the pipe, and CRIU's dump fails.
    fn capture(&self, name: &str, pipe: File) -> Result<u64, Self::Error>;
}

/// What a capture took.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    pub files: usize,
    pub bytes: u64,
    /// From CRIU's first image to the last one taken.
    pub wall: Duration,
}

/// A listening capture; its socket is removed when dropped.
pub struct Capture {
    socket: CriuSocket,
}

impl Capture {
    /// Listens on [`CAPTURE_SOCKET`] in `images_dir`.
    pub fn listen<E: std::error::Error>(images_dir: &Path) -> Result<Capture, StreamError<E>> {
        let socket = CriuSocket::bind(images_dir, CAPTURE_SOCKET)?;
        Ok(Capture { socket })
    }

    /// Takes every image of one dump, until CRIU closes the connection and
    /// every image has been read to its end. Returns at once with nothing
    /// taken if `ended` is set before CRIU connected (the dump failed
    /// early). The first error is returned once every image thread ended.
    pub fn capture<C: ImageCapture>(
        &self,
        sink: &C,
        ended: &AtomicBool,
    ) -> Result<Captured, StreamError<C::Error>> {
        let Some(mut conn) = self.socket.accept(ended)? else {
            return Ok(Captured::default());
        };
        let proto = protocol_error;
        let start = Instant::now();
        std::thread::scope(|s| {
            let mut threads = Vec::new();
            let mut failed = None;
            loop {
                let name = match read_request(&mut conn) {
                    Ok(Some(name)) => name,
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(proto("read a request")(e));
                        break;
                    }
                };
                let pipe = match ferry_sys::unix_fd::recv_one_fd(&conn) {
                    Ok(p) => p,
                    Err(e) => {
                        failed = Some(proto(&format!("receive the pipe for {name}"))(e));
                        break;
                    }
                };
                let _ = nix::fcntl::fcntl(&pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
                threads.push(s.spawn(move || {
                    sink.capture(&name, File::from(pipe))
                        .map_err(|source| StreamError::Source { name, source })
                }));
            }
            // Closing the connection first: a CRIU still writing learns at
            // once that its images have nowhere to go.
            drop(conn);
            let mut captured = Captured::default();
            for t in threads {
                let done = t.join().unwrap_or_else(|_| {
                    Err(StreamError::Protocol {
                        what: "an image thread panicked".into(),
                        source: std::io::Error::other("panic"),
                    })
                });
                match done {
                    Ok(bytes) => {
                        captured.files += 1;
                        captured.bytes += bytes;
                    }
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            captured.wall = start.elapsed();
            match failed {
                Some(e) => Err(e),
                None => Ok(captured),
            }
        })
    }
}
