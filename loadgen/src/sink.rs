//! `loadgen sink`: an SMTP server that accepts and counts mail as fast as it can.
//!
//! The session is a pure state machine (`Session::feed`: bytes in, replies out); the
//! connection loop reads, feeds, and writes all replies for a read in one write, so a
//! pipelining client gets one reply packet per command group.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};

use crate::message::dot_unstuff;

/// Longest command line (RFC 5321 §4.5.3.1.4 says 512; we are lenient but bounded).
const MAX_COMMAND_LINE_BYTES: usize = 2048;

/// Most recipients per transaction (RFC 5321 §4.5.3.1.8 asks for at least 100).
const MAX_RECIPIENTS: u32 = 1000;

/// Receive buffer per connection.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Idle connections are closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// io_uring registered-buffer memory per executor (see `pool`).
const IO_MEMORY_BYTES: usize = 512 * 1024;

/// Greeting sent on connect.
pub const GREETING: &[u8] = b"220 sink.loadgen.invalid ESMTP loadgen sink\r\n";

/// What a transaction's end of data gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// 250: accepted.
    Accept,
    /// 451: temporary failure.
    TempFail,
    /// 554: permanent failure.
    PermFail,
}

/// Decides the fate of the next transaction from what was decided so far, so that after
/// every transaction the counts are within one of the requested shares (in basis points):
/// a thread's first 100 transactions at 20 % tempfail hold 20 tempfails, evenly spread.
/// Permanent failures are due at rounded rather than floored points, so the two kinds
/// rarely fall due together (when they do, the 5xx follows one transaction later).
pub fn fate(counts: &Counts, tempfail_basis_points: u32, permfail_basis_points: u32) -> Fate {
    let decided = counts.accepted + counts.tempfailed + counts.permfailed + 1;
    let tempfail_due = decided * u64::from(tempfail_basis_points) / 10_000;
    if counts.tempfailed < tempfail_due {
        return Fate::TempFail;
    }
    let permfail_due = (decided * u64::from(permfail_basis_points) + 5_000) / 10_000;
    if counts.permfailed < permfail_due {
        return Fate::PermFail;
    }
    Fate::Accept
}

/// The sink's policy, the same for every session.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Share of transactions answered 451, in basis points (1/100 %).
    pub tempfail_basis_points: u32,
    /// Share of transactions answered 554, in basis points.
    pub permfail_basis_points: u32,
    /// Larger messages get 552; advertised as SIZE.
    pub max_message_bytes: usize,
    /// Keep the bytes of accepted messages (for `--keep`).
    pub keep: bool,
}

/// Per-thread counts; `fate` decides from them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Transactions that reached end of data.
    pub transactions: u64,
    /// Transactions answered 250.
    pub accepted: u64,
    /// Message octets (as received, dot-stuffed) of accepted transactions.
    pub accepted_bytes: u64,
    /// Transactions answered 451.
    pub tempfailed: u64,
    /// Transactions answered 554 by the `--permfail` share.
    pub permfailed: u64,
    /// Transactions answered 552: larger than the advertised SIZE.
    pub too_big: u64,
}

/// The size and LAST flag of `BDAT <size> [LAST]` (what follows the verb).
fn parse_bdat(arguments: &[u8]) -> Option<(usize, bool)> {
    let mut words = arguments
        .split(|&b| b == b' ')
        .filter(|word| !word.is_empty());
    let size = words.next()?;
    if size.is_empty() || size.len() > 18 || !size.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size = std::str::from_utf8(size).ok()?.parse().ok()?;
    let last = match words.next() {
        None => false,
        Some(word) if word.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return None,
    };
    words.next().is_none().then_some((size, last))
}

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading command lines.
    Command,
    /// Reading message data; the terminator scanner's progress is in `Session::data_match`.
    Data,
    /// Reading the octets of a BDAT chunk (RFC 3030), which are consumed even when the
    /// command is refused, so that they are never taken for commands.
    Chunk {
        remaining: usize,
        last: bool,
        refusal: Option<&'static [u8]>,
    },
    /// QUIT or a fatal error: no more input is read.
    Closed,
}

/// What one call of `feed` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Input octets consumed; the caller drops them.
    pub consumed: usize,
    /// A message was accepted and its bytes are in `Session::kept` (keep mode only).
    pub kept_message: bool,
    /// The connection should be closed after writing the replies.
    pub close: bool,
}

