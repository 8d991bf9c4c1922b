//! GPU awareness on this host (no GPU, no NVML): `check --gpu` says so and
//! succeeds, and a process holding an NVIDIA device file is refused unless
//! `--ignore-gpu`, whose checkpoint then records the lost GPU state.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn check_gpu_reports_no_nvml_plainly_and_succeeds() {
    let out = ferry(["check", "--gpu"]).run();
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    let r = ferry(["check", "--gpu", "--json"]).json();
    match r["status"].as_str() {
        Some("unavailable") => {
            assert!(r["reason"].as_str().unwrap().contains("NVML"), "{r}");
            assert!(out.stdout().starts_with("No GPU here"), "{}", out.stdout());
        }
        Some("available") => assert!(r["devices"].is_array(), "{r}"),
        other => panic!("unexpected status {other:?}: {r}"),
    }
}

/// A process in a session of its own holding `path` open.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hold(path: &std::path::Path) -> Holder {
    let child = Command::new("setsid")
        .args(["sh", "-c"])
        .arg(format!("exec 3<{}; exec sleep 60", path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn holder");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let holds = std::fs::read_link(format!("/proc/{pid}/fd/3")).is_ok_and(|t| t == path);
        let is_sleep =
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep");
        if holds && is_sleep {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "holder never opened {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Holder(child)
}

/// A stand-in NVIDIA device node path, removed when dropped.
struct FakeDevice(std::path::PathBuf);

impl Drop for FakeDevice {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_gpu_holding_process_is_refused_unless_ignore_gpu() {
    require_criu();
    let dev = FakeDevice(format!("/dev/nvidia-ferry-test-{}", std::process::id()).into());
    std::fs::write(&dev.0, b"").unwrap();
    let h = hold(&dev.0);
    let pid = h.0.id().to_string();
    let dir = scratch("gpu");
    let imgs = images(dir.path());
    let err = ferry(["dump", "-R", "-t", &pid, "-D"])
        .arg(&imgs)
        .fails_with(4);
    assert!(
        err.contains(&format!("pid {pid} holds {}", dev.0.display())),
        "{err}"
    );
    assert!(
        err.contains("cuda-checkpoint") && err.contains("--ignore-gpu"),
        "{err}"
    );
    assert!(err.contains("nothing was frozen"), "{err}");
    assert!(ferry_image::process::is_alive(h.0.id() as i32));

    let out = ferry(["dump", "-R", "--ignore-gpu", "-t", &pid, "-D"])
        .arg(&imgs)
        .run();
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    assert!(
        out.stderr().contains("--ignore-gpu"),
        "not loud: {}",
        out.stderr()
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(imgs.join("ferry-gpu.json")).unwrap())
            .unwrap();
    assert_eq!(record["carried_by"], "ignored");
    assert_eq!(record["pids"][0].as_i64().unwrap().to_string(), pid);

    let a = dir.path().join("gpu.ferry");
    ferry(["pack"]).arg(&imgs).arg(&a).ok();
    let r = ferry(["inspect", "--json"]).arg(&a).json();
    assert_eq!(r["gpu"]["carried_by"], "ignored", "{r}");
    let human = ferry(["inspect"]).arg(&a).ok();
    assert!(human.contains("GPU state:"), "{human}");
}

#[test]
fn a_checkpoint_with_gpu_state_is_not_restored_on_a_host_without_its_gpus() {
    require_criu();
    let dir = scratch("gpu-restore");
    let mut w = start_workload(dir.path(), 4);
    let imgs = images(dir.path());
    ferry(["dump", "-t", &w.pid().to_string(), "-D"])
        .arg(&imgs)
        .ok();
    assert!(w.reap(Duration::from_secs(10)).unwrap());
    // As a dump on an H100 host carried by cuda-checkpoint would record it.
    let record = serde_json::json!({
        "pids": [w.pid()], "model": "NVIDIA H100 80GB HBM3", "count": 1,
        "uuids": ["GPU-00000000-aaaa-bbbb-cccc-dddddddddddd"],
        "memory_in_use": [["GPU-00000000-aaaa-bbbb-cccc-dddddddddddd", 32212254720u64]],
        "driver_version": "550.54.15", "cuda_version": "12.4", "carried_by": "cuda-checkpoint"
    });
    std::fs::write(imgs.join("ferry-gpu.json"), record.to_string()).unwrap();
    let err = ferry(["restore", "-D"]).arg(&imgs).fails_with(1);
    let names_gpu = err.contains("NVIDIA H100 80GB HBM3")
        && (err.contains("no usable GPU") || err.contains("this host has"));
    assert!(names_gpu, "{err}");
    assert!(err.contains("nothing was restored"), "{err}");
    assert!(!ferry_image::process::pid_in_use(w.pid()));
}
