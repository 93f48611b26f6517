//! ringmail: a thread-per-core io_uring mail relay.
//!
//! # Layout
//!
//! - [`relay`]: delivery to remote MX hosts: DNS, next hops, the SMTP client, retries, bounces.

pub mod relay;
