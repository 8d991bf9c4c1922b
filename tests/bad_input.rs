//! Bad input and failures: each gets a clear error naming what was wrong,
//! and the workload is never left frozen or killed by a failed dump.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use ferry_core::checkpoint::{self, CheckpointError, TargetAfterFailure};
use ferry_criu::{Criu, DumpRequest, HookError, Notification, Script};
use nix::sys::signal::Signal;

/// Files left in a directory after a failed dump.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn assert_only_log(dir: &Path) {
    let left = leftovers(dir);
    assert!(
        left.iter().all(|n| n.ends_with(".log")),
        "a failed dump left images behind: {left:?}"
    );
}

fn free_pid() -> i32 {
    let max: i32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (2..max)
        .rev()
        .find(|p| !ferry_image::process::pid_in_use(*p))
        .unwrap()
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, opts: &str) -> Mount {
        fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mount tmpfs -o {opts} on {} failed",
            at.display()
        );
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn dump_of_a_missing_pid_is_refused() {
    require_criu();
    let dir = scratch("nopid");
    let pid = free_pid();
    let err = ferry(["dump", "-t", &pid.to_string(), "-D"])
        .arg(images(dir.path()))
        .fails_with(4);
    assert!(err.contains(&format!("no process with pid {pid}")), "{err}");
}

/// A program whose session leader ferry cannot see (ferry and it in a pid
/// namespace the session began outside of, as under some CI runners):
/// ferry names the cause and the way out before CRIU fails on it.
#[test]
fn dump_of_a_program_whose_session_is_outside_the_namespace_is_explained() {
    require_criu();
    let dir = scratch("outside-session");
    let imgs = images(dir.path());
    // unshare without setsid: the namespace's processes keep this test's
    // session, whose leader is outside it.
    let script = format!(
        "sleep 60 & pid=$!; \"$0\" dump --shell-job -t $pid -D '{}'; rc=$?; kill $pid; exit $rc",
        imgs.display()
    );
    let out = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            "sh",
            "-c",
            &script,
            FERRY,
        ])
        .output()
        .expect("run unshare");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("session whose leader is outside this pid namespace"),
        "{err}"
    );
    assert!(err.contains("setsid"), "{err}");
}

/// A directory holding another dump's images is refused (the two would
/// mix); one holding other files takes the dump and keeps them, as CRIU
/// does (zdtm writes its `dump.cropt` there first).
#[test]
fn dump_into_a_directory_of_another_dump_is_refused_and_other_files_are_kept() {
    require_criu();
    let dir = scratch("nonempty");
    let w = start_workload(dir.path(), 4);
    let imgs = images(dir.path());
    fs::create_dir_all(&imgs).unwrap();
    fs::write(imgs.join("precious.txt"), b"keep me").unwrap();
    fs::write(imgs.join("pstree.img"), b"an older dump").unwrap();
    let err = ferry(["dump", "-R", "-t", &w.pid().to_string(), "-D"])
        .arg(&imgs)
        .fails_with(4);
    assert!(err.contains("holds another dump's images"), "{err}");
    assert_eq!(fs::read(imgs.join("pstree.img")).unwrap(), b"an older dump");
    assert_counting(&w);
    fs::remove_file(imgs.join("pstree.img")).unwrap();
    ferry(["dump", "-R", "-t", &w.pid().to_string(), "-D"])
        .arg(&imgs)
        .ok();
    assert_eq!(fs::read(imgs.join("precious.txt")).unwrap(), b"keep me");
    assert!(imgs.join("pstree.img").exists());
    assert_counting(&w);
}

