//! [`Lab`]: "hosts" made of network namespaces joined by one bridge, with
//! optionally shaped links, for tests and `ferry bench migrate`.
//!
//! A lab named `U` (`{tag}-{pid}-{counter}`, unique among live processes
//! and among the labs of one process) owns:
//! - `ferry-U-sw`: the switch namespace, holding bridge `br0`, its port
//!   `uplink` and one port `pI` per host;
//! - `ferry-U-hI`: host I's namespace, with `lo` up and `eth0`
//!   (10.A.B.(I+2)/24, default route via the gateway), the peer of `pI`;
//! - `fl{pid:x}g{counter:x}` in the root namespace: the peer of `uplink`,
//!   carrying the gateway address 10.A.B.1/24 (at most 15 characters,
//!   the kernel's limit for interface names).
//!
//! `A.B` comes from a hash of `U`, within 10.200.0.0-10.250.255.0, and is
//! retried until no address or route of the root namespace overlaps it;
//! the choice and the assignment happen under an exclusive `flock` on
//! [`LOCK_PATH`], so labs created at once by several processes never share
//! a subnet. Names carry the creating pid, so [`sweep_stale`] can remove
//! what dead processes left behind.
//!
//! Dropping a [`Lab`] kills whatever still runs in its namespaces and
//! deletes its interfaces and namespaces; so does a failed
//! [`Lab::create`] for what it had made.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{command, run, LabError};

/// Where `ip netns` keeps its named namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";
/// Lock serialising subnet choice among labs of all processes.
pub(crate) const LOCK_PATH: &str = "/run/ferry-lab.lock";
/// Prefix of every namespace a lab creates.
const NETNS_PREFIX: &str = "ferry-";
/// Prefix of the root-namespace end of a lab's uplink.
const UPLINK_PREFIX: &str = "fl";
/// Names inside the lab's own namespaces (no clash possible there).
const BRIDGE: &str = "br0";
const SWITCH_UPLINK: &str = "uplink";
const HOST_IF: &str = "eth0";
/// Tags are cut to this many `[a-z0-9]` characters to keep names short.
const TAG_MAX_CHARS: usize = 8;
/// Host I gets 10.A.B.(I+2): .1 is the gateway, .255 the broadcast.
pub(crate) const MAX_HOSTS: usize = 200;
/// Second octet range of lab subnets (10.200.0.0/24 to 10.250.255.0/24).
const SUBNET_FIRST: u8 = 200;
const SUBNET_LAST: u8 = 250;
const SUBNET_TRIES: u32 = 64;
/// Routes with a shorter prefix do not rule a candidate subnet out.
const ROUTE_MIN_PREFIX: u8 = 16;
const NAME_TRIES: u32 = 1000;
/// Token-bucket depth of the shaper, as time at the configured rate. The
/// bucket must refill across a timer or softirq delay without the link
/// going idle: on a loaded 2-core VM the qdisc watchdog can wake ~1 ms
/// late, so 2 ms worth of bytes (250 KB at 1 Gbit/s) keeps a bulk transfer
/// at the rate; it lets a transfer start at most 2 ms ahead of the rate.
const TBF_BURST_WINDOW_MS: u64 = 2;
/// Smallest bucket: veth hands tbf GSO packets of up to 64 KiB, and a
/// packet larger than the bucket must be cut up in software; 64 KiB plus
/// one frame lets every such packet pass whole.
const TBF_MIN_BURST_BYTES: u64 = 64 * 1024 + 1514;
/// Longest a packet may wait in the shaper's queue before it is dropped.
/// The queue is rate x latency + burst (1.5 MB at 1 Gbit/s): deep enough
/// that TCP keeps the link full without losses, shallow enough that a
/// heartbeat sharing the link behind a bulk transfer waits at most 10 ms.
const TBF_LATENCY_MS: u64 = 10;

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// One host of a lab: a network namespace with one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The namespace's name, as `ip netns list` shows it.
    pub netns: String,
    /// The host's address on the lab's subnet.
    pub addr: Ipv4Addr,
}

