//! runc containers: state read from runc's root, restore handed to
//! `runc restore` (which reads the images and `descriptors.json` ferry
//! wrote), stop-mode dumps finished with `runc delete`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::container::{ContainerError, ContainerState, ContainerStatus};

/// runc's default state directory.
pub const DEFAULT_ROOT: &str = "/run/runc";
/// The engine name used in messages.
pub const ENGINE: &str = "runc";

#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error("runc is not installed (no `runc` on PATH): install it with scripts/setup.sh")]
    NotInstalled,
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bundle {} has no config.json: runc restore needs the container's bundle", bundle.display())]
    NoBundle { bundle: PathBuf },
    #[error("the container's root filesystem {} does not exist here", rootfs.display())]
    NoRootfs { rootfs: PathBuf },
    #[error("runc container '{id}' already exists (status {status}): restore into a new name, or delete it")]
    Exists { id: String, status: String },
}

/// Flags passed through to `runc restore`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreFlags {
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    /// The images are a throwaway staging copy: let CRIU consume them.
    pub consume_images: bool,
}

/// Reads a running runc container's state.
pub fn locate(root: &Path, id: &str) -> Result<ContainerState, RuncError> {
    let state = ContainerState::load(ENGINE, root, id)?;
    state.require_running(ENGINE)?;
    Ok(state)
}

fn runc() -> Result<PathBuf, RuncError> {
    ferry_sys::which("runc").ok_or(RuncError::NotInstalled)
}

/// `runc ARGS` as a message names it.
fn describe(args: &[&std::ffi::OsStr]) -> String {
    let args: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
    format!("runc {}", args.join(" "))
}

/// How long `runc pause`, `resume` and `delete` may take before they are
/// killed (fencing must never wait on a hung runc).
pub const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs a short runc command, killed (and failed) if it takes longer than
/// `timeout`.
fn run_within(args: &[&std::ffi::OsStr], timeout: std::time::Duration) -> Result<(), RuncError> {
    let bin = runc()?;
    let command = describe(args);
    let spawn_error = |source| RuncError::Spawn {
        command: command.clone(),
        source,
    };
    // runc's messages go to a file: a pipe would fill, or be held open by
    // a child runc leaves behind.
    let log = tempfile::tempfile().map_err(spawn_error)?;
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.try_clone().map_err(spawn_error)?)
        .spawn()
        .map_err(spawn_error)?;
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(spawn_error)? {
            Some(status) => break status,
            None if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RuncError::Failed {
                    command,
                    status: format!("killed after {} ms", timeout.as_millis()),
                    stderr: String::new(),
                });
            }
            None => std::thread::sleep(std::time::Duration::from_millis(2)),
        }
    };
    if !status.success() {
        use std::io::{Read, Seek};
        let mut text = String::new();
        let mut log = log;
        let _ = log.rewind();
        let _ = log.take(4096).read_to_string(&mut text);
        return Err(RuncError::Failed {
            command,
            status: status.to_string(),
            stderr: text.trim().to_string(),
        });
    }
    Ok(())
}

