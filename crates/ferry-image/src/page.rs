//! Page contents: zero detection and content digests, shared by the dump
//! report (which counts zero and duplicate pages) and the archive (which
//! elides and deduplicates them).

#![forbid(unsafe_code)]

use ferry_sys::PAGE_SIZE;

/// Content digest of a page or 4 KiB block: keyed BLAKE3, 128 bits.
pub type Digest = u128;

/// The key under which pages are identified. Page identity decides which
/// stored page is restored in place of another, so it must be one that the
/// owner of a page cannot collide: a digest is keyed BLAKE3 under a secret
/// the checkpointed processes never see (each archive's own random key,
/// or one derived from the cluster key for migrations and the agent's
/// store). Without the key, finding two pages with one digest takes
/// online guesses against ferry itself; with an unkeyed 128-bit hash it
/// would take 2^64 offline work, and with xxh3 none (see
/// docs/security.md).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PageKey {
    key: [u8; 32],
    zero: Digest,
}

impl PageKey {
    pub fn new(key: [u8; 32]) -> PageKey {
        let mut k = PageKey { key, zero: 0 };
        k.zero = k.digest(&[0u8; PAGE_SIZE]);
        k
    }

    /// A fresh key from the kernel's random source.
    pub fn random() -> std::io::Result<PageKey> {
        ferry_sys::random_bytes().map(PageKey::new)
    }

    /// A key derived from a shared secret (both ends of a migration
    /// derive the same one).
    pub fn derive(secret: &[u8]) -> PageKey {
        PageKey::new(blake3::derive_key("ferry page identity v1", secret))
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.key
    }

    pub fn digest(&self, block: &[u8]) -> Digest {
        let h = blake3::keyed_hash(&self.key, block);
        let mut low = [0u8; 16];
        low.copy_from_slice(&h.as_bytes()[..16]);
        u128::from_le_bytes(low)
    }

    /// The digest of an all-zero page under this key (computed once).
    pub fn zero_page_digest(&self) -> Digest {
        self.zero
    }

    /// `None` for an all-zero page, else its digest.
    pub fn fingerprint(&self, page: &[u8]) -> Option<Digest> {
        if is_zero(page) {
            None
        } else {
            Some(self.digest(page))
        }
    }
}

impl std::fmt::Debug for PageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageKey(..)")
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check_sees_every_byte() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        assert_eq!(PageKey::new([1; 32]).fingerprint(&page), None);
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

    #[test]
    fn digests_depend_on_the_key() {
        let (a, b) = (PageKey::new([1; 32]), PageKey::new([2; 32]));
        let page = [7u8; PAGE_SIZE];
        assert_ne!(a.digest(&page), b.digest(&page));
        assert_eq!(a.digest(&page), PageKey::new([1; 32]).digest(&page));
        assert_eq!(a.zero_page_digest(), a.digest(&[0u8; PAGE_SIZE]));
        assert_eq!(format!("{a:?}"), "PageKey(..)");
    }
}
