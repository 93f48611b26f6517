//! Delivery status notifications (RFC 3464 inside RFC 6522 multipart/report): the bounce
//! that tells the envelope sender which recipients failed and why.
//!
//! Pure: the time comes in as Unix seconds, and the result is a message body ready to be
//! stored: CRLF line ends and dot-stuffed, like every stored message (the caller prepends
//! its own `Received:` piece). It goes from the null sender `<>` ([`DSN_ENVELOPE_SENDER`])
//! and never answers a message that itself came from `<>` ([`should_send_dsn`]), so two
//! hosts can never bounce bounces at each other.

use super::client::{Reply, ReplyClass};
use crate::smtp::received::rfc5322_date;

/// Envelope sender of every DSN: the null reverse-path (RFC 5321 §4.5.5).
pub const DSN_ENVELOPE_SENDER: &str = "";
/// Most bytes of the original message's header section quoted in the DSN; cut at a line end.
pub const MAX_QUOTED_HEADER_BYTES: usize = 64 * 1024;
/// Longest Diagnostic-Code / remote text quoted per recipient (keeps header lines under
/// the 998-octet limit).
pub const MAX_DIAGNOSTIC_CHARS: usize = 800;
/// Most recipients listed in one DSN: a bound only, far above what one bounce carries (a
/// relay job holds at most 100 recipients); any beyond it would be left out of the report.
pub const MAX_DSN_RECIPIENTS: usize = 1000;

/// Room for what a DSN holds besides its recipients and quoted headers: the fixed text and
/// the reporting MTA's name (a host name, at most 255 octets) a few times over.
const DSN_FIXED_BYTES: usize = 16 * 1024;
/// Room for one listed recipient: its address and its remote host (each within RFC 5321's
/// limits) and its diagnostic, each given twice (in the text and in the report).
const DSN_RECIPIENT_BYTES: usize = 4 * 1024;
/// Room for the quoted headers, and for the five copies of a MIME boundary grown to avoid
/// them (it can outgrow them by a few octets only).
const DSN_QUOTED_BYTES: usize = 6 * MAX_QUOTED_HEADER_BYTES + 1024;
const MAX_DSN_UNSTUFFED_BYTES: usize =
    DSN_FIXED_BYTES + DSN_QUOTED_BYTES + MAX_DSN_RECIPIENTS * DSN_RECIPIENT_BYTES;
/// The most octets a DSN body can have, dot-stuffed (at most one dot per three octets),
/// whatever the message, replies and names it reports on: the log makes room for it, so a
/// small `max_message_size` can never leave a bounce unstorable.
pub const MAX_DSN_BYTES: usize = MAX_DSN_UNSTUFFED_BYTES + MAX_DSN_UNSTUFFED_BYTES.div_ceil(3);

/// Whether a message from `envelope_sender` may be bounced: never for the null sender.
pub fn should_send_dsn(envelope_sender: &str) -> bool {
    let sender = envelope_sender.trim();
    !(sender.is_empty() || sender == "<>")
}

/// RFC 3464 §2.3.3 `Action` values we report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnAction {
    /// Gave up: bounced or expired.
    Failed,
    /// Still trying (a delay warning).
    Delayed,
}

impl DsnAction {
    fn as_str(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
        }
    }
}

/// One recipient's line in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnRecipient<'a> {
    /// The envelope recipient, without angle brackets.
    pub address: &'a str,
    /// What happened.
    pub action: DsnAction,
    /// The reply that decided it (remote, or one we made up: null MX, expiry, loop).
    pub reply: &'a Reply,
    /// The host that gave the reply, when it came from a remote server.
    pub remote_mta: Option<&'a str>,
}

/// Everything a DSN says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnRequest<'a> {
    /// Our `hostname`: Reporting-MTA, From's domain, Message-ID's domain.
    pub reporting_mta: &'a str,
    /// The original envelope sender, who receives the DSN.
    pub original_sender: &'a str,
    /// The original message's queue id (Message-ID and boundary).
    pub queue_id: &'a str,
    /// When the original message was accepted (Arrival-Date), Unix seconds.
    pub arrival_unix_secs: i64,
    /// Now (Date:), Unix seconds.
    pub now_unix_secs: i64,
    /// The recipients reported, at least one.
    pub recipients: &'a [DsnRecipient<'a>],
    /// The original message as stored (CRLF, dot-stuffed), in the pieces it is stored as
    /// (the `Received:` piece, then the client's bytes); only its headers are quoted.
    pub original_message: &'a [&'a [u8]],
}

