//! Live processes as `/proc` shows them: existence, state, command and
//! descendants. Used before a dump (is the target there, what does the tree
//! hold), after a failed one (is anything left stopped) and before a restore
//! (are the pids the images need free).

#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Errors reading a process from `/proc`.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("no process with pid {pid}")]
    NotFound { pid: i32 },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse {path}: {what}")]
    Parse { path: PathBuf, what: &'static str },
    #[error("cannot signal pid {pid} with {signal}")]
    Signal {
        pid: i32,
        signal: Signal,
        #[source]
        source: nix::errno::Errno,
    },
}

/// What `/proc/PID/stat` says about one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: i32,
    pub ppid: i32,
    /// The one-letter state: R, S, D, T (stopped), t (traced), Z (zombie)...
    pub state: char,
    pub comm: String,
    /// Its session's id (field 6): 0 when the session's leader is in an
    /// ancestor pid namespace, invisible from here.
    pub session: i32,
    /// When it started, in clock ticks after boot (field 22): with the pid,
    /// what tells a process from a later one that reused its pid.
    pub start_time: u64,
    /// It is exiting (`PF_EXITING` in field 9): killed, its memory may be
    /// gone already; a pid namespace's init stays so until every process
    /// of its namespace is reaped.
    pub exiting: bool,
}

impl ProcessInfo {
    /// Reads `/proc/PID/stat`.
    pub fn read(pid: i32) -> Result<ProcessInfo, ProcessError> {
        let path = PathBuf::from(format!("/proc/{pid}/stat"));
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ProcessError::NotFound { pid })
            }
            Err(e) => return Err(ProcessError::Read { path, source: e }),
        };
        parse_stat(pid, &text).ok_or(ProcessError::Parse {
            path,
            what: "expected 'pid (comm) state ppid ...'",
        })
    }

    /// Stopped by a signal or by a tracer (what a frozen task looks like).
    pub fn is_stopped(&self) -> bool {
        matches!(self.state, 'T' | 't')
    }

    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

fn parse_stat(pid: i32, text: &str) -> Option<ProcessInfo> {
    // comm may hold spaces and parentheses: it ends at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // Fields 3 (state), 4 (ppid), 6 (session) and 22 (starttime), counted
    // from 1 with pid and comm the first two.
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let session = fields.get(3)?.parse().ok()?;
    let start_time = fields.get(19)?.parse().ok()?;
    const PF_EXITING: u64 = 0x4;
    let exiting = fields
        .get(6)
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|f| f & PF_EXITING != 0);
    Some(ProcessInfo {
        pid,
        ppid,
        state,
        comm,
        session,
        start_time,
        exiting,
    })
}

/// Is there a live (non-zombie) process with this pid?
pub fn is_alive(pid: i32) -> bool {
    matches!(ProcessInfo::read(pid), Ok(p) if !p.is_zombie())
}

/// Does any process, zombie or not, hold this pid?
pub fn pid_in_use(pid: i32) -> bool {
    fs::metadata(format!("/proc/{pid}")).is_ok()
}

/// The pid and every descendant of it, parents before children.
pub fn tree(pid: i32) -> Result<Vec<i32>, ProcessError> {
    ProcessInfo::read(pid)?;
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(children(p));
        i += 1;
    }
    Ok(out)
}

fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut kids = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = fs::read_to_string(task.path().join("children")) {
            kids.extend(
                text.split_whitespace()
                    .filter_map(|s| s.parse::<i32>().ok()),
            );
        }
    }
    kids
}

/// Resident memory of the tree rooted at `pid`, in bytes (sum of VmRSS).
/// Shared pages count once per process, so this overestimates a dump.
pub fn tree_rss_bytes(pid: i32) -> Result<u64, ProcessError> {
    let mut total = 0;
    for p in tree(pid)? {
        let path = PathBuf::from(format!("/proc/{p}/status"));
        let Ok(text) = fs::read_to_string(&path) else {
            continue; // exited meanwhile
        };
        let kib = text
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        total += kib * 1024;
    }
    Ok(total)
}

/// Sends SIGCONT to every stopped process of the tree rooted at `pid`;
/// returns the pids it resumed. Used after a failed dump so that nothing is
/// left frozen whatever CRIU managed to do.
pub fn resume_stopped(pid: i32) -> Vec<i32> {
    resume_stopped_except(pid, &[])
}

