//! Round trips and corruption of archives built from synthetic images
//! directories (no CRIU needed: pack treats images as files).

use std::fs;
use std::path::{Path, PathBuf};

use super::format::{Header, HEADER_LEN};
use super::*;
use ferry_sys::PAGE_SIZE;

fn opts(parent: Option<PathBuf>, threads: usize) -> PackOptions<'static> {
    PackOptions {
        level: 3,
        threads,
        parent,
        source: "test".into(),
        progress: &NoProgress,
    }
}

/// Fills page `i` as the bundled workload mixes its pages: a quarter each
/// zero, repeated (16 templates), text and random (`seed` varies the
/// random ones), chosen by a hash of `i`.
fn fill_page(page: &mut [u8], i: usize, seed: u64) {
    let kind = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 62;
    let mut rng = match kind {
        0 => return page.fill(0),
        1 => fastrand::Rng::with_seed(0xA5A5 ^ (i as u64 % 16)),
        2 => fastrand::Rng::with_seed(0x7E47 ^ i as u64),
        _ => fastrand::Rng::with_seed(0x4A4D ^ (i as u64 + seed * 1_000_000)),
    };
    for b in page.iter_mut() {
        *b = if kind == 2 {
            b"etaoin shrdlu\n"[rng.usize(..14)]
        } else {
            rng.u8(..)
        };
    }
}

/// A directory shaped like CRIU's: a pages image with the workload's page
/// mix (`seed` varies the random pages), a larger-than-a-chunk data file,
/// small and empty files.
fn images(dir: &Path, pages: usize, seed: u64) {
    fs::create_dir_all(dir).unwrap();
    let mut bytes = vec![0u8; pages * PAGE_SIZE];
    for (i, p) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_page(p, i, seed);
    }
    fs::write(dir.join("pages-1.img"), &bytes).unwrap();
    fs::write(dir.join("pages-2.img"), b"").unwrap();
    let big: Vec<u8> = (0..(CHUNK_PAGES * PAGE_SIZE + 5000))
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    fs::write(dir.join("tmpfs-dev-1.tar.gz.img"), &big).unwrap();
    fs::write(dir.join("core-1.img"), b"core image bytes").unwrap();
    fs::write(dir.join("empty.img"), b"").unwrap();
}

fn same_files(a: &Path, b: &Path) {
    let mut names: Vec<_> = fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    let mut other: Vec<_> = fs::read_dir(b)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    other.sort();
    assert_eq!(names, other);
    for n in names {
        assert!(
            fs::read(a.join(&n)).unwrap() == fs::read(b.join(&n)).unwrap(),
            "{n:?} differs"
        );
    }
}

fn unpack_to(archive: &Path, dest: &Path) -> Result<UnpackReport, ArchiveError> {
    let chain = Chain::open(archive, None)?;
    unpack_to_dir(&chain, dest, 2, &NoProgress)
}

#[test]
fn round_trip_is_byte_identical() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    images(&src, 3000, 0);
    for threads in [1, 2] {
        let a = t.path().join(format!("a{threads}.ferry"));
        let r = pack_to_file(&src, &a, &opts(None, threads)).unwrap();
        assert_eq!(r.pages, 3000);
        assert!(r.zero_pages > 600 && r.duplicate_pages > 600, "{r:?}");
        assert_eq!(r.pages, r.zero_pages + r.duplicate_pages + r.new_pages);
        let out = t.path().join(format!("out{threads}"));
        unpack_to(&a, &out).unwrap();
        same_files(&src, &out);
    }
    // The same input gives the same bytes whatever the thread count, but
    // for the random id and the pack statistics: compare the chunk areas.
    let a1 = fs::read(t.path().join("a1.ferry")).unwrap();
    let a2 = fs::read(t.path().join("a2.ferry")).unwrap();
    let first_index = Archive::open(&t.path().join("a1.ferry"))
        .unwrap()
        .index()
        .chunks
        .last()
        .map(|c| c.offset)
        .unwrap();
    assert_eq!(
        a1[HEADER_LEN..first_index as usize],
        a2[HEADER_LEN..first_index as usize]
    );
}

