//! `ferry inspect` on real CRIU dumps of the workload, whose memory is known.

mod common;

use std::time::Duration;

use common::*;
use ferry_lab::workload::{Launch, Mix};

/// Pages a process holds besides the workload's buffer (stack, heap, libc,
/// the report record...). Generous: the test checks the buffer is counted,
/// not the size of the runtime.
const OTHER_PAGES_SLACK: u64 = 1024;

#[test]
fn inspect_counts_the_workloads_pages() {
    require_criu();
    let dir = scratch("inspect");
    let mut launch = Launch::new(WORKLOAD, 48, dir.path().join("report"));
    launch.mix = Mix {
        zero_pct: 30,
        repeat_pct: 20,
        text_pct: 20,
        ..Mix::default()
    };
    let mut w = start_with(launch);
    let known = w.report().unwrap();
    let imgs = images(dir.path());
    ferry(["dump", "-t", &w.pid().to_string(), "-D"])
        .arg(&imgs)
        .ok();
    assert!(w.reap(Duration::from_secs(10)).unwrap());

    let r = ferry(["inspect", "--json"]).arg(&imgs).json();
    assert_eq!(r["format_version"], 1);
    let p = &r["processes"][0];
    assert_eq!(p["pid"], w.pid());
    assert_eq!(p["comm"], "ferry-workload");
    let pages = &p["pages"];
    let dumped = pages["dumped"].as_u64().unwrap();
    let zero = pages["zero"].as_u64().unwrap();
    let dup = pages["duplicate"].as_u64().unwrap();
    let k = known.pages;
    assert!(
        dumped >= k.total && dumped <= k.total + OTHER_PAGES_SLACK,
        "dumped {dumped}, workload {k:?}"
    );
    assert!(
        zero >= k.zero && zero <= k.zero + OTHER_PAGES_SLACK,
        "zero {zero}, workload {k:?}"
    );
    // Repeat pages are copies of 16 templates: all but the first of each repeat.
    let expected_dup = k.repeat - known.repeat_distinct;
    assert!(
        dup >= expected_dup && dup <= expected_dup + OTHER_PAGES_SLACK,
        "dup {dup}, expected {expected_dup}"
    );
    assert_eq!(pages["bytes"].as_u64().unwrap(), dumped * 4096);
    assert!(pages["pagemap_entries"].as_u64().unwrap() > 0);

    let t = &r["totals"];
    assert_eq!(t["pages"].as_u64().unwrap(), dumped);
    assert_eq!(t["pages_bytes"].as_u64().unwrap(), dumped * 4096);
    assert!(t["metadata_bytes"].as_u64().unwrap() > 0);
    let all: u64 = r["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(t["bytes"].as_u64().unwrap(), all);
    assert_eq!(
        t["unique_pages"].as_u64().unwrap()
            + t["zero_pages"].as_u64().unwrap()
            + t["duplicate_pages"].as_u64().unwrap(),
        dumped
    );
    let s = &r["criu_dump_stats"];
    assert!(s["frozen"].as_u64().unwrap() > 0, "{s}");
    assert!(s["pages_written"].as_u64().unwrap() >= k.total, "{s}");
    assert_eq!(s["pages_written"].as_u64().unwrap(), dumped);

    let human = ferry(["inspect"]).arg(&imgs).ok();
    for word in [
        "Process tree",
        "ferry-workload",
        "zero pages",
        "frozen",
        "memwrite",
        "pages-",
    ] {
        assert!(human.contains(word), "'{word}' missing:\n{human}");
    }
}
