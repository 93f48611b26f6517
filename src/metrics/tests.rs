use super::*;
use proptest::prelude::*;

fn scrape(shards: Vec<Arc<ShardMetrics>>) -> String {
    encode(&MetricsCollector::new(shards.into()).registry())
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn final_reply_codes() {
    let table: &[(&[u8], Option<u16>)] = &[
        (b"250 2.0.0 Ok\r", Some(250)),
        (b"250 2.0.0 Ok", Some(250)),
        (b"250", Some(250)),
        (b"250-PIPELINING\r", None),
        (b"354 End data with <CR><LF>.<CR><LF>\r", Some(354)),
        (b"", None),
        (b"25", None),
        (b"2a0 x", None),
        (b"2500 x", None),
    ];
    for (line, expected) in table {
        assert_eq!(
            final_reply_code(line),
            *expected,
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn smtp_replies_are_counted_by_code_once_per_reply() {
    let metrics = ShardMetrics::new(0);
    metrics.count_smtp_replies(
        b"250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n250 2.1.0 Ok\r\n550 5.1.1 no\r\n",
    );
    metrics.count_smtp_replies(b"552 5.3.4 too big\r\n299 odd\r\n");
    let at = |code: u16| {
        let index = SMTP_REPLY_CODES.iter().position(|c| *c == code).unwrap();
        metrics.smtp_replies[index].load(Relaxed)
    };
    assert_eq!(at(250), 2);
    assert_eq!(at(550), 1);
    assert_eq!(at(552), 1);
    assert_eq!(
        metrics.smtp_replies[SMTP_REPLY_CODES.len()].load(Relaxed),
        1
    );
}

#[test]
fn message_outcomes_follow_the_store_result() {
    let metrics = ShardMetrics::new(3);
    metrics.record_message::<()>(&Ok(()));
    metrics.record_message::<()>(&Ok(()));
    metrics.record_message::<()>(&Err(StoreFailure::SyncFailed));
    metrics.record_message::<()>(&Err(StoreFailure::DiskFull));
    metrics.record_message::<()>(&Err(StoreFailure::TooBig));
    let text = scrape(vec![Arc::new(metrics)]);
    assert_eq!(
        sample(
            &text,
            r#"ringmail_smtp_messages_total{shard="3",code="250"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"ringmail_smtp_messages_total{shard="3",code="451"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"ringmail_smtp_messages_total{shard="3",code="452"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"ringmail_smtp_messages_total{shard="3",code="552"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"ringmail_smtp_messages_total{shard="3",code="421"}"#
        ),
        Some(0.0)
    );
}

#[test]
fn connection_guard_counts_open_and_total() {
    let metrics = Arc::new(ShardMetrics::new(0));
    {
        let _a = metrics.smtp.opened();
        let _b = metrics.smtp.opened();
        assert_eq!(metrics.smtp.open.load(Relaxed), 2);
    }
    let _c = metrics.pop3.opened();
    assert_eq!(metrics.smtp.open.load(Relaxed), 0);
    assert_eq!(metrics.smtp.total.load(Relaxed), 2);
    let text = scrape(vec![Arc::clone(&metrics)]);
    assert_eq!(
        sample(
            &text,
            r#"ringmail_connections_open{shard="0",protocol="pop3"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"ringmail_connections_total{shard="0",protocol="smtp"}"#
        ),
        Some(2.0)
    );
}

fn stats(rounds: u64, nanos: u64, fdatasyncs: u64) -> StoreStats {
    StoreStats {
        appends: rounds * 2,
        commit_rounds: rounds,
        commit_nanos_total: nanos,
        commit_nanos_max: nanos,
        fdatasyncs,
        overlapping_rounds: rounds / 2,
        ..StoreStats::default()
    }
}

#[test]
fn commit_histogram_files_new_rounds_by_their_mean() {
    let metrics = ShardMetrics::new(1);
    // One round of 0.3 ms, then nothing new, then two rounds totalling 40 ms (20 ms each).
    metrics.observe_store(&stats(1, 300_000, 1));
    metrics.observe_store(&stats(1, 300_000, 1));
    metrics.observe_store(&stats(3, 40_300_000, 3));
    let histogram = &metrics.log.commit_latency;
    assert_eq!(histogram.count.load(Relaxed), 3);
    assert_eq!(histogram.sum_nanos.load(Relaxed), 40_300_000);
    let text = scrape(vec![Arc::new(metrics)]);
    let bucket = |le: &str| {
        sample(
            &text,
            &format!(r#"ringmail_log_commit_seconds_bucket{{shard="1",le="{le}"}}"#),
        )
    };
    assert_eq!(bucket("0.00025"), Some(0.0));
    assert_eq!(bucket("0.0005"), Some(1.0));
    assert_eq!(bucket("0.01"), Some(1.0));
    assert_eq!(bucket("0.025"), Some(3.0));
    assert_eq!(bucket("+Inf"), Some(3.0));
    assert_eq!(
        sample(&text, r#"ringmail_log_commit_seconds_count{shard="1"}"#),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, r#"ringmail_log_fdatasyncs_total{shard="1"}"#),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, r#"ringmail_log_appends_total{shard="1"}"#),
        Some(6.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"ringmail_log_overlapping_commits_total{shard="1"}"#
        ),
        Some(1.0)
    );
}

#[test]
fn slow_rounds_land_in_the_overflow_bucket() {
    let metrics = ShardMetrics::new(0);
    metrics.observe_store(&stats(1, 3_000_000_000, 1));
    let last = COMMIT_BUCKET_BOUNDS_SECS.len();
    assert_eq!(metrics.log.commit_latency.buckets[last].load(Relaxed), 1);
}

#[test]
fn relay_and_pop3_hooks() {
    let metrics = ShardMetrics::new(0);
    metrics.set_relay_queue_depth(7);
    metrics.record_relay_outcome(RelayOutcome::Delivered);
    metrics.record_relay_outcome(RelayOutcome::Delivered);
    metrics.record_relay_outcome(RelayOutcome::Bounced);
    metrics.record_pop3_login(true);
    metrics.record_pop3_login(false);
    metrics.record_pop3_message_sent(None);
    metrics.record_pop3_message_sent(Some(0));
    metrics.record_pop3_deletions(4);
    let text = scrape(vec![Arc::new(metrics)]);
    for (series, value) in [
        (r#"ringmail_relay_queue_depth{shard="0"}"#, 7.0),
        (
            r#"ringmail_relay_attempts_total{shard="0",outcome="delivered"}"#,
            2.0,
        ),
        (
            r#"ringmail_relay_attempts_total{shard="0",outcome="deferred"}"#,
            0.0,
        ),
        (
            r#"ringmail_relay_attempts_total{shard="0",outcome="bounced"}"#,
            1.0,
        ),
        (r#"ringmail_pop3_logins_total{shard="0",result="ok"}"#, 1.0),
        (
            r#"ringmail_pop3_logins_total{shard="0",result="failed"}"#,
            1.0,
        ),
        (r#"ringmail_pop3_retrievals_total{shard="0"}"#, 1.0),
        (r#"ringmail_pop3_tops_total{shard="0"}"#, 1.0),
        (r#"ringmail_pop3_deletions_total{shard="0"}"#, 4.0),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
}

#[test]
fn every_shard_gets_its_series_and_types_are_declared() {
    let text = scrape(ShardMetrics::for_shards(3));
    for shard in 0..3 {
        let series = format!(r#"ringmail_log_fdatasyncs_total{{shard="{shard}"}}"#);
        assert_eq!(sample(&text, &series), Some(0.0));
    }
    assert!(text.contains("# TYPE ringmail_connections_open gauge\n"));
    assert!(text.contains("# TYPE ringmail_smtp_replies_total counter\n"));
    assert!(text.contains("# TYPE ringmail_log_commit_seconds histogram\n"));
    // Every line is a comment or `name{labels} value`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').expect(line);
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}

proptest! {
    #[test]
    fn reply_counting_never_panics_and_counts_at_most_one_per_line(
        output in proptest::collection::vec(any::<u8>(), 0..2_000)
    ) {
        let metrics = ShardMetrics::new(0);
        metrics.count_smtp_replies(&output);
        let counted: u64 = metrics.smtp_replies.iter().map(|c| c.load(Relaxed)).sum();
        let lines = output.split(|b| *b == b'\n').count() as u64;
        prop_assert!(counted <= lines);
    }

    #[test]
    fn well_formed_replies_are_all_counted(codes in proptest::collection::vec(200u16..600, 0..50)) {
        let metrics = ShardMetrics::new(0);
        let output: String = codes.iter().map(|c| format!("{c}-first\r\n{c} last\r\n")).collect();
        metrics.count_smtp_replies(output.as_bytes());
        let counted: u64 = metrics.smtp_replies.iter().map(|c| c.load(Relaxed)).sum();
        prop_assert_eq!(counted, codes.len() as u64);
    }
}
