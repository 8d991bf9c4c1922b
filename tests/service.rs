//! ferry through a running `criu service` socket instead of `criu swrk`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ferry_lab::workload::Workload;

/// A `criu service` process for one test, killed when dropped.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `/proc/net/unix` lists a listening socket bound to `path`
/// (flag `__SO_ACCEPTCON`, 0x10000).
fn listening(path: &std::path::Path) -> bool {
    let table = std::fs::read_to_string("/proc/net/unix").expect("read /proc/net/unix");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && std::path::Path::new(fields[7]) == path
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

fn start_service(socket: &std::path::Path, workdir: &std::path::Path) -> Service {
    let child = Command::new("criu")
        .arg("service")
        .arg("--address")
        .arg(socket)
        .arg("-W")
        .arg(workdir)
        .arg("-o")
        .arg("service.log")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start criu service");
    let svc = Service(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    // CRIU binds the socket before it listens on it: wait until the kernel lists
    // it as listening, not merely until the file exists (an early connect is
    // refused). No probe connection: each one would fork a service worker.
    while !listening(socket) {
        assert!(
            Instant::now() < deadline,
            "criu service never listened on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    svc
}

#[test]
fn dump_and_restore_through_a_criu_service_socket() {
    require_criu();
    let dir = scratch("service");
    let socket = dir.path().join("criu.sock");
    let _svc = start_service(&socket, dir.path());
    let r = ferry(["check", "--json", "--criu-service"])
        .arg(&socket)
        .json();
    assert_eq!(r["criu"]["usable"], true, "{r:#}");
    assert!(
        r["criu"]["endpoint"]
            .as_str()
            .unwrap()
            .contains("service at"),
        "{r:#}"
    );

    let mut w = start_workload(dir.path(), 8);
    let imgs = images(dir.path());
    ferry(["dump", "--criu-service"])
        .arg(&socket)
        .arg("-t")
        .arg(w.pid().to_string())
        .arg("-D")
        .arg(&imgs)
        .ok();
    assert!(w.reap(Duration::from_secs(10)).unwrap());
    let at_dump = w.report().unwrap().counter;
    let restored = ferry(["restore", "--json", "--criu-service"])
        .arg(&socket)
        .arg("-D")
        .arg(&imgs)
        .json();
    let w = Workload::adopt(restored["pid"].as_i64().unwrap() as i32, w.report_path());
    let after = w.wait_counter_above(at_dump + 50, CONTINUE).unwrap();
    assert!(after.counter > at_dump);
    assert_counting(&w);
}

#[test]
fn a_missing_service_socket_is_a_clear_error() {
    let dir = scratch("nosvc");
    let socket = dir.path().join("absent.sock");
    let err = ferry(["restore", "--criu-service"])
        .arg(&socket)
        .arg("-D")
        .arg(dir.path())
        .fails_with(1);
    // The images are checked first; an empty dir is refused before CRIU.
    assert!(err.contains("is empty"), "{err}");
    let out = ferry(["check", "--criu-service"]).arg(&socket).run();
    assert_eq!(out.code(), Some(3));
    assert!(
        out.stdout()
            .contains("cannot connect to the CRIU service socket"),
        "{}",
        out.stdout()
    );
}
