//! This host's copy of a service: a runc container, or a process tree
//! started as the init of a pid namespace of its own (so that it restores
//! on any host, whatever pids are in use there) in a session of its own.
//!
//! A process tree's pid is kept in a file in the service's directory with
//! its start time and network namespace, so that a restarted agent finds
//! its copy again and never mistakes another process (or, on a test
//! machine whose hosts are network namespaces of one kernel, another
//! host's copy, which CRIU restores with the same pid) for it.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::keys::{App, ServiceSpec};
use super::{HaError, Member};
use ferry_core::checkpoint::{self, Source};
use ferry_core::target::docker;
use ferry_core::target::runc::{self, RestoreFlags};
use ferry_core::target::ContainerRef;
use ferry_criu::{DumpRequest, NoHooks, RestoreRequest};
use ferry_image::process;

/// How long a killed process tree may take to free its pids.
const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostCopy {
    Runc { root: PathBuf, id: String },
    Process { record: PathBuf, log: PathBuf },
    Docker { socket: PathBuf, name: String },
}

/// The container id (runc) or name (Docker) of `service` on `host`.
pub(crate) fn container_name(cluster: &str, service: &str, host: &str) -> String {
    format!("ferry-{cluster}-{service}-{host}")
}

impl HostCopy {
    /// The copy of `spec` on `m`'s host.
    pub fn of(m: &Member, spec: &ServiceSpec) -> HostCopy {
        match spec.app {
            App::Runc { .. } => HostCopy::Runc {
                root: m.runc_root.clone(),
                id: container_name(m.cluster(), &spec.name, m.name()),
            },
            App::Process { .. } => HostCopy::Process {
                record: m.service_dir(&spec.name).join("copy.pid"),
                log: service_log(m.cluster(), &spec.name),
            },
            App::Docker { .. } => HostCopy::Docker {
                socket: m.config.docker_socket.clone(),
                name: container_name(m.cluster(), &spec.name, m.name()),
            },
        }
    }

    /// Whether the copy exists here (running or paused).
    pub fn exists(&self) -> bool {
        match self {
            HostCopy::Runc { root, id } => runc::status(root, id).is_some(),
            HostCopy::Process { record, .. } => live_pid(record).is_some(),
            HostCopy::Docker { socket, name } => docker::status(socket, name)
                .ok()
                .flatten()
                .is_some_and(|s| s == "running" || s == "paused"),
        }
    }

    /// Whether the copy runs here: it exists and is neither paused nor
    /// stopped (a tree a migration restored stays stopped until its
    /// commit).
    pub fn runs(&self) -> bool {
        match self {
            HostCopy::Runc { root, id } => {
                runc::status(root, id)
                    == Some(ferry_core::target::container::ContainerStatus::Running)
            }
            HostCopy::Process { record, .. } => live_pid(record)
                .and_then(|pid| process::ProcessInfo::read(pid).ok())
                .is_some_and(|p| !p.is_stopped()),
            HostCopy::Docker { socket, name } => {
                docker::status(socket, name).ok().flatten().as_deref() == Some("running")
            }
        }
    }

    /// The pid of the copy's init (what the fencing guard kills), if it
    /// runs here.
    pub fn init_pid(&self) -> Option<i32> {
        match self {
            HostCopy::Runc { root, id } => runc::init_pid(root, id),
            HostCopy::Process { record, .. } => live_pid(record),
            HostCopy::Docker { socket, name } => docker::init_pid(socket, name).ok().flatten(),
        }
    }

    /// The copy's cgroup, when the kernel can kill it whole (containers).
    pub fn killable_cgroup(&self) -> Option<PathBuf> {
        match self {
            HostCopy::Runc { root, id } => runc::killable_cgroup(root, id),
            HostCopy::Process { .. } => None,
            HostCopy::Docker { socket, name } => docker::killable_cgroup(socket, name),
        }
    }

    /// Starts the service afresh; returns its pid. A process tree runs
    /// under `ferry` (`ferry ns-init`) as its namespace's init.
    pub fn start(&self, spec: &ServiceSpec, ferry: &Path) -> Result<i32, HaError> {
        match (self, &spec.app) {
            (HostCopy::Runc { root, id }, App::Runc { bundle }) => {
                runc::run_detached(root, id, bundle).map_err(|e| copy_error("start", e))
            }
            (HostCopy::Process { record, log }, App::Process { command }) => {
                let init = [
                    ferry.display().to_string(),
                    "ns-init".to_string(),
                    "--".to_string(),
                ];
                let output = open_log(log)?;
                let pid = ferry_sys::spawn::pid_namespace_init(command, Some(&init), Some(&output))
                    .map_err(|e| copy_error(&format!("start `{}`", command.join(" ")), e))?;
                write_record(record, pid)?;
                Ok(pid)
            }
            (HostCopy::Docker { socket, name }, App::Docker { image, command }) => {
                // A stopped container of an earlier leadership goes first.
                let _ = docker::remove(socket, name);
                docker::run(socket, name, image, command).map_err(|e| copy_error("start", e))
            }
            _ => Err(mismatch()),
        }
    }

