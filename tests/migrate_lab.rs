//! Migration between two "hosts" (network namespaces joined by a link
//! shaped to 1 Gbit/s, see `ferry_lab`), watched by a heartbeat prober in
//! the root namespace, and the faults a network brings: a cut link.

mod common;

use std::time::{Duration, Instant};

use common::agent::AgentProc;
use common::*;
use ferry_lab::workload::{Launch, Workload};
use ferry_lab::{Lab, Prober};

const RATE_MBIT: u64 = 1000;

fn net_ns_inode(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.ino()).unwrap_or(0)
}

/// `ferry migrate` of `pid` from host 0 to `agent`, giving up on a silent
/// link after `timeout`.
fn migrate_from_host0(lab: &Lab, agent: &AgentProc, pid: i32, timeout: &str) -> Cmd {
    ferry(["migrate", "--shell-job", "--timeout", timeout, "--pid"])
        .arg(pid.to_string())
        .arg("--to")
        .arg(&agent.addr)
        .arg("--key")
        .arg(&agent.key)
        .netns(&lab.host(0).netns)
}

/// A two-host lab named `name` and a prober of host 0's heartbeats.
fn lab_with_prober(name: &str) -> (Lab, Prober) {
    let lab = Lab::create(name, 2, Some(RATE_MBIT)).expect("lab");
    let prober = Prober::start((lab.gateway(), 0).into()).expect("prober");
    (lab, prober)
}

/// An agent on host 1, with `fault` armed and `env` for it.
fn host1_agent(
    dir: &std::path::Path,
    lab: &Lab,
    fault: Option<&str>,
    env: &[(String, String)],
) -> AgentProc {
    AgentProc::start_args_env(
        dir,
        &dir.join("store"),
        &format!("{}:0", lab.host(1).addr),
        Some(&lab.host(1).netns),
        fault,
        None,
        &[],
        env,
    )
}

fn heartbeating_workload(lab: &Lab, prober: &Prober, dir: &std::path::Path, mib: u64) -> Workload {
    let mut l = Launch::new(WORKLOAD, mib, dir.join("report"));
    l.netns = Some(lab.host(0).netns.clone());
    l.heartbeat = Some(prober.local_addr());
    l.dirty_mib_s = 1.0;
    let w = start_with(l);
    assert!(
        prober.wait_received(200, Duration::from_secs(30)),
        "no heartbeats from host 0"
    );
    w
}

#[test]
fn a_process_migrates_between_namespace_hosts_and_its_client_sees_it_continue() {
    require_criu();
    let dir = scratch("lab-migrate");
    let (lab, prober) = lab_with_prober("mig");
    let agent = host1_agent(dir.path(), &lab, None, &[]);
    let mut w = heartbeating_workload(&lab, &prober, dir.path(), 64);
    let pid = w.pid();
    let kept = dir.path().join("source-images");
    let cmd = ferry([
        "migrate",
        "--json",
        "--shell-job",
        "--timeout",
        "20s",
        "--pid",
    ])
    .arg(pid.to_string())
    .arg("--to")
    .arg(&agent.addr)
    .arg("--key")
    .arg(&agent.key)
    .arg("--keep-images")
    .arg(&kept)
    .netns(&lab.host(0).netns);
    let h = std::thread::spawn(move || cmd.run());
    let deadline = Instant::now() + Duration::from_secs(120);
    while !h.is_finished() && Instant::now() < deadline {
        let _ = w.reap(Duration::from_millis(5));
    }
    let report = h.join().unwrap().json();
    assert_eq!(
        report["restored_pid"].as_i64(),
        Some(pid as i64),
        "{report}"
    );
    // The copy runs in host 1's network namespace and its heartbeats go on.
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let host1 = net_ns_inode(&format!("/run/netns/{}", lab.host(1).netns));
    assert_eq!(ns.to_string_lossy(), format!("net:[{host1}]"));
    let heard = prober.received();
    if !prober.wait_received(heard + 200, Duration::from_secs(30)) {
        // Everything that could say why (this failed once in CI).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let report_file = std::fs::read_to_string(w.report_path()).unwrap_or_default();
        panic!(
            "no heartbeats after the migration: {} heard in all\n/proc/{pid}/stat: {stat}\nworkload report: {report_file}\nmigrate report: {report}\nagent log:\n{}",
            prober.received(),
            agent.log()
        );
    }
    let restored = Workload::adopt(pid, w.report_path());
    let probe = prober.stop();
    let gap = probe.longest_gap.expect("a gap");
    eprintln!(
        "client-observed downtime {:?}; ferry frozen {} ms",
        gap.length, report["final"]["frozen_ms"]
    );
    assert!(gap.after.counter > gap.before.counter, "{gap:?}");
    assert!(restored.verify_memory(CONTINUE).unwrap().mem_ok);
    let dest = agent.kept_images();
    assert_eq!(dest.len(), 1);
    let sums = |d: &std::path::Path| {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                !n.ends_with(".log") && n != "stats-restore"
            })
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let (a, b) = (sums(&kept), sums(&dest[0]));
    if a != b {
        let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let differing: Vec<String> = a
            .iter()
            .filter_map(|(n, x)| {
                let (_, y) = b.iter().find(|(m, _)| m == n)?;
                let at = x.iter().zip(y.iter()).position(|(p, q)| p != q);
                (x != y).then(|| {
                    format!(
                        "{n}: {} vs {} bytes, first difference at {at:?}",
                        x.len(),
                        y.len()
                    )
                })
            })
            .collect();
        panic!(
            "rebuilt images differ from the source's: source {:?}, destination {:?}, differing {differing:?}",
            names(&a),
            names(&b)
        );
    }
}

