//! The relay queue's pure half: what waits, when it is due, and how many connections a
//! domain's waiting mail deserves. No clock is read here: every function takes `now_ms`
//! (Unix milliseconds, the same origin as [`crate::envelope::DeferralRecord::next_attempt_ms`]),
//! so the scheduling is tested with made-up times.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::envelope::{DeferralRecord, Destination, Envelope};
use crate::relay::client::MAX_RECIPIENTS_PER_TRANSACTION;
use crate::store::RecordId;

/// Messages sent over one relay connection before it is closed and a fresh one opened: long
/// enough to amortise the handshake, short enough that one connection does not hog a slot of
/// `max_connections_per_domain` forever while the queue is busy.
pub const MESSAGES_PER_CONNECTION: usize = 100;

/// A connection is opened for every this many messages waiting for a domain (up to
/// `max_connections_per_domain`): one connection drains a trickle, a burst gets several.
pub const MESSAGES_PER_EXTRA_CONNECTION: usize = 4;

/// One delivery job: some recipients of one stored message, all in one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The message record in this shard's log.
    pub message: RecordId,
    /// The destination domain, lower case: the key connections are shared and limited by.
    pub domain: String,
    /// Indexes into the message envelope's recipients.
    pub recipients: Vec<u16>,
    /// Attempts already deferred (the retry schedule's step).
    pub attempts: u32,
    /// When the message was accepted, Unix milliseconds: the retry schedule and the queue
    /// lifetime count from here.
    pub first_attempt_ms: u64,
}

/// The domain of an address (`local@domain`), lower case; "" when there is none.
pub fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map_or(String::new(), |(_, domain)| domain.to_ascii_lowercase())
}

/// The jobs for a message's relayed recipients that are in `pending` (pass every index for a
/// fresh message): one per domain, split so that none has more recipients than one SMTP
/// transaction may carry. Recipients keep their envelope order.
pub fn jobs_for_message(
    message: RecordId,
    envelope: &Envelope,
    pending: impl Fn(u16) -> bool,
) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    for (index, recipient) in envelope.recipients.iter().enumerate() {
        let index = index as u16;
        if recipient.destination != Destination::Relay || !pending(index) {
            continue;
        }
        let domain = domain_of(&recipient.address);
        match jobs.iter_mut().find(|job| {
            job.domain == domain && job.recipients.len() < MAX_RECIPIENTS_PER_TRANSACTION
        }) {
            Some(job) => job.recipients.push(index),
            None => jobs.push(Job {
                message,
                domain,
                recipients: vec![index],
                attempts: 0,
                first_attempt_ms: envelope.received_at_us / 1000,
            }),
        }
    }
    jobs
}

/// Where each recipient of a recovered message stands in the retry schedule: its latest
/// deferral (most attempts; the later time on a tie), if any.
pub fn latest_deferrals<'a>(
    deferrals: impl IntoIterator<Item = &'a DeferralRecord>,
) -> HashMap<u16, (u32, u64)> {
    let mut latest: HashMap<u16, (u32, u64)> = HashMap::new();
    for deferral in deferrals {
        for &recipient in &deferral.recipients {
            let candidate = (deferral.attempts, deferral.next_attempt_ms);
            let slot = latest.entry(recipient).or_insert(candidate);
            if candidate > *slot {
                *slot = candidate;
            }
        }
    }
    latest
}

/// The recovered jobs of one message with when each is due: recipients with the same domain
/// and the same retry state travel together; never-deferred recipients are due now.
pub fn recovered_jobs(
    message: RecordId,
    envelope: &Envelope,
    pending: impl Fn(u16) -> bool,
    latest: &HashMap<u16, (u32, u64)>,
    now_ms: u64,
) -> Vec<(Job, u64)> {
    let mut out: Vec<(Job, u64)> = Vec::new();
    for job in jobs_for_message(message, envelope, pending) {
        for recipient in job.recipients {
            let (attempts, due_ms) = latest.get(&recipient).copied().unwrap_or((0, now_ms));
            match out.iter_mut().find(|(other, due)| {
                other.domain == job.domain
                    && other.attempts == attempts
                    && *due == due_ms
                    && other.recipients.len() < MAX_RECIPIENTS_PER_TRANSACTION
            }) {
                Some((other, _)) => other.recipients.push(recipient),
                None => out.push((
                    Job {
                        message,
                        domain: job.domain.clone(),
                        recipients: vec![recipient],
                        attempts,
                        first_attempt_ms: job.first_attempt_ms,
                    },
                    due_ms,
                )),
            }
        }
    }
    out
}

