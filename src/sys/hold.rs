//! Reading a pipe while keeping what went through it, without copying it.
//!
//! A streamed CRIU dump moves the dumped process's own pages into ferry's
//! pipe (CRIU's parasite `vmsplice`s them, CRIU `splice`s them on). Before
//! ferry reads a stretch of the pipe, [`HeldReader`] duplicates it with
//! `tee` into pipes of its own, which nobody reads: they hold references to
//! the same pages, so keeping a whole dump costs a few descriptors and no
//! copy, and the pages outlive the process they came from. Only if they are
//! needed (a migration that must restore where it started, or was asked to
//! keep its images) are they written out, with `splice`.
//!
//! The held bytes are what the pages are when written out: the caller keeps
//! them only while the process they came from cannot change them (stopped,
//! then killed).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, tee, FcntlArg, OFlag, SpliceFFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Capacities tried for a holding pipe, largest first. Above the system's
/// `pipe-max-size` (1 MiB by default) only CAP_SYS_RESOURCE is allowed
/// more; a pipe holds one page per slot, whatever the capacity in bytes.
const HOLD_PIPE_BYTES: [i32; 3] = [64 << 20, 16 << 20, 1 << 20];

/// Reads a pipe and keeps a copy-free duplicate of every byte read.
pub struct HeldReader {
    src: File,
    held: Held,
}

/// What a [`HeldReader`] kept: the bytes it read, in order.
#[derive(Default)]
pub struct Held {
    /// Full holding pipes (read ends only).
    sealed: Vec<OwnedFd>,
    /// The pipe being filled: (read end, write end).
    open: Option<(OwnedFd, OwnedFd)>,
    /// Whether the open pipe holds anything yet.
    open_used: bool,
    bytes: u64,
}

impl HeldReader {
    pub fn new(src: File) -> HeldReader {
        HeldReader {
            src,
            held: Held::default(),
        }
    }

    /// What was kept so far; the reader is done.
    pub fn into_held(self) -> Held {
        self.held
    }

    /// Reads up to `buf.len()` bytes, keeping them; 0 at the end of the
    /// pipe (every writer gone and nothing left).
    fn read_held(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            // Wait for data (or the end): `tee` must not block, because a
            // full holding pipe has no reader to make room.
            let mut fds = [PollFd::new(self.src.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let (_, w) = self.held.open_pipe()?;
            match tee(&self.src, w, buf.len(), SpliceFFlags::SPLICE_F_NONBLOCK) {
                Ok(0) => return Ok(0),
                Ok(n) => {
                    self.held.open_used = true;
                    self.held.bytes += n as u64;
                    // The bytes just duplicated are in the pipe: read them.
                    self.src.read_exact(&mut buf[..n])?;
                    return Ok(n);
                }
                // Data is there (poll said so) but did not fit: a full
                // holding pipe. An empty one refusing means the data went
                // (it cannot: this is the only reader) or poll woke early.
                Err(Errno::EAGAIN) if self.held.open_used => self.held.seal(),
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Read for HeldReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_held(buf)
    }
}

impl Held {
    /// Bytes kept.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The holding pipe being filled, opened if there is none.
    fn open_pipe(&mut self) -> io::Result<&(OwnedFd, OwnedFd)> {
        if self.open.is_none() {
            let (r, w) = match nix::unistd::pipe2(OFlag::O_CLOEXEC) {
                Ok(p) => p,
                Err(Errno::EMFILE) => {
                    // A pipe per MiB at the system's default size: a large
                    // dump needs more descriptors than the usual soft limit.
                    raise_fd_limit();
                    nix::unistd::pipe2(OFlag::O_CLOEXEC)?
                }
                Err(e) => return Err(e.into()),
            };
            for size in HOLD_PIPE_BYTES {
                if fcntl(&w, FcntlArg::F_SETPIPE_SZ(size)).is_ok() {
                    break;
                }
            }
            self.open = Some((r, w));
            self.open_used = false;
        }
        Ok(self.open.as_ref().expect("opened above"))
    }

    /// Closes the write end of the pipe being filled; it is full.
    fn seal(&mut self) {
        if let Some((r, _w)) = self.open.take() {
            self.sealed.push(r);
        }
        self.open_used = false;
    }

    /// Writes everything kept, in order, to `out` (where its file offset
    /// is); returns the bytes written.
    pub fn write_to(mut self, out: &File) -> io::Result<u64> {
        self.seal();
        let mut written = 0u64;
        for pipe in &self.sealed {
            loop {
                match splice(pipe, None, out, None, 1 << 30, SpliceFFlags::empty()) {
                    Ok(0) => break,
                    Ok(n) => written += n as u64,
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if written != self.bytes {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("{written} of {} held bytes written", self.bytes),
            ));
        }
        Ok(written)
    }
}

/// Raises the soft limit on open descriptors to the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Everything read comes out again, in order, once the source is gone.
    #[test]
    fn what_was_read_is_written_out_again_in_order() {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let data: Vec<u8> = (0..(5u32 << 20) + 123)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let writer = {
            let data = data.clone();
            std::thread::spawn(move || {
                let mut w = File::from(w);
                for chunk in data.chunks(100_000) {
                    w.write_all(chunk).unwrap();
                }
            })
        };
        let mut reader = HeldReader::new(File::from(r));
        let mut got = Vec::new();
        let mut buf = vec![0u8; 300_000];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        writer.join().unwrap();
        assert_eq!(got, data);
        let held = reader.into_held();
        assert_eq!(held.bytes(), data.len() as u64);
        let out = tempfile::tempfile().unwrap();
        assert_eq!(held.write_to(&out).unwrap(), data.len() as u64);
        let mut back = Vec::new();
        let mut out = out;
        use std::io::Seek;
        out.seek(io::SeekFrom::Start(0)).unwrap();
        out.read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }
}
