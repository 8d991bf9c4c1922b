//! Live migration end to end: real agents, real CRIU, the bundled workload.
//! On one machine both "hosts" share a kernel and a pid space, which ferry
//! detects (boot ids): the source is killed just before the destination
//! restores, and restored locally if the destination fails after that.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::agent::AgentProc;
use common::*;
use ferry_lab::workload::{Launch, Workload};

/// Runs `cmd` (a migration) while reaping the workload when the migration
/// ends it, as its parent must for its pid to be free for the restore.
fn migrate_reaping(w: &mut Workload, cmd: Cmd) -> Run {
    let h = std::thread::spawn(move || cmd.run());
    let deadline = Instant::now() + Duration::from_secs(180);
    while !h.is_finished() && Instant::now() < deadline {
        let _ = w.reap(Duration::from_millis(5));
    }
    h.join().expect("migrate thread")
}

fn migrate_cmd(agent: &AgentProc, pid: i32, extra: &[&str]) -> Cmd {
    let mut c = ferry(["migrate", "--shell-job", "--timeout", "10s", "--pid"])
        .arg(pid.to_string())
        .arg("--to")
        .arg(&agent.addr)
        .arg("--key")
        .arg(&agent.key);
    for a in extra {
        c = c.arg(a);
    }
    c
}

/// sha256 of every image file (CRIU's logs and restore stats excluded).
fn checksums(dir: &Path) -> BTreeMap<String, String> {
    let out = std::process::Command::new("sha256sum")
        .args(
            std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().unwrap().to_string_lossy().into_owned();
                    !n.ends_with(".log") && n != "stats-restore"
                }),
        )
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (sum, path) = l.split_once("  ")?;
            Some((
                Path::new(path).file_name()?.to_string_lossy().into_owned(),
                sum.to_string(),
            ))
        })
        .collect()
}

fn workload(dir: &Path, size_mib: u64, dirty: f64) -> Workload {
    let mut l = Launch::new(WORKLOAD, size_mib, dir.join("report"));
    l.dirty_mib_s = dirty;
    start_with(l)
}

#[test]
fn a_process_migrates_continues_and_its_images_are_rebuilt_identical() {
    require_criu();
    let dir = scratch("migrate-ok");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut w = workload(dir.path(), 64, 1.0);
    let pid = w.pid();
    let before = w.report().unwrap().counter;
    let kept = dir.path().join("source-images");
    let run = migrate_reaping(
        &mut w,
        migrate_cmd(&agent, pid, &["--json", "--keep-images"]).arg(&kept),
    );
    let report = run.json();
    assert_eq!(
        report["restored_pid"].as_i64(),
        Some(pid as i64),
        "{report}"
    );
    assert!(!report["rounds"].as_array().unwrap().is_empty());
    assert!(report["final"]["frozen_ms"].as_f64().unwrap() > 0.0);
    assert!(report["same_kernel"].as_bool().unwrap());
    // The source is gone (our child exited); the restored copy counts on.
    assert!(
        w.reap(Duration::from_secs(1)).unwrap(),
        "source still running"
    );
    let restored = Workload::adopt(pid, w.report_path());
    let r = restored.wait_counter_above(before, CONTINUE).unwrap();
    assert!(r.counter > before);
    assert!(restored.verify_memory(CONTINUE).unwrap().mem_ok);
    // Byte-identical images on both sides.
    let dest = agent.kept_images();
    assert_eq!(dest.len(), 1, "{}", agent.log());
    let (a, b) = (checksums(&kept), checksums(&dest[0]));
    assert!(
        a.len() > 5 && a.keys().any(|k| k.starts_with("pages-")),
        "{a:?}"
    );
    assert_eq!(a, b);
    drop(restored);
}

#[test]
fn a_wrong_key_is_refused_and_nothing_is_stored() {
    require_criu();
    let dir = scratch("migrate-key");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let other = dir.path().join("other-key");
    ferry(["keygen"]).arg(&other).ok();
    let w = workload(dir.path(), 16, 0.0);
    let err = ferry(["migrate", "--shell-job", "--pid"])
        .arg(w.pid().to_string())
        .arg("--to")
        .arg(&agent.addr)
        .arg("--key")
        .arg(&other)
        .fails_with(4);
    assert!(
        err.contains("authentication") || err.contains("refused"),
        "{err}"
    );
    assert!(err.contains("keeps running here"), "{err}");
    assert_counting(&w);
    let stored = std::fs::metadata(agent.store.join("pages.dat"))
        .unwrap()
        .len();
    assert_eq!(stored, 0, "pages stored for an unauthenticated peer");
    assert!(!agent.store.join("checkpoints").exists());
    assert!(
        agent.wait_for("authentication with", Duration::from_secs(5)),
        "{}",
        agent.log()
    );
}

