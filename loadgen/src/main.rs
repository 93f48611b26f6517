//! `loadgen`: measures SMTP and POP3 servers (ringmail or any other) and plays the far end
//! of relay tests (`sink`, `dns`). Command line only; the work lives in the modules.
//!
//! # Layout
//! - `smtp`: the SMTP client, closed and open loop.
//! - `pop3`: the POP3 client, with `--verify`.
//! - `sink`: a fast SMTP server that accepts and counts.
//! - `dns`: a tiny authoritative DNS server for test domains.
//! - `pattern`, `message`, `rate`, `report`: pure helpers (addresses, messages, schedule, figures).
//! - `conn`, `pool`: client sockets and thread-per-core executors.

mod conn;
mod dns;
mod message;
mod pattern;
mod pool;
mod pop3;
mod rate;
mod report;
mod sink;
mod smtp;
mod tls;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::pattern::Pattern;
use crate::report::{summary_json, summary_text, Live, Stats};

/// Exit status for bad arguments, as clap uses.
const EXIT_USAGE: u8 = 2;

/// Exit status when a run saw failures (see `--help` of each mode).
const EXIT_FAILURES: u8 = 1;

/// Most threads we start; more than a host's cores only adds contention.
const MAX_THREADS: usize = 1024;

/// Most connections per run; each costs a socket and a task.
const MAX_CONNECTIONS: u64 = 100_000;

/// Largest message `--size` accepts (1 GiB).
const MAX_SIZE_BYTES: usize = 1 << 30;

#[derive(Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator for SMTP and POP3 servers, with an SMTP sink and a test DNS server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send mail to an SMTP server and measure throughput and latency.
    ///
    /// Exit status: 0 when every transaction got 2xx; 1 when any transaction was refused
    /// (any 4xx or 5xx reply to MAIL, RCPT, DATA or end of data), a connection could not be
    /// opened, or a session broke (I/O error, timeout, malformed reply, greeting other than
    /// 220, EHLO/HELO other than 250, DATA answered with something other than 354/4xx/5xx);
    /// 2 for bad arguments.
    Smtp(SmtpArgs),
    /// Retrieve mailboxes over POP3 and measure login and retrieval.
    ///
    /// Exit status: 0 when all logins and retrievals succeeded (and, with --verify, every
    /// message carried a matching X-Loadgen-Checksum header); 1 when any login or command
    /// got -ERR, a connection failed or broke, or any message was altered or lacked the
    /// header; 2 for bad arguments.
    Pop3(Pop3Args),
    /// A fast SMTP server that accepts and counts mail (the far end for relay tests).
    Sink(SinkArgs),
    /// A tiny authoritative DNS server (UDP and TCP) for test domains.
    Dns(DnsArgs),
}

/// Options of `loadgen smtp`.
#[derive(Args)]
struct SmtpArgs {
    /// Server address, HOST:PORT.
    #[arg(long)]
    target: String,
    /// Concurrent connections, spread over the threads.
    #[arg(long, default_value_t = 8)]
    connections: u64,
    /// Total messages to send.
    #[arg(
        long,
        conflicts_with = "duration",
        required_unless_present = "duration"
    )]
    messages: Option<u64>,
    /// Run length, e.g. 10s, 500ms, 2m.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Size of each whole message (headers and body) in bytes, before dot-stuffing.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Recipient pattern; one range expands round-robin, e.g. user{0..99}@example.test.
    #[arg(long)]
    to: String,
    /// Envelope sender (also the From: header).
    #[arg(long, default_value = "loadgen@loadgen.invalid")]
    from: String,
    /// Name given in EHLO.
    #[arg(long, default_value = "loadgen.invalid")]
    helo: String,
    /// Messages per connection before QUIT and reconnect (default: all).
    #[arg(long)]
    per_connection: Option<u64>,
    /// Send MAIL, RCPT and DATA in one write when the server advertises PIPELINING.
    #[arg(long)]
    pipelining: bool,
    /// Where the server advertises CHUNKING and PIPELINING, send each message with
    /// `BDAT <size> LAST` (RFC 3030) instead of DATA, up to 16 messages in flight per
    /// connection. Closed loop only.
    #[arg(long, conflicts_with = "rate")]
    chunking: bool,
    /// Open loop: messages per second arriving on a fixed schedule; latency is measured
    /// from each arrival's intended time (coordinated omission corrected).
    #[arg(long)]
    rate: Option<f64>,
    /// STARTTLS after EHLO (then EHLO again); the server's certificate is not verified. The
    /// handshake (STARTTLS to the end of TLS setup) is reported as `tls_handshake` latency.
    #[arg(long)]
    tls: bool,
    /// Threads (one executor each); default: online CPUs.
    #[arg(long)]
    threads: Option<usize>,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No status line every second.
    #[arg(long)]
    quiet: bool,
}

