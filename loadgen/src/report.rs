//! Figures: per-thread statistics merged at the end, live counters for the once-a-second
//! status line, the final summary and its JSON twin.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency the histograms track; anything slower is clamped to it.
const MAX_TRACKED_MICROS: u64 = 3_600_000_000;

/// The percentiles every summary shows.
pub const PERCENTILES: [(&str, f64); 4] =
    [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)];

/// Latency distribution of one phase (connect, transaction, login, retr) in microseconds.
#[derive(Debug, Clone)]
pub struct Phase {
    /// Recorded latencies, 3 significant digits.
    histogram: Histogram<u64>,
}

impl Default for Phase {
    fn default() -> Self {
        Self {
            histogram: Histogram::new_with_bounds(1, MAX_TRACKED_MICROS, 3)
                .expect("constant histogram bounds are valid"),
        }
    }
}

impl Phase {
    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_TRACKED_MICROS);
        self.histogram.saturating_record(micros);
    }

    /// Adds another thread's recordings.
    pub fn merge(&mut self, other: &Phase) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    /// Sum of every recorded latency (count × mean, to the histogram's 3 significant
    /// digits): how long all connections together spent in this phase.
    pub fn total_micros(&self) -> u64 {
        (self.histogram.mean() * self.histogram.len() as f64).round() as u64
    }

    /// Number of recorded latencies.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// Latency at `percentile` (0..=100) in microseconds.
    pub fn percentile_micros(&self, percentile: f64) -> u64 {
        self.histogram.value_at_percentile(percentile)
    }

    /// Largest recorded latency in microseconds.
    pub fn max_micros(&self) -> u64 {
        self.histogram.max()
    }
}

/// Everything one thread counted; threads merge theirs at the end.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Transactions (SMTP) or retrieved messages (POP3) that succeeded.
    pub messages_ok: u64,
    /// Message octets in successful transactions / retrievals.
    pub bytes_ok: u64,
    /// Transactions refused by the server with a 4xx/5xx reply (SMTP) or -ERR (POP3).
    pub messages_refused: u64,
    /// Connections that could not be opened (refused, timed out).
    pub connect_errors: u64,
    /// Sessions broken by an I/O error, a malformed reply, or a reply at a step where the
    /// protocol allows none of that kind (for instance a 5xx greeting).
    pub protocol_errors: u64,
    /// Open loop only: arrivals that started more than `rate::LATE_AFTER` after they were due.
    pub late_arrivals: u64,
    /// POP3 `--verify`: bodies whose checksum did not match their header.
    pub verify_mismatches: u64,
    /// POP3 `--verify`: messages without an `X-Loadgen-Checksum` header.
    pub verify_missing_header: u64,
    /// POP3: logins refused.
    pub login_failures: u64,
    /// Every reply code seen (SMTP: 3 digits; POP3: 1 = +OK, 0 = -ERR).
    pub reply_codes: BTreeMap<u16, u64>,
    /// Latency per phase name.
    pub phases: BTreeMap<&'static str, Phase>,
    /// POP3 `--login-first`: wall time during which mailboxes were retrieved with no login
    /// running, so retrieval can be rated apart from password hashing.
    pub retrieval_wall: Duration,
}

impl Stats {
    /// Counts one reply code.
    pub fn count_reply(&mut self, code: u16) {
        *self.reply_codes.entry(code).or_insert(0) += 1;
    }

    /// Records a latency for `phase`.
    pub fn record(&mut self, phase: &'static str, latency: Duration) {
        self.phases.entry(phase).or_default().record(latency);
    }

    /// Adds another thread's figures.
    pub fn merge(&mut self, other: &Stats) {
        self.messages_ok += other.messages_ok;
        self.retrieval_wall += other.retrieval_wall;
        self.bytes_ok += other.bytes_ok;
        self.messages_refused += other.messages_refused;
        self.connect_errors += other.connect_errors;
        self.protocol_errors += other.protocol_errors;
        self.late_arrivals += other.late_arrivals;
        self.verify_mismatches += other.verify_mismatches;
        self.verify_missing_header += other.verify_missing_header;
        self.login_failures += other.login_failures;
        for (code, count) in &other.reply_codes {
            *self.reply_codes.entry(*code).or_insert(0) += count;
        }
        for (name, phase) in &other.phases {
            self.phases.entry(name).or_default().merge(phase);
        }
    }

    /// Any failure that makes the exit status non-zero (see `--help`).
    pub fn failures(&self) -> u64 {
        self.messages_refused
            + self.connect_errors
            + self.protocol_errors
            + self.verify_mismatches
            + self.verify_missing_header
            + self.login_failures
    }
}

/// Counters shared by all threads, read once a second for the status line.
#[derive(Debug, Default)]
pub struct Live {
    /// Successful messages so far.
    pub messages: AtomicU64,
    /// Octets in successful messages so far.
    pub bytes: AtomicU64,
    /// Failures so far (same definition as `Stats::failures`).
    pub errors: AtomicU64,
    /// Transactions started and not yet finished.
    pub in_flight: AtomicU64,
}