/// A small tmpfs mounted for one test, unmounted even on failure.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(at: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(at).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount");
        assert!(st.success(), "cannot mount a tmpfs at {}", at.display());
        SmallFs(at.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_destination_without_room_refuses_and_the_application_keeps_running() {
    require_criu();
    let dir = scratch("migrate-room");
    let small = SmallFs::mount(&dir.path().join("small"), "8m");
    let agent = AgentProc::start_with_store(
        dir.path(),
        &small.0.join("store"),
        "127.0.0.1:0",
        None,
        None,
    );
    let w = workload(dir.path(), 64, 0.0);
    let err = migrate_cmd(&agent, w.pid(), &[]).fails_with(4);
    assert!(err.contains("no room"), "{err}");
    assert_counting(&w);
    drop(agent);
}

#[test]
fn the_agent_killed_during_precopy_leaves_the_application_running() {
    require_criu();
    let dir = scratch("migrate-kill-pre");
    let mut agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut w = workload(dir.path(), 64, 4.0);
    let cmd = migrate_cmd(
        &agent,
        w.pid(),
        &["--max-rounds", "5", "--max-downtime", "1ms"],
    )
    .env(ferry_core::fault::ENV, "migrate-after-round-1")
    .env(ferry_core::fault::HOLD_ENV, "3000");
    let h = std::thread::spawn(move || cmd.run());
    assert!(
        agent.wait_for("migration begins", Duration::from_secs(30)),
        "{}",
        agent.log()
    );
    std::thread::sleep(Duration::from_millis(1500));
    agent.kill();
    let run = h.join().unwrap();
    let err = run.fails_with(4);
    assert!(err.contains("keeps running here"), "{err}");
    assert!(!w.reap(Duration::from_millis(10)).unwrap());
    assert_counting(&w);
}

#[test]
fn the_agent_killed_during_the_final_copy_leaves_the_application_running() {
    require_criu();
    let dir = scratch("migrate-kill-final");
    let mut agent = AgentProc::start(
        dir.path(),
        "127.0.0.1:0",
        None,
        Some("agent-before-rebuild"),
    );
    let mut w = workload(dir.path(), 32, 0.0);
    let cmd = migrate_cmd(&agent, w.pid(), &[]);
    let h = std::thread::spawn(move || cmd.run());
    agent.wait_fault("agent-before-rebuild");
    // The source is frozen now (dumped, left stopped).
    agent.kill();
    let err = h.join().unwrap().fails_with(5);
    assert!(err.contains("resumed here"), "{err}");
    assert!(!w.reap(Duration::from_millis(10)).unwrap());
    assert_counting(&w);
}

#[test]
fn a_final_dump_whose_stream_breaks_leaves_the_application_running() {
    require_criu();
    let dir = scratch("migrate-capture-fails");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut w = workload(dir.path(), 64, 0.0);
    // ferry stops reading a pages image from CRIU's pipe after its first
    // block: CRIU's dump fails on the broken pipe, CRIU resumes the tree.
    let err = migrate_cmd(&agent, w.pid(), &[])
        .env(ferry_core::fault::ENV, "migrate-capture-fails")
        .fails_with(5);
    assert!(
        err.contains("fault migrate-capture-fails injected"),
        "{err}"
    );
    assert!(
        err.contains("while its images streamed") && err.contains("keeps running here"),
        "{err}"
    );
    assert!(!w.reap(Duration::from_millis(10)).unwrap());
    assert_counting(&w);
}

#[test]
fn the_agent_killed_before_commit_leaves_exactly_one_running_copy() {
    agent_killed_at_leaves_one_copy("agent-before-commit", "migrate-kill-commit");
}

/// The agent dies once CRIU has restored the tree (stopped) but before the
/// restore's end is journaled: the journal has the root CRIU named at
/// `setup-namespaces`, so the restarted agent still removes that tree.
#[test]
fn the_agent_killed_as_criu_restores_leaves_exactly_one_running_copy() {
    agent_killed_at_leaves_one_copy("agent-after-criu-restore", "migrate-kill-criu");
}

/// The agent dies between journaling the commit and resuming the tree: the
/// restarted agent resumes it (its pid still has the journaled start
/// time), and the source, asking, learns that it committed. The
/// application runs once, at the destination, and counts on.
#[test]
fn the_agent_killed_after_journaling_the_commit_resumes_the_copy_when_it_restarts() {
    require_criu();
    let dir = scratch("migrate-kill-committed");
    let mut agent = AgentProc::start(
        dir.path(),
        "127.0.0.1:0",
        None,
        Some("agent-after-commit-journaled"),
    );
    let mut w = workload(dir.path(), 32, 0.0);
    let pid = w.pid();
    let cmd = migrate_cmd(&agent, pid, &[]);
    let h = std::thread::spawn(move || cmd.run());
    let deadline = Instant::now() + Duration::from_secs(60);
    let reached = "fault point agent-after-commit-journaled reached";
    while !agent.log().contains(reached) && Instant::now() < deadline {
        let _ = w.reap(Duration::from_millis(5));
    }
    assert!(agent.log().contains(reached), "{}", agent.log());
    let addr = agent.addr.clone();
    agent.kill();
    std::thread::sleep(Duration::from_millis(500));
    let again = AgentProc::start(dir.path(), &addr, None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !h.is_finished() && Instant::now() < deadline {
        let _ = w.reap(Duration::from_millis(5));
    }
    let run = h.join().unwrap();
    let out = run.ok();
    assert!(
        again.wait_for("asked for a migration's outcome", Duration::from_secs(5)),
        "{}",
        again.log()
    );
    assert!(
        run.stderr().contains("asking it for the outcome"),
        "{}\n{out}",
        run.stderr()
    );
    let moved = Workload::adopt(pid, w.report_path());
    assert_counting(&moved);
    assert_eq!(
        workload_copies(dir.path(), false).len(),
        1,
        "expected exactly one copy running"
    );
}

fn agent_killed_at_leaves_one_copy(point: &str, name: &str) {
    require_criu();
    let dir = scratch(name);
    let mut agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, Some(point));
    let mut w = workload(dir.path(), 32, 0.0);
    let pid = w.pid();
    let before = w.report().unwrap().counter;
    let cmd = migrate_cmd(&agent, pid, &[]);
    let h = std::thread::spawn(move || cmd.run());
    let deadline = Instant::now() + Duration::from_secs(60);
    let reached = format!("fault point {point} reached");
    while !agent.log().contains(&reached) && Instant::now() < deadline {
        let _ = w.reap(Duration::from_millis(5));
    }
    assert!(agent.log().contains(&reached), "{}", agent.log());
    // The destination's copy is restored and stopped; one kernel here, so
    // the source was killed for its pids. Now the agent dies; the source
    // asks for the outcome until an agent answers there. The restarted
    // agent finds the restore never committed in its journal, removes the
    // copy and answers "aborted": only then does the source restore here.
    let addr = agent.addr.clone();
    agent.kill();
    std::thread::sleep(Duration::from_millis(500));
    let _again = AgentProc::start(dir.path(), &addr, None, None);
    assert!(
        _again.wait_for(
            "never committed before the agent stopped",
            Duration::from_secs(10)
        ),
        "{}",
        _again.log()
    );
    // The journal named the stopped tree, which the restart removed.
    let removed = _again
        .log()
        .lines()
        .find(|l| l.contains("never committed before the agent stopped"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        removed.contains("Tree { pid: ") && !removed.contains("Tree { pid: 0,"),
        "the journal did not name the restored tree: {removed}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !h.is_finished() && Instant::now() < deadline {
        let _ = w.reap(Duration::from_millis(5));
    }
    let err = h.join().unwrap().fails_with(5);
    assert!(err.contains("restored here"), "{err}");
    let restored = Workload::adopt(pid, w.report_path());
    restored.wait_counter_above(before, CONTINUE).unwrap();
    assert_counting(&restored);
    assert_eq!(
        workload_copies(dir.path(), false).len(),
        1,
        "expected exactly one copy running"
    );
}

#[test]
fn the_agent_stops_cleanly_on_sigterm() {
    let dir = scratch("agent-term");
    let mut agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let status = agent
        .terminate(Duration::from_secs(10))
        .expect("agent exits on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", agent.log());
    assert!(agent.log().contains("agent stopped"), "{}", agent.log());
}

#[test]
fn post_copy_restarts_before_memory_is_resident_and_memory_arrives_intact() {
    require_criu();
    let dir = scratch("migrate-lazy");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut w = workload(dir.path(), 64, 1.0);
    let pid = w.pid();
    let before = w.report().unwrap().counter;
    let run = migrate_reaping(
        &mut w,
        migrate_cmd(&agent, pid, &["--json", "--lazy-pages"]),
    );
    let report = run.json();
    assert_eq!(report["post_copy"].as_bool(), Some(true), "{report}");
    let restored = Workload::adopt(pid, w.report_path());
    // The source kept counting during pre-copy: only a counter beyond its
    // last report shows the restored copy runs.
    let last = restored.report().unwrap().counter.max(before);
    let why = |e: std::io::Error| post_copy_diagnosis(&agent, pid, &e);
    restored
        .wait_counter_above(last, CONTINUE)
        .unwrap_or_else(|e| panic!("{}", why(e)));
    let verified = restored
        .verify_memory(CONTINUE)
        .unwrap_or_else(|e| panic!("{}", why(e)));
    assert!(verified.mem_ok, "memory differs after post-copy");
    assert!(
        agent.wait_for("post-copy complete", Duration::from_secs(60)),
        "{}",
        agent.log()
    );
}

/// CRIU's parasite mounts a procfs for a task in another pid namespace at
/// a fixed place of the task's mount namespace: two such dumps at once in
/// one mount namespace collide ("Can't create a directory (-17)"). The
/// tests that dump a pid namespace's init take turns.
static PID_NS_DUMP: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn pid_ns_turn() -> std::sync::MutexGuard<'static, ()> {
    PID_NS_DUMP.lock().unwrap_or_else(|p| p.into_inner())
}

/// The workload as the init of a pid namespace of its own (as a
/// container's init is): a lazy dump keeps the source's pids until every
/// page has moved, so on one kernel only such a tree takes that route.
fn pid_ns_workload(dir: &Path, size_mib: u64, dirty: f64) -> Workload {
    let mut l = Launch::new(WORKLOAD, size_mib, dir.join("report"));
    l.dirty_mib_s = dirty;
    l.own_pid_ns = true;
    start_with(l)
}

/// `ferry migrate --lazy-pages` without `--shell-job` (a pid namespace's
/// init leads its own session).
fn lazy_cmd(agent: &AgentProc, pid: i32) -> Cmd {
    ferry([
        "migrate",
        "--json",
        "--lazy-pages",
        "--timeout",
        "10s",
        "--pid",
    ])
    .arg(pid.to_string())
    .arg("--to")
    .arg(&agent.addr)
    .arg("--key")
    .arg(&agent.key)
}

/// Kills whatever copies of this workload a test leaves behind.
struct KillCopies<'a>(&'a Path);

