//! The relay on the real binary (issue 7): a fake DNS on 127.0.0.1 and scripted MX servers on
//! 127.0.0.2, 127.0.0.3 … at the port from `relay.port`. All traffic stays on loopback; the
//! system resolver is never asked.

mod common;

#[allow(dead_code)]
#[path = "../src/relay/fake_dns.rs"]
mod fake_dns;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::{mail_config, pop3_retrieve_all, send_mail, Server};

/// The fake DNS, served by a glommio executor of its own; `tcp_queries` mirrors its count.
struct Dns {
    addr: SocketAddr,
    tcp_queries: Arc<AtomicU64>,
}

fn start_dns(zone: fake_dns::Zone) -> Dns {
    let (tx, rx) = mpsc::channel();
    let tcp_queries = Arc::new(AtomicU64::new(0));
    let mirror = Arc::clone(&tcp_queries);
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let dns = fake_dns::spawn(zone);
            tx.send(dns.addr).unwrap();
            loop {
                mirror.store(dns.tcp_queries.get(), Ordering::SeqCst);
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        })
        .expect("fake DNS executor");
    Dns {
        addr: rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        tcp_queries,
    }
}

/// Reply to RCPT given the recipient and how many RCPTs the server saw before.
type RcptReply = dyn Fn(&str, usize) -> String + Send + Sync;

/// How a scripted MX answers.
#[derive(Clone)]
struct Script {
    greeting: String,
    /// The whole EHLO reply.
    ehlo: String,
    /// Reply to RCPT given the recipient and how many RCPTs this server saw before.
    rcpt: Arc<RcptReply>,
    /// Reply at the end of data given how many messages ended before.
    data_end: Arc<dyn Fn(usize) -> String + Send + Sync>,
    /// Pause before answering the end of data.
    data_end_delay: Duration,
    /// Offer STARTTLS with this identity (`None`: not offered).
    starttls: Option<Arc<rustls::ServerConfig>>,
    /// Answer STARTTLS with 220 and then garbage instead of a handshake.
    broken_starttls: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            greeting: "220 far.test ESMTP fake".into(),
            ehlo: "250-far.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 100000000\r\n250 ENHANCEDSTATUSCODES".into(),
            rcpt: Arc::new(|_, _| "250 2.1.5 ok".into()),
            data_end: Arc::new(|_| "250 2.0.0 queued".into()),
            data_end_delay: Duration::ZERO,
            starttls: None,
            broken_starttls: false,
        }
    }
}

/// One message as the MX received it.
#[derive(Clone, Debug)]
struct Delivered {
    from: String,
    to: Vec<String>,
    /// The data as it travelled (dot-stuffed), terminator excluded.
    data: Vec<u8>,
}

#[derive(Default)]
struct MxLog {
    connections: AtomicUsize,
    /// Sessions that completed a TLS handshake.
    tls_sessions: AtomicUsize,
    rcpts: AtomicUsize,
    data_ends: AtomicUsize,
    accepted: Mutex<Vec<Delivered>>,
}

/// A scripted SMTP server on `ip:port`; on 127.0.0.2 it takes the socket
/// [`free_relay_port`] reserved.
fn start_mx(ip: &str, port: u16, script: Script) -> Arc<MxLog> {
    let reserved = {
        let mut reserved = RESERVED_RELAY_PORTS.lock().unwrap();
        let at = reserved
            .iter()
            .position(|s| ip == "127.0.0.2" && reserved_port(s) == port);
        at.map(|at| reserved.swap_remove(at))
    };
    let listener: TcpListener = match reserved {
        Some(socket) => {
            socket.listen(128).expect("listen fake MX");
            socket.into()
        }
        None => TcpListener::bind((ip, port)).expect("bind fake MX"),
    };
    let log = Arc::new(MxLog::default());
    let server_log = Arc::clone(&log);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            server_log.connections.fetch_add(1, Ordering::SeqCst);
            let (log, script) = (Arc::clone(&server_log), script.clone());
            std::thread::spawn(move || serve_mx(stream, &script, &log));
        }
    });
    log
}

/// The address between the angle brackets of a MAIL or RCPT argument.
fn path(argument: &str) -> String {
    let open = argument.find('<').map_or(0, |i| i + 1);
    let close = argument[open..]
        .find('>')
        .map_or(argument.len(), |i| open + i);
    argument[open..close].to_string()
}

