//! Throughput of the page scan behind `ferry inspect` (zero detection and
//! content hashing of every dumped page) and of pagemap decoding, on pages
//! made by the bundled workload's generator (its default mix: 25% zero,
//! 25% repeated, 25% text, 25% random).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_archive::inspect::PageScan;
use ferry_lab::workload::{fill_page, Mix};
use ferry_sys::PAGE_SIZE;

/// Size of the synthetic pages image: big enough to spread over all cores.
const IMAGE_MIB: usize = 64;

fn workload_pages(mib: usize) -> Vec<u8> {
    let pages = mib * (1 << 20) / PAGE_SIZE;
    let mix = Mix::default();
    let mut bytes = vec![0u8; pages * PAGE_SIZE];
    for (i, page) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_page(page, mix.class_of(1, i), 1, i as u64);
    }
    bytes
}

fn page_scan(c: &mut Criterion) {
    let bytes = workload_pages(IMAGE_MIB);
    let mut group = c.benchmark_group("page_scan");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.sample_size(20);
    group.bench_with_input(
        BenchmarkId::new("scan_bytes", format!("{IMAGE_MIB}MiB")),
        &bytes,
        |b, bytes| b.iter(|| PageScan::default().scan_bytes(bytes)),
    );
    group.finish();
}

criterion_group!(benches, page_scan);
criterion_main!(benches);
