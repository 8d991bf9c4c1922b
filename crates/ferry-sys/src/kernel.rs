//! Kernel feature probes that ferry runs itself rather than trusting CRIU's:
//! soft-dirty tracking, userfaultfd and `PAGEMAP_SCAN`.
//!
//! Each probe exercises the feature on a page of ferry's own memory, so the
//! answer reflects what the running kernel really does (a kernel built
//! without `CONFIG_MEM_SOFT_DIRTY` accepts `clear_refs` but never sets the
//! bit; only a write followed by a pagemap read tells).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use memmap2::MmapMut;

use crate::PAGE_SIZE;

/// Bit 55 of a `/proc/PID/pagemap` entry: the page is soft-dirty.
const PAGEMAP_SOFT_DIRTY_BIT: u64 = 1 << 55;
/// Value written to `/proc/PID/clear_refs` to clear soft-dirty bits.
const CLEAR_REFS_SOFT_DIRTY: &[u8] = b"4";
/// Size of one `/proc/PID/pagemap` entry in bytes.
const PAGEMAP_ENTRY_BYTES: u64 = 8;

/// Does the kernel track soft-dirty pages (what CRIU's pre-dump and
/// `--track-mem` need)?
pub fn soft_dirty_tracking() -> io::Result<bool> {
    let mut page = MmapMut::map_anon(PAGE_SIZE)?;
    touch(&mut page, 1);
    OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")?
        .write_all(CLEAR_REFS_SOFT_DIRTY)?;
    touch(&mut page, 2);
    let entry = pagemap_entry(page.as_ptr() as u64)?;
    Ok(entry & PAGEMAP_SOFT_DIRTY_BIT != 0)
}

fn touch(page: &mut MmapMut, value: u8) {
    let ptr = page.as_mut_ptr();
    // SAFETY: `ptr` points at the first byte of a live, writable mapping of
    // PAGE_SIZE bytes owned by `page`; a volatile store keeps the compiler
    // from eliding the write the probe depends on.
    unsafe { std::ptr::write_volatile(ptr, value) };
}

fn pagemap_entry(vaddr: u64) -> io::Result<u64> {
    let file = File::open("/proc/self/pagemap")?;
    let mut buf = [0u8; PAGEMAP_ENTRY_BYTES as usize];
    file.read_exact_at(&mut buf, vaddr / PAGE_SIZE as u64 * PAGEMAP_ENTRY_BYTES)?;
    Ok(u64::from_le_bytes(buf))
}

/// What `UFFDIO_API` says about this kernel's userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserfaultfdInfo {
    /// Feature bits (`UFFD_FEATURE_*`).
    pub features: u64,
}

/// `UFFD_FEATURE_EVENT_FORK | EVENT_REMAP | EVENT_REMOVE | EVENT_UNMAP`:
/// what CRIU's lazy-pages daemon needs to follow a restored process.
const UFFD_NON_COOPERATIVE: u64 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6);
const UFFD_API: u64 = 0xAA;

impl UserfaultfdInfo {
    /// The non-cooperative events CRIU's lazy restore relies on are present.
    pub fn non_cooperative(&self) -> bool {
        self.features & UFFD_NON_COOPERATIVE == UFFD_NON_COOPERATIVE
    }
}

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);

/// Opens a userfaultfd and performs the `UFFDIO_API` handshake.
pub fn userfaultfd() -> io::Result<UserfaultfdInfo> {
    // SAFETY: userfaultfd(2) takes only flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall succeeded, so `fd` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: `fd` is a userfaultfd and `api` is a properly laid out
    // `struct uffdio_api` that lives across the call.
    unsafe { uffdio_api(fd.as_raw_fd(), &mut api) }.map_err(io::Error::from)?;
    Ok(UserfaultfdInfo {
        features: api.features,
    })
}

/// `struct pm_scan_arg` from `<linux/fs.h>` (Linux 6.7+).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region` from `<linux/fs.h>`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const PAGE_IS_PRESENT: u64 = 1 << 3;

nix::ioctl_readwrite!(pagemap_scan_ioctl, b'f', 16, PmScanArg);

/// Does `/proc/PID/pagemap` answer the `PAGEMAP_SCAN` ioctl? Checked by
/// scanning one present page of ferry's own memory.
pub fn pagemap_scan() -> io::Result<bool> {
    let mut page = MmapMut::map_anon(PAGE_SIZE)?;
    touch(&mut page, 1);
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut regions = [PageRegion::default(); 4];
    let start = page.as_ptr() as u64;
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        start,
        end: start + PAGE_SIZE as u64,
        vec: regions.as_mut_ptr() as u64,
        vec_len: regions.len() as u64,
        category_anyof_mask: PAGE_IS_PRESENT,
        return_mask: PAGE_IS_PRESENT,
        ..PmScanArg::default()
    };
    // SAFETY: `arg` is a valid `struct pm_scan_arg` whose `vec` points at
    // `regions`, an array of `vec_len` `struct page_region`s that outlives the
    // call; the range lies inside the live mapping `page`.
    match unsafe { pagemap_scan_ioctl(pagemap.as_raw_fd(), &mut arg) } {
        Ok(found) => Ok(found == 1 && regions[0].categories & PAGE_IS_PRESENT != 0),
        Err(nix::errno::Errno::ENOTTY) | Err(nix::errno::Errno::EINVAL) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
