//! Page identity a tenant cannot collide: two different pages that
//! xxh3-128 (ferry's page digest before format 2) cannot tell apart,
//! crafted the way a tenant could (its upload buffer lands page-aligned),
//! are archived, restored and migrated as the two pages they are.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::agent::AgentProc;
use common::program::InSession;
use common::*;

/// Two different pages with one xxh3-128. XXH3 mixes each 8-byte lane as
/// `acc[lane ^ 1] += v; acc[lane] += lo32(v ^ s) * hi32(v ^ s)`, `s` from
/// its public default secret: with the low half of `v` equal to the
/// secret's, the product is zero, and only the sum of the high halves of
/// that lane over two stripes of a block reaches the accumulator. Moving
/// one from one stripe's high half to the other's keeps the hash.
fn colliding_pages() -> (Vec<u8>, Vec<u8>) {
    // XXH3's default secret (xxhash.h, XXH3_kSecret), its first 16 bytes.
    const SECRET: [u8; 16] = [
        0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad,
        0x1c,
    ];
    let page = |high0: u32, high1: u32| {
        let mut p: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        // Lane 0 of stripe 0 (bytes 0..8, secret 0..8) and of stripe 1
        // (bytes 64..72, secret 8..16).
        p[0..4].copy_from_slice(&SECRET[0..4]);
        p[4..8].copy_from_slice(&high0.to_le_bytes());
        p[64..68].copy_from_slice(&SECRET[8..12]);
        p[68..72].copy_from_slice(&high1.to_le_bytes());
        p
    };
    let (a, b) = (page(0x1111, 0x2222), page(0x2222, 0x1111));
    assert_ne!(a, b);
    assert_eq!(
        xxhash_rust::xxh3::xxh3_128(&a),
        xxhash_rust::xxh3::xxh3_128(&b),
        "the crafted pages should collide under xxh3-128"
    );
    (a, b)
}

/// An ordinary program (Python, in a session its shell leads) that maps
/// the pages of a file into anonymous memory, page-aligned, as a server
/// would hold an upload, and says where.
const HOLDER: &str = "import ctypes, mmap, sys, time
data = open(sys.argv[1], 'rb').read()
m = mmap.mmap(-1, len(data))
m.write(data)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
open(sys.argv[2] + '.tmp', 'w').write(str(addr))
import os
os.rename(sys.argv[2] + '.tmp', sys.argv[2])
while True:
    time.sleep(0.05)
";

struct Holder {
    program: InSession,
    pid: i32,
    addr: u64,
    len: usize,
}

impl Holder {
    fn start(dir: &Path, pages: &[u8]) -> Holder {
        let data = dir.join("upload");
        std::fs::write(&data, pages).unwrap();
        let ready = dir.join("addr");
        let args = [
            OsStr::new("-c"),
            OsStr::new(HOLDER),
            data.as_os_str(),
            ready.as_os_str(),
        ];
        let program = InSession::python(&args, || ready.exists());
        Holder {
            pid: program.pid,
            program,
            addr: std::fs::read_to_string(&ready).unwrap().parse().unwrap(),
            len: pages.len(),
        }
    }

    /// The held pages as the (restored) process has them now.
    fn memory(&self) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mem = std::fs::File::open(format!("/proc/{}/mem", self.pid)).unwrap();
        let mut out = vec![0u8; self.len];
        mem.read_exact_at(&mut out, self.addr).unwrap();
        out
    }
}

#[test]
fn colliding_pages_are_archived_and_restored_as_themselves() {
    require_criu();
    let dir = scratch("page-identity-archive");
    let (a, b) = colliding_pages();
    let held = [a.as_slice(), b.as_slice(), a.as_slice()].concat();
    let mut p = Holder::start(dir.path(), &held);
    let archive = dir.path().join("upload.ferry");
    ferry(["dump", "--shell-job", "-t", &p.pid.to_string(), "--archive"])
        .arg(&archive)
        .ok();
    p.program.reap_shell();
    let run = ferry(["restore", "--shell-job", "--json", "--archive"])
        .arg(&archive)
        .json();
    assert_eq!(run["pid"].as_i64(), Some(i64::from(p.pid)), "{run}");
    let now = p.memory();
    assert!(
        now == held,
        "the restored pages differ: page 1 {} page 2 {}",
        if now[..4096] == a[..] {
            "is A"
        } else {
            "is not A"
        },
        if now[4096..8192] == b[..] {
            "is B"
        } else {
            "is not B (collided)"
        },
    );
}

#[test]
fn colliding_pages_are_migrated_as_themselves() {
    require_criu();
    let dir = scratch("page-identity-migrate");
    let agent = AgentProc::start(dir.path(), "127.0.0.1:0", None, None);
    let (a, b) = colliding_pages();
    let held = [a.as_slice(), b.as_slice()].concat();
    let mut p = Holder::start(dir.path(), &held);
    let run = migrate_shell_job(p.pid, &agent.addr, &agent.key);
    p.program.reap_shell();
    let report = run.json();
    assert_eq!(
        report["restored_pid"].as_i64(),
        Some(i64::from(p.pid)),
        "{report}"
    );
    assert!(
        p.memory() == held,
        "the migrated process's second page is not the page it held"
    );
}
