//! Per-shard counters and their Prometheus text encoding.
//!
//! Each shard owns one [`ShardMetrics`] behind an `Arc`: the shard is the only writer, with
//! relaxed atomic adds on its hot path; the scraper (a small HTTP responder on shard 0, see
//! [`http`] and `shard::metrics_http`) reads every shard's atomics without locks and without
//! awaiting anything on another shard, so a scrape never stalls mail traffic.
//!
//! Every metric carries a `shard` label. Counters that are a sum over shards are the sum of
//! their series; gauges (connections open, relay queue depth) likewise.

pub mod http;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::smtp::StoreFailure;
use crate::store::StoreStats;

/// SMTP reply codes counted one by one; any other code counts as `other`. These are the codes
/// ringmail's SMTP session can send (RFC 5321 §4.2, RFC 4954 for 235/334/454/530/535).
pub const SMTP_REPLY_CODES: [u16; 27] = [
    211, 214, 220, 221, 235, 250, 251, 252, 334, 354, 421, 450, 451, 452, 454, 500, 501, 502, 503,
    504, 530, 535, 550, 551, 552, 553, 554,
];

/// Replies to the end of DATA that depend on the log: `250` once durable, `451` when the
/// fdatasync failed, `452` below the free-space floor, `421` when the shard is draining,
/// `552` for a message too large for a log record (the record limit makes it unexpected).
pub const MESSAGE_OUTCOME_CODES: [u16; 5] = [250, 421, 451, 452, 552];

/// Upper bounds, in seconds, of the group-commit latency histogram buckets (`+Inf` is
/// implied). From 100 µs (a fast NVMe fdatasync) to 1 s (a disk in trouble).
pub const COMMIT_BUCKET_BOUNDS_SECS: [f64; 13] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// What became of one relay delivery attempt; fed by the relay through
/// [`ShardMetrics::record_relay_outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayOutcome {
    /// The next hop accepted the recipients (2xx after DATA).
    Delivered,
    /// A temporary failure (4xx, connection or DNS trouble): retried later.
    Deferred,
    /// A permanent failure (5xx) or the retry schedule ran out: a DSN goes to the sender.
    Bounced,
}

impl RelayOutcome {
    const ALL: [RelayOutcome; 3] = [
        RelayOutcome::Delivered,
        RelayOutcome::Deferred,
        RelayOutcome::Bounced,
    ];

    fn label(self) -> &'static str {
        match self {
            RelayOutcome::Delivered => "delivered",
            RelayOutcome::Deferred => "deferred",
            RelayOutcome::Bounced => "bounced",
        }
    }
}

/// Connection counters of one protocol on one shard.
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    /// Connections being served right now; a gauge, so operators see load and leaks.
    open: AtomicU64,
    /// Connections accepted since start (including those refused by connection limits).
    total: AtomicU64,
    /// Bytes read from clients, so throughput can be graphed next to message counts.
    bytes_in: AtomicU64,
    /// Bytes written to clients (POP3 RETR dominates).
    bytes_out: AtomicU64,
}

impl ConnectionCounters {
    /// Counts a new connection; the returned guard counts it closed when dropped, however the
    /// connection loop ends.
    pub fn opened(&self) -> OpenConnection<'_> {
        self.open.fetch_add(1, Relaxed);
        self.total.fetch_add(1, Relaxed);
        OpenConnection { counters: self }
    }

    /// `n` bytes were read from a client.
    pub fn received(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Relaxed);
    }

    /// `n` bytes were written to a client.
    pub fn sent(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Relaxed);
    }
}

/// Keeps a connection counted as open until dropped.
#[derive(Debug)]
pub struct OpenConnection<'a> {
    counters: &'a ConnectionCounters,
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Relaxed);
    }
}