/// One SMTP server session, without I/O.
#[derive(Debug)]
pub struct Session {
    /// The policy.
    policy: Policy,
    /// Where we are.
    state: State,
    /// MAIL was accepted.
    has_sender: bool,
    /// Accepted RCPTs in this transaction.
    recipients: u32,
    /// Progress through CRLF "." CRLF: 0 none, 1 CR, 2 CRLF, 3 CRLF ".", 4 CRLF "." CR.
    data_match: u8,
    /// Data octets of this transaction so far (including the terminator).
    data_bytes: usize,
    /// The accepted message in keep mode, as it travelled: dot-stuffed with its terminator
    /// after DATA, the chunks' octets as they are after BDAT (see `kept_message`).
    pub kept: Vec<u8>,
    /// This transaction's content comes in BDAT chunks: DATA is out of order until it ends.
    chunked: bool,
    /// `kept` holds BDAT octets rather than DATA's stuffed form.
    kept_chunked: bool,
}

impl Session {
    /// A new session; the caller sends `GREETING` first.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            state: State::Command,
            has_sender: false,
            recipients: 0,
            data_match: 0,
            data_bytes: 0,
            kept: Vec::new(),
            chunked: false,
            kept_chunked: false,
        }
    }

    /// The kept message as the client meant it: unstuffed, without DATA's terminator.
    pub fn kept_message(&self) -> Vec<u8> {
        if self.kept_chunked {
            self.kept.clone()
        } else {
            dot_unstuff(&self.kept[..self.kept.len().saturating_sub(3)])
        }
    }

    /// Processes as much of `input` as possible, appending replies to `replies`.
    /// Stops early after a kept message, so the caller can store it.
    pub fn feed(&mut self, input: &[u8], replies: &mut Vec<u8>, counts: &mut Counts) -> Step {
        let mut consumed = 0;
        loop {
            let rest = &input[consumed..];
            match self.state {
                State::Closed => return self.step(consumed, false),
                State::Data => {
                    let (used, done) = self.scan_data(rest);
                    if self.policy.keep && self.data_bytes <= self.policy.max_message_bytes {
                        self.kept.extend_from_slice(&rest[..used]);
                    }
                    consumed += used;
                    if !done {
                        return self.step(consumed, false);
                    }
                    let message_bytes = self.data_bytes.saturating_sub(3);
                    let kept = self.end_of_data(message_bytes, replies, counts);
                    if kept {
                        return self.step(consumed, true);
                    }
                }
                State::Chunk {
                    remaining,
                    last,
                    refusal,
                } => {
                    let used = remaining.min(rest.len());
                    if refusal.is_none()
                        && self.policy.keep
                        && self.data_bytes + used <= self.policy.max_message_bytes
                    {
                        self.kept.extend_from_slice(&rest[..used]);
                    }
                    self.data_bytes += used;
                    consumed += used;
                    if used < remaining {
                        self.state = State::Chunk {
                            remaining: remaining - used,
                            last,
                            refusal,
                        };
                        return self.step(consumed, false);
                    }
                    self.state = State::Command;
                    if let Some(refusal) = refusal {
                        replies.extend_from_slice(refusal);
                        self.reset();
                    } else if last {
                        if self.end_of_data(self.data_bytes, replies, counts) {
                            return self.step(consumed, true);
                        }
                    } else {
                        replies.extend_from_slice(
                            format!("250 2.0.0 {} octets received\r\n", self.data_bytes).as_bytes(),
                        );
                    }
                }
                State::Command => {
                    let Some(newline) = memchr::memchr(b'\n', rest) else {
                        if rest.len() > MAX_COMMAND_LINE_BYTES {
                            replies.extend_from_slice(b"500 5.5.2 Line too long\r\n");
                            self.state = State::Closed;
                            return self.step(input.len(), false);
                        }
                        return self.step(consumed, false);
                    };
                    if newline > MAX_COMMAND_LINE_BYTES {
                        replies.extend_from_slice(b"500 5.5.2 Line too long\r\n");
                        self.state = State::Closed;
                        return self.step(input.len(), false);
                    }
                    let line = &rest[..newline];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    self.command(line, replies);
                    consumed += newline + 1;
                }
            }
        }
    }

    fn step(&self, consumed: usize, kept_message: bool) -> Step {
        Step {
            consumed,
            kept_message,
            close: self.state == State::Closed,
        }
    }

    /// Answers one command line.
    fn command(&mut self, line: &[u8], replies: &mut Vec<u8>) {
        let verb_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
        let verb = &line[..verb_end];
        let is = |name: &str| verb.eq_ignore_ascii_case(name.as_bytes());
        if is("EHLO") {
            self.reset();
            replies.extend_from_slice(
                format!(
                    "250-sink.loadgen.invalid\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 SIZE {}\r\n",
                    self.policy.max_message_bytes
                )
                .as_bytes(),
            );
        } else if is("HELO") {
            self.reset();
            replies.extend_from_slice(b"250 sink.loadgen.invalid\r\n");
        } else if is("MAIL") {
            if self.has_sender {
                replies.extend_from_slice(b"503 5.5.1 Nested MAIL command\r\n");
            } else {
                self.has_sender = true;
                replies.extend_from_slice(b"250 2.1.0 Ok\r\n");
            }
        } else if is("RCPT") {
            if !self.has_sender {
                replies.extend_from_slice(b"503 5.5.1 Need MAIL first\r\n");
            } else if self.recipients >= MAX_RECIPIENTS {
                replies.extend_from_slice(b"452 4.5.3 Too many recipients\r\n");
            } else {
                self.recipients += 1;
                replies.extend_from_slice(b"250 2.1.5 Ok\r\n");
            }
        } else if is("DATA") {
            if self.chunked {
                replies.extend_from_slice(b"503 5.5.1 DATA after BDAT\r\n");
            } else if self.recipients == 0 {
                replies.extend_from_slice(b"554 5.5.1 No valid recipients\r\n");
            } else {
                self.state = State::Data;
                // DATA's own CRLF counts as the line start before a possible ".".
                self.data_match = 2;
                self.data_bytes = 0;
                self.kept.clear();
                replies.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
            }
        } else if is("BDAT") {
            let Some((size, last)) = parse_bdat(&line[verb_end..]) else {
                // Without a size, where the chunk ends is unknown: nothing after it can be
                // read as a command.
                replies.extend_from_slice(b"501 5.5.4 Syntax: BDAT <size> [LAST]\r\n");
                self.state = State::Closed;
                return;
            };
            let refusal: Option<&'static [u8]> = if self.recipients == 0 {
                Some(b"554 5.5.1 No valid recipients\r\n")
            } else {
                None
            };
            if refusal.is_none() && !self.chunked {
                self.chunked = true;
                self.data_bytes = 0;
                self.kept.clear();
            }
            self.state = State::Chunk {
                remaining: size,
                last,
                refusal,
            };
        } else if is("RSET") {
            self.reset();
            replies.extend_from_slice(b"250 2.0.0 Ok\r\n");
        } else if is("NOOP") {
            replies.extend_from_slice(b"250 2.0.0 Ok\r\n");
        } else if is("QUIT") {
            replies.extend_from_slice(b"221 2.0.0 Bye\r\n");
            self.state = State::Closed;
        } else if is("VRFY") {
            replies.extend_from_slice(b"252 2.5.2 Cannot VRFY user\r\n");
        } else {
            replies.extend_from_slice(b"502 5.5.2 Command not recognized\r\n");
        }
    }

    /// Forgets the transaction.
    fn reset(&mut self) {
        self.has_sender = false;
        self.recipients = 0;
        self.chunked = false;
    }

    /// Scans message data for the terminator; returns octets used and whether it was found.
    fn scan_data(&mut self, input: &[u8]) -> (usize, bool) {
        let mut at = 0;
        while at < input.len() {
            if self.data_match == 0 {
                match memchr::memchr(b'\r', &input[at..]) {
                    Some(offset) => at += offset,
                    None => {
                        at = input.len();
                        break;
                    }
                }
            }
            let byte = input[at];
            at += 1;
            self.data_match = match (self.data_match, byte) {
                (3, b'\r') => 4,
                (4, b'\n') => {
                    self.data_bytes += at;
                    return (at, true);
                }
                (1, b'\n') => 2,
                (2, b'.') => 3,
                (_, b'\r') => 1,
                _ => 0,
            };
        }
        self.data_bytes += at;
        (at, false)
    }

    /// Answers the end of a message of `message_bytes` octets (after DATA's terminator or
    /// BDAT LAST's chunk); returns whether a kept message is ready.
    fn end_of_data(
        &mut self,
        message_bytes: usize,
        replies: &mut Vec<u8>,
        counts: &mut Counts,
    ) -> bool {
        self.state = State::Command;
        let index = counts.transactions;
        counts.transactions += 1;
        let too_big = message_bytes > self.policy.max_message_bytes;
        let fate = if too_big {
            Fate::PermFail
        } else {
            fate(
                counts,
                self.policy.tempfail_basis_points,
                self.policy.permfail_basis_points,
            )
        };
        self.kept_chunked = self.chunked;
        self.reset();
        match fate {
            Fate::Accept => {
                counts.accepted += 1;
                counts.accepted_bytes += message_bytes as u64;
                replies
                    .extend_from_slice(format!("250 2.0.0 Ok: queued as {index:x}\r\n").as_bytes());
                self.policy.keep
            }
            Fate::TempFail => {
                counts.tempfailed += 1;
                replies.extend_from_slice(
                    b"451 4.3.0 Temporary failure (loadgen sink --tempfail)\r\n",
                );
                false
            }
            Fate::PermFail if too_big => {
                counts.too_big += 1;
                replies.extend_from_slice(b"552 5.3.4 Message too big\r\n");
                false
            }
            Fate::PermFail => {
                counts.permfailed += 1;
                replies.extend_from_slice(b"554 5.6.0 Rejected (loadgen sink --permfail)\r\n");
                false
            }
        }
    }
}

