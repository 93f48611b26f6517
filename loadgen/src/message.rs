//! Test messages: exact size, unique Message-ID, and a body checksum header that lets
//! `loadgen pop3 --verify` prove that what comes back is what went in.
//!
//! The checksum is FNV-1a 64 over the body (everything after the first empty line, CRLF
//! line endings, not dot-stuffed), taken a 64-bit word at a time. Servers add headers
//! (Received, Return-Path, Date) but must not touch the body, so the body is what we check.
//!
//! Building a message must cost little next to sending it, or loadgen measures itself: body
//! lines are copied from a table of random printable bytes, not drawn a byte at a time, and
//! the checksum takes one multiplication per eight bytes.

use std::sync::OnceLock;

use thiserror::Error;

/// Header that carries the body checksum, 16 lowercase hex digits.
pub const CHECKSUM_HEADER: &str = "X-Loadgen-Checksum";

/// Content length of a full body line; with CRLF a line is 78 octets (RFC 5322 §2.1.1).
const BODY_LINE_LEN_BYTES: usize = 76;

/// Why a message could not be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MessageError {
    /// The headers alone take more room than the requested size.
    #[error("--size {requested} is too small: headers need {minimum} bytes")]
    TooSmall {
        /// The size asked for.
        requested: usize,
        /// The smallest size that fits the headers and an empty line.
        minimum: usize,
    },
}

/// FNV-1a 64 over little-endian 64-bit words (the last one zero-padded), then over the
/// length, so that trailing zero bytes still count: tiny, no dependency, and good enough to
/// detect altered bytes.
pub fn checksum(body: &[u8]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = body.chunks_exact(8);
    for word in &mut words {
        hash ^= u64::from_le_bytes(word.try_into().expect("8 bytes"));
        hash = hash.wrapping_mul(PRIME);
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        let mut last = [0u8; 8];
        last[..tail.len()].copy_from_slice(tail);
        hash ^= u64::from_le_bytes(last);
        hash = hash.wrapping_mul(PRIME);
    }
    hash ^= body.len() as u64;
    hash.wrapping_mul(PRIME)
}

/// Random printable ASCII that body lines are cut from, made once per process.
fn printable_table() -> &'static [u8] {
    const TABLE_BYTES: usize = 64 * 1024;
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..TABLE_BYTES)
            .map(|_| {
                state = xorshift(state);
                b' ' + 1 + (state % 94) as u8
            })
            .collect()
    })
}

fn xorshift(mut state: u64) -> u64 {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    state
}

/// Builds one message of exactly `size_bytes` octets (before dot-stuffing) into `out`.
///
/// The body is printable ASCII derived from `seed`, in lines of at most 78 octets; some
/// lines start with a dot so that servers' dot-stuffing is exercised.
pub fn build_message(
    out: &mut Vec<u8>,
    from: &str,
    to: &str,
    message_id: &str,
    size_bytes: usize,
    seed: u64,
) -> Result<(), MessageError> {
    out.clear();
    out.extend_from_slice(b"From: <");
    out.extend_from_slice(from.as_bytes());
    out.extend_from_slice(b">\r\nTo: <");
    out.extend_from_slice(to.as_bytes());
    out.extend_from_slice(b">\r\nSubject: loadgen test message\r\nMessage-ID: <");
    out.extend_from_slice(message_id.as_bytes());
    out.extend_from_slice(b">\r\n");
    out.extend_from_slice(CHECKSUM_HEADER.as_bytes());
    out.extend_from_slice(b": ");
    let checksum_at = out.len();
    out.extend_from_slice(b"0000000000000000\r\n\r\n");
    // A body of one octet cannot end in CRLF, so the smallest non-empty body is two.
    let minimum = out.len();
    if size_bytes < minimum || size_bytes == minimum + 1 {
        return Err(MessageError::TooSmall {
            requested: size_bytes,
            minimum,
        });
    }
    let body_at = out.len();
    let mut remaining = size_bytes - minimum;
    let table = printable_table();
    out.reserve(size_bytes - minimum);
    let mut state = seed | 1;
    let mut line_number = 0u64;
    while remaining > 0 {
        let full = BODY_LINE_LEN_BYTES + 2;
        // Never leave a single octet for the last line: it could not hold CRLF.
        let line_total = if remaining > full {
            if remaining - full == 1 {
                full - 1
            } else {
                full
            }
        } else {
            remaining
        };
        let content = line_total - 2;
        state = xorshift(state);
        let from = (state % (table.len() - BODY_LINE_LEN_BYTES) as u64) as usize;
        let line_at = out.len();
        out.extend_from_slice(&table[from..from + content]);
        if content > 0 && line_number % 7 == 3 {
            out[line_at] = b'.';
        }
        out.extend_from_slice(b"\r\n");
        remaining -= line_total;
        line_number += 1;
    }
    let hex = format!("{:016x}", checksum(&out[body_at..]));
    out[checksum_at..checksum_at + 16].copy_from_slice(hex.as_bytes());
    Ok(())
}

