//! Checkpoint and restore of a process tree, with the guarantees ferry gives
//! around CRIU's own work:
//! - before a dump: the target exists, nothing in it makes the dump unsafe
//!   (established TCP, external unix sockets, a GPU context: see
//!   [`crate::target::preflight`]) and the images directory is usable
//!   (absent or empty, writable), so CRIU never starts on a doomed dump;
//! - after a failed dump: the tree is not left stopped (CRIU resumes it;
//!   ferry checks and sends SIGCONT to anything still stopped), and the
//!   partial images are removed so that only CRIU's log remains: a failed
//!   dump can never be taken for a checkpoint;
//! - before a restore: the images directory is complete and consistent
//!   (see [`ferry_image::ImagesDir::validate`]) and the pids it needs are free.

#![forbid(unsafe_code)]

mod dump;
mod dump_archive;
mod dump_container;
mod import;
mod restore;
mod restore_archive;
mod restore_container;
pub mod staging;

use std::io;
use std::path::PathBuf;

use ferry_archive::ArchiveError;
use ferry_criu::CriuError;
use ferry_image::ImageError;

pub use dump::dump;
pub use dump_archive::{dump_any, dump_to_archive, pack_images, ArchiveDump};
pub use dump_container::{container_files, dump_container, ContainerDumpOutcome};
pub use import::{import_standard, is_standard, unpack_standard, ImportReport};
pub use restore::restore;
pub use restore_archive::{restore_from_archive, ArchiveRestore, ArchiveRestoreOptions};
pub use restore_container::{restore_container, ContainerRestore, Source};

/// What became of the dump target after a failed dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetAfterFailure {
    /// It runs, as before.
    Running,
    /// It was found stopped and ferry resumed these pids.
    Resumed(Vec<i32>),
    /// It no longer exists (it exited, or it never did).
    Gone,
    /// Its container was left frozen; ferry thawed the freezer cgroup.
    Thawed,
}

impl std::fmt::Display for TargetAfterFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetAfterFailure::Running => f.write_str("the process tree is still running"),
            TargetAfterFailure::Resumed(pids) => {
                write!(
                    f,
                    "ferry resumed stopped processes {pids:?}; the tree is running"
                )
            }
            TargetAfterFailure::Gone => f.write_str("the process no longer exists"),
            TargetAfterFailure::Thawed => {
                f.write_str("ferry thawed the container's frozen cgroup; it is running")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    GpuRecord(Box<ferry_image::gpu_record::GpuRecordError>),
    #[error(transparent)]
    TargetRecord(Box<crate::target::TargetRecordError>),
    #[error("no process with pid {pid} to dump")]
    NoSuchProcess { pid: i32 },
    #[error("pid {pid} ({comm}) belongs to a session whose leader is outside this pid namespace, which CRIU cannot dump: start it in a session of its own (setsid CMD, or from a login shell) or in a pid namespace of its own (unshare --pid --fork setsid CMD)")]
    SessionOutside { pid: i32, comm: String },
    #[error("pid {pid} is a zombie ({comm}): nothing left to dump")]
    Zombie { pid: i32, comm: String },
    #[error("images directory {} holds another dump's images ({entries} files): dump into a new or empty directory", path.display())]
    DirNotEmpty { path: PathBuf, entries: usize },
    #[error("images directory {} exists but is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("images directory {} is not writable", path.display())]
    DirNotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("dump of pid {pid} failed; {after}; partial images removed, CRIU's log kept")]
    DumpFailed {
        pid: i32,
        after: TargetAfterFailure,
        #[source]
        source: CriuError,
    },
    #[error("images in {} cannot be restored", path.display())]
    BadImages {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("pid {pid} needed by the restore is in use by '{holder}'{}", hint)]
    PidInUse {
        pid: u32,
        holder: String,
        hint: &'static str,
    },
    #[error("restore from {} failed", path.display())]
    RestoreFailed {
        path: PathBuf,
        #[source]
        source: CriuError,
    },
    #[error("CRIU reported pid {pid} restored but it is not running")]
    RestoredNotRunning { pid: i32 },
    #[error("cannot restore from archive {}; nothing was restored", path.display())]
    Archive {
        path: PathBuf,
        #[source]
        source: Box<ArchiveError>,
    },
    #[error("cannot stream the images of archive {} to CRIU: {detail}", path.display())]
    Stream { path: PathBuf, detail: String },
    #[error(
        "restore from archive {} abandoned: CRIU stopped reading its images, so the stream was closed and CRIU removed what it had begun{}",
        path.display(),
        log.as_ref().map(|l| format!("; CRIU's log: {}", l.display())).unwrap_or_default()
    )]
    Stalled {
        path: PathBuf,
        log: Option<PathBuf>,
        #[source]
        source: Box<ferry_criu::streamer::StreamError<ArchiveError>>,
    },
    #[error("cannot pack the images in {} into an archive; the images are kept there", images.display())]
    Pack {
        images: PathBuf,
        #[source]
        source: Box<ArchiveError>,
    },
    #[error("GPU check refused the dump; nothing was frozen")]
    Gpu(#[from] crate::gpu::GpuError),
    #[error("this host cannot restore the checkpoint's GPU state; nothing was restored")]
    GpuIncompatible(#[from] crate::gpu::Incompatible),
    #[error("pre-flight check refused the dump; nothing was frozen")]
    Preflight(#[from] crate::target::preflight::PreflightError),
    #[error(transparent)]
    Container(#[from] crate::target::ContainerError),
    #[error(transparent)]
    Runc(#[from] crate::target::runc::RuncError),
    #[error(transparent)]
    Docker(#[from] crate::target::docker::DockerError),
    #[error(transparent)]
    Podman(#[from] crate::target::podman::PodmanError),
    #[error("cannot carry the container's files")]
    Files(#[from] crate::target::fs::FsError),
    #[error("cannot write {}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no runc bundle recorded with the images in {} and none given: pass --bundle", images.display())]
    NoBundle { images: PathBuf },
    #[error("cannot put the images in {} on stable storage; {after}", path.display())]
    NotDurable {
        path: PathBuf,
        after: TargetAfterFailure,
        #[source]
        source: io::Error,
    },
    #[error("cannot pack the images in {} into an archive (they are kept there); {after}", images.display())]
    PackFailed {
        images: PathBuf,
        after: TargetAfterFailure,
        #[source]
        source: Box<ArchiveError>,
    },
    #[error("cannot import the checkpoint archive {}: {detail}", path.display())]
    Import { path: PathBuf, detail: String },
    #[error("cannot create a staging directory in {}", path.display())]
    Staging {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<ferry_image::gpu_record::GpuRecordError> for CheckpointError {
    fn from(e: ferry_image::gpu_record::GpuRecordError) -> Self {
        CheckpointError::GpuRecord(Box::new(e))
    }
}

impl From<crate::target::TargetRecordError> for CheckpointError {
    fn from(e: crate::target::TargetRecordError) -> Self {
        CheckpointError::TargetRecord(Box::new(e))
    }
}

impl CheckpointError {
    /// The CRIU failure underneath, if there is one (for its log lines).
    pub fn criu(&self) -> Option<&CriuError> {
        match self {
            CheckpointError::DumpFailed { source, .. }
            | CheckpointError::RestoreFailed { source, .. } => Some(source),
            _ => None,
        }
    }
}
