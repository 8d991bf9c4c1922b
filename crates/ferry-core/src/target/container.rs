//! The libcontainer state runc keeps in `<root>/<id>/state.json` (Docker's
//! runc keeps the same under `/run/docker/runtime-runc/moby`), turned into
//! what CRIU needs to dump the container.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use ferry_criu::ContainerDump;
use ferry_image::process::ProcessInfo;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("no {engine} container '{id}' (no {})", state.display())]
    Unknown {
        engine: &'static str,
        id: String,
        state: PathBuf,
    },
    #[error("cannot read container state {}", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("container state {} is not valid libcontainer state", path.display())]
    StateFormat {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{engine} container '{id}' is {status}: only a running container can be checkpointed")]
    NotRunning {
        engine: &'static str,
        id: String,
        status: ContainerStatus,
    },
    #[error("cannot inspect {what} of container '{id}'")]
    Inspect {
        id: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A container's state as its runtime recorded it.
#[derive(Debug, Clone)]
pub struct ContainerState {
    pub id: String,
    pub init_pid: i32,
    init_start: u64,
    pub rootfs: PathBuf,
    pub bundle: Option<PathBuf>,
    mounts: Vec<MountJson>,
    mask_paths: Vec<String>,
    devices: Vec<String>,
    namespaces: Vec<NamespaceJson>,
    cgroup_paths: BTreeMap<String, String>,
    pub external_descriptors: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerStatus {
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for ContainerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ContainerStatus::Running => "running",
            ContainerStatus::Paused => "paused",
            ContainerStatus::Stopped => "stopped",
        })
    }
}

#[derive(Debug, Deserialize)]
struct StateJson {
    id: String,
    init_process_pid: i32,
    init_process_start: u64,
    config: ConfigJson,
    #[serde(default)]
    cgroup_paths: BTreeMap<String, String>,
    #[serde(default)]
    external_descriptors: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ConfigJson {
    rootfs: String,
    #[serde(default)]
    mounts: Vec<MountJson>,
    #[serde(default)]
    mask_paths: Option<Vec<String>>,
    #[serde(default)]
    devices: Option<Vec<DeviceJson>>,
    #[serde(default)]
    namespaces: Vec<NamespaceJson>,
    #[serde(default)]
    labels: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
struct MountJson {
    destination: String,
    #[serde(default)]
    device: String,
    #[serde(default)]
    source: String,
}

#[derive(Debug, Clone, Deserialize)]
struct DeviceJson {
    path: String,
}

#[derive(Debug, Clone, Deserialize)]
struct NamespaceJson {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

impl ContainerState {
    /// Where the bind mount at `destination` (in the container) comes from.
    pub fn bind_source(&self, destination: &Path) -> Option<PathBuf> {
        self.mounts
            .iter()
            .find(|m| m.device == "bind" && Path::new(&m.destination) == destination)
            .map(|m| PathBuf::from(&m.source))
    }

    /// Reads `<root>/<id>/state.json`.
    pub fn load(
        engine: &'static str,
        root: &Path,
        id: &str,
    ) -> Result<ContainerState, ContainerError> {
        let path = root.join(id).join("state.json");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ContainerError::Unknown {
                    engine,
                    id: id.to_string(),
                    state: path,
                })
            }
            Err(source) => return Err(ContainerError::State { path, source }),
        };
        ContainerState::parse(&path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<ContainerState, ContainerError> {
        let s: StateJson =
            serde_json::from_str(text).map_err(|source| ContainerError::StateFormat {
                path: path.to_path_buf(),
                source,
            })?;
        let bundle = s
            .config
            .labels
            .iter()
            .flatten()
            .find_map(|l| l.strip_prefix("bundle="))
            .map(PathBuf::from);
        Ok(ContainerState {
            id: s.id,
            init_pid: s.init_process_pid,
            init_start: s.init_process_start,
            rootfs: PathBuf::from(s.config.rootfs),
            bundle,
            mounts: s.config.mounts,
            mask_paths: s.config.mask_paths.unwrap_or_default(),
            devices: s
                .config
                .devices
                .unwrap_or_default()
                .into_iter()
                .map(|d| d.path)
                .collect(),
            namespaces: s.config.namespaces,
            cgroup_paths: s.cgroup_paths,
            external_descriptors: s.external_descriptors,
        })
    }

    /// Running, paused (frozen) or stopped, from the init process and the
    /// freezer, as runc itself decides.
    pub fn status(&self) -> ContainerStatus {
        // An init that is exiting (killed, waiting for the rest of its
        // pid namespace to be reaped) runs nothing any more.
        let alive = ProcessInfo::read(self.init_pid).is_ok_and(|p| !p.is_zombie() && !p.exiting)
            && start_time(self.init_pid) == Some(self.init_start);
        if !alive {
            return ContainerStatus::Stopped;
        }
        if self.frozen() {
            ContainerStatus::Paused
        } else {
            ContainerStatus::Running
        }
    }

    /// The freezer cgroup (v1), or the unified cgroup (v2).
    pub fn freezer(&self) -> Option<PathBuf> {
        self.cgroup_paths
            .get("freezer")
            .or_else(|| self.cgroup_paths.get(""))
            .map(PathBuf::from)
    }

    /// Whether the container's freezer says FROZEN.
    pub fn frozen(&self) -> bool {
        let Some(dir) = self.freezer() else {
            return false;
        };
        match fs::read_to_string(dir.join("freezer.state")) {
            Ok(s) => s.trim() == "FROZEN",
            Err(_) => fs::read_to_string(dir.join("cgroup.freeze")).is_ok_and(|s| s.trim() == "1"),
        }
    }

    /// Thaws the container's freezer cgroup (after a failed dump).
    pub fn thaw(&self) -> io::Result<()> {
        let Some(dir) = self.freezer() else {
            return Ok(());
        };
        let v1 = dir.join("freezer.state");
        if v1.exists() {
            fs::write(v1, "THAWED")
        } else {
            fs::write(dir.join("cgroup.freeze"), "0")
        }
    }

    /// Fails unless the container runs.
    pub fn require_running(&self, engine: &'static str) -> Result<(), ContainerError> {
        match self.status() {
            ContainerStatus::Running => Ok(()),
            status => Err(ContainerError::NotRunning {
                engine,
                id: self.id.clone(),
                status,
            }),
        }
    }

    /// The CRIU options for dumping this container, as runc builds them:
    /// bind mounts, cgroup v1 mounts and device nodes are external mounts
    /// mapped to themselves, masked files map to /dev/null, a network or pid
    /// namespace given by path is external.
    pub fn dump_options(&self) -> Result<ContainerDump, ContainerError> {
        let mut ext: Vec<(String, String)> = Vec::new();
        let mut push = |k: &str, v: &str| {
            if !ext.iter().any(|(key, _)| key == k) {
                ext.push((k.to_string(), v.to_string()));
            }
        };
        for m in &self.mounts {
            if m.device == "bind" {
                push(&m.destination, &m.destination);
            }
        }
        for point in self.cgroup_v1_mounts()? {
            push(&point, &point);
        }
        for d in &self.devices {
            push(d, d);
        }
        for p in &self.mask_paths {
            let inside = PathBuf::from(format!("/proc/{}/root{}", self.init_pid, p));
            if fs::metadata(&inside).is_ok_and(|m| !m.is_dir()) {
                push(p, "/dev/null");
            }
        }
        let mut external = Vec::new();
        for ns in &self.namespaces {
            let (name, key) = match ns.kind.as_str() {
                "NEWNET" => ("net", "extRootNetNS"),
                "NEWPID" => ("pid", "extRootPidNS"),
                _ => continue,
            };
            if ns.path.is_empty() {
                continue;
            }
            let ino = fs::metadata(&ns.path)
                .map_err(|source| ContainerError::Inspect {
                    id: self.id.clone(),
                    what: "external namespace",
                    source,
                })?
                .ino();
            external.push(format!("{name}[{ino}]:{key}"));
        }
        Ok(ContainerDump {
            root: self.rootfs.clone(),
            ext_mounts: ext,
            external,
            freeze_cgroup: self.freezer(),
            empty_net_ns: true,
        })
    }

    /// cgroup v1 hierarchies mounted inside the container (runc bind-mounts
    /// each one from the host when the container has no cgroup namespace).
    fn cgroup_v1_mounts(&self) -> Result<Vec<String>, ContainerError> {
        if !self.mounts.iter().any(|m| m.device == "cgroup")
            || self.namespaces.iter().any(|n| n.kind == "NEWCGROUP")
        {
            return Ok(Vec::new());
        }
        let path = format!("/proc/{}/mountinfo", self.init_pid);
        let text = fs::read_to_string(&path).map_err(|source| ContainerError::Inspect {
            id: self.id.clone(),
            what: "mounts",
            source,
        })?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                let point = pre.split_whitespace().nth(4)?;
                let fstype = post.split_whitespace().next()?;
                (fstype == "cgroup" && point.starts_with("/sys/fs/cgroup/"))
                    .then(|| point.to_string())
            })
            .collect())
    }
}