    /// Restores the service from CRIU images in `images` (left as they
    /// are: runc, Docker and CRIU only read them); process trees restore
    /// through `criu`. Returns the pid and the time it took.
    pub fn restore(
        &self,
        spec: &ServiceSpec,
        images: &Path,
        criu: &ferry_criu::Criu,
    ) -> Result<(i32, Duration), HaError> {
        let container = |c: ContainerRef, bundle: Option<&Path>| {
            checkpoint::restore_container(&c, Source::Dir(images), bundle, RestoreFlags::default())
                .map(|r| (r.pid, r.wall))
                .map_err(|e| copy_error("restore", e))
        };
        match (self, &spec.app) {
            (HostCopy::Runc { root, id }, App::Runc { bundle }) => container(
                ContainerRef::Runc {
                    id: id.clone(),
                    root: root.clone(),
                },
                Some(bundle),
            ),
            (HostCopy::Docker { socket, name }, App::Docker { .. }) => {
                // Docker restores into a stopped or absent container.
                let _ = docker::remove(socket, name);
                container(
                    ContainerRef::Docker {
                        name: name.clone(),
                        socket: socket.clone(),
                    },
                    None,
                )
            }
            (HostCopy::Process { record, log }, App::Process { .. }) => {
                // CRIU reopens the log by its path: it must exist here.
                open_log(log)?;
                let t = Instant::now();
                let pid = checkpoint::restore(criu, &RestoreRequest::new(images), &mut NoHooks)
                    .map(|o| o.pid)
                    .map_err(|e| copy_error("restore", e))?;
                write_record(record, pid)?;
                Ok((pid, t.elapsed()))
            }
            _ => Err(mismatch()),
        }
    }

    /// Records `pid` (a process tree moved here live) as this host's copy.
    pub fn adopt(&self, pid: i32) -> Result<(), HaError> {
        match self {
            HostCopy::Runc { .. } | HostCopy::Docker { .. } => Ok(()),
            HostCopy::Process { record, .. } => write_record(record, pid),
        }
    }

    /// What a checkpoint dumps: the container, or the tree by its pid.
    pub(crate) fn dump_target(&self) -> Result<(Option<ContainerRef>, i32), HaError> {
        match self {
            HostCopy::Runc { root, id } => Ok((
                Some(ContainerRef::Runc {
                    id: id.clone(),
                    root: root.clone(),
                }),
                0,
            )),
            HostCopy::Docker { socket, name } => Ok((
                Some(ContainerRef::Docker {
                    name: name.clone(),
                    socket: socket.clone(),
                }),
                0,
            )),
            HostCopy::Process { record, .. } => {
                live_pid(record)
                    .map(|pid| (None, pid))
                    .ok_or_else(|| HaError::Copy {
                        what: "find the process tree".into(),
                        source: format!("no live process recorded in {}", record.display()).into(),
                    })
            }
        }
    }

    /// The migration target of a planned switchover; `new_id` is the
    /// container's id on the destination.
    pub(crate) fn migrate_target(
        &self,
        spec: &ServiceSpec,
        new_id: String,
    ) -> Option<ferry_migrate::MigrateTarget> {
        match (self, &spec.app) {
            (HostCopy::Runc { root, id }, App::Runc { bundle }) => {
                Some(ferry_migrate::MigrateTarget::Runc {
                    id: id.clone(),
                    root: root.clone(),
                    bundle: Some(bundle.clone()),
                    new_id: Some(new_id),
                })
            }
            (HostCopy::Process { record, .. }, App::Process { .. }) => {
                live_pid(record).map(|pid| ferry_migrate::MigrateTarget::Process { pid })
            }
            (HostCopy::Docker { socket, name }, App::Docker { .. }) => {
                Some(ferry_migrate::MigrateTarget::Docker {
                    name: name.clone(),
                    socket: socket.clone(),
                    new_name: Some(new_id),
                })
            }
            _ => None,
        }
    }

    /// Freezes the copy (fencing's first step).
    pub fn pause(&self) -> Result<(), HaError> {
        match self {
            HostCopy::Runc { root, id } => {
                runc::pause(root, id).map_err(|e| copy_error("pause", e))
            }
            HostCopy::Process { record, .. } => signal_tree(record, Signal::SIGSTOP),
            HostCopy::Docker { socket, name } => {
                docker::set_paused(socket, name, true).map_err(|e| copy_error("pause", e))
            }
        }
    }

    pub fn resume(&self) -> Result<(), HaError> {
        match self {
            HostCopy::Runc { root, id } => {
                runc::resume(root, id).map_err(|e| copy_error("resume", e))
            }
            HostCopy::Process { record, .. } => signal_tree(record, Signal::SIGCONT),
            HostCopy::Docker { socket, name } => {
                docker::set_paused(socket, name, false).map_err(|e| copy_error("resume", e))
            }
        }
    }

