//! Time that goes on while the machine sleeps: `CLOCK_BOOTTIME`.
//!
//! `std::time::Instant` is `CLOCK_MONOTONIC`, which stops during suspend: a
//! lease measured on it would look valid on a host that slept past its
//! expiry, while another host took over. Leases are measured on this.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on `CLOCK_BOOTTIME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BootInstant(Duration);

impl BootInstant {
    pub fn now() -> BootInstant {
        // CLOCK_BOOTTIME exists on every kernel ferry runs on (>= 2.6.39);
        // should reading it fail, CLOCK_MONOTONIC is the next best.
        let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .or_else(|_| nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC))
            .map(Duration::from)
            .unwrap_or_default();
        BootInstant(ts)
    }

    /// Nanoseconds since boot (to hand a deadline to another process).
    pub fn as_nanos(&self) -> u128 {
        self.0.as_nanos()
    }

    /// The instant `nanos` after boot (as [`BootInstant::as_nanos`] gave).
    pub fn from_nanos(nanos: u64) -> BootInstant {
        BootInstant(Duration::from_nanos(nanos))
    }

    /// Time since `self` (zero if `self` is later).
    pub fn elapsed(&self) -> Duration {
        BootInstant::now() - *self
    }
}

impl Add<Duration> for BootInstant {
    type Output = BootInstant;
    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_add(d))
    }
}

impl Sub for BootInstant {
    type Output = Duration;
    /// The time from `earlier` to `self`, zero if `earlier` is later.
    fn sub(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_time_advances_with_sleep_and_orders() {
        let a = BootInstant::now();
        std::thread::sleep(Duration::from_millis(20));
        let b = BootInstant::now();
        assert!(b > a);
        assert!(b - a >= Duration::from_millis(20));
        assert_eq!(a - b, Duration::ZERO);
        assert!(a + Duration::from_secs(1) > b);
        assert!(a.elapsed() >= Duration::from_millis(20));
    }
}
