//! `--max-downtime` as a promise: the whole frozen time a route will take,
//! predicted before anything is frozen.
//!
//! The prediction adds what the frozen phase does, each from a cost
//! measured on this host: CRIU's dump (a fixed part and a part per
//! resident page), the transfer of what changed (pre-copy's own measure:
//! changed bytes over the measured bandwidth), and the destination's
//! rebuild, restore and commit (fixed and per page). A lazy dump (the
//! hybrid route, post-copy) writes no memory while frozen: its frozen time
//! is a fixed cost. The costs are learned from this host's own migrations
//! ([`Costs::learn`], kept in [`costs_path`]); until there are some, the
//! defaults are those measured on ferry's 2-vCPU lab VM (docs/benchmarks.md).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::report::{FinalReport, Route};

/// The cost file is small; anything larger is not one.
const MAX_COST_FILE: u64 = 64 << 10;
/// Weight of a new observation.
const LEARN: f64 = 0.3;
/// Dumps of at least this many pages teach the per-page cost; smaller ones
/// the fixed cost.
const PER_PAGE_FROM: u64 = 32 << 10;

/// What the frozen phase costs on this host.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Costs {
    pub dump_fixed_ms: f64,
    pub dump_us_per_page: f64,
    /// Rebuild, restore and commit at the destination.
    pub restore_fixed_ms: f64,
    pub restore_us_per_page: f64,
    /// A lazy dump's whole frozen time (freeze, metadata images, lazy
    /// restore, commit): fixed, and per resident page (CRIU still moves
    /// each page into its page pipes while frozen).
    pub lazy_frozen_ms: f64,
    #[serde(default = "default_lazy_us_per_page")]
    pub lazy_us_per_page: f64,
    /// Migrations these costs were learned from (0: the defaults).
    pub samples: u64,
}

impl Default for Costs {
    /// Measured on the 2-vCPU lab VM, release build, CRIU 4.2.1: a 1 GiB
    /// dump 401-405 ms, its restore 458-459 ms; a small tree's dump and
    /// restore about 60 ms each; a lazy dump's frozen time 260-320 ms for
    /// 1 GiB, 130-170 ms for 64 MiB.
    fn default() -> Costs {
        Costs {
            dump_fixed_ms: 60.0,
            dump_us_per_page: 1.3,
            restore_fixed_ms: 60.0,
            restore_us_per_page: 1.5,
            lazy_frozen_ms: 140.0,
            lazy_us_per_page: default_lazy_us_per_page(),
            samples: 0,
        }
    }
}

fn default_lazy_us_per_page() -> f64 {
    0.55
}

/// A route's predicted frozen time, by part.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Prediction {
    pub route: Route,
    pub dump_ms: f64,
    pub transfer_ms: f64,
    pub restore_ms: f64,
    pub total_ms: f64,
}

/// Where this host's costs are kept: `$FERRY_STATE_DIR/costs.json`
/// (default `/var/lib/ferry`).
pub fn costs_path() -> PathBuf {
    std::env::var_os("FERRY_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/ferry"))
        .join("costs.json")
}

fn sane(v: f64, max: f64) -> bool {
    v.is_finite() && (0.0..=max).contains(&v)
}

impl Costs {
    /// The costs in `path`, or the defaults when there are none or the
    /// file is not a sane cost file (it is only a hint: never fatal).
    pub fn load(path: &Path) -> Costs {
        let read = || -> Option<Costs> {
            let meta = std::fs::metadata(path).ok()?;
            if meta.len() > MAX_COST_FILE {
                return None;
            }
            let c: Costs = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
            c.sane().then_some(c)
        };
        read().unwrap_or_default()
    }

    fn sane(&self) -> bool {
        sane(self.dump_fixed_ms, 60_000.0)
            && sane(self.dump_us_per_page, 1_000.0)
            && sane(self.restore_fixed_ms, 60_000.0)
            && sane(self.restore_us_per_page, 1_000.0)
            && sane(self.lazy_frozen_ms, 60_000.0)
            && sane(self.lazy_us_per_page, 1_000.0)
    }

