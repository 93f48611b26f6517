//! A shard: one pinned executor that owns its listeners' sockets, its connections, its log and
//! the indexes of the mailboxes it owns. The only place with sockets and timers.
//!
//! Start-up runs in two phases so that no client ever sees a half-built index: each shard first
//! recovers its log and sends every waiting message's index entry to the mailbox's owner; only
//! when every shard has done so does the main thread let them bind their listeners.

mod conn;
pub mod data_bytes;
mod inbox;
mod ingest;
pub mod ledger;
mod login;
pub mod mesh;
mod metrics_http;
mod pop3_conn;
mod recovery;
pub mod relay;
mod smtp_conn;
pub mod stream;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::{Gate, Semaphore};

use crate::auth::UserDirectory;
use crate::mailbox::MailboxIndex;
use crate::server::{ListenerKind, ListenerSpec, Shared};
use crate::store::{Store, StoreOptions};
use crate::throttle::FailureThrottle;
use ledger::Ledger;
pub use mesh::{Mesh, MeshMessage};

/// Everything a shard is started with.
pub struct ShardContext {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// Tells the main thread this shard's progress, or why it failed.
    pub events: mpsc::Sender<ShardEvent>,
    /// Fires once every shard has recovered: bind the listeners and serve.
    pub start: flume::Receiver<()>,
    /// Fires once, when the process is asked to stop.
    pub shutdown: flume::Receiver<()>,
    /// Senders to every shard's inbox.
    pub mesh: Mesh,
    /// This shard's inbox.
    pub inbox: flume::Receiver<MeshMessage>,
}

/// What the main thread hears from shards and the signal watcher.
#[derive(Debug)]
pub enum ShardEvent {
    /// The log is recovered and every index entry delivered to its owner.
    Recovered {
        shard: usize,
    },
    /// Listeners bound; serving.
    Ready {
        shard: usize,
    },
    Failed {
        shard: usize,
        message: String,
    },
    Signal(&'static str),
}

/// Why a shard stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("log {dir}: {source}")]
    Store {
        dir: String,
        #[source]
        source: crate::store::StoreError,
    },
    #[error("stopped before start-up finished")]
    Interrupted,
}

/// Listen backlog: room for a burst of connections while every shard is busy.
const LISTEN_BACKLOG: i32 = 4096;
/// How often a shard looks whether records died since its last space reclaim.
const RECLAIM_INTERVAL: Duration = Duration::from_secs(1);
/// The spare segment's zeros are written a piece at a time with this pause between pieces:
/// 64 pieces take about half a second, less than a segment takes to fill at 10 KiB × 12,000
/// msgs/s, and leave the disk to the group commits in between.
const SPARE_PIECE_PAUSE: Duration = Duration::from_millis(5);
/// How long a shard waits before trying again to prepare a spare segment that failed.
const SPARE_RETRY_INTERVAL: Duration = Duration::from_secs(10);

/// Per-shard state every connection task can reach.
pub struct Shard {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// Closed when the shard stops; sessions wait on it to leave between transactions.
    pub stopping: Rc<Semaphore>,
    /// This shard's log.
    pub store: Store,
    pub mesh: Mesh,
    /// Which recipients of this shard's stored messages are unfinished.
    pub ledger: RefCell<Ledger>,
    /// Indexes of the mailboxes this shard owns.
    pub mailboxes: RefCell<MailboxIndex>,
    /// Accounts for POP3 (and later SMTP AUTH); shared with the blocking pool that verifies.
    pub users: Arc<UserDirectory>,
    /// Repeated login failures per client address, slowed down.
    pub throttle: RefCell<FailureThrottle>,
    pub smtp_params: Rc<crate::smtp::SessionParams>,
    pub pop3_params: Rc<crate::pop3::SessionParams>,
    /// The relay queue of this shard's remote recipients, its resolver and connections.
    pub relay: relay::RelayState,
    /// Numbers POP3 sessions for the mailbox locks.
    next_session: Cell<u64>,
    /// statvfs is a system call: sample free space at most every [`FREE_SPACE_SAMPLE`].
    free_space: Cell<(Instant, u64)>,
    /// DATA bytes held by this shard's sessions and not yet durable, capped.
    pub data_bytes: data_bytes::DataBytes,
    /// This shard's counters; shard 0's scrape endpoint reads them without locks.
    pub metrics: Arc<crate::metrics::ShardMetrics>,
}

