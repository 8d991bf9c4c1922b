//! Fuzzes what an agent reads from the network: the handshake (frame
//! header, length bound, the Noise message), the sealed stream after it
//! (segment lengths, then, as if a peer holding the key had sealed these
//! bytes, frame headers, lengths and bounded decompression), and the
//! decoding of page batches, digest lists and control messages. Malformed
//! input must be rejected with an error, never panic or allocate without
//! bound.

#![no_main]

use ferry_transport::fuzzing;
use ferry_transport::pages::{decode_batch, decode_bitmap, decode_digests};
use ferry_transport::{Msg, Secret};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzzing::handshake(data);
    fuzzing::sealed(data);
    let _ = decode_batch(&Secret::from_bytes(b"fuzz").page_key(), data);
    let _ = decode_digests(data);
    let _ = decode_bitmap(data, data.len() * 8);
    let _ = serde_json::from_slice::<Msg>(data);
});
