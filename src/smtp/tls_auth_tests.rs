//! STARTTLS (RFC 3207) and AUTH (RFC 4954) in the session, byte by byte: what is offered
//! where, the injection cases, the state reset after the handshake, PLAIN and LOGIN, and the
//! rules of submission listeners.

use std::rc::Rc;

use proptest::prelude::*;

use super::received::Protocol;
use super::session::*;
use super::session_tests::{params, peer, Harness, GOOD_PASSWORD};

/// base64 of "\0alice@example.test\0correct horse".
const ALICE_PLAIN: &str = "AGFsaWNlQGV4YW1wbGUudGVzdABjb3JyZWN0IGhvcnNl";
/// base64 of "\0alice@example.test\0wrong".
const ALICE_PLAIN_WRONG: &str = "AGFsaWNlQGV4YW1wbGUudGVzdAB3cm9uZw==";
/// base64 of "alice@example.test".
const ALICE_B64: &str = "YWxpY2VAZXhhbXBsZS50ZXN0";
/// base64 of "correct horse".
const GOOD_PASSWORD_B64: &str = "Y29ycmVjdCBob3JzZQ==";

fn tls_params() -> Rc<SessionParams> {
    let mut p = (*params(1000, 3)).clone();
    p.starttls_available = true;
    Rc::new(p)
}

/// A session on a remote (non-loopback) plain connection with STARTTLS available.
fn remote(auth_required: bool) -> Harness {
    let mut peer = peer(false);
    peer.auth_required = auth_required;
    Harness::new(tls_params(), peer)
}

/// A session on an implicit-TLS connection (tls_listen): AUTH required.
fn implicit_tls() -> Harness {
    let mut peer = peer(false);
    peer.tls = true;
    peer.auth_required = true;
    Harness::new(tls_params(), peer)
}

fn loopback() -> Harness {
    let mut peer = peer(false);
    peer.addr = "127.0.0.1:40000".parse().unwrap();
    Harness::new(params(1000, 3), peer)
}

fn talk(harness: &mut Harness, script: &str) -> Vec<String> {
    harness.send(script.as_bytes(), usize::MAX);
    harness.lines()
}

fn codes(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l.get(..9).unwrap_or(l).to_string())
        .collect()
}

#[test]
fn ehlo_offers_starttls_on_plain_and_auth_only_on_tls_or_loopback() {
    let mut h = remote(false);
    let lines = talk(&mut h, "EHLO c\r\n");
    assert_eq!(lines.last().unwrap(), "250 STARTTLS");
    assert!(!lines.iter().any(|l| l.contains("AUTH")), "{lines:?}");

    let mut h = implicit_tls();
    let lines = talk(&mut h, "EHLO c\r\n");
    assert!(!lines.iter().any(|l| l.contains("STARTTLS")), "{lines:?}");
    assert_eq!(lines.last().unwrap(), "250 AUTH PLAIN LOGIN");

    let mut h = loopback();
    let lines = talk(&mut h, "EHLO c\r\n");
    assert!(
        !lines.iter().any(|l| l.contains("STARTTLS")),
        "no [tls]: {lines:?}"
    );
    assert_eq!(lines.last().unwrap(), "250 AUTH PLAIN LOGIN");
}

#[test]
fn starttls_without_tls_configured_is_not_implemented() {
    let mut h = Harness::standard();
    let lines = talk(&mut h, "EHLO c\r\nSTARTTLS\r\n");
    assert_eq!(lines.last().unwrap(), "502 5.5.1 Command not implemented");
    assert_eq!(h.tls_handshakes, 0);
}

