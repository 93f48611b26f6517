//! POP3 on the real binary: retrieval byte-exact, TOP, UIDL stability, IN-USE, UPDATE
//! semantics and durability (issue 6).

mod common;

use common::{mail_config, pop3_retrieve_all, send_mail, LineClient, Server};
use std::process::Command;
use std::time::Duration;

fn login(addr: std::net::SocketAddr, user: &str) -> LineClient {
    let mut c = LineClient::connect(addr);
    assert!(c.line().starts_with("+OK"));
    assert!(c.command(&format!("USER {user}")).starts_with("+OK"));
    let r = c.command("PASS pw");
    assert!(r.starts_with("+OK"), "{r}");
    c
}

fn uidls(c: &mut LineClient) -> Vec<String> {
    assert!(c.command("UIDL").starts_with("+OK"));
    String::from_utf8(c.pop3_multiline())
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect()
}

#[test]
fn retr_top_list_and_uidl_agree_with_what_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 2, "", ""));
    let bodies: Vec<Vec<u8>> = vec![
        b"Subject: one\r\n\r\n..dot line\r\nsecond\r\nthird\r\n".to_vec(),
        [
            "Subject: =?UTF-8?Q?two?=\r\n\r\nunicode \u{e9}\u{1f600}\r\n".as_bytes(),
            b"\xff\x80 raw 8-bit\r\n",
        ]
        .concat(),
    ];
    for body in &bodies {
        let reply = send_mail(
            server.addr("smtp"),
            "s@remote.test",
            &["alice@example.test"],
            body,
        );
        assert!(reply.starts_with("250"), "{reply}");
    }
    let mut c = login(server.addr("pop3"), "alice@example.test");
    let capa = {
        assert!(c.command("CAPA").starts_with("+OK"));
        String::from_utf8(c.pop3_multiline()).unwrap()
    };
    for cap in [
        "TOP",
        "UIDL",
        "USER",
        "SASL PLAIN",
        "RESP-CODES",
        "PIPELINING",
    ] {
        assert!(capa.contains(cap), "{cap} missing: {capa}");
    }
    let stat = c.command("STAT");
    assert!(stat.starts_with("+OK 2 "), "{stat}");
    assert!(c.command("LIST").starts_with("+OK"));
    let list = String::from_utf8(c.pop3_multiline()).unwrap();
    let sizes: Vec<usize> = list
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    for (n, body) in bodies.iter().enumerate() {
        assert!(c.command(&format!("RETR {}", n + 1)).starts_with("+OK"));
        let got = c.pop3_multiline();
        assert!(got.ends_with(body), "{}", String::from_utf8_lossy(&got));
        assert_eq!(got.len(), sizes[n], "LIST size must be what RETR sends");
    }
    assert!(c.command("TOP 1 1").starts_with("+OK"));
    let top = c.pop3_multiline();
    assert!(
        top.ends_with(b"Subject: one\r\n\r\n..dot line\r\n"),
        "{}",
        String::from_utf8_lossy(&top)
    );
    assert_eq!(uidls(&mut c).len(), 2);
    assert!(c.command("RETR 3").starts_with("-ERR"));
    assert!(c.command("QUIT").starts_with("+OK"));
}

#[test]
fn a_twenty_megabyte_message_is_retrieved_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 1, "", ""));
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    while body.len() < 20 << 20 {
        body.extend_from_slice(line);
    }
    let reply = send_mail(
        server.addr("smtp"),
        "s@remote.test",
        &["bob@example.test"],
        &body,
    );
    assert!(reply.starts_with("250"), "{reply}");
    let got = pop3_retrieve_all(server.addr("pop3"), "bob@example.test");
    assert!(got[0].ends_with(&body));
}

#[test]
fn uidls_survive_a_restart_and_deletes_apply_only_at_quit() {
    let dir = tempfile::tempdir().unwrap();
    let config = mail_config(dir.path(), 2, "", "");
    let mut server = Server::start(dir.path(), &config);
    for i in 0..3 {
        send_mail(
            server.addr("smtp"),
            "s@remote.test",
            &["carol@example.test"],
            format!("Subject: {i}\r\n\r\n{i}\r\n").as_bytes(),
        );
    }
    let before = {
        let mut c = login(server.addr("pop3"), "carol@example.test");
        let u = uidls(&mut c);
        // DELE, then drop the connection: nothing is deleted.
        assert!(c.command("DELE 1").starts_with("+OK"));
        drop(c);
        u
    };
    std::thread::sleep(Duration::from_millis(200));
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(15)).code(), Some(0));
    drop(server);

    let mut server = Server::start(dir.path(), &config);
    let mut c = login(server.addr("pop3"), "carol@example.test");
    assert_eq!(
        uidls(&mut c),
        before,
        "UIDLs changed across a restart (or a dropped DELE applied)"
    );
    assert!(c.command("DELE 2").starts_with("+OK"));
    assert!(c.command("RETR 2").starts_with("-ERR"));
    assert!(c.command("RSET").starts_with("+OK"));
    assert!(c.command("DELE 2").starts_with("+OK"));
    assert!(c.command("QUIT").starts_with("+OK"));
    server.kill9();
    drop(server);

    let server = Server::start(dir.path(), &config);
    let mut c = login(server.addr("pop3"), "carol@example.test");
    let after = uidls(&mut c);
    assert_eq!(
        after,
        vec![before[0].clone(), before[2].clone()],
        "a deleted message came back after kill -9"
    );
}