#[test]
fn a_link_cut_during_the_final_copy_resumes_the_application_on_the_source() {
    require_criu();
    let dir = scratch("lab-cut");
    let (lab, prober) = lab_with_prober("cut");
    let agent = host1_agent(dir.path(), &lab, Some("agent-before-rebuild"), &[]);
    let mut w = heartbeating_workload(&lab, &prober, dir.path(), 32);
    let pid = w.pid();
    let cmd = migrate_from_host0(&lab, &agent, pid, "3s");
    let h = std::thread::spawn(move || cmd.run());
    agent.wait_fault("agent-before-rebuild");
    // The application is frozen (dumped, left stopped); the link goes.
    lab.cut(1).expect("cut");
    let run = h.join().unwrap();
    let err = run.fails_with(5);
    assert!(err.contains("resumed here"), "{err}");
    lab.heal(1).expect("heal");
    assert!(!w.reap(Duration::from_millis(10)).unwrap());
    assert_counting(&w);
    // The agent, once past its fault point, finds the source gone and
    // restores nothing: one copy, on the source.
    assert!(
        agent.wait_for("session ended without a restore", Duration::from_secs(30)),
        "{}",
        agent.log()
    );
    assert_eq!(
        workload_copies(dir.path(), false).len(),
        1,
        "expected one copy"
    );
    let heard = prober.received();
    assert!(
        prober.wait_received(heard + 100, Duration::from_secs(10)),
        "the source's heartbeats stopped"
    );
}

/// The link goes after the restore, while the agent holds its copy stopped
/// and has the source's `Commit` in hand but has not acted on it: the
/// source hears nothing, keeps its side stopped and asks for the outcome
/// until the link is back; asking aborts the uncommitted session (its copy
/// removed first), so the source brings the application back here. One
/// copy counts throughout, and the one that runs afterwards is the source's.
#[test]
fn a_link_cut_after_the_restore_is_settled_once_it_heals() {
    require_criu();
    let dir = scratch("lab-cut-commit");
    let (lab, prober) = lab_with_prober("pcut");
    let hold = [(ferry_core::fault::HOLD_ENV.to_string(), "6000".to_string())];
    let agent = host1_agent(dir.path(), &lab, Some("agent-before-commit"), &hold);
    let mut w = heartbeating_workload(&lab, &prober, dir.path(), 32);
    let pid = w.pid();
    let cmd = migrate_from_host0(&lab, &agent, pid, "2s");
    let h = std::thread::spawn(move || cmd.run());
    let deadline = Instant::now() + Duration::from_secs(60);
    // One kernel here: the source is killed before the restore, and its
    // zombie (this test is its parent) must be reaped for its pid.
    while !agent
        .log()
        .contains("fault point agent-before-commit reached")
        && !h.is_finished()
        && Instant::now() < deadline
    {
        let _ = w.reap(Duration::from_millis(20));
    }
    if h.is_finished() {
        let run = h.join().unwrap();
        panic!(
            "the migration ended before the agent's commit: {}\n{}",
            run.stderr(),
            agent.log()
        );
    }
    agent.wait_fault("agent-before-commit");
    lab.cut(1).expect("cut");
    // Longer than the source's wait for an answer: it is asking now.
    std::thread::sleep(Duration::from_millis(2500));
    lab.heal(1).expect("heal");
    let run = h.join().unwrap();
    let err = run.fails_with(5);
    assert!(
        err.contains("asking it for the outcome"),
        "the source did not ask: {err}"
    );
    assert!(
        err.contains("restored here") || err.contains("resumed here"),
        "{err}"
    );
    assert!(
        agent.wait_for("asked for a migration's outcome", Duration::from_secs(5)),
        "{}",
        agent.log()
    );
    let heard = prober.received();
    assert!(
        prober.wait_received(heard + 100, Duration::from_secs(10)),
        "the heartbeats did not come back"
    );
    assert_eq!(
        workload_copies(dir.path(), false).len(),
        1,
        "expected one copy\n{}",
        agent.log()
    );
    drop(w);
}
