//! The fencing guard: a small process, apart from the agent, that kills the
//! copies this host leads once the agent can no longer vouch for its lease.
//!
//! Copies outlive their agent (containers always; process trees live in a
//! pid namespace and session of their own), so fencing inside the agent
//! fails exactly when it is needed: an agent that crashes, is OOM-killed,
//! hangs or is stopped renews nothing and fences nothing, and a standby
//! takes over while the old copy runs. The guard is armed with the lease's
//! deadline (on `CLOCK_BOOTTIME`, which goes on during suspend) and holds a
//! pidfd of each led copy's init (a pid namespace's init: SIGKILL to it ends
//! every process of the copy, and a pidfd never reaches a reused pid). It
//! kills them all
//! - when the deadline passes without the agent moving it on (agent hung,
//!   stopped, or its renewals failing), or
//! - when the agent's end of the socket closes (agent dead, however).
//!
//! It makes no call that can block on anything but the kernel: no engine,
//! no etcd, no disk. It runs detached from the agent (its own session,
//! reparented away from the agent's process tree) with an OOM score that
//! spares it, and tells the agent what it killed.
//!
//! Protocol (one seqpacket datagram each, agent to guard): `D <ns>` the
//! deadline in nanoseconds of `CLOCK_BOOTTIME`; `G <service> [cgroup]` with
//! a pidfd attached: guard this copy (a container's cgroup is killed whole
//! too, through `cgroup.kill`); `R <service>`: release it. Guard to agent:
//! `K <service>` after killing a copy.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use ferry_sys::clock::BootInstant;
use ferry_sys::pidfd::PidFd;
use ferry_sys::SeqPacket;

/// How often the guard looks at the clock while nothing arrives.
const TICK: Duration = Duration::from_millis(10);
/// Longest service name accepted in a message.
const MAX_NAME: usize = 64;
/// Most copies one guard holds.
const MAX_COPIES: usize = 1024;

/// The agent's link to its guard.
pub struct GuardLink {
    sock: SeqPacket,
    /// The guard's pid (for logs and tests).
    pub pid: i32,
    /// Serialises sends so that a deadline and a watch never interleave
    /// oddly with a re-arm after the guard was respawned.
    send: Mutex<()>,
}

impl GuardLink {
    /// Starts a guard: `exe guard` with its end of a socket pair as stdin;
    /// it detaches itself (the process started here exits at once, the
    /// guard lives on in a session of its own).
    pub fn spawn(exe: &std::path::Path) -> io::Result<GuardLink> {
        let (ours, theirs) = SeqPacket::pair()?;
        let theirs: OwnedFd = theirs.into_owned_fd();
        let mut child = Command::new(exe)
            .arg("guard")
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let status = child.wait()?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "the fencing guard did not start ({status})"
            )));
        }
        // The detached guard says who it is first.
        let hello = ours
            .recv()?
            .ok_or_else(|| io::Error::other("the fencing guard exited at once"))?;
        let pid = std::str::from_utf8(&hello.data)
            .ok()
            .and_then(|s| s.strip_prefix("P "))
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| io::Error::other("the fencing guard sent no pid"))?;
        Ok(GuardLink {
            sock: ours,
            pid,
            send: Mutex::new(()),
        })
    }

    fn send(&self, text: &str, fd: Option<&PidFd>) -> io::Result<()> {
        let _one = self.send.lock().unwrap_or_else(|p| p.into_inner());
        match fd {
            Some(fd) => self.sock.send(text.as_bytes(), &[fd.as_fd()]),
            None => self.sock.send(text.as_bytes(), &[]),
        }
    }

    /// Moves the deadline: the guard kills every copy it holds at `at`
    /// unless moved on again first.
    pub fn deadline(&self, at: BootInstant) -> io::Result<()> {
        self.send(&format!("D {}", at.as_nanos()), None)
    }

    /// Guards `service`'s copy, whose init is `pid` (and, for a
    /// container, whose cgroup the kernel can kill whole).
    pub fn watch(
        &self,
        service: &str,
        pid: i32,
        cgroup: Option<&std::path::Path>,
    ) -> io::Result<()> {
        let fd = PidFd::open(pid)?;
        let text = match cgroup {
            Some(c) => format!("G {service} {}", c.display()),
            None => format!("G {service}"),
        };
        self.send(&text, Some(&fd))
    }

    /// Stops guarding `service`'s copy.
    pub fn release(&self, service: &str) -> io::Result<()> {
        self.send(&format!("R {service}"), None)
    }

    /// Ends the link (the agent is stopping, its copies already deleted):
    /// the guard kills what it still holds and exits, and
    /// [`GuardLink::next_kill`] returns None.
    pub fn close(&self) {
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.sock.as_fd()),
            nix::sys::socket::Shutdown::Both,
        );
    }

    /// The next service whose copy the guard killed; None once the guard
    /// is gone.
    pub fn next_kill(&self) -> Option<String> {
        loop {
            let p = self.sock.recv().ok()??;
            if let Some(s) = std::str::from_utf8(&p.data)
                .ok()
                .and_then(|s| s.strip_prefix("K "))
            {
                return Some(s.to_string());
            }
        }
    }
}