/// When `pid` started, in clock ticks after boot.
fn start_time(pid: i32) -> Option<u64> {
    ferry_image::process::ProcessInfo::read(pid)
        .ok()
        .map(|p| p.start_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str = r#"{"id":"c1","init_process_pid":1,"init_process_start":5,
      "config":{"rootfs":"/b/rootfs","labels":["bundle=/b"],
        "mounts":[{"source":"/host/data","destination":"/data","device":"bind"},
                  {"source":"proc","destination":"/proc","device":"proc"}],
        "mask_paths":["/proc/kcore"],
        "devices":[{"path":"/dev/null"}],
        "namespaces":[{"type":"NEWPID","path":""},{"type":"NEWNET","path":""}]},
      "cgroup_paths":{"freezer":"/sys/fs/cgroup/freezer/c1"},
      "external_descriptors":["/dev/null","pipe:[1]","/dev/null"]}"#;

    #[test]
    fn parses_libcontainer_state() {
        let s = ContainerState::parse(Path::new("state.json"), STATE).unwrap();
        assert_eq!(s.id, "c1");
        assert_eq!(s.rootfs, PathBuf::from("/b/rootfs"));
        assert_eq!(s.bundle, Some(PathBuf::from("/b")));
        assert_eq!(
            s.freezer(),
            Some(PathBuf::from("/sys/fs/cgroup/freezer/c1"))
        );
        assert_eq!(s.external_descriptors.len(), 3);
        let d = s.dump_options().unwrap();
        assert!(d.ext_mounts.contains(&("/data".into(), "/data".into())));
        assert!(d
            .ext_mounts
            .contains(&("/dev/null".into(), "/dev/null".into())));
        assert!(d.external.is_empty());
    }

    #[test]
    fn refuses_foreign_json() {
        let err = ContainerState::parse(Path::new("x"), "{\"id\": 3}").unwrap_err();
        assert!(
            err.to_string().contains("not valid libcontainer state"),
            "{err}"
        );
    }
}