impl Live {
    /// Adds to one counter; relaxed because the status line needs no ordering.
    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    /// Subtracts from one counter.
    pub fn sub(counter: &AtomicU64, value: u64) {
        counter.fetch_sub(value, Ordering::Relaxed);
    }
}

/// Previous readings, so the status line can show rates over the last interval.
#[derive(Debug, Default)]
pub struct StatusLine {
    /// Messages at the previous tick.
    last_messages: u64,
    /// Bytes at the previous tick.
    last_bytes: u64,
}

impl StatusLine {
    /// Formats the line for an interval of `interval` that ends `elapsed` into the run.
    pub fn tick(&mut self, live: &Live, elapsed: Duration, interval: Duration) -> String {
        let messages = live.messages.load(Ordering::Relaxed);
        let bytes = live.bytes.load(Ordering::Relaxed);
        let secs = interval.as_secs_f64().max(1e-9);
        let line = format!(
            "[{:>6.1}s] {:>9.0} msgs/s {:>8.2} MB/s  total {:>10}  errors {:>6}  in flight {:>5}",
            elapsed.as_secs_f64(),
            (messages - self.last_messages) as f64 / secs,
            (bytes - self.last_bytes) as f64 / secs / 1e6,
            messages,
            live.errors.load(Ordering::Relaxed),
            live.in_flight.load(Ordering::Relaxed),
        );
        self.last_messages = messages;
        self.last_bytes = bytes;
        line
    }
}

/// Formats microseconds for people: `850us`, `12.3ms`, `1.20s`.
pub fn human_micros(micros: u64) -> String {
    if micros < 1_000 {
        format!("{micros}us")
    } else if micros < 1_000_000 {
        format!("{:.2}ms", micros as f64 / 1e3)
    } else {
        format!("{:.2}s", micros as f64 / 1e6)
    }
}

/// The final summary for people.
pub fn summary_text(mode: &str, stats: &Stats, elapsed: Duration) -> String {
    use std::fmt::Write;
    let secs = elapsed.as_secs_f64().max(1e-9);
    let mut out = String::new();
    let _ = writeln!(out, "== loadgen {mode}: summary ==");
    let _ = writeln!(
        out,
        "elapsed {:.2}s  messages {}  bytes {}  {:.0} msgs/s  {:.2} MB/s",
        secs,
        stats.messages_ok,
        stats.bytes_ok,
        stats.messages_ok as f64 / secs,
        stats.bytes_ok as f64 / secs / 1e6
    );
    let _ = writeln!(
        out,
        "refused {}  connect errors {}  protocol errors {}  late arrivals {}  login failures {}  verify mismatches {}  missing checksum {}",
        stats.messages_refused,
        stats.connect_errors,
        stats.protocol_errors,
        stats.late_arrivals,
        stats.login_failures,
        stats.verify_mismatches,
        stats.verify_missing_header
    );
    let codes: Vec<String> = stats
        .reply_codes
        .iter()
        .map(|(code, count)| format!("{}:{count}", code_name(mode, *code)))
        .collect();
    let _ = writeln!(out, "reply codes {}", codes.join(" "));
    if !stats.retrieval_wall.is_zero() {
        let _ = writeln!(
            out,
            "retrieval with no login running: {:.2}s  {:.0} msgs/s  {:.2} MB/s",
            stats.retrieval_wall.as_secs_f64(),
            stats.messages_ok as f64 / stats.retrieval_wall.as_secs_f64(),
            stats.bytes_ok as f64 / stats.retrieval_wall.as_secs_f64() / 1e6
        );
    }
    for (name, phase) in &stats.phases {
        let mut line = format!("{name:<12} n={:<9}", phase.count());
        for (label, percentile) in PERCENTILES {
            let _ = write!(
                line,
                " {label}={}",
                human_micros(phase.percentile_micros(percentile))
            );
        }
        let _ = write!(line, " max={}", human_micros(phase.max_micros()));
        let _ = writeln!(out, "{line}");
    }
    out
}

/// POP3 replies have no numeric code; we count +OK as 1 and -ERR as 0.
fn code_name(mode: &str, code: u16) -> String {
    match (mode, code) {
        ("pop3", 1) => "+OK".to_string(),
        ("pop3", 0) => "-ERR".to_string(),
        _ => code.to_string(),
    }
}