/// How a session over one stream ended.
enum Ended {
    Done,
    /// The client asked for TLS and the 220 went out: hand the socket to the handshake.
    StartTls,
}

fn serve_mx(stream: TcpStream, script: &Script, log: &MxLog) {
    let mut reader = BufReader::new(stream);
    if !say(&mut reader, &script.greeting) || !script.greeting.starts_with('2') {
        return;
    }
    if let Ended::StartTls = serve_lines(&mut reader, script, log, false) {
        let Some(config) = script.starttls.clone() else {
            return;
        };
        let tcp = reader.into_inner();
        let connection = rustls::ServerConnection::new(config).unwrap();
        let mut tls = BufReader::new(rustls::StreamOwned::new(connection, tcp));
        // The handshake runs on the first read; a failed one ends the session.
        if tls.fill_buf().is_err() {
            return;
        }
        log.tls_sessions.fetch_add(1, Ordering::SeqCst);
        serve_lines(&mut tls, script, log, true);
    }
}

fn say<S: std::io::Read + Write>(stream: &mut BufReader<S>, text: &str) -> bool {
    let out = stream.get_mut();
    out.write_all(format!("{text}\r\n").as_bytes()).is_ok() && out.flush().is_ok()
}

fn serve_lines<S: std::io::Read + Write>(
    reader: &mut BufReader<S>,
    script: &Script,
    log: &MxLog,
    encrypted: bool,
) -> Ended {
    let offer_tls = (script.starttls.is_some() || script.broken_starttls) && !encrypted;
    let mut from = String::new();
    let mut to: Vec<String> = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return Ended::Done;
        }
        let line = line.trim_end().to_string();
        let upper = line.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO") {
            if offer_tls {
                script.ehlo.replacen("250 ", "250-STARTTLS\r\n250 ", 1)
            } else {
                script.ehlo.clone()
            }
        } else if upper == "STARTTLS" && offer_tls {
            if script.broken_starttls {
                say(reader, "220 2.0.0 go ahead");
                say(reader, "this is not a TLS ServerHello");
                return Ended::Done;
            }
            say(reader, "220 2.0.0 go ahead");
            return Ended::StartTls;
        } else if upper.starts_with("MAIL FROM:") {
            from = path(&line[10..]);
            to.clear();
            "250 2.1.0 ok".into()
        } else if upper.starts_with("RCPT TO:") {
            let rcpt = path(&line[8..]);
            let seen = log.rcpts.fetch_add(1, Ordering::SeqCst);
            let reply = (script.rcpt)(&rcpt, seen);
            if reply.starts_with('2') {
                to.push(rcpt);
            }
            reply
        } else if upper == "DATA" {
            if to.is_empty() {
                "554 5.5.1 no valid recipients".into()
            } else {
                say(reader, "354 go ahead");
                let mut data = Vec::new();
                loop {
                    let mut raw = Vec::new();
                    if reader.read_until(b'\n', &mut raw).unwrap_or(0) == 0 {
                        return Ended::Done;
                    }
                    if raw == b".\r\n" {
                        break;
                    }
                    data.extend_from_slice(&raw);
                }
                std::thread::sleep(script.data_end_delay);
                let seen = log.data_ends.fetch_add(1, Ordering::SeqCst);
                let reply = (script.data_end)(seen);
                if reply.starts_with('2') {
                    log.accepted.lock().unwrap().push(Delivered {
                        from: from.clone(),
                        to: to.clone(),
                        data,
                    });
                }
                reply
            }
        } else if upper == "RSET" {
            to.clear();
            "250 2.0.0 ok".into()
        } else if upper == "QUIT" {
            say(reader, "221 2.0.0 bye");
            return Ended::Done;
        } else {
            "250 2.0.0 ok".into()
        };
        if !say(reader, &reply) {
            return Ended::Done;
        }
    }
}

/// An MX that refuses every recipient whose local part starts with "nobody".
fn refusing_nobody() -> Script {
    Script {
        rcpt: Arc::new(|rcpt, _| {
            if rcpt.starts_with("nobody") {
                "550 5.1.1 no such user".into()
            } else {
                "250 2.1.5 ok".into()
            }
        }),
        ..Script::default()
    }
}

