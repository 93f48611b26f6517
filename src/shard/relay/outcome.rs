//! Making an attempt's results durable before they count.
//!
//! - delivered → an outcome record (`Delivered`): after it, the recipient is never sent again.
//! - bounced → its DSN is stored first (a crash in between repeats the bounce, it never loses
//!   it), then an outcome record (`Bounced`). One DSN per message per bounce event, listing
//!   every recipient that failed in it; none for a message from `<>`.
//! - deferred → a deferral record with the next attempt from the retry schedule, then the job
//!   goes back in the queue; past `max_queue_lifetime_secs` it bounces instead.
//! - a bounce whose DSN could not be stored (a full or failing disk) leaves its recipients
//!   unfinished, and the DSN alone is tried again after [`DSN_RETRY_DELAY_MS`], with the same
//!   replies; a restart meanwhile tries the recipients again instead.

use std::rc::Rc;
use std::time::Duration;

use super::queue::Job;
use super::Shard;
use crate::envelope::{self, DeferralRecord, Outcome};
use crate::relay::client::{RecipientOutcome, Reply};
use crate::relay::dsn::{build_dsn, should_send_dsn, DsnAction, DsnRecipient, DsnRequest};
use crate::relay::retry::NextAttempt;
use crate::shard::ingest::{self, queue_id, record_outcome, GeneratedMessage};

/// How long a bounce whose DSN could not be stored waits before it is tried again: long
/// enough for an operator to free disk, short enough that senders hear of it the same hour.
pub const DSN_RETRY_DELAY_MS: u64 = 5 * 60 * 1000;

/// Settles one attempt of `job`: `results` pairs each attempted recipient index with what
/// happened to it; `remote_mta` names the host that answered, when one did.
pub async fn settle(
    shard: &Rc<Shard>,
    job: &Job,
    results: Vec<(u16, RecipientOutcome)>,
    remote_mta: Option<&str>,
) {
    let mut delivered = Vec::new();
    let mut deferred = Vec::new();
    let mut bounced = Vec::new();
    for (recipient, result) in results {
        match result {
            RecipientOutcome::Delivered => delivered.push(recipient),
            RecipientOutcome::Deferred(reply) => deferred.push((recipient, reply)),
            RecipientOutcome::Bounced(reply) => bounced.push((recipient, reply)),
        }
    }
    let qid = queue_id(shard.id, job.message);
    if !delivered.is_empty() {
        match record_outcome(shard, job.message, delivered.clone(), Outcome::Delivered).await {
            Ok(()) => tracing::info!(
                shard = shard.id,
                queue_id = qid,
                domain = job.domain,
                relay = remote_mta.unwrap_or(""),
                recipients = delivered.len(),
                "delivered"
            ),
            // Not recorded: after a restart it is sent again (at least once, never lost).
            Err(e) => tracing::error!(
                shard = shard.id,
                queue_id = qid,
                "delivery not recorded, it may be repeated after a restart: {e}"
            ),
        }
    }
    if !deferred.is_empty() {
        let expired = defer(shard, job, deferred).await;
        bounced.extend(expired);
    }
    if !bounced.is_empty() {
        bounce(shard, job, &bounced, remote_mta).await;
    }
}

/// Bounces a whole job whose queue lifetime is over before it could be tried again.
pub async fn expire(shard: &Rc<Shard>, job: Job) {
    let reply = expiry_reply(&Reply::local(451, "4.4.7 not delivered in time"));
    let results = job
        .recipients
        .iter()
        .map(|&r| (r, RecipientOutcome::Bounced(reply.clone())))
        .collect();
    settle(shard, &job, results, None).await;
}

fn expiry_reply(last: &Reply) -> Reply {
    Reply::local(
        554,
        format!("5.4.7 delivery time expired; last error: {last}"),
    )
}

/// Records a deferral and requeues; returns the recipients whose lifetime is over instead.
async fn defer(shard: &Rc<Shard>, job: &Job, deferred: Vec<(u16, Reply)>) -> Vec<(u16, Reply)> {
    let attempts = job.attempts.saturating_add(1);
    let first = Duration::from_millis(job.first_attempt_ms);
    let now = Duration::from_millis(super::unix_now_ms());
    let next_ms = match shard.relay.retry.next_attempt_from(first, attempts, now) {
        NextAttempt::At(at) => at.as_millis() as u64,
        NextAttempt::Expired => {
            return deferred
                .into_iter()
                .map(|(r, reply)| (r, expiry_reply(&reply)))
                .collect()
        }
    };
    let recipients: Vec<u16> = {
        let ledger = shard.ledger.borrow();
        deferred
            .iter()
            .map(|(r, _)| *r)
            .filter(|r| ledger.is_pending(job.message, *r))
            .collect()
    };
    if recipients.is_empty() {
        return Vec::new();
    }
    let record = DeferralRecord {
        message: job.message.0,
        attempts,
        next_attempt_ms: next_ms,
        recipients: recipients.clone(),
    };
    let id = shard.store.allocate_id();
    match shard
        .store
        .append(id, envelope::kind::DEFERRAL, vec![record.encode()])
        .await
    {
        Ok(()) => {
            if !shard.ledger.borrow_mut().attach(job.message, id) {
                ingest::mark_dead_later(shard, vec![id]);
            }
        }
        // The in-memory schedule still holds; after a restart the previous one applies.
        Err(e) => tracing::warn!(shard = shard.id, "deferral not recorded: {e}"),
    }
    tracing::info!(
        shard = shard.id,
        queue_id = queue_id(shard.id, job.message),
        domain = job.domain,
        recipients = recipients.len(),
        attempts,
        reason = %deferred[0].1,
        "deferred"
    );
    shard.relay.enqueue(
        Job {
            message: job.message,
            domain: job.domain.clone(),
            recipients,
            attempts,
            first_attempt_ms: job.first_attempt_ms,
        },
        next_ms,
    );
    Vec::new()
}

