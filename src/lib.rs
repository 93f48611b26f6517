//! ringmail: a thread-per-core io_uring mail relay.
//!
//! # Layout
//! - [`auth`]: users, argon2id password hashes, SASL PLAIN decoding.
//! - [`pop3`]: sans-IO POP3 core: command parser, replies, session state machine, TOP scanner.
//! - [`throttle`]: per-client-address login failure throttle (pure, time passed in).

pub mod auth;
pub mod pop3;
pub mod throttle;
