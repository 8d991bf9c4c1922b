//! Receiving one file descriptor over a `SOCK_STREAM` unix socket
//! (`SCM_RIGHTS`), as CRIU passes a pipe to its image streamer.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// Receives the one descriptor the peer sends with a one-byte message.
/// Extra descriptors are closed; none at all, or the peer gone, is an error.
pub fn recv_one_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; 2]);
    loop {
        let mut iov = [IoSliceMut::new(&mut byte)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds: Vec<OwnedFd> = Vec::new();
                for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        fds.extend(
                            raw.into_iter()
                                // SAFETY: each came with the message just
                                // received, and only this loop takes them.
                                .map(|fd| unsafe {
                                    super::seqpacket::owned_fd_from_scm_rights(fd)
                                }),
                        );
                    }
                }
                if msg.bytes == 0 && fds.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the socket instead of sending a descriptor",
                    ));
                }
                return fds.into_iter().next().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a message without the expected descriptor",
                    )
                });
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