#[test]
fn a_mailbox_in_use_is_refused_on_any_shard() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 2, "", ""));
    let first = login(server.addr("pop3"), "alice@example.test");
    // Several tries so that the second session lands on both shards at least once.
    for _ in 0..6 {
        let mut c = LineClient::connect(server.addr("pop3"));
        assert!(c.line().starts_with("+OK"));
        c.command("USER alice@example.test");
        let r = c.command("PASS pw");
        assert!(r.starts_with("-ERR [IN-USE]"), "{r}");
    }
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    let mut again = login(server.addr("pop3"), "alice@example.test");
    assert!(again.command("QUIT").starts_with("+OK"));
}

#[test]
fn a_wrong_password_is_refused_after_a_delay() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 1, "", ""));
    let mut c = LineClient::connect(server.addr("pop3"));
    c.line();
    c.command("USER alice@example.test");
    let started = std::time::Instant::now();
    let r = c.command("PASS wrong");
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[test]
fn a_guess_on_a_new_connection_waits_for_the_failures_slot_too() {
    // Answering only failures late would tell a guesser "wrong" as soon as a check's time had
    // passed, and it would reconnect: every attempt from the address waits for its slot.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 1, "", ""));
    let mut first = LineClient::connect(server.addr("pop3"));
    first.line();
    first.command("USER alice@example.test");
    let mut second = LineClient::connect(server.addr("pop3"));
    second.line();
    second.command("USER alice@example.test");
    first.send(b"PASS wrong\r\n");
    // Once the check has failed (the server logs it), and before the delayed answer comes,
    // try again on a new connection; the right password still works, after the slot.
    let mut logs = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !logs
        .iter()
        .any(|l: &String| l.contains("pop3 login failed"))
    {
        assert!(std::time::Instant::now() < deadline, "{logs:#?}");
        std::thread::sleep(Duration::from_millis(5));
        logs.extend(server.stderr_lines());
    }
    let r = second.command("PASS pw");
    assert!(r.starts_with("+OK"), "{r}");
    assert!(first.reply().starts_with("-ERR [AUTH]"));
    assert!(second.command("QUIT").starts_with("+OK"));
    std::thread::sleep(Duration::from_millis(100));
    logs.extend(server.stderr_lines());
    assert!(
        logs.iter().any(|l| l.contains("pop3 login attempt waits")),
        "{logs:#?}"
    );
}

#[test]
fn curl_retrieves_over_pop3() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("skipped: curl missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 2, "", ""));
    send_mail(
        server.addr("smtp"),
        "s@remote.test",
        &["bob@example.test"],
        b"Subject: curl\r\n\r\nfetched by curl\r\n",
    );
    let out = Command::new("curl")
        .args(["-s", "--user", "bob@example.test:pw"])
        .arg(format!("pop3://{}/1", server.addr("pop3")))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("fetched by curl"), "{text}");
    assert!(text.starts_with("Return-Path: <s@remote.test>"), "{text}");
}

fn segment_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("seg-"))
        .collect();
    names.sort();
    names
}

