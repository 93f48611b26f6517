//! Message data framing: the DATA end-of-data scanner and the BDAT dot-stuffer.
//!
//! Both refuse to guess. Only `<CRLF>.<CRLF>` ends DATA; a CR or LF that is not half of a
//! CRLF pair is remembered as a *bare line ending* and the whole message is then refused
//! (never normalised), because a server behind us might read such a byte as a line end
//! and see a different end of data: that gap is SMTP smuggling (RFC 5321 §2.3.8, 2023
//! disclosures). Scanning continues to the real terminator so the session stays in step
//! with the client and nothing after a fake terminator is ever run as a command.

use memchr::memchr2;

/// Where the DATA scanner is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanState {
    /// Just after a CRLF (or at the start of the body).
    LineStart,
    /// Inside a line.
    Middle,
    /// Just after a CR; a LF must follow.
    Cr,
    /// A '.' at the start of a line.
    Dot,
    /// `.` CR at the start of a line: a LF now ends the data.
    DotCr,
}

/// What [`DataScanner::scan`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanOutcome {
    /// No terminator in this input; all of it is body (or the start of a terminator).
    NeedMore,
    /// The terminator ends inside this input: `consumed` bytes of it (terminator
    /// included) belong to the data; the rest is the client's next command.
    End {
        /// Input bytes up to and including the LF of `.<CRLF>`.
        consumed: usize,
    },
}

/// Finds `<CRLF>.<CRLF>` across any split of the input; resumable byte by byte.
///
/// The body starts just after the CRLF of the DATA command, so the scanner starts at a
/// line start and an empty message is just `.<CRLF>`.
#[derive(Debug, Clone)]
pub struct DataScanner {
    /// Position in the line, carried across calls.
    state: ScanState,
    /// Set once a bare CR or LF has been seen: the message will be refused.
    bare_line_ending: bool,
    /// Lines begun with a '.', the terminator's included once it is seen.
    line_start_dots: u64,
}

/// Length of the part of the terminator that follows the body's last CRLF: `.<CRLF>`.
pub const TERMINATOR_TAIL_BYTES: u64 = 3;

impl Default for DataScanner {
    fn default() -> Self {
        DataScanner::new()
    }
}

impl DataScanner {
    /// A scanner positioned at the start of a body.
    pub fn new() -> DataScanner {
        DataScanner {
            state: ScanState::LineStart,
            bare_line_ending: false,
            line_start_dots: 0,
        }
    }

    /// True when a CR or LF outside a CRLF pair has been seen in this body.
    pub fn saw_bare_line_ending(&self) -> bool {
        self.bare_line_ending
    }

    /// Lines of the body scanned so far that begin with a '.' (the terminator's line counts
    /// once it begins). Every such line but the terminator carries a stuffing dot, which
    /// RFC 1870 leaves out of a message's size.
    pub fn line_start_dots(&self) -> u64 {
        self.line_start_dots
    }

    /// Scans the next piece of the body.
    pub fn scan(&mut self, input: &[u8]) -> ScanOutcome {
        let mut i = 0;
        while i < input.len() {
            if self.state == ScanState::Middle {
                // The hot loop: skip to the next CR or LF at memchr speed.
                match memchr2(b'\r', b'\n', &input[i..]) {
                    None => return ScanOutcome::NeedMore,
                    Some(offset) => i += offset,
                }
            }
            let byte = input[i];
            i += 1;
            self.state = match (self.state, byte) {
                (ScanState::DotCr, b'\n') => {
                    self.state = ScanState::LineStart;
                    return ScanOutcome::End { consumed: i };
                }
                (ScanState::Cr, b'\n') => ScanState::LineStart,
                (ScanState::LineStart, b'.') => {
                    self.line_start_dots += 1;
                    ScanState::Dot
                }
                (ScanState::Dot, b'\r') => ScanState::DotCr,
                (ScanState::Cr | ScanState::DotCr, b'\r') => {
                    // The earlier CR had no LF after it.
                    self.bare_line_ending = true;
                    ScanState::Cr
                }
                (_, b'\r') => ScanState::Cr,
                (_, b'\n') => {
                    // A LF without a CR before it: never a line start.
                    self.bare_line_ending = true;
                    ScanState::Middle
                }
                (ScanState::Cr | ScanState::DotCr, _) => {
                    self.bare_line_ending = true;
                    ScanState::Middle
                }
                (_, _) => ScanState::Middle,
            };
        }
        ScanOutcome::NeedMore
    }
}

