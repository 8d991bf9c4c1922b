//! `ferry bench migrate`: the downtime laboratory.
//!
//! Two hosts as network namespaces joined by a link shaped with `tbf`
//! ([`crate`]); the bundled workload in host 0 with a chosen resident
//! size and dirty rate, sending a heartbeat datagram every millisecond to a
//! prober in the root namespace; one migration to host 1 per case. The
//! downtime reported is the one the application's client sees: the longest
//! silence between two heartbeats ([`crate::Prober`]), which includes
//! everything (freeze, copies, restore, the network path coming back).
//!
//! Methods: ferry pre-copy (`ferry migrate`), ferry post-copy (`ferry
//! migrate --lazy-pages`), ferry hybrid (`ferry migrate --hybrid`), and the
//! baseline, cold migration with plain CRIU
//! (`criu dump`, copy the images over the same link, `criu restore`). Each
//! ferry case gets a fresh agent with an empty page store, so nothing is
//! already at the destination. Every case, its workload and its agent are
//! bounded in time and cleaned up whatever happens.

#![forbid(unsafe_code)]

use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate as lab;
use crate::workload::{Launch, Workload};
use crate::{Lab, LabError, Prober};

/// Heartbeats a case waits for before and after the migration.
const SETTLE_HEARTBEATS: u64 = 300;
/// Longest wait for the workload, a migration or the heartbeats.
const CASE_TIMEOUT: Duration = Duration::from_secs(300);
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a case's agent may take to stop on SIGTERM.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Precopy,
    Postcopy,
    Hybrid,
    Cold,
}

