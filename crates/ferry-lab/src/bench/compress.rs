//! `ferry bench compress`: how fast and how small ferry packs a real CRIU
//! dump of the bundled workload, against plain zstd, and what restoring
//! from an archive costs against restoring from the images directory.
//!
//! 1. Start the workload (1 GiB by default: zero, repeated, text and random
//!    pages) and dump it with CRIU (stop mode) into a work directory (tmpfs
//!    by default, so storage speed does not hide compression speed).
//! 2. For each zstd level and thread count: `ferry pack` into the work
//!    directory, repeated; median throughput in MB/s of raw pages, ratio.
//! 3. Baselines on the concatenated pages images: single-threaded zstd (the
//!    zstd library, one frame) and the `zstd` command line with `-T0`.
//! 4. Restore, for each layout of the zero pages ([`Layout`]: scattered,
//!    every other page, every fourth, none, all, one run): the workload
//!    filled that way is dumped, packed, and restored from the images
//!    directory and from the archive (leaving zero pages out as ferry
//!    decides, leaving every one out, and writing every one), the kinds
//!    taking turns, repeated; the workload is stopped after each and its
//!    pid waited for.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Timing;
use crate::workload::{Launch, Mix, Workload, ZeroLayout};
use ferry_archive::{self as archive, NoProgress, PackOptions, ZeroPages};
use ferry_core::checkpoint::{self, ArchiveRestoreOptions, CheckpointError};
use ferry_criu::{Criu, DumpRequest, NoHooks, RestoreRequest};
use ferry_image::process;

/// Bytes each stream compresses when measuring the machine's ceiling.
const CEILING_BYTES: usize = 128 << 20;
/// How long the workload may take to fill its memory.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a restored pid may take to disappear after SIGKILL (PID 1 reaps
/// adopted children slowly on some hosts).
const PID_FREE_TIMEOUT: Duration = Duration::from_secs(15);

/// What to measure.
#[derive(Debug, Clone)]
pub struct CompressBench {
    pub workload_exe: PathBuf,
    pub size_mib: u64,
    pub levels: Vec<i32>,
    pub threads: Vec<usize>,
    pub repeat: usize,
    /// Base of the work directory (tmpfs by default).
    pub workdir: Option<PathBuf>,
    /// Where compressed output goes.
    pub sink: Sink,
    /// Measure packing and the zstd baselines (on the scattered layout).
    pub pack: bool,
    /// Layouts whose restores are compared (none: no restore).
    pub layouts: Vec<Layout>,
}

/// Where the workload's zero pages lie, as a restore meets them: the
/// non-zero pages keep the bundled mix of repeated, text and random pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// A quarter of the pages, each drawn at random (the bundled workload).
    Scattered,
    /// Every other page.
    Every2,
    /// Every fourth page.
    Every4,
    /// No zero page.
    None,
    /// Every page.
    All,
    /// Half of the pages, in one run in the middle.
    OneRun,
}

impl Layout {
    pub(crate) const EVERY: [Layout; 6] = [
        Layout::Scattered,
        Layout::Every2,
        Layout::Every4,
        Layout::None,
        Layout::All,
        Layout::OneRun,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Layout::Scattered => "scattered",
            Layout::Every2 => "every-2",
            Layout::Every4 => "every-4",
            Layout::None => "none",
            Layout::All => "all",
            Layout::OneRun => "one-run",
        }
    }

    /// The workload mix that lays the zero pages out so.
    pub fn mix(self) -> Mix {
        let with = |zero_pct, zeros| Mix {
            zero_pct,
            zeros,
            ..Mix::default()
        };
        match self {
            Layout::Scattered => Mix::default(),
            Layout::Every2 => with(25, ZeroLayout::Every(2)),
            Layout::Every4 => with(25, ZeroLayout::Every(4)),
            Layout::None => with(0, ZeroLayout::Scattered),
            Layout::All => with(25, ZeroLayout::Every(1)),
            Layout::OneRun => with(50, ZeroLayout::OneRun),
        }
    }
}

