//! Starting the real `ringmail` binary on loopback for integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ringmail");

/// A configuration with every listener on port 0 of loopback, its data in `dir`, and the
/// resolver pointed at loopback (tests never query the system resolver). `extra` is appended.
pub fn config_text(dir: &Path, shards: usize, extra: &str) -> String {
    format!(
        r#"hostname = "mx.ringmail.test"
data_dir = "{data}"
shards = {shards}
shutdown_grace_secs = 5
{extra_root}
[smtp]
listen = ["127.0.0.1:0"]
[pop3]
listen = ["127.0.0.1:0"]
[relay]
resolver = "127.0.0.1:53535"
"#,
        data = dir.join("data").display(),
        extra_root = extra,
    )
}

/// A running server; killed (SIGKILL) when dropped if still alive.
pub struct Server {
    pub child: Child,
    /// Listener label (`smtp`, `pop3`, …) → address, from the start-up lines.
    pub listeners: HashMap<String, SocketAddr>,
    pub stderr: mpsc::Receiver<String>,
    pub config_path: PathBuf,
}

impl Server {
    /// Starts `ringmail serve --config <dir>/ringmail.toml` and waits for its listening lines.
    pub fn start(dir: &Path, config: &str) -> Server {
        Self::start_with(dir, config, |c| c)
    }

    pub fn start_with(
        dir: &Path,
        config: &str,
        wrap: impl FnOnce(&mut Command) -> &mut Command,
    ) -> Server {
        let config_path = dir.join("ringmail.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("RINGMAIL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let cmd = wrap(&mut cmd);
        let mut child = cmd.spawn().expect("spawn ringmail");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if err_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let expected = config.matches("listen = [\"").count();
        let mut listeners = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while listeners.len() < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            match line_rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some((label, rest)) = line.split_once(" listening on ") {
                        let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
                        listeners.insert(label.to_string(), addr);
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let errors: Vec<String> = err_rx.try_iter().collect();
                    panic!("ringmail did not start: {errors:#?}");
                }
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in line_rx {});
        Server {
            child,
            listeners,
            stderr: err_rx,
            config_path,
        }
    }

    pub fn addr(&self, label: &str) -> SocketAddr {
        self.listeners[label]
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for the process to exit (at most `limit`).
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "ringmail did not exit in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // A failing test shows what the server logged (a panic, a refusal, a warning);
            // only errors and warnings, so that an info log of every message does not bury it.
            let lines: Vec<String> = self
                .stderr_lines()
                .into_iter()
                .filter(|line| !line.contains(" INFO ") && !line.contains(" DEBUG "))
                .collect();
            eprintln!(
                "ringmail's stderr (warnings and worse):\n{}",
                lines.join("\n")
            );
        }
    }
}

/// Runs `ringmail ARGS…` to completion; returns (status, stdout, stderr).
pub fn run_cli(args: &[&str], stdin: &str) -> (ExitStatus, String, String) {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (child.wait().unwrap(), out, err)
}

/// argon2id of "pw" (m=19456, t=2, p=1), so tests need not hash at start.
pub const PW_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$l2tF5CrpNfCtCn8PnwYU2w$2VqHDCVAgviAAJbC5lt16cunb+ty3s7HrNdScT49YTo";

/// A configuration with local domain `example.test` and users alice, bob and carol (password
/// "pw"); `extra_root` goes at the top level, `extra_smtp` into `[smtp]`.
pub fn mail_config(dir: &Path, shards: usize, extra_root: &str, extra_smtp: &str) -> String {
    let users: String = ["alice", "bob", "carol"]
        .iter()
        .map(|u| {
            format!("[[users]]\naddress = \"{u}@example.test\"\npassword_hash = \"{PW_HASH}\"\n")
        })
        .collect();
    format!(
        r#"hostname = "mx.ringmail.test"
data_dir = "{data}"
shards = {shards}
shutdown_grace_secs = 5
local_domains = ["example.test"]
{extra_root}
{users}
[smtp]
listen = ["127.0.0.1:0"]
{extra_smtp}
[pop3]
listen = ["127.0.0.1:0"]
[relay]
resolver = "127.0.0.1:53535"
"#,
        data = dir.join("data").display(),
    )
}

