//! ringmail: a thread-per-core io_uring mail relay.
//!
//! # Layout
//! - [`store`]: the shard-local append-only log (records, segments, group commit, recovery, reclaim).

pub mod store;
