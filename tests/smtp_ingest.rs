//! SMTP ingest on the real binary: real clients, reply codes, durability across kill -9
//! (issue 4).

mod common;

use common::{mail_config, pop3_retrieve_all, send_mail, LineClient, Server};
use std::process::Command;
use std::time::Duration;

fn queue_id(reply: &str) -> String {
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    reply.rsplit(' ').next().unwrap().to_string()
}

#[test]
fn a_message_is_stored_with_received_and_retrieved_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 2, "", ""));
    let body =
        b"Subject: dots\r\n\r\n..leading dot\r\n8-bit: \xe9\xe8 NUL:\x00 end\r\n\r\nlast\r\n";
    let reply = send_mail(
        server.addr("smtp"),
        "sender@remote.test",
        &["Alice@Example.Test"],
        body,
    );
    let id = queue_id(&reply);
    let got = pop3_retrieve_all(server.addr("pop3"), "alice@example.test");
    assert_eq!(got.len(), 1);
    let text = &got[0];
    assert!(
        text.starts_with(
            b"Return-Path: <sender@remote.test>\r\nReceived: from client.test ([127.0.0.1])\r\n"
        ),
        "{}",
        String::from_utf8_lossy(text)
    );
    let received_end = text.windows(2).position(|w| w == b"\r\n").unwrap();
    let head = String::from_utf8_lossy(&text[..text.len() - body.len()]).to_string();
    assert!(head.contains(&format!("id {id}")), "{head}");
    assert!(head.contains("by mx.ringmail.test"), "{head}");
    assert!(head.contains("with ESMTP"), "{head}");
    assert!(received_end > 0);
    assert!(text.ends_with(body), "{}", String::from_utf8_lossy(text));
}

#[test]
fn lettre_sends_and_poplib_reads_it_back() {
    use lettre::message::header::{ContentTransferEncoding, ContentType};
    use lettre::message::Body;
    use lettre::{Message, SmtpTransport, Transport};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 2, "", ""));
    let smtp = server.addr("smtp");
    let mailer = SmtpTransport::builder_dangerous(smtp.ip().to_string())
        .port(smtp.port())
        .build();
    for n in 0..3 {
        let email = Message::builder()
            .from("Ann <ann@remote.test>".parse().unwrap())
            .to("bob@example.test".parse().unwrap())
            .to("carol@example.test".parse().unwrap())
            .subject(format!("lettre {n}: été"))
            .header(ContentType::TEXT_PLAIN)
            // Raw 8-bit, so that lettre sends MAIL FROM with BODY=8BITMIME.
            .body(
                Body::new_with_encoding(
                    format!(".a line that begins with a dot\r\nnumber {n}, 8-bit: été\r\n"),
                    ContentTransferEncoding::EightBit,
                )
                .unwrap(),
            )
            .unwrap();
        let response = mailer.send(&email).unwrap();
        assert_eq!(u16::from(response.code()), 250);
        let text = response.message().collect::<Vec<_>>().join(" ");
        assert!(text.starts_with("2.0.0 Ok: queued as "), "{text}");
    }
    // One connection for all three (lettre keeps it open), two recipients each.
    for user in ["bob@example.test", "carol@example.test"] {
        let got = pop3_retrieve_all(server.addr("pop3"), user);
        assert_eq!(got.len(), 3, "{user}");
        for (n, message) in got.iter().enumerate() {
            let text = String::from_utf8_lossy(message);
            assert!(
                text.starts_with("Return-Path: <ann@remote.test>\r\nReceived: "),
                "{text}"
            );
            // lettre dot-stuffs the leading dot on the wire; RETR sends it stuffed too.
            assert!(
                text.contains("\r\n..a line that begins with a dot\r\n"),
                "{text}"
            );
            assert!(text.contains(&format!("number {n}, 8-bit: été")), "{text}");
        }
    }
}