#[test]
fn streams_to_a_writer_and_reads_from_memory() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    images(&src, 500, 0);
    let mut buf = Vec::new();
    pack_dir(&src, &mut buf, None, &opts(None, 2)).unwrap();
    let a = Archive::from_bytes(Path::new("mem"), &buf).unwrap();
    a.verify_chunks().unwrap();
    let core = a.file_index("core-1.img").unwrap();
    assert_eq!(a.file_data(core).unwrap(), b"core image bytes");
}

/// A writer that takes `room` bytes, then fails as a full disk does.
struct Full {
    room: usize,
}

impl std::io::Write for Full {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.room == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let n = b.len().min(self.room);
        self.room -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_writer_that_fails_fails_the_pack_with_its_error_at_any_point() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    images(&src, 3000, 0);
    let mut whole = Vec::new();
    pack_dir(&src, &mut whole, None, &opts(None, 2)).unwrap();
    for threads in [1, 2, 4] {
        for room in [0, 100, whole.len() / 3, whole.len() - 10] {
            let e = pack_dir(&src, Full { room }, None, &opts(None, threads))
                .expect_err("the writer failed");
            let text = ferry_image::units::chain(&e);
            assert!(
                text.contains("No space left"),
                "threads {threads}, room {room}: {text}"
            );
        }
    }
}

#[test]
fn packing_into_a_fifo_writes_through_it_and_leaves_it_a_fifo() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("images");
    images(&dir, 300, 1);
    let fifo = tmp.path().join("out.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::read(fifo).unwrap())
    };
    let report = pack_to_file(&dir, &fifo, &opts(None, 2)).unwrap();
    // Checked before joining: a reader of a replaced FIFO would wait forever.
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let bytes = reader.join().unwrap();
    assert_eq!(bytes.len() as u64, report.archive_bytes);
    let names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
}

#[test]
fn incremental_chain_of_three_stores_only_what_changed() {
    let t = tempfile::tempdir().unwrap();
    let (d0, d1, d2) = (
        t.path().join("d0"),
        t.path().join("d1"),
        t.path().join("d2"),
    );
    images(&d0, 2000, 0);
    images(&d1, 2000, 0);
    images(&d2, 2000, 1); // random pages changed
    let (a0, a1, a2) = (
        t.path().join("a0.ferry"),
        t.path().join("a1.ferry"),
        t.path().join("a2.ferry"),
    );
    let r0 = pack_to_file(&d0, &a0, &opts(None, 2)).unwrap();
    let r1 = pack_to_file(&d1, &a1, &opts(Some(a0.clone()), 2)).unwrap();
    let r2 = pack_to_file(&d2, &a2, &opts(Some(a1.clone()), 2)).unwrap();
    assert_eq!(r1.new_pages, 0, "{r1:?}");
    assert!(
        r1.archive_bytes * 20 < r0.archive_bytes,
        "{} vs {}",
        r1.archive_bytes,
        r0.archive_bytes
    );
    assert!(r2.new_pages > 0 && r2.parent_pages > 0, "{r2:?}");
    let chain = Chain::open(&a2, None).unwrap();
    assert_eq!(chain.generations(), 3);
    let out = t.path().join("out");
    unpack_to_dir(&chain, &out, 2, &NoProgress).unwrap();
    same_files(&d2, &out);
}

#[test]
fn every_flipped_byte_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    images(&src, 300, 0);
    let a = t.path().join("a.ferry");
    pack_to_file(&src, &a, &opts(None, 1)).unwrap();
    let good = fs::read(&a).unwrap();
    let bad = t.path().join("bad.ferry");
    // Every byte of small archives; a stride elsewhere keeps the test fast.
    let stride = (good.len() / 700).max(1);
    let mut positions: Vec<usize> = (0..good.len()).step_by(stride).collect();
    positions.extend(0..HEADER_LEN);
    positions.extend(good.len() - 64..good.len());
    for pos in positions {
        let mut b = good.clone();
        b[pos] ^= 0x40;
        fs::write(&bad, &b).unwrap();
        let out = t.path().join(format!("out-{pos}"));
        let err = unpack_to(&bad, &out).expect_err(&format!("flip at byte {pos} not detected"));
        assert!(!out.exists(), "flip at {pos}: partial output left behind");
        let msg = err.to_string();
        assert!(msg.contains("bad.ferry"), "flip at {pos}: {msg}");
    }
}

