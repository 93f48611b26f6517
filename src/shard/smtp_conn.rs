//! The SMTP connection loop: socket I/O, timers and the log around the sans-IO session.
//!
//! The loop reads straight into the session's input buffer, lets it process everything
//! buffered (PIPELINING), writes all replies in one write, and performs the actions it asks
//! for. DATA bytes travel from the socket into buffers that end up, unchanged and uncopied,
//! in the log append.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{future, AsyncRead, AsyncWrite};

use super::conn::{read_some, write_all, ReadOutcome};
use super::{ingest, Shard};
use crate::limits::Refusal;
use crate::server::ListenerKind;
use crate::smtp::{Action, PeerInfo, Session};

/// A transfer slower than this, measured over at least [`MIN_DATA_RATE_WINDOW`], is dropped
/// so a slow client cannot hold a connection slot forever.
pub const MIN_DATA_RATE_BYTES_PER_SEC: u64 = 1024;
/// The window over which the data rate is judged.
pub const MIN_DATA_RATE_WINDOW: Duration = Duration::from_secs(30);
/// How long a reply may wait for the client to read it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves one SMTP connection to the end.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shard: Rc<Shard>,
    mut stream: S,
    peer: SocketAddr,
    _kind: ListenerKind,
) {
    let config = &shard.shared.config;
    let hostname = &config.hostname;
    let _open = shard.metrics.smtp.opened();
    let _slot = match shard.shared.smtp_limits.admit(peer.ip()) {
        Ok(slot) => slot,
        Err(refusal) => {
            let why = match refusal {
                Refusal::TooManyConnections => "too many connections",
                Refusal::TooManyFromAddress => "too many connections from your address",
            };
            tracing::info!(shard = shard.id, client = %peer.ip(), "refused: {why}");
            let reply = format!("421 4.7.0 {hostname} Error: {why}, try again later\r\n");
            let _ = write_all(&mut stream, reply.as_bytes(), WRITE_TIMEOUT).await;
            return;
        }
    };
    let relay_allowed = config
        .smtp
        .relay_networks
        .iter()
        .any(|net| net.contains(peer.ip()));
    let mut session = Session::new(
        Rc::clone(&shard.smtp_params),
        PeerInfo {
            addr: peer,
            relay_allowed,
            tls: false,
        },
    );
    let idle_timeout = config.smtp.idle_timeout;
    let mut held_body_bytes = 0u64;
    let mut body_started: Option<(Instant, u64)> = None;
    let mut received_bytes = 0u64;

    let outcome: &str = loop {
        if !session.output().is_empty() {
            shard.metrics.count_smtp_replies(session.output());
            match write_all(&mut stream, session.output(), WRITE_TIMEOUT).await {
                Ok(()) => {
                    let n = session.output().len();
                    shard.metrics.smtp.sent(n);
                    session.output_consumed(n);
                }
                Err(_) => break "write failed",
            }
        }
        match session.poll_action() {
            Action::StoreMessage(transaction) => {
                shard.release_data_bytes(held_body_bytes);
                held_body_bytes = 0;
                body_started = None;
                let result = ingest::store_transaction(&shard, transaction).await;
                shard.metrics.record_message(&result);
                session.message_stored(result);
            }
            Action::Close => break "closed",
            Action::Idle => {
                // Long replies are produced as output drains: flush before anything else.
                if !session.output().is_empty() {
                    continue;
                }
                if !session.wants_input() {
                    // Output is flushed above; a session that still wants nothing is done.
                    break "stalled";
                }
                // Memory for DATA not yet durable is capped per shard: a session that holds
                // no body bytes waits before it may start adding to the pile.
                while held_body_bytes == 0 && shard.data_bytes_over_cap() {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                let between_transactions = session.is_between_transactions();
                let read = future::or(
                    async { Some(read_some(&mut stream, session.input_buffer(), idle_timeout).await) },
                    async {
                        // Between transactions, a stopping shard says goodbye; inside one,
                        // the transaction may finish within the grace period.
                        shard.stopped().await;
                        if between_transactions {
                            None
                        } else {
                            future::pending().await
                        }
                    },
                )
                .await;
                let n = match read {
                    None => {
                        let reply = format!("421 4.3.2 {hostname} Service shutting down\r\n");
                        let _ = write_all(&mut stream, reply.as_bytes(), WRITE_TIMEOUT).await;
                        break "shutdown";
                    }
                    Some(ReadOutcome::Data(n)) => n,
                    Some(ReadOutcome::Closed) => {
                        session.peer_closed();
                        break "peer closed";
                    }
                    Some(ReadOutcome::TimedOut) => {
                        let reply = format!("421 4.4.2 {hostname} Error: timeout exceeded\r\n");
                        let _ = write_all(&mut stream, reply.as_bytes(), WRITE_TIMEOUT).await;
                        session.peer_closed();
                        break "idle timeout";
                    }
                    Some(ReadOutcome::Failed(_)) => {
                        session.peer_closed();
                        break "read failed";
                    }
                };
                received_bytes += n as u64;
                shard.metrics.smtp.received(n);
                session.input_filled(n);
                let now_held = session.buffered_body_bytes();
                shard.adjust_data_bytes(held_body_bytes, now_held);
                held_body_bytes = now_held;
                if session.receiving_body() {
                    let (started, at_bytes) = *body_started.get_or_insert((Instant::now(), received_bytes - n as u64));
                    let elapsed = started.elapsed();
                    if elapsed > MIN_DATA_RATE_WINDOW
                        && (received_bytes - at_bytes) < MIN_DATA_RATE_BYTES_PER_SEC * elapsed.as_secs()
                    {
                        let reply = format!("421 4.4.2 {hostname} Error: data rate too slow\r\n");
                        let _ = write_all(&mut stream, reply.as_bytes(), WRITE_TIMEOUT).await;
                        session.peer_closed();
                        break "too slow";
                    }
                } else {
                    body_started = None;
                }
            }
        }
    };
    shard.release_data_bytes(held_body_bytes);
    tracing::debug!(shard = shard.id, client = %peer, "smtp connection ended: {outcome}");
}

