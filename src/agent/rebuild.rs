//! Rebuilding a migration's CRIU images: metadata files as received, page
//! files from their recipes and the page store, in parallel (each page of
//! the output is an independent 4 KiB copy into a shared mapping of the new
//! file). Every file's size and xxh3-128 must equal the source's.
//!
//! Laid out ahead: at the end of pre-copy the source sends each process's
//! page layout as it last saw it (addresses and digests, in the order CRIU
//! writes them), and [`lay_out`] writes that pages image while the
//! application still runs. At the final copy, when the pagemap CRIU wrote
//! lists the same addresses, the file laid out ahead becomes the pages
//! image and only the pages whose content changed since are written: the
//! frozen phase no longer copies the whole memory a second time. When the
//! addresses differ, the file is rebuilt whole from the recipe.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::store::PageStore;
use crate::image::Pagemap;
use crate::page::Digest;
use crate::transport::msg::ImageEntry;
use crate::transport::pages::{self, ZERO_PAGE};
use crate::PAGE_SIZE;

/// What a rebuild wrote.
pub struct Rebuilt {
    pub bytes: u64,
    pub pages_from_store: u64,
    /// Pages already in place in a file laid out ahead.
    pub pages_in_place: u64,
}

/// A pages image laid out ahead for one process.
pub struct Ahead {
    pub path: PathBuf,
    pub vaddrs: Vec<u64>,
    /// What each page of the file holds (NOT_WRITTEN where the store lacked it).
    pub digests: Vec<Digest>,
}

/// Marks a page of a file laid out ahead that could not be written.
const NOT_WRITTEN: Digest = u128::MAX;

/// Writes `digests` (pages of the store; ZERO_PAGE as zeros) into a new
/// file `path`.
pub fn lay_out(
    store: &PageStore,
    path: &Path,
    vaddrs: Vec<u64>,
    mut digests: Vec<Digest>,
) -> Result<Ahead, String> {
    let view = store
        .view()
        .map_err(|e| format!("cannot map the page store: {e}"))?;
    let err = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    file.set_len((digests.len() * PAGE_SIZE) as u64)
        .map_err(err)?;
    if !digests.is_empty() {
        let mut map = crate::sys::mmap::map_writable(&file).map_err(err)?;
        map.par_chunks_mut(PAGE_SIZE)
            .zip(digests.par_iter_mut())
            .for_each(|(dst, d)| {
                if *d == ZERO_PAGE {
                    return;
                }
                match view.page(*d) {
                    Some(src) => dst.copy_from_slice(src),
                    None => *d = NOT_WRITTEN,
                }
            });
    }
    Ok(Ahead {
        path: path.to_path_buf(),
        vaddrs,
        digests,
    })
}

/// The addresses of the pages in each pages image (by pages id), from the
/// pagemaps among `files`, with the pid they belong to.
fn page_addresses(files: &[(ImageEntry, Vec<u8>)]) -> HashMap<u32, (i32, Vec<u64>)> {
    let mut out = HashMap::new();
    for (entry, blob) in files {
        let Some(pid) = entry
            .name
            .strip_prefix("pagemap-")
            .and_then(|n| n.strip_suffix(".img"))
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(pm) = Pagemap::parse(Path::new(&entry.name), blob) else {
            continue;
        };
        let vaddrs = pm
            .ranges
            .iter()
            .filter(|r| r.is_present() && !r.is_in_parent())
            .flat_map(|r| (0..r.nr_pages).map(move |k| r.vaddr + k * PAGE_SIZE as u64))
            .collect();
        out.insert(pm.pages_id, (pid, vaddrs));
    }
    out
}

