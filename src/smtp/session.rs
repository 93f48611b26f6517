//! The SMTP session state machine: bytes in, replies and actions out, no I/O.
//!
//! The connection loop owns the socket and drives a session like this:
//!
//! ```text
//! loop {
//!     if !session.output().is_empty() { n = write(session.output()); session.output_consumed(n); continue; }
//!     match session.poll_action() {
//!         Action::StoreMessage(tx) => { append to the log, wait for the group commit;
//!                                       session.message_stored(Ok(queue_id) or Err(..)) }
//!         Action::Close => { close the socket (output has been written above) }
//!         Action::Idle if session.wants_input() => { n = read(session.input_buffer());
//!                                                   if n == 0 { session.peer_closed() }
//!                                                   else { session.input_filled(n) } }
//!         Action::Idle => { wait until output drains or the store answers }
//!     }
//! }
//! ```
//!
//! Zero-copy DATA: the loop reads straight into the session's input buffer; in DATA the
//! session hands whole filled buffers to the transaction body and continues in a fresh
//! one, so body bytes are never copied in user space (see [`Session::body_bytes_copied`]).

use std::mem;
use std::net::SocketAddr;
use std::rc::Rc;

use memchr::memchr;

use super::address::{ForwardPath, ReversePath};
use super::command::{self, BodyType, Command, CommandError, MailParams};
use super::data::{DataScanner, ScanOutcome, Stuffer, TERMINATOR_TAIL_BYTES};
use super::received::{self, Protocol, ReceivedFields};
use super::reply::{replies, write_line, EnhancedCode, Reply};
use crate::auth::{decode_sasl_plain, MAX_SASL_PLAIN_BASE64_LEN, MAX_SASL_PLAIN_FIELD_LEN};
use crate::routing::{Directory, Route, RouteRefusal};

/// Size of each input buffer in DATA (and BDAT). A full buffer becomes one piece of the
/// body, so this is also the granularity of log appends.
pub const DATA_BUFFER_BYTES: usize = 64 * 1024;

/// Size of the input buffer between messages: room for one AUTH line of RFC 4954's 12,288
/// octets (or a pipelined command group), small enough that ten thousand idle connections
/// cost about 160 MB, not the 640 MB that data-sized buffers would.
pub const COMMAND_BUFFER_BYTES: usize = 16 * 1024;

/// Reading pauses while more replies than this are unsent (RFC 2920 pipelining must not
/// grow memory without bound), and command processing pauses with it.
pub const MAX_UNSENT_OUTPUT_BYTES: usize = 64 * 1024;

/// Permanent failures (5xx) tolerated since the last accepted message before the session
/// answers 421 and closes: a client this confused is broken or probing. Refused recipients
/// count (a dictionary attack is nothing but 550s), and so the count starts over with each
/// message stored, as Postfix does: a sender whose every message has one stale address
/// keeps its connection however many messages it sends.
pub const MAX_ERRORS: u32 = 10;

/// The whole reply to a connection refused before any session exists (over
/// `max_connections` or `max_connections_per_ip`): the loop writes it and closes.
pub fn connection_refused(hostname: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    let text = format!("{hostname} Too many connections, try again later");
    write_line(
        &mut out,
        421,
        false,
        Some(EnhancedCode::new(4, 7, 0)),
        text.as_bytes(),
    );
    out
}

/// Everything a session needs from configuration; built once per shard from Config.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// Our name: the greeting, EHLO reply and Received headers.
    pub hostname: String,
    /// Largest message accepted; advertised as SIZE. Counted as RFC 1870 does, without the
    /// stuffing dots, over DATA and BDAT alike; stored bodies are stuffed, so they may take
    /// up to a third more (the log's record limit allows for it, see
    /// [`crate::envelope::max_message_record_bytes`]).
    pub max_message_size: u64,
    /// Recipients per transaction; beyond it RCPT gets 452 4.5.3.
    pub max_recipients: usize,
    /// Local domains and users, for routing at RCPT.
    pub directory: Rc<Directory>,
    /// `[tls]` is configured: EHLO offers STARTTLS on plain connections.
    pub starttls_available: bool,
}

/// What the loop knows about the client when it accepts the connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's address: logged and written into the Received header.
    pub addr: SocketAddr,
    /// The client is in `relay_networks`: it may send to remote domains.
    pub relay_allowed: bool,
    /// The connection is TLS (implicit TLS, or after STARTTLS).
    pub tls: bool,
    /// The listener demands AUTH before MAIL (`submission_listen`, `tls_listen`).
    pub auth_required: bool,
}

/// Why the loop could not store a message; decides the reply to the end of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StoreFailure {
    /// The fdatasync covering the record failed: 451 4.3.0.
    #[error("log sync failed")]
    SyncFailed,
    /// Below the free-space floor: 452 4.3.1.
    #[error("disk space below the floor")]
    DiskFull,
    /// The server is draining: 421 4.3.2 and the connection closes.
    #[error("shutting down")]
    ShuttingDown,
    /// The message does not fit a log record: 552 5.3.4, as for any message over the size
    /// limit, since retrying cannot help (a 4xx would have the client retry until its
    /// queue lifetime ends).
    #[error("message too large for a log record")]
    TooBig,
}

/// One accepted recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The address as the client wrote it (or `Postmaster`).
    pub address: String,
    /// Where the copy goes, decided at RCPT time.
    pub route: Route,
}

/// A complete message for the loop to make durable.
#[derive(Debug)]
pub struct Transaction {
    /// The client's EHLO/HELO argument, for the Received header.
    pub helo: String,
    /// The client's address.
    pub peer: SocketAddr,
    /// EHLO (true) or HELO (false), for the Received WITH clause.
    pub esmtp: bool,
    /// The connection was TLS, for the Received WITH clause.
    pub tls: bool,
    /// The client had authenticated (SMTP AUTH), for the Received WITH clause.
    pub authenticated: bool,
    /// The reverse-path as received; "" is the null path `<>`.
    pub mail_from: String,
    /// Accepted recipients in RCPT order, each with its route.
    pub recipients: Vec<Recipient>,
    /// The message exactly as it travelled: CRLF line ends, dot-stuffed, ending with the
    /// CRLF before `.<CRLF>` (terminator excluded). For DATA these are the very buffers
    /// the loop read into, moved, not copied; BDAT chunks arrive unstuffed and are stuffed
    /// once while being received, so every stored body has one format.
    pub body: Vec<Vec<u8>>,
    /// Total length of `body`.
    pub body_size_bytes: u64,
    /// The client declared BODY=8BITMIME (relay must find a hop that offers it).
    pub eight_bit: bool,
    /// The client declared SMTPUTF8 (relay must find a hop that offers it).
    pub smtputf8: bool,
}

