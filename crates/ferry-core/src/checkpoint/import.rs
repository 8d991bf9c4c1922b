//! Reading the standard checkpoint archive: the tar that podman (`podman
//! container checkpoint --export`), CRI-O and the kubelet write, plain or
//! zstd-compressed. It holds `checkpoint/` (CRIU's images), the engine's
//! `config.dump` and `spec.dump`, `rootfs-diff.tar` and `deleted.files`
//! (the container's writable layer), `network.status`, `stats-dump` and
//! more. ferry takes the images as they are, the layer as a container's
//! files (`ferry-fs.json`), and keeps the engine's own files beside them
//! under `podman-` names; then it packs them into a ferry archive.
//!
//! The tar is untrusted: only plain names are taken (`checkpoint/NAME` and
//! the known top-level files), each at most [`MAX_ENTRY`] bytes, with room
//! checked by the filesystem; anything else is passed over and listed.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{staging, CheckpointError};
use crate::target::fs::{FsManifest, FsRoot, RootKind, DELETED_FILES, ROOTFS_DIFF};
use ferry_archive::{pack_to_file, PackOptions, PackReport};
use ferry_image::ImagesDir;

/// Largest single file taken from the tar.
const MAX_ENTRY: u64 = 64 << 30;
/// Largest deletion list read.
const MAX_DELETED: u64 = 64 << 20;

/// What an import found and made.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub source: String,
    pub source_bytes: u64,
    /// "zstd" or "none".
    pub compression: &'static str,
    /// CRIU images taken from `checkpoint/`.
    pub images: usize,
    /// The engine's files kept beside them (`podman-config.dump`, ...).
    pub engine_files: Vec<String>,
    /// Whether it carried a writable layer (`rootfs-diff.tar`).
    pub layer: bool,
    /// Named volumes it carried (`volumes/NAME.tar`).
    pub volumes: Vec<String>,
    pub deleted_files: usize,
    /// Entries not taken (directories such as `artifacts/`, logs).
    pub passed_over: Vec<String>,
    #[serde(serialize_with = "ferry_image::units::serde_micros")]
    pub read: Duration,
    pub pack: Option<PackReport>,
}

