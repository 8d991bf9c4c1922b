//! Where to put images that only live for one operation: tmpfs when it has
//! room (fast, and gone on reboot), else the system's temporary directory.

use std::io;
use std::path::{Path, PathBuf};

use nix::sys::statvfs::statvfs;

/// Candidate bases, fastest first.
const TMPFS_BASE: &str = "/dev/shm";
/// Room kept free beyond what the images need.
const MARGIN_BYTES: u64 = 64 << 20;

/// Bytes free on the filesystem of `path`.
fn available(path: &Path) -> Option<u64> {
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
pub fn create(prefix: &str, bytes: u64, preferred: Option<&Path>) -> io::Result<tempfile::TempDir> {
    let base = base_for(bytes, preferred);
    tempfile::Builder::new().prefix(prefix).tempdir_in(&base)
}
