//! `ferry restore`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::{exit, write_json, CliError, CriuFlags, GlobalArgs};
use crate::checkpoint;
use crate::criu::{NoHooks, RestoreRequest, Timeline};
use crate::image::RestoreStats;
use crate::units::millis;

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Directory holding the images to restore.
    #[arg(short = 'D', long, value_name = "DIR")]
    pub images_dir: PathBuf,
    /// Write the restored root's pid to this file.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    #[command(flatten)]
    pub flags: CriuFlags,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct RestoreReport {
    format_version: u32,
    pid: i32,
    images_dir: String,
    wall_us: u64,
    criu_stats: Option<RestoreStats>,
    timeline: Timeline,
    log: String,
}

pub fn run(global: &GlobalArgs, args: &RestoreArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let criu = global.criu()?;
    let req = RestoreRequest {
        tcp_established: args.flags.tcp_established,
        shell_job: args.flags.shell_job,
        ext_unix_sk: args.flags.ext_unix_sk,
        file_locks: args.flags.file_locks,
        log_level: args.flags.log_level,
        ..RestoreRequest::new(&args.images_dir)
    };
    let outcome = checkpoint::restore(&criu, &req, &mut NoHooks)?;
    if let Some(pidfile) = &args.pidfile {
        write_pidfile(pidfile, outcome.pid)?;
    }
    let report = RestoreReport {
        format_version: 1,
        pid: outcome.pid,
        images_dir: args.images_dir.display().to_string(),
        wall_us: outcome.wall.as_micros() as u64,
        criu_stats: outcome.stats,
        timeline: outcome.timeline,
        log: outcome.log.display().to_string(),
    };
    if args.json {
        write_json(out, &report)?;
    } else {
        writeln!(
            out,
            "Restored pid {} from {} in {}",
            report.pid,
            report.images_dir,
            millis(outcome.wall)
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