impl std::str::FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Layout, String> {
        Layout::EVERY
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Layout::EVERY.iter().map(|l| l.name()).collect();
                format!("layout {s:?}: expected one of {}", names.join(", "))
            })
    }
}

/// Where the compressors' output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sink {
    /// `/dev/null`: measures compression, not the storage it lands on.
    Null,
    /// A file in the work directory.
    File,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompressResults {
    pub size_mib: u64,
    pub cpus: usize,
    pub kernel: String,
    pub workdir: String,
    pub sink: Sink,
    pub pages_bytes: u64,
    pub dump_frozen_us: Option<u64>,
    pub ferry: Vec<PackResult>,
    pub zstd_single: Vec<BaselineResult>,
    pub zstd_cli: Vec<BaselineResult>,
    pub zstd_cli_missing: Option<String>,
    /// How much faster N independent single-threaded zstd streams go than
    /// one, per level: the most any N-thread compressor can gain here.
    pub machine_ceiling: Vec<Ceiling>,
    /// One per layout measured.
    pub restore: Vec<RestoreResult>,
    pub targets: Vec<Target>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PackResult {
    pub level: i32,
    pub threads: usize,
    pub time: Timing,
    pub mb_s: f64,
    pub archive_bytes: u64,
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BaselineResult {
    pub tool: String,
    pub level: i32,
    pub time: Timing,
    pub mb_s: f64,
    pub output_bytes: u64,
    pub ratio: f64,
}

impl BaselineResult {
    /// A tool's result from its timed runs over `pages` raw bytes.
    fn of(tool: &str, level: i32, samples: Vec<Duration>, pages: u64, bytes: u64) -> Self {
        let time = Timing::of(samples);
        BaselineResult {
            tool: tool.into(),
            level,
            mb_s: time.mb_s(pages),
            time,
            output_bytes: bytes,
            ratio: bytes as f64 / pages as f64,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub level: i32,
    pub streams: usize,
    /// Aggregate throughput of `streams` concurrent streams over one.
    pub speedup: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreResult {
    pub layout: Layout,
    /// Zero pages in the dump.
    pub zero_pages: u64,
    pub from_dir: Timing,
    /// As `ferry restore --archive` does by default: the zero pages of
    /// private anonymous memory left unwritten where that is cheaper.
    pub from_archive: Timing,
    /// Every such zero page left unwritten, however short its run.
    pub from_archive_every_hole: Timing,
    /// With `--write-zero-pages`: every page written, as from the directory.
    pub from_archive_all_pages: Timing,
    /// Of the default archive restores: checking the archive and streaming
    /// its images to CRIU (overlaps CRIU's restore).
    pub unpack: Timing,
    pub archive_level: i32,
    /// Zero pages the default archive restore left unwritten.
    pub zero_pages_left_out: u64,
    /// Zero pages left unwritten when every one is.
    pub zero_pages_left_out_every: u64,
    /// (archive median / dir median) - 1, in percent.
    pub overhead_pct: f64,
    /// The same, every zero page left out.
    pub overhead_every_hole_pct: f64,
    /// The same, every page written.
    pub overhead_all_pages_pct: f64,
}

/// A target of the issue, with the measured value and whether it was met.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub what: String,
    pub goal: String,
    pub measured: String,
    pub met: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("benchmark workload: {what}")]
    Workload {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("benchmark checkpoint step failed")]
    Checkpoint(#[source] Box<CheckpointError>),
    #[error("benchmark pack failed")]
    Archive(#[from] archive::ArchiveError),
    #[error("benchmark file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("restored workload pid {pid} did not go away within {PID_FREE_TIMEOUT:?}")]
    PidStuck { pid: i32 },
}

impl From<CheckpointError> for BenchError {
    fn from(e: CheckpointError) -> Self {
        BenchError::Checkpoint(Box::new(e))
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl CompressBench {
    pub fn run(
        &self,
        criu: &Criu,
        log: &mut dyn FnMut(&str),
    ) -> Result<CompressResults, BenchError> {
        let base = self
            .workdir
            .clone()
            .unwrap_or_else(|| checkpoint::staging::base_for(self.size_mib << 21, None));
        let work = tempfile::Builder::new()
            .prefix("ferry-bench-")
            .tempdir_in(&base)
            .map_err(io_err(&base))?;
        let mut restore = Vec::new();
        let mut pack = None;
        if self.pack {
            let d = self.dump_layout(criu, work.path(), Layout::Scattered, log)?;
            pack = Some(self.pack_figures(&d, work.path(), log)?);
            if self.layouts.contains(&Layout::Scattered) {
                restore.push(self.restore(criu, &d, work.path(), log)?);
            }
            d.remove();
        }
        for &layout in &self.layouts {
            if self.pack && layout == Layout::Scattered {
                continue;
            }
            let d = self.dump_layout(criu, work.path(), layout, log)?;
            restore.push(self.restore(criu, &d, work.path(), log)?);
            d.remove();
        }
        let pack = pack.unwrap_or_default();
        let mut results = CompressResults {
            size_mib: self.size_mib,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            workdir: base.display().to_string(),
            sink: self.sink,
            pages_bytes: pack.pages_bytes,
            dump_frozen_us: pack.dump_frozen_us,
            ferry: pack.ferry,
            zstd_single: pack.zstd_single,
            zstd_cli: pack.zstd_cli,
            zstd_cli_missing: pack.zstd_cli_missing,
            machine_ceiling: pack.machine_ceiling,
            restore,
            targets: Vec::new(),
        };
        results.targets = targets(&results);
        Ok(results)
    }

    /// Starts the workload with `layout`'s zero pages and dumps it with
    /// CRIU into a directory of its own under `work`.
    fn dump_layout(
        &self,
        criu: &Criu,
        work: &Path,
        layout: Layout,
        log: &mut dyn FnMut(&str),
    ) -> Result<Dumped, BenchError> {
        let dir = work.join(layout.name());
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let images = dir.join("images");
        let report = dir.join("workload.report");
        log(&format!(
            "starting a {} MiB workload, zero pages: {}",
            self.size_mib,
            layout.name()
        ));
        let mut launch = Launch::new(&self.workload_exe, self.size_mib, &report);
        launch.mix = layout.mix();
        let mut w = launch.spawn().map_err(|source| BenchError::Workload {
            what: "start",
            source,
        })?;
        w.wait_ready(READY_TIMEOUT)
            .map_err(|source| BenchError::Workload {
                what: "wait until ready",
                source,
            })?;
        let zero_pages = w
            .report()
            .map_err(|source| BenchError::Workload {
                what: "read its report",
                source,
            })?
            .pages
            .zero;
        log("dumping it with CRIU");
        let dump = checkpoint::dump(criu, &DumpRequest::new(w.pid(), &images), &mut NoHooks)?;
        w.reap(PID_FREE_TIMEOUT)
            .map_err(|source| BenchError::Workload {
                what: "reap",
                source,
            })?;
        Ok(Dumped {
            layout,
            dir,
            images,
            report,
            pid: w.pid(),
            zero_pages,
            frozen_us: dump.stats.map(|s| s.frozen.as_micros() as u64),
        })
    }

    /// Pack throughput against the zstd baselines, and the machine's
    /// ceiling, on dump `d`.
    fn pack_figures(
        &self,
        d: &Dumped,
        work: &Path,
        log: &mut dyn FnMut(&str),
    ) -> Result<PackFigures, BenchError> {
        let images = &d.images;
        let pages = concat_pages(images, &work.join("pages.cat"))?;
        // Configurations take turns, so that slow phases of the machine
        // fall on all of them alike.
        let configs: Vec<(i32, usize)> = self
            .levels
            .iter()
            .flat_map(|&l| self.threads.iter().map(move |&t| (l, t)))
            .collect();
        let mut samples = vec![Vec::new(); configs.len()];
        let mut sizes = vec![0u64; configs.len()];
        for run in 0..self.repeat {
            log(&format!("ferry pack, run {} of {}", run + 1, self.repeat));
            for (i, &(level, threads)) in configs.iter().enumerate() {
                let (t, bytes) = self.pack_once(images, work, level, threads)?;
                samples[i].push(t);
                sizes[i] = bytes;
            }
        }
        let ferry: Vec<PackResult> = configs
            .iter()
            .zip(samples)
            .zip(sizes)
            .map(|((&(level, threads), s), bytes)| {
                let time = Timing::of(s);
                PackResult {
                    level,
                    threads,
                    mb_s: time.mb_s(pages),
                    time,
                    archive_bytes: bytes,
                    ratio: bytes as f64 / pages as f64,
                }
            })
            .collect();
        let mut zstd_single = Vec::new();
        let mut zstd_cli = Vec::new();
        let cli = ferry_sys::which("zstd");
        for &level in &self.levels {
            log(&format!("zstd library, level {level}, one thread"));
            zstd_single.push(self.zstd_library(work, level, pages)?);
            if let Some(cli) = &cli {
                log(&format!("zstd -{level} -T0"));
                zstd_cli.push(self.zstd_cli(cli, work, level, pages)?);
            }
        }
        let streams = self.threads.iter().copied().max().unwrap_or(1);
        let mut machine_ceiling = Vec::new();
        if streams > 1 {
            for &level in &self.levels {
                log(&format!(
                    "machine ceiling: {streams} independent zstd streams, level {level}"
                ));
                machine_ceiling.push(self.ceiling(work, level, streams)?);
            }
        }
        let cat = work.join("pages.cat");
        let _ = fs::remove_file(&cat);
        Ok(PackFigures {
            pages_bytes: pages,
            dump_frozen_us: d.frozen_us,
            ferry,
            zstd_single,
            zstd_cli,
            zstd_cli_missing: cli.is_none().then(|| "zstd is not installed".to_string()),
            machine_ceiling,
        })
    }

    /// One pack; returns its wall time and the archive's size.
    fn pack_once(
        &self,
        images: &Path,
        work: &Path,
        level: i32,
        threads: usize,
    ) -> Result<(Duration, u64), BenchError> {
        let opts = PackOptions {
            level,
            threads,
            parent: None,
            source: "ferry bench compress".into(),
            progress: &NoProgress,
        };
        let start = Instant::now();
        let r = match self.sink {
            Sink::Null => {
                let null = Path::new("/dev/null");
                let f = File::create(null).map_err(io_err(null))?;
                archive::pack_dir(images, BufWriter::with_capacity(1 << 16, f), None, &opts)?
            }
            Sink::File => {
                let out = work.join("bench.ferry");
                let r = archive::pack_to_file(images, &out, &opts)?;
                let _ = fs::remove_file(&out);
                r
            }
        };
        Ok((start.elapsed(), r.archive_bytes))
    }

    fn output(&self, work: &Path, name: &str) -> PathBuf {
        match self.sink {
            Sink::Null => PathBuf::from("/dev/null"),
            Sink::File => work.join(name),
        }
    }

    /// Times one single-threaded zstd stream over the first
    /// `CEILING_BYTES` of the pages, then `streams` of them at once.
    fn ceiling(&self, work: &Path, level: i32, streams: usize) -> Result<Ceiling, BenchError> {
        let input = work.join("pages.cat");
        let data = fs::read(&input).map_err(io_err(&input))?;
        let data = &data[..data.len().min(CEILING_BYTES)];
        let one = |d: &[u8]| -> Result<Duration, BenchError> {
            let start = Instant::now();
            zstd::bulk::compress(d, level).map_err(io_err(&input))?;
            Ok(start.elapsed())
        };
        let mut single = Vec::new();
        let mut many = Vec::new();
        for _ in 0..self.repeat {
            single.push(one(data)?);
            let start = Instant::now();
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..streams).map(|_| s.spawn(|| one(data))).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect::<Result<Vec<_>, _>>()
            })?;
            many.push(start.elapsed());
        }
        let (single, many) = (Timing::of(single), Timing::of(many));
        Ok(Ceiling {
            level,
            streams,
            speedup: streams as f64 * single.median.as_secs_f64()
                / many.median.as_secs_f64().max(1e-9),
        })
    }

    fn zstd_library(
        &self,
        work: &Path,
        level: i32,
        pages: u64,
    ) -> Result<BaselineResult, BenchError> {
        let input = work.join("pages.cat");
        let out = self.output(work, "pages.cat.lib.zst");
        let mut samples = Vec::new();
        let mut bytes = 0;
        for _ in 0..self.repeat {
            let start = Instant::now();
            let src = File::open(&input).map_err(io_err(&input))?;
            let dst = File::create(&out).map_err(io_err(&out))?;
            let mut counted = CountingWriter {
                inner: BufWriter::with_capacity(1 << 16, dst),
                bytes: 0,
            };
            zstd::stream::copy_encode(BufReader::with_capacity(1 << 20, src), &mut counted, level)
                .map_err(io_err(&out))?;
            io::Write::flush(&mut counted).map_err(io_err(&out))?;
            samples.push(start.elapsed());
            bytes = counted.bytes;
        }
        if self.sink == Sink::File {
            let _ = fs::remove_file(&out);
        }
        Ok(BaselineResult::of(
            "zstd library, 1 thread",
            level,
            samples,
            pages,
            bytes,
        ))
    }

    fn zstd_cli(
        &self,
        cli: &Path,
        work: &Path,
        level: i32,
        pages: u64,
    ) -> Result<BaselineResult, BenchError> {
        let input = work.join("pages.cat");
        let out = work.join("pages.cat.cli.zst");
        // The compressed size, measured once to a file.
        let status = Command::new(cli)
            .arg(format!("-{level}"))
            .args(["-T0", "-q", "-f", "-o"])
            .arg(&out)
            .arg(&input)
            .stdin(Stdio::null())
            .status()
            .map_err(io_err(cli))?;
        if !status.success() {
            return Err(BenchError::Io {
                path: cli.to_path_buf(),
                source: io::Error::other(format!("zstd failed: {status}")),
            });
        }
        let bytes = fs::metadata(&out).map_err(io_err(&out))?.len();
        let _ = fs::remove_file(&out);
        let out = self.output(work, "pages.cat.cli.zst");
        let mut samples = Vec::new();
        for _ in 0..self.repeat {
            let start = Instant::now();
            let status = Command::new(cli)
                .arg(format!("-{level}"))
                .args(["-T0", "-q", "-f", "-o"])
                .arg(&out)
                .arg(&input)
                .stdin(Stdio::null())
                .status()
                .map_err(io_err(cli))?;
            samples.push(start.elapsed());
            if !status.success() {
                return Err(BenchError::Io {
                    path: cli.to_path_buf(),
                    source: io::Error::other(format!("zstd failed: {status}")),
                });
            }
        }
        if self.sink == Sink::File {
            let _ = fs::remove_file(&out);
        }
        Ok(BaselineResult::of(
            "zstd CLI -T0",
            level,
            samples,
            pages,
            bytes,
        ))
    }

    /// Restores dump `d` from its images directory and from an archive
    /// of it, each kind in turn, `repeat` times.
    fn restore(
        &self,
        criu: &Criu,
        d: &Dumped,
        work: &Path,
        log: &mut dyn FnMut(&str),
    ) -> Result<RestoreResult, BenchError> {
        let level = archive::DEFAULT_LEVEL;
        let arch = work.join("restore.ferry");
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        archive::pack_to_file(
            &d.images,
            &arch,
            &PackOptions {
                level,
                threads,
                parent: None,
                source: "ferry bench compress".into(),
                progress: &NoProgress,
            },
        )?;
        // The directory, then the archive as ferry restores it by default,
        // leaving every zero page out, and writing every page.
        let kinds = [
            None,
            Some(ZeroPages::LeaveOut),
            Some(ZeroPages::LeaveOutEvery),
            Some(ZeroPages::Write),
        ];
        let mut samples: [Vec<Duration>; 4] = Default::default();
        let mut unpack_samples = Vec::new();
        let mut left_out = [0u64; 2];
        for run in 0..self.repeat {
            // The kinds take turns going first: a host that slows down or
            // speeds up over a run weighs on each alike.
            for k in (0..kinds.len()).map(|k| (k + run) % kinds.len()) {
                let start = Instant::now();
                let pid_now = match kinds[k] {
                    None => {
                        let r = checkpoint::restore(
                            criu,
                            &RestoreRequest::new(&d.images),
                            &mut NoHooks,
                        )?;
                        samples[k].push(start.elapsed());
                        // The directory restore leaves its log and stats:
                        // drop them so the images stay as CRIU wrote them.
                        let _ = fs::remove_file(d.images.join("restore.log"));
                        let _ = fs::remove_file(d.images.join("stats-restore"));
                        r.pid
                    }
                    Some(zero_pages) => {
                        let opts = ArchiveRestoreOptions {
                            parent: None,
                            threads,
                            staging: None,
                            zero_pages,
                            progress: &NoProgress,
                        };
                        let r = checkpoint::restore_from_archive(
                            criu,
                            &arch,
                            &RestoreRequest::new(""),
                            &opts,
                            &mut NoHooks,
                        )?;
                        samples[k].push(start.elapsed());
                        match zero_pages {
                            ZeroPages::LeaveOut => {
                                unpack_samples.push(r.unpack.wall);
                                left_out[0] = r.unpack.zero_pages_left_out;
                            }
                            ZeroPages::LeaveOutEvery => left_out[1] = r.unpack.zero_pages_left_out,
                            ZeroPages::Write => {}
                        }
                        r.restore.pid
                    }
                };
                stop(Workload::adopt(pid_now, &d.report), d.pid)?;
            }
            let ms = |v: &[Duration]| v.last().map_or(0.0, |d| d.as_secs_f64() * 1e3);
            log(&format!(
                "restore ({}), run {} of {}: from images dir {:.0} ms, from archive {:.0} ms ({:.0} ms leaving every zero page out, {:.0} ms writing them)",
                d.layout.name(),
                run + 1,
                self.repeat,
                ms(&samples[0]),
                ms(&samples[1]),
                ms(&samples[2]),
                ms(&samples[3]),
            ));
        }
        let _ = fs::remove_file(&arch);
        let [from_dir, from_archive, from_archive_every_hole, from_archive_all_pages] =
            samples.map(Timing::of);
        let over = |t: &Timing| {
            (t.median.as_secs_f64() / from_dir.median.as_secs_f64().max(1e-9) - 1.0) * 100.0
        };
        Ok(RestoreResult {
            layout: d.layout,
            zero_pages: d.zero_pages,
            overhead_pct: over(&from_archive),
            overhead_every_hole_pct: over(&from_archive_every_hole),
            overhead_all_pages_pct: over(&from_archive_all_pages),
            from_dir,
            from_archive,
            from_archive_every_hole,
            from_archive_all_pages,
            unpack: Timing::of(unpack_samples),
            zero_pages_left_out: left_out[0],
            zero_pages_left_out_every: left_out[1],
            archive_level: level,
        })
    }
}

/// A workload of one layout, dumped.
struct Dumped {
    layout: Layout,
    /// Holds the images, the report and nothing else.
    dir: PathBuf,
    images: PathBuf,
    report: PathBuf,
    /// The dumped (and stopped) workload's pid, which its restores take.
    pid: i32,
    zero_pages: u64,
    frozen_us: Option<u64>,
}

impl Dumped {
    /// Frees the room the images take (tmpfs is memory).
    fn remove(self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What [`CompressBench::pack_figures`] measured.
#[derive(Default)]
struct PackFigures {
    pages_bytes: u64,
    dump_frozen_us: Option<u64>,
    ferry: Vec<PackResult>,
    zstd_single: Vec<BaselineResult>,
    zstd_cli: Vec<BaselineResult>,
    zstd_cli_missing: Option<String>,
    machine_ceiling: Vec<Ceiling>,
}

/// Counts the bytes written through it.
struct CountingWriter<W> {
    inner: W,
    bytes: u64,
}

impl<W: io::Write> io::Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Kills a restored workload and waits for its pid to be free again.
fn stop(mut w: Workload, pid: i32) -> Result<(), BenchError> {
    w.stop(Duration::from_secs(5));
    if !process::wait_pid_free(pid, PID_FREE_TIMEOUT) {
        return Err(BenchError::PidStuck { pid });
    }
    Ok(())
}

/// Concatenates the pages images (the input of the zstd baselines).
fn concat_pages(images: &Path, out: &Path) -> Result<u64, BenchError> {
    let mut names: Vec<PathBuf> = fs::read_dir(images)
        .map_err(io_err(images))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| archive::pack::is_pages_image(&n.to_string_lossy()))
        })
        .collect();
    names.sort();
    let mut dst = BufWriter::new(File::create(out).map_err(io_err(out))?);
    let mut total = 0;
    for n in names {
        let mut src = File::open(&n).map_err(io_err(&n))?;
        total += io::copy(&mut src, &mut dst).map_err(io_err(out))?;
    }
    io::Write::flush(&mut dst).map_err(io_err(out))?;
    Ok(total)
}

fn targets(r: &CompressResults) -> Vec<Target> {
    let mut out = Vec::new();
    let max_threads = r.ferry.iter().map(|p| p.threads).max().unwrap_or(1);
    for level in r
        .ferry
        .iter()
        .map(|p| p.level)
        .collect::<std::collections::BTreeSet<_>>()
    {
        let one = r.ferry.iter().find(|p| p.level == level && p.threads == 1);
        let all = r
            .ferry
            .iter()
            .find(|p| p.level == level && p.threads == max_threads);
        if let (Some(one), Some(all)) = (one, all) {
            if max_threads > 1 {
                let x = all.mb_s / one.mb_s;
                out.push(Target {
                    what: format!("ferry pack scaling, level {level}"),
                    goal: format!(
                        ">= 1.8x its single-threaded throughput on {max_threads} threads"
                    ),
                    measured: format!("{x:.2}x ({:.0} vs {:.0} MB/s)", all.mb_s, one.mb_s),
                    met: x >= 1.8,
                });
            }
        }
    }
    for cli in r.zstd_cli.iter().filter(|c| c.level == 3) {
        if let Some(best) = r
            .ferry
            .iter()
            .filter(|p| p.threads == max_threads)
            .max_by(|a, b| a.mb_s.total_cmp(&b.mb_s))
        {
            let x = best.mb_s / cli.mb_s;
            let smaller = best.archive_bytes <= cli.output_bytes;
            out.push(Target {
                what: format!("ferry (level {}) vs zstd -3 -T0", best.level),
                goal: ">= 1.5x the throughput, archive no larger".into(),
                measured: format!(
                    "{x:.2}x ({:.0} vs {:.0} MB/s), archive {} vs {} bytes",
                    best.mb_s, cli.mb_s, best.archive_bytes, cli.output_bytes
                ),
                met: x >= 1.5 && smaller,
            });
        }
    }
    for rs in &r.restore {
        out.push(Target {
            what: format!(
                "restore from archive vs from images directory, zero pages {}",
                rs.layout.name()
            ),
            goal: "at most 10% more wall time".into(),
            measured: format!(
                "{:+.1}% ({} vs {} median)",
                rs.overhead_pct,
                ferry_image::units::millis(rs.from_archive.median),
                ferry_image::units::millis(rs.from_dir.median)
            ),
            met: rs.overhead_pct <= 10.0,
        });
    }
    out
}

/// The results as aligned text.
pub fn render(r: &CompressResults) -> String {
    use ferry_image::units::{bytes, millis};
    let mut s = format!(
        "ferry bench compress: {} MiB workload, {} of pages, {} CPUs, kernel {}, work dir on {}, output to {}\n",
        r.size_mib,
        bytes(r.pages_bytes),
        r.cpus,
        r.kernel,
        r.workdir,
        match r.sink {
            Sink::Null => "/dev/null",
            Sink::File => "files in the work dir",
        }
    );
    s += &format!(
        "{:<28} {:>5} {:>7} {:>12} {:>10} {:>12} {:>7}\n",
        "TOOL", "LEVEL", "THREADS", "MEDIAN", "MB/s", "OUTPUT", "RATIO"
    );
    for p in &r.ferry {
        s += &format!(
            "{:<28} {:>5} {:>7} {:>12} {:>10.0} {:>12} {:>6.1}%\n",
            "ferry pack",
            p.level,
            p.threads,
            millis(p.time.median),
            p.mb_s,
            bytes(p.archive_bytes),
            p.ratio * 100.0
        );
    }
    for b in r.zstd_single.iter().chain(&r.zstd_cli) {
        s += &format!(
            "{:<28} {:>5} {:>7} {:>12} {:>10.0} {:>12} {:>6.1}%\n",
            b.tool,
            b.level,
            if b.tool.contains("-T0") { "all" } else { "1" },
            millis(b.time.median),
            b.mb_s,
            bytes(b.output_bytes),
            b.ratio * 100.0
        );
    }
    for c in &r.machine_ceiling {
        s += &format!(
            "machine ceiling: {} independent single-threaded zstd -{} streams go {:.2}x one stream\n",
            c.streams, c.level, c.speedup
        );
    }
    if let Some(m) = &r.zstd_cli_missing {
        s += &format!("(zstd CLI baseline skipped: {m})\n");
    }
    if !r.restore.is_empty() {
        s += &format!(
            "{:<10} {:>7} {:>8} {:>22} {:>22} {:>22} {:>22}\n",
            "RESTORE",
            "ZERO",
            "LEFT OUT",
            "IMAGES DIR",
            "ARCHIVE",
            "EVERY ZERO LEFT OUT",
            "EVERY PAGE WRITTEN"
        );
    }
    for rs in &r.restore {
        let t = |t: &Timing| format!("{} ({}-{})", millis(t.median), millis(t.min), millis(t.max));
        s += &format!(
            "{:<10} {:>7} {:>8} {:>22} {:>22} {:>22} {:>22}\n",
            rs.layout.name(),
            rs.zero_pages,
            rs.zero_pages_left_out,
            t(&rs.from_dir),
            format!("{} {:+.1}%", t(&rs.from_archive), rs.overhead_pct),
            format!(
                "{} {:+.1}%",
                t(&rs.from_archive_every_hole),
                rs.overhead_every_hole_pct
            ),
            format!(
                "{} {:+.1}%",
                t(&rs.from_archive_all_pages),
                rs.overhead_all_pages_pct
            ),
        );
    }
    for t in &r.targets {
        s += &format!(
            "target {}: {} -> {} [{}]\n",
            t.what,
            t.goal,
            t.measured,
            if t.met { "met" } else { "NOT met" }
        );
    }
    s
}
