//! ringmail: a thread-per-core io_uring mail relay.
//!
//! # Layout
//! - [`auth`]: users, argon2id password hashes, SASL PLAIN decoding.
//! - [`throttle`]: per-client-address login failure throttle (pure, time passed in).

pub mod auth;
pub mod throttle;
