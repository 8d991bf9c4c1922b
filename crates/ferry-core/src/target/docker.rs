//! Docker containers: found through the Engine API on Docker's socket, their
//! runc state read under Docker's runc root; restores handed to
//! `docker start --checkpoint` with the images placed where Docker expects
//! them (`<docker root>/containers/<id>/checkpoints/<name>/`), into the same
//! container or a new one created from the recorded configuration.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bollard::models::{ContainerCreateBody, ContainerInspectResponse};
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use bollard::Docker;
use serde::{Deserialize, Serialize};

use super::container::{ContainerError, ContainerState};
use super::fs::{self as files, FsError, FsManifest, FsScope, FsSource, RootKind};

pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Where Docker's runc keeps container state.
pub const RUNC_ROOT: &str = "/run/docker/runtime-runc/moby";
pub const ENGINE: &str = "docker";
/// How long an Engine API call may take.
const API_TIMEOUT_SECS: u64 = 30;
/// Longest wait for a pause or unpause (HA fencing acts through them).
pub const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest wait for a forced removal (it kills the container first).
const REMOVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("dockerd is not running or not reachable at {} ({detail}): start it (dockerd --experimental)", socket.display())]
    NotRunning { socket: PathBuf, detail: String },
    #[error("no Docker container '{name}'")]
    Unknown { name: String },
    #[error("Docker container '{name}' is running: restore needs a stopped or new container")]
    Running { name: String },
    #[error("Docker Engine API call {call} failed: {detail}")]
    Api { call: &'static str, detail: String },
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error("the checkpoint holds no Docker configuration to create '{name}' from, and no such container exists")]
    NoSpec { name: String },
    #[error("image {image} is not present on this host: pull or load it first")]
    NoImage { image: String },
    #[error("cannot place the checkpoint in {}", path.display())]
    Place {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot place the checkpoint for the engine")]
    Images(#[from] ferry_image::ImageError),
    #[error("the docker command line is not installed")]
    NoCli,
    #[error("`docker start --checkpoint` failed ({status}): {stderr}")]
    Start { status: String, stderr: String },
    #[error("cannot start the Docker API client")]
    Runtime(#[source] std::io::Error),
    #[error("cannot put the container's files in place before its start; it was not started")]
    Files(#[source] FsError),
}

/// What ferry records about a Docker container to recreate it elsewhere.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DockerSpec {
    pub id: String,
    pub name: String,
    pub image: String,
    /// The Engine API's create body: Config with HostConfig.
    pub create: serde_json::Value,
}

/// A running Docker container, found through the API.
#[derive(Debug, Clone)]
pub struct DockerContainer {
    pub spec: DockerSpec,
    pub state: ContainerState,
    /// Where its files live on this host.
    pub storage: Storage,
}

/// Where a container's own files are: its writable layer (overlay2's
/// upper directory) and its mounts.
#[derive(Debug, Clone, Default)]
pub struct Storage {
    pub upper: Option<PathBuf>,
    pub mounts: Vec<Mount>,
}

/// One mount of a container.
#[derive(Debug, Clone)]
pub struct Mount {
    /// "volume", "bind", ...
    pub kind: String,
    /// A named volume's name.
    pub name: Option<String>,
    pub source: PathBuf,
    pub destination: PathBuf,
}

impl Storage {
    fn of(c: &ContainerInspectResponse) -> Storage {
        let upper = c
            .graph_driver
            .as_ref()
            .filter(|g| g.name.starts_with("overlay"))
            .and_then(|g| g.data.get("UpperDir"))
            .map(PathBuf::from);
        let mounts = c
            .mounts
            .iter()
            .flatten()
            .filter_map(|m| {
                Some(Mount {
                    kind: m
                        .typ
                        .as_ref()
                        .map(|t| t.to_string())
                        .unwrap_or_default()
                        .to_lowercase(),
                    name: m.name.clone().filter(|n| !n.is_empty()),
                    source: PathBuf::from(m.source.as_ref()?),
                    destination: PathBuf::from(m.destination.as_ref()?),
                })
            })
            .collect();
        Storage { upper, mounts }
    }

    /// The trees `scope` carries: the writable layer, named volumes, and
    /// the bind mounts it names.
    pub fn sources(&self, scope: &FsScope) -> Result<Vec<FsSource>, FsError> {
        let mut out = Vec::new();
        if !scope.ignore_rootfs {
            if let Some(upper) = &self.upper {
                out.push(FsSource {
                    kind: RootKind::Layer,
                    path: upper.clone(),
                });
            } else {
                tracing::warn!("the container's storage driver is not overlay: its writable layer is not carried");
            }
        }
        if !scope.ignore_volumes {
            for m in self.mounts.iter().filter(|m| m.kind == "volume") {
                if let Some(name) = &m.name {
                    out.push(FsSource {
                        kind: RootKind::Volume { name: name.clone() },
                        path: m.source.clone(),
                    });
                }
            }
        }
        for b in &scope.binds {
            let m = self
                .mounts
                .iter()
                .find(|m| m.kind == "bind" && &m.destination == b)
                .ok_or_else(|| FsError::NoSuchBind {
                    destination: b.clone(),
                })?;
            out.push(FsSource {
                kind: RootKind::Bind {
                    destination: b.clone(),
                },
                path: m.source.clone(),
            });
        }
        Ok(out)
    }

    /// Where a captured root goes in this container.
    pub fn destination(&self, kind: &RootKind) -> Option<PathBuf> {
        match kind {
            RootKind::Layer => self.upper.clone(),
            RootKind::Rootfs => None,
            RootKind::Volume { name } => self
                .mounts
                .iter()
                .find(|m| m.kind == "volume" && m.name.as_ref() == Some(name))
                .map(|m| m.source.clone()),
            RootKind::Bind { destination } => self
                .mounts
                .iter()
                .find(|m| m.kind == "bind" && &m.destination == destination)
                .map(|m| m.source.clone()),
        }
    }
}

/// A blocking handle on the Engine API.
struct Api {
    rt: tokio::runtime::Runtime,
    docker: Docker,
    socket: PathBuf,
}

impl Api {
    fn connect(socket: &Path) -> Result<Api, DockerError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(DockerError::Runtime)?;
        let not_running = |detail: String| DockerError::NotRunning {
            socket: socket.to_path_buf(),
            detail,
        };
        if !socket.exists() {
            return Err(not_running("no such socket".into()));
        }
        let docker = Docker::connect_with_socket(
            &socket.to_string_lossy(),
            API_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| not_running(e.to_string()))?;
        rt.block_on(docker.ping())
            .map_err(|e| not_running(e.to_string()))?;
        Ok(Api {
            rt,
            docker,
            socket: socket.to_path_buf(),
        })
    }

    /// Runs one call, given up after `timeout` (the engine may hang: a
    /// fence action must not wait on it for the API's whole timeout).
    fn within<T>(
        &self,
        timeout: std::time::Duration,
        call: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, String> {
        // The timer is made inside the runtime (it needs its reactor).
        match self
            .rt
            .block_on(async { tokio::time::timeout(timeout, call).await })
        {
            Ok(done) => done.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "no answer from the engine within {} s",
                timeout.as_secs()
            )),
        }
    }

    fn inspect(&self, name: &str) -> Result<Option<ContainerInspectResponse>, DockerError> {
        match self.rt.block_on(self.docker.inspect_container(name, None)) {
            Ok(c) => Ok(Some(c)),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(DockerError::Api {
                call: "inspect container",
                detail: e.to_string(),
            }),
        }
    }

    fn root_dir(&self) -> Result<PathBuf, DockerError> {
        let info = self
            .rt
            .block_on(self.docker.info())
            .map_err(|e| DockerError::Api {
                call: "info",
                detail: e.to_string(),
            })?;
        Ok(PathBuf::from(
            info.docker_root_dir
                .unwrap_or_else(|| "/var/lib/docker".into()),
        ))
    }
}

