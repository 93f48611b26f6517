//! The SMTP connection loop: socket I/O, timers and the log around the sans-IO session.
//!
//! The loop reads straight into the session's input buffer, lets it process everything
//! buffered (PIPELINING), writes all replies in one write, and performs the actions it asks
//! for. DATA bytes travel from the socket into buffers that end up, unchanged and uncopied,
//! in the log append (BDAT bodies are copied once, while they are dot-stuffed).

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::future;

use super::conn::{read_some, write_all, IdleClock, ReadOutcome};
use super::stream::ConnStream;
use super::{ingest, login, Shard};
use crate::server::ListenerKind;
use crate::smtp::{Action, PeerInfo, Session};

/// A transfer slower than this, measured over at least [`MIN_DATA_RATE_WINDOW`], is dropped
/// so a slow client cannot hold a connection slot forever.
pub const MIN_DATA_RATE_BYTES_PER_SEC: u64 = 1024;
/// The window over which the data rate is judged, or the idle timeout where that is shorter:
/// an operator who wants silent clients gone sooner wants trickling ones gone sooner too.
pub const MIN_DATA_RATE_WINDOW: Duration = Duration::from_secs(30);
/// How long a reply may wait for the client to read it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves one SMTP connection to the end. On an implicit-TLS listener the handshake runs
/// first, after admission, so refused connections cost no handshake: such a client cannot
/// read a plain-text `421`, so it gets none and is closed, which it takes as a temporary
/// failure all the same.
pub async fn serve(shard: Rc<Shard>, mut stream: ConnStream, peer: SocketAddr, kind: ListenerKind) {
    let config = &shard.shared.config;
    let _open = shard.metrics.smtp.opened();
    let _slot = match shard.shared.smtp_limits.admit(peer.ip()) {
        Ok(slot) => slot,
        Err(refusal) => {
            tracing::info!(shard = shard.id, client = %peer.ip(), "refused: {refusal:?}");
            if kind != ListenerKind::SmtpTls {
                let reply = crate::smtp::connection_refused(&config.hostname);
                let _ = write_all(&mut stream, &reply, WRITE_TIMEOUT).await;
            }
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
    let rate_window = MIN_DATA_RATE_WINDOW.min(idle_timeout);
    // Counts the body bytes this session holds until they are durable or dropped; its drop
    // gives them back however the connection ends.
    let mut hold = shard.data_bytes.hold();
    let mut rate: Option<RateClock> = None;
    let mut received_bytes = 0u64;
    // Outside a body; a body is judged by the minimum data rate instead.
    let mut idle = IdleClock::start(idle_timeout);

    let outcome: &str = loop {
        if !session.output().is_empty() {
            shard.metrics.count_smtp_replies(session.output());
            match write_all(&mut stream, session.output(), WRITE_TIMEOUT).await {
                Ok(()) => {
                    let n = session.output().len();
                    shard.metrics.smtp.sent(n);
                    session.output_consumed(n);
                    idle.restart();
                }
                Err(_) => break "write failed",
            }
        }
        // Before poll_action: a finished message still counts while the store makes it
        // durable, and is only given back here, on the turn after message_stored. A body
        // being thrown away holds nothing and gives up its place in line.
        hold.update(
            session.buffered_body_bytes(),
            session.next_read_may_hold_body(),
        );
        match session.poll_action() {
            Action::StoreMessage(transaction) => {
                // The next body, pipelined behind this one, starts its own clock.
                rate = None;
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
                idle.restart();
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
                // Only a read that may bring body bytes to keep waits for the shard's
                // DATA-bytes cap (see `data_bytes`); commands and a body being thrown away are
                // always read, so a full shard still serves everyone else. The wait is the
                // server's doing: no idle timeout runs and the data-rate clock stops, but a
                // stopping shard ends it.
                if session.next_read_may_hold_body() && !hold.may_read() {
                    let waiting_since = Instant::now();
                    let stopped = future::or(
                        async {
                            hold.room().await;
                            false
                        },
                        async {
                            shard.stopped().await;
                            true
                        },
                    )
                    .await;
                    if stopped {
                        session.shutting_down();
                        let _ = write_all(&mut stream, session.output(), WRITE_TIMEOUT).await;
                        break "shutdown while held back by the data cap";
                    }
                    if let Some(clock) = &mut rate {
                        clock.pause(waiting_since.elapsed());
                    }
                }
                let between_transactions = !session.in_transaction();
                // Each read of a body only has to bring something within the idle timeout.
                let read_timeout = if session.in_body_transfer() {
                    idle_timeout
                } else {
                    idle.remaining()
                };
                let read = future::or(
                    async {
                        Some(read_some(&mut stream, session.input_buffer(), read_timeout).await)
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
                // The clock runs over the whole body: for BDAT from the first chunk to the
                // end of the last, not chunk by chunk, or tiny chunks would dodge it.
                if session.in_body_transfer() {
                    let clock = rate.get_or_insert_with(|| {
                        RateClock::start(Instant::now(), received_bytes - n as u64, rate_window)
                    });
                    if clock.too_slow(Instant::now(), received_bytes) {
                        session.timed_out();
                        let _ = write_all(&mut stream, session.output(), WRITE_TIMEOUT).await;
                        break "too slow";
                    }
                } else {
                    rate = None;
                }
            }
        }
    };
    tracing::debug!(shard = shard.id, client = %peer, "smtp connection ended: {outcome}");
}

/// Judges a body transfer against [`MIN_DATA_RATE_BYTES_PER_SEC`].
#[derive(Debug, Clone, Copy)]
struct RateClock {
    /// When the transfer started, moved later by time the server held the session back.
    started: Instant,
    /// Bytes received on the connection before the transfer.
    bytes_before: u64,
    window: Duration,
}

impl RateClock {
    fn start(now: Instant, bytes_before: u64, window: Duration) -> RateClock {
        RateClock {
            started: now,
            bytes_before,
            window,
        }
    }

    /// Time the server spent not reading is not the client's.
    fn pause(&mut self, held_back: Duration) {
        self.started += held_back;
    }

    /// Whether the client, with `received_bytes` received on the connection so far, is
    /// slower than the minimum rate over a long enough stretch.
    fn too_slow(&self, now: Instant, received_bytes: u64) -> bool {
        let elapsed = now.saturating_duration_since(self.started);
        elapsed > self.window
            && received_bytes - self.bytes_before < MIN_DATA_RATE_BYTES_PER_SEC * elapsed.as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_judged_only_after_the_window() {
        let t0 = Instant::now();
        let clock = RateClock::start(t0, 100, MIN_DATA_RATE_WINDOW);
        assert!(!clock.too_slow(t0 + Duration::from_secs(29), 110));
        assert!(clock.too_slow(t0 + Duration::from_secs(31), 110));
        assert!(!clock.too_slow(t0 + Duration::from_secs(31), 100 + 31 * 1024));
    }

    #[test]
    fn time_held_back_by_the_server_is_not_counted() {
        let t0 = Instant::now();
        let mut clock = RateClock::start(t0, 0, Duration::from_secs(2));
        assert!(clock.too_slow(t0 + Duration::from_secs(10), 5_000));
        clock.pause(Duration::from_secs(8));
        assert!(!clock.too_slow(t0 + Duration::from_secs(10), 5_000));
    }
}
