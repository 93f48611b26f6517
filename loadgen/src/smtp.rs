//! `loadgen smtp`: the SMTP client, closed loop or open loop (`--rate`).
//!
//! Each thread runs its share of the connections. A connection sends up to K messages,
//! then QUIT, then reconnects, until the message budget or the duration is spent.
//! Reply parsing is a pure function; the async code only moves bytes and counts.

use std::cell::{Cell, RefCell};
use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::{first_line, Conn, SessionError};
use crate::message::{build_message, dot_stuff_into};
use crate::pattern::Pattern;
use crate::rate::{is_late, share, Schedule};
use crate::report::{Live, Stats};

/// Longest reply we buffer; an EHLO reply is a few hundred octets.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Initial receive buffer: replies are small, and a connection per message should not pay
/// for zeroing more.
const REPLY_BUFFER_BYTES: usize = 16 * 1024;

/// Pause after a failed connect, so a dead server is not hammered in a tight loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// A connection slot that failed to connect this many times in a row gives up, so a
/// `--messages` run against a dead server ends (after about 5 s) instead of retrying forever.
const MAX_CONSECUTIVE_CONNECT_FAILURES: u32 = 50;

/// Only the first few session errors are printed; all are counted.
const MAX_PRINTED_ERRORS: u64 = 5;

/// Parses one complete SMTP reply (RFC 5321 §4.2) at the start of `input`.
///
/// Returns the reply code and the reply's length in octets, or `None` when more input is
/// needed. Lines may end in CRLF or LF (we are lenient as a client); every line must start
/// with the same three digits followed by `-` (more lines follow), a space, or the end.
pub fn parse_reply(input: &[u8]) -> Result<Option<(u16, usize)>, SessionError> {
    let mut offset = 0;
    let mut code = None;
    loop {
        let Some(newline) = memchr::memchr(b'\n', &input[offset..]) else {
            if input.len() > MAX_REPLY_BYTES {
                return Err(SessionError::TooLong(MAX_REPLY_BYTES));
            }
            return Ok(None);
        };
        let line = &input[offset..offset + newline];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        offset += newline + 1;
        if offset > MAX_REPLY_BYTES {
            return Err(SessionError::TooLong(MAX_REPLY_BYTES));
        }
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(SessionError::Malformed("reply line without a 3-digit code"));
        }
        let line_code = u16::from(line[0] - b'0') * 100
            + u16::from(line[1] - b'0') * 10
            + u16::from(line[2] - b'0');
        if !(200..600).contains(&line_code) {
            return Err(SessionError::Malformed("reply code outside 2xx-5xx"));
        }
        if *code.get_or_insert(line_code) != line_code {
            return Err(SessionError::Malformed("reply lines with different codes"));
        }
        match line.get(3) {
            None | Some(b' ') => return Ok(Some((line_code, offset))),
            Some(b'-') => continue,
            Some(_) => {
                return Err(SessionError::Malformed(
                    "reply code not followed by space or '-'",
                ))
            }
        }
    }
}

/// Whether an EHLO reply advertises `keyword` (an extension line starting with it).
pub fn ehlo_advertises(reply: &[u8], keyword: &str) -> bool {
    reply.split(|&b| b == b'\n').skip(1).any(|line| {
        let text = line.get(4..).unwrap_or(b"");
        let word_end = text
            .iter()
            .position(|&b| b == b' ' || b == b'\r')
            .unwrap_or(text.len());
        text[..word_end].eq_ignore_ascii_case(keyword.as_bytes())
    })
}

/// Formats the envelope commands of one transaction into `out`.
pub fn envelope_commands(out: &mut Vec<u8>, from: &str, to: &str) {
    out.extend_from_slice(b"MAIL FROM:<");
    out.extend_from_slice(from.as_bytes());
    out.extend_from_slice(b">\r\nRCPT TO:<");
    out.extend_from_slice(to.as_bytes());
    out.extend_from_slice(b">\r\nDATA\r\n");
}

/// Messages a `--chunking` connection keeps in flight. BDAT needs no 354 before the content,
/// so nothing stops a client from sending the next transactions before the replies to the
/// last; the window is refilled, in one write, when half of it has been answered.
pub const CHUNKING_WINDOW: usize = 16;

