//! `loadgen pop3`: logs in to each user of a pattern, lists and retrieves every message,
//! optionally deletes them and checks each body against its checksum header.
//!
//! Response framing (status lines, multi-line responses, LIST lines) is pure and tested;
//! the async code only moves bytes and counts.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::conn::{first_line, Conn, SessionError};
use crate::message::{dot_unstuff, verify, Verdict};
use crate::pattern::Pattern;
use crate::rate::share;
use crate::report::{Live, Stats};

/// Longest status line we accept (RFC 2449 §4 allows 512 octets).
const MAX_STATUS_LINE_BYTES: usize = 1024;

/// Most messages we retrieve from one mailbox; bounds the LIST we keep in memory.
const MAX_MESSAGES_PER_MAILBOX: usize = 1_000_000;

/// Only the first few session errors are printed; all are counted.
const MAX_PRINTED_ERRORS: u64 = 5;

/// Parses the status line at the start of `input`: whether it is `+OK`, and its length.
pub fn parse_status(input: &[u8]) -> Result<Option<(bool, usize)>, SessionError> {
    let Some(newline) = memchr::memchr(b'\n', input) else {
        if input.len() > MAX_STATUS_LINE_BYTES {
            return Err(SessionError::TooLong(MAX_STATUS_LINE_BYTES));
        }
        return Ok(None);
    };
    if newline > MAX_STATUS_LINE_BYTES {
        return Err(SessionError::TooLong(MAX_STATUS_LINE_BYTES));
    }
    if input.starts_with(b"+OK") {
        Ok(Some((true, newline + 1)))
    } else if input.starts_with(b"-ERR") {
        Ok(Some((false, newline + 1)))
    } else {
        Err(SessionError::Malformed(
            "status line starts with neither +OK nor -ERR",
        ))
    }
}

/// Parses a multi-line response (RFC 1939 §3): a `+OK` line, dot-stuffed lines, and a line
/// holding only `.`. A `-ERR` response is just its status line. Returns whether it was
/// `+OK` and the whole length; the payload lies between the status line and the final
/// `.` CRLF (see `multiline_payload`).
///
/// `searched` carries how far a previous call on a shorter prefix of the same response
/// got, so a large message arriving in many reads is scanned once, not once per read.
pub fn parse_multiline(
    input: &[u8],
    searched: &mut usize,
) -> Result<Option<(bool, usize)>, SessionError> {
    let Some((ok, status_len)) = parse_status(input)? else {
        return Ok(None);
    };
    if !ok {
        return Ok(Some((false, status_len)));
    }
    if input[status_len..].starts_with(b".\r\n") {
        return Ok(Some((true, status_len + 3)));
    }
    // The status line's own CRLF may open the terminator of an empty payload.
    let from = (*searched).max(status_len.saturating_sub(2));
    match memchr::memmem::find(&input[from..], b"\r\n.\r\n") {
        Some(at) => Ok(Some((true, from + at + 5))),
        None => {
            // The terminator may straddle the end: re-scan its first four octets next time.
            *searched = input.len().saturating_sub(4).max(from);
            Ok(None)
        }
    }
}

/// The payload of a complete `+OK` multi-line response: after the status line, before
/// the final `.` CRLF, still dot-stuffed; it ends with CRLF unless empty.
pub fn multiline_payload(response: &[u8]) -> &[u8] {
    let status_len = memchr::memchr(b'\n', response).map_or(response.len(), |at| at + 1);
    &response[status_len..response.len().saturating_sub(3).max(status_len)]
}

