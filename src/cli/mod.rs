//! The command-line contract: flags, output and exit codes.
//!
//! Flags are parsed with no side effects (clap), then each command runs from
//! its own file. Every report has a human form (default) and a stable JSON
//! form (`--json`, with a `format_version`). Logs go to stderr through
//! `tracing`, set up by the binary.
//!
//! Exit codes (docs/cli.md lists them with examples): 0 success; 1 failed;
//! 2 usage; 3 host not ready (`check`); 4 refused or failed before the
//! application was frozen (it ran on untouched); 5 failed after freezing,
//! the application resumed here; 6 work lost (not running, or resumed from
//! the dump after a post-copy failure); 7 undecided (`ferry resolve`).
//! Under `--json` a failure is a JSON object on stdout ([`failure`]).

#![forbid(unsafe_code)]

mod agent;
mod bench;
mod check;
mod criu_opts;
mod demo;
pub mod docs;
mod dump;
pub mod failure;
mod ha;
mod import;
mod inspect;
mod migrate;
mod pack;
mod progress;
mod restore;

use std::io::{self, Write};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use ferry_archive::inspect::InspectError;
use ferry_core::checkpoint::CheckpointError;
use ferry_criu::{Criu, CriuError};

pub use demo::DemoError;

/// Exit statuses of the `ferry` binary.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// The operation failed (a restore, an archive, an agent, etcd).
    pub const FAILED: u8 = 1;
    /// Bad command line.
    pub const USAGE: u8 = 2;
    /// `ferry check` found CRIU unusable.
    pub const HOST_NOT_READY: u8 = 3;
    /// Refused or failed before anything was frozen: the application ran
    /// on untouched.
    pub const REFUSED: u8 = 4;
    /// Failed after the application was frozen; it was resumed (or
    /// restored) here and runs.
    pub const RESUMED: u8 = 5;
    /// The application is not running, or resumed from the dump and lost
    /// what it did on the destination (post-copy failed after the commit).
    pub const WORK_LOST: u8 = 6;
    /// Only the destination knows whether it committed; the application
    /// is left stopped here until `ferry resolve` settles it.
    pub const UNDECIDED: u8 = 7;
}

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Checkpoint, migrate and keep alive running Linux applications with CRIU",
    after_help = "Exit status: 0 success; 1 failed; 2 usage error; 3 host not ready (check); \
4 refused before freezing (the application ran on untouched); 5 failed after freezing, \
the application resumed here; 6 work lost (not running, or resumed from the dump); \
7 outcome undecided (run ferry resolve). Under --json, errors are a JSON object on stdout."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Log more on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// How ferry reaches CRIU: offered by the commands that run it.
#[derive(Debug, Clone, Args)]
pub struct CriuArgs {
    /// CRIU binary, run as `criu swrk` (default: `criu` on PATH).
    #[arg(long, env = "FERRY_CRIU", value_name = "PATH")]
    pub criu: Option<PathBuf>,
    /// Use a running `criu service --address SOCKET` instead of spawning CRIU.
    #[arg(long, value_name = "SOCKET", env = "FERRY_CRIU_SERVICE")]
    pub criu_service: Option<PathBuf>,
}

