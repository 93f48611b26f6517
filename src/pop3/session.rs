//! The POP3 session state machine (RFC 1939 AUTHORIZATION → TRANSACTION → UPDATE), sans I/O.
//!
//! The connection loop reads into [`Session::input_buffer`], reports with
//! [`Session::input_filled`], writes [`Session::output`] and reports with
//! [`Session::output_consumed`], and after every call into the session drains
//! [`Session::poll_action`] until [`Action::Idle`], answering each action with its callback.
//! While an action awaits its callback the session runs no further command, so pipelined
//! commands execute strictly in order (RFC 2449 PIPELINING).
//!
//! Line ends: clients must send CRLF, but we also accept a bare LF as a command terminator, as
//! Dovecot and most POP3 servers do. Unlike SMTP data there is nothing to smuggle here: a
//! command line is never stored or forwarded. A CR anywhere but before the LF is refused.

use std::net::SocketAddr;
use std::rc::Rc;

use memchr::memchr;

use super::command::{parse_command, Command, CommandError};
use super::maildrop::{
    is_valid_uidl, Maildrop, MessageEntry, MessageError, MessageKey, OpenFailure,
};
use super::reply::{OutputBuffer, RespCode};
use crate::auth::decode_sasl_plain;

/// Longest command line, terminator included (RFC 2449 §4).
pub const MAX_COMMAND_LINE_OCTETS: usize = 255;
/// Longest SASL client response line, terminator included. RFC 5034 lifts the 255-octet limit
/// for these lines; a PLAIN response is at most 1,024 base64 characters (three 255-octet fields).
pub const MAX_SASL_LINE_OCTETS: usize = 1_026;
/// Size of the fixed input buffer: room for several pipelined commands and the longest line.
pub const INPUT_CAPACITY_OCTETS: usize = 4_096;
/// Above this many unsent output octets the session stops running commands and reading
/// (DESIGN: PIPELINING cannot grow memory without bound).
pub const OUTPUT_HIGH_WATER_OCTETS: usize = 64 * 1024;
/// Erroneous commands tolerated per session before we hang up on the client.
pub const MAX_BAD_COMMANDS: u32 = 10;
/// Failed logins tolerated per session before we hang up (the loop also delays each failure).
pub const MAX_AUTH_FAILURES: u32 = 3;

/// Per-listener settings shared by every session of a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    /// Host name in the greeting and sign-off, so users see which server answered.
    pub greeting_host: String,
    /// Whether STLS is offered: false until `[tls]` is configured.
    pub stls_available: bool,
}

/// What the loop knows about the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// Client address, for logs and the failure throttle.
    pub addr: SocketAddr,
    /// Whether USER/PASS and AUTH PLAIN may be used: only on TLS or loopback (SPEC §4).
    pub plaintext_auth_allowed: bool,
    /// Whether the connection is already encrypted (implicit TLS, or after STLS).
    pub tls: bool,
}

/// What the session needs the loop to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing: write [`Session::output`] if non-empty and read more if [`Session::wants_input`].
    Idle,
    /// Check a password (USER/PASS or AUTH PLAIN) off the executor, then call
    /// [`Session::auth_checked`]; on failure delay that call by the throttle's delay.
    Authenticate {
        /// The user name as the client sent it (canonicalise it for the mailbox).
        user: String,
        /// The clear-text password.
        password: String,
    },
    /// After a successful login: lock the maildrop (on whichever shard owns it), load its
    /// listing, then call [`Session::mailbox_opened`].
    OpenMailbox {
        /// The user name that authenticated.
        user: String,
    },
    /// The session already queued `+OK <n> octets` (RETR) or `+OK top of message follows`
    /// (TOP); the loop writes [`Session::output`], then `Return-Path: <…>\r\n` and the stored
    /// bytes (all of them, or for TOP the prefix [`top_len`](super::top_len) gives), then
    /// `.\r\n`, then calls [`Session::message_sent`].
    SendMessage {
        /// Which message.
        key: MessageKey,
        /// `None` for RETR; `Some(n)` for TOP with n body lines.
        top_lines: Option<u64>,
    },
    /// QUIT in TRANSACTION with messages marked deleted: delete them durably, then call
    /// [`Session::commit_done`]; `+OK` is sent only after success. A QUIT with nothing marked
    /// answers at once and goes straight to [`Action::Close`].
    Commit {
        /// Messages to delete, in maildrop order, never empty.
        deletions: Vec<MessageKey>,
    },
    /// The client sent STLS and nothing after it: write [`Session::output`] (`+OK begin TLS`),
    /// run the TLS handshake on the socket, then call [`Session::tls_started`].
    StartTls,
    /// Write what [`Session::output`] holds, then close the connection (and release the
    /// maildrop lock). Returned once; the session accepts no more input.
    Close,
}