/// Writes every file into `dir` (which must exist) and checks it.
pub fn rebuild(
    store: &PageStore,
    files: &[(ImageEntry, Vec<u8>)],
    dir: &Path,
    ahead: &mut HashMap<i32, Ahead>,
) -> Result<Rebuilt, String> {
    let addresses = page_addresses(files);
    let view = store
        .view()
        .map_err(|e| format!("cannot map the page store: {e}"))?;
    let mut out = Rebuilt {
        bytes: 0,
        pages_from_store: 0,
        pages_in_place: 0,
    };
    for (entry, blob) in files {
        let path = dir.join(&entry.name);
        let err = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
        let sum = if entry.recipe {
            let recipe = pages::decode_digests(blob).map_err(|e| format!("{}: {e}", entry.name))?;
            // The file laid out ahead for this pages image, if it matches.
            let pages_id = entry
                .name
                .strip_prefix("pages-")
                .and_then(|n| n.strip_suffix(".img"))
                .and_then(|n| n.parse::<u32>().ok());
            let matched = pages_id
                .and_then(|id| addresses.get(&id))
                .and_then(|(pid, vaddrs)| {
                    let a = ahead.remove(pid)?;
                    if a.vaddrs == *vaddrs && a.digests.len() == recipe.len() {
                        Some(a)
                    } else {
                        let first = a
                            .vaddrs
                            .iter()
                            .zip(vaddrs.iter())
                            .position(|(x, y)| x != y)
                            .unwrap_or(a.vaddrs.len().min(vaddrs.len()));
                        tracing::info!(
                            file = %entry.name,
                            ahead = a.vaddrs.len(),
                            dumped = vaddrs.len(),
                            first_difference = format!("{:x?}", vaddrs.get(first)),
                            "pages laid out ahead do not match the final pagemap: full rebuild"
                        );
                        let _ = fs::remove_file(&a.path);
                        None
                    }
                });
            let file = match &matched {
                Some(a) => {
                    fs::rename(&a.path, &path).map_err(err)?;
                    fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(err)?
                }
                None => fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(err)?,
            };
            let before: &[Digest] = matched.as_ref().map_or(&[], |a| a.digests.as_slice());
            file.set_len((recipe.len() * PAGE_SIZE) as u64)
                .map_err(err)?;
            if recipe.is_empty() {
                xxhash_rust::xxh3::xxh3_128(&[])
            } else {
                let mut map = crate::sys::mmap::map_writable(&file).map_err(err)?;
                map.par_chunks_mut(PAGE_SIZE)
                    .zip(recipe.par_iter())
                    .enumerate()
                    .try_for_each(|(i, (dst, d))| {
                        if before.get(i) == Some(d) {
                            return Ok(()); // laid out ahead, unchanged
                        }
                        if *d == ZERO_PAGE {
                            if !before.is_empty() {
                                dst.fill(0);
                            }
                            return Ok(()); // a new file reads as zeros
                        }
                        let src = view.page(*d).ok_or_else(|| {
                            format!("{}: page {d:032x} was never received", entry.name)
                        })?;
                        dst.copy_from_slice(src);
                        Ok::<(), String>(())
                    })?;
                let non_zero = recipe.iter().filter(|d| **d != ZERO_PAGE).count() as u64;
                let in_place = recipe
                    .iter()
                    .zip(before)
                    .filter(|(a, b)| a == b && **a != ZERO_PAGE)
                    .count() as u64;
                out.pages_in_place += in_place;
                out.pages_from_store += non_zero - in_place;
                xxhash_rust::xxh3::xxh3_128(&map)
            }
        } else {
            fs::write(&path, blob).map_err(err)?;
            xxhash_rust::xxh3::xxh3_128(blob)
        };
        let size = fs::metadata(&path).map_err(err)?.len();
        let sum = format!("{sum:032x}");
        if size != entry.size || sum != entry.checksum {
            return Err(format!(
                "rebuilt {} does not match the source's ({size} bytes, checksum {sum}; expected {} bytes, {})",
                entry.name, entry.size, entry.checksum
            ));
        }
        out.bytes += size;
    }
    // Layouts of processes the dump did not have: not part of the images.
    for (_, a) in ahead.drain() {
        let _ = fs::remove_file(&a.path);
    }
    Ok(out)
}
