//! Rebuilding a migration's CRIU images: metadata files as received, page
//! files from their recipes and the page store, in parallel (each page of
//! the output is an independent 4 KiB copy into a shared mapping of the new
//! file). Every file's size and xxh3-128 must equal the source's.

use std::fs;
use std::path::Path;

use rayon::prelude::*;

use super::store::PageStore;
use crate::transport::msg::ImageEntry;
use crate::transport::pages::{self, ZERO_PAGE};
use crate::PAGE_SIZE;

/// What a rebuild wrote.
pub struct Rebuilt {
    pub bytes: u64,
    pub pages_from_store: u64,
}

/// Writes every file into `dir` (which must exist) and checks it.
pub fn rebuild(
    store: &PageStore,
    files: &[(ImageEntry, Vec<u8>)],
    dir: &Path,
) -> Result<Rebuilt, String> {
    let view = store
        .view()
        .map_err(|e| format!("cannot map the page store: {e}"))?;
    let mut out = Rebuilt {
        bytes: 0,
        pages_from_store: 0,
    };
    for (entry, blob) in files {
        let path = dir.join(&entry.name);
        let err = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
        let sum = if entry.recipe {
            let recipe = pages::decode_digests(blob).map_err(|e| format!("{}: {e}", entry.name))?;
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(err)?;
            file.set_len((recipe.len() * PAGE_SIZE) as u64)
                .map_err(err)?;
            if recipe.is_empty() {
                xxhash_rust::xxh3::xxh3_128(&[])
            } else {
                let mut map = crate::sys::mmap::map_writable(&file).map_err(err)?;
                map.par_chunks_mut(PAGE_SIZE)
                    .zip(recipe.par_iter())
                    .try_for_each(|(dst, d)| {
                        if *d == ZERO_PAGE {
                            return Ok(()); // a new file reads as zeros
                        }
                        let src = view.page(*d).ok_or_else(|| {
                            format!("{}: page {d:032x} was never received", entry.name)
                        })?;
                        dst.copy_from_slice(src);
                        Ok::<(), String>(())
                    })?;
                out.pages_from_store += recipe.iter().filter(|d| **d != ZERO_PAGE).count() as u64;
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
    Ok(out)
}
