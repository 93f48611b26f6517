//! Replays the golden SMTP dialogues of `tests/dialogues/smtp/` against the real binary over
//! TCP (the unit tests replay the same files against a `Session` with a fake store). Files that
//! script store failures (`@store`) need the fake store and are skipped here; `M:` and
//! `STORED:` are checked through POP3.

mod common;
#[path = "../src/transcript.rs"]
mod transcript;

use common::{LineClient, Server, PW_HASH};
use std::path::Path;
use transcript::unescape;

fn config(dir: &Path, relay: bool) -> String {
    format!(
        r#"hostname = "mx.example.test"
data_dir = "{data}"
shards = 2
local_domains = ["example.test"]
[[users]]
address = "alice@example.test"
password_hash = "{PW_HASH}"
[[users]]
address = "Bob@example.test"
password_hash = "{PW_HASH}"
[smtp]
listen = ["127.0.0.1:0"]
max_message_size = 1000
max_recipients = 3
relay_networks = [{relay}]
[pop3]
listen = ["127.0.0.1:0"]
[relay]
resolver = "127.0.0.1:53535"
"#,
        data = dir.join("data").display(),
        relay = if relay { "\"127.0.0.0/8\"" } else { "" },
    )
}

fn stored_messages(server: &Server) -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    for user in ["alice@example.test", "bob@example.test"] {
        all.extend(common::pop3_retrieve_all(server.addr("pop3"), user));
    }
    all
}

fn replay(file: &Path) {
    let script = std::fs::read_to_string(file).unwrap();
    let relay = script.lines().any(|l| l.trim() == "@peer relay=yes");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &config(dir.path(), relay));
    let mut client = LineClient::connect(server.addr("smtp"));
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    for (number, line) in script.lines().enumerate() {
        let at = format!("{name}:{}", number + 1);
        if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
            continue;
        }
        if let Some(text) = line.strip_prefix("C: ").or(line.strip_prefix("C:")) {
            let mut bytes = text.as_bytes().to_vec();
            bytes.extend_from_slice(b"\r\n");
            client.send(&bytes);
        } else if let Some(text) = line.strip_prefix("R: ") {
            client.send(&unescape(text).expect("valid escapes"));
        } else if let Some(prefix) = line.strip_prefix("S: ") {
            let mut got = client.line();
            // The dialogues assume a client off loopback; this one is on loopback, where
            // AUTH is offered (SPEC §3) as one more EHLO line after the last expected one.
            if prefix.starts_with("250 ") && got.starts_with("250-SMTPUTF8") {
                assert!(
                    format!("250 {}", &got[4..]).starts_with(prefix),
                    "{at}: got {got:?}"
                );
                got = client.line();
                assert!(got.starts_with("250 AUTH "), "{at}: got {got:?}");
                continue;
            }
            assert!(
                got.starts_with(prefix),
                "{at}: expected {prefix:?}, got {got:?}"
            );
        } else if let Some(pattern) = line.strip_prefix("S~ ") {
            let got = client.line();
            let re = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
            assert!(re.is_match(&got), "{at}: expected /{pattern}/, got {got:?}");
        } else if line == "CLOSED" {
            assert!(
                client.closed(),
                "{at}: the server did not close the connection"
            );
        } else if let Some(count) = line.strip_prefix("STORED: ") {
            // One stored message may sit in several mailboxes: count distinct queue ids.
            let n: usize = count.trim().parse().unwrap();
            let ids: std::collections::HashSet<String> = stored_messages(&server)
                .iter()
                .map(|m| {
                    let text = String::from_utf8_lossy(m);
                    let id = text
                        .split(" id ")
                        .nth(1)
                        .unwrap_or("")
                        .split([';', '\r'])
                        .next();
                    id.unwrap_or("").to_string()
                })
                .collect();
            assert_eq!(ids.len(), n, "{at}");
        } else if let Some(body) = line.strip_prefix("M:") {
            let body = unescape(body.strip_prefix(' ').unwrap_or(body)).expect("valid escapes");
            let stored = stored_messages(&server);
            assert!(
                stored.iter().any(|m| m.ends_with(&body)),
                "{at}: no stored message ends with {:?}",
                String::from_utf8_lossy(&body)
            );
        } else {
            panic!("{at}: unknown directive {line:?}");
        }
    }
}

#[test]
fn golden_smtp_dialogues_hold_against_the_real_binary() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dialogues/smtp");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    let mut replayed = 0;
    for file in &files {
        let script = std::fs::read_to_string(file).unwrap();
        if script.lines().any(|l| l.starts_with("@store")) {
            continue;
        }
        replay(file);
        replayed += 1;
    }
    assert!(replayed >= 10, "only {replayed} dialogues replayed");
}
