//! End-to-end tests of the downtime laboratory (`ferry_lab`) against the
//! real `ip`, `tc`, `nsenter`, BusyBox and CRIU, as root. A missing tool
//! fails the test with the reason; nothing is skipped. Every lab has a
//! unique name and is removed when its `Lab` drops, even on a panic; every
//! wait is bounded.

#![forbid(unsafe_code)]

use std::fs;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ferry_lab::workload::Workload;
use ferry_lab::{cold_migrate, sweep_stale, Host, Lab, Prober};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_ferry-workload");
/// Bound for a workload to fill its memory and start sending.
const READY: Duration = Duration::from_secs(60);
/// Bound for one `busybox ping` (its own -W is 2 s).
const PING_TRIES: u32 = 5;

/// Fails, naming the remedy, unless running as root with `tools` on PATH.
fn require(tools: &[&str]) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the lab tests create network namespaces and must run as root"
    );
    for tool in tools {
        assert!(
            ferry_sys::which(tool).is_some(),
            "`{tool}` is not installed: the lab tests need it (run scripts/setup.sh as root)"
        );
    }
}

const NET_TOOLS: &[&str] = &["ip", "tc", "nsenter", "busybox"];

fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("ferry-lab-{name}-"))
        .tempdir()
        .expect("create scratch dir")
}

