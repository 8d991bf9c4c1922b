//! CRIU's own dump and restore options, under CRIU's names, for `dump`,
//! `restore` and `migrate` (what CRIU's RPC carries), and `--criu-config`
//! for anything else (CRIU's RPC `config_file`, as runc passes one).

use std::path::PathBuf;

use clap::Args;

use super::CliError;
use ferry_criu::options::{cpu_cap, parse_size, CgroupMode, FileValidation, NetworkLock};
use ferry_criu::CriuOptions;

#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "CRIU options (passed to CRIU as `criu` takes them)")]
pub struct CriuOptionArgs {
    /// Dump and restore cgroups (MODE: none, props, soft, full, strict,
    /// ignore; bare: CRIU's default).
    #[arg(long, value_name = "MODE", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    pub manage_cgroups: Option<String>,
    /// Restore cgroups under this root: [CONTROLLER:]PATH.
    #[arg(long, value_name = "[CTRL:]PATH")]
    pub cgroup_root: Vec<String>,
    /// cgroup properties to restore (YAML/JSON text).
    #[arg(long, value_name = "TEXT")]
    pub cgroup_props: Option<String>,
    /// cgroup properties to restore, from a file.
    #[arg(long, value_name = "FILE")]
    pub cgroup_props_file: Option<String>,
    /// A cgroup controller to dump (repeatable).
    #[arg(long, value_name = "CTRL")]
    pub cgroup_dump_controller: Vec<String>,
    /// Where CRIU mounts the cgroup yard.
    #[arg(long, value_name = "PATH")]
    pub cgroup_yard: Option<String>,
    /// Freeze the tree through this freezer cgroup.
    #[arg(long, value_name = "PATH")]
    pub freeze_cgroup: Option<String>,
    /// Allow link remapping of unlinked files still open.
    #[arg(long)]
    pub link_remap: bool,
    /// Dump devices by path where their device numbers are gone.
    #[arg(long)]
    pub evasive_devices: bool,
    /// Always build the inotify/fanotify irmap.
    #[arg(long)]
    pub force_irmap: bool,
    /// Where to look for inotify/fanotify watched files (repeatable).
    #[arg(long, value_name = "PATH")]
    pub irmap_scan_path: Vec<String>,
    /// Largest deleted file kept in the images (bytes; K, M, G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub ghost_limit: Option<u32>,
    /// Dump ghost files' holes sparsely (FIEMAP).
    #[arg(long, conflicts_with = "no_ghost_fiemap")]
    pub ghost_fiemap: bool,
    /// Do not use FIEMAP for ghost files.
    #[arg(long)]
    pub no_ghost_fiemap: bool,
    /// An external resource (CRIU syntax, e.g. `mnt[KEY]:VAL`; repeatable).
    #[arg(long, value_name = "RES")]
    pub external: Vec<String>,
    /// An external mount, KEY:VAL, or `auto` (repeatable).
    #[arg(short = 'M', long, value_name = "KEY:VAL|auto")]
    pub ext_mount_map: Vec<String>,
    /// Allow external mounts with sharing.
    #[arg(long = "enable-external-sharing")]
    pub ext_sharing: bool,
    /// Allow external mounts with masters.
    #[arg(long = "enable-external-masters")]
    pub ext_masters: bool,
    /// A mount point to skip (repeatable).
    #[arg(long, value_name = "PATH")]
    pub skip_mnt: Vec<String>,
    /// Filesystems to dump the contents of (comma-separated).
    #[arg(long, value_name = "FS", value_delimiter = ',')]
    pub enable_fs: Vec<String>,
    /// Dump this namespace empty: `net`.
    #[arg(long, value_name = "NS", value_parser = ["net"])]
    pub empty_ns: Option<String>,
    /// Leave out TCP connections not yet accepted.
    #[arg(long)]
    pub skip_in_flight: bool,
    /// Restore TCP connections closed.
    #[arg(long)]
    pub tcp_close: bool,
    /// Skip sysctls the kernel does not have.
    #[arg(long)]
    pub weak_sysctls: bool,
    /// How CRIU locks the network: iptables, nftables or skip.
    #[arg(long, value_name = "METHOD", value_parser = NetworkLock::parse)]
    pub network_lock: Option<NetworkLock>,
    /// LSM profile to restore with (TYPE:NAME).
    #[arg(long, value_name = "PROFILE")]
    pub lsm_profile: Option<String>,
    /// LSM mount context for restored mounts.
    #[arg(long, value_name = "CONTEXT")]
    pub lsm_mount_context: Option<String>,
    /// Skip checking files' access modes on restore.
    #[arg(long)]
    pub skip_file_rwx_check: bool,
    /// Restore mount namespaces the pre-4.0 way.
    #[arg(long)]
    pub mntns_compat_mode: bool,
    /// Run CRIU without root (CAP_CHECKPOINT_RESTORE).
    #[arg(long)]
    pub unprivileged: bool,
    /// Have CRIU print its statistics too.
    #[arg(long)]
    pub display_stats: bool,
    /// Allow dumping uprobes VMAs.
    #[arg(long)]
    pub allow_uprobes: bool,
    /// How files are validated on restore: filesize or buildid.
    #[arg(long, value_name = "METHOD", value_parser = FileValidation::parse)]
    pub file_validation: Option<FileValidation>,
    /// CPU capabilities to check (fpu, cpu, ins, all, none; bare: all).
    #[arg(long, value_name = "CAPS", num_args = 0..=1, require_equals = true, default_missing_value = "all", value_parser = cpu_cap::parse)]
    pub cpu_cap: Option<u32>,
    /// The tree's root directory.
    #[arg(short = 'r', long, value_name = "PATH")]
    pub root: Option<String>,
    /// Punch restored pages out of the images (they are destroyed).
    #[arg(long)]
    pub auto_dedup: bool,
    /// A veth pair to restore, IN=OUT (repeatable).
    #[arg(long, value_name = "IN=OUT")]
    pub veth_pair: Vec<String>,
    /// Restore into an existing namespace, NS:FILE[,EXTRA] (repeatable).
    #[arg(short = 'J', long, value_name = "NS:FILE")]
    pub join_ns: Vec<String>,
    /// A descriptor ferry was started with stands for a resource on
    /// restore: fd[N]:RES (CRIU's syntax; repeatable).
    #[arg(long, value_name = "fd[N]:RES")]
    pub inherit_fd: Vec<String>,
    /// Let CRIU open the master of an orphan pty (as runc does).
    #[arg(long)]
    pub orphan_pts_master: bool,
    /// A command CRIU runs after the restore (its words, space-separated).
    #[arg(long, value_name = "COMMAND")]
    pub exec_cmd: Option<String>,
    /// A CRIU configuration file (criu.conf syntax) for any option ferry
    /// does not name; CRIU applies it over everything else.
    #[arg(long, value_name = "FILE", env = "FERRY_CRIU_CONFIG")]
    pub criu_config: Option<PathBuf>,
}

