//! Handing pages to a pipe without copying them (`vmsplice`), safely.
//!
//! `vmsplice` puts references to the caller's pages in the pipe: the reader
//! copies them out later, so a page written to before the reader took it
//! would arrive changed. Pages are therefore sent from [`PageBuf`]s, shared
//! buffers that nobody writes while shared: [`PagePipe`] keeps a share of
//! each buffer it sent from until the reader must have taken every byte of
//! it (a pipe never holds more bytes than its capacity, so that is once at
//! least that many bytes have been sent after them), and a writer fills a
//! buffer again only when it is its sole owner (`Arc::get_mut`). Zero pages
//! are sent from a static zero block, which nothing ever writes.
//!
//! The pipe is written without blocking: where it is full, the writer waits
//! for room in short polls, so that it notices when the transfer is
//! abandoned ([`Watch::cancel`]) or when the reader has taken nothing for
//! [`Watch::stall`] (a stalled reader ends in an error, never a hang).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use nix::fcntl::{fcntl, FcntlArg, SpliceFFlags};

/// Zeros that zero pages are sent from, page-aligned so that each page of
/// them takes one slot of the pipe.
#[repr(C, align(4096))]
struct Zeros([u8; 64 << 10]);
static ZEROS: Zeros = Zeros([0; 64 << 10]);
/// Segments per `vmsplice` call (the kernel takes at most `IOV_MAX`).
const BATCH: usize = 1024;
/// How long a dropped [`PagePipe`] waits for its reader to take what is in
/// the pipe before it gives up the buffers for good (leaks them).
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// Longest single wait for room in a full pipe, so that a cancellation is
/// seen within this time.
const POLL_SLICE: Duration = Duration::from_millis(50);

/// When a writer gives up on a pipe.
#[derive(Debug, Clone)]
pub struct Watch {
    /// Set by whoever abandons the transfer: a writer waiting for room
    /// stops within [`POLL_SLICE`] with [`io::ErrorKind::ConnectionAborted`] (not `Interrupted`,
    /// which `write_all` would retry).
    pub cancel: Arc<AtomicBool>,
    /// How long the reader may take nothing from a full pipe before a write
    /// fails with [`io::ErrorKind::TimedOut`].
    pub stall: Duration,
}

impl Watch {
    /// A watch that is never cancelled, with this stall limit.
    pub fn new(stall: Duration) -> Watch {
        Watch {
            cancel: Arc::new(AtomicBool::new(false)),
            stall,
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }
}

/// Page-aligned memory that pages are sent from, shared while it may be in
/// a pipe.
pub type PageBuf = Arc<MmapMut>;

/// Fresh page-aligned memory of `len` bytes.
pub fn page_buffer(len: usize) -> io::Result<PageBuf> {
    MmapMut::map_anon(len).map(Arc::new)
}

/// A piece of what is sent: bytes of a buffer, or zeros.
#[derive(Debug, Clone)]
pub enum Segment {
    Buf(PageBuf, Range<usize>),
    Zeros(usize),
}

impl Segment {
    /// Appends `len` bytes at `at` of `buf` to `segments`, merged with the
    /// last segment where they continue it.
    pub fn push_buf(segments: &mut Vec<Segment>, buf: &PageBuf, at: usize, len: usize) {
        if let Some(Segment::Buf(b, r)) = segments.last_mut() {
            if Arc::ptr_eq(b, buf) && r.end == at {
                r.end += len;
                return;
            }
        }
        segments.push(Segment::Buf(buf.clone(), at..at + len));
    }

    /// Appends `len` zero bytes to `segments`.
    pub fn push_zeros(segments: &mut Vec<Segment>, len: usize) {
        match segments.last_mut() {
            Some(Segment::Zeros(n)) => *n += len,
            _ => segments.push(Segment::Zeros(len)),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Segment::Buf(_, r) => r.len(),
            Segment::Zeros(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The write end of a pipe that pages are spliced into.
pub struct PagePipe {
    pipe: File,
    watch: Watch,
    /// When the reader last made room (or the pipe was opened).
    last_room: Instant,
    /// Bytes sent so far.
    sent: u64,
    /// Shares of the buffers the reader may still be reading, with the
    /// offset just past their last byte sent.
    held: VecDeque<(Vec<PageBuf>, u64)>,
}

impl PagePipe {
    /// Takes the write end of a pipe, made non-blocking: writes wait for
    /// room as `watch` says.
    pub fn new(pipe: File, watch: Watch) -> io::Result<PagePipe> {
        let flags = fcntl(&pipe, FcntlArg::F_GETFL).map_err(io::Error::from)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        fcntl(&pipe, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
        Ok(PagePipe {
            pipe,
            watch,
            last_room: Instant::now(),
            sent: 0,
            held: VecDeque::new(),
        })
    }

    /// The pipe's capacity in bytes.
    pub fn capacity(&self) -> io::Result<usize> {
        fcntl(&self.pipe, FcntlArg::F_GETPIPE_SZ)
            .map(|n| n.max(0) as usize)
            .map_err(io::Error::from)
    }

    /// Waits until the pipe has room, the reader is gone (an error), the
    /// transfer is cancelled, or the reader has taken nothing for the
    /// watch's stall limit.
    fn wait_for_room(&mut self) -> io::Result<()> {
        loop {
            if self.watch.cancelled() {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the transfer was abandoned",
                ));
            }
            let waited = self.last_room.elapsed();
            if waited >= self.watch.stall {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the reader took nothing from a full pipe for {:.1} s",
                        waited.as_secs_f64()
                    ),
                ));
            }
            let slice = (self.watch.stall - waited).min(POLL_SLICE);
            match poll_out(&self.pipe, slice)? {
                Room::Yes => return Ok(()),
                Room::ReaderGone => return Err(io::ErrorKind::BrokenPipe.into()),
                Room::No => {}
            }
        }
    }

