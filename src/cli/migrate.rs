//! `ferry migrate`: move a running process tree to another host's agent.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{exit, write_json, CliError, CriuFlags};
use ferry_migrate::{self as migrate, MigrateOptions, MigrateTarget};
use ferry_transport::msg::RestoreOpts;
use ferry_transport::Secret;

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub criu: super::CriuArgs,
    /// Root of the process tree to move.
    #[arg(
        short = 't',
        long = "pid",
        value_name = "PID",
        required_unless_present_any = ["runc", "docker"],
        conflicts_with_all = ["runc", "docker"]
    )]
    pub pid: Option<i32>,
    /// A Docker container to move (restored through the destination's
    /// dockerd, under --docker-name or the same name).
    #[arg(long, value_name = "NAME", conflicts_with = "runc")]
    pub docker: Option<String>,
    /// dockerd's API socket here.
    #[arg(long, value_name = "SOCKET", default_value = ferry_core::target::docker::DEFAULT_SOCKET)]
    pub docker_socket: PathBuf,
    /// The Docker container's name on the destination.
    #[arg(long, value_name = "NAME", requires = "docker")]
    pub docker_name: Option<String>,
    #[command(flatten)]
    pub files: super::FilesFlags,
    /// A runc container to move (restored under the same id in the
    /// destination agent's runc root).
    #[arg(long, value_name = "ID")]
    pub runc: Option<String>,
    /// runc's state directory here.
    #[arg(long, value_name = "DIR", default_value = ferry_core::target::runc::DEFAULT_ROOT)]
    pub runc_root: PathBuf,
    /// The container's bundle on the destination (default: the same path).
    #[arg(long, value_name = "DIR", requires = "runc")]
    pub bundle: Option<PathBuf>,
    /// The destination's `ferry agent`.
    #[arg(long, value_name = "HOST:PORT")]
    pub to: String,
    /// Shared secret file (the agent's).
    #[arg(long, value_name = "FILE", env = "FERRY_KEY")]
    pub key: PathBuf,
    /// Stop pre-copy once the final transfer is predicted to fit this
    /// (e.g. 300ms, 1s).
    #[arg(long, value_name = "TIME", default_value = "300ms", value_parser = parse_duration)]
    pub max_downtime: Duration,
    /// Most pre-copy rounds before the final copy (1: send everything once).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_rounds: u32,
    /// Parallel data streams (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub streams: Option<u16>,
    /// Where the final dump is staged (default: tmpfs when it fits).
    #[arg(long, value_name = "DIR")]
    pub staging: Option<PathBuf>,
    /// Keep a copy of the final dump's images in DIR.
    #[arg(long, value_name = "DIR")]
    pub keep_images: Option<PathBuf>,
    /// Longest wait for the destination (a dead agent or a cut link fails
    /// the migration, and the application resumes here, after this).
    #[arg(long, value_name = "TIME", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// When the destination's answer to the commit is lost: how long to
    /// keep asking it before giving up (exit 7: the application is left
    /// stopped here until `ferry resolve` settles it).
    #[arg(long, value_name = "TIME", default_value = "60s", value_parser = parse_duration)]
    pub outcome_wait: Duration,
    /// Post-copy: restart on the destination before its memory is resident
    /// (CRIU lazy restore through userfaultfd). A process tree moves from a
    /// lazy dump: no pre-copy, no memory moved while frozen, the
    /// destination fetches each page from the frozen source afterwards (on
    /// one kernel, only a tree that is its own pid namespace's init; others
    /// pre-copy, then restore lazily from the images). Shorter downtime;
    /// riskier: until every page is in place, a failure on either side
    /// resumes the source from the dump and what the application did on
    /// the destination is lost.
    #[arg(long)]
    pub lazy_pages: bool,
    /// The hybrid route: pre-copy while the application runs, then a lazy
    /// dump (no memory written while frozen); the destination restores at
    /// once and takes every page pre-copy brought and that has not
    /// changed since out of its own store; only the changed pages come
    /// from the frozen source, released once they have moved. Process
    /// trees (on one kernel, only a pid namespace's init); other targets
    /// pre-copy, and the report says why.
    #[arg(long, conflicts_with = "lazy_pages")]
    pub hybrid: bool,
    /// Go on, on the route asked for, when the frozen phase is predicted
    /// to exceed --max-downtime (the miss is announced before the freeze
    /// and marked in the report). Without it such a migration takes the
    /// hybrid route if that fits and can move the target (the report
    /// says so), and is refused before anything is frozen otherwise.
    #[arg(long, env = "FERRY_ACCEPT_DOWNTIME_MISS", value_parser = clap::builder::BoolishValueParser::new())]
    pub accept_downtime_miss: bool,
    /// Migrate even if the tree holds GPU state that would be lost (loud).
    #[arg(long)]
    pub ignore_gpu: bool,
    #[command(flatten)]
    pub flags: CriuFlags,
    #[command(flatten)]
    pub criu_opts: super::criu_opts::CriuOptionArgs,
    /// Cap the data streams at this rate (bytes per second: 50M, 1G; or
    /// bits: 400mbit). The frozen phase's pages are capped too.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// Print the report as JSON (and the live progress as one JSON object
    /// per line on stderr).
    #[arg(long)]
    pub json: bool,
}

