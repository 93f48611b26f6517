//! The shard's relay queue: remote recipients of the messages this shard stored, delivered to
//! their domains' MX hosts by the pure pieces in [`crate::relay`].
//!
//! - [`queue`]: jobs ordered by next attempt, grouping and connection counts (pure).
//! - the scheduler ([`run_scheduler`]): moves due jobs into per-domain ready lists and opens
//!   connections for them, within `max_connections_per_domain` across the process
//!   ([`slots`]).
//! - [`deliver`]: one connection: resolve, pick the next hop, drive the SMTP client, send
//!   the stored bytes from the memory map; it takes message after message from its domain's
//!   ready list, so a busy domain's mail shares connections.
//! - [`outcome`]: what an attempt decided, made durable before it counts: delivered and
//!   bounced recipients get outcome records (a bounce first stores its DSN), deferred ones a
//!   deferral record and a place back in the queue.

pub mod deliver;
pub mod outcome;
pub mod queue;
pub mod slots;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_lite::future;
use glommio::sync::Gate;

use super::Shard;
use crate::config::{Config, Resolver as ResolverSetting};
use crate::envelope::{self, DeferralRecord, Envelope, MessageLayout};
use crate::relay::dns::{nameservers_from_setting, Resolver, ResolverConfig};
use crate::relay::nexthop::{parse_smarthost, NextHopPolicy};
use crate::relay::retry::RetryPolicy;
use crate::server::{ListenerKind, ListenerSpec};
use crate::store::{RecordId, RecoveredRecord};
use queue::{Job, RelayQueue};
use slots::DomainConnectionLimits;

/// Longest the scheduler sleeps with nothing due; it is woken early whenever a job is queued.
const SCHEDULER_IDLE_WAKE_MS: u64 = 1_000;
/// How soon the scheduler looks again at a domain whose mail waits while every one of its
/// process-wide connection slots is held by other shards.
const SLOT_RETRY_MS: u64 = 20;

/// Relay settings resolved once on the main thread at start-up (reading resolv.conf and the
/// interface list are blocking calls, forbidden inside a shard), shared by every shard.
#[derive(Debug)]
pub struct RelayShared {
    /// Nameservers every shard's resolver asks (`relay.resolver`).
    pub nameservers: Vec<SocketAddr>,
    /// Our hostname, listeners, addresses and smarthost: what next-hop selection needs.
    pub policy: NextHopPolicy,
    /// Open relay connections per domain, across every shard.
    pub connections: Arc<DomainConnectionLimits>,
    /// Opportunistic STARTTLS towards MX hosts (RFC 7435: any certificate is accepted, so an
    /// MX with a self-signed or mismatched one still gets encrypted mail rather than plain).
    pub tls: Arc<rustls::ClientConfig>,
}

impl RelayShared {
    /// Resolves the relay settings; `listeners` are the bound addresses (loop detection).
    /// An unreadable resolv.conf is logged, not fatal: relaying then defers until fixed.
    pub fn from_config(config: &Config, listeners: &[ListenerSpec]) -> Result<Self, String> {
        let nameservers = match &config.relay.resolver {
            ResolverSetting::Server(addr) => vec![*addr],
            ResolverSetting::System => nameservers_from_setting("system").unwrap_or_else(|e| {
                tracing::warn!("{e}; relayed mail will be deferred");
                Vec::new()
            }),
        };
        let smarthost = parse_smarthost(config.relay.smarthost.as_deref().unwrap_or(""))?;
        let own_listeners = listeners
            .iter()
            .filter(|l| {
                matches!(
                    l.kind,
                    ListenerKind::Smtp | ListenerKind::Submission | ListenerKind::SmtpTls
                )
            })
            .map(|l| l.addr)
            .collect();
        Ok(RelayShared {
            nameservers,
            policy: NextHopPolicy {
                hostname: config.hostname.clone(),
                relay_port: config.relay.port,
                smarthost,
                own_listeners,
                own_addresses: interface_addresses(),
            },
            connections: DomainConnectionLimits::new(config.relay.max_connections_per_domain),
            tls: crate::tls::client_config(crate::tls::CertificatePolicy::Unverified)
                .map_err(|e| format!("outbound TLS configuration: {e}"))?,
        })
    }
}

