//! Where to put images that only live for one operation: tmpfs when it has
//! room (fast, and gone on reboot), else the system's temporary directory.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::statvfs::statvfs;

/// Candidate bases, fastest first.
const TMPFS_BASE: &str = "/dev/shm";
/// How long a dead process's staging is left alone before a sweep removes
/// it.
/// Prefix of the staging directories an agent makes (migration sessions
/// and HA replicas), which it sweeps when it starts.
pub const AGENT_PREFIX: &str = "ferry-agent-";
pub const SWEEP_GRACE: Duration = Duration::from_secs(60);
/// Room kept free beyond what the images need.
const MARGIN_BYTES: u64 = 64 << 20;

/// Bytes free on the filesystem of `path`.
pub fn available(path: &Path) -> Option<u64> {
    let st = statvfs(path).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// The base directory for `bytes` of staged images: `preferred` if given,
/// else tmpfs when it has room, else the temporary directory.
pub fn base_for(bytes: u64, preferred: Option<&Path>) -> PathBuf {
    if let Some(p) = preferred {
        return p.to_path_buf();
    }
    let need = bytes + bytes / 20 + MARGIN_BYTES;
    let tmpfs = Path::new(TMPFS_BASE);
    if available(tmpfs).is_some_and(|free| free >= need) {
        return tmpfs.to_path_buf();
    }
    std::env::temp_dir()
}

/// A fresh staging directory under the chosen base, removed when dropped.
/// Its name carries this process's pid (`PREFIX<pid>-XXXXXX`), so that
/// [`sweep_stale`] can tell what a killed process left behind.
pub fn create(prefix: &str, bytes: u64, preferred: Option<&Path>) -> io::Result<tempfile::TempDir> {
    let base = base_for(bytes, preferred);
    tempfile::Builder::new()
        .prefix(&format!("{prefix}{}-", std::process::id()))
        .tempdir_in(&base)
}

/// Removes staging directories named `PREFIX<pid>-*` whose process is
/// gone (killed before it could clean up) and that nothing changed for
/// `grace` (what a dead agent left may still be in use: a source on its
/// kernel restores from a failed migration's images), from every base
/// [`create`] uses. Returns what it removed.
pub fn sweep_stale(prefix: &str, preferred: Option<&Path>, grace: Duration) -> Vec<PathBuf> {
    let mut bases = vec![PathBuf::from(TMPFS_BASE), std::env::temp_dir()];
    bases.extend(preferred.map(Path::to_path_buf));
    let mut removed = Vec::new();
    for base in bases {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let owner = name
                .strip_prefix(prefix)
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<i32>().ok());
            let quiet = || {
                e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= grace)
            };
            if let Some(pid) = owner {
                if !ferry_image::process::pid_in_use(pid)
                    && quiet()
                    && std::fs::remove_dir_all(e.path()).is_ok()
                {
                    removed.push(e.path());
                }
            }
        }
    }
    removed
}

/// Copies CRIU's log out of a staging directory before it goes, beside the
/// system's temporary files as `ferry-LABEL-PID.log`; returns where it was
/// kept.
pub fn keep_log(log: &Path, label: &str) -> Option<PathBuf> {
    if !log.exists() {
        return None;
    }
    let kept = std::env::temp_dir().join(format!("ferry-{label}-{}.log", std::process::id()));
    match std::fs::copy(log, &kept) {
        Ok(_) => Some(kept),
        Err(e) => {
            tracing::warn!(error = %e, "cannot keep CRIU's log");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeping_removes_only_what_dead_processes_left() {
        let base = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let prefix = "ferry-sweep-test-";
        let stale = base.path().join(format!("{prefix}{dead}-abc"));
        let mine = base
            .path()
            .join(format!("{prefix}{}-def", std::process::id()));
        std::fs::create_dir_all(stale.join("images")).unwrap();
        std::fs::create_dir_all(&mine).unwrap();
        let removed = sweep_stale(prefix, Some(base.path()), Duration::ZERO);
        assert_eq!(removed, vec![stale.clone()]);
        std::fs::create_dir_all(stale.join("images")).unwrap();
        let removed = sweep_stale(prefix, Some(base.path()), Duration::from_secs(60));
        assert!(removed.is_empty(), "a fresh directory was swept");
        let removed = sweep_stale(prefix, Some(base.path()), Duration::ZERO);
        assert_eq!(removed, vec![stale.clone()]);
        assert!(!stale.exists() && mine.exists());
    }
}
