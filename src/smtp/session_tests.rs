//! Session state machine tests, and the harness the golden dialogues reuse: a fake
//! connection loop with an in-memory store.

use std::collections::VecDeque;
use std::rc::Rc;

use super::session::*;
use crate::routing::{Directory, Route};

/// What the fake store answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StoreMode {
    Ok,
    Fail(StoreFailure),
}

/// A stored message as the fake store keeps it.
#[derive(Debug)]
pub(super) struct Stored {
    pub transaction: Transaction,
    /// The body pieces joined.
    pub body: Vec<u8>,
}

/// The fake connection loop.
pub(super) struct Harness {
    pub session: Session,
    pub stored: Vec<Stored>,
    pub store_mode: StoreMode,
    /// Reply bytes written by the "socket" and not yet checked.
    pub replies: VecDeque<u8>,
    pub closed: bool,
    next_queue_id: u32,
    /// Credentials the session asked the fake directory to verify, in order.
    pub auth_attempts: Vec<(String, String)>,
    /// TLS handshakes the fake loop performed.
    pub tls_handshakes: u32,
}

/// The one password the fake directory accepts, for any user.
pub(super) const GOOD_PASSWORD: &str = "correct horse";

pub(super) const HOSTNAME: &str = "mx.example.test";

pub(super) fn params(max_message_size: u64, max_recipients: usize) -> Rc<SessionParams> {
    let directory = Directory::new(
        &["example.test".into()],
        &["alice@example.test".into(), "Bob@example.test".into()],
        "",
    )
    .expect("valid test directory");
    Rc::new(SessionParams {
        hostname: HOSTNAME.into(),
        max_message_size,
        max_recipients,
        directory: Rc::new(directory),
        starttls_available: false,
    })
}

pub(super) fn peer(relay_allowed: bool) -> PeerInfo {
    PeerInfo {
        addr: "192.0.2.7:40000".parse().expect("valid address"),
        relay_allowed,
        tls: false,
        auth_required: false,
    }
}

impl Harness {
    pub fn new(params: Rc<SessionParams>, peer: PeerInfo) -> Harness {
        let mut harness = Harness {
            session: Session::new(params, peer),
            stored: Vec::new(),
            store_mode: StoreMode::Ok,
            replies: VecDeque::new(),
            closed: false,
            next_queue_id: 1,
            auth_attempts: Vec::new(),
            tls_handshakes: 0,
        };
        harness.drive();
        harness
    }

    /// Default test configuration: 1000-byte messages, 3 recipients, no relaying.
    pub fn standard() -> Harness {
        Harness::new(params(1000, 3), peer(false))
    }

    /// Runs the loop until the session needs input.
    pub fn drive(&mut self) {
        loop {
            let output = self.session.output();
            if !output.is_empty() {
                // A socket that takes at most 1000 bytes per write, to exercise partial writes.
                let n = output.len().min(1000);
                self.replies.extend(&output[..n]);
                self.session.output_consumed(n);
                continue;
            }
            match self.session.poll_action() {
                Action::Idle => return,
                Action::Close => {
                    self.closed = true;
                    return;
                }
                Action::StoreMessage(transaction) => {
                    let body = transaction.body.concat();
                    assert_eq!(body.len() as u64, transaction.body_size_bytes);
                    let result = match self.store_mode {
                        StoreMode::Ok => {
                            let id = format!("Q{:06}", self.next_queue_id);
                            self.next_queue_id += 1;
                            self.stored.push(Stored { transaction, body });
                            Ok(id)
                        }
                        StoreMode::Fail(failure) => Err(failure),
                    };
                    self.session.message_stored(result);
                }
                Action::Authenticate { user, password } => {
                    let ok = password == GOOD_PASSWORD;
                    self.auth_attempts.push((user, password));
                    self.session.auth_checked(ok);
                }
                Action::StartTls => {
                    self.tls_handshakes += 1;
                    self.session.tls_started();
                }
            }
        }
    }

    /// Sends bytes in reads of at most `chunk` bytes; stops early if the session closes.
    pub fn send(&mut self, mut bytes: &[u8], chunk: usize) {
        while !bytes.is_empty() && !self.closed {
            if !self.session.wants_input() {
                self.drive();
                assert!(
                    self.session.wants_input() || self.closed,
                    "session stalled: neither reading nor closing"
                );
                continue;
            }
            let buffer = self.session.input_buffer();
            let n = buffer.len().min(chunk).min(bytes.len());
            assert!(n > 0, "wants_input with no input buffer space");
            buffer[..n].copy_from_slice(&bytes[..n]);
            self.session.input_filled(n);
            bytes = &bytes[n..];
            self.drive();
        }
    }

    /// Takes the next reply line (without CRLF), if one is complete.
    pub fn next_line(&mut self) -> Option<String> {
        let lf = self.replies.iter().position(|&b| b == b'\n')?;
        let line: Vec<u8> = self.replies.drain(..=lf).collect();
        let line = String::from_utf8(line).expect("replies are UTF-8");
        Some(line.trim_end_matches("\r\n").to_string())
    }

    /// All complete reply lines so far.
    pub fn lines(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next_line()).collect()
    }
}

