//! `ferry check`.

use std::io::Write;

use clap::Args;

use super::{exit, write_json, CliError};
use ferry_core::probe::HostReport;

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub criu: super::CriuArgs,
    /// Report this host's GPUs through NVML instead (devices, memory,
    /// driver, CUDA, MIG, the processes on each). No GPU is a normal state:
    /// the exit status is 0 either way.
    #[arg(long)]
    pub gpu: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &CheckArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    if args.gpu {
        let probe = ferry_core::gpu::probe();
        if args.json {
            write_json(out, &probe)?;
        } else {
            write!(out, "{}", render_gpu(&probe))?;
        }
        return Ok(exit::OK);
    }
    let report = HostReport::gather(args.criu.locate());
    if args.json {
        write_json(out, &report)?;
    } else {
        write!(out, "{}", render(&report))?;
    }
    Ok(if report.usable() {
        exit::OK
    } else {
        exit::HOST_NOT_READY
    })
}

fn render_gpu(p: &ferry_core::gpu::GpuProbe) -> String {
    use ferry_image::units::bytes;
    let Some(inv) = p.inventory() else {
        let ferry_core::gpu::GpuProbe::Unavailable { reason } = p else {
            return String::new();
        };
        return format!("No GPU here: {reason}\n");
    };
    let mut s = format!(
        "NVIDIA driver {}, CUDA {}, {} device(s)\n",
        inv.driver_version,
        inv.cuda_version.as_deref().unwrap_or("?"),
        inv.devices.len()
    );
    for d in &inv.devices {
        s += &format!(
            "  GPU {} {} {}: memory {} used of {} ({} free), MIG {}\n",
            d.index,
            d.name,
            d.uuid,
            bytes(d.memory_used),
            bytes(d.memory_total),
            bytes(d.memory_free),
            match d.mig_enabled {
                Some(true) => "on",
                Some(false) => "off",
                None => "n/a",
            }
        );
        for p in &d.processes {
            s += &format!(
                "    pid {:>8} {:?} {}\n",
                p.pid,
                p.kind,
                p.used_memory
                    .map(bytes)
                    .unwrap_or_else(|| "memory unknown".into())
            );
        }
    }
    s
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn render(r: &HostReport) -> String {
    let mut s = String::new();
    let c = &r.criu;
    s += "CRIU\n";
    s += &format!(
        "  endpoint         {}\n",
        c.endpoint.as_deref().unwrap_or("not found")
    );
    s += &format!(
        "  version          {}\n",
        c.version.as_deref().unwrap_or("unknown")
    );
    if let Some(f) = &c.features {
        s += &format!(
            "  features         mem_track {}, lazy_pages {}, pidfd_store {}\n",
            yes_no(f.mem_track),
            yes_no(f.lazy_pages),
            yes_no(f.pidfd_store)
        );
    }
    s += &format!(
        "  check            {}\n",
        if c.check_passed { "passed" } else { "FAILED" }
    );
    if let Some(ok) = c.inet_sockets {
        s += &format!(
            "  inet sockets     {}\n",
            if ok {
                "dumpable"
            } else {
                "NOT dumpable: applications holding TCP/UDP sockets cannot be checkpointed"
            }
        );
    }
    s += &format!(
        "  usable           {}\n",
        if c.usable { "yes" } else { "NO" }
    );
    for p in &c.problems {
        s += &format!("  problem          {p}\n");
    }
    if let Some(remedy) = &c.remedy {
        s += &format!("  remedy           {remedy}\n");
    }
    let k = &r.kernel;
    s += "Kernel\n";
    s += &format!("  release          {}\n", k.release);
    for (name, f, consequence) in [
        (
            "soft-dirty",
            &k.soft_dirty,
            "CRIU pre-dump/--track-mem unavailable; ferry pre-copies by reading live memory",
        ),
        ("userfaultfd", &k.userfaultfd, "no lazy restore (post-copy)"),
        (
            "PAGEMAP_SCAN",
            &k.pagemap_scan,
            "present pages found through /proc/PID/pagemap reads instead",
        ),
    ] {
        let detail = f
            .detail
            .as_deref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        let note = if f.present {
            String::new()
        } else {
            format!(": {consequence}")
        };
        s += &format!(
            "  {name:<16} {}{detail}{note}\n",
            if f.present { "present" } else { "absent" }
        );
    }
    s += "Tools\n";
    for t in &r.tools {
        let state = match (&t.path, t.running) {
            (None, _) => "not installed".to_string(),
            (Some(_), Some(true)) => format!("{}, running", t.version.as_deref().unwrap_or("?")),
            (Some(_), Some(false)) => {
                format!("{}, not running", t.version.as_deref().unwrap_or("?"))
            }
            (Some(_), None) => t.version.clone().unwrap_or_else(|| "?".into()),
        };
        s += &format!("  {:<16} {state}\n", t.name);
    }
    let n = &r.nvml;
    s += "GPU\n";
    if n.available {
        s += &format!(
            "  NVML             driver {}, {} device(s)\n",
            n.driver_version.as_deref().unwrap_or("?"),
            n.devices.unwrap_or(0)
        );
    } else {
        s += &format!(
            "  NVML             not available ({})\n",
            n.detail.as_deref().unwrap_or("unknown reason")
        );
    }
    s
}
