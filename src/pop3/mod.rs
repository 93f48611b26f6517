//! The sans-IO POP3 core (RFC 1939, RFC 2449, RFC 5034): command parser, replies with
//! response codes, the session state machine, and the TOP scanner. No sockets, no clock, no
//! storage: the shard's connection loop feeds bytes in, writes bytes out, and answers the
//! [`Action`]s the session asks for (see [`session`] for the contract).
//!
//! Choices worth knowing:
//! - Commands are at most 255 octets with their terminator (RFC 2449 §4); SASL response lines
//!   at most 1,026. Longer lines get `-ERR` and are discarded as they arrive, never buffered.
//! - A bare LF ends a command line as CRLF does (common practice; nothing is relayed).
//! - Plain-text login (USER/PASS, AUTH PLAIN) is refused with `-ERR [AUTH]` unless the
//!   connection is TLS or loopback, and CAPA then omits USER and SASL PLAIN.
//! - Ten bad commands, or three failed logins, end the session.

pub mod command;
pub mod maildrop;
pub mod reply;
pub mod session;
pub mod top;

#[cfg(test)]
mod dialogues;
#[cfg(test)]
mod session_tests;
#[cfg(test)]
pub(crate) mod testkit;

pub use command::{parse_command, Command, CommandError};
pub use maildrop::{MessageEntry, MessageKey, OpenFailure};
pub use reply::RespCode;
pub use session::{Action, PeerInfo, Session, SessionParams};
pub use top::top_len;
