//! ringmail: a thread-per-core io_uring mail relay.
//!
//! # Layout
//!
//! - [`config`]: the one configuration struct, its defaults (SPEC §2) and its loader.
pub mod config;