/// The addresses of this host's interfaces (getifaddrs), for loop detection behind a
/// wildcard listener. Main thread only.
fn interface_addresses() -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we only read and then free once.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return addresses;
        }
        let mut entry = list;
        while !entry.is_null() {
            let address = (*entry).ifa_addr;
            if !address.is_null() {
                match i32::from((*address).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*(address as *const libc::sockaddr_in);
                        addresses
                            .push(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*(address as *const libc::sockaddr_in6);
                        addresses.push(IpAddr::from(v6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    addresses
}

/// The ready list of one domain: due jobs waiting for a connection to take them.
struct DomainReady {
    sender: flume::Sender<Job>,
    receiver: flume::Receiver<Job>,
    /// This shard's connections working on the domain.
    open: usize,
}

/// A shard's relay state.
pub struct RelayState {
    /// Jobs waiting for their time.
    queue: RefCell<RelayQueue>,
    /// Due jobs by domain, waiting for a connection.
    ready: RefCell<HashMap<String, DomainReady>>,
    /// Wakes the scheduler: a job was queued or a connection ended.
    wake: (flume::Sender<()>, flume::Receiver<()>),
    /// This shard's resolver and DNS cache.
    pub resolver: Rc<Resolver>,
    /// `retry_schedule_secs` and `max_queue_lifetime_secs`.
    pub retry: RetryPolicy,
    /// Connection tasks, so that a stop waits for the message in flight.
    connections: Gate,
    /// Set when the shard stops: connections finish their message and quit.
    stopping: Cell<bool>,
}

impl RelayState {
    /// The relay state of a shard started with `config` and `shared`.
    pub fn new(config: &Config, shared: &RelayShared) -> Self {
        RelayState {
            queue: RefCell::new(RelayQueue::default()),
            ready: RefCell::new(HashMap::new()),
            wake: flume::bounded(1),
            resolver: Resolver::new(ResolverConfig::new(shared.nameservers.clone())),
            retry: RetryPolicy {
                schedule_secs: config
                    .relay
                    .retry_schedule
                    .iter()
                    .map(Duration::as_secs_f64)
                    .collect(),
                max_queue_lifetime_secs: config.relay.max_queue_lifetime.as_secs_f64(),
            },
            connections: Gate::new(),
            stopping: Cell::new(false),
        }
    }

    /// Queues `job` for `due_ms` and wakes the scheduler.
    pub fn enqueue(&self, job: Job, due_ms: u64) {
        self.queue.borrow_mut().push(job, due_ms);
        self.wake();
    }

    /// Jobs waiting for their time (not counting those ready or in flight).
    pub fn queued(&self) -> usize {
        self.queue.borrow().len()
    }

    fn wake(&self) {
        let _ = self.wake.0.try_send(());
    }

    /// Whether the shard is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.get()
    }

    /// This shard's connections working on `domain`.
    pub fn open_connections(&self, domain: &str) -> usize {
        self.ready.borrow().get(domain).map_or(0, |d| d.open)
    }

    /// A connection to `domain` ended.
    fn connection_ended(&self, domain: &str) {
        if let Some(ready) = self.ready.borrow_mut().get_mut(domain) {
            ready.open = ready.open.saturating_sub(1);
        }
        self.wake();
    }

    /// Tells connections to finish and waits for them, at most `grace`.
    pub async fn stop(&self, grace: Duration) {
        self.stopping.set(true);
        self.wake();
        let closed = glommio::timer::timeout(grace, async {
            let _ = self.connections.close().await;
            Ok(())
        })
        .await;
        if closed.is_err() {
            tracing::warn!("relay connections still busy after {grace:?}; dropping them");
        }
    }
}

/// Unix time in milliseconds: the queue's clock (deferral records store it, so schedules
/// survive restarts).
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Queues the relayed recipients of a message just made durable: due now.
pub fn queue_new_message(shard: &Shard, message: RecordId, envelope: &Envelope) {
    let now = unix_now_ms();
    for job in queue::jobs_for_message(message, envelope, |_| true) {
        shard.relay.enqueue(job, now);
    }
}

/// Queues the unfinished relayed recipients found at recovery: due at their latest
/// deferral's next attempt, or now when never tried. Call after the ledger is rebuilt.
pub fn queue_recovered(
    shard: &Shard,
    records: &[RecoveredRecord],
    messages: &[(RecordId, MessageLayout)],
) {
    let mut deferrals: HashMap<u64, Vec<DeferralRecord>> = HashMap::new();
    for record in records {
        if record.kind == envelope::kind::DEFERRAL {
            if let Ok(deferral) = DeferralRecord::decode(&record.record) {
                deferrals
                    .entry(deferral.message)
                    .or_default()
                    .push(deferral);
            }
        }
    }
    let now = unix_now_ms();
    let mut queued = 0usize;
    for (id, layout) in messages {
        let latest = queue::latest_deferrals(deferrals.get(&id.0).into_iter().flatten());
        let ledger = shard.ledger.borrow();
        let jobs = queue::recovered_jobs(
            *id,
            &layout.envelope,
            |index| ledger.is_pending(*id, index),
            &latest,
            now,
        );
        drop(ledger);
        for (job, due_ms) in jobs {
            queued += job.recipients.len();
            shard.relay.enqueue(job, due_ms);
        }
    }
    if queued > 0 {
        tracing::info!(shard = shard.id, recipients = queued, "relay queue rebuilt");
    }
}

/// The shard's relay scheduler: runs until the shard stops.
pub async fn run_scheduler(shard: Rc<Shard>) {
    let relay = &shard.relay;
    loop {
        if relay.is_stopping() {
            return;
        }
        let now = unix_now_ms();
        loop {
            let Some(job) = relay.queue.borrow_mut().pop_due(now) else {
                break;
            };
            if now >= expiry_ms(relay, &job) {
                let shard = Rc::clone(&shard);
                glommio::spawn_local(async move { outcome::expire(&shard, job).await }).detach();
                continue;
            }
            let mut ready = relay.ready.borrow_mut();
            let domain = ready.entry(job.domain.clone()).or_insert_with(|| {
                let (sender, receiver) = flume::unbounded();
                DomainReady {
                    sender,
                    receiver,
                    open: 0,
                }
            });
            let _ = domain.sender.send(job);
        }
        let starved = open_connections(&shard);
        let max_wait_ms = if starved {
            SLOT_RETRY_MS
        } else {
            SCHEDULER_IDLE_WAKE_MS
        };
        let wait_ms = queue::sleep_ms(&relay.queue.borrow(), now, max_wait_ms);
        future::or(
            glommio::timer::sleep(Duration::from_millis(wait_ms)),
            async {
                let _ = relay.wake.1.recv_async().await;
            },
        )
        .await;
    }
}

/// When a job's recipients have been queued for `max_queue_lifetime_secs`.
fn expiry_ms(relay: &RelayState, job: &Job) -> u64 {
    let lifetime_ms = (relay.retry.max_queue_lifetime_secs * 1000.0).max(0.0);
    job.first_attempt_ms.saturating_add(lifetime_ms as u64)
}

/// Opens the connections the ready lists deserve. Returns true when some domain's mail waits
/// with no connection of ours because other shards hold every slot (look again soon).
fn open_connections(shard: &Rc<Shard>) -> bool {
    let relay = &shard.relay;
    let limits = &shard.shared.relay.connections;
    let mut starved = false;
    let mut ready = relay.ready.borrow_mut();
    ready.retain(|_, domain| domain.open > 0 || !domain.receiver.is_empty());
    for (name, domain) in ready.iter_mut() {
        let wanted = queue::connections_to_open(domain.receiver.len(), domain.open, limits.cap());
        for _ in 0..wanted {
            let Some(slot) = limits.try_acquire(name) else {
                starved |= domain.open == 0;
                break;
            };
            domain.open += 1;
            let task_shard = Rc::clone(shard);
            let name = name.clone();
            let jobs = domain.receiver.clone();
            let spawned = relay.connections.spawn(async move {
                deliver::run_connection(&task_shard, &name, jobs).await;
                drop(slot);
                task_shard.relay.connection_ended(&name);
            });
            match spawned {
                Ok(task) => {
                    task.detach();
                }
                // The gate is closed: the shard is stopping.
                Err(_) => {
                    domain.open -= 1;
                    return false;
                }
            }
        }
    }
    starved
}
