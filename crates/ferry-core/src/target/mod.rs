//! What ferry checkpoints: a process tree (by pid), a runc container, or a
//! Docker container. One file per kind; `container` holds what runc and
//! Docker containers share (the libcontainer state both keep on disk), and
//! `preflight` the checks made before anything is frozen.
//!
//! ferry reads a container's state itself (init pid, rootfs, mounts, masked
//! paths, devices, namespaces, cgroups) and dumps it over CRIU RPC with the
//! options a container needs; it never calls `runc checkpoint` or Docker's
//! checkpoint API. Restores are handed to the engine (`runc restore`,
//! `docker start --checkpoint`) so that the engine knows its container.

#![forbid(unsafe_code)]

pub mod container;
pub mod docker;
pub mod fs;
pub mod podman;
pub mod preflight;
pub mod runc;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use container::{ContainerError, ContainerState, ContainerStatus};

/// The file beside the images that says what was dumped (kind, id, bundle,
/// engine configuration), so that a restore elsewhere can recreate it.
pub const TARGET_FILE: &str = "ferry-target.json";
/// The file runc reads on restore: where the init's stdio pointed.
pub const DESCRIPTORS_FILE: &str = "descriptors.json";

/// A container, as the command line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerRef {
    Runc {
        id: String,
        root: PathBuf,
    },
    Docker {
        name: String,
        socket: PathBuf,
    },
    /// A podman container (root's podman, runc runtime).
    Podman {
        name: String,
    },
}

impl ContainerRef {
    pub fn describe(&self) -> String {
        match self {
            ContainerRef::Runc { id, .. } => format!("runc container '{id}'"),
            ContainerRef::Docker { name, .. } => format!("Docker container '{name}'"),
            ContainerRef::Podman { name } => format!("podman container '{name}'"),
        }
    }
}

/// What `ferry-target.json` records about a dumped container.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TargetRecord {
    Runc {
        id: String,
        bundle: Option<PathBuf>,
        rootfs: PathBuf,
    },
    Docker {
        spec: docker::DockerSpec,
        rootfs: PathBuf,
    },
    Podman {
        id: String,
        name: String,
        rootfs: PathBuf,
    },
}

/// A container record that cannot be read: never taken for "no record".
#[derive(Debug, thiserror::Error)]
pub enum TargetRecordError {
    #[error("cannot read the container record {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the container record {} is damaged", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl TargetRecord {
    /// Reads the record of an images directory: `None` when it holds none
    /// (a process tree's dump), an error naming the file when it holds one
    /// that cannot be read.
    pub fn read(dir: &Path) -> Result<Option<TargetRecord>, TargetRecordError> {
        let path = dir.join(TARGET_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(TargetRecordError::Read { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| TargetRecordError::Parse { path, source })
    }
}