/// What `loadgen sink` was asked to do.
#[derive(Debug, Clone)]
pub struct SinkPlan {
    /// Address to listen on (every thread binds it with SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Share answered 451, basis points.
    pub tempfail_basis_points: u32,
    /// Share answered 554, basis points.
    pub permfail_basis_points: u32,
    /// Directory for kept messages.
    pub keep: Option<PathBuf>,
    /// Threads.
    pub threads: usize,
    /// Largest message accepted.
    pub max_message_bytes: usize,
    /// Interval between count lines; zero prints only at exit.
    pub print_every: Duration,
}

/// Totals across threads, for the count lines.
#[derive(Debug, Default)]
struct Totals {
    /// Connections accepted.
    connections: AtomicU64,
    /// Messages accepted.
    accepted: AtomicU64,
    /// Octets accepted.
    accepted_bytes: AtomicU64,
    /// Transactions answered 4xx.
    tempfailed: AtomicU64,
    /// Transactions answered 5xx (the --permfail share and messages over SIZE).
    permfailed: AtomicU64,
    /// Kept messages that could not be written.
    keep_errors: AtomicU64,
}

impl Totals {
    fn line(&self, elapsed: Duration, messages_per_sec: f64) -> String {
        format!(
            "[{:>6.1}s] sink: connections {} accepted {} ({} bytes) tempfailed {} permfailed {} keep errors {}  {:.0} msgs/s",
            elapsed.as_secs_f64(),
            self.connections.load(Ordering::Relaxed),
            self.accepted.load(Ordering::Relaxed),
            self.accepted_bytes.load(Ordering::Relaxed),
            self.tempfailed.load(Ordering::Relaxed),
            self.permfailed.load(Ordering::Relaxed),
            self.keep_errors.load(Ordering::Relaxed),
            messages_per_sec
        )
    }
}