/// Which protocol state we are in (RFC 1939 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before a successful login.
    Authorization,
    /// Logged in, maildrop open.
    Transaction,
    /// QUIT received with deletions: waiting for them to be durable.
    Update,
}

/// Which callback the session waits for; no command runs meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// Nothing: commands run.
    Nothing,
    /// [`Session::auth_checked`].
    Auth,
    /// [`Session::mailbox_opened`].
    Mailbox,
    /// [`Session::message_sent`].
    MessageSent,
    /// [`Session::commit_done`].
    Commit,
    /// [`Session::tls_started`].
    Tls,
}

/// How the next input line is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineMode {
    /// A command (255 octets at most).
    Command,
    /// A SASL PLAIN response after our `+ ` continuation.
    SaslResponse,
}

/// A multi-line LIST or UIDL reply in progress, produced as output drains so that a large
/// maildrop never needs its whole listing in memory at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Listing {
    /// LIST (sizes) or UIDL (unique ids).
    uidl: bool,
    /// 0-based index of the next entry to list.
    next_index: usize,
}

/// One POP3 connection's protocol state. See the module documentation for the loop contract.
#[derive(Debug)]
pub struct Session {
    /// Shared listener settings.
    params: Rc<SessionParams>,
    /// The client; `tls` and `plaintext_auth_allowed` change after STLS.
    peer: PeerInfo,
    /// Fixed-size input buffer; bytes `read_pos..filled` are received but not yet run.
    input: Box<[u8]>,
    /// End of received bytes in `input`.
    filled: usize,
    /// Start of the first line not yet run.
    read_pos: usize,
    /// True while dropping the rest of an over-long line: nothing of it is buffered.
    discarding_long_line: bool,
    /// Whether the next line is a command or a SASL response.
    line_mode: LineMode,
    /// Replies not yet written.
    output: OutputBuffer,
    /// RFC 1939 state.
    phase: Phase,
    /// Callback outstanding, if any.
    waiting: Waiting,
    /// The action to hand out on the next [`Session::poll_action`].
    pending_action: Option<Action>,
    /// Set once Close was decided: input is ignored from then on.
    closing: bool,
    /// Name from USER, waiting for PASS.
    user_from_user_command: Option<String>,
    /// The user being authenticated or authenticated.
    user: Option<String>,
    /// The open maildrop (empty before TRANSACTION).
    maildrop: Maildrop,
    /// LIST/UIDL output in progress.
    listing: Option<Listing>,
    /// Erroneous commands so far.
    bad_commands: u32,
    /// Failed logins so far.
    auth_failures: u32,
}

impl Session {
    /// A new session; the greeting is already queued in [`Session::output`].
    pub fn new(params: Rc<SessionParams>, peer: PeerInfo) -> Session {
        let mut output = OutputBuffer::default();
        output.ok(format_args!("{} POP3 ringmail ready", params.greeting_host));
        Session {
            params,
            peer,
            input: vec![0; INPUT_CAPACITY_OCTETS].into_boxed_slice(),
            filled: 0,
            read_pos: 0,
            discarding_long_line: false,
            line_mode: LineMode::Command,
            output,
            phase: Phase::Authorization,
            waiting: Waiting::Nothing,
            pending_action: None,
            closing: false,
            user_from_user_command: None,
            user: None,
            maildrop: Maildrop::default(),
            listing: None,
            bad_commands: 0,
            auth_failures: 0,
        }
    }

    /// Free space to read into. Empty only while [`Session::wants_input`] is false.
    pub fn input_buffer(&mut self) -> &mut [u8] {
        &mut self.input[self.filled..]
    }

    /// Reports that `n` bytes were read into [`Session::input_buffer`], and runs every complete
    /// command buffered, until one needs a callback or output passes the high-water mark.
    pub fn input_filled(&mut self, n: usize) {
        if self.closing {
            return;
        }
        self.filled = (self.filled + n).min(self.input.len());
        if self.waiting == Waiting::Tls && n > 0 {
            // Bytes after STLS and before the handshake must never run (SPEC §3).
            self.close();
            return;
        }
        self.run();
    }

