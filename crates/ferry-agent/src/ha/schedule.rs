//! When the leader takes its next checkpoint.
//!
//! A service's interval is a bound on lost work: at any moment the newest
//! checkpoint a standby has verified should have been taken less than one
//! interval ago. A checkpoint counts from when it is taken (the service's
//! state is the one frozen then) but protects the service only once a
//! standby has verified it, a replication lag later (dump, pack, send,
//! verify: ~0.3-0.5 s for 100 MiB on a small machine). Checkpoints taken
//! one interval apart would leave up to interval + lag of work exposed, so
//! the leader starts each one early by the lag it measured (the longest of
//! the last ten but one: a single outlier is ignored) plus the role loop's
//! own delay.

use std::time::Duration;

/// The role loop's period: a due checkpoint may start this much late.
pub(crate) const SLACK: Duration = super::member::POLL;

/// The shortest period, as a share of the interval: below it the service
/// would spend most of its time frozen, and the interval cannot be held.
const FLOOR_DIVISOR: u32 = 4;

/// The time from one checkpoint's start to the next one's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Period {
    pub period: Duration,
    /// Whether the interval holds with the lag measured: false when even
    /// the shortest period leaves more than an interval exposed.
    pub holds: bool,
}

/// The period for `interval` given the measured replication `lag` (none
/// yet: the first checkpoints of a leadership come at half the interval,
/// until a standby has verified one).
pub fn period(interval: Duration, lag: Option<Duration>) -> Period {
    let floor = interval / FLOOR_DIVISOR;
    let Some(lag) = lag else {
        return Period {
            period: (interval / 2).max(floor),
            holds: true,
        };
    };
    match interval.checked_sub(lag + SLACK) {
        Some(p) if p >= floor => Period {
            period: p,
            holds: true,
        },
        _ => Period {
            period: floor,
            holds: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_next_checkpoint_starts_early_by_the_lag_and_the_loop_delay() {
        let p = period(ms(1000), Some(ms(400)));
        assert_eq!(p.period, ms(1000) - ms(400) - SLACK);
        assert!(p.holds);
        // The newest verified checkpoint is then at most period + lag +
        // slack = one interval old.
        assert_eq!(p.period + ms(400) + SLACK, ms(1000));
    }

    #[test]
    fn before_any_verification_checkpoints_come_at_half_the_interval() {
        assert_eq!(period(ms(2000), None).period, ms(1000));
    }

    #[test]
    fn a_lag_near_the_interval_is_reported_and_the_period_floored() {
        let p = period(ms(1000), Some(ms(900)));
        assert_eq!(p.period, ms(250));
        assert!(!p.holds);
        let p = period(ms(1000), Some(ms(5000)));
        assert_eq!(p.period, ms(250));
        assert!(!p.holds);
    }
}
