//! What ringmail writes into the log about mail: the message record (envelope, `Received:`
//! header and body as they travelled) and the small records that say what became of each
//! recipient. The store treats payloads as opaque bytes; this module gives them meaning.
//!
//! A message record's payload is `envelope ‖ Received: header ‖ body`. The envelope comes first
//! and says how long the other two are, so a reader finds the body in place — POP3 RETR and
//! relay DATA send it straight from the memory map.

use thiserror::Error;

/// Record kinds (the store's opaque `kind` byte).
pub mod kind {
    /// A message: envelope, `Received:` header, body.
    pub const MESSAGE: u8 = 1;
    /// Final outcomes for some recipients of one message (deleted by POP3, delivered, bounced).
    pub const OUTCOME: u8 = 2;
    /// A relay attempt failed temporarily: when to try again.
    pub const DEFERRAL: u8 = 3;
}

const ENVELOPE_VERSION: u8 = 1;
const FLAG_EIGHT_BIT: u8 = 1;
const FLAG_SMTPUTF8: u8 = 2;
/// RFC 5321 §4.5.3.1.3: a path is at most 256 octets; we allow the brackets' worth of slack.
const MAX_PATH_BYTES: usize = 320;
/// Recipients per message the encoding can hold (`max_recipients` is far lower in practice).
pub const MAX_RECIPIENTS: usize = u16::MAX as usize;

/// Envelope octets before the sender: version, flags, time, Received: and body lengths.
const ENVELOPE_FIXED_BYTES: u64 = 1 + 1 + 8 + 4 + 8;

/// The longest envelope a message with `max_recipients` recipients can have: every path at
/// the longest length decoding accepts.
pub fn max_envelope_bytes(max_recipients: usize) -> u64 {
    let path = 2 + MAX_PATH_BYTES as u64;
    // Address, destination tag, mailbox name.
    let recipient = path + 1 + path;
    ENVELOPE_FIXED_BYTES + path + 2 + (max_recipients as u64).saturating_mul(recipient)
}

/// The largest message record the SMTP session can hand to the log, for these settings:
/// the envelope, the `Received:` header, and a body of `max_message_size` octets,
/// dot-stuffed (the size leaves the stuffing dots out, as RFC 1870 counts it over DATA and
/// BDAT alike, so the stored body may be larger). The log's record limit is set from this, so
/// every message the session accepts fits.
pub fn max_message_record_bytes(max_message_size: u64, max_recipients: usize) -> u64 {
    crate::smtp::data::max_stuffed_bytes(max_message_size)
        .saturating_add(crate::smtp::received::MAX_RECEIVED_BYTES as u64)
        .saturating_add(max_envelope_bytes(max_recipients))
}

/// The largest record ringmail writes for a message it makes itself (a DSN to one
/// recipient), whatever `max_message_size` says.
pub fn max_generated_record_bytes() -> u64 {
    crate::relay::dsn::MAX_DSN_BYTES as u64
        + crate::smtp::received::MAX_RECEIVED_BYTES as u64
        + max_envelope_bytes(1)
}

/// The log's limit on a new record: room for every message the session accepts and for every
/// message ringmail generates.
pub fn log_record_limit(max_message_size: u64, max_recipients: usize) -> u64 {
    max_message_record_bytes(max_message_size, max_recipients).max(max_generated_record_bytes())
}

/// The largest `max_message_size` whose records fit `record_limit` octets with
/// `max_recipients`, or `None` if not even a one-octet message would.
pub fn largest_message_size_fitting(max_recipients: usize, record_limit: u64) -> Option<u64> {
    let fits = |size: u64| max_message_record_bytes(size, max_recipients) <= record_limit;
    if !fits(1) {
        return None;
    }
    // The record size grows with the message size: bisect for the last size that fits.
    let (mut fitting, mut too_big) = (1u64, record_limit.saturating_add(1));
    while too_big - fitting > 1 {
        let middle = fitting + (too_big - fitting) / 2;
        if fits(middle) {
            fitting = middle;
        } else {
            too_big = middle;
        }
    }
    Some(fitting)
}

/// Where one recipient's copy goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A local mailbox, named by its configured (canonical) address.
    Mailbox(String),
    /// Relayed to the domain's MX hosts (or the smarthost).
    Relay,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeRecipient {
    /// The address as the client gave it in RCPT TO.
    pub address: String,
    pub destination: Destination,
}

/// The SMTP envelope of a stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Acceptance time (Unix microseconds): fine enough that messages accepted one after the
    /// other on different shards list in that order; also Arrival-Date of DSNs and the start
    /// of the queue lifetime.
    pub received_at_us: u64,
    /// MAIL FROM as received, without brackets; empty for the null sender `<>`.
    pub mail_from: String,
    pub recipients: Vec<EnvelopeRecipient>,
    /// The body needs 8BITMIME to be relayed.
    pub eight_bit: bool,
    /// The envelope or headers need SMTPUTF8 to be relayed.
    pub smtputf8: bool,
}