/// Dot-stuffs BDAT chunks (RFC 5321 §4.5.2) so a stored message always has the form it
/// would have had over DATA: POP3 RETR and relay then send stored bytes as they are.
///
/// This costs one copy of BDAT bodies (DATA bodies are stored from the read buffers
/// with no copy); chosen over a "needs stuffing" flag so every reader of the log sees one
/// format. Bare CR/LF are detected here too, across chunk boundaries.
#[derive(Debug, Clone)]
pub struct Stuffer {
    /// Next byte starts a line (after CRLF, or at the start of the message).
    at_line_start: bool,
    /// Previous byte was a CR awaiting its LF.
    after_cr: bool,
    /// Set once a bare CR or LF has been seen.
    bare_line_ending: bool,
}

impl Default for Stuffer {
    fn default() -> Self {
        Stuffer::new()
    }
}

impl Stuffer {
    /// A stuffer positioned at the start of a message.
    pub fn new() -> Stuffer {
        Stuffer {
            at_line_start: true,
            after_cr: false,
            bare_line_ending: false,
        }
    }

    /// True when a CR or LF outside a CRLF pair has been seen.
    pub fn saw_bare_line_ending(&self) -> bool {
        self.bare_line_ending
    }

    /// Appends `input` to `out`, doubling any '.' that starts a line.
    pub fn stuff(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut copied_to = 0;
        let mut i = 0;
        while i < input.len() {
            if !self.at_line_start && !self.after_cr {
                match memchr2(b'\r', b'\n', &input[i..]) {
                    None => break,
                    Some(offset) => i += offset,
                }
            }
            let byte = input[i];
            if self.after_cr && byte != b'\n' {
                self.bare_line_ending = true;
            }
            match byte {
                b'\n' => {
                    if !self.after_cr {
                        self.bare_line_ending = true;
                    }
                    self.after_cr = false;
                    self.at_line_start = true;
                }
                b'\r' => {
                    self.after_cr = true;
                    self.at_line_start = false;
                }
                b'.' if self.at_line_start => {
                    // Copy up to and including this dot, then emit its twin.
                    out.extend_from_slice(&input[copied_to..=i]);
                    out.push(b'.');
                    copied_to = i + 1;
                    self.after_cr = false;
                    self.at_line_start = false;
                }
                _ => {
                    self.after_cr = false;
                    self.at_line_start = false;
                }
            }
            i += 1;
        }
        out.extend_from_slice(&input[copied_to..]);
    }

    /// Ends the message; returns true when it does not end with CRLF and so needs one
    /// appended to be storable in the DATA form (a non-empty body always ends in CRLF).
    /// A trailing CR is a bare line ending.
    pub fn finish(&mut self) -> bool {
        if self.after_cr {
            self.bare_line_ending = true;
        }
        !self.at_line_start
    }
}

