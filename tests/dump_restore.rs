//! Dump and restore of the bundled workload with the real CRIU.

mod common;

use std::time::Duration;

use common::*;
use ferry_lab::workload::{Launch, Workload};

#[test]
fn stop_mode_dump_then_restore_continues_the_counter() {
    require_criu();
    let dir = scratch("stop");
    let mut w = start_workload(dir.path(), 32);
    let pid = w.pid();
    let before = w.wait_counter_above(100, CONTINUE).unwrap().counter;
    let dumped = ferry(["dump", "--json", "-t", &pid.to_string(), "-D"])
        .arg(images(dir.path()))
        .json();
    assert_eq!(dumped["pid"], pid);
    assert!(
        dumped["criu_stats"]["frozen"].as_u64().unwrap() > 0,
        "{dumped}"
    );
    assert!(
        w.reap(Duration::from_secs(10)).unwrap(),
        "stop-mode dump left pid {pid} running"
    );
    let at_dump = w.report().unwrap().counter;
    assert!(at_dump >= before);

    let restored = ferry(["restore", "--json", "-D"])
        .arg(images(dir.path()))
        .json();
    let new_pid = restored["pid"].as_i64().unwrap() as i32;
    assert_eq!(new_pid, pid, "CRIU restores the tree with its pid");
    let w = Workload::adopt(new_pid, w.report_path());
    let after = w.wait_counter_above(at_dump + 100, CONTINUE).unwrap();
    assert!(
        after.counter > at_dump,
        "counter went from {at_dump} to {}",
        after.counter
    );
    let verified = w.verify_memory(CONTINUE).unwrap();
    assert!(verified.mem_ok, "restored memory differs from the original");
    assert!(verified.counter >= at_dump, "counter restarted");
    assert_counting(&w);
}

#[test]
fn leave_running_keeps_the_original_and_restores_after_it_stops() {
    require_criu();
    let dir = scratch("leave-running");
    let mut w = start_workload(dir.path(), 16);
    let pid = w.pid();
    let before = w.report().unwrap().counter;
    let out = ferry(["dump", "--leave-running", "-t", &pid.to_string(), "-D"])
        .arg(images(dir.path()))
        .ok();
    assert!(out.contains("left running"), "{out}");
    assert_counting(&w);
    // Let the original run well past the dump, then stop it.
    let ran_on = w
        .wait_counter_above(before + 1000, CONTINUE)
        .unwrap()
        .counter;
    w.stop(Duration::from_secs(5));
    assert!(!w.is_alive());
    let last = w.report().unwrap().counter;
    assert!(last >= ran_on);

    let restored = ferry(["restore", "--json", "-D"])
        .arg(images(dir.path()))
        .json();
    let w = Workload::adopt(restored["pid"].as_i64().unwrap() as i32, w.report_path());
    // The restored copy resumes from the dump's state: below the original's
    // last value, at or above the value read before the dump.
    let first =
        ferry_lab::workload::Report::wait_for(w.report_path(), CONTINUE, |r| r.counter < last)
            .unwrap()
            .counter;
    assert!(
        first >= before,
        "restored counter {first} is older than the dump ({before})"
    );
    let verified = w.verify_memory(CONTINUE).unwrap();
    assert!(verified.mem_ok);
    assert_counting(&w);
}

