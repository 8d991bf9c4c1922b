//! Socket tuning.

use std::net::TcpStream;

use nix::sys::socket::{setsockopt, sockopt};

/// Asks for send and receive buffers of `bytes` (the kernel caps them at
/// its `wmem_max`/`rmem_max`; failure only costs throughput, so it is
/// logged, not returned).
pub fn set_socket_buffers(stream: &TcpStream, bytes: usize) {
    if let Err(e) = setsockopt(stream, sockopt::SndBuf, &bytes)
        .and_then(|_| setsockopt(stream, sockopt::RcvBuf, &bytes))
    {
        tracing::debug!(error = %e, "cannot size socket buffers");
    }
}

/// Makes closing `stream` (by ferry, or by the kernel when ferry dies)
/// reset the connection instead of ending it cleanly (`SO_LINGER` with a
/// zero timeout): the peer sees an error, never an orderly end. `false`
/// gives the orderly end back.
pub fn reset_on_close(stream: &TcpStream, reset: bool) -> std::io::Result<()> {
    let linger = libc::linger {
        l_onoff: i32::from(reset),
        l_linger: 0,
    };
    setsockopt(stream, sockopt::Linger, &linger).map_err(std::io::Error::from)
}

/// How many strangers' connections [`loopback_pair`] closes before it
/// gives up on its own.
const PAIR_STRANGERS: usize = 64;

/// A TCP connection over loopback between two sockets of this process,
/// `(ours, theirs)`: `theirs` is meant to be handed to a child (CRIU's
/// page server, the lazy-pages daemon) as an already-connected
/// descriptor. The listener it is made through lives only until its own
/// connection arrives; any other connection that reaches it first is
/// closed, told apart by its address (the accepted peer must be `ours`'s
/// local address), so no other local user can take its place.
pub fn loopback_pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    let ours = TcpStream::connect(listener.local_addr()?)?;
    let me = ours.local_addr()?;
    for _ in 0..=PAIR_STRANGERS {
        let (theirs, peer) = listener.accept()?;
        if peer == me {
            let _ = ours.set_nodelay(true);
            let _ = theirs.set_nodelay(true);
            return Ok((ours, theirs));
        }
        tracing::warn!(%peer, "closed a connection that raced ferry's own on a private loopback link");
    }
    Err(std::io::Error::other(
        "too many other connections raced ferry's own on a private loopback link",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_loopback_pair_is_connected_end_to_end() {
        let (mut a, mut b) = loopback_pair().unwrap();
        assert_eq!(a.local_addr().unwrap(), b.peer_addr().unwrap());
        a.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }
}
