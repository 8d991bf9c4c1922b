//! The `criu lazy-pages` daemon that serves a lazy restore's memory from
//! an images directory through userfaultfd (post-copy's receiving half).
//! It listens on `lazy-pages.socket` in the images directory, answers page
//! faults of the restored tasks, pushes the remaining pages in the
//! background and exits once every page is in place.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};

use super::{Criu, CriuError};

/// The socket the daemon creates in the images directory.
pub const SOCKET: &str = "lazy-pages.socket";
/// The descriptor the daemon finds its page source on.
const PAGE_SOURCE_CHILD_FD: i32 = 3;

/// A running daemon; killed when dropped unless it finished.
pub struct LazyPages {
    child: Child,
    log: PathBuf,
    socket: PathBuf,
}

impl Criu {
    /// Starts `criu lazy-pages` on `images`, without waiting for its socket
    /// (it takes about as long to come up as a restore takes to need it:
    /// see [`LazyPages::wait_listening`]). The pages come from the images,
    /// or, with `page_source`, from the page server at the other end of
    /// that connected socket (see [`super::page_server`]): the daemon gets
    /// it as a descriptor (`--ps-socket`), so there is no port for anyone
    /// else to reach.
    pub fn spawn_lazy_pages(
        &self,
        images: &Path,
        page_source: Option<OwnedFd>,
    ) -> Result<LazyPages, CriuError> {
        let binary = self.cli_binary()?;
        let log = images.join("lazy-pages.log");
        let mut cmd = Command::new(&binary);
        cmd.arg("lazy-pages")
            .arg("-D")
            .arg(images)
            .args(["-o", "lazy-pages.log", "-v2"]);
        if let Some(fd) = page_source {
            cmd.args(["--page-server", "--ps-socket"])
                .arg(PAGE_SOURCE_CHILD_FD.to_string());
            cmd.fd_mappings(vec![FdMapping {
                parent_fd: fd,
                child_fd: PAGE_SOURCE_CHILD_FD,
            }])
            .map_err(|e| CriuError::Spawn {
                binary: binary.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| CriuError::Spawn {
                binary: binary.clone(),
                source,
            })?;
        // `cmd` holds the daemon's end of the page source: drop it, so
        // that the daemon's exit ends the connection.
        drop(cmd);
        Ok(LazyPages {
            child,
            log,
            socket: images.join(SOCKET),
        })
    }
}

impl LazyPages {
    /// Whether the daemon's socket is there (a restore can connect).
    pub fn listening(&self) -> bool {
        self.socket.exists()
    }

    /// Waits until the daemon listens.
    pub fn wait_listening(&mut self, timeout: Duration) -> Result<(), CriuError> {
        let deadline = Instant::now() + timeout;
        while !self.listening() {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(CriuError::LazyPages {
                    why: format!("it exited ({status})"),
                    log: self.log.clone(),
                });
            }
            if Instant::now() >= deadline {
                return Err(CriuError::LazyPages {
                    why: format!("no {SOCKET} after {timeout:?}"),
                    log: self.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Waits until the daemon has delivered every page and exited; false
    /// if it is still running after `timeout` or failed.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => return false,
            }
        }
    }

    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for LazyPages {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