impl Transaction {
    /// The Received header for this message, to store in front of the body.
    pub fn received_header(&self, hostname: &str, queue_id: &str, unix_time_secs: i64) -> Vec<u8> {
        let recipient = match self.recipients.as_slice() {
            [only] => Some(only.address.as_str()),
            _ => None,
        };
        received::build(&ReceivedFields {
            helo: &self.helo,
            peer_ip: self.peer.ip(),
            hostname,
            protocol: Protocol::new(self.esmtp, self.tls, self.authenticated, self.smtputf8),
            queue_id,
            recipient,
            unix_time_secs,
        })
    }
}

/// What the loop must do next.
#[derive(Debug)]
pub enum Action {
    /// Nothing until more input arrives (or output drains, or the store answers).
    Idle,
    /// Append this message to the log; when its group commit completes (or fails) call
    /// [`Session::message_stored`]. No reply is sent and no later command runs until then.
    StoreMessage(Transaction),
    /// Write what is left in [`Session::output`], then close the connection: after
    /// QUIT, 421, too many errors, an HTTP request, or the peer closing.
    Close,
    /// The client sent STARTTLS and nothing behind it: write [`Session::output`] (the 220),
    /// run the TLS handshake on the socket without reading plain text first, then call
    /// [`Session::tls_started`]; if the handshake fails, close the connection.
    StartTls,
    /// Verify these credentials off the executor (argon2 is slow), delay a failure by the
    /// client address's throttle, then call [`Session::auth_checked`].
    Authenticate {
        /// The user name (the full mail address) as the client sent it.
        user: String,
        /// The clear-text password.
        password: String,
    },
}

/// What [`Session::peer_closed`] threw away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discarded {
    /// Recipients accepted in the abandoned transaction.
    pub recipients: usize,
    /// Body bytes received before the peer left.
    pub body_bytes: u64,
}

/// The client's greeting.
#[derive(Debug, Clone)]
struct Helo {
    /// Its argument.
    name: String,
    /// EHLO rather than HELO: parameters are allowed.
    esmtp: bool,
}

/// An open mail transaction (after MAIL).
#[derive(Debug)]
struct Envelope {
    /// Reverse-path as received; "" for `<>`.
    mail_from: String,
    /// MAIL parameters.
    params: MailParams,
    /// Accepted recipients.
    recipients: Vec<Recipient>,
    /// BDAT chunks received so far; `None` until the first BDAT.
    bdat: Option<BdatBody>,
}

/// The message assembled from BDAT chunks.
#[derive(Debug)]
struct BdatBody {
    /// Dot-stuffing and bare CR/LF detection across chunks.
    stuffer: Stuffer,
    /// Stuffed body pieces.
    body: Vec<Vec<u8>>,
    /// Octets received as sent (unstuffed), for the size limit.
    received_bytes: u64,
}

/// DATA in progress.
#[derive(Debug)]
struct DataBody {
    /// Finds the terminator, flags bare CR/LF.
    scanner: DataScanner,
    /// Filled input buffers, moved here whole.
    body: Vec<Vec<u8>>,
    /// Bytes scanned so far (in earlier buffers and in the current one up to `consumed`).
    scanned_bytes: u64,
    /// Over `max_message_size`: keep scanning for the end but store nothing.
    too_big: bool,
}

/// A BDAT chunk being read.
#[derive(Debug)]
struct BdatChunk {
    /// Octets of the chunk still to come.
    remaining_bytes: u64,
    /// Octets in the whole chunk, for the reply.
    size_bytes: u64,
    /// This chunk ends the message.
    last: bool,
    /// Set when the chunk is being thrown away; the reply to send at its end.
    refusal: Option<Reply>,
}

/// Where a SASL exchange stands after a 334 challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SaslStep {
    /// AUTH PLAIN without an initial response: the next line is the PLAIN message.
    PlainResponse,
    /// AUTH LOGIN: the next line is the base64 user name.
    LoginUser,
    /// AUTH LOGIN: the next line is the base64 password for this user.
    LoginPassword {
        /// The decoded user name.
        user: String,
    },
}

/// Which receiver the next input goes to.
#[derive(Debug)]
enum Phase {
    /// Command lines.
    Command,
    /// A command line over 512 octets: drop bytes up to its LF, then answer 500 5.5.2.
    DiscardingLongLine,
    /// Message data after DATA's 354.
    Data(DataBody),
    /// The octets of a BDAT chunk.
    Bdat(BdatChunk),
    /// A StoreMessage action is out; nothing runs until `message_stored`.
    AwaitingStore,
    /// A 334 challenge is out: the next line is a SASL response, not a command.
    Sasl(SaslStep),
    /// An Authenticate action is out; nothing runs until `auth_checked`.
    AwaitingAuth,
    /// A StartTls action is out; nothing runs until `tls_started`.
    AwaitingTls,
    /// Closing or closed: no more input is processed.
    Closed,
}

/// One SMTP server session (one connection).
pub struct Session {
    /// Shared configuration.
    params: Rc<SessionParams>,
    /// The client.
    peer: PeerInfo,
    /// Current input buffer: `COMMAND_BUFFER_BYTES` between messages, `DATA_BUFFER_BYTES`
    /// in DATA/BDAT; always initialised, so the loop can read into its spare part directly.
    input: Vec<u8>,
    /// Bytes of `input` holding received data.
    filled: usize,
    /// Bytes of `input` already processed.
    consumed: usize,
    /// Replies not yet written.
    output: Vec<u8>,
    /// Bytes at the front of `output` already written.
    output_sent: usize,
    /// Which receiver runs next.
    phase: Phase,
    /// Set by EHLO/HELO.
    helo: Option<Helo>,
    /// Set by MAIL, cleared by the end of the transaction or RSET.
    envelope: Option<Envelope>,
    /// Permanent failures since the last accepted message.
    errors: u32,
    /// A message ready for the loop.
    pending_store: Option<Transaction>,
    /// Credentials ready for the loop to verify; the user name is kept until the answer.
    pending_auth: Option<(String, String)>,
    /// The user whose credentials are being verified.
    auth_candidate: Option<String>,
    /// The authenticated user's address, after a successful AUTH.
    authenticated: Option<String>,
    /// A StartTls action is ready for the loop.
    pending_tls: bool,
    /// Body bytes copied in user space (kept in every build: one add per copy).
    body_bytes_copied: u64,
}

