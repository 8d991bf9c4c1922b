//! CRIU's own options, as a user names them, passed through to CRIU: into
//! the RPC request ([`CriuOptions::apply`]) or, for the requests ferry runs
//! as `criu` itself (streamed images), onto its command line
//! ([`CriuOptions::args`]). ferry's own choices (images, logs, modes,
//! container settings) are made first; these come on top, as CRIU would
//! apply them.

use std::ffi::OsString;
use std::path::PathBuf;

use criu_proto as pb;

/// `--manage-cgroups=MODE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    Ignore,
    None,
    Props,
    Soft,
    Full,
    Strict,
}

impl CgroupMode {
    pub fn parse(s: &str) -> Result<CgroupMode, String> {
        Ok(match s {
            "ignore" => CgroupMode::Ignore,
            "none" => CgroupMode::None,
            "props" => CgroupMode::Props,
            "soft" => CgroupMode::Soft,
            "full" => CgroupMode::Full,
            "strict" => CgroupMode::Strict,
            _ => {
                return Err(format!(
                    "unknown cgroup mode '{s}' (ignore, none, props, soft, full, strict)"
                ))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            CgroupMode::Ignore => "ignore",
            CgroupMode::None => "none",
            CgroupMode::Props => "props",
            CgroupMode::Soft => "soft",
            CgroupMode::Full => "full",
            CgroupMode::Strict => "strict",
        }
    }

    fn proto(self) -> pb::CriuCgMode {
        match self {
            CgroupMode::Ignore => pb::CriuCgMode::Ignore,
            CgroupMode::None => pb::CriuCgMode::CgNone,
            CgroupMode::Props => pb::CriuCgMode::Props,
            CgroupMode::Soft => pb::CriuCgMode::Soft,
            CgroupMode::Full => pb::CriuCgMode::Full,
            CgroupMode::Strict => pb::CriuCgMode::Strict,
        }
    }
}

/// `--network-lock METHOD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkLock {
    Iptables,
    Nftables,
    Skip,
}

impl NetworkLock {
    pub fn parse(s: &str) -> Result<NetworkLock, String> {
        Ok(match s {
            "iptables" => NetworkLock::Iptables,
            "nftables" => NetworkLock::Nftables,
            "skip" => NetworkLock::Skip,
            _ => {
                return Err(format!(
                    "unknown network lock '{s}' (iptables, nftables, skip)"
                ))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            NetworkLock::Iptables => "iptables",
            NetworkLock::Nftables => "nftables",
            NetworkLock::Skip => "skip",
        }
    }
}

/// `--file-validation METHOD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileValidation {
    FileSize,
    BuildId,
}

impl FileValidation {
    pub fn parse(s: &str) -> Result<FileValidation, String> {
        Ok(match s {
            "filesize" => FileValidation::FileSize,
            "buildid" => FileValidation::BuildId,
            _ => return Err(format!("unknown file validation '{s}' (filesize, buildid)")),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            FileValidation::FileSize => "filesize",
            FileValidation::BuildId => "buildid",
        }
    }
}

/// CRIU's `--cpu-cap` bits (criu/include/cr_options.h).
pub mod cpu_cap {
    pub const NONE: u32 = 0;
    pub const FPU: u32 = 1;
    pub const CPU: u32 = 2;
    pub const INS: u32 = 4;
    pub const ALL: u32 = FPU | CPU | INS;

