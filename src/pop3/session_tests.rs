//! State-machine tests: tables of dialogues, split-point equivalence, limits, callbacks.

use proptest::prelude::*;

use super::session::{MAX_BAD_COMMANDS, OUTPUT_HIGH_WATER_OCTETS};
use super::testkit::{params, peer, Driver, FakeStore};
use super::{Action, MessageKey, OpenFailure, Session};

const ALICE_PLAIN: &str = "AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ="; // \0alice@example.test\0secret

fn store() -> FakeStore {
    let mut store = FakeStore::default();
    store
        .passwords
        .insert("alice@example.test".into(), "secret".into());
    store.add_message(
        "alice@example.test",
        "uid-1",
        "bob@example.test",
        b"Received: from x\r\nSubject: one\r\n\r\nfirst\r\n..dot\r\nlast\r\n",
    );
    store.add_message(
        "alice@example.test",
        "uid-2",
        "",
        b"Subject: two\r\n\r\nbody\r\n",
    );
    store
}

fn transcript_of(input: &[u8], chunk_size: usize) -> String {
    let mut driver = Driver::new(store(), params(false), peer(true));
    driver.feed(input, chunk_size);
    String::from_utf8(driver.transcript).expect("ASCII transcript")
}

const LOGIN: &str = "USER alice@example.test\r\nPASS secret\r\n";

/// (client input after the greeting, exact server output after the greeting).
fn table() -> Vec<(String, String)> {
    let ok_login = "+OK send PASS\r\n+OK maildrop has 2 messages (";

    vec![
        ("QUIT\r\n".into(), "+OK mx.example.test POP3 ringmail signing off\r\n".into()),
        ("NOOP\r\n".into(), "-ERR not logged in\r\n".into()),
        ("STAT\r\n".into(), "-ERR not logged in\r\n".into()),
        ("PASS secret\r\n".into(), "-ERR send USER first\r\n".into()),
        ("HELO\r\n".into(), "-ERR unknown command\r\n".into()),
        ("USER a b\r\n".into(), "-ERR syntax error: too many arguments\r\n".into()),
        ("STLS\r\n".into(), "-ERR STLS not available\r\n".into()),
        ("AUTH CRAM-MD5\r\n".into(), "-ERR unsupported SASL mechanism\r\n".into()),
        ("AUTH\r\n".into(), "+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n".into()),
        ("AUTH PLAIN\r\n*\r\n".into(), "+ \r\n-ERR authentication cancelled\r\n".into()),
        ("AUTH PLAIN =\r\n".into(), "-ERR [AUTH] invalid SASL PLAIN response\r\n".into()),
        ("AUTH PLAIN !!!!\r\n".into(), "-ERR [AUTH] invalid SASL PLAIN response\r\n".into()),
        (
            "USER alice@example.test\r\nPASS wrong\r\n".into(),
            "+OK send PASS\r\n-ERR [AUTH] invalid user name or password\r\n".into(),
        ),
        (
            format!("{LOGIN}STAT\r\n"),
            format!("{ok_login}{} octets)\r\n+OK 2 {}\r\n", 87 + 39, 87 + 39),
        ),
        (
            format!("{LOGIN}LIST\r\nUIDL\r\nLIST 2\r\nUIDL 1\r\nLIST 3\r\nLIST 0\r\n"),
            format!(
                "{ok_login}126 octets)\r\n+OK 2 messages (126 octets)\r\n1 87\r\n2 39\r\n.\r\n\
                 +OK unique-id listing follows\r\n1 uid-1\r\n2 uid-2\r\n.\r\n+OK 2 39\r\n+OK 1 uid-1\r\n\
                 -ERR no such message\r\n-ERR no such message\r\n"
            ),
        ),
        (
            format!("{LOGIN}RETR 1\r\nTOP 1 1\r\nTOP 2 0\r\n"),
            format!(
                "{ok_login}126 octets)\r\n+OK 87 octets\r\nReturn-Path: <bob@example.test>\r\n\
                 Received: from x\r\nSubject: one\r\n\r\nfirst\r\n..dot\r\nlast\r\n.\r\n\
                 +OK top of message follows\r\nReturn-Path: <bob@example.test>\r\n\
                 Received: from x\r\nSubject: one\r\n\r\nfirst\r\n.\r\n\
                 +OK top of message follows\r\nReturn-Path: <>\r\nSubject: two\r\n\r\n.\r\n"
            ),
        ),
        (
            format!("{LOGIN}DELE 1\r\nDELE 1\r\nRETR 1\r\nSTAT\r\nLIST\r\nRSET\r\nSTAT\r\n"),
            format!(
                "{ok_login}126 octets)\r\n+OK message 1 deleted\r\n-ERR message 1 already deleted\r\n\
                 -ERR message 1 already deleted\r\n+OK 1 39\r\n+OK 1 messages (39 octets)\r\n2 39\r\n.\r\n\
                 +OK maildrop has 2 messages (126 octets)\r\n+OK 2 126\r\n"
            ),
        ),
        (
            format!("{LOGIN}DELE 2\r\nQUIT\r\nNOOP\r\n"),
            format!(
                "{ok_login}126 octets)\r\n+OK message 2 deleted\r\n\
                 +OK mx.example.test POP3 ringmail signing off (1 messages left)\r\n"
            ),
        ),
        (
            format!("{LOGIN}NOOP\r\nUSER x\r\nCAPA\r\n"),
            format!(
                "{ok_login}126 octets)\r\n+OK\r\n-ERR already logged in\r\n+OK capability list follows\r\n\
                 TOP\r\nUIDL\r\nUSER\r\nSASL PLAIN\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n\
                 IMPLEMENTATION ringmail\r\n.\r\n"
            ),
        ),
        (
            format!("AUTH PLAIN {ALICE_PLAIN}\r\nSTAT\r\n"),
            "+OK maildrop has 2 messages (126 octets)\r\n+OK 2 126\r\n".into(),
        ),
        (
            format!("AUTH PLAIN\r\n{ALICE_PLAIN}\r\nSTAT\r\n"),
            "+ \r\n+OK maildrop has 2 messages (126 octets)\r\n+OK 2 126\r\n".into(),
        ),
        (
            // Bare LF ends commands too.
            "USER alice@example.test\nPASS secret\nSTAT\n".into(),
            format!("{ok_login}126 octets)\r\n+OK 2 126\r\n"),
        ),
        (
            format!("{}\r\nNOOP\r\n", "X".repeat(300)),
            "-ERR command line too long\r\n-ERR not logged in\r\n".into(),
        ),
        (
            // 255 octets with CRLF is the limit; 256 is too long.
            format!("USER {}\r\nUSER {}\r\n", "a".repeat(248), "a".repeat(249)),
            "+OK send PASS\r\n-ERR command line too long\r\n".into(),
        ),
    ]
}

