//! Fuzzes the reader of the standard checkpoint archive (`ferry import`,
//! `ferry inspect` of podman's export): a tar, plain or zstd, of any
//! bytes. It must fail with an error or unpack only inside its directory;
//! never panic, never write beside it.

#![no_main]

use std::fs;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("export.tar");
    fs::write(&src, data).unwrap();
    let dir = t.path().join("images");
    let _ = ferry_core::checkpoint::unpack_standard(&src, &dir);
    let mut top: Vec<_> = fs::read_dir(t.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert!(
        top.iter().all(|n| n == "export.tar" || n == "images"),
        "an import wrote beside its directory: {top:?}"
    );
    if let Ok(rd) = fs::read_dir(&dir) {
        for e in rd.flatten() {
            assert!(
                e.file_type().unwrap().is_file(),
                "an import made something other than a file: {:?}",
                e.path()
            );
        }
    }
});
