//! The wire between hosts, as an attacker on the network sees it: what a
//! migration sends holds none of the process's memory in clear; and an
//! agent under abuse from peers without the key (and one with it) serves a
//! legitimate migration meanwhile, its memory bounded.

mod common;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::agent::AgentProc;
use common::program::InSession;
use common::*;
use ferry_lab::workload::{Launch, Workload};

/// A connection to `to` from the loopback address `from` (127.0.0.0/8 is
/// all local): the agent tells peers apart by address.
fn connect_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let [a, b, c, d] = from;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(a, b, c, d, 0),
    )?;
    let SocketAddr::V4(to) = to else {
        panic!("the agent listens on IPv4 loopback")
    };
    socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to))?;
    Ok(TcpStream::from(fd))
}

/// The agent's resident memory now and at its peak, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// True when the peer has closed the connection (read gives 0 or an error
/// within `within`).
fn closed_by_peer(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // A refusal frame before the close.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

fn migrate_reaping(w: &mut Workload, cmd: Cmd) -> Run {
    let h = std::thread::spawn(move || cmd.run());
    let deadline = Instant::now() + Duration::from_secs(180);
    while !h.is_finished() && Instant::now() < deadline {
        let _ = w.reap(Duration::from_millis(5));
    }
    h.join().expect("migrate thread")
}

/// Forwards every connection made to the returned address to `to`,
/// recording what the client side sends.
fn recording_relay(to: SocketAddr) -> (String, Arc<Mutex<Vec<u8>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let addr = relay(to, move |_, mut client, mut server| {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
            if server.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = server.shutdown(std::net::Shutdown::Write);
    });
    (addr, seen)
}

/// Forwards every connection made to the returned address to `to`: what
/// the server sends as it is, what the client sends through `forward`
/// (given the connection's number, from 0, the client and the server).
fn relay(
    to: SocketAddr,
    forward: impl Fn(usize, TcpStream, TcpStream) + Send + Sync + 'static,
) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let forward = Arc::new(forward);
    std::thread::spawn(move || {
        for (n, client) in l.incoming().enumerate() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(to) else {
                return;
            };
            let (mut back_from, mut back_to) =
                (server.try_clone().unwrap(), client.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut back_from, &mut back_to);
                let _ = back_to.shutdown(std::net::Shutdown::Both);
            });
            let forward = Arc::clone(&forward);
            std::thread::spawn(move || forward(n, client, server));
        }
    });
    addr
}

/// An ordinary program (Python, under a shell that leads its session)
/// holding a secret among random bytes (so no compressor can hide it).
const HOLDER: &str = "import os, sys, time
secret = sys.argv[1].encode()
buf = bytearray(os.urandom(8 << 20))
for at in range(0, len(buf) - 4096, 1 << 20):
    buf[at + 100:at + 100 + len(secret)] = secret
open(sys.argv[2], 'w').write('ready')
while True:
    time.sleep(0.05)
";

#[test]
fn a_migration_sends_no_page_in_clear() {
    require_criu();
    let dir = scratch("wire-clear");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let (relay, seen) = recording_relay(agent.addr.parse().unwrap());
    let marker = format!("FERRY-TENANT-SECRET-{}", std::process::id());
    let ready = dir.path().join("ready");
    let args = [
        OsStr::new("-c"),
        OsStr::new(HOLDER),
        OsStr::new(&marker),
        ready.as_os_str(),
    ];
    let mut program = InSession::python(&args, || ready.exists());
    let pid = program.pid;
    let run = migrate_shell_job(pid, &relay, &agent.key);
    program.reap_shell();
    let report = run.json();
    assert_eq!(
        report["restored_pid"].as_i64(),
        Some(i64::from(pid)),
        "{report}"
    );
    drop(program);
    let seen = seen.lock().unwrap();
    assert!(
        seen.len() > 8 << 20,
        "only {} bytes crossed the relay",
        seen.len()
    );
    assert!(
        !seen.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the program's secret crossed the wire in clear"
    );
}

