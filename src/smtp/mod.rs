//! The sans-IO SMTP server core (RFC 5321 with PIPELINING, SIZE, 8BITMIME,
//! ENHANCEDSTATUSCODES, CHUNKING and SMTPUTF8).
//!
//! Bytes and events go in, replies and [`session::Action`]s come out; no socket, file or
//! clock is touched here, so every behaviour is unit-tested byte by byte.

pub mod address;
pub mod command;
pub mod data;
pub mod reply;
