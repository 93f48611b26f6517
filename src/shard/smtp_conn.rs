//! The SMTP connection loop: socket I/O, timers and the log around the sans-IO session.
//!
//! The loop reads straight into the session's input buffer, lets it process everything
//! buffered (PIPELINING), writes all replies in one write, and performs the actions it asks
//! for. DATA bytes travel from the socket into buffers that end up, unchanged and uncopied,
//! in the log append.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::future;

use super::conn::{read_some, write_all, ReadOutcome};
use super::stream::ConnStream;
use super::{ingest, login, Shard};
use crate::server::ListenerKind;
use crate::smtp::{Action, PeerInfo, Session};

/// A transfer slower than this, measured over at least [`MIN_DATA_RATE_WINDOW`], is dropped
/// so a slow client cannot hold a connection slot forever.
pub const MIN_DATA_RATE_BYTES_PER_SEC: u64 = 1024;
/// The window over which the data rate is judged.
pub const MIN_DATA_RATE_WINDOW: Duration = Duration::from_secs(30);
/// How long a reply may wait for the client to read it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves one SMTP connection to the end. On an implicit-TLS listener the handshake runs
/// first, after admission, so refused connections cost no handshake.
pub async fn serve(shard: Rc<Shard>, mut stream: ConnStream, peer: SocketAddr, kind: ListenerKind) {
    let config = &shard.shared.config;
    let _open = shard.metrics.smtp.opened();
    let _slot = match shard.shared.smtp_limits.admit(peer.ip()) {
        Ok(slot) => slot,
        Err(refusal) => {
            tracing::info!(shard = shard.id, client = %peer.ip(), "refused: {refusal:?}");
            let reply = crate::smtp::connection_refused(&config.hostname);
            let _ = write_all(&mut stream, &reply, WRITE_TIMEOUT).await;
            return;
        }
    };
    if kind == ListenerKind::SmtpTls {
        let Some(tls) = &shard.shared.tls else {
            return;
        };
        stream = match stream.start_tls(tls).await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(shard = shard.id, client = %peer, "smtps handshake: {e}");
                return;
            }
        };
    }
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
            tls: stream.is_tls(),
            auth_required: matches!(kind, ListenerKind::Submission | ListenerKind::SmtpTls),
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
            Action::StartTls => {
                // The session refuses STARTTLS with input pending behind it and offers it only
                // with [tls]; the 220 is flushed above, so the handshake may start now.
                let Some(tls) = &shard.shared.tls else {
                    break "starttls without tls";
                };
                stream = match stream.start_tls(tls).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::debug!(shard = shard.id, client = %peer, "starttls handshake: {e}");
                        session.peer_closed();
                        break "tls handshake failed";
                    }
                };
                session.tls_started();
            }
            Action::Authenticate { user, password } => {
                let ok = login::verify(&shard, peer, "smtp", user, password).await;
                session.auth_checked(ok);
            }
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
                let between_transactions = !session.in_transaction();
                let read = future::or(
                    async {
                        Some(read_some(&mut stream, session.input_buffer(), idle_timeout).await)
                    },
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
                        session.shutting_down();
                        let _ = write_all(&mut stream, session.output(), WRITE_TIMEOUT).await;
                        break "shutdown";
                    }
                    Some(ReadOutcome::Data(n)) => n,
                    Some(ReadOutcome::Closed) => {
                        session.peer_closed();
                        break "peer closed";
                    }
                    Some(ReadOutcome::TimedOut) => {
                        session.timed_out();
                        let _ = write_all(&mut stream, session.output(), WRITE_TIMEOUT).await;
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
                    let (started, at_bytes) =
                        *body_started.get_or_insert((Instant::now(), received_bytes - n as u64));
                    let elapsed = started.elapsed();
                    if elapsed > MIN_DATA_RATE_WINDOW
                        && (received_bytes - at_bytes)
                            < MIN_DATA_RATE_BYTES_PER_SEC * elapsed.as_secs()
                    {
                        session.timed_out();
                        let _ = write_all(&mut stream, session.output(), WRITE_TIMEOUT).await;
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
