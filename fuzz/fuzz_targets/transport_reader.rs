//! Fuzzes what an agent reads from the network: frame decoding (header,
//! length, tag), and, as if the tag had checked out (a peer holding the
//! key), the decoding of page batches, digest lists and control messages.
//! Malformed input must be rejected with an error, never panic or allocate
//! without bound.

#![no_main]

use ferry_transport::frame::read_frame;
use ferry_transport::pages::{decode_batch, decode_bitmap, decode_digests};
use ferry_transport::Msg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let _ = read_frame(&mut r, &[7u8; 32]);
    let _ = decode_batch(data);
    let _ = decode_digests(data);
    let _ = decode_bitmap(data, data.len() * 8);
    let _ = serde_json::from_slice::<Msg>(data);
});