#[test]
fn session_table() {
    for (input, expected) in table() {
        let transcript = transcript_of(input.as_bytes(), usize::MAX);
        let greeting = "+OK mx.example.test POP3 ringmail ready\r\n";
        assert_eq!(
            transcript.strip_prefix(greeting),
            Some(expected.as_str()),
            "input {input:?}"
        );
    }
}

#[test]
fn every_split_point_gives_the_same_transcript() {
    for (input, _) in table() {
        let whole = transcript_of(input.as_bytes(), usize::MAX);
        let bytes = input.as_bytes();
        for split in 0..=bytes.len() {
            let mut driver = Driver::new(store(), params(false), peer(true));
            driver.feed(&bytes[..split], usize::MAX);
            driver.feed(&bytes[split..], usize::MAX);
            assert_eq!(
                String::from_utf8_lossy(&driver.transcript),
                whole,
                "split {split} of {input:?}"
            );
        }
        assert_eq!(transcript_of(bytes, 1), whole, "byte by byte {input:?}");
    }
}

#[test]
fn quit_commits_deletions_before_answering() {
    let mut driver = Driver::new(store(), params(false), peer(true));
    driver.feed(format!("{LOGIN}DELE 1\r\nQUIT\r\n").as_bytes(), usize::MAX);
    let commit = driver
        .actions
        .iter()
        .find(|a| matches!(a, Action::Commit { .. }));
    let first_key = MessageKey {
        shard: 0,
        record: 1000,
        recipient: 0,
    };
    assert_eq!(
        commit,
        Some(&Action::Commit {
            deletions: vec![first_key]
        })
    );
    assert!(driver.closed);
    assert_eq!(driver.store.mailboxes["alice@example.test"].len(), 1);

    // Before commit_done, nothing is answered to QUIT.
    let mut session = logged_in_session();
    feed(&mut session, b"DELE 2\r\nQUIT\r\n");
    let out = take_output(&mut session);
    assert!(out.ends_with("+OK message 2 deleted\r\n"), "{out}");
    assert!(matches!(session.poll_action(), Action::Commit { .. }));
    assert!(!session.wants_input());
    session.commit_done(false);
    assert_eq!(
        take_output(&mut session),
        "-ERR [SYS/TEMP] some deleted messages not removed\r\n"
    );
    assert_eq!(session.poll_action(), Action::Close);
}