/// Runs the sink until SIGINT or SIGTERM, then prints the totals.
pub fn run(plan: SinkPlan) -> anyhow::Result<()> {
    if plan.listen.port() == 0 {
        anyhow::bail!("sink needs a fixed port: every thread binds the same one (SO_REUSEPORT)");
    }
    // Every thread binds with SO_REUSEPORT, which would let us share a port with another
    // server that also set it (and silently take part of its connections).
    crate::pool::refuse_if_listening(plan.listen)?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let totals = Arc::new(Totals::default());
    let bound = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(AtomicBool::new(false));
    let next_index = Arc::new(AtomicUsize::new(0));
    let threads = plan.threads;
    {
        let totals = totals.clone();
        let bound = bound.clone();
        let failed = failed.clone();
        let plan = plan.clone();
        // Handles are not joined: the executors serve until the process exits.
        let _handles = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(threads))
            .name("sink")
            .io_memory(IO_MEMORY_BYTES)
            .on_all_shards(move || {
                let index = next_index.fetch_add(1, Ordering::Relaxed);
                serve_thread(plan, index, totals, bound, failed)
            })
            .map_err(std::io::Error::from)?;
    }
    while bound.lock().map_or(0, |fds| fds.len()) < threads {
        if failed.load(Ordering::Acquire) {
            anyhow::bail!("cannot listen on {}", plan.listen);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("sink listening on {} ({threads} threads)", plan.listen);
    let started = Instant::now();
    let mut last_print = started;
    let mut last_accepted = 0;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        if !plan.print_every.is_zero() && now.duration_since(last_print) >= plan.print_every {
            let accepted = totals.accepted.load(Ordering::Relaxed);
            let rate =
                (accepted - last_accepted) as f64 / now.duration_since(last_print).as_secs_f64();
            println!("{}", totals.line(now.duration_since(started), rate));
            last_print = now;
            last_accepted = accepted;
        }
    }
    let elapsed = started.elapsed();
    let accepted = totals.accepted.load(Ordering::Relaxed);
    println!(
        "{}",
        totals.line(elapsed, accepted as f64 / elapsed.as_secs_f64().max(1e-9))
    );
    println!("sink: stopped");
    // Stop listening now: io_uring tears a ring down after the process is gone, and its
    // pending accepts would keep the port listening for a while, refusing the next sink.
    STOPPING.store(true, Ordering::Release);
    if let Ok(fds) = bound.lock() {
        for &fd in fds.iter() {
            // SAFETY: the fds are our listeners, open until the process exits below.
            let listener = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let _ = socket2::SockRef::from(&listener).shutdown(std::net::Shutdown::Both);
        }
    }
    // Executors serve forever; the process exit ends them.
    std::process::exit(0);
}

