//! Starting the bundled workload and watching it through its report.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::{Mix, Report};
use ferry_image::process;

/// The workload binary's name.
pub const EXE_NAME: &str = "ferry-workload";

/// Finds `ferry-workload`: beside the running executable, else on `$PATH`.
pub fn find_exe() -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(EXE_NAME)))
        .filter(|p| p.is_file());
    beside.or_else(|| ferry_sys::which(EXE_NAME))
}

/// How to start a workload.
#[derive(Debug, Clone)]
pub struct Launch {
    pub exe: PathBuf,
    pub size_mib: u64,
    pub mix: Mix,
    pub seed: u64,
    pub report: PathBuf,
    pub heartbeat: Option<SocketAddr>,
    pub children: u32,
    /// Fork a twin sharing the memory copy-on-write (`--twin`): it
    /// reports to [`Launch::twin_report`].
    pub twin: bool,
    pub tick_ms: u64,
    pub dirty_mib_s: f64,
    pub hold_tcp: Option<SocketAddr>,
    pub hold_unix: Option<PathBuf>,
    /// Run inside this network namespace (named as `ip netns` names it;
    /// entered with `nsenter`, which execs the workload: the pid is the
    /// workload's).
    pub netns: Option<String>,
    /// Run as the init of a pid namespace of its own (as a container's
    /// init is), under `unshare --pid --fork`: its pids need not be free
    /// for a restore on this kernel, it is restored in a new namespace.
    pub own_pid_ns: bool,
}

impl Launch {
    pub fn new(exe: impl Into<PathBuf>, size_mib: u64, report: impl Into<PathBuf>) -> Launch {
        Launch {
            exe: exe.into(),
            size_mib,
            mix: Mix::default(),
            seed: 1,
            report: report.into(),
            heartbeat: None,
            children: 0,
            twin: false,
            tick_ms: 1,
            dirty_mib_s: 0.0,
            hold_tcp: None,
            hold_unix: None,
            netns: None,
            own_pid_ns: false,
        }
    }

    /// Where a `--twin` workload's twin reports.
    pub fn twin_report(&self) -> PathBuf {
        let mut r = self.report.clone().into_os_string();
        r.push(".twin");
        PathBuf::from(r)
    }

    /// Starts the workload (its stdio on /dev/null, in a session of its own).
    pub fn spawn(&self) -> io::Result<Workload> {
        let mut prefix: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ns) = &self.netns {
            // nsenter, not `ip netns exec`: the latter also unshares the
            // mount namespace, which CRIU refuses to dump.
            prefix.extend([
                "nsenter".into(),
                format!("--net=/run/netns/{ns}").into(),
                "--".into(),
            ]);
        }
        if self.own_pid_ns {
            // The workload is unshare's child. Not `--kill-child`: CRIU
            // would restore that parent-death signal, and the restored
            // copy would die with its restorer.
            prefix.extend(["unshare", "--pid", "--fork", "--"].map(Into::into));
        }
        let mut cmd = match prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        cmd.arg("--size-mib")
            .arg(self.size_mib.to_string())
            .arg("--zero-pct")
            .arg(self.mix.zero_pct.to_string())
            .arg("--repeat-pct")
            .arg(self.mix.repeat_pct.to_string())
            .arg("--text-pct")
            .arg(self.mix.text_pct.to_string())
            .arg("--zero-layout")
            .arg(self.mix.zeros.to_string())
            .arg("--seed")
            .arg(self.seed.to_string())
            .arg("--report")
            .arg(&self.report)
            .arg("--tick-ms")
            .arg(self.tick_ms.to_string())
            .arg("--children")
            .arg(self.children.to_string())
            .arg("--dirty-mib-s")
            .arg(self.dirty_mib_s.to_string());
        if let Some(hb) = self.heartbeat {
            cmd.arg("--heartbeat").arg(hb.to_string());
        }
        if self.twin {
            cmd.arg("--twin");
        }
        if let Some(a) = self.hold_tcp {
            cmd.arg("--hold-tcp").arg(a.to_string());
        }
        if let Some(p) = &self.hold_unix {
            cmd.arg("--hold-unix").arg(p);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let pid = child.id() as i32;
        let mut w = Workload {
            pid,
            report: self.report.clone(),
            child: Some(child),
        };
        if self.own_pid_ns {
            w.pid = only_child(pid, Duration::from_secs(10))?;
        }
        Ok(w)
    }
}

/// A running workload: a child of ours, or a restored one we adopted by pid.
/// Dropping it kills it.
#[derive(Debug)]
pub struct Workload {
    pid: i32,
    report: PathBuf,
    child: Option<Child>,
}

impl Workload {
    /// Watches a workload that is not our child (e.g. a restored one).
    pub fn adopt(pid: i32, report: impl Into<PathBuf>) -> Workload {
        Workload {
            pid,
            report: report.into(),
            child: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The pid the workload reports: its own in its innermost pid
    /// namespace (1 when it is that namespace's init).
    fn reported_pid(&self) -> u32 {
        process::ns_pids(self.pid)
            .last()
            .copied()
            .unwrap_or(self.pid as u32)
    }

    pub fn report_path(&self) -> &Path {
        &self.report
    }

    /// Waits until the workload has filled its memory and counts.
    pub fn wait_ready(&mut self, timeout: Duration) -> io::Result<Report> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                return Err(io::Error::other(format!(
                    "workload pid {} exited before it was ready ({status})",
                    self.pid
                )));
            }
            if let Ok(r) = Report::read(&self.report) {
                if r.pid == self.reported_pid() && r.counter > 0 {
                    return Ok(r);
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("workload pid {} not ready after {timeout:?}", self.pid),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The latest report.
    pub fn report(&self) -> io::Result<Report> {
        Report::read_within(&self.report, Duration::from_secs(2))
    }

    /// Waits until the counter exceeds `value`.
    pub fn wait_counter_above(&self, value: u64, timeout: Duration) -> io::Result<Report> {
        Report::wait_for(&self.report, timeout, |r| r.counter > value)
    }

    /// Asks the workload to check every page of its memory (SIGUSR1) and
    /// waits for the answer.
    pub fn verify_memory(&self, timeout: Duration) -> io::Result<Report> {
        let before = self.report()?.verify_seq;
        process::signal(self.pid, Signal::SIGUSR1).map_err(io::Error::other)?;
        Report::wait_for(&self.report, timeout, |r| r.verify_seq > before)
    }

    /// Reaps our child after something else (a stop-mode dump) ended it.
    /// Returns false if it is still running after `timeout`.
    pub fn reap(&mut self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.exited()?.is_some() || (self.child.is_none() && !process::pid_in_use(self.pid))
            {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn exited(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        match &mut self.child {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// Is the workload process alive (not a zombie)?
    pub fn is_alive(&self) -> bool {
        process::is_alive(self.pid)
    }

    /// Stops the workload with SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let _ = process::signal(self.pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while self.is_alive() && Instant::now() < deadline {
            let _ = self.exited();
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.is_alive() {
            let _ = process::signal(self.pid, Signal::SIGKILL);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if self.is_alive() {
            let _ = process::signal(self.pid, Signal::SIGKILL);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

/// The one child of `parent` (the workload under `unshare`), once it exists.
fn only_child(parent: i32, timeout: Duration) -> io::Result<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().find_map(|p| p.parse().ok()) {
            return Ok(pid);
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("unshare (pid {parent}) started no workload within {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
