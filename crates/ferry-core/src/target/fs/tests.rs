//! Capture and restore of trees: round trips, captures against a base,
//! and tars that try to leave their root.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use super::*;

fn layer_with_files(root: &Path) {
    fs::create_dir_all(root.join("app/small")).unwrap();
    fs::write(root.join("app/big"), vec![7u8; 300_000]).unwrap();
    for i in 0..20 {
        fs::write(root.join(format!("app/small/f{i}")), format!("small {i}")).unwrap();
    }
    fs::write(root.join("app/secret"), "s").unwrap();
    fs::set_permissions(root.join("app/secret"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(root.join("app/secret"), Some(1234), Some(4321)).unwrap();
    symlink("big", root.join("app/link")).unwrap();
    fs::hard_link(root.join("app/big"), root.join("app/hard")).unwrap();
    // A deletion of a lower file, and a directory hiding the lower one.
    fs::create_dir_all(root.join("etc")).unwrap();
    mknod(&root.join("etc/gone"), SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
    fs::create_dir_all(root.join("opaque")).unwrap();
    xattr::set(root.join("opaque"), OPAQUE_XATTR, b"y").unwrap();
}

use nix::sys::stat::{mknod, Mode, SFlag};

fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let mut names: Vec<_> = fs::read_dir(dir).unwrap().flatten().collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let p = e.path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let content = if m.is_file() {
                format!("{:x}", xxhash_rust::xxh3::xxh3_64(&fs::read(&p).unwrap()))
            } else if m.file_type().is_symlink() {
                fs::read_link(&p).unwrap().display().to_string()
            } else {
                String::new()
            };
            out.push(format!(
                "{rel} {:o} {}:{} {} {content}",
                m.mode(),
                m.uid(),
                m.gid(),
                if m.is_file() { m.nlink() } else { 0 }
            ));
            if m.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    walk(root, root, &mut out);
    out
}

fn layer_source(path: &Path) -> FsSource {
    FsSource {
        kind: RootKind::Layer,
        path: path.to_path_buf(),
    }
}

#[test]
fn a_layer_round_trips_with_owners_links_and_deletions() {
    let t = tempfile::tempdir().unwrap();
    let (src, images, dest) = (
        t.path().join("src"),
        t.path().join("img"),
        t.path().join("dst"),
    );
    layer_with_files(&src);
    fs::create_dir_all(&images).unwrap();
    let m = capture(&[layer_source(&src)], &images, None).unwrap();
    assert_eq!(m.roots[0].deleted, vec!["etc/gone".to_string()]);
    assert_eq!(m.roots[0].opaque, vec!["opaque".to_string()]);
    let read = FsManifest::read(&images).unwrap().unwrap();
    assert_eq!(read, m);
    let deleted: Vec<String> =
        serde_json::from_slice(&fs::read(images.join(DELETED_FILES)).unwrap()).unwrap();
    assert_eq!(deleted, vec!["/etc/gone".to_string()]);
    let r = restore(&read, &images, |_| Some(dest.clone())).unwrap();
    assert_eq!(
        r.files, 22,
        "big, 20 small, secret (the hard link is a link)"
    );
    assert_eq!(listing(&src), listing(&dest));
    assert_eq!(
        xattr::get(dest.join("opaque"), OPAQUE_XATTR)
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    let hard = fs::metadata(dest.join("app/hard")).unwrap();
    assert_eq!(
        hard.ino(),
        fs::metadata(dest.join("app/big")).unwrap().ino()
    );
}

#[test]
fn a_capture_against_its_base_holds_only_what_changed() {
    let t = tempfile::tempdir().unwrap();
    let (src, images, dest) = (
        t.path().join("src"),
        t.path().join("img"),
        t.path().join("dst"),
    );
    layer_with_files(&src);
    fs::create_dir_all(&images).unwrap();
    // The base, as a migration sends it while the container runs.
    let base_tar = images.join(format!("{BASE_PREFIX}{ROOTFS_DIFF}"));
    let first = capture_root(&src, &base_tar, true, None).unwrap();
    // Then the container writes, removes and replaces.
    fs::write(src.join("app/small/f3"), "changed").unwrap();
    fs::write(src.join("app/new"), "new").unwrap();
    fs::remove_file(src.join("app/small/f4")).unwrap();
    fs::remove_file(src.join("app/link")).unwrap();
    fs::create_dir(src.join("app/link")).unwrap();
    let base = FsBase {
        roots: vec![(
            RootKind::Layer,
            format!("{BASE_PREFIX}{ROOTFS_DIFF}"),
            first.snapshot,
        )],
    };
    let m = capture(&[layer_source(&src)], &images, Some(&base)).unwrap();
    let root = &m.roots[0];
    assert_eq!(root.files, 2, "only the changed and the new file: {root:?}");
    assert!(root.bytes < 100);
    assert_eq!(
        root.removed,
        vec!["app/link".to_string(), "app/small/f4".to_string()]
    );
    restore(&m, &images, |_| Some(dest.clone())).unwrap();
    assert_eq!(listing(&src), listing(&dest));
}

#[test]
fn a_volume_replaces_what_its_destination_held() {
    let t = tempfile::tempdir().unwrap();
    let (src, images, dest) = (
        t.path().join("src"),
        t.path().join("img"),
        t.path().join("dst"),
    );
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/x"), "x").unwrap();
    fs::create_dir_all(dest.join("old")).unwrap();
    fs::write(dest.join("stale"), "stale").unwrap();
    fs::create_dir_all(&images).unwrap();
    let source = FsSource {
        kind: RootKind::Volume { name: "v".into() },
        path: src.clone(),
    };
    let m = capture(&[source], &images, None).unwrap();
    assert_eq!(m.roots[0].tar, "volume-v.tar");
    restore(&m, &images, |_| Some(dest.clone())).unwrap();
    assert_eq!(listing(&src), listing(&dest));
    // Into the very directory it came from: left as it is.
    fs::write(src.join("after"), "a").unwrap();
    let r = restore(&m, &images, |_| Some(src.clone())).unwrap();
    assert_eq!(r.skipped_same, 1);
    assert!(src.join("after").exists());
}

#[test]
fn a_root_with_no_destination_is_an_error_not_a_loss() {
    let t = tempfile::tempdir().unwrap();
    let (src, images) = (t.path().join("src"), t.path().join("img"));
    layer_with_files(&src);
    fs::create_dir_all(&images).unwrap();
    let m = capture(&[layer_source(&src)], &images, None).unwrap();
    let e = restore(&m, &images, |_| None).unwrap_err();
    assert!(matches!(e, FsError::NoDestination { .. }), "{e}");
}

/// A tar entry whose path leaves the root, one that climbs through a link
/// it made itself, and a manifest naming paths outside: all refused,
/// nothing written outside.
#[test]
fn tars_and_manifests_that_leave_their_root_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let (images, dest, outside) = (
        t.path().join("img"),
        t.path().join("dst"),
        t.path().join("out"),
    );
    fs::create_dir_all(&images).unwrap();
    fs::create_dir_all(&outside).unwrap();
    let root = |deleted: Vec<String>| FsManifest {
        roots: vec![FsRoot {
            kind: RootKind::Layer,
            tar: ROOTFS_DIFF.into(),
            source: "/nonexistent".into(),
            identity: None,
            deleted,
            opaque: vec![],
            files: 0,
            bytes: 0,
            base: None,
            removed: vec![],
        }],
    };
    // A link to the outside, then a file written through it.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "esc", &outside).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    b.append_data(&mut h, "esc/pwned", &b"x"[..]).unwrap();
    fs::write(images.join(ROOTFS_DIFF), b.into_inner().unwrap()).unwrap();
    let e = restore(&root(vec![]), &images, |_| Some(dest.clone())).unwrap_err();
    assert!(
        matches!(e, FsError::Escapes { .. } | FsError::Io { .. }),
        "{e}"
    );
    assert!(!outside.join("pwned").exists());
    // A whiteout through that link.
    fs::write(
        images.join(ROOTFS_DIFF),
        tar::Builder::new(Vec::new()).into_inner().unwrap(),
    )
    .unwrap();
    let e = restore(&root(vec!["esc/gone".into()]), &images, |_| {
        Some(dest.clone())
    })
    .unwrap_err();
    assert!(matches!(e, FsError::Escapes { .. }), "{e}");
    assert!(!outside.join("gone").exists());
    // A manifest with a path that climbs, or a tar named outside.
    let mut m = root(vec!["../x".into()]);
    fs::write(images.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
    assert!(matches!(
        FsManifest::read(&images),
        Err(FsError::Escapes { .. })
    ));
    m.roots[0].deleted.clear();
    m.roots[0].tar = "../../etc/passwd".into();
    fs::write(images.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
    assert!(matches!(
        FsManifest::read(&images),
        Err(FsError::Escapes { .. })
    ));
}
