//! Replays the golden dialogues in `tests/dialogues/smtp/*.txt` (format in the README
//! there) against a [`Session`](super::Session) with an in-memory store. Each file is
//! replayed three times, with the client's bytes arriving whole, one byte per read, and
//! seven bytes per read: the replies must not depend on how TCP split the input.

use std::path::{Path, PathBuf};

use super::session::StoreFailure;
use super::session_tests::{params, peer, Harness, StoreMode};
use crate::transcript::unescape;

/// One step of a dialogue.
#[derive(Debug, Clone)]
enum Step {
    /// Bytes the client sends.
    Send(Vec<u8>),
    /// The next reply line starts with this.
    ExpectPrefix(String),
    /// The next reply line matches this regex wholly.
    ExpectRegex(regex::Regex),
    /// The last stored message's body is exactly this.
    ExpectBody(Vec<u8>),
    /// This many messages are stored.
    ExpectStored(usize),
    /// The session has closed and every reply has been read.
    ExpectClosed,
    /// Change what the fake store answers.
    Store(StoreMode),
}

/// A parsed dialogue file.
struct Dialogue {
    relay_allowed: bool,
    steps: Vec<Step>,
}

fn parse_dialogue(text: &str) -> Result<Dialogue, String> {
    let mut dialogue = Dialogue {
        relay_allowed: false,
        steps: Vec::new(),
    };
    for (number, line) in text.lines().enumerate() {
        let fail = |why: String| format!("line {}: {why}", number + 1);
        let step = if line.trim().is_empty() || line.starts_with('#') {
            continue;
        } else if let Some(text) = line.strip_prefix("C: ") {
            Step::Send(format!("{text}\r\n").into_bytes())
        } else if let Some(text) = line.strip_prefix("R: ") {
            Step::Send(unescape(text).map_err(fail)?)
        } else if let Some(prefix) = line.strip_prefix("S: ") {
            Step::ExpectPrefix(prefix.to_string())
        } else if let Some(pattern) = line.strip_prefix("S~ ") {
            let regex =
                regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| fail(e.to_string()))?;
            Step::ExpectRegex(regex)
        } else if let Some(text) = line.strip_prefix("M: ") {
            Step::ExpectBody(unescape(text).map_err(fail)?)
        } else if line == "M:" {
            Step::ExpectBody(Vec::new())
        } else if let Some(count) = line.strip_prefix("STORED: ") {
            Step::ExpectStored(count.parse().map_err(|e| fail(format!("{e}")))?)
        } else if line == "CLOSED" {
            Step::ExpectClosed
        } else if let Some(mode) = line.strip_prefix("@store ") {
            Step::Store(match mode {
                "ok" => StoreMode::Ok,
                "sync-failed" => StoreMode::Fail(StoreFailure::SyncFailed),
                "disk-full" => StoreMode::Fail(StoreFailure::DiskFull),
                "too-big" => StoreMode::Fail(StoreFailure::TooBig),
                "shutting-down" => StoreMode::Fail(StoreFailure::ShuttingDown),
                other => return Err(fail(format!("unknown store mode {other:?}"))),
            })
        } else if let Some(relay) = line.strip_prefix("@peer relay=") {
            dialogue.relay_allowed = match relay {
                "yes" => true,
                "no" => false,
                other => return Err(fail(format!("relay must be yes or no, not {other:?}"))),
            };
            continue;
        } else {
            return Err(fail(format!("unknown line {line:?}")));
        };
        dialogue.steps.push(step);
    }
    Ok(dialogue)
}

