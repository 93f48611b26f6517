//! One relay connection: find where a domain's mail goes, connect to the first hop that
//! answers, then send message after message from the domain's ready list over that one
//! session, each straight from the log's memory map.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::net::TcpStream;

use super::outcome;
use super::queue::{Job, MESSAGES_PER_CONNECTION};
use super::Shard;
use crate::envelope;
use crate::relay::client::{
    body_pieces, contains_8bit, data_terminator, ClientAction, OutgoingMessage, RecipientOutcome,
    Reply, ReplyClass, SmtpClient,
};
use crate::relay::nexthop::{
    address_literal_route, hop_targets, route_for_domain, smarthost_route, HopTargets, Route,
};
use crate::shard::conn::{read_some, write_all, write_all_vectored, ReadOutcome};
use crate::shard::stream::OutboundStream;

/// How long an idle connection waits for more mail for its domain before QUIT: mail that
/// trickles in (one client sending message after message) still shares a connection.
const IDLE_LINGER: Duration = Duration::from_millis(1_000);
/// Longest wait for the server to take bytes we write (RFC 5321 §4.5.3.2.5: 3 minutes
/// per data block).
const WRITE_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest wait for the answer to QUIT: the mail is settled by then, so a server slow to
/// say goodbye must not hold a connection slot for the RFC's five minutes.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reply bytes read per read call.
const READ_BUFFER_BYTES: usize = 4096;

/// Runs one connection for `domain`, taking jobs from `jobs` until none come for
/// `IDLE_LINGER`, `MESSAGES_PER_CONNECTION` were sent, the session broke or the shard stops.
pub async fn run_connection(shard: &Rc<Shard>, domain: &str, jobs: flume::Receiver<Job>) {
    let Ok(first) = jobs.try_recv() else {
        return;
    };
    let mut session = match open_session(shard, domain).await {
        Ok(session) => session,
        Err(reply) => {
            let mut failed = vec![first];
            // The same answer holds for everything waiting for the domain, unless another
            // connection of ours got through and can take it.
            if reply.class() == ReplyClass::Permanent || shard.relay.open_connections(domain) <= 1 {
                failed.extend(jobs.try_iter());
            }
            for job in failed {
                fail_job(shard, &job, &reply).await;
            }
            return;
        }
    };
    let mut next = Some(first);
    let mut sent = 0usize;
    // The previous message's outcomes are made durable while the next one is sent: the log's
    // fdatasync overlaps the network round trips. At most one settles at a time per
    // connection, and the connection ends only once it is done.
    let mut settling: Option<glommio::Task<()>> = None;
    while let Some(job) = next.take() {
        let results = session.deliver(shard, &job).await;
        if let Some(previous) = settling.take() {
            previous.await;
        }
        if !results.is_empty() {
            let task_shard = Rc::clone(shard);
            let remote = session.remote.clone();
            settling = Some(glommio::spawn_local(async move {
                outcome::settle(&task_shard, &job, results, Some(&remote)).await;
            }));
        }
        sent += 1;
        let alive = session.client.is_ready();
        if !alive || sent >= MESSAGES_PER_CONNECTION || shard.relay.is_stopping() {
            break;
        }
        next = next_job(shard, &jobs).await;
    }
    session.quit().await;
    if let Some(previous) = settling {
        previous.await;
    }
}

/// The next job for this connection, waiting up to [`IDLE_LINGER`] for one.
async fn next_job(shard: &Rc<Shard>, jobs: &flume::Receiver<Job>) -> Option<Job> {
    if let Ok(job) = jobs.try_recv() {
        return Some(job);
    }
    let waited = glommio::timer::timeout(IDLE_LINGER, async {
        jobs.recv_async()
            .await
            .map_err(|e| glommio::GlommioError::IoError(std::io::Error::other(e)))
    })
    .await;
    match waited {
        Ok(job) if !shard.relay.is_stopping() => Some(job),
        // Taken but the shard is stopping: the log still holds it for the next start.
        _ => None,
    }
}

