//! The relay's SMTP client as a sans-IO state machine (RFC 5321, RFC 2920 PIPELINING,
//! RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531 SMTPUTF8).
//!
//! The connection loop owns the socket and the timers; it feeds this machine what it reads
//! ([`SmtpClient::received`]), the events it sees ([`SmtpClient::timed_out`],
//! [`SmtpClient::connection_closed`]) and the messages to send
//! ([`SmtpClient::send_message`]), then drains [`SmtpClient::poll_action`] and does what
//! it says. The message body never passes through here: on [`ClientAction::SendBody`] the
//! loop writes the stored bytes straight from the memory map (see [`body_pieces`]), then
//! [`data_terminator`]. A message stored in several pieces (the `Received:` piece, then the
//! client's bytes) is written piece by piece, each through [`body_pieces`]: every piece ends
//! a line, so no line spans two pieces, and the terminator follows the last piece.
//!
//! Outcomes are per recipient: a 5xx to one RCPT bounces that recipient only; a 4xx, a 421,
//! a timeout or a dropped connection defers everyone not yet decided, so that the queue
//! tries the next MX or retries later.
//!
//! # Opportunistic STARTTLS (RFC 3207, RFC 7435)
//!
//! A client made with [`SmtpClient::opportunistic_tls`] sends STARTTLS after EHLO when the
//! MX offers it. The delivery loop then does this (`OutboundStream` is in `crate::shard::stream`):
//!
//! ```text
//! let tls_config = tls::client_config(CertificatePolicy::Unverified)?;   // once per shard
//! let mut stream = OutboundStream::Plain(tcp);
//! let mut client = SmtpClient::opportunistic_tls(hostname);
//! loop { match client.poll_action() {
//!     Some(ClientAction::StartTls) => {
//!         // The 220 to STARTTLS has been read; read nothing more in plain text.
//!         match stream.start_tls(Arc::clone(&tls_config), mx_host).await {
//!             Ok(tls) => { stream = tls; client.tls_established(); }
//!             Err(e) => {
//!                 // Nothing was given to this client yet: no outcome is lost. Reconnect to
//!                 // the same address in plain text, without STARTTLS, and remember why.
//!                 stream = OutboundStream::Plain(TcpStream::connect(addr).await?);
//!                 client = SmtpClient::after_tls_failure(hostname, &e.to_string());
//!             }
//!         }
//!     }
//!     ... Send / SendBody / Ready / MessageDone / Failed / Close exactly as before ...
//! }}
//! // Log client.tls_status() (Encrypted / NotOffered / Refused / FellBack) with the outcome.
//! ```
//!
//! The handshake happens before any message is given to the client (STARTTLS goes right after
//! the first EHLO, and [`ClientAction::Ready`] only after the second), so a failed handshake
//! costs a reconnect, never a recipient outcome.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

/// Longest reply line we accept (RFC 5321 §4.5.3.1.5 says 512 with CRLF; real servers send
/// longer, so we allow four times that before calling it a protocol error).
pub const MAX_REPLY_LINE_BYTES: usize = 2048;
/// Most lines in one multi-line reply (an EHLO reply lists a few dozen at most).
pub const MAX_REPLY_LINES: usize = 64;
/// Most unparsed reply bytes we hold; a server that sends more without finishing a reply is
/// broken or hostile, and the connection is dropped.
pub const MAX_BUFFERED_REPLY_BYTES: usize = 64 * 1024;
/// Longest line we may send in message data, excluding CRLF (RFC 5321 §4.5.3.1.6).
pub const MAX_DATA_LINE_OCTETS: usize = 998;
/// Longest address (local@domain) we put in MAIL or RCPT (RFC 5321 §4.5.3.1.3: a path is
/// at most 256 octets including the angle brackets).
pub const MAX_ADDRESS_BYTES: usize = 254;
/// Most recipients in one transaction; the queue splits larger batches (RFC 5321
/// §4.5.3.1.8 requires servers to take at least 100).
pub const MAX_RECIPIENTS_PER_TRANSACTION: usize = 100;

/// What is inserted to fold a long data line: the line continues on the next one after a
/// space, as Postfix does (`smtp_line_length_limit`), so no line starts with a dot.
const FOLD: &[u8] = b"\r\n ";

/// Reply classes of RFC 5321 §4.2.1, by first digit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyClass {
    /// 2xx: done.
    Positive,
    /// 3xx: go on (354 after DATA).
    Intermediate,
    /// 4xx: try again later.
    Transient,
    /// 5xx: do not try again.
    Permanent,
}

/// One complete (possibly multi-line) server reply, kept for logs and for the DSN's
/// Diagnostic-Code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code, 200..=599.
    pub code: u16,
    /// Text of each line after the code and separator, lossily decoded, control characters
    /// replaced so that the text can go into a DSN header unchanged.
    pub lines: Vec<String>,
}

impl Reply {
    /// A reply we make up ourselves (timeouts, local refusals), with an enhanced status
    /// code at the start of its text like a server's.
    pub fn local(code: u16, text: impl Into<String>) -> Self {
        Reply {
            code,
            lines: vec![text.into()],
        }
    }

    /// Which class the code is in.
    pub fn class(&self) -> ReplyClass {
        match self.code / 100 {
            2 => ReplyClass::Positive,
            3 => ReplyClass::Intermediate,
            4 => ReplyClass::Transient,
            _ => ReplyClass::Permanent,
        }
    }

    /// The RFC 3463 enhanced status code at the start of the first line ("5.1.1"), if any.
    pub fn enhanced_status(&self) -> Option<&str> {
        let first = self.lines.first()?.split(' ').next()?;
        let mut parts = first.split('.');
        let class = parts.next()?;
        let subject = parts.next()?;
        let detail = parts.next()?;
        let digits = |part: &str, max: usize| {
            !part.is_empty() && part.len() <= max && part.bytes().all(|b| b.is_ascii_digit())
        };
        let valid = matches!(class, "2" | "4" | "5")
            && class.as_bytes()[0] == b'0' + (self.code / 100) as u8
            && digits(subject, 3)
            && digits(detail, 3)
            && parts.next().is_none();
        valid.then_some(first)
    }
}

impl fmt::Display for Reply {
    /// The reply on one line, as it goes into logs and a DSN's Diagnostic-Code.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        for line in &self.lines {
            write!(f, " {line}")?;
        }
        Ok(())
    }
}

/// Why the server's bytes could not be read as replies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// A line does not start with a three-digit code in 200..=599 and a separator.
    #[error("malformed reply line")]
    Malformed,
    /// A continuation line carries a different code than the first.
    #[error("reply lines with different codes")]
    CodeMismatch,
    /// A line, a reply or the unparsed input is over its limit.
    #[error("reply too long")]
    TooLong,
}

/// Splits server bytes into [`Reply`]s. Bounded by the `MAX_*REPLY*` constants whatever
/// the server sends; accepts a bare LF as line end (being lenient in what we read costs
/// nothing here: replies are not stored or relayed).
#[derive(Debug, Default)]
pub struct ReplyParser {
    buffer: Vec<u8>,
    code: Option<u16>,
    lines: Vec<String>,
}

impl ReplyParser {
    /// Append bytes read from the socket.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), ReplyError> {
        if self.buffer.len() + bytes.len() > MAX_BUFFERED_REPLY_BYTES {
            return Err(ReplyError::TooLong);
        }
        self.buffer.extend_from_slice(bytes);
        Ok(())
    }

    /// The next complete reply, `Ok(None)` when more bytes are needed.
    pub fn next_reply(&mut self) -> Result<Option<Reply>, ReplyError> {
        let mut consumed = 0;
        let result = loop {
            let rest = &self.buffer[consumed..];
            let Some(newline) = rest.iter().position(|&b| b == b'\n') else {
                if rest.len() > MAX_REPLY_LINE_BYTES {
                    break Err(ReplyError::TooLong);
                }
                break Ok(None);
            };
            if newline > MAX_REPLY_LINE_BYTES {
                break Err(ReplyError::TooLong);
            }
            let line = &rest[..newline];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            consumed += newline + 1;
            let (code, last, text) = match parse_reply_line(line) {
                Ok(parsed) => parsed,
                Err(error) => break Err(error),
            };
            if *self.code.get_or_insert(code) != code {
                break Err(ReplyError::CodeMismatch);
            }
            if self.lines.len() >= MAX_REPLY_LINES {
                break Err(ReplyError::TooLong);
            }
            self.lines.push(text);
            if last {
                self.code = None;
                break Ok(Some(Reply {
                    code,
                    lines: std::mem::take(&mut self.lines),
                }));
            }
        };
        self.buffer.drain(..consumed);
        result
    }
}

