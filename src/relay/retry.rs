//! When to try a deferred recipient again, and when to give up on it.
//!
//! Pure: the caller passes the time of the first attempt and how many attempts have failed;
//! nothing here reads a clock. Times are [`Duration`]s since whatever origin the caller's clock
//! uses (the queue uses Unix time so that schedules survive restarts).
//!
//! The schedule is cumulative from the first attempt, not from the last one, so a recipient
//! retried late (the shard was busy, or the process was down) does not drift further and
//! further behind its schedule: after attempt `n` fails, the next attempt is at
//! `first + step[0] + … + step[n-1]`, where steps past the end of `retry_schedule_secs`
//! repeat the last one (SPEC §2).

use std::time::Duration;

use super::client::Reply;

/// The shortest step we honour. A zero, negative or NaN step from a bad configuration would
/// otherwise make a recipient retry in a busy loop.
pub const MIN_RETRY_STEP_SECS: f64 = 0.001;

/// What to do with a recipient whose latest attempt was deferred.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NextAttempt {
    /// Try again at this time (same origin as the first-attempt time).
    At(Duration),
    /// `max_queue_lifetime_secs` would pass before the next attempt: bounce now.
    Expired,
}

/// The retry policy from the `[relay]` configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delays between attempts (`retry_schedule_secs`); the last repeats forever.
    pub schedule_secs: Vec<f64>,
    /// How long a recipient may stay queued (`max_queue_lifetime_secs`) before it bounces.
    pub max_queue_lifetime_secs: f64,
}

impl RetryPolicy {
    /// When to try again after `failed_attempts` attempts (at least 1) have been deferred.
    ///
    /// The answer is [`NextAttempt::Expired`] when the next attempt would fall at or after
    /// `first_attempt + max_queue_lifetime_secs`: the recipient has then used its whole life
    /// and bounces with the reply of its last attempt.
    pub fn next_attempt(&self, first_attempt: Duration, failed_attempts: u32) -> NextAttempt {
        let lifetime = secs_to_duration(self.max_queue_lifetime_secs);
        let Some(expiry) = first_attempt.checked_add(lifetime) else {
            // A lifetime beyond the representable future never expires; fall through with
            // the saturated value.
            return self.next_before(first_attempt, failed_attempts, Duration::MAX);
        };
        self.next_before(first_attempt, failed_attempts, expiry)
    }

    /// [`RetryPolicy::next_attempt`], but never before `now`: the slots a recipient missed
    /// (the process was down, or an attempt outlasted its step) are skipped, not fired back
    /// to back at a host that has just failed.
    pub fn next_attempt_from(
        &self,
        first_attempt: Duration,
        failed_attempts: u32,
        now: Duration,
    ) -> NextAttempt {
        let behind = now.saturating_sub(first_attempt);
        let steps = failed_attempts.max(1).max(self.steps_to_reach(behind));
        self.next_attempt(first_attempt, steps)
    }

    /// The fewest steps (at least 1) whose cumulative delay reaches `target`.
    fn steps_to_reach(&self, target: Duration) -> u32 {
        let Some(&last) = self.schedule_secs.last() else {
            return 1;
        };
        let mut total = Duration::ZERO;
        for (listed, &step) in self.schedule_secs.iter().enumerate() {
            total = total.saturating_add(secs_to_duration(step.max(MIN_RETRY_STEP_SECS)));
            if total >= target {
                return u32::try_from(listed + 1).unwrap_or(u32::MAX);
            }
        }
        let last = secs_to_duration(last.max(MIN_RETRY_STEP_SECS)).as_nanos();
        let repeats = (target - total).as_nanos().div_ceil(last);
        u32::try_from(self.schedule_secs.len() as u128 + repeats).unwrap_or(u32::MAX)
    }

    fn next_before(&self, first: Duration, failed_attempts: u32, expiry: Duration) -> NextAttempt {
        let elapsed = self.cumulative_delay(failed_attempts.max(1));
        match first.checked_add(elapsed) {
            Some(next) if next < expiry => NextAttempt::At(next),
            _ => NextAttempt::Expired,
        }
    }

