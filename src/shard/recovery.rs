//! Rebuilding a shard's in-memory state from its recovered log: the ledger of unfinished
//! recipients, and the index entries that go to each mailbox's owner.

use std::rc::Rc;

use super::ingest::{index_on_owner, mark_dead_later};
use super::ledger::Applied;
use super::Shard;
use crate::envelope::{self, DeferralRecord, Destination, OutcomeRecord};
use crate::store::{RecordId, Recovered};

/// Replays the live records. Message records are applied before outcome records: compaction
/// may have copied a message forward past the outcomes that speak of it.
pub async fn rebuild(shard: &Rc<Shard>, recovered: Recovered) {
    let mut garbage: Vec<RecordId> = Vec::new();
    let mut waiting = Vec::new();
    for record in &recovered.records {
        if record.kind != envelope::kind::MESSAGE {
            continue;
        }
        match envelope::decode_message(&record.record) {
            Ok(layout) => {
                shard
                    .ledger
                    .borrow_mut()
                    .add_message(record.id, layout.envelope.recipients.len());
                waiting.push((record.id, layout));
            }
            Err(e) => {
                tracing::error!(
                    shard = shard.id,
                    record = %record.id,
                    "message record cannot be decoded ({e}); dropping it"
                );
                garbage.push(record.id);
            }
        }
    }
    for record in &recovered.records {
        match record.kind {
            envelope::kind::MESSAGE => {}
            envelope::kind::OUTCOME => match OutcomeRecord::decode(&record.record) {
                Ok(outcome) => match shard.ledger.borrow_mut().apply_outcome(record.id, &outcome) {
                    Applied::Pending => {}
                    Applied::Orphan => garbage.push(record.id),
                    Applied::Finished(dead) => garbage.extend(dead),
                },
                Err(_) => garbage.push(record.id),
            },
            envelope::kind::DEFERRAL => match DeferralRecord::decode(&record.record) {
                Ok(deferral) => {
                    if !shard
                        .ledger
                        .borrow_mut()
                        .attach(RecordId(deferral.message), record.id)
                    {
                        garbage.push(record.id);
                    }
                }
                Err(_) => garbage.push(record.id),
            },
            other => {
                tracing::error!(
                    shard = shard.id,
                    record = %record.id,
                    "record of unknown kind {other}; dropping it"
                );
                garbage.push(record.id);
            }
        }
    }

    let mut acks = Vec::new();
    let mut indexed = 0usize;
    for (id, layout) in &waiting {
        for (index, recipient) in layout.envelope.recipients.iter().enumerate() {
            let Destination::Mailbox(mailbox) = &recipient.destination else {
                continue;
            };
            if !shard.ledger.borrow().is_pending(*id, index as u16) {
                continue;
            }
            acks.push(
                index_on_owner(
                    shard,
                    mailbox,
                    *id,
                    index,
                    &layout.envelope,
                    layout.stored_message().len(),
                )
                .await,
            );
            indexed += 1;
        }
    }
    for ack in acks {
        let _ = ack.recv_async().await;
    }
    super::relay::queue_recovered(shard, &recovered.records, &waiting);
    if !garbage.is_empty() {
        mark_dead_later(shard, garbage);
    }
    tracing::info!(
        shard = shard.id,
        messages = shard.ledger.borrow().len(),
        mailbox_entries = indexed,
        "indexes rebuilt"
    );
}