    /// "fpu,ins", "all", "none" (CRIU's words).
    pub fn parse(s: &str) -> Result<u32, String> {
        s.split(',').try_fold(NONE, |mask, word| {
            Ok(mask
                | match word {
                    "none" => NONE,
                    "fpu" => FPU,
                    "cpu" => CPU,
                    "ins" => INS,
                    "all" => ALL,
                    _ => {
                        return Err(format!(
                            "unknown cpu capability '{word}' (fpu, cpu, ins, all, none)"
                        ))
                    }
                })
        })
    }
}

/// "1048576", "64K", "2M", "1G": bytes, as CRIU's `--ghost-limit` takes.
pub fn parse_size(s: &str) -> Result<u32, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("'{s}' is not a size below 4G (e.g. 1048576, 64K, 2M)"))
}

/// CRIU options a user passes through ferry, under CRIU's names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CriuOptions {
    /// `--manage-cgroups[=MODE]` (bare: CRIU's default mode).
    pub manage_cgroups: Option<Option<CgroupMode>>,
    /// `--cgroup-root [CONTROLLER:]PATH`.
    pub cgroup_root: Vec<(Option<String>, String)>,
    pub cgroup_props: Option<String>,
    pub cgroup_props_file: Option<String>,
    pub cgroup_dump_controller: Vec<String>,
    pub cgroup_yard: Option<String>,
    pub freeze_cgroup: Option<String>,
    pub link_remap: bool,
    pub evasive_devices: bool,
    pub force_irmap: bool,
    pub irmap_scan_paths: Vec<String>,
    pub ghost_limit: Option<u32>,
    /// `--ghost-fiemap` (Some(true)) or `--no-ghost-fiemap` (Some(false)).
    pub ghost_fiemap: Option<bool>,
    pub external: Vec<String>,
    /// `--ext-mount-map KEY:VAL`.
    pub ext_mount_map: Vec<(String, String)>,
    /// `--ext-mount-map auto`.
    pub auto_ext_mnt: bool,
    pub ext_sharing: bool,
    pub ext_masters: bool,
    pub skip_mnt: Vec<String>,
    pub enable_fs: Vec<String>,
    /// `--empty-ns net`.
    pub empty_ns_net: bool,
    /// `--timeout SECONDS` (collecting the tree).
    pub timeout: Option<u32>,
    pub skip_in_flight: bool,
    pub tcp_close: bool,
    pub weak_sysctls: bool,
    pub network_lock: Option<NetworkLock>,
    pub lsm_profile: Option<String>,
    pub lsm_mount_context: Option<String>,
    pub skip_file_rwx_check: bool,
    pub mntns_compat_mode: bool,
    pub unprivileged: bool,
    pub display_stats: bool,
    pub allow_uprobes: bool,
    pub file_validation: Option<FileValidation>,
    pub cpu_cap: Option<u32>,
    pub root: Option<String>,
    pub auto_dedup: bool,
    /// `--veth-pair IN=OUT`.
    pub veth_pairs: Vec<(String, String)>,
    /// `--join-ns NS:FILE[,EXTRA]`.
    pub join_ns: Vec<(String, String, Option<String>)>,
    /// `--exec-cmd`: the command CRIU runs after a restore (its words).
    pub exec_cmd: Vec<String>,
    /// `--inherit-fd fd[N]:RES`: descriptor N (open in ferry, inherited
    /// by CRIU) stands for resource RES on restore.
    pub inherit_fd: Vec<(i32, String)>,
    pub orphan_pts_master: bool,
    /// `--criu-config FILE`: a CRIU configuration file (CRIU's RPC
    /// `config_file`), read by CRIU and applied over everything else.
    pub config_file: Option<PathBuf>,
}

impl CriuOptions {
    /// Puts the options into an RPC request.
    pub fn apply(&self, o: &mut pb::CriuOpts) {
        if let Some(mode) = self.manage_cgroups {
            o.manage_cgroups = Some(true);
            if let Some(mode) = mode {
                o.manage_cgroups_mode = Some(mode.proto() as i32);
            }
        }
        o.cg_root
            .extend(self.cgroup_root.iter().map(|(ctrl, path)| pb::CgroupRoot {
                ctrl: ctrl.clone(),
                path: path.clone(),
            }));
        set(&mut o.cgroup_props, &self.cgroup_props);
        set(&mut o.cgroup_props_file, &self.cgroup_props_file);
        o.cgroup_dump_controller
            .extend(self.cgroup_dump_controller.iter().cloned());
        set(&mut o.cgroup_yard, &self.cgroup_yard);
        set(&mut o.freeze_cgroup, &self.freeze_cgroup);
        flag(&mut o.link_remap, self.link_remap);
        flag(&mut o.evasive_devices, self.evasive_devices);
        flag(&mut o.force_irmap, self.force_irmap);
        o.irmap_scan_paths
            .extend(self.irmap_scan_paths.iter().cloned());
        if let Some(n) = self.ghost_limit {
            o.ghost_limit = Some(n);
        }
        if let Some(on) = self.ghost_fiemap {
            o.ghost_fiemap = Some(on);
        }
        o.external.extend(self.external.iter().cloned());
        o.ext_mnt
            .extend(self.ext_mount_map.iter().map(|(k, v)| pb::ExtMountMap {
                key: k.clone(),
                val: v.clone(),
            }));
        flag(&mut o.auto_ext_mnt, self.auto_ext_mnt);
        flag(&mut o.ext_sharing, self.ext_sharing);
        flag(&mut o.ext_masters, self.ext_masters);
        o.skip_mnt.extend(self.skip_mnt.iter().cloned());
        o.enable_fs.extend(self.enable_fs.iter().cloned());
        if self.empty_ns_net {
            o.empty_ns = Some(o.empty_ns.unwrap_or(0) | libc::CLONE_NEWNET as u32);
        }
        if let Some(t) = self.timeout {
            o.timeout = Some(t);
        }
        flag(&mut o.tcp_skip_in_flight, self.skip_in_flight);
        flag(&mut o.tcp_close, self.tcp_close);
        flag(&mut o.weak_sysctls, self.weak_sysctls);
        if let Some(m) = self.network_lock {
            o.network_lock = Some(match m {
                NetworkLock::Iptables => pb::CriuNetworkLockMethod::Iptables,
                NetworkLock::Nftables => pb::CriuNetworkLockMethod::Nftables,
                NetworkLock::Skip => pb::CriuNetworkLockMethod::Skip,
            } as i32);
        }
        set(&mut o.lsm_profile, &self.lsm_profile);
        set(&mut o.lsm_mount_context, &self.lsm_mount_context);
        flag(&mut o.skip_file_rwx_check, self.skip_file_rwx_check);
        flag(&mut o.mntns_compat_mode, self.mntns_compat_mode);
        flag(&mut o.unprivileged, self.unprivileged);
        flag(&mut o.display_stats, self.display_stats);
        flag(&mut o.allow_uprobes, self.allow_uprobes);
        if let Some(v) = self.file_validation {
            o.file_validation_method = Some(match v {
                FileValidation::FileSize => pb::CriuFileValidationMethod::FileSize,
                FileValidation::BuildId => pb::CriuFileValidationMethod::BuildId,
            } as i32);
        }
        if let Some(c) = self.cpu_cap {
            o.cpu_cap = Some(c);
        }
        set(&mut o.root, &self.root);
        flag(&mut o.auto_dedup, self.auto_dedup);
        o.veths
            .extend(self.veth_pairs.iter().map(|(i, out)| pb::CriuVethPair {
                if_in: i.clone(),
                if_out: out.clone(),
            }));
        o.join_ns.extend(
            self.join_ns
                .iter()
                .map(|(ns, file, extra)| pb::JoinNamespace {
                    ns: ns.clone(),
                    ns_file: file.clone(),
                    extra_opt: extra.clone(),
                }),
        );
        o.exec_cmd.extend(self.exec_cmd.iter().cloned());
        o.inherit_fd
            .extend(self.inherit_fd.iter().map(|(fd, key)| pb::InheritFd {
                key: key.clone(),
                fd: *fd,
            }));
        flag(&mut o.orphan_pts_master, self.orphan_pts_master);
        if let Some(f) = &self.config_file {
            o.config_file = Some(f.display().to_string());
        }
    }

