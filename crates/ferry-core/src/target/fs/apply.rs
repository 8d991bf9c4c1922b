//! Putting a captured tree in place on the destination, before the engine
//! starts the container. The tar is untrusted: every entry's path must be
//! relative and free of `..`, and is written only inside the destination
//! (links included: tar's `unpack_in` refuses anything that would leave it).

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{mknod, Mode, SFlag};

use super::{FsError, FsRoot, RootKind, OPAQUE_XATTR};

/// What a restore put in place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub files: u64,
    pub bytes: u64,
    /// Roots left as they were: the destination is the very directory
    /// they were captured from (same host, same engine).
    pub skipped_same: u64,
}

/// `p` as a relative path that stays inside its root, or None.
pub(crate) fn checked_relative(p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Writes `root` (its tars in images directory `dir`) into `dest`. A
/// layer goes into a new container's (empty) upper directory, deletions
/// as whiteouts; a volume, bind mount or rootfs replaces what `dest` held.
/// A root captured against a base gets the base first, then loses what
/// was removed since, then gets what changed.
pub fn apply_root(root: &FsRoot, dir: &Path, dest: &Path) -> Result<ApplyReport, FsError> {
    let mut report = ApplyReport::default();
    if root.identity.is_some() && super::identity(dest) == root.identity {
        tracing::debug!(root = %root.kind.describe(), dir = %dest.display(), "restoring into the directory it was captured from: left as it is");
        report.skipped_same = 1;
        return Ok(report);
    }
    fs::create_dir_all(dest).map_err(FsError::io("create", dest))?;
    if root.kind != RootKind::Layer {
        clear(dest)?;
    }
    if let Some(base) = &root.base {
        if !place_prepared(&dir.join(format!("{base}{PREPARED_SUFFIX}")), dest) {
            let r = unpack(&dir.join(base), dest)?;
            report.files += r.files;
            report.bytes += r.bytes;
        }
    }
    let tar = &dir.join(&root.tar);
    for p in &root.removed {
        let at = inside(dest, p, tar)?;
        remove_any(&at)?;
    }
    let r = unpack(tar, dest)?;
    report.files += r.files;
    report.bytes += r.bytes;
    for p in &root.deleted {
        let at = inside(dest, p, tar)?;
        if let Some(parent) = at.parent() {
            fs::create_dir_all(parent).map_err(FsError::io("create", parent))?;
        }
        remove_any(&at)?;
        mknod(&at, SFlag::S_IFCHR, Mode::empty(), 0)
            .map_err(|e| FsError::io("make the whiteout", &at)(e.into()))?;
    }
    for p in &root.opaque {
        let at = inside(dest, p, tar)?;
        xattr::set(&at, OPAQUE_XATTR, b"y").map_err(FsError::io("mark opaque", &at))?;
    }
    Ok(report)
}

/// Beside a base tar, a link to the tree it was unpacked into ahead of
/// the restore (on the destination's filesystem, by the agent).
pub const PREPARED_SUFFIX: &str = ".d";

/// Unpacks the base tar `tar` into `into` (created) ahead of the restore,
/// so that the restore only has to move it into place.
pub fn prepare(tar: &Path, into: &Path) -> Result<ApplyReport, FsError> {
    fs::create_dir_all(into).map_err(FsError::io("create", into))?;
    unpack(tar, into)
}

/// Moves the tree `link` points to (a base unpacked ahead) into `dest`,
/// taking `dest`'s place with its mode and owner. False, with nothing
/// changed, when there is no such tree or it cannot be moved there (not
/// one filesystem): the base tar is unpacked instead.
fn place_prepared(link: &Path, dest: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // Only a link the agent made: an archive or a peer brings regular
    // files only.
    if !fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink()) {
        return false;
    }
    let Ok(tree) = fs::canonicalize(link) else {
        return false;
    };
    let (Ok(t), Ok(d)) = (fs::metadata(&tree), fs::metadata(dest)) else {
        return false;
    };
    if !t.is_dir() || t.dev() != d.dev() {
        return false;
    }
    let moved = (|| {
        let _ = std::os::unix::fs::chown(&tree, Some(d.uid()), Some(d.gid()));
        fs::set_permissions(&tree, d.permissions())?;
        clear(dest).map_err(std::io::Error::other)?;
        fs::remove_dir(dest)?;
        fs::rename(&tree, dest)
    })();
    match moved {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(tree = %tree.display(), dest = %dest.display(), error = %e, "cannot move the files unpacked ahead into place: unpacking them again");
            // The destination may be gone: make it again for the unpack.
            let _ = fs::create_dir_all(dest);
            false
        }
    }
}