fn bad(what: &str, value: &str, want: &str) -> CliError {
    CliError::Usage(format!("--{what} {value}: expected {want}"))
}

impl CriuOptionArgs {
    /// The options as ferry's CRIU client takes them.
    pub fn options(&self) -> Result<CriuOptions, CliError> {
        let manage_cgroups = match self.manage_cgroups.as_deref() {
            None => None,
            Some("") => Some(None),
            Some(m) => Some(Some(CgroupMode::parse(m).map_err(CliError::Usage)?)),
        };
        let cgroup_root = self
            .cgroup_root
            .iter()
            .map(|r| match r.split_once(':') {
                Some((ctrl, path)) => (Some(ctrl.to_string()), path.to_string()),
                None => (None, r.clone()),
            })
            .collect();
        let mut ext_mount_map = Vec::new();
        let mut auto_ext_mnt = false;
        for m in &self.ext_mount_map {
            match m.split_once(':') {
                _ if m == "auto" => auto_ext_mnt = true,
                Some((k, v)) if !k.is_empty() && !v.is_empty() => {
                    ext_mount_map.push((k.to_string(), v.to_string()))
                }
                _ => return Err(bad("ext-mount-map", m, "KEY:VAL or auto")),
            }
        }
        let veth_pairs = self
            .veth_pair
            .iter()
            .map(|p| match p.split_once('=') {
                Some((i, o)) if !i.is_empty() && !o.is_empty() => {
                    Ok((i.to_string(), o.to_string()))
                }
                _ => Err(bad("veth-pair", p, "IN=OUT")),
            })
            .collect::<Result<_, _>>()?;
        let join_ns = self
            .join_ns
            .iter()
            .map(|j| {
                let (ns, rest) = j
                    .split_once(':')
                    .ok_or_else(|| bad("join-ns", j, "NS:FILE[,EXTRA]"))?;
                let (file, extra) = match rest.split_once(',') {
                    Some((f, e)) => (f, Some(e.to_string())),
                    None => (rest, None),
                };
                Ok((ns.to_string(), file.to_string(), extra))
            })
            .collect::<Result<_, CliError>>()?;
        let inherit_fd = self
            .inherit_fd
            .iter()
            .map(|spec| {
                let parsed = spec
                    .strip_prefix("fd[")
                    .and_then(|rest| rest.split_once("]:"))
                    .and_then(|(n, res)| Some((n.parse::<i32>().ok()?, res)));
                match parsed {
                    Some((fd, res)) if fd > 2 && !res.is_empty() => {
                        // CRIU (our child) inherits it: it must be open here.
                        std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).map_err(|_| {
                            CliError::Usage(format!(
                                "--inherit-fd {spec}: descriptor {fd} is not open in ferry"
                            ))
                        })?;
                        Ok((fd, res.to_string()))
                    }
                    _ => Err(bad("inherit-fd", spec, "fd[N]:RESOURCE with N > 2")),
                }
            })
            .collect::<Result<Vec<_>, CliError>>()?;
        if let Some(f) = &self.criu_config {
            // CRIU reads it; refuse early, with the path, when it cannot.
            std::fs::metadata(f)
                .map_err(|e| CliError::Usage(format!("--criu-config {}: {e}", f.display())))?;
        }
        Ok(CriuOptions {
            manage_cgroups,
            cgroup_root,
            cgroup_props: self.cgroup_props.clone(),
            cgroup_props_file: self.cgroup_props_file.clone(),
            cgroup_dump_controller: self.cgroup_dump_controller.clone(),
            cgroup_yard: self.cgroup_yard.clone(),
            freeze_cgroup: self.freeze_cgroup.clone(),
            link_remap: self.link_remap,
            evasive_devices: self.evasive_devices,
            force_irmap: self.force_irmap,
            irmap_scan_paths: self.irmap_scan_path.clone(),
            ghost_limit: self.ghost_limit,
            ghost_fiemap: match (self.ghost_fiemap, self.no_ghost_fiemap) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            external: self.external.clone(),
            ext_mount_map,
            auto_ext_mnt,
            ext_sharing: self.ext_sharing,
            ext_masters: self.ext_masters,
            skip_mnt: self.skip_mnt.clone(),
            enable_fs: self.enable_fs.clone(),
            empty_ns_net: self.empty_ns.is_some(),
            timeout: None,
            skip_in_flight: self.skip_in_flight,
            tcp_close: self.tcp_close,
            weak_sysctls: self.weak_sysctls,
            network_lock: self.network_lock,
            lsm_profile: self.lsm_profile.clone(),
            lsm_mount_context: self.lsm_mount_context.clone(),
            skip_file_rwx_check: self.skip_file_rwx_check,
            mntns_compat_mode: self.mntns_compat_mode,
            unprivileged: self.unprivileged,
            display_stats: self.display_stats,
            allow_uprobes: self.allow_uprobes,
            file_validation: self.file_validation,
            cpu_cap: self.cpu_cap,
            root: self.root.clone(),
            auto_dedup: self.auto_dedup,
            veth_pairs,
            join_ns,
            exec_cmd: self
                .exec_cmd
                .as_deref()
                .map(|c| c.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            config_file: self.criu_config.clone(),
            inherit_fd,
            orphan_pts_master: self.orphan_pts_master,
        })
    }
}