    /// Sum of the first `steps` delays, the last one repeated, computed without a loop over
    /// `steps` (a recipient retried every 0.2 s for days reaches millions of attempts).
    fn cumulative_delay(&self, steps: u32) -> Duration {
        let steps = steps as usize;
        let Some(&last) = self.schedule_secs.last() else {
            // No schedule means no retries: the first deferral is final.
            return Duration::MAX;
        };
        let listed = steps.min(self.schedule_secs.len());
        let mut total = Duration::ZERO;
        for &step in &self.schedule_secs[..listed] {
            total = total.saturating_add(secs_to_duration(step.max(MIN_RETRY_STEP_SECS)));
        }
        let repeats = (steps - listed) as u32;
        let last = secs_to_duration(last.max(MIN_RETRY_STEP_SECS));
        total.saturating_add(last.checked_mul(repeats).unwrap_or(Duration::MAX))
    }
}

/// The reply a recipient bounces with when [`NextAttempt::Expired`]: 5.4.7 "delivery time
/// expired" (RFC 3463 §3.5), quoting the last attempt's reply so the sender sees why.
pub fn expiry_reply(last_attempt: &Reply) -> Reply {
    Reply::local(
        554,
        format!("5.4.7 delivery time expired; last attempt: {last_attempt}"),
    )
}

