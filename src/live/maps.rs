//! `/proc/PID/maps`: the regions whose pages a dump would carry.

use super::LiveError;

/// A mapping whose populated pages are worth copying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
}

impl Region {
    pub fn pages(&self) -> usize {
        ((self.end - self.start) / crate::PAGE_SIZE as u64) as usize
    }
}

/// Writable or anonymous mappings of `pid`, without the kernel's own
/// ([vdso], [vvar], [vsyscall]) and without unreadable ones.
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
            let perms = f.next()?;
            let path = f.nth(3).unwrap_or("");
            let (s, e) = range.split_once('-')?;
            let start = u64::from_str_radix(s, 16).ok()?;
            let end = u64::from_str_radix(e, 16).ok()?;
            let readable = perms.starts_with('r');
            let writable = perms.as_bytes().get(1) == Some(&b'w');
            let kernel = matches!(path, "[vdso]" | "[vvar]" | "[vsyscall]" | "[vvar_vclock]");
            let anon = path.is_empty() || path.starts_with("[heap]") || path.starts_with("[stack");
            (readable && !kernel && (writable || anon) && end > start)
                .then_some(Region { start, end })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_writable_and_anonymous_mappings() {
        let maps = "\
55d0c0000000-55d0c0001000 r--p 00000000 fe:01 123 /usr/bin/x
55d0c0001000-55d0c0002000 rw-p 00001000 fe:01 123 /usr/bin/x
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000100000-7f0000101000 ---p 00000000 00:00 0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
7ffd00100000-7ffd00102000 r--p 00000000 00:00 0 [vvar]
7ffd00102000-7ffd00104000 r-xp 00000000 00:00 0 [vdso]
";
        let r = parse(maps);
        assert_eq!(
            r.iter().map(|r| r.start).collect::<Vec<_>>(),
            vec![0x55d0c0001000, 0x7f0000000000, 0x7ffd00000000]
        );
        assert_eq!(r[1].pages(), 256);
    }
}
