//! Fuzzes ferry's archive reader: opening (header, trailer, index
//! validation), reading and verifying every chunk, and rebuilding every
//! non-pages file must reject malformed input with an error, never panic or
//! allocate without bound.
//!
//! Checksums stop random mutations early, and xxh3 is no MAC: a hostile
//! archive can carry a crafted index with valid checksums. So when the
//! first byte is odd, the rest is taken as a raw protobuf index and wrapped
//! in a well-formed header, compressed index and trailer.

#![no_main]

use std::path::Path;

use ferry_archive::format::{Header, Trailer, HEADER_LEN, VERSION_MAJOR, VERSION_MINOR};
use ferry_archive::Archive;
use libfuzzer_sys::fuzz_target;

fn wrap_index(index: &[u8]) -> Vec<u8> {
    let header = Header {
        major: VERSION_MAJOR,
        minor: VERSION_MINOR,
        flags: 0,
        id: [1; 16],
    };
    let stored = zstd::bulk::compress(index, 1).unwrap_or_default();
    let trailer = Trailer {
        index_offset: HEADER_LEN as u64,
        index_len: stored.len() as u64,
        index_raw_len: index.len() as u64,
        index_checksum: xxhash_rust::xxh3::xxh3_64(&stored),
    };
    let mut out = header.encode().to_vec();
    out.extend_from_slice(&stored);
    out.extend_from_slice(&trailer.encode());
    out
}

fuzz_target!(|data: &[u8]| {
    let bytes = match data.split_first() {
        Some((mode, index)) if mode & 1 == 1 => wrap_index(index),
        _ => data.to_vec(),
    };
    let Ok(archive) = Archive::from_bytes(Path::new("fuzz.ferry"), &bytes) else {
        return;
    };
    let _ = archive.verify_chunks();
    for (i, f) in archive.index().files.iter().enumerate() {
        if !f.pages {
            let _ = archive.file_data(i);
        }
        let _ = archive.chunk_of_slot(u64::from(f.run_slots.first().copied().unwrap_or(0)));
    }
});
