//! Mailbox indexes: which messages wait in which mailbox, and who holds each maildrop.
//!
//! A mailbox's index lives on its owner shard (`routing::owner_shard`). Shards that store a
//! message for it send the owner a small entry — where the message is and how big — never the
//! bytes. The index is rebuilt from the logs at start and is the only thing POP3 lists from.

use std::collections::{BTreeMap, HashMap};

use crate::pop3::{MessageEntry, MessageKey};

/// Identifies one POP3 session across the process: the shard it runs on and a number that
/// shard never reuses while running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId {
    pub shard: u16,
    pub serial: u64,
}

/// Why a maildrop could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenRefusal {
    /// Another session holds it (RFC 2449 `[IN-USE]`).
    InUse,
}

/// The order messages are listed in: arrival time, then storage position, so a listing is
/// stable across sessions and restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Position {
    received_at_us: u64,
    shard: u16,
    record: u64,
    recipient: u16,
}

impl Position {
    fn of(key: MessageKey, received_at_us: u64) -> Position {
        Position {
            received_at_us,
            shard: key.shard,
            record: key.record,
            recipient: key.recipient,
        }
    }

    fn key(&self) -> MessageKey {
        MessageKey {
            shard: self.shard,
            record: self.record,
            recipient: self.recipient,
        }
    }
}

#[derive(Debug, Default)]
struct Mailbox {
    /// Waiting messages with their RETR size in octets.
    messages: BTreeMap<Position, u64>,
    /// Where each key sits in `messages`, for removal.
    positions: HashMap<MessageKey, Position>,
    /// The session holding the maildrop (RFC 1939 exclusive access).
    holder: Option<SessionId>,
}

/// The mailbox indexes one shard owns.
#[derive(Debug, Default)]
pub struct MailboxIndex {
    /// Keyed by the lower-cased configured address.
    boxes: HashMap<String, Mailbox>,
}

/// The UIDL of a mailbox entry: derived from where the message is stored, so it is stable
/// across sessions, restarts and compaction (records keep their ids) and never reused (ids
/// never are).
pub fn uidl(key: MessageKey) -> String {
    format!("{:x}.{:x}.{:x}", key.shard, key.record, key.recipient)
}

impl MailboxIndex {
    /// Records that a message waits in `mailbox`. Adding the same key twice changes nothing,
    /// so replays at start-up are harmless.
    pub fn add(&mut self, mailbox: &str, key: MessageKey, received_at_us: u64, size_octets: u64) {
        let mailbox = self.boxes.entry(mailbox.to_ascii_lowercase()).or_default();
        if mailbox.positions.contains_key(&key) {
            return;
        }
        let position = Position::of(key, received_at_us);
        mailbox.messages.insert(position, size_octets);
        mailbox.positions.insert(key, position);
    }

    /// Locks the maildrop for `holder` and lists it.
    pub fn open(
        &mut self,
        mailbox: &str,
        holder: SessionId,
    ) -> Result<Vec<MessageEntry>, OpenRefusal> {
        let mailbox = self.boxes.entry(mailbox.to_ascii_lowercase()).or_default();
        match mailbox.holder {
            Some(current) if current != holder => return Err(OpenRefusal::InUse),
            _ => mailbox.holder = Some(holder),
        }
        Ok(mailbox
            .messages
            .iter()
            .map(|(position, size)| MessageEntry {
                key: position.key(),
                size_octets: *size,
                uidl: uidl(position.key()),
            })
            .collect())
    }

    /// Removes messages whose deletion is durable and releases the lock if `holder` has it.
    pub fn close(&mut self, mailbox: &str, holder: SessionId, removed: &[MessageKey]) {
        let name = mailbox.to_ascii_lowercase();
        let Some(mailbox) = self.boxes.get_mut(&name) else {
            return;
        };
        for key in removed {
            if let Some(position) = mailbox.positions.remove(key) {
                mailbox.messages.remove(&position);
            }
        }
        if mailbox.holder == Some(holder) {
            mailbox.holder = None;
        }
        if mailbox.holder.is_none() && mailbox.messages.is_empty() {
            self.boxes.remove(&name);
        }
    }

    /// Messages waiting in `mailbox` (for metrics and tests).
    pub fn len(&self, mailbox: &str) -> usize {
        self.boxes
            .get(&mailbox.to_ascii_lowercase())
            .map_or(0, |m| m.messages.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(shard: u16, record: u64) -> MessageKey {
        MessageKey {
            shard,
            record,
            recipient: 0,
        }
    }

    const A: SessionId = SessionId {
        shard: 0,
        serial: 1,
    };
    const B: SessionId = SessionId {
        shard: 1,
        serial: 1,
    };

    #[test]
    fn lists_in_arrival_order_with_stable_uidls() {
        let mut index = MailboxIndex::default();
        index.add("Alice@Example.Test", key(1, 9), 200, 50);
        index.add("alice@example.test", key(0, 3), 100, 40);
        index.add("alice@example.test", key(0, 3), 100, 40);
        let listed = index.open("ALICE@example.test", A).unwrap();
        assert_eq!(
            listed.iter().map(|e| e.key).collect::<Vec<_>>(),
            vec![key(0, 3), key(1, 9)]
        );
        assert_eq!(listed[1].uidl, "1.9.0");
        assert_eq!(listed[0].size_octets, 40);
    }

    #[test]
    fn one_holder_at_a_time_and_close_releases() {
        let mut index = MailboxIndex::default();
        index.add("a@x", key(0, 1), 1, 10);
        index.open("a@x", A).unwrap();
        assert_eq!(index.open("a@x", B), Err(OpenRefusal::InUse));
        // A session that is not the holder cannot release the lock.
        index.close("a@x", B, &[]);
        assert_eq!(index.open("a@x", B), Err(OpenRefusal::InUse));
        index.close("a@x", A, &[key(0, 1)]);
        assert_eq!(index.open("a@x", B).unwrap(), vec![]);
        index.close("a@x", B, &[]);
        assert_eq!(index.len("a@x"), 0);
        assert!(index.boxes.is_empty());
    }
}
