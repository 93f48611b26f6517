//! Per-client-address login failure throttle: each failed login from an address makes the
//! next failure reply wait longer, so password guessing gets slow without ever blocking a
//! shard (the caller turns the returned delay into a timer).
//!
//! Delaying failure replies alone would not slow a guesser: one that gets no answer within
//! the time a check takes knows the guess failed, and reconnects. So every attempt from an
//! address with failures on record (whatever its outcome, on any connection) waits for that
//! address's next slot, one attempt a slot, the slots `delay` apart. A success does not wipe
//! the record either: with one valid account, an attacker could otherwise reset it between
//! guesses at others. An honest user who mistyped waits at most one delay, once.
//!
//! Pure: time is passed in, nothing sleeps. One table per shard; an attacker spread over shards
//! meets each shard's table, which still bounds its rate. IPv6 clients are tracked by /64,
//! because one host usually owns a whole /64 and could otherwise rotate addresses for free.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// How the throttle grows and forgets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleParams {
    /// Delay of the first failure's reply; each further failure doubles it.
    pub base_delay: Duration,
    /// Ceiling of the delay, so a legitimate user who mistyped often still gets an answer.
    pub max_delay: Duration,
    /// Failures older than this are forgotten: the address starts again at `base_delay`.
    pub forget_after: Duration,
    /// Most addresses remembered at once; beyond it the stalest entry is evicted, so a flood of
    /// source addresses cannot grow memory.
    pub max_tracked_addrs: usize,
}

impl Default for ThrottleParams {
    fn default() -> Self {
        ThrottleParams {
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(16),
            forget_after: Duration::from_secs(15 * 60),
            max_tracked_addrs: 4_096,
        }
    }
}

/// What we remember about one address.
#[derive(Debug, Clone, Copy)]
struct FailureRecord {
    /// Consecutive failures not yet forgotten; sets the exponent of the delay.
    failures: u32,
    /// When the last failure happened: drives forgetting and eviction.
    last_failure: Instant,
    /// The earliest moment the next attempt from this address may be checked.
    next_attempt: Instant,
}

/// The table of recent login failures by client address.
#[derive(Debug, Clone)]
pub struct FailureThrottle {
    /// Growth and bounds.
    params: ThrottleParams,
    /// Throttle key (see [`throttle_key`]) → its failures.
    records: HashMap<IpAddr, FailureRecord>,
}

/// The address we account failures to: IPv4 (also when mapped into IPv6) as is, IPv6 by /64.
fn throttle_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

impl FailureThrottle {
    /// An empty table.
    pub fn new(params: ThrottleParams) -> FailureThrottle {
        FailureThrottle {
            params,
            records: HashMap::new(),
        }
    }

    /// Number of addresses remembered (never above `max_tracked_addrs`).
    pub fn tracked_addrs(&self) -> usize {
        self.records.len()
    }

    /// Failures counted for `addr` that are still remembered at `now`.
    pub fn failures(&self, addr: IpAddr, now: Instant) -> u32 {
        match self.records.get(&throttle_key(addr)) {
            Some(record) if !self.forgotten(record, now) => record.failures,
            _ => 0,
        }
    }

    /// How long an attempt from `addr` arriving at `now` waits before its password is
    /// checked, taking the address's next slot: zero for an address without failures on
    /// record, else until its slot, and the slot after is one delay later.
    pub fn admit_attempt(&mut self, addr: IpAddr, now: Instant) -> Duration {
        // No failures remembered (none, or forgotten): no delay, nothing to take.
        let delay = self.delay_after(self.failures(addr, now));
        let Some(record) = self.records.get_mut(&throttle_key(addr)) else {
            return Duration::ZERO;
        };
        if delay.is_zero() {
            return Duration::ZERO;
        }
        let slot = record.next_attempt.max(now);
        record.next_attempt = slot + delay;
        slot - now
    }

    /// Records a failed login from `addr` at `now` and returns how long to wait before sending
    /// its failure reply: `base_delay × 2^(failures−1)`, capped at `max_delay`. No attempt
    /// from the address is checked before that time has passed.
    pub fn record_failure(&mut self, addr: IpAddr, now: Instant) -> Duration {
        let key = throttle_key(addr);
        let failures = self.failures(addr, now).saturating_add(1);
        if !self.records.contains_key(&key) && self.records.len() >= self.params.max_tracked_addrs {
            self.make_room(now);
        }
        let delay = self.delay_after(failures);
        let next_attempt = self
            .records
            .get(&key)
            .map_or(now, |record| record.next_attempt)
            .max(now + delay);
        if self.params.max_tracked_addrs > 0 {
            self.records.insert(
                key,
                FailureRecord {
                    failures,
                    last_failure: now,
                    next_attempt,
                },
            );
        }
        delay
    }

