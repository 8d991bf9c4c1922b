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