/// A built DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dsn {
    /// The message, CRLF and dot-stuffed, ready to store.
    pub body: Vec<u8>,
    /// It holds non-ASCII bytes (quoted headers, a UTF-8 address): send with 8BITMIME /
    /// SMTPUTF8 as the relay client decides.
    pub has_8bit: bool,
}

/// The enhanced status code for a reply: the server's own when it gave one, else the
/// generic code of its class (RFC 3463 §3.1).
pub fn status_for(reply: &Reply) -> String {
    match reply.enhanced_status() {
        Some(status) => status.to_owned(),
        None => match reply.class() {
            ReplyClass::Transient => "4.0.0".to_owned(),
            ReplyClass::Positive => "2.0.0".to_owned(),
            _ => "5.0.0".to_owned(),
        },
    }
}

/// Build the DSN for `request`.
pub fn build_dsn(request: &DsnRequest<'_>) -> Dsn {
    let mta = header_safe(request.reporting_mta);
    let queue_id = header_safe(request.queue_id);
    let headers = quoted_headers(request.original_message);
    let recipients = &request.recipients[..request.recipients.len().min(MAX_DSN_RECIPIENTS)];
    let failed = recipients.iter().any(|r| r.action == DsnAction::Failed);

    let mut human = String::new();
    human.push_str(&format!("This is the mail system at host {mta}.\r\n\r\n"));
    if failed {
        human.push_str(
            "I'm sorry to have to inform you that your message could not\r\n\
             be delivered to one or more recipients. The reasons follow.\r\n\r\n",
        );
    } else {
        human.push_str(
            "Your message could not be delivered yet to one or more recipients.\r\n\
             Delivery will be tried again; you need not resend it.\r\n\r\n",
        );
    }
    for recipient in recipients {
        let address = header_safe(recipient.address);
        let said = diagnostic(recipient.reply);
        match recipient.remote_mta {
            Some(host) => human.push_str(&format!(
                "<{address}>: host {} said: {said}\r\n",
                header_safe(host)
            )),
            None => human.push_str(&format!("<{address}>: {said}\r\n")),
        }
    }

    let mut report = String::new();
    report.push_str(&format!("Reporting-MTA: dns; {mta}\r\n"));
    report.push_str(&format!(
        "Arrival-Date: {}\r\n",
        rfc5322_date(request.arrival_unix_secs)
    ));
    for recipient in recipients {
        report.push_str("\r\n");
        report.push_str(&format!(
            "Final-Recipient: rfc822; {}\r\n",
            header_safe(recipient.address)
        ));
        report.push_str(&format!("Action: {}\r\n", recipient.action.as_str()));
        report.push_str(&format!("Status: {}\r\n", status_for(recipient.reply)));
        if let Some(host) = recipient.remote_mta {
            report.push_str(&format!("Remote-MTA: dns; {}\r\n", header_safe(host)));
        }
        report.push_str(&format!(
            "Diagnostic-Code: smtp; {}\r\n",
            diagnostic(recipient.reply)
        ));
    }

    let subject = if failed {
        "Undelivered Mail Returned to Sender"
    } else {
        "Delayed Mail (still being retried)"
    };
    let mut boundary = format!("{queue_id}.{}/{mta}", request.now_unix_secs)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "'()+_,-./:=?".contains(*c))
        .take(60)
        .collect::<String>();
    // RFC 2046 §5.1.1: the boundary must not occur in the parts; our parts are made here
    // except the quoted headers, which the sender controls.
    while contains(&headers, boundary.as_bytes())
        || human.contains(&boundary)
        || report.contains(&boundary)
    {
        boundary.push('=');
    }

    let mut body: Vec<u8> = Vec::with_capacity(2048 + headers.len());
    push_line(
        &mut body,
        &format!("From: Mail Delivery System <MAILER-DAEMON@{mta}>"),
    );
    push_line(
        &mut body,
        &format!("To: <{}>", header_safe(request.original_sender)),
    );
    push_line(&mut body, &format!("Subject: {subject}"));
    push_line(
        &mut body,
        &format!("Date: {}", rfc5322_date(request.now_unix_secs)),
    );
    push_line(
        &mut body,
        &format!(
            "Message-ID: <{queue_id}.{}.dsn@{mta}>",
            request.now_unix_secs
        ),
    );
    // RFC 3834: automatic replies must not be answered automatically.
    push_line(&mut body, "Auto-Submitted: auto-replied");
    push_line(&mut body, "MIME-Version: 1.0");
    push_line(
        &mut body,
        &format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\""
    ),
    );
    push_line(&mut body, "");
    push_line(&mut body, "This is a MIME-encapsulated message.");
    push_line(&mut body, "");
    push_line(&mut body, &format!("--{boundary}"));
    push_line(&mut body, "Content-Type: text/plain; charset=us-ascii");
    push_line(&mut body, "Content-Description: Notification");
    push_line(&mut body, "");
    body.extend_from_slice(human.as_bytes());
    push_line(&mut body, "");
    push_line(&mut body, &format!("--{boundary}"));
    push_line(&mut body, "Content-Type: message/delivery-status");
    push_line(&mut body, "Content-Description: Delivery report");
    push_line(&mut body, "");
    body.extend_from_slice(report.as_bytes());
    push_line(&mut body, "");
    push_line(&mut body, &format!("--{boundary}"));
    push_line(&mut body, "Content-Type: text/rfc822-headers");
    push_line(
        &mut body,
        "Content-Description: Undelivered Message Headers",
    );
    push_line(&mut body, "");
    body.extend_from_slice(&headers);
    if !headers.is_empty() && !headers.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());

    let body = dot_stuff(&body);
    Dsn {
        has_8bit: !body.is_ascii(),
        body,
    }
}

