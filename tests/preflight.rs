//! Pre-flight: what would make a dump fail or unsafe is said before
//! anything is frozen, and the application keeps running.

mod common;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;

use common::*;
use ferry_lab::workload::Launch;

#[test]
fn an_established_tcp_connection_is_refused_without_tcp_established() {
    require_criu();
    let dir = scratch("pre-tcp");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut launch = Launch::new(WORKLOAD, 4, dir.path().join("report"));
    launch.hold_tcp = Some(listener.local_addr().unwrap());
    let w = start_with(launch);
    let (_peer, _) = listener.accept().unwrap();
    let imgs = images(dir.path());
    let err = ferry(["dump", "-t", &w.pid().to_string(), "-D"])
        .arg(&imgs)
        .fails_with(4);
    assert!(
        err.contains("established TCP connection 127.0.0.1:"),
        "{err}"
    );
    assert!(err.contains("--tcp-established"), "{err}");
    assert!(err.contains("nothing was frozen"), "{err}");
    assert!(!imgs.exists() || std::fs::read_dir(&imgs).unwrap().next().is_none());
    assert_counting(&w);
    // Allowed, it dumps (and the connection is checkpointed by CRIU).
    ferry([
        "dump",
        "--leave-running",
        "--tcp-established",
        "-t",
        &w.pid().to_string(),
        "-D",
    ])
    .arg(&imgs)
    .ok();
    assert_counting(&w);
}

#[test]
fn an_external_unix_socket_is_refused_without_ext_unix_sk() {
    require_criu();
    let dir = scratch("pre-unix");
    let path = dir.path().join("peer.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut launch = Launch::new(WORKLOAD, 4, dir.path().join("report"));
    launch.hold_unix = Some(path);
    let w = start_with(launch);
    let (_peer, _) = listener.accept().unwrap();
    let err = ferry(["dump", "-t", &w.pid().to_string(), "-D"])
        .arg(images(dir.path()))
        .fails_with(4);
    assert!(
        err.contains("connected to socket") && err.contains("outside the dumped tree"),
        "{err}"
    );
    assert!(err.contains("--ext-unix-sk"), "{err}");
    assert_counting(&w);
}
