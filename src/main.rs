//! The `ringmail` command line (SPEC §1). Only argument handling and exit codes live here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringmail::config::Config;

#[derive(Parser)]
#[command(
    name = "ringmail",
    version,
    about = "A thread-per-core io_uring mail relay: SMTP in, POP3 and MX relay out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (on the embedded defaults when no --config is given).
    Serve {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration and print the effective configuration.
    CheckConfig {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Read a password on stdin and print its argon2id hash (PHC string).
    HashPassword,
}

/// Exit status for a configuration that cannot be used (SPEC §1).
const EXIT_BAD_CONFIG: u8 = 2;
/// Exit status for a resource the host does not grant, or a failure while running.
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Log lines are handed to a writer thread: a shard must never block on stderr, and one line
    // per accepted message is a lot of lines. Under overload lines are dropped, never mail.
    // The writer thread drains lines in batches and flushes after each batch, so buffering
    // stderr turns a write(2) per line into one per batch.
    let (log_writer, _log_flush_on_exit) = tracing_appender::non_blocking(
        std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr()),
    );
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGMAIL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(log_writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Serve { config } => {
            let config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match ringmail::server::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ringmail: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::CheckConfig { config } => match load(config.as_deref()) {
            Ok(c) => {
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::HashPassword => hash_password(),
    }
}

fn load(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    match path {
        None => Ok(Config::defaults()),
        Some(path) => Config::load(path).map_err(|e| {
            eprintln!("ringmail: {e}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }),
    }
}

fn hash_password() -> ExitCode {
    let mut password = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut password) {
        eprintln!("ringmail: cannot read the password from stdin: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    let password = password.strip_suffix('\n').unwrap_or(&password);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        eprintln!("ringmail: an empty password cannot be hashed");
        return ExitCode::from(EXIT_FAILURE);
    }
    match ringmail::auth::hash_password(password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringmail: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