/// Runs a dialogue with reads of at most `chunk` bytes; returns the first mismatch.
fn replay(dialogue: &Dialogue, chunk: usize) -> Result<(), String> {
    let mut harness = Harness::new(params(1000, 3), peer(dialogue.relay_allowed));
    for (index, step) in dialogue.steps.iter().enumerate() {
        let fail = |why: String| format!("step {} ({step:?}): {why}", index + 1);
        match step {
            Step::Send(bytes) => harness.send(bytes, chunk),
            Step::ExpectPrefix(prefix) => {
                let line = harness.next_line().ok_or_else(|| fail("no reply".into()))?;
                if !line.starts_with(prefix.as_str()) {
                    return Err(fail(format!("got {line:?}")));
                }
            }
            Step::ExpectRegex(regex) => {
                let line = harness.next_line().ok_or_else(|| fail("no reply".into()))?;
                if !regex.is_match(&line) {
                    return Err(fail(format!("got {line:?}")));
                }
            }
            Step::ExpectBody(body) => {
                let stored = harness
                    .stored
                    .last()
                    .ok_or_else(|| fail("nothing stored".into()))?;
                if stored.body != *body {
                    let got = String::from_utf8_lossy(&stored.body).to_string();
                    return Err(fail(format!("stored body {got:?}")));
                }
            }
            Step::ExpectStored(count) => {
                if harness.stored.len() != *count {
                    return Err(fail(format!("{} stored", harness.stored.len())));
                }
            }
            Step::ExpectClosed => {
                if !harness.closed {
                    return Err(fail("still open".into()));
                }
            }
            Step::Store(mode) => harness.store_mode = *mode,
        }
    }
    let unread = harness.lines();
    if !unread.is_empty() {
        return Err(format!("replies nobody expected: {unread:?}"));
    }
    Ok(())
}

fn dialogue_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dialogues/smtp")
}

#[test]
fn golden_dialogues() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dialogue_dir())
        .expect("tests/dialogues/smtp exists")
        .map(|entry| entry.expect("readable directory").path())
        .filter(|path| path.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "dialogue files missing: {files:?}");
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable dialogue");
        let dialogue = match parse_dialogue(&text) {
            Ok(dialogue) => dialogue,
            Err(error) => {
                failures.push(format!("{}: {error}", file.display()));
                continue;
            }
        };
        for chunk in [usize::MAX, 1, 7] {
            if let Err(error) = replay(&dialogue, chunk) {
                failures.push(format!("{} (reads of {chunk}): {error}", file.display()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_reply_code_has_a_dialogue() {
    // The codes the session can send; each must appear in some expectation.
    let mut all = String::new();
    for entry in std::fs::read_dir(dialogue_dir()).expect("dialogue dir") {
        all += &std::fs::read_to_string(entry.expect("entry").path()).unwrap_or_default();
    }
    let codes = [
        "220 ",
        "250 ",
        "250-",
        "221 2.0.0",
        "354 ",
        "252 2.0.0",
        "214 2.0.0",
        "500 5.5.1",
        "500 5.5.2",
        "501 5.5.4",
        "501 5.1.7",
        "501 5.1.3",
        "502 5.5.1",
        "503 5.5.1",
        "550 5.1.1",
        "550 5.6.0",
        "552 5.3.4",
        "553 5.6.7",
        "554 5.5.1",
        "554 5.7.1",
        "554 5.7.0",
        "555 5.5.4",
        "452 4.5.3",
        "452 4.3.1",
        "451 4.3.0",
        "421 4.7.0",
        "421 4.3.2",
    ];
    let missing: Vec<_> = codes
        .iter()
        .filter(|code| !all.contains(&format!("S: {code}")))
        .collect();
    assert!(missing.is_empty(), "no dialogue expects {missing:?}");
}

#[test]
fn the_runner_catches_mismatches() {
    let wrong = parse_dialogue("S: 220 \nC: NOOP\nS: 500").expect("parses");
    assert!(replay(&wrong, usize::MAX).is_err());
    let unread = parse_dialogue("S: 220 \nC: NOOP\n").expect("parses");
    assert!(replay(&unread, usize::MAX).is_err());
    assert!(parse_dialogue("X: what").is_err());
    assert_eq!(unescape(r"a\r\n\x00\\").unwrap(), b"a\r\n\0\\");
}
