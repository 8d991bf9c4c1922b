//! `ferry bench`.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{exit, write_json, CliError};
use ferry_lab::bench::compress::{render, CompressBench, Sink};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: BenchCommand,
}

impl BenchArgs {
    pub fn json(&self) -> bool {
        match &self.which {
            BenchCommand::Compress(a) => a.json,
            BenchCommand::Migrate(a) => a.json,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Pack throughput and ratio against zstd; restore from archive vs directory.
    Compress(CompressArgs),
    /// Application-observed downtime of ferry's migrations against cold
    /// CRIU migration, between two namespace hosts over a shaped link.
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Resident sizes of the workload, MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [256, 1024])]
    pub sizes: Vec<u64>,
    /// Dirty rates, MiB of pages rewritten per second.
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 10.24, 40.0])]
    pub dirty: Vec<f64>,
    /// Methods: precopy, postcopy, hybrid, cold.
    #[arg(long, value_delimiter = ',', default_values_t = ["precopy".to_string(), "postcopy".to_string(), "hybrid".to_string(), "cold".to_string()], value_parser = ["precopy", "postcopy", "hybrid", "cold"])]
    pub methods: Vec<String>,
    /// Link rate in Mbit/s (0: unshaped).
    #[arg(long, default_value_t = 1000)]
    pub rate_mbit: u64,
    /// ferry's --max-downtime for its migrations.
    #[arg(long, default_value = "300ms")]
    pub max_downtime: String,
    /// Work directory (default: a fresh one under /tmp).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Also write the results as CSV here.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Also write an SVG plot of downtime against dirty rate here.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

fn run_migrate(a: &MigrateArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    use ferry_lab::bench::migrate::{self, Method, MigrateBench};
    let methods: Vec<Method> = a.methods.iter().filter_map(|m| Method::parse(m)).collect();
    let tmp;
    let workdir = match &a.workdir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("ferry-bench-migrate-")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let bench = MigrateBench {
        ferry_exe: std::env::current_exe()?,
        workload_exe: ferry_lab::workload::find_exe().ok_or(super::DemoError::NoWorkload)?,
        sizes_mib: a.sizes.clone(),
        dirty_mib_s: a.dirty.clone(),
        methods,
        rate_mbit: (a.rate_mbit > 0).then_some(a.rate_mbit),
        max_downtime: a.max_downtime.clone(),
        workdir,
    };
    let cases = bench.run(&mut |c| {
        let d = c.downtime_ms.map_or("-".into(), |d| format!("{d:.0} ms"));
        eprintln!(
            "bench: {} MiB, dirty {} MiB/s, {}: downtime {d}{}",
            c.size_mib,
            c.dirty_mib_s,
            c.method.name(),
            c.error
                .as_ref()
                .map(|e| format!(" (FAILED: {e})"))
                .unwrap_or_default()
        )
    })?;
    if let Some(p) = &a.csv {
        std::fs::write(p, migrate::csv(&cases))?;
    }
    if let Some(p) = &a.svg {
        std::fs::write(p, migrate::svg(&cases))?;
    }
    if a.json {
        write_json(out, &cases)?;
    } else {
        migrate::render(&cases, out)?;
    }
    Ok(if cases.iter().any(|c| c.error.is_some()) {
        exit::FAILED
    } else {
        exit::OK
    })
}

#[derive(Debug, Args)]
pub struct CompressArgs {
    #[command(flatten)]
    pub criu: super::CriuArgs,
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
    /// Skip the pack and zstd figures (measure restores only).
    #[arg(long)]
    pub no_pack: bool,
    /// Layouts of the zero pages whose restores are compared: scattered
    /// (a quarter of the pages at random, the bundled workload), every-2,
    /// every-4, none, all, one-run (half the pages in one run).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "scattered,every-2,every-4,none,all,one-run"
    )]
    pub layouts: Vec<ferry_lab::bench::compress::Layout>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &BenchArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let a = match &args.which {
        BenchCommand::Compress(a) => a,
        BenchCommand::Migrate(a) => return run_migrate(a, out),
    };
    let criu = a.criu.locate()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if a.threads.is_empty() {
        let mut t = vec![1, cpus];
        t.dedup();
        t
    } else {
        a.threads.clone()
    };
    let bench = CompressBench {
        workload_exe: ferry_lab::workload::find_exe().ok_or(super::DemoError::NoWorkload)?,
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
        pack: !a.no_pack,
        layouts: if a.no_restore {
            Vec::new()
        } else {
            a.layouts.clone()
        },
    };
    let results = bench.run(&criu, &mut |m| eprintln!("bench: {m}"))?;
    if a.json {
        write_json(out, &results)?;
    } else {
        write!(out, "{}", render(&results))?;
    }
    Ok(exit::OK)
}
