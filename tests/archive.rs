//! Archives of real CRIU dumps: byte-identical round trips, restores that
//! continue the counter, incremental chains, and damaged archives refused
//! with nothing restored and no staging left behind.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ferry_lab::workload::{Launch, Report, Workload};

/// xxh3-128 of every file of a directory (independent of the archive's own
/// checksums, which hash 4 KiB blocks).
fn checksums(dir: &Path) -> BTreeMap<String, u128> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            let bytes = fs::read(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                xxhash_rust::xxh3::xxh3_128(&bytes),
            )
        })
        .collect()
}

/// Directories under `dir` (a staging base given to ferry).
fn debris(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn restored(run: serde_json::Value, report: &Path) -> Workload {
    Workload::adopt(run["pid"].as_i64().unwrap() as i32, report)
}

#[test]
fn pack_unpack_is_byte_identical_and_the_archive_restores() {
    require_criu();
    let dir = scratch("arch-roundtrip");
    let mut w = start_workload(dir.path(), 24);
    let imgs = images(dir.path());
    ferry(["dump", "-t", &w.pid().to_string(), "-D"])
        .arg(&imgs)
        .ok();
    assert!(w.reap(Duration::from_secs(10)).unwrap());
    let at_dump = w.report().unwrap().counter;

    let a = dir.path().join("a.ferry");
    let packed = ferry(["pack", "--json"]).arg(&imgs).arg(&a).json();
    assert!(packed["zero_pages"].as_u64().unwrap() > 0, "{packed}");
    assert!(packed["duplicate_pages"].as_u64().unwrap() > 0, "{packed}");
    assert!(
        packed["archive_bytes"].as_u64().unwrap() < packed["raw_bytes"].as_u64().unwrap() * 3 / 4
    );

    let out = dir.path().join("unpacked");
    ferry(["unpack"]).arg(&a).arg(&out).ok();
    let (orig, back) = (checksums(&imgs), checksums(&out));
    assert_eq!(orig.len(), back.len());
    assert_eq!(orig, back, "unpacked files differ from what CRIU wrote");

    let r = ferry(["inspect", "--json"]).arg(&a).json();
    let d = ferry(["inspect", "--json"]).arg(&imgs).json();
    assert_eq!(r["totals"]["zero_pages"], d["totals"]["zero_pages"]);
    assert_eq!(
        r["totals"]["duplicate_pages"],
        d["totals"]["duplicate_pages"]
    );
    assert_eq!(r["processes"][0]["pages"], d["processes"][0]["pages"]);
    assert!(
        r["archive"]["totals"]["ratio"].as_f64().unwrap() > 1.3,
        "{}",
        r["archive"]
    );

    let staging = dir.path().join("staging");
    fs::create_dir(&staging).unwrap();
    let run = ferry(["restore", "--json", "--archive"])
        .arg(&a)
        .arg("--staging")
        .arg(&staging)
        .json();
    assert!(
        debris(&staging).is_empty(),
        "staging left: {:?}",
        debris(&staging)
    );
    let w = restored(run, w.report_path());
    let after = w.wait_counter_above(at_dump + 50, CONTINUE).unwrap();
    assert!(after.counter > at_dump);
    assert!(w.verify_memory(CONTINUE).unwrap().mem_ok);
    assert_counting(&w);
}

#[test]
fn dump_straight_to_an_archive_and_restore_it() {
    require_criu();
    let dir = scratch("arch-direct");
    let mut w = start_workload(dir.path(), 16);
    let a = dir.path().join("direct.ferry");
    let out = ferry(["dump", "--json", "-t", &w.pid().to_string(), "--archive"])
        .arg(&a)
        .json();
    assert!(out["pack"]["archive_bytes"].as_u64().unwrap() > 0, "{out}");
    assert!(out["criu_stats"]["frozen"].as_u64().unwrap() > 0, "{out}");
    assert!(w.reap(Duration::from_secs(10)).unwrap());
    let at_dump = w.report().unwrap().counter;
    let run = ferry(["restore", "--json", "--archive"]).arg(&a).json();
    let w = restored(run, w.report_path());
    w.wait_counter_above(at_dump + 50, CONTINUE).unwrap();
    assert!(w.verify_memory(CONTINUE).unwrap().mem_ok);
}

/// A tree whose child inherited its memory copy-on-write, each holding
/// runs of zero pages where the other holds data. A restore from the archive
/// leaves those zero pages out of both pagemaps: the child's must read as
/// zero, not as its parent's data beneath (CRIU drops them from the
/// child's inherited copy). With --write-zero-pages every page is written.
/// Either way every page of both processes verifies.
#[test]
fn inherited_memory_with_zero_pages_restores_from_an_archive() {
    require_criu();
    let dir = scratch("arch-twin");
    let mut launch = Launch::new(WORKLOAD, 16, dir.path().join("report"));
    launch.twin = true;
    let twin_report = launch.twin_report();
    let mut w = start_with(launch);
    let twin_pid = w.report().unwrap().children[0] as i32;
    // (Read, not adopted: dropping an adopted workload kills it.)
    let twin_at_start = Report::wait_for(&twin_report, CONTINUE, |r| r.counter > 10).unwrap();
    let (parent_zero, twin_zero) = (w.report().unwrap().pages.zero, twin_at_start.pages.zero);
    // Runs of 8 pages, one in 7 runs each (ferry-workload --twin).
    let runs = w.report().unwrap().pages.total / 8;
    let zeroed_runs = ((1..runs).step_by(7).count() + (2..runs).step_by(7).count()) as u64 * 8;
    let a = dir.path().join("twin.ferry");
    ferry(["dump", "-t", &w.pid().to_string(), "--archive"])
        .arg(&a)
        .ok();
    assert!(w.reap(Duration::from_secs(10)).unwrap());
    for write_zero in [false, true] {
        let read = |r: &Path| Report::read_within(r, Duration::from_secs(2)).unwrap();
        let at = (read(w.report_path()).counter, read(&twin_report).counter);
        let mut cmd = ferry(["restore", "--json", "--archive"]).arg(&a);
        if write_zero {
            cmd = cmd.arg("--write-zero-pages");
        }
        let run = cmd.json();
        let left_out = run["unpack"]["zero_pages_left_out"].as_u64().unwrap();
        if write_zero {
            assert_eq!(left_out, 0, "{run}");
        } else {
            // At least the runs of 8 pages each process zeroed after the
            // fork (single zero pages inside ranges are written).
            assert!(
                left_out >= zeroed_runs,
                "{left_out} zero pages left out; the parent and the twin zeroed {zeroed_runs} in runs (they hold {parent_zero} and {twin_zero} zero pages)"
            );
        }
        let mut parent = restored(run, w.report_path());
        let mut twin = Workload::adopt(twin_pid, &twin_report);
        parent.wait_counter_above(at.0 + 50, CONTINUE).unwrap();
        twin.wait_counter_above(at.1 + 50, CONTINUE).unwrap();
        assert!(
            parent.verify_memory(CONTINUE).unwrap().mem_ok,
            "the parent's memory differs after a restore (write zero pages: {write_zero})"
        );
        assert!(
            twin.verify_memory(CONTINUE).unwrap().mem_ok,
            "the twin's memory differs after a restore (write zero pages: {write_zero})"
        );
        assert_counting(&parent);
        assert_counting(&twin);
        parent.stop(Duration::from_secs(5));
        twin.stop(Duration::from_secs(5));
        assert!(twin.reap(Duration::from_secs(10)).unwrap());
        assert!(parent.reap(Duration::from_secs(10)).unwrap());
    }
}

#[test]
fn incremental_archives_chain_of_three() {
    require_criu();
    let dir = scratch("arch-chain");
    let mut launch = Launch::new(WORKLOAD, 32, dir.path().join("report"));
    launch.dirty_mib_s = 1.0;
    let mut w = start_with(launch);
    let pid = w.pid().to_string();
    let mut archives = Vec::new();
    let mut sizes = Vec::new();
    let mut counters = Vec::new();
    for g in 0..3 {
        let a = dir.path().join(format!("gen{g}.ferry"));
        let imgs = dir.path().join(format!("images{g}"));
        let mut cmd = ferry(["dump", "--json", "--leave-running", "-t", &pid, "-D"])
            .arg(&imgs)
            .arg("--archive")
            .arg(&a);
        if let Some(parent) = archives.last() {
            cmd = cmd.arg("--parent").arg(parent);
        }
        counters.push(w.report().unwrap().counter);
        let out = cmd.json();
        sizes.push(out["pack"]["archive_bytes"].as_u64().unwrap());
        archives.push(a);
        w.wait_counter_above(counters[g] + 200, CONTINUE).unwrap();
    }
    eprintln!(
        "archive sizes: full {} B, then {} B and {} B",
        sizes[0], sizes[1], sizes[2]
    );
    assert!(
        sizes[1] * 5 < sizes[0],
        "incremental archive not much smaller: {sizes:?}"
    );
    assert!(
        sizes[2] * 5 < sizes[0],
        "incremental archive not much smaller: {sizes:?}"
    );
    let r = ferry(["inspect", "--json"]).arg(&archives[2]).json();
    assert_eq!(r["archive"]["ancestors"], 2, "{}", r["archive"]);
    assert!(
        r["archive"]["totals"]["bytes_saved_by_parent"]
            .as_u64()
            .unwrap()
            > 0
    );

    // Unpacking the third resolves the whole chain, byte for byte.
    let out = dir.path().join("unpacked2");
    ferry(["unpack"]).arg(&archives[2]).arg(&out).ok();
    let mut orig = checksums(&dir.path().join("images2"));
    let back = checksums(&out);
    orig.retain(|k, _| back.contains_key(k));
    assert_eq!(orig, back);

    w.stop(Duration::from_secs(5));
    let last = w.report().unwrap().counter;
    let run = ferry(["restore", "--json", "--archive"])
        .arg(&archives[2])
        .json();
    let w = restored(run, w.report_path());
    let first = Report::wait_for(w.report_path(), CONTINUE, |r| r.counter < last)
        .unwrap()
        .counter;
    assert!(
        first >= counters[2],
        "restored {first}, dumped at {}",
        counters[2]
    );
    assert!(w.verify_memory(CONTINUE).unwrap().mem_ok);
    assert_counting(&w);
}

#[test]
fn damaged_archives_are_refused_before_anything_is_restored() {
    require_criu();
    let dir = scratch("arch-damage");
    let mut w = start_workload(dir.path(), 8);
    let pid = w.pid();
    let imgs = images(dir.path());
    let a = dir.path().join("a.ferry");
    ferry(["dump", "-t", &pid.to_string(), "-D"])
        .arg(&imgs)
        .arg("--archive")
        .arg(&a)
        .ok();
    assert!(w.reap(Duration::from_secs(10)).unwrap());
    let good = fs::read(&a).unwrap();
    let staging = dir.path().join("staging");
    fs::create_dir(&staging).unwrap();
    let bad = dir.path().join("bad.ferry");

    let refuse = |bytes: &[u8], expect: &str| {
        fs::write(&bad, bytes).unwrap();
        let err = ferry(["restore", "--archive"])
            .arg(&bad)
            .arg("--staging")
            .arg(&staging)
            .fails_with(1);
        assert!(err.contains(expect), "expected '{expect}' in:\n{err}");
        assert!(err.contains("nothing was restored"), "{err}");
        assert!(
            !ferry_image::process::pid_in_use(pid),
            "pid {pid} was restored from a damaged archive"
        );
        assert!(
            debris(&staging).is_empty(),
            "staging left: {:?}",
            debris(&staging)
        );
    };
    // A byte in the middle of the first pages chunk.
    let archive = ferry_archive::Archive::open(&a).unwrap();
    let chunk = archive
        .index()
        .chunks
        .iter()
        .position(|c| c.kind == 1)
        .unwrap();
    let off = archive.index().chunks[chunk].offset as usize + 100;
    let mut b = good.clone();
    b[off] ^= 1;
    refuse(&b, &format!("chunk {chunk} of pages-"));
    // The header, the index, the end.
    let mut b = good.clone();
    b[20] ^= 1;
    refuse(&b, "header damaged");
    let mut b = good.clone();
    let n = b.len();
    b[n - 60] ^= 1;
    refuse(&b, "index damaged");
    refuse(&good[..good.len() - 10], "truncated");
    refuse(&good[..good.len() / 2], "truncated");
    // Intact again, it restores.
    fs::write(&bad, &good).unwrap();
    let run = ferry(["restore", "--json", "--archive"])
        .arg(&bad)
        .arg("--staging")
        .arg(&staging)
        .json();
    let w = restored(run, w.report_path());
    assert_counting(&w);
}

#[test]
fn missing_or_wrong_parents_are_refused_by_restore() {
    require_criu();
    let dir = scratch("arch-parent");
    let w = start_workload(dir.path(), 8);
    let pid = w.pid().to_string();
    let (a0, a1, other) = (
        dir.path().join("a0.ferry"),
        dir.path().join("a1.ferry"),
        dir.path().join("other.ferry"),
    );
    ferry(["dump", "-R", "-t", &pid, "--archive"]).arg(&a0).ok();
    ferry(["dump", "-R", "-t", &pid, "--archive"])
        .arg(&other)
        .ok();
    ferry(["dump", "-R", "-t", &pid, "--archive"])
        .arg(&a1)
        .arg("--parent")
        .arg(&a0)
        .ok();
    let staging = dir.path().join("staging");
    fs::create_dir(&staging).unwrap();
    let err = ferry(["restore", "--archive"])
        .arg(&a1)
        .arg("--parent")
        .arg(&other)
        .arg("--staging")
        .arg(&staging)
        .fails_with(1);
    assert!(
        err.contains("is not the archive this one was made from"),
        "{err}"
    );
    fs::remove_file(&a0).unwrap();
    let err = ferry(["restore", "--archive"])
        .arg(&a1)
        .arg("--staging")
        .arg(&staging)
        .fails_with(1);
    assert!(
        err.contains("parent archive") && err.contains("not found"),
        "{err}"
    );
    assert!(debris(&staging).is_empty());
    assert_counting(&w);
}