/// The engine's own temporary directory (`<data root>/tmp`): on the
/// filesystem of its containers' layers and volumes.
pub fn engine_tmp(socket: &Path) -> Result<PathBuf, DockerError> {
    Ok(Api::connect(socket)?.root_dir()?.join("tmp"))
}

/// Finds a running container by name or id.
pub fn locate(socket: &Path, name: &str) -> Result<DockerContainer, DockerError> {
    let api = Api::connect(socket)?;
    let c = api
        .inspect(name)?
        .ok_or_else(|| DockerError::Unknown { name: name.into() })?;
    let id = c.id.clone().unwrap_or_default();
    let pid = c.state.as_ref().and_then(|s| s.pid).unwrap_or(0) as i32;
    let state = ContainerState::load(ENGINE, &runc_root_of(pid), &id)?;
    state.require_running(ENGINE)?;
    let config = c
        .config
        .clone()
        .map(|cfg| serde_json::to_value(cfg).unwrap_or_default());
    let mut create = config.unwrap_or_else(|| serde_json::json!({}));
    if let Some(h) = &c.host_config {
        create["HostConfig"] = serde_json::to_value(h).unwrap_or_default();
    }
    let image = c
        .config
        .as_ref()
        .and_then(|cfg| cfg.image.clone())
        .or(c.image.clone())
        .unwrap_or_default();
    let storage = Storage::of(&c);
    Ok(DockerContainer {
        storage,
        spec: DockerSpec {
            id,
            name: c
                .name
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            image,
            create,
        },
        state,
    })
}