/// "250-text" → (250, false, "text"); "250 text" or "250" → (250, true, …).
fn parse_reply_line(line: &[u8]) -> Result<(u16, bool, String), ReplyError> {
    let digits = line.get(..3).ok_or(ReplyError::Malformed)?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(ReplyError::Malformed);
    }
    let code = digits
        .iter()
        .fold(0u16, |code, digit| code * 10 + u16::from(digit - b'0'));
    if !(200..=599).contains(&code) {
        return Err(ReplyError::Malformed);
    }
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return Err(ReplyError::Malformed),
    };
    let text: String = String::from_utf8_lossy(text)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    Ok((code, last, text))
}

/// What the server said it supports in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// RFC 2920: commands may be sent in batches.
    pub pipelining: bool,
    /// RFC 1870: SIZE offered; `Some(0)` means no fixed limit.
    pub size_limit_bytes: Option<u64>,
    /// RFC 6152: 8-bit message bodies accepted.
    pub eight_bit_mime: bool,
    /// RFC 6531: UTF-8 addresses and headers accepted.
    pub smtputf8: bool,
    /// RFC 3207: TLS can be started. The seam for opportunistic STARTTLS (TLS issue).
    pub starttls: bool,
    /// RFC 3030: BDAT accepted (noted; we send DATA, since our stored bytes are
    /// dot-stuffed and DATA sends them without a copy).
    pub chunking: bool,
    /// RFC 2034: replies carry enhanced status codes.
    pub enhanced_status_codes: bool,
}

impl Capabilities {
    /// Read the keyword lines of an EHLO reply (every line after the first).
    pub fn from_ehlo(reply: &Reply) -> Self {
        let mut capabilities = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => capabilities.pipelining = true,
                "SIZE" => {
                    let limit = words.next().map_or(Some(0), |n| n.parse().ok());
                    // An unreadable SIZE parameter: SIZE is offered, limit unknown.
                    capabilities.size_limit_bytes = Some(limit.unwrap_or(0));
                }
                "8BITMIME" => capabilities.eight_bit_mime = true,
                "SMTPUTF8" => capabilities.smtputf8 = true,
                "STARTTLS" => capabilities.starttls = true,
                "CHUNKING" => capabilities.chunking = true,
                "ENHANCEDSTATUSCODES" => capabilities.enhanced_status_codes = true,
                _ => {}
            }
        }
        capabilities
    }
}

/// One message to send, as the queue knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage<'a> {
    /// Envelope sender, without angle brackets; "" for the null sender (bounces).
    pub sender: &'a str,
    /// Envelope recipients, without angle brackets; outcomes come back in this order.
    pub recipients: &'a [String],
    /// Size of the body as it will be sent, for SIZE= and the server's limit.
    pub size_bytes: u64,
    /// The body has 8-bit bytes (it came with BODY=8BITMIME, or see [`contains_8bit`]).
    pub needs_8bitmime: bool,
    /// The message came with SMTPUTF8 (non-ASCII addresses need it too; checked here).
    pub needs_smtputf8: bool,
}

/// What happened to one recipient of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientOutcome {
    /// The server took responsibility for it (250 after the data).
    Delivered,
    /// Try again later (4xx, connection failure, timeout); the reply says why.
    Deferred(Reply),
    /// Give up and send a DSN (5xx, or a need the server cannot meet); the reply says why.
    Bounced(Reply),
}

impl RecipientOutcome {
    fn from_failure(reply: &Reply) -> Self {
        match reply.class() {
            ReplyClass::Permanent => RecipientOutcome::Bounced(reply.clone()),
            _ => RecipientOutcome::Deferred(reply.clone()),
        }
    }
}

/// What the connection loop must do next, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAction {
    /// Write these command bytes.
    Send(Vec<u8>),
    /// Write the current message's body as stored ([`body_pieces`]) then
    /// [`data_terminator`]; no reply is awaited in between.
    SendBody,
    /// The session is ready for a message ([`SmtpClient::send_message`]) or [`SmtpClient::quit`].
    Ready,
    /// The current message is finished: one outcome per recipient, in the order given.
    MessageDone(Vec<RecipientOutcome>),
    /// The session cannot go on (greeting or EHLO refused, 421, protocol error, timeout);
    /// the reply explains it for logs. Any message in flight was reported first, deferred.
    Failed(Reply),
    /// The server answered 220 to STARTTLS: run the TLS client handshake on the socket,
    /// reading nothing more in plain text, then call [`SmtpClient::tls_established`]; if the
    /// handshake fails, reconnect with [`SmtpClient::after_tls_failure`].
    StartTls,
    /// Close the connection once the preceding writes are done.
    Close,
}

/// Why [`SmtpClient::send_message`] refused a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The session is not between messages (still greeting, busy or closed).
    #[error("SMTP session not ready for a message")]
    NotReady,
    /// The message has no recipients, or more than [`MAX_RECIPIENTS_PER_TRANSACTION`].
    #[error("bad recipient count {0}")]
    RecipientCount(usize),
}

/// Whether and how this connection is encrypted, for logs and the delivery record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsStatus {
    /// The client was not asked to try TLS ([`SmtpClient::new`]).
    Disabled,
    /// Not decided yet (before the EHLO reply, or while the handshake runs).
    Pending,
    /// The MX did not offer STARTTLS: plain text.
    NotOffered,
    /// The MX offered STARTTLS but refused it (this reply): plain text.
    Refused(Reply),
    /// STARTTLS succeeded: everything after the first EHLO went encrypted.
    Encrypted,
    /// An earlier connection's handshake failed (why): this one is plain text by choice.
    FellBack(String),
}

/// A command whose reply we wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    StartTls,
    Helo,
    Rset,
    Mail,
    Rcpt(usize),
    Data,
    DataEnd,
    Quit,
}

/// Where the session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Greeting, EHLO/HELO exchange.
    Opening,
    /// Between messages.
    Ready,
    /// A message in flight.
    Transaction,
    /// QUIT sent.
    Quitting,
    /// Closed; nothing more happens.
    Closed,
}

/// The state of the message in flight.
#[derive(Debug, Default)]
struct Transaction {
    /// One slot per recipient; `None` until decided.
    outcomes: Vec<Option<RecipientOutcome>>,
    /// Recipients the server accepted at RCPT, awaiting the end-of-data reply.
    accepted: Vec<usize>,
    /// MAIL was refused: every later reply of this transaction is only consumed.
    mail_failed: bool,
    /// Commands not sent yet (without PIPELINING, one goes per reply).
    unsent: VecDeque<(Expect, Vec<u8>)>,
}

/// The SMTP client session. One per connection; reusable for many messages.
#[derive(Debug)]
pub struct SmtpClient {
    /// Our name in EHLO/HELO (`hostname`).
    helo_name: String,
    phase: Phase,
    parser: ReplyParser,
    capabilities: Capabilities,
    /// Replies we wait for, in the order the commands went out.
    expected: VecDeque<Expect>,
    transaction: Transaction,
    /// The last transaction ended before its data was accepted or refused, so the server
    /// may still hold its state: RSET goes before the next MAIL.
    needs_rset: bool,
    actions: VecDeque<ClientAction>,
    /// Send STARTTLS when the EHLO reply offers it.
    try_starttls: bool,
    /// Where TLS stands on this connection.
    tls: TlsStatus,
    /// STARTTLS was accepted: bytes until the handshake are not ours to read.
    awaiting_handshake: bool,
}

impl SmtpClient {
    /// A session for a freshly connected socket; the greeting is awaited first.
    pub fn new(helo_name: &str) -> Self {
        SmtpClient {
            helo_name: helo_name.to_owned(),
            phase: Phase::Opening,
            parser: ReplyParser::default(),
            capabilities: Capabilities::default(),
            expected: VecDeque::from([Expect::Greeting]),
            transaction: Transaction::default(),
            needs_rset: false,
            actions: VecDeque::new(),
            try_starttls: false,
            tls: TlsStatus::Disabled,
            awaiting_handshake: false,
        }
    }