/// A job and when it is due, ordered so that the heap pops the earliest (then the oldest).
#[derive(Debug)]
struct Scheduled {
    due_ms: u64,
    sequence: u64,
    job: Job,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap and we want the earliest first.
        (other.due_ms, other.sequence).cmp(&(self.due_ms, self.sequence))
    }
}

/// Jobs waiting for their time, earliest first. Its size is bounded by the log: every job is
/// an unfinished recipient of a stored message.
#[derive(Debug, Default)]
pub struct RelayQueue {
    heap: BinaryHeap<Scheduled>,
    /// Ties on `due_ms` pop in insertion order.
    next_sequence: u64,
}

impl RelayQueue {
    /// Queues `job` to be tried at `due_ms`.
    pub fn push(&mut self, job: Job, due_ms: u64) {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.heap.push(Scheduled {
            due_ms,
            sequence,
            job,
        });
    }

    /// When the earliest job is due, if any.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.heap.peek().map(|s| s.due_ms)
    }

    /// The earliest job if it is due at `now_ms`.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<Job> {
        if self.next_due_ms()? > now_ms {
            return None;
        }
        self.heap.pop().map(|s| s.job)
    }

    /// Jobs waiting (due or not).
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// How many more connections to open for a domain with `ready` jobs waiting and `open`
/// connections of this shard already at work on it; `cap` is `max_connections_per_domain`.
/// The caller still needs a process-wide slot for each.
pub fn connections_to_open(ready: usize, open: usize, cap: usize) -> usize {
    if ready == 0 {
        return 0;
    }
    let wanted = ready
        .div_ceil(MESSAGES_PER_EXTRA_CONNECTION)
        .clamp(1, cap.max(1));
    wanted.saturating_sub(open)
}