#[test]
fn dump_into_a_file_or_a_read_only_directory_is_refused() {
    require_criu();
    let dir = scratch("unwritable");
    let w = start_workload(dir.path(), 4);
    let file = dir.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    let err = ferry(["dump", "-t", &w.pid().to_string(), "-D"])
        .arg(&file)
        .fails_with(4);
    assert!(err.contains("not a directory"), "{err}");

    let ro = dir.path().join("ro");
    let _mount = Mount::tmpfs(&ro, "ro,size=1m");
    let err = ferry(["dump", "-t", &w.pid().to_string(), "-D"])
        .arg(&ro)
        .fails_with(4);
    assert!(err.contains("is not writable"), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert_counting(&w);
}

#[test]
fn dump_failing_on_a_full_disk_while_frozen_resumes_the_workload() {
    require_criu();
    let dir = scratch("enospc");
    let w = start_workload(dir.path(), 32);
    let small = dir.path().join("small");
    let _mount = Mount::tmpfs(&small, "size=4m");
    let imgs = small.join("images");
    let err = ferry(["dump", "-t", &w.pid().to_string(), "-D"])
        .arg(&imgs)
        .fails_with(5);
    assert!(
        err.contains(&format!("dump of pid {} failed", w.pid())),
        "{err}"
    );
    assert!(
        err.contains("still running") || err.contains("resumed"),
        "{err}"
    );
    assert!(err.contains("No space left on device"), "{err}");
    assert_only_log(&imgs);
    assert_counting(&w);
    assert!(w.verify_memory(CONTINUE).unwrap().mem_ok);
}

fn criu() -> Criu {
    Criu::locate(None, None).expect("locate CRIU")
}

#[test]
fn a_pid_that_exits_during_the_dump_gives_a_clear_error() {
    require_criu();
    let dir = scratch("exits");
    let w = start_workload(dir.path(), 4);
    let pid = w.pid();
    let imgs = images(dir.path());
    // CRIU notifies pre-dump after it accepted the request and before it
    // seizes the tree: the workload dies right there.
    let mut kill_it = |n: &mut Notification| -> Result<(), HookError> {
        if n.script == Script::PreDump {
            ferry_image::process::signal(pid, Signal::SIGKILL)?;
            while ferry_image::process::is_alive(pid) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    };
    let err = checkpoint::dump(&criu(), &DumpRequest::new(pid, &imgs), &mut kill_it).unwrap_err();
    let CheckpointError::DumpFailed { after, source, .. } = &err else {
        panic!("unexpected error: {err}")
    };
    assert_eq!(*after, TargetAfterFailure::Gone, "{err}");
    assert!(source.log_path().is_some(), "the error names CRIU's log");
    assert!(err.to_string().contains("no longer exists"), "{err}");
    assert_only_log(&imgs);
}

#[test]
fn a_dump_aborted_while_frozen_leaves_the_workload_running() {
    require_criu();
    let dir = scratch("abort");
    let w = start_workload(dir.path(), 16);
    let imgs = images(dir.path());
    let mut saw_frozen = false;
    let mut abort = |n: &mut Notification| -> Result<(), HookError> {
        if n.script == Script::PostDump {
            // Memory is written and the tree is still frozen here.
            let st = ferry_image::process::ProcessInfo::read(w.pid())?;
            saw_frozen = st.is_stopped();
            return Err("test aborts the dump at post-dump".into());
        }
        Ok(())
    };
    let err = checkpoint::dump(&criu(), &DumpRequest::new(w.pid(), &imgs), &mut abort).unwrap_err();
    assert!(saw_frozen, "the tree was not frozen at post-dump");
    assert!(
        err.to_string()
            .contains(&format!("dump of pid {} failed", w.pid())),
        "{err}"
    );
    let chain = format!("{:?}", err);
    assert!(chain.contains("post-dump"), "{chain}");
    assert_only_log(&imgs);
    assert_counting(&w);
    assert!(w.verify_memory(CONTINUE).unwrap().mem_ok);
}

/// Dumps a small workload and returns (scratch dir, images dir, dumped pid).
fn dumped(name: &str) -> (tempfile::TempDir, PathBuf, i32) {
    let dir = scratch(name);
    let mut w = start_workload(dir.path(), 4);
    let imgs = images(dir.path());
    ferry(["dump", "-t", &w.pid().to_string(), "-D"])
        .arg(&imgs)
        .ok();
    assert!(w.reap(Duration::from_secs(10)).unwrap());
    let pid = w.pid();
    (dir, imgs, pid)
}

fn restore_fails(imgs: &Path, pid: i32, expect: &str) {
    let err = ferry(["restore", "-D"]).arg(imgs).fails_with(1);
    assert!(err.contains(expect), "expected '{expect}' in:\n{err}");
    assert!(
        !ferry_image::process::pid_in_use(pid),
        "a refused restore started pid {pid}"
    );
}

#[test]
fn restore_from_empty_missing_or_foreign_directories_is_refused() {
    require_criu();
    let dir = scratch("foreign");
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err = ferry(["restore", "-D"]).arg(&empty).fails_with(1);
    assert!(err.contains("is empty"), "{err}");
    let err = ferry(["restore", "-D"])
        .arg(dir.path().join("nope"))
        .fails_with(1);
    assert!(err.contains("No such file or directory"), "{err}");
    let foreign = dir.path().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("notes.txt"), b"not a checkpoint").unwrap();
    let err = ferry(["restore", "-D"]).arg(&foreign).fails_with(1);
    assert!(
        err.contains("not a CRIU images directory: inventory.img is missing"),
        "{err}"
    );
    fs::write(foreign.join("inventory.img"), b"\x00\x01\x02\x03junk").unwrap();
    let err = ferry(["restore", "-D"]).arg(&foreign).fails_with(1);
    assert!(err.contains("inventory.img: bad magic"), "{err}");
}

#[test]
fn restore_from_truncated_images_is_refused_before_criu_runs() {
    require_criu();
    let (_dir, imgs, pid) = dumped("truncated");
    let pages = imgs.join("pages-1.img");
    let len = fs::metadata(&pages).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    restore_fails(&imgs, pid, "pages file holds");
    fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .unwrap()
        .set_len(len)
        .unwrap();

    let pagemap = imgs.join(format!("pagemap-{pid}.img"));
    let bytes = fs::read(&pagemap).unwrap();
    fs::write(&pagemap, &bytes[..bytes.len() - 3]).unwrap();
    restore_fails(&imgs, pid, "truncated at byte");
    fs::write(&pagemap, &bytes).unwrap();

    let core = imgs.join(format!("core-{pid}.img"));
    let core_bytes = fs::read(&core).unwrap();
    fs::remove_file(&core).unwrap();
    restore_fails(&imgs, pid, &format!("process {pid} has no core-{pid}.img"));
    fs::write(&core, &core_bytes).unwrap();

    // Intact again: it restores.
    let restored = ferry(["restore", "--json", "-D"]).arg(&imgs).json();
    let w = ferry_lab::workload::Workload::adopt(
        restored["pid"].as_i64().unwrap() as i32,
        imgs.parent().unwrap().join("report"),
    );
    assert_counting(&w);
}

#[test]
fn inspect_names_the_corrupted_image() {
    require_criu();
    let (_dir, imgs, pid) = dumped("corrupt");
    let pagemap = imgs.join(format!("pagemap-{pid}.img"));
    let good = fs::read(&pagemap).unwrap();
    let mut bad = good.clone();
    bad[5] ^= 0xff; // inside PAGEMAP_MAGIC
    fs::write(&pagemap, &bad).unwrap();
    let err = ferry(["inspect"]).arg(&imgs).fails_with(1);
    assert!(
        err.contains(&format!("pagemap-{pid}.img: bad magic")),
        "{err}"
    );
    assert!(err.contains("PAGEMAP_MAGIC"), "{err}");
    fs::write(&pagemap, &good).unwrap();

    let pstree = imgs.join("pstree.img");
    let good = fs::read(&pstree).unwrap();
    let mut bad = good.clone();
    for b in &mut bad[12..] {
        *b = 0xff;
    }
    fs::write(&pstree, &bad).unwrap();
    let err = ferry(["inspect"]).arg(&imgs).fails_with(1);
    assert!(
        err.contains("pstree.img: entry at byte 12 is not a valid pstree_entry"),
        "{err}"
    );
    fs::write(&pstree, &good).unwrap();

    let core = imgs.join(format!("core-{pid}.img"));
    let good = fs::read(&core).unwrap();
    fs::write(&core, &good[..good.len() / 2]).unwrap();
    let err = ferry(["inspect"]).arg(&imgs).fails_with(1);
    assert!(
        err.contains(&format!("core-{pid}.img: truncated at byte 8")),
        "{err}"
    );
    fs::write(&core, &good).unwrap();

    ferry(["inspect"]).arg(&imgs).ok();
}
