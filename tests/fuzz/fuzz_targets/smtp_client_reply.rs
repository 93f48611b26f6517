//! Fuzz the relay's SMTP client with arbitrary server bytes: the reply parser and the
//! session state machine must stay within their limits and never panic, whatever the far
//! end sends and however it is split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmail::relay::client::{OutgoingMessage, ReplyParser, SmtpClient};

fuzz_target!(|data: &[u8]| {
    let mut parser = ReplyParser::default();
    if parser.push(data).is_ok() {
        while let Ok(Some(_reply)) = parser.next_reply() {}
    }

    let recipients = vec!["bob@far.test".to_string(), "carol@far.test".to_string()];
    let message = OutgoingMessage {
        sender: "alice@example.test",
        recipients: &recipients,
        size_bytes: 1000,
        needs_8bitmime: false,
        needs_smtputf8: false,
    };
    let mut client = SmtpClient::new("relay.example.test");
    // Split the input at every newline so that replies arrive one by one, and offer a
    // message whenever the session is ready, to reach every state.
    for chunk in data.split_inclusive(|&b| b == b'\n') {
        client.received(chunk);
        while let Some(_action) = client.poll_action() {}
        if client.is_ready() {
            let _ = client.send_message(&message);
        }
    }
    client.timed_out();
    while let Some(_action) = client.poll_action() {}
});