/// Parses LIST's payload (`msg octets` per line) into message numbers and sizes.
pub fn parse_list(payload: &[u8]) -> Result<Vec<(u64, u64)>, SessionError> {
    let mut entries = Vec::new();
    for line in payload.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        if entries.len() >= MAX_MESSAGES_PER_MAILBOX {
            return Err(SessionError::TooLong(MAX_MESSAGES_PER_MAILBOX));
        }
        let text = std::str::from_utf8(line)
            .map_err(|_| SessionError::Malformed("LIST line is not text"))?;
        let mut fields = text.split_ascii_whitespace();
        let (Some(number), Some(size)) = (fields.next(), fields.next()) else {
            return Err(SessionError::Malformed("LIST line without number and size"));
        };
        let number = number
            .parse()
            .map_err(|_| SessionError::Malformed("LIST message number"))?;
        let size = size
            .parse()
            .map_err(|_| SessionError::Malformed("LIST message size"))?;
        entries.push((number, size));
    }
    Ok(entries)
}

/// What `loadgen pop3` was asked to do.
#[derive(Debug, Clone)]
pub struct Pop3Plan {
    /// Server address.
    pub target: SocketAddr,
    /// Users; each is retrieved once.
    pub users: Pattern,
    /// Password of every user.
    pub password: String,
    /// Concurrent connections in total.
    pub connections: u64,
    /// DELE each message after RETR.
    pub delete: bool,
    /// Check checksums.
    pub verify: bool,
    /// Threads.
    pub threads: usize,
    /// Largest message we buffer.
    pub max_message_bytes: usize,
    /// `--tls`: STLS after the greeting with this client configuration.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// `--login-first`: in rounds of `connections` users, log all in, then retrieve all.
    pub login_first: bool,
    /// `--pipelining`: keep up to [`PIPELINE_WINDOW`] RETR (and DELE) commands outstanding
    /// when the server's CAPA lists PIPELINING (RFC 2449).
    pub pipelining: bool,
}

/// Initial receive buffer: several 10 KiB responses per read when pipelining (16 KiB held
/// about one and a half).
const RECEIVE_BUFFER_BYTES: usize = 128 * 1024;

/// Commands a pipelining session keeps outstanding. Refilled in batches, one write each, when
/// half of them have been answered.
pub const PIPELINE_WINDOW: usize = 32;

/// What one thread shares between its connections.
struct ThreadState {
    /// The plan.
    plan: Pop3Plan,
    /// Next user index, shared by all threads so each user is taken once.
    next_user: Arc<AtomicU64>,
    /// Counters for the summary.
    stats: RefCell<Stats>,
    /// Counters for the status line.
    live: Arc<Live>,
    /// Errors printed so far.
    printed_errors: Cell<u64>,
}

impl ThreadState {
    fn print_error(&self, error: &dyn std::fmt::Display) {
        let printed = self.printed_errors.get();
        if printed < MAX_PRINTED_ERRORS {
            eprintln!("loadgen pop3: {error}");
            self.printed_errors.set(printed + 1);
        }
    }
}

/// Runs this thread's connections until every user has been taken.
pub async fn run_thread(
    plan: Pop3Plan,
    thread_index: usize,
    live: Arc<Live>,
    next_user: Arc<AtomicU64>,
) -> Stats {
    let connections = share(plan.connections, plan.threads as u64, thread_index as u64);
    let state = Rc::new(ThreadState {
        plan,
        next_user,
        stats: RefCell::new(Stats::default()),
        live,
        printed_errors: Cell::new(0),
    });
    if state.plan.login_first {
        rounds(state.clone(), connections).await;
    } else {
        let tasks: Vec<_> = (0..connections)
            .map(|_| glommio::spawn_local(connection_loop(state.clone())))
            .collect();
        for task in tasks {
            task.await;
        }
    }
    let stats = state.stats.borrow().clone();
    stats
}

/// Takes users one at a time and retrieves each mailbox on its own connection.
async fn connection_loop(state: Rc<ThreadState>) {
    let plan = &state.plan;
    loop {
        let index = state.next_user.fetch_add(1, Ordering::Relaxed);
        if index >= plan.users.count() {
            return;
        }
        let user = plan.users.nth(index);
        let Some(mut conn) = open(&state, &user).await else {
            continue;
        };
        let result = match log_in(&state, &mut conn, &user).await {
            Ok(true) => retrieve(&state, &mut conn, &user).await,
            Ok(false) => Ok(()),
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            session_error(&state, &user, &error);
        }
    }
}