/// The runc state directory of the engine running the container whose
/// init is `pid`: its containerd shim is started with `-namespace NS
/// -address EXEC_ROOT/containerd/containerd.sock`, and the engine keeps
/// runc's state under `EXEC_ROOT/runtime-runc/NS`. An engine started with
/// its own `--exec-root` is found this way; otherwise [`RUNC_ROOT`].
fn runc_root_of(pid: i32) -> PathBuf {
    let shim_args = ferry_image::process::ProcessInfo::read(pid)
        .ok()
        .and_then(|p| std::fs::read(format!("/proc/{}/cmdline", p.ppid)).ok())
        .map(|c| {
            c.split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let value = |flag: &str| {
        shim_args
            .iter()
            .position(|a| a == flag)
            .and_then(|i| shim_args.get(i + 1))
    };
    match (value("-address"), value("-namespace")) {
        (Some(address), Some(ns)) => Path::new(address)
            .parent()
            .and_then(Path::parent)
            .map(|exec_root| exec_root.join("runtime-runc").join(ns))
            .filter(|root| root.is_dir())
            .unwrap_or_else(|| PathBuf::from(RUNC_ROOT)),
        _ => PathBuf::from(RUNC_ROOT),
    }
}

/// Restores into container `name` from `images` (which hold ferry's images
/// and `descriptors.json`): the container must be stopped, or absent and
/// `spec` given to create it. Returns the restored init's pid.
pub fn restore(
    socket: &Path,
    name: &str,
    images: &Path,
    spec: Option<&DockerSpec>,
) -> Result<i32, DockerError> {
    let api = Api::connect(socket)?;
    let existing = api.inspect(name)?;
    let id = match existing {
        Some(c) if c.state.as_ref().and_then(|s| s.running).unwrap_or(false) => {
            return Err(DockerError::Running { name: name.into() })
        }
        Some(c) => c.id.unwrap_or_default(),
        None => create(
            &api,
            name,
            spec.ok_or_else(|| DockerError::NoSpec { name: name.into() })?,
        )?,
    };
    let manifest = FsManifest::read(images).map_err(DockerError::Files)?;
    if let Some(m) = &manifest {
        let c = api
            .inspect(&id)?
            .ok_or_else(|| DockerError::Unknown { name: name.into() })?;
        let storage = Storage::of(&c);
        let done =
            files::restore(m, images, |k| storage.destination(k)).map_err(DockerError::Files)?;
        tracing::debug!(
            files = done.files,
            bytes = done.bytes,
            "the container's files are in place"
        );
    }
    let checkpoint = format!("ferry-{}", std::process::id());
    let root = api.root_dir()?;
    let dir = root
        .join("containers")
        .join(&id)
        .join("checkpoints")
        .join(&checkpoint);
    let before = engine_copies(&root);
    let start = |whole: bool| -> Result<(bool, Result<(), DockerError>), DockerError> {
        let referring = place(images, &dir, whole)?;
        let started = start_from_checkpoint(&api.socket, &id, &checkpoint);
        let _ = fs::remove_dir_all(&dir);
        Ok((referring, started))
    };
    let mut started = start(false)?;
    // An engine whose restore cannot reach the images from its checkpoint
    // directory (one in a mount namespace of its own) gets them whole.
    if let (true, Err(e)) = &started {
        tracing::warn!(error = %e, "the engine's restore from a checkpoint referring to its pages failed: placing it whole");
        started = start(true)?;
    }
    let started = started.1;
    remove_engine_copies(&root, &before, images);
    started?;
    let c = api
        .inspect(&id)?
        .ok_or_else(|| DockerError::Unknown { name: name.into() })?;
    Ok(c.state.and_then(|s| s.pid).unwrap_or(0) as i32)
}

fn create(api: &Api, name: &str, spec: &DockerSpec) -> Result<String, DockerError> {
    match api.rt.block_on(api.docker.inspect_image(&spec.image)) {
        Ok(_) => {}
        Err(_) => {
            return Err(DockerError::NoImage {
                image: spec.image.clone(),
            })
        }
    }
    let body: ContainerCreateBody =
        serde_json::from_value(spec.create.clone()).map_err(|e| DockerError::Api {
            call: "create container",
            detail: format!("recorded configuration does not fit: {e}"),
        })?;
    create_with(api, name, body)
}

/// Creates container `name` from `body`; returns its id.
fn create_with(api: &Api, name: &str, body: ContainerCreateBody) -> Result<String, DockerError> {
    let opts = CreateContainerOptionsBuilder::default().name(name).build();
    let r = api
        .rt
        .block_on(api.docker.create_container(Some(opts), body))
        .map_err(|e| DockerError::Api {
            call: "create container",
            detail: e.to_string(),
        })?;
    Ok(r.id)
}

/// Places the images in Docker's checkpoint directory: unless `whole`, as
/// images that refer to `images` for their pages (`image::referring`), so
/// that the engine's copy through containerd is of the metadata only;
/// otherwise, or where they cannot be referred to, linked (or copied)
/// whole. Returns whether they refer.
fn place(images: &Path, dir: &Path, whole: bool) -> Result<bool, DockerError> {
    if !whole && ferry_image::referring::write(images, dir, &files::is_fs_file)? {
        tracing::debug!(dir = %dir.display(), "placed the checkpoint referring to its pages");
        return Ok(true);
    }
    files::place_for_engine(images, dir).map_err(|source| DockerError::Place {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(false)
}

/// Where the engine leaves its own copies of a checkpoint it restored
/// (`ctrd-checkpoint*` directories in its temporary directory: /tmp, or
/// the data root's tmp): Docker 20.10 never removes them, 100 MiB left per
/// restore of a 100 MiB container.
fn engine_copies(root: &Path) -> Vec<PathBuf> {
    [PathBuf::from("/tmp"), root.join("tmp")]
        .iter()
        .filter_map(|d| fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("ctrd-checkpoint")
        })
        .map(|e| e.path())
        .collect()
}

/// Removes the engine's copies of this restore's checkpoint: those that
/// appeared during it and hold the same CRIU inventory (unique per dump).
fn remove_engine_copies(root: &Path, before: &[PathBuf], images: &Path) {
    let Ok(ours) = fs::read(images.join("inventory.img")) else {
        return;
    };
    for d in engine_copies(root) {
        if !before.contains(&d) && fs::read(d.join("inventory.img")).is_ok_and(|inv| inv == ours) {
            match fs::remove_dir_all(&d) {
                Ok(()) => {
                    tracing::debug!(dir = %d.display(), "removed the engine's copy of the checkpoint")
                }
                Err(e) => {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot remove the engine's copy of the checkpoint")
                }
            }
        }
    }
}

fn start_from_checkpoint(socket: &Path, id: &str, checkpoint: &str) -> Result<(), DockerError> {
    let cli = ferry_sys::which("docker").ok_or(DockerError::NoCli)?;
    let out = Command::new(cli)
        .env("DOCKER_HOST", format!("unix://{}", socket.display()))
        .args(["start", "--checkpoint", checkpoint, id])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| DockerError::Start {
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(DockerError::Start {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Removes a container (used by tests and by failed restores into a new
/// container).
pub fn remove(socket: &Path, name: &str) -> Result<(), DockerError> {
    let api = Api::connect(socket)?;
    let opts = RemoveContainerOptionsBuilder::default().force(true).build();
    api.within(
        REMOVE_TIMEOUT,
        api.docker.remove_container(name, Some(opts)),
    )
    .map_err(|detail| DockerError::Api {
        call: "remove container",
        detail,
    })
}

/// Creates and starts container `name` from `image` running `cmd` (the
/// image's own command when empty) in the engine's host network, so that
/// it answers on the host's addresses. Returns its init's pid.
pub fn run(socket: &Path, name: &str, image: &str, cmd: &[String]) -> Result<i32, DockerError> {
    let api = Api::connect(socket)?;
    let body = ContainerCreateBody {
        image: Some(image.to_string()),
        cmd: (!cmd.is_empty()).then(|| cmd.to_vec()),
        host_config: Some(bollard::models::HostConfig {
            network_mode: Some("host".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = create_with(&api, name, body)?;
    api.rt
        .block_on(api.docker.start_container(
            &id,
            None::<bollard::query_parameters::StartContainerOptions>,
        ))
        .map_err(|e| DockerError::Api {
            call: "start container",
            detail: e.to_string(),
        })?;
    let c = api
        .inspect(&id)?
        .ok_or_else(|| DockerError::Unknown { name: name.into() })?;
    Ok(c.state.and_then(|s| s.pid).unwrap_or(0) as i32)
}

/// The container's state ("running", "paused", "exited", ...), None when
/// there is no such container.
pub fn status(socket: &Path, name: &str) -> Result<Option<String>, DockerError> {
    let api = Api::connect(socket)?;
    Ok(api.inspect(name)?.map(|c| {
        c.state
            .and_then(|s| s.status)
            .map(|s| s.to_string())
            .unwrap_or_default()
    }))
}

/// The pid of a running or paused container's init, None when it has none.
pub fn init_pid(socket: &Path, name: &str) -> Result<Option<i32>, DockerError> {
    let api = Api::connect(socket)?;
    Ok(api
        .inspect(name)?
        .and_then(|c| c.state)
        .and_then(|s| s.pid)
        .filter(|&p| p > 0)
        .map(|p| p as i32))
}

/// A running container's cgroup (v2) when the kernel can kill it whole.
pub fn killable_cgroup(socket: &Path, name: &str) -> Option<PathBuf> {
    locate(socket, name)
        .ok()?
        .state
        .freezer()
        .filter(|d| d.join("cgroup.kill").exists())
}

/// Freezes (`pause`) or thaws a container.
pub fn set_paused(socket: &Path, name: &str, paused: bool) -> Result<(), DockerError> {
    let api = Api::connect(socket)?;
    let (call, done) = if paused {
        (
            "pause container",
            api.within(CONTROL_TIMEOUT, api.docker.pause_container(name)),
        )
    } else {
        (
            "unpause container",
            api.within(CONTROL_TIMEOUT, api.docker.unpause_container(name)),
        )
    };
    done.map_err(|detail| DockerError::Api { call, detail })
}
