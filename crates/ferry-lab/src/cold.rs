//! [`cold_migrate`]: the baseline every smarter migration is compared with,
//! "cold migration with plain CRIU", between two hosts of a [`Lab`].
//!
//! ```text
//!  host `from`                                 host `to`
//!                                              busybox nc -l -p PORT -e tar -x -C work/dst
//!                                              (listening before the dump)
//!  criu dump -t PID -D work/src
//!  busybox nc TO PORT -e tar -c -C work/src ─► (crosses both shaped links of the lab)
//!                                              criu restore -D work/dst -d --pidfile ...
//! ```
//!
//! Everything is the plain CRIU command line in stop mode: the process is
//! frozen, dumped and killed, its images copied in full, then restored; the
//! application's downtime is the sum of the three.
//!
//! The copy is GNU `tar` on a TCP connection that BusyBox's `nc` (Debian's
//! `busybox-static`, which `scripts/setup.sh` installs) opens inside each
//! host's namespace, so every byte travels the veth links and the lab's
//! shaping applies to it. `nc -e` hands the socket itself to `tar` as its
//! stdin or stdout: BusyBox nc's own relay moves 1 KiB per system call and
//! tops out at ~650 Mbit/s on the project's 2-core VM, below a 1 Gbit/s
//! link, while `tar` with 128 KiB records does not limit it.
//!
//! The receiver is started, and seen listening, before the dump: a copy
//! that cannot start must not cost the process its life.
//!
//! All "hosts" of a lab share one pid space, and CRIU restores the pid the
//! process had: the restore waits for that pid to be free. A process whose
//! parent is PID 1 stays a zombie for ~1.8 s on the project's VM; that wait
//! is an artefact of running both hosts on one machine and is reported
//! apart ([`ColdReport::pid_wait`]), measured after the copy (which it
//! overlaps).

use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{describe, Host, Lab, LabError};
use ferry_image::units::serde_micros;

/// Longest a dumped pid may stay in use before the restore gives up.
pub(crate) const PID_FREE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the copy receiver may take to listen.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one `criu dump` or `criu restore` may run.
pub(crate) const CRIU_TIMEOUT: Duration = Duration::from_secs(300);
/// Fixed part of the copy's time limit.
const COPY_TIMEOUT_BASE: Duration = Duration::from_secs(30);
/// The copy may take this many times its duration at the link's rate.
const COPY_TIMEOUT_FACTOR: u32 = 5;
/// Rate assumed for an unshaped lab when bounding the copy's time.
const UNSHAPED_FLOOR_MBIT: u64 = 100;
/// The receiver's port: base + dumped pid modulo span, so concurrent
/// migrations of different processes into one host use different ports.
const COPY_PORT_BASE: u16 = 20_000;
const COPY_PORT_SPAN: u32 = 20_000;
/// tar's record, in 512-byte blocks: 128 KiB per read and write.
const TAR_BLOCKING_FACTOR: &str = "256";
/// Lines of a CRIU log quoted in an error.
const LOG_TAIL_LINES: usize = 20;
/// Poll period while waiting for a child process.
const POLL: Duration = Duration::from_millis(2);

/// Timings and sizes of one cold migration.
#[derive(Debug, Clone, Serialize)]
pub struct ColdReport {
    /// The dumped pid; CRIU restores the same one.
    pub pid: i32,
    pub restored_pid: i32,
    /// Namespaces of the source and destination hosts.
    pub from: String,
    pub to: String,
    /// `criu dump` wall time (freeze, dump, kill).
    #[serde(serialize_with = "serde_micros")]
    pub dump: Duration,
    /// Image transfer across the lab link.
    #[serde(serialize_with = "serde_micros")]
    pub copy: Duration,
    /// Wait, after the copy, for the dumped pid to be free (see module docs).
    #[serde(serialize_with = "serde_micros")]
    pub pid_wait: Duration,
    /// `criu restore -d` wall time.
    #[serde(serialize_with = "serde_micros")]
    pub restore: Duration,
    /// The whole migration, `pid_wait` included.
    #[serde(serialize_with = "serde_micros")]
    pub total: Duration,
    /// Files in the images directory and their total size.
    pub image_files: usize,
    pub image_bytes: u64,
    /// Bytes the destination host's link received during the copy: the
    /// tar stream plus headers as the veth counts them (once per GSO packet
    /// of up to 64 KiB, so ~0.1% above the stream, not per 1500-byte frame).
    pub wire_bytes: u64,
    /// The images directories and the CRIU logs in them.
    pub src: PathBuf,
    pub dst: PathBuf,
}

