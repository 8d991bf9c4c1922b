//! Test containers: a root filesystem holding busybox and the bundled
//! workload (with the libraries it links), run by the real runc and the
//! real dockerd. Every name is unique to its test; guards remove what a test
//! made, even when it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ferry_lab::workload::Report;

use super::{CONTINUE, READY, WORKLOAD};

pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// A unique name for this test's resource.
pub fn unique(name: &str) -> String {
    format!("ferry-test-{name}-{}", std::process::id())
}

pub fn sh(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Fails the test, with the remedy, when runc is missing.
pub fn require_runc() {
    assert!(
        ferry_sys::which("runc").is_some(),
        "runc is not installed: run scripts/setup.sh as root"
    );
}

/// Fails the test, with the remedy, when dockerd is not running.
pub fn require_docker() {
    let up = Path::new(DOCKER_SOCKET).exists()
        && Command::new("docker")
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        up,
        "dockerd is not running at {DOCKER_SOCKET}: run scripts/setup.sh as root (it starts dockerd --experimental)"
    );
}

/// Builds `dir/rootfs`: busybox, the workload and the libraries it needs.
pub fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "tmp", "state", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::copy(WORKLOAD, root.join("bin/ferry-workload")).unwrap();
    let ldd = sh(Command::new("ldd").arg(WORKLOAD));
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(p) = path {
            let to = root.join(p.strip_prefix("/").unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&p, &to).unwrap();
        }
    }
    root
}

/// [`rootfs`] as a tar archive (`dir/rootfs.tar`), for `docker import`.
pub fn rootfs_tar(dir: &Path) -> PathBuf {
    let root = rootfs(dir);
    let tar = dir.join("rootfs.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    tar
}

/// The workload's arguments inside a container (its report in /state).
pub fn workload_args(size_mib: u64) -> Vec<String> {
    [
        "/bin/ferry-workload",
        "--size-mib",
        &size_mib.to_string(),
        "--report",
        "/state/report",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Waits until the report shows a counter above `above`; returns the report.
pub fn counter_above(report: &Path, above: u64) -> Report {
    Report::wait_for(report, CONTINUE, |r| r.counter > above)
        .unwrap_or_else(|e| panic!("counter never passed {above}: {e}"))
}

/// A runc container running the workload, deleted when dropped.
pub struct RuncContainer {
    pub id: String,
    pub bundle: PathBuf,
    pub state: PathBuf,
}

/// Builds `bundle` (rootfs and `runc spec`'s config) running `args`, no
/// terminal, writable root; `edit` changes the config before it is written.
pub fn bundle_running(bundle: &Path, args: Vec<String>, edit: impl FnOnce(&mut serde_json::Value)) {
    std::fs::create_dir_all(bundle).unwrap();
    rootfs(bundle);
    sh(Command::new("runc").arg("spec").current_dir(bundle));
    let cfg_path = bundle.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = args.into();
    cfg["root"]["readonly"] = false.into();
    edit(&mut cfg);
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
}

impl RuncContainer {
    pub fn start(dir: &Path, name: &str, size_mib: u64) -> RuncContainer {
        let bundle = dir.join("bundle");
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        bundle_running(&bundle, workload_args(size_mib), |cfg| {
            cfg["mounts"].as_array_mut().unwrap().push(serde_json::json!({
                "destination": "/state", "type": "bind", "source": state, "options": ["rbind", "rw"]
            }));
        });
        let c = RuncContainer {
            id: unique(name),
            bundle,
            state,
        };
        sh(Command::new("runc")
            .args(["run", "--detach", "--bundle"])
            .arg(&c.bundle)
            .arg(&c.id)
            .stdout(Stdio::null())
            .stderr(Stdio::null()));
        Report::wait_for(&c.report(), READY, |r| r.counter > 0).expect("container workload ready");
        c
    }

    pub fn report(&self) -> PathBuf {
        self.state.join("report")
    }

    /// `runc state`'s status and pid, or None when runc does not know it.
    pub fn status(id: &str) -> Option<(String, i64)> {
        let out = Command::new("runc").args(["state", id]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some((v["status"].as_str()?.to_string(), v["pid"].as_i64()?))
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.id])
            .output();
    }
}

/// Deletes runc containers by id when dropped (restored copies).
pub struct RuncCleanup(pub Vec<String>);

impl Drop for RuncCleanup {
    fn drop(&mut self) {
        for id in &self.0 {
            let _ = Command::new("runc")
                .args(["delete", "--force", id])
                .output();
        }
    }
}

/// A Docker image of the test rootfs and the containers made from it,
/// removed when dropped.
pub struct Docker {
    pub image: String,
    pub containers: Vec<String>,
}

impl Docker {
    pub fn image(dir: &Path, name: &str) -> Docker {
        let tar = rootfs_tar(dir);
        let image = format!("{}:latest", unique(name));
        sh(Command::new("docker").arg("import").arg(&tar).arg(&image));
        Docker {
            image,
            containers: Vec::new(),
        }
    }

    /// Runs the workload in a new container with `state` bound at /state.
    pub fn run(&mut self, name: &str, state: &Path, size_mib: u64) -> String {
        let name = unique(name);
        self.containers.push(name.clone());
        std::fs::create_dir_all(state).unwrap();
        sh(Command::new("docker")
            .args(["run", "-d", "--network", "none", "--name", &name, "-v"])
            .arg(format!("{}:/state", state.display()))
            .arg(&self.image)
            .args(workload_args(size_mib)));
        Report::wait_for(&state.join("report"), READY, |r| r.counter > 0)
            .expect("container workload ready");
        name
    }

    /// Remembers a container made by a restore, for removal.
    pub fn adopt(&mut self, name: &str) {
        self.containers.push(name.to_string());
    }

    pub fn status(name: &str) -> String {
        let out = Command::new("docker")
            .args(["inspect", "--format", "{{.State.Status}}", name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

/// Sends SIGUSR1 to a container's init (by host pid) and waits for the
/// workload's memory verdict.
pub fn verify_memory(report: &Path, host_pid: i32) -> bool {
    let before = Report::read_within(report, Duration::from_secs(5))
        .unwrap()
        .verify_seq;
    ferry_image::process::signal(host_pid, nix::sys::signal::Signal::SIGUSR1).unwrap();
    Report::wait_for(report, CONTINUE, |r| r.verify_seq > before)
        .unwrap()
        .mem_ok
}