    /// The same options in CRIU's command-line words.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |words: &[&str]| a.extend(words.iter().map(OsString::from));
        match self.manage_cgroups {
            Some(Some(mode)) => push(&[&format!("--manage-cgroups={}", mode.name())]),
            Some(None) => push(&["--manage-cgroups"]),
            None => {}
        }
        for (ctrl, path) in &self.cgroup_root {
            let root = match ctrl {
                Some(c) => format!("{c}:{path}"),
                None => path.clone(),
            };
            push(&["--cgroup-root", &root]);
        }
        for (name, value) in [
            ("--cgroup-props", &self.cgroup_props),
            ("--cgroup-props-file", &self.cgroup_props_file),
            ("--cgroup-yard", &self.cgroup_yard),
            ("--freeze-cgroup", &self.freeze_cgroup),
            ("--lsm-profile", &self.lsm_profile),
            ("--lsm-mount-context", &self.lsm_mount_context),
            ("--root", &self.root),
        ] {
            if let Some(v) = value {
                push(&[name, v]);
            }
        }
        for (name, values) in [
            ("--cgroup-dump-controller", &self.cgroup_dump_controller),
            ("--irmap-scan-path", &self.irmap_scan_paths),
            ("--external", &self.external),
            ("--skip-mnt", &self.skip_mnt),
            ("--enable-fs", &self.enable_fs),
        ] {
            for v in values {
                push(&[name, v]);
            }
        }
        for (on, name) in [
            (self.link_remap, "--link-remap"),
            (self.evasive_devices, "--evasive-devices"),
            (self.force_irmap, "--force-irmap"),
            (self.ghost_fiemap == Some(true), "--ghost-fiemap"),
            (self.ghost_fiemap == Some(false), "--no-ghost-fiemap"),
            (self.auto_ext_mnt, "--ext-mount-map=auto"),
            (self.ext_sharing, "--enable-external-sharing"),
            (self.ext_masters, "--enable-external-masters"),
            (self.skip_in_flight, "--skip-in-flight"),
            (self.tcp_close, "--tcp-close"),
            (self.weak_sysctls, "--weak-sysctls"),
            (self.skip_file_rwx_check, "--skip-file-rwx-check"),
            (self.mntns_compat_mode, "--mntns-compat-mode"),
            (self.unprivileged, "--unprivileged"),
            (self.display_stats, "--display-stats"),
            (self.allow_uprobes, "--allow-uprobes"),
            (self.auto_dedup, "--auto-dedup"),
            (self.empty_ns_net, "--empty-ns=net"),
        ] {
            if on {
                push(&[name]);
            }
        }
        if let Some(n) = self.ghost_limit {
            push(&["--ghost-limit", &n.to_string()]);
        }
        for (k, v) in &self.ext_mount_map {
            push(&["--ext-mount-map", &format!("{k}:{v}")]);
        }
        if let Some(t) = self.timeout {
            push(&["--timeout", &t.to_string()]);
        }
        if let Some(m) = self.network_lock {
            push(&["--network-lock", m.name()]);
        }
        if let Some(v) = self.file_validation {
            push(&["--file-validation", v.name()]);
        }
        if let Some(c) = self.cpu_cap {
            let words: Vec<&str> = [
                (cpu_cap::FPU, "fpu"),
                (cpu_cap::CPU, "cpu"),
                (cpu_cap::INS, "ins"),
            ]
            .iter()
            .filter(|(bit, _)| c & bit != 0)
            .map(|(_, w)| *w)
            .collect();
            let caps = if words.is_empty() {
                "none".to_string()
            } else {
                words.join(",")
            };
            push(&[&format!("--cpu-cap={caps}")]);
        }
        for (i, out) in &self.veth_pairs {
            push(&["--veth-pair", &format!("{i}={out}")]);
        }
        for (ns, file, extra) in &self.join_ns {
            let spec = match extra {
                Some(e) => format!("{ns}:{file},{e}"),
                None => format!("{ns}:{file}"),
            };
            push(&["--join-ns", &spec]);
        }
        for (fd, key) in &self.inherit_fd {
            push(&["--inherit-fd", &format!("fd[{fd}]:{key}")]);
        }
        if self.orphan_pts_master {
            push(&["--orphan-pts-master"]);
        }
        if !self.exec_cmd.is_empty() {
            push(&["--exec-cmd", "--"]);
            let words: Vec<&str> = self.exec_cmd.iter().map(String::as_str).collect();
            push(&words);
        }
        if let Some(f) = &self.config_file {
            a.push("--config".into());
            a.push(f.clone().into());
        }
        a
    }
}