impl Host {
    /// The namespace's bind mount, `/run/netns/NAME`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// A command running `program` inside this host's network namespace
    /// (`nsenter --net=/run/netns/NAME -- program`). Add arguments to it.
    /// The program keeps the caller's mount namespace, so CRIU can dump it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path().display()))
            .arg("--")
            .arg(program);
        cmd
    }
}

/// Byte counters of one host link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct LinkBytes {
    pub rx: u64,
    pub tx: u64,
}

/// A set of hosts joined by one switch; see the module docs.
#[derive(Debug)]
pub struct Lab {
    name: String,
    switch: String,
    uplink: String,
    gateway: Ipv4Addr,
    hosts: Vec<Host>,
    rate_mbit: Option<u64>,
    /// What exists and must go on drop, in creation order.
    made_netns: Vec<String>,
    made_uplink: bool,
}

impl Lab {
    /// Creates a lab of `hosts` hosts, their links shaped to `rate_mbit`
    /// Mbit/s in each direction when given. Needs root, `ip` and `tc`.
    pub fn create(tag: &str, hosts: usize, rate_mbit: Option<u64>) -> Result<Lab, LabError> {
        if hosts == 0 || hosts > MAX_HOSTS {
            return Err(LabError::HostCount {
                hosts,
                max: MAX_HOSTS,
            });
        }
        let (name, uplink) = unique_names(tag)?;
        let mut lab = Lab {
            switch: format!("{NETNS_PREFIX}{name}-sw"),
            name,
            uplink,
            gateway: Ipv4Addr::UNSPECIFIED,
            hosts: Vec::with_capacity(hosts),
            rate_mbit,
            made_netns: Vec::new(),
            made_uplink: false,
        };
        // On error `lab` is dropped here, which removes what was made.
        lab.build(hosts)?;
        Ok(lab)
    }

    fn build(&mut self, hosts: usize) -> Result<(), LabError> {
        let sw = self.switch.clone();
        run(&mut ip(["netns", "add", &sw]))?;
        self.made_netns.push(sw.clone());
        run(&mut ip([
            "-n", &sw, "link", "add", BRIDGE, "type", "bridge",
        ]))?;
        run(&mut ip(["-n", &sw, "link", "set", BRIDGE, "up"]))?;

        let uplink = self.uplink.clone();
        run(&mut ip([
            "link",
            "add",
            &uplink,
            "type",
            "veth",
            "peer",
            "name",
            SWITCH_UPLINK,
            "netns",
            &sw,
        ]))?;
        self.made_uplink = true;
        run(&mut ip([
            "-n",
            &sw,
            "link",
            "set",
            SWITCH_UPLINK,
            "master",
            BRIDGE,
            "up",
        ]))?;
        let [a, b] = self.claim_subnet()?;
        self.gateway = Ipv4Addr::new(10, a, b, 1);
        run(&mut ip(["link", "set", &uplink, "up"]))?;

        for index in 0..hosts {
            let netns = format!("{NETNS_PREFIX}{}-h{index}", self.name);
            let port = format!("p{index}");
            let addr = Ipv4Addr::new(10, a, b, (index + 2) as u8);
            run(&mut ip(["netns", "add", &netns]))?;
            self.made_netns.push(netns.clone());
            run(&mut ip([
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", HOST_IF, "netns",
                &netns,
            ]))?;
            run(&mut ip([
                "-n", &sw, "link", "set", &port, "master", BRIDGE, "up",
            ]))?;
            run(&mut ip(["-n", &netns, "link", "set", "lo", "up"]))?;
            run(&mut ip([
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                HOST_IF,
            ]))?;
            run(&mut ip(["-n", &netns, "link", "set", HOST_IF, "up"]))?;
            self.default_route(&netns)?;
            if let Some(rate) = self.rate_mbit {
                shape(&netns, HOST_IF, rate)?;
                shape(&sw, &port, rate)?;
            }
            self.hosts.push(Host { netns, addr });
        }
        Ok(())
    }

