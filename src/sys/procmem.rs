//! Reading another process's memory while it runs (pre-copy without
//! soft-dirty tracking): `/proc/PID/pagemap` says which pages are present,
//! `process_vm_readv` copies them.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

/// Pagemap entry bit 63: page present in RAM; bit 62: swapped out.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

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

    /// For each page of `[start, start + pages * 4096)`: whether it holds
    /// data (present or swapped; pages never touched are neither).
    pub fn populated(&self, start: u64, pages: usize, out: &mut Vec<bool>) -> io::Result<()> {
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
        out.extend(raw.chunks_exact(8).map(|e| {
            let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            v & (PM_PRESENT | PM_SWAPPED) != 0
        }));
        Ok(())
    }
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