/// Options of `loadgen pop3`.
#[derive(Args)]
struct Pop3Args {
    /// Server address, HOST:PORT.
    #[arg(long)]
    target: String,
    /// User pattern; each user is retrieved once, e.g. user{0..99}@example.test.
    #[arg(long)]
    user: String,
    /// Password of every user.
    #[arg(long)]
    password: String,
    /// Concurrent connections, spread over the threads.
    #[arg(long, default_value_t = 8)]
    connections: u64,
    /// DELE every message after retrieving it (effective at QUIT).
    #[arg(long)]
    delete: bool,
    /// Check each message's body against its X-Loadgen-Checksum header.
    #[arg(long)]
    verify: bool,
    /// STLS after the greeting; the server's certificate is not verified.
    #[arg(long)]
    tls: bool,
    /// Work in rounds of --connections users: all log in, then all retrieve. The retrieval
    /// halves are timed on their own ("retrieval with no login running"), so password
    /// hashing does not share the CPU with the retrieval measured. Runs on one thread.
    #[arg(long)]
    login_first: bool,
    /// Keep up to 32 RETR (and DELE) commands outstanding when the server's CAPA lists
    /// PIPELINING (RFC 2449); without it, each command waits for the previous response.
    #[arg(long)]
    pipelining: bool,
    /// Threads (one executor each); default: online CPUs.
    #[arg(long)]
    threads: Option<usize>,
    /// Largest message accepted in bytes (a bigger one breaks the session).
    #[arg(long, default_value_t = 64 << 20)]
    max_message_size: usize,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No status line every second.
    #[arg(long)]
    quiet: bool,
}

/// Options of `loadgen sink`.
#[derive(Args)]
struct SinkArgs {
    /// Address to listen on, e.g. 127.0.0.1:2526.
    #[arg(long)]
    listen: String,
    /// Percentage of transactions answered 451 at end of data.
    #[arg(long, default_value_t = 0.0)]
    tempfail: f64,
    /// Percentage of transactions answered 554 at end of data.
    #[arg(long, default_value_t = 0.0)]
    permfail: f64,
    /// Write every accepted message (unstuffed) to a file in this directory.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Threads (one executor each, SO_REUSEPORT); default: online CPUs.
    #[arg(long)]
    threads: Option<usize>,
    /// Largest message accepted in bytes (advertised as SIZE).
    #[arg(long, default_value_t = 64 << 20)]
    max_message_size: usize,
    /// Seconds between count lines, fractions allowed (0 = only at exit).
    #[arg(long, default_value_t = 1.0)]
    print_every_secs: f64,
}

/// Options of `loadgen dns`.
#[derive(Args)]
struct DnsArgs {
    /// Address to listen on (UDP and TCP), e.g. 127.0.0.1:5353.
    #[arg(long)]
    listen: String,
    /// MX records: DOMAIN=IP[,IP]: host mxN.DOMAIN (preference 10*N) for the N-th IP.
    #[arg(long)]
    mx: Vec<String>,
    /// A domain with a null MX (RFC 7505).
    #[arg(long)]
    null_mx: Vec<String>,
    /// A/AAAA records: DOMAIN=IP[,IP].
    #[arg(long)]
    a: Vec<String>,
    /// A domain whose queries get SERVFAIL.
    #[arg(long)]
    servfail: Vec<String>,
    /// A domain whose UDP answers are truncated (TC bit); TCP gets the full answer.
    #[arg(long)]
    truncate: Vec<String>,
}