    /// The next thing the loop must do.
    pub fn poll_action(&mut self) -> Action {
        self.pending_action.take().unwrap_or(Action::Idle)
    }

    /// Bytes to write to the client.
    pub fn output(&self) -> &[u8] {
        self.output.pending()
    }

    /// Reports that the first `n` bytes of [`Session::output`] were written; continues a
    /// listing or buffered commands that were paused on output.
    pub fn output_consumed(&mut self, n: usize) {
        self.output.consume(n);
        self.run();
    }

    /// Whether the loop should read more now: false while more than 64 KiB of output is
    /// unsent, while a callback is outstanding, or once the session is closing.
    pub fn wants_input(&self) -> bool {
        !self.closing
            && self.waiting == Waiting::Nothing
            && self.listing.is_none()
            && self.output.len() <= OUTPUT_HIGH_WATER_OCTETS
            && self.filled < self.input.len()
    }

    /// Answer to [`Action::Authenticate`]. On `false` the loop has already waited the
    /// throttle's delay; the client gets `-ERR [AUTH]`.
    pub fn auth_checked(&mut self, ok: bool) {
        if self.waiting != Waiting::Auth {
            return;
        }
        if ok {
            self.waiting = Waiting::Mailbox;
            let user = self.user.clone().unwrap_or_default();
            self.pending_action = Some(Action::OpenMailbox { user });
            return;
        }
        self.waiting = Waiting::Nothing;
        self.user = None;
        self.auth_failures += 1;
        if self.auth_failures >= MAX_AUTH_FAILURES {
            self.output.err(
                Some(RespCode::Auth),
                format_args!("invalid user name or password; too many failures, closing"),
            );
            self.close();
            return;
        }
        self.output.err(
            Some(RespCode::Auth),
            format_args!("invalid user name or password"),
        );
        self.run();
    }

    /// Answer to [`Action::OpenMailbox`]: the listing, or why it cannot be opened.
    pub fn mailbox_opened(&mut self, result: Result<Vec<MessageEntry>, OpenFailure>) {
        if self.waiting != Waiting::Mailbox {
            return;
        }
        self.waiting = Waiting::Nothing;
        match result {
            Ok(entries) if entries.iter().all(|e| is_valid_uidl(&e.uidl)) => {
                self.maildrop = Maildrop::new(entries);
                self.phase = Phase::Transaction;
                self.output.ok(format_args!(
                    "maildrop has {} messages ({} octets)",
                    self.maildrop.visible_count(),
                    self.maildrop.visible_octets()
                ));
            }
            Ok(_) => {
                // An index bug must not put malformed ids on the wire.
                self.user = None;
                self.output.err(
                    Some(RespCode::SysPerm),
                    format_args!("maildrop index is corrupt"),
                );
            }
            Err(OpenFailure::InUse) => {
                self.user = None;
                self.output.err(
                    Some(RespCode::InUse),
                    format_args!("maildrop is locked by another session"),
                );
            }
            Err(OpenFailure::Unavailable) => {
                self.user = None;
                self.output.err(
                    Some(RespCode::SysTemp),
                    format_args!("maildrop temporarily unavailable, try again later"),
                );
            }
        }
        self.run();
    }

    /// Reports that the loop finished streaming a RETR/TOP body and its `.\r\n`.
    pub fn message_sent(&mut self) {
        if self.waiting != Waiting::MessageSent {
            return;
        }
        self.waiting = Waiting::Nothing;
        self.run();
    }

    /// Answer to [`Action::Commit`]: whether every deletion is durable. Either way the session
    /// then closes (RFC 1939 §6).
    pub fn commit_done(&mut self, ok: bool) {
        if self.waiting != Waiting::Commit {
            return;
        }
        self.waiting = Waiting::Nothing;
        if ok {
            self.output.ok(format_args!(
                "{} POP3 ringmail signing off ({} messages left)",
                self.params.greeting_host,
                self.maildrop.visible_count()
            ));
        } else {
            self.output.err(
                Some(RespCode::SysTemp),
                format_args!("some deleted messages not removed"),
            );
        }
        self.close();
    }

