//! High availability end to end: a real etcd, three "hosts" (network
//! namespaces, each with its own agent and runc root) and a stateful
//! counter service, in a runc container or as a process tree. A bounded
//! loop of faults (the
//! leader's agent and container killed, the leader's link cut, a standby
//! killed, etcd restarted) with, throughout, at most one running copy, and
//! after each failover a service restored from a checkpoint at least as new
//! as the newest one a standby had verified.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::agent::AgentProc;
use common::containers::{bundle_running, require_runc, rootfs_tar};
use common::dockerd::DockerdProc;
use common::etcd::EtcdProc;
use common::*;
use ferry_agent::ha::etcd::Etcd;
use ferry_agent::ha::keys::ClusterView;
use ferry_core::target::container::ContainerStatus;
use ferry_lab::Lab;

const HOSTS: usize = 3;
const SERVICE: &str = "counter";
/// What a Docker service writes to its layer before the first fault.
const MARKER: &str = "written-before-the-first-fault";
const PORT: u16 = 8080;
const SIZE_MIB: u64 = 100;

/// The service's checkpoint interval, the bound on lost work (ferry's
/// default, 2 s; `FERRY_HA_INTERVAL_MS` sets another). Checkpoints come
/// earlier than that by the replication lag: at 1 s with 100 MiB on a
/// 2-core machine, the service would be frozen about half of the time.
fn interval_ms() -> u64 {
    env_number("FERRY_HA_INTERVAL_MS", 2000, 200, 60_000)
}
/// Bound on any wait for the cluster to settle.
const SETTLE: Duration = Duration::from_secs(60);

fn faults() -> usize {
    env_number("FERRY_HA_FAULTS", 20, 1, 100) as usize
}

/// A number from the environment variable `name`, `default` when unset or
/// not a number, kept within `min..=max`.
fn env_number(name: &str, default: u64, min: u64, max: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .clamp(min, max)
}

/// The service's bundle: the workload serving its counter, sharing the
/// host's network namespace (so it answers on the host's address) with its
/// own pid namespace (so copies on two "hosts" of one machine never clash).
fn bundle(dir: &Path) -> PathBuf {
    let bundle = dir.join("bundle");
    let args = std::iter::once("/bin/ferry-workload".to_string())
        .chain(workload_args())
        .collect();
    bundle_running(&bundle, args, |cfg| {
        let ns = cfg["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "network");
    });
    bundle
}

/// What the service runs as.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Runc,
    Process,
    Docker,
}

/// The image Docker services run (imported into every host's engine).
const IMAGE: &str = "ferry-ha-test:1";

/// Where one host's copy of the service shows.
#[derive(Clone)]
struct CopyProbe {
    kind: Kind,
    runc_root: PathBuf,
    container: String,
    /// The agent's record of its process tree, and the host's netns.
    pid_file: PathBuf,
    netns: PathBuf,
    docker_socket: PathBuf,
}

impl CopyProbe {
    /// The copy's pid when it is a process tree of this host.
    fn pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(&self.pid_file).ok()?;
        let pid: i32 = text.split_whitespace().next()?.parse().ok()?;
        use std::os::unix::fs::MetadataExt;
        let host_ns = std::fs::metadata(&self.netns).ok()?.ino();
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
        (ns.to_string_lossy() == format!("net:[{host_ns}]")).then_some(pid)
    }

    /// Whether the copy runs (a paused copy does not serve).
    fn running(&self) -> bool {
        match self.kind {
            Kind::Runc => {
                ferry_core::target::runc::status(&self.runc_root, &self.container)
                    == Some(ContainerStatus::Running)
            }
            Kind::Docker => {
                let running =
                    ferry_core::target::docker::status(&self.docker_socket, &self.container)
                        .ok()
                        .flatten()
                        .as_deref()
                        == Some("running");
                // dockerd says "running" until its init is reaped: an init
                // killed and waiting for its namespace to empty runs nothing.
                running
                    && ferry_core::target::docker::init_pid(&self.docker_socket, &self.container)
                        .ok()
                        .flatten()
                        .is_none_or(|pid| {
                            !ferry_image::process::ProcessInfo::read(pid).is_ok_and(|p| p.exiting)
                        })
            }
            Kind::Process => self.pid().is_some_and(|pid| {
                let exiting = ferry_image::process::ProcessInfo::read(pid).is_ok_and(|p| p.exiting);
                !exiting
                    && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .ok()
                        .and_then(|s| {
                            s.rsplit(')')
                                .next()
                                .and_then(|r| r.split_whitespace().next())
                                .map(|st| !matches!(st, "T" | "t" | "Z" | "X"))
                        })
                        .unwrap_or(false)
            }),
        }
    }

    /// What the copy is, for a failure's message.
    fn describe(&self) -> String {
        let pid = match self.kind {
            Kind::Runc => ferry_core::target::runc::init_pid(&self.runc_root, &self.container),
            Kind::Docker => {
                ferry_core::target::docker::init_pid(&self.docker_socket, &self.container)
                    .ok()
                    .flatten()
            }
            Kind::Process => self.pid(),
        };
        match pid {
            Some(pid) => format!(
                "init pid {pid}: {}; cmdline {:?}",
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .trim(),
                std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default()
            ),
            None => "no init pid".into(),
        }
    }

    fn kill(&self) {
        match self.kind {
            Kind::Runc => {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&self.runc_root)
                    .args(["delete", "--force", &self.container])
                    .output();
            }
            Kind::Docker => {
                let _ = ferry_core::target::docker::remove(&self.docker_socket, &self.container);
            }
            Kind::Process => {
                if let Some(pid) = self.pid() {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .output();
                }
            }
        }
    }
}

