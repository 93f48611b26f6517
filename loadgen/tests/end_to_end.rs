//! The real binary on loopback: `loadgen smtp` against `loadgen sink` (with --keep, and
//! with failure shares), `loadgen dns` over UDP and TCP, and command-line refusals.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");

/// A port that was free a moment ago (the sink needs a fixed one).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server child process, stopped with SIGTERM when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc_kill(self.0.id() as i32, 15) };
        let _ = self.0.wait();
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

/// Starts a server and waits for its "listening on" line.
fn start(args: &[&str]) -> Server {
    let mut child = Command::new(LOADGEN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening on"), "{line}");
    // The rest of its output is not needed; let it go to a pipe nobody reads only while
    // small (count lines are disabled by the callers).
    Server(child)
}

fn run(args: &[&str]) -> Output {
    Command::new(LOADGEN).args(args).output().unwrap()
}

/// Runs loadgen and fails the test, with loadgen's stderr, unless it exits 0.
fn run_ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn smtp_to_sink_keeps_every_message_intact() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let dir = std::env::temp_dir().join(format!("loadgen-e2e-keep-{port}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _sink = start(&[
        "sink",
        "--listen",
        &listen,
        "--keep",
        dir.to_str().unwrap(),
        "--threads",
        "2",
        "--print-every-secs",
        "0",
    ]);
    let report = dir.join("report.json");
    // DATA pipelined one transaction at a time, and BDAT with many transactions in flight.
    for mode in ["--pipelining", "--chunking"] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "eml") {
                std::fs::remove_file(path).unwrap();
            }
        }
        run_ok(&[
            "smtp",
            "--target",
            &listen,
            "--connections",
            "3",
            "--messages",
            "50",
            "--size",
            "3000",
            "--to",
            "user{0..4}@example.test",
            "--per-connection",
            "7",
            mode,
            "--threads",
            "2",
            "--quiet",
            "--json",
            report.to_str().unwrap(),
        ]);
        let figures = json(&report);
        assert_eq!(figures["messages"], 50);
        assert_eq!(figures["failures"], 0);
        assert_eq!(figures["reply_codes"]["250"], 50);
        // 50 messages in sessions of up to 7 on 3 slots: 8 full-or-last sessions, plus at
        // most two cut short when the budget ran out; never a connection without a message.
        let connects = figures["latency"]["connect"]["count"].as_u64().unwrap();
        assert!((8..=10).contains(&connects), "{connects}");
        let mut message_ids = std::collections::BTreeSet::new();
        let mut recipients = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "eml") {
                let mut bytes = Vec::new();
                std::fs::File::open(&path)
                    .unwrap()
                    .read_to_end(&mut bytes)
                    .unwrap();
                assert_eq!(bytes.len(), 3000, "{mode}: {}", path.display());
                let text = String::from_utf8(bytes).unwrap();
                let header = |name: &str| {
                    text.lines()
                        .find(|l| l.starts_with(name))
                        .unwrap_or_else(|| panic!("{name} missing"))
                        .to_string()
                };
                message_ids.insert(header("Message-ID:"));
                recipients.insert(header("To:"));
                let (_, body) = text.split_once("\r\n\r\n").unwrap();
                let claimed = header("X-Loadgen-Checksum:");
                let claimed =
                    u64::from_str_radix(claimed.split(": ").nth(1).unwrap().trim(), 16).unwrap();
                // FNV-1a 64 over little-endian words (the last zero-padded), then the length.
                let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
                for word in body.as_bytes().chunks(8) {
                    let mut padded = [0u8; 8];
                    padded[..word.len()].copy_from_slice(word);
                    hash = (hash ^ u64::from_le_bytes(padded)).wrapping_mul(0x0100_0000_01b3);
                }
                hash = (hash ^ body.len() as u64).wrapping_mul(0x0100_0000_01b3);
                assert_eq!(hash, claimed, "{}", path.display());
            }
        }
        assert_eq!(message_ids.len(), 50, "Message-IDs are unique");
        assert_eq!(
            recipients.len(),
            5,
            "recipients go round-robin over the pattern"
        );
    }

    run_ok(&[
        "smtp",
        "--target",
        &listen,
        "--connections",
        "4",
        "--messages",
        "20",
        "--to",
        "u@x.test",
        "--per-connection",
        "1",
        "--quiet",
        "--json",
        report.to_str().unwrap(),
    ]);
    let figures = json(&report);
    assert_eq!(figures["messages"], 20);
    assert_eq!(
        figures["latency"]["connect"]["count"], 20,
        "one connection per message"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refusals_are_counted_and_fail_the_run() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _sink = start(&[
        "sink",
        "--listen",
        &listen,
        "--tempfail",
        "20",
        "--permfail",
        "10",
        "--print-every-secs",
        "0",
    ]);
    let report = std::env::temp_dir().join(format!("loadgen-e2e-refusals-{port}.json"));
    let out = run(&[
        "smtp",
        "--target",
        &listen,
        "--connections",
        "2",
        "--messages",
        "100",
        "--to",
        "u@x.test",
        "--quiet",
        "--json",
        report.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "refusals make the exit status 1"
    );
    let figures = json(&report);
    assert_eq!(figures["messages"], 70);
    assert_eq!(figures["refused"], 30);
    assert_eq!(figures["reply_codes"]["451"], 20);
    assert_eq!(figures["reply_codes"]["554"], 10);
    let _ = std::fs::remove_file(&report);
}

#[test]
fn open_loop_counts_from_the_schedule() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _sink = start(&["sink", "--listen", &listen, "--print-every-secs", "0"]);
    let report = std::env::temp_dir().join(format!("loadgen-e2e-rate-{port}.json"));
    run_ok(&[
        "smtp",
        "--target",
        &listen,
        "--connections",
        "4",
        "--duration",
        "1s",
        "--rate",
        "200",
        "--to",
        "u@x.test",
        "--pipelining",
        "--quiet",
        "--json",
        report.to_str().unwrap(),
    ]);
    let figures = json(&report);
    // Exactly the arrivals due within the second, however fast the server is.
    assert_eq!(figures["messages"], 200);
    let elapsed = figures["elapsed_secs"].as_f64().unwrap();
    assert!(
        elapsed >= 0.99,
        "an open loop cannot finish early: {elapsed}"
    );
    let _ = std::fs::remove_file(&report);
}

