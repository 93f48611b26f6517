//! ringmail: a thread-per-core io_uring mail relay.
//!
//! One process, one pinned glommio executor (a *shard*) per core. Each shard owns its
//! connections and an append-only log; a message's bytes never leave the core that stored
//! them (other shards learn of it through small index entries). Protocol cores do no I/O: the
//! shard's connection loops do.
//!
//! # Layout
//!
//! - [`config`]: the one configuration struct, its defaults (SPEC §2) and its loader.
//! - [`server`]: starts the shards, holds the `data_dir` lock, signals and the graceful drain.
//! - [`shard`]: one pinned executor per core: connection loops, the mesh, ingest, recovery,
//!   the relay queue and its deliveries, the metrics endpoint. Sockets and timers live here,
//!   in [`relay::dns`]'s resolver, in [`tls`] handshakes and in [`server`]'s port claims.
//! - [`host`]: what the host grants (locked memory, open files) and what that costs.
//! - [`limits`]: connection admission across shards.
//! - [`store`]: the shard-local log: records and segments, group commit, recovery, space reclaim.
//! - [`envelope`]: what the log says about mail: the message record (envelope, `Received:`,
//!   body), recipient outcome records and relay deferral records, and the log's record limit.
//! - [`mailbox`]: mailbox indexes on their owner shards, and the maildrop lock.
//! - [`smtp`]: sans-IO SMTP server core: command parser, data scanner, replies, session state machine, `Received:`.
//! - [`routing`]: recipient routing (local mailbox, relay, refused) and mailbox owner shards.
//! - [`pop3`]: sans-IO POP3 core: command parser, replies, session state machine, TOP scanner.
//! - [`relay`]: relay building blocks: DNS (hickory-proto), next hops, sans-IO SMTP client, retry schedule, DSNs.
//! - [`auth`]: users, argon2id password hashes, SASL PLAIN decoding.
//! - [`throttle`]: per-client-address login failure throttle (pure, time passed in).
//! - [`tls`]: rustls (ring) server and client configurations, certificate loading and SIGHUP reload.
//! - [`metrics`]: per-shard counters (atomics) and their Prometheus text encoding for `/metrics`.
//! - `transcript` (tests only): the escapes of the golden dialogue files in `tests/dialogues/`.

pub mod auth;
pub mod config;
pub mod envelope;
pub mod host;
pub mod limits;
pub mod mailbox;
pub mod metrics;
pub mod pop3;
pub mod relay;
pub mod routing;
pub mod server;
pub mod shard;
pub mod smtp;
pub mod store;
pub mod throttle;
pub mod tls;
#[cfg(test)]
mod transcript;
