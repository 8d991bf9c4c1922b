//! CRIU's own test suite with ferry in place of the criu CLI: the zdtm
//! static tests of `scripts/zdtm/tests.txt` (a spread over pipes, sockets,
//! files, locks, timers, signals, memory layouts, ptrace, zombies) run with
//! `scripts/zdtm/ferry-as-criu` as zdtm's `--criu-bin`, so every dump and
//! restore goes through `ferry dump` / `ferry restore` with the test's own
//! options. The source comes from Debian's archive
//! (`scripts/zdtm/fetch-and-build.sh`); the whole list the real criu passes
//! here is a benchmark run (docs/benchmarks.md).

mod common;

use std::process::Command;

use common::*;

#[test]
fn criu_zdtm_static_tests_pass_with_ferry_dump_and_restore() {
    require_criu();
    let repo = env!("CARGO_MANIFEST_DIR");
    let tree = std::env::var("FERRY_ZDTM_DIR").unwrap_or_else(|_| "/var/tmp/ferry-zdtm".into());
    let built = Command::new("bash")
        .arg(format!("{repo}/scripts/zdtm/fetch-and-build.sh"))
        .arg(&tree)
        .output()
        .expect("run fetch-and-build.sh");
    assert!(
        built.status.success(),
        "cannot fetch and build CRIU's zdtm tests (network to the Debian archive needed):\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let source = std::fs::read_dir(&tree)
        .expect("the zdtm directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("criu-"))
        })
        .max()
        .expect("a criu source tree");
    let out = scratch("zdtm");
    let run = Command::new("bash")
        .arg(format!("{repo}/scripts/zdtm/run.sh"))
        .arg("--tree")
        .arg(&source)
        .args(["--keep-root", "--timeout", "120", "--criu-bin"])
        .arg(format!("{repo}/scripts/zdtm/ferry-as-criu"))
        .arg("--out")
        .arg(out.path())
        .arg(format!("{repo}/scripts/zdtm/tests.txt"))
        .env("FERRY_BIN", FERRY)
        .output()
        .expect("run zdtm");
    remove_zdtm_cgroups();
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "zdtm tests failed through ferry:\n{table}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let passed = table.lines().filter(|l| l.contains("\tpass\t")).count();
    assert!(passed >= 60, "only {passed} tests passed:\n{table}");
}

/// zdtm makes two named cgroup v1 hierarchies (`zdtmtst`,
/// `zdtmtst.defaultroot`) and leaves cgroups in them; every process of the
/// host then belongs to them, which the container engines do not expect.
/// Their cgroups are removed afterwards (the hierarchies have no mount).
fn remove_zdtm_cgroups() {
    let script = r#"
        for n in zdtmtst zdtmtst.defaultroot; do
            grep -q "name=$n:" /proc/self/cgroup || continue
            d=$(mktemp -d /tmp/ferry-zdtm-cg.XXXXXX)
            if mount -t cgroup -o none,name=$n ferry-zdtm "$d"; then
                find "$d" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null
                umount "$d"
            fi
            rmdir "$d"
        done
    "#;
    let _ = Command::new("sh").args(["-c", script]).status();
}