#[test]
fn python_smtplib_and_poplib_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 2, "", ""));
    let script = format!(
        r#"
import smtplib, poplib
msg = b"From: a@remote.test\r\nTo: bob@example.test\r\nSubject: py\r\n\r\n.starts with a dot\r\nunicode: \xc3\xa9t\xc3\xa9\r\n"
with smtplib.SMTP("127.0.0.1", {smtp}) as s:
    s.ehlo("py.test")
    assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("smtputf8") and s.has_extn("chunking")
    s.sendmail("a@remote.test", ["bob@example.test"], msg)
p = poplib.POP3("127.0.0.1", {pop3})
p.user("bob@example.test"); p.pass_("pw")
count, size = p.stat()
assert count == 1, count
resp, lines, octets = p.retr(1)
got = b"\r\n".join(lines) + b"\r\n"
assert got.endswith(msg), got
assert got.startswith(b"Return-Path: <a@remote.test>\r\nReceived: "), got
p.quit()
print("ok")
"#,
        smtp = server.addr("smtp").port(),
        pop3 = server.addr("pop3").port()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn swaks_delivers_when_installed() {
    if Command::new("swaks").arg("--version").output().is_err() {
        eprintln!("skipped: swaks is not installed (.ci/run installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 1, "", ""));
    let out = Command::new("swaks")
        .args([
            "--server",
            &server.addr("smtp").to_string(),
            "--to",
            "carol@example.test",
        ])
        .args([
            "--from",
            "s@remote.test",
            "--pipeline",
            "--body",
            "hello from swaks",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("250 2.0.0 Ok: queued as"), "{log}");
    let got = pop3_retrieve_all(server.addr("pop3"), "carol@example.test");
    assert!(String::from_utf8_lossy(&got[0]).contains("hello from swaks"));
}

#[test]
fn refusals_carry_their_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &mail_config(
            dir.path(),
            1,
            "",
            "max_recipients = 2\nmax_message_size = 2000\nrelay_networks = [\"10.0.0.0/8\"]",
        ),
    );
    let mut c = LineClient::connect(server.addr("smtp"));
    assert!(c.reply().starts_with("220 mx.ringmail.test ESMTP ringmail"));
    let ehlo = c.command("EHLO me.test");
    for ext in [
        "PIPELINING",
        "SIZE 2000",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "SMTPUTF8",
    ] {
        assert!(ehlo.contains(ext), "{ext} missing: {ehlo}");
    }
    assert!(c
        .command("RCPT TO:<alice@example.test>")
        .starts_with("503 5.5.1"));
    assert!(c
        .command("MAIL FROM:<s@remote.test> SIZE=5000")
        .starts_with("552 5.3.4"));
    assert!(c.command("MAIL FROM:<s@remote.test>").starts_with("250"));
    assert!(c
        .command("RCPT TO:<nobody@example.test>")
        .starts_with("550 5.1.1"));
    assert!(c
        .command("RCPT TO:<x@elsewhere.test>")
        .starts_with("554 5.7.1"));
    assert!(c
        .command("RCPT TO:<alice@example.test>")
        .starts_with("250 2.1.5"));
    assert!(c
        .command("RCPT TO:<bob@example.test>")
        .starts_with("250 2.1.5"));
    assert!(c
        .command("RCPT TO:<carol@example.test>")
        .starts_with("452 4.5.3"));
    assert!(c.command("DATA").starts_with("354"));
    c.send(&vec![b'x'; 3000]);
    c.send(b"\r\n.\r\n");
    assert!(c.reply().starts_with("552 5.3.4"));
    assert!(c.command("VRFY alice").starts_with("252"));
    assert!(c.command("NOOP").starts_with("250"));
    assert!(c.command("BOGUS").starts_with("500 5.5"));
    let long = format!("NOOP {}", "a".repeat(600));
    assert!(c.command(&long).starts_with("500 5.5.2"));
    assert!(c.command("QUIT").starts_with("221"));
    assert!(pop3_retrieve_all(server.addr("pop3"), "alice@example.test").is_empty());
    // One log line per rejection, with its code.
    std::thread::sleep(Duration::from_millis(200));
    let log = server.stderr_lines().join("\n");
    for code in ["code=550", "code=554", "code=452", "code=552"] {
        assert!(log.contains(code), "{code} not logged: {log}");
    }
}

#[test]
fn a_bdat_body_that_grows_when_stuffed_is_stored_whole() {
    // 299,997 octets within SIZE 300000, every line a lone dot: stuffed, the body takes a
    // third more room in the log, and the log's record limit must make room for it.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &mail_config(dir.path(), 1, "", "max_message_size = 300000"),
    );
    let body = b".\r\n".repeat(99_999);
    let mut c = LineClient::connect(server.addr("smtp"));
    c.reply();
    assert!(c.command("EHLO me.test").contains("SIZE 300000"));
    assert!(c.command("MAIL FROM:<s@remote.test>").starts_with("250"));
    assert!(c.command("RCPT TO:<alice@example.test>").starts_with("250"));
    c.send(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
    c.send(&body);
    let id = queue_id(&c.reply());
    assert!(c.command("QUIT").starts_with("221"));
    let got = pop3_retrieve_all(server.addr("pop3"), "alice@example.test");
    assert_eq!(got.len(), 1);
    let text = &got[0];
    // RETR sends the stored, stuffed form: every ".\r\n" became "..\r\n".
    let stuffed = b"..\r\n".repeat(99_999);
    assert!(text.ends_with(&stuffed));
    let head = String::from_utf8_lossy(&text[..text.len() - stuffed.len()]).to_string();
    assert!(
        head.starts_with("Return-Path: <s@remote.test>\r\nReceived: from me.test"),
        "{head}"
    );
    assert!(head.contains(&format!("id {id}")), "{head}");
    assert!(head.ends_with(" +0000\r\n"), "{head}");
}

#[test]
fn bare_line_feeds_are_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &mail_config(dir.path(), 1, "", ""));
    let mut c = LineClient::connect(server.addr("smtp"));
    c.reply();
    c.command("EHLO me.test");
    c.command("MAIL FROM:<s@remote.test>");
    c.command("RCPT TO:<alice@example.test>");
    assert!(c.command("DATA").starts_with("354"));
    // The smuggling attempt: a bare-LF "end of data" followed by a second transaction.
    c.send(b"Subject: a\r\n\r\nbody\n.\nMAIL FROM:<evil@remote.test>\r\n\r\n.\r\n");
    let reply = c.reply();
    assert!(reply.starts_with('5'), "{reply}");
    assert!(pop3_retrieve_all(server.addr("pop3"), "alice@example.test").is_empty());
}

