//! Capturing one tree into a tar: files, directories, symbolic and hard
//! links with their owners, modes and times; overlay whiteouts become the
//! deletion list and opaque directories a list of their own.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use tar::{EntryType, Header, HeaderMode};

use super::{FsError, OPAQUE_XATTR};

/// What a capture found.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    pub deleted: Vec<String>,
    pub opaque: Vec<String>,
    /// Regular files written whole (hard links to one counted once).
    pub files: u64,
    pub bytes: u64,
    /// Sockets and device nodes, which are not carried.
    pub skipped: u64,
    /// Every entry as it was when captured (what a later capture against
    /// this one as its base compares with).
    pub snapshot: Snapshot,
    /// Against a base: its entries that are gone, or changed kind.
    pub removed: Vec<String>,
}

/// Each entry's identity and times, by relative path.
pub type Snapshot = HashMap<String, StatKey>;

/// What tells an unchanged entry: any write, chmod, chown, link or
/// rename changes its change time (which no one can set), or its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatKey {
    ino: u64,
    mode: u32,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl StatKey {
    fn of(m: &fs::Metadata) -> StatKey {
        StatKey {
            ino: m.ino(),
            mode: m.mode(),
            size: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        }
    }

    fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

struct Walk<'a, W: Write> {
    tar: tar::Builder<W>,
    out: &'a Path,
    layer: bool,
    /// First path of each multiply linked file, by (device, inode).
    links: HashMap<(u64, u64), String>,
    found: Captured,
    /// Only what changed since this capture goes in the tar.
    base: Option<&'a Snapshot>,
    /// The tree is in use (the container runs): entries that vanish are
    /// passed over, and a file that shrinks while read is padded and left
    /// out of the snapshot, so that the capture while frozen takes it.
    live: bool,
}

/// Writes the tree under `root` into the tar `out`. With `layer`, `root`
/// is an overlay upper directory: a 0/0 character device there is a
/// deletion, and `trusted.overlay.opaque` marks an opaque directory.
/// Against a `base` (an earlier capture of the same tree), only entries
/// that changed since go in the tar, and those gone are listed.
pub fn capture_root(
    root: &Path,
    out: &Path,
    layer: bool,
    base: Option<&Snapshot>,
) -> Result<Captured, FsError> {
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(FsError::io("create", out))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let found = capture_into(root, &mut w, out, layer, base, false)?;
    w.flush().map_err(FsError::io("write", out))?;
    Ok(found)
}

/// [`capture_root`] into any writer (`out` names it in errors).
pub fn capture_into<W: Write>(
    root: &Path,
    writer: W,
    out: &Path,
    layer: bool,
    base: Option<&Snapshot>,
    live: bool,
) -> Result<Captured, FsError> {
    let mut tar = tar::Builder::new(writer);
    tar.mode(HeaderMode::Complete);
    tar.follow_symlinks(false);
    let mut w = Walk {
        tar,
        out,
        layer,
        links: HashMap::new(),
        found: Captured::default(),
        base,
        live,
    };
    w.dir(root, "")?;
    let mut found = std::mem::take(&mut w.found);
    if let Some(base) = base {
        let now: HashSet<&String> = found.snapshot.keys().collect();
        let mut removed: Vec<String> = base
            .iter()
            .filter(|(p, k)| {
                !now.contains(p) || found.snapshot.get(*p).is_some_and(|n| n.kind() != k.kind())
            })
            .map(|(p, _)| p.clone())
            .collect();
        removed.sort();
        found.removed = removed;
    }
    let mut inner = w.tar.into_inner().map_err(FsError::io("write", out))?;
    inner.flush().map_err(FsError::io("write", out))?;
    Ok(found)
}

