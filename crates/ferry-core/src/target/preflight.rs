//! Checks made before anything is frozen: what would make a dump fail or
//! restore into something broken. Each finding names the process, the
//! resource and the flag or remedy.
//!
//! - Established TCP connections, unless `--tcp-established`: CRIU refuses
//!   them, or (with the flag) the peer must survive the move.
//! - Unix sockets connected to a peer outside the tree, unless
//!   `--ext-unix-sk` (peers found through sock_diag, as CRIU does).
//!
//! GPU state is the GPU module's business (`crate::gpu`): carried, refused
//! or ignored there.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ferry_image::process::{self, ProcessError};
use ferry_sys::sockdiag;

/// What the dump is allowed to carry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allow {
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
}

/// One thing that makes the dump unsafe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    TcpEstablished {
        pid: i32,
        local: String,
        remote: String,
    },
    ExternalUnixSocket {
        pid: i32,
        inode: u32,
        peer: u32,
    },
    /// A file the tree writes (not append-only) that a process outside it
    /// writes too: its size can change before a restore, which CRIU then
    /// refuses.
    SharedWrittenFile {
        pid: i32,
        fd: u32,
        path: String,
        other: i32,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::TcpEstablished { pid, local, remote } => write!(
                f,
                "pid {pid} has an established TCP connection {local} -> {remote} (dump it with --tcp-established, or close it)"
            ),
            Finding::ExternalUnixSocket { pid, inode, peer } => write!(
                f,
                "pid {pid} has unix socket {inode} connected to socket {peer} outside the dumped tree (allow with --ext-unix-sk)"
            ),
            Finding::SharedWrittenFile { pid, fd, path, other } => write!(
                f,
                "pid {pid} writes {path} (fd {fd}, not opened for appending) and pid {other} outside the tree writes it too: on one kernel the source is gone before the restore, and CRIU refuses a restore once the file's size changed. Give the program a file of its own, open it for appending (>>), or migrate to another host"
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("not safe to dump: {}", list(.findings))]
    Unsafe { findings: Vec<Finding> },
    #[error("cannot inspect the tree of pid {pid}")]
    Process {
        pid: i32,
        #[source]
        source: ProcessError,
    },
    #[error("cannot list the unix sockets of {}", netns.display())]
    SockDiag {
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn list(findings: &[Finding]) -> String {
    findings
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The sockets one process holds.
struct Holdings {
    pid: i32,
    sockets: Vec<u32>,
}

fn holdings(pid: i32) -> Holdings {
    let mut sockets = Vec::new();
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                if let Ok(ino) = ino.parse() {
                    sockets.push(ino);
                }
            }
        }
    }
    Holdings { pid, sockets }
}

/// Checks the tree rooted at `pid`; `Ok` when nothing stands in the way.
pub fn check(pid: i32, allow: Allow) -> Result<(), PreflightError> {
    let findings = inspect(pid, allow)?;
    if findings.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Unsafe { findings })
    }
}

/// Everything found in the tree rooted at `pid` that `allow` does not allow.
pub fn inspect(pid: i32, allow: Allow) -> Result<Vec<Finding>, PreflightError> {
    let pids = process::tree(pid).map_err(|source| PreflightError::Process { pid, source })?;
    let held: Vec<Holdings> = pids.iter().map(|p| holdings(*p)).collect();
    let mut findings = Vec::new();
    let owner: HashMap<u32, i32> = held
        .iter()
        .flat_map(|h| h.sockets.iter().map(move |s| (*s, h.pid)))
        .collect();
    if owner.is_empty() {
        return Ok(findings);
    }
    // One view per network namespace of the tree.
    let mut netns_seen = HashSet::new();
    for p in &pids {
        let ns = PathBuf::from(format!("/proc/{p}/ns/net"));
        let Ok(id) = fs::read_link(&ns) else {
            continue;
        };
        if !netns_seen.insert(id) {
            continue;
        }
        if !allow.tcp_established {
            findings.extend(established_tcp(*p, &owner));
        }
        if !allow.ext_unix_sk {
            let peers = sockdiag::unix_peers(&ns).map_err(|source| PreflightError::SockDiag {
                netns: ns.clone(),
                source,
            })?;
            for (inode, peer) in peers {
                if let Some(&pid) = owner.get(&inode) {
                    if !owner.contains_key(&peer) {
                        findings.push(Finding::ExternalUnixSocket { pid, inode, peer });
                    }
                }
            }
        }
    }
    findings.sort_by_key(|f| format!("{f}"));
    findings.dedup();
    Ok(findings)
}

/// Established TCP sockets of the tree, from `/proc/PID/net/tcp{,6}` (the
/// view of PID's network namespace).
fn established_tcp(pid: i32, owner: &HashMap<u32, i32>) -> Vec<Finding> {
    let mut out = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "01" {
                continue;
            }
            let Ok(inode) = f[9].parse::<u32>() else {
                continue;
            };
            if let Some(&owner_pid) = owner.get(&inode) {
                out.push(Finding::TcpEstablished {
                    pid: owner_pid,
                    local: endpoint(f[1], v6),
                    remote: endpoint(f[2], v6),
                });
            }
        }
    }
    out
}

