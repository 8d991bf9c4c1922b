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
