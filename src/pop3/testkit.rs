//! A fake connection loop for tests: answers every [`Action`] at once from in-memory
//! maildrops and records everything the client would receive, message bodies included.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::rc::Rc;

use super::{
    top_len, Action, MessageEntry, MessageKey, OpenFailure, PeerInfo, Session, SessionParams,
};

/// One stored message of the fake store.
#[derive(Debug, Clone)]
pub struct FakeMessage {
    /// The key the session will hand back.
    pub key: MessageKey,
    /// Its UIDL.
    pub uidl: String,
    /// Envelope sender for the `Return-Path:` line.
    pub return_path: String,
    /// Bytes as stored: CRLF, dot-stuffed.
    pub stored: Vec<u8>,
}

impl FakeMessage {
    fn return_path_line(&self) -> String {
        format!("Return-Path: <{}>\r\n", self.return_path)
    }

    /// What LIST reports: Return-Path line plus stored bytes.
    pub fn size_octets(&self) -> u64 {
        (self.return_path_line().len() + self.stored.len()) as u64
    }
}

/// Users, maildrops and failure switches.
#[derive(Debug, Default, Clone)]
pub struct FakeStore {
    /// Lower-cased user → password.
    pub passwords: HashMap<String, String>,
    /// Lower-cased user → messages.
    pub mailboxes: HashMap<String, Vec<FakeMessage>>,
    /// Lower-cased users whose maildrop another session holds.
    pub locked: HashSet<String>,
    /// When set, UPDATE fails.
    pub commit_fails: bool,
    /// When set, opening any maildrop fails with `Unavailable`.
    pub unavailable: bool,
}

impl FakeStore {
    /// Adds a message to `user`'s maildrop with a fresh key.
    pub fn add_message(&mut self, user: &str, uidl: &str, return_path: &str, stored: &[u8]) {
        let next = self.mailboxes.values().map(Vec::len).sum::<usize>() as u64;
        self.mailboxes
            .entry(user.to_lowercase())
            .or_default()
            .push(FakeMessage {
                key: MessageKey {
                    shard: (next % 3) as u16,
                    record: 1000 + next,
                    recipient: 0,
                },
                uidl: uidl.to_owned(),
                return_path: return_path.to_owned(),
                stored: stored.to_vec(),
            });
    }
}

/// A session driven by a fake loop.
#[derive(Debug)]
pub struct Driver {
    /// The session under test.
    pub session: Session,
    /// The fake store behind it.
    pub store: FakeStore,
    /// Everything written to the client.
    pub transcript: Vec<u8>,
    /// Whether the session asked to close.
    pub closed: bool,
    /// Every action seen except Idle, in order.
    pub actions: Vec<Action>,
    /// The authenticated user (lower-cased), for OpenMailbox.
    user: Option<String>,
}

/// Session parameters used by tests.
pub fn params(stls_available: bool) -> Rc<SessionParams> {
    Rc::new(SessionParams {
        greeting_host: "mx.example.test".into(),
        stls_available,
    })
}

/// A loopback peer (plain-text login allowed) or a remote one.
pub fn peer(loopback: bool) -> PeerInfo {
    let addr: SocketAddr = if loopback {
        "127.0.0.1:40000"
    } else {
        "192.0.2.10:40000"
    }
    .parse()
    .expect("valid test address");
    PeerInfo {
        addr,
        plaintext_auth_allowed: loopback,
        tls: false,
    }
}

impl Driver {
    /// A session over `store`, its greeting already pumped into the transcript.
    pub fn new(store: FakeStore, params: Rc<SessionParams>, peer: PeerInfo) -> Driver {
        let mut driver = Driver {
            session: Session::new(params, peer),
            store,
            transcript: Vec::new(),
            closed: false,
            actions: Vec::new(),
            user: None,
        };
        driver.pump();
        driver
    }

    /// Feeds `bytes` as the client would, at most `chunk_size` bytes per read.
    pub fn feed(&mut self, bytes: &[u8], chunk_size: usize) {
        let mut rest = bytes;
        while !rest.is_empty() && !self.closed {
            if !self.session.wants_input() {
                self.pump();
                if !self.session.wants_input() {
                    break;
                }
            }
            let buffer = self.session.input_buffer();
            let n = chunk_size.min(buffer.len()).min(rest.len());
            buffer[..n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            self.session.input_filled(n);
            self.pump();
        }
    }

    fn flush(&mut self) {
        let out = self.session.output();
        let n = out.len();
        self.transcript.extend_from_slice(out);
        self.session.output_consumed(n);
    }

    /// Writes output and answers actions until the session is idle with nothing to write.
    pub fn pump(&mut self) {
        loop {
            self.flush();
            let action = self.session.poll_action();
            if action != Action::Idle {
                self.actions.push(action.clone());
            }
            match action {
                Action::Idle => {
                    if self.session.output().is_empty() {
                        return;
                    }
                }
                Action::Authenticate { user, password } => {
                    let user = user.to_lowercase();
                    let ok = self.store.passwords.get(&user) == Some(&password);
                    self.user = ok.then_some(user);
                    self.session.auth_checked(ok);
                }
                Action::OpenMailbox { .. } => {
                    let user = self.user.clone().unwrap_or_default();
                    let result = if self.store.unavailable {
                        Err(OpenFailure::Unavailable)
                    } else if self.store.locked.contains(&user) {
                        Err(OpenFailure::InUse)
                    } else {
                        Ok(self
                            .store
                            .mailboxes
                            .get(&user)
                            .map(|messages| {
                                messages
                                    .iter()
                                    .map(|m| MessageEntry {
                                        key: m.key,
                                        size_octets: m.size_octets(),
                                        uidl: m.uidl.clone(),
                                    })
                                    .collect()
                            })
                            .unwrap_or_default())
                    };
                    self.session.mailbox_opened(result);
                }
                Action::SendMessage { key, top_lines } => {
                    self.flush();
                    let message = self
                        .store
                        .mailboxes
                        .values()
                        .flatten()
                        .find(|m| m.key == key)
                        .expect("session asked for a message of its maildrop")
                        .clone();
                    self.transcript
                        .extend_from_slice(message.return_path_line().as_bytes());
                    let len = match top_lines {
                        Some(lines) => top_len(&message.stored, lines),
                        None => message.stored.len(),
                    };
                    self.transcript.extend_from_slice(&message.stored[..len]);
                    self.transcript.extend_from_slice(b".\r\n");
                    self.session.message_sent();
                }
                Action::Commit { deletions } => {
                    if self.store.commit_fails {
                        self.session.commit_done(false);
                    } else {
                        for messages in self.store.mailboxes.values_mut() {
                            messages.retain(|m| !deletions.contains(&m.key));
                        }
                        self.session.commit_done(true);
                    }
                }
                Action::StartTls => {
                    self.flush();
                    self.session.tls_started();
                }
                Action::Close => {
                    self.flush();
                    self.closed = true;
                    return;
                }
            }
        }
    }
}
