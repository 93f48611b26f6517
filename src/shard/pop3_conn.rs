//! The POP3 connection loop: socket I/O, timers, password checks off the executor, mailbox
//! locks on the owner shard, and RETR straight from the log's memory map.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{future, AsyncWrite};

use super::conn::{read_some, write_all, write_all_vectored, IdleClock, ReadOutcome};
use super::ingest::{record_outcome, write_return_path_line};
use super::mesh::{reply_channel, MeshMessage};
use super::stream::ConnStream;
use super::Shard;
use crate::envelope::{self, Outcome};
use crate::limits::Refusal;
use crate::mailbox::{OpenRefusal, SessionId};
use crate::pop3::{Action, MessageKey, OpenFailure, PeerInfo, Session};
use crate::relay::client::data_terminator;
use crate::routing::owner_shard;
use crate::server::ListenerKind;
use crate::store::{RecordId, RecordRef};

/// How long a RETR may wait for the client to take the bytes.
const WRITE_TIMEOUT: Duration = Duration::from_secs(120);

/// The maildrop a session holds; released on the owner shard however the session ends.
struct HeldMaildrop {
    shard: Rc<Shard>,
    mailbox: String,
    holder: SessionId,
    /// Deletions made durable at QUIT, for the owner to forget.
    removed: Vec<MessageKey>,
}

impl Drop for HeldMaildrop {
    fn drop(&mut self) {
        let owner = owner_shard(&self.mailbox, self.shard.shared.shard_count);
        let message = MeshMessage::MailboxClose {
            mailbox: std::mem::take(&mut self.mailbox),
            holder: self.holder,
            removed: std::mem::take(&mut self.removed),
        };
        if owner == self.shard.id {
            super::inbox::handle(&self.shard, message);
        } else {
            // A destructor cannot wait for room in a full inbox, but a task can: the lock
            // must be released however the session ended.
            let mesh = self.shard.mesh.clone();
            glommio::spawn_local(async move { mesh.send(owner, message).await }).detach();
        }
    }
}

