//! An images directory as a whole: what files it holds, typed access to each,
//! and the completeness check run before anything restores from it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::framing::{self, IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC};
use super::{
    core, inventory, pstree, DumpStats, ImageError, Inventory, MemoryMap, Pagemap, Problem,
    PstreeEntry, RestoreStats, TaskCore,
};
use ferry_sys::PAGE_SIZE;

/// What a file in an images directory is, for size accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileClass {
    /// `pages-*.img`: raw memory pages.
    Pages,
    /// Every other CRIU image (pstree, core, mm, pagemap, files, ...).
    Metadata,
    /// `stats-dump`, `stats-restore`.
    Stats,
    /// CRIU's log files.
    Log,
    /// Anything else (e.g. runc's `descriptors.json`).
    Other,
}

/// One file of an images directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageFile {
    pub name: String,
    pub bytes: u64,
    pub class: FileClass,
}

/// CRIU images written without a magic header: their contents belong to the
/// tool that produced them (pages, `ip` dumps, iptables, tmpfs tarballs).
const RAW_IMAGE_PREFIXES: &[&str] = &[
    "pages-",
    "ifaddr-",
    "route-",
    "route6-",
    "rule-",
    "iptables-",
    "ip6tables-",
    "nftables-",
    "tmpfs-",
    "netns-ct-",
    "netns-exp-",
];

/// The class of a file in an images directory, from its name.
pub fn classify_name(name: &str) -> FileClass {
    if name.starts_with("pages-") && name.ends_with(".img") {
        FileClass::Pages
    } else if name == "stats-dump" || name == "stats-restore" {
        FileClass::Stats
    } else if name.ends_with(".log") {
        FileClass::Log
    } else if name.ends_with(".img") {
        FileClass::Metadata
    } else {
        FileClass::Other
    }
}

/// A directory of CRIU images: on disk, or held in memory (the metadata
/// images of an archive, whose pages images are known only by size).
#[derive(Debug, Clone)]
pub struct ImagesDir {
    path: PathBuf,
    files: Vec<ImageFile>,
    /// Contents by name when the images are held in memory.
    memory: Option<BTreeMap<String, Vec<u8>>>,
}

/// What [`ImagesDir::validate`] established about a directory.
#[derive(Debug, Clone)]
pub struct Validated {
    pub inventory: Inventory,
    pub tree: Vec<PstreeEntry>,
    /// Every dumped thread's core image, by tid.
    pub cores: BTreeMap<u32, TaskCore>,
    /// Each process's pagemap, by pid (zombies have none).
    pub pagemaps: BTreeMap<u32, Pagemap>,
    /// Shared-memory pagemaps, by file name.
    pub shmem_pagemaps: BTreeMap<String, Pagemap>,
}

impl ImagesDir {
    /// Lists a directory. Fails if it is missing, not a directory, empty, or
    /// holds no `inventory.img`.
    pub fn open(path: &Path) -> Result<ImagesDir, ImageError> {
        let meta = fs::metadata(path).map_err(|e| ImageError::io(path, e))?;
        if !meta.is_dir() {
            return Err(ImageError::NotADirectory {
                path: path.to_path_buf(),
            });
        }
        let mut files = Vec::new();
        for entry in fs::read_dir(path).map_err(|e| ImageError::io(path, e))? {
            let entry = entry.map_err(|e| ImageError::io(path, e))?;
            let meta = entry
                .metadata()
                .map_err(|e| ImageError::io(entry.path(), e))?;
            if !meta.is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let class = classify_name(&name);
            files.push(ImageFile {
                name,
                bytes: meta.len(),
                class,
            });
        }
        if files.is_empty() {
            return Err(ImageError::EmptyDirectory {
                path: path.to_path_buf(),
            });
        }
        ImagesDir::checked(path.to_path_buf(), files, None)
    }

    /// Images held in memory: `files` lists every image with its size,
    /// `contents` holds the bytes of those that will be read (all but the
    /// pages images). `label` names them in errors.
    pub fn in_memory(
        label: PathBuf,
        files: Vec<ImageFile>,
        contents: BTreeMap<String, Vec<u8>>,
    ) -> Result<ImagesDir, ImageError> {
        if files.is_empty() {
            return Err(ImageError::EmptyDirectory { path: label });
        }
        ImagesDir::checked(label, files, Some(contents))
    }