    /// Picks a /24 no address or route of this namespace overlaps and gives
    /// its .1 to the uplink, under the cross-process lock.
    fn claim_subnet(&self) -> Result<[u8; 2], LabError> {
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .map_err(|source| LabError::Io {
                what: "open the lab lock",
                path: LOCK_PATH.into(),
                source,
            })?;
        lock.lock().map_err(|source| LabError::Io {
            what: "lock",
            path: LOCK_PATH.into(),
            source,
        })?;
        let used = used_networks()?;
        for attempt in 0..SUBNET_TRIES {
            let [a, b] = subnet_candidate(&self.name, attempt);
            let net = Ipv4Addr::new(10, a, b, 0);
            if used.iter().any(|&(n, len)| overlaps(net, 24, n, len)) {
                continue;
            }
            run(&mut ip([
                "addr",
                "add",
                &format!("10.{a}.{b}.1/24"),
                "dev",
                &self.uplink,
            ]))?;
            return Ok([a, b]);
        }
        Err(LabError::NoSubnet {
            lab: self.name.clone(),
            tries: SUBNET_TRIES,
        })
        // `lock` is released when the file closes.
    }

    /// The lab's unique name (`{tag}-{pid}-{counter}`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Host `index`. Panics when there is no such host, like indexing.
    pub fn host(&self, index: usize) -> &Host {
        &self.hosts[index]
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The root namespace's address on the lab subnet: a socket bound
    /// there in the root namespace is reachable from every host.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The shaped rate of each host link and direction, if any.
    pub fn rate_mbit(&self) -> Option<u64> {
        self.rate_mbit
    }

    /// The root-namespace interface carrying the gateway address.
    pub fn uplink(&self) -> &str {
        &self.uplink
    }

    /// Every namespace of the lab: the switch, then the hosts.
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(self.switch.clone())
            .chain(self.hosts.iter().map(|h| h.netns.clone()))
            .collect()
    }

    /// Takes host `index`'s link down at both ends. While cut, the host has
    /// no route off itself (sends fail with "network unreachable") and
    /// nothing reaches it.
    pub fn cut(&self, index: usize) -> Result<(), LabError> {
        let host = self.checked_host(index)?;
        run(&mut ip([
            "-n",
            &self.switch,
            "link",
            "set",
            &format!("p{index}"),
            "down",
        ]))?;
        run(&mut ip(["-n", &host.netns, "link", "set", HOST_IF, "down"]))?;
        Ok(())
    }

    /// Partitions host `index` from the gateway's address alone (where the
    /// lab's etcd listens): a blackhole route there, the other hosts still
    /// reachable on the switch.
    pub fn cut_from_gateway(&self, index: usize) -> Result<(), LabError> {
        self.gateway_blackhole(index, "add")
    }

    /// Undoes [`Lab::cut_from_gateway`].
    pub fn heal_from_gateway(&self, index: usize) -> Result<(), LabError> {
        self.gateway_blackhole(index, "del")
    }

    fn gateway_blackhole(&self, index: usize, op: &str) -> Result<(), LabError> {
        let host = self.checked_host(index)?;
        let gw = format!("{}/32", self.gateway);
        run(&mut ip(["-n", &host.netns, "route", op, "blackhole", &gw]))?;
        Ok(())
    }

    /// Brings host `index`'s link back up at both ends and restores its
    /// default route (the kernel drops it when the link goes down).
    pub fn heal(&self, index: usize) -> Result<(), LabError> {
        let host = self.checked_host(index)?;
        run(&mut ip(["-n", &host.netns, "link", "set", HOST_IF, "up"]))?;
        run(&mut ip([
            "-n",
            &self.switch,
            "link",
            "set",
            &format!("p{index}"),
            "up",
        ]))?;
        self.default_route(&host.netns)
    }

    /// Points `netns`'s default route at the gateway.
    fn default_route(&self, netns: &str) -> Result<(), LabError> {
        run(&mut ip([
            "-n",
            netns,
            "route",
            "replace",
            "default",
            "via",
            &self.gateway.to_string(),
        ]))?;
        Ok(())
    }

