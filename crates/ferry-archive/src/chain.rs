//! An archive and its ancestors, found and checked before anything is read.

use std::path::{Path, PathBuf};

use super::format::{Digest, SOURCE_GEN_BASE};
use super::read::Archive;
use super::{id_hex, ArchiveError, Corruption};

/// An archive (generation 0) and its ancestors (generation g at index g).
#[derive(Debug)]
pub struct Chain {
    archives: Vec<Archive>,
}

impl Chain {
    /// Opens `path` and every ancestor it names. `parent` overrides where
    /// the direct parent is looked for; further ancestors are found where
    /// their children recorded them.
    pub fn open(path: &Path, parent: Option<&Path>) -> Result<Chain, ArchiveError> {
        let head = Archive::open(path)?;
        Chain::resolve(head, parent)
    }

    pub fn resolve(head: Archive, parent: Option<&Path>) -> Result<Chain, ArchiveError> {
        let ancestry = head.index().ancestry.clone();
        let head_path = head.path().to_path_buf();
        let mut archives = vec![head];
        for (g, expected) in ancestry.iter().enumerate() {
            let child = &archives[g];
            let Some(pref) = child.index().parent.clone() else {
                return Err(ArchiveError::corrupt(
                    child.path(),
                    Corruption::Index {
                        detail: format!("generation {} has no parent record", g),
                    },
                ));
            };
            let (candidate, given) = match (g, parent) {
                (0, Some(p)) => (p.to_path_buf(), true),
                _ => (locate(child.path(), &pref.path), false),
            };
            if !candidate.exists() {
                return Err(ArchiveError::ParentMissing {
                    path: child.path().to_path_buf(),
                    tried: candidate,
                    recorded: pref.path,
                });
            }
            // A path an archive records is followed only to a file of this
            // user: an archive from elsewhere cannot point ferry at files
            // someone else controls. One the user names is their choice.
            if !given {
                use std::os::unix::fs::MetadataExt;
                let owner = std::fs::metadata(&candidate)
                    .map_err(|e| ArchiveError::io("open parent archive", &candidate, e))?
                    .uid();
                if owner != nix::unistd::geteuid().as_raw() {
                    return Err(ArchiveError::ParentNotOwned {
                        path: child.path().to_path_buf(),
                        parent: candidate,
                        owner,
                    });
                }
            }
            let found = Archive::open(&candidate)?;
            if found.id()[..] != expected[..] || found.id()[..] != pref.id[..] {
                return Err(ArchiveError::ParentMismatch {
                    path: child.path().to_path_buf(),
                    parent: candidate,
                    expected: id_hex(expected),
                    found: id_hex(&found.id()),
                });
            }
            if found.slots() != pref.slots || found.index().ancestry[..] != ancestry[g + 1..] {
                return Err(ArchiveError::ParentMismatch {
                    path: child.path().to_path_buf(),
                    parent: candidate,
                    expected: format!(
                        "{} with {} pages and its ancestry",
                        id_hex(expected),
                        pref.slots
                    ),
                    found: format!("{} pages and another ancestry", found.slots()),
                });
            }
            if found.page_key() != archives[0].page_key() {
                return Err(ArchiveError::corrupt(
                    child.path(),
                    Corruption::Index {
                        detail: format!(
                            "its ancestor {} digests its pages under another key",
                            candidate.display()
                        ),
                    },
                ));
            }
            archives.push(found);
        }
        let chain = Chain { archives };
        chain.check_references(&head_path)?;
        Ok(chain)
    }

    /// Every page run of the head refers to slots its generation has.
    fn check_references(&self, head_path: &Path) -> Result<(), ArchiveError> {
        for f in &self.head().index().files {
            for r in 0..f.run_sources.len() {
                let src = f.run_sources[r];
                if src < SOURCE_GEN_BASE {
                    continue;
                }
                let g = (src - SOURCE_GEN_BASE) as usize;
                let end = u64::from(f.run_slots[r]) + u64::from(f.run_lens[r]);
                let have = self.archives.get(g).map_or(0, Archive::slots);
                if end > have {
                    return Err(ArchiveError::corrupt(
                        head_path,
                        Corruption::Index {
                            detail: format!(
                                "{}: run {r} needs slot {} of generation {g}, which holds {have}",
                                f.name,
                                end - 1
                            ),
                        },
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn head(&self) -> &Archive {
        &self.archives[0]
    }

    /// Generation `g` (0 is the head).
    pub fn generation(&self, g: usize) -> &Archive {
        &self.archives[g]
    }

    pub fn generations(&self) -> usize {
        self.archives.len()
    }

    pub(crate) fn slot_digest(&self, g: usize, slot: u64) -> Option<Digest> {
        self.archives.get(g)?.slot_digest(slot)
    }
}

/// Where a recorded parent path points, seen from the child archive.
fn locate(child: &Path, recorded: &str) -> PathBuf {
    let rec = Path::new(recorded);
    if rec.is_absolute() {
        return rec.to_path_buf();
    }
    child
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| rec.to_path_buf(), |d| d.join(rec))
}
