//! A real etcd server for the HA tests, on ports of its own, with 1 s
//! leases allowed (election timeout 500 ms); killed when dropped.

use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdProc {
    child: Option<Child>,
    pub url: String,
    args: Vec<String>,
    log: PathBuf,
}

fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl EtcdProc {
    /// Starts etcd with its data in `dir/etcd`, serving clients on `ip`.
    pub fn start(dir: &Path, ip: IpAddr) -> EtcdProc {
        assert!(
            ferry_sys::which("etcd").is_some(),
            "etcd is not installed: run scripts/setup.sh as root (package etcd-server)"
        );
        let client = format!("http://{ip}:{}", free_port(ip));
        let peer = format!(
            "http://127.0.0.1:{}",
            free_port("127.0.0.1".parse().unwrap())
        );
        let name = format!("ferry-test-{}", std::process::id());
        let args: Vec<String> = [
            "--name",
            &name,
            "--data-dir",
            &dir.join("etcd").to_string_lossy(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("{name}={peer}"),
            "--election-timeout",
            "500",
            "--heartbeat-interval",
            "50",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut e = EtcdProc {
            child: None,
            url: client,
            args,
            log: dir.join("etcd.log"),
        };
        e.launch();
        e
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("etcd")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let etcd = ferry_agent::ha::etcd::Etcd::connect(std::slice::from_ref(&self.url)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if etcd.get_prefix("/ferry-test-ready").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "etcd did not answer at {} within 20 s; its log:\n{}",
            self.url,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops (SIGSTOP) or continues etcd: it holds its connections and
    /// answers nothing meanwhile, as a stalled server.
    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        if let Some(c) = &self.child {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, sig).expect("signal etcd");
        }
    }

    /// Kills etcd, waits `down`, starts it again on the same data.
    pub fn restart(&mut self, down: Duration) {
        self.kill();
        std::thread::sleep(down);
        self.launch();
    }
}

impl Drop for EtcdProc {
    fn drop(&mut self) {
        self.freeze(false);
        self.kill();
    }
}
