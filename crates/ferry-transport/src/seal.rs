//! The sealed record layer: once the Noise handshake is done, every frame
//! travels encrypted and authenticated.
//!
//! A frame's plaintext is its 20-byte header (as in [`super::frame`]) and
//! its payload, with no tag of its own. It is cut into segments of at most
//! [`MAX_SEGMENT`] bytes, each sealed as one Noise transport message
//! (ChaCha20-Poly1305 under the session's keys, a nonce per message that
//! both sides count): on the wire each is a little-endian u16 length and
//! the ciphertext.
//!
//! ```text
//!   +--------+---------------------------+--------+--------------------+--
//!   | len u16| seal(header ++ payload[..])| len u16| seal(payload[..])  | ...
//!   +--------+---------------------------+--------+--------------------+--
//! ```
//!
//! A flipped byte, a segment replayed, dropped or moved, or the wrong key
//! all fail the message's authentication; the connection ends there.

use std::io::{Read, Write};

use super::frame::{self, Frame, FrameFault, FrameKind};

/// The Noise protocol: no static keys; the shared secret as a pre-shared
/// key mixed in from the first message (so each side proves it holds it),
/// ephemeral X25519 for forward secrecy, ChaCha20-Poly1305 and BLAKE2s.
pub(crate) const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Largest Noise message, by the Noise specification.
pub(crate) const MAX_MESSAGE: usize = 65535;
/// Bytes the AEAD adds to a message.
const TAG_LEN: usize = 16;
/// Plaintext bytes a segment holds.
pub(crate) const MAX_SEGMENT: usize = MAX_MESSAGE - TAG_LEN;

/// Seals `kind`'s frame (`flags`, `seq`, `payload`) into `w`; returns the
/// bytes written.
pub(crate) fn write_sealed(
    w: &mut impl Write,
    noise: &mut snow::TransportState,
    kind: FrameKind,
    flags: u16,
    seq: u64,
    payload: &[u8],
    scratch: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let header = frame::header(kind, flags, seq, payload.len());
    scratch.resize(MAX_MESSAGE, 0);
    let mut written = 0;
    let mut first = true;
    let mut rest = payload;
    loop {
        // The first segment carries the header, then as much payload as fits.
        let mut plain = Vec::new();
        let take = if first {
            let take = rest.len().min(MAX_SEGMENT - header.len());
            plain.reserve(header.len() + take);
            plain.extend_from_slice(&header);
            plain.extend_from_slice(&rest[..take]);
            take
        } else {
            rest.len().min(MAX_SEGMENT)
        };
        let segment: &[u8] = if first { &plain } else { &rest[..take] };
        let n = noise
            .write_message(segment, scratch)
            .map_err(std::io::Error::other)?;
        w.write_all(&(n as u16).to_le_bytes())?;
        w.write_all(&scratch[..n])?;
        written += 2 + n;
        rest = &rest[take..];
        first = false;
        if rest.is_empty() {
            break;
        }
    }
    w.flush()?;
    Ok(written)
}

/// Reads one sealed frame. `Ok(None)` at a clean end of stream before a
/// frame starts; an I/O error of kind `UnexpectedEof` when it ends inside
/// one.
pub(crate) fn read_sealed(
    r: &mut impl Read,
    noise: &mut snow::TransportState,
) -> std::io::Result<Option<Result<Frame, FrameFault>>> {
    let mut cipher = vec![0u8; MAX_MESSAGE];
    let mut plain = vec![0u8; MAX_MESSAGE];
    let Some(n) = read_segment(r, &mut cipher, true)? else {
        return Ok(None);
    };
    let Ok(got) = noise.read_message(&cipher[..n], &mut plain) else {
        return Ok(Some(Err(FrameFault::Tag)));
    };
    let Some(head) = plain.get(..frame::HEADER_LEN) else {
        return Ok(Some(Err(FrameFault::Tag)));
    };
    let (kind, flags, seq, len) = match frame::parse_header(head, frame::MAX_PAYLOAD) {
        Ok(h) => h,
        Err(fault) => return Ok(Some(Err(fault))),
    };
    let mut payload = Vec::with_capacity(len);
    payload.extend_from_slice(&plain[frame::HEADER_LEN..got]);
    while payload.len() < len {
        let n = read_segment(r, &mut cipher, false)?.unwrap_or_default();
        let Ok(got) = noise.read_message(&cipher[..n], &mut plain) else {
            return Ok(Some(Err(FrameFault::Tag)));
        };
        payload.extend_from_slice(&plain[..got]);
    }
    if payload.len() != len {
        return Ok(Some(Err(FrameFault::Tag)));
    }
    Ok(Some(Ok(Frame {
        kind,
        flags,
        seq,
        payload,
    })))
}

