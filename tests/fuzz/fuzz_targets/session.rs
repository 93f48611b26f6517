//! Arbitrary client bytes, in arbitrary read sizes, against a whole Session: no panic,
//! replies bounded, every stored body free of a terminator before its end.
#![no_main]

use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use ringmail::routing::Directory;
use ringmail::smtp::data::{DataScanner, ScanOutcome};
use ringmail::smtp::{Action, PeerInfo, Session, SessionParams};

fuzz_target!(|data: &[u8]| {
    let Some((&read_size, input)) = data.split_first() else {
        return;
    };
    let read_size = usize::from(read_size.max(1));
    let directory = Directory::new(&["example.test".into()], &["alice@example.test".into()], "")
        .expect("valid directory");
    let params = Rc::new(SessionParams {
        hostname: "mx.example.test".into(),
        max_message_size: 2000,
        max_recipients: 3,
        directory: Rc::new(directory),
        starttls_available: read_size % 3 == 0,
    });
    let peer = PeerInfo {
        addr: "192.0.2.1:1".parse().expect("address"),
        relay_allowed: read_size % 2 == 0,
        tls: false,
        auth_required: read_size % 5 == 0,
    };
    let mut session = Session::new(params, peer);
    let mut rest = input;
    let mut queue_id = 0u32;
    loop {
        let out_len = session.output().len();
        assert!(out_len <= 64 * 1024 + 1024, "unbounded replies");
        session.output_consumed(out_len);
        match session.poll_action() {
            Action::Close => return,
            Action::StoreMessage(tx) => {
                let body = tx.body.concat();
                // DATA bodies are limited as transmitted; BDAT ones as received, before
                // stuffing (at most one dot per line plus a final CRLF).
                assert!(body.len() as u64 <= 2 * 2000 + 2);
                let mut framed = body.clone();
                framed.extend_from_slice(b".\r\n");
                let mut scanner = DataScanner::new();
                assert_eq!(
                    scanner.scan(&framed),
                    ScanOutcome::End {
                        consumed: framed.len()
                    }
                );
                assert!(!scanner.saw_bare_line_ending());
                queue_id += 1;
                session.message_stored(Ok(format!("Q{queue_id}")));
            }
            // The handshake "succeeds" at once; AUTH is right for every other attempt.
            Action::StartTls => session.tls_started(),
            Action::Authenticate { user, .. } => session.auth_checked(user.len() % 2 == 0),
            Action::Idle => {
                if rest.is_empty() {
                    session.peer_closed();
                    continue;
                }
                if !session.wants_input() {
                    continue;
                }
                let buffer = session.input_buffer();
                let n = buffer.len().min(read_size).min(rest.len());
                buffer[..n].copy_from_slice(&rest[..n]);
                session.input_filled(n);
                rest = &rest[n..];
            }
        }
    }
});