/// `--login-first`: rounds of `connections` users. Every session of a round logs in before
/// any retrieves, and the retrieval half of each round is timed on its own, so that
/// password hashing (argon2id costs tens of milliseconds of CPU) never runs beside the
/// retrieval being measured.
async fn rounds(state: Rc<ThreadState>, connections: u64) {
    loop {
        let mut users = Vec::new();
        while (users.len() as u64) < connections {
            let index = state.next_user.fetch_add(1, Ordering::Relaxed);
            if index >= state.plan.users.count() {
                break;
            }
            users.push(state.plan.users.nth(index));
        }
        if users.is_empty() {
            return;
        }
        let logins: Vec<_> = users
            .into_iter()
            .map(|user| {
                let state = state.clone();
                glommio::spawn_local(async move {
                    let mut conn = open(&state, &user).await?;
                    match log_in(&state, &mut conn, &user).await {
                        Ok(true) => Some((conn, user)),
                        Ok(false) => None,
                        Err(error) => {
                            session_error(&state, &user, &error);
                            None
                        }
                    }
                })
            })
            .collect();
        let mut sessions = Vec::new();
        for login in logins {
            sessions.extend(login.await);
        }
        let retrieval_start = Instant::now();
        let retrievals: Vec<_> = sessions
            .into_iter()
            .map(|(mut conn, user)| {
                let state = state.clone();
                glommio::spawn_local(async move {
                    if let Err(error) = retrieve(&state, &mut conn, &user).await {
                        session_error(&state, &user, &error);
                    }
                })
            })
            .collect();
        for retrieval in retrievals {
            retrieval.await;
        }
        state.stats.borrow_mut().retrieval_wall += retrieval_start.elapsed();
    }
}

fn session_error(state: &ThreadState, user: &str, error: &SessionError) {
    state.stats.borrow_mut().protocol_errors += 1;
    Live::add(&state.live.errors, 1);
    state.print_error(&format_args!("{user}: {error}"));
}

/// Connects for `user`, counting a failure.
async fn open(state: &ThreadState, user: &str) -> Option<Conn> {
    let plan = &state.plan;
    let connect_start = Instant::now();
    let frame_limit = plan.max_message_bytes + MAX_STATUS_LINE_BYTES;
    match Conn::connect(plan.target, RECEIVE_BUFFER_BYTES, frame_limit).await {
        Ok(conn) => {
            state
                .stats
                .borrow_mut()
                .record("connect", connect_start.elapsed());
            Some(conn)
        }
        Err(error) => {
            state.stats.borrow_mut().connect_errors += 1;
            Live::add(&state.live.errors, 1);
            state.print_error(&format_args!(
                "connect to {} for {user}: {error}",
                plan.target
            ));
            None
        }
    }
}

/// Sends `command` and reads a status line; counts the reply.
async fn command(
    state: &ThreadState,
    conn: &mut Conn,
    command: &[u8],
) -> Result<(bool, Range<usize>), SessionError> {
    conn.send(command).await?;
    status(state, conn).await
}

/// Reads a status line; counts it.
async fn status(
    state: &ThreadState,
    conn: &mut Conn,
) -> Result<(bool, Range<usize>), SessionError> {
    let mut ok = false;
    let range = conn
        .read_frame(|input| {
            Ok(parse_status(input)?.map(|(is_ok, len)| {
                ok = is_ok;
                len
            }))
        })
        .await?;
    state.stats.borrow_mut().count_reply(u16::from(ok));
    Ok((ok, range))
}

/// Sends `command` and reads a multi-line response; counts it.
async fn multiline(
    state: &ThreadState,
    conn: &mut Conn,
    command: &[u8],
) -> Result<(bool, Range<usize>), SessionError> {
    conn.send(command).await?;
    read_multiline(state, conn).await
}