    fn checked(
        path: PathBuf,
        mut files: Vec<ImageFile>,
        memory: Option<BTreeMap<String, Vec<u8>>>,
    ) -> Result<ImagesDir, ImageError> {
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let dir = ImagesDir {
            path,
            files,
            memory,
        };
        if !dir.has("inventory.img") {
            return Err(ImageError::Missing {
                dir: dir.path.clone(),
                file: "inventory.img".into(),
            });
        }
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn files(&self) -> &[ImageFile] {
        &self.files
    }

    pub fn has(&self, name: &str) -> bool {
        self.files.iter().any(|f| f.name == name)
    }

    pub(crate) fn file_path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn read(&self, name: &str) -> Result<(PathBuf, Vec<u8>), ImageError> {
        let path = self.file_path(name);
        if let Some(memory) = &self.memory {
            return memory.get(name).map(|b| (path, b.clone())).ok_or_else(|| {
                ImageError::Missing {
                    dir: self.path.clone(),
                    file: name.to_string(),
                }
            });
        }
        match fs::read(&path) {
            Ok(bytes) => Ok((path, bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ImageError::Missing {
                dir: self.path.clone(),
                file: name.to_string(),
            }),
            Err(e) => Err(ImageError::io(path, e)),
        }
    }

    pub fn inventory(&self) -> Result<Inventory, ImageError> {
        let (path, bytes) = self.read("inventory.img")?;
        inventory::parse(&path, &bytes)
    }

    pub fn pstree(&self) -> Result<Vec<PstreeEntry>, ImageError> {
        let (path, bytes) = self.read("pstree.img")?;
        pstree::parse(&path, &bytes)
    }

    pub fn core(&self, tid: u32) -> Result<TaskCore, ImageError> {
        let (path, bytes) = self.read(&format!("core-{tid}.img"))?;
        core::parse(&path, &bytes)
    }

    pub fn mm(&self, pid: u32) -> Result<MemoryMap, ImageError> {
        let (path, bytes) = self.read(&format!("mm-{pid}.img"))?;
        MemoryMap::parse(&path, &bytes)
    }

    pub fn pagemap(&self, pid: u32) -> Result<Pagemap, ImageError> {
        let (path, bytes) = self.read(&format!("pagemap-{pid}.img"))?;
        Pagemap::parse(&path, &bytes)
    }

    /// The file holding the present pages of pagemaps with this `pages_id`.
    pub fn pages_file(&self, pages_id: u32) -> PathBuf {
        self.file_path(&format!("pages-{pages_id}.img"))
    }

    pub fn dump_stats(&self) -> Result<Option<DumpStats>, ImageError> {
        if !self.has("stats-dump") {
            return Ok(None);
        }
        let (path, bytes) = self.read("stats-dump")?;
        DumpStats::parse(&path, &bytes)
    }

    pub fn restore_stats(&self) -> Result<Option<RestoreStats>, ImageError> {
        if !self.has("stats-restore") {
            return Ok(None);
        }
        let (path, bytes) = self.read("stats-restore")?;
        RestoreStats::parse(&path, &bytes)
    }

    /// The size of an image file, as listed.
    pub fn size_of(&self, name: &str) -> Option<u64> {
        self.files.iter().find(|f| f.name == name).map(|f| f.bytes)
    }

    /// Parses every image ferry understands, checks every other image's magic
    /// header, and checks that each pages file is exactly as long as its
    /// pagemaps say. A directory that passes is complete as far as ferry can
    /// tell; CRIU checks the rest when it restores.
    pub fn validate(&self) -> Result<Validated, ImageError> {
        let inventory = self.inventory()?;
        let tree = self.pstree()?;
        let mut cores = BTreeMap::new();
        let mut pagemaps = BTreeMap::new();
        for proc in &tree {
            let leader = self
                .core(proc.pid)
                .map_err(|e| self.missing_for(e, proc.pid, &format!("core-{}.img", proc.pid)))?;
            let zombie = leader.state == super::core::TASK_DEAD;
            cores.insert(proc.pid, leader);
            // A zombie has its leader's core image alone: CRIU records no
            // threads of it that it would restore (the ids it lists are
            // not meaningful).
            let others = proc.threads.iter().filter(|&&t| t != proc.pid && !zombie);
            for &tid in others {
                let core = self
                    .core(tid)
                    .map_err(|e| self.missing_for(e, proc.pid, &format!("core-{tid}.img")))?;
                cores.insert(tid, core);
            }
            if cores.get(&proc.pid).is_some_and(TaskCore::has_memory) {
                self.mm(proc.pid)
                    .map_err(|e| self.missing_for(e, proc.pid, &format!("mm-{}.img", proc.pid)))?;
                let pm = self.pagemap(proc.pid).map_err(|e| {
                    self.missing_for(e, proc.pid, &format!("pagemap-{}.img", proc.pid))
                })?;
                pagemaps.insert(proc.pid, pm);
            }
        }
        let mut shmem_pagemaps = BTreeMap::new();
        for f in &self.files {
            if f.name.starts_with("pagemap-shmem-") {
                let (path, bytes) = self.read(&f.name)?;
                shmem_pagemaps.insert(f.name.clone(), Pagemap::parse(&path, &bytes)?);
            }
        }
        self.check_pages_sizes(pagemaps.values().chain(shmem_pagemaps.values()))?;
        self.check_headers()?;
        if self.has("stats-dump") {
            self.dump_stats()?;
        }
        Ok(Validated {
            inventory,
            tree,
            cores,
            pagemaps,
            shmem_pagemaps,
        })
    }

    fn missing_for(&self, err: ImageError, pid: u32, file: &str) -> ImageError {
        match err {
            ImageError::Missing { .. } => ImageError::Inconsistent {
                path: self.path.clone(),
                problem: Problem::MissingProcessImage {
                    pid,
                    file: file.to_string(),
                },
            },
            other => other,
        }
    }

    fn check_pages_sizes<'a>(
        &self,
        pagemaps: impl Iterator<Item = &'a Pagemap>,
    ) -> Result<(), ImageError> {
        let mut expected: BTreeMap<u32, u64> = BTreeMap::new();
        for pm in pagemaps {
            *expected.entry(pm.pages_id).or_default() += pm.present_pages() * PAGE_SIZE as u64;
        }
        for (pages_id, expected) in expected {
            let path = self.pages_file(pages_id);
            let name = format!("pages-{pages_id}.img");
            let actual = match self.size_of(&name) {
                Some(len) => len,
                None if expected == 0 => 0,
                None => {
                    return Err(ImageError::Missing {
                        dir: self.path.clone(),
                        file: name,
                    })
                }
            };
            if actual != expected {
                return Err(ImageError::Inconsistent {
                    path,
                    problem: Problem::PagesSize { expected, actual },
                });
            }
        }
        Ok(())
    }

    fn check_headers(&self) -> Result<(), ImageError> {
        for f in &self.files {
            let raw = RAW_IMAGE_PREFIXES.iter().any(|p| f.name.starts_with(p));
            let headed = matches!(f.class, FileClass::Metadata | FileClass::Stats);
            if raw || !headed || f.name == "inventory.img" {
                continue;
            }
            let path = self.file_path(&f.name);
            let bytes = match &self.memory {
                Some(m) => m
                    .get(&f.name)
                    .map(|b| b[..b.len().min(4)].to_vec())
                    .unwrap_or_default(),
                None => read_prefix(&path, 4)?,
            };
            let found = framing::read_u32(&bytes, 0);
            if found != Some(IMG_COMMON_MAGIC) && found != Some(IMG_SERVICE_MAGIC) {
                return Err(match found {
                    None => ImageError::NoHeader {
                        path,
                        len: bytes.len(),
                        need: 4,
                    },
                    Some(found) => ImageError::BadMagic {
                        path,
                        found,
                        expected: "IMG_COMMON_MAGIC",
                        expected_value: framing::IMG_COMMON_MAGIC,
                    },
                });
            }
        }
        Ok(())
    }
}

fn read_prefix(path: &Path, n: usize) -> Result<Vec<u8>, ImageError> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(n);
    fs::File::open(path)
        .and_then(|f| f.take(n as u64).read_to_end(&mut buf))
        .map_err(|e| ImageError::io(path, e))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_files() {
        assert_eq!(classify_name("pages-1.img"), FileClass::Pages);
        assert_eq!(classify_name("pagemap-1.img"), FileClass::Metadata);
        assert_eq!(classify_name("stats-dump"), FileClass::Stats);
        assert_eq!(classify_name("dump.log"), FileClass::Log);
        assert_eq!(classify_name("descriptors.json"), FileClass::Other);
    }

    #[test]
    fn refuses_empty_and_foreign_dirs() {
        let d = tempfile::tempdir().unwrap();
        let err = ImagesDir::open(d.path()).unwrap_err();
        assert!(matches!(err, ImageError::EmptyDirectory { .. }), "{err}");
        fs::write(d.path().join("notes.txt"), b"hello").unwrap();
        let err = ImagesDir::open(d.path()).unwrap_err();
        assert!(
            err.to_string().contains("inventory.img is missing"),
            "{err}"
        );
    }
}
