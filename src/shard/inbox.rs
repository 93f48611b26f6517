//! Answers what other shards ask this one (see [`super::mesh`]).

use std::rc::Rc;

use super::mesh::MeshMessage;
use super::Shard;

/// Serves the inbox until every sender is gone.
pub async fn serve(shard: Rc<Shard>, inbox: flume::Receiver<MeshMessage>) {
    while let Ok(message) = inbox.recv_async().await {
        handle(&shard, message);
    }
}

/// Handles one request. Anything that waits (a log append) runs in its own task so that one
/// slow fdatasync never holds up index lookups behind it.
pub fn handle(shard: &Rc<Shard>, message: MeshMessage) {
    match message {
        MeshMessage::MailboxAdd {
            mailbox,
            key,
            received_at_us,
            size_octets,
            done,
        } => {
            shard
                .mailboxes
                .borrow_mut()
                .add(&mailbox, key, received_at_us, size_octets);
            if let Some(done) = done {
                let _ = done.try_send(());
            }
        }
        MeshMessage::MailboxOpen {
            mailbox,
            holder,
            reply,
        } => {
            let listing = shard.mailboxes.borrow_mut().open(&mailbox, holder);
            let _ = reply.try_send(listing);
        }
        MeshMessage::MailboxClose {
            mailbox,
            holder,
            removed,
        } => shard
            .mailboxes
            .borrow_mut()
            .close(&mailbox, holder, &removed),
        MeshMessage::ReadRecords { records, reply } => {
            let handles = records
                .into_iter()
                .map(|record| shard.store.read(record).map_err(|e| e.to_string()))
                .collect();
            let _ = reply.try_send(handles);
        }
        MeshMessage::RecordOutcome {
            record,
            recipients,
            outcome,
            reply,
        } => {
            let shard = Rc::clone(shard);
            glommio::spawn_local(async move {
                let result = super::ingest::record_outcome(&shard, record, recipients, outcome)
                    .await
                    .map_err(|e| e.to_string());
                let _ = reply.try_send(result);
            })
            .detach();
        }
    }
}
