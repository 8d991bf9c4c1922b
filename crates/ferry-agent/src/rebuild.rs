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
use ferry_image::page::Digest;
use ferry_image::Pagemap;
use ferry_sys::PAGE_SIZE;
use ferry_transport::msg::ImageEntry;
use ferry_transport::pages::{self, ZERO_PAGE};

/// Why a file could not be laid out or rebuilt.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RebuildError {
    #[error("cannot map the page store")]
    Store(#[source] std::io::Error),
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the page recipe of {file} is damaged")]
    Recipe {
        file: String,
        #[source]
        source: pages::PagesFault,
    },
    #[error("{file}: page {digest:032x} was never received")]
    MissingPage { file: String, digest: Digest },
    #[error("rebuilt {file} does not match the source's ({size} bytes, checksum {sum}; expected {expected_size} bytes, {expected_sum})")]
    Mismatch {
        file: String,
        size: u64,
        sum: String,
        expected_size: u64,
        expected_sum: String,
    },
}

/// What a rebuild wrote.
pub struct Rebuilt {
    pub bytes: u64,
    pub pages_from_store: u64,
    /// Pages already in place in a file laid out ahead.
    pub pages_in_place: u64,
}

/// A pages image laid out ahead for one process.
pub(crate) struct Ahead {
    pub path: PathBuf,
    pub vaddrs: Vec<u64>,
    /// What each page of the file holds (NOT_WRITTEN where the store lacked it).
    pub digests: Vec<Digest>,
    /// The file's checksum leaves, computed from what was written.
    pub leaves: Vec<u128>,
}

/// Marks a page of a file laid out ahead that could not be written.
const NOT_WRITTEN: Digest = u128::MAX;

/// Writes `digests` (pages of the store; ZERO_PAGE as zeros) into a new
/// file `path`.
pub(crate) fn lay_out(
    store: &PageStore,
    path: &Path,
    vaddrs: Vec<u64>,
    mut digests: Vec<Digest>,
) -> Result<Ahead, RebuildError> {
    let view = store.view().map_err(RebuildError::Store)?;
    let err = |source| RebuildError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    file.set_len((digests.len() * PAGE_SIZE) as u64)
        .map_err(err)?;
    let mut leaves = Vec::new();
    if !digests.is_empty() {
        let mut map = ferry_sys::mmap::map_writable(&file, false).map_err(err)?;
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
        leaves = pages::leaf_hashes(store.key(), &map);
    }
    Ok(Ahead {
        path: path.to_path_buf(),
        vaddrs,
        digests,
        leaves,
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
) -> Result<Rebuilt, RebuildError> {
    let addresses = page_addresses(files);
    let view = store.view().map_err(RebuildError::Store)?;
    let mut out = Rebuilt {
        bytes: 0,
        pages_from_store: 0,
        pages_in_place: 0,
    };
    for (entry, blob) in files {
        let path = dir.join(&entry.name);
        let err = |source| RebuildError::Write {
            path: path.clone(),
            source,
        };
        let sum = if entry.recipe {
            let t0 = std::time::Instant::now();
            let recipe = pages::decode_digests(blob).map_err(|source| RebuildError::Recipe {
                file: entry.name.clone(),
                source,
            })?;
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
                pages::file_checksum(store.key(), &[])
            } else {
                let mut map =
                    ferry_sys::mmap::map_writable(&file, matched.is_none()).map_err(err)?;
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
                        let src = view.page(*d).ok_or_else(|| RebuildError::MissingPage {
                            file: entry.name.clone(),
                            digest: *d,
                        })?;
                        dst.copy_from_slice(src);
                        Ok::<(), RebuildError>(())
                    })?;
                let non_zero = recipe.iter().filter(|d| **d != ZERO_PAGE).count() as u64;
                let in_place = recipe
                    .iter()
                    .zip(before)
                    .filter(|(a, b)| a == b && **a != ZERO_PAGE)
                    .count() as u64;
                out.pages_in_place += in_place;
                out.pages_from_store += non_zero - in_place;
                tracing::debug!(file = %entry.name, ms = t0.elapsed().as_millis() as u64, "pages written");
                let sum = match &matched {
                    // Laid out ahead: leaves of untouched pages are known.
                    Some(a) if a.leaves.len() == map.len().div_ceil(pages::CHECKSUM_LEAF_BYTES) => {
                        let per_leaf = pages::CHECKSUM_LEAF_BYTES / PAGE_SIZE;
                        let mut leaves = a.leaves.clone();
                        let stale: Vec<usize> = (0..leaves.len())
                            .filter(|l| {
                                let range = l * per_leaf..((l + 1) * per_leaf).min(recipe.len());
                                range.clone().any(|i| before[i] != recipe[i])
                            })
                            .collect();
                        let fresh: Vec<(usize, u128)> = stale
                            .par_iter()
                            .map(|&l| {
                                let from = l * pages::CHECKSUM_LEAF_BYTES;
                                let to = (from + pages::CHECKSUM_LEAF_BYTES).min(map.len());
                                (l, pages::leaf_hash(store.key(), &map[from..to]))
                            })
                            .collect();
                        for (l, h) in fresh {
                            leaves[l] = h;
                        }
                        pages::combine_leaves(&leaves)
                    }
                    _ => pages::file_checksum(store.key(), &map),
                };
                tracing::debug!(file = %entry.name, ms = t0.elapsed().as_millis() as u64, "pages checked");
                sum
            }
        } else {
            fs::write(&path, blob).map_err(err)?;
            pages::file_checksum(store.key(), blob)
        };
        let size = fs::metadata(&path).map_err(err)?.len();
        let sum = format!("{sum:032x}");
        if size != entry.size || sum != entry.checksum {
            return Err(RebuildError::Mismatch {
                file: entry.name.clone(),
                size,
                sum,
                expected_size: entry.size,
                expected_sum: entry.checksum.clone(),
            });
        }
        out.bytes += size;
    }
    // Layouts of processes the dump did not have: not part of the images.
    for (_, a) in ahead.drain() {
        let _ = fs::remove_file(&a.path);
    }
    Ok(out)
}
