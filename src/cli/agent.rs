//! `ferry agent` (receive migrations) and `ferry keygen` (its shared secret).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::{exit, CliError};
use ferry_agent::{self as agent, AgentConfig};

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Configuration file (TOML; its keys are the long flags' names, e.g.
    /// `listen`, `key`, `etcd = ["https://..."]`). The command line and the
    /// FERRY_* variables override it. Must be root's and writable by no one
    /// else.
    #[arg(long, value_name = "FILE", env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub criu: super::CriuArgs,
    /// Address to listen on (port 0: any free port, printed at start).
    #[arg(
        long,
        value_name = "ADDR:PORT",
        default_value = "0.0.0.0:7070",
        env = "FERRY_LISTEN"
    )]
    pub listen: SocketAddr,
    /// Shared secret file (same on every host; make one with `ferry keygen`).
    #[arg(long, value_name = "FILE", env = "FERRY_KEY")]
    pub key: Option<PathBuf>,
    /// Where received pages and checkpoints are kept.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/ferry/agent",
        env = "FERRY_STORE"
    )]
    pub store: PathBuf,
    /// runc's state directory for containers restored here.
    #[arg(long, value_name = "DIR", default_value = ferry_core::target::runc::DEFAULT_ROOT, env = "FERRY_RUNC_ROOT")]
    pub runc_root: PathBuf,
    /// dockerd's API socket, for Docker containers restored here.
    #[arg(long, value_name = "SOCKET", default_value = ferry_core::target::docker::DEFAULT_SOCKET, env = "FERRY_DOCKER_SOCKET")]
    pub docker_socket: PathBuf,
    /// Where images are rebuilt before a restore (default: tmpfs when it fits).
    #[arg(long, value_name = "DIR", env = "FERRY_STAGING")]
    pub staging: Option<PathBuf>,
    /// Keep each committed migration's images under STORE/checkpoints/.
    #[arg(long)]
    pub keep_images: bool,
    /// Join an HA cluster through etcd (with --cluster, --name and
    /// --advertise).
    #[command(flatten)]
    pub etcd: super::ha::EtcdArgs,
    /// The HA cluster's name.
    #[arg(long, value_name = "NAME", env = "FERRY_CLUSTER")]
    pub cluster: Option<String>,
    /// This host's name in the cluster.
    #[arg(long, value_name = "NAME", env = "FERRY_NAME")]
    pub name: Option<String>,
    /// The IP address peers and clients reach this host at.
    #[arg(long, value_name = "IP", env = "FERRY_ADVERTISE")]
    pub advertise: Option<std::net::IpAddr>,
    /// TTL of this host's etcd lease: a dead host's services fail over
    /// after about this long.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 1,
        env = "FERRY_LEASE_TTL"
    )]
    pub lease_ttl: u64,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (port 0: any
    /// free port, printed at start). Off by default.
    #[arg(long, value_name = "ADDR:PORT", env = "FERRY_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// Bound on the page store (e.g. 20G): past it, while no migration is
    /// being received, the store keeps its newest half (a page dropped is
    /// sent again when a migration needs it). Default: no bound.
    #[arg(long, value_name = "SIZE", env = "FERRY_STORE_MAX", value_parser = parse_size)]
    pub store_max: Option<u64>,
}

/// "20G", "512M", "1048576" (bytes; K, M, G, T are powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("'{s}' is not a size (e.g. 20G, 512M)"))
}

/// `ferry agent --config FILE`: the same settings as the flags.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct AgentFile {
    listen: Option<SocketAddr>,
    key: Option<PathBuf>,
    store: Option<PathBuf>,
    runc_root: Option<PathBuf>,
    docker_socket: Option<PathBuf>,
    staging: Option<PathBuf>,
    keep_images: Option<bool>,
    criu: Option<PathBuf>,
    criu_service: Option<PathBuf>,
    etcd: Option<Vec<String>>,
    etcd_cacert: Option<PathBuf>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
    etcd_user: Option<String>,
    etcd_password_file: Option<PathBuf>,
    cluster: Option<String>,
    name: Option<String>,
    advertise: Option<std::net::IpAddr>,
    lease_ttl: Option<u64>,
    metrics: Option<SocketAddr>,
    store_max: Option<String>,
}

/// Largest configuration file read (it holds paths and names only).
const CONFIG_MAX: u64 = 64 * 1024;

