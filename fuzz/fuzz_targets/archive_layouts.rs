//! Fuzzes what ferry does with an archive whose checksums all hold but
//! whose layout is hostile (xxh3 is no MAC: anyone can make one). A small
//! images directory is made from the input (a pages image with zero,
//! repeated and unique pages, and a data file), packed into a valid
//! archive, and then its index's page runs and sizes are rewritten by the
//! rest of the input and the archive sealed again with valid checksums.
//! Chain resolution, unpacking, the stream checks, the zero-page plan and
//! streaming every image must refuse what is wrong with an error, never
//! panic, hang or allocate without bound.

#![no_main]

use std::path::Path;

use ferry_archive::format::{Index, Trailer, HEADER_LEN, TRAILER_LEN};
use ferry_archive::stream::StreamSource;
use ferry_archive::{pack_dir, unpack_to_dir, Chain, NoProgress, PackOptions};
use ferry_criu::streamer::ImageSource;
use libfuzzer_sys::fuzz_target;
use prost::Message;

const PAGE: usize = 4096;

/// Takes bytes from the front of the input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

fn images(dir: &Path, input: &mut Input) {
    let pages = 1 + usize::from(input.u8() % 48);
    let mut img = vec![0u8; pages * PAGE];
    for (i, page) in img.chunks_mut(PAGE).enumerate() {
        match input.u8() % 4 {
            0 => {}
            1 => page.fill(7),
            _ => page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes()),
        }
    }
    std::fs::write(dir.join("pages-1.img"), &img).unwrap();
    let data: Vec<u8> = (0..usize::from(input.u8()) * 97).map(|i| i as u8).collect();
    std::fs::write(dir.join("core-1.img"), data).unwrap();
}

/// Rewrites the pages image's runs and size from the input.
fn mutate(index: &mut Index, input: &mut Input) {
    let Some(f) = index.files.iter_mut().find(|f| f.pages) else {
        return;
    };
    let edits = input.u8() % 8;
    for _ in 0..edits {
        let n = f.run_sources.len().max(1);
        let r = usize::from(input.u8()) % n;
        match input.u8() % 6 {
            0 if r < f.run_lens.len() => f.run_lens[r] = input.u32(),
            1 if r < f.run_sources.len() => f.run_sources[r] = u32::from(input.u8() % 4),
            2 if r < f.run_slots.len() => f.run_slots[r] = input.u32(),
            3 => {
                f.run_sources.push(u32::from(input.u8() % 3));
                f.run_lens.push(input.u32() % 64);
                f.run_slots.push(input.u32() % 64);
            }
            4 => f.size = u64::from(input.u32()) * PAGE as u64,
            _ => {
                // Keep the size consistent with the runs, as a careful
                // forger would.
                f.size = f.run_lens.iter().map(|&l| u64::from(l)).sum::<u64>() * PAGE as u64;
            }
        }
    }
}

fn reseal(bytes: &[u8], index: &Index) -> Option<Vec<u8>> {
    let tb: [u8; TRAILER_LEN] = bytes
        .get(bytes.len().checked_sub(TRAILER_LEN)?..)?
        .try_into()
        .ok()?;
    let trailer = Trailer::decode(&tb)?;
    let raw = index.encode_to_vec();
    let stored = zstd::bulk::compress(&raw, 1).ok()?;
    let mut out = bytes
        .get(..usize::try_from(trailer.index_offset).ok()?)?
        .to_vec();
    let t = Trailer {
        index_offset: trailer.index_offset,
        index_len: stored.len() as u64,
        index_raw_len: raw.len() as u64,
        index_checksum: xxhash_rust::xxh3::xxh3_64(&stored),
    };
    out.extend_from_slice(&stored);
    out.extend_from_slice(&t.encode());
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let dir = tempfile::Builder::new()
        .prefix("ferry-fuzz-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    images(&src, &mut input);
    let mut bytes = Vec::new();
    let opts = PackOptions {
        level: 1,
        threads: 1,
        parent: None,
        source: "fuzz".into(),
        progress: &NoProgress,
    };
    if pack_dir(&src, &mut bytes, None, &opts).is_err() || bytes.len() < HEADER_LEN {
        return;
    }
    let Ok(archive) = ferry_archive::Archive::from_bytes(Path::new("x"), &bytes) else {
        return;
    };
    let mut index = archive.index().clone();
    mutate(&mut index, &mut input);
    let Some(forged) = reseal(&bytes, &index) else {
        return;
    };
    let path = dir.path().join("forged.ferry");
    std::fs::write(&path, &forged).unwrap();
    let Ok(chain) = Chain::open(&path, None) else {
        return;
    };
    let _ = unpack_to_dir(&chain, &dir.path().join("out"), 1, &NoProgress);
    let Ok(source) = StreamSource::new(&chain, 1, &NoProgress) else {
        return;
    };
    if source.check().is_err() {
        return;
    }
    for name in ["pages-1.img", "core-1.img", "pagemap-1.img"] {
        if source.has(name) {
            let mut sink = Vec::new();
            let _ = source.write_image(name, &mut sink);
        }
    }
});
