//! Page contents: zero detection and content digests, shared by the dump
//! report (which counts zero and duplicate pages) and the archive (which
//! elides and deduplicates them).

#![forbid(unsafe_code)]

use xxhash_rust::xxh3::xxh3_128;

use crate::PAGE_SIZE;

/// Content digest of a page or 4 KiB block (xxh3-128).
pub type Digest = u128;

pub fn digest(block: &[u8]) -> Digest {
    xxh3_128(block)
}

/// The digest of an all-zero page, computed once.
pub fn zero_page_digest() -> Digest {
    static ZERO: std::sync::OnceLock<Digest> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| digest(&[0u8; PAGE_SIZE]))
}

/// Whether every byte is zero (checked eight bytes at a time).
pub fn is_zero(block: &[u8]) -> bool {
    let (words, tail) = block.split_at(block.len() - block.len() % 8);
    words
        .chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && tail.iter().all(|b| *b == 0)
}

/// `None` for an all-zero page, else its digest.
pub fn fingerprint(page: &[u8]) -> Option<Digest> {
    if is_zero(page) {
        None
    } else {
        Some(digest(page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check_sees_every_byte() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        assert_eq!(fingerprint(&page), None);
        for i in [0, 7, 8, 4095] {
            page[i] = 1;
            assert!(!is_zero(&page), "byte {i}");
            page[i] = 0;
        }
        assert!(is_zero(&[0u8; 13]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
