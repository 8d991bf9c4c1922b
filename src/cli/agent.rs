//! `ferry agent` (receive migrations) and `ferry keygen` (its shared secret).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::{exit, CliError};
use ferry_agent::{self as agent, AgentConfig};

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub criu: super::CriuArgs,
    /// Address to listen on (port 0: any free port, printed at start).
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:7070")]
    pub listen: SocketAddr,
    /// Shared secret file (same on every host; make one with `ferry keygen`).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Where received pages and checkpoints are kept.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/ferry/agent")]
    pub store: PathBuf,
    /// runc's state directory for containers restored here.
    #[arg(long, value_name = "DIR", default_value = ferry_core::target::runc::DEFAULT_ROOT)]
    pub runc_root: PathBuf,
    /// dockerd's API socket, for Docker containers restored here.
    #[arg(long, value_name = "SOCKET", default_value = ferry_core::target::docker::DEFAULT_SOCKET)]
    pub docker_socket: PathBuf,
    /// Where images are rebuilt before a restore (default: tmpfs when it fits).
    #[arg(long, value_name = "DIR")]
    pub staging: Option<PathBuf>,
    /// Keep each committed migration's images under STORE/checkpoints/.
    #[arg(long)]
    pub keep_images: bool,
    /// Join an HA cluster through etcd (with --cluster, --name and
    /// --advertise).
    #[command(flatten)]
    pub etcd: super::ha::EtcdArgs,
    /// The HA cluster's name.
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// This host's name in the cluster.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// The IP address peers and clients reach this host at.
    #[arg(long, value_name = "IP")]
    pub advertise: Option<std::net::IpAddr>,
    /// TTL of this host's etcd lease: a dead host's services fail over
    /// after about this long.
    #[arg(long, value_name = "SECONDS", default_value_t = 1)]
    pub lease_ttl: u64,
}

pub fn run(args: &AgentArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let config = AgentConfig {
        listen: args.listen,
        key: args.key.clone(),
        store: args.store.clone(),
        criu: args.criu.criu.clone(),
        criu_service: args.criu.criu_service.clone(),
        runc_root: args.runc_root.clone(),
        docker_socket: args.docker_socket.clone(),
        staging: args.staging.clone(),
        keep_images: args.keep_images,
        ha: match (&args.cluster, &args.name, args.advertise) {
            _ if args.etcd.etcd.is_empty() => None,
            (Some(cluster), Some(name), Some(ip)) => Some(ferry_agent::ha::HaConfig {
                etcd: args.etcd.access(),
                cluster: cluster.clone(),
                name: name.clone(),
                ip,
                lease_ttl: std::time::Duration::from_secs(args.lease_ttl.max(1)),
                docker_socket: args.docker_socket.clone(),
                ferry: std::env::current_exe()?,
            }),
            _ => return Err(CliError::Usage(
                "ferry agent --etcd needs --cluster, --name and --advertise to join an HA cluster"
                    .into(),
            )),
        },
    };
    let mut printed: std::io::Result<()> = Ok(());
    agent::run(config, &mut |addr| {
        printed = writeln!(out, "ferry agent listening on {addr}").and_then(|_| out.flush());
    })?;
    printed?;
    Ok(exit::OK)
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// File to create (mode 0600; never overwritten).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

pub fn keygen(args: &KeygenArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    ferry_transport::Secret::generate(&args.file)?;
    writeln!(out, "wrote a new shared secret to {}", args.file.display())?;
    Ok(exit::OK)
}