/// `p` (relative, from the manifest) under `dest`, refused if it or a
/// link on its way leads out of `dest`.
fn inside(dest: &Path, p: &str, tar: &Path) -> Result<PathBuf, FsError> {
    let rel = checked_relative(p).ok_or_else(|| FsError::Escapes {
        path: tar.to_path_buf(),
        entry: p.to_string(),
    })?;
    let at = dest.join(rel);
    within(dest, &at, tar)?;
    Ok(at)
}

/// Unpacks the tar `tar` into `dest`, every entry checked to stay inside.
fn unpack(tar: &Path, dest: &Path) -> Result<ApplyReport, FsError> {
    let mut report = ApplyReport::default();
    let base = fs::canonicalize(dest).map_err(FsError::io("resolve", dest))?;
    let file = File::open(tar).map_err(FsError::io("open", tar))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let damaged = |e: std::io::Error| FsError::Damaged {
        path: tar.to_path_buf(),
        detail: e.to_string(),
    };
    for entry in archive.entries().map_err(damaged)? {
        let mut entry = entry.map_err(damaged)?;
        let name = entry
            .path()
            .map_err(damaged)?
            .to_string_lossy()
            .into_owned();
        let kind = entry.header().entry_type();
        if kind.is_dir()
            && Path::new(&name)
                .components()
                .all(|c| c == Component::CurDir)
        {
            // The root itself ("./", as podman's volume tars have it).
            continue;
        }
        if checked_relative(&name).is_none() {
            return Err(FsError::Escapes {
                path: tar.to_path_buf(),
                entry: name,
            });
        }
        if kind.is_file() {
            report.files += 1;
            report.bytes += entry.size();
        }
        // Into a tree that holds something there already (a restore into
        // the container it came from): what the entry replaces goes first,
        // as a link cannot be made over a file, nor a file over a directory.
        if let Some(at) = checked_relative(&name).map(|rel| dest.join(rel)) {
            if let Ok(m) = fs::symlink_metadata(&at) {
                if !(kind.is_dir() && m.is_dir()) && within_resolved(&base, dest, &at, tar).is_ok()
                {
                    remove_any(&at)?;
                }
            }
        }
        let inside = entry.unpack_in(dest).map_err(|e| FsError::Io {
            what: "write",
            path: dest.join(&name),
            source: e,
        })?;
        if !inside {
            return Err(FsError::Escapes {
                path: tar.to_path_buf(),
                entry: name,
            });
        }
    }
    Ok(report)
}

/// `at`'s parent, links resolved, must lie inside `dest` (a link the tar
/// made must not carry a whiteout or attribute elsewhere).
fn within(dest: &Path, at: &Path, tar: &Path) -> Result<(), FsError> {
    let base = fs::canonicalize(dest).map_err(FsError::io("resolve", dest))?;
    within_resolved(&base, dest, at, tar)
}

/// [`within`], `dest` resolved once by the caller as `base`.
fn within_resolved(base: &Path, dest: &Path, at: &Path, tar: &Path) -> Result<(), FsError> {
    let mut parent = at.parent().unwrap_or(dest).to_path_buf();
    // The nearest existing ancestor decides.
    while !parent.exists() {
        match parent.parent() {
            Some(p) => parent = p.to_path_buf(),
            None => break,
        }
    }
    let real = fs::canonicalize(&parent).map_err(FsError::io("resolve", &parent))?;
    if real.starts_with(base) {
        Ok(())
    } else {
        Err(FsError::Escapes {
            path: tar.to_path_buf(),
            entry: at.display().to_string(),
        })
    }
}

/// Removes whatever is at `at` (nothing there is fine).
fn remove_any(at: &Path) -> Result<(), FsError> {
    match fs::symlink_metadata(at) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(at),
        Ok(_) => fs::remove_file(at),
        Err(_) => return Ok(()),
    }
    .map_err(FsError::io("remove", at))
}

/// Removes everything inside `dir`, keeping `dir` itself.
fn clear(dir: &Path) -> Result<(), FsError> {
    for entry in fs::read_dir(dir).map_err(FsError::io("read directory", dir))? {
        let entry = entry.map_err(FsError::io("read directory", dir))?;
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        }
        .map_err(FsError::io("remove", &path))?;
    }
    Ok(())
}
