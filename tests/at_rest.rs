//! Files at rest: whatever umask ferry is started with, what it writes
//! (images, archives, unpacked directories, the agent's page store, keys)
//! is readable by root only: they hold application memory and secrets.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs `ferry ARGS` from a shell whose umask is 000; asserts success.
fn ferry_umask_000(args: &[&str]) {
    let script = format!("umask 000; exec {FERRY} \"$@\"");
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ferry {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file and directory under `path` (and `path` itself).
fn walk(path: &Path, out: &mut Vec<std::path::PathBuf>) {
    out.push(path.to_path_buf());
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            walk(&e.unwrap().path(), out);
        }
    }
}

/// Asserts that nothing under `path` is open to group or others.
fn assert_root_only(path: &Path) {
    let mut all = Vec::new();
    walk(path, &mut all);
    for p in all {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.file_type().is_symlink() || meta.file_type().is_socket() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(
            mode & 0o077,
            0,
            "{} is mode {mode:o}: open to other users",
            p.display()
        );
    }
}

use std::os::unix::fs::FileTypeExt;

#[test]
fn what_ferry_writes_is_root_only_under_umask_000() {
    require_criu();
    let dir = scratch("at-rest");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut w = start_workload(dir.path(), 8);
    let imgs = dir.path().join("images");
    let archive = dir.path().join("a.ferry");
    let pid = w.pid().to_string();
    ferry_umask_000(&[
        "dump",
        "-t",
        &pid,
        "-D",
        imgs.to_str().unwrap(),
        "--archive",
        archive.to_str().unwrap(),
    ]);
    assert!(w.reap(Duration::from_secs(10)).unwrap());
    assert_root_only(&imgs);
    assert_root_only(&archive);

    let out = dir.path().join("unpacked");
    ferry_umask_000(&["unpack", archive.to_str().unwrap(), out.to_str().unwrap()]);
    assert_root_only(&out);
    let repacked = dir.path().join("b.ferry");
    ferry_umask_000(&["pack", out.to_str().unwrap(), repacked.to_str().unwrap()]);
    assert_root_only(&repacked);

    let key = dir.path().join("key");
    ferry_umask_000(&["keygen", key.to_str().unwrap()]);
    assert_root_only(&key);

    // The agent's page store, made when it starts.
    let store = dir.path().join("store");
    let script = format!("umask 000; exec {FERRY} \"$@\"");
    let mut agent = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(["agent", "--listen", "127.0.0.1:0", "--key"])
        .arg(&key)
        .arg("--store")
        .arg(&store)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(store.is_dir() && std::fs::read_dir(&store).unwrap().next().is_some()) {
        assert!(Instant::now() < deadline, "the agent made no page store");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = agent.kill();
    let _ = agent.wait();
    assert_root_only(&store);
}