    /// Deletes the copy (if any); for a process tree, waits until its root's
    /// pid is free.
    pub fn delete(&self) {
        match self {
            HostCopy::Runc { root, id } => {
                if runc::status(root, id).is_none() {
                    return;
                }
                if let Err(e) = runc::delete(root, id) {
                    tracing::error!(container = %id, error = %e, "cannot delete the container");
                }
            }
            HostCopy::Process { record, .. } => {
                if let Some(pid) = live_pid(record) {
                    let pids = process::tree(pid).unwrap_or_else(|_| vec![pid]);
                    process::kill_all(&pids);
                    if !process::wait_pid_free(pid, KILL_WAIT) {
                        tracing::error!(pid, "the killed process tree still holds its pid");
                    }
                }
                let _ = fs::remove_file(record);
            }
            HostCopy::Docker { socket, name } => {
                if matches!(docker::status(socket, name), Ok(None)) {
                    return;
                }
                if let Err(e) = docker::remove(socket, name) {
                    tracing::error!(container = %name, error = %e, "cannot delete the container");
                }
            }
        }
    }
}

/// A dump request for a checkpoint of the copy while it runs.
pub(crate) fn running_dump(pid: i32, images: &Path) -> DumpRequest {
    let mut req = DumpRequest::new(pid, images.to_path_buf());
    req.leave_running = true;
    req.tcp_skip_in_flight = true;
    req
}

fn copy_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> HaError {
    HaError::Copy {
        what: what.to_string(),
        source: Box::new(e),
    }
}

fn mismatch() -> HaError {
    HaError::Copy {
        what: "run the service".into(),
        source: "the host's copy and the service's kind differ".into(),
    }
}

/// `pid start-time netns` of a recorded process.
fn identity(pid: i32) -> Option<String> {
    let start = process::ProcessInfo::read(pid).ok()?.start_time;
    let ns = fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    Some(format!("{pid} {start} {}", ns.display()))
}

fn write_record(record: &Path, pid: i32) -> Result<(), HaError> {
    let io = |source| HaError::Io {
        path: record.to_path_buf(),
        source,
    };
    let id = identity(pid).ok_or_else(|| HaError::Copy {
        what: "record the process tree".into(),
        source: format!("pid {pid} is gone").into(),
    })?;
    if let Some(dir) = record.parent() {
        fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = record.with_extension("pid.partial");
    fs::write(&tmp, id).map_err(io)?;
    fs::rename(&tmp, record).map_err(io)
}

/// The recorded process, if it still runs in this network namespace.
fn live_pid(record: &Path) -> Option<i32> {
    let text = fs::read_to_string(record).ok()?;
    let pid: i32 = text.split_whitespace().next()?.parse().ok()?;
    let ours = fs::read_link("/proc/self/ns/net").ok()?;
    let id = identity(pid)?;
    (id == text && text.ends_with(&*ours.to_string_lossy()) && process::is_alive(pid))
        .then_some(pid)
}

fn signal_tree(record: &Path, sig: Signal) -> Result<(), HaError> {
    let pid = live_pid(record).ok_or_else(|| HaError::Copy {
        what: format!("send {sig} to the process tree"),
        source: "it is gone".into(),
    })?;
    for p in process::tree(pid).unwrap_or_else(|_| vec![pid]) {
        let _ = process::signal(p, sig);
    }
    Ok(())
}

/// Where a process-tree service's stdout and stderr go: the same path on
/// every host (CRIU restores the descriptors by path), root-only.
pub(crate) fn service_log(cluster: &str, service: &str) -> PathBuf {
    PathBuf::from(LOG_ROOT)
        .join(cluster)
        .join(format!("{service}.log"))
}

/// Service logs live under here.
pub(crate) const LOG_ROOT: &str = "/var/log/ferry";
/// A service log is rotated past this size (copied to `.1`, truncated).
pub(crate) const LOG_MAX: u64 = 16 << 20;
/// Rotated logs kept (`.1` newest).
pub(crate) const LOG_KEEP: u32 = 3;

/// Opens (creating) a service log for appending.
pub(crate) fn open_log(path: &Path) -> Result<std::fs::File, HaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let failed =
        |e: std::io::Error| copy_error(&format!("open the service log {}", path.display()), e);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(failed)
}

/// Rotates `path` once it is past [`LOG_MAX`]: the service keeps its
/// descriptor (opened for appending), so the file is copied to `.1` (older
/// ones shifted, [`LOG_KEEP`] kept) and truncated in place; what is written
/// between the copy and the truncation is lost.
pub(crate) fn rotate_log(path: &Path) {
    let big = std::fs::metadata(path).is_ok_and(|m| m.len() > LOG_MAX);
    if !big {
        return;
    }
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    for n in (1..LOG_KEEP).rev() {
        let _ = std::fs::rename(numbered(n), numbered(n + 1));
    }
    let copied = std::fs::copy(path, numbered(1));
    match copied.and_then(|_| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(0)
    }) {
        Ok(()) => tracing::info!(log = %path.display(), "service log rotated"),
        Err(e) => {
            tracing::warn!(log = %path.display(), error = %e, "cannot rotate the service log")
        }
    }
}
