//! Container engines and coordination tools ferry works with.

use std::path::Path;
use std::process::{Command, Stdio};

use ferry_sys::which;
use serde::Serialize;

/// Docker's API socket: present when the engine is running.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

#[derive(Debug, Clone, Serialize)]
pub struct ToolProbe {
    pub name: String,
    pub path: Option<String>,
    pub version: Option<String>,
    /// For daemons: whether one is running and reachable.
    pub running: Option<bool>,
}

/// (name, version flag) of each tool.
const TOOLS: &[(&str, &str)] = &[
    ("runc", "--version"),
    ("dockerd", "--version"),
    ("podman", "--version"),
    ("etcd", "--version"),
];

pub(crate) fn probe_all() -> Vec<ToolProbe> {
    TOOLS
        .iter()
        .map(|(name, flag)| {
            let path = which(name);
            let version = path.as_deref().and_then(|p| version_line(p, flag));
            let running = (*name == "dockerd").then(|| Path::new(DOCKER_SOCKET).exists());
            ToolProbe {
                name: name.to_string(),
                path: path.map(|p| p.display().to_string()),
                version,
                running,
            }
        })
        .collect()
}

fn version_line(path: &Path, flag: &str) -> Option<String> {
    let out = Command::new(path)
        .arg(flag)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}
