//! Storing an accepted transaction durably, and recording what became of its recipients.
//!
//! The message is appended once, to this shard's log, from the very buffers DATA was read into
//! (a record of 4 KiB or less is copied into one write instead, see `copy_below_bytes`);
//! `250` is only sent once the group commit covering it completes and the mailbox owners have
//! indexed it. Recipient outcomes are small records in the same log; when the last recipient
//! of a message is finished, the message dies and reclaim frees its space.

use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::ledger::{outcome_record, Applied};
use super::mesh::{reply_channel, MeshMessage};
use super::Shard;
use crate::envelope::{self, Destination, Envelope, EnvelopeRecipient, Outcome};
use crate::pop3::MessageKey;
use crate::routing::{owner_shard, Route};
use crate::smtp::{received, StoreFailure, Transaction};
use crate::store::{RecordId, StoreError};

/// What a POP3 RETR of this recipient's copy sends, in octets: the `Return-Path:` line made at
/// RETR time, then the stored `Received:` header and body.
pub fn retr_size_octets(mail_from: &str, stored_message_len: usize) -> u64 {
    (RETURN_PATH_OVERHEAD + mail_from.len() + stored_message_len) as u64
}

/// Octets the `Return-Path:` line adds around the address.
pub const RETURN_PATH_OVERHEAD: usize = "Return-Path: <>\r\n".len();

/// Appends the `Return-Path:` line POP3 RETR puts in front of a stored message to `out`.
pub fn write_return_path_line(out: &mut Vec<u8>, mail_from: &str) {
    out.extend_from_slice(b"Return-Path: <");
    out.extend_from_slice(mail_from.as_bytes());
    out.extend_from_slice(b">\r\n");
}

fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The queue id a client sees: unique across shards (the shard prefix) and restarts (the
/// log never reuses a record id that was reported durable).
pub fn queue_id(shard: usize, record: RecordId) -> String {
    format!("{shard:03X}{:011X}", record.0)
}

/// Appends the transaction's message record, waits for it to be durable and indexed, and
/// returns its queue id.
pub async fn store_transaction(
    shard: &Rc<Shard>,
    transaction: Transaction,
) -> Result<String, StoreFailure> {
    let config = &shard.shared.config;
    let floor = config.smtp.max_message_size.saturating_mul(3) / 2;
    if shard.free_space_bytes() < floor {
        tracing::warn!(
            shard = shard.id,
            "refusing mail: free space on the log's file system is below {floor} bytes"
        );
        return Err(StoreFailure::DiskFull);
    }
    let id = shard.store.allocate_id();
    let queue_id = queue_id(shard.id, id);
    let received_at_us = unix_now_us();
    let received = received::build(&received::ReceivedFields {
        helo: &transaction.helo,
        peer_ip: transaction.peer.ip(),
        hostname: &config.hostname,
        protocol: received::Protocol::new(
            transaction.esmtp,
            transaction.tls,
            transaction.authenticated,
            transaction.smtputf8,
        ),
        queue_id: &queue_id,
        recipient: (transaction.recipients.len() == 1)
            .then(|| transaction.recipients[0].address.as_str()),
        unix_time_secs: (received_at_us / 1_000_000) as i64,
    });
    let envelope = Envelope {
        received_at_us,
        mail_from: transaction.mail_from.clone(),
        recipients: transaction
            .recipients
            .iter()
            .map(|r| EnvelopeRecipient {
                address: r.address.clone(),
                destination: match &r.route {
                    Route::Local { mailbox } => Destination::Mailbox(mailbox.clone()),
                    Route::Remote { .. } => Destination::Relay,
                },
            })
            .collect(),
        eight_bit: transaction.eight_bit,
        smtputf8: transaction.smtputf8,
    };
    let body_len: usize = transaction.body.iter().map(Vec::len).sum();
    let stored_len = received.len() + body_len;
    let mut pieces = Vec::with_capacity(transaction.body.len() + 2);
    pieces.push(envelope::encode_envelope(
        &envelope,
        received.len(),
        body_len as u64,
    ));
    pieces.push(received);
    pieces.extend(transaction.body);

    let appended = shard
        .store
        .append(id, envelope::kind::MESSAGE, pieces)
        .await;
    shard.metrics.observe_store(&shard.store.stats());
    if let Err(e) = appended {
        tracing::error!(shard = shard.id, queue_id, "message not stored: {e}");
        return Err(store_failure(&e));
    }
    shard
        .ledger
        .borrow_mut()
        .add_message(id, envelope.recipients.len());
    super::relay::queue_new_message(shard, id, &envelope);

    // Index local copies on their owners and wait until every owner shows them.
    let mut acks = Vec::new();
    for (index, recipient) in envelope.recipients.iter().enumerate() {
        if let Destination::Mailbox(mailbox) = &recipient.destination {
            acks.push(index_on_owner(shard, mailbox, id, index, &envelope, stored_len).await);
        }
    }
    for ack in acks {
        let _ = ack.recv_async().await;
    }
    tracing::info!(
        shard = shard.id,
        queue_id,
        client = %transaction.peer.ip(),
        from = %envelope.mail_from,
        recipients = %envelope.recipients.iter().map(|r| r.address.as_str()).collect::<Vec<_>>().join(","),
        size = body_len,
        "accepted"
    );
    Ok(queue_id)
}

/// Tells the owner shard of `mailbox` (maybe this one) that recipient `recipient` of message
/// `record`, stored in this shard's log, waits in that mailbox. The returned channel answers
/// once the owner's index shows it.
pub async fn index_on_owner(
    shard: &Rc<Shard>,
    mailbox: &str,
    record: RecordId,
    recipient: usize,
    envelope: &Envelope,
    stored_message_len: usize,
) -> flume::Receiver<()> {
    let (done, ack) = reply_channel();
    let owner = owner_shard(mailbox, shard.shared.shard_count);
    let message = MeshMessage::MailboxAdd {
        mailbox: mailbox.to_string(),
        key: MessageKey {
            shard: shard.id as u16,
            record: record.0,
            recipient: u16::try_from(recipient)
                .expect("smtp.max_recipients keeps a message within MAX_RECIPIENTS"),
        },
        received_at_us: envelope.received_at_us,
        size_octets: retr_size_octets(&envelope.mail_from, stored_message_len),
        done: Some(done),
    };
    if owner == shard.id {
        super::inbox::handle(shard, message);
    } else {
        shard.mesh.send(owner, message).await;
    }
    ack
}

/// Durably records that `recipients` of message `record` (stored in this shard's log) are
/// finished. Recipients already finished are left alone, so retries are harmless.
pub async fn record_outcome(
    shard: &Rc<Shard>,
    record: RecordId,
    recipients: Vec<u16>,
    outcome: Outcome,
) -> Result<(), StoreError> {
    let pending: Vec<u16> = {
        let ledger = shard.ledger.borrow();
        recipients
            .into_iter()
            .filter(|r| ledger.is_pending(record, *r))
            .collect()
    };
    if pending.is_empty() {
        return Ok(());
    }
    let outcome = outcome_record(record, outcome, pending);
    let id = shard.store.allocate_id();
    let appended = shard
        .store
        .append(id, envelope::kind::OUTCOME, vec![outcome.encode()])
        .await;
    shard.metrics.observe_store(&shard.store.stats());
    appended?;
    let applied = shard.ledger.borrow_mut().apply_outcome(id, &outcome);
    match applied {
        Applied::Pending => {}
        Applied::Orphan => mark_dead_later(shard, vec![id]),
        Applied::Finished(dead) => mark_dead_later(shard, dead),
    }
    Ok(())
}

/// Marks records dead without making anyone wait: the outcome that finished them is already
/// durable, so a crash before the tombstone only delays reclaiming their space (recovery finds
/// them finished again).
pub fn mark_dead_later(shard: &Rc<Shard>, ids: Vec<RecordId>) {
    let shard = Rc::clone(shard);
    glommio::spawn_local(async move {
        if let Err(e) = shard.store.mark_dead(&ids).await {
            tracing::warn!(
                shard = shard.id,
                "could not mark {} finished record(s) dead: {e}",
                ids.len()
            );
        }
    })
    .detach();
}

/// A message this server writes itself (a bounce): one recipient, routed like RCPT would.
#[derive(Debug, Clone)]
pub struct GeneratedMessage {
    /// Envelope sender; "" (the null path) for DSNs.
    pub mail_from: String,
    /// The one envelope recipient.
    pub recipient: String,
    /// The message, CRLF line ends and dot-stuffed like every stored body.
    pub body: Vec<u8>,
    /// The body has 8-bit bytes.
    pub eight_bit: bool,
    /// The envelope or headers need SMTPUTF8.
    pub smtputf8: bool,
}

/// The reply a failed append deserves.
fn store_failure(error: &StoreError) -> StoreFailure {
    match error {
        // ENOSPC as the kernel reports it, or as glommio wraps it (a custom error of kind
        // StorageFull, without the raw code): a new segment's preallocation finding the disk
        // full is the common case once the spare segment is used up.
        StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
            StoreFailure::DiskFull
        }
        // The record limit is sized so this cannot happen; if it does anyway, the message
        // will never fit and a retry must not be invited.
        StoreError::RecordTooLarge { .. } => StoreFailure::TooBig,
        _ => StoreFailure::SyncFailed,
    }
}