impl Envelope {
    /// Acceptance time in whole Unix seconds (for dates shown to people).
    pub fn received_at_secs(&self) -> u64 {
        self.received_at_us / 1_000_000
    }
}

/// A decoded message record: the envelope plus where the header and body sit in the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageLayout {
    pub envelope: Envelope,
    /// Byte range of the `Received:` header in the payload.
    pub received: std::ops::Range<usize>,
    /// Byte range of the body (CRLF, dot-stuffed, as it travelled) in the payload.
    pub body: std::ops::Range<usize>,
}

impl MessageLayout {
    /// The bytes POP3 RETR sends after its `Return-Path:` line: `Received:` header then body,
    /// which lie next to each other in the payload.
    pub fn stored_message(&self) -> std::ops::Range<usize> {
        self.received.start..self.body.end
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record ends inside its envelope")]
    Truncated,
    #[error("unknown envelope version {0}")]
    Version(u8),
    #[error("envelope field is not UTF-8")]
    NotUtf8,
    #[error("envelope field exceeds its limit")]
    TooLong,
    #[error("unknown destination tag {0}")]
    Destination(u8),
    #[error("envelope lengths disagree with the record length")]
    LengthMismatch,
}

/// Encodes the envelope part of a message record. `received_len` and `body_len` are the lengths
/// of the pieces that will follow it in the same record.
pub fn encode_envelope(envelope: &Envelope, received_len: usize, body_len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        32 + envelope.mail_from.len()
            + envelope
                .recipients
                .iter()
                .map(|r| r.address.len() + 40)
                .sum::<usize>(),
    );
    out.push(ENVELOPE_VERSION);
    let mut flags = 0;
    if envelope.eight_bit {
        flags |= FLAG_EIGHT_BIT;
    }
    if envelope.smtputf8 {
        flags |= FLAG_SMTPUTF8;
    }
    out.push(flags);
    out.extend_from_slice(&envelope.received_at_us.to_le_bytes());
    out.extend_from_slice(&(received_len as u32).to_le_bytes());
    out.extend_from_slice(&body_len.to_le_bytes());
    put_str(&mut out, &envelope.mail_from);
    let recipients = u16::try_from(envelope.recipients.len())
        .expect("smtp.max_recipients keeps a message within MAX_RECIPIENTS");
    out.extend_from_slice(&recipients.to_le_bytes());
    for r in &envelope.recipients {
        put_str(&mut out, &r.address);
        match &r.destination {
            Destination::Relay => out.push(0),
            Destination::Mailbox(mailbox) => {
                out.push(1);
                put_str(&mut out, mailbox);
            }
        }
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= MAX_PATH_BYTES);
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Recipient indexes of an outcome or deferral record: a count, then each index.
fn put_recipients(out: &mut Vec<u8>, recipients: &[u16]) {
    out.extend_from_slice(&(recipients.len() as u16).to_le_bytes());
    for r in recipients {
        out.extend_from_slice(&r.to_le_bytes());
    }
}

/// A cursor over a payload that never reads past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A recipient index list that must end the payload exactly.
    fn recipients_to_end(&mut self) -> Result<Vec<u16>, DecodeError> {
        let count = usize::from(self.u16()?);
        let mut recipients = Vec::with_capacity(count);
        for _ in 0..count {
            recipients.push(self.u16()?);
        }
        if self.pos != self.bytes.len() {
            return Err(DecodeError::LengthMismatch);
        }
        Ok(recipients)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let len = usize::from(self.u16()?);
        if len > MAX_PATH_BYTES {
            return Err(DecodeError::TooLong);
        }
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError::NotUtf8)
    }
}

/// A message record's fixed fields and ranges, borrowed from its payload.
struct MessageFields<'a> {
    flags: u8,
    received_at_us: u64,
    mail_from: &'a str,
    received: std::ops::Range<usize>,
    body: std::ops::Range<usize>,
}

