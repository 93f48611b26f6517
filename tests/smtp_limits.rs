//! SMTP limits without a configuration key of their own, on the real binary: the per-shard
//! cap on DATA bytes not yet durable and the minimum data rate (SPEC §6).

mod common;

use common::{mail_config, pop3_retrieve_all, trickle, LineClient, Server};
use std::io::Write;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A client that has said EHLO, MAIL and RCPT for bob.
fn in_transaction(server: &Server, from: &str) -> LineClient {
    let mut c = LineClient::connect(server.addr("smtp"));
    assert!(c.reply().starts_with("220"));
    assert!(c.command("EHLO client.test").starts_with("250"));
    assert!(c.command(&format!("MAIL FROM:<{from}>")).starts_with("250"));
    assert!(c.command("RCPT TO:<bob@example.test>").starts_with("250"));
    c
}

#[test]
fn a_shard_over_its_data_cap_still_answers_commands_and_loses_nothing() {
    const SENDERS: usize = 40;
    const BODY_LINES: usize = 2400;
    let dir = tempfile::tempdir().unwrap();
    // 256 KiB messages give a cap of 4 MiB; the senders hold about 9.4 MiB of bodies.
    let server = Server::start(
        dir.path(),
        &mail_config(dir.path(), 1, "", "max_message_size = 262144"),
    );
    // The oldest body, which the cap never holds back, is an unfinished one...
    let mut oldest = in_transaction(&server, "first@remote.test");
    assert!(oldest.command("DATA").starts_with("354"));
    oldest.send(b"Subject: the oldest body\r\n\r\n");
    std::thread::sleep(Duration::from_millis(200));
    // ...so a body already too big when the cap fills is not: thrown away as it comes, it is
    // still read while the others are held back.
    let line = format!("{}\r\n", "t".repeat(98));
    let mut too_big = in_transaction(&server, "big@remote.test");
    assert!(too_big.command("DATA").starts_with("354"));
    too_big.send(line.repeat(3000).as_bytes());
    let (in_body, bodies_started) = mpsc::channel();
    let go = Arc::new((Mutex::new(false), Condvar::new()));
    let senders: Vec<_> = (0..SENDERS)
        .map(|n| {
            let mut c = in_transaction(&server, &format!("s{n}@remote.test"));
            let in_body = in_body.clone();
            let go = Arc::clone(&go);
            std::thread::spawn(move || {
                let body: Vec<u8> = (0..BODY_LINES)
                    .flat_map(|line| {
                        format!("sender {n:02} line {line:04} {}\r\n", "x".repeat(76)).into_bytes()
                    })
                    .collect();
                assert!(c.command("DATA").starts_with("354"));
                in_body.send(()).unwrap();
                // Blocks while the server holds this session back.
                c.send(&body);
                let (finish, started) = &*go;
                drop(
                    started
                        .wait_while(finish.lock().unwrap(), |go| !*go)
                        .unwrap(),
                );
                c.send(b".\r\n");
                let reply = c.reply();
                assert!(reply.starts_with("250 2.0.0"), "sender {n}: {reply}");
                body
            })
        })
        .collect();
    for _ in 0..SENDERS {
        bodies_started
            .recv_timeout(Duration::from_secs(30))
            .unwrap();
    }
    // Let the bodies pile up against the cap.
    std::thread::sleep(Duration::from_millis(500));

    let mut newcomer = LineClient::connect(server.addr("smtp"));
    assert!(newcomer.reply().starts_with("220"));
    assert!(newcomer.command("EHLO late.test").starts_with("250"));
    assert!(newcomer
        .command("MAIL FROM:<late@remote.test>")
        .starts_with("250"));
    assert!(newcomer.command("QUIT").starts_with("221"));

    // Held back, this client would block in the write or wait for the reply.
    let limit = Some(Duration::from_secs(10));
    too_big.stream.set_write_timeout(limit).unwrap();
    too_big.stream.set_read_timeout(limit).unwrap();
    too_big.send(line.repeat(30_000).as_bytes());
    too_big.send(b".\r\n");
    let reply = too_big.reply();
    assert!(reply.starts_with("552 5.3.4"), "{reply}");

    {
        let (finish, started) = &*go;
        *finish.lock().unwrap() = true;
        started.notify_all();
    }
    oldest.send(b".\r\n");
    assert!(oldest.reply().starts_with("250 2.0.0"));
    let bodies: Vec<Vec<u8>> = senders.into_iter().map(|s| s.join().unwrap()).collect();
    let stored = pop3_retrieve_all(server.addr("pop3"), "bob@example.test");
    assert_eq!(stored.len(), SENDERS + 1);
    for (n, body) in bodies.iter().enumerate() {
        assert!(
            stored.iter().any(|m| m.ends_with(body)),
            "sender {n}'s message is not stored intact"
        );
    }
}

/// Two seconds of idle timeout make the data rate's window two seconds too.
const SHORT_IDLE: &str = "idle_timeout_secs = 2";
/// Far below 1024 bytes/s, yet never silent for the idle timeout.
const TRICKLE_PAUSE: Duration = Duration::from_millis(300);

#[test]
fn a_body_sent_as_tiny_bdat_chunks_is_held_to_the_minimum_data_rate() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 1, "", SHORT_IDLE));
    let mut c = in_transaction(&server, "slow@remote.test");
    let started = Instant::now();
    for _ in 0..100 {
        // The server may already have closed: a failed write shows as the 421 below.
        let _ = c.stream.write_all(b"BDAT 1\r\nx");
        let reply = c.reply();
        if reply.starts_with("421 4.4.2") {
            assert!(started.elapsed() >= Duration::from_secs(2));
            return;
        }
        assert!(reply.starts_with("250 2.0.0 1 octets"), "{reply}");
        std::thread::sleep(TRICKLE_PAUSE);
    }
    panic!(
        "a BDAT trickle was still served after {:?}",
        started.elapsed()
    );
}

#[test]
fn a_trickling_data_body_is_cut_off_after_the_rate_window() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 1, "", SHORT_IDLE));
    let mut c = in_transaction(&server, "slow@remote.test");
    let started = Instant::now();
    assert!(c.command("DATA").starts_with("354"));
    trickle_until_cut_off(c, b"x", started);
}

/// Trickles `byte` ([`common::trickle`]) and expects `421 4.4.2` no sooner than 2 s after
/// `started`, taken before the reply that starts the server's clock.
fn trickle_until_cut_off(mut c: LineClient, byte: &'static [u8], started: Instant) {
    let trickle = trickle(c.stream.try_clone().unwrap(), byte);
    let reply = c.reply();
    assert!(reply.starts_with("421 4.4.2"), "{reply}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    // The writer stops at its first failed write now that the server has closed: cut off
    // while still trickling, not once the trickle had ended and gone quiet.
    assert!(trickle.join().unwrap(), "the trickle ran its course");
}

#[test]
fn a_command_line_trickled_a_byte_at_a_time_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 1, "", SHORT_IDLE));
    let mut c = LineClient::connect(server.addr("smtp"));
    assert!(c.reply().starts_with("220"));
    let started = Instant::now();
    assert!(c.command("EHLO client.test").starts_with("250"));
    // Never a whole line.
    trickle_until_cut_off(c, b"N", started);
}