/// The zone most tests use: far.test has one MX, mx1.far.test, on 127.0.0.2.
fn far_test_zone() -> fake_dns::Zone {
    let mut zone = fake_dns::Zone::default();
    zone.mx("far.test", &[(10, "mx1.far.test")]);
    zone.a("mx1.far.test", "127.0.0.2");
    zone
}

/// Sockets bound (not listening) on 127.0.0.2 by [`free_relay_port`], until a fake MX takes
/// one over: held, the port cannot go to another socket in between (tests run side by side
/// and open connections all the time), and not listening, a connection to it is refused as
/// to a free port.
static RESERVED_RELAY_PORTS: Mutex<Vec<socket2::Socket>> = Mutex::new(Vec::new());

fn reserved_port(socket: &socket2::Socket) -> u16 {
    socket.local_addr().unwrap().as_socket().unwrap().port()
}

/// A port of 127.0.0.2 reserved for this test's fake MX (and, in practice, free on the other
/// 127.0.0.x addresses).
fn free_relay_port() -> u16 {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let port = reserved_port(&socket);
    RESERVED_RELAY_PORTS.lock().unwrap().push(socket);
    port
}

/// `mail_config` with its relay pointed at the fake DNS and MX port, and quick retries.
fn relay_config(dir: &Path, dns: SocketAddr, port: u16, extra_relay: &str) -> String {
    mail_config(dir, 2, "", "").replace(
        "[relay]\nresolver = \"127.0.0.1:53535\"\n",
        &format!(
            "[relay]\nresolver = \"{dns}\"\nport = {port}\nconnect_timeout_secs = 2\n\
             retry_schedule_secs = [0.2]\n{extra_relay}\n"
        ),
    )
}

/// A server relaying to far.test, whose one MX (on 127.0.0.2) follows a script. Tests borrow
/// its fields, so that the server and its directory live to the end of the test.
struct FarTest {
    server: Server,
    mx: Arc<MxLog>,
    /// What a restart after a kill starts with.
    config: String,
    dir: tempfile::TempDir,
}

fn far_test(script: Script, extra_relay: &str) -> FarTest {
    let port = free_relay_port();
    let dns = start_dns(far_test_zone());
    let mx = start_mx("127.0.0.2", port, script);
    let dir = tempfile::tempdir().unwrap();
    let config = relay_config(dir.path(), dns.addr, port, extra_relay);
    let server = Server::start(dir.path(), &config);
    FarTest {
        server,
        mx,
        config,
        dir,
    }
}

fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn accepted(log: &MxLog) -> Vec<Delivered> {
    log.accepted.lock().unwrap().clone()
}

/// Waits for alice's mailbox to hold `count` messages and returns them.
fn alice_mail(server: &Server, count: usize) -> Vec<String> {
    let mut got = Vec::new();
    wait_until(Duration::from_secs(15), "a DSN in alice's mailbox", || {
        got = pop3_retrieve_all(server.addr("pop3"), "alice@example.test");
        got.len() >= count
    });
    got.iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect()
}

fn mail(subject: &str) -> Vec<u8> {
    format!(
        "From: alice@example.test\r\nTo: someone\r\nSubject: {subject}\r\n\r\n..a stuffed dot line\r\nbody\r\n"
    )
    .into_bytes()
}