/// The guard process's main: detaches, then serves `stdin` (the agent's
/// socket) until the agent is gone. Must be called before any thread is
/// started.
pub fn run_detached() -> io::Result<()> {
    let _ = nix::unistd::setsid();
    // The process the agent started exits now; the guard goes on in the
    // child, no longer in the agent's process tree.
    if ferry_sys::spawn::fork_single_threaded()?.is_some() {
        std::process::exit(0);
    }
    // Spared by the OOM killer: the guard is what stops the copies when
    // the agent is killed for memory.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    let stdin = io::stdin().as_fd().try_clone_to_owned()?;
    let sock = SeqPacket::from_owned_fd(stdin);
    // Stdin itself is not used again; a dup keeps the socket.
    sock.send(format!("P {}", std::process::id()).as_bytes(), &[])?;
    serve(&sock);
    Ok(())
}

/// What the guard holds.
#[derive(Default)]
struct Held {
    deadline: Option<BootInstant>,
    copies: HashMap<String, (PidFd, Option<PathBuf>)>,
}

impl Held {
    fn kill_all(&mut self, sock: &SeqPacket, why: &str) {
        for (service, (fd, cgroup)) in self.copies.drain() {
            // Every process of a container, whatever its pid namespace.
            let whole = cgroup
                .map(|c| std::fs::write(c.join("cgroup.kill"), "1").is_ok())
                .unwrap_or(false);
            match fd.kill().map(|alive| alive || whole) {
                Ok(true) => eprintln!("ferry guard: killed the copy of service {service} ({why})"),
                Ok(false) => continue,
                Err(e) => {
                    eprintln!("ferry guard: cannot kill the copy of service {service} ({why}): {e}")
                }
            }
            let _ = sock.send(format!("K {service}").as_bytes(), &[]);
        }
    }

    fn handle(&mut self, data: &[u8], fds: Vec<OwnedFd>) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let (op, arg) = text.split_once(' ').unwrap_or((text, ""));
        match op {
            "D" => {
                if let Ok(ns) = arg.parse::<u64>() {
                    self.deadline = Some(BootInstant::from_nanos(ns));
                }
            }
            "G" if self.copies.len() < MAX_COPIES => {
                let (service, cgroup) = match arg.split_once(' ') {
                    Some((s, c)) => (s, Some(PathBuf::from(c))),
                    None => (arg, None),
                };
                // Only a cgroup under the cgroup filesystem.
                let cgroup = cgroup.filter(|c| c.starts_with("/sys/fs/cgroup/"));
                if let (true, Some(fd)) = (valid(service), fds.into_iter().next()) {
                    self.copies
                        .insert(service.to_string(), (PidFd::from_owned(fd), cgroup));
                }
            }
            "R" => {
                self.copies.remove(arg);
            }
            _ => {}
        }
    }
}

fn valid(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && !name.contains(char::is_whitespace)
}

/// Serves the agent's socket until it closes (then every copy is killed).
fn serve(sock: &SeqPacket) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut held = Held::default();
    loop {
        let now = BootInstant::now();
        if let Some(d) = held.deadline {
            if now >= d && !held.copies.is_empty() {
                held.kill_all(sock, "the lease's deadline passed without renewal");
            }
        }
        // Never longer than a tick: the deadline is on CLOCK_BOOTTIME and
        // poll's timeout is not (it stops during suspend).
        let wait = held
            .deadline
            .map_or(TICK, |d| (d - now).min(TICK))
            .max(Duration::from_millis(1));
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(wait.as_millis() as u64).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => {
                held.kill_all(sock, "the guard cannot wait on the agent");
                return;
            }
        }
        match sock.recv() {
            Ok(Some(p)) => held.handle(&p.data, p.fds),
            Ok(None) | Err(_) => {
                eprintln!(
                    "ferry guard: the agent is gone; killing the {} copies held",
                    held.copies.len()
                );
                held.kill_all(sock, "the agent is gone");
                return;
            }
        }
    }
}