    /// Reports a completed TLS handshake after [`Action::StartTls`]: the session starts over in
    /// AUTHORIZATION, now encrypted, with no greeting (RFC 2595 §4).
    pub fn tls_started(&mut self) {
        if self.waiting != Waiting::Tls {
            return;
        }
        self.waiting = Waiting::Nothing;
        self.peer.tls = true;
        self.peer.plaintext_auth_allowed = true;
        self.filled = 0;
        self.read_pos = 0;
        self.discarding_long_line = false;
        self.line_mode = LineMode::Command;
        self.user_from_user_command = None;
        self.user = None;
        self.bad_commands = 0;
    }

    /// Runs buffered lines and pending listings until blocked.
    fn run(&mut self) {
        loop {
            if self.closing || self.waiting != Waiting::Nothing {
                break;
            }
            if let Some(listing) = self.listing {
                self.continue_listing(listing);
            }
            if self.listing.is_some() || self.output.len() > OUTPUT_HIGH_WATER_OCTETS {
                break;
            }
            if !self.run_one_line() {
                break;
            }
        }
        if self.read_pos > 0 {
            self.input.copy_within(self.read_pos..self.filled, 0);
            self.filled -= self.read_pos;
            self.read_pos = 0;
        }
    }

    fn line_limit(&self) -> usize {
        match self.line_mode {
            LineMode::Command => MAX_COMMAND_LINE_OCTETS,
            LineMode::SaslResponse => MAX_SASL_LINE_OCTETS,
        }
    }

    /// Runs the next complete line, if any; false when more input is needed.
    fn run_one_line(&mut self) -> bool {
        let limit = self.line_limit();
        let unread = &self.input[self.read_pos..self.filled];
        let Some(newline) = memchr(b'\n', unread) else {
            if self.discarding_long_line || unread.len() >= limit {
                // Drop what we have of the over-long line; keep dropping up to its LF.
                self.discarding_long_line = true;
                self.read_pos = self.filled;
            }
            return false;
        };
        let line_start = self.read_pos;
        self.read_pos += newline + 1;
        if self.discarding_long_line || newline + 1 > limit {
            self.discarding_long_line = false;
            self.line_too_long();
            return true;
        }
        let mut line_end = line_start + newline;
        if line_end > line_start && self.input[line_end - 1] == b'\r' {
            line_end -= 1;
        }
        // Lend the buffer out so the handlers may borrow `self` mutably; a pointer swap.
        let input = std::mem::take(&mut self.input);
        let line = &input[line_start..line_end];
        match self.line_mode {
            LineMode::Command => self.run_command(line),
            LineMode::SaslResponse => self.run_sasl_response(line),
        }
        self.input = input;
        true
    }

    fn line_too_long(&mut self) {
        match self.line_mode {
            LineMode::Command => self.bad_command(format_args!("command line too long")),
            LineMode::SaslResponse => {
                self.line_mode = LineMode::Command;
                self.output
                    .err(Some(RespCode::Auth), format_args!("SASL response too long"));
                self.count_bad_command();
            }
        }
    }

    /// `-ERR <text>` for a command we could not run, closing after too many.
    fn bad_command(&mut self, text: std::fmt::Arguments<'_>) {
        self.output.err(None, text);
        self.count_bad_command();
    }

    fn count_bad_command(&mut self) {
        self.bad_commands += 1;
        if self.bad_commands >= MAX_BAD_COMMANDS {
            self.output
                .err(None, format_args!("too many bad commands, closing"));
            self.close();
        }
    }

    fn close(&mut self) {
        self.closing = true;
        self.listing = None;
        self.pending_action = Some(Action::Close);
    }

    fn run_command(&mut self, line: &[u8]) {
        let command = match parse_command(line) {
            Ok(command) => command,
            Err(CommandError::Unknown) => return self.bad_command(format_args!("unknown command")),
            Err(error) => return self.bad_command(format_args!("{error}")),
        };
        match self.phase {
            Phase::Authorization => self.run_authorization(command),
            Phase::Transaction => self.run_transaction(command),
            // No command runs in UPDATE: we wait for the commit and close.
            Phase::Update => {}
        }
    }