/// Walks a message record's payload, checking that the lengths add up, and hands each
/// recipient (address, and mailbox for a local one) to `recipient`.
fn walk_message<'a>(
    payload: &'a [u8],
    mut recipient: impl FnMut(&'a str, Option<&'a str>),
) -> Result<MessageFields<'a>, DecodeError> {
    let mut r = Reader {
        bytes: payload,
        pos: 0,
    };
    let version = r.u8()?;
    if version != ENVELOPE_VERSION {
        return Err(DecodeError::Version(version));
    }
    let flags = r.u8()?;
    let received_at_us = r.u64()?;
    let received_len = r.u32()? as usize;
    let body_len = usize::try_from(r.u64()?).map_err(|_| DecodeError::LengthMismatch)?;
    let mail_from = r.str()?;
    for _ in 0..r.u16()? {
        let address = r.str()?;
        match r.u8()? {
            0 => recipient(address, None),
            1 => recipient(address, Some(r.str()?)),
            other => return Err(DecodeError::Destination(other)),
        }
    }
    let received_start = r.pos;
    let body_start = received_start
        .checked_add(received_len)
        .ok_or(DecodeError::LengthMismatch)?;
    let body_end = body_start
        .checked_add(body_len)
        .ok_or(DecodeError::LengthMismatch)?;
    if body_end != payload.len() {
        return Err(DecodeError::LengthMismatch);
    }
    Ok(MessageFields {
        flags,
        received_at_us,
        mail_from,
        received: received_start..body_start,
        body: body_start..body_end,
    })
}

/// Decodes a message record's payload, checking that the lengths add up.
pub fn decode_message(payload: &[u8]) -> Result<MessageLayout, DecodeError> {
    let mut recipients = Vec::new();
    let fields = walk_message(payload, |address, mailbox| {
        recipients.push(EnvelopeRecipient {
            address: address.to_string(),
            destination: match mailbox {
                Some(mailbox) => Destination::Mailbox(mailbox.to_string()),
                None => Destination::Relay,
            },
        })
    })?;
    Ok(MessageLayout {
        envelope: Envelope {
            received_at_us: fields.received_at_us,
            mail_from: fields.mail_from.to_string(),
            recipients,
            eight_bit: fields.flags & FLAG_EIGHT_BIT != 0,
            smtputf8: fields.flags & FLAG_SMTPUTF8 != 0,
        },
        received: fields.received,
        body: fields.body,
    })
}

/// What POP3 RETR needs of a message record, borrowed from it without allocating: the
/// envelope sender (for `Return-Path:`) and the range of the stored `Received:` + body.
pub fn decode_for_retrieval(payload: &[u8]) -> Result<(&str, std::ops::Range<usize>), DecodeError> {
    let fields = walk_message(payload, |_, _| {})?;
    Ok((fields.mail_from, fields.received.start..fields.body.end))
}

/// What finally became of a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Deleted from its mailbox by POP3 (UPDATE state).
    Deleted = 1,
    /// Accepted by the next hop.
    Delivered = 2,
    /// Failed permanently (a DSN went to the sender, unless it was `<>`).
    Bounced = 3,
}

/// An outcome record: these recipients (indexes into the message's envelope) are finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeRecord {
    /// The message record's id in the same shard's log.
    pub message: u64,
    pub outcome: Outcome,
    pub recipients: Vec<u16>,
}

impl OutcomeRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(11 + 2 * self.recipients.len());
        out.extend_from_slice(&self.message.to_le_bytes());
        out.push(self.outcome as u8);
        put_recipients(&mut out, &self.recipients);
        out
    }

    pub fn decode(payload: &[u8]) -> Result<OutcomeRecord, DecodeError> {
        let mut r = Reader {
            bytes: payload,
            pos: 0,
        };
        let message = r.u64()?;
        let outcome = match r.u8()? {
            1 => Outcome::Deleted,
            2 => Outcome::Delivered,
            3 => Outcome::Bounced,
            other => return Err(DecodeError::Destination(other)),
        };
        let recipients = r.recipients_to_end()?;
        Ok(OutcomeRecord {
            message,
            outcome,
            recipients,
        })
    }
}

/// A deferral record: the next attempt for these recipients, so a restart keeps the schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeferralRecord {
    pub message: u64,
    /// Attempts made so far (the retry schedule's step).
    pub attempts: u32,
    /// When to try next, Unix milliseconds.
    pub next_attempt_ms: u64,
    pub recipients: Vec<u16>,
}

