//! The sans-IO SMTP server core (RFC 5321 with PIPELINING, SIZE, 8BITMIME,
//! ENHANCEDSTATUSCODES, CHUNKING and SMTPUTF8).
//!
//! Bytes and events go in, replies and [`Action`]s come out; no socket, file or clock is
//! touched here, so every behaviour is unit-tested byte by byte. The shard's connection
//! loop drives a [`Session`] (see the `session` module docs for the loop's shape).
//!
//! - `address`: paths and mailboxes with the RFC 5321 §4.5.3.1 limits.
//! - `command`: the command line parser.
//! - `data`: the DATA end-of-data scanner and the BDAT dot-stuffer.
//! - `reply`: replies with enhanced status codes.
//! - `received`: the Received header.
//! - `session`: the state machine.

// Every public item says why it exists.
#![warn(missing_docs)]

pub mod address;
pub mod command;
pub mod data;
pub mod received;
pub mod reply;
pub mod session;

#[cfg(test)]
mod dialogue_tests;
#[cfg(test)]
mod session_tests;
#[cfg(test)]
mod tls_auth_tests;

pub use session::{
    connection_refused, Action, Discarded, PeerInfo, Recipient, Session, SessionParams,
    StoreFailure, Transaction,
};
