//! Page batches, page recipes and missing-page bitmaps: the binary payloads.
//!
//! ```text
//! batch:   count u32 | count x digest u128 | count x 4096 bytes of page data
//! recipe:  one digest u128 per page of a pages-*.img, in file order
//!          (ZERO_PAGE for a page of zeros: never sent, written as zeros)
//! digests: count x u128 (a Query);  bitmap: ceil(count/8) bytes, bit set = missing
//! ```
//! Digests are keyed BLAKE3 of the page, 128 bits little-endian, under the
//! key both ends derive from the cluster key ([`crate::Secret::page_key`];
//! see [`ferry_image::page::PageKey`]). The receiver recomputes every
//! page's digest before it stores it.

#![forbid(unsafe_code)]

use ferry_image::page::{Digest, PageKey};
use ferry_sys::PAGE_SIZE;

/// Recipe entry for an all-zero page.
pub const ZERO_PAGE: Digest = 0;
const DIGEST_BYTES: usize = 16;

/// Encodes pages and their digests into one batch.
pub fn encode_batch(digests: &[Digest], data: &[u8]) -> Vec<u8> {
    debug_assert_eq!(digests.len() * PAGE_SIZE, data.len());
    let mut out = Vec::with_capacity(4 + digests.len() * (DIGEST_BYTES + PAGE_SIZE));
    out.extend_from_slice(&(digests.len() as u32).to_le_bytes());
    out.extend(digests.iter().flat_map(|d| d.to_le_bytes()));
    out.extend_from_slice(data);
    out
}

/// Why a batch or list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PagesFault {
    #[error("page batch of {len} bytes does not hold {count} pages")]
    BatchLength { count: usize, len: usize },
    #[error("page {index} of the batch does not match its digest")]
    Digest { index: usize },
    #[error("digest list of {0} bytes is not a whole number of digests")]
    ListLength(usize),
    #[error("layout of {bytes} bytes does not hold {count} pages")]
    LayoutLength { count: u64, bytes: usize },
}

/// A layout (`Msg::Layout`'s blob): `count` addresses (u64 LE), then as
/// many digests.
pub fn encode_layout(vaddrs: &[u64], digests: &[Digest]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(vaddrs.len() * (8 + DIGEST_BYTES));
    blob.extend(vaddrs.iter().flat_map(|v| v.to_le_bytes()));
    blob.extend(encode_digests(digests));
    blob
}

/// Decodes a layout of `count` pages; a crafted count cannot wrap: the
/// blob's length bounds it.
pub fn decode_layout(count: u64, blob: &[u8]) -> Result<(Vec<u64>, Vec<Digest>), PagesFault> {
    let n = usize::try_from(count)
        .ok()
        .filter(|n| n.checked_mul(8 + DIGEST_BYTES) == Some(blob.len()))
        .ok_or(PagesFault::LayoutLength {
            count,
            bytes: blob.len(),
        })?;
    let vaddrs = blob[..n * 8]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    Ok((vaddrs, decode_digests(&blob[n * 8..])?))
}

/// Decodes a batch and checks every page against its digest.
pub fn decode_batch<'b>(
    key: &PageKey,
    batch: &'b [u8],
) -> Result<(Vec<Digest>, &'b [u8]), PagesFault> {
    let len = batch.len();
    let count = batch
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or(PagesFault::BatchLength { count: 0, len })?;
    if len != 4 + count * (DIGEST_BYTES + PAGE_SIZE) {
        return Err(PagesFault::BatchLength { count, len });
    }
    let digests = decode_digests(&batch[4..4 + count * DIGEST_BYTES])?;
    let data = &batch[4 + count * DIGEST_BYTES..];
    for (i, (d, p)) in digests.iter().zip(data.chunks_exact(PAGE_SIZE)).enumerate() {
        if key.digest(p) != *d {
            return Err(PagesFault::Digest { index: i });
        }
    }
    Ok((digests, data))
}

pub fn encode_digests(digests: &[Digest]) -> Vec<u8> {
    digests.iter().flat_map(|d| d.to_le_bytes()).collect()
}

pub fn decode_digests(bytes: &[u8]) -> Result<Vec<Digest>, PagesFault> {
    if !bytes.len().is_multiple_of(DIGEST_BYTES) {
        return Err(PagesFault::ListLength(bytes.len()));
    }
    Ok(bytes
        .chunks_exact(DIGEST_BYTES)
        .map(|c| {
            let mut b = [0u8; DIGEST_BYTES];
            b.copy_from_slice(c);
            u128::from_le_bytes(b)
        })
        .collect())
}

/// Bytes per leaf of [`file_checksum`]: one page, so that a leaf of a
/// pages image is its page's digest ([`PageKey::digest`]) and a
/// receiver that patches a few pages into a file laid out earlier rehashes
/// only those pages.
pub const CHECKSUM_LEAF_BYTES: usize = PAGE_SIZE;