impl DeferralRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(22 + 2 * self.recipients.len());
        out.extend_from_slice(&self.message.to_le_bytes());
        out.extend_from_slice(&self.attempts.to_le_bytes());
        out.extend_from_slice(&self.next_attempt_ms.to_le_bytes());
        put_recipients(&mut out, &self.recipients);
        out
    }

    pub fn decode(payload: &[u8]) -> Result<DeferralRecord, DecodeError> {
        let mut r = Reader {
            bytes: payload,
            pos: 0,
        };
        let message = r.u64()?;
        let attempts = r.u32()?;
        let next_attempt_ms = r.u64()?;
        let recipients = r.recipients_to_end()?;
        Ok(DeferralRecord {
            message,
            attempts,
            next_attempt_ms,
            recipients,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Envelope {
        Envelope {
            received_at_us: 1_790_000_000_123_456,
            mail_from: "sender@example.org".into(),
            recipients: vec![
                EnvelopeRecipient {
                    address: "Alice@Example.Test".into(),
                    destination: Destination::Mailbox("alice@example.test".into()),
                },
                EnvelopeRecipient {
                    address: "bob@remote.test".into(),
                    destination: Destination::Relay,
                },
            ],
            eight_bit: true,
            smtputf8: false,
        }
    }

    #[test]
    fn message_layout_round_trips_and_locates_pieces() {
        let received = b"Received: from x\r\n".to_vec();
        let body = b"Subject: hi\r\n\r\n..dot\r\n".to_vec();
        let mut payload = encode_envelope(&sample(), received.len(), body.len() as u64);
        payload.extend_from_slice(&received);
        payload.extend_from_slice(&body);
        let layout = decode_message(&payload).unwrap();
        assert_eq!(layout.envelope, sample());
        assert_eq!(&payload[layout.received.clone()], &received[..]);
        assert_eq!(&payload[layout.body.clone()], &body[..]);
        assert_eq!(layout.stored_message().len(), received.len() + body.len());
        // RETR's borrowed decoding finds the same sender and bytes.
        let (mail_from, stored) = decode_for_retrieval(&payload).unwrap();
        assert_eq!(mail_from, sample().mail_from);
        assert_eq!(stored, layout.stored_message());
    }

    #[test]
    fn the_longest_envelope_fits_its_bound() {
        let path = "p".repeat(MAX_PATH_BYTES);
        for count in [0, 1, 100] {
            let envelope = Envelope {
                received_at_us: u64::MAX,
                mail_from: path.clone(),
                recipients: vec![
                    EnvelopeRecipient {
                        address: path.clone(),
                        destination: Destination::Mailbox(path.clone()),
                    };
                    count
                ],
                eight_bit: true,
                smtputf8: true,
            };
            let encoded = encode_envelope(&envelope, usize::MAX, u64::MAX);
            assert_eq!(encoded.len() as u64, max_envelope_bytes(count), "{count}");
        }
    }

    #[test]
    fn record_size_arithmetic() {
        // (max_message_size, max_recipients, worst-case record)
        let table: &[(u64, usize, u64)] = &[
            // The report: 299,997 octets received may be 399,998 stored.
            (300_000, 100, 400_002 + 1024 + 346 + 100 * 645),
            (1, 1, 4 + 1024 + 346 + 645),
            (26_214_400, 100, 34_952_536 + 1024 + 346 + 64_500),
            (u64::MAX, MAX_RECIPIENTS, u64::MAX),
        ];
        for (size, recipients, want) in table {
            assert_eq!(
                max_message_record_bytes(*size, *recipients),
                *want,
                "{size} {recipients}"
            );
        }
        // The message of the report, with its envelope and header, fits the record limit.
        let body = crate::smtp::data::max_stuffed_bytes(299_997);
        assert!(body + 1024 + max_envelope_bytes(100) <= max_message_record_bytes(300_000, 100));
    }

    #[test]
    fn largest_fitting_size_is_exact() {
        let limit = crate::store::record::MAX_PAYLOAD_BYTES;
        for recipients in [1, 100, MAX_RECIPIENTS] {
            let largest = largest_message_size_fitting(recipients, limit).unwrap();
            assert!(max_message_record_bytes(largest, recipients) <= limit);
            assert!(max_message_record_bytes(largest + 1, recipients) > limit);
        }
        assert_eq!(largest_message_size_fitting(1, 100), None);
    }

    #[test]
    fn truncated_or_padded_records_are_refused() {
        let mut payload = encode_envelope(&sample(), 3, 4);
        payload.extend_from_slice(b"abcdefg");
        assert!(decode_message(&payload).is_ok());
        assert_eq!(
            decode_message(&payload[..payload.len() - 1]),
            Err(DecodeError::LengthMismatch)
        );
        payload.push(0);
        assert_eq!(decode_message(&payload), Err(DecodeError::LengthMismatch));
        assert_eq!(decode_message(&payload[..10]), Err(DecodeError::Truncated));
    }

    #[test]
    fn outcome_and_deferral_round_trip() {
        let o = OutcomeRecord {
            message: 42,
            outcome: Outcome::Deleted,
            recipients: vec![0, 3],
        };
        assert_eq!(OutcomeRecord::decode(&o.encode()).unwrap(), o);
        let d = DeferralRecord {
            message: 7,
            attempts: 2,
            next_attempt_ms: 123_456,
            recipients: vec![1],
        };
        assert_eq!(DeferralRecord::decode(&d.encode()).unwrap(), d);
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_message(&bytes);
            let _ = decode_for_retrieval(&bytes);
            let _ = OutcomeRecord::decode(&bytes);
            let _ = DeferralRecord::decode(&bytes);
        }
    }
}