#[test]
fn truncation_is_refused_at_any_length() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    images(&src, 200, 0);
    let a = t.path().join("a.ferry");
    pack_to_file(&src, &a, &opts(None, 1)).unwrap();
    let good = fs::read(&a).unwrap();
    let bad = t.path().join("cut.ferry");
    for len in (0..good.len()).step_by((good.len() / 500).max(1)) {
        fs::write(&bad, &good[..len]).unwrap();
        let err = Archive::open(&bad).expect_err(&format!("cut at {len} accepted"));
        let msg = err.to_string();
        assert!(
            msg.contains("truncated")
                || msg.contains("not a ferry archive")
                || msg.contains("too short"),
            "cut at {len}: {msg}"
        );
    }
}

#[test]
fn another_major_version_is_refused_by_name() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    images(&src, 10, 0);
    let a = t.path().join("a.ferry");
    pack_to_file(&src, &a, &opts(None, 1)).unwrap();
    let mut b = fs::read(&a).unwrap();
    let h = Header::decode(b[..HEADER_LEN].try_into().unwrap()).unwrap();
    let newer = Header {
        major: h.major + 1,
        minor: 3,
        ..h
    };
    b[..HEADER_LEN].copy_from_slice(&newer.encode());
    fs::write(&a, &b).unwrap();
    let err = Archive::open(&a).unwrap_err().to_string();
    assert!(
        err.contains("archive format 3.3, but this ferry reads 2.x: upgrade ferry"),
        "{err}"
    );
    // An archive of format 1 digests its pages with xxh3, which a tenant
    // can collide: refused, with the way out.
    let older = Header {
        major: 1,
        minor: 1,
        ..h
    };
    b[..HEADER_LEN].copy_from_slice(&older.encode());
    fs::write(&a, &b).unwrap();
    let err = Archive::open(&a).unwrap_err().to_string();
    assert!(
        err.contains("format 1.1, but this ferry reads 2.x: written by an older ferry"),
        "{err}"
    );
}

#[test]
fn missing_and_wrong_parents_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let (d0, d1) = (t.path().join("d0"), t.path().join("d1"));
    images(&d0, 100, 0);
    images(&d1, 100, 1);
    let (a0, a1, other) = (
        t.path().join("a0.ferry"),
        t.path().join("a1.ferry"),
        t.path().join("other.ferry"),
    );
    pack_to_file(&d0, &a0, &opts(None, 1)).unwrap();
    pack_to_file(&d1, &a1, &opts(Some(a0.clone()), 1)).unwrap();
    pack_to_file(&d0, &other, &opts(None, 1)).unwrap();
    let err = Chain::open(&a1, Some(&other)).unwrap_err().to_string();
    assert!(
        err.contains("is not the archive this one was made from"),
        "{err}"
    );
    fs::rename(&a0, t.path().join("moved.ferry")).unwrap();
    let err = Chain::open(&a1, None).unwrap_err().to_string();
    assert!(
        err.contains("parent archive") && err.contains("not found"),
        "{err}"
    );
    // Given where it went, the chain resolves again.
    Chain::open(&a1, Some(&t.path().join("moved.ferry"))).unwrap();
}

#[test]
fn unpack_refuses_a_non_empty_destination() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    images(&src, 10, 0);
    let a = t.path().join("a.ferry");
    pack_to_file(&src, &a, &opts(None, 1)).unwrap();
    let dest = t.path().join("dest");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("keep"), b"x").unwrap();
    let err = unpack_to(&a, &dest).unwrap_err().to_string();
    assert!(err.contains("exists and is not empty"), "{err}");
    assert_eq!(fs::read(dest.join("keep")).unwrap(), b"x");
}

#[test]
fn a_pages_image_of_partial_pages_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("pages-1.img"), vec![1u8; 5000]).unwrap();
    let err = pack_to_file(&src, &t.path().join("a.ferry"), &opts(None, 1)).unwrap_err();
    assert!(
        err.to_string().contains("not a whole number of pages"),
        "{err}"
    );
    assert!(!t.path().join("a.ferry").exists());
}

