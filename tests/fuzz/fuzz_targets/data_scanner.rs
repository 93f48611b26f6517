//! The end-of-data scanner and the BDAT stuffer, checked against each other:
//! - scanning in two pieces finds the same end as scanning whole;
//! - any input the stuffer passes clean, once stuffed and terminated, ends exactly at
//!   its terminator (no early end, whatever the bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmail::smtp::data::{DataScanner, ScanOutcome, Stuffer};

fn scan_in_two(input: &[u8], split: usize) -> (Option<usize>, bool) {
    let mut scanner = DataScanner::new();
    let end = match scanner.scan(&input[..split]) {
        ScanOutcome::End { consumed } => Some(consumed),
        ScanOutcome::NeedMore => match scanner.scan(&input[split..]) {
            ScanOutcome::End { consumed } => Some(split + consumed),
            ScanOutcome::NeedMore => None,
        },
    };
    (end, scanner.saw_bare_line_ending())
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let split = usize::from(first) % (input.len() + 1);
    let mut whole = DataScanner::new();
    let whole_end = match whole.scan(input) {
        ScanOutcome::End { consumed } => Some(consumed),
        ScanOutcome::NeedMore => None,
    };
    let (end, _) = scan_in_two(input, split);
    assert_eq!(end, whole_end);

    let mut stuffer = Stuffer::new();
    let mut stuffed = Vec::new();
    stuffer.stuff(&input[..split], &mut stuffed);
    stuffer.stuff(&input[split..], &mut stuffed);
    let needs_crlf = stuffer.finish();
    if !stuffer.saw_bare_line_ending() {
        if needs_crlf {
            stuffed.extend_from_slice(b"\r\n");
        }
        let body_len = stuffed.len();
        stuffed.extend_from_slice(b".\r\n");
        let (end, bare) = scan_in_two(&stuffed, split.min(stuffed.len()));
        assert_eq!(end, Some(body_len + 3));
        assert!(!bare);
    }
});