#[test]
fn unreachable_server_is_counted_not_a_panic() {
    let port = free_port();
    let out = run(&[
        "smtp",
        "--target",
        &format!("127.0.0.1:{port}"),
        "--connections",
        "2",
        "--duration",
        "300ms",
        "--to",
        "u@x.test",
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("connect errors"), "{stdout}");
    // A message budget against a dead server ends too: each slot gives up eventually.
    let out = run(&[
        "smtp",
        "--target",
        &format!("127.0.0.1:{port}"),
        "--connections",
        "1",
        "--messages",
        "10",
        "--to",
        "u@x.test",
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("connect errors"), "{stdout}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn bad_arguments_exit_2_with_a_message() {
    let cases: &[&[&str]] = &[
        &[
            "smtp",
            "--target",
            "127.0.0.1:25",
            "--messages",
            "1",
            "--to",
            "u{1..2}{3..4}@x",
        ],
        &["smtp", "--target", "127.0.0.1:25", "--to", "u@x"],
        &[
            "smtp",
            "--target",
            "127.0.0.1:25",
            "--messages",
            "1",
            "--to",
            "u@x",
            "--chunking",
            "--rate",
            "5",
        ],
        &[
            "smtp",
            "--target",
            "127.0.0.1:25",
            "--messages",
            "1",
            "--to",
            "u@x",
            "--size",
            "10",
        ],
        &[
            "smtp",
            "--target",
            "127.0.0.1:25",
            "--messages",
            "1",
            "--to",
            "u@x",
            "--rate",
            "-5",
        ],
        &[
            "pop3",
            "--target",
            "127.0.0.1:110",
            "--user",
            "u{9..1}",
            "--password",
            "pw",
        ],
        &[
            "sink",
            "--listen",
            "127.0.0.1:2525",
            "--tempfail",
            "80",
            "--permfail",
            "30",
        ],
        &["dns", "--listen", "127.0.0.1:0", "--mx", "example.test"],
        &["frobnicate"],
    ];
    for args in cases {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.trim().is_empty() && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }
}

/// Builds a DNS query for `name` and `qtype` by hand, independent of the server's code.
fn query(name: &str, qtype: u16) -> Vec<u8> {
    let mut bytes = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        bytes.push(label.len() as u8);
        bytes.extend_from_slice(label.as_bytes());
    }
    bytes.push(0);
    bytes.extend_from_slice(&qtype.to_be_bytes());
    bytes.extend_from_slice(&1u16.to_be_bytes());
    bytes
}

/// (truncated, rcode, answers, additionals) from a response header.
fn header(response: &[u8]) -> (bool, u8, u16, u16) {
    assert_eq!(&response[..2], &[0x12, 0x34]);
    (
        response[2] & 0x02 != 0,
        response[3] & 0x0f,
        u16::from_be_bytes([response[6], response[7]]),
        u16::from_be_bytes([response[10], response[11]]),
    )
}

#[test]
fn dns_answers_over_udp_and_tcp() {
    let mut child = Command::new(LOADGEN)
        .args([
            "dns",
            "--listen",
            "127.0.0.1:0",
            "--mx",
            "example.test=127.0.0.2,127.0.0.3",
            "--null-mx",
            "null.test",
            "--servfail",
            "broken.test",
            "--truncate",
            "example.test",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let server = Server(child);
    let address = line.split_whitespace().nth(3).unwrap().to_string();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ask = |name: &str, qtype: u16| {
        udp.send_to(&query(name, qtype), &address).unwrap();
        let mut buffer = [0u8; 1500];
        let len = udp.recv(&mut buffer).unwrap();
        header(&buffer[..len])
    };
    assert_eq!(
        ask("example.test", 15),
        (true, 0, 0, 0),
        "truncated over UDP"
    );
    assert_eq!(ask("null.test", 15), (false, 0, 1, 0));
    assert_eq!(ask("broken.test", 15), (false, 2, 0, 0));
    assert_eq!(ask("nowhere.test", 15), (false, 3, 0, 0));
    assert_eq!(ask("mx2.example.test", 1), (false, 0, 1, 0));

    let mut tcp = TcpStream::connect(&address).unwrap();
    let message = query("example.test", 15);
    tcp.write_all(&(message.len() as u16).to_be_bytes())
        .unwrap();
    tcp.write_all(&message).unwrap();
    let mut prefix = [0u8; 2];
    tcp.read_exact(&mut prefix).unwrap();
    let mut response = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
    tcp.read_exact(&mut response).unwrap();
    assert_eq!(header(&response), (false, 0, 2, 2), "full answer over TCP");
    drop(server);
}

#[test]
fn sink_refuses_a_port_another_server_listens_on() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let out = run(&["sink", "--listen", &listen, "--print-every-secs", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another server is listening"), "{stderr}");
}

#[test]
fn sink_restarts_on_its_port_right_after_a_run() {
    // Our own finished connections leave TIME_WAIT sockets on the port; they must not
    // stop the next sink from starting there.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    for _ in 0..2 {
        let sink = start(&["sink", "--listen", &listen, "--print-every-secs", "0"]);
        run_ok(&[
            "smtp",
            "--target",
            &listen,
            "--connections",
            "4",
            "--messages",
            "40",
            "--to",
            "u@x.test",
            "--per-connection",
            "1",
            "--quiet",
        ]);
        drop(sink);
    }
}

/// A one-user POP3 server on a thread: 5 messages, PIPELINING in CAPA or not. Returns its
/// address and a handle yielding the most commands it found in one read.
fn fake_pop3(advertise_pipelining: bool) -> (String, std::thread::JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(b"+OK fake\r\n").unwrap();
        let message = b"Subject: m\r\n\r\nbody\r\n";
        let mut most_per_read = 0;
        let mut pending = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).unwrap();
            if n == 0 {
                return most_per_read;
            }
            pending.extend_from_slice(&buf[..n]);
            let mut commands = 0;
            let mut reply = Vec::new();
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = String::from_utf8(line).unwrap();
                let mut words = line.split_whitespace();
                commands += 1;
                match words.next().unwrap_or("") {
                    "CAPA" if advertise_pipelining => {
                        reply.extend_from_slice(b"+OK\r\nUSER\r\nPIPELINING\r\n.\r\n")
                    }
                    "CAPA" => reply.extend_from_slice(b"+OK\r\nUSER\r\n.\r\n"),
                    "STAT" => reply.extend_from_slice(b"+OK 5 100\r\n"),
                    "LIST" => {
                        reply.extend_from_slice(b"+OK\r\n");
                        for i in 1..=5 {
                            reply
                                .extend_from_slice(format!("{i} {}\r\n", message.len()).as_bytes());
                        }
                        reply.extend_from_slice(b".\r\n");
                    }
                    "RETR" => {
                        reply.extend_from_slice(b"+OK\r\n");
                        reply.extend_from_slice(message);
                        reply.extend_from_slice(b".\r\n");
                    }
                    "QUIT" => {
                        stream.write_all(b"+OK bye\r\n").unwrap();
                        return most_per_read.max(commands);
                    }
                    _ => reply.extend_from_slice(b"+OK\r\n"),
                }
            }
            most_per_read = most_per_read.max(commands);
            stream.write_all(&reply).unwrap();
        }
    });
    (addr, server)
}