/// Every recipient of `job` gets `reply`'s verdict: bounced for 5xx, deferred otherwise.
async fn fail_job(shard: &Rc<Shard>, job: &Job, reply: &Reply) {
    let outcome = match reply.class() {
        ReplyClass::Permanent => RecipientOutcome::Bounced(reply.clone()),
        _ => RecipientOutcome::Deferred(reply.clone()),
    };
    let results = job
        .recipients
        .iter()
        .map(|&r| (r, outcome.clone()))
        .collect();
    outcome::settle(shard, job, results, None).await;
}

/// Resolves `domain`'s route and connects to its first hop that greets us; the error is the
/// reply that decides the waiting mail's fate (5xx bounces, anything else defers).
async fn open_session(shard: &Rc<Shard>, domain: &str) -> Result<Session, Reply> {
    let policy = &shard.shared.relay.policy;
    let resolver = &shard.relay.resolver;
    let route = match smarthost_route(policy).or_else(|| address_literal_route(domain, policy)) {
        Some(route) => route,
        None => match resolver.resolve_mx(domain).await {
            Ok(mx) => route_for_domain(domain, &mx, policy, &mut rand::thread_rng()),
            Err(e) if e.is_permanent() => {
                return Err(Reply::local(550, format!("5.1.2 {e}")));
            }
            Err(e) => {
                return Err(Reply::local(
                    451,
                    format!("4.4.3 MX lookup for {domain} failed: {e}"),
                ))
            }
        },
    };
    let hops = match route {
        Route::Bounce(reply) => return Err(reply),
        Route::Hops(hops) => hops,
    };
    let mut failures = HostFailures::new(domain);
    for hop in hops {
        let addrs = match hop.literal_ip() {
            Some(ip) => vec![ip],
            None => match resolver.resolve_addrs(&hop.host).await {
                Ok(addrs) => addrs,
                Err(e) => {
                    failures.note(Reply::local(451, format!("4.4.3 {}: {e}", hop.host)));
                    continue;
                }
            },
        };
        match hop_targets(&hop, &addrs, policy) {
            HopTargets::Connect(targets) => {
                for target in targets {
                    match Session::connect(shard, target, &hop.host).await {
                        Ok(session) => return Ok(session),
                        Err(reply) => {
                            tracing::info!(
                                shard = shard.id,
                                domain,
                                host = hop.host,
                                %target,
                                "relay host failed: {reply}"
                            );
                            failures.note(reply);
                        }
                    }
                }
            }
            HopTargets::Loop(reply) => return Err(reply),
            HopTargets::NoAddress(reply) => failures.note(reply),
        }
    }
    Err(failures.verdict())
}

/// The failures of a domain's hosts, tried in turn, and what they decide for its mail.
struct HostFailures {
    last: Reply,
    last_transient: Option<Reply>,
}

impl HostFailures {
    fn new(domain: &str) -> HostFailures {
        HostFailures {
            last: Reply::local(451, format!("4.4.1 no mail host for {domain} answered")),
            last_transient: None,
        }
    }

    fn note(&mut self, reply: Reply) {
        if reply.code < 500 {
            self.last_transient = Some(reply.clone());
        }
        self.last = reply;
    }

    /// A 5xx greeting is a host's word, but mail bounces only when every host gave one: one
    /// that failed for now (a refused connection, a timeout, a 4xx) may take it later. The
    /// order the hosts were tried in does not decide.
    fn verdict(self) -> Reply {
        self.last_transient.unwrap_or(self.last)
    }
}

/// An SMTP session with one relay host.
struct Session {
    stream: OutboundStream,
    client: SmtpClient,
    buffer: Vec<u8>,
    /// Host name and address, for logs and the DSN's Remote-MTA.
    remote: String,
    /// Why the session ended, when it failed.
    failure: Option<Reply>,
}

