//! Any command line: the parser must not panic, and what it accepts must respect the
//! RFC 5321 §4.5.3.1 limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmail::smtp::address::{ForwardPath, ReversePath, MAX_DOMAIN_BYTES, MAX_LOCAL_PART_BYTES};
use ringmail::smtp::command::{parse, Command};

fuzz_target!(|line: &[u8]| {
    match parse(line) {
        Ok(Command::Mail {
            from: ReversePath::Mailbox(m),
            ..
        })
        | Ok(Command::Rcpt {
            to: ForwardPath::Mailbox(m),
        }) => {
            assert!(m.local_part.len() <= MAX_LOCAL_PART_BYTES);
            assert!(m.domain.len() <= MAX_DOMAIN_BYTES);
            assert_eq!(m.text.len(), m.local_part.len() + 1 + m.domain.len());
        }
        Ok(_) => {}
        Err(error) => assert!(error.reply().code >= 500),
    }
});
