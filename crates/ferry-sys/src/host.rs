//! Who this host is, as ferry tells hosts apart: its name, its kernel's
//! boot id, and the tools on its `$PATH`.

use std::path::PathBuf;

/// This host's name ("unknown" when it has none that is UTF-8).
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}

/// This kernel's boot id (empty when it cannot be read): equal on both
/// sides suggests one machine (one pid space), as when lab "hosts" are
/// network namespaces; it does not prove it (VMs cloned from one snapshot
/// share it).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The first file called `name` in `$PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Memory the kernel says is available for new allocations without
/// swapping (`MemAvailable` in /proc/meminfo), in bytes.
pub fn mem_available() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// All the memory this host has, RAM and swap (`MemTotal` + `SwapTotal`
/// in /proc/meminfo), in bytes.
pub fn mem_total_with_swap() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    Some((field("MemTotal:")? + field("SwapTotal:").unwrap_or(0)) * 1024)
}