impl Drop for KillCopies<'_> {
    fn drop(&mut self) {
        for p in workload_copies(self.0, false) {
            let _ = ferry_image::process::signal(p, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[test]
fn post_copy_from_a_lazy_dump_moves_no_memory_while_frozen() {
    require_criu();
    let _turn = pid_ns_turn();
    let dir = scratch("migrate-lazy-dump");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut w = pid_ns_workload(dir.path(), 64, 1.0);
    let pid = w.pid();
    let before = w.report().unwrap().counter;
    let kept = dir.path().join("source-images");
    let report = migrate_reaping(
        &mut w,
        lazy_cmd(&agent, pid).arg("--keep-images").arg(&kept),
    )
    .json();
    let f = &report["final"];
    assert_eq!(f["lazy_dump"].as_bool(), Some(true), "{report}");
    // CRIU's dump ended as it should: the transfer closed, the tree killed
    // by CRIU (not resumed, then killed by ferry).
    assert!(f["criu_dump"].is_object(), "{report}");
    assert_eq!(
        report["stop_reason"].as_str(),
        Some("post_copy"),
        "{report}"
    );
    assert!(report["rounds"].as_array().unwrap().is_empty(), "{report}");
    // The frozen phase carried only metadata images: about 16k pages of
    // memory came afterwards, on request.
    assert!(
        f["post_copy_pages"].as_u64().unwrap() >= 16 << 10,
        "{report}"
    );
    assert!(f["zero_pages"].as_u64().unwrap() > 0, "{report}");
    // A quarter of the workload's pages repeat 16 contents: all but the
    // first of each are named, not sent.
    assert!(
        f["post_copy_repeated_pages"].as_u64().unwrap() > 1000,
        "{report}"
    );
    // The source tree is gone once every page has moved.
    assert!(
        w.reap(Duration::from_secs(5)).unwrap(),
        "source still running"
    );
    let restored_pid = report["restored_pid"].as_i64().unwrap() as i32;
    let restored = Workload::adopt(restored_pid, w.report_path());
    restored.wait_counter_above(before, CONTINUE).unwrap();
    assert!(restored.verify_memory(CONTINUE).unwrap().mem_ok);
    assert!(
        agent.wait_for("post-copy complete", Duration::from_secs(60)),
        "{}",
        agent.log()
    );
    assert_eq!(workload_copies(dir.path(), false), vec![restored_pid]);
    // The destination restored from images byte-identical to the lazy
    // dump's.
    let dest = agent.kept_images();
    assert_eq!(dest.len(), 1, "{}", agent.log());
    let (mut a, b) = (checksums(&kept), checksums(&dest[0]));
    // CRIU's statistics of the dump are written here after the transfer.
    a.remove("stats-dump");
    assert!(a.len() > 5 && a.contains_key("pagemap-1.img"), "{a:?}");
    assert_eq!(a, b);
}

/// An unprivileged local user racing for post-copy's page servers: as
/// `nobody`, it connects to every loopback port that listens, over and
/// over, for the whole migration, and sends CRIU's `CLOSE` on each
/// connection. Neither page server listens anywhere (each is handed an
/// already-connected descriptor), so the migration succeeds and the
/// memory arrives intact.
#[test]
fn a_local_user_cannot_reach_post_copys_page_servers() {
    require_criu();
    let _turn = pid_ns_turn();
    let dir = scratch("migrate-lazy-race");
    let _cleanup = KillCopies(dir.path());
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut w = pid_ns_workload(dir.path(), 32, 1.0);
    let pid = w.pid();
    let before = w.report().unwrap().counter;
    // Where `nobody` can write its log and see the stop sign.
    let shared = tempfile::Builder::new()
        .prefix("ferry-racer-")
        .tempdir()
        .unwrap();
    let open = |p: &Path, mode| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap()
    };
    open(shared.path(), 0o777);
    let stop = shared.path().join("stop-racing");
    let seen = shared.path().join("racer-log");
    std::fs::write(&seen, "").unwrap();
    open(&seen, 0o666);
    let mut racer = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            "nobody",
            "--regid",
            "nogroup",
            "--clear-groups",
            "--",
        ])
        // The system's Python: nobody cannot run a shim under /root.
        .args(["/usr/bin/python3", "-c", RACER])
        .arg(&stop)
        .arg(&seen)
        .spawn()
        .expect("setpriv (util-linux) and python3");
    let run = migrate_reaping(&mut w, lazy_cmd(&agent, pid));
    std::fs::create_dir_all(&stop).unwrap();
    let racer_ok = racer.wait().unwrap().success();
    let report = run.json();
    let tries = std::fs::read_to_string(&seen).unwrap();
    assert!(racer_ok, "the racer failed: {tries}");
    // It did race: the agent's own port at least, many times over.
    assert!(tries.lines().count() > 10, "{tries}");
    assert_eq!(
        report["final"]["lazy_dump"].as_bool(),
        Some(true),
        "{report}"
    );
    assert_eq!(
        report["stop_reason"].as_str(),
        Some("post_copy"),
        "{report}"
    );
    let restored_pid = report["restored_pid"].as_i64().unwrap() as i32;
    let restored = Workload::adopt(restored_pid, w.report_path());
    restored.wait_counter_above(before, CONTINUE).unwrap();
    assert!(restored.verify_memory(CONTINUE).unwrap().mem_ok);
}