impl ColdReport {
    /// The migration's cost without this machine's pid-reuse artefact.
    pub(crate) fn total_without_pid_wait(&self) -> Duration {
        self.total.saturating_sub(self.pid_wait)
    }
}

/// Moves process `pid` from host `from` to host `to` of `lab` with plain
/// CRIU, using `work/src` and `work/dst` (created; they should be empty).
/// The process must run in host `from`'s network namespace and be
/// dumpable with `--shell-job`; whoever is its parent must reap it after
/// the dump, or the restore waits in vain for its pid.
pub fn cold_migrate(
    lab: &Lab,
    from: usize,
    to: usize,
    pid: i32,
    work: &Path,
) -> Result<ColdReport, LabError> {
    let started = Instant::now();
    let from_host = lab_host(lab, from)?;
    let to_host = lab_host(lab, to)?;
    let criu = criu_program();
    for tool in [criu.as_str(), "nsenter", "busybox"] {
        if ferry_sys::which(tool).is_none() && !Path::new(tool).is_file() {
            return Err(LabError::ToolMissing {
                tool: tool.to_string(),
            });
        }
    }
    // An absolute path: `busybox nc -e tar` would run BusyBox's own tar.
    let tar = ferry_sys::which("tar").ok_or_else(|| LabError::ToolMissing {
        tool: "tar".to_string(),
    })?;
    let work = std::path::absolute(work).map_err(|source| LabError::Io {
        what: "resolve",
        path: work.to_path_buf(),
        source,
    })?;
    let src = work.join("src");
    let dst = work.join("dst");
    for dir in [&src, &dst] {
        fs::create_dir_all(dir).map_err(|source| LabError::Io {
            what: "create",
            path: dir.clone(),
            source,
        })?;
    }

    // The receiver listens before the process is dumped: if it cannot,
    // the process is left running.
    let copy_error = |source| LabError::Copy {
        pid,
        from: from_host.netns.clone(),
        to: to_host.netns.clone(),
        source: Box::new(source),
    };
    let receiver =
        Receiver::start(to_host, copy_port(pid), &tar, &dst, &work).map_err(copy_error)?;

    let t = Instant::now();
    let mut dump = from_host.command(&criu);
    dump.arg("dump")
        .arg("-t")
        .arg(pid.to_string())
        .arg("-D")
        .arg(&src)
        .args(["--shell-job", "-o", "dump.log"]);
    run_criu(dump, "dump", pid, from_host, &src.join("dump.log"), &work)?;
    let dump = t.elapsed();

    let (image_files, image_bytes) = dir_usage(&src)?;
    let link_before = lab.link_bytes(to)?;
    let t = Instant::now();
    receiver
        .receive(from_host, &src, copy_deadline(lab, image_bytes))
        .map_err(copy_error)?;
    let copy = t.elapsed();
    let wire_bytes = lab.link_bytes(to)?.rx.saturating_sub(link_before.rx);
    let (_, arrived) = dir_usage(&dst)?;
    if arrived < image_bytes {
        return Err(LabError::CopyIncomplete {
            from: from_host.netns.clone(),
            to: to_host.netns.clone(),
            dir: dst,
            expected: image_bytes,
            got: arrived,
        });
    }

    let t = Instant::now();
    if !ferry_image::process::wait_pid_free(pid, PID_FREE_TIMEOUT) {
        return Err(LabError::PidBusy {
            pid,
            waited: PID_FREE_TIMEOUT,
        });
    }
    let pid_wait = t.elapsed();

    let pidfile = work.join("restored.pid");
    let t = Instant::now();
    let mut restore = to_host.command(&criu);
    restore
        .arg("restore")
        .arg("-D")
        .arg(&dst)
        .args(["-d", "--shell-job", "-o", "restore.log", "--pidfile"])
        .arg(&pidfile);
    run_criu(
        restore,
        "restore",
        pid,
        to_host,
        &dst.join("restore.log"),
        &work,
    )?;
    let restore = t.elapsed();
    let content = fs::read_to_string(&pidfile).map_err(|source| LabError::Io {
        what: "read the restored pid from",
        path: pidfile.clone(),
        source,
    })?;
    let restored_pid = content
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or(LabError::RestoredPid {
            path: pidfile,
            content,
        })?;

    Ok(ColdReport {
        pid,
        restored_pid,
        from: from_host.netns.clone(),
        to: to_host.netns.clone(),
        dump,
        copy,
        pid_wait,
        restore,
        total: started.elapsed(),
        image_files,
        image_bytes,
        wire_bytes,
        src,
        dst,
    })
}