#[test]
fn a_relayed_message_reaches_the_mx_byte_exact() {
    let FarTest { server, mx, .. } = &far_test(Script::default(), "");
    let body = b"Subject: exact\r\n\r\n..leading dot stays stuffed\r\n8-bit: \xe9\r\nlast\r\n";
    let reply = send_mail(
        server.addr("smtp"),
        "alice@example.test",
        &["Bob@Far.Test", "carl@far.test"],
        body,
    );
    assert!(reply.starts_with("250 "), "{reply}");
    wait_until(Duration::from_secs(10), "delivery", || {
        !accepted(mx).is_empty()
    });
    let got = accepted(mx);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].from, "alice@example.test");
    assert_eq!(got[0].to, vec!["Bob@Far.Test", "carl@far.test"]);
    assert!(got[0]
        .data
        .starts_with(b"Received: from client.test ([127.0.0.1])\r\n"));
    assert!(
        got[0].data.ends_with(body),
        "{}",
        String::from_utf8_lossy(&got[0].data)
    );
    // Delivered once: nothing more arrives.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(accepted(mx).len(), 1);
    assert_eq!(mx.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn mail_to_an_address_literal_goes_to_that_address_without_dns() {
    // The fake DNS knows only far.test; the MX listens on 127.0.0.2.
    let FarTest { server, mx, .. } = &far_test(Script::default(), "");
    let reply = send_mail(
        server.addr("smtp"),
        "alice@example.test",
        &["lit@[127.0.0.2]"],
        b"Subject: literal\r\n\r\nhi\r\n",
    );
    assert!(reply.starts_with("250 "), "{reply}");
    wait_until(Duration::from_secs(10), "delivery", || {
        !accepted(mx).is_empty()
    });
    assert_eq!(accepted(mx)[0].to, vec!["lit@[127.0.0.2]"]);
}

/// A line longer than SMTP allows (RFC 5321 §4.5.3.1.6) goes out folded: cut before every
/// 999th octet with CRLF SPACE, the body's bytes otherwise unchanged and in order.
#[test]
fn an_over_long_line_is_folded_on_the_way_out() {
    let FarTest { server, mx, .. } = &far_test(Script::default(), "");
    let long: Vec<u8> = (0..2500).map(|i| b'a' + (i % 26) as u8).collect();
    let body = [b"Subject: long\r\n\r\n".as_slice(), &long, b"\r\nshort\r\n"].concat();
    let reply = send_mail(
        server.addr("smtp"),
        "alice@example.test",
        &["bob@far.test"],
        &body,
    );
    assert!(reply.starts_with("250 "), "{reply}");
    wait_until(Duration::from_secs(10), "delivery", || {
        !accepted(mx).is_empty()
    });
    let data = accepted(mx).remove(0).data;
    for line in data.split(|&b| b == b'\n') {
        assert!(
            line.len() <= 999,
            "a line of {} octets went out",
            line.len()
        );
    }
    let unfolded: Vec<u8> = String::from_utf8(data)
        .unwrap()
        .replace("\r\n ", "")
        .into_bytes();
    assert!(unfolded.ends_with(&body), "folding changed the body");
}

#[test]
fn the_second_mx_takes_over_when_the_first_is_down_or_answers_421() {
    let port = free_relay_port();
    let mut zone = fake_dns::Zone::default();
    // down.test: the best MX (127.0.0.4) has nobody listening.
    zone.mx("down.test", &[(10, "mx1.down.test"), (20, "mx2.down.test")]);
    zone.a("mx1.down.test", "127.0.0.4");
    zone.a("mx2.down.test", "127.0.0.3");
    // busy.test: the best MX (127.0.0.2) greets with 421.
    zone.mx("busy.test", &[(10, "mx1.busy.test"), (20, "mx2.busy.test")]);
    zone.a("mx1.busy.test", "127.0.0.2");
    zone.a("mx2.busy.test", "127.0.0.3");
    let dns = start_dns(zone);
    let busy = start_mx(
        "127.0.0.2",
        port,
        Script {
            greeting: "421 4.3.2 too busy".into(),
            ..Script::default()
        },
    );
    let backup = start_mx("127.0.0.3", port, Script::default());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &relay_config(dir.path(), dns.addr, port, ""));
    for to in ["x@down.test", "y@busy.test"] {
        let reply = send_mail(server.addr("smtp"), "alice@example.test", &[to], &mail(to));
        assert!(reply.starts_with("250 "), "{reply}");
    }
    wait_until(Duration::from_secs(10), "both at the backup MX", || {
        accepted(&backup).len() == 2
    });
    assert!(busy.connections.load(Ordering::SeqCst) >= 1);
    assert!(accepted(&busy).is_empty());
}

