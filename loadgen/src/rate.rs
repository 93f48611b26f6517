//! Open-loop arrival schedule: arrival `i` is due at `start + i / rate`, whatever the
//! server does. Latency is measured from that intended time, so a server that stalls
//! cannot hide the stall by slowing the client down (coordinated omission).

use std::time::{Duration, Instant};

/// An arrival counts as late when it could start only this long after it was due:
/// every connection was still busy with earlier arrivals.
pub const LATE_AFTER: Duration = Duration::from_millis(1);

/// A fixed-rate schedule of arrivals.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// When arrival 0 is due.
    start: Instant,
    /// Nanoseconds between arrivals; fractional so that rates that do not divide a second
    /// stay exact over long runs.
    interval_nanos: f64,
}

impl Schedule {
    /// A schedule of `rate_per_sec` arrivals per second starting at `start`.
    /// `rate_per_sec` must be positive and finite (checked by the command line).
    pub fn new(start: Instant, rate_per_sec: f64) -> Self {
        Self {
            start,
            interval_nanos: 1e9 / rate_per_sec,
        }
    }

    /// When arrival `index` is due.
    pub fn intended(&self, index: u64) -> Instant {
        self.start + Duration::from_nanos((index as f64 * self.interval_nanos) as u64)
    }
}

/// Whether an arrival that actually started at `started` was late for `intended`.
pub fn is_late(intended: Instant, started: Instant) -> bool {
    started.saturating_duration_since(intended) > LATE_AFTER
}

/// Splits `total` items over `parts` workers as evenly as possible; part `index` gets this.
pub fn share(total: u64, parts: u64, index: u64) -> u64 {
    total / parts + u64::from(index < total % parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_are_evenly_spaced() {
        let start = Instant::now();
        let schedule = Schedule::new(start, 1000.0);
        assert_eq!(schedule.intended(0), start);
        assert_eq!(schedule.intended(1), start + Duration::from_millis(1));
        assert_eq!(schedule.intended(1500), start + Duration::from_millis(1500));
        let thirds = Schedule::new(start, 3.0);
        assert_eq!(thirds.intended(3), start + Duration::from_secs(1));
    }

    #[test]
    fn lateness() {
        let due = Instant::now();
        assert!(!is_late(due, due));
        assert!(!is_late(due + Duration::from_millis(5), due));
        assert!(!is_late(due, due + Duration::from_micros(900)));
        assert!(is_late(due, due + Duration::from_millis(2)));
    }

    #[test]
    fn shares_add_up() {
        for (total, parts) in [(10u64, 3u64), (0, 4), (7, 7), (100_000, 6), (5, 8)] {
            let sum: u64 = (0..parts).map(|i| share(total, parts, i)).sum();
            assert_eq!(sum, total);
            let max = (0..parts).map(|i| share(total, parts, i)).max().unwrap();
            let min = (0..parts).map(|i| share(total, parts, i)).min().unwrap();
            assert!(max - min <= 1);
        }
    }
}