impl Method {
    pub fn parse(s: &str) -> Option<Method> {
        Some(match s {
            "precopy" | "pre-copy" => Method::Precopy,
            "postcopy" | "post-copy" => Method::Postcopy,
            "hybrid" => Method::Hybrid,
            "cold" => Method::Cold,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Precopy => "ferry pre-copy",
            Method::Postcopy => "ferry post-copy",
            Method::Hybrid => "ferry hybrid",
            Method::Cold => "cold CRIU",
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct MigrateBench {
    pub ferry_exe: PathBuf,
    pub workload_exe: PathBuf,
    pub sizes_mib: Vec<u64>,
    pub dirty_mib_s: Vec<f64>,
    pub methods: Vec<Method>,
    /// Link rate in Mbit/s (None: unshaped).
    pub rate_mbit: Option<u64>,
    pub max_downtime: String,
    pub workdir: PathBuf,
}

/// One measured migration.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub size_mib: u64,
    pub dirty_mib_s: f64,
    pub method: Method,
    /// Longest heartbeat silence seen by the prober, ms.
    pub downtime_ms: Option<f64>,
    /// ferry's own frozen time (dump request to resume), ms.
    pub frozen_ms: Option<f64>,
    /// From a lazy dump: the resume to the source's release (ferry's
    /// timer), ms: how long the frozen source held the only whole copy.
    pub released_ms: Option<f64>,
    /// ferry's prediction of the frozen time, made before the freeze.
    pub predicted_ms: Option<f64>,
    /// The prediction exceeded --max-downtime and ferry said so before
    /// freezing.
    pub announced_miss: Option<bool>,
    /// Whole migration, ms (cold: without this machine's pid-reuse wait).
    pub total_ms: Option<f64>,
    pub rounds: Option<usize>,
    pub stop_reason: Option<String>,
    pub wire_bytes: Option<u64>,
    /// The heartbeat counter went on from where it stopped.
    pub continued: Option<bool>,
    pub error: Option<String>,
    /// The tool's own report (ferry's JSON or the cold report).
    pub detail: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateBenchError {
    #[error("cannot build the laboratory")]
    Lab(#[from] LabError),
    #[error("benchmark file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl MigrateBench {
    /// Runs every case; a failed case is reported, not fatal.
    pub fn run(&self, progress: &mut dyn FnMut(&Case)) -> Result<Vec<Case>, MigrateBenchError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MigrateBenchError::Io { path, source }
        };
        std::fs::create_dir_all(&self.workdir).map_err(io(&self.workdir))?;
        let key = self.workdir.join("key");
        if !key.exists() {
            ferry_transport::Secret::generate(&key).map_err(|e| MigrateBenchError::Io {
                path: key.clone(),
                source: io::Error::other(e.to_string()),
            })?;
        }
        let lab = Lab::create("bench", 2, self.rate_mbit)?;
        let mut cases = Vec::new();
        let mut n = 0;
        for &size in &self.sizes_mib {
            for &dirty in &self.dirty_mib_s {
                for &method in &self.methods {
                    n += 1;
                    let work = self.workdir.join(format!("case-{n}"));
                    let mut case = self.case(&lab, &key, size, dirty, method, &work);
                    // A failed case keeps its agent's log.
                    if let Some(e) = &mut case.error {
                        let kept = self.workdir.join(format!("case-{n}-agent.log"));
                        if std::fs::rename(work.join("agent.log"), &kept).is_ok() {
                            e.push_str(&format!(" (agent log: {})", kept.display()));
                        }
                    }
                    let _ = std::fs::remove_dir_all(&work);
                    progress(&case);
                    cases.push(case);
                }
            }
        }
        Ok(cases)
    }

    fn case(
        &self,
        lab: &Lab,
        key: &Path,
        size: u64,
        dirty: f64,
        method: Method,
        work: &Path,
    ) -> Case {
        let mut case = Case {
            size_mib: size,
            dirty_mib_s: dirty,
            method,
            downtime_ms: None,
            frozen_ms: None,
            released_ms: None,
            predicted_ms: None,
            announced_miss: None,
            total_ms: None,
            rounds: None,
            stop_reason: None,
            wire_bytes: None,
            continued: None,
            error: None,
            detail: None,
        };
        if let Err(e) = self.measure(lab, key, work, &mut case) {
            case.error = Some(e);
        }
        case
    }

    fn measure(&self, lab: &Lab, key: &Path, work: &Path, case: &mut Case) -> Result<(), String> {
        std::fs::create_dir_all(work).map_err(|e| format!("{}: {e}", work.display()))?;
        let prober = Prober::start(SocketAddr::new(lab.gateway().into(), 0))
            .map_err(|e| ferry_image::units::chain(&e))?;
        let mut launch = Launch::new(&self.workload_exe, case.size_mib, work.join("report"));
        launch.dirty_mib_s = case.dirty_mib_s;
        launch.heartbeat = Some(prober.local_addr());
        launch.netns = Some(lab.host(0).netns.clone());
        launch.seed = fastrand::u64(1..u64::MAX);
        // Post-copy runs from a lazy dump, which keeps the source's pids
        // until every page has moved: on this one kernel the workload is
        // the init of a pid namespace of its own (as a container's init
        // is), restored in a new one. Across real hosts nothing needs it.
        launch.own_pid_ns = matches!(case.method, Method::Postcopy | Method::Hybrid);
        let mut w = launch.spawn().map_err(|e| format!("workload: {e}"))?;
        w.wait_ready(READY_TIMEOUT)
            .map_err(|e| format!("workload: {e}"))?;
        if !prober.wait_received(SETTLE_HEARTBEATS, CASE_TIMEOUT) {
            return Err("no heartbeats from the workload".into());
        }
        let pid = w.pid();
        let mut restored_pid = pid;
        let outcome = match case.method {
            Method::Cold => {
                let dir = work.join("cold");
                let r = reaping(&mut w, move || {
                    let lab_ref: &Lab = lab;
                    lab::cold_migrate(lab_ref, 0, 1, pid, &dir)
                        .map_err(|e| ferry_image::units::chain(&e))
                });
                r.map(|c| {
                    case.total_ms = Some(c.total_without_pid_wait().as_secs_f64() * 1e3);
                    case.wire_bytes = Some(c.wire_bytes);
                    case.detail = serde_json::to_value(&c).ok();
                })
            }
            Method::Precopy | Method::Postcopy | Method::Hybrid => {
                let agent = Agent::start(&self.ferry_exe, lab, key, &work.join("agent"))?;
                let mut cmd = lab.host(0).command(&self.ferry_exe);
                cmd.args(["migrate", "--json", "--timeout", "60s"]);
                if !launch.own_pid_ns {
                    // A shell job's restored session would be the
                    // restorer's, which a new pid namespace cannot see:
                    // there the workload, its own session's leader, needs
                    // none.
                    cmd.arg("--shell-job");
                }
                cmd.args(["--pid", &pid.to_string(), "--to", &agent.addr, "--key"])
                    .arg(key)
                    .args(["--max-downtime", &self.max_downtime])
                    // A predicted miss is announced before the freeze
                    // and marked in the report, not refused: the bench
                    // measures every case.
                    .arg("--accept-downtime-miss");
                match case.method {
                    Method::Postcopy => {
                        cmd.arg("--lazy-pages");
                    }
                    Method::Hybrid => {
                        cmd.arg("--hybrid");
                    }
                    _ => {}
                }
                let out = reaping(&mut w, move || cmd.output().map_err(|e| e.to_string()))?;
                drop(agent);
                // Its log (as verbose as RUST_LOG asks), for the curious.
                tracing::debug!(
                    "ferry migrate's log:\n{}",
                    String::from_utf8_lossy(&out.stderr).trim_end()
                );
                if !out.status.success() {
                    return Err(format!(
                        "ferry migrate failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .map_err(|e| format!("ferry migrate output: {e}"))?;
                case.frozen_ms = v["final"]["frozen_ms"].as_f64();
                case.predicted_ms = v["downtime"]["predicted"]["total_ms"].as_f64();
                case.announced_miss = v["downtime"]["announced"].as_bool();
                case.released_ms = v["final"]["source_released_ms"]
                    .as_f64()
                    .filter(|_| v["final"]["lazy_dump"].as_bool() == Some(true));
                case.total_ms = v["total_ms"].as_f64();
                case.rounds = v["rounds"].as_array().map(|r| r.len());
                case.stop_reason = v["stop_reason"].as_str().map(str::to_string);
                if let Some(p) = v["restored_pid"]
                    .as_i64()
                    .and_then(|p| i32::try_from(p).ok())
                {
                    restored_pid = p;
                }
                let pre: u64 = v["rounds"]
                    .as_array()
                    .map(|r| r.iter().filter_map(|x| x["wire_bytes"].as_u64()).sum())
                    .unwrap_or(0);
                case.wire_bytes = Some(pre + v["final"]["wire_bytes"].as_u64().unwrap_or(0));
                case.detail = Some(v);
                Ok(())
            }
        };
        // The restored copy (the same pid, but in a new pid namespace);
        // watch it, end it afterwards.
        let restored = Workload::adopt(restored_pid, work.join("report"));
        let heard = prober.received();
        let resumed = prober.wait_received(heard + SETTLE_HEARTBEATS, CASE_TIMEOUT);
        let report = prober.stop();
        drop(restored);
        outcome?;
        if !resumed {
            return Err("no heartbeats after the migration".into());
        }
        if let Some(gap) = report.longest_gap {
            case.downtime_ms = Some(gap.length.as_secs_f64() * 1e3);
            case.continued = Some(gap.after.counter >= gap.before.counter);
        }
        Ok(())
    }
}

/// Runs `f` while reaping the workload (its parent must, for its pid to be
/// free for the restore on this one-kernel laboratory).
fn reaping<T: Send>(w: &mut Workload, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(f);
        let deadline = Instant::now() + CASE_TIMEOUT;
        while !h.is_finished() && Instant::now() < deadline {
            let _ = w.reap(Duration::from_millis(2));
        }
        h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A `ferry agent` in host 1, killed when dropped.
struct Agent {
    child: Child,
    addr: String,
}

impl Agent {
    fn start(ferry: &Path, lab: &Lab, key: &Path, store: &Path) -> Result<Agent, String> {
        let host = lab.host(1);
        let log_path = store.with_file_name("agent.log");
        let log =
            std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let mut child = host
            .command(ferry)
            .args(["agent", "--listen", &format!("{}:0", host.addr), "--key"])
            .arg(key)
            .arg("--store")
            .arg(store)
            .stdin(Stdio::null())
            .arg("-v")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start the agent: {e}"))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        match line.trim().strip_prefix("ferry agent listening on ") {
            Some(addr) => Ok(Agent {
                addr: addr.to_string(),
                child,
            }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("the agent did not start: {line:?}"))
            }
        }
    }
}

impl Drop for Agent {
    /// SIGTERM first, so that the agent removes its staging; SIGKILL if it
    /// has not exited within [`AGENT_STOP_TIMEOUT`].
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + AGENT_STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The results as a table.
pub fn render(cases: &[Case], out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "{:>6} {:>8} {:<16} {:>11} {:>10} {:>10} {:>10} {:>6} {:>10}  note",
        "MiB", "dirty/s", "method", "downtime", "frozen", "released", "total", "rounds", "wire"
    )?;
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0} ms"));
    for c in cases {
        writeln!(
            out,
            "{:>6} {:>8} {:<16} {:>11} {:>10} {:>10} {:>10} {:>6} {:>10}  {}",
            c.size_mib,
            format!("{} MiB", c.dirty_mib_s),
            c.method.name(),
            ms(c.downtime_ms),
            ms(c.frozen_ms),
            ms(c.released_ms),
            ms(c.total_ms),
            c.rounds.map_or("-".into(), |r| r.to_string()),
            c.wire_bytes.map_or("-".into(), ferry_image::units::bytes),
            c.error
                .clone()
                .or_else(|| c.stop_reason.clone())
                .unwrap_or_default()
        )?;
    }
    Ok(())
}

/// The results as CSV.
pub fn csv(cases: &[Case]) -> String {
    let mut s = String::from(
        "size_mib,dirty_mib_s,method,route,downtime_ms,frozen_ms,predicted_ms,announced_miss,released_ms,total_ms,rounds,wire_bytes,error\n",
    );
    let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
    for c in cases {
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            c.size_mib,
            c.dirty_mib_s,
            c.method.name(),
            c.detail
                .as_ref()
                .and_then(|d| d["route"].as_str())
                .unwrap_or(""),
            f(c.downtime_ms),
            f(c.frozen_ms),
            f(c.predicted_ms),
            c.announced_miss.map_or(String::new(), |a| a.to_string()),
            f(c.released_ms),
            f(c.total_ms),
            c.rounds.map_or(String::new(), |r| r.to_string()),
            c.wire_bytes.map_or(String::new(), |b| b.to_string()),
            c.error.as_deref().unwrap_or("").replace([',', '\n'], ";")
        ));
    }
    s
}

/// An SVG plot of downtime against dirty rate, one line per method and size.
pub fn svg(cases: &[Case]) -> String {
    let (w, h, left, bottom, top, right) = (720.0, 440.0, 70.0, 50.0, 30.0, 200.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let xmax = cases
        .iter()
        .map(|c| c.dirty_mib_s)
        .fold(0.0f64, f64::max)
        .max(1.0);
    let ymax = cases
        .iter()
        .filter_map(|c| c.downtime_ms)
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.1;
    let x = |v: f64| left + v / xmax * pw;
    let y = |v: f64| top + ph - v / ymax * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    s += &format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
        top + ph, left + pw, top + ph, top + ph
    );
    for i in 0..=4 {
        let (xv, yv) = (xmax * i as f64 / 4.0, ymax * i as f64 / 4.0);
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{xv:.1}</text>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{yv:.0}</text>\n",
            x(xv), top + ph + 18.0, left - 6.0, y(yv) + 4.0
        );
    }
    s += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">dirty rate (MiB/s)</text>\n<text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">downtime seen by the client (ms)</text>\n",
        left + pw / 2.0, h - 10.0, top + ph / 2.0, top + ph / 2.0
    );
    let colors = [
        "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02",
    ];
    let mut series: Vec<(Method, u64)> = Vec::new();
    for c in cases {
        if !series.contains(&(c.method, c.size_mib)) {
            series.push((c.method, c.size_mib));
        }
    }
    for (i, (m, size)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let mut pts: Vec<(f64, f64)> = cases
            .iter()
            .filter(|c| c.method == *m && c.size_mib == *size)
            .filter_map(|c| c.downtime_ms.map(|d| (c.dirty_mib_s, d)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = pts
            .iter()
            .map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b)))
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            path.join(" ")
        );
        for (a, b) in &pts {
            s += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n",
                x(*a),
                y(*b)
            );
        }
        let ly = top + 16.0 * i as f64;
        s += &format!(
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"{:.1}\">{} {} MiB</text>\n",
            left + pw + 12.0, left + pw + 32.0, left + pw + 38.0, ly + 4.0, m.name(), size
        );
    }
    s + "</svg>\n"
}