fn lab_host(lab: &Lab, index: usize) -> Result<&Host, LabError> {
    lab.hosts().get(index).ok_or_else(|| LabError::NoHost {
        lab: lab.name().to_string(),
        index,
        hosts: lab.hosts().len(),
    })
}

/// The CRIU command line tool: `$FERRY_CRIU`, else `criu` on `$PATH`.
fn criu_program() -> String {
    std::env::var(ferry_criu::CRIU_ENV).unwrap_or_else(|_| "criu".to_string())
}

/// Runs one CRIU step; on failure the error quotes the log's tail (or the
/// tool's stderr when it wrote no log).
fn run_criu(
    mut cmd: Command,
    step: &'static str,
    pid: i32,
    host: &Host,
    log: &Path,
    work: &Path,
) -> Result<(), LabError> {
    let stderr_path = work.join(format!("criu-{step}.stderr"));
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    let mut children = Children::default();
    let index = children.spawn(cmd, stderr_path.clone())?;
    let status = children.wait(index, Instant::now() + CRIU_TIMEOUT)?;
    if status.success() {
        return Ok(());
    }
    let log_tail = match fs::read(log) {
        Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), LOG_TAIL_LINES),
        Err(_) => tail(&read_lossy(&stderr_path), LOG_TAIL_LINES),
    };
    Err(LabError::Criu {
        step,
        pid,
        netns: host.netns.clone(),
        status,
        log: log.to_path_buf(),
        log_tail,
    })
}

/// The receiver's TCP port for the images of `pid`.
fn copy_port(pid: i32) -> u16 {
    COPY_PORT_BASE + (pid.unsigned_abs() % COPY_PORT_SPAN) as u16
}

/// When a copy of `bytes` over `lab`'s links must be over.
fn copy_deadline(lab: &Lab, bytes: u64) -> Instant {
    let rate = lab.rate_mbit().unwrap_or(UNSHAPED_FLOOR_MBIT).max(1);
    let at_rate = Duration::from_secs_f64(bytes as f64 * 8.0 / (rate as f64 * 1e6));
    Instant::now() + COPY_TIMEOUT_BASE + at_rate * COPY_TIMEOUT_FACTOR
}

/// The receiving end of the image copy: `busybox nc -l -e TAR -x` inside
/// the destination host. Dropping it kills it.
struct Receiver {
    children: Children,
    untar: usize,
    to: Ipv4Addr,
    port: u16,
    tar: PathBuf,
    work: PathBuf,
}

impl Receiver {
    /// Starts the receiver in `to` and waits until it listens on `port`.
    fn start(
        to: &Host,
        port: u16,
        tar: &Path,
        dst: &Path,
        work: &Path,
    ) -> Result<Receiver, LabError> {
        let mut children = Children::default();
        let mut nc = to.command("busybox");
        nc.args(["nc", "-l", "-p", &port.to_string(), "-e"])
            .arg(tar)
            .args(["-x", "-B", "-b", TAR_BLOCKING_FACTOR, "-f", "-", "-C"])
            .arg(dst)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let untar = children.spawn(nc, work.join("copy-receiver.stderr"))?;
        children.wait_listening(untar, port, &to.netns)?;
        Ok(Receiver {
            children,
            untar,
            to: to.addr,
            port,
            tar: tar.to_path_buf(),
            work: work.to_path_buf(),
        })
    }

    /// Sends `src` from host `from` (`busybox nc -e TAR -c`) and waits until
    /// the receiver has unpacked everything.
    fn receive(mut self, from: &Host, src: &Path, deadline: Instant) -> Result<(), LabError> {
        let mut nc = from.command("busybox");
        nc.args(["nc", &self.to.to_string(), &self.port.to_string(), "-e"])
            .arg(&self.tar)
            .args(["-c", "-b", TAR_BLOCKING_FACTOR, "-f", "-", "-C"])
            .arg(src)
            .arg(".")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mktar = self
            .children
            .spawn(nc, self.work.join("copy-sender.stderr"))?;
        self.children.wait_ok(mktar, deadline)?;
        self.children.wait_ok(self.untar, deadline)
    }
}

