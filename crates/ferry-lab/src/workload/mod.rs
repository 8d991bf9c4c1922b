//! The bundled stateful workload (`ferry-workload`): its memory layout, its
//! report record and its heartbeat datagram.
//!
//! The workload holds `size` bytes of resident anonymous memory made of four
//! kinds of pages, interleaved deterministically from a seed:
//! - **zero** pages (written, so resident, but all zero bytes),
//! - **repeat** pages (copies of [`REPEAT_TEMPLATES`] distinct pages),
//! - **text** pages (random lowercase words: compressible, never repeated),
//! - **random** pages (full-entropy bytes: incompressible).
//!
//! It counts ticks in memory and publishes the counter in a fixed-size report
//! file (rewritten in place with `pwrite`, so the file's size never changes
//! and CRIU can restore the open descriptor) and optionally in a UDP
//! heartbeat per tick. Tests, the demo and the benchmarks read both through
//! this module, so the producer and the readers share one definition.

#![forbid(unsafe_code)]

mod launch;

pub use launch::{find_exe, Launch, Workload, EXE_NAME};

use std::fs;
use std::io;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use ferry_sys::PAGE_SIZE;

/// Number of distinct templates the repeat pages are copies of.
pub const REPEAT_TEMPLATES: usize = 16;
/// Size of the report record; the report file always has exactly this size.
pub const REPORT_BYTES: usize = 1024;
/// Heartbeat datagram: magic, pid (u32 LE), counter (u64 LE).
pub(crate) const HEARTBEAT_MAGIC: &[u8; 4] = b"FWHB";
pub(crate) const HEARTBEAT_BYTES: usize = 16;

/// What a page of the workload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageClass {
    Zero,
    Repeat,
    Text,
    Random,
}

/// The mix of page kinds, in percent; random pages take the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mix {
    pub zero_pct: u8,
    pub repeat_pct: u8,
    pub text_pct: u8,
    /// Where the zero pages lie ([`ZeroLayout::Scattered`] places
    /// `zero_pct` of them at random).
    pub zeros: ZeroLayout,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            zero_pct: 25,
            repeat_pct: 25,
            text_pct: 25,
            zeros: ZeroLayout::Scattered,
        }
    }
}

/// Where a workload's zero pages lie: the layouts a restore must handle
/// alike (scattered single pages cut CRIU's page ranges into many short
/// ones; long runs leave few).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZeroLayout {
    /// `zero_pct` of the pages, each drawn at random.
    Scattered,
    /// Every n-th page (index divisible by n), whatever `zero_pct` says:
    /// `Every(1)` is all zero.
    Every(u32),
    /// One run of `zero_pct` of the pages, in the middle of the memory.
    OneRun,
}

impl std::fmt::Display for ZeroLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ZeroLayout::Scattered => write!(f, "scattered"),
            ZeroLayout::Every(n) => write!(f, "every-{n}"),
            ZeroLayout::OneRun => write!(f, "one-run"),
        }
    }
}

impl std::str::FromStr for ZeroLayout {
    type Err = String;

    /// `scattered`, `every-N` (N >= 1) or `one-run`.
    fn from_str(s: &str) -> Result<ZeroLayout, String> {
        match s {
            "scattered" => Ok(ZeroLayout::Scattered),
            "one-run" => Ok(ZeroLayout::OneRun),
            _ => match s.strip_prefix("every-").map(str::parse::<u32>) {
                Some(Ok(n)) if n >= 1 => Ok(ZeroLayout::Every(n)),
                _ => Err(format!(
                    "zero layout {s:?}: expected scattered, every-N (N >= 1) or one-run"
                )),
            },
        }
    }
}

impl Mix {
    /// Checks that the percentages leave a non-negative random share.
    pub fn validate(&self) -> Result<(), String> {
        let sum = u32::from(self.zero_pct) + u32::from(self.repeat_pct) + u32::from(self.text_pct);
        if sum > 100 {
            return Err(format!(
                "zero + repeat + text percentages add up to {sum}, more than 100"
            ));
        }
        Ok(())
    }

    /// The class of page `index` of `pages`, a pure function of seed,
    /// index and mix.
    pub fn class_at(&self, seed: u64, index: usize, pages: usize) -> PageClass {
        let zero = match self.zeros {
            ZeroLayout::Scattered => return self.class_of(seed, index),
            ZeroLayout::Every(n) => index.is_multiple_of(n.max(1) as usize),
            ZeroLayout::OneRun => {
                let len = pages * usize::from(self.zero_pct.min(100)) / 100;
                let start = (pages - len) / 2;
                (start..start + len).contains(&index)
            }
        };
        if zero {
            return PageClass::Zero;
        }
        // The other classes in proportion to their shares.
        let random_pct = 100u64.saturating_sub(
            u64::from(self.zero_pct) + u64::from(self.repeat_pct) + u64::from(self.text_pct),
        );
        let (repeat, text) = (u64::from(self.repeat_pct), u64::from(self.text_pct));
        let total = repeat + text + random_pct;
        if total == 0 {
            return PageClass::Random;
        }
        let roll = mix64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) % total;
        if roll < repeat {
            PageClass::Repeat
        } else if roll < repeat + text {
            PageClass::Text
        } else {
            PageClass::Random
        }
    }

    /// The class of page `index` when the zero pages are scattered.
    pub fn class_of(&self, seed: u64, index: usize) -> PageClass {
        let roll = (mix64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) % 100) as u8;
        if roll < self.zero_pct {
            PageClass::Zero
        } else if roll < self.zero_pct + self.repeat_pct {
            PageClass::Repeat
        } else if roll < self.zero_pct + self.repeat_pct + self.text_pct {
            PageClass::Text
        } else {
            PageClass::Random
        }
    }
}

