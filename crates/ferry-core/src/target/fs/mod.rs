//! A container's files: what it wrote to its writable layer (deletions
//! included), and the volumes and bind mounts it owns. They are captured
//! while the container is frozen (at CRIU's `post-dump` point), stored
//! beside its images, and put in place on the destination before the
//! engine starts the container there.
//!
//! In the images directory (names follow the checkpoint archives podman
//! and CRI-O write, so that an export can reuse them):
//! - `rootfs-diff.tar`: the writable layer's files, directories, links;
//! - `deleted.files`: JSON list of the image's paths the container deleted;
//! - `volume-<name>.tar`, `bind-<n>.tar`: volumes and marked bind mounts;
//! - `ferry-fs.json`: the [`FsManifest`] that ties them together.
//!
//! Everything read back is untrusted: paths are checked to stay inside
//! their root before anything is written (see [`apply`]).

#![forbid(unsafe_code)]

mod apply;
mod capture;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use apply::{apply_root, prepare, ApplyReport, PREPARED_SUFFIX};
pub use capture::{capture_into, capture_root, Captured, Snapshot, StatKey};

pub const MANIFEST_FILE: &str = "ferry-fs.json";
pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";
pub const DELETED_FILES: &str = "deleted.files";
/// Largest manifest or deletion list a restore reads.
const MAX_MANIFEST: u64 = 64 << 20;
/// The overlay attribute that hides a lower directory's entries.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Which of a container's files travel with it.
#[derive(Debug, Clone, Default)]
pub struct FsScope {
    /// Leave the writable layer out (`--ignore-rootfs`).
    pub ignore_rootfs: bool,
    /// Leave named volumes out (`--ignore-volumes`).
    pub ignore_volumes: bool,
    /// Bind mounts the container owns, by their path in the container.
    pub binds: Vec<PathBuf>,
    /// Carry a runc bundle's whole rootfs (runc has no writable layer).
    pub runc_rootfs: bool,
    /// A migration's earlier capture: the one while frozen holds only
    /// what changed since.
    pub base: Option<std::sync::Arc<FsBase>>,
}

/// What one captured tree is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RootKind {
    /// An overlay upper directory: deletions are whiteouts there.
    Layer,
    /// A runc bundle's whole rootfs.
    Rootfs,
    /// A named volume.
    Volume { name: String },
    /// A bind mount, by its path in the container.
    Bind { destination: PathBuf },
}

/// One captured tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRoot {
    #[serde(flatten)]
    pub kind: RootKind,
    /// Its file in the images directory.
    pub tar: String,
    /// Where it was on the source host.
    pub source: PathBuf,
    /// The source directory's identity (device, inode, birth time): a
    /// restore into that very directory, still there, leaves it as it is.
    #[serde(default)]
    pub identity: Option<String>,
    /// Paths (relative to the root) the container deleted: whiteouts.
    #[serde(default)]
    pub deleted: Vec<String>,
    /// Directories (relative) that hide what lies below them.
    #[serde(default)]
    pub opaque: Vec<String>,
    /// Regular files and bytes in `tar`.
    pub files: u64,
    pub bytes: u64,
    /// A migration's earlier capture, sent while the container ran (a file
    /// beside the images): `tar` then holds only what changed since, and
    /// `removed` what is gone. It is put in place first.
    #[serde(default)]
    pub base: Option<String>,
    #[serde(default)]
    pub removed: Vec<String>,
}

/// Everything of a container's files that a checkpoint holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsManifest {
    pub roots: Vec<FsRoot>,
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is damaged: {detail}", path.display())]
    Damaged { path: PathBuf, detail: String },
    #[error("{} names '{entry}', which leaves its root: refused, nothing of it written", path.display())]
    Escapes { path: PathBuf, entry: String },
    #[error("the container has no bind mount at {} (its path in the container): nothing to carry", destination.display())]
    NoSuchBind { destination: PathBuf },
    #[error("the dump gave no point to capture the container's files while it was frozen, and the container ran on")]
    NotCaptured,
    #[error(
        "the checkpoint carries files for {what}, but the container here has none to receive them"
    )]
    NoDestination { what: String },
}