fn read_config(path: &std::path::Path) -> Result<AgentFile, CliError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let bad = |why: String| CliError::Usage(format!("config file {}: {why}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    // It names the key, the store and the endpoints: whoever can change it
    // can make the agent trust or serve what they like.
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(bad(format!(
            "owned by uid {}, not by root or this user: refused",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(bad(format!(
            "mode {:o} lets others write it: refused (chmod go-w)",
            meta.mode() & 0o7777
        )));
    }
    if !meta.is_file() || meta.len() > CONFIG_MAX {
        return Err(bad(format!(
            "not a regular file of at most {CONFIG_MAX} bytes"
        )));
    }
    let mut text = String::new();
    file.take(CONFIG_MAX)
        .read_to_string(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    toml::from_str(&text).map_err(|e| bad(e.to_string()))
}

impl AgentArgs {
    /// Fills what neither the command line nor the environment set from
    /// the configuration file.
    fn with_config(&self, matches: Option<&clap::ArgMatches>) -> Result<AgentArgs, CliError> {
        let mut a = self.clone();
        let Some(path) = &self.config else {
            return Ok(a);
        };
        let f = read_config(path)?;
        let given = |id: &str| {
            use clap::parser::ValueSource;
            matches.is_some_and(|m| {
                matches!(
                    m.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
        };
        macro_rules! fill {
            ($($field:ident).+ = $value:expr, $id:literal) => {
                if !given($id) {
                    if let Some(v) = $value {
                        a.$($field).+ = v;
                    }
                }
            };
        }
        fill!(listen = f.listen, "listen");
        fill!(key = f.key.map(Some), "key");
        fill!(store = f.store, "store");
        fill!(runc_root = f.runc_root, "runc_root");
        fill!(docker_socket = f.docker_socket, "docker_socket");
        fill!(staging = f.staging.map(Some), "staging");
        fill!(keep_images = f.keep_images, "keep_images");
        fill!(criu.criu = f.criu.map(Some), "criu");
        fill!(criu.criu_service = f.criu_service.map(Some), "criu_service");
        fill!(etcd.etcd = f.etcd, "etcd");
        fill!(etcd.etcd_cacert = f.etcd_cacert.map(Some), "etcd_cacert");
        fill!(etcd.etcd_cert = f.etcd_cert.map(Some), "etcd_cert");
        fill!(etcd.etcd_key = f.etcd_key.map(Some), "etcd_key");
        fill!(etcd.etcd_user = f.etcd_user.map(Some), "etcd_user");
        fill!(
            etcd.etcd_password_file = f.etcd_password_file.map(Some),
            "etcd_password_file"
        );
        fill!(cluster = f.cluster.map(Some), "cluster");
        fill!(name = f.name.map(Some), "name");
        fill!(advertise = f.advertise.map(Some), "advertise");
        fill!(lease_ttl = f.lease_ttl, "lease_ttl");
        fill!(metrics = f.metrics.map(Some), "metrics");
        let store_max = f.store_max.as_deref().map(parse_size).transpose();
        let store_max = store_max.map_err(|why| {
            CliError::Usage(format!("config file {}: store-max: {why}", path.display()))
        })?;
        fill!(store_max = store_max.map(Some), "store_max");
        Ok(a)
    }
}

pub fn run(
    args: &AgentArgs,
    matches: Option<&clap::ArgMatches>,
    out: &mut dyn Write,
) -> Result<u8, CliError> {
    let args = &args.with_config(matches)?;
    let key = args.key.clone().ok_or_else(|| {
        CliError::Usage(
            "ferry agent needs its shared secret: --key FILE, FERRY_KEY, or `key` in the config file"
                .into(),
        )
    })?;
    let config = AgentConfig {
        listen: args.listen,
        key,
        store: args.store.clone(),
        criu: args.criu.criu.clone(),
        criu_service: args.criu.criu_service.clone(),
        runc_root: args.runc_root.clone(),
        docker_socket: args.docker_socket.clone(),
        staging: args.staging.clone(),
        keep_images: args.keep_images,
        metrics: args.metrics,
        store_max: args.store_max,
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
    let joined = config.ha.is_some();
    let mut printed: std::io::Result<()> = Ok(());
    agent::run(config, &mut |ready| {
        let addr = ready.listen;
        printed = writeln!(out, "ferry agent listening on {addr}")
            .and_then(|_| match ready.metrics {
                Some(m) => writeln!(out, "ferry agent metrics on http://{m}/metrics"),
                None => Ok(()),
            })
            .and_then(|_| out.flush());
        // Under systemd (Type=notify): ready once it listens and, with
        // --etcd, has joined the cluster (both done before this call).
        let status = match joined {
            true => format!("listening on {addr}, joined the HA cluster"),
            false => format!("listening on {addr}"),
        };
        if let Err(e) = sd_notify::notify(
            false,
            &[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&status),
            ],
        ) {
            tracing::warn!(error = %e, "cannot tell the service manager that the agent is ready");
        }
    })?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
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
