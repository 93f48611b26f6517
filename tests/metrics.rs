//! Prometheus metrics on the real binary (issue 8): scraped during a load, the counters move
//! as the load says; anything but `/metrics` is 404.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{mail_config, pop3_retrieve_all, send_mail, BIN};

/// The server with its listeners; killed when dropped. (`common::Server` waits only for the
/// `[section] listen` lines, so this test reads the `metrics listening on` line itself.)
struct Running {
    child: Child,
    listeners: HashMap<String, SocketAddr>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &std::path::Path, config: &str) -> Running {
    let path = dir.join("ringmail.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .env("RINGMAIL_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ringmail");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut listeners = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while listeners.len() < 3 {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("ringmail did not print its three listening lines");
        if let Some((label, rest)) = line.split_once(" listening on ") {
            let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
            listeners.insert(label.to_string(), addr);
        }
    }
    Running { child, listeners }
}

/// One HTTP request; returns (status code, body).
fn http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("no head");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(body.len(), length, "Content-Length must match the body");
    (status, body.to_string())
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(status, 200);
    body
}

/// The sum over shards of every sample of `name` whose labels contain all of `labels`.
fn total(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

#[test]
fn counters_move_as_the_load_says() {
    const SENDERS: usize = 5;
    const PER_SENDER: usize = 10;
    const MESSAGES: usize = SENDERS * PER_SENDER;
    let dir = tempfile::tempdir().unwrap();
    let config = mail_config(dir.path(), 2, r#"metrics_listen = "127.0.0.1:0""#, "");
    let server = start(dir.path(), &config);
    let (smtp, pop3, metrics) = (
        server.listeners["smtp"],
        server.listeners["pop3"],
        server.listeners["metrics"],
    );
    assert_eq!(
        total(&scrape(metrics), "ringmail_smtp_messages_total", &[]),
        0.0
    );

    // Scrape continuously while the load runs: every scrape answers, counts never go back.
    let loading = Arc::new(AtomicBool::new(true));
    let scraper = {
        let loading = Arc::clone(&loading);
        std::thread::spawn(move || {
            let mut scrapes = 0;
            let mut last = 0.0;
            while loading.load(Ordering::Relaxed) {
                let now = total(
                    &scrape(metrics),
                    "ringmail_smtp_messages_total",
                    &[r#"code="250""#],
                );
                assert!(now >= last, "accepted went from {last} to {now}");
                last = now;
                scrapes += 1;
            }
            scrapes
        })
    };
    let body = format!("Subject: load\r\n\r\n{}\r\n", "x".repeat(1000));
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                for _ in 0..PER_SENDER {
                    let reply = send_mail(
                        smtp,
                        "s@remote.test",
                        &["alice@example.test"],
                        body.as_bytes(),
                    );
                    assert!(reply.starts_with("250"), "{reply}");
                }
            })
        })
        .collect();
    for sender in senders {
        sender.join().unwrap();
    }
    loading.store(false, Ordering::Relaxed);
    assert!(scraper.join().unwrap() > 0);

    let text = scrape(metrics);
    let accepted = total(&text, "ringmail_smtp_messages_total", &[r#"code="250""#]);
    assert_eq!(accepted, MESSAGES as f64, "{text}");
    assert!(total(&text, "ringmail_log_appends_total", &[]) >= MESSAGES as f64);
    assert!(total(&text, "ringmail_log_fdatasyncs_total", &[]) > 0.0);
    let rounds = total(&text, "ringmail_log_commit_seconds_count", &[]);
    assert!(rounds > 0.0);
    assert_eq!(
        total(
            &text,
            "ringmail_log_commit_seconds_bucket",
            &[r#"le="+Inf""#]
        ),
        rounds
    );
    assert!(total(&text, "ringmail_connections_total", &[r#"protocol="smtp""#]) >= MESSAGES as f64);
    assert!(
        total(
            &text,
            "ringmail_received_bytes_total",
            &[r#"protocol="smtp""#]
        ) >= (MESSAGES * body.len()) as f64
    );
    // Per message: 220 greeting, EHLO, MAIL, RCPT, DATA's 354, the 250 after data, QUIT's 221.
    assert_eq!(
        total(&text, "ringmail_smtp_replies_total", &[r#"code="220""#]),
        MESSAGES as f64
    );
    assert_eq!(
        total(&text, "ringmail_smtp_replies_total", &[r#"code="354""#]),
        MESSAGES as f64
    );
    assert_eq!(
        total(&text, "ringmail_smtp_replies_total", &[r#"code="250""#]),
        (4 * MESSAGES) as f64
    );
    assert_eq!(
        total(&text, "ringmail_smtp_replies_total", &[r#"code="221""#]),
        MESSAGES as f64
    );

    // A refused recipient shows up under its code.
    let mut client = common::LineClient::connect(smtp);
    client.reply();
    client.command("EHLO client.test");
    client.command("MAIL FROM:<s@remote.test>");
    let refused = client.command("RCPT TO:<nobody@example.test>");
    let code = &refused[..3];
    assert!(code.starts_with('5'), "{refused}");
    client.command("QUIT");
    let text = scrape(metrics);
    assert_eq!(
        total(
            &text,
            "ringmail_smtp_replies_total",
            &[&format!("code=\"{code}\"")]
        ),
        1.0
    );

    // POP3: one login, every message retrieved.
    let retrieved = pop3_retrieve_all(pop3, "alice@example.test");
    assert_eq!(retrieved.len(), MESSAGES);
    let text = scrape(metrics);
    assert_eq!(
        total(&text, "ringmail_pop3_logins_total", &[r#"result="ok""#]),
        1.0
    );
    assert_eq!(
        total(&text, "ringmail_pop3_retrievals_total", &[]),
        MESSAGES as f64
    );
    let retrieved_bytes: usize = retrieved.iter().map(Vec::len).sum();
    assert!(
        total(&text, "ringmail_sent_bytes_total", &[r#"protocol="pop3""#])
            >= retrieved_bytes as f64
    );
    // The server closes after answering QUIT, so give it a moment to count the close.
    let deadline = Instant::now() + Duration::from_secs(5);
    while total(&scrape(metrics), "ringmail_connections_open", &[]) > 0.0 {
        assert!(Instant::now() < deadline, "connections still counted open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn anything_but_get_metrics_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = mail_config(dir.path(), 1, r#"metrics_listen = "127.0.0.1:0""#, "");
    let server = start(dir.path(), &config);
    let metrics = server.listeners["metrics"];
    let table: &[(&[u8], u16)] = &[
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 404),
        (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", 200),
        (b"hello\r\n\r\n", 400),
    ];
    for (request, status) in table {
        assert_eq!(
            http(metrics, request).0,
            *status,
            "{}",
            String::from_utf8_lossy(request)
        );
    }
    let (_, text) = http(metrics, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(text.contains("# TYPE ringmail_log_commit_seconds histogram\n"));

    // An endless head is cut off at the limit, and the server still answers others.
    let mut endless = TcpStream::connect(metrics).unwrap();
    endless
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Exactly the limit, so that the server has read everything when it answers and closes.
    let mut head = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    head.resize(8 * 1024, b'a');
    endless.write_all(&head).unwrap();
    let mut response = Vec::new();
    let _ = endless.read_to_end(&mut response);
    assert!(
        response.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    assert_eq!(http(metrics, b"GET /metrics HTTP/1.1\r\n\r\n").0, 200);
}