/// How long the scheduler may sleep at `now_ms`: until the next job is due, but no longer
/// than `max_ms` (it wakes early anyway when a job is queued).
pub fn sleep_ms(queue: &RelayQueue, now_ms: u64, max_ms: u64) -> u64 {
    queue
        .next_due_ms()
        .map_or(max_ms, |due| due.saturating_sub(now_ms).min(max_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::EnvelopeRecipient;

    fn envelope(recipients: &[(&str, bool)]) -> Envelope {
        Envelope {
            received_at_us: 1_000_000_000,
            mail_from: "a@here.test".into(),
            recipients: recipients
                .iter()
                .map(|(address, relay)| EnvelopeRecipient {
                    address: (*address).into(),
                    destination: if *relay {
                        Destination::Relay
                    } else {
                        Destination::Mailbox("me@here.test".into())
                    },
                })
                .collect(),
            eight_bit: false,
            smtputf8: false,
        }
    }

    fn job(message: u64, domain: &str) -> Job {
        Job {
            message: RecordId(message),
            domain: domain.into(),
            recipients: vec![0],
            attempts: 0,
            first_attempt_ms: 0,
        }
    }

    #[test]
    fn jobs_group_relayed_recipients_by_lower_case_domain() {
        let env = envelope(&[
            ("x@Far.test", true),
            ("local@here.test", false),
            ("y@other.test", true),
            ("z@FAR.TEST", true),
        ]);
        let jobs = jobs_for_message(RecordId(7), &env, |_| true);
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].domain, "far.test");
        assert_eq!(jobs[0].recipients, vec![0, 3]);
        assert_eq!(jobs[1].domain, "other.test");
        assert_eq!(jobs[1].recipients, vec![2]);
        assert_eq!(jobs[0].first_attempt_ms, 1_000_000);
        let only_pending = jobs_for_message(RecordId(7), &env, |i| i != 0);
        let far: Vec<&Job> = only_pending
            .iter()
            .filter(|j| j.domain == "far.test")
            .collect();
        assert_eq!(far.len(), 1);
        assert_eq!(far[0].recipients, vec![3]);
    }

    #[test]
    fn a_job_never_holds_more_recipients_than_one_transaction() {
        let addresses: Vec<String> = (0..250).map(|i| format!("u{i}@far.test")).collect();
        let env = envelope(
            &addresses
                .iter()
                .map(|a| (a.as_str(), true))
                .collect::<Vec<_>>(),
        );
        let sizes: Vec<usize> = jobs_for_message(RecordId(1), &env, |_| true)
            .iter()
            .map(|j| j.recipients.len())
            .collect();
        assert_eq!(sizes, vec![100, 100, 50]);
    }

    #[test]
    fn the_latest_deferral_of_each_recipient_wins() {
        let deferrals = [
            DeferralRecord {
                message: 1,
                attempts: 1,
                next_attempt_ms: 500,
                recipients: vec![0, 1],
            },
            DeferralRecord {
                message: 1,
                attempts: 2,
                next_attempt_ms: 900,
                recipients: vec![1],
            },
        ];
        let latest = latest_deferrals(&deferrals);
        assert_eq!(latest[&0], (1, 500));
        assert_eq!(latest[&1], (2, 900));
        let env = envelope(&[
            ("a@far.test", true),
            ("b@far.test", true),
            ("c@far.test", true),
        ]);
        let jobs = recovered_jobs(RecordId(1), &env, |_| true, &latest, 100);
        let summary: Vec<(Vec<u16>, u32, u64)> = jobs
            .iter()
            .map(|(j, due)| (j.recipients.clone(), j.attempts, *due))
            .collect();
        assert_eq!(
            summary,
            vec![(vec![0], 1, 500), (vec![1], 2, 900), (vec![2], 0, 100)]
        );
    }

    #[test]
    fn the_queue_pops_due_jobs_earliest_first_then_in_arrival_order() {
        let mut queue = RelayQueue::default();
        queue.push(job(1, "a"), 300);
        queue.push(job(2, "b"), 100);
        queue.push(job(3, "c"), 100);
        assert_eq!(queue.next_due_ms(), Some(100));
        assert_eq!(queue.pop_due(99), None);
        assert_eq!(queue.pop_due(100).unwrap().message, RecordId(2));
        assert_eq!(queue.pop_due(100).unwrap().message, RecordId(3));
        assert_eq!(queue.pop_due(299), None);
        assert_eq!(queue.len(), 1);
        assert_eq!(sleep_ms(&queue, 250, 10_000), 50);
        assert_eq!(sleep_ms(&queue, 400, 10_000), 0);
        assert_eq!(sleep_ms(&queue, 0, 20), 20);
        assert_eq!(queue.pop_due(1_000).unwrap().message, RecordId(1));
        assert!(queue.is_empty());
        assert_eq!(sleep_ms(&queue, 0, 1234), 1234);
    }

    #[test]
    fn connections_follow_the_backlog_up_to_the_cap() {
        let table = [
            // (ready, open, cap, expected)
            (0, 0, 20, 0),
            (1, 0, 20, 1),
            (1, 1, 20, 0),
            (4, 0, 20, 1),
            (5, 0, 20, 2),
            (100, 0, 20, 20),
            (100, 5, 20, 15),
            (100, 0, 2, 2),
            (100, 3, 2, 0),
            (3, 0, 0, 1),
        ];
        for (ready, open, cap, expected) in table {
            assert_eq!(
                connections_to_open(ready, open, cap),
                expected,
                "ready={ready} open={open} cap={cap}"
            );
        }
    }

    #[test]
    fn domains_are_lower_case_and_missing_ones_empty() {
        assert_eq!(domain_of("A@B.Example"), "b.example");
        assert_eq!(domain_of("x@y@Z"), "z");
        assert_eq!(domain_of("postmaster"), "");
    }
}