#[test]
fn a_4xx_is_retried_and_then_delivered() {
    let greylisting = Script {
        rcpt: Arc::new(|_, seen| {
            if seen == 0 {
                "451 4.7.1 greylisted, try later".into()
            } else {
                "250 2.1.5 ok".into()
            }
        }),
        ..Script::default()
    };
    let FarTest { server, mx, .. } = &far_test(greylisting, "");
    let reply = send_mail(
        server.addr("smtp"),
        "alice@example.test",
        &["bob@far.test"],
        &mail("grey"),
    );
    assert!(reply.starts_with("250 "), "{reply}");
    wait_until(Duration::from_secs(10), "delivery after the retry", || {
        accepted(mx).len() == 1
    });
    assert!(mx.rcpts.load(Ordering::SeqCst) >= 2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(accepted(mx).len(), 1);
    let lines = server.stderr_lines();
    assert!(lines.iter().any(|l| l.contains("deferred")), "{lines:#?}");
}

#[test]
fn a_5xx_bounces_with_a_dsn_in_the_local_senders_mailbox() {
    let FarTest { server, mx, .. } = &far_test(refusing_nobody(), "");
    let reply = send_mail(
        server.addr("smtp"),
        "alice@example.test",
        &["nobody@far.test", "bob@far.test"],
        &mail("half bounces"),
    );
    assert!(reply.starts_with("250 "), "{reply}");
    let dsns = alice_mail(server, 1);
    assert_eq!(dsns.len(), 1);
    let dsn = &dsns[0];
    assert!(dsn.starts_with("Return-Path: <>\r\n"), "{dsn}");
    assert!(dsn.contains("multipart/report"), "{dsn}");
    assert!(
        dsn.contains("Final-Recipient: rfc822; nobody@far.test"),
        "{dsn}"
    );
    assert!(dsn.contains("Status: 5.1.1"), "{dsn}");
    assert!(dsn.contains("Subject: half bounces"), "{dsn}");
    assert!(
        !dsn.contains("Final-Recipient: rfc822; bob@far.test"),
        "{dsn}"
    );
    let got = accepted(mx);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].to, vec!["bob@far.test"]);
}

/// A DSN quotes every failed recipient with its reply, so it can be larger than any message
/// a small `max_message_size` admits: it must still be stored and reach the sender.
#[test]
fn a_dsn_larger_than_the_largest_acceptable_message_still_reaches_the_sender() {
    let long_reason = "no such user here ".repeat(40);
    let script = Script {
        rcpt: Arc::new(move |rcpt, _| {
            if rcpt.starts_with("nobody") {
                format!("550 5.1.1 {long_reason}")
            } else {
                "250 2.1.5 ok".into()
            }
        }),
        ..Script::default()
    };
    let port = free_relay_port();
    let dns = start_dns(far_test_zone());
    let _mx = start_mx("127.0.0.2", port, script);
    let dir = tempfile::tempdir().unwrap();
    let config = relay_config(dir.path(), dns.addr, port, "").replace(
        "[smtp]\n",
        "[smtp]\nmax_message_size = 1000\nmax_recipients = 4\n",
    );
    let server = Server::start(dir.path(), &config);
    let recipients = [
        "nobody1@far.test",
        "nobody2@far.test",
        "nobody3@far.test",
        "nobody4@far.test",
    ];
    let reply = send_mail(
        server.addr("smtp"),
        "alice@example.test",
        &recipients,
        &mail("all bounce"),
    );
    assert!(reply.starts_with("250 "), "{reply}");
    let dsns = alice_mail(&server, 1);
    let dsn = &dsns[0];
    let largest_message_record = ringmail::envelope::max_message_record_bytes(1000, 4);
    assert!(
        dsn.len() as u64 > largest_message_record,
        "the DSN ({} bytes) should outgrow the largest message record ({largest_message_record})",
        dsn.len()
    );
    for recipient in recipients {
        assert!(
            dsn.contains(&format!("Final-Recipient: rfc822; {recipient}")),
            "{dsn}"
        );
    }
}

#[test]
fn null_mx_bounces_without_connecting_and_nxdomain_bounces() {
    let port = free_relay_port();
    let mut zone = fake_dns::Zone::default();
    zone.mx("nullmx.test", &[(0, ".")]);
    zone.a("nullmx.test", "127.0.0.2");
    let dns = start_dns(zone);
    let mx = start_mx("127.0.0.2", port, Script::default());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &relay_config(dir.path(), dns.addr, port, ""));
    for to in ["x@nullmx.test", "y@nowhere.test"] {
        let reply = send_mail(server.addr("smtp"), "alice@example.test", &[to], &mail(to));
        assert!(reply.starts_with("250 "), "{reply}");
    }
    let dsns = alice_mail(&server, 2);
    let null = dsns
        .iter()
        .find(|d| d.contains("x@nullmx.test"))
        .expect("null MX DSN");
    assert!(null.contains("Status: 5.1.10"), "{null}");
    let nx = dsns
        .iter()
        .find(|d| d.contains("y@nowhere.test"))
        .expect("NXDOMAIN DSN");
    assert!(nx.contains("Status: 5.1.2"), "{nx}");
    assert_eq!(mx.connections.load(Ordering::SeqCst), 0);
}

