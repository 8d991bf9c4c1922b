//! Frame encoding and decoding (layout in the module docs).

use std::io::{Read, Write};

/// First bytes of every frame.
pub const MAGIC: &[u8; 4] = b"FRY1";
/// 4: frames after the handshake are sealed (see `seal`); 5: pages named
/// by digest; 6: a container's files sent before the freeze.
pub const VERSION: u8 = 6;
pub const HEADER_LEN: usize = 20;
pub(crate) const TAG_LEN: usize = 16;
/// Largest payload a peer accepts (a batch of pages is at most ~4 MiB).
pub(crate) const MAX_PAYLOAD: usize = 64 << 20;
/// Largest payload of a handshake frame: nothing bigger is read (or
/// allocated) before the peer has proven it holds the key.
pub(crate) const MAX_HANDSHAKE_PAYLOAD: usize = 1024;
/// Flag: the payload is zstd-compressed.
pub(crate) const FLAG_ZSTD: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    // 2 was Proof (version 3's handshake).
    Welcome = 3,
    Refused = 4,
    Msg = 16,
    Pages = 17,
    Blob = 18,
}

impl FrameKind {
    pub fn from_u8(v: u8) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Hello,
            3 => FrameKind::Welcome,
            4 => FrameKind::Refused,
            16 => FrameKind::Msg,
            17 => FrameKind::Pages,
            18 => FrameKind::Blob,
            _ => return None,
        })
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub flags: u16,
    pub seq: u64,
    pub payload: Vec<u8>,
}

fn tag(key: &[u8; 32], header: &[u8], payload: &[u8]) -> [u8; TAG_LEN] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(header);
    h.update(payload);
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&h.finalize().as_bytes()[..TAG_LEN]);
    out
}

/// Writes one frame tagged with `key`.
pub(crate) fn write_frame(
    w: &mut impl Write,
    key: &[u8; 32],
    kind: FrameKind,
    flags: u16,
    seq: u64,
    payload: &[u8],
) -> std::io::Result<()> {
    let header = header(kind, flags, seq, payload.len());
    let t = tag(key, &header, payload);
    w.write_all(&header)?;
    w.write_all(payload)?;
    w.write_all(&t)?;
    w.flush()
}

/// A frame's header.
pub(crate) fn header(kind: FrameKind, flags: u16, seq: u64, len: usize) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(MAGIC);
    header[4] = VERSION;
    header[5] = kind as u8;
    header[6..8].copy_from_slice(&flags.to_le_bytes());
    header[8..16].copy_from_slice(&seq.to_le_bytes());
    header[16..20].copy_from_slice(&(len as u32).to_le_bytes());
    header
}

/// A frame header's (kind, flags, seq, payload length), the length at
/// most `max_payload`.
pub(crate) fn parse_header(
    header: &[u8],
    max_payload: usize,
) -> Result<(FrameKind, u16, u64, usize), FrameFault> {
    let field = |r: std::ops::Range<usize>| header.get(r).unwrap_or_default();
    let magic: [u8; 4] = field(0..4).try_into().unwrap_or_default();
    if &magic != MAGIC {
        return Err(FrameFault::Magic(magic));
    }
    let (version, kind) = (header.get(4).copied(), header.get(5).copied());
    if version != Some(VERSION) {
        return Err(FrameFault::Version(version.unwrap_or_default()));
    }
    let kind = kind.unwrap_or_default();
    let Some(kind) = FrameKind::from_u8(kind) else {
        return Err(FrameFault::Kind(kind));
    };
    let flags = u16::from_le_bytes(field(6..8).try_into().unwrap_or_default());
    let seq = u64::from_le_bytes(field(8..16).try_into().unwrap_or_default());
    let len = u32::from_le_bytes(field(16..20).try_into().unwrap_or_default()) as usize;
    if len > max_payload {
        return Err(FrameFault::TooLarge(len));
    }
    Ok((kind, flags, seq, len))
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameFault {
    #[error("bad magic {0:02x?} (not a ferry peer?)")]
    Magic([u8; 4]),
    #[error("protocol version {0}, this ferry speaks {VERSION}")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("payload of {0} bytes exceeds the limit (at most {MAX_PAYLOAD} bytes after the handshake, {MAX_HANDSHAKE_PAYLOAD} during it)")]
    TooLarge(usize),
    #[error("authentication tag mismatch (damaged, forged, or the wrong key)")]
    Tag,
}

/// Key of `Refused` frames: a refusal carries no authority (the refusing
/// peer may not share our key), only a reason to show.
pub(crate) const PUBLIC_KEY: [u8; 32] = [0; 32];

/// Reads one frame and checks its tag with `key`. `Ok(None)` at a clean end
/// of stream before a frame starts.
#[cfg(test)]
fn read_frame(
    r: &mut impl Read,
    key: &[u8; 32],
) -> std::io::Result<Option<Result<Frame, FrameFault>>> {
    read_frame_keyed(r, &|_| *key, MAX_PAYLOAD)
}

/// [`read_frame`] with the key chosen by frame kind, the payload at most
/// `max_payload` bytes.
pub(crate) fn read_frame_keyed(
    r: &mut impl Read,
    key_for: &dyn Fn(FrameKind) -> [u8; 32],
    max_payload: usize,
) -> std::io::Result<Option<Result<Frame, FrameFault>>> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = match r.read(&mut header[got..]) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            n => n?,
        };
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let (kind, flags, seq, len) = match parse_header(&header, max_payload) {
        Ok(h) => h,
        Err(fault) => return Ok(Some(Err(fault))),
    };
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    let mut t = [0u8; TAG_LEN];
    r.read_exact(&mut t)?;
    if !constant_time_eq(&t, &tag(&key_for(kind), &header, &payload)) {
        return Ok(Some(Err(FrameFault::Tag)));
    }
    Ok(Some(Ok(Frame {
        kind,
        flags,
        seq,
        payload,
    })))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn encoded(payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        write_frame(&mut buf, &KEY, FrameKind::Msg, 0, 5, payload).unwrap();
        buf
    }

    #[test]
    fn round_trips() {
        let buf = encoded(b"hello");
        let f = read_frame(&mut buf.as_slice(), &KEY)
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            (f.kind, f.seq, f.payload.as_slice()),
            (FrameKind::Msg, 5, &b"hello"[..])
        );
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let good = encoded(b"some payload bytes");
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x01;
            let r = read_frame(&mut b.as_slice(), &KEY);
            assert!(!matches!(r, Ok(Some(Ok(_)))), "flip at byte {i} accepted");
        }
    }

    #[test]
    fn the_wrong_key_is_refused() {
        let buf = encoded(b"x");
        let r = read_frame(&mut buf.as_slice(), &[8; 32]).unwrap().unwrap();
        assert_eq!(r, Err(FrameFault::Tag));
    }

    #[test]
    fn truncation_is_an_error_and_a_clean_end_is_none() {
        let buf = encoded(b"payload");
        assert!(read_frame(&mut &buf[..buf.len() - 3], &KEY).is_err());
        assert!(read_frame(&mut &[][..], &KEY).unwrap().is_none());
    }
}
