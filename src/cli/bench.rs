//! `ferry bench`.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{exit, write_json, CliError, GlobalArgs};
use crate::bench::compress::{render, CompressBench, Sink};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Pack throughput and ratio against zstd; restore from archive vs directory.
    Compress(CompressArgs),
}

#[derive(Debug, Args)]
pub struct CompressArgs {
    /// Resident memory of the workload, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// zstd levels to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 3])]
    pub levels: Vec<i32>,
    /// Thread counts to measure (default: 1 and one per CPU).
    #[arg(long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Runs of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Base of the work directory (default: /dev/shm when it has room).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Where compressed output goes: "null" (/dev/null: compression
    /// speed) or "file" (the work directory: compression plus storage).
    #[arg(long, default_value = "null", value_parser = ["null", "file"])]
    pub sink: String,
    /// Skip the restore comparison.
    #[arg(long)]
    pub no_restore: bool,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(global: &GlobalArgs, args: &BenchArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let BenchCommand::Compress(a) = &args.which;
    let criu = global.criu()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if a.threads.is_empty() {
        let mut t = vec![1, cpus];
        t.dedup();
        t
    } else {
        a.threads.clone()
    };
    let bench = CompressBench {
        workload_exe: crate::workload::find_exe().ok_or(super::DemoError::NoWorkload)?,
        size_mib: a.size_mib,
        levels: a.levels.clone(),
        threads,
        repeat: a.repeat.max(1),
        workdir: a.workdir.clone(),
        sink: if a.sink == "file" {
            Sink::File
        } else {
            Sink::Null
        },
        restore: !a.no_restore,
    };
    let results = bench.run(&criu, &mut |m| eprintln!("bench: {m}"))?;
    if a.json {
        write_json(out, &results)?;
    } else {
        write!(out, "{}", render(&results))?;
    }
    Ok(exit::OK)
}