/// The racer: connects to each listening 127.0.0.1 port in
/// /proc/net/tcp, sends a page-server CLOSE header, notes what answered;
/// until argv[1] exists (at most 120 s).
const RACER: &str = r#"
import os, socket, struct, sys, time
stop, log = sys.argv[1], sys.argv[2]
close = struct.pack("=IIQQQ", 0x1023, 0, 0, 0, 0)
end = time.time() + 120
with open(log, "a") as out:
    while not os.path.exists(stop) and time.time() < end:
        for line in open("/proc/net/tcp").readlines()[1:]:
            f = line.split()
            addr, port = f[1].split(":")
            if f[3] != "0A" or addr != "0100007F":
                continue
            port = int(port, 16)
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=0.2)
                s.sendall(close)
                s.settimeout(0.05)
                try:
                    got = len(s.recv(64))
                except OSError:
                    got = -1
                s.close()
                out.write(f"port {port}: connected, {got} bytes back\n")
            except OSError as e:
                out.write(f"port {port}: {e}\n")
        out.flush()
        time.sleep(0.001)
"#;

#[test]
fn a_lazy_dump_whose_destination_dies_before_commit_resumes_here() {
    require_criu();
    let _turn = pid_ns_turn();
    let dir = scratch("migrate-lazy-kill");
    let _cleanup = KillCopies(dir.path());
    let mut agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, Some("agent-before-commit"));
    let mut w = pid_ns_workload(dir.path(), 32, 0.0);
    let pid = w.pid();
    let cmd = lazy_cmd(&agent, pid);
    let h = std::thread::spawn(move || cmd.run());
    agent.wait_fault("agent-before-commit");
    // Restored there and stopped, the source frozen in CRIU's lazy dump.
    // The agent dies and comes back: its journal aborts the restore.
    let addr = agent.addr.clone();
    agent.kill();
    let _again = AgentProc::start(dir.path(), &addr, None, None);
    let err = h.join().unwrap().fails_with(5);
    assert!(err.contains("resumed here"), "{err}");
    assert!(!w.reap(Duration::from_millis(10)).unwrap());
    assert_counting(&w);
    // The destination's copy never ran (stopped, its agent dead).
    assert_eq!(workload_copies(dir.path(), true), vec![pid]);
}

/// Post-copy fails after the commit (the source cannot read the pages the
/// destination asks for): the destination's copy dies, the source resumes
/// from the dump, and `ferry migrate` exits 6 (work lost) with a JSON error
/// saying so.
#[test]
fn a_post_copy_failing_after_the_commit_exits_6_and_resumes_the_source_from_the_dump() {
    require_criu();
    let _turn = pid_ns_turn();
    let dir = scratch("migrate-lazy-lost");
    let _cleanup = KillCopies(dir.path());
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut w = pid_ns_workload(dir.path(), 32, 0.0);
    let pid = w.pid();
    let run = lazy_cmd(&agent, pid)
        .env(ferry_core::fault::ENV, "post-copy-read-fails")
        .run();
    run.fails_with(6);
    let err: serde_json::Value = serde_json::from_str(&run.stdout())
        .unwrap_or_else(|e| panic!("no JSON error ({e}): {}", run.stdout()));
    assert_eq!(err["error"]["kind"], "work_lost", "{err}");
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("IS LOST"), "{message}");
    assert!(!w.reap(Duration::from_millis(10)).unwrap());
    assert_counting(&w);
    let deadline = Instant::now() + Duration::from_secs(10);
    while workload_copies(dir.path(), true) != vec![pid] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        workload_copies(dir.path(), true),
        vec![pid],
        "expected only the source to run\n{}",
        agent.log()
    );
}

#[test]
fn ferry_killed_during_a_lazy_dump_leaves_the_application_running_here() {
    require_criu();
    let _turn = pid_ns_turn();
    let dir = scratch("migrate-lazy-ferry-kill");
    let _cleanup = KillCopies(dir.path());
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, Some("agent-before-commit"));
    let mut w = pid_ns_workload(dir.path(), 32, 0.0);
    let pid = w.pid();
    // Staged in the test's directory: the killed ferry cannot remove its
    // staging, and the next migration's sweep may be in another test run.
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let cmd = lazy_cmd(&agent, pid).arg("--staging").arg(&staging);
    let h = std::thread::spawn(move || cmd.run());
    agent.wait_fault("agent-before-commit");
    // ferry dies with the commit sent and the tree frozen in CRIU's lazy
    // dump: its link to CRIU's page server resets (an orderly end would
    // be taken for the end of the transfer, and the tree killed), CRIU
    // fails the dump and resumes the tree. The agent resumes its copy
    // once its fault point lets it, finds the source gone at the first
    // page it needs, and kills that copy.
    let key = agent.key.display().to_string();
    let killed = std::process::Command::new("pkill")
        .args(["-KILL", "-f", &format!("ferry migrate .*--key {key}")])
        .status()
        .unwrap();
    assert!(killed.success(), "no ferry migrate to kill");
    let _ = h.join();
    assert_counting(&w);
    assert!(
        agent.wait_for("post-copy FAILED", Duration::from_secs(60))
            || agent.wait_for("session ended before commit", Duration::from_secs(1)),
        "{}",
        agent.log()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while workload_copies(dir.path(), false).len() != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        workload_copies(dir.path(), false),
        vec![pid],
        "{}",
        agent.log()
    );
    assert!(
        !w.reap(Duration::from_millis(10)).unwrap(),
        "the source died"
    );
    assert_counting(&w);
}