fn push_line(body: &mut Vec<u8>, text: &str) {
    body.extend_from_slice(text.as_bytes());
    body.extend_from_slice(b"\r\n");
}

/// Text safe inside a header or a report field: no controls (so no CR/LF injection).
fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A reply as quoted in a DSN: one line, ASCII, bounded.
fn diagnostic(reply: &Reply) -> String {
    let text: String = reply
        .to_string()
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_control() {
                c
            } else {
                '?'
            }
        })
        .collect();
    if text.len() > MAX_DIAGNOSTIC_CHARS {
        format!("{}...", &text[..MAX_DIAGNOSTIC_CHARS])
    } else {
        text
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

/// The header section of the stored message (up to the empty line), un-dot-stuffed so it
/// is stuffed exactly once with the rest of the DSN, and cut at a line end after
/// [`MAX_QUOTED_HEADER_BYTES`].
fn quoted_headers(pieces: &[&[u8]]) -> Vec<u8> {
    let mut headers = Vec::new();
    let mut line = Vec::new();
    'pieces: for piece in pieces {
        for &byte in piece.iter() {
            line.push(byte);
            if byte == b'\n' || line.len() > MAX_QUOTED_HEADER_BYTES {
                if line == b"\r\n" || line == b"\n" {
                    line.clear();
                    break 'pieces;
                }
                if headers.len() + line.len() > MAX_QUOTED_HEADER_BYTES {
                    line.clear();
                    break 'pieces;
                }
                let unstuffed = if line.starts_with(b"..") {
                    &line[1..]
                } else {
                    &line[..]
                };
                headers.extend_from_slice(unstuffed);
                line.clear();
            }
        }
    }
    // A message with no body and no final CRLF ends inside a header line.
    if !line.is_empty() && headers.len() + line.len() <= MAX_QUOTED_HEADER_BYTES {
        headers.extend_from_slice(&line);
    }
    headers
}