    /// Bytes host `index`'s link has received and sent so far, Ethernet,
    /// IP and TCP headers included (the counters of its `eth0`).
    pub(crate) fn link_bytes(&self, index: usize) -> Result<LinkBytes, LabError> {
        let host = self.checked_host(index)?;
        let mut cmd = ip([
            "-n",
            &host.netns,
            "-j",
            "-s",
            "link",
            "show",
            "dev",
            HOST_IF,
        ]);
        let out = run(&mut cmd)?;
        parse_link_bytes(&out.stdout).ok_or_else(|| LabError::Command {
            command: super::describe(&cmd),
            status: out.status,
            stderr: format!(
                "no stats64 rx/tx bytes in its output: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        })
    }

    fn checked_host(&self, index: usize) -> Result<&Host, LabError> {
        self.hosts.get(index).ok_or_else(|| LabError::NoHost {
            lab: self.name.clone(),
            index,
            hosts: self.hosts.len(),
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.made_netns {
            kill_inside(ns);
        }
        if self.made_uplink {
            if let Err(e) = run(&mut ip(["link", "del", &self.uplink])) {
                tracing::warn!(lab = %self.name, error = %e, "cannot delete the lab uplink");
            }
        }
        for ns in self.made_netns.iter().rev() {
            if let Err(e) = run(&mut ip(["netns", "del", ns])) {
                tracing::warn!(lab = %self.name, netns = %ns, error = %e, "cannot delete a lab namespace");
            }
        }
    }
}

/// Removes the namespaces and uplinks of labs whose creating process is
/// gone (a test killed mid-way, a crashed bench). Returns what it removed.
pub fn sweep_stale() -> Result<Vec<String>, LabError> {
    let mut removed = Vec::new();
    for name in dir_names(Path::new(NETNS_DIR))? {
        let Some(pid) = netns_owner(&name) else {
            continue;
        };
        if owner_alive(pid) {
            continue;
        }
        kill_inside(&name);
        run(&mut ip(["netns", "del", &name]))?;
        removed.push(name);
    }
    for name in dir_names(Path::new("/sys/class/net"))? {
        let Some(pid) = uplink_owner(&name) else {
            continue;
        };
        if owner_alive(pid) {
            continue;
        }
        // Deleting the switch namespace above may already have taken it.
        if Path::new("/sys/class/net").join(&name).exists() {
            run(&mut ip(["link", "del", &name]))?;
            removed.push(name);
        }
    }
    Ok(removed)
}

fn ip<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    command("ip", args)
}

/// Shapes egress of `dev` in `netns` with a token bucket at `rate_mbit`.
fn shape(netns: &str, dev: &str, rate_mbit: u64) -> Result<(), LabError> {
    run(&mut command(
        "tc",
        [
            "-n",
            netns,
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            &format!("{rate_mbit}mbit"),
            "burst",
            &tbf_burst_bytes(rate_mbit).to_string(),
            "latency",
            &format!("{TBF_LATENCY_MS}ms"),
        ],
    ))?;
    Ok(())
}

/// The shaper's bucket in bytes; see [`TBF_BURST_WINDOW_MS`].
fn tbf_burst_bytes(rate_mbit: u64) -> u64 {
    let bytes_per_ms = rate_mbit.saturating_mul(1_000_000 / 8) / 1000;
    bytes_per_ms
        .saturating_mul(TBF_BURST_WINDOW_MS)
        .max(TBF_MIN_BURST_BYTES)
}

/// `[a-z0-9]` only, at most [`TAG_MAX_CHARS`], never empty.
fn sanitize_tag(tag: &str) -> String {
    let clean: String = tag
        .chars()
        .filter_map(|c| {
            let c = c.to_ascii_lowercase();
            c.is_ascii_alphanumeric().then_some(c)
        })
        .take(TAG_MAX_CHARS)
        .collect();
    if clean.is_empty() {
        "lab".to_string()
    } else {
        clean
    }
}

/// The lab name and its uplink's name, skipping names a dead process with
/// the same pid may have left behind.
fn unique_names(tag: &str) -> Result<(String, String), LabError> {
    let tag = sanitize_tag(tag);
    let pid = std::process::id();
    for _ in 0..NAME_TRIES {
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{tag}-{pid}-{n}");
        let uplink = format!("{UPLINK_PREFIX}{pid:x}g{n:x}");
        if uplink.len() > 15 {
            break;
        }
        let taken = Path::new(NETNS_DIR)
            .join(format!("{NETNS_PREFIX}{name}-sw"))
            .exists()
            || Path::new(NETNS_DIR)
                .join(format!("{NETNS_PREFIX}{name}-h0"))
                .exists()
            || Path::new("/sys/class/net").join(&uplink).exists();
        if !taken {
            return Ok((name, uplink));
        }
    }
    Err(LabError::NoName {
        tag,
        tries: NAME_TRIES,
    })
}

/// The creating pid of a lab namespace name, `ferry-{tag}-{pid}-{n}-{role}`.
fn netns_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NETNS_PREFIX)?;
    let parts: Vec<&str> = rest.split('-').collect();
    let [tag, pid, n, role] = parts.as_slice() else {
        return None;
    };
    let role_ok = *role == "sw"
        || role
            .strip_prefix('h')
            .is_some_and(|i| !i.is_empty() && i.bytes().all(|c| c.is_ascii_digit()));
    let tag_ok = !tag.is_empty() && tag.bytes().all(|c| c.is_ascii_alphanumeric());
    if !role_ok || !tag_ok || n.parse::<u32>().is_err() {
        return None;
    }
    pid.parse().ok()
}

/// The creating pid of a lab uplink name, `fl{pid:x}g{n:x}`.
fn uplink_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(UPLINK_PREFIX)?;
    let (pid, n) = rest.split_once('g')?;
    u32::from_str_radix(n, 16).ok()?;
    u32::from_str_radix(pid, 16).ok()
}

fn owner_alive(pid: u32) -> bool {
    pid == std::process::id() || ferry_image::process::pid_in_use(pid as i32)
}

fn dir_names(dir: &Path) -> Result<Vec<String>, LabError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LabError::Io {
                what: "list",
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    Ok(entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect())
}

/// SIGKILLs every process left in namespace `netns` (never this one).
fn kill_inside(netns: &str) {
    let Ok(out) = run(&mut ip(["netns", "pids", netns])) else {
        return;
    };
    let me = std::process::id() as i32;
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|&p| p != me)
    {
        tracing::debug!(netns, pid, "killing a process left in a lab namespace");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// The second and third octets of attempt `attempt` for lab `name`.
fn subnet_candidate(name: &str, attempt: u32) -> [u8; 2] {
    let h = xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), u64::from(attempt));
    let span = u64::from(SUBNET_LAST - SUBNET_FIRST) + 1;
    [SUBNET_FIRST + (h % span) as u8, (h >> 32) as u8]
}