/// Reads a multi-line response; counts it.
async fn read_multiline(
    state: &ThreadState,
    conn: &mut Conn,
) -> Result<(bool, Range<usize>), SessionError> {
    let mut ok = false;
    let mut searched = 0;
    let range = conn
        .read_frame(|input| {
            Ok(parse_multiline(input, &mut searched)?.map(|(is_ok, len)| {
                ok = is_ok;
                len
            }))
        })
        .await?;
    state.stats.borrow_mut().count_reply(u16::from(ok));
    Ok((ok, range))
}

/// Fails the session unless the reply was +OK.
fn require_ok(
    conn: &Conn,
    step: &'static str,
    reply: (bool, Range<usize>),
) -> Result<(), SessionError> {
    if reply.0 {
        Ok(())
    } else {
        Err(SessionError::Unexpected {
            step,
            reply: first_line(&conn.bytes()[reply.1]),
        })
    }
}

/// One mailbox: greeting, USER/PASS, STAT, LIST, RETR (and DELE) each message, QUIT.
/// Greeting, STLS under `--tls`, USER/PASS. False when the login was refused (counted, and
/// the session ended with QUIT).
async fn log_in(state: &ThreadState, conn: &mut Conn, user: &str) -> Result<bool, SessionError> {
    let plan = &state.plan;
    let greeting = status(state, conn).await?;
    require_ok(conn, "greeting", greeting)?;
    if let Some(tls) = &plan.tls {
        let handshake_start = Instant::now();
        let reply = command(state, conn, b"STLS\r\n").await?;
        require_ok(conn, "STLS", reply)?;
        conn.start_tls(tls).await?;
        state
            .stats
            .borrow_mut()
            .record("tls_handshake", handshake_start.elapsed());
    }
    let login_start = Instant::now();
    let reply = command(state, conn, format!("USER {user}\r\n").as_bytes()).await?;
    let accepted = if reply.0 {
        command(
            state,
            conn,
            format!("PASS {}\r\n", plan.password).as_bytes(),
        )
        .await?
        .0
    } else {
        false
    };
    if !accepted {
        state.stats.borrow_mut().login_failures += 1;
        Live::add(&state.live.errors, 1);
        state.print_error(&format_args!("{user}: login refused"));
        let _ = command(state, conn, b"QUIT\r\n").await;
        return Ok(false);
    }
    state
        .stats
        .borrow_mut()
        .record("login", login_start.elapsed());
    Ok(true)
}

/// STAT, LIST, RETR (and DELE) every message, QUIT.
async fn retrieve(state: &ThreadState, conn: &mut Conn, user: &str) -> Result<(), SessionError> {
    let plan = &state.plan;
    let pipelining = plan.pipelining && server_pipelines(state, conn).await?;
    let reply = command(state, conn, b"STAT\r\n").await?;
    require_ok(conn, "STAT", reply)?;
    let reply = multiline(state, conn, b"LIST\r\n").await?;
    let list_range = reply.1.clone();
    require_ok(conn, "LIST", reply)?;
    let entries = parse_list(multiline_payload(&conn.bytes()[list_range]))?;
    let numbers: Vec<u64> = entries.into_iter().map(|(number, _size)| number).collect();
    if pipelining {
        retrieve_pipelined(state, conn, user, &numbers).await?;
    } else {
        for number in numbers {
            let retr_start = Instant::now();
            let reply = multiline(state, conn, format!("RETR {number}\r\n").as_bytes()).await?;
            if retrieved(state, conn, user, number, reply, retr_start) && plan.delete {
                let reply = command(state, conn, format!("DELE {number}\r\n").as_bytes()).await?;
                require_ok(conn, "DELE", reply)?;
            }
        }
    }
    let reply = command(state, conn, b"QUIT\r\n").await?;
    require_ok(conn, "QUIT", reply)
}