/// Appends `message` to `out` dot-stuffed (RFC 5321 §4.5.2), followed by `.` CRLF.
/// `message` must end with CRLF (as built messages do).
pub fn dot_stuff_into(message: &[u8], out: &mut Vec<u8>) {
    out.reserve(message.len() + message.len() / 64 + 5);
    if message.first() == Some(&b'.') {
        out.push(b'.');
    }
    let mut copied = 0;
    for newline in memchr::memmem::find_iter(message, b"\n.") {
        out.extend_from_slice(&message[copied..=newline]);
        out.push(b'.');
        copied = newline + 1;
    }
    out.extend_from_slice(&message[copied..]);
    if !message.is_empty() && !message.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

/// Removes dot-stuffing from a multi-line POP3/SMTP payload (without its final `.` line).
pub fn dot_unstuff(stuffed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(stuffed.len());
    let mut at_line_start = true;
    let mut skip_next_dot = false;
    for &byte in stuffed {
        if at_line_start && byte == b'.' && !skip_next_dot {
            skip_next_dot = true;
            at_line_start = false;
            continue;
        }
        skip_next_dot = false;
        out.push(byte);
        at_line_start = byte == b'\n';
    }
    out
}

/// What checking one retrieved message found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The header's checksum matches the body.
    Intact,
    /// The body differs from what the header says was sent.
    Mismatch,
    /// No `X-Loadgen-Checksum` header: not a loadgen message, or its header was lost.
    MissingHeader,
}

