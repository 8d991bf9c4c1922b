//! Unix socket peers through `sock_diag` (NETLINK_SOCK_DIAG), as CRIU finds
//! them: which socket each connected unix socket talks to.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::Path;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::unix::{ShowFlags, StateFlags, UnixRequest};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};
use nix::sched::{setns, CloneFlags};

/// Bytes read per netlink receive.
const RECV_BUFFER: usize = 64 << 10;

/// Peer inode of every unix socket of the network namespace `netns` (a
/// `/proc/PID/ns/net` path); sockets without a peer are absent.
pub fn unix_peers(netns: &Path) -> io::Result<HashMap<u32, u32>> {
    let ns = File::open(netns)?;
    // Entering a namespace changes the calling thread only: do it on a
    // thread of its own.
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            query_unix_peers()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn query_unix_peers() -> io::Result<HashMap<u32, u32>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::UnixRequest(UnixRequest {
            state_flags: StateFlags::all(),
            inode: 0,
            show_flags: ShowFlags::PEER,
            cookie: [0xff; 8],
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut peers = HashMap::new();
    let mut rx = vec![0u8; RECV_BUFFER];
    loop {
        let size = socket.recv(&mut &mut rx[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(r)) => {
                    if let Some(peer) = r.peer().filter(|p| *p != 0) {
                        peers.insert(r.header.inode, peer);
                    }
                }
                NetlinkPayload::Done(_) => return Ok(peers),
                NetlinkPayload::Error(e) => {
                    return Err(io::Error::other(format!("sock_diag: {e:?}")))
                }
                _ => {}
            }
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}
