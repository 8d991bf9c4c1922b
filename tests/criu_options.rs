//! CRIU's own options, given to ferry under CRIU's names, reach CRIU: an
//! ordinary program holding a deleted 3 MiB file open dumps only with a
//! ghost limit above CRIU's 1 MiB default, given as `--ghost-limit` or in a
//! CRIU configuration file (`--criu-config`), for dump, restore and migrate.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::agent::AgentProc;
use common::program::InSession;
use common::*;

struct Holder {
    prog: InSession,
    status: PathBuf,
}

impl Holder {
    fn start(dir: &Path) -> Holder {
        let status = dir.join("ghost.status");
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/programs/ghost_holder.py"
        );
        let file = dir.join("ghost.data");
        let s = status.clone();
        let prog = InSession::python(
            &[script.as_ref(), file.as_os_str(), status.as_os_str()],
            move || s.exists(),
        );
        Holder { prog, status }
    }

    fn count(&self) -> (u64, String) {
        let text = std::fs::read_to_string(&self.status).unwrap_or_default();
        let mut words = text.split_whitespace();
        let n = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        (n, words.next().unwrap_or("").to_string())
    }

    /// The count grows past where it is now and the file still reads back.
    fn counts_on_intact(&self) -> bool {
        let (start, _) = self.count();
        let deadline = Instant::now() + CONTINUE;
        while Instant::now() < deadline {
            let (n, verdict) = self.count();
            assert_ne!(verdict, "BAD", "the deleted file came back changed");
            if n > start + 5 {
                return verdict == "ok";
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

fn restore_and_check(dir: &Path, imgs: &Path, extra: &[&str], h: &Holder) {
    let pidfile = dir.join("restored.pid");
    ferry(["restore", "-j", "-D"])
        .arg(imgs)
        .args_from(extra)
        .arg("--pidfile")
        .arg(&pidfile)
        .run()
        .ok();
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        h.counts_on_intact(),
        "the restored program does not count on"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[test]
fn ghost_limit_reaches_criu_as_a_flag_and_through_a_criu_config_file() {
    require_criu();
    let dir = scratch("criu-ghost");
    let mut h = Holder::start(dir.path());
    let pid = h.prog.pid.to_string();

    // CRIU's default refuses the 3 MiB deleted file; the program runs on.
    let refused = ferry(["dump", "-j", "-t", &pid, "-D"])
        .arg(dir.path().join("default"))
        .run()
        .fails_with(5);
    assert!(
        refused.contains("criu: ") && refused.contains("increase limit"),
        "{refused}"
    );
    assert!(
        h.counts_on_intact(),
        "the program stopped after the refusal"
    );

    // --ghost-limit, as criu takes it.
    let imgs = dir.path().join("flag");
    ferry(["dump", "-j", "-R", "-t", &pid, "--ghost-limit", "4M", "-D"])
        .arg(&imgs)
        .run()
        .ok();
    assert!(h.counts_on_intact(), "the program stopped after the dump");

    // The same through a CRIU configuration file; this dump stops it.
    let conf = dir.path().join("criu.conf");
    std::fs::write(&conf, "ghost-limit 4M\n").unwrap();
    let imgs = dir.path().join("config");
    ferry(["dump", "-j", "-t", &pid, "-D"])
        .arg(&imgs)
        .arg("--criu-config")
        .arg(&conf)
        .run()
        .ok();
    h.prog.reap_shell();
    restore_and_check(dir.path(), &imgs, &["--weak-sysctls"], &h);
}

#[test]
fn a_migration_passes_criu_options_to_the_dump_and_carries_restore_ones() {
    require_criu();
    let dir = scratch("criu-ghost-migrate");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut h = Holder::start(dir.path());
    let pid = h.prog.pid.to_string();
    let migrate = |extra: &[&str]| {
        ferry([
            "migrate",
            "--shell-job",
            "--json",
            "--timeout",
            "20s",
            "--pid",
            &pid,
        ])
        .arg("--to")
        .arg(&agent.addr)
        .arg("--key")
        .arg(&agent.key)
        .args_from(extra)
        .run()
    };
    // Without the option CRIU's final dump refuses the ghost file: the
    // program is resumed here.
    let refused = migrate(&[]).fails_with(5);
    assert!(refused.contains("increase limit"), "{refused}");
    assert!(
        h.counts_on_intact(),
        "the program stopped after the refusal"
    );
    // With it the dump takes the file, and the restore options travel
    // (the destination's CRIU restores with them).
    let run = migrate(&[
        "--ghost-limit",
        "4M",
        "--weak-sysctls",
        "--network-lock",
        "skip",
    ]);
    h.prog.reap_shell();
    run.ok();
    assert!(
        h.counts_on_intact(),
        "the moved program does not count on\n{}",
        agent.log()
    );
}
