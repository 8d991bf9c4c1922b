//! Page contents: zero detection and content digests, shared by the dump
//! report (which counts zero and duplicate pages) and the archive (which
//! elides and deduplicates them).

#![forbid(unsafe_code)]

use xxhash_rust::xxh3::xxh3_128;

use ferry_sys::PAGE_SIZE;

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

/// Whether a page looks like uniformly random bytes (compressed or
/// encrypted data, keys, noise): more than 44 distinct values among 64
/// bytes sampled across it, where random bytes give 57 on average. Text,
/// code, pointers and counters come out well under. A grouping hint only:
/// what is compressible is still compressed.
pub fn looks_random(page: &[u8]) -> bool {
    const SAMPLES: usize = 64;
    const DISTINCT: u32 = 44;
    let stride = page.len() / SAMPLES;
    if stride == 0 {
        return false;
    }
    // Stores, not increments: no sample waits for the one before it.
    let mut seen = [0u8; 256];
    for k in 0..SAMPLES {
        seen[usize::from(page[k * stride])] = 1;
    }
    seen.iter().map(|&x| u32::from(x)).sum::<u32>() > DISTINCT
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
    }

    #[test]
    fn random_bytes_look_random_and_text_does_not() {
        let mut rng = fastrand::Rng::with_seed(7);
        let random: Vec<u8> = (0..PAGE_SIZE).map(|_| rng.u8(..)).collect();
        assert!(looks_random(&random));
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog, 0123456789; "
            .iter()
            .cycle()
            .take(PAGE_SIZE)
            .copied()
            .collect();
        assert!(!looks_random(&text));
        let counters: Vec<u8> = (0..PAGE_SIZE as u32 / 8)
            .flat_map(|i| u64::from(i).to_le_bytes())
            .collect();
        assert!(!looks_random(&counters));
        assert!(!looks_random(&[0u8; PAGE_SIZE]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