fn fresh_buffer(size_bytes: usize) -> Vec<u8> {
    vec![0; size_bytes]
}

impl Session {
    /// Starts a session; the 220 greeting is queued as output.
    pub fn new(params: Rc<SessionParams>, peer: PeerInfo) -> Session {
        let mut output = Vec::with_capacity(1024);
        let greeting = format!("{} ESMTP ringmail", params.hostname);
        write_line(&mut output, 220, false, None, greeting.as_bytes());
        Session {
            params,
            peer,
            input: fresh_buffer(COMMAND_BUFFER_BYTES),
            filled: 0,
            consumed: 0,
            output,
            output_sent: 0,
            phase: Phase::Command,
            helo: None,
            envelope: None,
            errors: 0,
            pending_store: None,
            pending_auth: None,
            auth_candidate: None,
            authenticated: None,
            pending_tls: false,
            body_bytes_copied: 0,
        }
    }

    /// Spare space to read into. Empty when the session cannot take input now (see
    /// [`Session::wants_input`]).
    pub fn input_buffer(&mut self) -> &mut [u8] {
        if self.filled == self.input.len() && self.consumed > 0 && !self.in_body() {
            self.compact_input();
        }
        &mut self.input[self.filled..]
    }

    /// Reports `n` bytes read into [`Session::input_buffer`] and processes everything
    /// buffered (PIPELINING), stopping early only for a store, a close or full output.
    pub fn input_filled(&mut self, n: usize) {
        if n > 0 && matches!(self.phase, Phase::AwaitingTls) {
            // Plain text between STARTTLS and the handshake is never run (RFC 3207 §5).
            self.close();
            return;
        }
        self.filled = (self.filled + n).min(self.input.len());
        self.process();
    }

    /// The next action for the loop.
    pub fn poll_action(&mut self) -> Action {
        if let Some(transaction) = self.pending_store.take() {
            return Action::StoreMessage(transaction);
        }
        if let Some((user, password)) = self.pending_auth.take() {
            return Action::Authenticate { user, password };
        }
        if self.pending_tls && !matches!(self.phase, Phase::Closed) {
            self.pending_tls = false;
            return Action::StartTls;
        }
        match self.phase {
            Phase::Closed => Action::Close,
            _ => Action::Idle,
        }
    }

    /// Replies to write, in one write.
    pub fn output(&self) -> &[u8] {
        &self.output[self.output_sent..]
    }

    /// Reports `n` bytes of [`Session::output`] written; processing resumes if it had
    /// paused for output.
    pub fn output_consumed(&mut self, n: usize) {
        self.output_sent = (self.output_sent + n).min(self.output.len());
        if self.output_sent == self.output.len() {
            self.output.clear();
            self.output_sent = 0;
        }
        self.process();
    }

    /// Completion of [`Action::StoreMessage`]: answers the end of data and resumes the
    /// pipelined commands buffered behind it.
    pub fn message_stored(&mut self, result: Result<String, StoreFailure>) {
        if !matches!(self.phase, Phase::AwaitingStore) {
            // The peer left meanwhile: nobody to answer.
            return;
        }
        self.phase = Phase::Command;
        match result {
            Ok(queue_id) => {
                self.errors = 0;
                let text = format!("Ok: queued as {queue_id}");
                write_line(
                    &mut self.output,
                    250,
                    false,
                    Some(EnhancedCode::new(2, 0, 0)),
                    text.as_bytes(),
                );
            }
            Err(StoreFailure::SyncFailed) => self.reply(replies::STORE_SYNC_FAILED),
            Err(StoreFailure::DiskFull) => self.reply(replies::STORE_DISK_FULL),
            Err(StoreFailure::TooBig) => self.reply(replies::MESSAGE_TOO_BIG),
            Err(StoreFailure::ShuttingDown) => {
                self.reply(replies::SHUTTING_DOWN);
                self.phase = Phase::Closed;
            }
        }
        self.process();
    }

    /// Completion of [`Action::Authenticate`]: `true` when the password matched. The loop
    /// has already waited out the throttle's delay for a failure.
    pub fn auth_checked(&mut self, ok: bool) {
        if !matches!(self.phase, Phase::AwaitingAuth) {
            return;
        }
        self.phase = Phase::Command;
        let user = self.auth_candidate.take();
        if ok {
            self.authenticated = user;
            self.reply(replies::AUTH_SUCCEEDED);
        } else {
            self.reply(replies::AUTH_FAILED);
        }
        self.process();
    }

    /// Completion of [`Action::StartTls`]: the handshake succeeded. The session starts over
    /// as RFC 3207 §4.2 demands: no greeting, EHLO needed again, and nothing learnt before
    /// the handshake (EHLO name, AUTH, envelope) survives.
    pub fn tls_started(&mut self) {
        if !matches!(self.phase, Phase::AwaitingTls) {
            return;
        }
        self.peer.tls = true;
        self.helo = None;
        self.envelope = None;
        self.authenticated = None;
        self.auth_candidate = None;
        self.pending_auth = None;
        self.filled = 0;
        self.consumed = 0;
        self.phase = Phase::Command;
    }

    /// The user this session authenticated as, if any.
    pub fn authenticated_user(&self) -> Option<&str> {
        self.authenticated.as_deref()
    }

    /// True when the loop should read: not closing, replies below 64 KiB, and room in
    /// the input buffer.
    pub fn wants_input(&self) -> bool {
        !matches!(self.phase, Phase::Closed | Phase::AwaitingTls)
            && self.output().len() <= MAX_UNSENT_OUTPUT_BYTES
            && (self.filled < self.input.len() || (self.consumed > 0 && !self.in_body()))
    }

    /// The peer closed its side (or the loop gave up on it: timeout, error). Returns what
    /// was thrown away: an unfinished transaction is never stored, not even in part. A
    /// store already handed out completes normally; its reply is dropped.
    pub fn peer_closed(&mut self) -> Option<Discarded> {
        let body_bytes = match &self.phase {
            Phase::Data(data) => data.scanned_bytes,
            _ => 0,
        };
        self.phase = Phase::Closed;
        self.envelope.take().map(|envelope| Discarded {
            recipients: envelope.recipients.len(),
            body_bytes: body_bytes + envelope.bdat.map_or(0, |b| b.received_bytes),
        })
    }

