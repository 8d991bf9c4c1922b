//! `ferry restore`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::pack::threads;
use super::progress::Bar;
use super::{exit, write_json, CliError, ContainerFlags, CriuFlags};
use ferry_archive::{UnpackReport, ZeroPages};
use ferry_core::checkpoint::{self, ArchiveRestoreOptions};
use ferry_criu::{NoHooks, RestoreRequest, Timeline};
use ferry_image::units::millis;
use ferry_image::RestoreStats;

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("from").required(true).args(["images_dir", "archive"]))]
pub struct RestoreArgs {
    #[command(flatten)]
    pub criu: super::CriuArgs,
    /// Directory holding the images to restore.
    #[arg(short = 'D', long, value_name = "DIR")]
    pub images_dir: Option<PathBuf>,
    /// Restore from a ferry archive: CRIU reads the images straight from it
    /// (checked, decompressed on the way; nothing unpacked).
    #[arg(long, value_name = "FILE")]
    pub archive: Option<PathBuf>,
    /// With --archive: where the parent archive is, if not where recorded.
    #[arg(long, value_name = "ARCHIVE", requires = "archive")]
    pub parent: Option<PathBuf>,
    /// With --archive: base directory for staging (default: /dev/shm when it
    /// has room, else the temporary directory).
    #[arg(long, value_name = "DIR", requires = "archive")]
    pub staging: Option<PathBuf>,
    /// With --archive: unpacking threads (default: one per CPU).
    #[arg(long, requires = "archive", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// With --archive: write the zero pages of private anonymous memory, as
    /// a restore from an images directory does. By default they are left
    /// out: they read as zero all the same, and stay unallocated until the
    /// application writes them (faster, and less memory).
    #[arg(long, requires = "archive")]
    pub write_zero_pages: bool,
    /// Write the restored root's pid to this file.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// Restore a container (through runc, Docker or podman) rather than a process tree.
    #[command(flatten)]
    pub container: ContainerFlags,
    /// With --runc: the bundle to restore with (default: the one recorded
    /// at dump time).
    #[arg(long, value_name = "DIR", requires = "runc")]
    pub bundle: Option<PathBuf>,
    #[command(flatten)]
    pub flags: CriuFlags,
    #[command(flatten)]
    pub criu_opts: super::criu_opts::CriuOptionArgs,
    #[command(flatten)]
    pub criu_timeout: super::criu_opts::CriuTimeoutArg,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct RestoreReport {
    format_version: u32,
    pid: i32,
    container: Option<String>,
    images_dir: Option<String>,
    archive: Option<String>,
    /// From the command's start to the restored tree running.
    wall_us: u64,
    /// CRIU's restore request alone.
    criu_wall_us: u64,
    unpack: Option<UnpackReport>,
    criu_stats: Option<RestoreStats>,
    timeline: Timeline,
}

pub fn run(args: &RestoreArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let options = ferry_criu::CriuOptions {
        timeout: args.criu_timeout.criu_timeout,
        ..args.criu_opts.options()?
    };
    if let Some(container) = args.container.container() {
        if options != ferry_criu::CriuOptions::default() {
            // The engine runs CRIU for a container's restore.
            return Err(CliError::Usage(
                "CRIU options are not passed through runc or Docker on a container's restore; give them to the dump, or restore the tree with ferry"
                    .into(),
            ));
        }
        return run_container(&container, args, out);
    }
    let criu = args.criu.locate()?;
    let req = RestoreRequest {
        options,
        log_file: args
            .flags
            .log_file
            .clone()
            .unwrap_or_else(|| "restore.log".into()),
        tcp_established: args.flags.tcp_established,
        shell_job: args.flags.shell_job,
        ext_unix_sk: args.flags.ext_unix_sk,
        file_locks: args.flags.file_locks,
        log_level: args.flags.log_level,
        ..RestoreRequest::new(args.images_dir.clone().unwrap_or_default())
    };
    let (outcome, unpack, wall) = match &args.archive {
        Some(archive) => {
            let total = std::fs::metadata(archive).map(|m| m.len()).unwrap_or(0);
            let bar = Bar::new(total, "streaming");
            let opts = ArchiveRestoreOptions {
                parent: args.parent.as_deref(),
                threads: threads(args.threads),
                staging: args.staging.as_deref(),
                zero_pages: if args.write_zero_pages {
                    ZeroPages::Write
                } else {
                    ZeroPages::LeaveOut
                },
                progress: &bar,
            };
            let r = checkpoint::restore_from_archive(&criu, archive, &req, &opts, &mut NoHooks)?;
            bar.finish();
            (r.restore, Some(r.unpack), r.wall)
        }
        None => {
            let r = checkpoint::restore(&criu, &req, &mut NoHooks)?;
            let wall = r.wall;
            (r, None, wall)
        }
    };
    if let Some(pidfile) = &args.pidfile {
        write_pidfile(pidfile, outcome.pid)?;
    }
    let report = RestoreReport {
        format_version: 1,
        pid: outcome.pid,
        container: None,
        images_dir: args.images_dir.as_ref().map(|d| d.display().to_string()),
        archive: args.archive.as_ref().map(|a| a.display().to_string()),
        wall_us: wall.as_micros() as u64,
        criu_wall_us: outcome.wall.as_micros() as u64,
        unpack,
        criu_stats: outcome.stats,
        timeline: outcome.timeline,
    };
    if args.json {
        write_json(out, &report)?;
        return Ok(exit::OK);
    }
    let from = report
        .archive
        .clone()
        .or(report.images_dir.clone())
        .unwrap_or_default();
    writeln!(
        out,
        "Restored pid {} from {} in {}",
        report.pid,
        from,
        millis(wall)
    )?;
    if let Some(u) = &report.unpack {
        writeln!(
            out,
            "  Streamed {} images ({}) from the archive to CRIU in {}, nothing unpacked ({} threads, {} chunks, {} generation(s))",
            u.files,
            ferry_image::units::bytes(u.bytes_written),
            millis(u.wall),
            u.threads,
            u.chunks_read,
            u.generations
        )?;
        if u.zero_pages_left_out > 0 {
            writeln!(
                out,
                "  {} zero pages ({}) of private anonymous memory left unwritten: they read as zero (--write-zero-pages writes them)",
                u.zero_pages_left_out,
                ferry_image::units::bytes(u.zero_pages_left_out * ferry_sys::PAGE_SIZE as u64)
            )?;
        }
        writeln!(out, "  CRIU restore {}", millis(outcome.wall))?;
    }
    Ok(exit::OK)
}

/// Restores a container through its engine.
fn run_container(
    container: &ferry_core::target::ContainerRef,
    args: &RestoreArgs,
    out: &mut dyn Write,
) -> Result<u8, CliError> {
    let bar;
    let source = match (&args.archive, &args.images_dir) {
        (Some(path), _) => {
            bar = Bar::new(
                std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
                "unpacking",
            );
            checkpoint::Source::Archive {
                path,
                parent: args.parent.as_deref(),
                staging: args.staging.as_deref(),
                threads: threads(args.threads),
                progress: &bar,
            }
        }
        (None, Some(dir)) => {
            bar = Bar::new(0, "");
            checkpoint::Source::Dir(dir)
        }
        (None, None) => unreachable!("clap requires --images-dir or --archive"),
    };
    let flags = ferry_core::target::runc::RestoreFlags {
        tcp_established: args.flags.tcp_established,
        ext_unix_sk: args.flags.ext_unix_sk,
        file_locks: args.flags.file_locks,
        consume_images: false,
    };
    let r = checkpoint::restore_container(container, source, args.bundle.as_deref(), flags)?;
    bar.finish();
    if let Some(pidfile) = &args.pidfile {
        write_pidfile(pidfile, r.pid)?;
    }
    let report = RestoreReport {
        format_version: 1,
        pid: r.pid,
        container: Some(container.describe()),
        images_dir: args.images_dir.as_ref().map(|d| d.display().to_string()),
        archive: args.archive.as_ref().map(|a| a.display().to_string()),
        wall_us: r.wall.as_micros() as u64,
        criu_wall_us: 0,
        unpack: r.unpack,
        criu_stats: None,
        timeline: Timeline::default(),
    };
    if args.json {
        write_json(out, &report)?;
    } else {
        writeln!(
            out,
            "Restored {} (init pid {}) in {}",
            container.describe(),
            r.pid,
            millis(r.wall)
        )?;
    }
    Ok(exit::OK)
}

/// Writes the pid atomically: a reader never sees a partial pidfile.
fn write_pidfile(path: &std::path::Path, pid: i32) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let mut tmp = tempfile::NamedTempFile::new_in(dir.unwrap_or(std::path::Path::new(".")))?;
    writeln!(tmp, "{pid}")?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
