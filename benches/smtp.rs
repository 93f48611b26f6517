//! Per-core costs of the SMTP core: command parsing, the end-of-data scanner (GB/s on
//! 10 KiB and 1 MiB bodies), BDAT stuffing, and one whole transaction through a Session.

use std::hint::black_box;
use std::rc::Rc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringmail::routing::Directory;
use ringmail::smtp::command;
use ringmail::smtp::data::{DataScanner, ScanOutcome, Stuffer};
use ringmail::smtp::{Action, PeerInfo, Session, SessionParams};

/// A body of 78-character text lines (a typical message shape) of about `size` bytes,
/// ending with CRLF, followed by the terminator.
fn wire_body(size: usize) -> Vec<u8> {
    let line: Vec<u8> = (0..78)
        .map(|i| b'a' + (i % 26) as u8)
        .chain(*b"\r\n")
        .collect();
    let mut body: Vec<u8> = line.iter().copied().cycle().take(size / 80 * 80).collect();
    body.extend_from_slice(b".\r\n");
    body
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("command_parse");
    for (name, line) in [
        (
            "mail",
            &b"MAIL FROM:<sender@example.test> SIZE=10240 BODY=8BITMIME"[..],
        ),
        ("rcpt", b"RCPT TO:<u7@bench.test>"),
        ("ehlo", b"EHLO client.example.test"),
        ("data", b"DATA"),
    ] {
        group.throughput(Throughput::Elements(1));
        group.bench_function(name, |b| b.iter(|| command::parse(black_box(line))));
    }
    group.finish();
}

fn scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("data_scan");
    for (name, size) in [("10KiB", 10 * 1024), ("1MiB", 1024 * 1024)] {
        let body = wire_body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut scanner = DataScanner::new();
                let outcome = scanner.scan(black_box(&body));
                assert!(matches!(outcome, ScanOutcome::End { .. }));
                outcome
            })
        });
    }
    group.finish();
}

fn stuff(c: &mut Criterion) {
    let mut group = c.benchmark_group("bdat_stuff");
    let body = wire_body(1024 * 1024);
    let mut out = Vec::with_capacity(body.len() + 1024);
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("1MiB", |b| {
        b.iter(|| {
            out.clear();
            let mut stuffer = Stuffer::new();
            stuffer.stuff(black_box(&body), &mut out);
            out.len()
        })
    });
    group.finish();
}

fn transaction(c: &mut Criterion) {
    let directory = Directory::new(&["bench.test".into()], &["u7@bench.test".into()], "")
        .expect("valid directory");
    let params = Rc::new(SessionParams {
        hostname: "mx.bench.test".into(),
        max_message_size: 26_214_400,
        max_recipients: 100,
        directory: Rc::new(directory),
        starttls_available: false,
    });
    let peer = PeerInfo {
        addr: "127.0.0.1:40000".parse().expect("address"),
        relay_allowed: true,
        tls: false,
        auth_required: false,
    };
    let mut wire = b"EHLO client.test\r\nMAIL FROM:<s@client.test> SIZE=10240\r\n\
RCPT TO:<u7@bench.test>\r\nDATA\r\n"
        .to_vec();
    let commands_len = wire.len();
    wire.extend_from_slice(&wire_body(10 * 1024));
    wire.extend_from_slice(b"QUIT\r\n");
    let mut group = c.benchmark_group("session");
    group.throughput(Throughput::Elements(1));
    group.bench_function("10KiB_message", |b| {
        b.iter(|| {
            let mut session = Session::new(params.clone(), peer.clone());
            // Two reads, as a client waiting for 354 produces.
            for part in [&wire[..commands_len], &wire[commands_len..]] {
                let buffer = session.input_buffer();
                buffer[..part.len()].copy_from_slice(part);
                session.input_filled(part.len());
                if let Action::StoreMessage(tx) = session.poll_action() {
                    black_box(&tx);
                    session.message_stored(Ok("Q1".into()));
                }
            }
            let n = session.output().len();
            session.output_consumed(n);
            session.poll_action()
        })
    });
    group.finish();
}

criterion_group!(benches, parse, scan, stuff, transaction);
criterion_main!(benches);