/// Runs `script` (whole, in one read) and returns every reply line.
fn run(script: &[u8]) -> (Harness, Vec<String>) {
    let mut harness = Harness::standard();
    harness.send(script, usize::MAX);
    let lines = harness.lines();
    (harness, lines)
}

fn codes(lines: &[String]) -> Vec<&str> {
    lines.iter().map(|l| &l[..l.len().min(9)]).collect()
}

#[test]
fn greeting_and_ehlo() {
    let (_, lines) = run(b"EHLO client.test\r\n");
    assert_eq!(
        lines,
        [
            "220 mx.example.test ESMTP ringmail",
            "250-mx.example.test",
            "250-PIPELINING",
            "250-SIZE 1000",
            "250-8BITMIME",
            "250-ENHANCEDSTATUSCODES",
            "250-CHUNKING",
            "250 SMTPUTF8",
        ]
    );
}

#[test]
fn a_message_is_stored_as_it_travelled() {
    let body = b"Subject: hi\r\n\r\n..leading dot\r\n\0nul and \xff 8-bit\r\n";
    let mut script = b"EHLO c\r\nMAIL FROM:<s@remote.test> BODY=8BITMIME\r\nRCPT TO:<ALICE@example.test>\r\nDATA\r\n".to_vec();
    let mut harness = Harness::standard();
    harness.send(&script, usize::MAX);
    script.clear();
    script.extend_from_slice(body);
    script.extend_from_slice(b".\r\nQUIT\r\n");
    harness.send(&script, usize::MAX);
    let lines = harness.lines();
    assert_eq!(
        codes(&lines[8..]),
        [
            "250 2.1.0",
            "250 2.1.5",
            "354 End d",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    assert_eq!(lines[11], "250 2.0.0 Ok: queued as Q000001");
    assert!(harness.closed);
    let stored = &harness.stored[0];
    assert_eq!(stored.body, body);
    let tx = &stored.transaction;
    assert_eq!(tx.mail_from, "s@remote.test");
    assert_eq!(tx.helo, "c");
    assert!(tx.esmtp && tx.eight_bit && !tx.smtputf8);
    assert_eq!(tx.recipients.len(), 1);
    assert_eq!(tx.recipients[0].address, "ALICE@example.test");
    assert_eq!(
        tx.recipients[0].route,
        Route::Local {
            mailbox: "alice@example.test".into()
        }
    );
    // Client sent the body after 354: not one body byte copied.
    assert_eq!(harness.session.body_bytes_copied(), 0);
}

#[test]
fn data_bodies_move_whole_buffers_without_copies() {
    let mut harness = Harness::new(params(10 << 20, 10), peer(false));
    harness.send(
        b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n",
        usize::MAX,
    );
    let line: Vec<u8> = (0..78)
        .map(|i| b'a' + (i % 26) as u8)
        .chain(*b"\r\n")
        .collect();
    let body: Vec<u8> = line.iter().copied().cycle().take(80 * 4000).collect();
    let mut wire = body.clone();
    wire.extend_from_slice(b".\r\nNOOP\r\n");
    // Reads of 9000 bytes, like a socket would return.
    harness.send(&wire, 9000);
    let lines = harness.lines();
    assert_eq!(lines.last().map(String::as_str), Some("250 2.0.0 Ok"));
    let stored = &harness.stored[0];
    assert_eq!(stored.body, body);
    assert_eq!(harness.session.body_bytes_copied(), 0);
    // Every piece but the last is a full input buffer.
    let pieces = &stored.transaction.body;
    assert_eq!(pieces.len(), body.len().div_ceil(DATA_BUFFER_BYTES));
    assert!(pieces[..pieces.len() - 1]
        .iter()
        .all(|p| p.len() == DATA_BUFFER_BYTES));
}

#[test]
fn terminator_split_across_buffers_is_cut_from_the_right_piece() {
    // Bodies whose terminator straddles the 64 KiB buffer boundary at every offset.
    for extra in 0..6 {
        let mut harness = Harness::new(params(1 << 20, 10), peer(false));
        harness.send(
            b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n",
            usize::MAX,
        );
        let mut body = vec![b'x'; DATA_BUFFER_BYTES - 4 + extra];
        body.extend_from_slice(b"\r\n");
        let mut wire = body.clone();
        wire.extend_from_slice(b".\r\n");
        harness.send(&wire, 5000);
        assert_eq!(harness.stored.len(), 1, "extra {extra}");
        assert_eq!(harness.stored[0].body, body, "extra {extra}");
        assert!(harness.stored[0]
            .transaction
            .body
            .iter()
            .all(|p| !p.is_empty()));
    }
}

#[test]
fn body_bytes_sent_with_the_data_command_are_counted_as_copied() {
    let (harness, _) =
        run(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nhello\r\n.\r\n");
    assert_eq!(harness.stored[0].body, b"hello\r\n");
    assert_eq!(harness.session.body_bytes_copied(), 10);
}

/// A full dialogue with pipelining, BDAT, errors and two messages.
const MIXED_SCRIPT: &[u8] = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\n\
RCPT TO:<nobody@example.test>\r\nDATA\r\nline one\r\n..dot\r\n.\r\nNOOP\r\nMAIL FROM:<>\r\n\
RCPT TO:<postmaster>\r\nBDAT 7\r\n.x\r\ny\r\nBDAT 3 LAST\r\nz\r\nFOO\r\nRSET\r\nQUIT\r\n";

#[test]
fn every_split_point_gives_the_same_dialogue() {
    let (whole, whole_lines) = run(MIXED_SCRIPT);
    assert_eq!(whole.stored.len(), 2);
    assert_eq!(whole.stored[0].body, b"line one\r\n..dot\r\n");
    assert_eq!(whole.stored[1].body, b"..x\r\ny\r\nz\r\n");
    assert!(whole.closed);
    for chunk in 1..=MIXED_SCRIPT.len() {
        let mut harness = Harness::standard();
        harness.send(MIXED_SCRIPT, chunk);
        assert_eq!(harness.lines(), whole_lines, "reads of {chunk} bytes");
        let bodies: Vec<_> = harness.stored.iter().map(|s| s.body.clone()).collect();
        assert_eq!(
            bodies,
            [whole.stored[0].body.clone(), whole.stored[1].body.clone()]
        );
    }
    // And one split at every single point.
    for at in 0..=MIXED_SCRIPT.len() {
        let mut harness = Harness::standard();
        harness.send(&MIXED_SCRIPT[..at], usize::MAX);
        harness.send(&MIXED_SCRIPT[at..], usize::MAX);
        assert_eq!(harness.lines(), whole_lines, "split at {at}");
    }
}

#[test]
fn replies_for_state_errors() {
    // (script after the greeting, expected reply code prefixes)
    let table: &[(&[u8], &[&str])] = &[
        (b"MAIL FROM:<>\r\n", &["503 5.5.1"]),
        (
            b"HELO c\r\nRCPT TO:<alice@example.test>\r\n",
            &["250 mx.ex", "503 5.5.1"],
        ),
        (b"HELO c\r\nDATA\r\n", &["250 mx.ex", "503 5.5.1"]),
        (
            b"HELO c\r\nMAIL FROM:<>\r\nMAIL FROM:<>\r\n",
            &["250 mx.ex", "250 2.1.0", "503 5.5.1"],
        ),
        (
            b"HELO c\r\nMAIL FROM:<>\r\nDATA\r\n",
            &["250 mx.ex", "250 2.1.0", "554 5.5.1"],
        ),
        (
            b"HELO c\r\nMAIL FROM:<> SIZE=10\r\n",
            &["250 mx.ex", "555 5.5.4"],
        ),
        (
            b"EHLO c\r\nMAIL FROM:<> SIZE=1001\r\n",
            &[
                "250-mx.ex",
                "250-PIPEL",
                "250-SIZE ",
                "250-8BITM",
                "250-ENHAN",
                "250-CHUNK",
                "250 SMTPU",
                "552 5.3.4",
            ],
        ),
        (
            b"HELO c\r\nMAIL FROM:<\xc3\xa9@b.test>\r\n",
            &["250 mx.ex", "553 5.6.7"],
        ),
        (
            b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@remote.test>\r\n",
            &["250 mx.ex", "250 2.1.0", "554 5.7.1"],
        ),
        (
            b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@example.test>\r\n",
            &["250 mx.ex", "250 2.1.0", "550 5.1.1"],
        ),
        (
            b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nBDAT 3\r\nabcDATA\r\n",
            &[
                "250 mx.ex",
                "250 2.1.0",
                "250 2.1.5",
                "250 2.0.0",
                "503 5.5.1",
            ],
        ),
        (
            b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n",
            &["503 5.5.1", "250 2.0.0"],
        ),
        (
            b"VRFY alice\r\nHELP\r\nEXPN x\r\nSTARTTLS\r\nAUTH PLAIN\r\n",
            &[
                "252 2.0.0",
                "214 2.0.0",
                "502 5.5.1",
                "502 5.5.1",
                "502 5.5.1",
            ],
        ),
        (b"NOOP\nQUIT\r\n", &["500 5.5.2", "221 2.0.0"]),
        (b"NOOP\rQUIT\r\n", &["500 5.5.2"]),
        (b"\r\n", &["500 5.5.1"]),
    ];
    for (script, want) in table {
        let (_, lines) = run(script);
        assert_eq!(
            codes(&lines[1..]),
            *want,
            "script {:?}",
            String::from_utf8_lossy(script)
        );
    }
}

#[test]
fn duplicate_mailboxes_get_one_copy() {
    let (harness, lines) = run(
        b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\n\
RCPT TO:<ALICE@example.test>\r\nRCPT TO:<postmaster@example.test>\r\nRCPT TO:<bob@example.test>\r\n\
DATA\r\n.\r\n",
    );
    assert_eq!(
        codes(&lines[3..]),
        [
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "354 End d",
            "250 2.0.0"
        ]
    );
    // postmaster routes to the first user, alice: one copy each for alice and bob.
    let recipients: Vec<_> = harness.stored[0]
        .transaction
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(recipients, ["alice@example.test", "bob@example.test"]);
}

#[test]
fn recipient_limit() {
    let mut harness = Harness::new(params(1000, 3), peer(true));
    harness.send(
        b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@r.test>\r\nRCPT TO:<b@r.test>\r\n\
RCPT TO:<c@r.test>\r\nRCPT TO:<d@r.test>\r\nDATA\r\n.\r\n",
        usize::MAX,
    );
    let lines = harness.lines();
    assert_eq!(
        codes(&lines[3..]),
        [
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "452 4.5.3",
            "354 End d",
            "250 2.0.0"
        ]
    );
    assert_eq!(harness.stored[0].transaction.recipients.len(), 3);
}

#[test]
fn relay_needs_permission() {
    let mut harness = Harness::new(params(1000, 3), peer(true));
    harness.send(
        b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@Remote.test>\r\nDATA\r\n.\r\n",
        usize::MAX,
    );
    assert_eq!(
        harness.stored[0].transaction.recipients[0].route,
        Route::Remote {
            domain: "remote.test".into()
        }
    );
}

#[test]
fn oversized_data_is_discarded_as_it_streams() {
    let mut harness = Harness::standard();
    harness.send(
        b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n",
        usize::MAX,
    );
    let line = [b'y'; 98];
    for n in 0..5000 {
        harness.send(&line, usize::MAX);
        harness.send(b"\r\n", usize::MAX);
        // Counted while it may still become a record, never once it is too big.
        let held = harness.session.buffered_body_bytes();
        assert!(held <= 1000 + 100, "{held}");
        if n > 10 {
            assert_eq!(held, 0);
        }
    }
    harness.send(b".\r\nNOOP\r\n", usize::MAX);
    let lines = harness.lines();
    assert_eq!(codes(&lines[lines.len() - 2..]), ["552 5.3.4", "250 2.0.0"]);
    assert!(harness.stored.is_empty());
}

/// Reads `bytes` into the session without running its actions, as the loop's read does.
fn feed(session: &mut Session, bytes: &[u8]) {
    session.input_buffer()[..bytes.len()].copy_from_slice(bytes);
    session.input_filled(bytes.len());
}

#[test]
fn body_bytes_count_from_their_read_until_the_loop_takes_the_message() {
    let mut session = Session::new(params(100_000, 3), peer(false));
    feed(
        &mut session,
        b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n",
    );
    assert!(session.in_body_transfer());
    assert_eq!(session.buffered_body_bytes(), 0);
    // A partly filled buffer counts, not only whole ones.
    feed(&mut session, b"Subject: x\r\n\r\nhello\r\n");
    assert_eq!(session.buffered_body_bytes(), 21);
    feed(&mut session, b".\r\n");
    assert!(!session.in_body_transfer());
    assert_eq!(session.buffered_body_bytes(), 21);
    let Action::StoreMessage(transaction) = session.poll_action() else {
        panic!("no message");
    };
    assert_eq!(transaction.body_size_bytes, 21);
    assert_eq!(session.buffered_body_bytes(), 0);
}

#[test]
fn a_bdat_transaction_is_one_body_transfer_between_its_chunks() {
    let mut session = Session::new(params(100_000, 3), peer(false));
    feed(
        &mut session,
        b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\n",
    );
    assert!(!session.in_body_transfer());
    feed(&mut session, b"BDAT 5\r\nhello");
    assert!(!session.receiving_body());
    assert!(session.in_body_transfer());
    assert_eq!(session.buffered_body_bytes(), 5);
    feed(&mut session, b"BDAT 0 LAST\r\n");
    assert!(!session.in_body_transfer());
    assert_eq!(session.buffered_body_bytes(), 7);
    assert!(matches!(session.poll_action(), Action::StoreMessage(_)));
    assert_eq!(session.buffered_body_bytes(), 0);
}

#[test]
fn only_a_body_being_kept_waits_for_room() {
    let mut session = Session::new(params(1000, 3), peer(false));
    feed(&mut session, b"EHLO c\r\n");
    assert!(!session.next_read_may_hold_body(), "command phase");
    feed(
        &mut session,
        b"MAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n",
    );
    assert!(session.next_read_may_hold_body(), "a DATA body");
    feed(&mut session, &[b'y'; 600]);
    assert!(
        session.next_read_may_hold_body(),
        "still within the size limit"
    );
    feed(&mut session, &[b'y'; 600]);
    assert!(!session.next_read_may_hold_body(), "too big: thrown away");
    feed(&mut session, b"\r\n.\r\n");
    assert!(!session.next_read_may_hold_body(), "refused");

    feed(
        &mut session,
        b"MAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nBDAT 5\r\nhel",
    );
    assert!(session.next_read_may_hold_body(), "inside a chunk");
    feed(&mut session, b"lo");
    assert!(session.next_read_may_hold_body(), "between chunks");
    feed(&mut session, b"BDAT 2000\r\n");
    feed(&mut session, &[b'z'; 1200]);
    assert!(
        !session.next_read_may_hold_body(),
        "a chunk over the limit: thrown away"
    );
    feed(&mut session, &[b'z'; 800]);
    assert!(
        !session.next_read_may_hold_body(),
        "the transaction ended with the refusal"
    );
}

#[test]
fn size_limit_is_exact() {
    for (size, want) in [(1000usize, "250 2.0.0"), (1001, "552 5.3.4")] {
        let mut harness = Harness::standard();
        harness.send(
            b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n",
            usize::MAX,
        );
        let mut body = vec![b'z'; size - 2];
        body.extend_from_slice(b"\r\n.\r\n");
        harness.send(&body, 7);
        let lines = harness.lines();
        assert_eq!(codes(&lines[lines.len() - 1..]), [want], "size {size}");
    }
}

#[test]
fn the_size_limit_leaves_stuffing_dots_out_over_data_and_bdat_alike() {
    // 250 lines of ".x": 1000 octets of message, 1250 as stuffed over DATA.
    let content = ".x\r\n".repeat(250);
    let stuffed = "..x\r\n".repeat(250);
    for (limit, want) in [(1000, "250 2.0.0"), (999, "552 5.3.4")] {
        let mut data = Harness::new(params(limit, 3), peer(false));
        data.send(
            format!(
                "EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n{stuffed}.\r\n"
            )
            .as_bytes(),
            7,
        );
        let lines = data.lines();
        assert_eq!(
            codes(&lines[lines.len() - 1..]),
            [want],
            "DATA, limit {limit}"
        );
        let mut bdat = Harness::new(params(limit, 3), peer(false));
        bdat.send(
            format!("EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nBDAT 1000 LAST\r\n{content}").as_bytes(),
            7,
        );
        let lines = bdat.lines();
        assert_eq!(
            codes(&lines[lines.len() - 1..]),
            [want],
            "BDAT, limit {limit}"
        );
        if want.starts_with("250") {
            // Stored as travelled over DATA, and the same bytes over BDAT.
            for harness in [&data, &bdat] {
                assert_eq!(harness.stored[0].body, stuffed.as_bytes());
            }
        }
    }
}

#[test]
fn smuggled_commands_after_a_fake_terminator_never_run() {
    for fake in [
        &b"\n.\n"[..],
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\n",
        b"\r\n.\r",
    ] {
        let mut script =
            b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nhi".to_vec();
        script.extend_from_slice(fake);
        script.extend_from_slice(b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nsmuggled\r\n.\r\nNOOP\r\n");
        let (harness, lines) = run(&script);
        assert_eq!(
            codes(&lines[4..]),
            ["354 End d", "550 5.6.0", "250 2.0.0"],
            "fake terminator {fake:?}"
        );
        assert!(harness.stored.is_empty(), "fake terminator {fake:?}");
    }
}

#[test]
fn bdat_is_stuffed_once_and_checked() {
    /// (BDAT commands and chunks, stored body if any, last reply prefix)
    type Row<'a> = (&'a [u8], Option<&'a [u8]>, &'a str);
    let table: &[Row<'_>] = &[
        (
            b"BDAT 4\r\n.a\r\nBDAT 0 LAST\r\n",
            Some(b"..a\r\n"),
            "250 2.0.0 Ok",
        ),
        (b"BDAT 2 LAST\r\nab", Some(b"ab\r\n"), "250 2.0.0 Ok"),
        (b"BDAT 0 LAST\r\n", Some(b""), "250 2.0.0 Ok"),
        (b"BDAT 4 LAST\r\na\nb\n", None, "550 5.6.0"),
        (b"BDAT 1\r\n\rBDAT 1 LAST\r\nx", None, "550 5.6.0"),
        (
            b"BDAT 1\r\n\rBDAT 1 LAST\r\n\n",
            Some(b"\r\n"),
            "250 2.0.0 Ok",
        ),
        (b"BDAT 1001 LAST\r\n", None, "552 5.3.4"),
    ];
    for (bdat, body, last_reply) in table {
        let mut script = b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\n".to_vec();
        script.extend_from_slice(bdat);
        let mut harness = Harness::standard();
        harness.send(&script, usize::MAX);
        if last_reply.starts_with("552") {
            harness.send(&[b'q'; 1001], 100);
        }
        let lines = harness.lines();
        assert!(
            lines.last().is_some_and(|l| l.starts_with(last_reply)),
            "{:?}: {lines:?}",
            String::from_utf8_lossy(bdat)
        );
        let stored: Option<&[u8]> = harness.stored.first().map(|s| s.body.as_slice());
        assert_eq!(stored, *body, "{:?}", String::from_utf8_lossy(bdat));
    }
}

/// The 18 octets every malformed BDAT below announces: commands, if they ever ran.
const CHUNK_OF_COMMANDS: &[u8] = b"RSET\r\nNOOP\r\nNOOP\r\n";

#[test]
fn malformed_bdat_never_runs_its_chunk() {
    const TRANSACTION: &[u8] = b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\n";
    const SYNTAX: &str = "501 5.5.4 Syntax error in arguments";
    const UNREADABLE: &str = "501 5.5.4 Syntax: BDAT <size> [LAST]; chunk size unreadable, closing";
    const LONG: &str = "500 5.5.2 Line too long";
    const BARE: &str = "500 5.5.2 Bare CR or LF not allowed; lines end with <CR><LF>";
    // (BDAT line, replies to it and to what follows its chunk, connection closed)
    let long_line = [b"BDAT 18 ".as_slice(), &[b'x'; 600], b"\r\n"].concat();
    let table: &[(&[u8], &[&str], bool)] = &[
        // The size is readable: the chunk is skipped, then refused, and the transaction
        // is over (MAIL works again, no 503).
        (
            b"BDAT 18  LAST\r\n",
            &[SYNTAX, "250 2.1.0 Sender ok"],
            false,
        ),
        (
            b"BDAT 18\tLAST\r\n",
            &[SYNTAX, "250 2.1.0 Sender ok"],
            false,
        ),
        (
            b"BDAT 18 LAST x\r\n",
            &[SYNTAX, "250 2.1.0 Sender ok"],
            false,
        ),
        (
            b"BDAT 18 FIRST\r\n",
            &[SYNTAX, "250 2.1.0 Sender ok"],
            false,
        ),
        (
            b"BDAT 18 LAST\xff\r\n",
            &[SYNTAX, "250 2.1.0 Sender ok"],
            false,
        ),
        // The size is not: where the chunk ends is unknown, so nothing more runs.
        (b"BDAT  18 LAST\r\n", &[UNREADABLE], true),
        (b"BDAT\t18 LAST\r\n", &[UNREADABLE], true),
        (b"BDAT 18x LAST\r\n", &[UNREADABLE], true),
        (b"BDAT 999999999999999999999 LAST\r\n", &[UNREADABLE], true),
        (b"BDAT\r\n", &[UNREADABLE], true),
        (b"BDAT LAST\r\n", &[UNREADABLE], true),
        // Refused for its framing: the size is not trusted either.
        (&long_line, &[LONG], true),
        (b"BDAT 18 LAST\n", &[BARE], true),
        (b"BDAT 18\rLAST\r\n", &[BARE], true),
    ];
    for (bdat, want, closes) in table {
        let script = [TRANSACTION, bdat, CHUNK_OF_COMMANDS, b"MAIL FROM:<>\r\n"].concat();
        // Whole, and one byte per read.
        for chunk in [usize::MAX, 1] {
            let mut harness = Harness::standard();
            harness.send(&script, chunk);
            let lines = harness.lines();
            assert_eq!(
                lines[10..],
                **want,
                "{:?} in reads of {chunk}",
                String::from_utf8_lossy(bdat)
            );
            assert_eq!(
                harness.closed,
                *closes,
                "{:?}",
                String::from_utf8_lossy(bdat)
            );
            assert!(harness.stored.is_empty());
        }
    }
}

#[test]
fn malformed_bdat_drops_the_chunks_before_it() {
    let script = [
        b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nBDAT 3\r\nabcBDAT 18 LAST LAST\r\n"
            .as_slice(),
        CHUNK_OF_COMMANDS,
        b"BDAT 1 LAST\r\nxNOOP\r\n",
    ]
    .concat();
    let (harness, lines) = run(&script);
    assert_eq!(
        lines[10..],
        [
            "250 2.0.0 3 octets received",
            "501 5.5.4 Syntax error in arguments",
            "503 5.5.1 Send MAIL first",
            "250 2.0.0 Ok",
        ]
    );
    assert!(harness.stored.is_empty() && !harness.closed);
    // Outside a transaction the chunk is skipped all the same.
    let (harness, lines) =
        run(&[b"BDAT 18 x\r\n".as_slice(), CHUNK_OF_COMMANDS, b"QUIT\r\n"].concat());
    assert_eq!(
        lines[1..],
        ["501 5.5.4 Syntax error in arguments", "221 2.0.0 Bye"]
    );
    assert!(harness.closed);
}

#[test]
fn long_lines_are_refused_without_buffering() {
    let mut exact = b"NOOP ".to_vec();
    exact.resize(510, b'n');
    exact.extend_from_slice(b"\r\n");
    let mut over = b"NOOP ".to_vec();
    over.resize(511, b'n');
    over.extend_from_slice(b"\r\n");
    let (_, lines) = run(&[exact.as_slice(), &over, b"NOOP\r\n"].concat());
    assert_eq!(codes(&lines[1..]), ["250 2.0.0", "500 5.5.2", "250 2.0.0"]);
    // A megabyte without a line end, in small reads: refused once, session still fine.
    let mut harness = Harness::standard();
    for _ in 0..1000 {
        harness.send(&[b'A'; 1000], 333);
    }
    harness.send(b"\r\nQUIT\r\n", usize::MAX);
    assert_eq!(codes(&harness.lines()[1..]), ["500 5.5.2", "221 2.0.0"]);
}

#[test]
fn ten_errors_close_the_connection() {
    let (harness, lines) = run(&b"FOO\r\n".repeat(12));
    assert_eq!(lines.len(), 1 + 10 + 1);
    assert_eq!(
        lines[11],
        "421 4.7.0 Too many errors, closing transmission channel"
    );
    assert!(harness.closed);
}

#[test]
fn an_accepted_message_starts_the_error_count_over() {
    // Ten messages, each with one unknown recipient: ten 550s, none closes the connection.
    let mut script = b"EHLO c\r\n".to_vec();
    for _ in 0..10 {
        script.extend_from_slice(
            b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<nobody@example.test>\r\n\
              BDAT 4 LAST\r\nhi\r\n",
        );
    }
    script.extend_from_slice(b"QUIT\r\n");
    let mut harness = Harness::standard();
    harness.send(&script, usize::MAX);
    let lines = harness.lines();
    let transaction = [
        "250 2.1.0 Sender ok",
        "250 2.1.5 Recipient ok",
        "550 5.1.1 No such user here",
    ];
    for (n, replies) in lines[8..8 + 40].chunks(4).enumerate() {
        assert_eq!(replies[..3], transaction, "message {n}");
        assert!(
            replies[3].starts_with("250 2.0.0 Ok: queued as "),
            "message {n}"
        );
    }
    assert_eq!(lines[8 + 40..], ["221 2.0.0 Bye"]);
    assert_eq!(harness.stored.len(), 10);
}

#[test]
fn refused_recipients_alone_reach_the_error_limit() {
    let mut script = b"EHLO c\r\nMAIL FROM:<>\r\n".to_vec();
    for n in 0..11 {
        script.extend_from_slice(format!("RCPT TO:<user{n}@example.test>\r\n").as_bytes());
    }
    let (harness, lines) = run(&script);
    let refusals = lines[9..]
        .iter()
        .filter(|l| l.starts_with("550 5.1.1"))
        .count();
    assert_eq!(refusals, 10, "{lines:?}");
    assert_eq!(
        lines.last().map(String::as_str),
        Some("421 4.7.0 Too many errors, closing transmission channel")
    );
    assert!(harness.closed);
}

#[test]
fn a_refused_message_does_not_reset_the_error_count() {
    // Only a stored message starts the count over: nine errors, a refused message (its
    // 552 is the tenth), and the connection closes.
    let mut script = b"EHLO c\r\n".to_vec();
    script.extend_from_slice(&b"FOO\r\n".repeat(9));
    script.extend_from_slice(b"MAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nBDAT 1001 LAST\r\n");
    script.extend_from_slice(&[b'x'; 1001]);
    script.extend_from_slice(b"NOOP\r\n");
    let (harness, lines) = run(&script);
    assert_eq!(
        lines[lines.len() - 2..],
        [
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "421 4.7.0 Too many errors, closing transmission channel",
        ]
    );
    assert!(harness.closed);
    // With a message stored in between, the same errors are fine.
    let mut script = b"EHLO c\r\n".to_vec();
    script.extend_from_slice(&b"FOO\r\n".repeat(9));
    script.extend_from_slice(b"MAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nBDAT 1 LAST\r\nx");
    script.extend_from_slice(&b"FOO\r\n".repeat(9));
    script.extend_from_slice(b"QUIT\r\n");
    let (harness, lines) = run(&script);
    assert_eq!(lines.last().map(String::as_str), Some("221 2.0.0 Bye"));
    assert_eq!(harness.stored.len(), 1);
}

#[test]
fn http_requests_are_refused_and_closed() {
    let (harness, lines) = run(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(codes(&lines[1..]), ["554 5.7.0"]);
    assert!(harness.closed);
}

#[test]
fn store_failures_map_to_replies() {
    for (failure, want, closes) in [
        (StoreFailure::SyncFailed, "451 4.3.0", false),
        (StoreFailure::DiskFull, "452 4.3.1", false),
        (StoreFailure::TooBig, "552 5.3.4", false),
        (StoreFailure::ShuttingDown, "421 4.3.2", true),
    ] {
        let mut harness = Harness::standard();
        harness.store_mode = StoreMode::Fail(failure);
        harness.send(
            b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nx\r\n.\r\nNOOP\r\n",
            usize::MAX,
        );
        let lines = harness.lines();
        assert_eq!(&lines[5][..9], want);
        assert_eq!(harness.closed, closes);
        if !closes {
            // The transaction is over either way; the pipelined NOOP runs after the reply.
            assert_eq!(&lines[6][..9], "250 2.0.0");
        }
    }
}

#[test]
fn pipelined_commands_wait_for_the_store() {
    let mut harness = Harness::standard();
    let script = b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n";
    harness.send(script, usize::MAX);
    // Feed the end of data and a pipelined NOOP by hand, without completing the store.
    let wire = b"x\r\n.\r\nNOOP\r\n";
    let buffer = harness.session.input_buffer();
    buffer[..wire.len()].copy_from_slice(wire);
    harness.session.input_filled(wire.len());
    let Action::StoreMessage(_) = harness.session.poll_action() else {
        panic!("expected a store");
    };
    assert!(matches!(harness.session.poll_action(), Action::Idle));
    // No 250 for the NOOP before the message's own reply.
    let pending = String::from_utf8_lossy(harness.session.output()).to_string();
    assert!(!pending.contains("250 2.0.0 Ok\r\n"), "{pending:?}");
    harness.session.message_stored(Ok("ID1".into()));
    let pending = String::from_utf8_lossy(harness.session.output()).to_string();
    assert!(
        pending.ends_with("250 2.0.0 Ok: queued as ID1\r\n250 2.0.0 Ok\r\n"),
        "{pending:?}"
    );
}

#[test]
fn output_backpressure_pauses_processing() {
    let mut session = Session::new(params(1000, 3), peer(false));
    let mut sent = 0;
    // Fill the input with NOOPs without ever writing output.
    while session.wants_input() {
        let buffer = session.input_buffer();
        let n = buffer.len() / 6 * 6;
        for chunk in buffer[..n].chunks_mut(6) {
            chunk.copy_from_slice(b"NOOP\r\n");
        }
        session.input_filled(n);
        sent += n / 6;
    }
    let unsent = session.output().len();
    assert!(unsent > MAX_UNSENT_OUTPUT_BYTES && unsent < MAX_UNSENT_OUTPUT_BYTES + 100);
    // Drain: every NOOP is eventually answered, in order.
    let mut answered = 0;
    while !session.output().is_empty() {
        let output = session.output();
        answered += output.windows(2).filter(|w| w == b"\r\n").count();
        let n = output.len();
        session.output_consumed(n);
    }
    assert_eq!(answered, sent + 1);
}

#[test]
fn peer_closing_mid_data_discards_everything() {
    let mut harness = Harness::standard();
    harness.send(
        b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nhalf a mess",
        usize::MAX,
    );
    let discarded = harness.session.peer_closed();
    assert_eq!(
        discarded,
        Some(Discarded {
            recipients: 1,
            body_bytes: 11
        })
    );
    harness.drive();
    assert!(harness.closed && harness.stored.is_empty());
    let mut idle = Harness::standard();
    assert_eq!(idle.session.peer_closed(), None);
}

#[test]
fn received_header_names_the_session() {
    let (harness, _) =
        run(b"EHLO client.test\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n.\r\n");
    let header = harness.stored[0]
        .transaction
        .received_header(HOSTNAME, "Q1", 0);
    assert_eq!(
        String::from_utf8(header).unwrap(),
        "Received: from client.test ([192.0.2.7])\r\n\tby mx.example.test (ringmail) with ESMTP id Q1\r\n\
         \tfor <bob@example.test>;\r\n\tThu, 1 Jan 1970 00:00:00 +0000\r\n"
    );
}

#[test]
fn timeouts_and_shutdown_close_with_421() {
    let mut harness = Harness::standard();
    harness.send(b"HELO c\r\nMAIL FROM:<>\r\n", usize::MAX);
    assert!(harness.session.in_transaction());
    assert_eq!(
        harness.session.timed_out(),
        Some(Discarded {
            recipients: 0,
            body_bytes: 0
        })
    );
    harness.drive();
    assert!(harness.closed);
    let lines = harness.lines();
    assert_eq!(
        lines.last().map(String::as_str),
        Some("421 4.4.2 Timeout exceeded, closing transmission channel")
    );
    // Once closed, nothing more is queued.
    assert_eq!(harness.session.shutting_down(), None);
    assert!(harness.session.output().is_empty());

    let mut idle = Harness::standard();
    assert!(!idle.session.in_transaction());
    assert_eq!(idle.session.shutting_down(), None);
    idle.drive();
    assert_eq!(
        idle.lines()[1..],
        ["421 4.3.2 Service shutting down, closing transmission channel"]
    );
    assert!(idle.closed);
}

#[test]
fn refused_connections_get_421_with_our_name() {
    assert_eq!(
        connection_refused(HOSTNAME),
        b"421 4.7.0 mx.example.test Too many connections, try again later\r\n"
    );
}

#[test]
fn idle_sessions_hold_small_buffers() {
    let mut harness = Harness::new(params(100_000, 3), peer(false));
    assert_eq!(harness.session.input_buffer().len(), COMMAND_BUFFER_BYTES);
    harness.send(
        b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n",
        usize::MAX,
    );
    assert_eq!(harness.session.input_buffer().len(), DATA_BUFFER_BYTES);
    harness.send(b"x\r\n.\r\n", usize::MAX);
    assert_eq!(harness.stored.len(), 1);
    assert_eq!(harness.session.input_buffer().len(), COMMAND_BUFFER_BYTES);
    // A big BDAT chunk is read into a data buffer, given back after.
    harness.send(
        b"MAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nBDAT 20000 LAST\r\n",
        usize::MAX,
    );
    assert_eq!(harness.session.input_buffer().len(), DATA_BUFFER_BYTES);
    harness.send(&[b'b'; 20000], usize::MAX);
    assert_eq!(harness.stored.len(), 2);
    assert_eq!(harness.session.input_buffer().len(), COMMAND_BUFFER_BYTES);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn arbitrary_input_never_panics_or_grows_replies(
        input in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::prelude::Just(b"EHLO c\r\n".to_vec()),
                proptest::prelude::Just(b"MAIL FROM:<>\r\n".to_vec()),
                proptest::prelude::Just(b"RCPT TO:<alice@example.test>\r\n".to_vec()),
                proptest::prelude::Just(b"DATA\r\n".to_vec()),
                proptest::prelude::Just(b"BDAT 3\r\n".to_vec()),
                proptest::prelude::Just(b"\r\n.\r\n".to_vec()),
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..50),
            ],
            0..30,
        ),
        chunk in 1usize..100,
    ) {
        let mut harness = Harness::standard();
        harness.send(&input.concat(), chunk);
        proptest::prop_assert!(harness.session.output().len() <= MAX_UNSENT_OUTPUT_BYTES + 1024);
        for stored in &harness.stored {
            // A stored body never holds a terminator before its end.
            let mut framed = stored.body.clone();
            framed.extend_from_slice(b".\r\n");
            let mut scanner = crate::smtp::data::DataScanner::new();
            proptest::prop_assert_eq!(
                scanner.scan(&framed),
                crate::smtp::data::ScanOutcome::End { consumed: framed.len() }
            );
        }
    }
}