/// Every IPv4 network (address/prefix) on an interface or in a route of
/// this namespace; the default route is left out.
fn used_networks() -> Result<Vec<(Ipv4Addr, u8)>, LabError> {
    let addrs = run(&mut ip(["-4", "-o", "addr", "show"]))?;
    let routes = run(&mut ip(["-4", "route", "show", "table", "all"]))?;
    let mut used: HashSet<(Ipv4Addr, u8)> = HashSet::new();
    for line in String::from_utf8_lossy(&addrs.stdout).lines() {
        let mut words = line.split_whitespace();
        if words.any(|w| w == "inet") {
            if let Some(net) = words.next().and_then(parse_net) {
                used.insert(net);
            }
        }
    }
    for line in String::from_utf8_lossy(&routes.stdout).lines() {
        // `10.1.2.0/24 dev x`, `local 10.1.2.3 dev x`, `broadcast ...`.
        // Routes wider than [`ROUTE_MIN_PREFIX`] (a VPN's 10.0.0.0/8 or
        // 0.0.0.0/1) would rule out every candidate; the lab's more
        // specific /24 wins over them and only hides that /24 behind them.
        if let Some(net) = line
            .split_whitespace()
            .take(2)
            .find_map(parse_net)
            .filter(|&(_, len)| len >= ROUTE_MIN_PREFIX)
        {
            used.insert(net);
        }
    }
    Ok(used.into_iter().collect())
}