/// Page counts per class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCounts {
    pub total: u64,
    pub zero: u64,
    pub repeat: u64,
    pub text: u64,
    pub random: u64,
}

impl PageCounts {
    pub fn add(&mut self, class: PageClass) {
        self.total += 1;
        match class {
            PageClass::Zero => self.zero += 1,
            PageClass::Repeat => self.repeat += 1,
            PageClass::Text => self.text += 1,
            PageClass::Random => self.random += 1,
        }
    }
}

/// splitmix64's finaliser: a cheap, well-mixed hash of a u64.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `page` with the contents of a page of `class`. `nonce` makes text
/// and random pages unique (page index, or a fresh value when re-dirtied);
/// repeat pages depend only on `nonce % REPEAT_TEMPLATES`.
pub fn fill_page(page: &mut [u8], class: PageClass, seed: u64, nonce: u64) {
    match class {
        PageClass::Zero => page.fill(0),
        PageClass::Repeat => {
            let template = nonce % REPEAT_TEMPLATES as u64;
            fill_random(page, mix64(seed ^ 0xA5A5_0000 ^ template));
        }
        PageClass::Text => fill_text(page, mix64(seed ^ nonce.rotate_left(17) ^ 0x7E47)),
        PageClass::Random => fill_random(page, mix64(seed ^ nonce.rotate_left(7) ^ 0x4A4D)),
    }
}

fn fill_random(page: &mut [u8], seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    for chunk in page.chunks_exact_mut(8) {
        chunk.copy_from_slice(&rng.u64(..).to_le_bytes());
    }
}

fn fill_text(page: &mut [u8], seed: u64) {
    const ALPHABET: &[u8; 32] = b"etaoinshrdlucmfwypvbgkjqxz  \n.,e";
    let mut rng = fastrand::Rng::with_seed(seed);
    for chunk in page.chunks_exact_mut(8) {
        let r = rng.u64(..);
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = ALPHABET[((r >> (i * 5)) & 31) as usize];
        }
    }
}

/// The report the workload keeps rewriting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub pid: u32,
    /// Ticks counted so far; lives in the workload's memory.
    pub counter: u64,
    pub size_mib: u64,
    pub pages: PageCounts,
    /// Distinct contents among the repeat pages.
    pub repeat_distinct: u64,
    /// Incremented each time a memory verification (SIGUSR1) completes.
    pub verify_seq: u64,
    /// Result of the last verification: every page holds what it should.
    pub mem_ok: bool,
    /// Pages rewritten so far by `--dirty-mib-s`.
    pub dirtied_pages: u64,
    /// Pids of the workload's child processes.
    pub children: Vec<u32>,
}

impl Report {
    /// Serialises to exactly [`REPORT_BYTES`] bytes (JSON padded with spaces).
    pub fn to_record(&self) -> io::Result<Vec<u8>> {
        let mut out = serde_json::to_vec(self).map_err(io::Error::other)?;
        if out.len() >= REPORT_BYTES {
            return Err(io::Error::other(format!(
                "report of {} bytes does not fit the {REPORT_BYTES}-byte record",
                out.len()
            )));
        }
        out.resize(REPORT_BYTES - 1, b' ');
        out.push(b'\n');
        Ok(out)
    }