impl<W: Write> Walk<'_, W> {
    fn dir(&mut self, dir: &Path, rel: &str) -> Result<(), FsError> {
        let listed = fs::read_dir(dir).and_then(|rd| {
            rd.map(|e| e.map(|e| e.file_name()))
                .collect::<Result<Vec<_>, _>>()
        });
        let mut names = match listed {
            Ok(n) => n,
            Err(e) if self.vanished(&e) => return Ok(()),
            Err(e) => return Err(FsError::io("read directory", dir)(e)),
        };
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let rel = if rel.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", name.to_string_lossy())
            };
            self.entry(&path, rel)?;
        }
        Ok(())
    }

    /// A live tree's entry that went away while it was walked.
    fn vanished(&self, e: &io::Error) -> bool {
        self.live && e.kind() == io::ErrorKind::NotFound
    }

    fn entry(&mut self, path: &Path, rel: String) -> Result<(), FsError> {
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if self.vanished(&e) => return Ok(()),
            Err(e) => return Err(FsError::io("stat", path)(e)),
        };
        let ft = meta.file_type();
        // Taken before the file is read: a write during the read changes
        // it, so a later capture against this one takes the file again.
        let key = StatKey::of(&meta);
        self.found.snapshot.insert(rel.clone(), key);
        let unchanged = self.base.and_then(|b| b.get(&rel)) == Some(&key);
        let write = FsError::io("write", self.out);
        let mut h = Header::new_gnu();
        if ft.is_char_device() && meta.rdev() == 0 && self.layer {
            self.found.deleted.push(rel);
            return Ok(());
        }
        if ft.is_dir() {
            if self.layer && xattr::get(path, OPAQUE_XATTR).ok().flatten().as_deref() == Some(b"y")
            {
                self.found.opaque.push(rel.clone());
            }
            if !unchanged {
                h.set_metadata_in_mode(&meta, HeaderMode::Complete);
                h.set_size(0);
                self.tar
                    .append_data(&mut h, format!("{rel}/"), io::empty())
                    .map_err(write)?;
            }
            return self.dir(path, &rel);
        }
        if unchanged {
            if ft.is_file() && meta.nlink() > 1 {
                self.links.entry((meta.dev(), meta.ino())).or_insert(rel);
            }
            return Ok(());
        }
        if ft.is_symlink() {
            let target = fs::read_link(path).map_err(FsError::io("read link", path))?;
            h.set_metadata_in_mode(&meta, HeaderMode::Complete);
            h.set_size(0);
            return self.tar.append_link(&mut h, &rel, target).map_err(write);
        }
        if ft.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = self.links.get(&key) {
                    h.set_metadata_in_mode(&meta, HeaderMode::Complete);
                    h.set_entry_type(EntryType::Link);
                    h.set_size(0);
                    let first = first.clone();
                    return self.tar.append_link(&mut h, &rel, first).map_err(write);
                }
                self.links.insert(key, rel.clone());
            }
            let f = match File::open(path) {
                Ok(f) => f,
                Err(e) if self.vanished(&e) => {
                    self.found.snapshot.remove(&rel);
                    return Ok(());
                }
                Err(e) => return Err(FsError::io("open", path)(e)),
            };
            let torn = std::rc::Rc::new(std::cell::Cell::new(false));
            h.set_metadata_in_mode(&meta, HeaderMode::Complete);
            let size = meta.len();
            self.tar
                .append_data(
                    &mut h,
                    &rel,
                    Exact {
                        inner: f,
                        left: size,
                        pad: self.live.then(|| torn.clone()),
                    },
                )
                .map_err(FsError::io("read", path))?;
            if torn.get() {
                // Taken again while frozen.
                self.found.snapshot.remove(&rel);
            }
            self.found.files += 1;
            self.found.bytes += size;
            return Ok(());
        }
        if ft.is_fifo() {
            h.set_metadata_in_mode(&meta, HeaderMode::Complete);
            h.set_size(0);
            return self
                .tar
                .append_data(&mut h, &rel, io::empty())
                .map_err(write);
        }
        tracing::warn!(path = %path.display(), "a socket or device node is not carried with the container's files");
        self.found.skipped += 1;
        Ok(())
    }
}

/// A file's bytes, exactly as many as its size said: a file that shrinks
/// while it is read fails the capture instead of making a damaged tar.
struct Exact {
    inner: File,
    left: u64,
    /// Live: a short file is padded with zeros, and this says so.
    pad: Option<std::rc::Rc<std::cell::Cell<bool>>>,
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left as usize);
        let mut n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            if let Some(torn) = &self.pad {
                torn.set(true);
                buf[..want].fill(0);
                n = want;
                self.left -= n as u64;
                return Ok(n);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was captured",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}
