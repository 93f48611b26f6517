//! Fuzz the POP3 core with arbitrary client bytes: the command parser and the session state
//! machine must never panic, never buffer an over-long line, and never let unsent output grow
//! past the high-water mark plus one reply, however the input is split and whatever the loop
//! answers to each action.
#![no_main]

use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use ringmail::pop3::session::{INPUT_CAPACITY_OCTETS, OUTPUT_HIGH_WATER_OCTETS};
use ringmail::pop3::{
    parse_command, top_len, Action, MessageEntry, MessageKey, OpenFailure, PeerInfo, Session,
    SessionParams,
};

/// A listing line or reply is far shorter than this; the bound only has to be finite.
const OUTPUT_SLACK_OCTETS: usize = 1_024;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|&b| b == b'\n') {
        let _ = parse_command(line);
    }
    let _ = top_len(data, data.first().copied().unwrap_or(0).into());

    // The first byte picks the read size and the loop's answers, the rest is client input.
    let (control, input) = data.split_first().unwrap_or((&0, &[]));
    let chunk_size = usize::from(control & 0x1f) + 1;
    let auth_ok = control & 0x20 == 0;
    let open_result = match control >> 6 {
        0 | 1 => Ok(()),
        2 => Err(OpenFailure::InUse),
        _ => Err(OpenFailure::Unavailable),
    };
    let params = Rc::new(SessionParams {
        greeting_host: "mx.example.test".into(),
        stls_available: control & 0x40 != 0,
    });
    let peer = PeerInfo {
        addr: "127.0.0.1:40000".parse().expect("address"),
        plaintext_auth_allowed: control & 0x80 == 0,
        tls: false,
    };
    let entries: Vec<MessageEntry> = (0..5u64)
        .map(|i| MessageEntry {
            key: MessageKey {
                shard: 0,
                record: i,
                recipient: 0,
            },
            size_octets: 100 + i,
            uidl: format!("uid{i}"),
        })
        .collect();

    let mut session = Session::new(params, peer);
    let mut rest = input;
    let mut closed = false;
    let mut stalled_rounds = 0;
    while !closed && stalled_rounds < 2 {
        assert!(session.output().len() <= OUTPUT_HIGH_WATER_OCTETS + OUTPUT_SLACK_OCTETS);
        let n = session.output().len();
        session.output_consumed(n);
        match session.poll_action() {
            Action::Authenticate { .. } => session.auth_checked(auth_ok),
            Action::OpenMailbox { .. } => {
                session.mailbox_opened(open_result.map(|()| entries.clone()))
            }
            Action::SendMessage { .. } => session.message_sent(),
            Action::Commit { deletions } => session.commit_done(deletions.len() % 2 == 0),
            Action::StartTls => session.tls_started(),
            Action::Close => closed = true,
            Action::Idle => {
                if !session.output().is_empty() {
                    continue;
                }
                if rest.is_empty() || !session.wants_input() {
                    stalled_rounds += 1;
                    continue;
                }
                stalled_rounds = 0;
                let buffer = session.input_buffer();
                assert!(!buffer.is_empty() && buffer.len() <= INPUT_CAPACITY_OCTETS);
                let n = chunk_size.min(buffer.len()).min(rest.len());
                buffer[..n].copy_from_slice(&rest[..n]);
                rest = &rest[n..];
                session.input_filled(n);
            }
        }
    }
});
