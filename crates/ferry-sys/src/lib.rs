//! Every direct syscall ferry makes and every `unsafe` block in ferry: the
//! only crate of the workspace allowed `unsafe`.
//!
//! The rest of ferry is `#![forbid(unsafe_code)]`-clean: it reaches the kernel
//! through safe crates (nix, memmap2, std) or through the small, documented
//! functions here. Each `unsafe` block carries a `// SAFETY:` comment.

pub mod clock;
pub mod host;
pub mod kernel;
pub mod mmap;
pub mod net;
pub mod pidfd;
pub mod pipe;
pub mod procmem;
pub mod sched;
pub mod seqpacket;
pub mod sockdiag;
pub mod spawn;
pub mod unix_fd;

/// `N` bytes from the kernel's random source (keys, nonces, ids).
pub fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    use std::io::Read;
    let mut out = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}

/// Size of a memory page as CRIU writes it in page images (x86-64, arm64 4K).
pub const PAGE_SIZE: usize = 4096;

pub use host::which;
pub use net::set_socket_buffers;
pub use seqpacket::{Packet, SeqPacket};
