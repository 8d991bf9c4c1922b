//! Pack and unpack throughput of ferry archives on a synthetic images
//! directory holding the bundled workload's page mix (25% zero, 25%
//! repeated, 25% text, 25% random). `ferry bench compress` measures the same
//! on a real CRIU dump against zstd; this bench tracks the code alone.

use std::fs;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_archive::{pack_dir, pack_to_file, unpack, Chain, NoProgress, PackOptions};
use ferry_lab::workload::{fill_page, Mix};
use ferry_sys::PAGE_SIZE;

/// Size of the synthetic pages image.
const IMAGE_MIB: usize = 64;

fn images(dir: &Path) -> u64 {
    let pages = IMAGE_MIB * (1 << 20) / PAGE_SIZE;
    let mix = Mix::default();
    let mut bytes = vec![0u8; pages * PAGE_SIZE];
    for (i, page) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_page(page, mix.class_of(1, i), 1, i as u64);
    }
    fs::write(dir.join("pages-1.img"), &bytes).unwrap();
    fs::write(dir.join("core-1.img"), vec![7u8; 2000]).unwrap();
    bytes.len() as u64 + 2000
}

fn options(level: i32, threads: usize) -> PackOptions<'static> {
    PackOptions {
        level,
        threads,
        parent: None,
        source: "bench".into(),
        progress: &NoProgress,
    }
}

fn archive(c: &mut Criterion) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("images");
    fs::create_dir(&src).unwrap();
    let raw = images(&src);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut group = c.benchmark_group("archive");
    group.throughput(Throughput::Bytes(raw));
    group.sample_size(10);
    for level in [1, 3] {
        for threads in [1, cpus] {
            group.bench_function(BenchmarkId::new(format!("pack_l{level}"), threads), |b| {
                b.iter(|| pack_dir(&src, std::io::sink(), None, &options(level, threads)).unwrap())
            });
        }
    }
    let a = t.path().join("a.ferry");
    pack_to_file(&src, &a, &options(1, cpus)).unwrap();
    let chain = Chain::open(&a, None).unwrap();
    group.bench_function(BenchmarkId::new("unpack", cpus), |b| {
        b.iter(|| {
            let out = tempfile::tempdir_in(t.path()).unwrap();
            unpack(&chain, out.path(), cpus, &NoProgress).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, archive);
criterion_main!(benches);