/// Child processes of one step, each with the file its stderr goes to,
/// killed if still running when dropped, so a failure at any point leaves
/// nothing behind.
#[derive(Default)]
struct Children {
    procs: Vec<(String, Child, PathBuf)>,
}

impl Children {
    fn spawn(&mut self, mut cmd: Command, stderr: PathBuf) -> Result<usize, LabError> {
        cmd.stderr(create_file(&stderr)?);
        let command = describe(&cmd);
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
        self.procs.push((command, child, stderr));
        Ok(self.procs.len() - 1)
    }

    /// Waits for child `idx` until `deadline`, killing it then.
    fn wait(&mut self, idx: usize, deadline: Instant) -> Result<ExitStatus, LabError> {
        let started = Instant::now();
        let (command, child, _) = &mut self.procs[idx];
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) => {}
                Err(source) => {
                    return Err(LabError::Spawn {
                        command: command.clone(),
                        source,
                    })
                }
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LabError::Timeout {
                    command: command.clone(),
                    timeout: started.elapsed(),
                });
            }
            thread::sleep(POLL);
        }
    }

    /// Like [`Children::wait`], and a failure exit is an error quoting the
    /// child's stderr.
    fn wait_ok(&mut self, idx: usize, deadline: Instant) -> Result<(), LabError> {
        let status = self.wait(idx, deadline)?;
        if status.success() {
            return Ok(());
        }
        Err(self.failed(idx, status))
    }

    fn failed(&self, idx: usize, status: ExitStatus) -> LabError {
        let (command, _, stderr) = &self.procs[idx];
        LabError::Command {
            command: command.clone(),
            status,
            stderr: tail(&read_lossy(stderr), LOG_TAIL_LINES),
        }
    }

    /// Waits until child `idx` (a receiving nc) listens on TCP `port`, as
    /// its own `/proc/PID/net/tcp{,6}` shows (they list the sockets of the
    /// process's network namespace).
    fn wait_listening(&mut self, idx: usize, port: u16, netns: &str) -> Result<(), LabError> {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        let pid = self.procs[idx].1.id();
        // BusyBox nc listens on the IPv6 wildcard (dual stack): tcp6.
        let tables = ["tcp", "tcp6"].map(|t| PathBuf::from(format!("/proc/{pid}/net/{t}")));
        loop {
            if tables
                .iter()
                .filter_map(|t| fs::read_to_string(t).ok())
                .any(|text| listens(&text, port))
            {
                return Ok(());
            }
            if let Ok(Some(status)) = self.procs[idx].1.try_wait() {
                return Err(self.failed(idx, status));
            }
            if Instant::now() >= deadline {
                return Err(LabError::ReceiverNotListening {
                    netns: netns.to_string(),
                    port,
                    waited: LISTEN_TIMEOUT,
                });
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.procs {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Does a `/proc/net/tcp` or `tcp6` table hold a socket listening on `port`?
fn listens(table: &str, port: u16) -> bool {
    let want = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1);
        let state = fields.nth(1);
        local.is_some_and(|l| l.ends_with(&want)) && state == Some("0A")
    })
}

/// Number and total size of the regular files under `dir`.
fn dir_usage(dir: &Path) -> Result<(usize, u64), LabError> {
    let io_err = |source| LabError::Io {
        what: "list",
        path: dir.to_path_buf(),
        source,
    };
    let mut files = 0;
    let mut bytes = 0;
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let meta = entry.metadata().map_err(io_err)?;
        if meta.is_file() {
            files += 1;
            bytes += meta.len();
        } else if meta.is_dir() {
            let (f, b) = dir_usage(&entry.path())?;
            files += f;
            bytes += b;
        }
    }
    Ok((files, bytes))
}

fn create_file(path: &Path) -> Result<File, LabError> {
    File::create(path).map_err(|source| LabError::Io {
        what: "create",
        path: path.to_path_buf(),
        source,
    })
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_listener_in_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:4E34 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 0302C80A:9C40 0302C80A:4E35 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n";
        assert!(listens(table, 0x4E34));
        // 0x4E35 appears only as a remote port of an established socket.
        assert!(!listens(table, 0x4E35));
        assert!(!listens(table, 0x9C40));
        assert!(!listens("", 1));
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue\n   0: 00000000000000000000000000000000:1389 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 284347 1\n";
        assert!(listens(tcp6, 5001));
        assert!(!listens(tcp6, 5002));
    }

    #[test]
    fn tails_keep_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }
}
