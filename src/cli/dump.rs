//! `ferry dump`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::pack::{describe_pack, PackFlags};
use super::progress::Bar;
use super::{exit, write_json, CliError, ContainerFlags, CriuFlags, FilesFlags};
use ferry_archive::PackReport;
use ferry_core::checkpoint;
use ferry_criu::{DumpOutcome, DumpRequest, NoHooks, Timeline};
use ferry_image::units::{bytes, millis};
use ferry_image::{DumpStats, ImagesDir};

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("to").required(true).multiple(true).args(["images_dir", "archive"]))]
#[command(group = clap::ArgGroup::new("what").required(true).args(["pid", "runc", "docker", "podman"]))]
pub struct DumpArgs {
    #[command(flatten)]
    pub criu: super::CriuArgs,
    /// Root pid of the process tree to dump.
    #[arg(short = 't', long = "pid", visible_alias = "tree", value_name = "PID")]
    pub pid: Option<i32>,
    #[command(flatten)]
    pub container: ContainerFlags,
    #[command(flatten)]
    pub files: FilesFlags,
    /// Directory to write the images to (created; must hold no other dump's images if it
    /// exists). With --archive the images are kept there too.
    #[arg(short = 'D', long, value_name = "DIR")]
    pub images_dir: Option<PathBuf>,
    /// Write a ferry archive (compressed, deduplicated) instead of, or as
    /// well as, an images directory.
    #[arg(long, value_name = "FILE")]
    pub archive: Option<PathBuf>,
    #[command(flatten)]
    pub pack: PackFlags,
    /// Leave the tree running after the dump (default: it is stopped).
    #[arg(short = 'R', long)]
    pub leave_running: bool,
    /// Leave the tree stopped after the dump (SIGCONT resumes it).
    #[arg(short = 's', long, conflicts_with = "leave_running")]
    pub leave_stopped: bool,
    /// Dump even if the tree holds GPU state that cannot be carried: it is
    /// LOST, and the processes restore with a broken GPU context.
    #[arg(long)]
    pub ignore_gpu: bool,
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
struct DumpReport {
    format_version: u32,
    /// The dumped tree's root (the container's init, as the host sees it).
    pid: i32,
    container: Option<String>,
    images_dir: Option<String>,
    archive: Option<String>,
    leave_running: bool,
    wall_us: u64,
    images_bytes: u64,
    images_files: usize,
    criu_stats: Option<DumpStats>,
    timeline: Timeline,
    pack: Option<PackReport>,
    /// A container's files carried with it.
    container_files: Option<ferry_core::target::fs::FsManifest>,
}

pub fn run(args: &DumpArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let criu = args.criu.locate()?;
    let container = args.container.container();
    let req = DumpRequest {
        leave_running: args.leave_running,
        leave_stopped: args.leave_stopped,
        tcp_established: args.flags.tcp_established,
        shell_job: args.flags.shell_job,
        ext_unix_sk: args.flags.ext_unix_sk,
        file_locks: args.flags.file_locks,
        log_level: args.flags.log_level,
        ignore_gpu: args.ignore_gpu,
        log_file: args
            .flags
            .log_file
            .clone()
            .unwrap_or_else(|| "dump.log".into()),
        options: ferry_criu::CriuOptions {
            timeout: args.criu_timeout.criu_timeout,
            ..args.criu_opts.options()?
        },
        ..DumpRequest::new(
            args.pid.unwrap_or(0),
            args.images_dir.clone().unwrap_or_default(),
        )
    };
    let mut pid = req.pid;
    let scope = args.files.scope();
    let mut files = None;
    let (outcome, pack): (DumpOutcome, Option<PackReport>) = match &args.archive {
        Some(archive) => {
            let rss = ferry_image::process::tree_rss_bytes(req.pid).unwrap_or(0);
            let bar = Bar::new(rss, "packing");
            let source = format!(
                "{} on {}",
                container
                    .as_ref()
                    .map_or_else(|| format!("pid {}", req.pid), |c| c.describe()),
                nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default()
            );
            let opts = args.pack.options(source, &bar);
            let r = checkpoint::dump_to_archive(
                &criu,
                container.as_ref().map(|c| (c, &scope)),
                &req,
                args.images_dir.is_some(),
                archive,
                &opts,
                &mut NoHooks,
            )?;
            bar.finish();
            files = r.files;
            (r.dump, Some(r.pack))
        }
        None => match &container {
            Some(c) => {
                let r = checkpoint::dump_container(&criu, c, &req, &scope, &mut NoHooks)?;
                pid = r.init_pid;
                files = r.files;
                (r.dump, None)
            }
            None => (checkpoint::dump(&criu, &req, &mut NoHooks)?, None),
        },
    };
    let (images_bytes, images_files) = match args.images_dir.as_deref().map(ImagesDir::open) {
        Some(Ok(d)) => (d.files().iter().map(|f| f.bytes).sum(), d.files().len()),
        _ => (
            pack.as_ref().map_or(0, |p| p.raw_bytes),
            pack.as_ref().map_or(0, |p| p.files),
        ),
    };
    let report = DumpReport {
        format_version: 1,
        pid,
        container: container.as_ref().map(|c| c.describe()),
        images_dir: args.images_dir.as_ref().map(|d| d.display().to_string()),
        archive: args.archive.as_ref().map(|a| a.display().to_string()),
        leave_running: args.leave_running,
        wall_us: outcome.wall.as_micros() as u64,
        images_bytes,
        images_files,
        criu_stats: outcome.stats,
        timeline: outcome.timeline,
        pack,
        container_files: files,
    };
    if args.json {
        write_json(out, &report)?;
        return Ok(exit::OK);
    }
    let to = report
        .archive
        .clone()
        .or(report.images_dir.clone())
        .unwrap_or_default();
    writeln!(
        out,
        "Dumped {} into {} ({})",
        report
            .container
            .clone()
            .unwrap_or_else(|| format!("pid {pid}")),
        to,
        if args.leave_running {
            "left running"
        } else if args.leave_stopped {
            "left stopped: SIGCONT resumes it"
        } else {
            "stopped: the tree was killed after the dump"
        }
    )?;
    if let Some(s) = &report.criu_stats {
        writeln!(
            out,
            "  frozen {} (freezing {}, memdump {}, memwrite {}); pages scanned {}, written {}",
            millis(s.frozen),
            millis(s.freezing),
            millis(s.memdump),
            millis(s.memwrite),
            s.pages_scanned,
            s.pages_written
        )?;
    }
    writeln!(
        out,
        "  images {} in {} files; CRIU dump took {} wall; CRIU log {}",
        bytes(images_bytes),
        images_files,
        millis(outcome.wall),
        outcome.log.display()
    )?;
    if let Some(m) = &report.container_files {
        writeln!(
            out,
            "  container files: {} files, {} in {} tree(s), {} deletion(s), captured while frozen",
            m.files(),
            bytes(m.bytes()),
            m.roots.len(),
            m.roots.iter().map(|r| r.deleted.len()).sum::<usize>()
        )?;
    }
    if let (Some(p), Some(a)) = (&report.pack, &args.archive) {
        writeln!(
            out,
            "  {}",
            describe_pack(p, &a.display().to_string()).replace('\n', "\n  ")
        )?;
    }
    Ok(exit::OK)
}