    /// A session that upgrades to TLS when the MX offers STARTTLS (opportunistic: the
    /// certificate policy is the loop's TLS configuration). See the module docs for the loop.
    pub fn opportunistic_tls(helo_name: &str) -> Self {
        SmtpClient {
            try_starttls: true,
            tls: TlsStatus::Pending,
            ..SmtpClient::new(helo_name)
        }
    }

    /// A plain-text session on a fresh connection after a TLS handshake with the same host
    /// failed (`why`); [`SmtpClient::tls_status`] reports the fallback.
    pub fn after_tls_failure(helo_name: &str, why: &str) -> Self {
        SmtpClient {
            tls: TlsStatus::FellBack(why.chars().take(200).collect()),
            ..SmtpClient::new(helo_name)
        }
    }

    /// Whether and how this connection is encrypted.
    pub fn tls_status(&self) -> &TlsStatus {
        &self.tls
    }

    /// Completion of [`ClientAction::StartTls`]: the handshake succeeded. Per RFC 3207 §4.2
    /// everything learnt in plain text is forgotten, any plain-text bytes that arrived behind
    /// the 220 are discarded (a man in the middle could have injected them), and EHLO is sent
    /// again.
    pub fn tls_established(&mut self) {
        if !self.awaiting_handshake {
            return;
        }
        self.awaiting_handshake = false;
        self.tls = TlsStatus::Encrypted;
        self.parser = ReplyParser::default();
        self.capabilities = Capabilities::default();
        self.expected.clear();
        self.expected.push_back(Expect::Ehlo);
        let command = format!("EHLO {}\r\n", self.helo_name).into_bytes();
        self.actions.push_back(ClientAction::Send(command));
    }

    /// What the server offered (empty until EHLO succeeded, and after HELO).
    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// Whether a message may be given now.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// Whether the session is over (the loop closes the socket when it sees [`ClientAction::Close`]).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The next thing to do, in order; `None` when the machine waits for input.
    pub fn poll_action(&mut self) -> Option<ClientAction> {
        self.actions.pop_front()
    }

    /// How long to wait for the reply awaited now (RFC 5321 §4.5.3.2); `None` when no
    /// reply is awaited. The loop turns expiry into [`SmtpClient::timed_out`].
    pub fn reply_timeout(&self) -> Option<Duration> {
        let minutes = match self.expected.front()? {
            Expect::Data => 2,
            Expect::DataEnd => 10,
            _ => 5,
        };
        Some(Duration::from_secs(minutes * 60))
    }

    /// Bytes read from the server.
    pub fn received(&mut self, bytes: &[u8]) {
        if self.phase == Phase::Closed || self.awaiting_handshake {
            return;
        }
        if self.parser.push(bytes).is_err() {
            return self.fail(Reply::local(421, "4.5.0 reply from server too long"));
        }
        loop {
            match self.parser.next_reply() {
                Ok(Some(reply)) => {
                    self.on_reply(reply);
                    if self.phase == Phase::Closed || self.awaiting_handshake {
                        // Plain text behind the 220 to STARTTLS is dropped with the parser
                        // when TLS is established.
                        return;
                    }
                }
                Ok(None) => return,
                Err(error) => {
                    return self.fail(Reply::local(421, format!("4.5.0 protocol error: {error}")))
                }
            }
        }
    }

    /// The reply awaited did not come in time.
    pub fn timed_out(&mut self) {
        if self.phase == Phase::Quitting {
            return self.close();
        }
        if self.phase != Phase::Closed {
            self.fail(Reply::local(
                421,
                "4.4.2 timeout waiting for the server's reply",
            ));
        }
    }

    /// The server closed the connection (or it broke).
    pub fn connection_closed(&mut self) {
        if self.phase == Phase::Quitting {
            return self.close();
        }
        if self.phase != Phase::Closed {
            self.fail(Reply::local(421, "4.4.2 connection closed by the server"));
        }
    }

    /// End the session politely (between messages).
    pub fn quit(&mut self) {
        match self.phase {
            Phase::Ready | Phase::Opening => {
                self.phase = Phase::Quitting;
                self.expected.clear();
                self.expected.push_back(Expect::Quit);
                self.actions
                    .push_back(ClientAction::Send(b"QUIT\r\n".to_vec()));
            }
            Phase::Transaction => self.fail(Reply::local(421, "4.3.0 session ended")),
            Phase::Quitting | Phase::Closed => {}
        }
    }

    /// Start sending `message`. Needs the server cannot meet bounce the message at once
    /// (reported through [`ClientAction::MessageDone`] with nothing sent).
    pub fn send_message(&mut self, message: &OutgoingMessage<'_>) -> Result<(), ClientError> {
        if self.phase != Phase::Ready {
            return Err(ClientError::NotReady);
        }
        let count = message.recipients.len();
        if count == 0 || count > MAX_RECIPIENTS_PER_TRANSACTION {
            return Err(ClientError::RecipientCount(count));
        }
        if let Some(refusal) = self.local_refusal(message) {
            let outcomes = vec![RecipientOutcome::Bounced(refusal); count];
            self.actions.push_back(ClientAction::MessageDone(outcomes));
            self.actions.push_back(ClientAction::Ready);
            return Ok(());
        }
        let mut transaction = Transaction {
            outcomes: vec![None; count],
            ..Transaction::default()
        };
        let mut commands = VecDeque::new();
        if self.needs_rset {
            commands.push_back((Expect::Rset, b"RSET\r\n".to_vec()));
        }
        commands.push_back((Expect::Mail, self.mail_command(message)));
        for (index, recipient) in message.recipients.iter().enumerate() {
            if !is_sendable_address(recipient) || recipient.is_empty() {
                transaction.outcomes[index] = Some(RecipientOutcome::Bounced(Reply::local(
                    553,
                    "5.1.3 recipient address cannot be sent in SMTP",
                )));
                continue;
            }
            let mut command = Vec::with_capacity(recipient.len() + 12);
            command.extend_from_slice(b"RCPT TO:<");
            command.extend_from_slice(recipient.as_bytes());
            command.extend_from_slice(b">\r\n");
            commands.push_back((Expect::Rcpt(index), command));
        }
        if commands.len() == 1 + usize::from(self.needs_rset) {
            // Every recipient was refused locally: nothing to send.
            let outcomes = transaction.outcomes.into_iter().flatten().collect();
            self.actions.push_back(ClientAction::MessageDone(outcomes));
            self.actions.push_back(ClientAction::Ready);
            return Ok(());
        }
        commands.push_back((Expect::Data, b"DATA\r\n".to_vec()));
        self.needs_rset = false;
        self.phase = Phase::Transaction;
        if self.capabilities.pipelining {
            // RFC 2920: the whole envelope and DATA go in one write; replies come in order.
            let mut batch = Vec::new();
            for (expect, command) in commands {
                self.expected.push_back(expect);
                batch.extend_from_slice(&command);
            }
            self.actions.push_back(ClientAction::Send(batch));
        } else {
            transaction.unsent = commands;
        }
        self.transaction = transaction;
        self.send_next_unsent();
        Ok(())
    }

    /// A refusal decided before anything is sent: SIZE, 8BITMIME, SMTPUTF8, bad sender.
    fn local_refusal(&self, message: &OutgoingMessage<'_>) -> Option<Reply> {
        let capabilities = &self.capabilities;
        if let Some(limit) = capabilities.size_limit_bytes {
            if limit > 0 && message.size_bytes > limit {
                return Some(Reply::local(
                    552,
                    format!("5.3.4 message size exceeds the remote limit of {limit} bytes"),
                ));
            }
        }
        if !is_sendable_address(message.sender) {
            return Some(Reply::local(
                553,
                "5.1.7 sender address cannot be sent in SMTP",
            ));
        }
        let needs_smtputf8 = message.needs_smtputf8
            || !message.sender.is_ascii()
            || message.recipients.iter().any(|r| !r.is_ascii());
        if needs_smtputf8 && !capabilities.smtputf8 {
            return Some(Reply::local(
                550,
                "5.6.7 the remote server does not support SMTPUTF8",
            ));
        }
        if message.needs_8bitmime && !capabilities.eight_bit_mime && !capabilities.smtputf8 {
            return Some(Reply::local(
                554,
                "5.6.3 the remote server does not support 8BITMIME",
            ));
        }
        None
    }