/// `0100007F:1F90` -> `127.0.0.1:8080` (addresses as the kernel prints them).
fn endpoint(hex: &str, v6: bool) -> String {
    let Some((addr, port)) = hex.split_once(':') else {
        return hex.to_string();
    };
    let port = u16::from_str_radix(port, 16).unwrap_or(0);
    let words: Vec<u32> = (0..addr.len() / 8)
        .filter_map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok())
        .map(u32::swap_bytes)
        .collect();
    if !v6 && words.len() == 1 {
        format!("{}:{port}", Ipv4Addr::from(words[0]))
    } else if words.len() == 4 {
        let mut b = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
        }
        format!("[{}]:{port}", Ipv6Addr::from(b))
    } else {
        hex.to_string()
    }
}

/// Regular files the tree rooted at `pid` holds open for writing that CRIU
/// will check the size of on restore (all but those opened write-only
/// for appending, as CRIU skips those) and that a process outside the tree
/// holds open for writing too. Before a migration on one kernel, where
/// the source is killed before the restore: such a file may grow
/// meanwhile, and then both the restore and the way back fail.
pub fn shared_written_files(pid: i32) -> Result<Vec<Finding>, PreflightError> {
    let pids = process::tree(pid).map_err(|source| PreflightError::Process { pid, source })?;
    let mut checked: HashMap<(u64, u64), (i32, u32, String)> = HashMap::new();
    for &p in &pids {
        for (fd, id, flags) in written_files(p) {
            let append_only =
                flags & libc::O_ACCMODE == libc::O_WRONLY && flags & libc::O_APPEND != 0;
            if !append_only {
                let path = fs::read_link(format!("/proc/{p}/fd/{fd}"))
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                checked.entry(id).or_insert((p, fd, path));
            }
        }
    }
    if checked.is_empty() {
        return Ok(Vec::new());
    }
    let inside: std::collections::HashSet<i32> = pids.into_iter().collect();
    let mut findings = Vec::new();
    let mut reported = std::collections::HashSet::new();
    let Ok(all) = fs::read_dir("/proc") else {
        return Ok(findings);
    };
    for entry in all.flatten() {
        let Some(other) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if inside.contains(&other) {
            continue;
        }
        for (_, id, _) in written_files(other) {
            if let Some((pid, fd, path)) = checked.get(&id) {
                if reported.insert(id) {
                    findings.push(Finding::SharedWrittenFile {
                        pid: *pid,
                        fd: *fd,
                        path: path.clone(),
                        other,
                    });
                }
            }
        }
    }
    Ok(findings)
}

/// The regular files `pid` holds open for writing: (fd, (dev, inode),
/// open flags). A process that goes away meanwhile holds none.
fn written_files(pid: i32) -> Vec<(u32, (u64, u64), i32)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for fd in fds.flatten() {
        let Some(n) = fd.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // The file itself (following the link), not the link.
        let Ok(meta) = fs::metadata(fd.path()) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let Some(flags) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}"))
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())
            })
        else {
            continue;
        };
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            out.push((n, (meta.dev(), meta.ino()), flags));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;

    #[test]
    fn formats_kernel_endpoints() {
        assert_eq!(endpoint("0100007F:1F90", false), "127.0.0.1:8080");
        assert_eq!(
            endpoint("00000000000000000000000001000000:0050", true),
            "[::1]:80"
        );
    }

    #[test]
    fn finds_this_process_tcp_connection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        let me = std::process::id() as i32;
        let f = inspect(
            me,
            Allow {
                tcp_established: false,
                ext_unix_sk: true,
            },
        )
        .unwrap();
        let port = l.local_addr().unwrap().port().to_string();
        assert!(
            f.iter().any(
                |f| matches!(f, Finding::TcpEstablished { remote, .. } if remote.ends_with(&port))
            ),
            "{f:?}"
        );
        let f = inspect(
            me,
            Allow {
                tcp_established: true,
                ext_unix_sk: true,
            },
        )
        .unwrap();
        assert!(
            !f.iter()
                .any(|f| matches!(f, Finding::TcpEstablished { .. })),
            "{f:?}"
        );
    }

    #[test]
    fn a_socketpair_inside_the_tree_is_not_external() {
        let (_a, _b) = UnixStream::pair().unwrap();
        let me = std::process::id() as i32;
        let f = inspect(
            me,
            Allow {
                tcp_established: true,
                ext_unix_sk: false,
            },
        )
        .unwrap();
        assert!(
            !f.iter()
                .any(|f| matches!(f, Finding::ExternalUnixSocket { .. })),
            "{f:?}"
        );
    }
}
