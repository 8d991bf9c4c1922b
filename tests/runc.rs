//! runc containers checkpointed by ferry over CRIU RPC and restored through
//! runc.

mod common;

use std::process::Command;

use common::containers::*;
use common::*;

fn pid_of(run: &serde_json::Value) -> i32 {
    run["pid"].as_i64().unwrap() as i32
}

#[test]
fn stop_mode_dump_then_restore_through_runc() {
    require_criu();
    require_runc();
    let dir = scratch("runc-stop");
    let c = RuncContainer::start(dir.path(), "stop", 16);
    let before = counter_above(&c.report(), 50).counter;
    let imgs = images(dir.path());
    let out = ferry(["dump", "--json", "--runc", &c.id, "-D"])
        .arg(&imgs)
        .json();
    assert!(out["criu_stats"]["frozen"].as_u64().unwrap() > 0, "{out}");
    assert!(
        RuncContainer::status(&c.id).is_none(),
        "stop mode left the container in runc"
    );
    for f in ["descriptors.json", "ferry-target.json", "inventory.img"] {
        assert!(imgs.join(f).exists(), "{f} missing");
    }
    let at_dump = ferry_lab::workload::Report::read(&c.report())
        .unwrap()
        .counter;
    assert!(at_dump >= before);

    let run = ferry(["restore", "--json", "--runc", &c.id, "-D"])
        .arg(&imgs)
        .json();
    let (status, pid) = RuncContainer::status(&c.id).expect("restored container known to runc");
    assert_eq!(status, "running");
    assert_eq!(pid as i32, pid_of(&run));
    let after = counter_above(&c.report(), at_dump + 100);
    assert!(after.counter > at_dump);
    assert!(verify_memory(&c.report(), pid_of(&run)));
}

#[test]
fn leave_running_then_restore_as_a_new_container() {
    require_criu();
    require_runc();
    let dir = scratch("runc-leave");
    let c = RuncContainer::start(dir.path(), "leave", 8);
    let before = counter_above(&c.report(), 50).counter;
    let imgs = images(dir.path());
    ferry(["dump", "--leave-running", "--runc", &c.id, "-D"])
        .arg(&imgs)
        .ok();
    let (status, _) = RuncContainer::status(&c.id).unwrap();
    assert_eq!(status, "running");
    let ran_on = counter_above(&c.report(), before + 1000).counter;
    // The source goes away (the migration case), the copy gets a new id.
    let _ = Command::new("runc")
        .args(["delete", "--force", &c.id])
        .output();
    let copy = unique("leave-copy");
    let _cleanup = RuncCleanup(vec![copy.clone()]);
    let run = ferry(["restore", "--json", "--runc", &copy, "-D"])
        .arg(&imgs)
        .json();
    let first =
        ferry_lab::workload::Report::wait_for(&c.report(), CONTINUE, |r| r.counter < ran_on)
            .unwrap()
            .counter;
    assert!(
        first >= before,
        "copy restarted from {first}, dumped after {before}"
    );
    counter_above(&c.report(), first + 100);
    assert!(verify_memory(&c.report(), pid_of(&run)));
}

#[test]
fn runc_restores_from_an_archive() {
    require_criu();
    require_runc();
    let dir = scratch("runc-archive");
    let c = RuncContainer::start(dir.path(), "archive", 8);
    counter_above(&c.report(), 50);
    let a = dir.path().join("c.ferry");
    ferry(["dump", "--runc", &c.id, "--archive"]).arg(&a).ok();
    let at_dump = ferry_lab::workload::Report::read(&c.report())
        .unwrap()
        .counter;
    let run = ferry(["restore", "--json", "--runc", &c.id, "--archive"])
        .arg(&a)
        .json();
    counter_above(&c.report(), at_dump + 100);
    assert!(verify_memory(&c.report(), pid_of(&run)));
}

