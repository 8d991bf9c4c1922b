//! Fuzzes ferry's CRIU image reader: every parser must reject malformed
//! input with an error, never panic or allocate without bound.

#![no_main]

use std::path::Path;

use ferry_image::{core, inventory, mm::MemoryMap, pagemap, pagemap::Pagemap, pstree, DumpStats};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = Path::new("fuzz.img");
    // A pagemap rewrite allocates a flag per present page: a restore
    // bounds that by the length of the pages image, and so does this.
    if let Ok(pm) = Pagemap::parse(p, data) {
        if pm.present_pages() <= 1 << 20 {
            let _ =
                pagemap::without_pages(p, data, 3, |vaddr, i| (vaddr >> 12 ^ i as u64) & 1 == 0);
        }
    }
    let _ = pstree::parse(p, data);
    let _ = core::parse(p, data);
    if let Ok(mm) = MemoryMap::parse(p, data) {
        for v in &mm.vmas {
            let _ = mm.vma_at(v.start).map(|v| v.is_plain_private_anonymous());
        }
    }
    let _ = inventory::parse(p, data);
    let _ = DumpStats::parse(p, data);
});