    /// The loop's idle timer (or minimum data rate) fired: queues 421 4.4.2 and closes.
    /// Returns the unfinished transaction thrown away, as [`Session::peer_closed`] does.
    pub fn timed_out(&mut self) -> Option<Discarded> {
        // A rejection like any other: one line at info, as refuse_and_close writes.
        if matches!(self.phase, Phase::Closed) {
            return None;
        }
        tracing::info!(
            client = %self.peer.addr,
            code = replies::TIMEOUT.code,
            reason = replies::TIMEOUT.text,
            "smtp refused and closing"
        );
        self.end_with(replies::TIMEOUT)
    }

    /// The server is draining: queues 421 4.3.2 and closes. The loop calls this when the
    /// session is between transactions, or at once for a body held back by the shard's
    /// DATA-bytes cap; an unfinished transaction is thrown away, never half-stored.
    pub fn shutting_down(&mut self) -> Option<Discarded> {
        self.end_with(replies::SHUTTING_DOWN)
    }

    /// True while message bytes (DATA or a BDAT chunk) are arriving.
    pub fn receiving_body(&self) -> bool {
        matches!(self.phase, Phase::Data(_) | Phase::Bdat(_))
    }

    /// True while a transaction is open (after MAIL, until its end or RSET) or a store is
    /// in flight: the loop's drain waits for these.
    pub fn in_transaction(&self) -> bool {
        self.envelope.is_some()
            || matches!(
                self.phase,
                Phase::Data(_) | Phase::Bdat(_) | Phase::AwaitingStore
            )
    }

    fn end_with(&mut self, reply: Reply) -> Option<Discarded> {
        if matches!(self.phase, Phase::Closed) {
            return None;
        }
        let discarded = self.peer_closed();
        reply.write_to(&mut self.output);
        discarded
    }

    /// Body bytes copied in user space so far: 0 for DATA unless the client sent body
    /// bytes in the same packet as the DATA command; every byte for BDAT (stuffing).
    pub fn body_bytes_copied(&self) -> u64 {
        self.body_bytes_copied
    }

    /// True from the start of a message body to its end: in DATA after 354, inside a BDAT
    /// chunk, and between the chunks of a BDAT transaction, whose next read usually carries
    /// chunk octets right behind the BDAT command. The loop's minimum data rate applies over
    /// this whole span, so a body sent as many tiny chunks is judged as one transfer (and so
    /// does the DATA-bytes cap, see [`Session::next_read_may_hold_body`]).
    pub fn in_body_transfer(&self) -> bool {
        self.receiving_body() || self.envelope.as_ref().is_some_and(|e| e.bdat.is_some())
    }

    /// True while the next read may bring body bytes this session keeps: in a DATA body or
    /// a BDAT transaction, unless the body is already being thrown away (too big, a bare line
    /// ending), whose bytes are dropped as they come. Only such reads wait for room under
    /// the shard's DATA-bytes cap.
    pub fn next_read_may_hold_body(&self) -> bool {
        match &self.phase {
            Phase::Data(data) => !data.too_big && !data.scanner.saw_bare_line_ending(),
            Phase::Bdat(chunk) => chunk.refusal.is_none(),
            _ => self.in_body_transfer(),
        }
    }

    /// Body bytes held in memory that may still become a record: an unfinished DATA body
    /// (whole buffers and the partly filled one), the BDAT chunks so far, and a message
    /// handed out as [`Action::StoreMessage`] but not yet taken by the loop. Bytes of a body
    /// already being thrown away (too big, bare line ending) are not counted. The loop sums
    /// these per shard to cap DATA not yet durable.
    pub fn buffered_body_bytes(&self) -> u64 {
        let pieces = |body: &[Vec<u8>]| body.iter().map(|b| b.len() as u64).sum::<u64>();
        let data = match &self.phase {
            Phase::Data(data) if !data.too_big && !data.scanner.saw_bare_line_ending() => {
                // A DATA body starts at offset 0 of its buffer: everything filled is body.
                pieces(&data.body) + self.filled as u64
            }
            _ => 0,
        };
        let bdat = self
            .envelope
            .as_ref()
            .and_then(|e| e.bdat.as_ref())
            .map_or(0, |b| pieces(&b.body));
        let pending = self.pending_store.as_ref().map_or(0, |t| pieces(&t.body));
        data + bdat + pending
    }

    fn in_body(&self) -> bool {
        matches!(self.phase, Phase::Data(_))
    }

    /// Moves unprocessed bytes to the front of the input buffer. Only outside DATA, where
    /// what is moved is at most one partial command line.
    fn compact_input(&mut self) {
        self.input.copy_within(self.consumed..self.filled, 0);
        self.filled -= self.consumed;
        self.consumed = 0;
    }

    /// Queues a reply, counting permanent failures towards [`MAX_ERRORS`]. Every refusal
    /// is logged once here (accepted messages are logged by the loop, which knows the
    /// queue id and shard).
    fn reply(&mut self, reply: Reply) {
        reply.write_to(&mut self.output);
        if reply.is_failure() {
            tracing::info!(
                client = %self.peer.addr,
                code = reply.code,
                status = %reply.enhanced.map(|e| e.to_string()).unwrap_or_default(),
                reason = reply.text,
                "smtp refused"
            );
        }
        if reply.is_permanent_failure() {
            self.errors += 1;
            if self.errors >= MAX_ERRORS {
                tracing::info!(client = %self.peer.addr, "smtp closing after too many errors");
                replies::TOO_MANY_ERRORS.write_to(&mut self.output);
                self.close();
            }
        }
    }

    /// Someone pointed a browser or proxy at us. Not counted as an error: refused and closed
    /// at once, before anything behind the request line can run as a command.
    fn refuse_http(&mut self) {
        tracing::info!(client = %self.peer.addr, "smtp refused an HTTP request");
        replies::HTTP_REFUSED.write_to(&mut self.output);
        self.close();
    }

    /// Queues a refusal and closes, outside the error count: for input after which the
    /// session can no longer tell commands from message bytes.
    fn refuse_and_close(&mut self, reply: Reply) {
        tracing::info!(
            client = %self.peer.addr,
            code = reply.code,
            reason = reply.text,
            "smtp refused and closing"
        );
        reply.write_to(&mut self.output);
        self.close();
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.envelope = None;
    }