#[test]
fn quit_without_deletions_closes_without_commit() {
    let mut driver = Driver::new(store(), params(false), peer(true));
    driver.feed(format!("{LOGIN}QUIT\r\n").as_bytes(), usize::MAX);
    assert!(driver.closed);
    assert!(!driver
        .actions
        .iter()
        .any(|a| matches!(a, Action::Commit { .. })));
}

fn feed(session: &mut Session, bytes: &[u8]) {
    let buffer = session.input_buffer();
    buffer[..bytes.len()].copy_from_slice(bytes);
    session.input_filled(bytes.len());
}

fn take_output(session: &mut Session) -> String {
    let out = String::from_utf8_lossy(session.output()).into_owned();
    session.output_consumed(out.len());
    out
}

fn logged_in_session() -> Session {
    let mut session = Session::new(params(false), peer(true));
    take_output(&mut session);
    feed(&mut session, LOGIN.as_bytes());
    assert!(matches!(session.poll_action(), Action::Authenticate { .. }));
    session.auth_checked(true);
    assert!(matches!(session.poll_action(), Action::OpenMailbox { .. }));
    let entries = store().mailboxes["alice@example.test"]
        .iter()
        .map(|m| super::MessageEntry {
            key: m.key,
            size_octets: m.size_octets(),
            uidl: m.uidl.clone(),
        })
        .collect();
    session.mailbox_opened(Ok(entries));
    take_output(&mut session);
    session
}

#[test]
fn pipelined_commands_wait_for_each_callback() {
    let mut session = Session::new(params(false), peer(true));
    take_output(&mut session);
    feed(
        &mut session,
        format!("{LOGIN}STAT\r\nRETR 1\r\nNOOP\r\n").as_bytes(),
    );
    assert_eq!(
        session.poll_action(),
        Action::Authenticate {
            user: "alice@example.test".into(),
            password: "secret".into()
        }
    );
    assert_eq!(session.poll_action(), Action::Idle);
    assert!(
        !session.wants_input(),
        "no reading while the login is checked"
    );
    assert_eq!(take_output(&mut session), "+OK send PASS\r\n");
    session.auth_checked(true);
    assert_eq!(
        session.poll_action(),
        Action::OpenMailbox {
            user: "alice@example.test".into()
        }
    );
    assert_eq!(take_output(&mut session), "");
    let key = MessageKey {
        shard: 1,
        record: 9,
        recipient: 2,
    };
    session.mailbox_opened(Ok(vec![super::MessageEntry {
        key,
        size_octets: 42,
        uidl: "u".into(),
    }]));
    assert_eq!(
        session.poll_action(),
        Action::SendMessage {
            key,
            top_lines: None
        }
    );
    assert_eq!(
        take_output(&mut session),
        "+OK maildrop has 1 messages (42 octets)\r\n+OK 1 42\r\n+OK 42 octets\r\n"
    );
    assert!(!session.wants_input());
    session.message_sent();
    assert_eq!(take_output(&mut session), "+OK\r\n");
    assert!(session.wants_input());
}

#[test]
fn open_failures_keep_the_session_in_authorization() {
    for (failure, reply) in [
        (
            OpenFailure::InUse,
            "-ERR [IN-USE] maildrop is locked by another session\r\n",
        ),
        (
            OpenFailure::Unavailable,
            "-ERR [SYS/TEMP] maildrop temporarily unavailable, try again later\r\n",
        ),
    ] {
        let mut session = Session::new(params(false), peer(true));
        take_output(&mut session);
        feed(&mut session, format!("{LOGIN}STAT\r\n").as_bytes());
        session.poll_action();
        session.auth_checked(true);
        session.poll_action();
        session.mailbox_opened(Err(failure));
        assert_eq!(
            take_output(&mut session),
            format!("+OK send PASS\r\n{reply}-ERR not logged in\r\n")
        );
    }
}

#[test]
fn invalid_uidls_from_the_index_are_refused() {
    let mut session = Session::new(params(false), peer(true));
    take_output(&mut session);
    feed(&mut session, LOGIN.as_bytes());
    session.poll_action();
    session.auth_checked(true);
    session.poll_action();
    let key = MessageKey {
        shard: 0,
        record: 0,
        recipient: 0,
    };
    session.mailbox_opened(Ok(vec![super::MessageEntry {
        key,
        size_octets: 1,
        uidl: "has space".into(),
    }]));
    assert!(take_output(&mut session).ends_with("-ERR [SYS/PERM] maildrop index is corrupt\r\n"));
}