#[test]
fn too_many_connections_get_421() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &mail_config(dir.path(), 2, "", "max_connections = 2"),
    );
    let mut first = LineClient::connect(server.addr("smtp"));
    let mut second = LineClient::connect(server.addr("smtp"));
    assert!(first.reply().starts_with("220"));
    assert!(second.reply().starts_with("220"));
    let mut third = LineClient::connect(server.addr("smtp"));
    assert!(third.reply().starts_with("421 4.7.0"));
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    let mut fourth = LineClient::connect(server.addr("smtp"));
    assert!(fourth.reply().starts_with("220"));
}

#[test]
fn queue_ids_are_unique_across_shards_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = mail_config(dir.path(), 2, "", "");
    let mut ids = std::collections::HashSet::new();
    for _ in 0..2 {
        let mut server = Server::start(dir.path(), &config);
        for i in 0..20 {
            let reply = send_mail(
                server.addr("smtp"),
                "s@remote.test",
                &["alice@example.test"],
                format!("Subject: {i}\r\n\r\nx\r\n").as_bytes(),
            );
            assert!(
                ids.insert(queue_id(&reply)),
                "duplicate queue id in {reply}"
            );
        }
        server.signal(libc::SIGTERM);
        assert_eq!(server.wait(Duration::from_secs(15)).code(), Some(0));
    }
    let server = Server::start(dir.path(), &config);
    assert_eq!(
        pop3_retrieve_all(server.addr("pop3"), "alice@example.test").len(),
        40
    );
}

