//! Product code for `ferry bench` and `ferry demo`: the bundled workload
//! ([`workload`]), the benchmarks ([`bench`]) and the downtime laboratory:
//! several "hosts" on one machine, a meter of the downtime an application
//! sees, and the cold-migration baseline.
//!
//! ```text
//!  root namespace            ferry-U-sw (the "switch")   ferry-U-hI (host I, I = 0..n)
//!
//!  flPIDgN  10.A.B.1/24 <--veth--> uplink --+
//!  (the gateway: prober, tests)             br0
//!                                  pI ------+ <--veth--> eth0  10.A.B.(I+2)/24
//!                                     tbf at both ends   default via 10.A.B.1, lo up
//! ```
//!
//! - [`netns`]: [`Lab`], the hosts. Each host is a network namespace with one
//!   veth to a bridge. The bridge lives in a namespace of its own (the
//!   "switch"), not in the root namespace: with `br_netfilter` loaded (Docker
//!   loads it) bridged frames go through the root namespace's iptables
//!   FORWARD chain, whose policy Docker sets to DROP, so a root-namespace
//!   bridge would silently drop host-to-host traffic unless the lab edited
//!   the machine's firewall. A fresh namespace has an empty firewall. The
//!   root namespace joins the switch through one more veth carrying the
//!   gateway address, so a process in the root namespace (the prober, the
//!   test) reaches every host and every host reaches it.
//!   With a rate, each host's link is shaped with `tbf` in both directions;
//!   host-to-host traffic crosses two shaped links, host-to-gateway one.
//! - [`prober`]: [`Prober`], the application-observed downtime meter: it
//!   records the arrival of each heartbeat datagram the bundled workload
//!   sends and reports the longest silence.
//! - [`cold`]: [`cold_migrate`], the baseline: plain `criu dump`, copy of the
//!   images across the shaped link with `tar` and `busybox nc`, plain
//!   `criu restore` in the other host.
//!
//! Everything here drives the real `ip`, `tc`, `nsenter`, `tar`, `busybox`
//! and `criu` and needs root. Commands run inside a host through
//! `nsenter --net=/run/netns/NAME`, not `ip netns exec`: the latter also
//! gives the command a private mount namespace, and CRIU then refuses to
//! dump a process started that way ("has unreachable sharing").

#![forbid(unsafe_code)]

pub mod bench;
pub mod cold;
pub mod netns;
pub mod prober;
pub mod workload;

pub use cold::{cold_migrate, ColdReport};
pub use netns::{sweep_stale, Host, Lab, LinkBytes};
pub use prober::{Gap, Heartbeat, ProbeReport, Prober};

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

/// Errors of the laboratory: every variant names the command, namespace,
/// address or path involved.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("cannot start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    Timeout { command: String, timeout: Duration },
    #[error("no free /24 in 10.200.0.0-10.250.255.0 for lab {lab} after {tries} tries")]
    NoSubnet { lab: String, tries: u32 },
    #[error("no unused name for a lab tagged {tag} after {tries} tries")]
    NoName { tag: String, tries: u32 },
    #[error("lab {lab} has {hosts} hosts: there is no host {index}")]
    NoHost {
        lab: String,
        index: usize,
        hosts: usize,
    },
    #[error("a lab holds 1 to {max} hosts, not {hosts}")]
    HostCount { hosts: usize, max: usize },
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind the prober's UDP socket to {addr}")]
    ProbeBind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the prober's receive thread on {addr}")]
    ProbeThread {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("criu {step} of pid {pid} in netns {netns} failed ({status}); tail of {}:\n{log_tail}", log.display())]
    Criu {
        step: &'static str,
        pid: i32,
        netns: String,
        status: ExitStatus,
        log: PathBuf,
        log_tail: String,
    },
    #[error("the copy receiver in netns {netns} never listened on port {port} within {waited:?}")]
    ReceiverNotListening {
        netns: String,
        port: u16,
        waited: Duration,
    },
    #[error("image copy from {from} to {to} is incomplete: {got} of {expected} bytes arrived in {}", dir.display())]
    CopyIncomplete {
        from: String,
        to: String,
        dir: PathBuf,
        expected: u64,
        got: u64,
    },
    #[error("`{tool}` is not installed (scripts/setup.sh installs it)")]
    ToolMissing { tool: String },
    #[error("copying the images of pid {pid} from {from} to {to} failed")]
    Copy {
        pid: i32,
        from: String,
        to: String,
        #[source]
        source: Box<LabError>,
    },
    #[error("pid {pid} is still in use {waited:?} after the dump: cannot restore it")]
    PidBusy { pid: i32, waited: Duration },
    #[error("criu restore left no valid pid in {}: {content:?}", path.display())]
    RestoredPid { path: PathBuf, content: String },
}

/// A command line as text, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        text.push(' ');
        text.push_str(&a.to_string_lossy());
    }
    text
}

/// Runs `cmd` to completion; a non-zero exit is an error carrying stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Output, LabError> {
    let output = cmd.output().map_err(|source| LabError::Spawn {
        command: describe(cmd),
        source,
    })?;
    if !output.status.success() {
        return Err(LabError::Command {
            command: describe(cmd),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output)
}

/// A `Command` for `program` with `args`, stdin closed.
pub(crate) fn command<I, S>(program: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(std::process::Stdio::null());
    cmd
}