#[test]
fn callbacks_out_of_turn_are_ignored() {
    let mut session = Session::new(params(false), peer(true));
    take_output(&mut session);
    session.auth_checked(true);
    session.mailbox_opened(Ok(Vec::new()));
    session.message_sent();
    session.commit_done(true);
    session.tls_started();
    assert_eq!(session.poll_action(), Action::Idle);
    assert_eq!(take_output(&mut session), "");
    assert!(session.wants_input());
}

#[test]
fn too_many_bad_commands_close_the_session() {
    let input = "BOGUS\r\n".repeat(MAX_BAD_COMMANDS as usize + 5);
    let mut driver = Driver::new(store(), params(false), peer(true));
    driver.feed(input.as_bytes(), usize::MAX);
    assert!(driver.closed);
    let text = String::from_utf8_lossy(&driver.transcript);
    assert_eq!(
        text.matches("-ERR unknown command").count(),
        MAX_BAD_COMMANDS as usize
    );
    assert!(
        text.ends_with("-ERR too many bad commands, closing\r\n"),
        "{text}"
    );
}

#[test]
fn three_failed_logins_close_the_session() {
    let input = "USER alice@example.test\r\nPASS x\r\n".repeat(4);
    let mut driver = Driver::new(store(), params(false), peer(true));
    driver.feed(input.as_bytes(), usize::MAX);
    assert!(driver.closed);
    let text = String::from_utf8_lossy(&driver.transcript);
    assert_eq!(text.matches("-ERR [AUTH]").count(), 3);
    assert!(text.ends_with("too many failures, closing\r\n"));
}

#[test]
fn an_endless_line_is_discarded_without_buffering() {
    let mut session = Session::new(params(false), peer(true));
    take_output(&mut session);
    for _ in 0..10_000 {
        assert!(session.wants_input());
        let buffer = session.input_buffer();
        assert!(buffer.len() >= 4_096 - 255, "input is not accumulating");
        buffer.fill(b'A');
        let n = buffer.len();
        session.input_filled(n);
        assert_eq!(session.output(), b"");
    }
    feed(&mut session, b"\r\nQUIT\r\n");
    assert_eq!(
        take_output(&mut session),
        "-ERR command line too long\r\n+OK mx.example.test POP3 ringmail signing off\r\n"
    );
    assert_eq!(session.poll_action(), Action::Close);
}

#[test]
fn large_listings_are_produced_as_output_drains() {
    let count = 20_000u64;
    let mut session = Session::new(params(false), peer(true));
    take_output(&mut session);
    feed(&mut session, LOGIN.as_bytes());
    session.poll_action();
    session.auth_checked(true);
    session.poll_action();
    let entries = (0..count)
        .map(|i| super::MessageEntry {
            key: MessageKey {
                shard: 0,
                record: i,
                recipient: 0,
            },
            size_octets: 10_240,
            uidl: format!("{i:0>60}"),
        })
        .collect();
    session.mailbox_opened(Ok(entries));
    take_output(&mut session);
    feed(&mut session, b"UIDL\r\nSTAT\r\n");
    let mut all = String::new();
    let mut rounds = 0;
    loop {
        assert!(
            session.output().len() <= OUTPUT_HIGH_WATER_OCTETS + 128,
            "output grew past the mark"
        );
        let out = take_output(&mut session);
        if out.is_empty() {
            break;
        }
        all.push_str(&out);
        rounds += 1;
    }
    assert!(rounds > 10, "listing was not paced: {rounds} rounds");
    let lines: Vec<&str> = all.split("\r\n").collect();
    assert_eq!(lines[0], "+OK unique-id listing follows");
    assert_eq!(lines[1], format!("1 {:0>60}", 0));
    assert_eq!(lines[count as usize], format!("{count} {:0>60}", count - 1));
    assert_eq!(lines[count as usize + 1], ".");
    assert_eq!(
        lines[count as usize + 2],
        format!("+OK {count} {}", count * 10_240)
    );
}