#[test]
fn starttls_upgrades_and_forgets_everything_learnt_before() {
    let mut h = remote(false);
    let lines = talk(
        &mut h,
        "EHLO before\r\nMAIL FROM:<s@remote.test>\r\nSTARTTLS\r\n",
    );
    assert_eq!(lines.last().unwrap(), "220 2.0.0 Ready to start TLS");
    assert_eq!(h.tls_handshakes, 1);
    // No greeting after the handshake; the envelope and EHLO are gone.
    assert!(h.lines().is_empty());
    let lines = talk(
        &mut h,
        "RCPT TO:<alice@example.test>\r\nMAIL FROM:<s@remote.test>\r\n",
    );
    assert_eq!(codes(&lines), ["503 5.5.1", "503 5.5.1"]);
    let lines = talk(&mut h, "EHLO after\r\n");
    assert!(!lines.iter().any(|l| l.contains("STARTTLS")), "{lines:?}");
    assert_eq!(lines.last().unwrap(), "250 AUTH PLAIN LOGIN");
    let body = "MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nhi\r\n.\r\n";
    let lines = talk(&mut h, body);
    assert_eq!(codes(&lines).last().unwrap(), "250 2.0.0");
    let stored = &h.stored[0].transaction;
    assert_eq!(stored.helo, "after");
    assert!(stored.tls && !stored.authenticated);
    let header = String::from_utf8(stored.received_header("mx", "Q1", 0)).unwrap();
    assert!(header.contains("with ESMTPS"), "{header}");
}

#[test]
fn anything_pipelined_behind_starttls_is_never_run() {
    let injections = [
        "STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\n",
        "STARTTLS\r\nRSET\r\n",
        "STARTTLS\r\n\r\n",
        "STARTTLS\r\nX",
        "STARTTLS\r\nEHLO evil\r\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABjb3JyZWN0IGhvcnNl\r\n",
    ];
    for injection in injections {
        let mut h = remote(false);
        let script = format!("EHLO c\r\n{injection}");
        let lines = talk(&mut h, &script);
        assert_eq!(
            lines.last().unwrap(),
            "554 5.5.1 Commands pipelined after STARTTLS are refused; closing",
            "{injection:?}"
        );
        assert!(h.closed, "{injection:?}");
        assert_eq!(h.tls_handshakes, 0, "{injection:?}");
        assert!(h.auth_attempts.is_empty(), "{injection:?}");
    }
}

#[test]
fn plain_text_arriving_while_the_handshake_is_due_closes_the_session() {
    let mut h = remote(false);
    talk(&mut h, "EHLO c\r\n");
    // Drive by hand: the STARTTLS reply is out, but the loop reads before handshaking.
    let buf = h.session.input_buffer();
    buf[..10].copy_from_slice(b"STARTTLS\r\n");
    h.session.input_filled(10);
    assert!(!h.session.wants_input());
    let buf = h.session.input_buffer();
    buf[..6].copy_from_slice(b"RSET\r\n");
    h.session.input_filled(6);
    assert!(matches!(h.session.poll_action(), Action::Close));
}

#[test]
fn starttls_twice_ends_the_connection() {
    let mut h = remote(false);
    talk(&mut h, "EHLO c\r\nSTARTTLS\r\n");
    let lines = talk(&mut h, "EHLO c\r\nSTARTTLS\r\nNOOP\r\n");
    assert_eq!(
        lines.last().unwrap(),
        "554 5.5.1 TLS already active; closing"
    );
    assert!(h.closed);
    assert_eq!(h.tls_handshakes, 1);
}

#[test]
fn auth_plain_initial_response_then_submission_relays_as_itself() {
    let mut h = implicit_tls();
    let lines = talk(&mut h, "EHLO c\r\nMAIL FROM:<alice@example.test>\r\n");
    assert_eq!(lines.last().unwrap(), "530 5.7.0 Authentication required");
    let lines = talk(&mut h, &format!("AUTH PLAIN {ALICE_PLAIN}\r\n"));
    assert_eq!(lines, ["235 2.7.0 Authentication successful"]);
    assert_eq!(h.session.authenticated_user(), Some("alice@example.test"));
    let lines = talk(
        &mut h,
        "MAIL FROM:<bob@example.test>\r\nMAIL FROM:<Alice@Example.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\nhi\r\n.\r\n",
    );
    assert_eq!(
        codes(&lines),
        [
            "553 5.7.1",
            "250 2.1.0",
            "250 2.1.5",
            "354 End d",
            "250 2.0.0"
        ]
    );
    let stored = &h.stored[0].transaction;
    assert!(stored.authenticated && stored.tls);
    let header = String::from_utf8(stored.received_header("mx", "Q1", 0)).unwrap();
    assert!(header.contains("with ESMTPSA"), "{header}");
    let lines = talk(&mut h, &format!("AUTH PLAIN {ALICE_PLAIN}\r\n"));
    assert_eq!(lines, ["503 5.5.1 Already authenticated"]);
}