/// Whether `path` starts like a standard checkpoint archive (a zstd
/// stream or a tar), not a ferry archive.
pub fn is_standard(path: &Path) -> bool {
    let mut head = [0u8; 512];
    let n = File::open(path)
        .and_then(|mut f| read_up_to(&mut f, &mut head))
        .unwrap_or(0);
    head[..n.min(4)] == ZSTD_MAGIC[..] || (n >= 262 && &head[257..262] == b"ustar")
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

fn read_up_to(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Unpacks the standard archive `src` into the images directory `dir`
/// (created): CRIU's images, the container's layer as its files, the
/// engine's files under `podman-` names.
pub fn unpack_standard(src: &Path, dir: &Path) -> Result<ImportReport, CheckpointError> {
    let start = Instant::now();
    let bad = |detail: String| CheckpointError::Import {
        path: src.to_path_buf(),
        detail,
    };
    let source_bytes = fs::metadata(src)
        .map_err(|e| bad(format!("cannot read it: {e}")))?
        .len();
    let mut file = File::open(src).map_err(|e| bad(format!("cannot open it: {e}")))?;
    let mut magic = [0u8; 4];
    let got = read_up_to(&mut file, &mut magic).map_err(|e| bad(e.to_string()))?;
    drop(file);
    let file = BufReader::with_capacity(
        1 << 20,
        File::open(src).map_err(|e| bad(format!("cannot open it: {e}")))?,
    );
    let (reader, compression): (Box<dyn Read>, _) = if got == 4 && magic == ZSTD_MAGIC {
        let z = zstd::stream::read::Decoder::with_buffer(file)
            .map_err(|e| bad(format!("not a zstd stream: {e}")))?;
        (Box::new(z), "zstd")
    } else {
        (Box::new(file), "none")
    };
    fs::create_dir_all(dir).map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
    let mut report = ImportReport {
        source: src.display().to_string(),
        source_bytes,
        compression,
        images: 0,
        engine_files: Vec::new(),
        layer: false,
        volumes: Vec::new(),
        deleted_files: 0,
        passed_over: Vec::new(),
        read: Duration::ZERO,
        pack: None,
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("damaged tar: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("damaged tar: {e}")))?
            .to_string_lossy()
            .into_owned();
        let path = path.trim_start_matches("./").to_string();
        let regular = entry.header().entry_type().is_file();
        let Some(name) = regular.then(|| target_name(&path)).flatten() else {
            if !path.is_empty() && !path.ends_with('/') {
                report.passed_over.push(path);
            }
            continue;
        };
        let size = entry.size();
        if size > MAX_ENTRY {
            return Err(bad(format!(
                "'{path}' declares {size} bytes, more than ferry takes"
            )));
        }
        let to = dir.join(&name);
        let mut out = File::options()
            .write(true)
            .create_new(true)
            .open(&to)
            .map_err(|e| {
                bad(format!(
                    "cannot write {} (twice in the tar?): {e}",
                    to.display()
                ))
            })?;
        let copied = io::copy(&mut (&mut entry).take(size), &mut out)
            .map_err(|e| bad(format!("cannot take '{path}': {e}")))?;
        if copied != size {
            return Err(bad(format!(
                "'{path}' ends early: {copied} of {size} bytes"
            )));
        }
        match &path {
            p if p.starts_with("checkpoint/") => report.images += 1,
            p if p.starts_with("volumes/") => report
                .volumes
                .push(volume_of(p).unwrap_or_default().to_string()),
            p if p == ROOTFS_DIFF => report.layer = true,
            p if p == DELETED_FILES || p == "stats-dump" => {}
            _ => report.engine_files.push(name),
        }
    }
    report.deleted_files = write_manifest(dir, report.layer, &report.volumes).map_err(bad)?;
    ImagesDir::open(dir)
        .and_then(|d| d.validate())
        .map_err(|source| CheckpointError::BadImages {
            path: src.to_path_buf(),
            source,
        })?;
    report.read = start.elapsed();
    Ok(report)
}

/// Where a tar entry goes in the images directory, if it is taken.
fn target_name(path: &str) -> Option<String> {
    let plain = |n: &str| !n.is_empty() && !n.contains('/') && !n.starts_with('.');
    if let Some(name) = path.strip_prefix("checkpoint/") {
        return plain(name).then(|| name.to_string());
    }
    if let Some(volume) = volume_of(path) {
        return Some(volume_file(volume));
    }
    match path {
        ROOTFS_DIFF | DELETED_FILES | "stats-dump" => Some(path.to_string()),
        "config.dump" | "spec.dump" | "network.status" | "devshm-checkpoint.tar" => {
            Some(format!("podman-{path}"))
        }
        _ => None,
    }
}

/// The volume `volumes/NAME.tar` holds, if `path` is one.
fn volume_of(path: &str) -> Option<&str> {
    let name = path.strip_prefix("volumes/")?.strip_suffix(".tar")?;
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    plain.then_some(name)
}

/// The file a volume's tar takes beside the images.
fn volume_file(name: &str) -> String {
    format!("volume-{name}.tar")
}

/// Makes the container's files of an import known to ferry: a layer root
/// over `rootfs-diff.tar` with its deletions from `deleted.files`
/// (absolute paths in the container), and a root per named volume.
/// Returns the deletions' count.
fn write_manifest(dir: &Path, layer: bool, volumes: &[String]) -> Result<usize, String> {
    let deleted_path = dir.join(DELETED_FILES);
    let deleted: Vec<String> = match File::open(&deleted_path) {
        Ok(f) => {
            let mut text = Vec::new();
            f.take(MAX_DELETED + 1)
                .read_to_end(&mut text)
                .map_err(|e| e.to_string())?;
            if text.len() as u64 > MAX_DELETED {
                return Err("deleted.files is larger than ferry reads".into());
            }
            serde_json::from_slice::<Vec<String>>(&text)
                .map_err(|e| format!("deleted.files is not a list of paths: {e}"))?
                .into_iter()
                .map(|p| p.trim_start_matches('/').to_string())
                .filter(|p| !p.is_empty())
                .collect()
        }
        Err(_) => Vec::new(),
    };
    let mut roots = Vec::new();
    for v in volumes {
        let tar = volume_file(v);
        roots.push(FsRoot {
            kind: RootKind::Volume { name: v.clone() },
            bytes: fs::metadata(dir.join(&tar)).map_or(0, |m| m.len()),
            tar,
            source: PathBuf::new(),
            identity: None,
            deleted: Vec::new(),
            opaque: Vec::new(),
            files: 0,
            base: None,
            removed: Vec::new(),
        });
    }
    if !layer && deleted.is_empty() {
        if !roots.is_empty() {
            let manifest = FsManifest { roots };
            manifest.write(dir).map_err(|e| e.to_string())?;
            FsManifest::read(dir).map_err(|e| e.to_string())?;
        }
        return Ok(0);
    }
    if !layer {
        // Deletions with no layer: an empty one carries them.
        let empty = tar::Builder::new(Vec::new())
            .into_inner()
            .map_err(|e| e.to_string())?;
        fs::write(dir.join(ROOTFS_DIFF), empty).map_err(|e| e.to_string())?;
    }
    let count = deleted.len();
    roots.insert(
        0,
        FsRoot {
            kind: RootKind::Layer,
            tar: ROOTFS_DIFF.into(),
            source: PathBuf::new(),
            identity: None,
            deleted,
            opaque: Vec::new(),
            files: 0,
            bytes: fs::metadata(dir.join(ROOTFS_DIFF)).map_or(0, |m| m.len()),
            base: None,
            removed: Vec::new(),
        },
    );
    let manifest = FsManifest { roots };
    // Checked as any manifest is before it is written.
    manifest.write(dir).map_err(|e| e.to_string())?;
    FsManifest::read(dir).map_err(|e| e.to_string())?;
    Ok(count)
}

/// `ferry import`: the standard archive `src` into the ferry archive `out`
/// (deduplicated, compressed, indexed), through a staging directory.
pub fn import_standard(
    src: &Path,
    out: &Path,
    pack: &PackOptions,
    staging_base: Option<&Path>,
) -> Result<ImportReport, CheckpointError> {
    // Room for the unpacked images: a compressed tar may hold several
    // times its size.
    let need = fs::metadata(src).map_or(0, |m| m.len()).saturating_mul(4);
    let stage = staging::create("ferry-import-", need, staging_base).map_err(|source| {
        CheckpointError::Staging {
            path: staging::base_for(need, staging_base),
            source,
        }
    })?;
    let dir = stage.path().join("images");
    let mut report = unpack_standard(src, &dir)?;
    report.pack = Some(
        pack_to_file(&dir, out, pack).map_err(|source| CheckpointError::Pack {
            images: dir.clone(),
            source: Box::new(source),
        })?,
    );
    Ok(report)
}
