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
/// share it): [`KernelProof`] does.
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

/// Name of the memory file that carries a kernel proof's nonce.
const PROOF_NAME: &str = "ferry-kernel-proof";
/// Bytes of a proof's nonce.
pub const PROOF_NONCE_BYTES: usize = 32;

/// A challenge that only a process on this very kernel can answer: a
/// random nonce in an anonymous memory file (memfd) this process holds
/// open. A peer that claims the same kernel (the same boot id) reads it
/// through `/proc/PID/fd/FD`; on another kernel, even one booted from the
/// same snapshot (same boot id), that path names some other file or none.
#[derive(Debug)]
pub struct KernelProof {
    file: std::fs::File,
    nonce: [u8; PROOF_NONCE_BYTES],
}

impl KernelProof {
    pub fn new() -> std::io::Result<KernelProof> {
        use std::io::Write;
        let nonce = crate::random_bytes::<PROOF_NONCE_BYTES>()?;
        let fd = nix::sys::memfd::memfd_create(PROOF_NAME, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&nonce)?;
        Ok(KernelProof { file, nonce })
    }

    /// Where a peer on this kernel finds it: this process's pid and the
    /// file's descriptor.
    pub fn locator(&self) -> (u32, i32) {
        use std::os::fd::AsRawFd;
        (std::process::id(), self.file.as_raw_fd())
    }

    pub fn nonce(&self) -> &[u8; PROOF_NONCE_BYTES] {
        &self.nonce
    }
}

/// Reads the nonce of a [`KernelProof`] held by process `pid` as
/// descriptor `fd` on this kernel: only a memory file of that name is
/// read (opened without blocking, at most the nonce's size), so a peer
/// cannot point this at a pipe, a device or another file.
pub fn read_kernel_proof(pid: u32, fd: i32) -> std::io::Result<[u8; PROOF_NONCE_BYTES]> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let path = format!("/proc/{pid}/fd/{fd}");
    let target = std::fs::read_link(&path)?;
    let expected = format!("/memfd:{PROOF_NAME}");
    if !target.to_string_lossy().starts_with(&expected) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{path} is {}, not a kernel proof", target.display()),
        ));
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)?;
    let mut nonce = [0u8; PROOF_NONCE_BYTES];
    file.read_exact(&mut nonce)?;
    Ok(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_proof_is_read_back_and_nothing_else_is() {
        let proof = KernelProof::new().unwrap();
        let (pid, fd) = proof.locator();
        assert_eq!(&read_kernel_proof(pid, fd).unwrap(), proof.nonce());
        let other = std::fs::File::open("/dev/null").unwrap();
        let e = read_kernel_proof(pid, std::os::fd::AsRawFd::as_raw_fd(&other)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        assert!(read_kernel_proof(pid, 100_000).is_err());
    }
}