#[test]
fn a_domain_without_mx_gets_its_mail_at_its_a_record() {
    let port = free_relay_port();
    let mut zone = fake_dns::Zone::default();
    zone.a("plain.test", "127.0.0.3");
    let dns = start_dns(zone);
    let mx = start_mx("127.0.0.3", port, Script::default());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &relay_config(dir.path(), dns.addr, port, ""));
    let reply = send_mail(
        server.addr("smtp"),
        "alice@example.test",
        &["z@plain.test"],
        &mail("a"),
    );
    assert!(reply.starts_with("250 "), "{reply}");
    wait_until(Duration::from_secs(10), "delivery at the A record", || {
        accepted(&mx).len() == 1
    });
}

#[test]
fn servfail_is_retried_not_bounced() {
    let port = free_relay_port();
    let mut zone = fake_dns::Zone::default();
    zone.servfail("broken.test");
    let dns = start_dns(zone);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &relay_config(dir.path(), dns.addr, port, ""));
    let reply = send_mail(
        server.addr("smtp"),
        "alice@example.test",
        &["q@broken.test"],
        &mail("sf"),
    );
    assert!(reply.starts_with("250 "), "{reply}");
    let mut deferrals = 0;
    wait_until(Duration::from_secs(10), "two deferrals", || {
        deferrals += server
            .stderr_lines()
            .iter()
            .filter(|l| l.contains("deferred") && l.contains("broken.test"))
            .count();
        deferrals >= 2
    });
    assert!(pop3_retrieve_all(server.addr("pop3"), "alice@example.test").is_empty());
}

#[test]
fn a_truncated_udp_answer_is_asked_again_over_tcp() {
    let port = free_relay_port();
    let mut zone = fake_dns::Zone::default();
    zone.mx("big.test", &[(10, "mx1.big.test")]);
    zone.a("mx1.big.test", "127.0.0.2");
    zone.truncate("big.test");
    let dns = start_dns(zone);
    let mx = start_mx("127.0.0.2", port, Script::default());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &relay_config(dir.path(), dns.addr, port, ""));
    let reply = send_mail(
        server.addr("smtp"),
        "alice@example.test",
        &["t@big.test"],
        &mail("tc"),
    );
    assert!(reply.starts_with("250 "), "{reply}");
    wait_until(Duration::from_secs(10), "delivery", || {
        accepted(&mx).len() == 1
    });
    wait_until(Duration::from_secs(2), "the TCP count", || {
        dns.tcp_queries.load(Ordering::SeqCst) >= 1
    });
}

#[test]
fn a_hundred_messages_to_one_domain_share_few_connections() {
    let FarTest { server, mx, .. } = &far_test(Script::default(), "max_connections_per_domain = 4");
    let smtp = server.addr("smtp");
    let senders: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for n in 0..25 {
                    let subject = format!("m{t}-{n}");
                    let reply = send_mail(
                        smtp,
                        "alice@example.test",
                        &["bulk@far.test"],
                        &mail(&subject),
                    );
                    assert!(reply.starts_with("250 "), "{reply}");
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    wait_until(Duration::from_secs(20), "100 deliveries", || {
        accepted(mx).len() >= 100
    });
    assert_eq!(accepted(mx).len(), 100);
    let connections = mx.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 12,
        "{connections} connections for 100 messages"
    );
}