fn run(args: &[&std::ffi::OsStr]) -> Result<String, RuncError> {
    let bin = runc()?;
    let command = describe(args);
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RuncError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(RuncError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes a container whose processes a stop-mode dump ended, so that its
/// id is free for the restore (what `runc checkpoint` does).
pub fn delete(root: &Path, id: &str) -> Result<(), RuncError> {
    run_within(
        &[
            "--root".as_ref(),
            root.as_os_str(),
            "delete".as_ref(),
            "--force".as_ref(),
            id.as_ref(),
        ],
        CONTROL_TIMEOUT,
    )
}

/// Restores container `id` from `images` with `bundle`, detached; returns
/// the restored init's pid (as the host sees it).
pub fn restore(
    root: &Path,
    id: &str,
    bundle: &Path,
    images: &Path,
    flags: RestoreFlags,
) -> Result<i32, RuncError> {
    if !bundle.join("config.json").is_file() {
        return Err(RuncError::NoBundle {
            bundle: bundle.to_path_buf(),
        });
    }
    let rootfs = bundle_rootfs(bundle);
    if !rootfs.is_dir() {
        return Err(RuncError::NoRootfs { rootfs });
    }
    if let Ok(existing) = ContainerState::load(ENGINE, root, id) {
        return Err(RuncError::Exists {
            id: id.to_string(),
            status: existing.status().to_string(),
        });
    }
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--root".as_ref(),
        root.as_os_str(),
        "restore".as_ref(),
        "--detach".as_ref(),
        "--image-path".as_ref(),
        images.as_os_str(),
        "--work-path".as_ref(),
        images.as_os_str(),
        "--bundle".as_ref(),
        bundle.as_os_str(),
    ];
    if flags.tcp_established {
        args.push("--tcp-established".as_ref());
    }
    if flags.ext_unix_sk {
        args.push("--ext-unix-sk".as_ref());
    }
    if flags.file_locks {
        args.push("--file-locks".as_ref());
    }
    if flags.consume_images {
        args.push("--auto-dedup".as_ref());
    }
    args.push(id.as_ref());
    run(&args)?;
    let state = ContainerState::load(ENGINE, root, id)?;
    match state.status() {
        ContainerStatus::Running => Ok(state.init_pid),
        status => Err(RuncError::Container(ContainerError::NotRunning {
            engine: ENGINE,
            id: id.to_string(),
            status,
        })),
    }
}

/// The rootfs a bundle's config.json names (relative to the bundle).
pub fn bundle_rootfs(bundle: &Path) -> PathBuf {
    let root = std::fs::read_to_string(bundle.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["root"]["path"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    }
}

/// Where a captured tree goes in a runc bundle: the rootfs, or the source
/// of the bind mount at a path in the container. Runc has no writable
/// layer or named volumes.
pub fn bundle_destination(bundle: &Path, kind: &super::fs::RootKind) -> Option<PathBuf> {
    use super::fs::RootKind;
    match kind {
        RootKind::Rootfs => Some(bundle_rootfs(bundle)),
        RootKind::Bind { destination } => {
            let config = std::fs::read_to_string(bundle.join("config.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&config).ok()?;
            v["mounts"]
                .as_array()?
                .iter()
                .find(|m| m["destination"].as_str().map(Path::new) == Some(destination.as_path()))
                .and_then(|m| m["source"].as_str().map(PathBuf::from))
        }
        RootKind::Layer | RootKind::Volume { .. } => None,
    }
}

/// Starts container `id` from `bundle`, detached, its standard streams on
/// /dev/null; returns its init's pid.
pub fn run_detached(root: &Path, id: &str, bundle: &Path) -> Result<i32, RuncError> {
    let command = format!("runc --root {} run --detach {id}", root.display());
    // Not pipes: the container inherits them and `output()` would wait for
    // as long as it runs. runc's own errors go to a log file.
    let log = tempfile::NamedTempFile::new().map_err(|source| RuncError::Spawn {
        command: command.clone(),
        source,
    })?;
    let status = Command::new(runc()?)
        .arg("--root")
        .arg(root)
        .arg("--log")
        .arg(log.path())
        .args(["run", "--detach", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|source| RuncError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !status.success() {
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        return Err(RuncError::Failed {
            command,
            status: status.to_string(),
            stderr: text.trim().chars().take(4096).collect(),
        });
    }
    Ok(locate(root, id)?.init_pid)
}

/// Freezes every process of container `id` (`runc pause`).
pub fn pause(root: &Path, id: &str) -> Result<(), RuncError> {
    run_within(
        &[
            "--root".as_ref(),
            root.as_os_str(),
            "pause".as_ref(),
            id.as_ref(),
        ],
        CONTROL_TIMEOUT,
    )
}

/// Thaws container `id` (`runc resume`).
pub fn resume(root: &Path, id: &str) -> Result<(), RuncError> {
    run_within(
        &[
            "--root".as_ref(),
            root.as_os_str(),
            "resume".as_ref(),
            id.as_ref(),
        ],
        CONTROL_TIMEOUT,
    )
}

/// The init pid of container `id` in `root`, if it exists.
pub fn init_pid(root: &Path, id: &str) -> Option<i32> {
    ContainerState::load(ENGINE, root, id)
        .ok()
        .map(|s| s.init_pid)
}

/// Container `id`'s cgroup (v2) when the kernel can kill it whole
/// (`cgroup.kill`, Linux 5.14).
pub fn killable_cgroup(root: &Path, id: &str) -> Option<PathBuf> {
    ContainerState::load(ENGINE, root, id)
        .ok()?
        .freezer()
        .filter(|d| d.join("cgroup.kill").exists())
}

/// Whether container `id` exists in `root`, and its status.
pub fn status(root: &Path, id: &str) -> Option<ContainerStatus> {
    ContainerState::load(ENGINE, root, id)
        .ok()
        .map(|s| s.status())
}