/// Whether the server's CAPA response lists PIPELINING.
async fn server_pipelines(state: &ThreadState, conn: &mut Conn) -> Result<bool, SessionError> {
    let (ok, range) = multiline(state, conn, b"CAPA\r\n").await?;
    Ok(ok
        && multiline_payload(&conn.bytes()[range])
            .split(|&b| b == b'\n')
            .any(|line| line.trim_ascii().eq_ignore_ascii_case(b"PIPELINING")))
}

/// A pipelined command waiting for its response.
enum Outstanding {
    Retr { number: u64, sent: Instant },
    Dele,
}

/// RETR (and DELE) every message in `numbers` with up to [`PIPELINE_WINDOW`] commands in flight.
async fn retrieve_pipelined(
    state: &ThreadState,
    conn: &mut Conn,
    user: &str,
    numbers: &[u64],
) -> Result<(), SessionError> {
    let delete = state.plan.delete;
    let per_message = if delete { 2 } else { 1 };
    let mut pending = numbers.iter().copied().peekable();
    let mut outstanding = std::collections::VecDeque::with_capacity(PIPELINE_WINDOW);
    let mut batch = Vec::new();
    loop {
        if outstanding.len() <= PIPELINE_WINDOW / 2 {
            batch.clear();
            let sent = Instant::now();
            while outstanding.len() + per_message <= PIPELINE_WINDOW {
                let Some(number) = pending.next() else { break };
                batch.extend_from_slice(format!("RETR {number}\r\n").as_bytes());
                outstanding.push_back(Outstanding::Retr { number, sent });
                if delete {
                    batch.extend_from_slice(format!("DELE {number}\r\n").as_bytes());
                    outstanding.push_back(Outstanding::Dele);
                }
            }
            if !batch.is_empty() {
                conn.send(&batch).await?;
            }
        }
        match outstanding.pop_front() {
            None => return Ok(()),
            Some(Outstanding::Retr { number, sent }) => {
                let reply = read_multiline(state, conn).await?;
                retrieved(state, conn, user, number, reply, sent);
            }
            Some(Outstanding::Dele) => {
                // A DELE of a message whose RETR failed fails too; only the RETR is counted.
                let _ = status(state, conn).await?;
            }
        }
    }
}