/// A fixed-bucket histogram of group-commit latency, fed from the store's counters.
///
/// The store counts rounds and their total time but keeps no distribution, and its state is
/// shard-local. After each append the shard hands us the store's counters; the rounds since
/// the previous look are filed under their mean duration. With group commit every append
/// woken by one round sees that round alone (later ones see no new round), so in practice
/// each observation is one round; rounds nobody looked at in between are averaged together.
#[derive(Debug, Default)]
struct CommitHistogram {
    /// Rounds per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; COMMIT_BUCKET_BOUNDS_SECS.len() + 1],
    /// Rounds observed.
    count: AtomicU64,
    /// Nanoseconds spent in the rounds observed.
    sum_nanos: AtomicU64,
}

impl CommitHistogram {
    fn observe(&self, rounds: u64, nanos: u64) {
        if rounds == 0 {
            return;
        }
        let mean_secs = nanos as f64 / rounds as f64 / 1e9;
        let index = COMMIT_BUCKET_BOUNDS_SECS
            .iter()
            .position(|bound| mean_secs <= *bound)
            .unwrap_or(COMMIT_BUCKET_BOUNDS_SECS.len());
        self.buckets[index].fetch_add(rounds, Relaxed);
        self.count.fetch_add(rounds, Relaxed);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }
}

/// The store's counters as last seen, mirrored into atomics the scraper can read.
#[derive(Debug, Default)]
struct LogCounters {
    appends: AtomicU64,
    append_payload_bytes: AtomicU64,
    fdatasyncs: AtomicU64,
    fdatasync_failures: AtomicU64,
    commit_rounds: AtomicU64,
    overlapping_commits: AtomicU64,
    commit_nanos_total: AtomicU64,
    commit_nanos_max: AtomicU64,
    commit_latency: CommitHistogram,
}

/// Everything one shard counts. The owning shard writes; anyone may read.
#[derive(Debug)]
pub struct ShardMetrics {
    /// The shard these numbers belong to: the `shard` label.
    shard: usize,
    /// SMTP connections (MX and submission listeners).
    pub smtp: ConnectionCounters,
    /// POP3 connections.
    pub pop3: ConnectionCounters,
    /// Every SMTP reply sent, by code: refusals at RCPT (550), size (552), policy (554)…
    smtp_replies: [AtomicU64; SMTP_REPLY_CODES.len() + 1],
    /// Messages whose DATA reached the log, by the reply the client got.
    messages: [AtomicU64; MESSAGE_OUTCOME_CODES.len()],
    log: LogCounters,
    /// Messages (recipients) waiting for the relay on this shard; set by the relay.
    relay_queue_depth: AtomicU64,
    /// Relay delivery attempts by outcome, indexed like [`RelayOutcome::ALL`].
    relay_outcomes: [AtomicU64; 3],
    /// POP3 logins that succeeded.
    pop3_logins: AtomicU64,
    /// POP3 logins refused (bad user or password).
    pop3_login_failures: AtomicU64,
    /// Whole messages sent by RETR.
    pop3_retrievals: AtomicU64,
    /// Partial messages sent by TOP.
    pop3_tops: AtomicU64,
    /// Messages deleted durably at QUIT.
    pop3_deletions: AtomicU64,
}

impl ShardMetrics {
    /// Zeroed counters for shard `shard`.
    pub fn new(shard: usize) -> ShardMetrics {
        ShardMetrics {
            shard,
            smtp: ConnectionCounters::default(),
            pop3: ConnectionCounters::default(),
            smtp_replies: Default::default(),
            messages: Default::default(),
            log: LogCounters::default(),
            relay_queue_depth: AtomicU64::new(0),
            relay_outcomes: Default::default(),
            pop3_logins: AtomicU64::new(0),
            pop3_login_failures: AtomicU64::new(0),
            pop3_retrievals: AtomicU64::new(0),
            pop3_tops: AtomicU64::new(0),
            pop3_deletions: AtomicU64::new(0),
        }
    }

    /// One set per shard, for the server to hand out.
    pub fn for_shards(shard_count: usize) -> Vec<Arc<ShardMetrics>> {
        (0..shard_count)
            .map(|id| Arc::new(ShardMetrics::new(id)))
            .collect()
    }