#[test]
fn update_patches_an_unpacked_directory_to_the_next_generation() {
    let t = tempfile::tempdir().unwrap();
    let (d0, d1) = (t.path().join("d0"), t.path().join("d1"));
    images(&d0, 2000, 0);
    images(&d1, 2000, 1); // random pages changed
                          // Some pages of the first image become zero, one zero page data, a
                          // file goes, another comes, a pages image changes size.
    let mut p = fs::read(d1.join("pages-1.img")).unwrap();
    p[..3 * PAGE_SIZE].fill(0);
    let zero_at = p
        .chunks(PAGE_SIZE)
        .position(|c| c.iter().all(|&b| b == 0) && c.as_ptr() != p.as_ptr())
        .unwrap();
    p[zero_at * PAGE_SIZE] = 7;
    fs::write(d1.join("pages-1.img"), &p).unwrap();
    fs::write(d1.join("pages-2.img"), vec![3u8; 2 * PAGE_SIZE]).unwrap();
    fs::remove_file(d1.join("empty.img")).unwrap();
    fs::write(d1.join("new.img"), b"a new file").unwrap();
    let (a0, a1) = (t.path().join("a0.ferry"), t.path().join("a1.ferry"));
    pack_to_file(&d0, &a0, &opts(None, 2)).unwrap();
    pack_to_file(&d1, &a1, &opts(Some(a0.clone()), 2)).unwrap();
    let out = t.path().join("out");
    unpack_to(&a0, &out).unwrap();
    let (held, next) = (
        Chain::open(&a0, None).unwrap(),
        Chain::open(&a1, None).unwrap(),
    );
    let full = fs::metadata(d1.join("pages-1.img")).unwrap().len();
    let r = update(&next, &held, &out, 2, &NoProgress).unwrap();
    same_files(&d1, &out);
    assert!(
        r.bytes_written < full,
        "{} written of a {full}-byte image",
        r.bytes_written
    );
}

#[test]
fn update_refuses_a_damaged_chunk() {
    let t = tempfile::tempdir().unwrap();
    let (d0, d1) = (t.path().join("d0"), t.path().join("d1"));
    images(&d0, 500, 0);
    images(&d1, 500, 1);
    let (a0, a1) = (t.path().join("a0.ferry"), t.path().join("a1.ferry"));
    pack_to_file(&d0, &a0, &opts(None, 2)).unwrap();
    pack_to_file(&d1, &a1, &opts(Some(a0.clone()), 2)).unwrap();
    let out = t.path().join("out");
    unpack_to(&a0, &out).unwrap();
    let mut bytes = fs::read(&a1).unwrap();
    bytes[HEADER_LEN + 40] ^= 1;
    fs::write(&a1, &bytes).unwrap();
    let held = Chain::open(&a0, None).unwrap();
    let err = Chain::open(&a1, None)
        .and_then(|next| update(&next, &held, &out, 2, &NoProgress))
        .unwrap_err();
    assert!(err.to_string().contains("a1.ferry"), "{err}");
}

/// What a streamed restore would read: every image, byte for byte, over
/// several windows (so that chunks are evicted and loaded again) and
/// through a chain of three generations.
#[test]
fn streaming_gives_every_image_byte_identical() {
    use ferry_criu::streamer::ImageSource;
    let t = tempfile::tempdir().unwrap();
    let pages = stream::WINDOW_PAGES * 2 + 777;
    let (d0, d1, d2) = (
        t.path().join("d0"),
        t.path().join("d1"),
        t.path().join("d2"),
    );
    images(&d0, pages, 0);
    images(&d1, pages, 1);
    images(&d2, pages, 2);
    let (a0, a1, a2) = (
        t.path().join("a0.ferry"),
        t.path().join("a1.ferry"),
        t.path().join("a2.ferry"),
    );
    pack_to_file(&d0, &a0, &opts(None, 2)).unwrap();
    pack_to_file(&d1, &a1, &opts(Some(a0.clone()), 2)).unwrap();
    pack_to_file(&d2, &a2, &opts(Some(a1.clone()), 2)).unwrap();
    for (archive, dir) in [(&a0, &d0), (&a2, &d2)] {
        let chain = Chain::open(archive, None).unwrap();
        let source = stream::StreamSource::new(&chain, 2, &NoProgress).unwrap();
        source.check().unwrap();
        for e in fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(source.has(&name), "{name}");
            let mut out = Vec::new();
            let n = source.write_image(&name, &mut out).unwrap();
            assert_eq!(n as usize, out.len());
            assert!(out == fs::read(dir.join(&name)).unwrap(), "{name} differs");
        }
        assert!(!source.has("pstree.img"));
    }
}