#[test]
fn abuse_from_many_peers_leaves_a_migration_working_and_memory_bounded() {
    require_criu();
    let dir = scratch("abuse");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let to: SocketAddr = agent.addr.parse().unwrap();
    let agent_pid = agent.child.id();
    let (rss_start, _) = rss_kib(agent_pid);

    // A thousand idle connections from one address: a few wait in their
    // handshake, the rest are closed at once.
    let mut idle = Vec::new();
    for _ in 0..1000 {
        match connect_from([127, 0, 0, 2], to) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connection {} refused by the kernel: {e}", idle.len()),
        }
    }
    // Within a few seconds (the kernel's accept queue may hold some back
    // a while), the last hundred have been closed unserved.
    let mut open: Vec<&mut TcpStream> = idle.iter_mut().rev().take(100).collect();
    let deadline = Instant::now() + Duration::from_secs(8);
    while !open.is_empty() && Instant::now() < deadline {
        open.retain_mut(|s| !closed_by_peer(s, Duration::from_millis(10)));
    }
    assert!(
        open.len() <= 16,
        "{} of the last 100 idle connections are still open",
        open.len()
    );

    // A slow-loris handshake, one byte every 300 ms.
    let loris = std::thread::spawn(move || {
        let mut s = connect_from([127, 0, 0, 3], to).unwrap();
        let start = Instant::now();
        for b in b"FRY1\x04\x01" {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let closed = closed_by_peer(&mut s, Duration::from_secs(15));
        (closed, start.elapsed())
    });

    // A header claiming 4 GiB, before any authentication.
    let mut huge = connect_from([127, 0, 0, 4], to).unwrap();
    let mut header = Vec::new();
    header.extend_from_slice(b"FRY1");
    header.extend_from_slice(&[4, 1, 0, 0]);
    header.extend_from_slice(&0u64.to_le_bytes());
    header.extend_from_slice(&u32::MAX.to_le_bytes());
    huge.write_all(&header).unwrap();
    assert!(
        closed_by_peer(&mut huge, Duration::from_secs(5)),
        "a 4 GiB frame header kept the connection open"
    );

    // A decompression bomb from a peer holding the key: 64 MiB + 1 of
    // zeros in a few kilobytes.
    let secret = ferry_transport::Secret::from_file(&agent.key).unwrap();
    let mut bomber =
        ferry_transport::Conn::connect(&agent.addr, &secret, Duration::from_secs(5)).unwrap();
    bomber.send_pages(&vec![0u8; (64 << 20) + 1], true).unwrap();
    match bomber.recv() {
        // Closed: the agent logs why (checked below).
        Err(_) | Ok(None) => {}
        Ok(Some(ferry_transport::Incoming::Msg(ferry_transport::Msg::Error { message }))) => {
            assert!(message.contains("over the limit"), "{message}")
        }
        Ok(other) => panic!("the agent answered a decompression bomb with {other:?}"),
    }

    let (_, hwm_abuse) = rss_kib(agent_pid);
    // Meanwhile, a legitimate migration.
    let mut l = Launch::new(WORKLOAD, 32, dir.path().join("report"));
    l.dirty_mib_s = 1.0;
    let mut w = start_with(l);
    let pid = w.pid();
    let before = w.report().unwrap().counter;
    let run = migrate_reaping(
        &mut w,
        ferry([
            "migrate",
            "--shell-job",
            "--timeout",
            "10s",
            "--json",
            "--pid",
        ])
        .arg(pid.to_string())
        .arg("--to")
        .arg(&agent.addr)
        .arg("--key")
        .arg(&agent.key),
    );
    let report = run.json();
    assert_eq!(
        report["restored_pid"].as_i64(),
        Some(pid as i64),
        "{report}"
    );
    let restored = Workload::adopt(pid, w.report_path());
    restored.wait_counter_above(before, CONTINUE).unwrap();

    let (loris_closed, loris_took) = loris.join().unwrap();
    assert!(loris_closed, "the slow-loris connection was kept open");
    assert!(
        loris_took < Duration::from_secs(15),
        "the slow-loris connection lasted {loris_took:?}"
    );
    let (rss_end, hwm) = rss_kib(agent_pid);
    eprintln!(
        "agent memory: {rss_start} KiB at start, peak {hwm_abuse} KiB under abuse, \
         {rss_end} KiB at the end, peak {hwm} KiB with the migration"
    );
    assert!(
        hwm_abuse < 64 << 10,
        "the agent's peak RSS under abuse was {hwm_abuse} KiB"
    );
    // The 64 MiB bomb was never decompressed, nor a 4 GiB buffer made.
    assert!(hwm < 128 << 10, "the agent's peak RSS was {hwm} KiB");
    for logged in ["connection closed unserved", "over the limit"] {
        assert!(
            agent.wait_for(logged, Duration::from_secs(1)),
            "{logged}: {}",
            agent.log()
        );
    }
    drop(idle);
    drop(restored);
}

/// What a man in the middle does to the data connections of a migration,
/// inside the first batch of pages each sends.
#[derive(Clone, Copy, Debug)]
enum Tamper {
    /// One byte of a sealed segment flipped.
    Flip,
    /// The segment before sent again in its place.
    Replay,
    /// Two segments swapped.
    Reorder,
    /// The connection cut.
    Truncate,
}