#[test]
fn plain_runc_restore_accepts_ferrys_images_of_the_same_size_as_runc_checkpoint() {
    require_criu();
    require_runc();
    let dir = scratch("runc-cross");
    let c = RuncContainer::start(dir.path(), "cross", 8);
    counter_above(&c.report(), 50);
    let ours = dir.path().join("ferry-images");
    let theirs = dir.path().join("runc-images");
    ferry(["dump", "--leave-running", "--runc", &c.id, "-D"])
        .arg(&ours)
        .ok();
    sh(Command::new("runc")
        .args(["checkpoint", "--leave-running", "--image-path"])
        .arg(&theirs)
        .arg(&c.id));
    let size = |d: &std::path::Path| -> u64 {
        std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".img"))
            .map(|e| e.metadata().unwrap().len())
            .sum()
    };
    let (a, b) = (size(&ours), size(&theirs));
    eprintln!("image bytes: ferry {a}, runc checkpoint {b}");
    assert!(
        a.abs_diff(b) * 100 <= b * 5,
        "ferry {a} vs runc {b} bytes of images"
    );

    sh(Command::new("runc").args(["delete", "--force", &c.id]));
    // No ferry on the restore side: plain runc.
    sh(Command::new("runc")
        .args(["restore", "--detach", "--image-path"])
        .arg(&ours)
        .arg("--bundle")
        .arg(&c.bundle)
        .arg(&c.id));
    let at = ferry_lab::workload::Report::read(&c.report())
        .unwrap()
        .counter;
    counter_above(&c.report(), at + 100);
}

#[test]
fn failures_are_clear_and_the_source_keeps_running() {
    require_criu();
    require_runc();
    let dir = scratch("runc-fail");
    let err = ferry(["dump", "--runc", "no-such-container-xyz", "-D"])
        .arg(dir.path().join("x"))
        .fails_with(4);
    assert!(
        err.contains("no runc container 'no-such-container-xyz'"),
        "{err}"
    );

    let c = RuncContainer::start(dir.path(), "fail", 8);
    counter_above(&c.report(), 50);
    let imgs = images(dir.path());
    ferry(["dump", "--leave-running", "--runc", &c.id, "-D"])
        .arg(&imgs)
        .ok();
    // Restoring over the running source is refused before runc runs.
    let err = ferry(["restore", "--runc", &c.id, "-D"])
        .arg(&imgs)
        .fails_with(1);
    assert!(err.contains("already exists"), "{err}");
    // A bundle whose rootfs is missing.
    let bad = dir.path().join("badbundle");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(c.bundle.join("config.json"), bad.join("config.json")).unwrap();
    let err = ferry(["restore", "--runc", &unique("fail-copy"), "--bundle"])
        .arg(&bad)
        .arg("-D")
        .arg(&imgs)
        .fails_with(1);
    assert!(
        err.contains("root filesystem") && err.contains("does not exist"),
        "{err}"
    );
    // runc itself failing: images of a file the bundle does not have.
    let copy = unique("fail-copy2");
    let _cleanup = RuncCleanup(vec![copy.clone()]);
    std::fs::rename(
        c.bundle.join("rootfs/bin/ferry-workload"),
        c.bundle.join("rootfs/bin/moved-away"),
    )
    .unwrap();
    let err = ferry(["restore", "--runc", &copy, "-D"])
        .arg(&imgs)
        .fails_with(1);
    assert!(err.contains("runc") && err.contains("restore"), "{err}");
    // The source ran through all of it.
    let (status, _) = RuncContainer::status(&c.id).unwrap();
    assert_eq!(status, "running");
    let now = ferry_lab::workload::Report::read(&c.report())
        .unwrap()
        .counter;
    counter_above(&c.report(), now + 50);

    // A stopped container is refused.
    sh(Command::new("runc").args(["kill", &c.id, "KILL"]));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let err = ferry(["dump", "--runc", &c.id, "-D"])
        .arg(dir.path().join("y"))
        .fails_with(4);
    assert!(err.contains("is stopped"), "{err}");
}