    fn mail_command(&self, message: &OutgoingMessage<'_>) -> Vec<u8> {
        let mut command = format!("MAIL FROM:<{}>", message.sender);
        if self.capabilities.size_limit_bytes.is_some() {
            command.push_str(&format!(" SIZE={}", message.size_bytes));
        }
        // A hop offering SMTPUTF8 takes 8-bit bodies too (RFC 6531 §3.1), but it is still
        // told the body is 8-bit (RFC 6152).
        if message.needs_8bitmime
            && (self.capabilities.eight_bit_mime || self.capabilities.smtputf8)
        {
            command.push_str(" BODY=8BITMIME");
        }
        let needs_smtputf8 = message.needs_smtputf8
            || !message.sender.is_ascii()
            || message.recipients.iter().any(|r| !r.is_ascii());
        if needs_smtputf8 {
            command.push_str(" SMTPUTF8");
        }
        command.push_str("\r\n");
        command.into_bytes()
    }

    /// Without PIPELINING: send the next command, skipping what no longer makes sense.
    fn send_next_unsent(&mut self) {
        if !self.expected.is_empty() {
            return;
        }
        while let Some((expect, command)) = self.transaction.unsent.pop_front() {
            let skip = match expect {
                Expect::Rcpt(_) => self.transaction.mail_failed,
                Expect::Data => {
                    self.transaction.mail_failed || self.transaction.accepted.is_empty()
                }
                _ => false,
            };
            if skip {
                continue;
            }
            self.expected.push_back(expect);
            self.actions.push_back(ClientAction::Send(command));
            return;
        }
        if self.phase == Phase::Transaction {
            // Nothing left to send and no reply awaited: MAIL or every RCPT failed.
            self.needs_rset = true;
            self.finish_message();
        }
    }

    fn on_reply(&mut self, reply: Reply) {
        let Some(expect) = self.expected.pop_front() else {
            if reply.code == 421 {
                // An idle connection closed by the server (its timeout, its shutdown).
                return self.fail(reply);
            }
            // A reply nobody asked for: the server is out of step with us.
            return self.fail(Reply::local(421, "4.5.0 unexpected reply from server"));
        };
        if reply.code == 421 && expect != Expect::Quit {
            // RFC 5321 §3.8: the server is closing the channel.
            return self.fail(reply);
        }
        match expect {
            Expect::Greeting => {
                if reply.class() != ReplyClass::Positive {
                    return self.fail(reply);
                }
                self.expected.push_back(Expect::Ehlo);
                let command = format!("EHLO {}\r\n", self.helo_name).into_bytes();
                self.actions.push_back(ClientAction::Send(command));
            }
            Expect::Ehlo => match reply.class() {
                ReplyClass::Positive => {
                    self.capabilities = Capabilities::from_ehlo(&reply);
                    if self.try_starttls && self.tls == TlsStatus::Pending {
                        if self.capabilities.starttls {
                            self.expected.push_back(Expect::StartTls);
                            self.actions
                                .push_back(ClientAction::Send(b"STARTTLS\r\n".to_vec()));
                            return;
                        }
                        self.tls = TlsStatus::NotOffered;
                    }
                    self.become_ready();
                }
                // RFC 5321 §3.2: a server that does not know EHLO answers 5xx; try HELO.
                ReplyClass::Permanent => {
                    self.expected.push_back(Expect::Helo);
                    let command = format!("HELO {}\r\n", self.helo_name).into_bytes();
                    self.actions.push_back(ClientAction::Send(command));
                }
                _ => self.fail(reply),
            },
            Expect::Helo => {
                if reply.class() != ReplyClass::Positive {
                    return self.fail(reply);
                }
                if self.tls == TlsStatus::Pending {
                    self.tls = TlsStatus::NotOffered;
                }
                self.capabilities = Capabilities::default();
                self.become_ready();
            }
            Expect::StartTls => {
                if reply.code == 220 {
                    // No more plain text: the loop hands the socket to TLS now.
                    self.awaiting_handshake = true;
                    self.actions.push_back(ClientAction::StartTls);
                    return;
                }
                // Refused (454 and the like): carry on in plain text with what EHLO said.
                self.tls = TlsStatus::Refused(reply);
                self.become_ready();
            }
            Expect::Rset => {
                if reply.class() != ReplyClass::Positive {
                    return self.fail(reply);
                }
            }
            Expect::Mail => {
                if reply.class() != ReplyClass::Positive {
                    self.transaction.mail_failed = true;
                    for slot in &mut self.transaction.outcomes {
                        slot.get_or_insert_with(|| RecipientOutcome::from_failure(&reply));
                    }
                }
            }
            Expect::Rcpt(index) => {
                if !self.transaction.mail_failed {
                    if reply.class() == ReplyClass::Positive {
                        self.transaction.accepted.push(index);
                    } else if let Some(slot) = self.transaction.outcomes.get_mut(index) {
                        *slot = Some(RecipientOutcome::from_failure(&reply));
                    }
                }
            }
            Expect::Data => {
                let has_recipients =
                    !self.transaction.mail_failed && !self.transaction.accepted.is_empty();
                if reply.code == 354 && has_recipients {
                    self.expected.push_back(Expect::DataEnd);
                    self.actions.push_back(ClientAction::SendBody);
                    return;
                }
                if reply.code == 354 {
                    // RFC 2920 §3.1: DATA accepted although no recipient was; end the empty
                    // message at once and ignore what it gets.
                    self.expected.push_back(Expect::DataEnd);
                    self.actions
                        .push_back(ClientAction::Send(b".\r\n".to_vec()));
                    return;
                }
                if has_recipients {
                    self.decide_accepted(|| RecipientOutcome::from_failure(&reply));
                }
                self.needs_rset = true;
                return self.finish_message();
            }
            Expect::DataEnd => {
                let has_recipients =
                    !self.transaction.mail_failed && !self.transaction.accepted.is_empty();
                if has_recipients {
                    if reply.class() == ReplyClass::Positive {
                        self.decide_accepted(|| RecipientOutcome::Delivered);
                    } else {
                        self.decide_accepted(|| RecipientOutcome::from_failure(&reply));
                    }
                }
                return self.finish_message();
            }
            Expect::Quit => return self.close(),
        }
        if self.phase == Phase::Transaction {
            self.send_next_unsent();
        }
    }

    fn decide_accepted(&mut self, outcome: impl Fn() -> RecipientOutcome) {
        for &index in &self.transaction.accepted {
            if let Some(slot) = self.transaction.outcomes.get_mut(index) {
                slot.get_or_insert_with(&outcome);
            }
        }
    }

    fn become_ready(&mut self) {
        self.phase = Phase::Ready;
        self.actions.push_back(ClientAction::Ready);
    }

    /// Report the message in flight; undecided recipients (none in a normal ending) are
    /// deferred.
    fn finish_message(&mut self) {
        let transaction = std::mem::take(&mut self.transaction);
        let outcomes = transaction
            .outcomes
            .into_iter()
            .map(|slot| {
                slot.unwrap_or_else(|| {
                    RecipientOutcome::Deferred(Reply::local(451, "4.3.0 transaction not completed"))
                })
            })
            .collect();
        self.actions.push_back(ClientAction::MessageDone(outcomes));
        // Every path here has consumed the transaction's last reply (DATA or the data's
        // end, or the last unsent command was skipped), so the session is in step.
        debug_assert!(self.expected.is_empty());
        self.become_ready();
    }

    /// The session is over: defer whoever is undecided, tell the loop, close.
    fn fail(&mut self, reply: Reply) {
        if self.phase == Phase::Transaction {
            let transaction = std::mem::take(&mut self.transaction);
            let outcomes = transaction
                .outcomes
                .into_iter()
                .map(|slot| match slot {
                    // A 5xx already given to a recipient stands; everything else is retried.
                    Some(RecipientOutcome::Bounced(bounce)) => RecipientOutcome::Bounced(bounce),
                    _ => RecipientOutcome::Deferred(reply.clone()),
                })
                .collect();
            self.actions.push_back(ClientAction::MessageDone(outcomes));
        }
        self.actions.push_back(ClientAction::Failed(reply));
        self.close();
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.expected.clear();
        self.actions.push_back(ClientAction::Close);
    }
}