impl CriuOptionArgs {
    /// The restore options a migration carries to the destination.
    pub fn restore_flags(&self) -> ferry_transport::msg::CriuRestoreFlags {
        ferry_transport::msg::CriuRestoreFlags {
            manage_cgroups: self.manage_cgroups.clone(),
            tcp_close: self.tcp_close,
            weak_sysctls: self.weak_sysctls,
            network_lock: self.network_lock.map(|m| m.name().to_string()),
            file_validation: self.file_validation.map(|v| v.name().to_string()),
            skip_file_rwx_check: self.skip_file_rwx_check,
            mntns_compat_mode: self.mntns_compat_mode,
            lsm_profile: self.lsm_profile.clone(),
        }
    }
}

/// CRIU's `--timeout` (seconds to collect the tree), for `dump` and
/// `restore` (`migrate --timeout` is ferry's wait for the destination).
#[derive(Debug, Clone, Default, Args)]
pub struct CriuTimeoutArg {
    /// Seconds CRIU may take to collect the tree (CRIU's --timeout).
    #[arg(
        long = "timeout",
        value_name = "SECONDS",
        help_heading = "CRIU options (passed to CRIU as `criu` takes them)"
    )]
    pub criu_timeout: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        o: CriuOptionArgs,
    }

    #[test]
    fn criu_words_parse() {
        let t = T::try_parse_from([
            "t",
            "--manage-cgroups=soft",
            "--ext-mount-map",
            "/data:vol",
            "--ext-mount-map",
            "auto",
            "--ghost-limit",
            "4M",
            "--network-lock",
            "skip",
            "--cpu-cap",
            "--join-ns",
            "net:/proc/1/ns/net",
        ])
        .unwrap();
        let o = t.o.options().unwrap();
        assert_eq!(o.manage_cgroups, Some(Some(CgroupMode::Soft)));
        assert_eq!(o.ext_mount_map, vec![("/data".into(), "vol".into())]);
        assert!(o.auto_ext_mnt);
        assert_eq!(o.ghost_limit, Some(4 << 20));
        assert_eq!(o.cpu_cap, Some(cpu_cap::ALL));
        assert_eq!(o.join_ns[0].1, "/proc/1/ns/net");
        let bare = T::try_parse_from(["t", "--manage-cgroups"]).unwrap();
        assert_eq!(bare.o.options().unwrap().manage_cgroups, Some(None));
        assert!(T::try_parse_from(["t", "--network-lock", "pf"]).is_err());
        let bad = T::try_parse_from(["t", "--veth-pair", "eth0"]).unwrap();
        assert!(bad.o.options().is_err());
    }
}
