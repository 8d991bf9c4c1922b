//! Restores from archives of an ordinary program (not ferry's workload): a
//! Python script that never calls setsid(), maps anonymous memory with
//! plain mmap and lays its zero pages out in each way a restore meets
//! (tests/programs/zero_layout.py). Each is dumped straight to an archive,
//! restored from it (leaving zero pages out as ferry decides), goes on
//! counting, and checks every page of its memory. The fragmented layouts
//! run at 1 GiB: a pagemap rewritten around their zero pages is larger
//! than any pipe CRIU reads it from, which once hung the restore.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PROGRAM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/programs/zero_layout.py");
/// Generous bound for Python to fill 1 GiB page by page.
const FILLED: Duration = Duration::from_secs(180);
/// Generous bound for Python to compare 1 GiB page by page.
const VERIFIED: Duration = Duration::from_secs(180);

/// The program, running; killed when dropped.
struct Program {
    child: Option<Child>,
    pid: i32,
    report: PathBuf,
}

impl Program {
    fn start(dir: &Path, mib: u64, layout: &str) -> Program {
        require_python();
        let report = dir.join("report");
        // As from a terminal: a shell leads the session, the program runs
        // under it in that session (it never calls setsid() itself), and
        // the shell exits with its status.
        let mut child = Command::new("setsid")
            .args(["sh", "-c", "python3 \"$@\" & wait $!", "sh", PROGRAM])
            .arg(mib.to_string())
            .arg(layout)
            .arg(&report)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3 {PROGRAM}: {e}"));
        let shell = child.id();
        let children = format!("/proc/{shell}/task/{shell}/children");
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            let found = std::fs::read_to_string(&children)
                .ok()
                .and_then(|c| c.split_whitespace().next()?.parse::<i32>().ok());
            if let Some(pid) = found {
                break pid;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the shell did not start python3 {PROGRAM}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let p = Program {
            child: Some(child),
            pid,
            report,
        };
        p.wait_counter_above(0, FILLED);
        p
    }

    /// The report: (counter, last verification: "-", "ok" or "bad").
    fn report(&self) -> Option<(u64, String)> {
        let text = std::fs::read_to_string(&self.report).ok()?;
        let mut words = text.split_whitespace();
        let counter = words.next()?.parse().ok()?;
        Some((counter, words.next()?.to_string()))
    }

    fn wait_counter_above(&self, n: u64, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            if let Some((c, _)) = self.report().filter(|(c, _)| *c > n) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "pid {} did not count past {n} within {within:?} (report: {:?})",
                self.pid,
                self.report()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks the program to check every page; true if all were as written.
    fn memory_ok(&self) -> bool {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .unwrap();
        let deadline = Instant::now() + VERIFIED;
        loop {
            match self.report() {
                Some((_, v)) if v == "ok" => return true,
                Some((_, v)) if v == "bad" => return false,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "pid {} did not check its memory within {VERIFIED:?}",
                self.pid
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Reaps the program once a stop-mode dump has killed it.
    fn reap_dumped(&mut self) {
        if let Some(mut c) = self.child.take() {
            let status = c.wait().unwrap();
            assert!(!status.success(), "the dumped program exited by itself");
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        } else {
            // A restored program's parent is init, which reaps it later.
            ferry_image::process::wait_pid_free(self.pid, Duration::from_secs(30));
        }
    }
}

fn require_python() {
    let found = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "python3 is not installed: these tests run an ordinary Python program (run scripts/setup.sh as root)"
    );
}

/// Dumps the program to an archive, restores it from there, and checks
/// that it goes on counting with every page as it wrote it. Returns the
/// restore's report.
fn round_trip(name: &str, mib: u64, layout: &str) -> serde_json::Value {
    require_criu();
    let dir = scratch(name);
    let mut p = Program::start(dir.path(), mib, layout);
    assert!(
        p.memory_ok(),
        "the program's memory is wrong before any dump"
    );
    let a = dir.path().join("layout.ferry");
    ferry(["dump", "--shell-job", "-t", &p.pid.to_string(), "--archive"])
        .arg(&a)
        .ok();
    p.reap_dumped();
    let (at_dump, _) = p.report().unwrap();
    let run = ferry(["restore", "--shell-job", "--json", "--archive"])
        .arg(&a)
        .json();
    // CRIU restores the program under its own pid (now free again).
    assert_eq!(run["pid"].as_i64(), Some(i64::from(p.pid)), "{run}");
    p.wait_counter_above(at_dump + 20, CONTINUE);
    assert!(
        p.memory_ok(),
        "the restored program's memory differs ({layout}, {mib} MiB)"
    );
    p.wait_counter_above(p.report().unwrap().0 + 20, CONTINUE);
    run
}

fn left_out(run: &serde_json::Value) -> u64 {
    run["unpack"]["zero_pages_left_out"].as_u64().unwrap()
}

#[test]
fn every_other_page_zero_at_1_gib() {
    let run = round_trip("layout-every2", 1024, "every-2");
    // Single zero pages inside ranges cost CRIU more left out than
    // written: of the 131,072 only those at the edges of ranges are left
    // out (with some of the interpreter's own).
    assert!(left_out(&run) < 8_192, "{run}");
}

#[test]
fn every_fourth_page_zero_at_1_gib() {
    let run = round_trip("layout-every4", 1024, "every-4");
    assert!(left_out(&run) < 8_192, "{run}");
}

#[test]
fn randomly_placed_zero_pages_at_1_gib() {
    let run = round_trip("layout-random", 1024, "random");
    // Runs of four or more (about one in twenty of the 65,536) go.
    assert!(left_out(&run) > 0, "{run}");
}

#[test]
fn no_zero_pages() {
    let run = round_trip("layout-none", 64, "none");
    // Only some of the interpreter's own.
    assert!(left_out(&run) < 1_024, "{run}");
}

#[test]
fn all_pages_zero() {
    let run = round_trip("layout-all", 64, "all");
    assert!(left_out(&run) >= 16_384, "{run}");
}

#[test]
fn one_huge_run_of_zero_pages() {
    let run = round_trip("layout-one-run", 256, "one-run");
    assert!(left_out(&run) >= 32_768, "{run}");
}