/// Reads one segment's ciphertext into `buf`; `None` at a clean end when
/// `at_start` (between frames).
fn read_segment(
    r: &mut impl Read,
    buf: &mut [u8],
    at_start: bool,
) -> std::io::Result<Option<usize>> {
    let mut len = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        // A signal (a cancelling SIGINT) interrupts a read with a timeout;
        // the read goes on.
        let n = match r.read(&mut len[got..]) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            n => n?,
        };
        if n == 0 {
            if got == 0 && at_start {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let n = usize::from(u16::from_le_bytes(len));
    if n < TAG_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a sealed segment of {n} bytes"),
        ));
    }
    r.read_exact(&mut buf[..n])?;
    Ok(Some(n))
}

/// Two transport states that completed a handshake with `psk`, in memory
/// (for tests and the fuzzer).
pub(crate) fn pair(psk: &[u8; 32]) -> (snow::TransportState, snow::TransportState) {
    let params: snow::params::NoiseParams = NOISE_PATTERN.parse().expect("a valid pattern");
    let build = |initiator: bool| {
        let b = snow::Builder::new(params.clone())
            .psk(0, psk)
            .expect("a 32-byte psk");
        if initiator {
            b.build_initiator()
        } else {
            b.build_responder()
        }
        .expect("a handshake state")
    };
    let (mut i, mut r) = (build(true), build(false));
    let (mut a, mut b) = (vec![0u8; 1024], vec![0u8; 1024]);
    let n = i.write_message(b"x", &mut a).expect("first message");
    r.read_message(&a[..n], &mut b).expect("first message read");
    let n = r.write_message(b"y", &mut a).expect("second message");
    i.read_message(&a[..n], &mut b)
        .expect("second message read");
    (
        i.into_transport_mode().expect("transport mode"),
        r.into_transport_mode().expect("transport mode"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(tx: &mut snow::TransportState, payloads: &[&[u8]]) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut scratch = Vec::new();
        for (seq, p) in payloads.iter().enumerate() {
            write_sealed(
                &mut wire,
                tx,
                FrameKind::Blob,
                0,
                seq as u64,
                p,
                &mut scratch,
            )
            .unwrap();
        }
        wire
    }

    #[test]
    fn frames_of_any_size_round_trip_and_hide_their_bytes() {
        let (mut tx, mut rx) = pair(&[3; 32]);
        let marker = b"FERRY-PLAINTEXT-MARKER";
        let big: Vec<u8> = marker.iter().copied().cycle().take(300_000).collect();
        let payloads: [&[u8]; 4] = [b"", marker, &big[..MAX_SEGMENT - 20], &big];
        let wire = sealed(&mut tx, &payloads);
        assert!(
            !wire.windows(marker.len()).any(|w| w == marker),
            "plaintext on the wire"
        );
        let mut r = wire.as_slice();
        for (seq, p) in payloads.iter().enumerate() {
            let f = read_sealed(&mut r, &mut rx).unwrap().unwrap().unwrap();
            assert_eq!((f.kind, f.seq), (FrameKind::Blob, seq as u64));
            assert!(f.payload == *p);
        }
        assert!(read_sealed(&mut r, &mut rx).unwrap().is_none());
    }

    #[test]
    fn a_flipped_byte_a_replay_a_drop_and_the_wrong_key_are_refused() {
        let refused = |wire: &[u8], rx: &mut snow::TransportState| {
            let mut r = wire;
            loop {
                match read_sealed(&mut r, rx) {
                    Ok(Some(Ok(_))) => continue,
                    Ok(None) => return false,
                    Ok(Some(Err(_))) | Err(_) => return true,
                }
            }
        };
        let two: [&[u8]; 2] = [b"first frame", b"second frame"];
        // A flipped byte anywhere.
        let (mut tx, _) = pair(&[3; 32]);
        let good = sealed(&mut tx, &two);
        for i in 0..good.len() {
            let (mut tx, mut rx) = pair(&[3; 32]);
            let mut bad = sealed(&mut tx, &two);
            assert_eq!(bad.len(), good.len());
            bad[i] ^= 0x20;
            assert!(refused(&bad, &mut rx), "flip at byte {i} accepted");
        }
        // The first frame replayed in place of the second.
        let (mut tx, mut rx) = pair(&[3; 32]);
        let wire = sealed(&mut tx, &two);
        let first_len = 2 + usize::from(u16::from_le_bytes([wire[0], wire[1]]));
        let replayed = [&wire[..first_len], &wire[..first_len]].concat();
        assert!(refused(&replayed, &mut rx));
        // The first frame dropped.
        let (mut tx, mut rx) = pair(&[3; 32]);
        let wire = sealed(&mut tx, &two);
        assert!(refused(&wire[first_len..], &mut rx));
        // Another key.
        let (mut tx, _) = pair(&[3; 32]);
        let (_, mut other) = pair(&[4; 32]);
        assert!(refused(&sealed(&mut tx, &two), &mut other));
        // Truncated inside a frame: an error, not a clean end.
        let (mut tx, mut rx) = pair(&[3; 32]);
        let wire = sealed(&mut tx, &two);
        assert!(read_sealed(&mut &wire[..first_len - 3], &mut rx).is_err());
    }
}