#[test]
fn sigterm_lets_a_transaction_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &mail_config(dir.path(), 1, "", ""));
    let mut idle = LineClient::connect(server.addr("smtp"));
    idle.reply();
    let mut c = LineClient::connect(server.addr("smtp"));
    c.reply();
    c.command("EHLO me.test");
    c.command("MAIL FROM:<s@remote.test>");
    c.command("RCPT TO:<alice@example.test>");
    assert!(c.command("DATA").starts_with("354"));
    c.send(b"Subject: in flight\r\n\r\n");
    server.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    // The idle session is told goodbye; the one inside DATA may finish.
    assert!(idle.reply().starts_with("421 4.3.2"));
    c.send(b"still here\r\n.\r\n");
    assert!(c.reply().starts_with("250 2.0.0"));
    assert_eq!(server.wait(Duration::from_secs(15)).code(), Some(0));
    let config = std::fs::read_to_string(&server.config_path).unwrap();
    drop(server);
    let server = Server::start(dir.path(), &config);
    let got = pop3_retrieve_all(server.addr("pop3"), "alice@example.test");
    assert_eq!(got.len(), 1);
}

/// 8 clients send concurrently; the server is killed with SIGKILL at a random moment; after a
/// restart every message that got 250 must be there, byte for byte.
#[test]
fn kill_9_loses_no_acknowledged_message() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let config = mail_config(dir.path(), 2, "", "");
    let mut server = Server::start(dir.path(), &config);
    let smtp = server.addr("smtp");
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, Vec<u8>)>::new()));
    let mut clients = Vec::new();
    for client in 0..8 {
        let acknowledged = Arc::clone(&acknowledged);
        clients.push(std::thread::spawn(move || {
            let users = [
                "alice@example.test",
                "bob@example.test",
                "carol@example.test",
            ];
            for n in 0.. {
                let user = users[(client + n) % 3];
                let body = format!(
                    "Subject: c{client} n{n}\r\nX-Id: {client}-{n}\r\n\r\n{}\r\n",
                    format!("line {n} of client {client} ").repeat(40 + n % 200)
                )
                .into_bytes();
                let result =
                    std::panic::catch_unwind(|| send_mail(smtp, "s@remote.test", &[user], &body));
                match result {
                    Ok(reply) if reply.starts_with("250 ") => {
                        acknowledged.lock().unwrap().push((user.to_string(), body));
                    }
                    _ => return,
                }
            }
        }));
    }
    let wait_ms = 300 + (std::process::id() as u64 * 7919) % 1200;
    std::thread::sleep(Duration::from_millis(wait_ms));
    server.kill9();
    for c in clients {
        let _ = c.join();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        !acknowledged.is_empty(),
        "no message was acknowledged before the kill"
    );
    let server = Server::start(dir.path(), &config);
    for user in [
        "alice@example.test",
        "bob@example.test",
        "carol@example.test",
    ] {
        let stored = pop3_retrieve_all(server.addr("pop3"), user);
        for (_, body) in acknowledged.iter().filter(|(u, _)| u == user) {
            assert!(
                stored.iter().any(|m| m.ends_with(body)),
                "an acknowledged message for {user} is missing after kill -9"
            );
        }
    }
    eprintln!(
        "{} acknowledged messages all present after kill -9 at {wait_ms} ms",
        acknowledged.len()
    );
}

#[test]
fn a_silent_client_is_told_421_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &mail_config(dir.path(), 1, "", "idle_timeout_secs = 0.3"),
    );
    let mut c = LineClient::connect(server.addr("smtp"));
    assert!(c.reply().starts_with("220"));
    // Before the EHLO: the idle clock starts when its reply goes out.
    let started = std::time::Instant::now();
    assert!(c.command("EHLO me.test").starts_with("250"));
    let reply = c.reply();
    assert!(reply.starts_with("421 4.4.2"), "{reply}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(c.closed());
}

#[test]
fn connections_per_address_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &mail_config(dir.path(), 2, "", "max_connections_per_ip = 1"),
    );
    let mut first = LineClient::connect(server.addr("smtp"));
    assert!(first.reply().starts_with("220"));
    let mut second = LineClient::connect(server.addr("smtp"));
    assert!(second.reply().starts_with("421 4.7.0"));
    assert!(first.command("NOOP").starts_with("250"));
}
