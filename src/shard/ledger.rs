//! Which recipients of each stored message are still unfinished — the liveness of message
//! records in this shard's log.
//!
//! A message record stays live while any recipient still waits (in a mailbox, or in the relay
//! queue). Each finished recipient gets an outcome record; when the last one is finished the
//! message record and all its outcome records are marked dead together, and space reclaim frees
//! them. Only the shard that stored a message keeps its ledger entry.

use std::collections::HashMap;

use crate::envelope::{Outcome, OutcomeRecord};
use crate::store::RecordId;

#[derive(Debug)]
struct Entry {
    /// One flag per envelope recipient: finished (deleted, delivered or bounced).
    finished: Vec<bool>,
    /// Outcome and deferral records that speak about this message; they die with it.
    satellites: Vec<RecordId>,
}

impl Entry {
    fn is_finished(&self) -> bool {
        self.finished.iter().all(|f| *f)
    }
}

/// What applying an outcome changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// The message is unknown (already dead, or never stored here): the outcome record itself
    /// is garbage and should be marked dead.
    Orphan,
    /// Some recipients remain.
    Pending,
    /// Every recipient is finished: these records (the message and its satellites) can die.
    Finished(Vec<RecordId>),
}

/// The live messages of one shard's log.
#[derive(Debug, Default)]
pub struct Ledger {
    messages: HashMap<RecordId, Entry>,
}

impl Ledger {
    /// A message record with `recipients` recipients, all unfinished.
    pub fn add_message(&mut self, id: RecordId, recipients: usize) {
        self.messages.entry(id).or_insert_with(|| Entry {
            finished: vec![false; recipients],
            satellites: Vec::new(),
        });
    }

    pub fn contains(&self, id: RecordId) -> bool {
        self.messages.contains_key(&id)
    }

    /// Whether recipient `index` of message `id` is still waiting.
    pub fn is_pending(&self, id: RecordId, index: u16) -> bool {
        self.messages
            .get(&id)
            .and_then(|e| e.finished.get(usize::from(index)))
            .is_some_and(|finished| !finished)
    }

    /// Applies a durable outcome record (`record` is its own id).
    pub fn apply_outcome(&mut self, record: RecordId, outcome: &OutcomeRecord) -> Applied {
        let message = RecordId(outcome.message);
        let Some(entry) = self.messages.get_mut(&message) else {
            return Applied::Orphan;
        };
        for index in &outcome.recipients {
            if let Some(flag) = entry.finished.get_mut(usize::from(*index)) {
                *flag = true;
            }
        }
        entry.satellites.push(record);
        if entry.is_finished() {
            let entry = self.messages.remove(&message).expect("present above");
            let mut dead = entry.satellites;
            dead.push(message);
            Applied::Finished(dead)
        } else {
            Applied::Pending
        }
    }

    /// Attaches a record (a deferral) that must die with its message. Returns false for an
    /// unknown message: the record is garbage.
    pub fn attach(&mut self, message: RecordId, record: RecordId) -> bool {
        match self.messages.get_mut(&message) {
            Some(entry) => {
                entry.satellites.push(record);
                true
            }
            None => false,
        }
    }

    /// Live messages (for metrics).
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// The outcome an action records; kept here so callers name it in one place.
pub fn outcome_record(message: RecordId, outcome: Outcome, recipients: Vec<u16>) -> OutcomeRecord {
    OutcomeRecord {
        message: message.0,
        outcome,
        recipients,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_dies_with_its_outcomes_when_every_recipient_is_finished() {
        let mut ledger = Ledger::default();
        ledger.add_message(RecordId(1), 2);
        assert!(ledger.is_pending(RecordId(1), 1));
        let first = outcome_record(RecordId(1), Outcome::Deleted, vec![0]);
        assert_eq!(ledger.apply_outcome(RecordId(2), &first), Applied::Pending);
        assert!(!ledger.is_pending(RecordId(1), 0));
        assert!(ledger.attach(RecordId(1), RecordId(3)));
        let second = outcome_record(RecordId(1), Outcome::Delivered, vec![1]);
        assert_eq!(
            ledger.apply_outcome(RecordId(4), &second),
            Applied::Finished(vec![RecordId(2), RecordId(3), RecordId(4), RecordId(1)])
        );
        assert!(ledger.is_empty());
        assert_eq!(ledger.apply_outcome(RecordId(5), &second), Applied::Orphan);
        assert!(!ledger.attach(RecordId(1), RecordId(6)));
    }

    #[test]
    fn out_of_range_recipients_are_ignored() {
        let mut ledger = Ledger::default();
        ledger.add_message(RecordId(1), 1);
        let bogus = outcome_record(RecordId(1), Outcome::Deleted, vec![7]);
        assert_eq!(ledger.apply_outcome(RecordId(2), &bogus), Applied::Pending);
        assert!(!ledger.is_pending(RecordId(1), 7));
        assert!(ledger.is_pending(RecordId(1), 0));
    }
}