/// What a stalled post-copy left behind: the restored task's state and
/// kernel wait channel, the agent's log and the lazy-pages daemon's log.
fn post_copy_diagnosis(agent: &AgentProc, pid: i32, e: &std::io::Error) -> String {
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| format!("({e})"));
    let proc = Path::new("/proc").join(pid.to_string());
    let state = read(&proc.join("status"))
        .lines()
        .filter(|l| l.starts_with("State:"))
        .collect::<String>();
    let lazy: String = agent
        .kept_images()
        .iter()
        .map(|d| {
            let log = read(&d.join("lazy-pages.log"));
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            format!(
                "{}:\n{}",
                d.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect();
    format!(
        "post-copy: the restored copy stalled: {e}\n{state} wchan={}\nagent log:\n{}\nlazy-pages log (tail):\n{lazy}",
        read(&proc.join("wchan")),
        agent.log()
    )
}

/// Deletes a runc container from a given runc root when dropped.
struct RuncIn(std::path::PathBuf, String);

impl Drop for RuncIn {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runc")
            .arg("--root")
            .arg(&self.0)
            .args(["delete", "--force", &self.1])
            .output();
    }
}

#[test]
fn a_runc_container_migrates_between_namespace_hosts_and_continues() {
    use common::containers::{counter_above, require_runc, verify_memory, RuncContainer};
    require_criu();
    require_runc();
    let dir = scratch("migrate-runc");
    let agent_root = dir.path().join("agent-runc");
    // Two namespace hosts; the agent in host 1 restores containers into
    // its own runc root.
    let lab = ferry_lab::Lab::create("runc", 2, Some(1000)).expect("lab");
    let agent = AgentProc::start_full(
        dir.path(),
        &dir.path().join("store"),
        &format!("{}:0", lab.host(1).addr),
        Some(&lab.host(1).netns),
        None,
        Some(&agent_root),
    );
    let c = RuncContainer::start(dir.path(), "mig", 16);
    let _cleanup = RuncIn(agent_root.clone(), c.id.clone());
    let before = counter_above(&c.report(), 50).counter;
    let kept = dir.path().join("source-images");
    let report = ferry([
        "migrate",
        "--json",
        "--timeout",
        "10s",
        "--runc",
        &c.id,
        "--to",
    ])
    .arg(&agent.addr)
    .arg("--key")
    .arg(&agent.key)
    .arg("--keep-images")
    .arg(&kept)
    .json();
    let pid = report["restored_pid"].as_i64().unwrap() as i32;
    // The source container is gone; the destination's runs and counts on.
    assert!(
        RuncContainer::status(&c.id).is_none(),
        "source container still exists"
    );
    let st = std::process::Command::new("runc")
        .arg("--root")
        .arg(&agent_root)
        .args(["state", &c.id])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(String::from_utf8_lossy(&st.stdout).contains("\"running\""));
    let after = counter_above(&c.report(), before).counter;
    counter_above(&c.report(), after + 50);
    assert!(verify_memory(&c.report(), pid));
    let dest = agent.kept_images();
    assert_eq!(checksums(&kept), checksums(&dest[0]));
}

#[test]
fn a_docker_container_migrates_into_a_new_container_and_continues() {
    use common::containers::{counter_above, require_docker, unique, verify_memory, Docker};
    require_criu();
    require_docker();
    let dir = scratch("migrate-docker");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut d = Docker::image(dir.path(), "mig");
    let state = dir.path().join("state");
    let name = d.run("mig", &state, 16);
    let report = state.join("report");
    let before = counter_above(&report, 50).counter;
    let copy = unique("mig-copy");
    d.adopt(&copy);
    let run = ferry(["migrate", "--json", "--timeout", "20s", "--docker", &name])
        .arg("--docker-name")
        .arg(&copy)
        .arg("--to")
        .arg(&agent.addr)
        .arg("--key")
        .arg(&agent.key)
        .json();
    assert_eq!(Docker::status(&copy), "running");
    assert_ne!(
        Docker::status(&name),
        "running",
        "the source container still runs"
    );
    let after = counter_above(&report, before).counter;
    counter_above(&report, after + 50);
    assert!(verify_memory(
        &report,
        run["restored_pid"].as_i64().unwrap() as i32
    ));
}

/// An agent that shares this kernel's boot id but not its pid space (in a
/// pid namespace of its own, as a clone of this VM would be a kernel of
/// its own) cannot read the source's kernel proof: the migration takes the
/// route between two hosts (the source stays frozen until the commit)
/// instead of killing the source before the restore, and an ordinary
/// program arrives and counts on.
#[test]
fn an_equal_boot_id_without_the_kernel_proof_is_another_host() {
    require_criu();
    let dir = scratch("migrate-unproved-kernel");
    let agent = AgentProc::start_wrapped(
        dir.path(),
        &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
    );
    let mut p = common::program::FileCounter::start(dir.path(), 0);
    let pid = p.pid;
    let run = migrate_shell_job(pid, &agent.addr, &agent.key);
    p.reap_shell();
    let report = run.json();
    assert_eq!(report["same_kernel"].as_bool(), Some(false), "{report}");
    assert!(
        agent.wait_for("treated as another kernel", Duration::from_secs(5)),
        "{}",
        agent.log()
    );
    // The source is gone; the copy in the agent's namespace counts on.
    assert_eq!(p.state(), None, "the source still runs");
    assert!(
        p.counts_on(),
        "the migrated program does not count on\n{}",
        agent.log()
    );
    drop(agent);
}

/// On one kernel the source is killed before the restore, and CRIU
/// refuses to restore a file whose size changed: a program whose stdout is
/// a log file someone else writes too (opened without O_APPEND, as `>`
/// opens it) would be lost if the log grew meanwhile. The migration is
/// refused before anything is frozen, naming the file, and the program
/// runs on.
#[test]
fn a_file_written_from_outside_the_tree_stops_a_one_kernel_migration() {
    require_criu();
    let dir = scratch("migrate-shared-log");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let log = dir.path().join("shared.log");
    // This test writes the log too, through its own descriptor.
    let mut ours = std::fs::File::create(&log).unwrap();
    let theirs = ours.try_clone().unwrap();
    let p = common::program::FileCounter::start_to(dir.path(), 0, theirs.into());
    std::io::Write::write_all(&mut ours, b"a line from outside\n").unwrap();
    let err = migrate_shell_job(p.pid, &agent.addr, &agent.key).fails_with(4);
    assert!(err.contains("shared.log"), "{err}");
    assert!(err.contains("nothing was frozen"), "{err}");
    assert!(p.counts_on(), "the program stopped: {:?}\n{err}", p.state());
}

fn migrate_json(agent: &AgentProc, pid: i32, extra: &[&str]) -> Cmd {
    ferry(["migrate", "--shell-job", "--json", "--timeout", "20s"])
        .args_from(["--pid", &pid.to_string(), "--to", &agent.addr])
        .arg("--key")
        .arg(&agent.key)
        .args_from(extra)
}

/// SIGINT during pre-copy cancels: exit 4, the program never stopped, the
/// agent restored nothing. The live progress came as JSON lines on stderr,
/// and `--max-bandwidth` kept pre-copy slow enough to be caught in it.
#[test]
fn sigint_during_precopy_cancels_and_the_program_never_stops() {
    require_criu();
    let dir = scratch("migrate-cancel");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let p = common::program::FileCounter::start(dir.path(), 96);
    let running = migrate_json(&agent, p.pid, &["--max-bandwidth", "16M"]).spawn();
    std::thread::sleep(Duration::from_secs(3));
    running.signal(nix::sys::signal::Signal::SIGINT);
    let run = running.wait();
    let err = run.fails_with(4);
    let v: serde_json::Value = serde_json::from_str(&run.stdout())
        .unwrap_or_else(|e| panic!("no JSON error ({e}): {}", run.stdout()));
    assert_eq!(v["error"]["kind"], "refused_before_freezing", "{v}");
    assert!(err.contains("cancelled"), "{err}");
    let events: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "scan" && e["round"] == 1),
        "no scan event in:\n{err}"
    );
    assert!(p.counts_on(), "the program stopped: {:?}\n{err}", p.state());
    assert!(
        agent.wait_for("session ended without a restore", Duration::from_secs(10)),
        "{}",
        agent.log()
    );
}

