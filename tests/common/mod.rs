//! Helpers shared by the end-to-end tests. They drive the real `ferry` binary
//! against the real CRIU, and the real bundled workload. A missing CRIU fails
//! the test with the reason; nothing is skipped.

#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub mod agent;
pub mod containers;
pub mod dockerd;
pub mod etcd;
pub mod files;
pub mod program;

use ferry_lab::workload::{Launch, Workload};

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
pub const WORKLOAD: &str = env!("CARGO_BIN_EXE_ferry-workload");

/// Generous bound for a workload to fill small memory and start counting.
pub const READY: Duration = Duration::from_secs(60);
/// Generous bound for a restored workload to report again.
pub const CONTINUE: Duration = Duration::from_secs(30);

/// Fails the test, with the remedy, when CRIU is not installed.
pub fn require_criu() {
    let found = ferry_sys::which("criu").is_some() || std::env::var_os("FERRY_CRIU").is_some();
    assert!(
        found,
        "CRIU is not installed: these tests need the real CRIU >= 4 (run scripts/setup.sh as root)"
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests drive CRIU and must run as root"
    );
}

/// A finished `ferry` run, with everything needed to explain a failure.
pub struct Run {
    pub args: Vec<String>,
    pub output: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }
    fn report(&self) -> String {
        format!(
            "ferry {}\nexit: {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.args.join(" "),
            self.output.status,
            self.stdout(),
            self.stderr()
        )
    }
    /// Asserts success and returns stdout.
    pub fn ok(&self) -> String {
        assert!(
            self.output.status.success(),
            "expected success:\n{}",
            self.report()
        );
        self.stdout()
    }
    /// Asserts failure with `code` and returns stderr.
    pub fn fails_with(&self, code: i32) -> String {
        assert_eq!(
            self.code(),
            Some(code),
            "expected exit {code}:\n{}",
            self.report()
        );
        self.stderr()
    }
    pub fn json(&self) -> serde_json::Value {
        let out = self.ok();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.report()))
    }
}

/// A `ferry` command line being built.
pub struct Cmd {
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    netns: Option<String>,
}

/// Starts a `ferry` command line.
/// Where ferry processes the tests start keep their state (the migration
/// costs they learn), apart from the host's.
pub fn test_state_dir() -> std::path::PathBuf {
    std::env::temp_dir().join("ferry-test-state")
}

pub fn ferry<I, S>(args: I) -> Cmd
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Cmd {
        args: args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect(),
        // The tests consent to a predicted miss of --max-downtime: their
        // frozen times on this VM, in debug builds, promise nothing (the
        // promise has tests of its own, which clear this).
        // Nor do they teach this host's migration costs: those the tests
        // learn stay in a directory of their own (one file, written whole).
        env: vec![
            ("FERRY_ACCEPT_DOWNTIME_MISS".into(), "1".into()),
            (
                "FERRY_STATE_DIR".into(),
                test_state_dir().display().to_string(),
            ),
        ],
        netns: None,
    }
}

impl Cmd {
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Cmd {
        self.args.push(a.as_ref().to_os_string());
        self
    }
    pub fn args_from<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Cmd {
        self.env.push((k.into(), v.into()));
        self
    }
    /// Runs inside a network namespace (`nsenter --net`).
    pub fn netns(mut self, ns: &str) -> Cmd {
        self.netns = Some(ns.into());
        self
    }
    pub fn run(self) -> Run {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).args(["--", FERRY]);
                c
            }
            None => Command::new(FERRY),
        };
        let output = cmd
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap_or_else(|e| panic!("cannot run {FERRY}: {e}"));
        Run {
            args: self
                .args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            output,
        }
    }
    /// Starts it without waiting (stdout and stderr collected).
    pub fn spawn(self) -> Running {
        assert!(self.netns.is_none(), "spawn runs on this host only");
        let child = Command::new(FERRY)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {FERRY}: {e}"));
        Running {
            args: self
                .args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            child,
        }
    }
    pub fn ok(self) -> String {
        self.run().ok()
    }
    pub fn json(self) -> serde_json::Value {
        self.run().json()
    }
    pub fn fails_with(self, code: i32) -> String {
        self.run().fails_with(code)
    }
}

/// A `ferry` started by [`Cmd::spawn`].
pub struct Running {
    args: Vec<String>,
    pub child: std::process::Child,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }
    pub fn wait(self) -> Run {
        let output = self.child.wait_with_output().expect("wait for ferry");
        Run {
            args: self.args,
            output,
        }
    }
}

/// A scratch directory for one test, removed afterwards.
pub fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("ferry-test-{name}-"))
        .tempdir()
        .expect("create scratch dir")
}

/// Starts a workload of `size_mib` reporting into `dir/report`, ready.
pub fn start_workload(dir: &Path, size_mib: u64) -> Workload {
    start_with(Launch::new(WORKLOAD, size_mib, dir.join("report")))
}

pub fn start_with(launch: Launch) -> Workload {
    let mut w = launch.spawn().expect("spawn ferry-workload");
    w.wait_ready(READY).expect("workload ready");
    w
}

pub fn images(dir: &Path) -> PathBuf {
    dir.join("images")
}

/// Asserts the workload runs and keeps counting (not frozen, not dead).
pub fn assert_counting(w: &Workload) {
    assert!(w.is_alive(), "workload pid {} is not alive", w.pid());
    let state = ferry_image::process::ProcessInfo::read(w.pid()).expect("read workload state");
    assert!(
        !state.is_stopped(),
        "workload pid {} is stopped: {state:?}",
        w.pid()
    );
    let now = w.report().expect("report").counter;
    w.wait_counter_above(now + 20, CONTINUE)
        .unwrap_or_else(|e| panic!("workload pid {} stopped counting at {now}: {e}", w.pid()));
}

/// `ferry migrate --json` of an ordinary program (a shell job: its
/// terminal or /dev/null stays behind) to the agent at `to`.
pub fn migrate_shell_job(pid: i32, to: &str, key: &Path) -> Run {
    ferry(["migrate", "--shell-job", "--json", "--timeout", "20s"])
        .args_from(["--pid", &pid.to_string(), "--to", to])
        .arg("--key")
        .arg(key)
        .run()
}

/// The processes of this workload (by its report file): all of them, or
/// only those not stopped (a restored copy waits stopped for its commit).
pub fn workload_copies(dir: &Path, running_only: bool) -> Vec<i32> {
    let out = std::process::Command::new("pgrep")
        .args([
            "-f",
            &format!("^[^ ]*ferry-workload .*{}", dir.join("report").display()),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|&p: &i32| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
            !running_only || !matches!(state, Some(Some('T' | 't' | 'Z')) | None)
        })
        .collect()
}
