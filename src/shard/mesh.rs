//! The channels shards use to ask each other things.
//!
//! Every shard has one inbox; every shard holds a sender to every inbox, indexed by shard id.
//! Messages are small — index entries, requests for a record handle, outcome notices — and
//! never carry message bytes: a [`RecordRef`] is a pointer into a shared memory map. Replies
//! travel on one-shot channels included in the request; both ends wake the executor that waits
//! on them, so no shard ever blocks on another.

use crate::envelope::Outcome;
use crate::mailbox::{OpenRefusal, SessionId};
use crate::pop3::{MessageEntry, MessageKey};
use crate::store::{RecordId, RecordRef};

/// Requests each inbox may hold before senders wait: a burst cap, not a throughput limit.
pub const INBOX_CAPACITY: usize = 16 * 1024;

/// A one-shot reply channel.
pub type Reply<T> = flume::Sender<T>;

/// Creates a one-shot reply channel pair.
pub fn reply_channel<T>() -> (Reply<T>, flume::Receiver<T>) {
    flume::bounded(1)
}

/// What one shard asks another.
#[derive(Debug)]
pub enum MeshMessage {
    /// To a mailbox's owner: a message now waits in this mailbox. `done` is answered once
    /// the index shows it, so a 250 is never followed by a listing without the message.
    MailboxAdd {
        mailbox: String,
        key: MessageKey,
        received_at_us: u64,
        size_octets: u64,
        done: Option<Reply<()>>,
    },
    /// To a mailbox's owner: lock the maildrop for this session and list it.
    MailboxOpen {
        mailbox: String,
        holder: SessionId,
        reply: Reply<Result<Vec<MessageEntry>, OpenRefusal>>,
    },
    /// To a mailbox's owner: forget these (durably deleted) entries and release the lock.
    MailboxClose {
        mailbox: String,
        holder: SessionId,
        removed: Vec<MessageKey>,
    },
    /// To the shard that stored these records: handles on their bytes, in order. A POP3
    /// session asks for the messages ahead of the one it sends, so that retrieving a
    /// maildrop costs one round trip per batch rather than one per message.
    ReadRecords {
        records: Vec<RecordId>,
        reply: Reply<Vec<Result<RecordRef, String>>>,
    },
    /// To the shard that stored a message: these recipients are finished; answer once that is
    /// durable in its log.
    RecordOutcome {
        record: RecordId,
        recipients: Vec<u16>,
        outcome: Outcome,
        reply: Reply<Result<(), String>>,
    },
}

/// Senders to every shard's inbox, indexed by shard id.
#[derive(Clone, Debug)]
pub struct Mesh {
    inboxes: std::sync::Arc<[flume::Sender<MeshMessage>]>,
}

impl Mesh {
    /// Creates the inboxes of `shards` shards: the mesh, and each shard's receiving end.
    pub fn new(shards: usize) -> (Mesh, Vec<flume::Receiver<MeshMessage>>) {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| flume::bounded(INBOX_CAPACITY)).unzip();
        (
            Mesh {
                inboxes: senders.into(),
            },
            receivers,
        )
    }

    /// Sends to shard `to`, waiting (without blocking the executor) while its inbox is full.
    pub async fn send(&self, to: usize, message: MeshMessage) {
        // A closed inbox means that shard is gone and the process is stopping.
        let _ = self.inboxes[to].send_async(message).await;
    }
}