/// Double every dot that starts a line (RFC 5321 §4.5.2), as stored messages are.
fn dot_stuff(text: &[u8]) -> Vec<u8> {
    let mut stuffed = Vec::with_capacity(text.len() + 16);
    let mut at_line_start = true;
    for &byte in text {
        if at_line_start && byte == b'.' {
            stuffed.push(b'.');
        }
        stuffed.push(byte);
        at_line_start = byte == b'\n';
    }
    stuffed
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ORIGINAL: &[u8] = b"From: alice@example.test\r\nTo: bob@far.test\r\nSubject: hello\r\n..hidden: dot\r\n\r\nBody line\r\n..\r\n";

    fn request<'a>(recipients: &'a [DsnRecipient<'a>], original: &'a [&'a [u8]]) -> DsnRequest<'a> {
        DsnRequest {
            reporting_mta: "relay.example.test",
            original_sender: "alice@example.test",
            queue_id: "Q1A2B3",
            arrival_unix_secs: 1_795_651_200,
            now_unix_secs: 1_795_654_800,
            recipients,
            original_message: original,
        }
    }

    #[test]
    fn dsn_is_byte_exact() {
        let unknown = Reply::local(550, "5.1.1 <bob@far.test>: user unknown");
        let null_mx = Reply::local(556, "5.1.10 domain nomail.test accepts no mail (null MX)");
        let recipients = [
            DsnRecipient {
                address: "bob@far.test",
                action: DsnAction::Failed,
                reply: &unknown,
                remote_mta: Some("mx.far.test"),
            },
            DsnRecipient {
                address: "carol@nomail.test",
                action: DsnAction::Failed,
                reply: &null_mx,
                remote_mta: None,
            },
        ];
        let received: &[u8] = b"Received: from client.test by relay.example.test; Thu, 26 Nov 2026 00:00:00 +0000\r\n";
        let dsn = build_dsn(&request(&recipients, &[received, ORIGINAL]));
        let expected = "\
From: Mail Delivery System <MAILER-DAEMON@relay.example.test>\r
To: <alice@example.test>\r
Subject: Undelivered Mail Returned to Sender\r
Date: Thu, 26 Nov 2026 01:00:00 +0000\r
Message-ID: <Q1A2B3.1795654800.dsn@relay.example.test>\r
Auto-Submitted: auto-replied\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=delivery-status;\r
\tboundary=\"Q1A2B3.1795654800/relay.example.test\"\r
\r
This is a MIME-encapsulated message.\r
\r
--Q1A2B3.1795654800/relay.example.test\r
Content-Type: text/plain; charset=us-ascii\r
Content-Description: Notification\r
\r
This is the mail system at host relay.example.test.\r
\r
I'm sorry to have to inform you that your message could not\r
be delivered to one or more recipients. The reasons follow.\r
\r
<bob@far.test>: host mx.far.test said: 550 5.1.1 <bob@far.test>: user unknown\r
<carol@nomail.test>: 556 5.1.10 domain nomail.test accepts no mail (null MX)\r
\r
--Q1A2B3.1795654800/relay.example.test\r
Content-Type: message/delivery-status\r
Content-Description: Delivery report\r
\r
Reporting-MTA: dns; relay.example.test\r
Arrival-Date: Thu, 26 Nov 2026 00:00:00 +0000\r
\r
Final-Recipient: rfc822; bob@far.test\r
Action: failed\r
Status: 5.1.1\r
Remote-MTA: dns; mx.far.test\r
Diagnostic-Code: smtp; 550 5.1.1 <bob@far.test>: user unknown\r
\r
Final-Recipient: rfc822; carol@nomail.test\r
Action: failed\r
Status: 5.1.10\r
Diagnostic-Code: smtp; 556 5.1.10 domain nomail.test accepts no mail (null MX)\r
\r
--Q1A2B3.1795654800/relay.example.test\r
Content-Type: text/rfc822-headers\r
Content-Description: Undelivered Message Headers\r
\r
Received: from client.test by relay.example.test; Thu, 26 Nov 2026 00:00:00 +0000\r
From: alice@example.test\r
To: bob@far.test\r
Subject: hello\r
..hidden: dot\r
\r
--Q1A2B3.1795654800/relay.example.test--\r
";
        assert_eq!(String::from_utf8(dsn.body).unwrap(), expected);
        assert!(!dsn.has_8bit);
    }

    #[test]
    fn null_sender_is_never_bounced() {
        assert!(!should_send_dsn(""));
        assert!(!should_send_dsn("<>"));
        assert!(should_send_dsn("alice@example.test"));
        assert_eq!(DSN_ENVELOPE_SENDER, "");
    }

    #[test]
    fn status_table() {
        let cases = [
            (Reply::local(550, "5.7.1 no"), "5.7.1"),
            (Reply::local(550, "no code"), "5.0.0"),
            (Reply::local(451, "try later"), "4.0.0"),
            (Reply::local(451, "4.4.7 expired"), "4.4.7"),
        ];
        for (reply, status) in cases {
            assert_eq!(status_for(&reply), status);
        }
    }

    #[test]
    fn dates_table() {
        let cases = [
            (0, "Thu, 1 Jan 1970 00:00:00 +0000"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 +0000"),
            (1_795_719_956, "Thu, 26 Nov 2026 19:05:56 +0000"),
            (4_133_980_799, "Fri, 31 Dec 2100 23:59:59 +0000"),
            (-1, "Wed, 31 Dec 1969 23:59:59 +0000"),
        ];
        for (secs, text) in cases {
            assert_eq!(rfc5322_date(secs), text, "{secs}");
        }
    }

    #[test]
    fn delayed_notices_and_hostile_inputs() {
        let later = Reply::local(451, "4.3.0 busy\r\nInjected: header");
        let recipients = [DsnRecipient {
            address: "bob@far.test\r\nBcc: evil@x",
            action: DsnAction::Delayed,
            reply: &later,
            remote_mta: Some("mx.far.test"),
        }];
        // A header section full of the boundary and of lines starting with a dot.
        let original: &[u8] = b"X-B: --Q1A2B3.1795654800/relay.example.test\r\n.\r\n";
        let dsn = build_dsn(&request(&recipients, &[original]));
        let text = String::from_utf8(dsn.body).unwrap();
        assert!(text.contains("Subject: Delayed Mail (still being retried)\r\n"));
        assert!(text.contains("Action: delayed\r\nStatus: 4.3.0\r\n"));
        assert!(text.contains("Final-Recipient: rfc822; bob@far.test??Bcc: evil@x\r\n"));
        assert!(!text.contains("\r\nBcc:") && !text.contains("\r\nInjected:"));
        assert!(text.contains("boundary=\"Q1A2B3.1795654800/relay.example.test=\""));
        assert!(text.contains("\r\n..\r\n"), "a lone dot line is stuffed");
        // Every line ends in CRLF and no line is a lone dot.
        for line in text.split("\r\n") {
            assert!(!line.contains('\n') && !line.contains('\r'));
            assert_ne!(line, ".");
        }
    }

    #[test]
    fn quoted_headers_are_bounded() {
        let huge = "X-Long: y\r\n".repeat(MAX_QUOTED_HEADER_BYTES / 8);
        let headers = quoted_headers(&[huge.as_bytes()]);
        assert!(headers.len() <= MAX_QUOTED_HEADER_BYTES);
        assert!(headers.ends_with(b"\r\n"));
        let one_line = vec![b'z'; MAX_QUOTED_HEADER_BYTES * 2];
        assert!(quoted_headers(&[&one_line]).len() <= MAX_QUOTED_HEADER_BYTES);
        assert_eq!(quoted_headers(&[b"A: b\r\n\r\nbody"]), b"A: b\r\n");
        assert_eq!(quoted_headers(&[b"A: b"]), b"A: b");
    }

    /// The largest inputs each part of a DSN can take: the bound must hold for them.
    #[test]
    fn the_largest_dsn_fits_its_bound() {
        let address = format!("{}@{}", "a".repeat(64), "d".repeat(189));
        let host = format!("{}.test", "h".repeat(250));
        let reply = Reply::local(550, "5.1.1 ".to_string() + &"x".repeat(4000));
        let recipients: Vec<DsnRecipient<'_>> = (0..MAX_DSN_RECIPIENTS + 5)
            .map(|_| DsnRecipient {
                address: &address,
                action: DsnAction::Failed,
                reply: &reply,
                remote_mta: Some(&host),
            })
            .collect();
        // Dot lines (each stuffed) and lines that make the boundary grow.
        let dots = ".\r\n".repeat(MAX_QUOTED_HEADER_BYTES);
        let boundary: String = format!("Q1A2B3.1795654800/{host}")
            .chars()
            .take(60)
            .collect();
        let bait: String = (0..MAX_QUOTED_HEADER_BYTES / 80)
            .map(|n| format!("X: --{boundary}{}\r\n", "=".repeat(n)))
            .collect();
        for original in [dots, bait] {
            let pieces = [original.as_bytes()];
            let mut request = request(&recipients, &pieces);
            request.reporting_mta = &host;
            let dsn = build_dsn(&request);
            assert!(
                dsn.body.len() <= MAX_DSN_BYTES,
                "{} > {MAX_DSN_BYTES}",
                dsn.body.len()
            );
        }
    }

    proptest! {
        #[test]
        fn dsn_is_always_crlf_and_stuffed(
            original in proptest::collection::vec(any::<u8>(), 0..400),
            text in ".{0,100}",
            address in ".{0,40}",
        ) {
            let reply = Reply::local(550, text);
            let recipients = [DsnRecipient { address: &address, action: DsnAction::Failed, reply: &reply, remote_mta: None }];
            let dsn = build_dsn(&request(&recipients, &[&original]));
            // Outside the quoted headers (which keep the sender's bytes), every line is CRLF.
            prop_assert!(dsn.body.ends_with(b"--\r\n"));
            for line in dsn.body.split(|&b| b == b'\n') {
                prop_assert_ne!(line, &b".\r"[..]);
            }
        }
    }
}
