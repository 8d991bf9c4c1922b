//! Reading another process's memory while it runs (pre-copy without
//! soft-dirty tracking): `/proc/PID/pagemap` says which pages are present,
//! `process_vm_readv` copies them.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

/// Pagemap entry bits: 63 present in RAM, 62 swapped out, 61 a file page
/// (or shared anonymous); bits 0-54 the page frame number (root only).
pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAPPED: u64 = 1 << 62;
pub const PM_FILE: u64 = 1 << 61;
pub const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// An open `/proc/PID/pagemap`.
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    pub fn open(pid: i32) -> io::Result<Pagemap> {
        Ok(Pagemap {
            file: File::open(format!("/proc/{pid}/pagemap"))?,
        })
    }

    /// The raw pagemap entry of each page of `[start, start + pages * 4096)`.
    pub fn entries(&self, start: u64, pages: usize, out: &mut Vec<u64>) -> io::Result<()> {
        let mut raw = vec![0u8; pages * 8];
        let offset = (start / crate::PAGE_SIZE as u64) * 8;
        let mut done = 0;
        while done < raw.len() {
            let n = self.file.read_at(&mut raw[done..], offset + done as u64)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        out.clear();
        out.extend(
            raw.chunks_exact(8)
                .map(|e| u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]])),
        );
        Ok(())
    }
}

/// The page frame number of the kernel's shared zero page (what a page
/// read but never written maps to; CRIU does not dump those), found the way
/// CRIU finds it: fault one in here and look it up. None when pagemap hides
/// frame numbers (not root).
pub fn zero_page_pfn() -> Option<u64> {
    static PFN: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *PFN.get_or_init(|| {
        let map = memmap2::MmapOptions::new()
            .len(crate::PAGE_SIZE)
            .map_anon()
            .ok()?;
        // Reading (never writing) faults in the shared zero page.
        let first = std::hint::black_box(map[0]);
        let _ = first;
        let me = Pagemap::open(std::process::id() as i32).ok()?;
        let mut e = Vec::new();
        me.entries(map.as_ptr() as u64, 1, &mut e).ok()?;
        let pfn = e.first()? & PM_PFN_MASK;
        (e[0] & PM_PRESENT != 0 && pfn != 0).then_some(pfn)
    })
}

/// Copies `buf.len()` bytes at `addr` in process `pid` into `buf`.
/// Returns the bytes copied (short when part of the range went away).
pub fn read(pid: i32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    let len = buf.len();
    let remote = [RemoteIoVec {
        base: addr as usize,
        len,
    }];
    let mut local = [io::IoSliceMut::new(buf)];
    process_vm_readv(Pid::from_raw(pid), &mut local, &remote).map_err(io::Error::from)
}