/// Checks an unstuffed message: finds the checksum header among the headers (wherever the
/// server put its own) and compares it with the checksum of the body.
pub fn verify(message: &[u8]) -> Verdict {
    let (headers, body) = match memchr::memmem::find(message, b"\r\n\r\n") {
        Some(at) => (&message[..at + 2], &message[at + 4..]),
        None => (message, &message[message.len()..]),
    };
    let mut claimed = None;
    for line in headers.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if line[..colon].eq_ignore_ascii_case(CHECKSUM_HEADER.as_bytes()) {
            let value = std::str::from_utf8(&line[colon + 1..]).unwrap_or("").trim();
            claimed = Some(u64::from_str_radix(value, 16).ok());
            break;
        }
    }
    match claimed {
        None => Verdict::MissingHeader,
        Some(Some(value)) if value == checksum(body) => Verdict::Intact,
        Some(_) => Verdict::Mismatch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn checksum_sees_every_byte_and_the_length() {
        let body = b"0123456789abcdefXYZ".to_vec();
        let sum = checksum(&body);
        for at in 0..body.len() {
            let mut changed = body.clone();
            changed[at] ^= 0x20;
            assert_ne!(checksum(&changed), sum, "byte {at}");
        }
        assert_ne!(checksum(b"ab"), checksum(b"ab\0"));
        assert_ne!(checksum(b""), checksum(b"\0"));
    }

    #[test]
    fn bodies_differ_between_seeds_and_lines_start_with_dots() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        build_message(&mut a, "f@x", "t@y", "id", 4096, 1).unwrap();
        build_message(&mut b, "f@x", "t@y", "id", 4096, 2).unwrap();
        assert_ne!(a, b);
        assert!(memchr::memmem::find(&a, b"\r\n.").is_some());
    }

    #[test]
    fn builds_exact_sizes() {
        let mut out = Vec::new();
        for size in [200usize, 201, 1024, 10240, 102_400] {
            build_message(&mut out, "f@x", "t@y", "1.2@loadgen", size, 7).unwrap();
            assert_eq!(out.len(), size);
            assert!(out.ends_with(b"\r\n"));
            assert_eq!(verify(&out), Verdict::Intact, "size {size}");
            for line in out.split(|&b| b == b'\n') {
                assert!(line.len() <= 79);
            }
        }
    }

    #[test]
    fn refuses_sizes_below_headers() {
        let mut out = Vec::new();
        let err = build_message(&mut out, "f@x", "t@y", "id", 10, 1).unwrap_err();
        assert!(matches!(err, MessageError::TooSmall { requested: 10, .. }));
        let MessageError::TooSmall { minimum, .. } = err;
        assert!(build_message(&mut out, "f@x", "t@y", "id", minimum, 1).is_ok());
        assert!(build_message(&mut out, "f@x", "t@y", "id", minimum + 1, 1).is_err());
        assert!(build_message(&mut out, "f@x", "t@y", "id", minimum + 2, 1).is_ok());
    }

    #[test]
    fn stuffing_table() {
        let table: &[(&[u8], &[u8])] = &[
            (b"a\r\n", b"a\r\n.\r\n"),
            (b".a\r\n", b"..a\r\n.\r\n"),
            (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b"", b".\r\n"),
        ];
        for (raw, want) in table {
            let mut out = Vec::new();
            dot_stuff_into(raw, &mut out);
            assert_eq!(&out[..], *want);
        }
    }

    #[test]
    fn unstuffing_table() {
        let table: &[(&[u8], &[u8])] = &[
            (b"..a\r\n", b".a\r\n"),
            (b"a\r\n...\r\n", b"a\r\n..\r\n"),
            (b"a.b\r\n", b"a.b\r\n"),
        ];
        for (stuffed, want) in table {
            assert_eq!(&dot_unstuff(stuffed)[..], *want);
        }
    }

    #[test]
    fn verify_accepts_server_added_headers_and_detects_changes() {
        let mut out = Vec::new();
        build_message(&mut out, "f@x", "t@y", "id@l", 1024, 3).unwrap();
        let mut served = b"Return-Path: <f@x>\r\nReceived: from x by y; Thu\r\n".to_vec();
        served.extend_from_slice(&out);
        assert_eq!(verify(&served), Verdict::Intact);
        let last = served.len() - 3;
        served[last] ^= 1;
        assert_eq!(verify(&served), Verdict::Mismatch);
        assert_eq!(
            verify(b"Subject: x\r\n\r\nbody\r\n"),
            Verdict::MissingHeader
        );
        assert_eq!(
            verify(b"X-Loadgen-Checksum: zz\r\n\r\nbody\r\n"),
            Verdict::Mismatch
        );
    }

    proptest! {
        #[test]
        fn stuff_then_unstuff_round_trips(lines in proptest::collection::vec("[ -~]{0,20}", 0..20)) {
            let mut raw = Vec::new();
            for line in &lines {
                raw.extend_from_slice(line.as_bytes());
                raw.extend_from_slice(b"\r\n");
            }
            let mut wire = Vec::new();
            dot_stuff_into(&raw, &mut wire);
            let payload = &wire[..wire.len() - 3];
            prop_assert_eq!(dot_unstuff(payload), raw);
        }

        #[test]
        fn verify_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = verify(&bytes);
        }

        #[test]
        fn built_messages_verify(size in 150usize..5000, seed in any::<u64>()) {
            let mut out = Vec::new();
            if build_message(&mut out, "f@x", "t@y", "id", size, seed).is_ok() {
                prop_assert_eq!(out.len(), size);
                let mut wire = Vec::new();
                dot_stuff_into(&out, &mut wire);
                let back = dot_unstuff(&wire[..wire.len() - 3]);
                prop_assert_eq!(verify(&back), Verdict::Intact);
            }
        }
    }
}