/// What `loadgen smtp` was asked to do.
#[derive(Debug, Clone)]
pub struct SmtpPlan {
    /// Server address.
    pub target: SocketAddr,
    /// Connections in total, spread over the threads.
    pub connections: u64,
    /// Message budget in total (`None` with `--duration`).
    pub messages: Option<u64>,
    /// Run length (`None` with `--messages`).
    pub duration: Option<Duration>,
    /// Whole message size in octets before dot-stuffing.
    pub size_bytes: usize,
    /// Recipients.
    pub to: Pattern,
    /// Envelope sender and From: address.
    pub from: String,
    /// EHLO argument.
    pub helo: String,
    /// Messages per connection before QUIT and reconnect.
    pub per_connection: u64,
    /// Send MAIL/RCPT/DATA in one write when the server offers PIPELINING.
    pub pipelining: bool,
    /// `--chunking`: where the server offers CHUNKING and PIPELINING, send each message as
    /// MAIL, RCPT and `BDAT <size> LAST` with its content, up to [`CHUNKING_WINDOW`] messages
    /// in flight per connection (closed loop only).
    pub chunking: bool,
    /// Open-loop arrival rate in messages per second across all threads.
    pub rate_per_sec: Option<f64>,
    /// Threads (executors).
    pub threads: usize,
    /// Distinguishes this run's Message-IDs from other runs'.
    pub run_id: u64,
    /// `--tls`: STARTTLS after EHLO with this client configuration, then EHLO again.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// What one thread shares between its connections.
struct ThreadState {
    /// The plan.
    plan: SmtpPlan,
    /// This thread's index, mixed into recipients and Message-IDs.
    thread_index: u64,
    /// Messages this thread may still start (`u64::MAX` with `--duration`).
    budget: Cell<u64>,
    /// End of a `--duration` run.
    deadline: Option<Instant>,
    /// Open-loop schedule for this thread's share of the rate.
    schedule: Option<Schedule>,
    /// Messages started by this thread: the next arrival index and recipient number.
    started: Cell<u64>,
    /// Counters for the summary.
    stats: RefCell<Stats>,
    /// Counters for the status line.
    live: Arc<Live>,
    /// Errors printed so far.
    printed_errors: Cell<u64>,
}

/// A message slot handed to a connection.
struct Ticket {
    /// Sequence number within the thread.
    sequence: u64,
    /// Open loop: when this arrival is due.
    intended: Option<Instant>,
}

impl ThreadState {
    /// Takes the next message slot, or `None` when the run is over.
    fn take(&self) -> Option<Ticket> {
        if self.budget.get() == 0 {
            return None;
        }
        let sequence = self.started.get();
        let intended = self.schedule.map(|s| s.intended(sequence));
        let now = Instant::now();
        if let Some(deadline) = self.deadline {
            if intended.unwrap_or(now) >= deadline {
                return None;
            }
        }
        self.budget.set(self.budget.get() - 1);
        self.started.set(sequence + 1);
        Some(Ticket { sequence, intended })
    }

    /// Counts a broken session and prints the first few.
    fn session_failed(&self, error: &SessionError) {
        self.stats.borrow_mut().protocol_errors += 1;
        Live::add(&self.live.errors, 1);
        self.print_error(error);
    }