/// The same figures as `summary_text`, for machines.
pub fn summary_json(mode: &str, stats: &Stats, elapsed: Duration) -> serde_json::Value {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let mut phases = serde_json::Map::new();
    for (name, phase) in &stats.phases {
        let mut figures = serde_json::Map::new();
        figures.insert("count".into(), phase.count().into());
        for (label, percentile) in PERCENTILES {
            figures.insert(
                format!("{label}_us"),
                phase.percentile_micros(percentile).into(),
            );
        }
        figures.insert("max_us".into(), phase.max_micros().into());
        figures.insert("total_us".into(), phase.total_micros().into());
        phases.insert((*name).to_string(), figures.into());
    }
    let codes: serde_json::Map<String, serde_json::Value> = stats
        .reply_codes
        .iter()
        .map(|(code, count)| (code_name(mode, *code), (*count).into()))
        .collect();
    let retrieval_secs = stats.retrieval_wall.as_secs_f64();
    let retrieval = (retrieval_secs > 0.0).then(|| {
        serde_json::json!({
            "secs": retrieval_secs,
            "msgs_per_sec": stats.messages_ok as f64 / retrieval_secs,
            "mb_per_sec": stats.bytes_ok as f64 / retrieval_secs / 1e6,
        })
    });
    serde_json::json!({
        "mode": mode,
        "retrieval": retrieval,
        "elapsed_secs": secs,
        "messages": stats.messages_ok,
        "bytes": stats.bytes_ok,
        "msgs_per_sec": stats.messages_ok as f64 / secs,
        "mb_per_sec": stats.bytes_ok as f64 / secs / 1e6,
        "refused": stats.messages_refused,
        "connect_errors": stats.connect_errors,
        "protocol_errors": stats.protocol_errors,
        "late_arrivals": stats.late_arrivals,
        "login_failures": stats.login_failures,
        "verify_mismatches": stats.verify_mismatches,
        "verify_missing_header": stats.verify_missing_header,
        "failures": stats.failures(),
        "reply_codes": codes,
        "latency": phases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut phase = Phase::default();
        for micros in 1..=1000u64 {
            phase.record(Duration::from_micros(micros));
        }
        assert_eq!(phase.count(), 1000);
        let p50 = phase.percentile_micros(50.0);
        let p99 = phase.percentile_micros(99.0);
        assert!((499..=501).contains(&p50), "p50 {p50}");
        assert!((989..=991).contains(&p99), "p99 {p99}");
        assert_eq!(phase.max_micros(), 1000);
    }

    #[test]
    fn clamps_out_of_range_latencies() {
        let mut phase = Phase::default();
        phase.record(Duration::ZERO);
        phase.record(Duration::from_secs(10_000));
        assert_eq!(phase.count(), 2);
        assert!(phase.max_micros() >= MAX_TRACKED_MICROS);
    }

    #[test]
    fn merge_adds_counts_and_histograms() {
        let mut a = Stats {
            messages_ok: 3,
            ..Stats::default()
        };
        a.count_reply(250);
        a.record("connect", Duration::from_micros(10));
        let mut b = Stats {
            messages_ok: 4,
            protocol_errors: 1,
            ..Stats::default()
        };
        b.count_reply(250);
        b.count_reply(451);
        b.record("connect", Duration::from_micros(20));
        b.record("transaction", Duration::from_micros(30));
        a.merge(&b);
        assert_eq!(a.messages_ok, 7);
        assert_eq!(a.failures(), 1);
        assert_eq!(a.reply_codes[&250], 2);
        assert_eq!(a.reply_codes[&451], 1);
        assert_eq!(a.phases["connect"].count(), 2);
        assert_eq!(a.phases["transaction"].count(), 1);
    }

    #[test]
    fn json_has_the_summary_figures() {
        let mut stats = Stats {
            messages_ok: 10,
            bytes_ok: 10_000,
            ..Stats::default()
        };
        stats.count_reply(250);
        stats.record("transaction", Duration::from_millis(2));
        let json = summary_json("smtp", &stats, Duration::from_secs(2));
        assert_eq!(json["messages"], 10);
        assert_eq!(json["msgs_per_sec"], 5.0);
        assert_eq!(json["reply_codes"]["250"], 1);
        assert_eq!(json["latency"]["transaction"]["count"], 1);
        assert!(json["latency"]["transaction"]["p99.9_us"].as_u64().unwrap() >= 1999);
        let text = summary_text("smtp", &stats, Duration::from_secs(2));
        assert!(text.contains("5 msgs/s"), "{text}");
        assert!(text.contains("250:1"), "{text}");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_micros(850), "850us");
        assert_eq!(human_micros(12_345), "12.35ms");
        assert_eq!(human_micros(1_200_000), "1.20s");
    }

    #[test]
    fn status_line_shows_interval_rates() {
        let live = Live::default();
        let mut status = StatusLine::default();
        Live::add(&live.messages, 500);
        Live::add(&live.bytes, 2_000_000);
        let line = status.tick(&live, Duration::from_secs(1), Duration::from_millis(500));
        assert!(line.contains("1000 msgs/s"), "{line}");
        assert!(line.contains("4.00 MB/s"), "{line}");
    }
}
