//! ferry's wire between hosts: authenticated frames, the handshake and its
//! own message types, between a migrating source (or an HA leader) and an
//! agent.
//!
//! Every message travels in a frame:
//!
//! ```text
//!   0      4        5      6       8         16      20            20+len
//!   +------+--------+------+-------+---------+-------+----- ... -----+
//!   | FRY1 | ver u8 | kind | flags | seq u64 | len   |    payload    |
//!   +------+--------+------+-------+---------+-------+----- ... -----+
//!   flags bit 0: payload is zstd-compressed.  All integers little-endian.
//! ```
//!
//! **The handshake comes first, and everything after it is sealed.** Both
//! peers hold a shared secret (a key file). They run a Noise handshake
//! (`Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`, through the `snow` crate: the
//! secret as pre-shared key, ephemeral X25519 keys for forward secrecy):
//! two messages, carried in `Hello` and `Welcome` frames of at most 1 KiB,
//! all within one deadline. Each side's message is encrypted under the
//! secret, so a peer without it fails there and nothing else is read from
//! it. From then on every frame is sealed ([`seal`]): encrypted and
//! authenticated with ChaCha20-Poly1305 in segments of at most 64 KiB,
//! under keys no one can recompute from the secret alone; a flipped byte,
//! a replayed, dropped or reordered segment ends the connection with an
//! error. Compressed payloads are decompressed within the 64 MiB frame
//! limit, never beyond.
//!
//! Frame kinds: the handshake (`Hello`, `Welcome`, and `Refused`, which is
//! readable without the key and carries only a reason), `Msg` (a JSON
//! control message, see [`msg`]), `Blob` (bytes belonging to the message
//! before it: an image file, a page recipe, a digest list) and `Pages` (a
//! batch of pages with their digests, see [`pages`]). Msg, Blob and Pages
//! payloads may be zstd-compressed (flag bit 0). A migration uses several
//! connections at once (streams), so that compressing, sealing and sending
//! use every core.

#![forbid(unsafe_code)]

pub mod conn;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod msg;
pub mod pages;
pub mod recent;
pub(crate) mod seal;

use std::io;
use std::path::PathBuf;

pub use conn::{Conn, Incoming, Role, Secret};
pub use frame::{Frame, FrameKind};
pub use msg::Msg;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read the shared secret {}", path.display())]
    SecretFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the shared secret in {} can be read by other users (mode {mode:04o}): run `chmod 600 {}`", path.display(), path.display())]
    SecretExposed { path: PathBuf, mode: u32 },
    #[error("the shared secret in {} belongs to uid {owner}, not to this user (uid {me})", path.display())]
    SecretOwner { path: PathBuf, owner: u32, me: u32 },
    #[error("the shared secret in {} is too short ({len} bytes; at least {min})", path.display())]
    SecretTooShort {
        path: PathBuf,
        len: usize,
        min: usize,
    },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("connection to {peer} failed")]
    Io {
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("{peer} closed the connection")]
    Closed { peer: String },
    #[error("{peer} sent a bad frame: {what}")]
    BadFrame { peer: String, what: String },
    #[error("authentication with {peer} failed: {why}")]
    Auth { peer: String, why: String },
    #[error("{peer} refused: {why}")]
    Refused { peer: String, why: String },
    #[error("{peer} reports: {message}")]
    Remote { peer: String, message: String },
    #[error("{peer} sent an unexpected {got} (expected {expected})")]
    Unexpected {
        peer: String,
        got: String,
        expected: &'static str,
    },
}