/// The processes of the tree rooted at `pid` that are stopped now (job
/// control or ptrace): the application's own doing before a dump, which a
/// failed dump's clean-up must leave as they are.
pub fn stopped_in_tree(pid: i32) -> Vec<i32> {
    tree(pid)
        .unwrap_or_default()
        .into_iter()
        .filter(|&p| matches!(ProcessInfo::read(p), Ok(info) if info.is_stopped()))
        .collect()
}

/// [`resume_stopped`], leaving alone the pids in `already` (stopped before
/// the dump: see [`stopped_in_tree`]).
pub fn resume_stopped_except(pid: i32, already: &[i32]) -> Vec<i32> {
    let Ok(pids) = tree(pid) else {
        return Vec::new();
    };
    let mut resumed = Vec::new();
    for p in pids.into_iter().filter(|p| !already.contains(p)) {
        if matches!(ProcessInfo::read(p), Ok(info) if info.is_stopped())
            && kill(Pid::from_raw(p), Signal::SIGCONT).is_ok()
        {
            resumed.push(p);
        }
    }
    resumed
}

/// Sends SIGCONT to every process of the tree rooted at `pid`, stopped or
/// not; returns the pids signalled. For a tree CRIU left stopped: CRIU
/// queues SIGSTOP and detaches, so a task may not have stopped yet when
/// CRIU returns (a post-copy task faulting in its memory can take a
/// while). SIGCONT discards a pending stop signal, so this resumes the tree
/// whichever side of its stop each task is on, where [`resume_stopped`]
/// would miss a task that stops after it looked.
pub fn continue_tree(pid: i32) -> Vec<i32> {
    continue_tree_except(pid, &[])
}

/// [`continue_tree`], leaving alone the pids in `already` (stopped before
/// the dump).
pub fn continue_tree_except(pid: i32, already: &[i32]) -> Vec<i32> {
    let Ok(pids) = tree(pid) else {
        return Vec::new();
    };
    pids.into_iter()
        .filter(|p| !already.contains(p))
        .filter(|p| kill(Pid::from_raw(*p), Signal::SIGCONT).is_ok())
        .collect()
}

/// The pid of `pid` in each pid namespace it belongs to, outermost first
/// (`NSpid` of `/proc/PID/status`); the last one is what a dump of its
/// container's tree names it.
pub fn ns_pids(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("NSpid:")).map(|v| {
                v.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_else(|| vec![pid as u32])
}

/// Whether `pid` is the init (pid 1) of a pid namespace below this
/// process's own: a container's init, or a tree started in a pid namespace
/// of its own.
pub fn is_pid_namespace_init(pid: i32) -> bool {
    let ns = ns_pids(pid);
    ns.len() > 1 && ns.last() == Some(&1)
}

/// SIGKILLs every pid of `pids` (those already gone are ignored).
pub fn kill_all(pids: &[i32]) {
    for p in pids {
        let _ = signal(*p, Signal::SIGKILL);
    }
}

/// Sends `signal` to `pid`.
pub fn signal(pid: i32, signal: Signal) -> Result<(), ProcessError> {
    kill(Pid::from_raw(pid), signal).map_err(|source| match source {
        nix::errno::Errno::ESRCH => ProcessError::NotFound { pid },
        _ => ProcessError::Signal {
            pid,
            signal,
            source,
        },
    })
}

/// Waits until no process (not even a zombie) holds `pid`; false on timeout.
pub fn wait_pid_free(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while pid_in_use(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let fields = "S 1 42 42 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 98765 1000 50";
        let p = parse_stat(42, &format!("42 (a (b) c) {fields}")).unwrap();
        assert_eq!(p.comm, "a (b) c");
        assert_eq!(p.state, 'S');
        assert_eq!(p.ppid, 1);
        assert_eq!(p.start_time, 98765);
        assert!(parse_stat(42, "42 (short) S 1 42").is_none());
    }

    #[test]
    fn rejects_garbage_stat() {
        assert!(parse_stat(1, "garbage").is_none());
    }

    #[test]
    fn reads_self() {
        let me = std::process::id() as i32;
        let info = ProcessInfo::read(me).unwrap();
        assert_eq!(info.pid, me);
        assert!(is_alive(me));
        assert!(tree(me).unwrap().contains(&me));
        assert!(tree_rss_bytes(me).unwrap() > 0);
    }
}