/// SIGINT while the source is frozen and before the commit: the source is
/// resumed (exit 5), nothing runs at the destination.
#[test]
fn sigint_while_frozen_before_the_commit_resumes_the_source() {
    require_criu();
    let dir = scratch("migrate-cancel-frozen");
    let agent = AgentProc::start(
        dir.path(),
        "127.0.0.1:0",
        None,
        Some("agent-before-rebuild"),
    );
    let p = common::program::FileCounter::start(dir.path(), 8);
    let running = migrate_json(&agent, p.pid, &[]).spawn();
    agent.wait_fault("agent-before-rebuild");
    running.signal(nix::sys::signal::Signal::SIGINT);
    let run = running.wait();
    let err = run.fails_with(5);
    assert!(
        err.contains("cancelled") && err.contains("resumed here"),
        "{err}"
    );
    assert!(p.counts_on(), "the program stopped: {:?}\n{err}", p.state());
    assert!(
        agent.wait_for("session ended without a restore", Duration::from_secs(30)),
        "{}",
        agent.log()
    );
}

/// `--max-bandwidth`: the data streams never ran faster than the cap (an
/// upper bound: a slow machine only makes it slower).
#[test]
fn max_bandwidth_caps_the_data_streams() {
    require_criu();
    let dir = scratch("migrate-cap");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut p = common::program::FileCounter::start(dir.path(), 24);
    let run = migrate_json(
        &agent,
        p.pid,
        &["--max-bandwidth", "8M", "--max-rounds", "1"],
    )
    .run();
    p.reap_shell();
    let report = run.json();
    let round = &report["rounds"][0];
    let (wire, ms) = (
        round["wire_bytes"].as_f64().unwrap(),
        round["ms"].as_f64().unwrap(),
    );
    assert!(wire > 16e6, "the random memory was not sent: {report}");
    let rate = wire / (ms / 1e3);
    assert!(
        rate <= 8e6 * 1.1,
        "{rate:.0} B/s over an 8 MB/s cap: {report}"
    );
    assert!(
        p.counts_on(),
        "the moved program does not count on: {report}\n{}",
        agent.log()
    );
}

/// The restored copy named by `report` counts on from `before` and its
/// memory verifies; it is killed when what this returns is dropped.
fn restored_continues(report: &serde_json::Value, w: &Workload, before: u64) -> Workload {
    let restored_pid = report["restored_pid"].as_i64().unwrap() as i32;
    let restored = Workload::adopt(restored_pid, w.report_path());
    restored.wait_counter_above(before, CONTINUE).unwrap();
    assert!(restored.verify_memory(CONTINUE).unwrap().mem_ok);
    restored
}

/// `ferry migrate --hybrid --json` of a pid namespace's init.
fn hybrid_cmd(agent: &AgentProc, pid: i32) -> Cmd {
    ferry(["migrate", "--json", "--hybrid", "--timeout", "10s", "--pid"])
        .arg(pid.to_string())
        .arg("--to")
        .arg(&agent.addr)
        .arg("--key")
        .arg(&agent.key)
}

/// The hybrid route: pre-copy, then a lazy dump; the destination takes
/// what pre-copy brought and is unchanged out of its store, and only the
/// pages changed since come from the frozen source.
#[test]
fn hybrid_takes_unchanged_pages_from_the_store_and_only_changed_ones_from_the_source() {
    require_criu();
    let _turn = pid_ns_turn();
    let dir = scratch("migrate-hybrid");
    let _cleanup = KillCopies(dir.path());
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut w = pid_ns_workload(dir.path(), 64, 1.0);
    let pid = w.pid();
    let before = w.report().unwrap().counter;
    let cmd = hybrid_cmd(&agent, pid);
    let report = migrate_reaping(&mut w, cmd).json();
    let f = &report["final"];
    assert_eq!(report["route"].as_str(), Some("hybrid"), "{report}");
    assert!(report["route_fallback"].is_null(), "{report}");
    assert!(!report["rounds"].as_array().unwrap().is_empty(), "{report}");
    assert_eq!(f["lazy_dump"].as_bool(), Some(true), "{report}");
    // The frozen tree read once more: 64 MiB, about 16k pages, a quarter
    // of them zero; at 1 MiB/s only a few hundred changed since the last
    // round, and only those went in full.
    let r = &f["final_round"];
    let pages = r["populated_pages"].as_u64().unwrap();
    assert!(pages >= 16 << 10, "{report}");
    assert!(r["sent_pages"].as_u64().unwrap() < 2048, "{report}");
    // The agent installed its map: every page the daemon asked for after
    // that came out of its store, and the source went without waiting.
    assert_eq!(f["released_by_map"].as_bool(), Some(true), "{report}");
    assert_eq!(f["pages_in_images"].as_u64(), Some(pages), "{report}");
    let asked = f["post_copy_pages"].as_u64().unwrap();
    assert!(asked < pages, "{report}");
    assert!(f["source_released_ms"].as_f64().unwrap() > 0.0, "{report}");
    // The source tree is gone once every page has moved.
    assert!(
        w.reap(Duration::from_secs(5)).unwrap(),
        "source still running"
    );
    let restored = restored_continues(&report, &w, before);
    let restored_pid = restored.pid();
    assert!(
        agent.wait_for("post-copy complete", Duration::from_secs(60)),
        "{}",
        agent.log()
    );
    assert_eq!(workload_copies(dir.path(), false), vec![restored_pid]);
}

