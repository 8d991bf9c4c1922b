//! Docker containers found through the Engine API, checkpointed by ferry
//! over CRIU RPC and restored through `docker start --checkpoint`.

mod common;

use common::containers::*;
use common::*;
use ferry_lab::workload::Report;

#[test]
fn stop_mode_dump_then_restore_through_docker() {
    require_criu();
    require_docker();
    let dir = scratch("docker-stop");
    let mut d = Docker::image(dir.path(), "stop");
    let state = dir.path().join("state");
    let name = d.run("stop", &state, 16);
    let report = state.join("report");
    counter_above(&report, 50);
    let imgs = images(dir.path());
    ferry(["dump", "--docker", &name, "-D"]).arg(&imgs).ok();
    let at_dump = Report::read(&report).unwrap().counter;
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(Docker::status(&name), "exited");
    let run = ferry(["restore", "--json", "--docker", &name, "-D"])
        .arg(&imgs)
        .json();
    assert_eq!(Docker::status(&name), "running");
    counter_above(&report, at_dump + 100);
    assert!(verify_memory(&report, run["pid"].as_i64().unwrap() as i32));
}

#[test]
fn leave_running_and_archive_restore_into_a_new_container() {
    require_criu();
    require_docker();
    let dir = scratch("docker-move");
    let mut d = Docker::image(dir.path(), "move");
    let state = dir.path().join("state");
    let name = d.run("move", &state, 8);
    let report = state.join("report");
    let before = counter_above(&report, 50).counter;
    let a = dir.path().join("c.ferry");
    ferry(["dump", "--leave-running", "--docker", &name, "--archive"])
        .arg(&a)
        .ok();
    assert_eq!(Docker::status(&name), "running");
    let ran_on = counter_above(&report, before + 1000).counter;
    // The source is gone; the copy is created from what the archive recorded.
    sh(std::process::Command::new("docker").args(["rm", "-f", &name]));
    let copy = unique("move-copy");
    d.adopt(&copy);
    let run = ferry(["restore", "--json", "--docker", &copy, "--archive"])
        .arg(&a)
        .json();
    assert_eq!(Docker::status(&copy), "running");
    let first = Report::wait_for(&report, CONTINUE, |r| r.counter < ran_on)
        .unwrap()
        .counter;
    assert!(
        first >= before,
        "copy restarted from {first}, dumped after {before}"
    );
    assert!(verify_memory(&report, run["pid"].as_i64().unwrap() as i32));
}

#[test]
fn docker_failures_are_clear() {
    require_criu();
    require_docker();
    let dir = scratch("docker-fail");
    let err = ferry(["dump", "--docker", "no-such-container-xyz", "-D"])
        .arg(dir.path().join("x"))
        .fails_with(4);
    assert!(
        err.contains("no Docker container 'no-such-container-xyz'"),
        "{err}"
    );
    let err = ferry(["dump", "--docker", "anything", "--docker-socket"])
        .arg(dir.path().join("absent.sock"))
        .arg("-D")
        .arg(dir.path().join("y"))
        .fails_with(4);
    assert!(err.contains("dockerd is not running"), "{err}");

    let mut d = Docker::image(dir.path(), "fail");
    let state = dir.path().join("state");
    let name = d.run("fail", &state, 8);
    let report = state.join("report");
    counter_above(&report, 50);
    let imgs = images(dir.path());
    ferry(["dump", "--leave-running", "--docker", &name, "-D"])
        .arg(&imgs)
        .ok();
    let err = ferry(["restore", "--docker", &name, "-D"])
        .arg(&imgs)
        .fails_with(1);
    assert!(err.contains("is running"), "{err}");
    let now = Report::read(&report).unwrap().counter;
    counter_above(&report, now + 50);
    assert_eq!(Docker::status(&name), "running");
}

/// An ordinary busybox script's files travel with its checkpoint: what it
/// wrote to its writable layer (a large file, many small ones, links, its
/// own owner and mode), a file of its image it deleted, and its named
/// volume. The source container and the volume are removed; the copy,
/// created from the archive, has every file identical, the deletion
/// kept, and counts on from where it was dumped.
#[test]
fn a_containers_files_and_volume_travel_in_its_archive() {
    use common::files;
    require_criu();
    require_docker();
    let dir = scratch("docker-files");
    let mut d = Docker::image(dir.path(), "files");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let name = unique("files");
    let volume = unique("files-vol");
    d.adopt(&name);
    let _volume = VolumeGuard(volume.clone());
    sh(std::process::Command::new("docker")
        .args(["run", "-d", "--network", "none", "--name", &name])
        .arg("-v")
        .arg(format!("{}:/state", state.display()))
        .arg("-v")
        .arg(format!("{volume}:/data"))
        .arg(&d.image)
        .args(["/bin/busybox", "sh", "-c", files::SCRIPT]));
    let before = files::counter_above(&state, 5);
    let expected = files::check(&[], &name);
    assert!(
        expected.contains("deleted file stays deleted"),
        "{expected}"
    );
    let a = dir.path().join("c.ferry");
    let dumped = ferry([
        "dump",
        "--json",
        "--leave-running",
        "--docker",
        &name,
        "--archive",
    ])
    .arg(&a)
    .json();
    let carried = &dumped["container_files"];
    assert_eq!(carried["roots"].as_array().unwrap().len(), 2, "{carried}");
    assert_eq!(Docker::status(&name), "running");
    // Nothing of the source is left on this host: container and volume.
    sh(std::process::Command::new("docker").args(["rm", "-f", &name]));
    sh(std::process::Command::new("docker").args(["volume", "rm", &volume]));
    let at_removal = files::counter(&state);
    std::fs::remove_file(state.join("counter")).unwrap();
    let copy = unique("files-copy");
    d.adopt(&copy);
    ferry(["restore", "--docker", &copy, "--archive"])
        .arg(&a)
        .ok();
    assert_eq!(Docker::status(&copy), "running");
    let first = files::counter(&state);
    assert!(
        first >= before && first <= at_removal + 1,
        "the copy counts from {first}: dumped after {before}, removed at {at_removal}"
    );
    files::counter_above(&state, first + 5);
    files::same(&expected, &files::check(&[], &copy));
}

/// Removes a Docker volume when dropped.
struct VolumeGuard(String);

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["volume", "rm", "-f", &self.0])
            .output();
    }
}