    /// Runs receivers over buffered input until it is used up or something must wait.
    fn process(&mut self) {
        loop {
            if self.output().len() > MAX_UNSENT_OUTPUT_BYTES
                || self.pending_store.is_some()
                || self.pending_auth.is_some()
            {
                return;
            }
            let progressed = match self.phase {
                Phase::Command | Phase::Sasl(_) => self.process_command_line(),
                Phase::DiscardingLongLine => self.discard_long_line(),
                Phase::Data(_) => self.process_data(),
                Phase::Bdat(_) => self.process_bdat(),
                Phase::AwaitingStore | Phase::AwaitingAuth | Phase::AwaitingTls | Phase::Closed => {
                    false
                }
            };
            if !progressed {
                break;
            }
        }
        if self.consumed == self.filled && !matches!(self.phase, Phase::Data(_)) {
            self.consumed = 0;
            self.filled = 0;
            if matches!(self.phase, Phase::Command) && self.input.len() > COMMAND_BUFFER_BYTES {
                // Back between messages (after BDAT or a refused DATA): give the data
                // buffer back rather than hold it while idle.
                self.input = fresh_buffer(COMMAND_BUFFER_BYTES);
            }
        } else if matches!(
            self.phase,
            Phase::Command | Phase::DiscardingLongLine | Phase::Sasl(_)
        ) && self.input.len() - self.filled < command::MAX_AUTH_LINE_BYTES
        {
            // Keep room for a whole command line behind a partial one.
            self.compact_input();
        }
    }

    /// Handles one complete command line if one is buffered; false if none is.
    fn process_command_line(&mut self) -> bool {
        let window = &self.input[self.consumed..self.filled];
        let max_line_bytes = self.max_line_bytes(window);
        // Only a line that cannot be parsed is checked for an HTTP request line here (a
        // parsed one is checked by the parser): the check stays off the common path.
        let in_command = matches!(self.phase, Phase::Command);
        let Some(lf) = memchr(b'\n', window) else {
            if window.len() >= max_line_bytes {
                if in_command && command::starts_http_request(window) {
                    self.refuse_http();
                    return true;
                }
                if command::starts_bdat(window) {
                    // A chunk of unknown size follows: nothing after this is a command.
                    self.refuse_and_close(replies::LINE_TOO_LONG);
                    return true;
                }
                // Drop what we have; the rest goes as it arrives.
                self.consumed = self.filled;
                self.phase = Phase::DiscardingLongLine;
                return true;
            }
            return false;
        };
        let line_len = lf + 1;
        let start = self.consumed;
        self.consumed += line_len;
        let line = &self.input[start..start + line_len];
        // A BDAT line refused for its framing still announces a chunk whose size we will
        // not trust: close rather than run the chunk as commands.
        let is_bdat = in_command && command::starts_bdat(line);
        if line_len > max_line_bytes {
            if in_command && command::starts_http_request(line) {
                self.refuse_http();
                return true;
            }
            if is_bdat {
                self.refuse_and_close(replies::LINE_TOO_LONG);
                return true;
            }
            if matches!(self.phase, Phase::Sasl(_)) {
                self.phase = Phase::Command;
            }
            self.reply(replies::LINE_TOO_LONG);
            return true;
        }
        // Exactly one CR, right before the LF: anything else is a bare CR or LF.
        let content = &line[..line_len - 1];
        if content.last() != Some(&b'\r') || memchr(b'\r', &content[..content.len() - 1]).is_some()
        {
            if in_command && command::starts_http_request(line) {
                self.refuse_http();
                return true;
            }
            if is_bdat {
                self.refuse_and_close(replies::BARE_LINE_ENDING);
            } else {
                self.reply(replies::BARE_LINE_ENDING);
            }
            return true;
        }
        // Take the buffer out so the parsed command can borrow it while `self` changes.
        let input = mem::take(&mut self.input);
        let content = &input[start..start + line_len - 2];
        if let Phase::Sasl(step) = &self.phase {
            let step = step.clone();
            self.sasl_response(step, content);
        } else {
            let parsed = command::parse(content);
            self.handle(parsed);
        }
        self.input = input;
        let body_follows = match &self.phase {
            Phase::Data(_) => true,
            Phase::Bdat(chunk) => {
                self.input.len() < DATA_BUFFER_BYTES
                    && chunk.remaining_bytes > (self.input.len() - self.consumed) as u64
            }
            _ => false,
        };
        if body_follows {
            self.move_to_data_buffer();
        }
        true
    }

    /// DATA bodies start at offset 0 of a data buffer so that whole buffers can become
    /// body pieces, and big BDAT chunks are read in data-sized pieces. Body bytes the
    /// client sent right behind the command are moved (and counted).
    fn move_to_data_buffer(&mut self) {
        let early = &self.input[self.consumed..self.filled];
        self.body_bytes_copied += early.len() as u64;
        let mut data_buffer = fresh_buffer(DATA_BUFFER_BYTES);
        data_buffer[..early.len()].copy_from_slice(early);
        self.filled = early.len();
        self.consumed = 0;
        self.input = data_buffer;
    }

    /// The longest line allowed at the front of `window`: AUTH commands and SASL responses
    /// get RFC 4954's 12,288 octets, every other command RFC 5321's 512.
    fn max_line_bytes(&self, window: &[u8]) -> usize {
        let auth_line = matches!(self.phase, Phase::Sasl(_))
            || window
                .get(..5)
                .is_some_and(|verb| verb.eq_ignore_ascii_case(b"AUTH "));
        if auth_line {
            command::MAX_AUTH_LINE_BYTES
        } else {
            command::MAX_COMMAND_LINE_BYTES
        }
    }

    fn discard_long_line(&mut self) -> bool {
        let window = &self.input[self.consumed..self.filled];
        match memchr(b'\n', window) {
            None => {
                self.consumed = self.filled;
                false
            }
            Some(lf) => {
                self.consumed += lf + 1;
                self.phase = Phase::Command;
                self.reply(replies::LINE_TOO_LONG);
                true
            }
        }
    }