#[test]
fn a_dump_aborted_while_the_container_is_frozen_leaves_it_running() {
    use ferry_core::checkpoint::{self, CheckpointError, TargetAfterFailure};
    use ferry_core::target::ContainerRef;
    use ferry_criu::{Criu, DumpRequest, HookError, Notification, Script};

    require_criu();
    require_runc();
    let dir = scratch("runc-abort");
    let c = RuncContainer::start(dir.path(), "abort", 8);
    counter_above(&c.report(), 50);
    let container = ContainerRef::Runc {
        id: c.id.clone(),
        root: ferry_core::target::runc::DEFAULT_ROOT.into(),
    };
    let mut saw_frozen = false;
    let freezer = format!("/sys/fs/cgroup/freezer/{}/freezer.state", c.id);
    let (_, init) = RuncContainer::status(&c.id).unwrap();
    let mut abort = |n: &mut Notification| -> Result<(), HookError> {
        if n.script == Script::PostDump {
            // CRIU froze the cgroup, seized the tasks and holds them stopped.
            saw_frozen = ferry_image::process::ProcessInfo::read(init as i32)?.is_stopped();
            return Err("test aborts the container dump at post-dump".into());
        }
        Ok(())
    };
    let criu = Criu::locate(None, None).unwrap();
    let req = DumpRequest::new(0, images(dir.path()));
    let err = checkpoint::dump_container(&criu, &container, &req, &Default::default(), &mut abort)
        .unwrap_err();
    assert!(saw_frozen, "the container was not stopped at post-dump");
    assert!(
        matches!(
            &err,
            CheckpointError::DumpFailed {
                after: TargetAfterFailure::Running | TargetAfterFailure::Thawed,
                ..
            }
        ),
        "{err}"
    );
    assert!(!std::fs::read_to_string(&freezer)
        .unwrap()
        .contains("FROZEN"));
    let (status, _) = RuncContainer::status(&c.id).unwrap();
    assert_eq!(status, "running");
    let now = ferry_lab::workload::Report::read(&c.report())
        .unwrap()
        .counter;
    counter_above(&c.report(), now + 50);
}

/// A runc container's rootfs travels with its checkpoint when asked
/// (`--with-rootfs`: runc has no layer of its own): a busybox script
/// writes files, links, an owner and mode, deletes a file of its rootfs,
/// then counts. Restored with another bundle whose rootfs is a fresh copy
/// of the original, every file is identical, the deleted one stays
/// deleted, and the shell counts on from its dump.
#[test]
fn a_runc_containers_rootfs_travels_with_with_rootfs() {
    use common::files;
    require_criu();
    require_runc();
    let dir = scratch("runc-rootfs");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let with_state =
        |cfg: &mut serde_json::Value| {
            cfg["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/state", "type": "bind", "source": state, "options": ["rbind", "rw"]
        }));
        };
    let args: Vec<String> = ["/bin/busybox", "sh", "-c", files::SCRIPT]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let bundle = dir.path().join("bundle");
    bundle_running(&bundle, args.clone(), with_state);
    let id = unique("rootfs");
    let copy = unique("rootfs-copy");
    let _cleanup = RuncCleanup(vec![id.clone(), copy.clone()]);
    sh(Command::new("runc")
        .args(["run", "--detach", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null()));
    let before = files::counter_above(&state, 5);
    let expected = files::check_runc(&id);
    let imgs = images(dir.path());
    let dumped = ferry(["dump", "--json", "--with-rootfs", "--runc", &id, "-D"])
        .arg(&imgs)
        .json();
    assert_eq!(
        dumped["container_files"]["roots"][0]["kind"].as_str(),
        Some("rootfs"),
        "{dumped}"
    );
    let at_dump = files::counter(&state);
    // Another bundle, its rootfs fresh from the image: the files come from
    // the checkpoint alone.
    let other = dir.path().join("other-bundle");
    bundle_running(&other, args, with_state);
    assert!(other.join("rootfs/bin/ferry-workload").exists());
    std::fs::remove_file(state.join("counter")).unwrap();
    ferry(["restore", "--runc", &copy, "--bundle"])
        .arg(&other)
        .arg("-D")
        .arg(&imgs)
        .ok();
    let first = files::counter(&state);
    assert!(
        first >= before && first <= at_dump + 20,
        "the copy counts from {first}: dumped at {at_dump}"
    );
    files::counter_above(&state, first + 5);
    files::same(&expected, &files::check_runc(&copy));
}