/// Seconds from the configuration to a [`Duration`], saturating instead of panicking on
/// NaN, negative or huge values (configuration validation should have caught them).
fn secs_to_duration(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(schedule: &[f64], lifetime: f64) -> RetryPolicy {
        RetryPolicy {
            schedule_secs: schedule.to_vec(),
            max_queue_lifetime_secs: lifetime,
        }
    }

    fn at(secs: f64) -> NextAttempt {
        NextAttempt::At(Duration::from_secs_f64(secs))
    }

    #[test]
    fn missed_slots_are_skipped_not_fired_back_to_back() {
        // (schedule, lifetime, now in seconds since the first attempt, expected); one failed
        // attempt each. Slots of [60, 300]: 60, 360, 660, 960, 1260, …
        let cases: &[(&[f64], f64, u64, NextAttempt)] = &[
            // On time: the schedule as is.
            (&[60.0, 300.0], 1e9, 10, at(60.0)),
            // Back after an outage at 1,000 s: 60 to 960 are gone; 1,260 is next.
            (&[60.0, 300.0], 1e9, 1000, at(1260.0)),
            // Exactly on a slot takes it; within the listed steps too.
            (&[60.0, 300.0], 1e9, 360, at(360.0)),
            (&[60.0, 300.0], 1e9, 61, at(360.0)),
            // Past the lifetime: expired, as before.
            (&[60.0], 100.0, 500, NextAttempt::Expired),
        ];
        for (schedule, lifetime, now, expected) in cases {
            let got = policy(schedule, *lifetime).next_attempt_from(
                Duration::ZERO,
                1,
                Duration::from_secs(*now),
            );
            assert_eq!(got, *expected, "{schedule:?} at {now} s");
        }
    }

    proptest! {
        #[test]
        fn the_next_attempt_from_now_is_never_in_the_past(
            first in 0u64..1_000_000,
            failed in 1u32..50,
            late in 0u64..10_000_000,
        ) {
            let policy = policy(&[60.0, 300.0, 900.0], 1e12);
            let first = Duration::from_secs(first);
            let now = first + Duration::from_secs(late);
            match policy.next_attempt_from(first, failed, now) {
                NextAttempt::At(at) => {
                    prop_assert!(at >= now);
                    if let NextAttempt::At(plain) = policy.next_attempt(first, failed) {
                        prop_assert!(at >= plain);
                        if plain >= now {
                            prop_assert_eq!(at, plain);
                        }
                    }
                }
                NextAttempt::Expired => prop_assert!(false, "lifetime is 1e12 s"),
            }
        }
    }

    #[test]
    fn schedule_table() {
        let default = [60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0];
        // (schedule, lifetime, first attempt, failed attempts, expected)
        let cases: &[(&[f64], f64, f64, u32, NextAttempt)] = &[
            (&default, 432000.0, 1000.0, 1, at(1060.0)),
            (&default, 432000.0, 1000.0, 2, at(1360.0)),
            (&default, 432000.0, 1000.0, 7, at(1000.0 + 28260.0)),
            // Past the end the last step repeats.
            (
                &default,
                432000.0,
                1000.0,
                8,
                at(1000.0 + 28260.0 + 14400.0),
            ),
            (
                &default,
                432000.0,
                1000.0,
                9,
                at(1000.0 + 28260.0 + 28800.0),
            ),
            // 28260 + 28 * 14400 = 431460 < 432000; one more step passes the lifetime.
            (&default, 432000.0, 0.0, 35, at(431460.0)),
            (&default, 432000.0, 0.0, 36, NextAttempt::Expired),
            // Fractions of a second work (tests use them).
            (&[0.2, 0.5], 10.0, 5.0, 1, at(5.2)),
            (&[0.2, 0.5], 10.0, 5.0, 3, at(6.2)),
            // An attempt landing exactly on the expiry is not made.
            (&[1.0], 3.0, 0.0, 3, NextAttempt::Expired),
            (&[1.0], 3.0, 0.0, 2, at(2.0)),
            // Zero attempts is treated as one: the caller asks only after a failure.
            (&[1.0], 3.0, 0.0, 0, at(1.0)),
            // Degenerate configurations never panic and never busy-loop.
            (&[], 100.0, 0.0, 1, NextAttempt::Expired),
            (&[0.0], 100.0, 0.0, 1, at(MIN_RETRY_STEP_SECS)),
            (&[-5.0], 100.0, 0.0, 1, at(MIN_RETRY_STEP_SECS)),
            (&[f64::NAN], 100.0, 0.0, 1, at(MIN_RETRY_STEP_SECS)),
            (&[1.0], 0.0, 0.0, 1, NextAttempt::Expired),
            (&[1.0], f64::INFINITY, 0.0, 1, at(1.0)),
            (&[f64::INFINITY], 100.0, 0.0, 1, NextAttempt::Expired),
        ];
        for (schedule, lifetime, first, failed, expected) in cases {
            let got =
                policy(schedule, *lifetime).next_attempt(Duration::from_secs_f64(*first), *failed);
            assert_eq!(
                got, *expected,
                "schedule {schedule:?} lifetime {lifetime} first {first} failed {failed}"
            );
        }
    }

    #[test]
    fn expiry_reply_quotes_the_last_attempt() {
        let last = Reply::local(451, "4.3.0 mailbox busy");
        let reply = expiry_reply(&last);
        assert_eq!(
            reply.to_string(),
            "554 5.4.7 delivery time expired; last attempt: 451 4.3.0 mailbox busy"
        );
        assert_eq!(reply.enhanced_status(), Some("5.4.7"));
    }

    #[test]
    fn a_huge_attempt_count_is_computed_without_iterating() {
        let got = policy(&[1.0], 1e12).next_attempt(Duration::ZERO, u32::MAX);
        assert_eq!(got, at(u32::MAX as f64));
    }

    proptest! {
        #[test]
        fn attempts_are_monotonic_and_before_expiry(
            schedule in proptest::collection::vec(-1.0f64..1e6, 0..10),
            lifetime in -1.0f64..1e7,
            first in 0u64..1_000_000_000,
            failed in 1u32..10_000,
        ) {
            let policy = policy(&schedule, lifetime);
            let first = Duration::from_secs(first);
            let this = policy.next_attempt(first, failed);
            let next = policy.next_attempt(first, failed.saturating_add(1));
            if let NextAttempt::At(this_at) = this {
                prop_assert!(this_at > first);
                prop_assert!(this_at < first + secs_to_duration(lifetime));
                if let NextAttempt::At(next_at) = next {
                    prop_assert!(next_at > this_at);
                }
            } else {
                prop_assert_eq!(next, NextAttempt::Expired);
            }
        }
    }
}
