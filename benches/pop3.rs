//! Per-core costs of the POP3 core: command parsing, a pipelined session's command handling,
//! and the TOP scanner on stored messages.

use std::hint::black_box;
use std::rc::Rc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringmail::pop3::{
    parse_command, top_len, Action, MessageEntry, MessageKey, PeerInfo, Session, SessionParams,
};

const COMMANDS: &[&[u8]] = &[
    b"USER alice@example.test",
    b"PASS correct horse battery staple",
    b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=",
    b"STAT",
    b"LIST",
    b"LIST 17",
    b"UIDL 123",
    b"RETR 42",
    b"TOP 42 10",
    b"DELE 42",
    b"NOOP",
    b"QUIT",
];

fn parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("pop3_parse");
    group.throughput(Throughput::Elements(COMMANDS.len() as u64));
    group.bench_function("command_mix", |b| {
        b.iter(|| {
            for line in COMMANDS {
                black_box(parse_command(black_box(line)).ok());
            }
        })
    });
    group.finish();
}

/// 10 KiB message as stored: 12 header lines, then 72-octet body lines.
fn stored_message(body_octets: usize) -> Vec<u8> {
    let mut message = Vec::with_capacity(body_octets + 1024);
    for i in 0..12 {
        message
            .extend_from_slice(format!("X-Header-{i}: some value for header {i}\r\n").as_bytes());
    }
    message.extend_from_slice(b"\r\n");
    while message.len() < body_octets {
        message.extend_from_slice(&[b'a'; 70]);
        message.extend_from_slice(b"\r\n");
    }
    message
}

fn top_scanner(c: &mut Criterion) {
    let mut group = c.benchmark_group("pop3_top_len");
    for (name, size, lines) in [
        ("10KiB_top0", 10 * 1024, 0u64),
        ("10KiB_top10", 10 * 1024, 10),
        ("10KiB_all", 10 * 1024, u64::MAX),
        ("20MB_all", 20 * 1024 * 1024, u64::MAX),
    ] {
        let message = stored_message(size);
        let scanned = top_len(&message, lines);
        group.throughput(Throughput::Bytes(scanned as u64));
        group.bench_function(name, |b| {
            b.iter(|| top_len(black_box(&message), black_box(lines)))
        });
    }
    group.finish();
}

/// A whole loadgen-like session (login, LIST, RETR of 200 messages, QUIT) through the core,
/// answering actions at once: the protocol cost per retrieved message, without I/O.
fn session_per_message(c: &mut Criterion) {
    let params = Rc::new(SessionParams {
        greeting_host: "mx.example.test".into(),
        stls_available: false,
    });
    let peer = PeerInfo {
        addr: "127.0.0.1:40000".parse().expect("address"),
        plaintext_auth_allowed: true,
        tls: false,
    };
    let messages = 200u64;
    let entries: Vec<MessageEntry> = (0..messages)
        .map(|i| MessageEntry {
            key: MessageKey {
                shard: 0,
                record: i,
                recipient: 0,
            },
            size_octets: 10_240,
            uidl: format!("{i:016x}"),
        })
        .collect();
    let mut script = b"USER alice@example.test\r\nPASS pw\r\nLIST\r\n".to_vec();
    for i in 1..=messages {
        script.extend_from_slice(format!("RETR {i}\r\n").as_bytes());
    }
    script.extend_from_slice(b"QUIT\r\n");

    let mut group = c.benchmark_group("pop3_session");
    group.throughput(Throughput::Elements(messages));
    group.bench_function("login_list_retr200", |b| {
        b.iter(|| {
            let mut session = Session::new(params.clone(), peer);
            let mut fed = 0;
            let mut sent = 0u64;
            loop {
                let n = session.output().len();
                session.output_consumed(n);
                match session.poll_action() {
                    Action::Authenticate { .. } => session.auth_checked(true),
                    Action::OpenMailbox { .. } => session.mailbox_opened(Ok(entries.clone())),
                    Action::SendMessage { .. } => {
                        sent += 1;
                        session.message_sent();
                    }
                    Action::Close => break,
                    Action::Commit { .. } => session.commit_done(true),
                    Action::StartTls => session.tls_started(),
                    Action::Idle => {
                        if !session.output().is_empty() {
                            continue;
                        }
                        let buffer = session.input_buffer();
                        let n = buffer.len().min(script.len() - fed);
                        buffer[..n].copy_from_slice(&script[fed..fed + n]);
                        fed += n;
                        session.input_filled(n);
                    }
                }
            }
            assert_eq!(sent, messages);
        })
    });
    group.finish();
}

criterion_group!(benches, parsing, top_scanner, session_per_message);
criterion_main!(benches);