/// Stores a generated message durably and routes it: into the recipient's mailbox when
/// local, into the relay queue when remote. Returns its queue id, or `None` when the
/// recipient cannot be routed (an unknown user of a local domain: nobody could read it).
pub async fn store_generated(
    shard: &Rc<Shard>,
    message: GeneratedMessage,
) -> Result<Option<String>, StoreError> {
    let config = &shard.shared.config;
    let destination = match shard.shared.directory.route(&message.recipient, true) {
        Ok(Route::Local { mailbox }) => Destination::Mailbox(mailbox),
        Ok(Route::Remote { .. }) => Destination::Relay,
        Err(refusal) => {
            tracing::warn!(
                shard = shard.id,
                to = message.recipient,
                "generated message dropped: {refusal}"
            );
            return Ok(None);
        }
    };
    let id = shard.store.allocate_id();
    let queue_id = queue_id(shard.id, id);
    let received_at_us = unix_now_us();
    // No client handed this over: the trace header says only who made it.
    let received = format!(
        "Received: by {} (ringmail) id {queue_id};\r\n\t{}\r\n",
        config.hostname,
        received::rfc5322_date((received_at_us / 1_000_000) as i64)
    )
    .into_bytes();
    let envelope = Envelope {
        received_at_us,
        mail_from: message.mail_from,
        recipients: vec![EnvelopeRecipient {
            address: message.recipient,
            destination,
        }],
        eight_bit: message.eight_bit,
        smtputf8: message.smtputf8,
    };
    let stored_len = received.len() + message.body.len();
    let pieces = vec![
        envelope::encode_envelope(&envelope, received.len(), message.body.len() as u64),
        received,
        message.body,
    ];
    shard
        .store
        .append(id, envelope::kind::MESSAGE, pieces)
        .await?;
    shard.ledger.borrow_mut().add_message(id, 1);
    match &envelope.recipients[0].destination {
        Destination::Mailbox(mailbox) => {
            let ack = index_on_owner(shard, mailbox, id, 0, &envelope, stored_len).await;
            let _ = ack.recv_async().await;
        }
        Destination::Relay => super::relay::queue_new_message(shard, id, &envelope),
    }
    Ok(Some(queue_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn a_full_disk_is_452_however_the_error_is_wrapped() {
        let io = |source: io::Error| StoreError::Io {
            op: "create segment",
            source,
        };
        let table = [
            (
                io(io::Error::from_raw_os_error(libc::ENOSPC)),
                StoreFailure::DiskFull,
            ),
            // As glommio reports a failed preallocation: a custom error, no raw code.
            (
                io(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "No space left on device (os error 28), op: Pre-allocate space",
                )),
                StoreFailure::DiskFull,
            ),
            (
                io(io::Error::from_raw_os_error(libc::EIO)),
                StoreFailure::SyncFailed,
            ),
            (StoreError::SyncFailed, StoreFailure::SyncFailed),
            (
                StoreError::RecordTooLarge {
                    size_bytes: 2,
                    max_bytes: 1,
                },
                StoreFailure::TooBig,
            ),
        ];
        for (error, want) in table {
            assert_eq!(store_failure(&error), want, "{error}");
        }
    }
}