/// Serves one POP3 connection to the end; on `pop3.tls_listen` the TLS handshake runs first.
pub async fn serve(shard: Rc<Shard>, mut stream: ConnStream, peer: SocketAddr, kind: ListenerKind) {
    let config = &shard.shared.config;
    let _open = shard.metrics.pop3.opened();
    let _slot = match shard.shared.pop3_limits.admit(peer.ip()) {
        Ok(slot) => slot,
        Err(refusal) => {
            let why = match refusal {
                Refusal::TooManyConnections => "too many connections",
                Refusal::TooManyFromAddress => "too many connections from your address",
            };
            tracing::info!(shard = shard.id, client = %peer.ip(), "pop3 refused: {why}");
            // A client on the implicit-TLS port cannot read a plain-text reply: it is closed.
            if kind != ListenerKind::Pop3Tls {
                let reply = format!("-ERR [SYS/TEMP] {why}, try again later\r\n");
                let _ = write_all(&mut stream, reply.as_bytes(), WRITE_TIMEOUT).await;
            }
            return;
        }
    };
    if kind == ListenerKind::Pop3Tls {
        let Some(tls) = &shard.shared.tls else {
            return;
        };
        stream = match stream.start_tls(tls).await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(shard = shard.id, client = %peer, "pop3s handshake: {e}");
                return;
            }
        };
    }
    let mut session = Session::new(
        Rc::clone(&shard.pop3_params),
        PeerInfo {
            addr: peer,
            // Passwords are accepted only where they cannot be sniffed.
            plaintext_auth_allowed: stream.is_tls() || is_loopback(peer.ip()),
            tls: stream.is_tls(),
        },
    );
    let holder = SessionId {
        shard: shard.id as u16,
        serial: shard.next_session_serial(),
    };
    let mut maildrop: Option<HeldMaildrop> = None;
    let mut read_ahead = ReadAhead::default();
    let mut outbox = Outbox::default();
    // A trickling client would also hold its mailbox lock.
    let mut idle = IdleClock::start(config.pop3.idle_timeout);

    loop {
        if !session.output().is_empty() {
            let n = session.output().len();
            outbox.push_copy(session.output());
            shard.metrics.pop3.sent(n);
            session.output_consumed(n);
        }
        let action = session.poll_action();
        // Pipelined RETRs pile up in the outbox and leave in one sendmsg; anything else, or a
        // full outbox, sends what is there first.
        let batching = matches!(action, Action::SendMessage { .. }) && !outbox.is_full();
        if !batching && !outbox.is_empty() {
            if outbox.flush(&mut stream).await.is_err() {
                break;
            }
            idle.restart();
        }
        match action {
            Action::Idle => {
                // Long replies are produced as output drains: flush before anything else.
                if !session.output().is_empty() {
                    continue;
                }
                if !session.wants_input() {
                    break;
                }
                let read = future::or(
                    async {
                        Some(read_some(&mut stream, session.input_buffer(), idle.remaining()).await)
                    },
                    async {
                        shard.stopped().await;
                        None
                    },
                )
                .await;
                match read {
                    Some(ReadOutcome::Data(n)) => {
                        shard.metrics.pop3.received(n);
                        session.input_filled(n)
                    }
                    None => {
                        let _ = write_all(
                            &mut stream,
                            b"-ERR [SYS/TEMP] server shutting down\r\n",
                            WRITE_TIMEOUT,
                        )
                        .await;
                        break;
                    }
                    Some(ReadOutcome::TimedOut) => {
                        let _ = write_all(
                            &mut stream,
                            b"-ERR autologout; idle for too long\r\n",
                            WRITE_TIMEOUT,
                        )
                        .await;
                        break;
                    }
                    Some(ReadOutcome::Closed) | Some(ReadOutcome::Failed(_)) => break,
                }
            }
            Action::Authenticate { user, password } => {
                let ok = super::login::verify(&shard, peer, "pop3", user, password).await;
                shard.metrics.record_pop3_login(ok);
                session.auth_checked(ok);
            }
            Action::OpenMailbox { user } => {
                let mailbox = shard
                    .users
                    .canonical(&user)
                    .map(str::to_string)
                    .unwrap_or(user);
                let result = open_maildrop(&shard, &mailbox, holder).await;
                if let Ok(listing) = &result {
                    read_ahead.listing = listing.iter().map(|entry| entry.key).collect();
                }
                if result.is_ok() {
                    maildrop = Some(HeldMaildrop {
                        shard: Rc::clone(&shard),
                        mailbox,
                        holder,
                        removed: Vec::new(),
                    });
                }
                session.mailbox_opened(result);
            }
            Action::SendMessage { key, top_lines } => {
                if queue_message(
                    &shard,
                    &mut outbox,
                    &mut session,
                    &mut read_ahead,
                    key,
                    top_lines,
                )
                .await
                .is_err()
                {
                    break;
                }
                shard.metrics.record_pop3_message_sent(top_lines);
                session.message_sent();
            }
            Action::Commit { deletions } => {
                let recorded = commit_deletions(&shard, &deletions).await;
                let ok = recorded.len() == deletions.len();
                shard.metrics.record_pop3_deletions(recorded.len());
                // The index forgets every deletion that is durable, even when another failed:
                // such a message is gone from the log's point of view, and once its record
                // dies, listing it would offer a message RETR can no longer send.
                if let Some(held) = maildrop.as_mut() {
                    held.removed = recorded;
                }
                // Release the lock (and forget the deleted) before the client hears +OK.
                drop(maildrop.take());
                session.commit_done(ok);
            }
            // The session sends +OK and asks for this only with nothing buffered behind STLS.
            Action::StartTls => {
                let Some(tls) = &shard.shared.tls else {
                    break;
                };
                stream = match stream.start_tls(tls).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::debug!(shard = shard.id, client = %peer, "stls handshake: {e}");
                        break;
                    }
                };
                session.tls_started();
                idle.restart();
            }
            // The goodbye already left with the outbox.
            Action::Close => break,
        }
    }
    drop(maildrop);
}

async fn open_maildrop(
    shard: &Rc<Shard>,
    mailbox: &str,
    holder: SessionId,
) -> Result<Vec<crate::pop3::MessageEntry>, OpenFailure> {
    let owner = owner_shard(mailbox, shard.shared.shard_count);
    let (reply, answer) = reply_channel();
    let request = MeshMessage::MailboxOpen {
        mailbox: mailbox.to_string(),
        holder,
        reply,
    };
    if owner == shard.id {
        super::inbox::handle(shard, request);
    } else {
        shard.mesh.send(owner, request).await;
    }
    match answer.recv_async().await {
        Ok(Ok(listing)) => Ok(listing),
        Ok(Err(OpenRefusal::InUse)) => Err(OpenFailure::InUse),
        Err(_) => Err(OpenFailure::Unavailable),
    }
}