/// Set just before the listeners are shut down, so the accept errors that follow are
/// expected rather than reported.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// A listening socket on `address` shared by all threads through SO_REUSEPORT.
fn listen_reuseport(address: SocketAddr) -> std::io::Result<RawFd> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into_raw_fd())
}

/// One executor: bind, accept, serve each connection as its own task.
async fn serve_thread(
    plan: SinkPlan,
    thread_index: usize,
    totals: Arc<Totals>,
    bound: Arc<Mutex<Vec<RawFd>>>,
    failed: Arc<AtomicBool>,
) {
    let fd = match listen_reuseport(plan.listen) {
        Ok(fd) => fd,
        Err(error) => {
            eprintln!("loadgen sink: cannot listen on {}: {error}", plan.listen);
            failed.store(true, Ordering::Release);
            return;
        }
    };
    // SAFETY: `fd` is a listening socket we just made and hand over to glommio; the copy
    // kept in `bound` is only used to shut it down just before the process exits.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    if let Ok(mut fds) = bound.lock() {
        fds.push(fd);
    }
    let policy = Policy {
        tempfail_basis_points: plan.tempfail_basis_points,
        permfail_basis_points: plan.permfail_basis_points,
        max_message_bytes: plan.max_message_bytes,
        keep: plan.keep.is_some(),
    };
    let counts = std::rc::Rc::new(std::cell::RefCell::new(Counts::default()));
    let kept_files = std::rc::Rc::new(std::cell::Cell::new(0u64));
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(_) if STOPPING.load(Ordering::Acquire) => return,
            Err(error) => {
                eprintln!("loadgen sink: accept: {error}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        totals.connections.fetch_add(1, Ordering::Relaxed);
        let connection = Connection {
            session: Session::new(policy.clone()),
            totals: totals.clone(),
            counts: counts.clone(),
            keep_dir: plan.keep.clone(),
            thread_index,
            kept_files: kept_files.clone(),
        };
        glommio::spawn_local(async move {
            // A broken client connection only ends that connection.
            let _ = connection.serve(stream).await;
        })
        .detach();
    }
}

/// One accepted connection.
struct Connection {
    /// The protocol state machine.
    session: Session,
    /// Totals for the count lines.
    totals: Arc<Totals>,
    /// This thread's counts (the transaction index for `fate`).
    counts: std::rc::Rc<std::cell::RefCell<Counts>>,
    /// `--keep` directory.
    keep_dir: Option<PathBuf>,
    /// Thread index, part of kept file names.
    thread_index: usize,
    /// Kept files written by this thread, the other part of their names.
    kept_files: std::rc::Rc<std::cell::Cell<u64>>,
}