/// Whether an address can go between angle brackets without changing the command: no
/// controls, spaces or brackets (they would let stored data inject commands), and short
/// enough for RFC 5321.
fn is_sendable_address(address: &str) -> bool {
    address.len() <= MAX_ADDRESS_BYTES
        && !address
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '<' || c == '>')
}

/// Whether any byte is 8-bit (the body then needs BODY=8BITMIME or SMTPUTF8).
pub fn contains_8bit(bytes: &[u8]) -> bool {
    !bytes.is_ascii()
}

/// Whether a stored body has a line longer than [`MAX_DATA_LINE_OCTETS`] (CRLF excluded),
/// so that it must be sent through [`body_pieces`]'s folding instead of as one slice.
pub fn needs_folding(body: &[u8]) -> bool {
    let mut line_start = 0;
    let mut rest = body;
    while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..newline];
        let content = line.strip_suffix(b"\r").unwrap_or(line).len();
        if content > MAX_DATA_LINE_OCTETS {
            return true;
        }
        line_start += newline + 1;
        rest = &body[line_start..];
    }
    rest.len() > MAX_DATA_LINE_OCTETS
}

/// The slices to write for a stored body: the body itself when no line is too long
/// (zero copies), else the body cut before each 999th octet of a line with CRLF SPACE
/// between the cuts, still without copying the body.
pub fn body_pieces(body: &[u8]) -> BodyPieces<'_> {
    BodyPieces {
        rest: body,
        fold: needs_folding(body),
        column: 0,
        fold_next: false,
    }
}

/// Iterator over the pieces of a body to write; see [`body_pieces`].
#[derive(Debug, Clone)]
pub struct BodyPieces<'a> {
    rest: &'a [u8],
    /// Whether folding is needed at all (decided once; otherwise one piece).
    fold: bool,
    /// Octets already on the current output line.
    column: usize,
    /// A fold goes out before the next slice of the body.
    fold_next: bool,
}

impl<'a> Iterator for BodyPieces<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        if !self.fold {
            return Some(std::mem::take(&mut self.rest));
        }
        if self.fold_next {
            self.fold_next = false;
            // The space starts the continuation line.
            self.column = 1;
            return Some(FOLD);
        }
        let mut at = 0;
        while at < self.rest.len() {
            if self.rest[at..].starts_with(b"\r\n") {
                at += 2;
                self.column = 0;
                continue;
            }
            if self.column == MAX_DATA_LINE_OCTETS {
                let (piece, rest) = self.rest.split_at(at);
                self.rest = rest;
                self.fold_next = true;
                return Some(piece);
            }
            self.column += 1;
            at += 1;
        }
        Some(std::mem::take(&mut self.rest))
    }
}

