//! Process file descriptors (`pidfd_open(2)`, `pidfd_send_signal(2)`): a
//! handle on one process that a reused pid can never redirect. The fencing
//! guard holds one per copy it may have to kill.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A descriptor referring to one process (or to nothing, once it is gone).
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// A pidfd for `pid` (close-on-exec).
    pub fn open(pid: i32) -> io::Result<PidFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just returned by the kernel and is
        // owned by nothing else.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Wraps a pidfd received from another process.
    pub fn from_owned(fd: OwnedFd) -> PidFd {
        PidFd(fd)
    }

    /// Sends SIGKILL to the process: Ok(true) if it was alive, Ok(false)
    /// if it was already gone. SIGKILL to the init of a pid namespace ends
    /// every process in it.
    pub fn kill(&self) -> io::Result<bool> {
        // SAFETY: the descriptor is valid for the call; a null siginfo and
        // flags 0 are what pidfd_send_signal(2) documents for a plain kill.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(true)
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_kills_its_process_and_not_a_later_one() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = PidFd::open(child.id() as i32).unwrap();
        assert!(fd.kill().unwrap());
        let status = child.wait().unwrap();
        assert!(!status.success());
        // Gone (and reaped): killing again is not an error.
        assert!(!fd.kill().unwrap());
    }
}
