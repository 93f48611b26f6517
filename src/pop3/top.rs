//! TOP on stored bytes: find where the headers end and where the n-th body line ends, in place.

use memchr::memchr;

/// Length of the prefix of `stored` (a message as stored: CRLF line ends, dot-stuffed) that
/// holds the headers, the blank line that ends them, and the first `lines` body lines.
/// RFC 1939 §7: with fewer body lines than asked, or no blank line at all, the whole message.
/// The prefix always ends just after a line feed (or at the end of `stored`), so the caller
/// can send `&stored[..top_len(stored, n)]` followed by `.\r\n`. No copy, no allocation; it
/// reads only as far as the prefix it returns (plus one line).
pub fn top_len(stored: &[u8], lines: u64) -> usize {
    let mut position = 0;
    // Headers: up to and including the first empty line ("\r\n" or a lone "\n").
    loop {
        let Some(newline) = memchr(b'\n', &stored[position..]) else {
            return stored.len();
        };
        let line = &stored[position..position + newline];
        position += newline + 1;
        if line.is_empty() || line == b"\r" {
            break;
        }
    }
    for _ in 0..lines {
        match memchr(b'\n', &stored[position..]) {
            Some(newline) => position += newline + 1,
            None => return stored.len(),
        }
    }
    position
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn top_len_table() {
        let message = b"Received: x\r\nSubject: hi\r\n\r\nline 1\r\n..dotted\r\nline 3\r\n";
        let header_end = b"Received: x\r\nSubject: hi\r\n\r\n".len();
        let cases: &[(&[u8], u64, usize)] = &[
            (message, 0, header_end),
            (message, 1, header_end + 8),
            (message, 2, header_end + 8 + 10),
            (message, 3, message.len()),
            (message, 4, message.len()),
            (message, u64::MAX, message.len()),
            // No body separator: headers only, the whole message.
            (b"Subject: a\r\nX: b\r\n", 0, 18),
            // Empty header section.
            (b"\r\nbody\r\nmore\r\n", 0, 2),
            (b"\r\nbody\r\nmore\r\n", 1, 8),
            (b"", 5, 0),
            // Last line without CRLF: counted as a line, the whole message.
            (b"A: b\r\n\r\nend", 1, 11),
            // Bare LF line ends are tolerated in stored bytes.
            (b"A: b\n\nx\ny\n", 1, 8),
        ];
        for (stored, lines, expected) in cases {
            assert_eq!(
                top_len(stored, *lines),
                *expected,
                "{:?} {lines}",
                String::from_utf8_lossy(stored)
            );
        }
    }

    proptest! {
        #[test]
        fn prefix_is_bounded_monotonic_and_line_aligned(
            stored in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), any::<u8>()], 0..400),
            lines in 0u64..20,
        ) {
            let len = top_len(&stored, lines);
            prop_assert!(len <= stored.len());
            prop_assert!(len == stored.len() || stored[len - 1] == b'\n');
            prop_assert!(top_len(&stored, lines + 1) >= len);
        }
    }
}
