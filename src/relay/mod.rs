//! Delivery of remote recipients: the pure building blocks the shard's relay queue drives.
//!
//! Every module here except the async half of [`dns`] is sans-IO: it takes bytes, events and
//! the current time as arguments and returns decisions, so it is tested byte by byte.
//!
//! - [`dns`]: MX / A / AAAA queries encoded and decoded with hickory-proto, a TTL cache, and
//!   the async [`dns::Resolver`] on glommio UDP (TCP when truncated).
//! - [`nexthop`]: MX answer → ordered hosts to try (RFC 5321 §5.1, RFC 7505, loop checks).
//! - [`client`]: the SMTP client state machine (EHLO, PIPELINING, per-recipient outcomes).
//! - [`dsn`]: RFC 3464 delivery status notifications.
//! - [`retry`]: when to try a deferred recipient again, or give up.

pub mod client;
pub mod dns;
pub mod dsn;
#[cfg(test)]
mod fake_dns;
pub mod nexthop;
pub mod retry;