#[test]
fn a_tree_with_children_comes_back_whole() {
    require_criu();
    let dir = scratch("tree");
    let mut launch = Launch::new(WORKLOAD, 8, dir.path().join("report"));
    launch.children = 2;
    let mut w = start_with(launch);
    let kids = w.report().unwrap().children;
    assert_eq!(kids.len(), 2);
    ferry(["dump", "-t", &w.pid().to_string(), "-D"])
        .arg(images(dir.path()))
        .ok();
    assert!(w.reap(Duration::from_secs(10)).unwrap());
    for k in &kids {
        assert!(
            ferry_image::process::wait_pid_free(*k as i32, Duration::from_secs(10)),
            "child {k} left behind"
        );
    }
    let report = ferry(["inspect", "--json"]).arg(images(dir.path())).json();
    let procs = report["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 3, "{report}");
    assert!(
        procs.iter().all(|p| p["comm"] == "ferry-workload"),
        "{report}"
    );

    let restored = ferry(["restore", "--json", "-D"])
        .arg(images(dir.path()))
        .json();
    let w = Workload::adopt(restored["pid"].as_i64().unwrap() as i32, w.report_path());
    assert_counting(&w);
    for k in &kids {
        assert!(
            ferry_image::process::is_alive(*k as i32),
            "child {k} not restored"
        );
    }
    let tree = ferry_image::process::tree(w.pid()).unwrap();
    assert_eq!(tree.len(), 3, "{tree:?}");
}

/// A zombie in the tree (a child killed and not yet reaped): CRIU dumps
/// it with its leader's core image alone, and lists thread ids for it that
/// mean nothing; ferry restores it all the same (it once refused, naming a
/// core image of such an id).
#[test]
fn a_tree_holding_a_zombie_restores() {
    require_criu();
    let dir = scratch("zombie");
    let mut launch = Launch::new(WORKLOAD, 8, dir.path().join("report"));
    // The twin is a forked child its parent reaps only when it ends.
    launch.twin = true;
    let mut w = start_with(launch);
    let zombie = w.report().unwrap().children[0] as i32;
    ferry_image::process::signal(zombie, nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ferry_image::process::is_alive(zombie) {
        assert!(
            std::time::Instant::now() < deadline,
            "{zombie} not a zombie"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    ferry(["dump", "-t", &w.pid().to_string(), "-D"])
        .arg(images(dir.path()))
        .ok();
    assert!(w.reap(Duration::from_secs(10)).unwrap());
    assert!(ferry_image::process::wait_pid_free(
        zombie,
        Duration::from_secs(10)
    ));
    let at_dump = w.report().unwrap().counter;
    let restored = ferry(["restore", "--json", "-D"])
        .arg(images(dir.path()))
        .json();
    let w = Workload::adopt(restored["pid"].as_i64().unwrap() as i32, w.report_path());
    w.wait_counter_above(at_dump + 50, CONTINUE).unwrap();
    assert!(w.verify_memory(CONTINUE).unwrap().mem_ok);
    assert_counting(&w);
}

#[test]
fn restore_prints_the_pid_and_writes_a_pidfile() {
    require_criu();
    let dir = scratch("pidfile");
    let mut w = start_workload(dir.path(), 4);
    ferry(["dump", "-t", &w.pid().to_string(), "-D"])
        .arg(images(dir.path()))
        .ok();
    assert!(w.reap(Duration::from_secs(10)).unwrap());
    let pidfile = dir.path().join("pid");
    let out = ferry(["restore", "--pidfile"])
        .arg(&pidfile)
        .arg("-D")
        .arg(images(dir.path()))
        .ok();
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(out.contains(&format!("Restored pid {pid}")), "{out}");
    let w = Workload::adopt(pid, w.report_path());
    assert_counting(&w);
}

/// A stop-mode dump kills the program only once its images are on stable
/// storage: every fsync of the dump comes before the SIGKILL (traced with
/// strace), and the program restores and counts on.
#[test]
fn a_stop_mode_dump_syncs_the_images_before_it_kills_the_program() {
    require_criu();
    let dir = scratch("durable-dump");
    let mut p = common::program::FileCounter::start(dir.path(), 4);
    let images = dir.path().join("images");
    let trace = dir.path().join("trace");
    let out = std::process::Command::new("strace")
        // ferry's own thread only: CRIU refuses to run under a tracer.
        .args(["-qq", "-e", "trace=fsync,fdatasync,kill", "-o"])
        .arg(&trace)
        .arg(common::FERRY)
        .args(["dump", "--shell-job", "-t", &p.pid.to_string(), "-D"])
        .arg(&images)
        .output()
        .expect("strace (apt-get install strace)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.reap_shell();
    assert_eq!(p.state(), None, "the dumped program still runs");
    let trace = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = trace.lines().collect();
    let killed = lines
        .iter()
        .position(|l| l.contains(&format!("kill({}, SIGKILL)", p.pid)))
        .unwrap_or_else(|| panic!("no SIGKILL of {} in:\n{trace}", p.pid));
    let last_sync = lines
        .iter()
        .rposition(|l| l.contains("fsync(") || l.contains("fdatasync("))
        .unwrap_or_else(|| panic!("no fsync in:\n{trace}"));
    assert!(last_sync < killed, "an fsync after the kill:\n{trace}");
    let syncs = lines[..killed]
        .iter()
        .filter(|l| l.contains("fsync("))
        .count();
    let files = std::fs::read_dir(&images).unwrap().count();
    assert!(
        syncs > files,
        "{syncs} fsyncs for {files} files and their directory"
    );
    ferry(["restore", "--shell-job", "-D"]).arg(&images).ok();
    assert!(p.counts_on(), "the restored program does not count on");
}

/// When the images cannot be put on stable storage, or the archive cannot
/// be written, the dump fails and the program runs on where it was.
#[test]
fn a_dump_that_cannot_be_kept_leaves_the_program_running() {
    require_criu();
    let dir = scratch("undurable-dump");
    let p = common::program::FileCounter::start(dir.path(), 4);
    let err = ferry(["dump", "--shell-job", "-t", &p.pid.to_string(), "-D"])
        .arg(dir.path().join("images"))
        .env(ferry_core::fault::ENV, "dump-sync-fails")
        .fails_with(5);
    assert!(err.contains("stable storage"), "{err}");
    assert!(err.contains("resumed"), "{err}");
    assert!(p.counts_on(), "the program stopped: {:?}\n{err}", p.state());
    // An archive where none can be created (/proc takes no files).
    let err = ferry(["dump", "--shell-job", "-t", &p.pid.to_string(), "--archive"])
        .arg(format!("/proc/{}/a.ferry", p.pid))
        .fails_with(5);
    assert!(err.contains("cannot pack"), "{err}");
    assert!(p.counts_on(), "the program stopped: {:?}\n{err}", p.state());
}
