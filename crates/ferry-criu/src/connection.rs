//! One conversation with CRIU: a `criu swrk` child or a service socket.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use criu_proto as pb;
use prost::Message;

use super::error::{cause, describe_status, log_errors};
use super::notify::{Notification, NotifyHook, Script, Timeline, TimelineEvent};
use super::{CriuError, RequestKind};
use ferry_sys::SeqPacket;

/// The descriptor number the swrk child finds its socket on.
const SWRK_CHILD_FD: i32 = 3;
/// How long to wait for a swrk child to exit after its socket closed.
const SWRK_EXIT_GRACE: Duration = Duration::from_secs(5);

/// A connection to CRIU that carries one or more requests.
#[derive(Debug)]
pub struct Connection {
    sock: Option<SeqPacket>,
    child: Option<Child>,
}

/// A finished request: CRIU's response and the notifications it passed.
#[derive(Debug)]
pub struct Exchange {
    pub response: pb::CriuResp,
    pub timeline: Timeline,
}

impl Connection {
    /// Spawns `binary swrk 3` with one end of a socketpair as fd 3, and
    /// `extra` (a descriptor, and the number the child finds it as).
    pub(crate) fn spawn_swrk(
        binary: &Path,
        extra: Option<(std::os::fd::OwnedFd, i32)>,
        own_group: bool,
    ) -> Result<Connection, CriuError> {
        let spawn_err = |source| CriuError::Spawn {
            binary: binary.to_path_buf(),
            source,
        };
        let (ours, theirs) = SeqPacket::pair().map_err(spawn_err)?;
        let mut cmd = Command::new(binary);
        cmd.arg("swrk")
            .arg(SWRK_CHILD_FD.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if own_group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let mut mappings = vec![FdMapping {
            parent_fd: theirs.into_owned_fd(),
            child_fd: SWRK_CHILD_FD,
        }];
        mappings.extend(extra.map(|(parent_fd, child_fd)| FdMapping {
            parent_fd,
            child_fd,
        }));
        cmd.fd_mappings(mappings)
            .map_err(|e| spawn_err(std::io::Error::other(e.to_string())))?;
        let child = cmd.spawn().map_err(spawn_err)?;
        // `cmd` still holds our copy of the child's end: drop it so that the
        // socket reports EOF when the child dies.
        drop(cmd);
        Ok(Connection {
            sock: Some(ours),
            child: Some(child),
        })
    }

    /// Connects to a `criu service --address PATH` socket.
    pub(crate) fn connect_service(socket: &Path) -> Result<Connection, CriuError> {
        let sock = SeqPacket::connect(socket).map_err(|source| CriuError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
        Ok(Connection {
            sock: Some(sock),
            child: None,
        })
    }

    /// Sends `req` and answers NOTIFY messages through `hooks` until CRIU's
    /// response to `req` arrives. `log` is where CRIU logs this request, for
    /// error reports. A response with `success == false` is returned as
    /// [`CriuError::Failed`].
    pub fn request(
        &mut self,
        kind: RequestKind,
        req: pb::CriuReq,
        hooks: &mut dyn NotifyHook,
        log: Option<&Path>,
    ) -> Result<Exchange, CriuError> {
        let start = Instant::now();
        let want = req.r#type;
        match self.send(kind, &req) {
            Err(CriuError::Transport { source, .. }) if is_disconnect(&source) => {
                return Err(self.died(kind, log));
            }
            other => other?,
        }
        let mut timeline = Timeline::default();
        loop {
            let received = match self.recv(kind) {
                Err(CriuError::Transport { source, .. }) if is_disconnect(&source) => None,
                other => other?,
            };
            let Some((resp, fds)) = received else {
                return Err(self.died(kind, log));
            };
            if resp.r#type == pb::CriuReqType::Notify as i32 {
                self.answer_notify(kind, resp, fds, start, hooks, &mut timeline)?;
                continue;
            }
            if resp.r#type != want {
                let got = pb::CriuReqType::try_from(resp.r#type)
                    .map(|t| t.as_str_name().to_string())
                    .unwrap_or_else(|_| format!("type {}", resp.r#type));
                return Err(CriuError::UnexpectedResponse { request: kind, got });
            }
            if !resp.success {
                let log_errors = log.map(log_errors).unwrap_or_default();
                return Err(CriuError::Failed {
                    request: kind,
                    errno: resp.cr_errno,
                    errmsg: cause(resp.cr_errmsg.as_deref(), &log_errors),
                    log: log.map(Path::to_path_buf),
                    log_errors,
                });
            }
            return Ok(Exchange {
                response: resp,
                timeline,
            });
        }
    }

    fn answer_notify(
        &mut self,
        kind: RequestKind,
        resp: pb::CriuResp,
        mut fds: Vec<OwnedFd>,
        start: Instant,
        hooks: &mut dyn NotifyHook,
        timeline: &mut Timeline,
    ) -> Result<(), CriuError> {
        let notify = resp.notify.unwrap_or_default();
        let script = Script::from_name(notify.script.as_deref().unwrap_or(""));
        let elapsed = start.elapsed();
        timeline.events.push(TimelineEvent {
            script: script.clone(),
            at: elapsed,
        });
        let mut n = Notification {
            script,
            pid: notify.pid.filter(|p| *p != 0),
            fd: if fds.is_empty() {
                None
            } else {
                Some(fds.remove(0))
            },
            elapsed,
        };
        tracing::debug!(script = %n.script, pid = ?n.pid, "CRIU notify");
        let outcome = hooks.notify(&mut n);
        let reply = pb::CriuReq {
            r#type: pb::CriuReqType::Notify as i32,
            notify_success: Some(outcome.is_ok()),
            ..Default::default()
        };
        self.send(kind, &reply)?;
        outcome.map_err(|source| CriuError::HookFailed {
            script: n.script.name().to_string(),
            source,
        })
    }

    fn sock(&self, kind: RequestKind) -> Result<&SeqPacket, CriuError> {
        self.sock.as_ref().ok_or_else(|| CriuError::Transport {
            request: kind,
            source: std::io::Error::new(std::io::ErrorKind::NotConnected, "connection closed"),
        })
    }

    fn send(&self, kind: RequestKind, req: &pb::CriuReq) -> Result<(), CriuError> {
        self.sock(kind)?
            .send(&req.encode_to_vec(), &[])
            .map_err(|source| CriuError::Transport {
                request: kind,
                source,
            })
    }

    fn recv(&self, kind: RequestKind) -> Result<Option<(pb::CriuResp, Vec<OwnedFd>)>, CriuError> {
        let packet = self
            .sock(kind)?
            .recv()
            .map_err(|source| CriuError::Transport {
                request: kind,
                source,
            })?;
        let Some(packet) = packet else {
            return Ok(None);
        };
        let resp =
            pb::CriuResp::decode(packet.data.as_slice()).map_err(|source| CriuError::Decode {
                request: kind,
                source,
            })?;
        Ok(Some((resp, packet.fds)))
    }

    fn died(&mut self, kind: RequestKind, log: Option<&Path>) -> CriuError {
        self.sock = None;
        let status = self.child.as_mut().and_then(|c| c.wait().ok());
        self.child = None;
        CriuError::Died {
            request: kind,
            status: describe_status(status),
            log: log.map(PathBuf::from),
            log_errors: log.map(log_errors).unwrap_or_default(),
        }
    }
}

/// The peer went away (CRIU exited or crashed) rather than misbehaving.
fn is_disconnect(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Closing the socket ends the swrk child's loop; reap it so no
        // zombie is left behind, killing it if it lingers.
        self.sock = None;
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + SWRK_EXIT_GRACE;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }
    }
}