/// What driving the client up to its next resting point produced.
struct Driven {
    /// The outcomes of the message in flight, if it finished.
    outcomes: Option<Vec<RecipientOutcome>>,
    /// The MX accepted STARTTLS: the handshake must run before anything else is read.
    start_tls: bool,
}

impl Session {
    /// Connects and exchanges greeting and EHLO; the error says why this host failed.
    async fn connect(shard: &Rc<Shard>, target: SocketAddr, host: &str) -> Result<Session, Reply> {
        let hostname = &shard.shared.config.hostname;
        let stream = Self::dial(shard, target, host).await?;
        let mut session = Session {
            stream: OutboundStream::Plain(stream),
            client: SmtpClient::opportunistic_tls(hostname),
            buffer: vec![0; READ_BUFFER_BYTES],
            remote: format!("{host} [{}]", target.ip()),
            failure: None,
        };
        while session.drive(None).await.start_tls {
            // STARTTLS comes before any message is handed to the client, so a failed
            // handshake costs a reconnect in plain text, never a recipient outcome.
            let Session {
                stream,
                client,
                buffer,
                remote,
                failure,
            } = session;
            let tls = Arc::clone(&shard.shared.relay.tls);
            session = match stream.start_tls(tls, host).await {
                Ok(encrypted) => {
                    let mut session = Session {
                        stream: encrypted,
                        client,
                        buffer,
                        remote,
                        failure,
                    };
                    session.client.tls_established();
                    session
                }
                Err(e) => {
                    tracing::info!(
                        shard = shard.id,
                        remote,
                        "STARTTLS handshake failed ({e}); retrying in plain text"
                    );
                    Session {
                        stream: OutboundStream::Plain(Self::dial(shard, target, host).await?),
                        client: SmtpClient::after_tls_failure(hostname, &e.to_string()),
                        buffer,
                        remote,
                        failure: None,
                    }
                }
            };
        }
        if session.client.is_ready() {
            tracing::debug!(shard = shard.id, remote = session.remote, tls = ?session.client.tls_status(), "relay session ready");
            Ok(session)
        } else {
            Err(session
                .failure
                .unwrap_or_else(|| Reply::local(451, "4.4.2 session ended at greeting")))
        }
    }

