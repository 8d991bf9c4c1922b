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
