//! The human-readable form of a [`DumpReport`].

use std::fmt::Write;

use super::DumpReport;
use ferry_image::units::{bytes, millis, percent};

/// Renders the report as aligned text tables.
pub fn render_human(r: &DumpReport) -> String {
    let mut out = String::new();
    let t = &r.totals;
    let _ = writeln!(out, "Images: {}", r.images_dir);
    let _ = writeln!(
        out,
        "CRIU image version {}{}",
        r.image_version,
        r.arch
            .as_deref()
            .map(|a| format!(", arch {a}"))
            .unwrap_or_default()
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "Process tree:");
    let _ = writeln!(
        out,
        "  {:>8} {:>8} {:<16} {:>4} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "PID",
        "PPID",
        "COMMAND",
        "THR",
        "VMAS",
        "ENTRIES",
        "PAGES",
        "ZERO",
        "DUP",
        "PARENT",
        "BYTES"
    );
    for p in &r.processes {
        let _ = writeln!(
            out,
            "  {:>8} {:>8} {:<16} {:>4} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
            p.pid,
            p.ppid,
            p.comm,
            p.threads,
            p.vmas,
            p.pages.pagemap_entries,
            p.pages.dumped,
            p.pages.zero,
            p.pages.duplicate,
            p.pages.in_parent,
            bytes(p.pages.bytes),
        );
    }
    for s in &r.shmem {
        let _ = writeln!(
            out,
            "  shmem {:<36} entries {} pages {} zero {} dup {}",
            s.file, s.pages.pagemap_entries, s.pages.dumped, s.pages.zero, s.pages.duplicate
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Files:");
    let mut files = r.files.clone();
    files.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
    for f in &files {
        let class = serde_json::to_value(f.class)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<32} {:>12} {:>10}  {}",
            f.name,
            f.bytes,
            bytes(f.bytes),
            class
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Totals:");
    let _ = writeln!(out, "  files            {:>10}", t.files);
    let _ = writeln!(out, "  all bytes        {:>10}", bytes(t.bytes));
    let _ = writeln!(
        out,
        "  pages            {:>10}  ({} of all)",
        bytes(t.pages_bytes),
        percent(t.pages_bytes, t.bytes)
    );
    let _ = writeln!(
        out,
        "  metadata         {:>10}  ({} of all)",
        bytes(t.metadata_bytes),
        percent(t.metadata_bytes, t.bytes)
    );
    let _ = writeln!(
        out,
        "  stats + logs     {:>10}",
        bytes(t.stats_bytes + t.log_bytes + t.other_bytes)
    );
    let _ = writeln!(out, "  pages dumped     {:>10}", t.pages);
    let _ = writeln!(
        out,
        "  zero pages       {:>10}  ({})",
        t.zero_pages,
        percent(t.zero_pages, t.pages)
    );
    let _ = writeln!(
        out,
        "  duplicate pages  {:>10}  ({})",
        t.duplicate_pages,
        percent(t.duplicate_pages, t.pages)
    );
    let _ = writeln!(
        out,
        "  unique pages     {:>10}  ({}, {})",
        t.unique_pages,
        percent(t.unique_pages, t.pages),
        bytes(t.unique_pages * ferry_sys::PAGE_SIZE as u64)
    );
    if let Some(a) = &r.archive {
        render_archive(&mut out, a);
    }
    if let Some(g) = &r.gpu {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "GPU state: {} x {} ({}), {} in use, driver {}{}, carried by {}",
            g.count,
            g.model,
            g.uuids.join(", "),
            bytes(g.total_memory()),
            g.driver_version,
            g.cuda_version
                .as_deref()
                .map(|c| format!(", CUDA {c}"))
                .unwrap_or_default(),
            g.carried_by
        );
    }
    if let Some(s) = &r.criu_dump_stats {
        let _ = writeln!(out);
        let _ = writeln!(out, "CRIU dump statistics:");
        let _ = writeln!(out, "  freezing         {:>12}", millis(s.freezing));
        let _ = writeln!(out, "  frozen           {:>12}", millis(s.frozen));
        let _ = writeln!(out, "  memdump          {:>12}", millis(s.memdump));
        let _ = writeln!(out, "  memwrite         {:>12}", millis(s.memwrite));
        let _ = writeln!(out, "  pages scanned    {:>12}", s.pages_scanned);
        let _ = writeln!(
            out,
            "  pages skipped    {:>12}  (in parent)",
            s.pages_skipped_parent
        );
        let _ = writeln!(out, "  pages written    {:>12}", s.pages_written);
        if s.pages_lazy > 0 {
            let _ = writeln!(out, "  pages lazy       {:>12}", s.pages_lazy);
        }
    }
    if let Some(s) = &r.criu_restore_stats {
        let _ = writeln!(out);
        let _ = writeln!(out, "CRIU restore statistics:");
        let _ = writeln!(out, "  forking          {:>12}", millis(s.forking));
        let _ = writeln!(out, "  restore          {:>12}", millis(s.restore));
        if let Some(n) = s.pages_restored {
            let _ = writeln!(out, "  pages restored   {:>12}", n);
        }
    }
    out
}

fn render_archive(out: &mut String, a: &super::ArchiveReport) {
    let t = &a.totals;
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Archive: {} (format {}, id {})",
        a.path, a.format, a.id
    );
    let _ = writeln!(out, "  made by ferry {} from {}", a.ferry_version, a.source);
    if let (Some(id), Some(path)) = (&a.parent_id, &a.parent_path) {
        let _ = writeln!(
            out,
            "  incremental: parent {id} at {path} ({} ancestor(s) needed to restore)",
            a.ancestors
        );
    }
    let _ = writeln!(
        out,
        "  {:<32} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "FILE", "RAW", "STORED", "RATIO", "ZERO", "DUP", "PARENT", "STORED-PG"
    );
    let mut files = a.files.clone();
    files.sort_by(|x, y| y.raw_bytes.cmp(&x.raw_bytes).then(x.name.cmp(&y.name)));
    for f in &files {
        let ratio = if f.stored_bytes == 0 {
            "-".to_string()
        } else {
            format!("{:.2}", f.raw_bytes as f64 / f.stored_bytes as f64)
        };
        let (z, d, p, st) = match &f.pages {
            Some(k) => (
                k.zero.to_string(),
                k.duplicate.to_string(),
                k.in_parent.to_string(),
                k.stored.to_string(),
            ),
            None => ("".into(), "".into(), "".into(), "".into()),
        };
        let _ = writeln!(
            out,
            "  {:<32} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9}",
            f.name,
            bytes(f.raw_bytes),
            bytes(f.stored_bytes),
            ratio,
            z,
            d,
            p,
            st
        );
    }
    let _ = writeln!(
        out,
        "  raw {} -> archive {} (ratio {:.2}, {} of raw)",
        bytes(t.raw_bytes),
        bytes(t.archive_bytes),
        t.ratio,
        percent(t.archive_bytes, t.raw_bytes)
    );
    let _ = writeln!(
        out,
        "  saved: zero pages {}, duplicates {}, parent {}",
        bytes(t.bytes_saved_zero),
        bytes(t.bytes_saved_dedup),
        bytes(t.bytes_saved_by_parent)
    );
    if let (Some(us), Some(level), Some(threads)) = (a.pack_wall_us, a.pack_level, a.pack_threads) {
        let _ = writeln!(
            out,
            "  packed in {} at zstd level {level} on {threads} thread(s){}",
            millis(std::time::Duration::from_micros(us)),
            t.pack_throughput_mb_s
                .map(|m| format!(", {m:.0} MB/s of raw"))
                .unwrap_or_default()
        );
    }
}