/// Stores one DSN for the bounced recipients of `job`'s message (unless its sender is `<>`),
/// then records them bounced.
async fn bounce(shard: &Rc<Shard>, job: &Job, bounced: &[(u16, Reply)], remote_mta: Option<&str>) {
    let message = job.message;
    let pending: Vec<&(u16, Reply)> = {
        let ledger = shard.ledger.borrow();
        bounced
            .iter()
            .filter(|(r, _)| ledger.is_pending(message, *r))
            .collect()
    };
    if pending.is_empty() {
        return;
    }
    let qid = queue_id(shard.id, message);
    let record = match shard.store.read(message) {
        Ok(record) => record,
        Err(e) => {
            tracing::error!(
                shard = shard.id,
                queue_id = qid,
                "bounced message unreadable: {e}"
            );
            return;
        }
    };
    let layout = match envelope::decode_message(&record) {
        Ok(layout) => layout,
        Err(e) => {
            tracing::error!(
                shard = shard.id,
                queue_id = qid,
                "bounced message undecodable: {e}"
            );
            return;
        }
    };
    let sender = layout.envelope.mail_from.clone();
    if should_send_dsn(&sender) {
        let recipients: Vec<DsnRecipient<'_>> = pending
            .iter()
            .filter_map(|(index, reply)| {
                let recipient = layout.envelope.recipients.get(usize::from(*index))?;
                Some(DsnRecipient {
                    address: &recipient.address,
                    action: DsnAction::Failed,
                    reply,
                    remote_mta,
                })
            })
            .collect();
        let original: [&[u8]; 2] = [
            &record[layout.received.clone()],
            &record[layout.body.clone()],
        ];
        let dsn = build_dsn(&DsnRequest {
            reporting_mta: &shard.shared.config.hostname,
            original_sender: &sender,
            queue_id: &qid,
            arrival_unix_secs: layout.envelope.received_at_secs() as i64,
            now_unix_secs: (super::unix_now_ms() / 1000) as i64,
            recipients: &recipients,
            original_message: &original,
        });
        let generated = GeneratedMessage {
            mail_from: String::new(),
            recipient: sender.clone(),
            body: dsn.body,
            eight_bit: dsn.has_8bit,
            smtputf8: !sender.is_ascii(),
        };
        match ingest::store_generated(shard, generated).await {
            Ok(Some(dsn_id)) => tracing::info!(
                shard = shard.id,
                queue_id = qid,
                dsn = dsn_id,
                to = sender,
                "bounce notification queued"
            ),
            Ok(None) => {}
            Err(e) => {
                // Without its DSN a bounce would be silent: leave the recipients unfinished and
                // try them again later (a restart would too).
                tracing::error!(
                    shard = shard.id,
                    queue_id = qid,
                    "DSN not stored, the bounce is tried again in {} s: {e}",
                    DSN_RETRY_DELAY_MS / 1000
                );
                // Only the DSN is tried again, with the replies it reports: the recipients'
                // fate is settled, so their mail is not sent again.
                let (shard, job) = (Rc::clone(shard), job.clone());
                let bounced: Vec<(u16, Reply)> = pending.into_iter().cloned().collect();
                let remote_mta = remote_mta.map(str::to_owned);
                glommio::spawn_local(async move {
                    glommio::timer::sleep(Duration::from_millis(DSN_RETRY_DELAY_MS)).await;
                    Box::pin(bounce(&shard, &job, &bounced, remote_mta.as_deref())).await;
                })
                .detach();
                return;
            }
        }
    }
    let indexes: Vec<u16> = pending.iter().map(|(r, _)| *r).collect();
    match record_outcome(shard, message, indexes.clone(), Outcome::Bounced).await {
        Ok(()) => tracing::info!(
            shard = shard.id,
            queue_id = qid,
            recipients = indexes.len(),
            reason = %pending[0].1,
            "bounced"
        ),
        Err(e) => tracing::error!(shard = shard.id, queue_id = qid, "bounce not recorded: {e}"),
    }
}