/// Record handles a session fetched ahead of need, for messages stored on other shards.
///
/// A `RecordRef` is a pointer into a shared memory map, so asking the storing shard for a batch
/// of them in one request costs one mesh round trip per [`READ_AHEAD_RECORDS`] messages instead
/// of one per RETR. Handles are dropped as they are used, so at most one batch is held.
#[derive(Default)]
struct ReadAhead {
    /// The maildrop's keys in listing order, to know which messages come next.
    listing: Vec<MessageKey>,
    handles: std::collections::HashMap<MessageKey, RecordRef>,
}

/// Messages whose handles one request fetches.
pub const READ_AHEAD_RECORDS: usize = 64;

impl ReadAhead {
    /// A handle on `key`'s record, from this shard's log directly or from the storing shard
    /// together with the next messages it stores for this maildrop.
    async fn fetch(&mut self, shard: &Rc<Shard>, key: MessageKey) -> Result<RecordRef, String> {
        if usize::from(key.shard) == shard.id {
            return shard
                .store
                .read(RecordId(key.record))
                .map_err(|e| e.to_string());
        }
        if let Some(handle) = self.handles.remove(&key) {
            return Ok(handle);
        }
        let start = self.listing.iter().position(|k| *k == key).unwrap_or(0);
        let mut batch = vec![key];
        batch.extend(
            self.listing[start..]
                .iter()
                .filter(|k| k.shard == key.shard && **k != key && !self.handles.contains_key(k))
                .take(READ_AHEAD_RECORDS - 1),
        );
        let (reply, answer) = reply_channel();
        shard
            .mesh
            .send(
                usize::from(key.shard),
                MeshMessage::ReadRecords {
                    records: batch.iter().map(|k| RecordId(k.record)).collect(),
                    reply,
                },
            )
            .await;
        let handles = answer
            .recv_async()
            .await
            .map_err(|_| "the storing shard is gone".to_string())?;
        let mut wanted = Err("the storing shard answered nothing".to_string());
        for (k, handle) in batch.into_iter().zip(handles) {
            if k == key {
                wanted = handle;
            } else if let Ok(handle) = handle {
                self.handles.insert(k, handle);
            }
        }
        wanted
    }
}

/// What a session has answered but not yet written: reply lines (copied, they are small) and
/// messages (handles on the log's memory map, not copies), sent together with one `sendmsg`.
#[derive(Default)]
struct Outbox {
    pieces: Vec<Piece>,
    bytes: usize,
}

enum Piece {
    Copied(Vec<u8>),
    Fixed(&'static [u8]),
    Stored(RecordRef, std::ops::Range<usize>),
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        match self {
            Piece::Copied(bytes) => bytes,
            Piece::Fixed(bytes) => bytes,
            Piece::Stored(record, range) => &record[range.clone()],
        }
    }
}

/// Bytes an outbox gathers before it is sent: a few dozen 10 KiB messages, about what a
/// loopback socket takes in one call.
const OUTBOX_MAX_BYTES: usize = 256 * 1024;
/// Pieces an outbox gathers before it is sent, well below the kernel's 1024 iovecs a call.
const OUTBOX_MAX_PIECES: usize = 256;

impl Outbox {
    fn push_copy(&mut self, bytes: &[u8]) {
        self.copy_with(|out| out.extend_from_slice(bytes));
    }

    /// Lets `write` append to the copied bytes at the end of the outbox: reply lines and a
    /// message's `Return-Path:` join the copy before them rather than taking an allocation
    /// and an iovec each.
    fn copy_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        if !matches!(self.pieces.last(), Some(Piece::Copied(_))) {
            self.pieces.push(Piece::Copied(Vec::new()));
        }
        let Some(Piece::Copied(last)) = self.pieces.last_mut() else {
            unreachable!("a copied piece was just ensured");
        };
        let before = last.len();
        write(last);
        self.bytes += last.len() - before;
    }

    fn push(&mut self, piece: Piece) {
        self.bytes += piece.bytes().len();
        self.pieces.push(piece);
    }

    fn is_full(&self) -> bool {
        self.bytes >= OUTBOX_MAX_BYTES || self.pieces.len() + 3 > OUTBOX_MAX_PIECES
    }

    fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Writes everything gathered, in order, and empties the outbox.
    async fn flush<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> std::io::Result<()> {
        let slices: Vec<&[u8]> = self.pieces.iter().map(Piece::bytes).collect();
        write_all_vectored(stream, &slices, WRITE_TIMEOUT).await?;
        self.pieces.clear();
        self.bytes = 0;
        Ok(())
    }
}