    /// Reads a report file once.
    pub fn read(path: &Path) -> io::Result<Report> {
        let bytes = fs::read(path)?;
        serde_json::from_slice(trim(&bytes))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Reads a report file, retrying while it is absent, blank or caught
    /// mid-write, until `timeout`.
    pub fn read_within(path: &Path, timeout: Duration) -> io::Result<Report> {
        let deadline = Instant::now() + timeout;
        loop {
            match Report::read(path) {
                Ok(r) => return Ok(r),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Waits until `pred` holds for the report, or `timeout` passes.
    pub fn wait_for(
        path: &Path,
        timeout: Duration,
        mut pred: impl FnMut(&Report) -> bool,
    ) -> io::Result<Report> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let report = Report::read_within(path, remaining)?;
            if pred(&report) {
                return Ok(report);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "report {} never reached the expected state: last {report:?}",
                        path.display()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace() && *b != 0)
        .map_or(0, |i| i + 1);
    &bytes[..end]
}

/// Encodes a heartbeat datagram.
pub fn heartbeat(pid: u32, counter: u64) -> [u8; HEARTBEAT_BYTES] {
    let mut out = [0u8; HEARTBEAT_BYTES];
    out[..4].copy_from_slice(HEARTBEAT_MAGIC);
    out[4..8].copy_from_slice(&pid.to_le_bytes());
    out[8..].copy_from_slice(&counter.to_le_bytes());
    out
}

/// Decodes a heartbeat datagram into (pid, counter).
pub(crate) fn parse_heartbeat(bytes: &[u8]) -> Option<(u32, u64)> {
    if bytes.len() != HEARTBEAT_BYTES || &bytes[..4] != HEARTBEAT_MAGIC {
        return None;
    }
    let pid = u32::from_le_bytes(bytes[4..8].try_into().ok()?);
    let counter = u64::from_le_bytes(bytes[8..].try_into().ok()?);
    Some((pid, counter))
}

/// Pages in `mib` MiB.
pub fn pages_in_mib(mib: u64) -> usize {
    (mib as usize) * (1 << 20) / PAGE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_is_deterministic_and_roughly_proportional() {
        let mix = Mix::default();
        let mut counts = PageCounts::default();
        for i in 0..10_000 {
            assert_eq!(mix.class_of(7, i), mix.class_of(7, i));
            counts.add(mix.class_of(7, i));
        }
        for n in [counts.zero, counts.repeat, counts.text, counts.random] {
            assert!((2_200..2_800).contains(&n), "{counts:?}");
        }
    }

    #[test]
    fn zero_layouts_place_zero_pages_where_they_say() {
        let pages = 1000;
        let zeros = |mix: Mix| -> Vec<usize> {
            (0..pages)
                .filter(|&i| mix.class_at(3, i, pages) == PageClass::Zero)
                .collect()
        };
        let every = |n| Mix {
            zeros: ZeroLayout::Every(n),
            ..Mix::default()
        };
        assert_eq!(zeros(every(4)), (0..pages).step_by(4).collect::<Vec<_>>());
        assert_eq!(zeros(every(1)).len(), pages);
        let run = zeros(Mix {
            zero_pct: 50,
            zeros: ZeroLayout::OneRun,
            ..Mix::default()
        });
        assert_eq!(run, (250..750).collect::<Vec<_>>());
        let none = zeros(Mix {
            zero_pct: 0,
            ..Mix::default()
        });
        assert!(none.is_empty());
        // The other classes keep their shares around the zero pages.
        let mut counts = PageCounts::default();
        for i in 0..10_000 {
            counts.add(every(2).class_at(3, i, 10_000));
        }
        assert_eq!(counts.zero, 5_000);
        for n in [counts.repeat, counts.text, counts.random] {
            assert!((1_450..1_900).contains(&n), "{counts:?}");
        }
        for s in ["scattered", "every-2", "one-run"] {
            assert_eq!(s.parse::<ZeroLayout>().unwrap().to_string(), s);
        }
        assert!("every-0".parse::<ZeroLayout>().is_err());
        assert!("sideways".parse::<ZeroLayout>().is_err());
    }

    #[test]
    fn rejects_overfull_mix() {
        let mix = Mix {
            zero_pct: 50,
            repeat_pct: 40,
            text_pct: 20,
            ..Mix::default()
        };
        assert!(mix.validate().is_err());
    }

    #[test]
    fn pages_have_their_kind() {
        let mut a = vec![1u8; PAGE_SIZE];
        fill_page(&mut a, PageClass::Zero, 1, 0);
        assert!(a.iter().all(|b| *b == 0));
        let mut b = vec![0u8; PAGE_SIZE];
        let mut c = vec![0u8; PAGE_SIZE];
        fill_page(&mut b, PageClass::Repeat, 1, 3);
        fill_page(&mut c, PageClass::Repeat, 1, 3 + REPEAT_TEMPLATES as u64);
        assert_eq!(b, c);
        fill_page(&mut b, PageClass::Random, 1, 3);
        fill_page(&mut c, PageClass::Random, 1, 4);
        assert_ne!(b, c);
        fill_page(&mut b, PageClass::Text, 1, 3);
        assert!(b.iter().all(|x| x.is_ascii()));
    }

    #[test]
    fn report_record_is_fixed_size_and_round_trips() {
        let r = Report {
            pid: 1,
            counter: 2,
            size_mib: 3,
            pages: PageCounts::default(),
            repeat_distinct: 16,
            verify_seq: 0,
            mem_ok: true,
            dirtied_pages: 0,
            children: vec![5, 6],
        };
        let rec = r.to_record().unwrap();
        assert_eq!(rec.len(), REPORT_BYTES);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        fs::write(&p, &rec).unwrap();
        assert_eq!(Report::read(&p).unwrap(), r);
    }

    #[test]
    fn heartbeat_round_trips() {
        let hb = heartbeat(42, 1234);
        assert_eq!(parse_heartbeat(&hb), Some((42, 1234)));
        assert_eq!(parse_heartbeat(&hb[..15]), None);
    }
}
