//! The maildrop as one session sees it: the listing the owner shard's index handed over, plus
//! this session's deletion marks (RFC 1939 §5), which only become real at QUIT.

/// Where one delivered copy of a message lives. The store gives it meaning; the POP3 core only
/// hands it back in [`Action::SendMessage`](super::Action::SendMessage) and
/// [`Action::Commit`](super::Action::Commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageKey {
    /// Shard whose log holds the message: the only one that may write its deletion.
    pub shard: u16,
    /// The message's record in that shard's log.
    pub record: u64,
    /// Which recipient of that record this mailbox copy belongs to.
    pub recipient: u16,
}

/// One message of the maildrop as the owner shard's index describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageEntry {
    /// Where the bytes are; opaque here.
    pub key: MessageKey,
    /// Exactly what RETR sends between the `+OK` line and the final `.\r\n`
    /// (`Return-Path:` line included), as RFC 1939 requires for LIST and STAT.
    pub size_octets: u64,
    /// Unique id (RFC 1939 §7): 1 to 70 characters in 0x21..=0x7E, stable and never reused.
    pub uidl: String,
}

/// Why the owner shard could not open the maildrop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenFailure {
    /// Another session holds the maildrop lock: `-ERR [IN-USE]`.
    InUse,
    /// The index cannot serve it right now (shard overloaded, recovering): `-ERR [SYS/TEMP]`.
    Unavailable,
}

/// Why a message number does not name a visible message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageError {
    /// Zero, or beyond the maildrop.
    NoSuchMessage,
    /// Marked deleted in this session: invisible until RSET.
    Deleted,
}

/// Longest UIDL RFC 1939 allows.
pub const MAX_UIDL_LEN: usize = 70;

/// True when `uidl` is 1..=70 characters in 0x21..=0x7E (RFC 1939 §7). Entries with another
/// UIDL would break clients and our unstuffed multi-line replies, so the session refuses them.
pub fn is_valid_uidl(uidl: &str) -> bool {
    (1..=MAX_UIDL_LEN).contains(&uidl.len()) && uidl.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// The listing plus deletion marks, with counters kept current so STAT is O(1).
#[derive(Debug, Default)]
pub struct Maildrop {
    /// Messages in index order; message number n is `entries[n - 1]`.
    entries: Vec<MessageEntry>,
    /// Deletion mark per entry.
    deleted: Vec<bool>,
    /// Messages not marked deleted.
    visible_count: usize,
    /// Sum of `size_octets` of messages not marked deleted.
    visible_octets: u64,
}

impl Maildrop {
    /// Takes over the listing, nothing marked.
    pub fn new(entries: Vec<MessageEntry>) -> Maildrop {
        let visible_octets = entries
            .iter()
            .fold(0u64, |sum, e| sum.saturating_add(e.size_octets));
        Maildrop {
            deleted: vec![false; entries.len()],
            visible_count: entries.len(),
            visible_octets,
            entries,
        }
    }

    /// Number of messages, deleted or not: the highest valid message number.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the maildrop has no message at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Messages not marked deleted.
    pub fn visible_count(&self) -> usize {
        self.visible_count
    }

    /// Octets of messages not marked deleted.
    pub fn visible_octets(&self) -> u64 {
        self.visible_octets
    }

    /// The entry at 0-based `index` if it is not marked deleted.
    pub fn visible_at(&self, index: usize) -> Option<&MessageEntry> {
        match self.deleted.get(index) {
            Some(false) => self.entries.get(index),
            _ => None,
        }
    }

    fn index_of(&self, number: u64) -> Result<usize, MessageError> {
        let index = usize::try_from(number)
            .ok()
            .and_then(|n| n.checked_sub(1))
            .filter(|&i| i < self.entries.len())
            .ok_or(MessageError::NoSuchMessage)?;
        if self.deleted[index] {
            return Err(MessageError::Deleted);
        }
        Ok(index)
    }

    /// The message numbered `number` (1-based) unless absent or marked deleted.
    pub fn get(&self, number: u64) -> Result<&MessageEntry, MessageError> {
        self.index_of(number).map(|i| &self.entries[i])
    }

    /// Marks message `number` deleted; a second DELE of the same message is an error.
    pub fn delete(&mut self, number: u64) -> Result<(), MessageError> {
        let index = self.index_of(number)?;
        self.deleted[index] = true;
        self.visible_count -= 1;
        self.visible_octets = self
            .visible_octets
            .saturating_sub(self.entries[index].size_octets);
        Ok(())
    }

    /// Unmarks every deletion (RSET).
    pub fn reset(&mut self) {
        self.deleted.iter_mut().for_each(|d| *d = false);
        self.visible_count = self.entries.len();
        self.visible_octets = self
            .entries
            .iter()
            .fold(0u64, |sum, e| sum.saturating_add(e.size_octets));
    }

    /// Keys of the messages marked deleted, in maildrop order: what UPDATE must remove.
    pub fn deletions(&self) -> Vec<MessageKey> {
        self.entries
            .iter()
            .zip(&self.deleted)
            .filter(|(_, &deleted)| deleted)
            .map(|(e, _)| e.key)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(record: u64, size_octets: u64) -> MessageEntry {
        MessageEntry {
            key: MessageKey {
                shard: 0,
                record,
                recipient: 0,
            },
            size_octets,
            uidl: format!("u{record}"),
        }
    }

    #[test]
    fn numbers_are_one_based_and_deleted_messages_vanish_until_reset() {
        let mut drop = Maildrop::new(vec![entry(10, 100), entry(11, 200), entry(12, 300)]);
        assert_eq!((drop.visible_count(), drop.visible_octets()), (3, 600));
        assert_eq!(drop.get(0), Err(MessageError::NoSuchMessage));
        assert_eq!(drop.get(4), Err(MessageError::NoSuchMessage));
        assert_eq!(drop.get(u64::MAX), Err(MessageError::NoSuchMessage));
        assert_eq!(drop.get(1).unwrap().key.record, 10);
        assert_eq!(drop.delete(2), Ok(()));
        assert_eq!(drop.delete(2), Err(MessageError::Deleted));
        assert_eq!(drop.get(2), Err(MessageError::Deleted));
        assert!(drop.visible_at(1).is_none());
        assert_eq!((drop.visible_count(), drop.visible_octets()), (2, 400));
        assert_eq!(
            drop.deletions(),
            vec![MessageKey {
                shard: 0,
                record: 11,
                recipient: 0
            }]
        );
        drop.reset();
        assert_eq!((drop.visible_count(), drop.visible_octets()), (3, 600));
        assert!(drop.deletions().is_empty());
        assert_eq!(drop.len(), 3);
    }

    #[test]
    fn uidl_validity_table() {
        for (uidl, valid) in [
            ("a", true),
            ("0123456789abcdef", true),
            ("!~", true),
            ("", false),
            ("with space", false),
            ("tab\t", false),
            ("\u{e9}", false),
            (&"x".repeat(70), true),
            (&"x".repeat(71), false),
        ] {
            assert_eq!(is_valid_uidl(uidl), valid, "{uidl:?}");
        }
    }
}