    /// Counts the SMTP replies in `output` (the bytes about to be written) by code. Only a
    /// reply's last line (`ddd ` rather than `ddd-`) counts, so a multi-line EHLO is one reply.
    pub fn count_smtp_replies(&self, output: &[u8]) {
        for line in output.split(|b| *b == b'\n') {
            if let Some(code) = final_reply_code(line) {
                let index = SMTP_REPLY_CODES
                    .iter()
                    .position(|c| *c == code)
                    .unwrap_or(SMTP_REPLY_CODES.len());
                self.smtp_replies[index].fetch_add(1, Relaxed);
            }
        }
    }

    /// A message's DATA went to the log with this result (what `store_transaction` returned).
    pub fn record_message<T>(&self, result: &Result<T, StoreFailure>) {
        let code = match result {
            Ok(_) => 250,
            Err(StoreFailure::ShuttingDown) => 421,
            Err(StoreFailure::SyncFailed) => 451,
            Err(StoreFailure::DiskFull) => 452,
            Err(StoreFailure::TooBig) => 552,
        };
        if let Some(index) = MESSAGE_OUTCOME_CODES.iter().position(|c| *c == code) {
            self.messages[index].fetch_add(1, Relaxed);
        }
    }

    /// Mirrors the store's counters; call after appends. Rounds completed since the previous
    /// call feed the commit latency histogram.
    pub fn observe_store(&self, stats: &StoreStats) {
        let log = &self.log;
        let rounds_before = log.commit_rounds.swap(stats.commit_rounds, Relaxed);
        let nanos_before = log
            .commit_nanos_total
            .swap(stats.commit_nanos_total, Relaxed);
        log.commit_latency.observe(
            stats.commit_rounds.saturating_sub(rounds_before),
            stats.commit_nanos_total.saturating_sub(nanos_before),
        );
        log.appends.store(stats.appends, Relaxed);
        log.append_payload_bytes
            .store(stats.append_payload_bytes, Relaxed);
        log.fdatasyncs.store(stats.fdatasyncs, Relaxed);
        log.overlapping_commits
            .store(stats.overlapping_rounds, Relaxed);
        log.fdatasync_failures
            .store(stats.fdatasync_failures, Relaxed);
        log.commit_nanos_max.store(stats.commit_nanos_max, Relaxed);
    }

    /// Relay hook: how many recipients on this shard wait for delivery now.
    pub fn set_relay_queue_depth(&self, recipients: u64) {
        self.relay_queue_depth.store(recipients, Relaxed);
    }

    /// Relay hook: one delivery attempt ended so.
    pub fn record_relay_outcome(&self, outcome: RelayOutcome) {
        let index = RelayOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.relay_outcomes[index].fetch_add(1, Relaxed);
    }

    /// A POP3 password check ended so.
    pub fn record_pop3_login(&self, ok: bool) {
        let counter = if ok {
            &self.pop3_logins
        } else {
            &self.pop3_login_failures
        };
        counter.fetch_add(1, Relaxed);
    }

    /// A POP3 RETR (`top_lines` is `None`) or TOP was sent in full.
    pub fn record_pop3_message_sent(&self, top_lines: Option<u64>) {
        let counter = match top_lines {
            None => &self.pop3_retrievals,
            Some(_) => &self.pop3_tops,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// A POP3 QUIT made `messages` deletions durable.
    pub fn record_pop3_deletions(&self, messages: usize) {
        self.pop3_deletions.fetch_add(messages as u64, Relaxed);
    }
}

/// The code of a final SMTP reply line (`250 ok`, `250` alone), or `None` for a continuation
/// line (`250-…`) or anything that is not a reply line.
fn final_reply_code(line: &[u8]) -> Option<u16> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    match line.get(3) {
        None | Some(b' ') => {}
        Some(_) => return None,
    }
    Some(
        digits
            .iter()
            .fold(0u16, |n, d| n * 10 + u16::from(d - b'0')),
    )
}

/// All shards' metrics as one Prometheus collector.
#[derive(Debug, Clone)]
pub struct MetricsCollector {
    shards: Arc<[Arc<ShardMetrics>]>,
}

impl MetricsCollector {
    /// A collector over every shard's counters.
    pub fn new(shards: Arc<[Arc<ShardMetrics>]>) -> MetricsCollector {
        MetricsCollector { shards }
    }

