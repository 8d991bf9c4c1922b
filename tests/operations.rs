//! What operators and scripts rely on: the version, shell completions,
//! manual pages, the agent as a service (environment, config file,
//! readiness) and its metrics.

mod common;

use std::process::Command;

use common::*;

#[test]
fn the_version_names_the_commit_the_formats_and_the_criu_needed() {
    let long = ferry(["--version"]).run().ok();
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git");
    assert!(head.status.success(), "the tests run in a git checkout");
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert!(long.starts_with("ferry 0."), "{long}");
    assert!(long.contains(&format!("commit: {head}")), "{long}");
    for line in ["archive format: ", "wire protocol: ", "CRIU: >= 4.2"] {
        assert!(long.contains(line), "no '{line}' in:\n{long}");
    }
    let short = ferry(["-V"]).run().ok();
    assert!(short.contains(&head), "{short}");
}

/// The bash completion script loads in bash and completes commands and
/// flags.
#[test]
fn bash_completions_load_and_complete() {
    let script = ferry(["completions", "bash"]).run().ok();
    let dir = scratch("completions");
    let file = dir.path().join("ferry.bash");
    std::fs::write(&file, script).unwrap();
    let complete = |line: &str| -> String {
        let words: Vec<&str> = line.split(' ').collect();
        let program = format!(
            "set -e; source {file}; complete -p ferry >/dev/null; \
             COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{line}'; COMP_POINT={point}; \
             _ferry ferry '{last}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file = file.display(),
            words = words.join(" "),
            cword = words.len() - 1,
            point = line.len(),
            last = words[words.len() - 1],
            prev = words[words.len() - 2],
        );
        let out = Command::new("bash")
            .args(["-c", &program])
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "bash could not load the completions: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let commands = complete("ferry mig");
    assert!(commands.lines().any(|l| l == "migrate"), "{commands}");
    let flags = complete("ferry migrate --max-d");
    assert!(flags.lines().any(|l| l == "--max-downtime"), "{flags}");
}

/// One manual page per command (roff, with its name and options).
#[test]
fn manual_pages_are_written_for_every_command() {
    let dir = scratch("man");
    let listed = ferry(["man"]).arg(dir.path()).run().ok();
    for page in [
        "ferry.1",
        "ferry-migrate.1",
        "ferry-ha-run.1",
        "ferry-agent.1",
    ] {
        let path = dir.path().join(page);
        assert!(listed.contains(&path.display().to_string()), "{listed}");
        let roff = std::fs::read_to_string(&path).unwrap();
        let name = page.trim_end_matches(".1");
        assert!(roff.contains(&format!(".TH {name} 1")), "{page}:\n{roff}");
    }
    let migrate = std::fs::read_to_string(dir.path().join("ferry-migrate.1")).unwrap();
    assert!(migrate.contains("max\\-downtime"), "{migrate}");
    // Internal commands get no page.
    assert!(!dir.path().join("ferry-guard.1").exists());
}

/// Waits for one datagram on `sock` (a NOTIFY_SOCKET).
fn notification(sock: &std::os::unix::net::UnixDatagram) -> String {
    sock.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("no notification within 60 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A running `ferry agent` whose stdout's first line was read (and the
/// second, the metrics address, when it serves metrics).
struct Started {
    child: std::process::Child,
    first_line: String,
    metrics: Option<String>,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(args: &[&str], env: &[(&str, &str)]) -> Started {
    use std::io::BufRead;
    let mut child = Command::new(FERRY)
        .arg("agent")
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn ferry agent");
    let mut first_line = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut first_line).unwrap();
    let serves_metrics =
        args.contains(&"--metrics") || env.iter().any(|(k, _)| *k == "FERRY_METRICS");
    let metrics = serves_metrics.then(|| {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line.trim()
            .strip_prefix("ferry agent metrics on http://")
            .and_then(|l| l.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("no metrics address: {line:?}"))
            .to_string()
    });
    Started {
        child,
        first_line,
        metrics,
    }
}

/// `GET path` over plain HTTP/1.1: (status line, headers and body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

/// The samples of an OpenMetrics exposition: "name{labels}" -> value.
fn samples(body: &str) -> std::collections::BTreeMap<String, f64> {
    assert!(
        body.trim_end().ends_with("# EOF"),
        "not OpenMetrics:\n{body}"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {l:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            (name.to_string(), value)
        })
        .collect()
}

fn scrape(addr: &str) -> std::collections::BTreeMap<String, f64> {
    let (head, body) = http_get(addr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    samples(&body)
}

fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The agent started from the shipped sample configuration (every key it
/// names accepted), with the FERRY_* variables overriding the file, sends
/// READY=1 to the NOTIFY_SOCKET a service manager would listen on.
#[test]
fn the_agent_reads_its_config_and_tells_the_service_manager_it_is_ready() {
    let dir = scratch("notify");
    let key = dir.path().join("key");
    ferry(["keygen"]).arg(&key).run().ok();
    // The shipped sample, every commented key switched on, paths here.
    let sample = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/systemd/agent.toml"
    ))
    .unwrap();
    let mut config = String::new();
    for line in sample.lines() {
        let line = line
            .strip_prefix("# ")
            .filter(|l| l.contains(" = "))
            .unwrap_or(line);
        let (k, _) = line.split_once(" = ").unwrap_or(("", ""));
        let value = match k {
            "key" => format!("{:?}", key.display().to_string()),
            "store" => format!("{:?}", dir.path().join("store").display().to_string()),
            "staging" => format!("{:?}", dir.path().display().to_string()),
            "criu" => match ferry_sys::which("criu") {
                Some(c) => format!("{:?}", c.display().to_string()),
                None => continue,
            },
            // HA keys stay out (an etcd test of its own below).
            k if k.starts_with("etcd") || ["cluster", "name", "advertise"].contains(&k) => continue,
            _ => {
                config.push_str(line);
                config.push('\n');
                continue;
            }
        };
        config.push_str(&format!("{k} = {value}\n"));
    }
    let file = dir.path().join("agent.toml");
    write_private(&file, &config);
    let notify = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    let notify_env = notify.display().to_string();
    // The file says port 7070; the environment overrides it.
    let agent = start_agent(
        &["--config", &file.display().to_string()],
        &[
            ("NOTIFY_SOCKET", &notify_env),
            ("FERRY_LISTEN", "127.0.0.1:0"),
        ],
    );
    let addr = agent
        .first_line
        .trim()
        .strip_prefix("ferry agent listening on ")
        .unwrap_or_else(|| panic!("agent did not start: {:?}", agent.first_line))
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let msg = notification(&sock);
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(
        msg.lines()
            .any(|l| l == format!("STATUS=listening on {addr}")),
        "{msg:?}"
    );
    assert!(dir.path().join("store").is_dir());
}

/// A configuration file others may write, or with a key ferry does not
/// know, is refused with the reason (exit 2), before anything starts.
#[test]
fn a_config_file_others_can_write_or_with_unknown_keys_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("config-refused");
    let file = dir.path().join("agent.toml");
    write_private(&file, "listen = \"127.0.0.1:0\"\nlisten-port = 7\n");
    let err = ferry(["agent", "--config"]).arg(&file).run().fails_with(2);
    assert!(err.contains("unknown field `listen-port`"), "{err}");
    write_private(&file, "listen = \"127.0.0.1:0\"\n");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = ferry(["agent", "--config"]).arg(&file).run().fails_with(2);
    assert!(err.contains("lets others write it"), "{err}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = ferry(["agent", "--config"]).arg(&file).run().fails_with(2);
    assert!(err.contains("needs its shared secret"), "{err}");
}

/// With etcd, readiness waits until the agent has joined the cluster, and
/// every HA setting can come from the environment alone. Its metrics show
/// the lease renewals, and a service it leads: the takeover, checkpoints
/// and their frozen time.
#[test]
fn with_etcd_the_agent_is_ready_once_it_has_joined_the_cluster() {
    require_criu();
    let dir = scratch("notify-etcd");
    let etcd = common::etcd::EtcdProc::start(dir.path(), "127.0.0.1".parse().unwrap());
    let key = dir.path().join("key");
    ferry(["keygen"]).arg(&key).run().ok();
    let notify = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    let cluster = format!("ops-{}", std::process::id());
    let store = dir.path().join("store");
    let env = [
        ("NOTIFY_SOCKET", notify.display().to_string()),
        ("FERRY_LISTEN", "127.0.0.1:0".to_string()),
        ("FERRY_KEY", key.display().to_string()),
        ("FERRY_STORE", store.display().to_string()),
        ("FERRY_ETCD", etcd.url.clone()),
        ("FERRY_CLUSTER", cluster.clone()),
        ("FERRY_NAME", "host-a".to_string()),
        ("FERRY_ADVERTISE", "127.0.0.1".to_string()),
        ("FERRY_METRICS", "127.0.0.1:0".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let agent = start_agent(&[], &env);
    assert!(
        agent
            .first_line
            .starts_with("ferry agent listening on 127.0.0.1:"),
        "{:?}",
        agent.first_line
    );
    let msg = notification(&sock);
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(msg.contains("joined the HA cluster"), "{msg:?}");
    let status = ferry([
        "ha",
        "status",
        "--json",
        "--etcd",
        &etcd.url,
        "--cluster",
        &cluster,
    ])
    .run()
    .json();
    assert!(status.to_string().contains("host-a"), "{status}");

    // An ordinary program as a service, checkpointed every 500 ms.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let ha = |sub: &str| {
        ferry(["ha", sub, "--etcd", &etcd.url, "--cluster", &cluster])
            .arg("--key")
            .arg(&key)
    };
    ha("run")
        .args_from([
            "ops-web",
            "--port",
            &port,
            "--interval-ms",
            "500",
            "--standbys",
            "0",
        ])
        .args_from([
            "--",
            "python3",
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port,
        ])
        .run()
        .ok();
    let metrics = agent.metrics.clone().unwrap();
    let checkpoints = "ferry_ha_checkpoints_total{service=\"ops-web\"}";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut seen = scrape(&metrics);
    while seen.get(checkpoints).copied().unwrap_or(0.0) < 2.0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(200));
        seen = scrape(&metrics);
    }
    assert!(
        seen.get(checkpoints).copied().unwrap_or(0.0) >= 2.0,
        "{seen:?}"
    );
    assert_eq!(
        seen.get("ferry_ha_takeovers_total{service=\"ops-web\",from=\"fresh\"}"),
        Some(&1.0),
        "{seen:?}"
    );
    assert!(
        seen["ferry_ha_checkpoint_frozen_seconds_count{service=\"ops-web\"}"] >= 2.0,
        "{seen:?}"
    );
    assert!(
        seen["ferry_ha_lease_renewal_seconds_count"] >= 1.0,
        "{seen:?}"
    );
    let served = || std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok();
    assert!(served(), "the service does not answer");
    // Its stdout and stderr are kept by the agent.
    let (head, _) = http_get(&format!("127.0.0.1:{port}"), "/ferry-log-probe");
    assert!(head.starts_with("HTTP/1.0 404"), "{head}");
    let log = std::path::PathBuf::from(format!("/var/log/ferry/{cluster}/ops-web.log"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let logged = || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("GET /ferry-log-probe"));
    while !logged() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        logged(),
        "{}: {:?}",
        log.display(),
        std::fs::read_to_string(&log)
    );

    // ha stop ends the copy; ha start brings it back; ha rm removes it all.
    let out = ha("stop").arg("ops-web").run().ok();
    assert!(out.contains("stopped"), "{out}");
    assert!(!served(), "the stopped service still answers");
    let text = ha("status").run().ok();
    assert!(text.contains("STOPPED"), "{text}");
    ha("start").arg("ops-web").run().ok();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !served() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(served(), "the started service does not answer");
    ha("rm").arg("ops-web").run().ok();
    assert!(!served(), "the removed service still answers");
    let status = ha("status").args_from(["--json"]).run().json();
    assert!(status["services"].get("ops-web").is_none(), "{status}");
    let held = store.join("ha").join("ops-web");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while held.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!held.exists(), "the agent kept {}", held.display());
    let _ = std::fs::remove_dir_all(format!("/var/log/ferry/{cluster}"));
}

/// `--metrics`: a migration received shows in the counters and phase
/// histograms a Prometheus scrape reads; anything but GET /metrics is
/// refused.
#[test]
fn the_agent_serves_prometheus_metrics_of_the_migrations_it_receives() {
    require_criu();
    let dir = scratch("metrics");
    let key = dir.path().join("key");
    ferry(["keygen"]).arg(&key).run().ok();
    let store = dir.path().join("store");
    let agent = start_agent(
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--store-max",
            "1M",
            "--key",
            &key.display().to_string(),
            "--store",
            &store.display().to_string(),
        ],
        &[],
    );
    let addr = agent
        .first_line
        .trim()
        .strip_prefix("ferry agent listening on ")
        .unwrap()
        .to_string();
    let metrics = agent.metrics.clone().unwrap();
    let before = scrape(&metrics);
    assert_eq!(
        before.get("ferry_sessions_active"),
        Some(&0.0),
        "{before:?}"
    );

    let mut p = common::program::FileCounter::start(dir.path(), 0);
    ferry([
        "migrate",
        "--shell-job",
        "--pid",
        &p.pid.to_string(),
        "--to",
        &addr,
    ])
    .arg("--key")
    .arg(&key)
    .run()
    .ok();
    p.reap_shell();
    let after = scrape(&metrics);
    assert_eq!(
        after.get("ferry_migrations_total{outcome=\"committed\"}"),
        Some(&1.0),
        "{after:?}"
    );
    assert_eq!(
        after.get("ferry_migration_phase_seconds_count{phase=\"restore\"}"),
        Some(&1.0),
        "{after:?}"
    );
    assert!(after["ferry_migration_phase_seconds_sum{phase=\"session\"}"] > 0.0);
    assert_eq!(
        after.get("ferry_migration_phase_seconds_count{phase=\"final\"}"),
        Some(&1.0),
        "{after:?}"
    );
    assert!(
        after["ferry_migration_received_bytes_total"] > 0.0,
        "{after:?}"
    );
    assert!(after["ferry_page_store_pages"] > 0.0, "{after:?}");
    let (head, _) = http_get(&metrics, "/secrets");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(p.counts_on(), "the moved program does not count on");

    // --store-max 1M: once idle, the store keeps its newest half (checked
    // every 10 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let pages = || scrape(&metrics)["ferry_page_store_pages"];
    while pages() > 128.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert!(
        pages() <= 128.0,
        "the store was not compacted: {} pages",
        pages()
    );
    let file = std::fs::metadata(store.join("pages.dat")).unwrap().len();
    assert!(file <= 512 * 1024, "pages.dat holds {file} bytes");
}