    async fn dial(shard: &Rc<Shard>, target: SocketAddr, host: &str) -> Result<TcpStream, Reply> {
        let timeout = shard.shared.config.relay.connect_timeout;
        let stream = TcpStream::connect_timeout(target, timeout.max(Duration::from_millis(1)))
            .await
            .map_err(|e| Reply::local(451, format!("4.4.1 connect to {host} [{target}]: {e}")))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Sends one job's message; returns each attempted recipient with its outcome (nothing
    /// when no recipient was left to try). Whether the session can go on is
    /// [`SmtpClient::is_ready`].
    async fn deliver(&mut self, shard: &Rc<Shard>, job: &Job) -> Vec<(u16, RecipientOutcome)> {
        let pending: Vec<u16> = {
            let ledger = shard.ledger.borrow();
            job.recipients
                .iter()
                .copied()
                .filter(|r| ledger.is_pending(job.message, *r))
                .collect()
        };
        if pending.is_empty() {
            return Vec::new();
        }
        let record = match shard.store.read(job.message) {
            Ok(record) => record,
            Err(e) => {
                tracing::error!(shard = shard.id, "relayed message unreadable: {e}");
                return Vec::new();
            }
        };
        let layout = match envelope::decode_message(&record) {
            Ok(layout) => layout,
            Err(e) => {
                tracing::error!(shard = shard.id, "relayed message undecodable: {e}");
                return Vec::new();
            }
        };
        let addresses: Vec<String> = pending
            .iter()
            .filter_map(|&r| layout.envelope.recipients.get(usize::from(r)))
            .map(|r| r.address.clone())
            .collect();
        if addresses.len() != pending.len() {
            tracing::error!(
                shard = shard.id,
                "relay job names recipients the message lacks"
            );
            return Vec::new();
        }
        // Sent from the memory map as stored: the Received: header and the body lie together.
        record.prefetch();
        let stored = &record[layout.stored_message()];
        let message = OutgoingMessage {
            sender: &layout.envelope.mail_from,
            recipients: &addresses,
            size_bytes: stored.len() as u64,
            needs_8bitmime: layout.envelope.eight_bit || contains_8bit(stored),
            needs_smtputf8: layout.envelope.smtputf8,
        };
        let outcomes = match self.client.send_message(&message) {
            Ok(()) => self.drive(Some(stored)).await.outcomes,
            Err(_) => None,
        };
        let outcomes = outcomes.unwrap_or_else(|| {
            let reply = self
                .failure
                .clone()
                .unwrap_or_else(|| Reply::local(451, "4.4.2 session lost"));
            vec![RecipientOutcome::Deferred(reply); pending.len()]
        });
        pending.into_iter().zip(outcomes).collect()
    }

    /// Ends the session politely (if it is still open).
    async fn quit(mut self) {
        if self.client.is_ready() {
            self.client.quit();
            let _ = glommio::timer::timeout(QUIT_TIMEOUT, async {
                self.drive(None).await;
                Ok(())
            })
            .await;
        }
    }

    /// Does what the client asks until it rests: ready for a message, or closed.
    async fn drive(&mut self, body: Option<&[u8]>) -> Driven {
        let mut driven = Driven {
            outcomes: None,
            start_tls: false,
        };
        loop {
            match self.client.poll_action() {
                Some(ClientAction::Send(bytes)) => {
                    if let Err(e) = write_all(&mut self.stream, &bytes, WRITE_TIMEOUT).await {
                        self.broken(e);
                    }
                }
                Some(ClientAction::SendBody) => {
                    // The stored bytes (folded where a line is too long) and the terminator,
                    // straight from the log's map, in one sendmsg.
                    let body = body.unwrap_or_default();
                    let tail = &body[body.len().saturating_sub(2)..];
                    let pieces: Vec<&[u8]> =
                        body_pieces(body).chain([data_terminator(tail)]).collect();
                    if let Err(e) =
                        write_all_vectored(&mut self.stream, &pieces, WRITE_TIMEOUT).await
                    {
                        self.broken(e);
                    }
                }
                Some(ClientAction::Ready) => {
                    if self.client.is_ready() {
                        return driven;
                    }
                }
                Some(ClientAction::MessageDone(outcomes)) => driven.outcomes = Some(outcomes),
                Some(ClientAction::Failed(reply)) => self.failure = Some(reply),
                Some(ClientAction::Close) => {}
                Some(ClientAction::StartTls) => {
                    driven.start_tls = true;
                    return driven;
                }
                None => {
                    if self.client.is_closed() {
                        return driven;
                    }
                    let Some(timeout) = self.client.reply_timeout() else {
                        return driven;
                    };
                    match read_some(&mut self.stream, &mut self.buffer, timeout).await {
                        ReadOutcome::Data(n) => self.client.received(&self.buffer[..n]),
                        ReadOutcome::Closed | ReadOutcome::Failed(_) => {
                            self.client.connection_closed()
                        }
                        ReadOutcome::TimedOut => self.client.timed_out(),
                    }
                }
            }
        }
    }

    fn broken(&mut self, error: std::io::Error) {
        tracing::debug!(remote = self.remote, "relay write failed: {error}");
        self.client.connection_closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_bounces_only_when_every_host_refused_it_for_good() {
        let refused = Reply::local(554, "5.3.0 no service here");
        let later = Reply::local(421, "4.4.2 timed out");
        for order in [[&refused, &later], [&later, &refused]] {
            let mut failures = HostFailures::new("far.test");
            for reply in order {
                failures.note(reply.clone());
            }
            assert_eq!(failures.verdict(), later);
        }
        let mut failures = HostFailures::new("far.test");
        failures.note(refused.clone());
        failures.note(refused.clone());
        assert_eq!(failures.verdict(), refused);
        assert_eq!(HostFailures::new("far.test").verdict().code, 451);
    }
}