/// A damaged chunk is found before anything is streamed, and nothing is
/// streamed before the chunks are checked.
#[test]
fn streaming_refuses_a_damaged_chunk_up_front() {
    use ferry_criu::streamer::ImageSource;
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    images(&src, 600, 0);
    let a = t.path().join("a.ferry");
    pack_to_file(&src, &a, &opts(None, 1)).unwrap();
    let mut bytes = fs::read(&a).unwrap();
    bytes[HEADER_LEN + 100] ^= 0x40;
    fs::write(&a, &bytes).unwrap();
    let chain = Chain::open(&a, None).unwrap();
    let source = stream::StreamSource::new(&chain, 2, &NoProgress).unwrap();
    let name = chain
        .head()
        .index()
        .files
        .iter()
        .find(|f| f.pages)
        .unwrap()
        .name
        .clone();
    let mut out = Vec::new();
    let unchecked = format!("{:?}", source.write_image(&name, &mut out).unwrap_err());
    assert!(unchecked.contains("not checked"), "{unchecked}");
    let err = source
        .check()
        .expect_err("a damaged chunk is refused")
        .to_string();
    assert!(
        err.contains("checksum mismatch") && err.contains("chunk"),
        "{err}"
    );
}

/// A streamed restore leaves the zero pages of plain private anonymous
/// memory out of the pagemap and the pages it streams, and those alone (a
/// private file mapping's zero pages stay); asked to write them, it
/// streams every image as it is.
#[test]
fn streaming_leaves_out_the_zero_pages_of_plain_anonymous_memory() {
    use criu_proto as pb;
    use ferry_criu::streamer::ImageSource;
    use ferry_image::framing::{IMG_COMMON_MAGIC, MM_MAGIC};
    use ferry_image::pagemap::{Pagemap, PE_LAZY, PE_PRESENT};
    use prost::Message;

    const ANON: u64 = 0x10_0000;
    const FILE: u64 = 0x1000_0000;
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d");
    let (pages, half) = (3000usize, 2000usize);
    images(&d, pages, 0);
    // The pagemap as CRIU frames it.
    let mut pm = Vec::new();
    pm.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    pm.extend_from_slice(&ferry_image::framing::PAGEMAP_MAGIC.to_le_bytes());
    let mut push = |payload: Vec<u8>| {
        pm.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        pm.extend_from_slice(&payload);
    };
    push(pb::PagemapHead { pages_id: 1 }.encode_to_vec());
    for (vaddr, nr_pages, flags) in [
        (ANON, half as u32, PE_PRESENT | PE_LAZY),
        (FILE, (pages - half) as u32, PE_PRESENT),
    ] {
        push(
            pb::PagemapEntry {
                vaddr,
                nr_pages,
                flags: Some(flags),
                ..Default::default()
            }
            .encode_to_vec(),
        );
    }
    fs::write(d.join("pagemap-1.img"), &pm).unwrap();
    let vma = |start: u64, n: usize, status: u32| pb::VmaEntry {
        start,
        end: start + (n * PAGE_SIZE) as u64,
        prot: 3,
        flags: 0x22,
        status,
        fd: -1,
        ..Default::default()
    };
    let mm = pb::MmEntry {
        vmas: vec![
            vma(ANON, half, 1 | 1 << 9),
            vma(FILE, pages - half, 1 | 1 << 6),
        ],
        ..Default::default()
    }
    .encode_to_vec();
    let mut mm_img = Vec::new();
    mm_img.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    mm_img.extend_from_slice(&MM_MAGIC.to_le_bytes());
    mm_img.extend_from_slice(&(mm.len() as u32).to_le_bytes());
    mm_img.extend_from_slice(&mm);
    fs::write(d.join("mm-1.img"), &mm_img).unwrap();
    let a = t.path().join("a.ferry");
    pack_to_file(&d, &a, &opts(None, 2)).unwrap();
    let chain = Chain::open(&a, None).unwrap();

    let original = fs::read(d.join("pages-1.img")).unwrap();
    let page = |i: usize| &original[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
    let is_zero = |i: usize| page(i).iter().all(|&b| b == 0);
    let left_out = |i: usize| i < half && is_zero(i);
    let zero_in_anon = (0..pages).filter(|&i| left_out(i)).count();
    assert!(zero_in_anon > 100 && (half..pages).any(is_zero));

    // By default a zero page inside a range stays unless its run is long
    // enough; runs at the ends of the range always go.
    let source = stream::StreamSource::new(&chain, 2, &NoProgress).unwrap();
    source.check().unwrap();
    let mut by_rule = 0;
    let mut i = 0;
    while i < half {
        let run = (i..half).take_while(|&k| is_zero(k)).count();
        if run > 0 && (i == 0 || i + run == half || run >= crate::MIN_INNER_RUN) {
            by_rule += run;
        }
        i += run.max(1);
    }
    assert!(by_rule > 0 && by_rule < zero_in_anon);
    assert_eq!(source.zero_pages_left_out(), by_rule as u64);

    // Every one left out: the exact pages and addresses streamed.
    let source = stream::StreamSource::new(&chain, 2, &NoProgress)
        .unwrap()
        .zero_pages(ZeroPages::LeaveOutEvery);
    source.check().unwrap();
    assert_eq!(source.zero_pages_left_out(), zero_in_anon as u64);
    let mut pm_out = Vec::new();
    source.write_image("pagemap-1.img", &mut pm_out).unwrap();
    let after = Pagemap::parse(Path::new("pagemap-1.img"), &pm_out).unwrap();
    let listed: Vec<u64> = after
        .ranges
        .iter()
        .flat_map(|r| (0..r.nr_pages).map(move |k| r.vaddr + k * PAGE_SIZE as u64))
        .collect();
    let vaddr = |i: usize| match i < half {
        true => ANON + (i * PAGE_SIZE) as u64,
        false => FILE + ((i - half) * PAGE_SIZE) as u64,
    };
    let expected: Vec<u64> = (0..pages).filter(|&i| !left_out(i)).map(vaddr).collect();
    assert_eq!(listed, expected);
    let mut pages_out = Vec::new();
    let n = source.write_image("pages-1.img", &mut pages_out).unwrap();
    assert_eq!(n as usize, pages_out.len());
    let expected: Vec<u8> = (0..pages)
        .filter(|&i| !left_out(i))
        .flat_map(|i| page(i).iter().copied())
        .collect();
    assert!(pages_out == expected, "the pages streamed differ");

    let source = stream::StreamSource::new(&chain, 2, &NoProgress)
        .unwrap()
        .zero_pages(ZeroPages::Write);
    source.check().unwrap();
    assert_eq!(source.zero_pages_left_out(), 0);
    for name in ["pagemap-1.img", "pages-1.img", "mm-1.img"] {
        let mut out = Vec::new();
        source.write_image(name, &mut out).unwrap();
        assert!(out == fs::read(d.join(name)).unwrap(), "{name} differs");
    }
}

/// A FIFO or a directory named as an archive (or recorded as a parent) is
/// refused at once: reading a FIFO would block for ever.
#[test]
fn only_regular_files_are_read_as_archives() {
    let t = tempfile::tempdir().unwrap();
    let fifo = t.path().join("fifo.ferry");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let start = std::time::Instant::now();
    let e = Archive::open(&fifo).unwrap_err();
    assert!(matches!(e, ArchiveError::NotAFile { .. }), "{e}");
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
    let e = Archive::open(t.path()).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");

    // A child whose recorded parent is a FIFO.
    let d0 = t.path().join("d0");
    let d1 = t.path().join("d1");
    images(&d0, 300, 0);
    images(&d1, 300, 1);
    let (a0, a1) = (t.path().join("a0.ferry"), t.path().join("a1.ferry"));
    pack_to_file(&d0, &a0, &opts(None, 1)).unwrap();
    pack_to_file(&d1, &a1, &opts(Some(a0.clone()), 1)).unwrap();
    fs::remove_file(&a0).unwrap();
    nix::unistd::mkfifo(&a0, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let e = Chain::open(&a1, None).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
}

/// An index with valid checksums that declares a thousand zero runs of
/// 2^32-1 pages each (17 EB of memory in a few hundred bytes): unpacking
/// and streaming refuse it by name before allocating anything per page.
#[test]
fn an_archive_declaring_more_pages_than_the_host_holds_is_refused() {
    use super::format::{FileEntry, Index, Trailer, VERSION_MAJOR, VERSION_MINOR};
    use prost::Message;
    let n = 1000;
    let index = Index {
        files: vec![FileEntry {
            name: "pages-1.img".into(),
            size: u64::from(u32::MAX) * n * PAGE_SIZE as u64,
            checksum: vec![0; 16],
            pages: true,
            data_chunks: vec![],
            run_sources: vec![0; n as usize],
            run_lens: vec![u32::MAX; n as usize],
            run_slots: vec![0; n as usize],
        }],
        page_size: PAGE_SIZE as u32,
        page_key: vec![7; 32],
        ..Default::default()
    }
    .encode_to_vec();
    let stored = zstd::bulk::compress(&index, 1).unwrap();
    let trailer = Trailer {
        index_offset: HEADER_LEN as u64,
        index_len: stored.len() as u64,
        index_raw_len: index.len() as u64,
        index_checksum: xxhash_rust::xxh3::xxh3_64(&stored),
    };
    let header = Header {
        major: VERSION_MAJOR,
        minor: VERSION_MINOR,
        flags: 0,
        id: [9; 16],
    };
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(&stored);
    bytes.extend_from_slice(&trailer.encode());
    assert!(bytes.len() < 4096, "{} bytes", bytes.len());
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("huge.ferry");
    fs::write(&path, &bytes).unwrap();
    let archive = Archive::open(&path).unwrap();
    assert_eq!(archive.declared_pages(), u64::from(u32::MAX) * n);

    let e = unpack_to(&path, &t.path().join("out")).unwrap_err();
    assert!(matches!(e, ArchiveError::MoreMemoryThanHost { .. }), "{e}");
    assert!(e.to_string().contains("refused before allocating"), "{e}");
    let chain = Chain::open(&path, None).unwrap();
    let source = super::stream::StreamSource::new(&chain, 1, &NoProgress).unwrap();
    let e = source.check_layouts().unwrap_err();
    assert!(matches!(e, ArchiveError::MoreMemoryThanHost { .. }), "{e}");
}

/// A parent an archive records is followed only to a file of ferry's own
/// user; one the user names with --parent is taken as given.
#[test]
fn a_recorded_parent_someone_else_owns_is_not_followed() {
    use std::os::unix::fs::chown;
    let t = tempfile::tempdir().unwrap();
    let (d0, d1) = (t.path().join("d0"), t.path().join("d1"));
    images(&d0, 300, 0);
    images(&d1, 300, 1);
    let (a0, a1) = (t.path().join("a0.ferry"), t.path().join("a1.ferry"));
    pack_to_file(&d0, &a0, &opts(None, 1)).unwrap();
    pack_to_file(&d1, &a1, &opts(Some(a0.clone()), 1)).unwrap();
    Chain::open(&a1, None).unwrap();
    chown(&a0, Some(65534), None).unwrap();
    let e = Chain::open(&a1, None).unwrap_err();
    assert!(
        matches!(e, ArchiveError::ParentNotOwned { owner: 65534, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("--parent"), "{e}");
    let chain = Chain::open(&a1, Some(&a0)).unwrap();
    assert_eq!(chain.generations(), 2);
}

/// Each first archive digests its pages under a key of its own; an
/// incremental archive under its parent's, so that their digests compare.
#[test]
fn page_keys_are_per_chain() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    images(&src, 10, 0);
    let (a, b, c) = (
        t.path().join("a.ferry"),
        t.path().join("b.ferry"),
        t.path().join("c.ferry"),
    );
    pack_to_file(&src, &a, &opts(None, 1)).unwrap();
    pack_to_file(&src, &b, &opts(Some(a.clone()), 1)).unwrap();
    pack_to_file(&src, &c, &opts(None, 1)).unwrap();
    let key = |p: &Path| *Archive::open(p).unwrap().page_key();
    assert_eq!(key(&a), key(&b));
    assert_ne!(key(&a), key(&c));
    assert_eq!(Archive::open(&a).unwrap().index().page_key.len(), 32);
}