    fn run_authorization(&mut self, command: Command<'_>) {
        match command {
            Command::Capa => self.capabilities(),
            Command::Quit => {
                self.output.ok(format_args!(
                    "{} POP3 ringmail signing off",
                    self.params.greeting_host
                ));
                self.close();
            }
            Command::User(name) => {
                if self.refuse_plaintext() {
                    return;
                }
                self.user_from_user_command = Some(name.to_owned());
                self.output.ok(format_args!("send PASS"));
            }
            Command::Pass(password) => {
                if self.refuse_plaintext() {
                    return;
                }
                match self.user_from_user_command.take() {
                    Some(user) => self.authenticate(user, password.to_owned()),
                    None => self.bad_command(format_args!("send USER first")),
                }
            }
            Command::Auth {
                mechanism: None, ..
            } => {
                self.output.ok(format_args!("SASL mechanisms follow"));
                if self.peer.plaintext_auth_allowed {
                    self.output.line(format_args!("PLAIN"));
                }
                self.output.end_multiline();
            }
            Command::Auth {
                mechanism: Some(mechanism),
                initial_response,
            } => {
                if !mechanism.eq_ignore_ascii_case("PLAIN") {
                    return self.bad_command(format_args!("unsupported SASL mechanism"));
                }
                if self.refuse_plaintext() {
                    return;
                }
                match initial_response {
                    None => {
                        self.output.continuation();
                        self.line_mode = LineMode::SaslResponse;
                    }
                    Some(response) => self.sasl_plain(response.as_bytes()),
                }
            }
            Command::Stls => {
                if !self.params.stls_available || self.peer.tls {
                    return self.bad_command(format_args!("STLS not available"));
                }
                if self.read_pos < self.filled {
                    // Pipelined bytes after STLS: never run them, as SPEC §3 demands.
                    self.output
                        .err(None, format_args!("data after STLS, closing"));
                    return self.close();
                }
                self.output.ok(format_args!("begin TLS negotiation"));
                self.waiting = Waiting::Tls;
                self.pending_action = Some(Action::StartTls);
            }
            Command::Stat
            | Command::List(_)
            | Command::Uidl(_)
            | Command::Retr(_)
            | Command::Top { .. }
            | Command::Dele(_)
            | Command::Noop
            | Command::Rset => self.bad_command(format_args!("not logged in")),
        }
    }

    /// Refuses a plain-text login on an unprotected non-loopback connection; see [`RespCode::Auth`].
    fn refuse_plaintext(&mut self) -> bool {
        if self.peer.plaintext_auth_allowed {
            return false;
        }
        self.output.err(
            Some(RespCode::Auth),
            format_args!("plain-text authentication needs TLS (use STLS) or loopback"),
        );
        self.count_bad_command();
        true
    }

    fn run_sasl_response(&mut self, line: &[u8]) {
        self.line_mode = LineMode::Command;
        if line == b"*" {
            // RFC 5034 §4: a cancelled exchange MUST be answered -ERR.
            self.output
                .err(None, format_args!("authentication cancelled"));
            return;
        }
        self.sasl_plain(line);
    }

    fn sasl_plain(&mut self, response: &[u8]) {
        let decoded = match response {
            b"=" => None,
            _ => std::str::from_utf8(response)
                .ok()
                .and_then(|r| decode_sasl_plain(r).ok()),
        };
        match decoded {
            Some(plain) => self.authenticate(plain.authcid, plain.password),
            None => {
                self.output.err(
                    Some(RespCode::Auth),
                    format_args!("invalid SASL PLAIN response"),
                );
                self.count_bad_command();
            }
        }
    }

    fn authenticate(&mut self, user: String, password: String) {
        self.user = Some(user.clone());
        self.waiting = Waiting::Auth;
        self.pending_action = Some(Action::Authenticate { user, password });
    }

    fn capabilities(&mut self) {
        self.output.ok(format_args!("capability list follows"));
        self.output.line(format_args!("TOP"));
        self.output.line(format_args!("UIDL"));
        // Only what can succeed on this connection: RFC 2595 §6 hides plain-text login until
        // the connection is protected.
        if self.peer.plaintext_auth_allowed {
            self.output.line(format_args!("USER"));
            self.output.line(format_args!("SASL PLAIN"));
        }
        self.output.line(format_args!("RESP-CODES"));
        self.output.line(format_args!("AUTH-RESP-CODE"));
        self.output.line(format_args!("PIPELINING"));
        if self.params.stls_available && !self.peer.tls && self.phase == Phase::Authorization {
            self.output.line(format_args!("STLS"));
        }
        self.output.line(format_args!("IMPLEMENTATION ringmail"));
        self.output.end_multiline();
    }