const FREE_SPACE_SAMPLE: Duration = Duration::from_millis(100);

impl Shard {
    /// The next connection on `listener`, or `None` once the shard is asked to stop. Accept
    /// errors (EMFILE and friends) are logged and retried after a short pause instead of
    /// spinning on them.
    pub async fn accept(&self, listener: &TcpListener, what: &str) -> Option<TcpStream> {
        loop {
            let accepted = future::or(async { Some(listener.accept().await) }, async {
                self.stopped().await;
                None
            })
            .await?;
            match accepted {
                Ok(stream) => return Some(stream),
                Err(e) => {
                    tracing::warn!(shard = self.id, "{what} accept failed: {e}");
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Resolves when the shard is asked to stop.
    pub async fn stopped(&self) {
        let _ = self.stopping.acquire(1).await;
    }

    pub fn next_session_serial(&self) -> u64 {
        let serial = self.next_session.get();
        self.next_session.set(serial + 1);
        serial
    }

    /// Free bytes on the log's file system, sampled.
    pub fn free_space_bytes(&self) -> u64 {
        let (sampled_at, bytes) = self.free_space.get();
        if sampled_at.elapsed() < FREE_SPACE_SAMPLE {
            return bytes;
        }
        let bytes = self.store.free_space_bytes();
        self.free_space.set((Instant::now(), bytes));
        bytes
    }
}

/// The shard's entry point, run inside its executor.
pub async fn run(ctx: ShardContext) {
    if let Err(e) = serve(ctx.id, &ctx).await {
        if !matches!(e, ShardError::Interrupted) {
            let _ = ctx.events.send(ShardEvent::Failed {
                shard: ctx.id,
                message: e.to_string(),
            });
        }
    }
}

async fn serve(id: usize, ctx: &ShardContext) -> Result<(), ShardError> {
    let shared = &ctx.shared;
    let config = &shared.config;
    let dir = config.data_dir.join(format!("shard-{id}"));
    let options = StoreOptions {
        // Every message the session accepts must fit one record, however much dot-stuffing
        // and however many recipients it carries, and so must every DSN; config validation
        // kept this within the store's hard limit.
        max_record_bytes: crate::envelope::log_record_limit(
            config.smtp.max_message_size,
            config.smtp.max_recipients,
        ),
        ..StoreOptions::default()
    };
    let (store, recovered) =
        Store::open(&dir, options)
            .await
            .map_err(|source| ShardError::Store {
                dir: dir.display().to_string(),
                source,
            })?;
    let report = recovered.report.clone();
    tracing::info!(
        shard = id,
        segments = report.segments,
        live_records = report.live_records,
        bytes_verified = report.bytes_verified,
        torn_tail_bytes = report.torn_tail_bytes,
        corrupt_regions = report.corrupt_regions,
        "log recovered in {:?}",
        report.elapsed
    );
    if report.corrupt_regions > 0 {
        tracing::error!(
            shard = id,
            "log has {} corrupt region(s) ({} bytes) that were skipped",
            report.corrupt_regions,
            report.corrupt_bytes
        );
    }

    let stopping = Rc::new(Semaphore::new(0));
    let shard = Rc::new(Shard {
        id,
        shared: Arc::clone(shared),
        stopping: Rc::clone(&stopping),
        store,
        mesh: ctx.mesh.clone(),
        ledger: RefCell::new(Ledger::default()),
        mailboxes: RefCell::new(MailboxIndex::default()),
        users: Arc::clone(&shared.users),
        throttle: RefCell::new(FailureThrottle::new(Default::default())),
        smtp_params: Rc::new(crate::smtp::SessionParams {
            hostname: config.hostname.clone(),
            max_message_size: config.smtp.max_message_size,
            max_recipients: config.smtp.max_recipients,
            directory: Rc::new(shared.directory.clone()),
            starttls_available: shared.tls.is_some(),
        }),
        pop3_params: Rc::new(crate::pop3::SessionParams {
            greeting_host: config.hostname.clone(),
            stls_available: shared.tls.is_some(),
        }),
        relay: relay::RelayState::new(config, &shared.relay),
        next_session: Cell::new(1),
        free_space: Cell::new((Instant::now() - FREE_SPACE_SAMPLE, 0)),
        data_bytes: data_bytes::DataBytes::new(data_bytes::data_bytes_cap(
            config.smtp.max_message_size,
        )),
        metrics: Arc::clone(&shared.metrics[id]),
    });

    let inbox = glommio::spawn_local(inbox::serve(Rc::clone(&shard), ctx.inbox.clone()));
    recovery::rebuild(&shard, recovered).await;
    let _ = ctx.events.send(ShardEvent::Recovered { shard: id });

    // Wait for every shard's index entries to have arrived before serving anybody.
    let started = future::or(async { ctx.start.recv_async().await.is_ok() }, async {
        let _ = ctx.shutdown.recv_async().await;
        false
    })
    .await;
    if !started {
        return Err(ShardError::Interrupted);
    }

    let mut listeners = Vec::new();
    for spec in &shared.listeners {
        listeners.push((*spec, bind(spec.addr)?));
    }
    let metrics_listener = match shared.metrics_addr.filter(|_| id == 0) {
        Some(addr) => Some(bind(addr)?),
        None => None,
    };
    let _ = ctx.events.send(ShardEvent::Ready { shard: id });

    let connections = Rc::new(Gate::new());
    let mut acceptors = Vec::new();
    for (spec, listener) in listeners {
        acceptors.push(glommio::spawn_local(accept_loop(
            Rc::clone(&shard),
            spec,
            listener,
            Rc::clone(&connections),
        )));
    }
    let reclaimer = glommio::spawn_local(reclaim_loop(Rc::clone(&shard)));
    // Dropped at shutdown: a half-made spare is removed at the next start.
    let spare_keeper = glommio::spawn_local(keep_spare_segment(Rc::clone(&shard)));
    if let Some(listener) = metrics_listener {
        let registry =
            crate::metrics::MetricsCollector::new(Arc::clone(&shared.metrics)).registry();
        let scrapes = metrics_http::serve(Rc::clone(&shard), listener, Rc::new(registry));
        glommio::spawn_local(scrapes).detach();
    }
    let relay_scheduler = glommio::spawn_local(relay::run_scheduler(Rc::clone(&shard)));

    let _ = ctx.shutdown.recv_async().await;
    stopping.close();
    for acceptor in acceptors {
        acceptor.await;
    }
    let grace = config.shutdown_grace;
    if glommio::timer::timeout(grace, async {
        let _ = connections.close().await;
        Ok(())
    })
    .await
    .is_err()
    {
        tracing::warn!(
            shard = id,
            "shutdown grace of {grace:?} ran out; closing the remaining connections"
        );
    }
    reclaimer.await;
    drop(spare_keeper);
    shard.relay.stop(grace).await;
    relay_scheduler.await;
    // Other shards may still send requests while they drain; the inbox task ends with the
    // executor. Everything acknowledged is already durable: 250 waits for fdatasync.
    drop(inbox);
    Ok(())
}

/// Binds one shard's socket for a listener: SO_REUSEPORT so every shard gets its own accept
/// queue and the kernel spreads connections across them.
fn bind(addr: SocketAddr) -> Result<TcpListener, ShardError> {
    let socket = listening_socket(addr)?;
    // SAFETY: the descriptor is a listening TCP socket whose ownership moves to the listener.
    Ok(unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) })
}

/// The listening socket behind [`bind`], before glommio takes it.
pub(crate) fn listening_socket(addr: SocketAddr) -> Result<socket2::Socket, ShardError> {
    use socket2::{Domain, Socket, Type};
    let listen_error = |source| ShardError::Listen { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(listen_error)?;
    socket.set_reuse_address(true).map_err(listen_error)?;
    socket.set_reuse_port(true).map_err(listen_error)?;
    // Accepted sockets inherit it: replies are whole writes, and Nagle would hold back a
    // reply behind an unacknowledged one. Set once here instead of once per connection.
    socket.set_nodelay(true).map_err(listen_error)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(listen_error)?;
    }
    socket.bind(&addr.into()).map_err(listen_error)?;
    socket.listen(LISTEN_BACKLOG).map_err(listen_error)?;
    Ok(socket)
}

async fn accept_loop(
    shard: Rc<Shard>,
    spec: ListenerSpec,
    listener: TcpListener,
    connections: Rc<Gate>,
) {
    while let Some(stream) = shard.accept(&listener, spec.kind.label()).await {
        let shard = Rc::clone(&shard);
        if connections
            .spawn(async move { serve_connection(shard, spec.kind, stream).await })
            .map(|task| task.detach())
            .is_err()
        {
            return;
        }
    }
}

async fn serve_connection(shard: Rc<Shard>, kind: ListenerKind, stream: TcpStream) {
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    let stream = stream::ConnStream::Plain(stream);
    match kind {
        ListenerKind::Smtp | ListenerKind::Submission | ListenerKind::SmtpTls => {
            smtp_conn::serve(shard, stream, peer, kind).await
        }
        ListenerKind::Pop3 | ListenerKind::Pop3Tls => {
            pop3_conn::serve(shard, stream, peer, kind).await
        }
    }
}

/// Keeps a zero-filled spare segment ready, so that a roll never waits for one to be made and
/// group commits never pay for the file system allocating log space (see `store::spare`).
async fn keep_spare_segment(shard: Rc<Shard>) {
    loop {
        shard.store.spare_wanted().await;
        let prepared = async {
            shard
                .store
                .prepare_spare(|| glommio::timer::sleep(SPARE_PIECE_PAUSE))
                .await?;
            shard.store.switch_to_spare_early().await
        };
        if let Err(e) = prepared.await {
            tracing::warn!(
                shard = shard.id,
                "could not prepare the next log segment ahead of time (rolls create it when \
                 needed): {e}"
            );
            glommio::timer::sleep(SPARE_RETRY_INTERVAL).await;
        }
    }
}

/// Frees the space of dead records soon after records die (and never when none did, so an
/// idle shard does no work).
async fn reclaim_loop(shard: Rc<Shard>) {
    let mut tombstones_seen = shard.store.stats().tombstones;
    loop {
        let stop = future::or(
            async {
                glommio::timer::sleep(RECLAIM_INTERVAL).await;
                false
            },
            async {
                shard.stopped().await;
                true
            },
        )
        .await;
        if stop {
            return;
        }
        let tombstones = shard.store.stats().tombstones;
        if tombstones == tombstones_seen {
            continue;
        }
        tombstones_seen = tombstones;
        match shard.store.reclaim().await {
            Ok(report) if report.bytes_freed > 0 => tracing::info!(
                shard = shard.id,
                segments_deleted = report.segments_deleted,
                segments_compacted = report.segments_compacted,
                records_copied = report.records_copied,
                bytes_freed = report.bytes_freed,
                "reclaimed log space"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(shard = shard.id, "space reclaim failed: {e}"),
        }
    }
}