impl FsError {
    pub fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FsError {
        let path = path.to_path_buf();
        move |source| FsError::Io { what, path, source }
    }
}

impl RootKind {
    /// An overlay upper directory (whiteouts are deletions).
    pub fn is_layer(&self) -> bool {
        *self == RootKind::Layer
    }

    pub fn describe(&self) -> String {
        match self {
            RootKind::Layer => "the writable layer".into(),
            RootKind::Rootfs => "the bundle's rootfs".into(),
            RootKind::Volume { name } => format!("volume '{name}'"),
            RootKind::Bind { destination } => format!("bind mount {}", destination.display()),
        }
    }
}

impl FsManifest {
    /// Reads the manifest of an images directory; `None` when it has none
    /// (a process tree, or a container dumped without its files).
    pub fn read(dir: &Path) -> Result<Option<FsManifest>, FsError> {
        let path = dir.join(MANIFEST_FILE);
        let Some(text) = read_bounded(&path)? else {
            return Ok(None);
        };
        let m: FsManifest = serde_json::from_slice(&text).map_err(|e| FsError::Damaged {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        for r in &m.roots {
            // The tars must be plain names in the images directory.
            for name in std::iter::once(&r.tar).chain(&r.base) {
                if !is_fs_file(name) {
                    return Err(FsError::Escapes {
                        path,
                        entry: name.clone(),
                    });
                }
            }
            for p in r.deleted.iter().chain(&r.opaque).chain(&r.removed) {
                apply::checked_relative(p).ok_or_else(|| FsError::Escapes {
                    path: path.clone(),
                    entry: p.clone(),
                })?;
            }
        }
        Ok(Some(m))
    }

    pub fn write(&self, dir: &Path) -> Result<(), FsError> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_vec_pretty(self).unwrap_or_default();
        std::fs::write(&path, text).map_err(FsError::io("write", &path))?;
        if let Some(layer) = self.roots.iter().find(|r| r.kind == RootKind::Layer) {
            // podman's list of deleted files, absolute in the container.
            let deleted: Vec<String> = layer.deleted.iter().map(|p| format!("/{p}")).collect();
            let path = dir.join(DELETED_FILES);
            std::fs::write(&path, serde_json::to_vec(&deleted).unwrap_or_default())
                .map_err(FsError::io("write", &path))?;
        }
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.roots.iter().map(|r| r.bytes).sum()
    }

    pub fn files(&self) -> u64 {
        self.roots.iter().map(|r| r.files).sum()
    }
}

/// Whether `name` in an images directory is part of the files' state
/// (not for the engine's checkpoint directory).
pub fn is_fs_file(name: &str) -> bool {
    let tar = |n: &str| {
        n == ROOTFS_DIFF
            || ((n.starts_with("volume-") || n.starts_with("bind-"))
                && n.ends_with(".tar")
                && !n.contains('/')
                && !n.starts_with('.'))
    };
    name == MANIFEST_FILE
        || name == DELETED_FILES
        || tar(name)
        || name.strip_prefix(BASE_PREFIX).is_some_and(tar)
}

/// Name prefix of a migration's earlier capture, beside the images.
pub const BASE_PREFIX: &str = "base-";

/// A migration's earlier captures (sent while the container ran): what
/// the capture while frozen compares with.
#[derive(Debug, Clone, Default)]
pub struct FsBase {
    /// By root: its tar's name at the destination and its snapshot.
    pub roots: Vec<(RootKind, String, Snapshot)>,
}

impl FsBase {
    fn of(&self, kind: &RootKind) -> Option<(&String, &Snapshot)> {
        self.roots
            .iter()
            .find(|(k, _, _)| k == kind)
            .map(|(_, name, snap)| (name, snap))
    }
}

/// Links (or copies) the images of `images` into the engine's checkpoint
/// directory `dir` (created), leaving out the container's files, which
/// ferry puts in place itself.
pub fn place_for_engine(images: &Path, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(images)? {
        let entry = entry?;
        let name = entry.file_name();
        if entry.file_type()?.is_file() && !is_fs_file(&name.to_string_lossy()) {
            ferry_image::referring::link_or_copy(&entry.path(), &dir.join(&name))?;
        }
    }
    Ok(())
}

/// A tree to capture: what it is and where it lies here.
#[derive(Debug, Clone)]
pub struct FsSource {
    pub kind: RootKind,
    pub path: PathBuf,
}

impl FsSource {
    pub fn tar_name(&self, n: usize) -> String {
        match &self.kind {
            RootKind::Layer | RootKind::Rootfs => ROOTFS_DIFF.into(),
            RootKind::Volume { name } => format!("volume-{}.tar", safe_name(name)),
            RootKind::Bind { .. } => format!("bind-{n}.tar"),
        }
    }
}

fn safe_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Captures `sources` into `dir` and writes the manifest. Called while
/// the container is frozen. A root that `base` holds is captured as what
/// changed since.
pub fn capture(
    sources: &[FsSource],
    dir: &Path,
    base: Option<&FsBase>,
) -> Result<FsManifest, FsError> {
    let mut manifest = FsManifest::default();
    for (n, s) in sources.iter().enumerate() {
        let tar = s.tar_name(n);
        let earlier = base.and_then(|b| b.of(&s.kind));
        let c = capture_root(
            &s.path,
            &dir.join(&tar),
            s.kind == RootKind::Layer,
            earlier.map(|(_, snap)| snap),
        )?;
        manifest.roots.push(FsRoot {
            kind: s.kind.clone(),
            tar,
            source: s.path.clone(),
            identity: identity(&s.path),
            deleted: c.deleted,
            opaque: c.opaque,
            files: c.files,
            bytes: c.bytes,
            base: earlier.map(|(name, _)| name.clone()),
            removed: c.removed,
        });
    }
    manifest.write(dir)?;
    Ok(manifest)
}

/// Puts every root of `manifest` (from images `dir`) in place, each at
/// the path `dest_of` gives for it. A root with no destination is an
/// error: its files would be lost silently otherwise.
pub fn restore(
    manifest: &FsManifest,
    dir: &Path,
    dest_of: impl Fn(&RootKind) -> Option<PathBuf>,
) -> Result<ApplyReport, FsError> {
    let mut total = ApplyReport::default();
    for root in &manifest.roots {
        let dest = dest_of(&root.kind).ok_or_else(|| FsError::NoDestination {
            what: root.kind.describe(),
        })?;
        let r = apply_root(root, dir, &dest)?;
        total.files += r.files;
        total.bytes += r.bytes;
        total.skipped_same += r.skipped_same;
    }
    Ok(total)
}

/// Bytes of the regular files under `path` (an estimate: unreadable
/// parts count nothing).
pub fn tree_bytes(path: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(path) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// A directory's identity: device, inode and birth time (None where the
/// filesystem keeps no birth time: a recreated directory could then take
/// the same inode, so it is never taken for the same).
pub(crate) fn identity(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let born = m
        .created()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(format!("{}:{}:{}", m.dev(), m.ino(), born.as_nanos()))
}

fn read_bounded(path: &Path) -> Result<Option<Vec<u8>>, FsError> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FsError::io("open", path)(e)),
    };
    let mut buf = Vec::new();
    f.take(MAX_MANIFEST + 1)
        .read_to_end(&mut buf)
        .map_err(FsError::io("read", path))?;
    if buf.len() as u64 > MAX_MANIFEST {
        return Err(FsError::Damaged {
            path: path.to_path_buf(),
            detail: format!("larger than {} MiB", MAX_MANIFEST >> 20),
        });
    }
    Ok(Some(buf))
}

#[cfg(test)]
mod tests;