#[test]
fn auth_login_and_plain_with_challenges() {
    let mut h = implicit_tls();
    let lines = talk(&mut h, "EHLO c\r\nAUTH LOGIN\r\n");
    assert_eq!(lines.last().unwrap(), "334 VXNlcm5hbWU6");
    let lines = talk(&mut h, &format!("{ALICE_B64}\r\n"));
    assert_eq!(lines, ["334 UGFzc3dvcmQ6"]);
    let lines = talk(&mut h, &format!("{GOOD_PASSWORD_B64}\r\n"));
    assert_eq!(lines, ["235 2.7.0 Authentication successful"]);
    assert_eq!(
        h.auth_attempts,
        [("alice@example.test".to_string(), GOOD_PASSWORD.to_string())]
    );

    let mut h = implicit_tls();
    let lines = talk(&mut h, &format!("EHLO c\r\nAUTH login {ALICE_B64}\r\n"));
    assert_eq!(lines.last().unwrap(), "334 UGFzc3dvcmQ6");
    let lines = talk(&mut h, "*\r\n");
    assert_eq!(lines, ["501 5.0.0 Authentication cancelled"]);

    let mut h = implicit_tls();
    let lines = talk(&mut h, "EHLO c\r\nAUTH PLAIN\r\n");
    assert_eq!(lines.last().unwrap(), "334 ");
    let lines = talk(&mut h, &format!("{ALICE_PLAIN_WRONG}\r\n"));
    assert_eq!(lines, ["535 5.7.8 Authentication credentials invalid"]);
    assert!(h.session.authenticated_user().is_none());
    let lines = talk(&mut h, "MAIL FROM:<alice@example.test>\r\n");
    assert_eq!(codes(&lines), ["530 5.7.0"]);
}

/// A session maker, a script, and the last reply it must get.
type RefusalCase = (fn() -> Harness, &'static str, &'static str);

#[test]
fn auth_refusals_table() {
    let cases: [RefusalCase; 9] = [
        (
            || remote(false),
            "EHLO c\r\nAUTH PLAIN",
            "530 5.7.0 Must issue a STARTTLS command first",
        ),
        (
            Harness::standard,
            "EHLO c\r\nAUTH PLAIN",
            "502 5.5.1 Authentication not available on this connection",
        ),
        (
            implicit_tls,
            "AUTH PLAIN",
            "503 5.5.1 Send EHLO or HELO first",
        ),
        (
            implicit_tls,
            "HELO c\r\nAUTH PLAIN",
            "503 5.5.1 Send EHLO or HELO first",
        ),
        (
            implicit_tls,
            "EHLO c\r\nAUTH CRAM-MD5",
            "504 5.5.4 Unrecognized authentication type",
        ),
        (
            implicit_tls,
            "EHLO c\r\nAUTH PLAIN !!!",
            "501 5.5.2 Cannot decode the authentication response",
        ),
        (
            implicit_tls,
            "EHLO c\r\nAUTH PLAIN =",
            "501 5.5.2 Cannot decode the authentication response",
        ),
        (
            implicit_tls,
            "EHLO c\r\nAUTH LOGIN AA==",
            "501 5.5.2 Cannot decode the authentication response",
        ),
        (
            || remote(true),
            "EHLO c\r\nMAIL FROM:<a@example.test>",
            "530 5.7.0 Must issue a STARTTLS command first",
        ),
    ];
    for (make, script, want) in cases {
        let mut h = make();
        let lines = talk(&mut h, &format!("{script}\r\n"));
        assert_eq!(lines.last().unwrap(), want, "{script:?}");
        assert!(h.auth_attempts.is_empty(), "{script:?}");
    }
}

