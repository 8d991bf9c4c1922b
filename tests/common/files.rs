//! A container that owns files: a busybox shell script (not ferry's
//! workload) writes a large file, many small ones, links, a file with its
//! own owner and mode, deletes a file of its image, writes to a volume at
//! /data, then counts in its shell into /state/counter. The checks read
//! the files back through `docker exec`, as a user would.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The script: every command through busybox (the image has no applet links).
pub const SCRIPT: &str = r#"
b=/bin/busybox
$b mkdir -p /var/app/small /data/sub
$b head -c 8388608 /dev/urandom > /var/app/big.bin
i=0; while [ $i -lt 300 ]; do echo "small $i $RANDOM" > /var/app/small/f$i; i=$((i+1)); done
echo secret > /var/app/mode600; $b chmod 600 /var/app/mode600; $b chown 1234:4321 /var/app/mode600
$b ln -s big.bin /var/app/link; $b ln /var/app/big.bin /var/app/hard
$b rm /bin/ferry-workload
$b head -c 1048576 /dev/urandom > /data/sub/vol.bin; echo volume > /data/v.txt
n=0; while true; do n=$((n+1)); echo $n >> /var/app/log; echo $n > /state/counter; $b sleep 0.05; done
"#;

/// What `check` compares: checksums, modes, owners, link counts, the
/// link's target, that the log (which the shell appends to from its own
/// memory) has no gap, and that the deleted file stays deleted.
pub const CHECK: &str = r#"
b=/bin/busybox
cd /var/app && $b md5sum big.bin hard mode600 small/* /data/sub/vol.bin /data/v.txt
$b stat -c '%n %a %u %g %h' big.bin hard mode600 small /data/sub
$b readlink link
$b awk 'BEGIN { e = 1; ok = 1 } $1 != e { print "the log skips from " e - 1 " to " $1; ok = 0; exit } { e++ } END { if (ok && e > 2) print "the log counts on without a gap" }' log
if [ -e /bin/ferry-workload ]; then echo "deleted file is back"; else echo "deleted file stays deleted"; fi
"#;

/// Runs [`CHECK`] in Docker container `name`; its output.
pub fn check(docker: &[&str], name: &str) -> String {
    exec(Command::new("docker").args(docker).args(["exec", name]))
}

/// Runs [`CHECK`] in podman container `name`; its output.
pub fn check_podman(name: &str) -> String {
    exec(Command::new("podman").args(["exec", name]))
}

/// Runs [`CHECK`] in runc container `id`; its output.
pub fn check_runc(id: &str) -> String {
    exec(Command::new("runc").args(["exec", id]))
}

fn exec(cmd: &mut Command) -> String {
    let out = cmd
        .args(["/bin/busybox", "sh", "-c", CHECK])
        .output()
        .expect("exec in the container");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The counter the script writes, waiting for a readable value.
pub fn counter(state: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(n) = std::fs::read_to_string(state.join("counter"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "no counter in {}",
            state.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the counter passes `above`; its value then.
pub fn counter_above(state: &Path, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = counter(state);
        if n > above {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the counter stays at {n}, not above {above}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts two [`check`] outputs equal, naming the lines that differ.
pub fn same(expected: &str, got: &str) {
    let want: Vec<&str> = expected.lines().collect();
    let have: Vec<&str> = got.lines().collect();
    let missing: Vec<&&str> = want.iter().filter(|l| !have.contains(l)).collect();
    let extra: Vec<&&str> = have.iter().filter(|l| !want.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the container's files differ: expected but missing {missing:?}; found instead {extra:?}"
    );
    assert!(
        want.len() > 300,
        "the check saw too little: {} lines",
        want.len()
    );
}