    /// The delay a reply gets after `failures` consecutive failures.
    fn delay_after(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let doublings = (failures - 1).min(31);
        self.params
            .base_delay
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.params.max_delay)
            .min(self.params.max_delay)
    }

    fn forgotten(&self, record: &FailureRecord, now: Instant) -> bool {
        now.saturating_duration_since(record.last_failure) >= self.params.forget_after
    }

    /// Drops forgotten entries, and if that frees nothing, the entry whose last failure is
    /// oldest. Linear, but it only runs when the table is full and a new address fails a login,
    /// which already cost an argon2 verification.
    fn make_room(&mut self, now: Instant) {
        let forget_after = self.params.forget_after;
        self.records
            .retain(|_, r| now.saturating_duration_since(r.last_failure) < forget_after);
        if self.records.len() < self.params.max_tracked_addrs {
            return;
        }
        if let Some(stalest) = self
            .records
            .iter()
            .min_by_key(|(_, r)| r.last_failure)
            .map(|(key, _)| *key)
        {
            self.records.remove(&stalest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ThrottleParams {
        ThrottleParams {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1_000),
            forget_after: Duration::from_secs(60),
            max_tracked_addrs: 3,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn delay_doubles_per_failure_up_to_the_ceiling() {
        let mut throttle = FailureThrottle::new(params());
        let t0 = Instant::now();
        let delays: Vec<u64> = (0..7)
            .map(|i| {
                throttle
                    .record_failure(ip("192.0.2.1"), t0 + Duration::from_secs(i))
                    .as_millis() as u64
            })
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000, 1000]);
        // Another address is unaffected.
        assert_eq!(
            throttle.record_failure(ip("192.0.2.2"), t0),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        let mut p = params();
        p.max_delay = Duration::MAX;
        let throttle = FailureThrottle::new(p);
        assert_eq!(
            throttle.delay_after(u32::MAX),
            Duration::from_millis(100) * (1 << 31)
        );
    }

    #[test]
    fn failures_are_forgotten_after_the_window_only() {
        let mut throttle = FailureThrottle::new(params());
        let t0 = Instant::now();
        let addr = ip("198.51.100.7");
        throttle.record_failure(addr, t0);
        throttle.record_failure(addr, t0);
        assert_eq!(throttle.failures(addr, t0 + Duration::from_secs(59)), 2);
        assert_eq!(throttle.failures(addr, t0 + Duration::from_secs(60)), 0);
        assert_eq!(
            throttle.record_failure(addr, t0 + Duration::from_secs(61)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn every_attempt_after_a_failure_waits_for_its_own_slot() {
        let mut throttle = FailureThrottle::new(params());
        let t0 = Instant::now();
        let addr = ip("198.51.100.7");
        assert_eq!(throttle.admit_attempt(addr, t0), Duration::ZERO);
        // A failure at t0: its reply waits 100 ms, and so does a guess on a new connection.
        assert_eq!(
            throttle.record_failure(addr, t0),
            Duration::from_millis(100)
        );
        let soon = t0 + Duration::from_millis(10);
        assert_eq!(
            throttle.admit_attempt(addr, soon),
            Duration::from_millis(90)
        );
        // Parallel attempts line up a slot apart, successes included.
        assert_eq!(
            throttle.admit_attempt(addr, soon),
            Duration::from_millis(190)
        );
        assert_eq!(
            throttle.admit_attempt(addr, soon),
            Duration::from_millis(290)
        );
        // Once the slots are past, an attempt goes through at once; other addresses never wait.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(throttle.admit_attempt(addr, later), Duration::ZERO);
        assert_eq!(
            throttle.admit_attempt(ip("198.51.100.8"), soon),
            Duration::ZERO
        );
        // Forgotten with the failures.
        throttle.record_failure(addr, t0 + Duration::from_secs(2));
        assert_eq!(
            throttle.admit_attempt(addr, t0 + Duration::from_secs(62)),
            Duration::ZERO
        );
    }

    #[test]
    fn table_is_bounded_and_evicts_the_stalest() {
        let mut throttle = FailureThrottle::new(params());
        let t0 = Instant::now();
        for (i, a) in ["10.0.0.1", "10.0.0.2", "10.0.0.3"].iter().enumerate() {
            throttle.record_failure(ip(a), t0 + Duration::from_secs(i as u64));
        }
        throttle.record_failure(ip("10.0.0.4"), t0 + Duration::from_secs(5));
        assert_eq!(throttle.tracked_addrs(), 3);
        let now = t0 + Duration::from_secs(5);
        assert_eq!(throttle.failures(ip("10.0.0.1"), now), 0);
        assert_eq!(throttle.failures(ip("10.0.0.2"), now), 1);
        assert_eq!(throttle.failures(ip("10.0.0.4"), now), 1);
        for i in 0..1000u32 {
            throttle.record_failure(IpAddr::from(i.to_be_bytes()), now);
        }
        assert_eq!(throttle.tracked_addrs(), 3);
    }

    #[test]
    fn zero_capacity_tracks_nothing_but_still_delays() {
        let mut p = params();
        p.max_tracked_addrs = 0;
        let mut throttle = FailureThrottle::new(p);
        let t0 = Instant::now();
        assert_eq!(
            throttle.record_failure(ip("10.0.0.1"), t0),
            Duration::from_millis(100)
        );
        assert_eq!(throttle.tracked_addrs(), 0);
    }

    #[test]
    fn ipv6_is_tracked_per_64_and_mapped_ipv4_as_ipv4() {
        let mut throttle = FailureThrottle::new(params());
        let t0 = Instant::now();
        throttle.record_failure(ip("2001:db8:1:2::1"), t0);
        throttle.record_failure(ip("2001:db8:1:2:ffff::9"), t0);
        assert_eq!(throttle.failures(ip("2001:db8:1:2::77"), t0), 2);
        assert_eq!(throttle.failures(ip("2001:db8:1:3::1"), t0), 0);
        throttle.record_failure(ip("::ffff:192.0.2.9"), t0);
        assert_eq!(throttle.failures(ip("192.0.2.9"), t0), 1);
    }
}