    /// Notes that the pipe took `n` bytes.
    fn took(&mut self, n: usize) {
        self.sent += n as u64;
        self.last_room = Instant::now();
    }

    /// Sends `segments` in order, by reference.
    pub fn send(&mut self, segments: &[Segment]) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(segments.len());
        let mut shares: Vec<PageBuf> = Vec::new();
        for s in segments {
            match s {
                Segment::Buf(b, r) => {
                    let bytes = b.get(r.clone()).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, "segment outside its buffer")
                    })?;
                    slices.push(IoSlice::new(bytes));
                    if !shares.iter().any(|h| Arc::ptr_eq(h, b)) {
                        shares.push(b.clone());
                    }
                }
                Segment::Zeros(mut n) => {
                    while n > 0 {
                        let k = n.min(ZEROS.0.len());
                        slices.push(IoSlice::new(&ZEROS.0[..k]));
                        n -= k;
                    }
                }
            }
        }
        let mut first = 0;
        let mut skip = 0usize; // bytes of slices[first] already sent
        while first < slices.len() {
            let end = (first + BATCH).min(slices.len());
            let mut batch: Vec<IoSlice<'_>> = slices[first..end].to_vec();
            batch[0] = IoSlice::new(&slices[first][skip..]);
            // SAFETY: vmsplice leaves references to these pages in the pipe,
            // read after this call returns. Nothing writes them meanwhile:
            // every buffer is shared by `shares`, kept in `self.held` until
            // at least the pipe's capacity in bytes has been sent after it
            // (or the pipe drained, see Drop), and writers fill a buffer only
            // as its sole owner; ZEROS is immutable. Should this call fail
            // after taking some pages, the shares are still held below.
            let spliced = unsafe {
                nix::fcntl::vmsplice(&self.pipe, &batch, SpliceFFlags::SPLICE_F_NONBLOCK)
            };
            let n = match spliced {
                Ok(0) => {
                    self.hold(shares);
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {
                    if let Err(e) = self.wait_for_room() {
                        self.hold(shares);
                        return Err(e);
                    }
                    continue;
                }
                Err(e) => {
                    self.hold(shares);
                    return Err(e.into());
                }
            };
            self.took(n);
            // A short write means the pipe is full: wait for the reader
            // rather than ask again at once.
            let short = n < batch.iter().map(|s| s.len()).sum::<usize>();
            let mut n = n;
            while n > 0 && first < slices.len() {
                let left = slices[first].len() - skip;
                if n >= left {
                    n -= left;
                    first += 1;
                    skip = 0;
                } else {
                    skip += n;
                    n = 0;
                }
            }
            if short && first < slices.len() {
                if let Err(e) = self.wait_for_room() {
                    self.hold(shares);
                    return Err(e);
                }
            }
        }
        self.hold(shares);
        // Asked each time: the reader may have resized the pipe.
        let capacity = self.capacity()? as u64;
        while self
            .held
            .front()
            .is_some_and(|(_, end)| end + capacity <= self.sent)
        {
            self.held.pop_front();
        }
        Ok(())
    }

    /// Keeps `shares` until the reader must have taken what was sent so far.
    fn hold(&mut self, shares: Vec<PageBuf>) {
        if !shares.is_empty() {
            self.held.push_back((shares, self.sent));
        }
    }

    /// Bytes in the pipe not yet read.
    fn unread(&self) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which points
        // to `n`, alive for the call.
        let r = unsafe { libc::ioctl(self.pipe.as_raw_fd(), libc::FIONREAD, &mut n) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.max(0) as usize)
    }

    /// Whether the read end is closed (nothing will be read any more).
    fn reader_gone(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.pipe.as_raw_fd(),
            events: 0,
            revents: 0,
        }];
        // SAFETY: poll reads and writes `fds`, one valid entry, for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        r > 0 && fds[0].revents & libc::POLLERR != 0
    }
}

impl Drop for PagePipe {
    /// Waits until the reader has taken what is in the pipe, or is gone,
    /// before the buffers are shared no more; past [`DRAIN_WAIT`] they are
    /// leaked rather than risk being written while still in the pipe.
    fn drop(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let deadline = Instant::now() + DRAIN_WAIT;
        loop {
            match self.unread() {
                Ok(0) => return,
                Ok(_) if self.watch.cancelled() => break,
                Ok(_) if !self.reader_gone() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(200))
                }
                Ok(_) if self.reader_gone() => return,
                _ => break,
            }
        }
        tracing::warn!("a pipe's reader did not take its last pages; their buffers are kept");
        std::mem::forget(std::mem::take(&mut self.held));
    }
}

