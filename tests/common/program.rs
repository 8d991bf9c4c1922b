//! An ordinary program to checkpoint and migrate: `file_counter.py` under
//! a shell that leads its own session (as a terminal's shell does; the
//! program itself never calls setsid()), stdio on /dev/null (its
//! descriptors are dumped with it: nothing that grows meanwhile).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The first child of process `pid` (a shell's program).
pub fn first_child(pid: u32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A program under a shell that leads its own session; killed (with the
/// shell) when dropped.
pub struct InSession {
    shell: Child,
    pub pid: i32,
}

impl InSession {
    /// Runs `python3 ARGS...` so, and waits until `ready()` holds.
    pub fn python<S: AsRef<OsStr>>(args: &[S], ready: impl Fn() -> bool) -> InSession {
        Self::python_to(args, Stdio::null(), ready)
    }

    /// The same with its stdout on `stdout`.
    pub fn python_to<S: AsRef<OsStr>>(
        args: &[S],
        stdout: Stdio,
        ready: impl Fn() -> bool,
    ) -> InSession {
        let shell = Command::new("setsid")
            .args(["sh", "-c", "python3 \"$@\" & wait $!", "sh"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            assert!(Instant::now() < deadline, "the program did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = first_child(shell.id());
        InSession { shell, pid }
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

impl Drop for InSession {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}

/// `file_counter.py`: counts in a file while it runs.
pub struct FileCounter {
    pub program: InSession,
    pub pid: i32,
    pub file: PathBuf,
}

impl FileCounter {
    /// Starts it, holding `mib` MiB of random bytes, and waits for its
    /// first count.
    pub fn start(dir: &Path, mib: u64) -> FileCounter {
        Self::start_to(dir, mib, Stdio::null())
    }

    /// The same with its stdout on `stdout`.
    pub fn start_to(dir: &Path, mib: u64, stdout: Stdio) -> FileCounter {
        let file = dir.join("count");
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/programs/file_counter.py"
        );
        let mib = mib.to_string();
        let args = [OsStr::new(script), file.as_os_str(), OsStr::new(&mib)];
        let program = InSession::python_to(&args, stdout, || count(&file) > 0);
        FileCounter {
            pid: program.pid,
            program,
            file,
        }
    }

    /// Its count now (0 before the first).
    pub fn count(&self) -> u64 {
        count(&self.file)
    }

    /// Whether the count goes on (by at least 5 within 5 s).
    pub fn counts_on(&self) -> bool {
        counts_on(&self.file)
    }

    pub fn state(&self) -> Option<String> {
        self.program.state()
    }

    pub fn reap_shell(&mut self) {
        self.program.reap_shell()
    }
}

/// Whether the count in `file` goes on (by at least 5 within 5 s).
fn counts_on(file: &Path) -> bool {
    let from = count(file);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if count(file) >= from + 5 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn count(file: &Path) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// `checked_memory.py`: random bytes with scattered zero pages that it can
/// check against their hash at start, a scratch buffer it keeps
/// rewriting, and a count in a file.
#[allow(dead_code)]
pub struct CheckedMemory {
    pub program: InSession,
    pub pid: i32,
    pub file: PathBuf,
}

#[allow(dead_code)]
impl CheckedMemory {
    pub fn start(dir: &Path, mib: u64) -> CheckedMemory {
        let file = dir.join("checked-count");
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/programs/checked_memory.py"
        );
        let mib = mib.to_string();
        let args = [OsStr::new(script), file.as_os_str(), OsStr::new(&mib)];
        let program = InSession::python(&args, || count(&file) > 0);
        CheckedMemory {
            pid: program.pid,
            program,
            file,
        }
    }

    pub fn count(&self) -> u64 {
        count(&self.file)
    }

    /// Whether the count goes on (by at least 5 within 5 s).
    pub fn counts_on(&self) -> bool {
        counts_on(&self.file)
    }

    /// Asks the program (wherever it runs now) to check its held bytes:
    /// Some("ok") when they hash as at start.
    pub fn verdict(&self) -> Option<String> {
        let mut v = self.file.as_os_str().to_owned();
        v.push(".verdict");
        let verdict = PathBuf::from(v);
        let _ = std::fs::remove_file(&verdict);
        let mut c = self.file.as_os_str().to_owned();
        c.push(".check");
        std::fs::write(PathBuf::from(c), b"").ok()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(s) = std::fs::read_to_string(&verdict) {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn state(&self) -> Option<String> {
        self.program.state()
    }

    pub fn reap_shell(&mut self) {
        self.program.reap_shell()
    }
}