    /// A registry holding this collector under the `ringmail` prefix.
    pub fn registry(self) -> Registry {
        let mut registry = Registry::with_prefix("ringmail");
        registry.register_collector(Box::new(self));
        registry
    }
}

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Encodes the registry in the Prometheus text format (version 0.0.4).
pub fn encode(registry: &Registry) -> String {
    let mut text = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail, and every value we encode is a plain number.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, registry);
    text
}

/// One family: a descriptor, then one sample per shard (and per extra label value).
fn counter_family<F>(
    encoder: &mut DescriptorEncoder,
    shards: &[Arc<ShardMetrics>],
    name: &str,
    help: &str,
    metric_type: MetricType,
    value: F,
) -> Result<(), std::fmt::Error>
where
    F: Fn(&ShardMetrics) -> u64,
{
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for metrics in shards {
        let labels = [("shard", metrics.shard)];
        let mut sample = family.encode_family(&labels)?;
        let v = value(metrics);
        match metric_type {
            MetricType::Gauge => sample.encode_gauge(&v)?,
            _ => sample.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
        }
    }
    Ok(())
}

/// A family with a second label besides `shard`, e.g. `code` or `protocol`.
fn labelled_family<F>(
    encoder: &mut DescriptorEncoder,
    shards: &[Arc<ShardMetrics>],
    name: &str,
    help: &str,
    metric_type: MetricType,
    label: (&str, &[String]),
    value: F,
) -> Result<(), std::fmt::Error>
where
    F: Fn(&ShardMetrics, usize) -> u64,
{
    let (key, values) = label;
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for metrics in shards {
        for (index, label_value) in values.iter().enumerate() {
            let labels = [
                ("shard", metrics.shard.to_string()),
                (key, label_value.clone()),
            ];
            let mut sample = family.encode_family(&labels)?;
            let v = value(metrics, index);
            match metric_type {
                MetricType::Gauge => sample.encode_gauge(&v)?,
                _ => sample.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
            }
        }
    }
    Ok(())
}

const PROTOCOLS: [&str; 2] = ["smtp", "pop3"];

fn connections(metrics: &ShardMetrics, protocol: usize) -> &ConnectionCounters {
    if protocol == 0 {
        &metrics.smtp
    } else {
        &metrics.pop3
    }
}