/// Without the final map (withheld by a fault point) the hybrid route
/// still works: the destination asks the source for every page, and the
/// source names by digest each one the destination's store holds, so only
/// the changed pages cross in full; the source goes once every page has.
#[test]
fn hybrid_without_its_final_map_names_stored_pages_by_digest() {
    require_criu();
    let _turn = pid_ns_turn();
    let dir = scratch("migrate-hybrid-nomap");
    let _cleanup = KillCopies(dir.path());
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut w = pid_ns_workload(dir.path(), 32, 1.0);
    let pid = w.pid();
    let before = w.report().unwrap().counter;
    let cmd = hybrid_cmd(&agent, pid).env(ferry_core::fault::ENV, "hybrid-map-withheld");
    let report = migrate_reaping(&mut w, cmd).json();
    let f = &report["final"];
    assert_eq!(report["route"].as_str(), Some("hybrid"), "{report}");
    assert_eq!(f["released_by_map"].as_bool(), Some(false), "{report}");
    let pages = f["post_copy_pages"].as_u64().unwrap();
    let stored = f["post_copy_stored_pages"].as_u64().unwrap();
    assert!(pages >= 8 << 10, "{report}");
    assert!(stored > 4 << 10, "{report}");
    assert!(f["pages_sent"].as_u64().unwrap() < stored / 4, "{report}");
    assert!(
        w.reap(Duration::from_secs(5)).unwrap(),
        "source still running"
    );
    let _restored = restored_continues(&report, &w, before);
}

/// A final map that comes after the commit (held back at a fault point)
/// is taken all the same: the session stays open until post-copy ends.
#[test]
fn hybrid_takes_a_final_map_that_comes_after_the_commit() {
    require_criu();
    let _turn = pid_ns_turn();
    let dir = scratch("migrate-hybrid-latemap");
    let _cleanup = KillCopies(dir.path());
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut w = pid_ns_workload(dir.path(), 256, 1.0);
    let pid = w.pid();
    let before = w.report().unwrap().counter;
    let cmd = hybrid_cmd(&agent, pid)
        .env(ferry_core::fault::ENV, "hybrid-before-map")
        .env(ferry_core::fault::HOLD_ENV, "300");
    let report = migrate_reaping(&mut w, cmd).json();
    let f = &report["final"];
    // The daemon had begun fetching from the source when the map came,
    // and the map released the source before it had every page.
    assert!(f["post_copy_pages"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(f["released_by_map"].as_bool(), Some(true), "{report}");
    let _restored = restored_continues(&report, &w, before);
    assert!(
        agent.wait_for("final page map installed", Duration::from_secs(30)),
        "{}",
        agent.log()
    );
}

/// An ordinary Python program (no setsid(), scattered zero pages, memory
/// it keeps rewriting) takes the hybrid route to an agent on another
/// kernel (here: one in a pid namespace of its own, which cannot prove it
/// shares this kernel), and its memory hashes as before.
#[test]
fn an_ordinary_program_takes_the_hybrid_route_and_its_memory_is_intact() {
    require_criu();
    let dir = scratch("migrate-hybrid-ordinary");
    let agent = AgentProc::start_wrapped(
        dir.path(),
        &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
    );
    let mut p = common::program::CheckedMemory::start(dir.path(), 48);
    assert_eq!(p.verdict().as_deref(), Some("ok"));
    let run = ferry([
        "migrate",
        "--shell-job",
        "--json",
        "--hybrid",
        "--timeout",
        "20s",
    ])
    .args_from(["--pid", &p.pid.to_string(), "--to", &agent.addr])
    .arg("--key")
    .arg(&agent.key)
    .run();
    p.reap_shell();
    let report = run.json();
    assert_eq!(report["same_kernel"].as_bool(), Some(false), "{report}");
    assert_eq!(report["route"].as_str(), Some("hybrid"), "{report}");
    let f = &report["final"];
    assert_eq!(f["released_by_map"].as_bool(), Some(true), "{report}");
    assert!(
        f["final_round"]["populated_pages"].as_u64().unwrap() > 8 << 10,
        "{report}"
    );
    assert_eq!(p.state(), None, "the source still runs");
    assert!(
        p.counts_on(),
        "the program does not count on\n{}",
        agent.log()
    );
    assert_eq!(p.verdict().as_deref(), Some("ok"), "{}", agent.log());
    drop(agent);
}

/// Where a lazy dump cannot move the tree (one kernel, a tree that is not
/// a pid namespace's init), `--hybrid` pre-copies instead and the report
/// says why.
#[test]
fn hybrid_falls_back_to_precopy_and_says_why() {
    require_criu();
    let dir = scratch("migrate-hybrid-fallback");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut p = common::program::FileCounter::start(dir.path(), 8);
    let run = ferry([
        "migrate",
        "--shell-job",
        "--json",
        "--hybrid",
        "--timeout",
        "20s",
    ])
    .args_from(["--pid", &p.pid.to_string(), "--to", &agent.addr])
    .arg("--key")
    .arg(&agent.key)
    .run();
    p.reap_shell();
    let report = run.json();
    assert_eq!(report["route"].as_str(), Some("precopy"), "{report}");
    let why = report["route_fallback"].as_str().unwrap_or_default();
    assert!(why.contains("pid namespace"), "{report}");
    assert!(
        p.counts_on(),
        "the program does not count on\n{}",
        agent.log()
    );
    drop(agent);
}

/// A cost file that makes a full dump slow and a lazy dump quick.
fn slow_dump_costs(dir: &Path) -> std::path::PathBuf {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("costs.json"),
        r#"{"dump_fixed_ms": 5000, "dump_us_per_page": 1.0, "restore_fixed_ms": 60,
            "restore_us_per_page": 1.0, "lazy_frozen_ms": 50, "samples": 1}"#,
    )
    .unwrap();
    state
}