    fn handle(&mut self, parsed: Result<Command<'_>, CommandError>) {
        let command = match parsed {
            Ok(command) => command,
            Err(CommandError::Http) => return self.refuse_http(),
            Err(CommandError::BdatSyntax { size_bytes }) => {
                // The chunk comes anyway: skip it, then refuse, ending the transaction
                // like any refused chunk.
                return self.start_chunk(size_bytes, false, Some(replies::SYNTAX_ERROR));
            }
            Err(CommandError::BdatSizeUnreadable) => {
                return self.refuse_and_close(replies::BDAT_SIZE_UNREADABLE)
            }
            Err(error) => return self.reply(error.reply()),
        };
        match command {
            Command::Ehlo { domain } => self.ehlo(domain, true),
            Command::Helo { domain } => self.ehlo(domain, false),
            Command::Mail { from, params } => self.mail(from, params),
            Command::Rcpt { to } => self.rcpt(to),
            Command::Data => self.data(),
            Command::Bdat { size_bytes, last } => self.bdat(size_bytes, last),
            Command::Rset => {
                self.envelope = None;
                self.reply(replies::OK);
            }
            Command::Noop => self.reply(replies::OK),
            Command::Quit => {
                replies::BYE.write_to(&mut self.output);
                self.close();
            }
            Command::Vrfy => self.reply(replies::CANNOT_VRFY),
            Command::Help => self.reply(replies::HELP),
            Command::StartTls => self.start_tls(),
            Command::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response),
            Command::NotImplemented => self.reply(replies::NOT_IMPLEMENTED),
        }
    }

    /// AUTH is offered only where a password cannot be sniffed: TLS or loopback (SPEC §3).
    fn auth_offered(&self) -> bool {
        self.peer.tls || is_loopback(self.peer.addr.ip())
    }

    fn start_tls(&mut self) {
        if !self.params.starttls_available {
            return self.reply(replies::NOT_IMPLEMENTED);
        }
        if self.peer.tls {
            self.reply(replies::TLS_ALREADY_ACTIVE);
            return self.close();
        }
        if self.consumed != self.filled {
            // CVE-2011-0411: whatever follows STARTTLS in plain text would otherwise run as if
            // it had come over TLS. Never run it; close.
            self.reply(replies::DATA_AFTER_STARTTLS);
            return self.close();
        }
        self.reply(replies::READY_TO_START_TLS);
        self.phase = Phase::AwaitingTls;
        self.pending_tls = true;
    }

    fn auth(&mut self, mechanism: &str, initial_response: Option<&str>) {
        if !self.auth_offered() {
            return self.reply(if self.params.starttls_available {
                replies::NEED_STARTTLS
            } else {
                replies::AUTH_NOT_AVAILABLE
            });
        }
        if !self.helo.as_ref().is_some_and(|h| h.esmtp) {
            return self.reply(replies::NEED_HELO);
        }
        if self.authenticated.is_some() {
            return self.reply(replies::ALREADY_AUTHENTICATED);
        }
        if self.envelope.is_some() {
            return self.reply(replies::AUTH_IN_TRANSACTION);
        }
        let initial = initial_response.map(|r| r.as_bytes());
        if mechanism.eq_ignore_ascii_case("PLAIN") {
            match initial {
                Some(response) => self.sasl_response(SaslStep::PlainResponse, response),
                None => self.challenge(SaslStep::PlainResponse, b""),
            }
        } else if mechanism.eq_ignore_ascii_case("LOGIN") {
            match initial {
                Some(response) => self.sasl_response(SaslStep::LoginUser, response),
                // "Username:"
                None => self.challenge(SaslStep::LoginUser, b"VXNlcm5hbWU6"),
            }
        } else {
            self.reply(replies::UNKNOWN_MECHANISM);
        }
    }

    /// Sends a 334 challenge; the next line is the client's response.
    fn challenge(&mut self, step: SaslStep, text: &[u8]) {
        write_line(&mut self.output, 334, false, None, text);
        self.phase = Phase::Sasl(step);
    }

    /// One SASL response line (initial response or answer to a 334).
    fn sasl_response(&mut self, step: SaslStep, line: &[u8]) {
        self.phase = Phase::Command;
        if line == b"*" {
            return self.reply(replies::AUTH_CANCELLED);
        }
        let Ok(text) = std::str::from_utf8(line) else {
            return self.reply(replies::AUTH_MALFORMED);
        };
        match step {
            SaslStep::PlainResponse => match decode_sasl_plain(text) {
                Ok(plain) => self.verify(plain.authcid, plain.password),
                Err(_) => self.reply(replies::AUTH_MALFORMED),
            },
            SaslStep::LoginUser => match decode_login_field(text) {
                // "Password:"
                Some(user) => self.challenge(SaslStep::LoginPassword { user }, b"UGFzc3dvcmQ6"),
                None => self.reply(replies::AUTH_MALFORMED),
            },
            SaslStep::LoginPassword { user } => match decode_login_field(text) {
                Some(password) => self.verify(user, password),
                None => self.reply(replies::AUTH_MALFORMED),
            },
        }
    }

    /// Hands the credentials to the loop; nothing runs until [`Session::auth_checked`].
    fn verify(&mut self, user: String, password: String) {
        self.auth_candidate = Some(user.clone());
        self.pending_auth = Some((user, password));
        self.phase = Phase::AwaitingAuth;
    }

    fn ehlo(&mut self, domain: &str, esmtp: bool) {
        // EHLO/HELO reset any transaction (RFC 5321 §4.1.4).
        self.envelope = None;
        self.helo = Some(Helo {
            name: domain.to_string(),
            esmtp,
        });
        let hostname = self.params.hostname.clone();
        if !esmtp {
            write_line(&mut self.output, 250, false, None, hostname.as_bytes());
            return;
        }
        let size = format!("SIZE {}", self.params.max_message_size);
        let starttls = self.params.starttls_available && !self.peer.tls;
        let auth = self.auth_offered();
        let lines: [Option<&[u8]>; 9] = [
            Some(hostname.as_bytes()),
            Some(b"PIPELINING"),
            Some(size.as_bytes()),
            Some(b"8BITMIME"),
            Some(b"ENHANCEDSTATUSCODES"),
            Some(b"CHUNKING"),
            Some(b"SMTPUTF8"),
            starttls.then_some(b"STARTTLS".as_slice()),
            auth.then_some(b"AUTH PLAIN LOGIN".as_slice()),
        ];
        let lines: Vec<&[u8]> = lines.into_iter().flatten().collect();
        for (i, line) in lines.iter().enumerate() {
            write_line(&mut self.output, 250, i + 1 < lines.len(), None, line);
        }
    }

    fn mail(&mut self, from: ReversePath<'_>, params: MailParams) {
        let Some(helo) = &self.helo else {
            return self.reply(replies::NEED_HELO);
        };
        if self.peer.auth_required && self.authenticated.is_none() {
            return self.reply(if self.auth_offered() || !self.params.starttls_available {
                replies::AUTH_REQUIRED
            } else {
                replies::NEED_STARTTLS
            });
        }
        if self.envelope.is_some() {
            return self.reply(replies::NESTED_MAIL);
        }
        if !helo.esmtp && params != MailParams::default() {
            return self.reply(replies::UNKNOWN_PARAMETER);
        }
        if params.size_bytes.unwrap_or(0) > self.params.max_message_size {
            return self.reply(replies::MESSAGE_TOO_BIG);
        }
        let mail_from = match from {
            ReversePath::Null => String::new(),
            ReversePath::Mailbox(mailbox) => {
                if mailbox.non_ascii && !params.smtputf8 {
                    return self.reply(replies::NEED_SMTPUTF8);
                }
                mailbox.text.to_string()
            }
        };
        if let Some(user) = &self.authenticated {
            // An authenticated client sends as itself only: no forged senders from a
            // stolen or shared password.
            if !mail_from.eq_ignore_ascii_case(user) {
                return self.reply(replies::SENDER_NOT_OWNED);
            }
        }
        self.envelope = Some(Envelope {
            mail_from,
            params,
            recipients: Vec::new(),
            bdat: None,
        });
        self.reply(replies::SENDER_OK);
    }

    fn rcpt(&mut self, to: ForwardPath<'_>) {
        let Some(envelope) = &self.envelope else {
            return self.reply(replies::NEED_MAIL);
        };
        if envelope.recipients.len() >= self.params.max_recipients {
            return self.reply(replies::TOO_MANY_RECIPIENTS);
        }
        let address = match to {
            ForwardPath::Postmaster(text) => text,
            ForwardPath::Mailbox(mailbox) => {
                if mailbox.non_ascii && !envelope.params.smtputf8 {
                    return self.reply(replies::NEED_SMTPUTF8);
                }
                mailbox.text
            }
        };
        let may_relay = self.peer.relay_allowed || self.authenticated.is_some();
        let route = match self.params.directory.route(address, may_relay) {
            Ok(route) => route,
            Err(RouteRefusal::UnknownUser) => return self.reply(replies::UNKNOWN_USER),
            Err(RouteRefusal::RelayDenied) => return self.reply(replies::RELAY_DENIED),
        };
        let Some(envelope) = &mut self.envelope else {
            return;
        };
        // The same mailbox twice gets one copy; the client still hears 250.
        let duplicate = matches!(route, Route::Local { .. })
            && envelope.recipients.iter().any(|r| r.route == route);
        if !duplicate {
            envelope.recipients.push(Recipient {
                address: address.to_string(),
                route,
            });
        }
        self.reply(replies::RECIPIENT_OK);
    }

    /// The refusal for DATA/BDAT without a complete envelope, if any.
    fn envelope_refusal(&self) -> Option<Reply> {
        match &self.envelope {
            None => Some(replies::NEED_MAIL),
            Some(envelope) if envelope.recipients.is_empty() => Some(replies::NO_VALID_RECIPIENTS),
            Some(_) => None,
        }
    }

    fn data(&mut self) {
        if let Some(refusal) = self.envelope_refusal() {
            return self.reply(refusal);
        }
        if self.envelope.as_ref().is_some_and(|e| e.bdat.is_some()) {
            return self.reply(replies::DATA_AFTER_BDAT);
        }
        replies::START_DATA.write_to(&mut self.output);
        self.phase = Phase::Data(DataBody {
            scanner: DataScanner::new(),
            body: Vec::new(),
            scanned_bytes: 0,
            too_big: false,
        });
    }

    fn bdat(&mut self, size_bytes: u64, last: bool) {
        let refusal = self.envelope_refusal();
        self.start_chunk(size_bytes, last, refusal);
    }

    /// Starts reading a BDAT chunk; with a `refusal` the chunk is read and dropped and the
    /// refusal answers it.
    fn start_chunk(&mut self, size_bytes: u64, last: bool, refusal: Option<Reply>) {
        if refusal.is_none() {
            if let Some(envelope) = &mut self.envelope {
                envelope.bdat.get_or_insert_with(|| BdatBody {
                    stuffer: Stuffer::new(),
                    body: Vec::new(),
                    received_bytes: 0,
                });
            }
        }
        self.phase = Phase::Bdat(BdatChunk {
            remaining_bytes: size_bytes,
            size_bytes,
            last,
            refusal,
        });
    }

    /// Scans DATA body bytes; false when it needs more input.
    fn process_data(&mut self) -> bool {
        let Phase::Data(data) = &mut self.phase else {
            return false;
        };
        if self.consumed == self.filled && self.filled < self.input.len() {
            return false;
        }
        let outcome = data.scanner.scan(&self.input[self.consumed..self.filled]);
        let max_bytes = self.params.max_message_size;
        match outcome {
            ScanOutcome::NeedMore => {
                data.scanned_bytes += (self.filled - self.consumed) as u64;
                self.consumed = self.filled;
                // The size leaves stuffing dots out (RFC 1870); over the limit even if the
                // terminator's tail, its dot included, is already counted.
                let size_so_far = data.scanned_bytes - data.scanner.line_start_dots();
                if size_so_far > max_bytes + TERMINATOR_TAIL_BYTES {
                    data.too_big = true;
                }
                let keep = !data.too_big && !data.scanner.saw_bare_line_ending();
                if !keep {
                    data.body.clear();
                }
                if self.filled == self.input.len() {
                    if keep {
                        // The zero-copy hand-over: the whole buffer becomes body.
                        data.body.push(mem::replace(
                            &mut self.input,
                            fresh_buffer(DATA_BUFFER_BYTES),
                        ));
                    }
                    self.filled = 0;
                    self.consumed = 0;
                    return true;
                }
                false
            }
            ScanOutcome::End { consumed } => {
                let end = self.consumed + consumed;
                let total = data.scanned_bytes + consumed as u64;
                let body_size_bytes = total - TERMINATOR_TAIL_BYTES;
                // The message's size without its stuffing dots (every line-start dot but the
                // terminator's), as RFC 1870 and BDAT count it; the body is stored stuffed.
                let message_size = body_size_bytes - (data.scanner.line_start_dots() - 1);
                let refusal = if data.scanner.saw_bare_line_ending() {
                    Some(replies::BARE_LINE_ENDING_IN_DATA)
                } else if data.too_big || message_size > max_bytes {
                    Some(replies::MESSAGE_TOO_BIG)
                } else {
                    None
                };
                let mut body = mem::take(&mut data.body);
                if refusal.is_none() {
                    // Pipelined commands behind the terminator go to a fresh buffer so this
                    // one can be moved into the body whole.
                    let rest = self.filled - end;
                    let mut next = fresh_buffer(rest.max(COMMAND_BUFFER_BYTES));
                    next[..rest].copy_from_slice(&self.input[end..self.filled]);
                    let mut last = mem::replace(&mut self.input, next);
                    last.truncate(end);
                    body.push(last);
                    truncate_pieces(&mut body, TERMINATOR_TAIL_BYTES as usize);
                    self.filled = rest;
                    self.consumed = 0;
                } else {
                    self.consumed = end;
                }
                self.phase = Phase::Command;
                self.finish_message(body, body_size_bytes, refusal);
                true
            }
        }
    }

    /// Reads BDAT chunk octets; false when it needs more input.
    fn process_bdat(&mut self) -> bool {
        let Phase::Bdat(chunk) = &mut self.phase else {
            return false;
        };
        let available = (self.filled - self.consumed) as u64;
        let take = chunk.remaining_bytes.min(available) as usize;
        let bytes = &self.input[self.consumed..self.consumed + take];
        self.consumed += take;
        chunk.remaining_bytes -= take as u64;
        if chunk.refusal.is_none() {
            if let Some(bdat) = self.envelope.as_mut().and_then(|e| e.bdat.as_mut()) {
                bdat.received_bytes += take as u64;
                if bdat.received_bytes > self.params.max_message_size {
                    chunk.refusal = Some(replies::MESSAGE_TOO_BIG);
                } else {
                    stuff_into_pieces(&mut bdat.stuffer, bytes, &mut bdat.body);
                    self.body_bytes_copied += take as u64;
                    if bdat.stuffer.saw_bare_line_ending() {
                        chunk.refusal = Some(replies::BARE_LINE_ENDING_IN_DATA);
                    }
                }
                if chunk.refusal.is_some() {
                    bdat.body.clear();
                }
            }
        }
        if chunk.remaining_bytes > 0 {
            return false;
        }
        let (size_bytes, last, refusal) = (chunk.size_bytes, chunk.last, chunk.refusal);
        self.phase = Phase::Command;
        if let Some(refusal) = refusal {
            // A refused chunk ends the transaction; later chunks get 503.
            self.envelope = None;
            self.reply(refusal);
            return true;
        }
        if !last {
            let text = format!("{size_bytes} octets received");
            write_line(
                &mut self.output,
                250,
                false,
                Some(EnhancedCode::new(2, 0, 0)),
                text.as_bytes(),
            );
            return true;
        }
        let Some(mut bdat) = self.envelope.as_mut().and_then(|e| e.bdat.take()) else {
            return true;
        };
        let refusal = if bdat.stuffer.finish() {
            // Stored bodies end with CRLF, like any DATA body.
            stuff_into_pieces(&mut bdat.stuffer, b"\r\n", &mut bdat.body);
            if bdat.stuffer.saw_bare_line_ending() {
                Some(replies::BARE_LINE_ENDING_IN_DATA)
            } else {
                None
            }
        } else {
            None
        };
        let size = bdat.body.iter().map(|p| p.len() as u64).sum();
        self.finish_message(bdat.body, size, refusal);
        true
    }

    /// Ends DATA or the last BDAT: either refuses (and forgets) the message or hands it to
    /// the loop as a StoreMessage.
    fn finish_message(&mut self, body: Vec<Vec<u8>>, body_size_bytes: u64, refusal: Option<Reply>) {
        let envelope = self.envelope.take();
        if let Some(refusal) = refusal {
            return self.reply(refusal);
        }
        let (Some(envelope), Some(helo)) = (envelope, &self.helo) else {
            // Unreachable by construction (DATA/BDAT need both); refuse rather than panic.
            return self.reply(replies::NEED_MAIL);
        };
        self.pending_store = Some(Transaction {
            helo: helo.name.clone(),
            peer: self.peer.addr,
            esmtp: helo.esmtp,
            tls: self.peer.tls,
            authenticated: self.authenticated.is_some(),
            mail_from: envelope.mail_from,
            recipients: envelope.recipients,
            body,
            body_size_bytes,
            eight_bit: envelope.params.body == Some(BodyType::EightBitMime),
            smtputf8: envelope.params.smtputf8,
        });
        self.phase = Phase::AwaitingStore;
    }
}