impl io::Write for PagePipe {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        loop {
            match self.pipe.write(data) {
                Ok(n) => {
                    self.took(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait_for_room()?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a poll of a pipe's write end found.
enum Room {
    Yes,
    No,
    ReaderGone,
}

/// Waits up to `timeout` for room in the pipe `pipe` writes to.
fn poll_out(pipe: &File, timeout: Duration) -> io::Result<Room> {
    let mut fds = [libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    }];
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: poll reads and writes `fds`, one valid entry, for the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(Room::No)
        } else {
            Err(e)
        };
    }
    let revents = fds[0].revents;
    Ok(if revents & libc::POLLERR != 0 {
        Room::ReaderGone
    } else if revents & libc::POLLOUT != 0 {
        Room::Yes
    } else {
        Room::No
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Buffers refilled as soon as `Arc::get_mut` allows, while a slow
    /// reader drains the pipe: every byte arrives as it was when sent.
    #[test]
    fn a_buffer_is_free_again_only_once_the_reader_has_taken_it() {
        const PAGE: usize = 4096;
        const ROUNDS: usize = 300;
        let (mut r, w) = std::io::pipe().unwrap();
        let mut pipe = PagePipe::new(
            File::from(std::os::fd::OwnedFd::from(w)),
            Watch::new(Duration::from_secs(30)),
        )
        .unwrap();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = vec![0u8; 3 * PAGE + 100];
            loop {
                let n = r.read(&mut buf).unwrap();
                if n == 0 {
                    return all;
                }
                all.extend_from_slice(&buf[..n]);
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        let mut bufs: Vec<PageBuf> = Vec::new();
        let mut expected = Vec::new();
        for round in 0..ROUNDS {
            // A buffer nobody shares, refilled with this round's byte.
            let mut buf = match bufs.iter().position(|b| Arc::strong_count(b) == 1) {
                Some(i) => bufs.swap_remove(i),
                None => page_buffer(4 * PAGE).unwrap(),
            };
            Arc::get_mut(&mut buf).unwrap().fill(round as u8);
            let mut segs = Vec::new();
            Segment::push_buf(&mut segs, &buf, PAGE, 2 * PAGE);
            Segment::push_zeros(&mut segs, PAGE);
            Segment::push_buf(&mut segs, &buf, 0, 100);
            for s in &segs {
                expected.extend(std::iter::repeat_n(
                    if matches!(s, Segment::Zeros(_)) {
                        0
                    } else {
                        round as u8
                    },
                    s.len(),
                ));
            }
            pipe.send(&segs).unwrap();
            bufs.push(buf);
        }
        assert!(bufs.len() < ROUNDS, "buffers were never freed for reuse");
        drop(pipe);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "a page changed after it was sent");
    }

    /// A reader that takes nothing: the write fails once the stall limit
    /// has passed, naming the stall, instead of blocking for ever.
    #[test]
    fn a_reader_that_takes_nothing_fails_the_write_after_the_stall_limit() {
        let (_r, w) = std::io::pipe().unwrap();
        let stall = Duration::from_millis(300);
        let mut pipe =
            PagePipe::new(File::from(std::os::fd::OwnedFd::from(w)), Watch::new(stall)).unwrap();
        let buf = page_buffer(4 << 20).unwrap();
        let mut segs = Vec::new();
        Segment::push_buf(&mut segs, &buf, 0, 4 << 20);
        let start = Instant::now();
        let e = pipe.send(&segs).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(start.elapsed() >= stall && start.elapsed() < stall * 10);
        let e = io::Write::write_all(&mut pipe, &[1u8; 1 << 20]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        // The buffer stays shared: the pipe still holds its pages.
        assert!(Arc::strong_count(&buf) > 1);
        pipe.watch.cancel.store(true, Ordering::Release);
    }

    /// A writer waiting for room stops soon after the transfer is
    /// abandoned.
    #[test]
    fn a_cancelled_transfer_stops_a_waiting_writer() {
        let (_r, w) = std::io::pipe().unwrap();
        let watch = Watch::new(Duration::from_secs(60));
        let cancel = watch.cancel.clone();
        let mut pipe = PagePipe::new(File::from(std::os::fd::OwnedFd::from(w)), watch).unwrap();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            cancel.store(true, Ordering::Release);
        });
        let start = Instant::now();
        let e = io::Write::write_all(&mut pipe, &vec![7u8; 8 << 20]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
        stopper.join().unwrap();
    }

    /// A reader that closes its end: the writer gets a broken pipe.
    #[test]
    fn a_closed_reader_is_a_broken_pipe() {
        let (r, w) = std::io::pipe().unwrap();
        let mut pipe = PagePipe::new(
            File::from(std::os::fd::OwnedFd::from(w)),
            Watch::new(Duration::from_secs(60)),
        )
        .unwrap();
        drop(r);
        let e = io::Write::write_all(&mut pipe, &[1u8; 4096]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }
}
