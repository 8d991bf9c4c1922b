//! `ferry ha run | status | move`: declare a service, show the cluster,
//! ask for a planned switchover. The agents (`ferry agent --etcd ...`) do
//! the work; these commands only talk to etcd.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{exit, write_json, CliError};
use ferry_agent::ha::etcd::{Etcd, EtcdAccess};
use ferry_agent::ha::keys::{App, ServiceSpec};
use ferry_agent::ha::status;

/// How to reach etcd (as etcdctl's `--endpoints`, `--cacert`, `--cert`,
/// `--key`, `--user`), for `ferry agent` and every `ferry ha` command.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd endpoints (URLs, comma-separated): https:// for TLS.
    #[arg(
        long,
        value_name = "URL",
        value_delimiter = ',',
        global = true,
        env = "FERRY_ETCD"
    )]
    pub etcd: Vec<String>,
    /// The CA certificate (PEM) that signed etcd's server certificate.
    #[arg(long, value_name = "FILE", global = true, env = "FERRY_ETCD_CACERT")]
    pub etcd_cacert: Option<PathBuf>,
    /// This client's certificate (PEM), for an etcd started with
    /// --client-cert-auth.
    #[arg(long, value_name = "FILE", global = true, env = "FERRY_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM; root-only).
    #[arg(long, value_name = "FILE", global = true, env = "FERRY_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// A user of etcd's own authentication.
    #[arg(long, value_name = "NAME", global = true, env = "FERRY_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// The file holding --etcd-user's password (root-only).
    #[arg(
        long,
        value_name = "FILE",
        global = true,
        env = "FERRY_ETCD_PASSWORD_FILE"
    )]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    pub fn access(&self) -> EtcdAccess {
        EtcdAccess {
            endpoints: self.etcd.clone(),
            cacert: self.etcd_cacert.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            user: self.etcd_user.clone(),
            password_file: self.etcd_password_file.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct HaArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// The cluster's name.
    #[arg(long, value_name = "NAME", global = true, env = "FERRY_CLUSTER")]
    pub cluster: Option<String>,
    /// The cluster key (the agents' `--key`): `run` and `move` seal what
    /// they write with it (agents run nothing unsealed); `status` checks
    /// the seals with it and shows which are refused.
    #[arg(long, value_name = "FILE", global = true, env = "FERRY_KEY")]
    pub key: Option<PathBuf>,
    #[command(subcommand)]
    pub command: HaCommand,
}

impl HaArgs {
    pub fn json(&self) -> bool {
        matches!(&self.command, HaCommand::Status(s) if s.json)
    }
}

#[derive(Debug, Subcommand)]
pub enum HaCommand {
    /// Declare a service (a runc bundle, a Docker image, or a process
    /// tree) to keep available.
    Run(RunArgs),
    /// Hosts, their health, each service's leader, address, checkpoints.
    Status(StatusArgs),
    /// Planned switchover: live-migrate a service to another host.
    Move(MoveArgs),
    /// Stop a service everywhere (its checkpoints are kept); waits until
    /// no copy runs.
    Stop(StopArgs),
    /// Start a stopped service again, from the newest checkpoint a standby
    /// verified.
    Start(StopArgs),
    /// Remove a service: stop it, then delete its keys; the agents delete
    /// the checkpoints they hold of it.
    Rm(StopArgs),
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// The service.
    #[arg(value_name = "SERVICE")]
    pub service: String,
    /// Longest wait for the running copy to end (stop, rm).
    #[arg(long, value_name = "TIME", default_value = "30s", value_parser = super::migrate::parse_duration)]
    pub wait: std::time::Duration,
}

/// Waits until no copy of `service` runs (its leader key is gone).
fn wait_stopped(etcd: &Etcd, cluster: &str, a: &StopArgs) -> Result<(), CliError> {
    let deadline = std::time::Instant::now() + a.wait;
    loop {
        match status::leader_of(etcd, cluster, &a.service)? {
            None => return Ok(()),
            Some(host) if std::time::Instant::now() >= deadline => {
                return Err(CliError::Usage(format!(
                    "service {} is marked stopped, but its leader {host} has not ended its copy within {:?} (is its agent running?)",
                    a.service, a.wait
                )))
            }
            Some(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("app").required(true).multiple(true).args(["bundle", "docker_image", "command"]))]
pub struct RunArgs {
    /// The service's name.
    #[arg(value_name = "SERVICE")]
    pub name: String,
    /// A runc container: its bundle (config.json and rootfs), at this path
    /// on every host.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["docker_image", "command"])]
    pub bundle: Option<PathBuf>,
    /// A Docker container: its image (present on every host's engine),
    /// run in the host's network; a command after `--` replaces the
    /// image's own.
    #[arg(long, value_name = "IMAGE")]
    pub docker_image: Option<String>,
    /// A process tree (without --bundle or --docker-image): the command
    /// (after `--`), started as pid 1 of a pid namespace of its own, stdio
    /// on /dev/null; its files must be at the same paths on every host.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
    /// The port the service listens on (its address: host IP and this port).
    #[arg(long)]
    pub port: u16,
    /// Bound on lost work, in milliseconds: the newest checkpoint a standby
    /// has verified is never older (checkpoints start earlier by the
    /// measured replication lag; the leader warns when the lag is too long
    /// for it).
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub interval_ms: u64,
    /// Standbys each checkpoint is replicated to.
    #[arg(long, default_value_t = 2)]
    pub standbys: usize,
    /// Hosts allowed to run it (comma-separated; default: all).
    #[arg(long, value_name = "HOST", value_delimiter = ',')]
    pub hosts: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the cluster view as JSON (etcd's records, with the ages of
    /// heartbeats and checkpoints).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MoveArgs {
    /// The service to move (its leader live-migrates it, then hands the
    /// leadership to the host it moved to).
    #[arg(value_name = "SERVICE")]
    pub service: String,
    /// The host to move it to.
    #[arg(long, value_name = "HOST")]
    pub to: String,
}

pub fn run(args: &HaArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let (Some(cluster), false) = (args.cluster.clone(), args.etcd.etcd.is_empty()) else {
        return Err(CliError::Usage(
            "ferry ha needs --etcd URL and --cluster NAME (or FERRY_ETCD and FERRY_CLUSTER)".into(),
        ));
    };
    let secret = args
        .key
        .as_deref()
        .map(ferry_transport::Secret::from_file)
        .transpose()?;
    let need_key = |what: &str| {
        secret.as_ref().ok_or_else(|| {
            CliError::Usage(format!(
                "ferry ha {what} needs --key FILE (or FERRY_KEY), the cluster key the agents hold: \
                 agents run only what it seals"
            ))
        })
    };
    let etcd = Etcd::connect(&args.etcd.access())?;
    match &args.command {
        HaCommand::Run(r) => {
            let app = match (&r.bundle, &r.docker_image) {
                (Some(b), _) => App::Runc {
                    bundle: std::path::absolute(b)?,
                },
                (None, Some(image)) => App::Docker {
                    image: image.clone(),
                    command: r.command.clone(),
                },
                (None, None) => App::Process {
                    command: r.command.clone(),
                },
            };
            let spec = ServiceSpec {
                name: r.name.clone(),
                app,
                port: r.port,
                interval_ms: r.interval_ms.max(100),
                standbys: r.standbys,
                hosts: r.hosts.clone(),
                stopped: false,
            };
            status::declare(&etcd, &cluster, &spec, need_key("run")?)?;
            writeln!(
                out,
                "service {} declared in cluster {cluster}; the agents elect its leader",
                spec.name
            )?;
        }
        HaCommand::Status(s) => {
            let seals = match &secret {
                Some(s) => status::Seals::Verify(s),
                None => status::Seals::Unchecked,
            };
            let view = status::read(&etcd, &cluster, seals)?;
            if s.json {
                let mut v = serde_json::to_value(&view)?;
                v["format_version"] = 1.into();
                v["cluster"] = cluster.into();
                write_json(out, &v)?;
            } else {
                status::render(&cluster, &view, out)?;
            }
        }
        HaCommand::Stop(a) => {
            status::set_stopped(&etcd, &cluster, &a.service, true, need_key("stop")?)?;
            wait_stopped(&etcd, &cluster, a)?;
            writeln!(
                out,
                "service {} stopped: no copy runs; its checkpoints are kept (`ferry ha start {}` resumes it)",
                a.service, a.service
            )?;
        }
        HaCommand::Start(a) => {
            status::set_stopped(&etcd, &cluster, &a.service, false, need_key("start")?)?;
            writeln!(
                out,
                "service {} started again; the agents elect its leader, which restores the newest checkpoint",
                a.service
            )?;
        }
        HaCommand::Rm(a) => {
            status::set_stopped(&etcd, &cluster, &a.service, true, need_key("rm")?)?;
            wait_stopped(&etcd, &cluster, a)?;
            // Every agent reads the cluster every 100 ms: each sees the
            // service stopped before its keys go (an agent deletes what it
            // holds only of a service it saw stopped).
            std::thread::sleep(std::time::Duration::from_secs(1));
            status::remove(&etcd, &cluster, &a.service)?;
            writeln!(
                out,
                "service {} removed: no copy runs, its keys are deleted, and the agents delete its checkpoints",
                a.service
            )?;
        }
        HaCommand::Move(m) => {
            status::request_move(&etcd, &cluster, &m.service, &m.to, need_key("move")?)?;
            writeln!(
                out,
                "move of {} to {} requested; its leader migrates it live",
                m.service, m.to
            )?;
        }
    }
    Ok(exit::OK)
}
