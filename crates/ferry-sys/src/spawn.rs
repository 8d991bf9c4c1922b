//! Starting a command as the init of a pid namespace of its own, in a
//! session of its own.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the namespace's init may take to appear.
const INIT_WAIT: Duration = Duration::from_secs(5);

/// Starts `argv` as pid 1 of a new pid namespace (util-linux `unshare
/// --pid --fork`, whose process stays outside as its waiter), stdin on
/// `/dev/null`, stdout and stderr on `output` (a file opened for
/// appending, which CRIU dumps and restores by path) or `/dev/null`. Its pids are its own, so a checkpoint of it restores on any
/// host whatever pids are in use there. It leads a session of its own
/// (util-linux `setsid` before the command): CRIU refuses to dump a
/// namespace whose init's session leader is outside it, and an ordinary
/// program never calls setsid() itself. With `init` (a program that runs
/// the rest of its arguments and reaps orphans, `ferry ns-init --`), that
/// program is pid 1 and the command its child: a command that forks a
/// daemon and exits then keeps its namespace (pid 1 exiting would end it).
/// A thread reaps the waiter when the namespace ends. Returns the init's
/// pid (as this namespace sees it).
pub fn pid_namespace_init(
    argv: &[String],
    init: Option<&[String]>,
    output: Option<&std::fs::File>,
) -> io::Result<i32> {
    if argv.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an empty command",
        ));
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--", "setsid", "--"])
        .args(init.unwrap_or_default())
        .args(argv)
        .stdin(Stdio::null());
    match output {
        Some(f) => cmd.stdout(f.try_clone()?).stderr(f.try_clone()?),
        None => cmd.stdout(Stdio::null()).stderr(Stdio::null()),
    };
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of the
    // parent; it is all the child runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
    let mut waiter = cmd.spawn()?;
    let wpid = waiter.id();
    let children = format!("/proc/{wpid}/task/{wpid}/children");
    let deadline = Instant::now() + INIT_WAIT;
    let init = loop {
        let found = std::fs::read_to_string(&children)
            .ok()
            .and_then(|c| c.split_whitespace().next()?.parse::<i32>().ok());
        if let Some(pid) = found {
            break Ok(pid);
        }
        if let Ok(Some(status)) = waiter.try_wait() {
            break Err(io::Error::other(format!(
                "unshare --pid --fork exited ({status}) before starting the command"
            )));
        }
        if Instant::now() >= deadline {
            let _ = waiter.kill();
            break Err(io::Error::other("the namespace's init did not appear"));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    std::thread::Builder::new()
        .name(format!("ferry-reap-{wpid}"))
        .spawn(move || {
            let _ = waiter.wait();
        })?;
    init
}

/// Runs `argv` as a child and reaps every process that ends up this
/// process's child (as pid 1 of a pid namespace, every orphan of the
/// namespace): a daemon that forks and exits its parent lives on under it.
/// Returns once no child is left, with the command's own exit status (or
/// 128 + the signal that ended it). Single-threaded, so that CRIU dumps it
/// with the rest of the tree.
pub fn reap_as_init(argv: &[String]) -> io::Result<i32> {
    use nix::errno::Errno;
    use nix::sys::wait::{wait, WaitStatus};
    let Some((program, args)) = argv.split_first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an empty command",
        ));
    };
    let main = Command::new(program).args(args).spawn()?.id() as i32;
    let mut status = 0;
    loop {
        match wait() {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == main => status = code,
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid.as_raw() == main => {
                status = 128 + sig as i32
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return Ok(status),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Forks the calling process, which must have one thread (checked: an
/// error otherwise, as after a fork in a threaded process only the forking
/// thread lives on, holding whatever locks the others held). Returns the
/// child's pid in the parent, `None` in the child. The child shares the
/// parent's private memory copy-on-write.
pub fn fork_single_threaded() -> io::Result<Option<i32>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse::<u32>().ok());
    if threads != Some(1) {
        return Err(io::Error::other(format!(
            "fork refused: the process has {threads:?} threads, not one"
        )));
    }
    // SAFETY: the process has a single thread (checked above, and nothing
    // here starts one), so the child's copy holds no lock another thread
    // held, and it may go on running ordinary Rust code.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Parent { child } => Ok(Some(child.as_raw())),
        nix::unistd::ForkResult::Child => Ok(None),
    }
}
