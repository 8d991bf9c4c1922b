//! An ordinary program to checkpoint and migrate: `file_counter.py` under
//! a shell that leads its own session (as a terminal's shell does; the
//! program itself never calls setsid()), stdio on /dev/null (its
//! descriptors are dumped with it: nothing that grows meanwhile).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct FileCounter {
    shell: Child,
    pub pid: i32,
    pub file: PathBuf,
}

impl FileCounter {
    /// Starts it, holding `mib` MiB of random bytes, and waits for its
    /// first count.
    pub fn start(dir: &Path, mib: u64) -> FileCounter {
        let file = dir.join("count");
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/programs/file_counter.py"
        );
        let shell = Command::new("setsid")
            .args(["sh", "-c", "python3 \"$@\" & wait $!", "sh", script])
            .arg(&file)
            .arg(mib.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let sh = shell.id();
        let mut p = FileCounter {
            shell,
            pid: 0,
            file,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.count() == 0 {
            assert!(Instant::now() < deadline, "the program did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        p.pid = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        p
    }

    /// Its count now (0 before the first).
    pub fn count(&self) -> u64 {
        std::fs::read_to_string(&self.file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Whether the count goes on (by at least 5 within 5 s).
    pub fn counts_on(&self) -> bool {
        let from = self.count();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.count() >= from + 5 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Its state letter in /proc (None once it is gone).
    pub fn state(&self) -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        Some(
            stat.rsplit(')')
                .next()?
                .split_whitespace()
                .next()?
                .to_string(),
        )
    }

    /// Reaps the shell once the program is gone (dumped and killed).
    pub fn reap_shell(&mut self) {
        let _ = self.shell.wait();
    }
}

impl Drop for FileCounter {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}