impl Collector for MetricsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let shards = &self.shards[..];
        let e = &mut encoder;
        let protocols: Vec<String> = PROTOCOLS.iter().map(|p| p.to_string()).collect();
        let load = |a: &AtomicU64| a.load(Relaxed);

        labelled_family(
            e,
            shards,
            "connections_open",
            "Connections being served now.",
            Gauge,
            ("protocol", &protocols),
            |m, p| load(&connections(m, p).open),
        )?;
        labelled_family(
            e,
            shards,
            "connections",
            "Connections accepted, including those refused by connection limits.",
            Counter,
            ("protocol", &protocols),
            |m, p| load(&connections(m, p).total),
        )?;
        labelled_family(
            e,
            shards,
            "received_bytes",
            "Bytes read from clients.",
            Counter,
            ("protocol", &protocols),
            |m, p| load(&connections(m, p).bytes_in),
        )?;
        labelled_family(
            e,
            shards,
            "sent_bytes",
            "Bytes written to clients.",
            Counter,
            ("protocol", &protocols),
            |m, p| load(&connections(m, p).bytes_out),
        )?;

        let outcome_codes: Vec<String> = MESSAGE_OUTCOME_CODES.iter().map(u16::to_string).collect();
        labelled_family(e, shards, "smtp_messages", "Messages whose DATA reached the log, by the reply sent: 250 durable, 451 fdatasync failed, 452 disk below the floor, 421 draining.", Counter,
            ("code", &outcome_codes), |m, i| load(&m.messages[i]))?;
        let mut reply_codes: Vec<String> = SMTP_REPLY_CODES.iter().map(u16::to_string).collect();
        reply_codes.push("other".to_string());
        labelled_family(
            e,
            shards,
            "smtp_replies",
            "SMTP replies sent, by code (a multi-line reply counts once).",
            Counter,
            ("code", &reply_codes),
            |m, i| load(&m.smtp_replies[i]),
        )?;

        counter_family(
            e,
            shards,
            "log_appends",
            "Records the log reported durable.",
            Counter,
            |m| load(&m.log.appends),
        )?;
        counter_family(
            e,
            shards,
            "log_appended_bytes",
            "Payload bytes of the records reported durable.",
            Counter,
            |m| load(&m.log.append_payload_bytes),
        )?;
        counter_family(
            e,
            shards,
            "log_fdatasyncs",
            "fdatasync calls completed (one per dirty segment per group commit).",
            Counter,
            |m| load(&m.log.fdatasyncs),
        )?;
        counter_family(
            e,
            shards,
            "log_overlapping_commits",
            "Group-commit rounds begun while another was still syncing.",
            Counter,
            |m| load(&m.log.overlapping_commits),
        )?;
        counter_family(
            e,
            shards,
            "log_fdatasync_failures",
            "fdatasync calls that failed.",
            Counter,
            |m| load(&m.log.fdatasync_failures),
        )?;
        counter_family(
            e,
            shards,
            "log_commit_max_nanoseconds",
            "Longest group-commit round (write and fdatasync) since start.",
            Gauge,
            |m| load(&m.log.commit_nanos_max),
        )?;
        {
            let mut family = e.encode_descriptor(
                "log_commit_seconds",
                "Group-commit round latency (write and fdatasync), filed by the mean of the rounds seen between two appends.",
                None,
                MetricType::Histogram,
            )?;
            for metrics in shards {
                let histogram = &metrics.log.commit_latency;
                let buckets: Vec<(f64, u64)> = COMMIT_BUCKET_BOUNDS_SECS
                    .iter()
                    .copied()
                    .chain(std::iter::once(f64::INFINITY))
                    .zip(histogram.buckets.iter().map(load))
                    .collect();
                let labels = [("shard", metrics.shard)];
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        load(&histogram.sum_nanos) as f64 / 1e9,
                        load(&histogram.count),
                        &buckets,
                        None,
                    )?;
            }
        }

        counter_family(
            e,
            shards,
            "relay_queue_depth",
            "Recipients waiting for the relay.",
            Gauge,
            |m| load(&m.relay_queue_depth),
        )?;
        let outcomes: Vec<String> = RelayOutcome::ALL
            .iter()
            .map(|o| o.label().to_string())
            .collect();
        labelled_family(
            e,
            shards,
            "relay_attempts",
            "Relay delivery attempts by outcome.",
            Counter,
            ("outcome", &outcomes),
            |m, i| load(&m.relay_outcomes[i]),
        )?;

        let login_results = vec!["ok".to_string(), "failed".to_string()];
        labelled_family(
            e,
            shards,
            "pop3_logins",
            "POP3 password checks by result.",
            Counter,
            ("result", &login_results),
            |m, i| {
                if i == 0 {
                    load(&m.pop3_logins)
                } else {
                    load(&m.pop3_login_failures)
                }
            },
        )?;
        counter_family(
            e,
            shards,
            "pop3_retrievals",
            "Whole messages sent by POP3 RETR.",
            Counter,
            |m| load(&m.pop3_retrievals),
        )?;
        counter_family(
            e,
            shards,
            "pop3_tops",
            "Partial messages sent by POP3 TOP.",
            Counter,
            |m| load(&m.pop3_tops),
        )?;
        counter_family(
            e,
            shards,
            "pop3_deletions",
            "Messages deleted durably at POP3 QUIT.",
            Counter,
            |m| load(&m.pop3_deletions),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
