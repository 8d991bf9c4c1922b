//! `ferry check` against this host's real CRIU and kernel.

mod common;

use std::fs;

use common::*;

/// Independent evidence of soft-dirty support: kernels built with
/// CONFIG_MEM_SOFT_DIRTY flag writable VMAs "sd" in smaps.
fn smaps_has_soft_dirty_flag() -> bool {
    fs::read_to_string("/proc/self/smaps")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("VmFlags:"))
        .any(|l| l.split_whitespace().any(|f| f == "sd"))
}

/// Independent evidence of userfaultfd: the sysctl exists iff CONFIG_USERFAULTFD.
fn userfaultfd_sysctl_exists() -> bool {
    fs::metadata("/proc/sys/vm/unprivileged_userfaultfd").is_ok()
}

#[test]
fn check_reports_criu_and_kernel_features() {
    require_criu();
    let r = ferry(["check", "--json"]).json();
    assert_eq!(r["criu"]["usable"], true, "{r:#}");
    assert_eq!(r["criu"]["check_passed"], true, "{r:#}");
    assert!(
        r["criu"]["version_code"].as_i64().unwrap() >= 4_01_00,
        "{r:#}"
    );
    assert_eq!(r["criu"]["features"]["lazy_pages"], true, "{r:#}");
    let soft_dirty = r["kernel"]["soft_dirty"]["present"].as_bool().unwrap();
    assert_eq!(soft_dirty, smaps_has_soft_dirty_flag(), "{r:#}");
    // CRIU's own mem_track probe agrees with ferry's.
    assert_eq!(r["criu"]["features"]["mem_track"], soft_dirty, "{r:#}");
    let uffd = r["kernel"]["userfaultfd"]["present"].as_bool().unwrap();
    assert_eq!(uffd, userfaultfd_sysctl_exists(), "{r:#}");
    for tool in ["runc", "dockerd", "podman", "etcd"] {
        let t = r["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == tool)
            .unwrap_or_else(|| panic!("{tool} missing from {r:#}"));
        assert!(t["version"].is_string(), "{tool} not found: {r:#}");
    }
    assert!(r["nvml"]["available"].is_boolean(), "{r:#}");
    if r["nvml"]["available"] == false {
        assert!(r["nvml"]["detail"].is_string(), "no reason given: {r:#}");
    }
}

#[test]
fn check_human_output_names_each_probe() {
    require_criu();
    let out = ferry(["check"]).ok();
    for word in [
        "CRIU",
        "version",
        "soft-dirty",
        "userfaultfd",
        "PAGEMAP_SCAN",
        "runc",
        "NVML",
    ] {
        assert!(out.contains(word), "'{word}' missing:\n{out}");
    }
}

#[test]
fn check_fails_with_a_remedy_when_criu_is_missing() {
    let err_out = ferry(["check", "--criu", "/nonexistent/criu"]).run();
    assert_eq!(err_out.code(), Some(3), "{}", err_out.stdout());
    let out = err_out.stdout();
    assert!(out.contains("not found"), "{out}");
    assert!(
        out.contains("remedy") && out.contains("scripts/setup.sh"),
        "{out}"
    );
}

#[test]
fn check_fails_when_criu_does_not_answer() {
    // /bin/false exits at once, like a CRIU that cannot start on this kernel.
    let run = ferry(["check", "--json", "--criu", "/bin/false"]).run();
    assert_eq!(run.code(), Some(3), "{}", run.stdout());
    let r: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap();
    assert_eq!(r["criu"]["usable"], false);
    let problems = r["criu"]["problems"].to_string();
    assert!(problems.contains("does not answer VERSION"), "{problems}");
    assert!(problems.contains("CRIU exited"), "{problems}");
}