#[test]
fn kill_9_during_a_relay_run_loses_nothing() {
    let slow_mx = Script {
        data_end_delay: Duration::from_millis(40),
        ..Script::default()
    };
    let FarTest {
        server,
        mx,
        config,
        dir,
    } = &mut far_test(slow_mx, "max_connections_per_domain = 2");
    let total = 40;
    for n in 0..total {
        let reply = send_mail(
            server.addr("smtp"),
            "alice@example.test",
            &["k@far.test"],
            &mail(&format!("kill-{n}")),
        );
        assert!(reply.starts_with("250 "), "{reply}");
    }
    wait_until(Duration::from_secs(20), "some deliveries", || {
        accepted(mx).len() >= 5
    });
    server.kill9();
    let before = accepted(mx).len();
    assert!(before < total, "the run was over before the kill");
    let _server = Server::start(dir.path(), config);
    let subject_of = |d: &Delivered| {
        let text = String::from_utf8_lossy(&d.data).into_owned();
        text.split("Subject: ")
            .nth(1)
            .unwrap()
            .split("\r\n")
            .next()
            .unwrap()
            .to_string()
    };
    wait_until(Duration::from_secs(30), "every message", || {
        let got: std::collections::HashSet<String> = accepted(mx).iter().map(subject_of).collect();
        got.len() == total
    });
    std::thread::sleep(Duration::from_millis(500));
    // A message the MX took just before the kill, whose outcome was not yet durable, is sent
    // again: per connection open at the kill, the one in flight and the one settling.
    let duplicates = accepted(mx).len() - total;
    assert!(duplicates <= 4, "{duplicates} duplicates");
}