/// A line-level SMTP/POP3 client over a plain socket, for asserting exact replies.
pub struct LineClient {
    pub stream: std::net::TcpStream,
    reader: BufReader<std::net::TcpStream>,
}

impl LineClient {
    pub fn connect(addr: SocketAddr) -> LineClient {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        LineClient { stream, reader }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.stream.write_all(bytes).unwrap();
    }

    /// One line, CRLF stripped; "" at EOF.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        let _ = self.reader.read_line(&mut line);
        line.trim_end_matches(['\r', '\n']).to_string()
    }

    /// A whole (possibly multi-line) SMTP reply, lines joined with '\n'.
    pub fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let line = self.line();
            let more = line.len() > 3 && line.as_bytes()[3] == b'-';
            lines.push(line);
            if !more {
                return lines.join("\n");
            }
        }
    }

    /// Sends a command line and returns the reply.
    pub fn command(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Reads a POP3 multi-line body up to the terminating ".", raw bytes with CRLFs.
    pub fn pop3_multiline(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut line = Vec::new();
            self.reader.read_until(b'\n', &mut line).unwrap();
            assert!(!line.is_empty(), "EOF inside a multi-line response");
            if line == b".\r\n" {
                return out;
            }
            out.extend_from_slice(&line);
        }
    }

    /// True once the server has closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.reader.read(&mut buf), Ok(0))
    }
}

/// Sends one message over SMTP and returns the final reply to the end of data.
pub fn send_mail(addr: SocketAddr, from: &str, to: &[&str], data: &[u8]) -> String {
    let mut c = LineClient::connect(addr);
    let greeting = c.reply();
    assert!(greeting.starts_with("220 "), "greeting: {greeting:?}");
    let r = c.command("EHLO client.test");
    assert!(r.starts_with("250"), "{r}");
    let r = c.command(&format!("MAIL FROM:<{from}>"));
    assert!(r.starts_with("250"), "{r}");
    for rcpt in to {
        let r = c.command(&format!("RCPT TO:<{rcpt}>"));
        assert!(r.starts_with("250"), "{r}");
    }
    let r = c.command("DATA");
    assert!(r.starts_with("354"), "{r}");
    c.send(data);
    c.send(b".\r\n");
    let reply = c.reply();
    c.command("QUIT");
    reply
}

/// Logs in to POP3 as `user` and returns every message as RETR sends it (unstuffed bytes
/// are not needed: tests compare the wire form).
pub fn pop3_retrieve_all(addr: SocketAddr, user: &str) -> Vec<Vec<u8>> {
    let mut c = LineClient::connect(addr);
    assert!(c.line().starts_with("+OK"));
    assert!(c.command(&format!("USER {user}")).starts_with("+OK"));
    let r = c.command("PASS pw");
    assert!(r.starts_with("+OK"), "{r}");
    let stat = c.command("STAT");
    let count: usize = stat.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut out = Vec::new();
    for n in 1..=count {
        let r = c.command(&format!("RETR {n}"));
        assert!(r.starts_with("+OK"), "{r}");
        out.push(c.pop3_multiline());
    }
    assert!(c.command("QUIT").starts_with("+OK"));
    out
}

/// Writes `byte` to `stream` every 300 ms, 100 times at most (30 s): never silent for an
/// idle timeout of a second or more, and never a whole line. The thread's result is true
/// when a write failed, i.e. the server cut the client off while it was still trickling.
pub fn trickle(
    mut stream: std::net::TcpStream,
    byte: &'static [u8],
) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        for _ in 0..100 {
            if std::io::Write::write_all(&mut stream, byte).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        false
    })
}