impl Connection {
    async fn serve(mut self, mut stream: TcpStream) -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
        stream.write_all(GREETING).await?;
        let mut buffer = vec![0u8; READ_BUFFER_BYTES];
        let mut end = 0;
        let mut replies = Vec::with_capacity(4096);
        loop {
            let received = stream.read(&mut buffer[end..]).await?;
            if received == 0 {
                return Ok(());
            }
            end += received;
            let mut start = 0;
            let mut close = false;
            loop {
                let before = self.counts.borrow().clone();
                let step = self.session.feed(
                    &buffer[start..end],
                    &mut replies,
                    &mut self.counts.borrow_mut(),
                );
                start += step.consumed;
                self.publish(&before);
                if step.kept_message {
                    self.keep().await;
                }
                if step.close {
                    close = true;
                    break;
                }
                if !step.kept_message {
                    break;
                }
            }
            if !replies.is_empty() {
                stream.write_all(&replies).await?;
                replies.clear();
            }
            if close {
                return Ok(());
            }
            buffer.copy_within(start..end, 0);
            end -= start;
        }
    }

    /// Adds what the last feed counted to the shared totals.
    fn publish(&self, before: &Counts) {
        let after = self.counts.borrow();
        if after.transactions == before.transactions {
            return;
        }
        let totals = &self.totals;
        totals
            .accepted
            .fetch_add(after.accepted - before.accepted, Ordering::Relaxed);
        totals.accepted_bytes.fetch_add(
            after.accepted_bytes - before.accepted_bytes,
            Ordering::Relaxed,
        );
        totals
            .tempfailed
            .fetch_add(after.tempfailed - before.tempfailed, Ordering::Relaxed);
        totals.permfailed.fetch_add(
            after.permfailed + after.too_big - before.permfailed - before.too_big,
            Ordering::Relaxed,
        );
    }

    /// Writes the kept message, unstuffed and without its terminator, with glommio's file
    /// API so the executor never blocks.
    async fn keep(&mut self) {
        let Some(dir) = &self.keep_dir else { return };
        let bytes = self.session.kept_message();
        let number = self.kept_files.get();
        self.kept_files.set(number + 1);
        let path = dir.join(format!("{}-{number}.eml", self.thread_index));
        let result = async {
            let file = glommio::io::BufferedFile::create(&path).await?;
            file.write_at(bytes, 0).await?;
            file.close().await
        }
        .await;
        if let Err(error) = result {
            if self.totals.keep_errors.fetch_add(1, Ordering::Relaxed) < 5 {
                eprintln!("loadgen sink: cannot keep {}: {error}", path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(keep: bool) -> Policy {
        Policy {
            tempfail_basis_points: 0,
            permfail_basis_points: 0,
            max_message_bytes: 1000,
            keep,
        }
    }

    /// Feeds the whole input (re-feeding after kept messages) and returns the replies.
    fn run(session: &mut Session, input: &[u8], counts: &mut Counts) -> (String, Step) {
        let mut replies = Vec::new();
        let mut at = 0;
        loop {
            let step = session.feed(&input[at..], &mut replies, counts);
            at += step.consumed;
            if !step.kept_message || step.close {
                return (String::from_utf8(replies).unwrap(), step);
            }
        }
    }

    #[test]
    fn dialogue_byte_by_byte_and_pipelined() {
        let input = b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nSubject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n";
        let want = "250-sink.loadgen.invalid\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 SIZE 1000\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as 0\r\n221 2.0.0 Bye\r\n";
        let mut counts = Counts::default();
        let (replies, step) = run(&mut Session::new(policy(false)), input, &mut counts);
        assert_eq!(replies, want);
        assert!(step.close);
        assert_eq!(counts.accepted, 1);
        assert_eq!(counts.accepted_bytes, 21);

        // The same dialogue one byte at a time.
        let mut session = Session::new(policy(false));
        let mut counts = Counts::default();
        let mut replies = Vec::new();
        let mut pending = Vec::new();
        for &byte in input.iter() {
            pending.push(byte);
            let step = session.feed(&pending, &mut replies, &mut counts);
            pending.drain(..step.consumed);
        }
        assert_eq!(String::from_utf8(replies).unwrap(), want);
        assert_eq!(counts.accepted, 1);
    }

    #[test]
    fn bdat_chunks_byte_by_byte_and_pipelined() {
        // The chunks hold what would end DATA, a bare LF and a leading dot: octets, not lines.
        let input = b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 5\r\nab\r\n.BDAT 4 LAST\r\n\r\nx\nQUIT\r\n";
        let mut whole = Session::new(policy(true));
        let mut counts = Counts::default();
        let (replies, _) = run(&mut whole, input, &mut counts);
        let tail = "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 5 octets received\r\n250 2.0.0 Ok: queued as 0\r\n221 2.0.0 Bye\r\n";
        assert!(replies.ends_with(tail), "{replies}");
        assert!(replies.contains("250-CHUNKING\r\n"));
        assert_eq!((counts.accepted, counts.accepted_bytes), (1, 9));

        let mut session = Session::new(policy(true));
        let mut counts = Counts::default();
        let mut replies = Vec::new();
        let mut pending = Vec::new();
        let mut kept = None;
        for &byte in input.iter() {
            pending.push(byte);
            let step = session.feed(&pending, &mut replies, &mut counts);
            pending.drain(..step.consumed);
            if step.kept_message {
                kept = Some(session.kept_message());
            }
        }
        assert!(String::from_utf8(replies).unwrap().ends_with(tail));
        assert_eq!(kept.as_deref(), Some(&b"ab\r\n.\r\nx\n"[..]));
    }

    #[test]
    fn bdat_refusals_still_consume_the_chunk() {
        let table: &[(&[u8], &str, bool)] = &[
            // No recipients: the 5 octets "NOOP\n" are data, not a command.
            (
                b"BDAT 5 LAST\r\nNOOP\nRSET\r\n",
                "554 5.5.1 No valid recipients\r\n250 2.0.0 Ok\r\n",
                false,
            ),
            (b"BDAT x\r\nNOOP\r\n", "501 5.5.4 Syntax: BDAT <size> [LAST]\r\n", true),
            (b"BDAT 1 FIRST\r\nx", "501 5.5.4 Syntax: BDAT <size> [LAST]\r\n", true),
            (
                b"MAIL FROM:<>\r\nRCPT TO:<b@y>\r\nBDAT 1\r\nxDATA\r\n",
                "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 1 octets received\r\n503 5.5.1 DATA after BDAT\r\n",
                false,
            ),
        ];
        for (input, want, closed) in table {
            let (replies, step) = run(
                &mut Session::new(policy(false)),
                input,
                &mut Counts::default(),
            );
            assert_eq!(replies, *want, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(step.close, *closed);
        }
    }

    #[test]
    fn keeps_message_bytes() {
        let mut session = Session::new(policy(true));
        let mut counts = Counts::default();
        let mut replies = Vec::new();
        let input = b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@y>\r\nDATA\r\na\r\n.\r\nNOOP\r\n";
        let step = session.feed(input, &mut replies, &mut counts);
        assert!(step.kept_message);
        assert_eq!(&session.kept[..], b"a\r\n.\r\n");
        let step2 = session.feed(&input[step.consumed..], &mut replies, &mut counts);
        assert_eq!(step.consumed + step2.consumed, input.len());
        assert!(String::from_utf8(replies)
            .unwrap()
            .ends_with("250 2.0.0 Ok\r\n"));
    }

    #[test]
    fn sequencing_errors() {
        let table: &[(&[u8], &str)] = &[
            (b"RCPT TO:<a@b>\r\n", "503 5.5.1 Need MAIL first\r\n"),
            (b"DATA\r\n", "554 5.5.1 No valid recipients\r\n"),
            (
                b"MAIL FROM:<>\r\nMAIL FROM:<>\r\n",
                "250 2.1.0 Ok\r\n503 5.5.1 Nested MAIL command\r\n",
            ),
            (b"BOGUS\r\n", "502 5.5.2 Command not recognized\r\n"),
            (b"VRFY x\r\n", "252 2.5.2 Cannot VRFY user\r\n"),
            (
                b"MAIL FROM:<>\r\nRSET\r\nRCPT TO:<a@b>\r\n",
                "250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n503 5.5.1 Need MAIL first\r\n",
            ),
        ];
        for (input, want) in table {
            let (replies, _) = run(
                &mut Session::new(policy(false)),
                input,
                &mut Counts::default(),
            );
            assert_eq!(replies, *want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn long_lines_and_big_messages_are_refused() {
        let mut long = vec![b'A'; MAX_COMMAND_LINE_BYTES + 1];
        let (replies, step) = run(
            &mut Session::new(policy(false)),
            &long,
            &mut Counts::default(),
        );
        assert_eq!(replies, "500 5.5.2 Line too long\r\n");
        assert!(step.close);
        long.extend_from_slice(b"\r\n");
        let (replies, _) = run(
            &mut Session::new(policy(false)),
            &long,
            &mut Counts::default(),
        );
        assert_eq!(replies, "500 5.5.2 Line too long\r\n");

        let mut input = b"MAIL FROM:<>\r\nRCPT TO:<a@b>\r\nDATA\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 2000));
        input.extend_from_slice(b"\r\n.\r\n");
        let mut counts = Counts::default();
        let (replies, _) = run(&mut Session::new(policy(true)), &input, &mut counts);
        assert!(
            replies.ends_with("552 5.3.4 Message too big\r\n"),
            "{replies}"
        );
        assert_eq!(counts.too_big, 1);

        // The same over BDAT, split across two chunks: the whole is what counts.
        let mut input = b"MAIL FROM:<>\r\nRCPT TO:<a@b>\r\nBDAT 600\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 600));
        input.extend_from_slice(b"BDAT 600 LAST\r\n");
        input.extend(std::iter::repeat_n(b'y', 600));
        input.extend_from_slice(b"NOOP\r\n");
        let mut counts = Counts::default();
        let (replies, _) = run(&mut Session::new(policy(true)), &input, &mut counts);
        assert!(
            replies.ends_with("552 5.3.4 Message too big\r\n250 2.0.0 Ok\r\n"),
            "{replies}"
        );
        assert_eq!((counts.too_big, counts.accepted), (1, 0));
    }

    /// Runs `fate` over `n` transactions and returns (tempfailed, permfailed).
    fn decide(n: u64, temp: u32, perm: u32) -> (u64, u64) {
        let mut counts = Counts::default();
        for _ in 0..n {
            match fate(&counts, temp, perm) {
                Fate::TempFail => counts.tempfailed += 1,
                Fate::PermFail => counts.permfailed += 1,
                Fate::Accept => counts.accepted += 1,
            }
        }
        (counts.tempfailed, counts.permfailed)
    }

    #[test]
    fn fates_have_exact_shares() {
        assert_eq!(decide(10_000, 1000, 250), (1000, 250));
        assert_eq!(decide(100, 2000, 1000), (20, 10));
        assert_eq!(decide(100, 0, 0), (0, 0));
        assert_eq!(decide(100, 10_000, 0), (100, 0));
        assert_eq!(decide(100, 0, 10_000), (0, 100));
        assert_eq!(decide(100, 5_000, 5_000), (50, 50));
        // Spread out: the first 10 transactions at 10 % hold exactly one failure.
        assert_eq!(decide(10, 1000, 0), (1, 0));
        assert_eq!(decide(9, 1000, 0), (0, 0));
    }

    proptest! {
        #[test]
        fn fates_stay_within_one_of_the_shares(n in 1u64..3000, temp in 0u32..=10_000, perm_share in 0u32..=10_000) {
            let perm = perm_share.min(10_000 - temp);
            let (tempfailed, permfailed) = decide(n, temp, perm);
            let temp_exact = n * u64::from(temp) / 10_000;
            let perm_exact = n * u64::from(perm) / 10_000;
            prop_assert_eq!(tempfailed, temp_exact);
            prop_assert!(permfailed + 1 >= perm_exact && permfailed <= perm_exact + 1, "{} vs {}", permfailed, perm_exact);
        }
    }

    #[test]
    fn tempfail_reply() {
        let mut policy = policy(false);
        policy.tempfail_basis_points = 10_000;
        let input = b"MAIL FROM:<>\r\nRCPT TO:<a@b>\r\nDATA\r\nx\r\n.\r\n";
        let mut counts = Counts::default();
        let (replies, _) = run(&mut Session::new(policy), input, &mut counts);
        assert!(replies.ends_with("451 4.3.0 Temporary failure (loadgen sink --tempfail)\r\n"));
        assert_eq!(counts.tempfailed, 1);
    }

    proptest! {
        #[test]
        fn feed_never_panics_and_consumes_within_bounds(input in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let mut session = Session::new(policy(true));
            let mut counts = Counts::default();
            let mut replies = Vec::new();
            let mut at = 0;
            loop {
                let step = session.feed(&input[at..], &mut replies, &mut counts);
                prop_assert!(at + step.consumed <= input.len());
                at += step.consumed;
                if !step.kept_message || step.close {
                    break;
                }
            }
        }

        #[test]
        fn terminator_found_at_any_split(lines in proptest::collection::vec("[a-z.]{0,10}", 0..6), split in 0usize..80) {
            let mut input = b"MAIL FROM:<>\r\nRCPT TO:<a@b>\r\nDATA\r\n".to_vec();
            for line in &lines {
                // A lone "." line would end the data early; a client stuffs it.
                let line = if line.starts_with('.') { format!(".{line}") } else { line.clone() };
                input.extend_from_slice(line.as_bytes());
                input.extend_from_slice(b"\r\n");
            }
            input.extend_from_slice(b".\r\n");
            let split = split.min(input.len());
            let mut session = Session::new(policy(false));
            let mut counts = Counts::default();
            let mut replies = Vec::new();
            let first = session.feed(&input[..split], &mut replies, &mut counts);
            let mut rest = input[first.consumed..].to_vec();
            let second = session.feed(&rest, &mut replies, &mut counts);
            rest.drain(..second.consumed);
            prop_assert!(rest.is_empty());
            prop_assert_eq!(counts.accepted, 1);
        }
    }
}