    fn message_error(&mut self, number: u64, error: MessageError) {
        match error {
            MessageError::NoSuchMessage => self.output.err(None, format_args!("no such message")),
            MessageError::Deleted => self
                .output
                .err(None, format_args!("message {number} already deleted")),
        }
    }

    fn run_transaction(&mut self, command: Command<'_>) {
        match command {
            Command::Capa => self.capabilities(),
            Command::Stat => self.output.ok(format_args!(
                "{} {}",
                self.maildrop.visible_count(),
                self.maildrop.visible_octets()
            )),
            Command::List(None) | Command::Uidl(None) => {
                let uidl = matches!(command, Command::Uidl(_));
                if uidl {
                    self.output.ok(format_args!("unique-id listing follows"));
                } else {
                    self.output.ok(format_args!(
                        "{} messages ({} octets)",
                        self.maildrop.visible_count(),
                        self.maildrop.visible_octets()
                    ));
                }
                self.listing = Some(Listing {
                    uidl,
                    next_index: 0,
                });
            }
            Command::List(Some(number)) => match self.maildrop.get(number) {
                Ok(entry) => {
                    let size = entry.size_octets;
                    self.output.ok(format_args!("{number} {size}"));
                }
                Err(error) => self.message_error(number, error),
            },
            Command::Uidl(Some(number)) => match self.maildrop.get(number) {
                Ok(entry) => self.output.ok(format_args!("{number} {}", entry.uidl)),
                Err(error) => self.message_error(number, error),
            },
            Command::Retr(number) => match self.maildrop.get(number) {
                Ok(entry) => {
                    let (key, size) = (entry.key, entry.size_octets);
                    self.output.ok(format_args!("{size} octets"));
                    self.send_message(key, None);
                }
                Err(error) => self.message_error(number, error),
            },
            Command::Top { message, lines } => match self.maildrop.get(message) {
                Ok(entry) => {
                    let key = entry.key;
                    self.output.ok(format_args!("top of message follows"));
                    self.send_message(key, Some(lines));
                }
                Err(error) => self.message_error(message, error),
            },
            Command::Dele(number) => match self.maildrop.delete(number) {
                Ok(()) => self.output.ok(format_args!("message {number} deleted")),
                Err(error) => self.message_error(number, error),
            },
            Command::Noop => self.output.ok_bare(),
            Command::Rset => {
                self.maildrop.reset();
                self.output.ok(format_args!(
                    "maildrop has {} messages ({} octets)",
                    self.maildrop.visible_count(),
                    self.maildrop.visible_octets()
                ));
            }
            Command::Quit => {
                let deletions = self.maildrop.deletions();
                if deletions.is_empty() {
                    self.output.ok(format_args!(
                        "{} POP3 ringmail signing off ({} messages left)",
                        self.params.greeting_host,
                        self.maildrop.visible_count()
                    ));
                    self.close();
                } else {
                    self.phase = Phase::Update;
                    self.waiting = Waiting::Commit;
                    self.pending_action = Some(Action::Commit { deletions });
                }
            }
            Command::User(_) | Command::Pass(_) | Command::Auth { .. } | Command::Stls => {
                self.bad_command(format_args!("already logged in"))
            }
        }
    }

    fn send_message(&mut self, key: MessageKey, top_lines: Option<u64>) {
        self.waiting = Waiting::MessageSent;
        self.pending_action = Some(Action::SendMessage { key, top_lines });
    }

    /// Appends listing lines until output reaches the high-water mark or the listing ends.
    fn continue_listing(&mut self, mut listing: Listing) {
        while self.output.len() <= OUTPUT_HIGH_WATER_OCTETS {
            let index = listing.next_index;
            if index >= self.maildrop.len() {
                self.output.end_multiline();
                self.listing = None;
                return;
            }
            listing.next_index += 1;
            if let Some(entry) = self.maildrop.visible_at(index) {
                let number = index + 1;
                if listing.uidl {
                    self.output.line(format_args!("{number} {}", entry.uidl));
                } else {
                    self.output
                        .line(format_args!("{number} {}", entry.size_octets));
                }
            }
        }
        self.listing = Some(listing);
    }
}