/// Parses `10s`, `500ms`, `2m`, `1h` or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit_secs) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration (e.g. 10s, 500ms, 2m)"))?;
    let secs = value * unit_secs;
    if !(secs > 0.0 && secs < 1e9) {
        return Err(format!("duration '{text}' must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Resolves HOST:PORT to one socket address.
fn resolve(text: &str) -> Result<SocketAddr, String> {
    text.to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{text}': {e}"))?
        .next()
        .ok_or_else(|| format!("'{text}' resolves to no address"))
}

/// Threads from the option, defaulting to online CPUs.
fn thread_count(option: Option<usize>) -> Result<usize, String> {
    let threads =
        option.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 || threads > MAX_THREADS {
        return Err(format!("--threads must be between 1 and {MAX_THREADS}"));
    }
    Ok(threads)
}

/// A command-line mistake: printed and turned into exit status 2.
struct UsageError(String);

impl<T: Into<String>> From<T> for UsageError {
    fn from(text: T) -> Self {
        UsageError(text.into())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Smtp(args) => run_smtp(args),
        Command::Pop3(args) => run_pop3(args),
        Command::Sink(args) => run_sink(args),
        Command::Dns(args) => run_dns(args),
    };
    match result {
        Ok(code) => code,
        Err(RunError::Usage(UsageError(text))) => {
            eprintln!("loadgen: {text}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(RunError::Failed(error)) => {
            eprintln!("loadgen: {error:#}");
            ExitCode::from(EXIT_FAILURES)
        }
    }
}

/// Why a mode did not run to its end.
enum RunError {
    /// Bad arguments (exit 2).
    Usage(UsageError),
    /// The run could not proceed (exit 1).
    Failed(anyhow::Error),
}

impl From<UsageError> for RunError {
    fn from(error: UsageError) -> Self {
        RunError::Usage(error)
    }
}

impl From<String> for RunError {
    fn from(text: String) -> Self {
        RunError::Usage(UsageError(text))
    }
}

impl From<anyhow::Error> for RunError {
    fn from(error: anyhow::Error) -> Self {
        RunError::Failed(error)
    }
}

/// Prints the summary, writes JSON, and picks the exit status.
fn finish(
    mode: &str,
    stats: &Stats,
    elapsed: Duration,
    json: Option<&PathBuf>,
) -> Result<ExitCode, RunError> {
    print!("{}", summary_text(mode, stats, elapsed));
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&summary_json(mode, stats, elapsed))
            .map_err(anyhow::Error::from)?;
        std::fs::write(path, text + "\n")
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    Ok(if stats.failures() > 0 {
        ExitCode::from(EXIT_FAILURES)
    } else {
        ExitCode::SUCCESS
    })
}

/// The shared client TLS configuration when `--tls` is given.
fn tls_config(wanted: bool) -> Result<Option<Arc<rustls::ClientConfig>>, RunError> {
    if !wanted {
        return Ok(None);
    }
    tls::client_config()
        .map(Some)
        .map_err(|e| RunError::from(anyhow::anyhow!("cannot set up TLS: {e}")))
}

fn run_smtp(args: SmtpArgs) -> Result<ExitCode, RunError> {
    let tls = tls_config(args.tls)?;
    let target = resolve(&args.target)?;
    let to = Pattern::parse(&args.to).map_err(|e| format!("--to: {e}"))?;
    if args.connections == 0 || args.connections > MAX_CONNECTIONS {
        return Err(UsageError::from(format!(
            "--connections must be between 1 and {MAX_CONNECTIONS}"
        ))
        .into());
    }
    if args.messages == Some(0) {
        return Err(UsageError::from("--messages must be at least 1").into());
    }
    if args.size > MAX_SIZE_BYTES {
        return Err(UsageError::from(format!("--size must be at most {MAX_SIZE_BYTES}")).into());
    }
    if args.per_connection == Some(0) {
        return Err(UsageError::from("--per-connection must be at least 1").into());
    }
    if let Some(rate) = args.rate {
        if !(rate > 0.0 && rate.is_finite() && rate <= 1e8) {
            return Err(UsageError::from(
                "--rate must be a positive number of messages per second",
            )
            .into());
        }
    }
    for (name, value) in [("--from", &args.from), ("--helo", &args.helo)] {
        if value.is_empty()
            || value.len() > 255
            || value.bytes().any(|b| b <= b' ' || b == b'<' || b == b'>')
        {
            return Err(UsageError::from(format!(
                "{name} must be 1-255 printable characters without spaces or <>"
            ))
            .into());
        }
    }
    let threads = thread_count(args.threads)?;
    // Build the largest message once so a too-small --size is a usage error, not N failures.
    let widest_to = to
        .nth(to.count().saturating_sub(1))
        .len()
        .max(to.nth(0).len());
    let probe_id = format!(
        "{:x}.{}.{}@loadgen.invalid",
        u64::MAX,
        MAX_THREADS,
        u64::MAX
    );
    let mut probe = Vec::new();
    message::build_message(
        &mut probe,
        &args.from,
        &"x".repeat(widest_to),
        &probe_id,
        args.size,
        1,
    )
    .map_err(|e| e.to_string())?;
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let plan = smtp::SmtpPlan {
        target,
        connections: args.connections,
        messages: args.messages,
        duration: args.duration,
        size_bytes: args.size,
        to,
        from: args.from,
        helo: args.helo,
        per_connection: args.per_connection.unwrap_or(u64::MAX),
        pipelining: args.pipelining,
        chunking: args.chunking,
        rate_per_sec: args.rate,
        threads,
        run_id,
        tls,
    };
    let live = Arc::new(Live::default());
    let thread_live = live.clone();
    let (results, elapsed) = pool::run_threads(threads, live, args.quiet, move |index| {
        smtp::run_thread(plan.clone(), index, thread_live.clone())
    })?;
    let mut stats = Stats::default();
    for result in &results {
        stats.merge(result);
    }
    finish("smtp", &stats, elapsed, args.json.as_ref())
}

fn run_pop3(args: Pop3Args) -> Result<ExitCode, RunError> {
    let tls = tls_config(args.tls)?;
    let target = resolve(&args.target)?;
    let users = Pattern::parse(&args.user).map_err(|e| format!("--user: {e}"))?;
    if args.connections == 0 || args.connections > MAX_CONNECTIONS {
        return Err(UsageError::from(format!(
            "--connections must be between 1 and {MAX_CONNECTIONS}"
        ))
        .into());
    }
    if args.password.is_empty() || args.password.len() > 255 || args.password.contains(['\r', '\n'])
    {
        return Err(UsageError::from("--password must be 1-255 characters on one line").into());
    }
    if args.login_first && args.threads.is_some_and(|t| t != 1) {
        return Err(UsageError::from(
            "--login-first runs on one thread, so that its rounds are the same for every session",
        )
        .into());
    }
    let threads = if args.login_first {
        1
    } else {
        thread_count(args.threads)?
    };
    let plan = pop3::Pop3Plan {
        target,
        users,
        password: args.password,
        connections: args.connections,
        delete: args.delete,
        verify: args.verify,
        threads,
        max_message_bytes: args.max_message_size.max(1024),
        tls,
        login_first: args.login_first,
        pipelining: args.pipelining,
    };
    let live = Arc::new(Live::default());
    let thread_live = live.clone();
    let next_user = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (results, elapsed) = pool::run_threads(threads, live, args.quiet, move |index| {
        pop3::run_thread(plan.clone(), index, thread_live.clone(), next_user.clone())
    })?;
    let mut stats = Stats::default();
    for result in &results {
        stats.merge(result);
    }
    finish("pop3", &stats, elapsed, args.json.as_ref())
}

fn run_sink(args: SinkArgs) -> Result<ExitCode, RunError> {
    let listen = resolve(&args.listen)?;
    for (name, value) in [("--tempfail", args.tempfail), ("--permfail", args.permfail)] {
        if !(0.0..=100.0).contains(&value) {
            return Err(
                UsageError::from(format!("{name} must be a percentage between 0 and 100")).into(),
            );
        }
    }
    if args.tempfail + args.permfail > 100.0 {
        return Err(UsageError::from("--tempfail plus --permfail must not exceed 100").into());
    }
    let threads = thread_count(args.threads)?;
    if let Some(dir) = &args.keep {
        if !dir.is_dir() {
            return Err(
                UsageError::from(format!("--keep {}: not a directory", dir.display())).into(),
            );
        }
    }
    if !(args.print_every_secs >= 0.0 && args.print_every_secs <= 86_400.0) {
        return Err(
            UsageError::from("--print-every-secs must be between 0 and 86400 seconds").into(),
        );
    }
    let plan = sink::SinkPlan {
        listen,
        tempfail_basis_points: (args.tempfail * 100.0).round() as u32,
        permfail_basis_points: (args.permfail * 100.0).round() as u32,
        keep: args.keep,
        threads,
        max_message_bytes: args.max_message_size,
        print_every: Duration::from_secs_f64(args.print_every_secs),
    };
    sink::run(plan)?;
    Ok(ExitCode::SUCCESS)
}

fn run_dns(args: DnsArgs) -> Result<ExitCode, RunError> {
    let listen = resolve(&args.listen)?;
    let zone = dns::Zone::from_args(
        &args.mx,
        &args.null_mx,
        &args.a,
        &args.servfail,
        &args.truncate,
    )?;
    dns::run(listen, zone)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("NaN").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
