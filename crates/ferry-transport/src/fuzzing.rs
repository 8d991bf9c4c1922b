//! Entry points for the fuzzer (fuzz/fuzz_targets/transport_reader.rs):
//! each reads untrusted bytes the way an agent reads them from the
//! network. Not part of the API.

use super::frame::{self, PUBLIC_KEY};
use super::seal;

/// `data` as the first bytes a peer sends: a `Hello` frame, then the Noise
/// message inside it, as a server reads them.
pub fn handshake(data: &[u8]) {
    let mut r = data;
    let Ok(Some(Ok(hello))) =
        frame::read_frame_keyed(&mut r, &|_| PUBLIC_KEY, frame::MAX_HANDSHAKE_PAYLOAD)
    else {
        return;
    };
    let Ok(params) = seal::NOISE_PATTERN.parse() else {
        return;
    };
    let Ok(mut hs) = snow::Builder::new(params)
        .psk(0, &[7u8; 32])
        .and_then(|b| b.build_responder())
    else {
        return;
    };
    let mut plain = vec![0u8; seal::MAX_MESSAGE];
    let _ = hs.read_message(&hello.payload, &mut plain);
}

/// `data` as the sealed stream after a handshake, read as it is (mostly
/// refused by authentication), then sealed segment by segment by a peer
/// holding the key (so that what it says, headers and lengths included,
/// reaches the frame parser).
pub fn sealed(data: &[u8]) {
    let (_, mut rx) = seal::pair(&[7u8; 32]);
    let mut r = data;
    while let Ok(Some(Ok(_))) = seal::read_sealed(&mut r, &mut rx) {}

    let (mut tx, mut rx) = seal::pair(&[7u8; 32]);
    let mut wire = Vec::new();
    let mut out = vec![0u8; seal::MAX_MESSAGE];
    for segment in data.chunks(seal::MAX_SEGMENT) {
        let Ok(n) = tx.write_message(segment, &mut out) else {
            return;
        };
        wire.extend_from_slice(&(n as u16).to_le_bytes());
        wire.extend_from_slice(&out[..n]);
    }
    let mut r = wire.as_slice();
    while let Ok(Some(Ok(f))) = seal::read_sealed(&mut r, &mut rx) {
        if f.flags & frame::FLAG_ZSTD != 0 {
            let _ = super::conn::decompress_bounded(&f.payload, frame::MAX_PAYLOAD);
        }
    }
}