/// What ends the data after a body that ends with `body_tail` (its last bytes): ".\r\n"
/// after a body that ends its last line, else "\r\n.\r\n" (RFC 5321 §4.1.1.4: the CRLF
/// before the dot belongs to the terminator only when the body has none).
pub fn data_terminator(body_tail: &[u8]) -> &'static [u8] {
    if body_tail.is_empty() || body_tail.ends_with(b"\r\n") {
        b".\r\n"
    } else {
        b"\r\n.\r\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Drives a client like the connection loop would, collecting its actions.
    struct Script {
        client: SmtpClient,
    }

    impl Script {
        fn new() -> Self {
            Script {
                client: SmtpClient::new("relay.example.test"),
            }
        }

        fn actions(&mut self) -> Vec<ClientAction> {
            std::iter::from_fn(|| self.client.poll_action()).collect()
        }

        /// The server says `text`; returns what the client then does.
        fn server(&mut self, text: &str) -> Vec<ClientAction> {
            self.client.received(text.as_bytes());
            self.actions()
        }

        fn send(&mut self, message: &OutgoingMessage<'_>) -> Vec<ClientAction> {
            self.client.send_message(message).expect("ready");
            self.actions()
        }

        /// Greeting and EHLO answered with `ehlo_keywords` (one per line).
        fn open(ehlo_keywords: &[&str]) -> Self {
            let mut script = Script::new();
            assert_eq!(
                script.server("220 mx.far.test ESMTP\r\n"),
                vec![send("EHLO relay.example.test\r\n")]
            );
            let mut reply = String::from("250");
            reply.push(if ehlo_keywords.is_empty() { ' ' } else { '-' });
            reply.push_str("mx.far.test hello\r\n");
            for (i, keyword) in ehlo_keywords.iter().enumerate() {
                let separator = if i + 1 == ehlo_keywords.len() {
                    ' '
                } else {
                    '-'
                };
                reply.push_str(&format!("250{separator}{keyword}\r\n"));
            }
            assert_eq!(script.server(&reply), vec![ClientAction::Ready]);
            script
        }
    }

    fn send(text: &str) -> ClientAction {
        ClientAction::Send(text.as_bytes().to_vec())
    }

    fn reply(code: u16, text: &str) -> Reply {
        Reply::local(code, text)
    }

    fn done(outcomes: Vec<RecipientOutcome>) -> ClientAction {
        ClientAction::MessageDone(outcomes)
    }

    fn bounced(code: u16, text: &str) -> RecipientOutcome {
        RecipientOutcome::Bounced(reply(code, text))
    }

    fn deferred(code: u16, text: &str) -> RecipientOutcome {
        RecipientOutcome::Deferred(reply(code, text))
    }

    fn rcpts(list: &[&str]) -> Vec<String> {
        list.iter().map(|r| r.to_string()).collect()
    }

    fn message<'a>(recipients: &'a [String]) -> OutgoingMessage<'a> {
        OutgoingMessage {
            sender: "alice@example.test",
            recipients,
            size_bytes: 1200,
            needs_8bitmime: false,
            needs_smtputf8: false,
        }
    }

    const FULL: &[&str] = &[
        "PIPELINING",
        "SIZE 10000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
    ];

    #[test]
    fn pipelined_dialogue_with_one_refused_recipient() {
        let mut script = Script::open(FULL);
        let caps = script.client.capabilities().clone();
        assert!(
            caps.pipelining
                && caps.eight_bit_mime
                && caps.smtputf8
                && caps.chunking
                && caps.starttls
        );
        assert_eq!(caps.size_limit_bytes, Some(10000));
        let to = rcpts(&["bob@far.test", "carol@far.test", "dave@far.test"]);
        assert_eq!(
            script.send(&message(&to)),
            vec![send("MAIL FROM:<alice@example.test> SIZE=1200\r\nRCPT TO:<bob@far.test>\r\nRCPT TO:<carol@far.test>\r\nRCPT TO:<dave@far.test>\r\nDATA\r\n")]
        );
        assert_eq!(
            script.client.reply_timeout(),
            Some(Duration::from_secs(300))
        );
        // Replies may arrive split anywhere.
        assert_eq!(
            script.server("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550-5.1.1 no such"),
            vec![]
        );
        assert_eq!(
            script.server(" user\r\n550 5.1.1 carol unknown\r\n250 2.1.5 Ok\r\n354 go ahead\r\n"),
            vec![ClientAction::SendBody]
        );
        assert_eq!(
            script.client.reply_timeout(),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            script.server("250 2.0.0 Ok: queued as 42\r\n"),
            vec![
                done(vec![
                    RecipientOutcome::Delivered,
                    RecipientOutcome::Bounced(Reply {
                        code: 550,
                        lines: vec!["5.1.1 no such user".into(), "5.1.1 carol unknown".into()]
                    }),
                    RecipientOutcome::Delivered,
                ]),
                ClientAction::Ready,
            ]
        );
        // The transaction completed: the next one needs no RSET.
        let to = rcpts(&["erin@far.test"]);
        assert_eq!(
            script.send(&message(&to)),
            vec![send(
                "MAIL FROM:<alice@example.test> SIZE=1200\r\nRCPT TO:<erin@far.test>\r\nDATA\r\n"
            )]
        );
        assert_eq!(
            script.server("250 ok\r\n250 ok\r\n354 go\r\n"),
            vec![ClientAction::SendBody]
        );
        assert_eq!(
            script.server("250 ok\r\n"),
            vec![done(vec![RecipientOutcome::Delivered]), ClientAction::Ready]
        );
        script.client.quit();
        assert_eq!(script.actions(), vec![send("QUIT\r\n")]);
        assert_eq!(
            script.server("221 2.0.0 bye\r\n"),
            vec![ClientAction::Close]
        );
        assert!(script.client.is_closed());
    }

    #[test]
    fn without_pipelining_commands_wait_for_replies() {
        let mut script = Script::open(&["SIZE", "8BITMIME"]);
        let to = rcpts(&["bob@far.test", "carol@far.test"]);
        let mut eight_bit = message(&to);
        eight_bit.needs_8bitmime = true;
        assert_eq!(
            script.send(&eight_bit),
            vec![send(
                "MAIL FROM:<alice@example.test> SIZE=1200 BODY=8BITMIME\r\n"
            )]
        );
        assert_eq!(
            script.server("250 ok\r\n"),
            vec![send("RCPT TO:<bob@far.test>\r\n")]
        );
        assert_eq!(
            script.server("451 4.3.0 try later\r\n"),
            vec![send("RCPT TO:<carol@far.test>\r\n")]
        );
        assert_eq!(script.server("250 ok\r\n"), vec![send("DATA\r\n")]);
        assert_eq!(
            script.client.reply_timeout(),
            Some(Duration::from_secs(120))
        );
        assert_eq!(script.server("354 go\r\n"), vec![ClientAction::SendBody]);
        assert_eq!(
            script.server("250 ok\r\n"),
            vec![
                done(vec![
                    deferred(451, "4.3.0 try later"),
                    RecipientOutcome::Delivered
                ]),
                ClientAction::Ready
            ]
        );
    }

    #[test]
    fn every_recipient_refused_skips_data_and_resets_next_time() {
        let mut script = Script::open(&[]);
        let to = rcpts(&["bob@far.test"]);
        assert_eq!(
            script.send(&message(&to)),
            vec![send("MAIL FROM:<alice@example.test>\r\n")]
        );
        assert_eq!(
            script.server("250 ok\r\n"),
            vec![send("RCPT TO:<bob@far.test>\r\n")]
        );
        assert_eq!(
            script.server("550 5.1.1 unknown\r\n"),
            vec![
                done(vec![bounced(550, "5.1.1 unknown")]),
                ClientAction::Ready
            ]
        );
        assert_eq!(script.send(&message(&to)), vec![send("RSET\r\n")]);
        assert_eq!(
            script.server("250 ok\r\n"),
            vec![send("MAIL FROM:<alice@example.test>\r\n")]
        );
    }

    #[test]
    fn pipelined_refusals_consume_every_reply_and_end_a_stray_354() {
        let mut script = Script::open(&["PIPELINING"]);
        let to = rcpts(&["bob@far.test"]);
        script.send(&message(&to));
        // MAIL refused with 4xx: recipients deferred, later replies only consumed.
        assert_eq!(
            script.server("452 4.3.1 full\r\n503 5.5.1 need MAIL\r\n"),
            vec![]
        );
        assert_eq!(
            script.server("503 5.5.1 no recipients\r\n"),
            vec![done(vec![deferred(452, "4.3.1 full")]), ClientAction::Ready]
        );
        assert_eq!(
            script.send(&message(&to)),
            vec![send(
                "RSET\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@far.test>\r\nDATA\r\n"
            )]
        );
        // A server that says 354 although no recipient was accepted gets an empty message.
        assert_eq!(
            script.server("250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n"),
            vec![send(".\r\n")]
        );
        assert_eq!(
            script.server("554 5.5.1 no valid recipients\r\n"),
            vec![done(vec![bounced(550, "5.1.1 no")]), ClientAction::Ready]
        );
    }

    #[test]
    fn ehlo_refused_falls_back_to_helo_without_extensions() {
        let mut script = Script::new();
        assert_eq!(
            script.server("220 old.far.test\r\n"),
            vec![send("EHLO relay.example.test\r\n")]
        );
        assert_eq!(
            script.server("502 5.5.2 what?\r\n"),
            vec![send("HELO relay.example.test\r\n")]
        );
        assert_eq!(
            script.server("250 old.far.test\r\n"),
            vec![ClientAction::Ready]
        );
        assert_eq!(script.client.capabilities(), &Capabilities::default());
        let to = rcpts(&["bob@far.test"]);
        assert_eq!(
            script.send(&message(&to)),
            vec![send("MAIL FROM:<alice@example.test>\r\n")]
        );
    }

    #[test]
    fn opening_failures_close_the_session() {
        let cases: &[(&str, &str, Reply)] = &[
            ("554 5.3.2 go away\r\n", "", reply(554, "5.3.2 go away")),
            ("421 4.3.2 busy\r\n", "", reply(421, "4.3.2 busy")),
            (
                "220 hi\r\n",
                "421 4.7.0 too many\r\n",
                reply(421, "4.7.0 too many"),
            ),
            (
                "220 hi\r\n",
                "450 4.7.1 later\r\n",
                reply(450, "4.7.1 later"),
            ),
            (
                "220 hi\r\n",
                "502 no\r\n554 5.7.1 not you\r\n",
                reply(554, "5.7.1 not you"),
            ),
            (
                "hello\r\n",
                "",
                reply(421, "4.5.0 protocol error: malformed reply line"),
            ),
        ];
        for (greeting, ehlo_reply, reason) in cases {
            let mut script = Script::new();
            let mut actions = script.server(greeting);
            actions.extend(script.server(ehlo_reply));
            let tail = actions[actions.len() - 2..].to_vec();
            assert_eq!(
                tail,
                vec![ClientAction::Failed(reason.clone()), ClientAction::Close],
                "{greeting:?} {ehlo_reply:?}"
            );
            assert!(script.client.is_closed());
            assert_eq!(
                script.client.send_message(&message(&rcpts(&["x@y"]))),
                Err(ClientError::NotReady)
            );
        }
    }

    #[test]
    fn a_421_mid_transaction_defers_the_undecided_and_keeps_bounces() {
        let mut script = Script::open(&["PIPELINING"]);
        let to = rcpts(&["bob@far.test", "carol@far.test", "dave@far.test"]);
        script.send(&message(&to));
        let closing = reply(421, "4.4.2 shutting down");
        assert_eq!(
            script.server("250 ok\r\n250 ok\r\n550 5.1.1 no\r\n421 4.4.2 shutting down\r\n"),
            vec![
                done(vec![
                    RecipientOutcome::Deferred(closing.clone()),
                    bounced(550, "5.1.1 no"),
                    RecipientOutcome::Deferred(closing.clone()),
                ]),
                ClientAction::Failed(closing),
                ClientAction::Close,
            ]
        );
        // Nothing after the close is acted on.
        assert_eq!(script.server("250 ok\r\n"), vec![]);
    }

    #[test]
    fn replies_while_idle_end_the_session() {
        let mut script = Script::open(&["PIPELINING"]);
        let idle = reply(421, "4.4.2 idle too long");
        assert_eq!(
            script.server("421 4.4.2 idle too long\r\n"),
            vec![ClientAction::Failed(idle), ClientAction::Close]
        );
        let mut script = Script::open(&["PIPELINING"]);
        assert_eq!(
            script.server("250 surprise\r\n"),
            vec![
                ClientAction::Failed(reply(421, "4.5.0 unexpected reply from server")),
                ClientAction::Close
            ]
        );
    }

    #[test]
    fn data_refusals_and_timeouts() {
        // (reply to the end of data, or None for a timeout; expected outcome)
        let cases: Vec<(Option<&str>, RecipientOutcome)> = vec![
            (Some("250 2.0.0 ok\r\n"), RecipientOutcome::Delivered),
            (Some("452 4.3.1 full\r\n"), deferred(452, "4.3.1 full")),
            (Some("554 5.7.1 spam\r\n"), bounced(554, "5.7.1 spam")),
            (
                None,
                deferred(421, "4.4.2 timeout waiting for the server's reply"),
            ),
        ];
        for (end_reply, expected) in cases {
            let mut script = Script::open(&["PIPELINING"]);
            let to = rcpts(&["bob@far.test"]);
            script.send(&message(&to));
            assert_eq!(
                script.server("250 ok\r\n250 ok\r\n354 go\r\n"),
                vec![ClientAction::SendBody]
            );
            let actions = match end_reply {
                Some(text) => script.server(text),
                None => {
                    script.client.timed_out();
                    script.actions()
                }
            };
            assert_eq!(actions[0], done(vec![expected]), "{end_reply:?}");
        }
        // DATA itself refused.
        let mut script = Script::open(&["PIPELINING"]);
        let to = rcpts(&["bob@far.test"]);
        script.send(&message(&to));
        assert_eq!(
            script.server("250 ok\r\n250 ok\r\n451 4.3.0 not now\r\n"),
            vec![
                done(vec![deferred(451, "4.3.0 not now")]),
                ClientAction::Ready
            ]
        );
        assert_eq!(
            script.send(&message(&to)),
            vec![send(
                "RSET\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@far.test>\r\nDATA\r\n"
            )]
        );
        script.client.connection_closed();
        assert_eq!(
            script.actions(),
            vec![
                done(vec![deferred(421, "4.4.2 connection closed by the server")]),
                ClientAction::Failed(reply(421, "4.4.2 connection closed by the server")),
                ClientAction::Close
            ]
        );
    }

    #[test]
    fn needs_the_hop_cannot_meet_bounce_without_sending() {
        let to = rcpts(&["bob@far.test", "carol@far.test"]);
        let big = OutgoingMessage {
            size_bytes: 10001,
            ..message(&to)
        };
        let eight_bit = OutgoingMessage {
            needs_8bitmime: true,
            ..message(&to)
        };
        let utf8 = OutgoingMessage {
            needs_smtputf8: true,
            ..message(&to)
        };
        let utf8_rcpt = rcpts(&["bøb@far.test"]);
        let utf8_address = message(&utf8_rcpt);
        let size_refusal = reply(
            552,
            "5.3.4 message size exceeds the remote limit of 10000 bytes",
        );
        let cases: Vec<(&[&str], &OutgoingMessage<'_>, Reply)> = vec![
            (&["PIPELINING", "SIZE 10000"], &big, size_refusal),
            (
                &["PIPELINING"],
                &eight_bit,
                reply(554, "5.6.3 the remote server does not support 8BITMIME"),
            ),
            (
                &["8BITMIME"],
                &utf8,
                reply(550, "5.6.7 the remote server does not support SMTPUTF8"),
            ),
            (
                &["8BITMIME"],
                &utf8_address,
                reply(550, "5.6.7 the remote server does not support SMTPUTF8"),
            ),
        ];
        for (keywords, message, refusal) in cases {
            let mut script = Script::open(keywords);
            let outcomes = vec![RecipientOutcome::Bounced(refusal); message.recipients.len()];
            assert_eq!(
                script.send(message),
                vec![done(outcomes), ClientAction::Ready],
                "{keywords:?}"
            );
            assert!(script.client.is_ready());
        }
        // Offered: the parameters go on MAIL.
        let mut script = Script::open(&["SMTPUTF8", "8BITMIME", "SIZE 0"]);
        let both = OutgoingMessage {
            needs_8bitmime: true,
            ..utf8_address
        };
        assert_eq!(
            script.send(&both),
            vec![send(
                "MAIL FROM:<alice@example.test> SIZE=1200 BODY=8BITMIME SMTPUTF8\r\n"
            )]
        );
        // SMTPUTF8 without 8BITMIME: the 8-bit body goes, and says so.
        let mut script = Script::open(&["SMTPUTF8", "SIZE 0"]);
        assert_eq!(
            script.send(&both),
            vec![send(
                "MAIL FROM:<alice@example.test> SIZE=1200 BODY=8BITMIME SMTPUTF8\r\n"
            )]
        );
    }

    #[test]
    fn addresses_that_would_inject_commands_are_refused() {
        let mut script = Script::open(&["PIPELINING"]);
        let to = rcpts(&["bob@far.test>\r\nDATA", "carol@far.test"]);
        assert_eq!(
            script.send(&message(&to)),
            vec![send(
                "MAIL FROM:<alice@example.test>\r\nRCPT TO:<carol@far.test>\r\nDATA\r\n"
            )]
        );
        let mut script = Script::open(&["PIPELINING"]);
        let to = rcpts(&["a b@far.test"]);
        assert_eq!(
            script.send(&message(&to)),
            vec![
                done(vec![bounced(
                    553,
                    "5.1.3 recipient address cannot be sent in SMTP"
                )]),
                ClientAction::Ready
            ]
        );
        let to = rcpts(&["b@far.test"]);
        let bad_sender = OutgoingMessage {
            sender: "x>\r\nRSET",
            ..message(&to)
        };
        assert_eq!(
            script.send(&bad_sender),
            vec![
                done(vec![bounced(
                    553,
                    "5.1.7 sender address cannot be sent in SMTP"
                )]),
                ClientAction::Ready
            ]
        );
        // The null sender is fine.
        let bounce = OutgoingMessage {
            sender: "",
            ..message(&to)
        };
        assert_eq!(
            script.send(&bounce),
            vec![send("MAIL FROM:<>\r\nRCPT TO:<b@far.test>\r\nDATA\r\n")]
        );
        assert_eq!(
            script.client.send_message(&bounce),
            Err(ClientError::NotReady)
        );
    }

    #[test]
    fn recipient_counts_are_bounded() {
        let mut script = Script::open(&[]);
        assert_eq!(
            script.client.send_message(&message(&[])),
            Err(ClientError::RecipientCount(0))
        );
        let many: Vec<String> = (0..=MAX_RECIPIENTS_PER_TRANSACTION)
            .map(|i| format!("u{i}@far.test"))
            .collect();
        assert_eq!(
            script.client.send_message(&message(&many)),
            Err(ClientError::RecipientCount(101))
        );
    }

    #[test]
    fn reply_parser_table() {
        let cases: &[(&str, Result<Option<Reply>, ReplyError>)] = &[
            ("250 ok\r\n", Ok(Some(reply(250, "ok")))),
            (
                "250\r\n",
                Ok(Some(Reply {
                    code: 250,
                    lines: vec![String::new()],
                })),
            ),
            ("250 ok\n", Ok(Some(reply(250, "ok")))),
            (
                "250-a\r\n250 b\r\n",
                Ok(Some(Reply {
                    code: 250,
                    lines: vec!["a".into(), "b".into()],
                })),
            ),
            ("250-a\r\n", Ok(None)),
            ("250 ok", Ok(None)),
            ("250-a\r\n251 b\r\n", Err(ReplyError::CodeMismatch)),
            ("2x0 ok\r\n", Err(ReplyError::Malformed)),
            ("199 ok\r\n", Err(ReplyError::Malformed)),
            ("600 ok\r\n", Err(ReplyError::Malformed)),
            ("250_ok\r\n", Err(ReplyError::Malformed)),
            ("25\r\n", Err(ReplyError::Malformed)),
            ("250 tab\there\r\n", Ok(Some(reply(250, "tab?here")))),
        ];
        for (input, expected) in cases {
            let mut parser = ReplyParser::default();
            parser.push(input.as_bytes()).unwrap();
            assert_eq!(&parser.next_reply(), expected, "{input:?}");
        }
        let mut parser = ReplyParser::default();
        parser.push(&[b'2'; MAX_REPLY_LINE_BYTES + 1]).unwrap();
        assert_eq!(parser.next_reply(), Err(ReplyError::TooLong));
        let mut parser = ReplyParser::default();
        assert_eq!(
            parser.push(&vec![b'x'; MAX_BUFFERED_REPLY_BYTES + 1]),
            Err(ReplyError::TooLong)
        );
        let mut parser = ReplyParser::default();
        parser
            .push("250-x\r\n".repeat(MAX_REPLY_LINES + 1).as_bytes())
            .unwrap();
        assert_eq!(parser.next_reply(), Err(ReplyError::TooLong));
    }

    #[test]
    fn enhanced_status_and_display() {
        assert_eq!(
            reply(550, "5.1.1 user unknown").enhanced_status(),
            Some("5.1.1")
        );
        assert_eq!(reply(550, "4.1.1 wrong class").enhanced_status(), None);
        assert_eq!(reply(550, "user unknown").enhanced_status(), None);
        assert_eq!(reply(250, "2.0.0").enhanced_status(), Some("2.0.0"));
        let multi = Reply {
            code: 550,
            lines: vec!["5.1.1 a".into(), "5.1.1 b".into()],
        };
        assert_eq!(multi.to_string(), "550 5.1.1 a 5.1.1 b");
    }

    #[test]
    fn folding_table() {
        let long = |n: usize| "x".repeat(n);
        let cases: Vec<(String, bool)> = vec![
            (String::new(), false),
            (format!("{}\r\n", long(998)), false),
            (format!("{}\r\n", long(999)), true),
            (format!("a\r\n{}\r\nb\r\n", long(998)), false),
            (format!("a\r\n{}\r\nb\r\n", long(2000)), true),
            (long(999), true),
            (long(998), false),
        ];
        for (body, expected) in cases {
            assert_eq!(
                needs_folding(body.as_bytes()),
                expected,
                "len {}",
                body.len()
            );
        }
    }

    fn assert_folded_well(body: &[u8]) {
        let pieces: Vec<&[u8]> = body_pieces(body).collect();
        let sent: Vec<u8> = pieces.concat();
        for line in sent.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(
                line.len() <= MAX_DATA_LINE_OCTETS,
                "line of {} octets",
                line.len()
            );
        }
        // Removing the folds gives the body back, and only the folds were added.
        let unfolded: Vec<u8> = pieces
            .iter()
            .filter(|p| **p != FOLD)
            .flat_map(|p| p.iter().copied())
            .collect();
        assert_eq!(unfolded, body);
    }

    #[test]
    fn body_is_sent_from_the_stored_slice_without_copies() {
        let body = b"Subject: hi\r\n\r\n..dot-stuffed\r\n";
        let pieces: Vec<&[u8]> = body_pieces(body).collect();
        assert_eq!(pieces.len(), 1);
        assert!(std::ptr::eq(pieces[0], &body[..]));
        let long = format!("Subject: x\r\n\r\n{}\r\nend\r\n", "y".repeat(2500));
        let pieces: Vec<&[u8]> = body_pieces(long.as_bytes()).collect();
        assert_eq!(pieces.len(), 5, "three slices with two folds");
        assert_eq!(pieces[1], FOLD);
        assert_eq!(pieces[0].len(), "Subject: x\r\n\r\n".len() + 998);
        assert_folded_well(long.as_bytes());
        // A line exactly at the limit followed by CRLF is not folded.
        assert_folded_well(format!("{}\r\n{}", "z".repeat(998), "w".repeat(1997)).as_bytes());
        assert_eq!(body_pieces(b"").count(), 0);
    }

    #[test]
    fn data_terminator_table() {
        assert_eq!(data_terminator(b""), b".\r\n");
        assert_eq!(data_terminator(b"body\r\n"), b".\r\n");
        assert_eq!(data_terminator(b"body"), b"\r\n.\r\n");
        assert_eq!(data_terminator(b"body\r"), b"\r\n.\r\n");
        assert!(contains_8bit("é".as_bytes()));
        assert!(!contains_8bit(b"plain"));
    }

    proptest! {
        #[test]
        fn folding_keeps_every_line_short_and_the_body_intact(
            lines in proptest::collection::vec((0usize..3000, any::<bool>()), 0..6)
        ) {
            let mut body = Vec::new();
            for (len, crlf) in lines {
                body.extend(std::iter::repeat_n(b'q', len));
                if crlf { body.extend_from_slice(b"\r\n"); }
            }
            assert_folded_well(&body);
        }

        #[test]
        fn reply_parser_never_panics_and_split_points_do_not_matter(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            split in any::<usize>(),
        ) {
            let mut whole = ReplyParser::default();
            let _ = whole.push(&bytes);
            let mut all_at_once = Vec::new();
            while let Ok(Some(reply)) = whole.next_reply() { all_at_once.push(reply); }

            let split = split % (bytes.len() + 1);
            let mut parts = ReplyParser::default();
            let mut in_parts = Vec::new();
            for chunk in [&bytes[..split], &bytes[split..]] {
                let _ = parts.push(chunk);
                while let Ok(Some(reply)) = parts.next_reply() { in_parts.push(reply); }
            }
            // Splitting can only delay an error, never change a reply.
            prop_assert!(in_parts.starts_with(&all_at_once) || all_at_once.starts_with(&in_parts));
        }

        #[test]
        fn the_client_survives_any_server_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut client = SmtpClient::new("relay.example.test");
            client.received(b"220 hi\r\n250-x\r\n250 PIPELINING\r\n");
            let to = rcpts(&["a@b", "c@d"]);
            let _ = client.send_message(&message(&to));
            client.received(&bytes);
            client.timed_out();
            let actions: Vec<_> = std::iter::from_fn(|| client.poll_action()).collect();
            let done_count = actions.iter().filter(|a| matches!(a, ClientAction::MessageDone(o) if o.len() == 2)).count();
            prop_assert!(done_count <= 1 + usize::from(client.is_ready()));
            prop_assert!(client.is_closed() || client.is_ready());
        }
    }

    /// A client that tries STARTTLS, greeted and answered EHLO with `keywords`.
    fn opportunistic(keywords: &str) -> (SmtpClient, Vec<ClientAction>) {
        let mut client = SmtpClient::opportunistic_tls("relay.example.test");
        client.received(b"220 mx.far.test ESMTP\r\n");
        client.received(format!("250-mx.far.test\r\n{keywords}").as_bytes());
        let actions = std::iter::from_fn(|| client.poll_action()).collect();
        (client, actions)
    }

    #[test]
    fn starttls_when_offered_then_ehlo_again_over_tls() {
        let (mut client, actions) = opportunistic("250-PIPELINING\r\n250 STARTTLS\r\n");
        assert_eq!(
            actions,
            [send("EHLO relay.example.test\r\n"), send("STARTTLS\r\n")]
        );
        assert!(!client.is_ready());
        // A plain-text reply injected behind the 220 is never read as a reply.
        client.received(b"220 2.0.0 go ahead\r\n250 2.1.0 injected\r\n");
        assert_eq!(client.poll_action(), Some(ClientAction::StartTls));
        assert_eq!(client.poll_action(), None);
        assert_eq!(client.tls_status(), &TlsStatus::Pending);
        client.tls_established();
        assert_eq!(
            client.poll_action(),
            Some(send("EHLO relay.example.test\r\n"))
        );
        assert_eq!(client.capabilities(), &Capabilities::default());
        client.received(b"250-mx.far.test\r\n250 8BITMIME\r\n");
        assert_eq!(client.poll_action(), Some(ClientAction::Ready));
        assert!(client.capabilities().eight_bit_mime && !client.capabilities().pipelining);
        assert_eq!(client.tls_status(), &TlsStatus::Encrypted);
    }

    #[test]
    fn plain_text_when_starttls_is_not_offered_or_refused() {
        let (client, actions) = opportunistic("250 PIPELINING\r\n");
        assert_eq!(actions.last(), Some(&ClientAction::Ready));
        assert_eq!(client.tls_status(), &TlsStatus::NotOffered);

        let (mut client, _) = opportunistic("250 STARTTLS\r\n");
        client.received(b"454 4.7.0 TLS not available\r\n");
        assert_eq!(client.poll_action(), Some(ClientAction::Ready));
        assert_eq!(
            client.tls_status(),
            &TlsStatus::Refused(reply(454, "4.7.0 TLS not available"))
        );
        assert!(client.capabilities().starttls);
    }

    #[test]
    fn a_fallback_session_never_tries_starttls_and_says_why() {
        let mut client = SmtpClient::after_tls_failure("relay.example.test", "handshake failed");
        client.received(b"220 hi\r\n250-mx\r\n250 STARTTLS\r\n");
        let actions: Vec<_> = std::iter::from_fn(|| client.poll_action()).collect();
        assert_eq!(
            actions,
            [send("EHLO relay.example.test\r\n"), ClientAction::Ready]
        );
        assert_eq!(
            client.tls_status(),
            &TlsStatus::FellBack("handshake failed".into())
        );
        // tls_established out of turn changes nothing.
        client.tls_established();
        assert_eq!(client.poll_action(), None);
        assert!(client.is_ready());
    }
}
