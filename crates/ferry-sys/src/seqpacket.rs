//! `AF_UNIX` / `SOCK_SEQPACKET` sockets: the transport of CRIU's RPC.
//!
//! CRIU sends each message as one datagram with no length prefix, possibly
//! with a file descriptor attached (`SCM_RIGHTS`, e.g. the orphan pts master).
//! [`SeqPacket::recv`] sizes each datagram with `MSG_PEEK | MSG_TRUNC` first,
//! so messages of any size are received whole.

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{
    connect, recv, recvmsg, sendmsg, socket, socketpair, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// Most file descriptors ferry accepts with one message. CRIU sends at most one.
const MAX_FDS_PER_MESSAGE: usize = 4;

/// One received datagram and the file descriptors that came with it.
#[derive(Debug)]
pub struct Packet {
    pub data: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// A connected `SOCK_SEQPACKET` unix socket.
#[derive(Debug)]
pub struct SeqPacket {
    fd: OwnedFd,
}

impl SeqPacket {
    /// A connected pair, both ends close-on-exec.
    pub fn pair() -> io::Result<(SeqPacket, SeqPacket)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((SeqPacket { fd: a }, SeqPacket { fd: b }))
    }

    /// Connects to a listening socket at `path` (e.g. `criu service --address PATH`).
    pub fn connect(path: &Path) -> io::Result<SeqPacket> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = UnixAddr::new(path)?;
        connect(fd.as_raw_fd(), &addr)?;
        Ok(SeqPacket { fd })
    }

    /// Sends one datagram, with `fds` attached when it is not empty.
    pub fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsgs = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsgs };
        let iov = [IoSlice::new(data)];
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) if n == data.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!(
                            "short send on seqpacket socket: {n} of {} bytes",
                            data.len()
                        ),
                    ))
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives one whole datagram; `None` when the peer closed the socket.
    pub fn recv(&self) -> io::Result<Option<Packet>> {
        let size = loop {
            let mut probe = [0u8; 1];
            match recv(
                self.fd.as_raw_fd(),
                &mut probe,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC,
            ) {
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if size == 0 {
            return Ok(None);
        }
        let mut data = vec![0u8; size];
        let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
        let (len, truncated, raw_fds) = loop {
            let mut iov = [IoSliceMut::new(&mut data)];
            match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_buf),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut raw_fds = Vec::new();
                    let cmsgs = msg.cmsgs().map_err(io::Error::from)?;
                    for cmsg in cmsgs {
                        if let ControlMessageOwned::ScmRights(fds) = cmsg {
                            raw_fds.extend(fds);
                        }
                    }
                    break (msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC), raw_fds);
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let fds = raw_fds
            .into_iter()
            // SAFETY: each came with the message just received, and this
            // loop is the only place that takes them.
            .map(|fd| unsafe { owned_fd_from_scm_rights(fd) })
            .collect();
        if truncated || len != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("seqpacket datagram changed size while read: peeked {size}, got {len}"),
            ));
        }
        Ok(Some(Packet { data, fds }))
    }

    /// Takes a connected seqpacket socket handed over as a descriptor (a
    /// child's end of [`SeqPacket::pair`]).
    pub fn from_owned_fd(fd: OwnedFd) -> SeqPacket {
        SeqPacket { fd }
    }

    /// Gives up the socket as a plain descriptor (to hand to a child process).
    pub fn into_owned_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for SeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Takes ownership of a descriptor received in an `SCM_RIGHTS` message.
///
/// # Safety
///
/// `fd` must be a descriptor the kernel has just installed in this
/// process's table for a message this process received, and must not have
/// been taken by anything else: nothing else may own or close it.
pub(crate) unsafe fn owned_fd_from_scm_rights(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller guarantees `fd` is open and owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn large_datagrams_arrive_whole() {
        let (a, b) = SeqPacket::pair().unwrap();
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        a.send(&big, &[]).unwrap();
        a.send(b"small", &[]).unwrap();
        let p = b.recv().unwrap().unwrap();
        assert_eq!(p.data, big);
        assert!(p.fds.is_empty());
        assert_eq!(b.recv().unwrap().unwrap().data, b"small");
    }

    #[test]
    fn descriptors_travel_with_the_message() {
        let (a, b) = SeqPacket::pair().unwrap();
        let (mut reader, writer) = std::io::pipe().unwrap();
        a.send(b"fd", &[writer.as_fd()]).unwrap();
        drop(writer);
        let mut p = b.recv().unwrap().unwrap();
        assert_eq!(p.data, b"fd");
        assert_eq!(p.fds.len(), 1);
        let mut received = std::fs::File::from(p.fds.remove(0));
        received.write_all(b"through the passed fd").unwrap();
        drop(received);
        let mut s = String::new();
        reader.read_to_string(&mut s).unwrap();
        assert_eq!(s, "through the passed fd");
    }

    #[test]
    fn closed_peer_reads_as_none() {
        let (a, b) = SeqPacket::pair().unwrap();
        drop(a);
        assert!(b.recv().unwrap().is_none());
    }
}
