//! Fuzzes the restore of a container's files: a manifest (`ferry-fs.json`)
//! and its tar, both from an untrusted archive or peer. Whatever they
//! hold, nothing may be written outside the destination directory, and
//! nothing may panic.

#![no_main]

use std::fs;

use ferry_core::target::fs::{self as files, FsManifest, MANIFEST_FILE, ROOTFS_DIFF};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (manifest, tar) = data[2..].split_at(split);
    let t = tempfile::tempdir().unwrap();
    let (images, dest, outside) = (
        t.path().join("img"),
        t.path().join("dst"),
        t.path().join("out"),
    );
    fs::create_dir_all(&images).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(images.join(MANIFEST_FILE), manifest).unwrap();
    fs::write(images.join(ROOTFS_DIFF), tar).unwrap();
    if let Ok(Some(m)) = FsManifest::read(&images) {
        if m.roots.len() <= 4 {
            let _ = files::restore(&m, &images, |_| Some(dest.clone()));
        }
    }
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "a restore wrote outside its destination"
    );
    let mut top: Vec<_> = fs::read_dir(t.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert!(
        top.iter().all(|n| n == "img" || n == "dst" || n == "out"),
        "a restore wrote beside its destination: {top:?}"
    );
});
