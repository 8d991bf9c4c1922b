//! Progress bars on stderr for long packs and unpacks (hidden when stderr
//! is not a terminal).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use ferry_archive::Progress;

/// A byte progress bar that the archive code advances.
pub struct Bar(ProgressBar);

impl Bar {
    pub fn new(total_bytes: u64, what: &str) -> Bar {
        let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_string());
        Bar(bar)
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bar {
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

/// `ferry migrate`'s live view: on a terminal a bar for each pre-copy
/// round's scan and a line per round and phase (stderr); with `--json`, one
/// JSON object per event on stderr; otherwise nothing.
pub fn migrate_events(json: bool) -> ferry_migrate::Events {
    use ferry_migrate::Event;
    use std::io::IsTerminal;
    if json {
        return ferry_migrate::Events::new(|e: &Event| {
            if let Ok(line) = serde_json::to_string(e) {
                eprintln!("{line}");
            }
        });
    }
    if !std::io::stderr().is_terminal() {
        // Only what must be said before the freeze.
        return ferry_migrate::Events::new(|e: &Event| {
            if let Some(line) = announcement(e) {
                eprintln!("{line}");
            }
        });
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    ferry_migrate::Events::new(move |e: &Event| match e {
        Event::Scan {
            round,
            scanned_bytes,
            total_bytes,
            ..
        } => {
            bar.set_length((*total_bytes).max(*scanned_bytes));
            bar.set_position(*scanned_bytes);
            bar.set_message(format!("round {round}"));
        }
        Event::Round {
            round,
            changed_bytes,
            dirty_rate_mb_s,
            predicted_final_ms,
            ms,
            ..
        } => {
            bar.println(format!(
                "round {round}: {} changed ({:.1} MB/s dirty), {ms:.0} ms; predicted final transfer {predicted_final_ms:.0} ms",
                ferry_image::units::bytes(*changed_bytes),
                dirty_rate_mb_s
            ));
        }
        Event::Phase { phase } => {
            bar.println(format!("frozen phase: {phase}"));
            if *phase == "committed" {
                bar.finish_and_clear();
            }
        }
        Event::DowntimeMiss { .. } => {
            if let Some(line) = announcement(e) {
                bar.println(line);
            }
        }
        Event::PostCopy {
            pages_served,
            pages_resident,
        } => {
            bar.set_length(*pages_resident.max(pages_served) * 4096);
            bar.set_position(pages_served * 4096);
            bar.set_message("post-copy".to_string());
        }
    })
}

/// What is said before the freeze whatever the output.
fn announcement(e: &ferry_migrate::Event) -> Option<String> {
    match e {
        ferry_migrate::Event::DowntimeMiss {
            predicted_ms,
            limit_ms,
        } => Some(format!(
            "ferry: WARNING: the frozen phase is predicted to take {predicted_ms:.0} ms, over --max-downtime {limit_ms:.0} ms; going on (--accept-downtime-miss)"
        )),
        _ => None,
    }
}