/// The checksum both ends compute over a whole image file: BLAKE3 of the
/// keyed digest of each page of it (its leaves; a short tail is a leaf of
/// its own). Leaves are computed on every core, and a receiver that wrote
/// most of a file earlier keeps their leaves and recomputes only those it
/// changed since.
pub fn file_checksum(key: &PageKey, bytes: &[u8]) -> u128 {
    combine_leaves(&leaf_hashes(key, bytes))
}

/// The leaves of [`file_checksum`], hashed on every core.
pub fn leaf_hashes(key: &PageKey, bytes: &[u8]) -> Vec<u128> {
    use rayon::prelude::*;
    let per_chunk: Vec<Vec<u128>> = bytes
        .par_chunks(PARALLEL_CHUNK)
        .map(|c| {
            c.chunks(CHECKSUM_LEAF_BYTES)
                .map(|l| leaf_hash(key, l))
                .collect()
        })
        .collect();
    per_chunk.concat()
}

/// One leaf: the page's digest (a zero page's is known without hashing).
pub fn leaf_hash(key: &PageKey, leaf: &[u8]) -> u128 {
    if leaf.len() == PAGE_SIZE && ferry_image::page::is_zero(leaf) {
        key.zero_page_digest()
    } else {
        key.digest(leaf)
    }
}

/// How much of a file one task hashes.
const PARALLEL_CHUNK: usize = 1 << 20;

pub fn combine_leaves(leaves: &[u128]) -> u128 {
    let mut h = blake3::Hasher::new();
    for leaf in leaves {
        h.update(&leaf.to_le_bytes());
    }
    let mut low = [0u8; 16];
    low.copy_from_slice(&h.finalize().as_bytes()[..16]);
    u128::from_le_bytes(low)
}

pub fn encode_bitmap(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        out[i / 8] |= 1 << (i % 8);
    }
    out
}

pub fn decode_bitmap(bytes: &[u8], count: usize) -> Option<Vec<bool>> {
    (bytes.len() == count.div_ceil(8)).then(|| {
        (0..count)
            .map(|i| bytes[i / 8] & (1 << (i % 8)) != 0)
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_every_page_is_checked() {
        let mut data = vec![0u8; 2 * PAGE_SIZE];
        data[5] = 1;
        data[PAGE_SIZE + 9] = 2;
        let key = PageKey::new([4; 32]);
        let digests: Vec<_> = data.chunks(PAGE_SIZE).map(|p| key.digest(p)).collect();
        let mut batch = encode_batch(&digests, &data);
        let (d, p) = decode_batch(&key, &batch).unwrap();
        assert_eq!((d, p), (digests.clone(), &data[..]));
        let last = batch.len() - 1;
        batch[last] ^= 1;
        assert_eq!(
            decode_batch(&key, &batch),
            Err(PagesFault::Digest { index: 1 })
        );
        batch[last] ^= 1;
        // Under another key, the same pages are not the pages named.
        let other = PageKey::new([5; 32]);
        assert_eq!(
            decode_batch(&other, &batch),
            Err(PagesFault::Digest { index: 0 })
        );
        assert!(matches!(
            decode_batch(&key, &batch[..batch.len() - 1]),
            Err(PagesFault::BatchLength { .. })
        ));
    }

    #[test]
    fn checksum_leaves_update_like_a_full_checksum() {
        let mut file = vec![3u8; 3 * (1 << 20) + 5 * PAGE_SIZE + 100];
        file[PAGE_SIZE..2 * PAGE_SIZE].fill(0);
        let key = PageKey::new([6; 32]);
        let mut leaves = leaf_hashes(&key, &file);
        assert_eq!(leaves.len(), 3 * 256 + 5 + 1);
        assert_eq!(leaves[1], key.zero_page_digest());
        assert_eq!(leaves[0], key.digest(&file[..PAGE_SIZE]));
        assert_eq!(combine_leaves(&leaves), file_checksum(&key, &file));
        let at = (1 << 20) + 7;
        file[at] = 9;
        assert_ne!(combine_leaves(&leaves), file_checksum(&key, &file));
        let l = at / CHECKSUM_LEAF_BYTES;
        let leaf = &file[l * CHECKSUM_LEAF_BYTES..(l + 1) * CHECKSUM_LEAF_BYTES];
        leaves[l] = leaf_hash(&key, leaf);
        assert_eq!(combine_leaves(&leaves), file_checksum(&key, &file));
    }

    #[test]
    fn bitmaps_round_trip() {
        let bits = [true, false, false, true, true, false, false, false, true];
        assert_eq!(
            decode_bitmap(&encode_bitmap(&bits), bits.len()).unwrap(),
            bits
        );
        assert!(decode_bitmap(&[0], 9).is_none());
    }
}