#[test]
fn eight_bit_and_utf8_mail_bounces_at_a_hop_that_lacks_the_extension() {
    let port = free_relay_port();
    let mut zone = fake_dns::Zone::default();
    zone.mx("old.test", &[(10, "mx1.old.test")]);
    zone.a("mx1.old.test", "127.0.0.2");
    let dns = start_dns(zone);
    let mx = start_mx(
        "127.0.0.2",
        port,
        Script {
            ehlo: "250-old.test\r\n250 PIPELINING".into(),
            ..Script::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &relay_config(dir.path(), dns.addr, port, ""));
    let reply = send_mail(
        server.addr("smtp"),
        "alice@example.test",
        &["eight@old.test"],
        b"Subject: 8bit\r\n\r\ncaf\xc3\xa9\r\n",
    );
    assert!(reply.starts_with("250 "), "{reply}");
    let mut c = common::LineClient::connect(server.addr("smtp"));
    assert!(c.reply().starts_with("220 "));
    assert!(c.command("EHLO client.test").starts_with("250"));
    assert!(c
        .command("MAIL FROM:<alice@example.test> SMTPUTF8")
        .starts_with("250"));
    assert!(c.command("RCPT TO:<utf@old.test>").starts_with("250"));
    assert!(c.command("DATA").starts_with("354"));
    c.send(b"Subject: utf8\r\n\r\nplain\r\n.\r\n");
    assert!(c.reply().starts_with("250 "));
    let dsns = alice_mail(&server, 2);
    let eight = dsns
        .iter()
        .find(|d| d.contains("eight@old.test"))
        .expect("8BITMIME DSN");
    assert!(eight.contains("Status: 5.6.3"), "{eight}");
    let utf = dsns
        .iter()
        .find(|d| d.contains("utf@old.test"))
        .expect("SMTPUTF8 DSN");
    assert!(utf.contains("Status: 5.6.7"), "{utf}");
    assert!(accepted(&mx).is_empty());
}

#[test]
fn a_remote_senders_bounce_is_relayed_from_the_null_sender() {
    let FarTest { server, mx, .. } = &far_test(refusing_nobody(), "");
    let reply = send_mail(
        server.addr("smtp"),
        "ext@far.test",
        &["nobody@far.test"],
        &mail("to nobody"),
    );
    assert!(reply.starts_with("250 "), "{reply}");
    // A bounce of a bounce is never made: this one from <> is dropped when it bounces.
    let reply = send_mail(
        server.addr("smtp"),
        "",
        &["nobody@far.test"],
        &mail("a bounce"),
    );
    assert!(reply.starts_with("250 "), "{reply}");
    wait_until(Duration::from_secs(10), "the DSN at the MX", || {
        !accepted(mx).is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    let got = accepted(mx);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].from, "");
    assert_eq!(got[0].to, vec!["ext@far.test"]);
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(text.contains("multipart/report"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@far.test"),
        "{text}"
    );
}

#[test]
fn an_mx_that_is_this_server_is_a_loop_and_bounces() {
    // Our SMTP listener's port doubles as relay.port, so an MX on 127.0.0.1 is ourselves.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut zone = fake_dns::Zone::default();
    zone.mx("self.test", &[(10, "mx1.self.test")]);
    zone.a("mx1.self.test", "127.0.0.1");
    zone.mx("named.test", &[(10, "mx.ringmail.test")]);
    let dns = start_dns(zone);
    let dir = tempfile::tempdir().unwrap();
    let config = relay_config(dir.path(), dns.addr, port, "").replace(
        "[smtp]\nlisten = [\"127.0.0.1:0\"]",
        &format!("[smtp]\nlisten = [\"127.0.0.1:{port}\"]"),
    );
    let server = Server::start(dir.path(), &config);
    for to in ["x@self.test", "y@named.test"] {
        let reply = send_mail(server.addr("smtp"), "alice@example.test", &[to], &mail(to));
        assert!(reply.starts_with("250 "), "{reply}");
    }
    let dsns = alice_mail(&server, 2);
    for to in ["x@self.test", "y@named.test"] {
        let dsn = dsns.iter().find(|d| d.contains(to)).expect("loop DSN");
        assert!(dsn.contains("Status: 5.4.6"), "{dsn}");
    }
}

#[test]
fn mail_still_undelivered_after_the_queue_lifetime_bounces() {
    let port = free_relay_port();
    let mut zone = fake_dns::Zone::default();
    // Nobody listens on 127.0.0.5: every attempt is refused and deferred.
    zone.mx("dead.test", &[(10, "mx1.dead.test")]);
    zone.a("mx1.dead.test", "127.0.0.5");
    let dns = start_dns(zone);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &relay_config(dir.path(), dns.addr, port, "max_queue_lifetime_secs = 1.5"),
    );
    let sent = Instant::now();
    let reply = send_mail(
        server.addr("smtp"),
        "alice@example.test",
        &["gone@dead.test"],
        &mail("late"),
    );
    assert!(reply.starts_with("250 "), "{reply}");
    let dsns = alice_mail(&server, 1);
    assert!(
        sent.elapsed() >= Duration::from_millis(500),
        "bounced too early"
    );
    assert!(dsns[0].contains("Status: 5.4.7"), "{}", dsns[0]);
    assert!(
        dsns[0].contains("Final-Recipient: rfc822; gone@dead.test"),
        "{}",
        dsns[0]
    );
}

/// A throw-away identity for the fake MX (opportunistic TLS does not check it).
fn mx_tls_identity() -> Arc<rustls::ServerConfig> {
    let certified = rcgen::generate_simple_self_signed(vec!["mx1.far.test".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        certified.key_pair.serialize_der(),
    ));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    Arc::new(config)
}

#[test]
fn mail_goes_encrypted_to_an_mx_that_offers_starttls() {
    let script = Script {
        starttls: Some(mx_tls_identity()),
        ..Script::default()
    };
    let FarTest { server, mx, .. } = &far_test(script, "");
    let body = b"Subject: sealed\r\n\r\nsent over TLS\r\n";
    let reply = send_mail(
        server.addr("smtp"),
        "alice@example.test",
        &["bob@far.test"],
        body,
    );
    assert!(reply.starts_with("250 "), "{reply}");
    wait_until(Duration::from_secs(10), "delivery", || {
        !accepted(mx).is_empty()
    });
    assert!(accepted(mx)[0].data.ends_with(body));
    assert_eq!(
        mx.tls_sessions.load(Ordering::SeqCst),
        1,
        "delivered without TLS"
    );
    assert_eq!(mx.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn a_failed_starttls_handshake_falls_back_to_plain_text() {
    let script = Script {
        broken_starttls: true,
        ..Script::default()
    };
    let FarTest { server, mx, .. } = &far_test(script, "");
    let body = b"Subject: fallback\r\n\r\nplain after a broken handshake\r\n";
    let reply = send_mail(
        server.addr("smtp"),
        "alice@example.test",
        &["bob@far.test"],
        body,
    );
    assert!(reply.starts_with("250 "), "{reply}");
    wait_until(Duration::from_secs(10), "delivery", || {
        !accepted(mx).is_empty()
    });
    assert!(accepted(mx)[0].data.ends_with(body));
    assert_eq!(mx.tls_sessions.load(Ordering::SeqCst), 0);
    // One connection for the failed handshake, one to deliver in plain text.
    assert_eq!(mx.connections.load(Ordering::SeqCst), 2);
}