/// The most octets [`Stuffer`] can make of `unstuffed_bytes` octets of message, the CRLF
/// that [`Stuffer::finish`] may ask for included: what a BDAT body accepted by its received
/// size can take up in the log. Every complete line that starts with a dot is at least
/// ".<CRLF>", growing from 3 octets to 4, so stuffing adds at most a third (rounded up, for
/// a last line that is a lone "."), plus the final CRLF. Bodies with a bare CR or LF grow
/// more but are refused, never stored.
pub fn max_stuffed_bytes(unstuffed_bytes: u64) -> u64 {
    unstuffed_bytes
        .saturating_add(unstuffed_bytes.div_ceil(3))
        .saturating_add(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Scans `input` whole; returns (end offset, bare line ending seen).
    fn scan_whole(input: &[u8]) -> (Option<usize>, bool) {
        let mut scanner = DataScanner::new();
        match scanner.scan(input) {
            ScanOutcome::End { consumed } => (Some(consumed), scanner.saw_bare_line_ending()),
            ScanOutcome::NeedMore => (None, scanner.saw_bare_line_ending()),
        }
    }

    /// Scans `input` split at every possible pair of points; all must agree with whole.
    fn scan_split_everywhere(input: &[u8]) {
        let whole = scan_whole(input);
        for a in 0..=input.len() {
            for b in a..=input.len() {
                let mut scanner = DataScanner::new();
                let mut end = None;
                let mut offset = 0;
                for piece in [&input[..a], &input[a..b], &input[b..]] {
                    if end.is_none() {
                        if let ScanOutcome::End { consumed } = scanner.scan(piece) {
                            end = Some(offset + consumed);
                        }
                    }
                    offset += piece.len();
                }
                assert_eq!(
                    (end, scanner.saw_bare_line_ending()),
                    whole,
                    "input {input:?} split at {a},{b}"
                );
            }
        }
    }

    #[test]
    fn only_crlf_dot_crlf_ends_data() {
        // (body, where the data ends, bare line ending seen before the end)
        let table: &[(&[u8], Option<usize>, bool)] = &[
            (b".\r\n", Some(3), false),
            (b"a\r\n.\r\n", Some(6), false),
            (b"a\r\n.\r\nQUIT\r\n", Some(6), false),
            (b"a\r\n..\r\n.\r\n", Some(10), false),
            (b"a\r\n.x\r\n.\r\n", Some(10), false),
            // Fake terminators: never an end; each one is a bare CR or LF.
            (b"a\n.\n", None, true),
            (b"a\r.\r", None, true),
            (b"a\r.\n", None, true),
            (b"a\n.\r\n", None, true),
            (b"a\r\n.\n", None, true),
            (b"a\r\n.\r", None, false),
            (b"a\r\n.\rX", None, true),
            (b"a\r\n.\r\r\n", None, true),
            (b"a\n.\r\nMAIL FROM:<x@y>\r\n", None, true),
            (b"a\n.\r\nX\r\n.\r\n", Some(11), true),
            (b"a\r\n.\nX\r\n.\r\n", Some(11), true),
            // NUL next to the dot is data, not part of a terminator.
            (b"a\r\n\0.\r\n", None, false),
            (b"a\r\n.\0\r\n", None, false),
            (b"a\r\n.\r\0\n", None, true),
            (b"a\r\n\0.\r\n.\r\n", Some(10), false),
            // 8-bit bytes are data.
            (b"\xff\xfe\r\n\x80.\r\n.\r\n", Some(11), false),
            // CR CR LF: the first CR is bare.
            (b"a\r\r\n.\r\n", Some(7), true),
            (b"", None, false),
            (b"\r\n", None, false),
            (b"\r\n.\r\n", Some(5), false),
        ];
        for (input, end, bare) in table {
            assert_eq!(scan_whole(input), (*end, *bare), "input {input:?}");
            scan_split_everywhere(input);
        }
    }

    #[test]
    fn stuffer_table() {
        // (chunks, stored form, needs CRLF appended, bare line ending)
        type Row<'a> = (&'a [&'a [u8]], &'a [u8], bool, bool);
        let table: &[Row<'_>] = &[
            (&[b"a\r\n.b\r\n"], b"a\r\n..b\r\n", false, false),
            (&[b".\r\n"], b"..\r\n", false, false),
            (&[b"a\r", b"\n.", b"\r\n"], b"a\r\n..\r\n", false, false),
            (&[b"x.y\r\n"], b"x.y\r\n", false, false),
            (&[b"no newline"], b"no newline", true, false),
            (&[b""], b"", false, false),
            (&[b"a\nb\r\n"], b"a\nb\r\n", false, true),
            (&[b"a\rb\r\n"], b"a\rb\r\n", false, true),
            (&[b"a\r"], b"a\r", true, true),
            (&[b"\0.\r\n\xff"], b"\0.\r\n\xff", true, false),
        ];
        for (chunks, stored, needs_crlf, bare) in table {
            let mut stuffer = Stuffer::new();
            let mut out = Vec::new();
            for chunk in chunks.iter() {
                stuffer.stuff(chunk, &mut out);
            }
            assert_eq!(out, *stored, "chunks {chunks:?}");
            assert_eq!(stuffer.finish(), *needs_crlf, "chunks {chunks:?}");
            assert_eq!(stuffer.saw_bare_line_ending(), *bare, "chunks {chunks:?}");
        }
    }

    /// Stuffs `body` as the session does for BDAT: the stored length, or `None` when the
    /// body would be refused for a bare line ending.
    fn stored_len(body: &[u8]) -> Option<u64> {
        let mut stuffer = Stuffer::new();
        let mut out = Vec::new();
        stuffer.stuff(body, &mut out);
        if stuffer.finish() {
            stuffer.stuff(b"\r\n", &mut out);
        }
        (!stuffer.saw_bare_line_ending()).then_some(out.len() as u64)
    }

    #[test]
    fn stuffing_growth_is_bounded() {
        // (body, stored length): the worst cases meet the bound exactly.
        let table: &[(&[u8], u64)] = &[
            (b"", 0),
            (b".", 4),
            (b".\r\n", 4),
            (b".\r\n.", 8),
            (b".\r\n.x", 9),
            (b"x", 3),
        ];
        for (body, want) in table {
            assert_eq!(stored_len(body), Some(*want), "{body:?}");
            assert!(*want <= max_stuffed_bytes(body.len() as u64), "{body:?}");
        }
        assert_eq!(max_stuffed_bytes(1), 4);
        assert_eq!(max_stuffed_bytes(3), 6);
        assert_eq!(max_stuffed_bytes(4), 8);
        // The body of the report: 99,999 lines of "." in 299,997 octets.
        let dots = b".\r\n".repeat(99_999);
        assert_eq!(stored_len(&dots), Some(399_996));
        assert_eq!(max_stuffed_bytes(299_997), 399_998);
        assert_eq!(max_stuffed_bytes(u64::MAX), u64::MAX);
    }

    /// Lines of arbitrary bytes except CR and LF, joined by CRLF.
    fn crlf_lines() -> impl Strategy<Value = Vec<Vec<u8>>> {
        proptest::collection::vec(
            proptest::collection::vec(
                any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'),
                0..40,
            ),
            0..20,
        )
    }

    proptest! {
        #[test]
        fn stuffing_never_outgrows_its_bound(
            pieces in proptest::collection::vec(
                prop_oneof![
                    Just(&b"."[..]),
                    Just(&b"x"[..]),
                    Just(&b"\r\n"[..]),
                    Just(&b".\r\n"[..]),
                ],
                0..200,
            ),
        ) {
            let body = pieces.concat();
            let stored = stored_len(&body);
            prop_assert!(stored.is_some());
            prop_assert!(stored.unwrap_or(0) <= max_stuffed_bytes(body.len() as u64));
        }

        #[test]
        fn stuffed_body_ends_exactly_at_its_terminator(lines in crlf_lines(), split in any::<prop::sample::Index>()) {
            // Stuff with the BDAT stuffer, then frame as DATA: the scanner must find the
            // end exactly after the body, with no bare line ending.
            let mut raw = Vec::new();
            for line in &lines {
                raw.extend_from_slice(line);
                raw.extend_from_slice(b"\r\n");
            }
            let mut stuffer = Stuffer::new();
            let mut body = Vec::new();
            stuffer.stuff(&raw, &mut body);
            prop_assert!(!stuffer.finish());
            let mut wire = body.clone();
            wire.extend_from_slice(b".\r\nNEXT\r\n");
            let at = split.index(wire.len() + 1);
            let mut scanner = DataScanner::new();
            let end = match scanner.scan(&wire[..at]) {
                ScanOutcome::End { consumed } => Some(consumed),
                ScanOutcome::NeedMore => match scanner.scan(&wire[at..]) {
                    ScanOutcome::End { consumed } => Some(at + consumed),
                    ScanOutcome::NeedMore => None,
                },
            };
            prop_assert_eq!(end, Some(body.len() + 3));
            prop_assert!(!scanner.saw_bare_line_ending());
        }

        #[test]
        fn scanner_agrees_with_a_naive_search(input in proptest::collection::vec(
            prop::sample::select(vec![b'\r', b'\n', b'.', b'a', 0u8]), 0..40)) {
            // Reference: the first "\r\n.\r\n" (or ".\r\n" at the very start) that is
            // reached through CRLF line starts only.
            let mut with_start = b"\r\n".to_vec();
            with_start.extend_from_slice(&input);
            let naive = with_start.windows(5).position(|w| w == b"\r\n.\r\n").map(|p| p + 5 - 2);
            let (end, _) = scan_whole(&input);
            // The naive search can match a CRLF whose CR was itself after a line start;
            // both agree because a terminator needs CRLF right before the dot.
            prop_assert_eq!(end, naive);
        }

        #[test]
        fn stuffer_chunking_does_not_matter(input in proptest::collection::vec(any::<u8>(), 0..200), cut in any::<prop::sample::Index>()) {
            let at = cut.index(input.len() + 1);
            let mut whole = Stuffer::new();
            let mut whole_out = Vec::new();
            whole.stuff(&input, &mut whole_out);
            let mut split = Stuffer::new();
            let mut split_out = Vec::new();
            split.stuff(&input[..at], &mut split_out);
            split.stuff(&input[at..], &mut split_out);
            prop_assert_eq!(whole_out, split_out);
            prop_assert_eq!(whole.finish(), split.finish());
            prop_assert_eq!(whole.saw_bare_line_ending(), split.saw_bare_line_ending());
        }
    }
}