    /// Prints an error unless enough have been printed already.
    fn print_error(&self, error: &dyn std::fmt::Display) {
        let printed = self.printed_errors.get();
        if printed < MAX_PRINTED_ERRORS {
            eprintln!("loadgen smtp: thread {}: {error}", self.thread_index);
            self.printed_errors.set(printed + 1);
        }
    }
}

/// How one transaction ended.
enum Outcome {
    /// End of data got 2xx.
    Accepted,
    /// The server refused at some step with this 4xx/5xx code.
    Refused(u16),
}

/// Runs this thread's share of the load and returns its figures.
pub async fn run_thread(plan: SmtpPlan, thread_index: usize, live: Arc<Live>) -> Stats {
    let threads = plan.threads as u64;
    let index = thread_index as u64;
    let connections = share(plan.connections, threads, index);
    let budget = plan.messages.map_or(u64::MAX, |m| share(m, threads, index));
    let now = Instant::now();
    let state = Rc::new(ThreadState {
        thread_index: index,
        budget: Cell::new(budget),
        deadline: plan.duration.map(|d| now + d),
        schedule: plan
            .rate_per_sec
            .map(|r| Schedule::new(now, r / threads as f64)),
        started: Cell::new(0),
        stats: RefCell::new(Stats::default()),
        live,
        printed_errors: Cell::new(0),
        plan,
    });
    let tasks: Vec<_> = (0..connections)
        .map(|_| glommio::spawn_local(connection_loop(state.clone())))
        .collect();
    for task in tasks {
        task.await;
    }
    let stats = state.stats.borrow().clone();
    stats
}

/// One connection slot: connect, run a session, repeat until the run is over.
async fn connection_loop(state: Rc<ThreadState>) {
    let mut buffers = Buffers::default();
    let mut consecutive_failures = 0;
    // The slot is taken before connecting, so an open-loop arrival that needs a new
    // connection waits for it in its latency, and no connection is opened for nothing.
    while let Some(first) = next_arrival(&state).await {
        let connect_start = Instant::now();
        let mut conn = match Conn::connect(state.plan.target, REPLY_BUFFER_BYTES, MAX_REPLY_BYTES)
            .await
        {
            Ok(conn) => conn,
            Err(error) => {
                state.stats.borrow_mut().connect_errors += 1;
                Live::add(&state.live.errors, 1);
                state.print_error(&format_args!("connect to {}: {error}", state.plan.target));
                consecutive_failures += 1;
                if consecutive_failures >= MAX_CONSECUTIVE_CONNECT_FAILURES {
                    state.print_error(&format_args!(
                        "giving up a connection after {consecutive_failures} failed connects in a row"
                    ));
                    return;
                }
                glommio::timer::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        consecutive_failures = 0;
        state
            .stats
            .borrow_mut()
            .record("connect", connect_start.elapsed());
        if let Err(error) = session(&state, &mut conn, &mut buffers, first).await {
            state.session_failed(&error);
        }
    }
}

/// Takes the next message slot and, in open loop, waits until it is due (counting it
/// late when it is already overdue).
async fn next_arrival(state: &ThreadState) -> Option<Ticket> {
    let ticket = state.take()?;
    if let Some(intended) = ticket.intended {
        let now = Instant::now();
        if intended > now {
            glommio::timer::sleep(intended - now).await;
        } else if is_late(intended, now) {
            state.stats.borrow_mut().late_arrivals += 1;
        }
    }
    Some(ticket)
}

/// Scratch buffers reused across messages of one connection slot.
#[derive(Default)]
struct Buffers {
    /// The message as built.
    raw: Vec<u8>,
    /// What goes on the wire: commands and the dot-stuffed message.
    wire: Vec<u8>,
}

/// Reads one reply and returns its code; the reply text stays readable via `conn.bytes()`.
async fn read_reply(conn: &mut Conn) -> Result<(u16, std::ops::Range<usize>), SessionError> {
    let mut code = 0;
    let range = conn
        .read_frame(|input| {
            Ok(parse_reply(input)?.map(|(c, len)| {
                code = c;
                len
            }))
        })
        .await;
    // `code` was set by the closure only when a frame was found.
    range.map(|range| (code, range))
}

/// Fails with `Unexpected` unless `code` is `want`.
fn expect(
    conn: &Conn,
    step: &'static str,
    code: u16,
    range: std::ops::Range<usize>,
    want: u16,
) -> Result<(), SessionError> {
    if code == want {
        Ok(())
    } else {
        Err(SessionError::Unexpected {
            step,
            reply: first_line(&conn.bytes()[range]),
        })
    }
}

/// One SMTP session: greeting, EHLO, up to K transactions, QUIT.
async fn session(
    state: &ThreadState,
    conn: &mut Conn,
    buffers: &mut Buffers,
    first: Ticket,
) -> Result<(), SessionError> {
    let plan = &state.plan;
    let (code, range) = read_reply(conn).await?;
    expect(conn, "greeting", code, range, 220)?;
    buffers.wire.clear();
    buffers
        .wire
        .extend_from_slice(format!("EHLO {}\r\n", plan.helo).as_bytes());
    conn.send(&buffers.wire).await?;
    let (mut code, mut range) = read_reply(conn).await?;
    if let Some(tls) = &plan.tls {
        if code != 250 || !ehlo_advertises(&conn.bytes()[range.clone()], "STARTTLS") {
            return Err(SessionError::Unexpected {
                step: "EHLO (--tls needs STARTTLS)",
                reply: first_line(&conn.bytes()[range]),
            });
        }
        let handshake_start = Instant::now();
        conn.send(b"STARTTLS\r\n").await?;
        let (starttls_code, starttls_range) = read_reply(conn).await?;
        expect(conn, "STARTTLS", starttls_code, starttls_range, 220)?;
        conn.start_tls(tls).await?;
        state
            .stats
            .borrow_mut()
            .record("tls_handshake", handshake_start.elapsed());
        conn.send(&buffers.wire).await?;
        (code, range) = read_reply(conn).await?;
    }
    let pipelining = if code == 250 {
        let ehlo = &conn.bytes()[range];
        if plan.chunking && ehlo_advertises(ehlo, "PIPELINING") && ehlo_advertises(ehlo, "CHUNKING")
        {
            return chunked_transactions(state, conn, buffers, first).await;
        }
        plan.pipelining && ehlo_advertises(ehlo, "PIPELINING")
    } else {
        // Servers without ESMTP answer EHLO with 500/502: fall back to HELO.
        conn.send(format!("HELO {}\r\n", plan.helo).as_bytes())
            .await?;
        let (code, range) = read_reply(conn).await?;
        expect(conn, "HELO", code, range, 250)?;
        false
    };
    // Chaining the next envelope behind a message's content saves a round trip per
    // message (RFC 2920 §3.1 allows content as the first command of a group). Open loop
    // does not chain: each arrival must wait for its own intended time.
    let chain = pipelining && plan.rate_per_sec.is_none();
    let mut chained: Option<(Ticket, Instant)> = None;
    let mut first = Some(first);
    let mut done = 0;
    loop {
        let (ticket, started, envelope_sent) = match (chained.take(), first.take()) {
            (Some((ticket, started)), _) => (ticket, started, true),
            (None, Some(ticket)) => {
                // Open loop counts from the intended time; closed loop from now, after
                // the greeting and EHLO, so transaction latency means the same for all.
                let started = ticket.intended.unwrap_or_else(Instant::now);
                (ticket, started, false)
            }
            (None, None) => {
                if done >= plan.per_connection {
                    break;
                }
                let Some(ticket) = next_arrival(state).await else {
                    break;
                };
                let started = ticket.intended.unwrap_or_else(Instant::now);
                (ticket, started, false)
            }
        };
        done += 1;
        let chain_next = chain && done < plan.per_connection;
        let exchange = Exchange {
            ticket: &ticket,
            pipelining,
            envelope_sent,
            chain_next,
        };
        Live::add(&state.live.in_flight, 1);
        let outcome = transaction(state, conn, buffers, exchange, &mut chained).await;
        Live::sub(&state.live.in_flight, 1);
        count_outcome(state, outcome?, started.elapsed());
    }
    quit(conn).await
}

async fn quit(conn: &mut Conn) -> Result<(), SessionError> {
    conn.send(b"QUIT\r\n").await?;
    // A server that closes without a 221 has still done its job for us.
    let _ = read_reply(conn).await;
    Ok(())
}

/// `--chunking`: up to [`CHUNKING_WINDOW`] transactions of MAIL, RCPT and `BDAT <size> LAST`
/// (RFC 3030) in flight, then QUIT. Latency counts from the write that carried each one.
async fn chunked_transactions(
    state: &ThreadState,
    conn: &mut Conn,
    buffers: &mut Buffers,
    first: Ticket,
) -> Result<(), SessionError> {
    let mut in_flight = std::collections::VecDeque::with_capacity(CHUNKING_WINDOW);
    let result = chunked_window(state, conn, buffers, first, &mut in_flight).await;
    // A broken session leaves its unanswered transactions out of the live count too.
    Live::sub(&state.live.in_flight, in_flight.len() as u64);
    result?;
    quit(conn).await
}

/// The window of `chunked_transactions`; `in_flight` holds the send times of the unanswered.
async fn chunked_window(
    state: &ThreadState,
    conn: &mut Conn,
    buffers: &mut Buffers,
    first: Ticket,
    in_flight: &mut std::collections::VecDeque<Instant>,
) -> Result<(), SessionError> {
    let plan = &state.plan;
    let mut first = Some(first);
    let mut sent = 0;
    loop {
        if in_flight.len() <= CHUNKING_WINDOW / 2 {
            buffers.wire.clear();
            let before = in_flight.len();
            while in_flight.len() < CHUNKING_WINDOW && sent < plan.per_connection {
                let Some(ticket) = first.take().or_else(|| state.take()) else {
                    break;
                };
                sent += 1;
                let to = build_ticket_message(state, buffers, &ticket)?;
                buffers.wire.extend_from_slice(b"MAIL FROM:<");
                buffers.wire.extend_from_slice(plan.from.as_bytes());
                buffers.wire.extend_from_slice(b">\r\nRCPT TO:<");
                buffers.wire.extend_from_slice(to.as_bytes());
                // Writing into a Vec cannot fail.
                let _ = write!(buffers.wire, ">\r\nBDAT {} LAST\r\n", buffers.raw.len());
                buffers.wire.extend_from_slice(&buffers.raw);
                in_flight.push_back(Instant::now());
            }
            if !buffers.wire.is_empty() {
                Live::add(&state.live.in_flight, (in_flight.len() - before) as u64);
                conn.send(&buffers.wire).await?;
            }
        }
        let Some(&started) = in_flight.front() else {
            return Ok(());
        };
        let mut refused = None;
        for step in ["MAIL", "RCPT", "BDAT LAST"] {
            let (code, range) = read_reply(conn).await?;
            check_step(conn, step, code, range, &mut refused)?;
        }
        in_flight.pop_front();
        Live::sub(&state.live.in_flight, 1);
        count_outcome(
            state,
            match refused {
                Some(code) => Outcome::Refused(code),
                None => Outcome::Accepted,
            },
            started.elapsed(),
        );
    }
}

/// Counts one finished transaction.
fn count_outcome(state: &ThreadState, outcome: Outcome, latency: Duration) {
    let plan = &state.plan;
    let mut stats = state.stats.borrow_mut();
    match outcome {
        Outcome::Accepted => {
            stats.messages_ok += 1;
            stats.bytes_ok += plan.size_bytes as u64;
            stats.count_reply(250);
            stats.record("transaction", latency);
            Live::add(&state.live.messages, 1);
            Live::add(&state.live.bytes, plan.size_bytes as u64);
        }
        Outcome::Refused(code) => {
            stats.messages_refused += 1;
            stats.count_reply(code);
            stats.record("transaction", latency);
            Live::add(&state.live.errors, 1);
        }
    }
}

/// Builds the message of `ticket` into `buffers.raw`; returns its recipient.
fn build_ticket_message(
    state: &ThreadState,
    buffers: &mut Buffers,
    ticket: &Ticket,
) -> Result<String, SessionError> {
    let plan = &state.plan;
    let (recipient_index, to) = state.recipient(ticket);
    let message_id = format!(
        "{:x}.{}.{}@loadgen.invalid",
        plan.run_id, state.thread_index, ticket.sequence
    );
    // Sizes were checked when the plan was made, so this cannot fail for a valid plan;
    // should it, the transaction is counted as broken rather than sent malformed.
    build_message(
        &mut buffers.raw,
        &plan.from,
        &to,
        &message_id,
        plan.size_bytes,
        recipient_index ^ plan.run_id,
    )
    .map_err(|_| SessionError::Malformed("message does not fit --size"))?;
    Ok(to)
}

/// How one transaction goes on the wire.
struct Exchange<'a> {
    /// The message slot.
    ticket: &'a Ticket,
    /// Send MAIL, RCPT and DATA in one write.
    pipelining: bool,
    /// The envelope already went out behind the previous message's content.
    envelope_sent: bool,
    /// Take the next slot and send its envelope behind this message's content.
    chain_next: bool,
}

impl ThreadState {
    /// The recipient of a message slot: round-robin over the pattern across all threads.
    fn recipient(&self, ticket: &Ticket) -> (u64, String) {
        let index = ticket.sequence * self.plan.threads as u64 + self.thread_index;
        (index, self.plan.to.nth(index))
    }
}

/// Sends one message: MAIL, RCPT, DATA (pipelined or not), then the content; with
/// `chain_next`, the next slot's envelope follows the content and is left in `chained`.
async fn transaction(
    state: &ThreadState,
    conn: &mut Conn,
    buffers: &mut Buffers,
    exchange: Exchange<'_>,
    chained: &mut Option<(Ticket, Instant)>,
) -> Result<Outcome, SessionError> {
    let plan = &state.plan;
    let to = build_ticket_message(state, buffers, exchange.ticket)?;
    buffers.wire.clear();
    envelope_commands(&mut buffers.wire, &plan.from, &to);
    let mut refused = None;
    if exchange.pipelining {
        if !exchange.envelope_sent {
            conn.send(&buffers.wire).await?;
        }
        for step in ["MAIL", "RCPT"] {
            let (code, range) = read_reply(conn).await?;
            check_step(conn, step, code, range, &mut refused)?;
        }
    } else {
        let mail_len = memchr::memchr(b'\n', &buffers.wire).map_or(0, |at| at + 1);
        let rcpt_len = memchr::memchr(b'\n', &buffers.wire[mail_len..]).map_or(0, |at| at + 1);
        conn.send(&buffers.wire[..mail_len]).await?;
        let (code, range) = read_reply(conn).await?;
        check_step(conn, "MAIL", code, range, &mut refused)?;
        if refused.is_some() {
            return Ok(Outcome::Refused(code));
        }
        conn.send(&buffers.wire[mail_len..mail_len + rcpt_len])
            .await?;
        let (code, range) = read_reply(conn).await?;
        check_step(conn, "RCPT", code, range, &mut refused)?;
        if refused.is_some() {
            return Ok(Outcome::Refused(code));
        }
        conn.send(&buffers.wire[mail_len + rcpt_len..]).await?;
    }
    let (code, range) = read_reply(conn).await?;
    match code {
        354 => {}
        400..=599 => return Ok(Outcome::Refused(refused.unwrap_or(code))),
        _ => {
            return Err(SessionError::Unexpected {
                step: "DATA",
                reply: first_line(&conn.bytes()[range]),
            })
        }
    }
    buffers.wire.clear();
    dot_stuff_into(&buffers.raw, &mut buffers.wire);
    if exchange.chain_next {
        if let Some(next) = state.take() {
            let (_, next_to) = state.recipient(&next);
            envelope_commands(&mut buffers.wire, &plan.from, &next_to);
            *chained = Some((next, Instant::now()));
        }
    }
    conn.send(&buffers.wire).await?;
    let (code, range) = read_reply(conn).await?;
    check_step(conn, "end of data", code, range, &mut refused)?;
    Ok(match refused {
        Some(code) => Outcome::Refused(code),
        None => Outcome::Accepted,
    })
}

/// Sorts a reply to MAIL/RCPT/end of data: 2xx passes, 4xx/5xx refuses the transaction
/// (the first refusal is the one reported), anything else breaks the session.
fn check_step(
    conn: &Conn,
    step: &'static str,
    code: u16,
    range: std::ops::Range<usize>,
    refused: &mut Option<u16>,
) -> Result<(), SessionError> {
    match code {
        200..=299 => Ok(()),
        400..=599 => {
            refused.get_or_insert(code);
            Ok(())
        }
        _ => Err(SessionError::Unexpected {
            step,
            reply: first_line(&conn.bytes()[range]),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Input and the expected code and length.
    type Case = (&'static [u8], Option<(u16, usize)>);

    #[test]
    fn parses_replies() {
        let table: &[Case] = &[
            (b"220 mx ESMTP\r\n", Some((220, 14))),
            (b"250 ok\r\n250 next\r\n", Some((250, 8))),
            (
                b"250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n",
                Some((250, 37)),
            ),
            (b"250\r\n", Some((250, 5))),
            (b"354 go ahead\n", Some((354, 13))),
            (b"250-mx\r\n250 SIZ", None),
            (b"25", None),
            (b"", None),
        ];
        for (input, want) in table {
            assert_eq!(
                parse_reply(input).unwrap(),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn refuses_malformed_replies() {
        let table: &[&[u8]] = &[
            b"hello\r\n",
            b"25x ok\r\n",
            b"250-a\r\n251 b\r\n",
            b"250_ok\r\n",
            b"100 too low\r\n",
            b"\r\n",
        ];
        for input in table {
            assert!(
                parse_reply(input).is_err(),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let endless = vec![b'2'; MAX_REPLY_BYTES + 10];
        assert!(matches!(
            parse_reply(&endless),
            Err(SessionError::TooLong(_))
        ));
        let mut many = Vec::new();
        while many.len() <= MAX_REPLY_BYTES {
            many.extend_from_slice(b"250-x\r\n");
        }
        assert!(matches!(parse_reply(&many), Err(SessionError::TooLong(_))));
    }

    #[test]
    fn finds_ehlo_keywords() {
        let reply = b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n";
        assert!(ehlo_advertises(reply, "PIPELINING"));
        assert!(ehlo_advertises(reply, "size"));
        assert!(ehlo_advertises(reply, "8BITMIME"));
        assert!(!ehlo_advertises(reply, "CHUNKING"));
        assert!(
            !ehlo_advertises(b"250 PIPELINING\r\n", "PIPELINING"),
            "first line is the host name"
        );
    }

    #[test]
    fn formats_envelope() {
        let mut out = Vec::new();
        envelope_commands(&mut out, "a@x", "b@y");
        assert_eq!(&out[..], b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n");
    }

    proptest! {
        #[test]
        fn reply_parser_never_panics(input in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Some((code, len))) = parse_reply(&input) {
                prop_assert!((200..600).contains(&code));
                prop_assert!(len <= input.len());
            }
        }
    }
}