/// Deleting most messages of a sealed segment gets it compacted: the survivors are copied
/// forward, keep their UIDLs and stay byte-exact, and the old segment file disappears.
#[test]
fn compaction_keeps_every_live_message_with_its_uidl() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &mail_config(dir.path(), 1, "", "max_message_size = 2000000"),
    );
    let mut bodies = Vec::new();
    for i in 0..70 {
        let mut body = format!("Subject: {i}\r\n\r\n").into_bytes();
        let line = format!("message {i} filler line with some text in it\r\n");
        while body.len() < 1 << 20 {
            body.extend_from_slice(line.as_bytes());
        }
        let reply = send_mail(
            server.addr("smtp"),
            "s@remote.test",
            &["alice@example.test"],
            &body,
        );
        assert!(reply.starts_with("250"), "{reply}");
        bodies.push(body);
    }
    let shard_dir = dir.path().join("data/shard-0");
    let before = segment_files(&shard_dir);
    assert!(
        before.len() >= 2,
        "70 MiB should fill more than one 64 MiB segment: {before:?}"
    );

    let mut c = login(server.addr("pop3"), "alice@example.test");
    let all = uidls(&mut c);
    // Delete every message but every tenth one.
    for n in 1..=70 {
        if n % 10 != 0 {
            assert!(c.command(&format!("DELE {n}")).starts_with("+OK"));
        }
    }
    assert!(c.command("QUIT").starts_with("+OK"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while segment_files(&shard_dir).contains(&before[0]) {
        assert!(
            std::time::Instant::now() < deadline,
            "the sparse first segment was never reclaimed: {:?}",
            segment_files(&shard_dir)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut c = login(server.addr("pop3"), "alice@example.test");
    let kept: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| (i + 1) % 10 == 0)
        .map(|(_, u)| u.clone())
        .collect();
    assert_eq!(uidls(&mut c), kept);
    for (n, i) in (9..70).step_by(10).enumerate() {
        assert!(c.command(&format!("RETR {}", n + 1)).starts_with("+OK"));
        assert!(
            c.pop3_multiline().ends_with(&bodies[i]),
            "message {i} changed by compaction"
        );
    }
    assert!(c.command("QUIT").starts_with("+OK"));
}

#[test]
fn a_silent_pop3_client_is_logged_out_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config = mail_config(dir.path(), 1, "", "").replace(
        "[pop3]\nlisten = [\"127.0.0.1:0\"]",
        "[pop3]\nlisten = [\"127.0.0.1:0\"]\nidle_timeout_secs = 0.3",
    );
    let server = Server::start(dir.path(), &config);
    let mut c = login(server.addr("pop3"), "alice@example.test");
    let reply = c.line();
    assert!(reply.starts_with("-ERR"), "{reply}");
    assert!(c.closed());
    // The lock went with the session.
    let mut again = login(server.addr("pop3"), "alice@example.test");
    assert!(again.command("QUIT").starts_with("+OK"));
}

#[test]
fn a_pop3_command_trickled_a_byte_at_a_time_is_logged_out_too() {
    let dir = tempfile::tempdir().unwrap();
    let config = mail_config(dir.path(), 1, "", "").replace(
        "[pop3]\nlisten = [\"127.0.0.1:0\"]",
        "[pop3]\nlisten = [\"127.0.0.1:0\"]\nidle_timeout_secs = 1",
    );
    let server = Server::start(dir.path(), &config);
    // Before the login: the idle clock starts at the last reply, PASS's +OK.
    let started = std::time::Instant::now();
    let mut c = login(server.addr("pop3"), "alice@example.test");
    let trickle = common::trickle(c.stream.try_clone().unwrap(), b"N");
    let reply = c.line();
    assert!(reply.starts_with("-ERR"), "{reply}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    // Cut off while still trickling, not once the trickle had ended and gone quiet.
    assert!(trickle.join().unwrap(), "the trickle ran its course");
}

/// Pipelined commands answered in order: replies and messages that leave together in one
/// `sendmsg` (the outbox) must still come out exactly as one command at a time would.
#[test]
fn pipelined_commands_are_answered_in_order_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 2, "", ""));
    let bodies: Vec<Vec<u8>> = (0..40)
        .map(|i| {
            let mut body = format!("Subject: pipelined {i}\r\n\r\n..dotted {i}\r\n").into_bytes();
            // Mixed sizes, so some outboxes fill up and flush between messages.
            body.extend(std::iter::repeat_n(b'x', (i % 7) * 9000));
            body.extend_from_slice(b"\r\nlast line\r\n");
            body
        })
        .collect();
    for body in &bodies {
        let reply = send_mail(
            server.addr("smtp"),
            "s@remote.test",
            &["bob@example.test"],
            body,
        );
        assert!(reply.starts_with("250"), "{reply}");
    }
    let one_at_a_time = pop3_retrieve_all(server.addr("pop3"), "bob@example.test");
    assert_eq!(one_at_a_time.len(), bodies.len());

    let mut c = login(server.addr("pop3"), "bob@example.test");
    let mut batch = String::new();
    for n in 1..=bodies.len() {
        batch.push_str(&format!("RETR {n}\r\nNOOP\r\n"));
        if n % 10 == 0 {
            batch.push_str(&format!("TOP {n} 0\r\nSTAT\r\n"));
        }
    }
    batch.push_str("QUIT\r\n");
    c.send(batch.as_bytes());
    for n in 1..=bodies.len() {
        let status = c.line();
        assert!(status.starts_with("+OK"), "RETR {n}: {status}");
        let message = c.pop3_multiline();
        assert_eq!(message, one_at_a_time[n - 1], "RETR {n}");
        assert!(message.ends_with(&bodies[n - 1]), "RETR {n}");
        assert!(c.line().starts_with("+OK"), "NOOP after RETR {n}");
        if n % 10 == 0 {
            assert!(c.line().starts_with("+OK"), "TOP {n}");
            let head = c.pop3_multiline();
            let subject = format!("Subject: pipelined {}\r\n\r\n", n - 1);
            assert!(head.ends_with(subject.as_bytes()), "TOP {n}");
            let stat = c.line();
            assert!(
                stat.starts_with(&format!("+OK {} ", bodies.len())),
                "{stat}"
            );
        }
    }
    assert!(c.line().starts_with("+OK"), "QUIT");
}
