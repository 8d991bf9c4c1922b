//! Which processes of a tree hold GPU state: NVML's process lists matched
//! against the tree's pids in every pid namespace they have (a container's
//! process is known to NVML by its host pid or, when NVML runs inside the
//! container, by its pid there), plus processes that hold `/dev/nvidia*`
//! open when NVML cannot say (no NVML here, or a context NVML misses).

use std::fs;

use serde::Serialize;

use super::GpuInventory;

/// A process of the tree and its pid in each pid namespace, outermost
/// first (`NSpid` of `/proc/PID/status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeProcess {
    pub pid: i32,
    pub ns_pids: Vec<u32>,
    /// `/dev/nvidia*` paths it holds open or mapped.
    pub gpu_devices: Vec<String>,
}

impl TreeProcess {
    /// Reads what `/proc` says of `pid`.
    pub fn read(pid: i32) -> TreeProcess {
        let ns_pids = ferry_image::process::ns_pids(pid);
        TreeProcess {
            pid,
            ns_pids,
            gpu_devices: device_files(pid),
        }
    }
}

fn device_files(pid: i32) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(t) = fs::read_link(fd.path()) {
                let t = t.to_string_lossy();
                if t.starts_with("/dev/nvidia") {
                    out.insert(t.into_owned());
                }
            }
        }
    }
    if let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) {
        for l in maps.lines() {
            if let Some(p) = l
                .split_whitespace()
                .nth(5)
                .filter(|p| p.starts_with("/dev/nvidia"))
            {
                out.insert(p.to_string());
            }
        }
    }
    out.into_iter().collect()
}

/// One process of the tree using one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuUse {
    pub pid: i32,
    /// The device, when NVML told which; `None` for an open device file only.
    pub device_index: Option<u32>,
    pub uuid: Option<String>,
    pub name: Option<String>,
    pub used_memory: Option<u64>,
    /// The device files the process holds, when that is what gave it away.
    pub device_files: Vec<String>,
}

/// The GPU uses of `tree` according to `inventory` (None: no NVML).
pub fn uses(tree: &[TreeProcess], inventory: Option<&GpuInventory>) -> Vec<GpuUse> {
    let mut out = Vec::new();
    for p in tree {
        let mut seen_by_nvml = false;
        for d in inventory.map(|i| i.devices.as_slice()).unwrap_or_default() {
            for gp in d
                .processes
                .iter()
                .filter(|gp| p.ns_pids.contains(&gp.pid) || gp.pid == p.pid as u32)
            {
                seen_by_nvml = true;
                out.push(GpuUse {
                    pid: p.pid,
                    device_index: Some(d.index),
                    uuid: Some(d.uuid.clone()),
                    name: Some(d.name.clone()),
                    used_memory: gp.used_memory,
                    device_files: p.gpu_devices.clone(),
                });
            }
        }
        // /dev/nvidiactl and the UVM device are opened by any CUDA user;
        // a process NVML does not list but that holds them still has GPU state.
        if !seen_by_nvml && !p.gpu_devices.is_empty() {
            out.push(GpuUse {
                pid: p.pid,
                device_index: None,
                uuid: None,
                name: None,
                used_memory: None,
                device_files: p.gpu_devices.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::probe::{from_source, recorded::*, GpuProbe};

    fn tree(pids: &[(i32, &[u32])]) -> Vec<TreeProcess> {
        pids.iter()
            .map(|(pid, ns)| TreeProcess {
                pid: *pid,
                ns_pids: ns.to_vec(),
                gpu_devices: vec![],
            })
            .collect()
    }

    fn inventory() -> GpuInventory {
        match from_source(&two_h100s()) {
            GpuProbe::Available(i) => i,
            GpuProbe::Unavailable { reason } => panic!("{reason}"),
        }
    }

    #[test]
    fn matches_host_pids() {
        let u = uses(&tree(&[(4242, &[4242]), (7, &[7])]), Some(&inventory()));
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].pid, 4242);
        assert_eq!(u[0].device_index, Some(0));
        assert_eq!(u[0].used_memory, Some(30 * GIB));
    }

    #[test]
    fn matches_pids_inside_a_container_namespace() {
        // Host pid 9001 is pid 4242 inside its container; NVML saw 4242.
        let u = uses(&tree(&[(9001, &[9001, 4242])]), Some(&inventory()));
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].pid, 9001);
    }

    #[test]
    fn a_tree_without_gpu_use_is_clean() {
        assert!(uses(&tree(&[(1, &[1]), (2, &[2])]), Some(&inventory())).is_empty());
        assert!(uses(&tree(&[(1, &[1])]), None).is_empty());
    }

    #[test]
    fn an_open_device_file_counts_without_nvml() {
        let mut t = tree(&[(5, &[5])]);
        t[0].gpu_devices = vec!["/dev/nvidiactl".into()];
        let u = uses(&t, None);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].device_index, None);
    }

    #[test]
    fn reads_this_process() {
        let me = TreeProcess::read(std::process::id() as i32);
        assert!(me.ns_pids.contains(&std::process::id()));
    }
}