/// RETR/TOP: the session queued the `+OK` line; queue it with `Return-Path:`, then the stored
/// bytes straight from the memory map — no copy in user space — then the terminating dot.
async fn queue_message(
    shard: &Rc<Shard>,
    outbox: &mut Outbox,
    session: &mut Session,
    read_ahead: &mut ReadAhead,
    key: MessageKey,
    top_lines: Option<u64>,
) -> std::io::Result<()> {
    let record = read_ahead
        .fetch(shard, key)
        .await
        .map_err(std::io::Error::other)?;
    let (mail_from, stored) =
        envelope::decode_for_retrieval(&record).map_err(std::io::Error::other)?;
    let stored = match top_lines {
        Some(lines) => {
            stored.start..stored.start + crate::pop3::top_len(&record[stored.clone()], lines)
        }
        None => stored,
    };
    // A cold segment would fault inside send() and stall every connection of the shard.
    record.prefetch();
    let queued_before = outbox.bytes;
    // The +OK line (when the loop has not taken it already) and Return-Path, as copies.
    let status_len = session.output().len();
    outbox.push_copy(session.output());
    session.output_consumed(status_len);
    outbox.copy_with(|out| write_return_path_line(out, mail_from));
    let tail = data_terminator(&record[stored.end.saturating_sub(2).max(stored.start)..stored.end]);
    outbox.push(Piece::Stored(record, stored));
    outbox.push(Piece::Fixed(tail));
    shard.metrics.pop3.sent(outbox.bytes - queued_before);
    Ok(())
}

/// UPDATE: records the deletions durably in the log of each shard that stored them.
/// Records the deletions with the shards that store the messages; returns those that are
/// durable (all of them, unless a shard failed to record its share).
async fn commit_deletions(shard: &Rc<Shard>, deletions: &[MessageKey]) -> Vec<MessageKey> {
    let mut by_record: BTreeMap<(u16, u64), Vec<u16>> = BTreeMap::new();
    for key in deletions {
        by_record
            .entry((key.shard, key.record))
            .or_default()
            .push(key.recipient);
    }
    let keys = |(storing_shard, record): (u16, u64), recipients: &[u16]| {
        recipients
            .iter()
            .map(|&recipient| MessageKey {
                shard: storing_shard,
                record,
                recipient,
            })
            .collect::<Vec<_>>()
    };
    let mut waits = Vec::new();
    let mut local = Vec::new();
    for ((storing_shard, record), recipients) in by_record {
        let group = keys((storing_shard, record), &recipients);
        let record = RecordId(record);
        if usize::from(storing_shard) == shard.id {
            // Concurrent appends share one group commit.
            let shard = Rc::clone(shard);
            let task = glommio::spawn_local(async move {
                record_outcome(&shard, record, recipients, Outcome::Deleted)
                    .await
                    .map_err(|e| e.to_string())
            });
            local.push((group, task));
        } else {
            let (reply, answer) = reply_channel();
            shard
                .mesh
                .send(
                    usize::from(storing_shard),
                    MeshMessage::RecordOutcome {
                        record,
                        recipients,
                        outcome: Outcome::Deleted,
                        reply,
                    },
                )
                .await;
            waits.push((group, answer));
        }
    }
    let mut recorded = Vec::with_capacity(deletions.len());
    for (group, task) in local {
        match task.await {
            Ok(()) => recorded.extend(group),
            Err(e) => tracing::error!(shard = shard.id, "deletion not recorded: {e}"),
        }
    }
    for (group, answer) in waits {
        match answer.recv_async().await {
            Ok(Ok(())) => recorded.extend(group),
            Ok(Err(e)) => tracing::error!(shard = shard.id, "deletion not recorded: {e}"),
            Err(_) => tracing::error!(shard = shard.id, "deletion not recorded: shard gone"),
        }
    }
    recorded
}

/// Loopback, including IPv4 loopback seen through an IPv6 socket.
fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}
