//! podman containers: found through `podman container inspect`, their
//! runc state read under podman's runc root; checkpointed by ferry over
//! CRIU RPC, restored by `podman container restore` from the images placed
//! in the container's own checkpoint directory (`<static dir>/checkpoint`).
//!
//! podman restores only a container it knows, stopped (exited): the one
//! that was dumped, or one made and stopped on this host. Creating one
//! from the checkpoint's record (another host) is not done yet.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use super::container::{ContainerError, ContainerState};
use super::docker::{Mount, Storage};
use super::fs::{self as files, FsError, FsManifest};

pub const ENGINE: &str = "podman";
/// Where podman's runc keeps container state (root's podman).
pub const RUNC_ROOT: &str = "/run/runc";
/// Longest wait for podman to mark a killed container exited.
const CLEANUP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    #[error("the podman command line is not installed")]
    NoCli,
    #[error("no podman container '{name}'")]
    Unknown { name: String },
    #[error("podman container '{name}' runs under {runtime}: ferry reads runc's state only (podman --runtime runc)")]
    Runtime { name: String, runtime: String },
    #[error("podman container '{name}' is {status}: a restore needs it stopped (exited)")]
    NotStopped { name: String, status: String },
    #[error("`podman {what}` failed ({status}): {stderr}")]
    Command {
        what: &'static str,
        status: String,
        stderr: String,
    },
    #[error("cannot read what podman says of '{name}': {detail}")]
    Inspect { name: String, detail: String },
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error("cannot place the checkpoint in {}", path.display())]
    Place {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot put the container's files in place before its restore; it was not restored")]
    Files(#[source] FsError),
}

/// What `podman container inspect` says that ferry uses.
#[derive(Debug, Deserialize)]
struct Inspect {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "State")]
    state: StateJson,
    #[serde(rename = "OCIRuntime", default)]
    runtime: String,
    #[serde(rename = "GraphDriver", default)]
    graph: Option<GraphJson>,
    #[serde(rename = "Mounts", default)]
    mounts: Vec<MountJson>,
    #[serde(rename = "StaticDir", default)]
    static_dir: PathBuf,
}

#[derive(Debug, Deserialize)]
struct StateJson {
    #[serde(rename = "Status", default)]
    status: String,
    #[serde(rename = "Pid", default)]
    pid: i32,
}

#[derive(Debug, Deserialize)]
struct GraphJson {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Data", default)]
    data: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct MountJson {
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "Name", default)]
    name: Option<String>,
    #[serde(rename = "Source", default)]
    source: PathBuf,
    #[serde(rename = "Destination", default)]
    destination: PathBuf,
}

impl Inspect {
    fn storage(&self) -> Storage {
        Storage {
            upper: self
                .graph
                .as_ref()
                .filter(|g| g.name.starts_with("overlay"))
                .and_then(|g| g.data.get("UpperDir"))
                .map(PathBuf::from),
            mounts: self
                .mounts
                .iter()
                .map(|m| Mount {
                    kind: m.kind.to_lowercase(),
                    name: m.name.clone().filter(|n| !n.is_empty()),
                    source: m.source.clone(),
                    destination: m.destination.clone(),
                })
                .collect(),
        }
    }
}

/// A running podman container.
#[derive(Debug, Clone)]
pub struct PodmanContainer {
    pub id: String,
    pub name: String,
    pub state: ContainerState,
    pub storage: Storage,
}

fn podman(what: &'static str, args: &[&str]) -> Result<std::process::Output, PodmanError> {
    let cli = ferry_sys::which("podman").ok_or(PodmanError::NoCli)?;
    Command::new(cli)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| PodmanError::Command {
            what,
            status: "not started".into(),
            stderr: e.to_string(),
        })
}

fn inspect(name: &str) -> Result<Inspect, PodmanError> {
    let out = podman(
        "container inspect",
        &["container", "inspect", "--format", "json", name],
    )?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("no such container") {
            return Err(PodmanError::Unknown { name: name.into() });
        }
        return Err(PodmanError::Command {
            what: "container inspect",
            status: out.status.to_string(),
            stderr: stderr.trim().to_string(),
        });
    }
    let mut all: Vec<Inspect> =
        serde_json::from_slice(&out.stdout).map_err(|e| PodmanError::Inspect {
            name: name.into(),
            detail: e.to_string(),
        })?;
    if all.is_empty() {
        return Err(PodmanError::Unknown { name: name.into() });
    }
    Ok(all.swap_remove(0))
}

/// Finds a running container by name or id.
pub fn locate(name: &str) -> Result<PodmanContainer, PodmanError> {
    let c = inspect(name)?;
    if c.runtime != "runc" {
        return Err(PodmanError::Runtime {
            name: name.into(),
            runtime: c.runtime,
        });
    }
    let state = ContainerState::load(ENGINE, Path::new(RUNC_ROOT), &c.id)?;
    state.require_running(ENGINE)?;
    Ok(PodmanContainer {
        storage: c.storage(),
        id: c.id,
        name: c.name.trim_start_matches('/').to_string(),
        state,
    })
}

/// Restores the stopped container `name` from `images`: its files first,
/// then the images placed in its checkpoint directory for `podman
/// container restore` (which removes them once restored). Returns the
/// restored init's pid.
pub fn restore(name: &str, images: &Path) -> Result<i32, PodmanError> {
    let mut c = inspect(name)?;
    // A container whose tasks were just killed (a dump in stop mode) is
    // "stopped" until podman's cleanup makes it "exited".
    let deadline = std::time::Instant::now() + CLEANUP_WAIT;
    while c.state.status == "stopped" && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        c = inspect(name)?;
    }
    if c.state.status != "exited" {
        return Err(PodmanError::NotStopped {
            name: name.into(),
            status: c.state.status,
        });
    }
    if let Some(m) = FsManifest::read(images).map_err(PodmanError::Files)? {
        let storage = c.storage();
        files::restore(&m, images, |k| storage.destination(k)).map_err(PodmanError::Files)?;
    }
    let dir = c.static_dir.join("checkpoint");
    let _ = fs::remove_dir_all(&dir);
    files::place_for_engine(images, &dir).map_err(|source| PodmanError::Place {
        path: dir.clone(),
        source,
    })?;
    let out = podman("container restore", &["container", "restore", &c.id]);
    let _ = fs::remove_dir_all(&dir);
    let out = out?;
    if !out.status.success() {
        return Err(PodmanError::Command {
            what: "container restore",
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(inspect(&c.id)?.state.pid)
}