/// One ping from `from` (a host, or the root namespace) to `to`.
fn ping_once(from: Option<&Host>, to: Ipv4Addr) -> bool {
    let mut cmd = match from {
        Some(h) => h.command("busybox"),
        None => Command::new("busybox"),
    };
    cmd.args(["ping", "-c", "1", "-W", "2", &to.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run busybox ping")
        .success()
}

/// Pings until one answer, at most [`PING_TRIES`] times.
fn reachable(from: Option<&Host>, to: Ipv4Addr) -> bool {
    (0..PING_TRIES).any(|_| ping_once(from, to))
}

fn command_out(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn lab_is_reachable_and_leaves_nothing_behind() {
    require(NET_TOOLS);
    let lab = Lab::create("reach", 3, None).expect("create lab");
    let namespaces = lab.namespaces();
    let uplink = lab.uplink().to_string();
    let gateway = lab.gateway();
    assert_eq!(namespaces.len(), 4);
    let listed = command_out("ip", &["netns", "list"]);
    for ns in &namespaces {
        assert!(listed.contains(ns.as_str()), "{ns} missing from:\n{listed}");
    }
    let (h0, h1, h2) = (lab.host(0), lab.host(1), lab.host(2));
    assert_ne!(h0.addr, h1.addr);
    assert!(reachable(Some(h0), h1.addr), "host 0 cannot reach host 1");
    assert!(
        reachable(Some(h2), gateway),
        "host 2 cannot reach the gateway"
    );
    assert!(
        reachable(None, h1.addr),
        "the root namespace cannot reach host 1"
    );

    // A process left inside a host is killed with the lab.
    let mut left = h1
        .command("sleep")
        .arg("60")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep in host 1");

    drop(lab);
    let status = wait_bounded(
        &mut left,
        "sleep left in host 1",
        Instant::now() + Duration::from_secs(10),
    );
    assert!(!status.success(), "sleep was not killed: {status}");
    let listed = command_out("ip", &["netns", "list"]);
    for ns in &namespaces {
        assert!(!listed.contains(ns.as_str()), "{ns} left behind:\n{listed}");
    }
    let links = command_out("ip", &["-o", "link", "show"]);
    assert!(
        !links.contains(&format!(" {uplink}@")),
        "{uplink} left:\n{links}"
    );
    let addrs = command_out("ip", &["-4", "-o", "addr", "show"]);
    assert!(
        !addrs.contains(&format!(" {gateway}/")),
        "{gateway} left:\n{addrs}"
    );
}

#[test]
fn failed_creation_removes_what_it_made() {
    require(NET_TOOLS);
    // tc refuses a zero rate: creation fails after the switch, the uplink
    // and host 0's namespace exist.
    let err = Lab::create("half", 2, Some(0)).expect_err("a zero rate must fail");
    let text = err.to_string();
    assert!(text.contains("tc"), "the error does not name tc: {text}");
    let mine = format!("ferry-half-{}-", std::process::id());
    let listed = command_out("ip", &["netns", "list"]);
    assert!(!listed.contains(&mine), "left behind:\n{listed}");
    // The uplink's peer lived in the switch namespace: a veth pair dies
    // with either end, so no namespace left means no uplink left.
}

#[test]
fn cut_partitions_a_host_and_heal_restores_it() {
    require(NET_TOOLS);
    let lab = Lab::create("cut", 2, None).expect("create lab");
    let (h0, h1) = (lab.host(0), lab.host(1));
    assert!(reachable(Some(h0), h1.addr), "host 0 cannot reach host 1");
    lab.cut(1).expect("cut host 1");
    assert!(!ping_once(Some(h0), h1.addr), "host 1 answers while cut");
    assert!(
        !ping_once(Some(h1), lab.gateway()),
        "host 1 reaches the gateway while cut"
    );
    assert!(reachable(Some(h0), lab.gateway()), "cutting 1 cut host 0");
    lab.heal(1).expect("heal host 1");
    assert!(
        reachable(Some(h0), h1.addr),
        "host 1 unreachable after heal"
    );
    assert!(reachable(Some(h1), lab.gateway()), "no route after heal");
    assert!(lab.cut(2).is_err(), "cutting a host that does not exist");
}

#[test]
fn parallel_labs_get_distinct_names_and_subnets() {
    require(NET_TOOLS);
    let labs: Vec<Lab> = (0..4)
        .map(|_| thread::spawn(|| Lab::create("par", 1, None)))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("creator thread").expect("create lab"))
        .collect();
    for (i, a) in labs.iter().enumerate() {
        for b in &labs[i + 1..] {
            assert_ne!(a.name(), b.name());
            assert_ne!(a.uplink(), b.uplink());
            let net = |l: &Lab| l.gateway().octets()[..3].to_vec();
            assert_ne!(
                net(a),
                net(b),
                "{} and {} share a subnet",
                a.name(),
                b.name()
            );
        }
        assert!(reachable(Some(a.host(0)), a.gateway()), "{}", a.name());
    }
}

#[test]
fn sweep_removes_what_dead_processes_left() {
    require(NET_TOOLS);
    // A pid that just exited: nobody holds it (the kernel hands pids out
    // in increasing order, so it is not reused within this test).
    let mut gone = Command::new("true").spawn().expect("spawn true");
    let dead = gone.id();
    gone.wait().expect("reap true");
    let stale = format!("ferry-sweep-{dead}-0-sw");
    let ours = format!("ferry-sweep-{}-999999-sw", std::process::id());
    command_out("ip", &["netns", "add", &stale]);
    command_out("ip", &["netns", "add", &ours]);
    let removed = sweep_stale();
    let listed = command_out("ip", &["netns", "list"]);
    let quiet = |name: &str| {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
    };
    quiet(&ours);
    quiet(&stale);
    let removed = removed.expect("sweep");
    assert!(removed.contains(&stale), "{stale} not swept: {removed:?}");
    assert!(!removed.contains(&ours), "swept a live process's {ours}");
    assert!(!listed.contains(&stale), "{stale} still listed:\n{listed}");
}

/// Waits until `child` (a receiving `busybox nc`) listens on `port`.
fn wait_listening(child: &Child, port: u16) {
    let want = format!(":{port:04X} ");
    let deadline = Instant::now() + Duration::from_secs(5);
    // BusyBox nc listens on the IPv6 wildcard: look in tcp and tcp6.
    let tables = ["tcp", "tcp6"].map(|t| format!("/proc/{}/net/{t}", child.id()));
    while Instant::now() < deadline {
        let listening = tables.iter().any(|t| {
            fs::read_to_string(t)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains(&want) && l.split_whitespace().nth(3) == Some("0A"))
        });
        if listening {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
    panic!("busybox nc never listened on port {port}");
}

/// Waits for `child` at most until `deadline`; kills it and fails then.
fn wait_bounded(child: &mut Child, what: &str, deadline: Instant) -> std::process::ExitStatus {
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish in time");
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Sends `mib` MiB from host 0 to host 1 over TCP and returns the goodput
/// in Mbit/s. BusyBox nc opens the connection and hands the socket to
/// `dd` (`-e`): nc's own relay moves 1 KiB per system call, too slow to
/// fill 1 Gbit/s on a small VM, while dd moves 1 MiB.
fn transfer_mbit_s(lab: &Lab, mib: u64) -> f64 {
    const PORT: u16 = 5001;
    let dd = ferry_sys::which("dd").expect("dd (coreutils) is not installed");
    let (h0, h1) = (lab.host(0), lab.host(1));
    let mut rx = h1
        .command("busybox")
        .args(["nc", "-l", "-p", &PORT.to_string(), "-e"])
        .arg(&dd)
        .args(["of=/dev/null", "bs=1M"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn receiver");
    wait_listening(&rx, PORT);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    let mut tx = h0
        .command("busybox")
        .args(["nc", &h1.addr.to_string(), &PORT.to_string(), "-e"])
        .arg(&dd)
        .args(["if=/dev/zero", "bs=1M", &format!("count={mib}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sender");
    assert!(wait_bounded(&mut tx, "sender", deadline).success());
    assert!(wait_bounded(&mut rx, "receiver", deadline).success());
    let elapsed = started.elapsed();
    let mut stderr = String::new();
    rx.stderr
        .take()
        .expect("receiver stderr")
        .read_to_string(&mut stderr)
        .expect("read dd's report");
    // GNU dd: "N bytes (...) copied, T s, R MB/s".
    let got: u64 = stderr
        .lines()
        .find_map(|l| l.split(" bytes").next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no byte count in dd's report: {stderr}"));
    assert_eq!(got, mib << 20, "bytes lost in transfer: {stderr}");
    got as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
}

#[test]
fn shaped_link_carries_about_the_configured_rate() {
    require(NET_TOOLS);
    const RATE_MBIT: u64 = 200;
    let lab = Lab::create("rate", 2, Some(RATE_MBIT)).expect("create lab");
    assert!(reachable(Some(lab.host(0)), lab.host(1).addr));
    // About two seconds at the configured rate.
    let mib = RATE_MBIT * 2 / 8;
    let mbit_s = transfer_mbit_s(&lab, mib);
    eprintln!("shaped to {RATE_MBIT} Mbit/s: {mib} MiB at {mbit_s:.1} Mbit/s goodput");
    // Unshaped, veth carries ~20 Gbit/s here: a missing shaper is far above
    // this bound. No lower bound: a busy machine may be slower than the
    // link, and speed is the benchmark's business, not a test's.
    let rate = RATE_MBIT as f64;
    assert!(
        mbit_s > 0.0 && mbit_s <= 1.1 * rate,
        "measured {mbit_s:.1} Mbit/s on a link shaped to {RATE_MBIT}"
    );
}

/// A workload started inside `host`, heartbeating to `to`. Its process is
/// reaped by a thread (so a stop-mode dump frees its pid at once) and
/// killed when the returned guard drops.
fn start_workload(host: &Host, size_mib: u64, to: SocketAddr, dir: &Path) -> Workload {
    let report = dir.join("report");
    let mut child = host
        .command(WORKLOAD)
        .args(["--size-mib", &size_mib.to_string()])
        .arg("--report")
        .arg(&report)
        .args(["--heartbeat", &to.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ferry-workload in the lab host");
    let pid = child.id() as i32;
    thread::spawn(move || child.wait());
    let mut workload = Workload::adopt(pid, report);
    workload.wait_ready(READY).expect("workload ready");
    workload
}

/// The inode of a network namespace file, to compare namespaces.
fn netns_inode(path: &str) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {path}: {e}"))
        .ino()
}

#[test]
fn prober_hears_a_workload_inside_a_host() {
    require(NET_TOOLS);
    let lab = Lab::create("hear", 1, None).expect("create lab");
    let prober = Prober::start(SocketAddr::new(IpAddr::V4(lab.gateway()), 0)).expect("prober");
    let dir = scratch("hear");
    let workload = start_workload(lab.host(0), 4, prober.local_addr(), dir.path());
    assert_eq!(
        netns_inode(&format!("/proc/{}/ns/net", workload.pid())),
        netns_inode(&lab.host(0).netns_path().to_string_lossy()),
        "the workload does not run in host 0's namespace"
    );
    assert!(
        prober.wait_received(200, Duration::from_secs(10)),
        "only {} heartbeats in 10 s",
        prober.received()
    );
    let report = prober.stop();
    assert_eq!(report.pids(), vec![workload.pid() as u32], "{report:?}");
    assert!(report.first.is_some() && report.last > report.first);
}

#[test]
fn cold_migration_moves_a_workload_between_hosts() {
    require(&["ip", "tc", "nsenter", "busybox", "tar", "criu"]);
    const SIZE_MIB: u64 = 16;
    const RATE_MBIT: u64 = 1000;
    let lab = Lab::create("cold", 2, Some(RATE_MBIT)).expect("create lab");
    let prober = Prober::start(SocketAddr::new(IpAddr::V4(lab.gateway()), 0)).expect("prober");
    let dir = scratch("cold");
    let workload = start_workload(lab.host(0), SIZE_MIB, prober.local_addr(), dir.path());
    let pid = workload.pid();
    assert!(
        prober.wait_received(200, Duration::from_secs(10)),
        "no heartbeats before the migration"
    );

    let work = dir.path().join("cold");
    let report = cold_migrate(&lab, 0, 1, pid, &work).unwrap_or_else(|e| {
        panic!(
            "cold migration failed: {}",
            ferry_image::units::chain(&e as &dyn std::error::Error)
        )
    });
    // The restored process: same pid, now in host 1's namespace.
    let restored = Workload::adopt(report.restored_pid, dir.path().join("report"));
    assert_eq!(report.restored_pid, pid);
    assert_eq!(
        netns_inode(&format!("/proc/{}/ns/net", report.restored_pid)),
        netns_inode(&lab.host(1).netns_path().to_string_lossy()),
        "the restored workload is not in host 1's namespace"
    );
    let heard = prober.received();
    assert!(
        prober.wait_received(heard + 200, Duration::from_secs(30)),
        "the restored workload is not heard"
    );
    let after = restored
        .verify_memory(Duration::from_secs(30))
        .expect("verify restored memory");
    assert!(after.mem_ok, "restored memory is corrupt: {after:?}");
    let probe = prober.stop();
    let gap = probe.longest_gap.expect("a longest gap");
    eprintln!(
        "cold migration of {SIZE_MIB} MiB at {RATE_MBIT} Mbit/s: {}",
        serde_json::to_string(&report).expect("report json")
    );
    eprintln!(
        "prober: {}",
        serde_json::to_string(&probe).expect("probe json")
    );
    assert_eq!(probe.distinct_pids, 1);
    assert_eq!(gap.before.pid, pid as u32);
    assert_eq!(gap.after.pid, pid as u32);
    // Resumed where it stopped, not restarted: the counter goes on.
    assert!(
        gap.after.counter > gap.before.counter && gap.after.counter <= gap.before.counter + 10,
        "{gap:?}"
    );
    // The process was gone at least while its images crossed the link.
    assert!(gap.length >= report.copy, "{gap:?} vs {report:?}");
    assert!(report.image_bytes >= SIZE_MIB << 20, "{report:?}");
    assert!(report.wire_bytes >= report.image_bytes, "{report:?}");
    drop(restored);
    drop(workload);
}

#[test]
fn failed_cold_migration_names_the_step_and_cleans_up() {
    require(&["ip", "tc", "nsenter", "busybox", "tar", "criu"]);
    let lab = Lab::create("coldfail", 2, None).expect("create lab");
    let dir = scratch("coldfail");
    // A pid that just exited: CRIU cannot dump it.
    let mut gone = Command::new("true").spawn().expect("spawn true");
    let dead = gone.id() as i32;
    gone.wait().expect("reap true");
    match cold_migrate(&lab, 0, 1, dead, &dir.path().join("cold")) {
        Err(ferry_lab::LabError::Criu {
            step,
            pid,
            log_tail,
            ..
        }) => {
            assert_eq!(step, "dump");
            assert_eq!(pid, dead);
            assert!(!log_tail.is_empty(), "no CRIU log quoted");
        }
        other => panic!("expected a failed criu dump, got {other:?}"),
    }
    // The receiver started before the dump is gone.
    let pids = command_out("ip", &["netns", "pids", &lab.host(1).netns]);
    assert!(pids.trim().is_empty(), "left in host 1: {pids}");
    assert!(
        cold_migrate(&lab, 0, 5, dead, &dir.path().join("again")).is_err(),
        "host 5 does not exist"
    );
}
