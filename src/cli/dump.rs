//! `ferry dump`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::{exit, write_json, CliError, CriuFlags, GlobalArgs};
use crate::checkpoint;
use crate::criu::{DumpRequest, NoHooks, Timeline};
use crate::image::{DumpStats, ImagesDir};
use crate::units::{bytes, millis};

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Root pid of the process tree to dump.
    #[arg(short = 't', long = "pid", visible_alias = "tree", value_name = "PID")]
    pub pid: i32,
    /// Directory to write the images to (created; must be empty if it exists).
    #[arg(short = 'D', long, value_name = "DIR")]
    pub images_dir: PathBuf,
    /// Leave the tree running after the dump (default: it is stopped).
    #[arg(short = 'R', long)]
    pub leave_running: bool,
    #[command(flatten)]
    pub flags: CriuFlags,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct DumpReport {
    format_version: u32,
    pid: i32,
    images_dir: String,
    leave_running: bool,
    wall_us: u64,
    images_bytes: u64,
    images_files: usize,
    criu_stats: Option<DumpStats>,
    timeline: Timeline,
    log: String,
}

pub fn run(global: &GlobalArgs, args: &DumpArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let criu = global.criu()?;
    let req = DumpRequest {
        leave_running: args.leave_running,
        tcp_established: args.flags.tcp_established,
        shell_job: args.flags.shell_job,
        ext_unix_sk: args.flags.ext_unix_sk,
        file_locks: args.flags.file_locks,
        log_level: args.flags.log_level,
        ..DumpRequest::new(args.pid, &args.images_dir)
    };
    let outcome = checkpoint::dump(&criu, &req, &mut NoHooks)?;
    let (images_bytes, images_files) = match ImagesDir::open(&args.images_dir) {
        Ok(d) => (d.files().iter().map(|f| f.bytes).sum(), d.files().len()),
        Err(_) => (0, 0),
    };
    let report = DumpReport {
        format_version: 1,
        pid: args.pid,
        images_dir: args.images_dir.display().to_string(),
        leave_running: args.leave_running,
        wall_us: outcome.wall.as_micros() as u64,
        images_bytes,
        images_files,
        criu_stats: outcome.stats,
        timeline: outcome.timeline,
        log: outcome.log.display().to_string(),
    };
    if args.json {
        write_json(out, &report)?;
        return Ok(exit::OK);
    }
    writeln!(
        out,
        "Dumped pid {} into {} ({})",
        args.pid,
        report.images_dir,
        if args.leave_running {
            "left running"
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
        "  images {} in {} files; dump took {} wall; CRIU log {}",
        bytes(images_bytes),
        images_files,
        millis(outcome.wall),
        report.log
    )?;
    Ok(exit::OK)
}
