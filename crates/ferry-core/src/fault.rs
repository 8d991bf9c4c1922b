//! Fault injection for the fault tests, compiled in only with the cargo
//! feature `fault-injection`, which the test suite turns on and a release
//! build never has. With it, and `FERRY_FAULT=<point>` in its environment,
//! a ferry process that reaches that named point says so on stderr and
//! waits there (at most [`HOLD`]), so that a test can kill it, cut its link
//! or let a timeout fire at exactly that moment. Without the feature a
//! point is an empty function.

use std::time::Duration;

/// Environment variable naming the point to stop at.
pub const ENV: &str = "FERRY_FAULT";
/// How long a process waits at its fault point, unless
/// `FERRY_FAULT_HOLD_MS` says otherwise.
#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
pub(crate) const HOLD: Duration = Duration::from_secs(60);
pub const HOLD_ENV: &str = "FERRY_FAULT_HOLD_MS";

/// Points: `agent-before-rebuild` (final copy received, nothing rebuilt),
/// `agent-before-commit` (restored and stopped, commit not yet handled),
/// `agent-after-criu-restore` (CRIU restored the tree, its end not yet
/// journaled), `agent-after-commit-journaled` (the commit journaled, the
/// tree not yet resumed),
/// `migrate-after-round-1` (source, between pre-copy rounds),
/// `hybrid-before-map` (source, the hybrid route's final map read, not
/// yet sent).
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    if armed(name) {
        eprintln!(
            "ferry: fault point {name} reached (pid {})",
            std::process::id()
        );
        let hold = std::env::var(HOLD_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(HOLD, Duration::from_millis);
        std::thread::sleep(hold.min(HOLD));
    }
}

/// Without the `fault-injection` feature: nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// Whether the failure `name` is to be injected here (`FERRY_FAULT=<name>`):
/// for failures no outside action can cause at a precise moment. Failures:
/// `migrate-capture-fails` (source: reading a pages image from CRIU's pipe
/// fails after its first block), `post-copy-read-fails` (source: reading
/// the pages a post-copy destination asks for fails after the commit),
/// `hybrid-map-withheld` (source: the hybrid route's final map is never
/// sent).
#[cfg(feature = "fault-injection")]
pub fn fails(name: &str) -> bool {
    let armed = armed(name);
    if armed {
        eprintln!("ferry: fault {name} injected (pid {})", std::process::id());
    }
    armed
}

/// Without the `fault-injection` feature: never.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fails(_name: &str) -> bool {
    false
}

#[cfg(feature = "fault-injection")]
fn armed(name: &str) -> bool {
    std::env::var(ENV).is_ok_and(|v| v == name)
}
