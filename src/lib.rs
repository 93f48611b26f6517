//! ringmail: a thread-per-core io_uring mail relay.
//!
//! # Layout
//! - [`smtp`]: the sans-IO SMTP server core: command parser, data scanner, replies, session.
//! - [`routing`]: recipient routing (local mailbox, relay, refusal) and mailbox owner shards.

pub mod routing;
pub mod smtp;
