//! `ferry pack` and `ferry unpack`: images directory <-> archive.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;

use super::progress::Bar;
use super::{exit, write_json, CliError};
use ferry_archive::{self as archive, Chain, PackOptions, PackReport, UnpackReport};
use ferry_image::units::{bytes, millis, percent};

/// Compression flags shared by every command that writes an archive.
#[derive(Debug, Clone, Args)]
pub struct PackFlags {
    /// zstd level for pages and metadata (1 fastest .. 19 smallest).
    #[arg(long, default_value_t = archive::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compress_level: i32,
    /// Worker threads (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Make an incremental archive: store only pages this parent archive
    /// (and its ancestors) do not already hold.
    #[arg(long, value_name = "ARCHIVE")]
    pub parent: Option<PathBuf>,
}

impl PackFlags {
    pub fn options<'a>(
        &self,
        source: String,
        progress: &'a dyn archive::Progress,
    ) -> PackOptions<'a> {
        PackOptions {
            level: self.compress_level,
            threads: threads(self.threads),
            parent: self.parent.clone(),
            source,
            progress,
        }
    }
}

/// Threads to use: the flag, or one per CPU.
pub fn threads(flag: Option<u16>) -> usize {
    flag.map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[derive(Debug, Args)]
pub struct PackArgs {
    /// CRIU images directory to pack.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Archive to write ("-" for stdout).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    #[command(flatten)]
    pub flags: PackFlags,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UnpackArgs {
    /// Archive to unpack.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Directory to create (must not exist, or be empty).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Where the parent archive is, if not where it was recorded.
    #[arg(long, value_name = "ARCHIVE")]
    pub parent: Option<PathBuf>,
    /// Worker threads (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub fn run_pack(args: &PackArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let bar = Bar::new(dir_bytes(&args.dir), "packing");
    let source = format!("images directory {}", args.dir.display());
    let opts = args.flags.options(source, &bar);
    let report = if args.file.as_os_str() == "-" {
        let stdout = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout());
        archive::pack_dir(&args.dir, stdout, None, &opts)?
    } else {
        archive::pack_to_file(&args.dir, &args.file, &opts)?
    };
    bar.finish();
    if args.file.as_os_str() == "-" {
        // stdout carries the archive; the report goes to stderr.
        eprintln!("{}", describe_pack(&report, "stdout"));
    } else if args.json {
        write_json(out, &report)?;
    } else {
        writeln!(
            out,
            "{}",
            describe_pack(&report, &args.file.display().to_string())
        )?;
    }
    Ok(exit::OK)
}

/// One paragraph describing a pack, for humans.
pub fn describe_pack(r: &PackReport, to: &str) -> String {
    let mut s = format!(
        "Packed {} into {} ({}, {} of raw) in {} ({:.0} MB/s, zstd level {}, {} threads)",
        bytes(r.raw_bytes),
        to,
        bytes(r.archive_bytes),
        percent(r.archive_bytes, r.raw_bytes),
        millis(r.wall),
        r.throughput_mb_s(),
        r.level,
        r.threads
    );
    s += &format!(
        "\n  pages {}: zero {} ({}), duplicate {} ({}), in parent {} ({}), stored {}",
        r.pages,
        r.zero_pages,
        percent(r.zero_pages, r.pages),
        r.duplicate_pages,
        percent(r.duplicate_pages, r.pages),
        r.parent_pages,
        percent(r.parent_pages, r.pages),
        r.new_pages
    );
    s += &format!("\n  archive id {}", r.id);
    if let Some(p) = &r.parent {
        s += &format!(", parent {p}");
    }
    s
}

pub fn run_unpack(args: &UnpackArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let chain = Chain::open(&args.file, args.parent.as_deref())?;
    let total = chain.head().index().files.iter().map(|f| f.size).sum();
    let bar = Bar::new(total, "unpacking");
    let report = archive::unpack_to_dir(&chain, &args.dir, threads(args.threads), &bar)?;
    bar.finish();
    if args.json {
        write_json(out, &report)?;
    } else {
        writeln!(
            out,
            "{}",
            describe_unpack(&report, &args.dir.display().to_string())
        )?;
    }
    Ok(exit::OK)
}

pub fn describe_unpack(r: &UnpackReport, to: &str) -> String {
    format!(
        "Unpacked {} files ({}, {} written, zero pages left as holes) into {} in {} ({} threads, {} chunks, {} generation(s))",
        r.files,
        bytes(r.bytes),
        bytes(r.bytes_written),
        to,
        millis(r.wall),
        r.threads,
        r.chunks_read,
        r.generations
    )
}