/// "50M" (bytes/s), "1G", "400mbit", "125000"; K, M, G are 10^3, 10^6, 10^9.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a rate (e.g. 50M, 1G, 400mbit)"))?;
    let per_s = unit.trim().trim_end_matches("/s");
    let bytes = match per_s {
        "" | "b" => n,
        "k" | "kb" => n * 1e3,
        "m" | "mb" => n * 1e6,
        "g" | "gb" => n * 1e9,
        "kbit" => n * 1e3 / 8.0,
        "mbit" => n * 1e6 / 8.0,
        "gbit" => n * 1e9 / 8.0,
        other => {
            return Err(format!(
                "unknown rate unit '{other}' (K, M, G bytes; kbit, mbit, gbit)"
            ))
        }
    };
    if bytes < 1.0 {
        return Err(format!("'{s}' is below one byte per second"));
    }
    Ok(bytes as u64)
}

/// "300ms", "1.5s", "2m"; a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 300ms, 1s)"))?;
    let secs = match unit.trim() {
        "" | "ms" => n / 1e3,
        "s" => n,
        "m" | "min" => n * 60.0,
        "us" => n / 1e6,
        other => return Err(format!("unknown time unit '{other}' (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

pub fn run(args: &MigrateArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let criu = args.criu.locate()?;
    // SIGINT/SIGTERM cancel: the migration stops where it safely can and
    // the application runs here (CRIU runs in a process group of its own,
    // so a terminal's Ctrl-C reaches ferry only).
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, std::sync::Arc::clone(&cancel))?;
    }
    let opts = MigrateOptions {
        target: match (&args.runc, args.pid) {
            _ if args.docker.is_some() => MigrateTarget::Docker {
                name: args.docker.clone().unwrap_or_default(),
                socket: args.docker_socket.clone(),
                new_name: args.docker_name.clone(),
            },
            (Some(id), _) => MigrateTarget::Runc {
                id: id.clone(),
                root: args.runc_root.clone(),
                bundle: args.bundle.clone(),
                new_id: None,
            },
            (None, pid) => MigrateTarget::Process {
                pid: pid.unwrap_or(0),
            },
        },
        files: args.files.scope(),
        to: args.to.clone(),
        secret: Secret::from_file(&args.key)?,
        max_downtime: args.max_downtime,
        max_rounds: args.max_rounds,
        streams: super::pack::threads(args.streams),
        restore: RestoreOpts {
            tcp_established: args.flags.tcp_established,
            shell_job: args.flags.shell_job,
            ext_unix_sk: args.flags.ext_unix_sk,
            file_locks: args.flags.file_locks,
            log_level: args.flags.log_level,
            lazy_pages: args.lazy_pages,
            remote_pages: false,
            ha_service: None,
            criu: args.criu_opts.restore_flags(),
        },
        hybrid: args.hybrid,
        accept_downtime_miss: args.accept_downtime_miss,
        switch_route: true,
        ignore_gpu: args.ignore_gpu,
        staging: args.staging.clone(),
        keep_images: args.keep_images.clone(),
        io_timeout: args.timeout,
        outcome_wait: args.outcome_wait,
        criu_options: args.criu_opts.options()?,
        max_bandwidth: args.max_bandwidth,
        events: super::progress::migrate_events(args.json),
        cancel: migrate::Cancel::new(cancel),
    };
    let report = migrate::migrate(&criu, &opts).map_err(Box::new)?;
    if args.json {
        write_json(out, &report)?;
    } else {
        report.render(out)?;
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3h").is_err());
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("50M").unwrap(), 50_000_000);
        assert_eq!(parse_rate("400mbit").unwrap(), 50_000_000);
        assert_eq!(parse_rate("1G/s").unwrap(), 1_000_000_000);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0").is_err());
    }
}

#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// The destination's `ferry agent`.
    #[arg(long, value_name = "HOST:PORT")]
    pub to: String,
    /// The migration's session id (in the error of the migration).
    #[arg(long, value_name = "ID")]
    pub session: String,
    /// The stopped process tree here (its root); without it, only ask.
    #[arg(long, value_name = "PID")]
    pub pid: Option<i32>,
    /// Shared secret file (the agent's).
    #[arg(long, value_name = "FILE", env = "FERRY_KEY")]
    pub key: PathBuf,
    /// How long to keep asking (e.g. 30s).
    #[arg(long, value_name = "TIME", default_value = "60s", value_parser = parse_duration)]
    pub wait: Duration,
}

/// `ferry resolve`: the destination decides (aborting the session if it
/// was not committed), then the stopped source follows that decision.
pub fn resolve(args: &ResolveArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let secret = Secret::from_file(&args.key)?;
    let outcome = migrate::outcome::ask(&args.to, &secret, &args.session, args.wait)?;
    let pids = args
        .pid
        .map(|p| ferry_image::process::tree(p).unwrap_or_else(|_| vec![p]));
    match (outcome, pids) {
        (migrate::outcome::Outcome::Committed { pid }, Some(pids)) => {
            ferry_image::process::kill_all(&pids);
            writeln!(out, "committed: the application runs on {} as pid {pid}; the stopped source ({} processes) was killed", args.to, pids.len())?;
        }
        (migrate::outcome::Outcome::Committed { pid }, None) => {
            writeln!(
                out,
                "committed: the application runs on {} as pid {pid}",
                args.to
            )?;
        }
        (migrate::outcome::Outcome::Aborted, Some(_)) => {
            let pid = args.pid.unwrap_or_default();
            ferry_image::process::continue_tree(pid);
            writeln!(
                out,
                "aborted: nothing of it runs on {}; the source (pid {pid}) was resumed",
                args.to
            )?;
        }
        (migrate::outcome::Outcome::Aborted, None) => {
            writeln!(out, "aborted: nothing of it runs on {}", args.to)?;
        }
    }
    Ok(exit::OK)
}
