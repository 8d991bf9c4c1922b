//! `ferry bench`: measurements whose results go in docs/benchmarks.md and in notes,
//! never timed assertions in tests. Each benchmark runs the real thing
//! (CRIU dumps of the bundled workload) and repeats every measurement,
//! reporting the median and the spread.

#![forbid(unsafe_code)]

pub mod compress;
pub mod migrate;

use std::time::Duration;

use serde::Serialize;

/// Median, fastest and slowest of repeated timings.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    #[serde(serialize_with = "ferry_image::units::serde_micros")]
    pub median: Duration,
    #[serde(serialize_with = "ferry_image::units::serde_micros")]
    pub min: Duration,
    #[serde(serialize_with = "ferry_image::units::serde_micros")]
    pub max: Duration,
    pub runs: usize,
}

impl Timing {
    pub fn of(mut samples: Vec<Duration>) -> Timing {
        samples.sort();
        let runs = samples.len();
        Timing {
            median: samples.get(runs / 2).copied().unwrap_or_default(),
            min: samples.first().copied().unwrap_or_default(),
            max: samples.last().copied().unwrap_or_default(),
            runs,
        }
    }

    /// `bytes` per median second, in MB/s (10^6 bytes).
    pub(crate) fn mb_s(&self, bytes: u64) -> f64 {
        bytes as f64 / 1e6 / self.median.as_secs_f64().max(1e-9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        let ms = Duration::from_millis;
        let t = Timing::of(vec![ms(3), ms(1), ms(2)]);
        assert_eq!((t.median, t.min, t.max, t.runs), (ms(2), ms(1), ms(3), 3));
        let t = Timing::of(vec![ms(4), ms(1)]);
        assert_eq!(t.median, ms(4));
        assert!((Timing::of(vec![Duration::from_secs(1)]).mb_s(2_000_000) - 2.0).abs() < 1e-9);
    }
}