#[test]
fn output_back_pressure_stops_reading_and_resumes_buffered_commands() {
    let mut session = logged_in_session();
    // Pipeline UIDL commands without ever writing output, until the session stops reading.
    let stream = b"UIDL 1\r\n".repeat(100_000);
    let mut fed = 0;
    while session.wants_input() && fed < stream.len() {
        let buffer = session.input_buffer();
        let n = buffer.len().min(stream.len() - fed);
        buffer[..n].copy_from_slice(&stream[fed..fed + n]);
        session.input_filled(n);
        fed += n;
    }
    assert!(fed < stream.len(), "session never pushed back");
    assert!(session.output().len() > OUTPUT_HIGH_WATER_OCTETS);
    assert!(session.output().len() <= OUTPUT_HIGH_WATER_OCTETS + 64);
    // Draining output runs what is still buffered; every complete command gets its reply.
    let mut replies = 0;
    while !session.output().is_empty() {
        replies += take_output(&mut session).matches("+OK 1 uid-1\r\n").count();
    }
    assert_eq!(replies, fed / b"UIDL 1\r\n".len());
    assert!(session.wants_input());
}

#[test]
fn plaintext_login_is_refused_off_loopback_without_tls() {
    let mut driver = Driver::new(store(), params(true), peer(false));
    driver.feed(
        format!("CAPA\r\n{LOGIN}AUTH PLAIN {ALICE_PLAIN}\r\n").as_bytes(),
        usize::MAX,
    );
    let text = String::from_utf8_lossy(&driver.transcript);
    assert!(
        !text.contains("\r\nUSER\r\n") && !text.contains("SASL"),
        "{text}"
    );
    assert!(text.contains("\r\nSTLS\r\n"), "{text}");
    assert_eq!(
        text.matches("-ERR [AUTH] plain-text authentication needs TLS")
            .count(),
        3
    );
    assert!(!driver
        .actions
        .iter()
        .any(|a| matches!(a, Action::Authenticate { .. })));
}

#[test]
fn stls_resets_and_enables_plaintext_login() {
    let mut driver = Driver::new(store(), params(true), peer(false));
    driver.feed(b"USER alice@example.test\r\n", usize::MAX);
    driver.feed(b"STLS\r\n", usize::MAX);
    assert!(driver.actions.contains(&Action::StartTls));
    driver.feed(format!("CAPA\r\n{LOGIN}STAT\r\n").as_bytes(), usize::MAX);
    let text = String::from_utf8_lossy(&driver.transcript);
    assert!(text.contains("+OK begin TLS negotiation\r\n"));
    let after = text
        .split("+OK begin TLS negotiation\r\n")
        .nth(1)
        .unwrap_or_default();
    assert!(
        after.contains("\r\nUSER\r\n") && !after.contains("STLS"),
        "{after}"
    );
    assert!(after.ends_with("+OK 2 126\r\n"), "{after}");
}

#[test]
fn data_pipelined_after_stls_is_never_run() {
    let mut driver = Driver::new(store(), params(true), peer(false));
    driver.feed(b"STLS\r\nUSER mallory\r\n", usize::MAX);
    assert!(driver.closed);
    assert!(!driver.actions.contains(&Action::StartTls));
    assert!(
        String::from_utf8_lossy(&driver.transcript).ends_with("-ERR data after STLS, closing\r\n")
    );

    // Bytes arriving after STLS but before the handshake close the session too.
    let mut session = Session::new(params(true), peer(false));
    feed(&mut session, b"STLS\r\n");
    assert_eq!(session.poll_action(), Action::StartTls);
    feed(&mut session, b"USER x\r\n");
    assert_eq!(session.poll_action(), Action::Close);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary client bytes, in arbitrary chunks, never panic, never grow output without
    /// bound, and give the same transcript however they are split.
    #[test]
    fn arbitrary_input_is_handled_and_split_independent(
        pieces in proptest::collection::vec(
            prop_oneof![
                Just(b"USER alice@example.test\r\n".to_vec()),
                Just(b"PASS secret\r\n".to_vec()),
                Just(format!("AUTH PLAIN {ALICE_PLAIN}\r\n").into_bytes()),
                Just(b"AUTH PLAIN\r\n".to_vec()),
                Just(b"RETR 1\r\n".to_vec()),
                Just(b"TOP 2 1\r\n".to_vec()),
                Just(b"DELE 1\r\n".to_vec()),
                Just(b"LIST\r\n".to_vec()),
                Just(b"UIDL\r\n".to_vec()),
                Just(b"RSET\r\n".to_vec()),
                Just(b"QUIT\r\n".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..40),
            ],
            0..30,
        ),
        chunk in 1usize..64,
    ) {
        let input: Vec<u8> = pieces.concat();
        let mut whole = Driver::new(store(), params(true), peer(true));
        whole.feed(&input, usize::MAX);
        let mut chunked = Driver::new(store(), params(true), peer(true));
        chunked.feed(&input, chunk);
        prop_assert_eq!(&whole.transcript, &chunked.transcript);
        prop_assert_eq!(whole.closed, chunked.closed);
    }
}
