//! Thread scheduling priority.

use std::io;

/// Lowers the calling thread's priority to `nice` (0 normal .. 19 lowest;
/// Linux keeps nice values per thread). Background work that feeds a
/// single-threaded consumer (CRIU restoring memory) then gives way to it
/// whenever both want a CPU, instead of taking turns with it.
pub fn set_this_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority takes no pointers; PRIO_PROCESS with who = 0
    // names the calling thread on Linux.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lowers_only_the_calling_thread() {
        let before = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        std::thread::spawn(|| {
            super::set_this_thread_nice(5).unwrap();
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            // Field 19 is nice; the command name (field 2) has no spaces here.
            assert_eq!(stat.split_whitespace().nth(18), Some("5"));
        })
        .join()
        .unwrap();
        let after = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        assert_eq!(
            before.split_whitespace().nth(18),
            after.split_whitespace().nth(18)
        );
    }
}