impl CriuArgs {
    fn locate(&self) -> Result<Criu, CriuError> {
        Criu::locate(self.criu.as_deref(), self.criu_service.as_deref())
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report what this host can do: CRIU, kernel features, engines, NVML.
    Check(check::CheckArgs),
    /// Checkpoint a process tree, a runc or a Docker container into an
    /// images directory or an archive.
    Dump(dump::DumpArgs),
    /// Restore a process tree, a runc or a Docker container from an images
    /// directory or an archive.
    Restore(restore::RestoreArgs),
    /// Report what a dump or an archive is made of (process tree, pages,
    /// files, CRIU stats, compression).
    Inspect(inspect::InspectArgs),
    /// Pack a CRIU images directory into a ferry archive.
    Pack(pack::PackArgs),
    /// Read a standard checkpoint archive (podman's export, CRI-O's, the
    /// kubelet's) into a ferry archive.
    Import(import::ImportArgs),
    /// Unpack a ferry archive (and its parents) into an images directory.
    Unpack(pack::UnpackArgs),
    /// Run the bundled workload, checkpoint it, restore it and show it continued.
    Demo(demo::DemoArgs),
    /// Measure (results for docs/benchmarks.md, never pass/fail).
    Bench(bench::BenchArgs),
    /// Move a running process tree, runc or Docker container to another
    /// host's agent (live migration).
    Migrate(migrate::MigrateArgs),
    /// Settle a migration whose outcome was unknown: ask the destination,
    /// then kill (committed there) or resume (aborted) the stopped source.
    Resolve(migrate::ResolveArgs),
    /// Receive migrations: listen, keep pages and checkpoints, restore.
    Agent(agent::AgentArgs),
    /// High availability through etcd: declare services, show the cluster, move.
    Ha(ha::HaArgs),
    /// Create a shared secret file for agents and migrations.
    Keygen(agent::KeygenArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(docs::CompletionsArgs),
    /// Write the manual pages (ferry.1, ferry-dump.1, ...) into a directory.
    Man(docs::ManArgs),
    /// Internal: the process `ferry check` dumps to probe socket support.
    #[command(name = "probe-socket-holder", hide = true)]
    ProbeSocketHolder,
    /// Internal: an HA agent's fencing guard (started by the agent).
    #[command(name = "guard", hide = true)]
    Guard,
    /// Internal: pid 1 of a process-tree service's namespace: runs the
    /// command and reaps orphans (a daemon that forks and exits lives on).
    #[command(name = "ns-init", hide = true)]
    NsInit {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

/// Flags shared by dump and restore, named as criu and runc name them.
#[derive(Debug, Clone, Args)]
pub struct CriuFlags {
    /// Checkpoint/restore established TCP connections.
    #[arg(long)]
    pub tcp_established: bool,
    /// Allow a tree attached to a terminal / outside its own session.
    #[arg(short = 'j', long)]
    pub shell_job: bool,
    /// Allow external unix socket connections.
    #[arg(short = 'x', long)]
    pub ext_unix_sk: bool,
    /// Checkpoint/restore file locks.
    #[arg(short = 'l', long)]
    pub file_locks: bool,
    /// CRIU log verbosity, 0 (none) to 4 (debug).
    #[arg(long, visible_alias = "verbosity", default_value_t = ferry_criu::DEFAULT_LOG_LEVEL, value_parser = clap::value_parser!(u8).range(0..=4))]
    pub log_level: u8,
    /// CRIU's log file name, in the images directory (default dump.log,
    /// restore.log).
    #[arg(short = 'o', long, value_name = "NAME", value_parser = log_file_name)]
    pub log_file: Option<String>,
}

/// A log file name inside the images directory: no directories, no "..".
fn log_file_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains('/') || s == "." || s == ".." {
        return Err(format!(
            "'{s}' is not a file name (CRIU's log goes in the images directory)"
        ));
    }
    Ok(s.to_string())
}

/// How the command line names a container (dump and restore).
#[derive(Debug, Clone, Args)]
pub struct ContainerFlags {
    /// A runc container, by id.
    #[arg(long, value_name = "ID")]
    pub runc: Option<String>,
    /// runc's state directory.
    #[arg(long, value_name = "DIR", default_value = ferry_core::target::runc::DEFAULT_ROOT)]
    pub runc_root: PathBuf,
    /// A Docker container, by name or id.
    #[arg(long, value_name = "NAME")]
    pub docker: Option<String>,
    /// Docker Engine API socket.
    #[arg(long, value_name = "PATH", default_value = ferry_core::target::docker::DEFAULT_SOCKET)]
    pub docker_socket: PathBuf,
    /// A podman container (root's podman, runc runtime), by name or id. A
    /// restore goes into the stopped container of that name.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["runc", "docker"])]
    pub podman: Option<String>,
}

/// Which of a container's files travel with its checkpoint or migration.
#[derive(Debug, Clone, Default, Args)]
pub struct FilesFlags {
    /// Leave the container's writable layer (the files it wrote, and its
    /// deletions) out: it comes back with its image's files only.
    #[arg(long)]
    pub ignore_rootfs: bool,
    /// Leave the container's named volumes out.
    #[arg(long)]
    pub ignore_volumes: bool,
    /// Carry this bind mount of the container (its path in the container)
    /// as the container's own: its contents replace the destination's.
    #[arg(long = "with-bind", value_name = "PATH")]
    pub binds: Vec<PathBuf>,
    /// Carry a runc container's whole rootfs (runc has no writable layer):
    /// it replaces the rootfs of the destination's bundle.
    #[arg(long)]
    pub with_rootfs: bool,
}

impl FilesFlags {
    pub fn scope(&self) -> ferry_core::target::fs::FsScope {
        ferry_core::target::fs::FsScope {
            ignore_rootfs: self.ignore_rootfs,
            ignore_volumes: self.ignore_volumes,
            binds: self.binds.clone(),
            runc_rootfs: self.with_rootfs,
            base: None,
        }
    }
}

impl ContainerFlags {
    pub fn container(&self) -> Option<ferry_core::target::ContainerRef> {
        use ferry_core::target::ContainerRef;
        match (&self.runc, &self.docker) {
            (Some(id), _) => Some(ContainerRef::Runc {
                id: id.clone(),
                root: self.runc_root.clone(),
            }),
            (None, Some(name)) => Some(ContainerRef::Docker {
                name: name.clone(),
                socket: self.docker_socket.clone(),
            }),
            (None, None) => self
                .podman
                .as_ref()
                .map(|name| ContainerRef::Podman { name: name.clone() }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error(transparent)]
    Checkpoint(Box<CheckpointError>),
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error(transparent)]
    Demo(Box<DemoError>),
    #[error(transparent)]
    Archive(#[from] ferry_archive::ArchiveError),
    #[error(transparent)]
    Bench(#[from] ferry_lab::bench::compress::BenchError),
    #[error(transparent)]
    Migrate(#[from] Box<ferry_migrate::MigrateError>),
    #[error(transparent)]
    Agent(#[from] ferry_agent::AgentError),
    #[error(transparent)]
    BenchMigrate(#[from] ferry_lab::bench::migrate::MigrateBenchError),
    #[error(transparent)]
    Transport(#[from] ferry_transport::TransportError),
    #[error(transparent)]
    Ha(#[from] ferry_agent::ha::HaError),
    #[error("{0}")]
    Usage(String),
    #[error("cannot write output")]
    Output(#[from] io::Error),
    #[error("cannot encode JSON output")]
    Json(#[from] serde_json::Error),
}

impl From<CheckpointError> for CliError {
    fn from(e: CheckpointError) -> Self {
        CliError::Checkpoint(Box::new(e))
    }
}

impl From<DemoError> for CliError {
    fn from(e: DemoError) -> Self {
        CliError::Demo(Box::new(e))
    }
}

impl CliError {
    /// CRIU's log lines and log path behind this error, when CRIU failed.
    pub fn criu_failure(&self) -> Option<&CriuError> {
        match self {
            CliError::Criu(e) => Some(e),
            CliError::Checkpoint(e) => e.criu(),
            CliError::Demo(e) => e.criu(),
            CliError::Migrate(e) => match e.as_ref() {
                ferry_migrate::MigrateError::Dump(c) => c.criu(),
                _ => None,
            },
            _ => None,
        }
    }
}

impl Command {
    /// Whether the command was asked for JSON output (errors follow it).
    pub fn json(&self) -> bool {
        match self {
            Command::Check(a) => a.json,
            Command::Dump(a) => a.json,
            Command::Restore(a) => a.json,
            Command::Inspect(a) => a.json,
            Command::Pack(a) => a.json,
            Command::Import(a) => a.json,
            Command::Unpack(a) => a.json,
            Command::Migrate(a) => a.json,
            Command::Bench(a) => a.json(),
            Command::Ha(a) => a.json(),
            _ => false,
        }
    }
}

/// Runs a parsed command line; returns the exit status.
pub fn run(cli: &Cli, matches: &clap::ArgMatches, out: &mut dyn Write) -> Result<u8, CliError> {
    match &cli.command {
        Command::Check(a) => check::run(a, out),
        Command::Dump(a) => dump::run(a, out),
        Command::Restore(a) => restore::run(a, out),
        Command::Inspect(a) => inspect::run(a, out),
        Command::Pack(a) => pack::run_pack(a, out),
        Command::Import(a) => import::run(a, out),
        Command::Unpack(a) => pack::run_unpack(a, out),
        Command::Demo(a) => demo::run(a, out),
        Command::Bench(a) => bench::run(a, out),
        Command::Migrate(a) => migrate::run(a, out),
        Command::Resolve(a) => migrate::resolve(a, out),
        Command::Agent(a) => agent::run(a, matches.subcommand_matches("agent"), out),
        Command::Keygen(a) => agent::keygen(a, out),
        Command::Completions(a) => docs::completions(a, out),
        Command::Man(a) => docs::man(a, out),
        Command::Ha(a) => ha::run(a, out),
        Command::NsInit { command } => {
            let status = ferry_sys::spawn::reap_as_init(command)?;
            Ok(u8::try_from(status).unwrap_or(1))
        }
        Command::Guard => {
            ferry_agent::guard::run_detached()?;
            Ok(exit::OK)
        }
        Command::ProbeSocketHolder => {
            ferry_core::probe::hold_inet_socket()?;
            Ok(exit::OK)
        }
    }
}

fn write_json(out: &mut dyn Write, value: &impl serde::Serialize) -> Result<(), CliError> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_criu_style_flags() {
        let cli = Cli::try_parse_from([
            "ferry",
            "dump",
            "-t",
            "42",
            "-D",
            "/tmp/x",
            "--leave-running",
            "--tcp-established",
            "--log-level",
            "4",
        ])
        .unwrap();
        let Command::Dump(d) = cli.command else {
            panic!("not a dump")
        };
        assert_eq!(d.pid, Some(42));
        assert!(d.leave_running);
        assert!(d.flags.tcp_established);
        assert_eq!(d.flags.log_level, 4);
    }

    #[test]
    fn refuses_bad_log_level() {
        assert!(Cli::try_parse_from(["ferry", "restore", "-D", "/x", "--log-level", "9"]).is_err());
    }
}