/// Decodes one base64 AUTH LOGIN field (user name or password): UTF-8, 1 to 255 octets
/// like a PLAIN field, so both mechanisms accept the same credentials.
fn decode_login_field(base64: &str) -> Option<String> {
    use base64ct::{Base64, Encoding};
    if base64.len() > MAX_SASL_PLAIN_BASE64_LEN {
        return None;
    }
    let mut buffer = [0u8; MAX_SASL_PLAIN_BASE64_LEN / 4 * 3];
    let decoded = Base64::decode(base64, &mut buffer).ok()?;
    if decoded.is_empty() || decoded.len() > MAX_SASL_PLAIN_FIELD_LEN || decoded.contains(&0) {
        return None;
    }
    std::str::from_utf8(decoded).ok().map(str::to_owned)
}

/// Loopback, including IPv4 loopback seen through an IPv6 socket.
fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Removes `n` bytes from the end of a body split in pieces, dropping emptied pieces.
fn truncate_pieces(pieces: &mut Vec<Vec<u8>>, mut n: usize) {
    while n > 0 {
        let Some(last) = pieces.last_mut() else {
            return;
        };
        let cut = n.min(last.len());
        last.truncate(last.len() - cut);
        n -= cut;
        if last.is_empty() {
            pieces.pop();
        }
    }
}

/// Stuffs `input` into the last piece, starting a new piece once one reaches
/// `DATA_BUFFER_BYTES` so BDAT bodies have the same granularity as DATA bodies.
fn stuff_into_pieces(stuffer: &mut Stuffer, mut input: &[u8], pieces: &mut Vec<Vec<u8>>) {
    while !input.is_empty() {
        let room = match pieces.last() {
            Some(last) if last.len() < DATA_BUFFER_BYTES => DATA_BUFFER_BYTES - last.len(),
            _ => {
                // Room for the occasional extra dot without reallocating.
                pieces.push(Vec::with_capacity(DATA_BUFFER_BYTES + 1024));
                DATA_BUFFER_BYTES
            }
        };
        let (now, later) = input.split_at(room.min(input.len()));
        if let Some(last) = pieces.last_mut() {
            stuffer.stuff(now, last);
        }
        input = later;
    }
}