/// Reads one handshake frame (20-byte header, its payload, 16-byte tag).
fn read_handshake_frame(r: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut frame = vec![0u8; 20];
    r.read_exact(&mut frame)?;
    let len = u32::from_le_bytes(frame[16..20].try_into().unwrap()) as usize;
    assert!(len <= 1024, "a handshake frame of {len} bytes");
    let mut rest = vec![0u8; len + 16];
    r.read_exact(&mut rest)?;
    frame.extend_from_slice(&rest);
    Ok(frame)
}

/// Reads one sealed segment (u16 length, then the ciphertext), whole.
fn read_segment(r: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len)?;
    let mut seg = len.to_vec();
    seg.resize(2 + usize::from(u16::from_le_bytes(len)), 0);
    r.read_exact(&mut seg[2..])?;
    Ok(seg)
}

/// Forwards connections to `to`; the first (the control connection) as
/// is, every later one (the data streams) with `tamper` applied to its
/// third sealed segment after the handshake.
fn tampering_relay(to: SocketAddr, tamper: Tamper) -> String {
    relay(to, move |n, mut client, mut server| {
        let _ = (|| -> std::io::Result<()> {
            if n > 0 {
                server.write_all(&read_handshake_frame(&mut client)?)?;
                // The stream's Join, and the first segment of its
                // first batch of pages, go through: the fault
                // falls inside that batch.
                let mut earlier = Vec::new();
                for _ in 0..2 {
                    earlier = read_segment(&mut client)?;
                    server.write_all(&earlier)?;
                }
                let mut next = read_segment(&mut client)?;
                match tamper {
                    Tamper::Flip => {
                        let mid = next.len() / 2;
                        next[mid] ^= 0x40;
                        server.write_all(&next)?;
                    }
                    Tamper::Replay => {
                        server.write_all(&earlier)?;
                        server.write_all(&next)?;
                    }
                    Tamper::Reorder => {
                        server.write_all(&read_segment(&mut client)?)?;
                        server.write_all(&next)?;
                    }
                    Tamper::Truncate => {
                        let _ = server.shutdown(std::net::Shutdown::Both);
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        return Ok(());
                    }
                }
            }
            std::io::copy(&mut client, &mut server)?;
            Ok(())
        })();
        let _ = server.shutdown(std::net::Shutdown::Write);
    })
}

/// A tampered, replayed, reordered or truncated stream, and the wrong
/// key: each migration is refused, the agent stores nothing, and the
/// program runs on at the source, untouched.
#[test]
fn a_tampered_stream_or_the_wrong_key_leaves_the_program_running_and_nothing_stored() {
    require_criu();
    let dir = scratch("wire-tamper");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let to: SocketAddr = agent.addr.parse().unwrap();
    let wrong_key = dir.path().join("wrong-key");
    ferry(["keygen"]).arg(&wrong_key).ok();
    let p = common::program::FileCounter::start(dir.path(), 8);
    let pid = p.pid;
    let store = agent.store.join("pages.dat");
    let attempts = [
        (Some(Tamper::Flip), &agent.key),
        (Some(Tamper::Replay), &agent.key),
        (Some(Tamper::Reorder), &agent.key),
        (Some(Tamper::Truncate), &agent.key),
        (None, &wrong_key),
    ];
    let mut failures = Vec::new();
    for (tamper, key) in attempts {
        let what = tamper.map_or("the wrong key".to_string(), |t| format!("{t:?}"));
        let addr = match tamper {
            Some(t) => tampering_relay(to, t),
            None => agent.addr.clone(),
        };
        let run = migrate_shell_job(pid, &addr, key);
        if run.code() == Some(0) {
            failures.push(format!("{what}: the migration succeeded"));
        }
        // Running or sleeping (D: a moment in the kernel), not stopped
        // (T, t) nor gone (Z, X).
        let state = p.state();
        if !matches!(state.as_deref(), Some("S" | "R" | "D")) {
            failures.push(format!("{what}: the program is {state:?} at the source"));
        }
        if !p.counts_on() {
            failures.push(format!("{what}: the program stopped counting"));
        }
        let stored = std::fs::metadata(&store).map_or(0, |m| m.len());
        if stored != 0 {
            failures.push(format!("{what}: the agent stored {stored} bytes of pages"));
        }
    }
    drop(p);
    assert!(
        failures.is_empty(),
        "{}\n--- agent log\n{}",
        failures.join("\n"),
        agent.log()
    );
    assert!(
        agent.log().contains("authentication tag mismatch"),
        "the agent did not refuse a segment:\n{}",
        agent.log()
    );
}
