//! CRIU's NOTIFY callbacks, exposed to callers as hooks.
//!
//! With `notify_scripts` set, CRIU stops at fixed points of a dump or restore
//! and sends a NOTIFY naming the point; it goes on only when the client
//! answers. A hook that fails makes ferry answer "failed", which aborts the
//! operation inside CRIU (which then resumes a dumped tree).

use std::fmt;
use std::os::fd::OwnedFd;
use std::time::Duration;

use serde::Serialize;

/// The error type hooks return.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// The points at which CRIU notifies (criu/include/action-scripts.h).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Script {
    PreDump,
    PostDump,
    PreRestore,
    PostRestore,
    NetworkLock,
    NetworkUnlock,
    SetupNamespaces,
    PostSetupNamespaces,
    PostResume,
    OrphanPtsMaster,
    /// A page server (a lazy dump's) is about to serve.
    StatusReady,
    /// A name this ferry does not know (a newer CRIU).
    Other(String),
}

impl Script {
    pub fn from_name(name: &str) -> Script {
        match name {
            "pre-dump" => Script::PreDump,
            "post-dump" => Script::PostDump,
            "pre-restore" => Script::PreRestore,
            "post-restore" => Script::PostRestore,
            "network-lock" => Script::NetworkLock,
            "network-unlock" => Script::NetworkUnlock,
            "setup-namespaces" => Script::SetupNamespaces,
            "post-setup-namespaces" => Script::PostSetupNamespaces,
            "post-resume" => Script::PostResume,
            "orphan-pts-master" => Script::OrphanPtsMaster,
            "status-ready" => Script::StatusReady,
            other => Script::Other(other.to_string()),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Script::PreDump => "pre-dump",
            Script::PostDump => "post-dump",
            Script::PreRestore => "pre-restore",
            Script::PostRestore => "post-restore",
            Script::NetworkLock => "network-lock",
            Script::NetworkUnlock => "network-unlock",
            Script::SetupNamespaces => "setup-namespaces",
            Script::PostSetupNamespaces => "post-setup-namespaces",
            Script::PostResume => "post-resume",
            Script::OrphanPtsMaster => "orphan-pts-master",
            Script::StatusReady => "status-ready",
            Script::Other(name) => name,
        }
    }
}

impl fmt::Display for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One NOTIFY from CRIU.
#[derive(Debug)]
pub struct Notification {
    pub script: Script,
    /// The pid CRIU attaches (e.g. the restored root at `setup-namespaces`).
    pub pid: Option<i32>,
    /// A descriptor sent with the notification (the pts master of
    /// `orphan-pts-master`); the hook may take it.
    pub fd: Option<OwnedFd>,
    /// Time since the request was sent.
    pub elapsed: Duration,
}

/// Code that runs at CRIU's notification points.
pub trait NotifyHook {
    fn notify(&mut self, notification: &mut Notification) -> Result<(), HookError>;
}

impl<F> NotifyHook for F
where
    F: FnMut(&mut Notification) -> Result<(), HookError>,
{
    fn notify(&mut self, notification: &mut Notification) -> Result<(), HookError> {
        self(notification)
    }
}

/// No hooks: every notification is answered "go on".
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl NotifyHook for NoHooks {
    fn notify(&mut self, _: &mut Notification) -> Result<(), HookError> {
        Ok(())
    }
}

/// The notification points a request passed, with their times since the
/// request was sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Timeline {
    pub events: Vec<TimelineEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelineEvent {
    pub script: Script,
    #[serde(rename = "at_us", serialize_with = "ferry_image::units::serde_micros")]
    pub at: Duration,
}

impl Timeline {
    /// When `script` was first notified.
    pub fn at(&self, script: &Script) -> Option<Duration> {
        self.events
            .iter()
            .find(|e| &e.script == script)
            .map(|e| e.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_names_round_trip() {
        for name in [
            "pre-dump",
            "post-dump",
            "pre-restore",
            "post-restore",
            "network-lock",
            "network-unlock",
            "setup-namespaces",
            "post-setup-namespaces",
            "post-resume",
            "orphan-pts-master",
            "something-new",
        ] {
            assert_eq!(Script::from_name(name).name(), name);
        }
    }
}
