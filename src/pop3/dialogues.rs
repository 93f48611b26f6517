//! Replays the golden dialogues in `tests/dialogues/pop3/*.txt` (format in the README there)
//! against a [`Session`](super::Session) driven by the fake loop, once with each client write
//! delivered whole and once one byte per read.

use std::path::{Path, PathBuf};

use super::testkit::{params, peer, Driver, FakeStore};
use crate::transcript::unescape;

/// Expectation on one server line.
#[derive(Debug)]
enum Expect {
    /// `S: text`: the line starts with text.
    Prefix(String),
    /// `S= text`: the line is exactly text.
    Exact(String),
}

/// One step of a dialogue.
#[derive(Debug)]
enum Step {
    /// Bytes the client writes at once (consecutive `C:` lines).
    Send(Vec<u8>),
    /// The next server line.
    Expect(Expect, usize),
    /// The session must have asked to close.
    Closed(usize),
}

/// A parsed dialogue file.
#[derive(Debug)]
struct Dialogue {
    store: FakeStore,
    loopback: bool,
    stls: bool,
    steps: Vec<Step>,
}

fn parse(path: &Path) -> Dialogue {
    let text = std::fs::read_to_string(path).expect("readable dialogue");
    let mut dialogue = Dialogue {
        store: FakeStore::default(),
        loopback: true,
        stls: false,
        steps: Vec::new(),
    };
    let mut pending_send: Vec<u8> = Vec::new();
    let mut current_message: Option<(String, String, String, Vec<u8>)> = None;
    let flush_message =
        |dialogue: &mut Dialogue, message: &mut Option<(String, String, String, Vec<u8>)>| {
            if let Some((user, uidl, return_path, stored)) = message.take() {
                dialogue
                    .store
                    .add_message(&user, &uidl, &return_path, &stored);
            }
        };
    for (number, line) in text.lines().enumerate() {
        let number = number + 1;
        if let Some(body) = line.strip_prefix('|') {
            let (_, _, _, stored) = current_message
                .as_mut()
                .unwrap_or_else(|| panic!("line {number}: body line outside a message"));
            stored.extend_from_slice(body.strip_prefix(' ').unwrap_or(body).as_bytes());
            stored.extend_from_slice(b"\r\n");
            continue;
        }
        flush_message(&mut dialogue, &mut current_message);
        let is_send = line.starts_with("C: ") || line.starts_with("C~ ") || line == "C:";
        if !is_send && !pending_send.is_empty() {
            dialogue
                .steps
                .push(Step::Send(std::mem::take(&mut pending_send)));
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(command) = line.strip_prefix("C: ") {
            pending_send.extend_from_slice(command.as_bytes());
            pending_send.extend_from_slice(b"\r\n");
        } else if line == "C:" {
            pending_send.extend_from_slice(b"\r\n");
        } else if let Some(raw) = line.strip_prefix("C~ ") {
            pending_send.extend_from_slice(&unescape(raw).expect("valid escapes"));
        } else if let Some(prefix) = line.strip_prefix("S: ") {
            dialogue
                .steps
                .push(Step::Expect(Expect::Prefix(prefix.to_owned()), number));
        } else if line == "S:" {
            dialogue
                .steps
                .push(Step::Expect(Expect::Prefix(String::new()), number));
        } else if let Some(exact) = line.strip_prefix("S= ") {
            dialogue
                .steps
                .push(Step::Expect(Expect::Exact(exact.to_owned()), number));
        } else if line == "S=" {
            dialogue
                .steps
                .push(Step::Expect(Expect::Exact(String::new()), number));
        } else if line.trim().is_empty() || line.starts_with('#') {
        } else {
            match words.as_slice() {
                ["closed"] => dialogue.steps.push(Step::Closed(number)),
                ["peer", "loopback"] => dialogue.loopback = true,
                ["peer", "remote"] => dialogue.loopback = false,
                ["stls"] => dialogue.stls = true,
                ["commit-fails"] => dialogue.store.commit_fails = true,
                ["unavailable"] => dialogue.store.unavailable = true,
                ["user", name, password] => {
                    dialogue
                        .store
                        .passwords
                        .insert(name.to_lowercase(), (*password).to_owned());
                }
                ["locked", name] => {
                    dialogue.store.locked.insert(name.to_lowercase());
                }
                ["message", user, uidl, return_path] => {
                    current_message = Some((
                        (*user).to_owned(),
                        (*uidl).to_owned(),
                        return_path
                            .trim_start_matches('<')
                            .trim_end_matches('>')
                            .to_owned(),
                        Vec::new(),
                    ));
                }
                _ => panic!("{}:{number}: cannot parse {line:?}", path.display()),
            }
        }
    }
    flush_message(&mut dialogue, &mut current_message);
    if !pending_send.is_empty() {
        dialogue.steps.push(Step::Send(pending_send));
    }
    dialogue
}

/// Runs a dialogue; `chunk_size` bytes per simulated read.
fn replay(path: &Path, chunk_size: usize) {
    let dialogue = parse(path);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut driver = Driver::new(
        dialogue.store,
        params(dialogue.stls),
        peer(dialogue.loopback),
    );
    let mut lines_seen = 0usize;
    let server_lines = |driver: &Driver| -> Vec<String> {
        let text = String::from_utf8_lossy(&driver.transcript).into_owned();
        let mut lines: Vec<String> = text.split("\r\n").map(str::to_owned).collect();
        // The piece after the last CRLF is an unfinished line, if anything.
        lines.pop();
        lines
    };
    let check_all_matched = |driver: &Driver, lines_seen: usize, at: &str| {
        let lines = server_lines(driver);
        assert!(
            lines.len() == lines_seen,
            "{name} (chunk {chunk_size}) {at}: unexpected server lines {:?}",
            &lines[lines_seen.min(lines.len())..]
        );
    };
    for step in &dialogue.steps {
        match step {
            Step::Send(bytes) => {
                check_all_matched(&driver, lines_seen, "before a client write");
                driver.feed(bytes, chunk_size);
            }
            Step::Expect(expect, number) => {
                let lines = server_lines(&driver);
                let line = lines.get(lines_seen).unwrap_or_else(|| {
                    panic!("{name}:{number} (chunk {chunk_size}): expected {expect:?}, server sent nothing more")
                });
                let matched = match expect {
                    Expect::Prefix(prefix) => line.starts_with(prefix.as_str()),
                    Expect::Exact(exact) => line == exact,
                };
                assert!(
                    matched,
                    "{name}:{number} (chunk {chunk_size}): expected {expect:?}, got {line:?}"
                );
                lines_seen += 1;
            }
            Step::Closed(number) => {
                assert!(
                    driver.closed,
                    "{name}:{number} (chunk {chunk_size}): session did not close"
                );
            }
        }
    }
    check_all_matched(&driver, lines_seen, "at the end");
}

fn dialogue_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dialogues/pop3");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/dialogues/pop3 exists")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    files
}

#[test]
fn golden_dialogues_pass_whole_and_byte_by_byte() {
    let files = dialogue_files();
    assert!(
        files.len() >= 8,
        "expected the golden dialogues, found {files:?}"
    );
    for file in files {
        replay(&file, usize::MAX);
        replay(&file, 1);
        replay(&file, 7);
    }
}

#[test]
fn runner_rejects_a_wrong_expectation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("wrong.txt");
    std::fs::write(&path, "S: +OK\nC: NOOP\nS: +OK\n").expect("write");
    let result = std::panic::catch_unwind(|| replay(&path, usize::MAX));
    assert!(result.is_err(), "NOOP before login must not answer +OK");
}

#[test]
fn unescape_table() {
    assert_eq!(unescape(r"NOOP\n").unwrap(), b"NOOP\n");
    assert_eq!(unescape(r"a\r\n\\\x00\xff").unwrap(), b"a\r\n\\\x00\xff");
}