#[test]
fn auth_inside_a_transaction_is_refused() {
    let mut h = loopback();
    let lines = talk(
        &mut h,
        "EHLO c\r\nMAIL FROM:<s@remote.test>\r\nAUTH PLAIN\r\n",
    );
    assert_eq!(
        lines.last().unwrap(),
        "503 5.5.1 AUTH not permitted during a mail transaction"
    );
}

#[test]
fn auth_lines_may_reach_12288_octets_and_no_more() {
    // A long (and therefore invalid) initial response is read whole, then refused as content.
    let long = "A".repeat(12_288 - "AUTH PLAIN \r\n".len());
    let mut h = implicit_tls();
    let lines = talk(&mut h, &format!("EHLO c\r\nAUTH PLAIN {long}\r\nNOOP\r\n"));
    assert_eq!(codes(&lines[lines.len() - 2..]), ["501 5.5.2", "250 2.0.0"]);
    let mut h = implicit_tls();
    let lines = talk(&mut h, &format!("EHLO c\r\nAUTH PLAIN {long}A\r\nNOOP\r\n"));
    assert_eq!(codes(&lines[lines.len() - 2..]), ["500 5.5.2", "250 2.0.0"]);
    // A SASL response line has the same room; other commands keep 512.
    let mut h = implicit_tls();
    let response = "A".repeat(12_000);
    let lines = talk(
        &mut h,
        &format!("EHLO c\r\nAUTH PLAIN\r\n{response}\r\nNOOP\r\n"),
    );
    assert_eq!(codes(&lines[lines.len() - 2..]), ["501 5.5.2", "250 2.0.0"]);
    let mut h = implicit_tls();
    let lines = talk(&mut h, &format!("EHLO c\r\nNOOP {}\r\n", "A".repeat(600)));
    assert_eq!(codes(&lines).last().unwrap(), "500 5.5.2");
}

#[test]
fn loopback_auth_lets_a_client_relay_and_marks_esmtpa() {
    let mut h = loopback();
    let script = format!(
        "EHLO c\r\nAUTH PLAIN {ALICE_PLAIN}\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\nhi\r\n.\r\n"
    );
    let lines = talk(&mut h, &script);
    assert_eq!(codes(&lines).last().unwrap(), "250 2.0.0");
    let t = &h.stored[0].transaction;
    assert_eq!(
        Protocol::new(t.esmtp, t.tls, t.authenticated, t.smtputf8),
        Protocol::Esmtpa
    );
}

proptest! {
    /// Whatever follows STARTTLS in the same read, nothing of it runs: no command, no AUTH,
    /// no handshake; the session closes.
    #[test]
    fn no_injection_survives(tail in proptest::collection::vec(any::<u8>(), 1..300)) {
        let mut h = remote(false);
        talk(&mut h, "EHLO c\r\n");
        let mut script = b"STARTTLS\r\n".to_vec();
        script.extend_from_slice(&tail);
        h.send(&script, usize::MAX);
        prop_assert!(h.closed);
        prop_assert_eq!(h.tls_handshakes, 0);
        prop_assert!(h.auth_attempts.is_empty());
        prop_assert!(h.stored.is_empty());
    }

    /// Arbitrary SASL responses never panic and never authenticate without the password.
    #[test]
    fn sasl_responses_never_panic(response in "[ -~]{0,2000}") {
        let mut h = implicit_tls();
        talk(&mut h, "EHLO c\r\nAUTH LOGIN\r\n");
        h.send(format!("{response}\r\n{response}\r\n").as_bytes(), 97);
        prop_assert!(h.session.authenticated_user().is_none() || response == GOOD_PASSWORD_B64);
    }
}