fn set(slot: &mut Option<String>, value: &Option<String>) {
    if let Some(v) = value {
        *slot = Some(v.clone());
    }
}

fn flag(slot: &mut Option<bool>, on: bool) {
    if on {
        *slot = Some(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_reach_the_rpc_request_under_criu_names() {
        let opts = CriuOptions {
            manage_cgroups: Some(Some(CgroupMode::Soft)),
            link_remap: true,
            ghost_limit: Some(parse_size("2M").unwrap()),
            network_lock: Some(NetworkLock::Skip),
            ext_mount_map: vec![("/data".into(), "vol".into())],
            tcp_close: true,
            file_validation: Some(FileValidation::FileSize),
            cpu_cap: Some(cpu_cap::parse("fpu,ins").unwrap()),
            config_file: Some("/etc/criu/x.conf".into()),
            inherit_fd: vec![(3, "pipe[4242]".into())],
            ..Default::default()
        };
        let mut o = pb::CriuOpts::default();
        opts.apply(&mut o);
        assert_eq!(o.manage_cgroups, Some(true));
        assert_eq!(o.manage_cgroups_mode, Some(pb::CriuCgMode::Soft as i32));
        assert_eq!(o.link_remap, Some(true));
        assert_eq!(o.ghost_limit, Some(2 << 20));
        assert_eq!(o.network_lock, Some(pb::CriuNetworkLockMethod::Skip as i32));
        assert_eq!(o.ext_mnt[0].key, "/data");
        assert_eq!(o.tcp_close, Some(true));
        assert_eq!(o.cpu_cap, Some(5));
        assert_eq!(o.config_file.as_deref(), Some("/etc/criu/x.conf"));
        assert_eq!(o.inherit_fd[0].key, "pipe[4242]");
        assert_eq!(o.inherit_fd[0].fd, 3);
        // Options not given stay CRIU's defaults.
        assert_eq!(o.evasive_devices, None);
        let args: Vec<String> = opts
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        for want in [
            "--manage-cgroups=soft",
            "--link-remap",
            "--network-lock",
            "--tcp-close",
            "--cpu-cap=fpu,ins",
            "--config",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} not in {args:?}");
        }
    }

    #[test]
    fn sizes_and_words_are_checked() {
        assert_eq!(parse_size("64K"), Ok(65536));
        assert!(parse_size("5G").is_err());
        assert!(parse_size("lots").is_err());
        assert!(CgroupMode::parse("hard").is_err());
        assert!(cpu_cap::parse("fpu,avx").is_err());
        assert_eq!(cpu_cap::parse("all"), Ok(cpu_cap::ALL));
    }
}