/// The counters in `ip -j -s link show dev X` output.
fn parse_link_bytes(json: &[u8]) -> Option<LinkBytes> {
    let value: serde_json::Value = serde_json::from_slice(json).ok()?;
    let stats = value.get(0)?.get("stats64")?;
    Some(LinkBytes {
        rx: stats.get("rx")?.get("bytes")?.as_u64()?,
        tx: stats.get("tx")?.get("bytes")?.as_u64()?,
    })
}

/// `a.b.c.d/len` or `a.b.c.d` (a /32).
fn parse_net(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, l.parse::<u8>().ok().filter(|&l| l <= 32)?),
        None => (text, 32),
    };
    Some((addr.parse().ok()?, len))
}

/// Do `a/alen` and `b/blen` share any address?
fn overlaps(a: Ipv4Addr, alen: u8, b: Ipv4Addr, blen: u8) -> bool {
    let len = alen.min(blen);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    u32::from(a) & mask == u32::from(b) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limits_and_parse_back() {
        let (name, uplink) = unique_names("Cold Migration!").unwrap();
        assert!(name.starts_with("coldmigr-"), "{name}");
        assert!(uplink.len() <= 15, "{uplink}");
        let pid = std::process::id();
        assert_eq!(uplink_owner(&uplink), Some(pid));
        assert_eq!(netns_owner(&format!("ferry-{name}-sw")), Some(pid));
        assert_eq!(netns_owner(&format!("ferry-{name}-h12")), Some(pid));
        assert_eq!(netns_owner(&format!("ferry-{name}-x")), None);
        assert_eq!(netns_owner("ferry-a-b-1-sw"), None);
        assert_eq!(netns_owner("other-lab-1-2-sw"), None);
        assert_eq!(uplink_owner("flannel.1"), None);
        assert_eq!(uplink_owner("fl1ag2"), Some(0x1a));
    }

    #[test]
    fn worst_case_uplink_name_fits() {
        // pid_max is at most 2^22: six hex digits.
        let name = format!("{UPLINK_PREFIX}{:x}g{:x}", (1u32 << 22) - 1, 0xff_ffffu32);
        assert!(name.len() <= 15, "{name}");
    }

    #[test]
    fn sanitized_tags_are_never_empty() {
        assert_eq!(sanitize_tag("---"), "lab");
        assert_eq!(sanitize_tag("ab-CD_9xyzuvwq"), "abcd9xyz");
    }

    #[test]
    fn distinct_names_get_spread_subnets() {
        let a = subnet_candidate("x-1-0", 0);
        assert!((SUBNET_FIRST..=SUBNET_LAST).contains(&a[0]));
        assert_ne!(subnet_candidate("x-1-0", 1), a);
        assert_ne!(subnet_candidate("x-1-1", 0), a);
    }

    #[test]
    fn overlap_is_by_the_shorter_prefix() {
        let net = |s: &str| parse_net(s).unwrap();
        let (a, al) = net("10.200.3.0/24");
        for (other, expect) in [
            ("10.200.3.77", true),
            ("10.0.0.0/8", true),
            ("10.200.3.128/25", true),
            ("10.200.4.0/24", false),
            ("192.168.1.0/24", false),
            ("0.0.0.0/0", true),
        ] {
            let (b, bl) = net(other);
            assert_eq!(overlaps(a, al, b, bl), expect, "{other}");
        }
        assert_eq!(parse_net("10.1.2.3/33"), None);
        assert_eq!(parse_net("dev"), None);
    }

    #[test]
    fn reads_link_counters_from_ip_json() {
        let out = br#"[{"ifindex":2,"ifname":"eth0","stats64":{"rx":{"bytes":1234,"packets":5},"tx":{"bytes":99,"packets":1}}}]"#;
        assert_eq!(parse_link_bytes(out), Some(LinkBytes { rx: 1234, tx: 99 }));
        assert_eq!(parse_link_bytes(b"[]"), None);
        assert_eq!(parse_link_bytes(b"not json"), None);
    }

    #[test]
    fn bucket_holds_two_ms_or_one_gso_packet() {
        assert_eq!(tbf_burst_bytes(1000), 250_000);
        assert_eq!(tbf_burst_bytes(10), TBF_MIN_BURST_BYTES);
    }
}