#[test]
fn pop3_pipelines_only_where_capa_says_so() {
    for advertised in [true, false] {
        let (addr, server) = fake_pop3(advertised);
        let out = run_ok(&[
            "pop3",
            "--target",
            &addr,
            "--user",
            "u@x.test",
            "--password",
            "pw",
            "--connections",
            "1",
            "--threads",
            "1",
            "--pipelining",
            "--quiet",
        ]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("retr         n=5 "),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let most_per_read = server.join().unwrap();
        if advertised {
            assert!(
                most_per_read >= 5,
                "RETRs were not pipelined: {most_per_read}"
            );
        } else {
            assert_eq!(most_per_read, 1, "pipelined although CAPA did not say so");
        }
    }
}

/// An SMTP server on a thread that offers PIPELINING but not CHUNKING and serves one
/// connection: returns its address and a handle yielding (messages accepted, BDAT seen).
fn fake_smtp_without_chunking() -> (String, std::thread::JoinHandle<(u32, bool)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        writer.write_all(b"220 fake ESMTP\r\n").unwrap();
        let (mut accepted, mut bdat_seen, mut in_data) = (0, false, false);
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap() == 0 {
                return (accepted, bdat_seen);
            }
            if in_data {
                if line == ".\r\n" {
                    in_data = false;
                    accepted += 1;
                    writer.write_all(b"250 2.0.0 queued\r\n").unwrap();
                }
                continue;
            }
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            let reply: &[u8] = match verb.as_str() {
                "EHLO" => b"250-fake\r\n250 PIPELINING\r\n",
                "DATA" => {
                    in_data = true;
                    b"354 go ahead\r\n"
                }
                "BDAT" => {
                    bdat_seen = true;
                    b"500 5.5.1 not offered\r\n"
                }
                "QUIT" => {
                    writer.write_all(b"221 bye\r\n").unwrap();
                    return (accepted, bdat_seen);
                }
                _ => b"250 ok\r\n",
            };
            writer.write_all(reply).unwrap();
        }
    });
    (addr, server)
}

#[test]
fn chunking_falls_back_to_data_where_chunking_is_not_offered() {
    let (addr, server) = fake_smtp_without_chunking();
    run_ok(&[
        "smtp",
        "--target",
        &addr,
        "--connections",
        "1",
        "--threads",
        "1",
        "--messages",
        "5",
        "--to",
        "u@x.test",
        "--chunking",
        "--quiet",
    ]);
    assert_eq!(server.join().unwrap(), (5, false));
}
