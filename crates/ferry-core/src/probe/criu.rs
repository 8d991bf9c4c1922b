//! Is CRIU there, which version, which features, does its own check pass?

use serde::Serialize;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_criu::{Criu, CriuError, DumpRequest, Features, NoHooks};

/// The oldest CRIU ferry is built and tested against. CRIU 4.1 cannot dump
/// TCP or UDP sockets on kernels >= 6.16 (SO_PASSCRED on inet sockets now
/// fails with EOPNOTSUPP); 4.2 can.
pub const MIN_TESTED_VERSION_CODE: i64 = 4_02_00;

/// The hidden `ferry` subcommand that holds a UDP socket for the probe.
pub(crate) const HOLDER_COMMAND: &str = "probe-socket-holder";
/// How long the holder lives if nobody kills it.
const HOLDER_LIFETIME: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize)]
pub struct CriuProbe {
    /// Binary path or service socket.
    pub endpoint: Option<String>,
    pub version: Option<String>,
    pub version_code: Option<i64>,
    pub features: Option<Features>,
    /// CRIU's own CHECK passed.
    pub check_passed: bool,
    /// CRIU could dump (leave running) a process holding a UDP socket.
    pub inet_sockets: Option<bool>,
    /// Why it could not, in CRIU's words.
    pub inet_sockets_detail: Option<String>,
    /// ferry can dump and restore with this CRIU.
    pub usable: bool,
    /// Why CRIU is not usable, or what is doubtful about it.
    pub problems: Vec<String>,
    /// What to do about the problems.
    pub remedy: Option<String>,
}

const REMEDY_INSTALL: &str = "run scripts/setup.sh as root: it installs CRIU >= 4.2 (the distribution's package where it is new enough, otherwise Debian testing's in a private prefix with a `criu` wrapper on PATH)";

impl CriuProbe {
    pub fn run(criu: Result<Criu, CriuError>) -> CriuProbe {
        let mut probe = CriuProbe {
            endpoint: None,
            version: None,
            version_code: None,
            features: None,
            check_passed: false,
            inet_sockets: None,
            inet_sockets_detail: None,
            usable: false,
            problems: Vec::new(),
            remedy: None,
        };
        let criu = match criu {
            Ok(c) => c,
            Err(e) => {
                probe.problems.push(e.to_string());
                probe.remedy = Some(REMEDY_INSTALL.into());
                return probe;
            }
        };
        probe.endpoint = Some(criu.describe());
        match criu.version() {
            Ok(v) => {
                if v.code() < MIN_TESTED_VERSION_CODE {
                    probe.problems.push(format!(
                        "CRIU {v} is older than 4.2, the version ferry is tested with"
                    ));
                }
                probe.version_code = Some(v.code());
                probe.version = Some(v.to_string());
            }
            Err(e) => {
                probe
                    .problems
                    .push(format!("CRIU does not answer VERSION: {}", chain(&e)));
                probe.remedy = Some(REMEDY_INSTALL.into());
                return probe;
            }
        }
        match criu.features() {
            Ok(f) => probe.features = Some(f),
            Err(e) => probe
                .problems
                .push(format!("CRIU does not answer FEATURE_CHECK: {}", chain(&e))),
        }
        match criu.check() {
            Ok(()) => probe.check_passed = true,
            Err(e) => {
                probe.problems.push(format!(
                    "CRIU's own check fails on this kernel: {}",
                    chain(&e)
                ));
                probe.remedy = Some(REMEDY_INSTALL.into());
            }
        }
        probe.usable = probe.check_passed;
        if probe.usable {
            match inet_socket_dump(&criu) {
                Ok(()) => probe.inet_sockets = Some(true),
                Err(detail) => {
                    probe.inet_sockets = Some(false);
                    probe.problems.push(format!(
                        "CRIU cannot dump a process holding a UDP socket here: {detail}"
                    ));
                    probe.remedy = Some(REMEDY_INSTALL.into());
                    probe.inet_sockets_detail = Some(detail);
                }
            }
        }
        probe
    }
}

/// The hidden holder command: binds a UDP socket on loopback and waits to
/// be dumped and killed.
pub fn hold_inet_socket() -> std::io::Result<()> {
    let _ = nix::unistd::setsid();
    let _sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    std::thread::sleep(HOLDER_LIFETIME);
    Ok(())
}

/// Dumps (leaving it running) a child holding a UDP socket.
fn inet_socket_dump(criu: &Criu) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg(HOLDER_COMMAND)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let pid = child.id() as i32;
    let result = (|| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !holds_socket(pid) {
            if Instant::now() > deadline {
                return Err("the probe process never opened its socket".to_string());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let dir = tempfile::Builder::new()
            .prefix("ferry-probe-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let req = DumpRequest {
            leave_running: true,
            ..DumpRequest::new(pid, dir.path().join("images"))
        };
        std::fs::create_dir(&req.images_dir).map_err(|e| e.to_string())?;
        criu.dump(&req, &mut NoHooks).map(|_| ()).map_err(|e| {
            e.log_errors()
                .first()
                .cloned()
                .unwrap_or_else(|| e.to_string())
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn holds_socket(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten().any(|f| {
            std::fs::read_link(f.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
        })
    })
}

fn chain(e: &CriuError) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    for line in e.log_errors() {
        s.push_str("\n    criu: ");
        s.push_str(line);
    }
    s
}