/// Counts one RETR response (and checks it under `--verify`); true when it was +OK.
fn retrieved(
    state: &ThreadState,
    conn: &Conn,
    user: &str,
    number: u64,
    reply: (bool, Range<usize>),
    retr_start: Instant,
) -> bool {
    if !reply.0 {
        // The message may have been deleted by another session meanwhile.
        state.stats.borrow_mut().messages_refused += 1;
        Live::add(&state.live.errors, 1);
        return false;
    }
    let payload = multiline_payload(&conn.bytes()[reply.1]);
    let octets = payload.len() as u64;
    let verdict = state.plan.verify.then(|| verify(&dot_unstuff(payload)));
    let mut stats = state.stats.borrow_mut();
    stats.record("retr", retr_start.elapsed());
    match verdict {
        Some(Verdict::Mismatch) => stats.verify_mismatches += 1,
        Some(Verdict::MissingHeader) => stats.verify_missing_header += 1,
        Some(Verdict::Intact) | None => {}
    }
    if matches!(verdict, Some(Verdict::Mismatch | Verdict::MissingHeader)) {
        Live::add(&state.live.errors, 1);
        if stats.verify_mismatches + stats.verify_missing_header <= MAX_PRINTED_ERRORS {
            let what = if verdict == Some(Verdict::Mismatch) {
                "body does not match its X-Loadgen-Checksum"
            } else {
                "no X-Loadgen-Checksum header"
            };
            eprintln!("loadgen pop3: {user} message {number}: {what}");
        }
    }
    stats.messages_ok += 1;
    stats.bytes_ok += octets;
    drop(stats);
    Live::add(&state.live.messages, 1);
    Live::add(&state.live.bytes, octets);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Input and the expected framing.
    type Case = (&'static [u8], Option<(bool, usize)>);

    #[test]
    fn status_lines() {
        let table: &[Case] = &[
            (b"+OK ready\r\n", Some((true, 11))),
            (b"-ERR [AUTH] no\r\n", Some((false, 16))),
            (b"+OK\r\nmore", Some((true, 5))),
            (b"+OK rea", None),
            (b"", None),
        ];
        for (input, want) in table {
            assert_eq!(parse_status(input).unwrap(), *want);
        }
        assert!(parse_status(b"* hello\r\n").is_err());
        assert!(parse_status(&vec![b'+'; 2000]).is_err());
    }

    #[test]
    fn multiline_responses() {
        let table: &[Case] = &[
            (b"+OK\r\n.\r\n", Some((true, 8))),
            (b"+OK 2 msgs\r\n1 10\r\n2 20\r\n.\r\n+OK", Some((true, 27))),
            (b"-ERR no\r\n", Some((false, 9))),
            (b"+OK\r\n..\r\nx\r\n.\r\n", Some((true, 15))),
            (b"+OK\r\na\r\n.", None),
            (b"+OK\r\na\r\n..\r\n", None),
        ];
        for (input, want) in table {
            assert_eq!(
                parse_multiline(input, &mut 0).unwrap(),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            multiline_payload(b"+OK\r\n..\r\nx\r\n.\r\n"),
            b"..\r\nx\r\n"
        );
        assert_eq!(multiline_payload(b"+OK\r\n.\r\n"), b"");
    }

    #[test]
    fn list_lines() {
        assert_eq!(
            parse_list(b"1 100\r\n2 2000\r\n").unwrap(),
            vec![(1, 100), (2, 2000)]
        );
        assert_eq!(parse_list(b"").unwrap(), vec![]);
        assert!(parse_list(b"1\r\n").is_err());
        assert!(parse_list(b"x 1\r\n").is_err());
    }

    #[test]
    fn retrieved_message_verifies_after_unstuffing() {
        let mut raw = Vec::new();
        crate::message::build_message(&mut raw, "f@x", "t@y", "id@l", 2048, 9).unwrap();
        let mut response = b"+OK 2048 octets\r\nReturn-Path: <f@x>\r\n".to_vec();
        crate::message::dot_stuff_into(&raw, &mut response);
        let (ok, len) = parse_multiline(&response, &mut 0).unwrap().unwrap();
        assert!(ok);
        assert_eq!(len, response.len());
        assert_eq!(
            verify(&dot_unstuff(multiline_payload(&response))),
            Verdict::Intact
        );
    }

    #[test]
    fn resumed_search_finds_terminators_across_reads() {
        let response = b"+OK\r\nline one\r\n..two\r\n.\r\n";
        for first in 0..response.len() {
            let mut searched = 0;
            let early = parse_multiline(&response[..first], &mut searched).unwrap();
            assert_eq!(early, None, "prefix of {first}");
            assert!(searched <= first);
            let whole = parse_multiline(response, &mut searched).unwrap();
            assert_eq!(whole, Some((true, response.len())), "split at {first}");
        }
        let mut searched = 0;
        assert_eq!(parse_multiline(b"+OK\r\n.", &mut searched).unwrap(), None);
        assert_eq!(
            parse_multiline(b"+OK\r\n.\r\n", &mut searched).unwrap(),
            Some((true, 8))
        );
    }

    proptest! {
        #[test]
        fn split_reads_frame_like_whole_ones(input in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a')], 0..60), split in 0usize..60) {
            let mut input = input;
            input.splice(0..0, b"+OK\r\n".iter().copied());
            let split = split.min(input.len());
            let whole = parse_multiline(&input, &mut 0).unwrap();
            let mut searched = 0;
            if parse_multiline(&input[..split], &mut searched).unwrap().is_none() {
                prop_assert_eq!(parse_multiline(&input, &mut searched).unwrap(), whole);
            }
        }

        #[test]
        fn framing_never_panics(input in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, len))) = parse_multiline(&input, &mut 0) {
                prop_assert!(len <= input.len());
                let _ = multiline_payload(&input[..len]);
            }
            let _ = parse_list(&input);
        }
    }
}
