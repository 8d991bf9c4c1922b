//! A real `ferry agent` process for the migration tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::FERRY;

/// A running agent; killed (and reaped) when dropped.
pub struct AgentProc {
    pub child: Child,
    pub addr: String,
    pub store: PathBuf,
    pub key: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

/// Makes a shared secret in `dir/key` (once).
pub fn key(dir: &Path) -> PathBuf {
    let key = dir.join("key");
    if !key.exists() {
        super::ferry(["keygen"]).arg(&key).ok();
    }
    key
}

impl AgentProc {
    /// Starts `ferry agent` on `listen` (port 0: any), optionally inside a
    /// network namespace and with a fault point armed.
    pub fn start(dir: &Path, listen: &str, netns: Option<&str>, fault: Option<&str>) -> AgentProc {
        Self::start_with_store(dir, &dir.join("store"), listen, netns, fault)
    }

    /// An agent on loopback restoring containers into `runc_root`.
    pub fn start_runc(dir: &Path, runc_root: &Path) -> AgentProc {
        Self::start_full(
            dir,
            &dir.join("store"),
            "127.0.0.1:0",
            None,
            None,
            Some(runc_root),
        )
    }

    pub fn start_with_store(
        dir: &Path,
        store: &Path,
        listen: &str,
        netns: Option<&str>,
        fault: Option<&str>,
    ) -> AgentProc {
        Self::start_full(dir, store, listen, netns, fault, None)
    }

    pub fn start_full(
        dir: &Path,
        store: &Path,
        listen: &str,
        netns: Option<&str>,
        fault: Option<&str>,
        runc_root: Option<&Path>,
    ) -> AgentProc {
        Self::start_args(dir, store, listen, netns, fault, runc_root, &[])
    }

    /// An agent with further command-line arguments (e.g. HA membership).
    pub fn start_args(
        dir: &Path,
        store: &Path,
        listen: &str,
        netns: Option<&str>,
        fault: Option<&str>,
        runc_root: Option<&Path>,
        extra: &[String],
    ) -> AgentProc {
        Self::start_args_env(dir, store, listen, netns, fault, runc_root, extra, &[])
    }

    /// [`AgentProc::start_args`] with more environment for the agent.
    #[allow(clippy::too_many_arguments)]
    pub fn start_args_env(
        dir: &Path,
        store: &Path,
        listen: &str,
        netns: Option<&str>,
        fault: Option<&str>,
        runc_root: Option<&Path>,
        extra: &[String],
        env: &[(String, String)],
    ) -> AgentProc {
        let wrapper: Vec<String> = match netns {
            Some(ns) => [
                "nsenter".to_string(),
                format!("--net=/run/netns/{ns}"),
                "--".into(),
            ]
            .into(),
            None => Vec::new(),
        };
        Self::spawn(dir, store, listen, &wrapper, fault, runc_root, extra, env)
    }

    /// An agent on loopback run under `wrapper` (a command that runs the
    /// rest of its arguments, e.g. `unshare --pid --fork --mount-proc`).
    pub fn start_wrapped(dir: &Path, wrapper: &[&str]) -> AgentProc {
        Self::start_wrapped_at(dir, wrapper, "127.0.0.1:0")
    }

    /// [`AgentProc::start_wrapped`] listening on `listen`.
    pub fn start_wrapped_at(dir: &Path, wrapper: &[&str], listen: &str) -> AgentProc {
        let wrapper: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        Self::spawn(
            dir,
            &dir.join("store"),
            listen,
            &wrapper,
            None,
            None,
            &[],
            &[],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        dir: &Path,
        store: &Path,
        listen: &str,
        wrapper: &[String],
        fault: Option<&str>,
        runc_root: Option<&Path>,
        extra: &[String],
        env: &[(String, String)],
    ) -> AgentProc {
        let key = key(dir);
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(FERRY);
                c
            }
            None => Command::new(FERRY),
        };
        cmd.args(["-v", "agent", "--keep-images", "--listen", listen, "--key"])
            .arg(&key)
            .arg("--store")
            .arg(store)
            .env(
                "RUST_LOG",
                std::env::var("FERRY_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .env("FERRY_STATE_DIR", super::test_state_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(r) = runc_root {
            cmd.arg("--runc-root").arg(r);
        }
        cmd.args(extra);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        if let Some(f) = fault {
            // Held long enough for the test to act, short enough to go on.
            cmd.env(ferry_core::fault::ENV, f)
                .env(ferry_core::fault::HOLD_ENV, "8000");
        }
        let mut child = cmd.spawn().expect("spawn ferry agent");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("agent stderr");
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("agent stdout"))
            .read_line(&mut first)
            .expect("agent stdout");
        let addr = first
            .trim()
            .strip_prefix("ferry agent listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "agent did not start: stdout {first:?}, stderr {:?}",
                    lines.lock().unwrap()
                )
            })
            .to_string();
        AgentProc {
            child,
            addr,
            store: store.to_path_buf(),
            key,
            lines,
        }
    }

    /// Waits until the agent logged a line containing `pat`.
    pub fn wait_for(&self, pat: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.lines.lock().unwrap().iter().any(|l| l.contains(pat)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Waits (60 s at most) until the agent stops at its fault point.
    pub fn wait_fault(&self, point: &str) {
        assert!(
            self.wait_for(
                &format!("fault point {point} reached"),
                Duration::from_secs(60)
            ),
            "the agent never reached {point}:\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL to the agent and to everything it started that still
    /// descends from it (a runc or CRIU restore in flight), as if its host
    /// died: nothing it began comes up afterwards.
    pub fn kill_tree(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let pid = self.child.id() as i32;
        // Stopped first, so that none forks between the listing and the kill.
        for p in ferry_image::process::tree(pid).unwrap_or_default() {
            let _ = kill(Pid::from_raw(p), Signal::SIGSTOP);
        }
        for p in ferry_image::process::tree(pid).unwrap_or_default() {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        self.kill();
    }

    /// SIGTERM, and the exit status within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The images the agent kept (`--keep-images`), one directory per
    /// committed migration. The agent keeps them after it answered the
    /// commit: wait (bounded) until at least one is complete.
    pub fn kept_images(&self) -> Vec<PathBuf> {
        let dir = self.store.join("checkpoints");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let kept: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path().join("images"))
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default();
            if !kept.is_empty() || std::time::Instant::now() > deadline {
                return kept;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProc {
    /// Kills the agent and removes the staging it may have left (an agent
    /// killed mid-migration cannot, and other agents' sweeps leave a dead
    /// agent's staging alone for a while).
    fn drop(&mut self) {
        self.kill();
        let mine = format!("ferry-agent-{}-", self.child.id());
        for base in [PathBuf::from("/dev/shm"), std::env::temp_dir()] {
            for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(&mine) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}
