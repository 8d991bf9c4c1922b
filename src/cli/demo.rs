//! `ferry demo`: ferry's main job on the bundled workload, end to end.
//!
//! Starts `ferry-workload` (resident memory with zero, repeated, text and
//! random pages, and a counter), dumps it in stop mode, packs the images
//! into an archive, restores from the archive, shows that the counter
//! continued from where it stopped and that every page of its memory came
//! back intact, then prints what `inspect` says of the archive.

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{exit, CliError};
use ferry_archive::inspect::{inspect, render_human, InspectError};
use ferry_archive::{self as archive, ArchiveError, NoProgress, PackOptions, ZeroPages};
use ferry_core::checkpoint::{self, ArchiveRestoreOptions, CheckpointError};
use ferry_criu::{CriuError, DumpRequest, NoHooks, RestoreRequest};
use ferry_image::units::{bytes, millis, percent};
use ferry_lab::workload::{self, Launch};

/// Longest time the workload may take to fill its memory and start counting.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for a restored workload to report again.
const CONTINUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Ticks (1 ms each) to let the workload run before and after the checkpoint.
const RUN_TICKS: u64 = 300;

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub criu: super::CriuArgs,
    /// Resident memory of the demo workload, in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Directory for the images and the workload's report (default: a new
    /// temporary directory, removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// Leave the restored workload running (its pid is printed).
    #[arg(long)]
    pub keep_running: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "cannot find the {} binary beside ferry or on PATH (build it with cargo build)",
        workload::EXE_NAME
    )]
    NoWorkload,
    #[error("demo workload: {what}")]
    Workload {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("demo checkpoint step failed")]
    Checkpoint(#[from] CheckpointError),
    #[error("demo inspect step failed")]
    Inspect(#[from] InspectError),
    #[error("demo pack step failed")]
    Archive(#[from] ArchiveError),
    #[error("restored workload restarted its counter: {after} after restore, {before} at the checkpoint")]
    CounterRestarted { before: u64, after: u64 },
    #[error("restored workload found its memory changed")]
    MemoryCorrupted,
}

impl DemoError {
    pub fn criu(&self) -> Option<&CriuError> {
        match self {
            DemoError::Checkpoint(e) => e.criu(),
            _ => None,
        }
    }
}

fn step(what: &'static str) -> impl FnOnce(io::Error) -> DemoError {
    move |source| DemoError::Workload { what, source }
}

pub fn run(args: &DemoArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let criu = args.criu.locate()?;
    let exe = workload::find_exe().ok_or(DemoError::NoWorkload)?;
    let temp;
    let workdir = match &args.workdir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("ferry-demo-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let images = workdir.join("images");
    let report = workdir.join("workload.report");

    writeln!(
        out,
        "== 1. Start the bundled workload ({} MiB)",
        args.size_mib
    )?;
    let mut w = Launch::new(&exe, args.size_mib, &report)
        .spawn()
        .map_err(step("start"))?;
    let first = w
        .wait_ready(READY_TIMEOUT)
        .map_err(step("wait until ready"))?;
    let running = w
        .wait_counter_above(first.counter + RUN_TICKS, CONTINUE_TIMEOUT)
        .map_err(step("watch counter"))?;
    writeln!(
        out,
        "   pid {} counting: counter {} ({} pages: {} zero, {} repeated, {} text, {} random)",
        w.pid(),
        running.counter,
        running.pages.total,
        running.pages.zero,
        running.pages.repeat,
        running.pages.text,
        running.pages.random
    )?;

    writeln!(
        out,
        "== 2. Checkpoint it (stop mode) into {}",
        images.display()
    )?;
    let dump = checkpoint::dump(&criu, &DumpRequest::new(w.pid(), &images), &mut NoHooks)
        .map_err(DemoError::from)?;
    w.reap(Duration::from_secs(10)).map_err(step("reap"))?;
    let at_dump = w.report().map_err(step("read report"))?.counter;
    if let Some(s) = &dump.stats {
        writeln!(
            out,
            "   frozen {} (memdump {}, memwrite {}), {} pages written; dump wall {}",
            millis(s.frozen),
            millis(s.memdump),
            millis(s.memwrite),
            s.pages_written,
            millis(dump.wall)
        )?;
    }
    writeln!(
        out,
        "   the workload is gone; its last report said counter {at_dump}"
    )?;

    let archive_path = workdir.join("demo.ferry");
    writeln!(out, "== 3. Pack the images into a ferry archive")?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pack = archive::pack_to_file(
        &images,
        &archive_path,
        &PackOptions {
            level: archive::DEFAULT_LEVEL,
            threads,
            parent: None,
            source: "ferry demo".into(),
            progress: &NoProgress,
        },
    )
    .map_err(DemoError::from)?;
    writeln!(
        out,
        "   {} -> {} ({}): {} zero pages elided, {} duplicate pages stored once; {} ({:.0} MB/s)",
        bytes(pack.raw_bytes),
        bytes(pack.archive_bytes),
        percent(pack.archive_bytes, pack.raw_bytes),
        pack.zero_pages,
        pack.duplicate_pages,
        millis(pack.wall),
        pack.throughput_mb_s()
    )?;

    writeln!(out, "== 4. Restore it from the archive")?;
    let opts = ArchiveRestoreOptions {
        parent: None,
        threads,
        staging: None,
        zero_pages: ZeroPages::LeaveOut,
        progress: &NoProgress,
    };
    let restored = checkpoint::restore_from_archive(
        &criu,
        &archive_path,
        &RestoreRequest::new(""),
        &opts,
        &mut NoHooks,
    )
    .map_err(DemoError::from)?;
    let mut w = workload::Workload::adopt(restored.restore.pid, &report);
    writeln!(
        out,
        "   restored pid {} in {} (images streamed from the archive in {}, CRIU restore {}; {} zero pages left unwritten)",
        restored.restore.pid,
        millis(restored.wall),
        millis(restored.unpack.wall),
        millis(restored.restore.wall),
        restored.unpack.zero_pages_left_out
    )?;
    let after = w
        .wait_counter_above(at_dump + RUN_TICKS, CONTINUE_TIMEOUT)
        .map_err(step("watch restored counter"))?;
    if after.counter < at_dump {
        return Err(DemoError::CounterRestarted {
            before: at_dump,
            after: after.counter,
        }
        .into());
    }
    let verified = w
        .verify_memory(CONTINUE_TIMEOUT)
        .map_err(step("verify memory"))?;
    if !verified.mem_ok {
        return Err(DemoError::MemoryCorrupted.into());
    }
    writeln!(
        out,
        "   counter continued: {} at the checkpoint -> {} now (never from zero)",
        at_dump, verified.counter
    )?;
    writeln!(
        out,
        "   memory verified: all {} pages ({}) hold what they held before",
        verified.pages.total,
        bytes(verified.pages.total * ferry_sys::PAGE_SIZE as u64)
    )?;

    writeln!(
        out,
        "== 5. What the dump is made of (ferry inspect of the archive)"
    )?;
    let report = inspect(&archive_path).map_err(DemoError::from)?;
    write!(out, "{}", render_human(&report))?;

    if args.keep_running {
        writeln!(
            out,
            "== The restored workload keeps running as pid {}",
            w.pid()
        )?;
        std::mem::forget(w);
    } else {
        w.stop(Duration::from_secs(5));
        writeln!(out, "== Done: the restored workload was stopped")?;
    }
    Ok(exit::OK)
}
