//! Fuzzes ferry's CRIU image reader: every parser must reject malformed
//! input with an error, never panic or allocate without bound.

#![no_main]

use std::path::Path;

use ferry::image::{core, inventory, mm::MemoryMap, pagemap::Pagemap, pstree, DumpStats};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = Path::new("fuzz.img");
    let _ = Pagemap::parse(p, data);
    let _ = pstree::parse(p, data);
    let _ = core::parse(p, data);
    let _ = MemoryMap::parse(p, data);
    let _ = inventory::parse(p, data);
    let _ = DumpStats::parse(p, data);
});
