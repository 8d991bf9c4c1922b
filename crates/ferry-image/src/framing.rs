//! The framing shared by CRIU's protobuf images: a magic header, then
//! `{ u32 little-endian length, protobuf payload }` entries until end of file.

use std::path::Path;

use prost::Message;

use super::ImageError;

/// The magic header a file must start with (criu/include/magic.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    /// `inventory.img`: only INVENTORY_MAGIC, no common magic before it.
    Inventory,
    /// Regular images: IMG_COMMON_MAGIC then this type magic.
    Common(u32, &'static str),
    /// Service files (stats-dump, stats-restore): IMG_SERVICE_MAGIC then this.
    Service(u32, &'static str),
}

pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
pub(crate) const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
pub(crate) const INVENTORY_MAGIC: u32 = 0x5831_3116;
pub(crate) const PSTREE_MAGIC: u32 = 0x5027_3030;
pub const PAGEMAP_MAGIC: u32 = 0x5608_4025;
pub(crate) const CORE_MAGIC: u32 = 0x5505_3847;
pub const MM_MAGIC: u32 = 0x5749_2820;
pub(crate) const STATS_MAGIC: u32 = 0x5709_3306;

pub(crate) const PSTREE: Magic = Magic::Common(PSTREE_MAGIC, "PSTREE_MAGIC");
pub(crate) const PAGEMAP: Magic = Magic::Common(PAGEMAP_MAGIC, "PAGEMAP_MAGIC");
pub(crate) const CORE: Magic = Magic::Common(CORE_MAGIC, "CORE_MAGIC");
pub(crate) const MM: Magic = Magic::Common(MM_MAGIC, "MM_MAGIC");
pub(crate) const STATS: Magic = Magic::Service(STATS_MAGIC, "STATS_MAGIC");

/// Bytes taken by the length prefix of every entry.
const ENTRY_LEN_BYTES: usize = 4;

pub(crate) fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Checks the magic header and returns the entries that follow it.
pub fn body<'a>(path: &Path, bytes: &'a [u8], magic: Magic) -> Result<&'a [u8], ImageError> {
    let checks: Vec<(u32, &'static str)> = match magic {
        Magic::Inventory => vec![(INVENTORY_MAGIC, "INVENTORY_MAGIC")],
        Magic::Common(m, name) => vec![(IMG_COMMON_MAGIC, "IMG_COMMON_MAGIC"), (m, name)],
        Magic::Service(m, name) => vec![(IMG_SERVICE_MAGIC, "IMG_SERVICE_MAGIC"), (m, name)],
    };
    let need = checks.len() * 4;
    if bytes.len() < need {
        return Err(ImageError::NoHeader {
            path: path.to_path_buf(),
            len: bytes.len(),
            need,
        });
    }
    for (i, (expected_value, expected)) in checks.into_iter().enumerate() {
        let found = read_u32(bytes, i * 4).unwrap_or_default();
        if found != expected_value {
            return Err(ImageError::BadMagic {
                path: path.to_path_buf(),
                found,
                expected,
                expected_value,
            });
        }
    }
    Ok(&bytes[need..])
}

/// The payloads of the entries in `body`, each with its byte offset in the
/// file (`header_len` is where `body` starts). Fails on a length prefix that
/// runs past the end of the file.
pub fn entries<'a>(
    path: &Path,
    body: &'a [u8],
    header_len: usize,
) -> Result<Vec<(usize, &'a [u8])>, ImageError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < body.len() {
        let Some(len) = read_u32(body, at) else {
            return Err(ImageError::Truncated {
                path: path.to_path_buf(),
                offset: header_len + at,
                what: format!(
                    "{} trailing bytes where a 4-byte entry length was expected",
                    body.len() - at
                ),
            });
        };
        let start = at + ENTRY_LEN_BYTES;
        let end = start.checked_add(len as usize).filter(|e| *e <= body.len());
        let Some(end) = end else {
            return Err(ImageError::Truncated {
                path: path.to_path_buf(),
                offset: header_len + at,
                what: format!(
                    "entry declares {len} bytes but only {} remain",
                    body.len() - start
                ),
            });
        };
        out.push((header_len + start, &body[start..end]));
        at = end;
    }
    Ok(out)
}

