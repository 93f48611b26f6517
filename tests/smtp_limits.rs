//! SMTP limits without a configuration key of their own, on the real binary (SPEC §6).

mod common;

use common::{mail_config, pop3_retrieve_all, LineClient, Server};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

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

    {
        let (finish, started) = &*go;
        *finish.lock().unwrap() = true;
        started.notify_all();
    }
    let bodies: Vec<Vec<u8>> = senders.into_iter().map(|s| s.join().unwrap()).collect();
    let stored = pop3_retrieve_all(server.addr("pop3"), "bob@example.test");
    assert_eq!(stored.len(), SENDERS);
    for (n, body) in bodies.iter().enumerate() {
        assert!(
            stored.iter().any(|m| m.ends_with(body)),
            "sender {n}'s message is not stored intact"
        );
    }
}
