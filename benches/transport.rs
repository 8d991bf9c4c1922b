//! Throughput of ferry's transport: frames sealed (ChaCha20-Poly1305 under
//! Noise session keys) by one thread, sent over loopback TCP and opened by
//! another: the rate one migration stream can carry, per core, before any
//! link limits it. Payloads are incompressible (random bytes), as stored-
//! raw pages are.

use std::net::TcpListener;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_transport::{Conn, Incoming, Secret};

/// Bytes per frame: a batch of pages as a migration stream sends them.
const FRAME_BYTES: usize = 4 << 20;
/// Frames per measured transfer.
const FRAMES: usize = 16;

fn transport(c: &mut Criterion) {
    let key = Secret::from_bytes(b"a benchmark key, not a secret one");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server_key = key.clone();
    let receiver = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut conn = Conn::accept(s, &server_key, Duration::from_secs(5)).unwrap();
        conn.set_read_timeout(None).unwrap();
        let mut frames = 0u64;
        while let Ok(Some(Incoming::Pages(p))) = conn.recv() {
            frames += p.len() as u64 / FRAME_BYTES as u64;
        }
        frames
    });
    let mut conn = Conn::connect(&addr, &key, Duration::from_secs(5)).unwrap();
    let mut rng = fastrand::Rng::with_seed(5);
    let frame: Vec<u8> = (0..FRAME_BYTES).map(|_| rng.u8(..)).collect();
    let mut group = c.benchmark_group("transport");
    group.throughput(Throughput::Bytes((FRAME_BYTES * FRAMES) as u64));
    group.sample_size(10);
    group.bench_function("sealed_loopback_64MiB", |b| {
        b.iter(|| {
            for _ in 0..FRAMES {
                conn.send_pages(&frame, false).unwrap();
            }
        })
    });
    group.finish();
    drop(conn);
    let frames = receiver.join().unwrap();
    assert!(frames > 0);
}

criterion_group!(benches, transport);
criterion_main!(benches);
