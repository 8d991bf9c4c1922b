//! `/proc/PID/maps`: the regions whose pages a dump would carry.

use super::LiveError;

/// A mapping whose pages may be copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// MAP_PRIVATE: its pages go to the process's own pages image (shared
    /// anonymous memory goes to CRIU's shmem images instead).
    pub private: bool,
    /// Backed by a file: of its pages only those copied on write are the
    /// process's own (CRIU skips the rest).
    pub file_backed: bool,
    /// Executable, and not the kernel's [vdso].
    pub exec: bool,
    /// The kernel's [vdso]: CRIU dumps all of its pages, present or not.
    pub vdso: bool,
}

impl Region {
    pub fn pages(&self) -> usize {
        ((self.end - self.start) / ferry_sys::PAGE_SIZE as u64) as usize
    }
}

/// The mappings of `pid` CRIU would take pages from, in address order:
/// private ones (any protection but none: a PROT_NONE mapping cannot be
/// read and holds no data), the [vdso] (CRIU dumps its pages) and shared
/// anonymous ones; not [vvar] nor [vsyscall].
pub fn dumpable_regions(pid: i32) -> Result<Vec<Region>, LiveError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|source| LiveError::Maps { pid, source })?;
    Ok(parse(&text))
}

fn parse(text: &str) -> Vec<Region> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?.as_bytes();
            let path = f.nth(3).unwrap_or("");
            let (s, e) = range.split_once('-')?;
            let start = u64::from_str_radix(s, 16).ok()?;
            let end = u64::from_str_radix(e, 16).ok()?;
            let readable = perms.first() == Some(&b'r');
            let private = perms.get(3) == Some(&b'p');
            let vdso = path == "[vdso]";
            let kernel = path == "[vsyscall]" || path.starts_with("[vvar");
            let anon =
                path.is_empty() || path.starts_with("[heap]") || path.starts_with("[stack") || vdso;
            let shared_anon =
                !private && (path.starts_with("/dev/zero") || path.starts_with("/SYSV"));
            (readable && !kernel && (private || shared_anon) && end > start).then_some(Region {
                start,
                end,
                private,
                file_backed: private && !anon,
                exec: perms.get(2) == Some(&b'x') && !vdso,
                vdso,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_private_and_shared_anonymous_mappings() {
        let maps = "\
55d0c0000000-55d0c0001000 r--p 00000000 fe:01 123 /usr/bin/x
55d0c0001000-55d0c0002000 rw-p 00001000 fe:01 123 /usr/bin/x
55d0c0002000-55d0c0003000 rw-s 00000000 fe:01 124 /data/file
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000100000-7f0000101000 ---p 00000000 00:00 0
7f0000200000-7f0000201000 rw-s 00000000 00:01 9 /dev/zero (deleted)
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
7ffd00100000-7ffd00102000 r--p 00000000 00:00 0 [vvar]
7ffd00102000-7ffd00104000 r-xp 00000000 00:00 0 [vdso]
";
        let r = parse(maps);
        assert_eq!(
            r.iter()
                .map(|r| (r.start, r.private, r.file_backed))
                .collect::<Vec<_>>(),
            vec![
                (0x55d0c0000000, true, true),
                (0x55d0c0001000, true, true),
                (0x7f0000000000, true, false),
                (0x7f0000200000, false, false),
                (0x7ffd00000000, true, false),
                (0x7ffd00102000, true, false),
            ]
        );
        assert_eq!(r[2].pages(), 256);
    }
}