/// `--max-downtime` is a promise: a frozen phase predicted to exceed it
/// (here by this host's costs as the cost file says) is refused before
/// anything is frozen (exit 4), and the program never stops; with
/// `--accept-downtime-miss` the miss is announced before the freeze and
/// the report shows the limit, the prediction and the measured time.
#[test]
fn a_predicted_downtime_miss_is_refused_before_freezing_or_announced() {
    require_criu();
    let dir = scratch("migrate-promise");
    let state = slow_dump_costs(dir.path());
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut p = common::program::FileCounter::start(dir.path(), 4);
    let cmd = || {
        ferry(["migrate", "--shell-job", "--json", "--timeout", "20s"])
            .args_from(["--pid", &p.pid.to_string(), "--to", &agent.addr])
            .arg("--key")
            .arg(&agent.key)
            .env("FERRY_STATE_DIR", state.to_str().unwrap())
            .env("FERRY_ACCEPT_DOWNTIME_MISS", "0")
    };
    let err = cmd().fails_with(4);
    assert!(
        err.contains("predicted to take") && err.contains("--max-downtime"),
        "{err}"
    );
    assert!(err.contains("pid namespace"), "why no other route: {err}");
    let letter = p.state().unwrap_or_default();
    assert!(
        !letter.is_empty() && !letter.starts_with(['T', 't']),
        "state {letter}"
    );
    assert!(p.counts_on(), "the program does not count on");

    let run = cmd().arg("--accept-downtime-miss").run();
    p.reap_shell();
    let stderr = String::from_utf8_lossy(&run.output.stderr).into_owned();
    let report = run.json();
    // Announced before the freeze (with --json, as an event).
    let miss = stderr.find("\"event\":\"downtime_miss\"");
    let freeze = stderr.find("\"phase\":\"freezing\"");
    assert!(miss.is_some() && miss < freeze, "{stderr}");
    let d = &report["downtime"];
    assert_eq!(d["limit_ms"].as_f64(), Some(300.0), "{report}");
    assert!(
        d["predicted"]["total_ms"].as_f64().unwrap() > 5000.0,
        "{report}"
    );
    assert_eq!(d["announced"].as_bool(), Some(true), "{report}");
    assert_eq!(
        d["measured_ms"].as_f64(),
        report["final"]["frozen_ms"].as_f64(),
        "{report}"
    );
    assert!(d["method"].as_str().unwrap().contains("timer"), "{report}");
    assert!(p.counts_on(), "the migrated program does not count on");
    // The costs measured here were learned.
    let costs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("costs.json")).unwrap()).unwrap();
    assert_eq!(costs["samples"].as_u64(), Some(2), "{costs}");
    drop(agent);
}

/// Where pre-copy's final phase is predicted to miss `--max-downtime`
/// and the hybrid route fits and can move the tree, ferry takes it and
/// says why.
#[test]
fn a_predicted_miss_takes_the_hybrid_route_when_it_fits() {
    require_criu();
    let _turn = pid_ns_turn();
    let dir = scratch("migrate-promise-switch");
    let _cleanup = KillCopies(dir.path());
    let state = slow_dump_costs(dir.path());
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut w = pid_ns_workload(dir.path(), 16, 0.5);
    let pid = w.pid();
    let before = w.report().unwrap().counter;
    let cmd = ferry(["migrate", "--json", "--timeout", "10s", "--pid"])
        .arg(pid.to_string())
        .arg("--to")
        .arg(&agent.addr)
        .arg("--key")
        .arg(&agent.key)
        .env("FERRY_STATE_DIR", state.to_str().unwrap())
        .env("FERRY_ACCEPT_DOWNTIME_MISS", "0");
    let report = migrate_reaping(&mut w, cmd).json();
    assert_eq!(report["route"].as_str(), Some("hybrid"), "{report}");
    let why = report["route_fallback"].as_str().unwrap_or_default();
    assert!(
        why.contains("predicted") && why.contains("hybrid"),
        "{report}"
    );
    assert_eq!(
        report["downtime"]["predicted"]["route"].as_str(),
        Some("hybrid"),
        "{report}"
    );
    let _restored = restored_continues(&report, &w, before);
}

/// A Docker container's files move with it: a busybox script's writable
/// layer (large and small files, links, owner and mode, a deleted file of
/// its image, and a log it appends to up to the freeze) goes ahead of the
/// freeze and only what changed since moves while frozen; the copy, a new
/// container with a fresh layer, has every file identical, the log
/// without a gap, and counts on.
#[test]
fn a_docker_containers_files_go_ahead_of_the_freeze() {
    use common::containers::{require_docker, unique, Docker};
    use common::files;
    require_criu();
    require_docker();
    let dir = scratch("migrate-docker-files");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let mut d = Docker::image(dir.path(), "migfiles");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let name = unique("migfiles");
    d.adopt(&name);
    let out = std::process::Command::new("docker")
        .args(["run", "-d", "--network", "none", "--name", &name, "-v"])
        .arg(format!("{}:/state", state.display()))
        .arg(&d.image)
        .args(["/bin/busybox", "sh", "-c", files::SCRIPT])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = files::counter_above(&state, 5);
    let expected = files::check(&[], &name);
    let copy = unique("migfiles-copy");
    d.adopt(&copy);
    let run = ferry(["migrate", "--json", "--timeout", "20s", "--ignore-volumes"])
        .arg("--docker")
        .arg(&name)
        .arg("--docker-name")
        .arg(&copy)
        .arg("--to")
        .arg(&agent.addr)
        .arg("--key")
        .arg(&agent.key)
        .json();
    assert_eq!(Docker::status(&copy), "running");
    let ahead = &run["files_ahead"];
    assert!(
        ahead["bytes"].as_u64().unwrap() > 8 << 20,
        "the layer did not go ahead: {ahead}"
    );
    let frozen = run["final"]["files_frozen_bytes"].as_u64().unwrap();
    assert!(
        frozen < 1 << 20,
        "{frozen} bytes of files moved while frozen: more than what changed"
    );
    files::counter_above(&state, before);
    files::same(&expected, &files::check(&[], &copy));
}

/// A shell loop that runs an external command every turn (children come
/// and go while pre-copy reads the tree, and some are gone between being
/// listed and being read) migrates and counts on: a child that exits
/// mid-round is passed over, never a failed migration.
#[test]
fn a_shell_loop_whose_children_come_and_go_migrates() {
    require_criu();
    let dir = scratch("migrate-forking-loop");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let file = dir.path().join("count");
    let script = format!(
        "n=0; while true; do n=$((n+1)); echo $n > {f}.tmp; mv {f}.tmp {f}; done",
        f = file.display()
    );
    let mut shell = std::process::Command::new("setsid")
        .args(["sh", "-c", "sh -c \"$1\" & wait $!", "sh", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The loop leads its own session and group (with any child left
    // stopped): all killed at the end, even on failure.
    let _group = KillGroup(shell.id() as i32);
    let count = || {
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count() < 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "the loop did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = common::program::first_child(shell.id());
    let run = migrate_shell_job(pid, &agent.addr, &agent.key);
    let _ = shell.wait();
    let report = run.json();
    let restored = report["restored_pid"].as_i64().unwrap() as i32;
    // The copy (restored into the agent's session) goes at the end too.
    let _copy = KillTree(restored);
    let after = count();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while count() < after + 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "the migrated loop does not count on from {after}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills a process tree when dropped.
struct KillTree(i32);

impl Drop for KillTree {
    fn drop(&mut self) {
        ferry_image::process::kill_all(&ferry_image::process::tree(self.0).unwrap_or_default());
    }
}

/// Kills a process group when dropped.
struct KillGroup(i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