fn header_len(magic: Magic) -> usize {
    match magic {
        Magic::Inventory => 4,
        Magic::Common(..) | Magic::Service(..) => 8,
    }
}

/// Decodes every entry of a file as `M`.
pub fn decode_all<M: Message + Default>(
    path: &Path,
    bytes: &[u8],
    magic: Magic,
    message: &'static str,
) -> Result<Vec<M>, ImageError> {
    let body = body(path, bytes, magic)?;
    entries(path, body, header_len(magic))?
        .into_iter()
        .map(|(offset, payload)| decode_at(path, offset, payload, message))
        .collect()
}

/// Decodes a file that must hold exactly one entry.
pub(crate) fn decode_one<M: Message + Default>(
    path: &Path,
    bytes: &[u8],
    magic: Magic,
    message: &'static str,
) -> Result<M, ImageError> {
    let mut all: Vec<M> = decode_all(path, bytes, magic, message)?;
    if all.len() != 1 {
        return Err(ImageError::EntryCount {
            path: path.to_path_buf(),
            message,
            found: all.len(),
        });
    }
    Ok(all.remove(0))
}

pub(crate) fn decode_at<M: Message + Default>(
    path: &Path,
    offset: usize,
    payload: &[u8],
    message: &'static str,
) -> Result<M, ImageError> {
    M::decode(payload).map_err(|source| ImageError::Decode {
        path: path.to_path_buf(),
        offset,
        message,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn file(magics: &[u32], entries: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in magics {
            out.extend_from_slice(&m.to_le_bytes());
        }
        for e in entries {
            out.extend_from_slice(&(e.len() as u32).to_le_bytes());
            out.extend_from_slice(e);
        }
        out
    }

    #[test]
    fn splits_entries() {
        let p = PathBuf::from("x.img");
        let bytes = file(&[IMG_COMMON_MAGIC, PSTREE_MAGIC], &[b"ab", b"", b"cde"]);
        let body = body(&p, &bytes, PSTREE).unwrap();
        let e = entries(&p, body, 8).unwrap();
        assert_eq!(e, vec![(12, &b"ab"[..]), (18, &b""[..]), (22, &b"cde"[..])]);
    }

    #[test]
    fn refuses_bad_magic() {
        let p = PathBuf::from("x.img");
        let bytes = file(&[IMG_COMMON_MAGIC, CORE_MAGIC], &[]);
        let err = body(&p, &bytes, PSTREE).unwrap_err();
        assert!(err.to_string().contains("PSTREE_MAGIC"), "{err}");
    }

    #[test]
    fn refuses_short_header() {
        let p = PathBuf::from("x.img");
        let err = body(&p, &[0x19, 0x43], PAGEMAP).unwrap_err();
        assert!(matches!(err, ImageError::NoHeader { len: 2, .. }), "{err}");
    }

    #[test]
    fn refuses_truncated_entry() {
        let p = PathBuf::from("x.img");
        let mut bytes = file(&[INVENTORY_MAGIC], &[b"abcdef"]);
        bytes.truncate(bytes.len() - 2);
        let body = body(&p, &bytes, Magic::Inventory).unwrap();
        let err = entries(&p, body, 4).unwrap_err();
        assert!(
            err.to_string()
                .contains("declares 6 bytes but only 4 remain"),
            "{err}"
        );
    }

    #[test]
    fn refuses_partial_length_prefix() {
        let p = PathBuf::from("x.img");
        let mut bytes = file(&[INVENTORY_MAGIC], &[b"ab"]);
        bytes.extend_from_slice(&[1, 0]);
        let body = body(&p, &bytes, Magic::Inventory).unwrap();
        let err = entries(&p, body, 4).unwrap_err();
        assert!(
            matches!(err, ImageError::Truncated { offset: 10, .. }),
            "{err}"
        );
    }
}
