//! podman containers checkpointed by ferry over CRIU RPC (never podman's
//! checkpoint) and restored by `podman container restore`, with their
//! files.

mod common;

use std::process::Command;

use common::containers::*;
use common::*;

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("run podman")
}

fn status(name: &str) -> String {
    // "stopped" until podman's cleanup after a kill makes it "exited".
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = podman(&["inspect", "--format", "{{.State.Status}}", name]);
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if s != "stopped" || std::time::Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Removes the test's container, volume and image when dropped.
struct Cleanup {
    container: String,
    volume: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", &self.container]);
        let _ = podman(&["volume", "rm", "-f", &self.volume]);
        let _ = podman(&["rmi", "-f", &self.image]);
    }
}

/// Runs [`common::files::SCRIPT`] in a new podman container (an image of
/// the test rootfs, a named volume at /data, `state` at /state).
fn start(dir: &std::path::Path, tag: &str) -> (Cleanup, String, std::path::PathBuf) {
    use common::files;
    assert!(
        ferry_sys::which("podman").is_some(),
        "podman is not installed: run scripts/setup.sh as root (package podman)"
    );
    let tar = rootfs_tar(dir);
    let image = format!("localhost/{}:latest", unique(tag));
    let name = unique(tag);
    let volume = unique(&format!("{tag}-vol"));
    let cleanup = Cleanup {
        container: name.clone(),
        volume: volume.clone(),
        image: image.clone(),
    };
    let out = podman(&["import", &tar.to_string_lossy(), &image]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let state_mount = format!("{}:/state", state.display());
    let volume_mount = format!("{volume}:/data");
    let out = podman(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        &name,
        "-v",
        &state_mount,
        "-v",
        &volume_mount,
        &image,
        "/bin/busybox",
        "sh",
        "-c",
        files::SCRIPT,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cleanup, name, state)
}

/// A busybox script in a podman container (its layer: files, links, an
/// owner and mode, a deleted file of its image; a named volume) is dumped
/// by ferry into an archive in stop mode, with its files (podman's layer
/// and volume found through `podman inspect`). `ferry restore --podman`
/// from the archive hands it to `podman container restore`: it runs
/// again, its files as they were, and the shell counts on from its dump.
/// (Its files are still in place: a restore into the very directories
/// they came from leaves them; carrying them elsewhere is tested with
/// Docker, runc and HA.)
#[test]
fn a_podman_container_restores_through_podman_with_its_files() {
    use common::files;
    require_criu();
    assert!(
        ferry_sys::which("podman").is_some(),
        "podman is not installed: run scripts/setup.sh as root (package podman)"
    );
    let dir = scratch("podman-files");
    let (_cleanup, name, state) = start(dir.path(), "podman-files");
    let before = files::counter_above(&state, 5);
    let check = |n: &str| files::check_podman(n);
    let expected = check(&name);
    let a = dir.path().join("c.ferry");
    let dumped = ferry(["dump", "--json", "--podman", &name, "--archive"])
        .arg(&a)
        .json();
    assert_eq!(
        dumped["container_files"]["roots"].as_array().map(Vec::len),
        Some(2),
        "{dumped}"
    );
    let at_dump = files::counter(&state);
    assert_eq!(status(&name), "exited");
    std::fs::remove_file(state.join("counter")).unwrap();
    ferry(["restore", "--podman", &name, "--archive"])
        .arg(&a)
        .ok();
    assert_eq!(status(&name), "running");
    let first = files::counter(&state);
    assert!(
        first >= before && first <= at_dump + 20,
        "the copy counts from {first}: dumped at {at_dump}"
    );
    files::counter_above(&state, first + 5);
    files::same(&expected, &check(&name));
}

/// The standard checkpoint archive, read: podman checkpoints the same
/// kind of container itself (`--export`, zstd); `ferry import` makes a
/// ferry archive of it (its CRIU images, its layer as the container's
/// files, podman's config kept), `ferry inspect` reads the export
/// directly, and `ferry restore --podman` from the imported archive
/// brings the container back through podman, counting on.
#[test]
fn a_podman_export_is_imported_inspected_and_restored_by_ferry() {
    use common::files;
    require_criu();
    let dir = scratch("podman-import");
    let (_cleanup, name, state) = start(dir.path(), "podman-import");
    let before = files::counter_above(&state, 5);
    let expected = files::check_podman(&name);
    let export = dir.path().join("export.tar.zst");
    let t = std::time::Instant::now();
    let out = podman(&[
        "container",
        "checkpoint",
        "--export",
        &export.to_string_lossy(),
        "--compress",
        "zstd",
        &name,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "podman checkpoint --export: {:?}, {} bytes",
        t.elapsed(),
        std::fs::metadata(&export).unwrap().len()
    );
    let at_dump = files::counter(&state);
    let inspected = ferry(["inspect", "--json"]).arg(&export).json();
    assert!(
        inspected["processes"]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "{inspected}"
    );
    let a = dir.path().join("imported.ferry");
    let imported = ferry(["import", "--json"]).arg(&export).arg(&a).json();
    eprintln!("ferry import: {imported}");
    assert_eq!(imported["layer"].as_bool(), Some(true), "{imported}");
    assert_eq!(
        imported["volumes"].as_array().map(Vec::len),
        Some(1),
        "{imported}"
    );
    assert!(imported["images"].as_u64().unwrap() > 10, "{imported}");
    std::fs::remove_file(state.join("counter")).unwrap();
    ferry(["restore", "--podman", &name, "--archive"])
        .arg(&a)
        .ok();
    assert_eq!(status(&name), "running");
    let first = files::counter(&state);
    assert!(
        first >= before && first <= at_dump + 20,
        "the copy counts from {first}: checkpointed at {at_dump}"
    );
    files::counter_above(&state, first + 5);
    files::same(&expected, &files::check_podman(&name));
}