/// The workload serving its counter.
fn workload_args() -> Vec<String> {
    [
        "--size-mib",
        &SIZE_MIB.to_string(),
        "--tick-ms",
        "10",
        "--serve",
        &format!("0.0.0.0:{PORT}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

struct Cluster {
    /// Each host's Docker engine (Docker services only); first field:
    /// stopped before the directory and namespaces it lives in go.
    dockerds: Vec<DockerdProc>,
    kind: Kind,
    /// A process-tree service runs an ordinary program (a Python counter
    /// server that never calls setsid) instead of ferry's workload.
    ordinary: bool,
    dir: tempfile::TempDir,
    lab: Lab,
    etcd: EtcdProc,
    client: Etcd,
    name: String,
    agents: Vec<Option<AgentProc>>,
    /// Agents killed alone, kept for what their guards wrote after.
    dead_agents: Vec<AgentProc>,
    /// Last field: released after everything above is gone.
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// One cluster at a time: three agents, etcd and a 100 MiB service each
/// load this 2-core machine enough that two clusters side by side would
/// measure each other.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

impl Cluster {
    fn start(tag: &str, kind: Kind) -> Cluster {
        require_criu();
        require_runc();
        let turn = ONE_CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
        let dir = scratch(tag);
        let lab = Lab::create(tag, HOSTS, Some(1000)).expect("lab");
        let etcd = EtcdProc::start(dir.path(), lab.gateway().into());
        let client = Etcd::connect(&ferry_agent::ha::etcd::EtcdAccess::plain(
            std::slice::from_ref(&etcd.url),
        ))
        .unwrap();
        let name = format!("t{}-{tag}", std::process::id());
        let dockerds = match kind {
            Kind::Docker => {
                let tar = rootfs_tar(dir.path());
                (0..HOSTS)
                    .map(|i| {
                        DockerdProc::start(
                            &dir.path().join(format!("docker-{i}")),
                            &lab.host(i).netns,
                            &tar,
                            IMAGE,
                        )
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let mut c = Cluster {
            dockerds,
            _turn: turn,
            kind,
            ordinary: false,
            dir,
            lab,
            etcd,
            client,
            name,
            agents: (0..HOSTS).map(|_| None).collect(),
            dead_agents: Vec::new(),
        };
        for i in 0..HOSTS {
            c.start_agent(i);
        }
        c
    }

    /// The cluster key every agent holds.
    fn key(&self) -> PathBuf {
        common::agent::key(self.dir.path())
    }

    fn host(i: usize) -> String {
        format!("h{i}")
    }

    fn runc_root(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("runc-{i}"))
    }

    /// Writes [`MARKER`] into the leader's container and deletes its
    /// image's /bin/sh, then waits until a standby verified a checkpoint
    /// taken after that.
    fn write_marker(&self) {
        let (leader, _) = self.settled(2);
        let out = self.dockerds[leader].docker(&[
            "exec",
            &self.container(leader),
            "/bin/busybox",
            "sh",
            "-c",
            &format!("echo {MARKER} > /ferry-marker && /bin/busybox rm /bin/sh"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let written = ferry_agent::ha::keys::now_unix_ms();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.view();
            let verified = v.services[SERVICE]
                .standbys
                .values()
                .any(|r| r.checkpoint.taken_unix_ms > written);
            if verified {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no checkpoint after the marker was verified within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The marker and the deletion came with the service to host `i`.
    fn check_marker(&self, i: usize) {
        let out = self.dockerds[i].docker(&[
            "exec",
            &self.container(i),
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox cat /ferry-marker; [ -e /bin/sh ] && echo /bin/sh is back; true",
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            MARKER,
            "the service's files did not come with it to h{i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn container(&self, i: usize) -> String {
        format!("ferry-{}-{SERVICE}-{}", self.name, Self::host(i))
    }

    fn probe(&self, i: usize) -> CopyProbe {
        CopyProbe {
            kind: self.kind,
            runc_root: self.runc_root(i),
            container: self.container(i),
            pid_file: self
                .dir
                .path()
                .join(format!("store-{i}"))
                .join("ha")
                .join(SERVICE)
                .join("copy.pid"),
            netns: PathBuf::from("/run/netns").join(&self.lab.host(i).netns),
            docker_socket: self.docker_socket(i),
        }
    }

    fn docker_socket(&self, i: usize) -> PathBuf {
        self.dockerds
            .get(i)
            .map_or_else(|| PathBuf::from("/nonexistent"), |d| d.socket.clone())
    }

    /// `ferry ha SUB` against this cluster's etcd, with its key.
    fn ha(&self, sub: &str) -> Cmd {
        ferry(["ha", sub, "--etcd", &self.etcd.url, "--cluster", &self.name])
            .arg("--key")
            .arg(self.key())
    }

    /// `ferry ha run` for the counter service (2 standbys).
    fn declare_service(&self) {
        let (port, interval) = (PORT.to_string(), interval_ms().to_string());
        let cmd = self.ha("run").args_from([
            SERVICE,
            "--port",
            &port,
            "--interval-ms",
            &interval,
            "--standbys",
            "2",
        ]);
        let cmd = match self.kind {
            Kind::Runc => cmd.arg("--bundle").arg(bundle(self.dir.path())),
            Kind::Process if self.ordinary => cmd
                .arg("--")
                .arg("python3")
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/programs/counter_server.py"
                ))
                .arg(&port),
            Kind::Process => workload_args()
                .into_iter()
                .fold(cmd.arg("--").arg(WORKLOAD), Cmd::arg),
            Kind::Docker => workload_args().into_iter().fold(
                cmd.arg("--docker-image")
                    .arg(IMAGE)
                    .arg("--")
                    .arg("/bin/ferry-workload"),
                Cmd::arg,
            ),
        };
        cmd.ok();
    }

    fn start_agent(&mut self, i: usize) {
        self.start_agent_with(i, None, None)
    }

    /// Kills agent `i` and starts it again on the same address (as a
    /// restarted daemon would be), with fault point `fault` armed.
    fn restart_agent(&mut self, i: usize, fault: Option<&str>) {
        let addr = self.agents[i].as_ref().map(|a| a.addr.clone());
        // Killed with what it started, as a host's crash would; kept (not
        // dropped: that would remove its staging, which a source on this
        // kernel may still restore from).
        if let Some(mut a) = self.agents[i].take() {
            a.kill_tree();
            let log = a.log();
            std::fs::write(self.dir.path().join(format!("agent-{i}.log")), log).unwrap();
            self.dead_agents.push(a);
        }
        // The restarted agent's log is checked from here on.
        std::thread::sleep(Duration::from_millis(200));
        self.start_agent_with(i, addr, fault);
    }

    fn start_agent_with(&mut self, i: usize, listen: Option<String>, fault: Option<&str>) {
        let extra: Vec<String> = [
            "--etcd",
            &self.etcd.url,
            "--cluster",
            &self.name,
            "--name",
            &Self::host(i),
            "--advertise",
            &self.lab.host(i).addr.to_string(),
            "--lease-ttl",
            "1",
            "--docker-socket",
            &self.docker_socket(i).to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let store = self.dir.path().join(format!("store-{i}"));
        let path = format!(
            "{}:{}",
            self.fake_bin().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let listen = listen.unwrap_or_else(|| format!("{}:0", self.lab.host(i).addr));
        let agent = AgentProc::start_args_env(
            self.dir.path(),
            &store,
            &listen,
            Some(&self.lab.host(i).netns),
            fault,
            Some(&self.runc_root(i)),
            &extra,
            &[("PATH".to_string(), path)],
        );
        self.agents[i] = Some(agent);
    }

    /// A directory whose `runc` runs the real one, except that `runc
    /// pause` hangs while the file `hang` beside it exists (the fault "a
    /// fence command that hangs").
    fn fake_bin(&self) -> PathBuf {
        let dir = self.dir.path().join("bin");
        let runc = dir.join("runc");
        if !runc.exists() {
            let real = ferry_sys::which("runc").expect("runc");
            std::fs::create_dir_all(&dir).unwrap();
            let script = format!(
                "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = pause ] && [ -e {hang} ] && exec sleep 3600; done\nexec {real} \"$@\"\n",
                hang = dir.join("hang").display(),
                real = real.display()
            );
            std::fs::write(&runc, script).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&runc, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir
    }

    /// SIGKILL to the agent alone: its copy lives on (the guard must end
    /// it). The agent's output stays readable (its guard writes there).
    fn kill_agent_only(&mut self, i: usize) {
        if let Some(mut a) = self.agents[i].take() {
            a.kill();
            let log = a.log();
            std::fs::write(self.dir.path().join(format!("agent-{i}.log")), log).unwrap();
            self.dead_agents.push(a);
        }
    }

    /// SIGSTOP to the agent for `hold`, then SIGCONT (on a thread).
    fn stop_agent(&self, i: usize, hold: Duration) -> std::thread::JoinHandle<()> {
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(self.agents[i].as_ref().unwrap().child.id() as i32);
        kill(pid, Signal::SIGSTOP).unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(hold);
            let _ = kill(pid, Signal::SIGCONT);
        })
    }

    fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.agents[i].take() {
            a.kill_tree();
            let log = a.log();
            std::fs::write(self.dir.path().join(format!("agent-{i}.log")), log).unwrap();
        }
    }

    fn kill_container(&self, i: usize) {
        self.probe(i).kill();
    }

    /// The cluster as etcd has it (a read that times out is retried, for
    /// 10 s at most).
    fn view(&self) -> ClusterView {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let secret = ferry_transport::Secret::from_file(&self.key()).unwrap();
            let seals = ferry_agent::ha::status::Seals::Verify(&secret);
            match ferry_agent::ha::status::read(&self.client, &self.name, seals) {
                Ok(v) => return v,
                Err(e) if Instant::now() > deadline => panic!("cannot read etcd: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn status_text(&self) -> String {
        ferry([
            "ha",
            "status",
            "--etcd",
            &self.etcd.url,
            "--cluster",
            &self.name,
        ])
        .ok()
    }

    /// Hosts where the service's container runs (paused copies do not serve).
    fn running(&self) -> Vec<usize> {
        (0..HOSTS).filter(|&i| self.probe(i).running()).collect()
    }

    fn leader(&self) -> Option<(usize, i64)> {
        let v = self.view();
        let s = v.services.get(SERVICE)?;
        let l = s.leader.as_ref()?;
        Some((l.host[1..].parse().ok()?, s.token))
    }

    /// Waits for a leader with a published address and `standbys` standbys
    /// holding a checkpoint under its token; returns (leader, token).
    fn settled(&self, standbys: usize) -> (usize, i64) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let v = self.view();
            if let Some(s) = v.services.get(SERVICE) {
                let ok = s.leader.is_some()
                    && s.address.as_ref().is_some_and(|a| a.token == s.token)
                    && s.standbys
                        .values()
                        .filter(|r| r.checkpoint.token == s.token)
                        .count()
                        >= standbys
                    && v.hosts.len() == HOSTS;
                if ok {
                    let l = s.leader.as_ref().unwrap();
                    return (l.host[1..].parse().unwrap(), s.token);
                }
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not settle within {SETTLE:?}:\n{}\n{}",
                self.status_text(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of each agent's log (a killed agent's: as it was
    /// when killed), less the routine checkpoint lines.
    fn logs(&self) -> String {
        let mut s = String::new();
        for (i, a) in self.agents.iter().enumerate() {
            let (log, what) = match a {
                Some(a) => (a.log(), ""),
                None => (
                    std::fs::read_to_string(self.dir.path().join(format!("agent-{i}.log")))
                        .unwrap_or_default(),
                    " (killed; its log then)",
                ),
            };
            let tail: Vec<&str> = log
                .lines()
                .rev()
                .filter(|l| {
                    !l.contains("checkpoint verified")
                        && !l.contains("checkpoint taken")
                        && !l.contains("checkpoint replicated")
                })
                .take(40)
                .collect();
            s += &format!("--- agent h{i}{what}\n");
            for l in tail.iter().rev() {
                s += l;
                s += "\n";
            }
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..HOSTS {
            self.kill_agent(i);
        }
        if std::thread::panicking() {
            // Keep every agent's log for the post-mortem.
            let keep = std::env::temp_dir().join(format!("ferry-ha-logs-{}", self.name));
            let _ = std::fs::create_dir_all(&keep);
            for e in std::fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.ends_with(".log") {
                    let _ = std::fs::copy(e.path(), keep.join(&n));
                }
            }
            eprintln!("agent and etcd logs kept in {}", keep.display());
        }
        for i in 0..HOSTS {
            self.kill_container(i);
        }
        // What agents killed mid-checkpoint left in tmpfs (a restarted
        // agent sweeps it; the last ones are not restarted).
        ferry_core::checkpoint::staging::sweep_stale("ferry-agent-", None, Duration::ZERO);
    }
}

/// One client request's outcome.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    unix_ms: u64,
    /// (address, served count) on success.
    ok: Option<(String, u64)>,
    /// Why it failed.
    why: String,
}

/// A client that finds the service through etcd and asks it for its
/// counter every 10 ms (bounded by `MAX_SAMPLES`).
struct Client {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

const MAX_SAMPLES: usize = 200_000;

fn ask(addr: &str) -> Result<u64, String> {
    let a: SocketAddr = addr.parse().map_err(|_| "bad address".to_string())?;
    let s = TcpStream::connect_timeout(&a, Duration::from_millis(200))
        .map_err(|e| format!("connect {addr}: {:?}", e.kind()))?;
    s.set_read_timeout(Some(Duration::from_millis(1000))).ok();
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("read {addr}: {:?}", e.kind()))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("served="))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("bad answer {line:?}"))
}

impl Client {
    fn start(url: &str, cluster: &str) -> Client {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (Arc::clone(&samples), Arc::clone(&stop));
        let etcd = Etcd::connect(&ferry_agent::ha::etcd::EtcdAccess::plain(
            &[url.to_string()],
        ))
        .unwrap();
        let key = ferry_agent::ha::keys::service_key(cluster, SERVICE, "address");
        let handle = std::thread::spawn(move || {
            let mut addr: Option<String> = None;
            let mut n = 0;
            while !st2.load(Ordering::Relaxed) && n < MAX_SAMPLES {
                n += 1;
                if addr.is_none() {
                    addr = etcd.get_prefix(&key).ok().and_then(|(e, _)| {
                        e.first().and_then(|e| {
                            serde_json::from_slice::<ferry_agent::ha::keys::AddressRecord>(&e.value)
                                .ok()
                                .map(|a| a.addr)
                        })
                    });
                }
                let r = match addr.as_deref() {
                    Some(a) => ask(a).map(|v| (a.to_string(), v)),
                    None => Err("no address in etcd".into()),
                };
                let (ok, why) = match r {
                    Ok(v) => (Some(v), String::new()),
                    Err(e) => {
                        addr = None;
                        (None, e)
                    }
                };
                s2.lock().unwrap().push(Sample {
                    at: Instant::now(),
                    unix_ms: ferry_agent::ha::keys::now_unix_ms(),
                    ok,
                    why,
                });
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Client {
            samples,
            stop,
            handle: Some(handle),
        }
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    /// What the client saw in (`from`, `to`]: each change of outcome, in
    /// ms after `from`.
    fn timeline(&self, from: Instant, to: Instant) -> String {
        let mut line = String::new();
        let mut last = String::new();
        for x in self.samples().iter().filter(|x| x.at > from && x.at <= to) {
            let what = match &x.ok {
                Some((a, _)) => format!("ok {a}"),
                None => format!("fail({})", x.why),
            };
            if what != last {
                line += &format!(" +{}ms:{what}", (x.at - from).as_millis());
                last = what;
            }
        }
        line
    }

    /// The first success from `addr` (any address: None) after `t`.
    fn first_ok_after(
        &self,
        t: Instant,
        not_addr: Option<&str>,
        timeout: Duration,
    ) -> Option<Sample> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.samples().into_iter().find(|s| {
                s.at > t
                    && s.ok
                        .as_ref()
                        .is_some_and(|(a, _)| Some(a.as_str()) != not_addr)
            }) {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// When (unix ms) and on which hosts two copies were first seen running.
type FirstTwo = (u64, Vec<usize>);

/// Watches every host's copy: the most ever seen running at once.
struct SplitBrainWatch {
    max: Arc<AtomicUsize>,
    /// When two copies were first seen running, and on which hosts.
    first_two: Arc<Mutex<Option<FirstTwo>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl SplitBrainWatch {
    fn start(probes: Vec<CopyProbe>) -> SplitBrainWatch {
        let max = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let first_two = Arc::new(Mutex::new(None));
        let (m2, s2, f2) = (Arc::clone(&max), Arc::clone(&stop), Arc::clone(&first_two));
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(1800);
            while !s2.load(Ordering::Relaxed) && Instant::now() < deadline {
                let running: Vec<usize> = probes
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.running())
                    .map(|(i, _)| i)
                    .collect();
                if running.len() > 1 {
                    let mut f = f2.lock().unwrap();
                    if f.is_none() {
                        *f = Some((ferry_agent::ha::keys::now_unix_ms(), running.clone()));
                    }
                }
                m2.fetch_max(running.len(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        SplitBrainWatch {
            max,
            first_two,
            stop,
            handle: Some(handle),
        }
    }

    fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Fails (with where and when, and the agents' logs) if two copies
    /// ever ran at once.
    fn assert_never_two(&self, c: &Cluster) {
        assert!(
            self.max() <= 1,
            "two copies ran at once ({})\n{}",
            self.first_two(),
            c.logs()
        );
    }

    /// When and where two copies were first seen running.
    fn first_two(&self) -> String {
        match &*self.first_two.lock().unwrap() {
            Some((ms, hosts)) => {
                format!("two copies first seen at unix ms {ms} on hosts {hosts:?}")
            }
            None => "never two copies".into(),
        }
    }
}

impl Drop for SplitBrainWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    KillLeader,
    /// The leader's agent SIGKILLed, its copy left running.
    KillAgentOnly,
    /// The leader's agent SIGSTOPped for longer than the lease.
    StopAgent,
    /// The leader cut off while `runc pause` hangs (runc services).
    HangingFence,
    /// The leader partitioned from etcd only (its peers and clients still
    /// reach it).
    CutFromEtcd,
    CutLeader,
    KillStandby,
    RestartEtcd,
}

#[test]
fn a_service_survives_a_bounded_loop_of_faults_with_one_copy_and_no_lost_checkpoint() {
    fault_loop("ha", Kind::Runc, faults());
}

#[test]
fn a_process_tree_service_survives_the_same_faults() {
    fault_loop("hapt", Kind::Process, faults().div_ceil(2));
}

#[test]
fn a_docker_service_survives_the_same_faults() {
    fault_loop("hadk", Kind::Docker, faults().div_ceil(4));
}

/// An ordinary program (Python, no setsid of its own) as the service: it
/// is checkpointed, replicated and failed over like the workload.
#[test]
fn an_ordinary_program_service_survives_the_faults() {
    fault_loop_with("haor", Kind::Process, true, faults().div_ceil(4));
}

fn fault_loop(tag: &str, kind: Kind, faults: usize) {
    fault_loop_with(tag, kind, false, faults)
}

fn fault_loop_with(tag: &str, kind: Kind, ordinary: bool, faults: usize) {
    let mut c = Cluster::start(tag, kind);
    c.ordinary = ordinary;
    c.declare_service();
    let (leader, _) = c.settled(2);
    let status = c.status_text();
    eprintln!("{status}");
    assert!(status.contains(&format!("leader h{leader}")), "{status}");
    assert!(status.contains("standby h"), "{status}");
    assert!(status.contains("schedule: a checkpoint every"), "{status}");
    let watch = SplitBrainWatch::start((0..HOSTS).map(|i| c.probe(i)).collect());
    let client = Client::start(&c.etcd.url, &c.name);
    assert!(
        client
            .first_ok_after(Instant::now(), None, Duration::from_secs(10))
            .is_some(),
        "the client never reached the service"
    );
    let kinds: Vec<Fault> = [
        Fault::KillLeader,
        Fault::KillAgentOnly,
        Fault::StopAgent,
        Fault::HangingFence,
        Fault::CutFromEtcd,
        Fault::CutLeader,
        Fault::KillStandby,
        Fault::RestartEtcd,
    ]
    .into_iter()
    .filter(|f| *f != Fault::HangingFence || kind == Kind::Runc)
    // FERRY_HA_ONLY=<fault> repeats one kind (for measuring it).
    .filter(|f| {
        std::env::var("FERRY_HA_ONLY").is_err_and(|_| true)
            || std::env::var("FERRY_HA_ONLY").is_ok_and(|o| o == format!("{f:?}"))
    })
    .collect();
    // A Docker service's own files: one written to its writable layer and
    // a file of its image deleted, in a verified checkpoint before the
    // first fault; every failover must bring both (another engine with
    // its own storage root restores it).
    if kind == Kind::Docker {
        c.write_marker();
    }
    let mut resumer = None;
    let mut results = Vec::new();
    for round in 0..faults {
        let kind = kinds[round % kinds.len()];
        let (leader, token) = c.settled(2);
        let v = c.view();
        let s = &v.services[SERVICE];
        let old_addr = s.address.as_ref().unwrap().addr.clone();
        let newest_verified = s
            .standbys
            .values()
            .map(|r| r.checkpoint.generation)
            .max()
            .unwrap();
        // The counter must never fall to or below what the client saw
        // before the newest verified checkpoint was taken.
        let verified_taken = s
            .standbys
            .values()
            .filter(|r| r.checkpoint.generation == newest_verified)
            .map(|r| r.checkpoint.taken_unix_ms)
            .max()
            .unwrap();
        let floor = client
            .samples()
            .iter()
            .filter(|x| x.unix_ms < verified_taken)
            .filter_map(|x| x.ok.as_ref().map(|o| o.1))
            .next_back()
            .unwrap_or(0);
        let t0 = Instant::now();
        let fault_unix_ms = ferry_agent::ha::keys::now_unix_ms();
        eprintln!(
            "round {round}: {kind:?} at unix ms {}",
            ferry_agent::ha::keys::now_unix_ms()
        );
        match kind {
            Fault::KillLeader => {
                c.kill_agent(leader);
                c.kill_container(leader);
            }
            Fault::KillAgentOnly => c.kill_agent_only(leader),
            Fault::StopAgent => resumer = Some(c.stop_agent(leader, Duration::from_secs(3))),
            Fault::HangingFence => {
                std::fs::write(c.fake_bin().join("hang"), b"").unwrap();
                c.lab.cut(leader).unwrap()
            }
            Fault::CutLeader => c.lab.cut(leader).unwrap(),
            Fault::CutFromEtcd => c.lab.cut_from_gateway(leader).unwrap(),
            Fault::KillStandby => c.kill_agent((leader + 1) % HOSTS),
            Fault::RestartEtcd => c.etcd.restart(Duration::from_millis(500)),
        }
        let failover = matches!(
            kind,
            Fault::KillLeader
                | Fault::CutLeader
                | Fault::KillAgentOnly
                | Fault::StopAgent
                | Fault::HangingFence
                | Fault::CutFromEtcd
        );
        let first = client
            .first_ok_after(
                t0,
                failover.then_some(old_addr.as_str()),
                Duration::from_secs(30),
            )
            .unwrap_or_else(|| {
                panic!(
                    "round {round} ({kind:?}): no answer from the service within 30 s\nclient timeline:{}\ncopies running on hosts {:?}\n{}\n{}",
                    client.timeline(t0, Instant::now()),
                    c.running(),
                    c.status_text(),
                    c.logs()
                )
            });
        let recovery = first.at - t0;
        if recovery > Duration::from_millis(1500) {
            // What the client saw, to explain a slow recovery.
            eprintln!("  client timeline:{}", client.timeline(t0, first.at));
        }
        let served_after = first.ok.as_ref().unwrap().1;
        let v = c.view();
        let s = &v.services[SERVICE];
        let addr = s.address.clone().unwrap();
        let samples = client.samples();
        let last_before = samples
            .iter()
            .filter(|x| x.at < t0)
            .filter_map(|x| x.ok.as_ref().map(|o| o.1))
            .next_back()
            .unwrap_or(0);
        let mut detail = String::new();
        let mut lost_ms = None;
        if failover {
            let (new_leader, new_token) = c.leader().expect("a new leader");
            assert_ne!(
                new_leader, leader,
                "round {round}: the dead leader still leads"
            );
            assert!(new_token > token, "round {round}: the token did not grow");
            if c.kind == Kind::Docker {
                c.check_marker(new_leader);
            }
            // RPO: restored from a checkpoint at least as new as the newest
            // any standby had verified before the fault...
            assert!(
                addr.restored_generation >= newest_verified,
                "round {round}: restored generation {} older than verified {newest_verified}",
                addr.restored_generation
            );
            // ...and the counter carries on from that checkpoint.
            let at_checkpoint = samples
                .iter()
                .filter(|x| x.unix_ms < addr.restored_taken_unix_ms)
                .filter_map(|x| x.ok.as_ref().map(|o| o.1))
                .next_back()
                .unwrap_or(0);
            assert!(
                served_after > at_checkpoint,
                "round {round}: counter {served_after} older than the checkpoint's {at_checkpoint} (address {addr:?})\n{}",
                c.logs()
            );
            lost_ms = Some(fault_unix_ms.saturating_sub(addr.restored_taken_unix_ms));
            detail = format!(
                "h{leader} -> h{new_leader}, restored generation {} (newest verified {newest_verified}), takeover {:.0} ms, lost {} requests = the last {} ms before the fault",
                addr.restored_generation,
                addr.takeover_ms,
                last_before.saturating_sub(served_after - 1),
                fault_unix_ms.saturating_sub(addr.restored_taken_unix_ms)
            );
        } else {
            assert!(served_after > 0);
        }
        if kind == Fault::KillStandby {
            assert_eq!(
                c.leader().map(|l| l.0),
                Some(leader),
                "round {round}: a standby's death moved the leader"
            );
            let failed = samples
                .iter()
                .filter(|x| x.at > t0 && x.ok.is_none())
                .count();
            assert_eq!(
                failed, 0,
                "round {round}: clients saw failures when a standby died"
            );
        }
        eprintln!(
            "round {round:2} {kind:?}: first answer after {:.0} ms (served={served_after}) {detail}",
            recovery.as_secs_f64() * 1e3
        );
        if failover {
            let new_leader = c.leader().unwrap().0;
            if let Some(line) = c.agents[new_leader].as_ref().and_then(|a| {
                a.log()
                    .lines()
                    .rev()
                    .find(|l| l.contains("elected leader"))
                    .map(str::to_string)
            }) {
                eprintln!("  {line}");
            }
        }
        results.push((kind, recovery, floor, t0, lost_ms));
        // `ferry ha status` shows the state this fault left.
        let status = c.status_text();
        let (now_leader, _) = c.leader().expect("a leader");
        assert!(
            status.contains(&format!("leader h{now_leader}")),
            "{status}"
        );
        if failover {
            assert!(status.contains("restored from generation"), "{status}");
        }
        // Repair: the old leader's copy must be gone before it is healed.
        if matches!(
            kind,
            Fault::KillAgentOnly | Fault::StopAgent | Fault::HangingFence | Fault::CutFromEtcd
        ) {
            let deadline = Instant::now() + Duration::from_secs(3);
            while c.running().contains(&leader) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                !c.running().contains(&leader),
                "round {round} ({kind:?}): the old leader's copy still runs after the failover ({})\n{}\n{}",
                c.probe(leader).describe(),
                c.dead_agents
                    .last()
                    .map(|a| a.log())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("guard"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                c.logs()
            );
        }
        match kind {
            Fault::StopAgent => {
                if let Some(r) = resumer.take() {
                    r.join().unwrap();
                }
            }
            Fault::HangingFence => {
                let _ = std::fs::remove_file(c.fake_bin().join("hang"));
                c.lab.heal(leader).unwrap();
            }
            Fault::KillAgentOnly => c.start_agent(leader),
            Fault::CutFromEtcd => c.lab.heal_from_gateway(leader).unwrap(),
            Fault::KillLeader | Fault::KillStandby => {
                let i = if kind == Fault::KillLeader {
                    leader
                } else {
                    (leader + 1) % HOSTS
                };
                c.start_agent(i);
            }
            Fault::CutLeader => {
                assert!(
                    !c.running().contains(&leader),
                    "round {round}: the cut-off leader still runs its copy"
                );
                c.lab.heal(leader).unwrap();
            }
            Fault::RestartEtcd => {}
        }
        assert!(
            watch.max() <= 1,
            "round {round} ({kind:?}): two copies ran at once ({})\n{}\n{}",
            watch.first_two(),
            c.status_text(),
            c.logs()
        );
    }
    let (_, _) = c.settled(2);
    std::thread::sleep(Duration::from_millis(1500));
    // No restore ever went back past a verified checkpoint.
    let samples = client.samples();
    for (i, (kind, _, floor, t0, _)) in results.iter().enumerate() {
        let end = results.get(i + 1).map(|r| r.3);
        let worst = samples
            .iter()
            .filter(|x| x.at > *t0 && end.is_none_or(|e| x.at < e))
            .filter_map(|x| x.ok.as_ref().map(|o| o.1))
            .min();
        assert!(
            worst.is_none_or(|w| w > *floor),
            "round {i} ({kind:?}): the counter fell to {worst:?}, at or below {floor}, what the client saw before the newest verified checkpoint"
        );
    }
    // Exactly one copy serves (a copy paused by fencing while etcd is slow
    // resumes within a lease TTL once renewals get through).
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.running().len() != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.running().len(), 1, "{}", c.status_text());
    assert!(watch.max() <= 1, "two copies ran at once");
    let status = c.status_text();
    eprintln!("{status}");
    if std::env::var_os("FERRY_HA_LOGS").is_some() {
        for (i, a) in c.agents.iter().enumerate() {
            if let Some(a) = a {
                eprintln!("--- agent h{i}\n{}", a.log());
            }
        }
    }
    for fault in &kinds {
        let mut r: Vec<f64> = results
            .iter()
            .filter(|r| r.0 == *fault)
            .map(|r| r.1.as_secs_f64() * 1e3)
            .collect();
        let mut lost: Vec<u64> = results
            .iter()
            .filter(|r| r.0 == *fault)
            .filter_map(|r| r.4)
            .collect();
        if !r.is_empty() {
            r.sort_by(f64::total_cmp);
            lost.sort();
            // Nearest rank: the smallest value with at least p of all at
            // or below it.
            let rank = |n: usize, p: f64| ((n as f64 * p).ceil() as usize).clamp(1, n) - 1;
            let q = |p: f64| r[rank(r.len(), p)];
            let lq = |p: f64| {
                lost.get(rank(lost.len().max(1), p))
                    .map_or("-".to_string(), |v| v.to_string())
            };
            eprintln!(
                "FIGURES {kind:?} {fault:?}: {} runs, recovery p50 {:.0} / p95 {:.0} / max {:.0} ms; lost work p50 {} / p95 {} / max {} ms",
                r.len(),
                q(0.5),
                q(0.95),
                q(1.0),
                lq(0.5),
                lq(0.95),
                lq(1.0)
            );
        }
    }
    // Lost work: the fault's time minus the restored checkpoint's. The
    // interval bounds it while etcd is reachable; a failover right after
    // an etcd outage loses the outage too (standbys cannot check a
    // checkpoint's token without etcd).
    let lost: Vec<(u64, bool)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let after_etcd = i > 0 && results[i - 1].0 == Fault::RestartEtcd;
            r.4.map(|l| (l, after_etcd))
        })
        .collect();
    for after_etcd in [false, true] {
        let l: Vec<u64> = lost
            .iter()
            .filter(|x| x.1 == after_etcd)
            .map(|x| x.0)
            .collect();
        if let (Some(lo), Some(hi)) = (l.iter().min(), l.iter().max()) {
            eprintln!(
                "lost work{}: {} failovers, min {lo} / max {hi} ms (interval {} ms)",
                if after_etcd {
                    " right after an etcd restart"
                } else {
                    ""
                },
                l.len(),
                interval_ms()
            );
        }
    }
}

#[test]
fn a_planned_switchover_moves_the_service_live_without_losing_a_request() {
    for kind in [Kind::Runc, Kind::Process, Kind::Docker] {
        if std::env::var("FERRY_HA_MOVE_ONLY").is_ok_and(|k| k != format!("{kind:?}")) {
            continue;
        }
        switchover(&format!("hamv{}", kind as u8), kind);
    }
}

fn switchover(tag: &str, kind: Kind) {
    let c = Cluster::start(tag, kind);
    c.declare_service();
    let (leader, token) = c.settled(2);
    let client = Client::start(&c.etcd.url, &c.name);
    assert!(client
        .first_ok_after(Instant::now(), None, Duration::from_secs(10))
        .is_some());
    let to = (leader + 1) % HOSTS;
    let t0 = Instant::now();
    move_to(&c, to);
    let deadline = Instant::now() + SETTLE;
    loop {
        let v = c.view();
        let Some(s) = v.services.get(SERVICE) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let moved = s
            .leader
            .as_ref()
            .is_some_and(|l| l.host == Cluster::host(to))
            && s.address
                .as_ref()
                .is_some_and(|a| a.host == Cluster::host(to));
        if moved && c.running() == vec![to] {
            assert!(
                s.token > token,
                "the handover must issue a new fencing token"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the service did not move to h{to}:\n{}\n{}",
            c.status_text(),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = client
        .first_ok_after(
            t0,
            Some(&format!("{}:{PORT}", c.lab.host(leader).addr)),
            SETTLE,
        )
        .expect("an answer from the new host");
    let samples = client.samples();
    let before = samples
        .iter()
        .filter(|x| {
            x.at < first.at
                && x.ok
                    .as_ref()
                    .is_some_and(|o| o.0 != first.ok.as_ref().unwrap().0)
        })
        .filter_map(|x| x.ok.as_ref().map(|o| o.1))
        .next_back()
        .unwrap();
    let after = first.ok.as_ref().unwrap().1;
    // Live migration: the moved copy carries on from the last answer (the
    // new leader's readiness probe may count as one more request).
    assert!(
        after > before && after <= before + 3,
        "the moved service lost its state: served {before} before, {after} after"
    );
    // Fencing: the old leader's token no longer opens a standby's door.
    let standby = (0..HOSTS).find(|&i| i != to).unwrap();
    let agent = c.agents[standby].as_ref().unwrap();
    let secret = ferry_transport::Secret::from_file(&agent.key).unwrap();
    let mut conn =
        ferry_transport::Conn::connect(&agent.addr, &secret, Duration::from_secs(5)).unwrap();
    let stale = ferry_transport::msg::OfferedCheckpoint {
        generation: 1_000_000,
        token,
        leader: Cluster::host(leader),
        taken_unix_ms: ferry_agent::ha::keys::now_unix_ms(),
        frozen_ms: 0.0,
        archive_bytes: 0,
        raw_bytes: 0,
        base: 1_000_000,
        schedule: None,
    };
    conn.send_msg(&ferry_transport::Msg::Offer {
        service: SERVICE.into(),
        checkpoint: stale,
    })
    .unwrap();
    let refused = conn
        .recv_msg()
        .expect_err("a stale leader's checkpoint must be refused");
    let why = format!("{refused}");
    assert!(why.contains("stale leader"), "{why}");
    assert!(
        c.view().services[SERVICE]
            .standbys
            .values()
            .all(|r| r.checkpoint.generation < 1_000_000),
        "a refused checkpoint was published"
    );
    let mut gap = Duration::ZERO;
    let mut last_ok = None;
    for x in samples.iter().filter(|x| x.at > t0) {
        if x.ok.is_some() {
            if let Some(l) = last_ok {
                gap = gap.max(x.at - l);
            }
            last_ok = Some(x.at);
        }
    }
    let status = c.status_text();
    eprintln!(
        "{status}\nmove h{leader} -> h{to}: longest client gap {} ms, served {before} -> {after}",
        gap.as_millis()
    );
    if std::env::var_os("FERRY_HA_LOGS").is_some() {
        for (i, a) in c.agents.iter().enumerate() {
            if let Some(a) = a {
                eprintln!("--- agent h{i}\n{}", a.log());
            }
        }
    }
    assert!(status.contains(&format!("leader h{to}")), "{status}");
    assert!(c.settled(2).0 == to);
}

/// A process's state letter (`T`: stopped), None once it is gone.
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Kills and reaps a child, and stops a member, even when the test fails.
struct FenceFixture {
    member: Arc<ferry_agent::ha::Member>,
    threads: Vec<std::thread::JoinHandle<()>>,
    child: std::process::Child,
}

impl Drop for FenceFixture {
    fn drop(&mut self) {
        // The member's shutdown would kill the copy and wait for its pid,
        // which this test's unreaped child keeps: it goes first.
        if let Ok(mut led) = self.member.led.lock() {
            led.clear();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.member.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Fencing never pauses a copy while CRIU dumps it: a pause under CRIU is
/// dumped as well, and a copy restored from such images stays stopped and
/// never answers (what a failover after an etcd outage once met). It
/// pauses the copy as soon as the dump ends, a paused copy is not offered
/// for a dump, and a renewal resumes it.
#[test]
fn fencing_waits_for_a_dump_to_end_and_a_paused_copy_is_not_dumped() {
    require_criu();
    let dir = scratch("ha-fence-dump");
    let etcd = EtcdProc::start(dir.path(), "127.0.0.1".parse().unwrap());
    let config = ferry_agent::ha::HaConfig {
        etcd: ferry_agent::ha::etcd::EtcdAccess::plain(std::slice::from_ref(&etcd.url)),
        cluster: "fence".into(),
        name: "h0".into(),
        ip: "127.0.0.1".parse().unwrap(),
        // Pauses 3 s after the last renewal, deletes at 4 s.
        lease_ttl: Duration::from_secs(4),
        docker_socket: PathBuf::from("/nonexistent"),
        ferry: PathBuf::from(env!("CARGO_BIN_EXE_ferry")),
    };
    let member = ferry_agent::ha::Member::join(
        config,
        "127.0.0.1:9".into(),
        dir.path().join("runc"),
        dir.path().join("store"),
        ferry_transport::Secret::from_bytes(&[7; 32]),
        ferry_criu::Criu::locate(None, None).expect("CRIU"),
        "fence-test-boot".into(),
    )
    .expect("join the cluster");
    let threads = member.start();
    let child = Command::new("sleep").arg("600").spawn().unwrap();
    let pid = child.id() as i32;
    let f = FenceFixture {
        member,
        threads,
        child,
    };
    let copy = ferry_agent::ha::HostCopy::Process {
        record: dir.path().join("copy.pid"),
        log: dir.path().join("copy.log"),
    };
    copy.adopt(pid).unwrap();
    f.member
        .led
        .lock()
        .unwrap()
        // Token 0: no leader key, which compares as absent when vouching.
        .insert("svc".into(), ferry_agent::ha::member::Led::running(copy, 0));
    let wait_state = |want: bool, within: Duration| {
        let deadline = Instant::now() + within;
        while (proc_state(pid) == Some('T')) != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        (proc_state(pid) == Some('T')) == want
    };

    let dumping = f
        .member
        .dumping("svc")
        .expect("a running copy may be dumped");
    etcd.freeze(true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.member.unfenced_for(Duration::ZERO) {
        assert!(Instant::now() < deadline, "the lease was never in doubt");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Ten rounds of fencing past the point where it pauses.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        proc_state(pid),
        Some('S'),
        "fencing paused a copy that CRIU was dumping"
    );
    drop(dumping);
    assert!(
        wait_state(true, Duration::from_millis(500)),
        "the copy was not paused once the dump ended (state {:?})",
        proc_state(pid)
    );
    assert!(
        f.member.dumping("svc").is_none(),
        "a copy paused by fencing was offered for a dump"
    );
    etcd.freeze(false);
    assert!(
        wait_state(false, Duration::from_secs(5)),
        "a renewal did not resume the copy"
    );
    assert!(f.member.dumping("svc").is_some());
}

/// Write access to etcd alone runs nothing: a spec written straight to
/// etcd (unsealed, as an intruder or an old ferry writes it) and one
/// sealed with another key are refused by every agent, which logs them,
/// and nothing of either runs; `ha status --key` shows them refused, and
/// `ha run` without the key is refused before it writes anything.
#[test]
fn a_spec_without_the_cluster_keys_seal_runs_nowhere() {
    use ferry_agent::ha::keys::{self, App, ServiceSpec};
    let c = Cluster::start("unsealed", Kind::Process);
    let ran = c.dir.path().join("ran");
    let spec = |name: &str| ServiceSpec {
        name: name.into(),
        app: App::Process {
            command: vec![
                "sh".into(),
                "-c".into(),
                format!("touch {}; sleep 600", ran.display()),
            ],
        },
        port: PORT,
        interval_ms: 1000,
        standbys: 1,
        hosts: vec![],
        stopped: false,
    };
    c.client
        .put(
            &keys::service_key(&c.name, "plain", "spec"),
            serde_json::to_vec(&spec("plain")).unwrap(),
            0,
        )
        .unwrap();
    let other = ferry_transport::Secret::from_bytes(b"not the cluster key, 32 bytes ..");
    c.client
        .put(
            &keys::service_key(&c.name, "forged", "spec"),
            keys::seal(&other, &c.name, "forged", "spec", &spec("forged")),
            0,
        )
        .unwrap();
    // Every agent refuses both (each logs each once).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let refusals = c
            .agents
            .iter()
            .flatten()
            .map(|a| a.log().matches("refused an HA record from etcd").count())
            .collect::<Vec<_>>();
        if refusals.iter().all(|&n| n >= 2) {
            break;
        }
        assert!(Instant::now() < deadline, "{refusals:?}\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    // A few election rounds later, still nothing ran nor was elected.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!ran.exists(), "an unsealed spec ran\n{}", c.logs());
    let v = c.view();
    for svc in ["plain", "forged"] {
        let s = &v.services[svc];
        assert!(s.spec.is_none() && s.leader.is_none(), "{svc}: {s:?}");
        assert_eq!(s.refused.len(), 1, "{svc}: {:?}", s.refused);
    }
    let status = c.ha("status").ok();
    assert_eq!(status.matches("REFUSED spec").count(), 2, "{status}");
    let err = ferry([
        "ha",
        "run",
        "keyless",
        "--etcd",
        &c.etcd.url,
        "--cluster",
        &c.name,
        "--port",
        "9",
        "--",
        "true",
    ])
    .fails_with(2);
    assert!(err.contains("needs --key"), "{err}");
    assert!(!c.view().services.contains_key("keyless"));
}

/// etcd over TLS with client certificates (made by the test): the agent
/// joins and `ha run` / `ha status` work with the certificates, by flag or
/// environment; without a client certificate, without the CA, over
/// http://, or with a key others can read, each is refused with the reason.
/// Starts an agent `h1` of the cluster with `etcd_args` (endpoint,
/// credentials and `--cluster`), and waits until `ha status`, run with
/// `env` only, shows its heartbeat; returns both.
fn agent_in_status(
    dir: &std::path::Path,
    etcd_args: Vec<String>,
    env: &[(&str, String)],
) -> (AgentProc, serde_json::Value) {
    let mut extra = etcd_args;
    extra.extend(
        [
            "--name",
            "h1",
            "--advertise",
            "127.0.0.1",
            "--lease-ttl",
            "1",
        ]
        .map(String::from),
    );
    let store = dir.join("store");
    let agent = AgentProc::start_args(dir, &store, "127.0.0.1:0", None, None, None, &extra);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = env
            .iter()
            .fold(ferry(["ha", "status", "--json"]), |c, (k, v)| c.env(k, v))
            .json();
        if status["hosts"]["h1"].is_object() {
            return (agent, status);
        }
        assert!(Instant::now() < deadline, "{status}\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn etcd_over_tls_with_client_certificates() {
    use common::etcd::EtcdProc;
    let dir = scratch("etcd-tls");
    let (etcd, tls) = EtcdProc::start_tls(dir.path(), "127.0.0.1".parse().unwrap());
    let key = common::agent::key(dir.path());
    let cluster = format!("t{}-tls", std::process::id());
    let tls_args = |cert: bool| {
        let mut a = vec![
            "--etcd".to_string(),
            etcd.url.clone(),
            "--etcd-cacert".into(),
            tls.ca.display().to_string(),
        ];
        if cert {
            a.extend([
                "--etcd-cert".into(),
                tls.client_cert.display().to_string(),
                "--etcd-key".into(),
                tls.client_key.display().to_string(),
            ]);
        }
        a.extend(["--cluster".into(), cluster.clone()]);
        a
    };
    // Declared for a host that does not exist: nothing runs it.
    ferry([
        "ha", "run", "web", "--port", "9", "--hosts", "nowhere", "--key",
    ])
    .arg(&key)
    .args_from(tls_args(true))
    .args_from(["--", "sleep", "1"])
    .ok();
    let env = [
        ("FERRY_ETCD", etcd.url.clone()),
        ("FERRY_ETCD_CACERT", tls.ca.display().to_string()),
        ("FERRY_ETCD_CERT", tls.client_cert.display().to_string()),
        ("FERRY_ETCD_KEY", tls.client_key.display().to_string()),
        ("FERRY_CLUSTER", cluster.clone()),
    ];
    // The certificates by flags for the agent, by environment for the
    // status.
    let (agent, status) = agent_in_status(dir.path(), tls_args(true), &env);
    assert!(status["services"]["web"]["spec"].is_object(), "{status}");

    // Refusals, each naming its cause.
    let refused = |args: Vec<String>, why: &str| {
        let err = ferry(["ha", "status"]).args_from(args).fails_with(1);
        assert!(err.contains(why), "expected '{why}' in: {err}");
    };
    // No client certificate: etcd refuses the handshake.
    refused(tls_args(false), "etcd");
    // No CA: ferry cannot check etcd's certificate.
    let mut no_ca = tls_args(true);
    no_ca.drain(2..4);
    refused(no_ca, "--etcd-cacert");
    // The certificates with an http:// endpoint.
    let mut http = tls_args(true);
    http[1] = etcd.url.replace("https://", "http://");
    refused(http, "not https://");
    // A client key others can read.
    let exposed = dir.path().join("exposed.key");
    std::fs::copy(&tls.client_key, &exposed).unwrap();
    std::fs::set_permissions(
        &exposed,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let mut open_key = tls_args(true);
    open_key[7] = exposed.display().to_string();
    refused(open_key, "chmod 600");
    drop(agent);
}

/// etcd with its own authentication: agents and `ha` commands work as a
/// user whose role may write only the cluster's prefix; no user, a wrong
/// password, or a user without that permission is refused by etcd, each
/// naming the cause.
#[test]
fn etcd_with_a_user_and_password() {
    use common::etcd::EtcdProc;
    let dir = scratch("etcd-auth");
    let etcd = EtcdProc::start(dir.path(), "127.0.0.1".parse().unwrap());
    let key = common::agent::key(dir.path());
    let cluster = format!("t{}-auth", std::process::id());
    // etcdctl as `user` (none before auth is on).
    let etcdctl = |user: Option<&str>, args: &[&str]| {
        let mut c = std::process::Command::new("etcdctl");
        c.args(["--endpoints", &etcd.url]);
        if let Some(u) = user {
            c.args(["--user", u]);
        }
        let out = c.args(args).output().expect("etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let plain = |args: &[&str]| etcdctl(None, args);
    plain(&["user", "add", "root:root-pw"]);
    plain(&["user", "grant-role", "root", "root"]);
    let prefix = format!("/ferry/{cluster}/");
    plain(&["role", "add", "ferry"]);
    plain(&[
        "role",
        "grant-permission",
        "ferry",
        "--prefix=true",
        "readwrite",
        &prefix,
    ]);
    plain(&["user", "add", "ferry:ferry-pw"]);
    plain(&["user", "grant-role", "ferry", "ferry"]);
    plain(&["user", "add", "other:other-pw"]);
    plain(&["auth", "enable"]);
    etcdctl(Some("root:root-pw"), &["auth", "status"]);
    let secret = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        p.display().to_string()
    };
    let (right, wrong, others) = (
        secret("ferry.pw", "ferry-pw\n"),
        secret("wrong.pw", "not-it\n"),
        secret("other.pw", "other-pw\n"),
    );
    let args = |user: &str, pw: &str| {
        [
            "--etcd",
            etcd.url.as_str(),
            "--etcd-user",
            user,
            "--etcd-password-file",
            pw,
            "--cluster",
            cluster.as_str(),
        ]
        .map(String::from)
        .to_vec()
    };
    ferry([
        "ha", "run", "web", "--port", "9", "--hosts", "nowhere", "--key",
    ])
    .arg(&key)
    .args_from(args("ferry", &right))
    .args_from(["--", "sleep", "1"])
    .ok();
    let env = [
        ("FERRY_ETCD", etcd.url.clone()),
        ("FERRY_ETCD_USER", "ferry".to_string()),
        ("FERRY_ETCD_PASSWORD_FILE", right.clone()),
        ("FERRY_CLUSTER", cluster.clone()),
    ];
    // The user by flags for the agent, by environment for the status.
    let (agent, status) = agent_in_status(dir.path(), args("ferry", &right), &env);
    assert!(status["services"]["web"]["spec"].is_object(), "{status}");
    let refused = |args: Vec<String>, why: &str| {
        let err = ferry(["ha", "status"]).args_from(args).fails_with(1);
        assert!(err.contains(why), "expected '{why}' in: {err}");
    };
    refused(args("ferry", &wrong), "authentication failed");
    refused(args("other", &others), "permission denied");
    let mut anonymous = args("ferry", &right);
    anonymous.drain(2..6);
    refused(anonymous, "user name is empty");
    drop(agent);
}

/// The fencing guard kills what it holds when the agent's end closes, and
/// when the deadline passes without being moved on; a released copy lives.
#[test]
fn the_guard_kills_its_copies_when_the_agent_goes_or_the_deadline_passes() {
    use ferry_agent::guard::GuardLink;
    use ferry_sys::clock::BootInstant;
    let ferry = PathBuf::from(env!("CARGO_BIN_EXE_ferry"));
    let sleeper = || Command::new("sleep").arg("60").spawn().unwrap();
    let gone = |c: &mut std::process::Child| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if c.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    };
    // The agent goes: every copy held dies at once.
    let g = GuardLink::spawn(&ferry).unwrap();
    g.deadline(BootInstant::now() + Duration::from_secs(600))
        .unwrap();
    let (mut a, mut b) = (sleeper(), sleeper());
    g.watch("a", a.id() as i32, None).unwrap();
    g.watch("b", b.id() as i32, None).unwrap();
    g.release("b").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(g);
    assert!(
        gone(&mut a),
        "the guard did not kill a held copy when its agent went"
    );
    assert!(!gone(&mut b), "the guard killed a released copy");
    let _ = b.kill();
    // The deadline passes: killed, and reported.
    let g = GuardLink::spawn(&ferry).unwrap();
    g.deadline(BootInstant::now() + Duration::from_millis(300))
        .unwrap();
    let mut c = sleeper();
    g.watch("c", c.id() as i32, None).unwrap();
    assert_eq!(g.next_kill().as_deref(), Some("c"));
    assert!(gone(&mut c), "the guard did not kill at the deadline");
}

/// `ha move` when the answers of the migration go wrong: first the
/// destination commits but its `Committed` never arrives (the leader asks
/// again and hands over), then the destination's agent dies with the copy
/// restored and comes back on its address (its journal removes the copy,
/// the leader learns "aborted", resumes the service and moves it again).
/// Exactly one copy runs throughout, sampled every 10 ms, and the service
/// carries on.
#[test]
fn a_move_whose_commit_is_lost_or_whose_destination_dies_keeps_one_copy() {
    for (kind, ordinary) in [
        (Kind::Process, true),
        (Kind::Runc, false),
        (Kind::Docker, false),
    ] {
        if std::env::var("FERRY_HA_MOVE_ONLY").is_ok_and(|k| k != format!("{kind:?}")) {
            continue;
        }
        move_faults(&format!("hamf{}", kind as u8), kind, ordinary);
    }
}

fn move_to(c: &Cluster, to: usize) {
    let out = c
        .ha("move")
        .args_from([SERVICE, "--to", &Cluster::host(to)])
        .ok();
    assert!(out.contains("requested"), "{out}");
}

/// Waits until `want` (or, with None, any one host) leads and alone runs
/// the service; returns the leader.
fn wait_one_copy(c: &Cluster, want: Option<usize>, what: &str) -> usize {
    let deadline = Instant::now() + SETTLE;
    loop {
        let running = c.running();
        if let (Some((leader, _)), [one]) = (c.leader(), running.as_slice()) {
            if *one == leader && want.is_none_or(|w| w == leader) {
                return leader;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no single copy on the leader (running on {running:?})\n{}\n{}",
            c.status_text(),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn move_faults(tag: &str, kind: Kind, ordinary: bool) {
    let mut c = Cluster::start(tag, kind);
    c.ordinary = ordinary;
    c.declare_service();
    let (leader, _) = c.settled(2);
    let watch = SplitBrainWatch::start((0..HOSTS).map(|i| c.probe(i)).collect());
    let client = Client::start(&c.etcd.url, &c.name);
    assert!(client
        .first_ok_after(Instant::now(), None, Duration::from_secs(10))
        .is_some());
    // 1. The destination's Committed is lost.
    let to = (leader + 1) % HOSTS;
    c.restart_agent(to, Some("agent-drop-committed"));
    c.settled(2);
    let t0 = Instant::now();
    move_to(&c, to);
    wait_one_copy(&c, Some(to), "a move whose Committed was lost");
    let a = c.agents[leader].as_ref().unwrap();
    assert!(
        a.wait_for("its answer had been lost", Duration::from_secs(5)),
        "{}",
        a.log()
    );
    answered_once(
        &c,
        &client,
        &watch,
        t0,
        &format!("{kind:?}: move with a lost Committed, h{leader} -> h{to}"),
    );
    // 2. The destination dies after restoring, and comes back.
    let leader = to;
    let to = (leader + 1) % HOSTS;
    c.restart_agent(to, Some("agent-before-commit"));
    c.settled(2);
    let t1 = Instant::now();
    move_to(&c, to);
    c.agents[to]
        .as_ref()
        .unwrap()
        .wait_fault("agent-before-commit");
    c.restart_agent(to, None);
    let now = wait_one_copy(&c, None, "a move whose destination died");
    answered_once(
        &c,
        &client,
        &watch,
        t1,
        &format!("{kind:?}: move whose destination died after restoring, h{leader} -> h{to}: the service runs on h{now}"),
    );
    // 3. The leader's agent dies right after sending Commit: the
    //    destination commits and runs the moved copy, and the handover
    //    never comes. Exactly one copy runs afterwards.
    let src = (now + 1) % HOSTS;
    c.restart_agent(src, Some("migrate-after-commit-sent"));
    c.settled(2);
    move_to(&c, src);
    wait_one_copy(&c, Some(src), "a move to the host whose agent will die");
    let to = (src + 1) % HOSTS;
    let t2 = Instant::now();
    move_to(&c, to);
    c.agents[src]
        .as_ref()
        .unwrap()
        .wait_fault("migrate-after-commit-sent");
    c.kill_agent_only(src);
    let now = wait_one_copy(&c, None, "a move whose leader died after Commit");
    answered_once(
        &c,
        &client,
        &watch,
        t2,
        &format!("{kind:?}: move whose leader died after sending Commit, h{src} -> h{to}: the service runs on h{now}"),
    );
    // A while longer: no second copy comes up late.
    std::thread::sleep(Duration::from_secs(3));
    wait_one_copy(&c, Some(now), "after the leader died mid-move");
    watch.assert_never_two(&c);
    if std::env::var_os("FERRY_HA_LOGS").is_some() {
        eprintln!("{}", c.logs());
    }
    // The counter never went back.
    let served: Vec<u64> = client
        .samples()
        .iter()
        .filter_map(|x| x.ok.as_ref().map(|o| o.1))
        .collect();
    assert!(
        served.windows(2).all(|w| w[1] >= w[0]),
        "the counter went back: {served:?}\n{}",
        c.logs()
    );
}

/// The client got an answer after `since` (printed with `what`), and no
/// sample so far saw two copies.
fn answered_once(
    c: &Cluster,
    client: &Client,
    watch: &SplitBrainWatch,
    since: Instant,
    what: &str,
) {
    let first = client
        .first_ok_after(since, None, SETTLE)
        .unwrap_or_else(|| panic!("{what}: no answer\n{}", c.logs()));
    eprintln!(
        "{what}: first answer {} ms after the request",
        (first.at - since).as_millis()
    );
    watch.assert_never_two(c);
}

/// GETs `path` from an HTTP server at `addr`: the body, if it answered 200.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let a: SocketAddr = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&a, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then(|| body.to_string())
}

/// Ordinary programs as HA process-tree services, none of which calls
/// setsid() or knows about ferry: `python3 -m http.server`; a daemon that
/// forks the server and exits its parent; a shell loop counting into a
/// file beside a server that serves it. Each is checkpointed, replicated
/// and, when its leader's host dies (agent and copy killed), restored on
/// another host, where it answers again (the loop counting on).
#[test]
fn ordinary_programs_are_ha_services() {
    let mut c = Cluster::start("haprog", Kind::Process);
    let www = c.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello\n").unwrap();
    let d = www.display().to_string();
    let services: [(&str, u16, String); 3] = [
        (
            "web",
            8081,
            format!("exec python3 -m http.server 8081 --directory {d}"),
        ),
        (
            "daemon",
            8082,
            format!("python3 -m http.server 8082 --directory {d} >/dev/null 2>&1 & exit 0"),
        ),
        (
            "loop",
            8083,
            format!(
                "python3 -m http.server 8083 --directory {d} >/dev/null 2>&1 & i=0; while :; do i=$((i+1)); echo $i > {d}/count.tmp; mv {d}/count.tmp {d}/count; sleep 0.05; done"
            ),
        ),
    ];
    for (name, port, script) in &services {
        c.ha("run")
            .args_from([
                name,
                "--port",
                &port.to_string(),
                "--interval-ms",
                "2000",
                "--standbys",
                "2",
                "--",
                "sh",
                "-c",
                script,
            ])
            .ok();
    }
    // Each leads somewhere, answers, and has a verified checkpoint.
    let ready = |c: &Cluster, name: &str, not_on: Option<&str>| -> (String, String) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let v = c.view();
            if let Some(s) = v.services.get(name) {
                if let (Some(l), Some(a)) = (&s.leader, &s.address) {
                    let verified = s.standbys.values().any(|r| r.checkpoint.generation > 0);
                    if verified
                        && not_on.is_none_or(|h| h != l.host)
                        && a.host == l.host
                        && http_get(&a.addr, "/hello.txt").as_deref() == Some("hello\n")
                    {
                        return (l.host.clone(), a.addr.clone());
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "service {name} never answered from a leader with a verified checkpoint\n{}\n{}",
                c.status_text(),
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let count = |addr: &str| -> u64 {
        http_get(addr, "/count")
            .and_then(|b| b.trim().parse().ok())
            .unwrap_or(0)
    };
    let mut leaders = Vec::new();
    for (name, _, _) in &services {
        leaders.push(ready(&c, name, None));
    }
    let (_, loop_addr) = &leaders[2];
    let before = count(loop_addr);
    assert!(before > 0, "the loop does not count");
    // The host leading the loop dies: every service it led moves.
    let dead = leaders[2].0.clone();
    let i: usize = dead.trim_start_matches('h').parse().unwrap();
    c.kill_agent(i);
    for (k, (name, _, _)) in services.iter().enumerate() {
        let moved = leaders[k].0 == dead;
        let (host, addr) = ready(&c, name, moved.then_some(dead.as_str()));
        eprintln!(
            "{name}: led by {} before, answers on {host} at {addr}",
            leaders[k].0
        );
    }
    let v = c.view();
    let addr = v.services["loop"].address.clone().unwrap().addr;
    let after = count(&addr);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        count(&addr) > after,
        "the restored loop does not count on (before the fault {before}, after {after})"
    );
    c.start_agent(i);
}