    /// Writes the costs (root only, whole or not at all).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            ".costs.{}.{:08x}.tmp",
            std::process::id(),
            fastrand::u32(..)
        ));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// Pre-copy's final phase: a full dump of `pages` resident pages, the
    /// transfer pre-copy predicted, the destination's rebuild and restore.
    pub fn precopy(&self, pages: u64, transfer_ms: f64) -> Prediction {
        let dump_ms = self.dump_fixed_ms + self.dump_us_per_page * pages as f64 / 1e3;
        let restore_ms = self.restore_fixed_ms + self.restore_us_per_page * pages as f64 / 1e3;
        let transfer_ms = if transfer_ms.is_finite() {
            transfer_ms
        } else {
            0.0
        };
        Prediction {
            route: Route::Precopy,
            dump_ms,
            transfer_ms,
            restore_ms,
            total_ms: dump_ms + transfer_ms + restore_ms,
        }
    }

    /// A final phase from a lazy dump (hybrid, post-copy) of `pages`
    /// resident pages.
    pub fn lazy(&self, route: Route, pages: u64) -> Prediction {
        let total = self.lazy_frozen_ms + self.lazy_us_per_page * pages as f64 / 1e3;
        Prediction {
            route,
            dump_ms: total,
            transfer_ms: 0.0,
            restore_ms: 0.0,
            total_ms: total,
        }
    }

    /// Learns from a migration's measured final phase.
    pub fn learn(&mut self, f: &FinalReport) {
        let mix = |old: f64, new: f64| {
            if new.is_finite() && new >= 0.0 {
                old + LEARN * (new - old)
            } else {
                old
            }
        };
        if f.lazy_dump {
            let pages = f.pages_in_images;
            if pages >= PER_PAGE_FROM {
                let per = (f.frozen_ms - self.lazy_frozen_ms).max(0.0) * 1e3 / pages as f64;
                self.lazy_us_per_page = mix(self.lazy_us_per_page, per);
            } else {
                let fixed = (f.frozen_ms - self.lazy_us_per_page * pages as f64 / 1e3).max(0.0);
                self.lazy_frozen_ms = mix(self.lazy_frozen_ms, fixed);
            }
        } else {
            let pages = f.pages_in_images;
            let restore = f.rebuild_ms + f.restore_ms + f.commit_ms;
            if pages >= PER_PAGE_FROM {
                let per = |ms: f64, fixed: f64| (ms - fixed).max(0.0) * 1e3 / pages as f64;
                self.dump_us_per_page =
                    mix(self.dump_us_per_page, per(f.dump_ms, self.dump_fixed_ms));
                self.restore_us_per_page = mix(
                    self.restore_us_per_page,
                    per(restore, self.restore_fixed_ms),
                );
            } else {
                let fixed = |ms: f64, per_page: f64| (ms - per_page * pages as f64 / 1e3).max(0.0);
                self.dump_fixed_ms =
                    mix(self.dump_fixed_ms, fixed(f.dump_ms, self.dump_us_per_page));
                self.restore_fixed_ms = mix(
                    self.restore_fixed_ms,
                    fixed(restore, self.restore_us_per_page),
                );
            }
        }
        self.samples += 1;
    }
}

/// The promise and how it was kept, as the report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DowntimeCheck {
    /// `--max-downtime`.
    pub limit_ms: f64,
    /// Predicted before freezing, by part (see [`Prediction`]).
    pub predicted: Prediction,
    /// Measured: ferry's timer from the dump request to the resume.
    pub measured_ms: f64,
    /// The measured frozen time exceeded the limit.
    pub missed: bool,
    /// The prediction exceeded the limit, the user was told before the
    /// freeze, and went on (`--accept-downtime-miss`).
    pub announced: bool,
    /// What `measured_ms` is.
    pub method: &'static str,
}

impl DowntimeCheck {
    pub fn new(limit_ms: f64, predicted: Prediction, announced: bool, measured_ms: f64) -> Self {
        DowntimeCheck {
            limit_ms,
            predicted,
            measured_ms,
            missed: measured_ms > limit_ms,
            announced,
            method: "ferry's phase timer, from the dump request to the destination's resume (the application's own gap is measured by `ferry bench migrate`)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_frozen_phase_is_predicted_and_costs_are_learned() {
        let c = Costs::default();
        let p = c.precopy(262_144, 50.0);
        // 1 GiB with the defaults: about 60+341 dump, 50, 60+393 restore.
        assert!((p.total_ms - 904.0).abs() < 10.0, "{p:?}");
        assert_eq!(c.lazy(Route::Hybrid, 0).total_ms, 140.0);
        assert!((c.lazy(Route::Hybrid, 262_144).total_ms - 284.0).abs() < 1.0);
        let mut l = c;
        let f = FinalReport {
            pages_in_images: 262_144,
            dump_ms: 60.0 + 262.144 * 2.0,
            restore_ms: 60.0 + 262.144 * 2.0,
            ..FinalReport::default()
        };
        for _ in 0..30 {
            l.learn(&f);
        }
        assert!((l.dump_us_per_page - 2.0).abs() < 0.01, "{l:?}");
        assert!((l.restore_us_per_page - 2.0).abs() < 0.01, "{l:?}");
        let lazy = FinalReport {
            lazy_dump: true,
            frozen_ms: 100.0,
            pages_in_images: 0,
            ..FinalReport::default()
        };
        for _ in 0..30 {
            l.learn(&lazy);
        }
        assert!((l.lazy_frozen_ms - 100.0).abs() < 0.1);
        let big = FinalReport {
            lazy_dump: true,
            frozen_ms: 100.0 + 262.144,
            pages_in_images: 262_144,
            ..FinalReport::default()
        };
        for _ in 0..30 {
            l.learn(&big);
        }
        assert!((l.lazy_us_per_page - 1.0).abs() < 0.01, "{l:?}");
        assert_eq!(l.samples, 90);
    }

    #[test]
    fn a_bad_cost_file_gives_the_defaults_and_saving_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("costs.json");
        assert_eq!(Costs::load(&path), Costs::default());
        std::fs::write(&path, b"{\"dump_fixed_ms\": -1}").unwrap();
        assert_eq!(Costs::load(&path), Costs::default());
        let bad = Costs {
            dump_us_per_page: f64::MAX,
            ..Costs::default()
        };
        std::fs::write(&path, serde_json::to_vec(&bad).unwrap()).unwrap();
        assert_eq!(Costs::load(&path), Costs::default());
        let good = Costs {
            samples: 3,
            dump_fixed_ms: 42.0,
            ..Costs::default()
        };
        good.save(&path).unwrap();
        assert_eq!(Costs::load(&path), good);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
    }
}
