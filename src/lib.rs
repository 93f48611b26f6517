//! ringmail: a thread-per-core io_uring mail relay.
//!
//! # Layout
//!
//! - [`config`]: the one configuration struct, its defaults (SPEC §2) and its loader.
//! - [`server`]: starts the shards, holds the `data_dir` lock, signals and the graceful drain.
//! - [`shard`]: one pinned executor per core; the only place with sockets and timers.
//! - [`host`]: what the host grants (locked memory, open files) and what that costs.
//! - [`limits`]: connection admission across shards.
//! - [`envelope`]: the message record (envelope, `Received:`, body) and recipient outcome records.
//! - [`auth`]: users and argon2id password hashes.
pub mod auth;
pub mod config;
pub mod envelope;
pub mod host;
pub mod limits;
pub mod server;
pub mod shard;
