//! Starting the shards, holding the instance lock, signals and the graceful drain.
//!
//! Everything here runs on the main thread, before and around the shard executors: it is the
//! only place allowed to use blocking calls (`std::fs`, `std::net`, waiting on threads).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use glommio::{LocalExecutorBuilder, Placement};

use crate::auth::UserDirectory;
use crate::config::Config;
use crate::host::{self, HostError};
use crate::limits::ConnectionLimits;
use crate::metrics::ShardMetrics;
use crate::routing::Directory;
use crate::shard::{self, ShardContext, ShardEvent};
use crate::tls::{ServerTls, TlsError};

/// What a listener serves; decides the session a connection gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// MX ingest (port 25).
    Smtp,
    /// Authenticated submission (port 587).
    Submission,
    /// Implicit-TLS submission (port 465).
    SmtpTls,
    /// POP3 (port 110).
    Pop3,
    /// Implicit-TLS POP3 (port 995).
    Pop3Tls,
}

impl ListenerKind {
    /// The word the start-up line uses, e.g. `smtp listening on …`.
    pub fn label(self) -> &'static str {
        match self {
            ListenerKind::Smtp => "smtp",
            ListenerKind::Submission => "submission",
            ListenerKind::SmtpTls => "smtps",
            ListenerKind::Pop3 => "pop3",
            ListenerKind::Pop3Tls => "pop3s",
        }
    }

    fn from_config_key(key: &str) -> ListenerKind {
        match key {
            "smtp.listen" => ListenerKind::Smtp,
            "smtp.submission_listen" => ListenerKind::Submission,
            "smtp.tls_listen" => ListenerKind::SmtpTls,
            "pop3.listen" => ListenerKind::Pop3,
            "pop3.tls_listen" => ListenerKind::Pop3Tls,
            other => unreachable!("unknown listener key {other}"),
        }
    }
}

/// A listener every shard binds: the configured address with port 0 already resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerSpec {
    pub kind: ListenerKind,
    pub addr: SocketAddr,
}

/// Process-wide state the shards share; immutable apart from atomics.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub shard_count: usize,
    pub listeners: Vec<ListenerSpec>,
    /// SMTP connections across all shards.
    pub smtp_limits: Arc<ConnectionLimits>,
    /// POP3 connections across all shards (same caps: there are no POP3 keys for them).
    pub pop3_limits: Arc<ConnectionLimits>,
    /// Accounts and their password hashes.
    pub users: Arc<UserDirectory>,
    /// Local domains, users and postmaster, for routing at RCPT.
    pub directory: Directory,
    /// The TLS identity from `[tls]`, re-read on SIGHUP; `None` when TLS is off.
    pub tls: Option<Arc<ServerTls>>,
    /// Every shard's counters, indexed by shard id; shard 0's scrape endpoint reads them all.
    pub metrics: Arc<[Arc<ShardMetrics>]>,
    /// `metrics_listen` with port 0 resolved; `None` serves no metrics.
    pub metrics_addr: Option<SocketAddr>,
    /// Nameservers, next-hop policy and per-domain connection counts of the relay.
    pub relay: crate::shard::relay::RelayShared,
}

/// Why the server could not start or stopped abnormally. Each names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("data_dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data_dir {path} is in use by another ringmail{holder} (lock file {lock})")]
    DataDirLocked {
        path: PathBuf,
        lock: PathBuf,
        holder: String,
    },
    #[error("{key}: {addr} is already in use by another process")]
    PortInUse { key: &'static str, addr: SocketAddr },
    #[error("{key}: cannot listen on {addr}: {source}")]
    Listen {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("users: {0}")]
    Users(String),
    /// The certificate or key of `[tls]` is unusable at start (exit 1; a bad file on SIGHUP
    /// is logged and the old identity kept instead).
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("relay: {0}")]
    Relay(String),
    #[error("shard {shard} could not start: {message}")]
    ShardStart { shard: usize, message: String },
    #[error("shard {shard} failed: {message}")]
    ShardFailed { shard: usize, message: String },
}

/// Runs the server until SIGTERM or SIGINT, then drains and returns.
pub fn run(config: Config) -> Result<(), ServerError> {
    let shard_count = config.shard_count();
    let plan = host::prepare(shard_count, config.smtp.max_connections)?;
    for note in &plan.notes {
        tracing::warn!("{note}");
    }
    let _lock = DataDirLock::acquire(&config.data_dir)?;
    let tls = ServerTls::load(&config.tls)?.map(Arc::new);
    let (listeners, mut port_claims) = resolve_listeners(&config)?;
    let metrics_claim = config
        .metrics_listen
        .map(|addr| probe_bind("metrics_listen", addr))
        .transpose()?;
    let metrics_addr = metrics_claim.as_ref().map(|claim| claim.addr);
    port_claims.extend(metrics_claim);
    let users = UserDirectory::new(
        config
            .users
            .iter()
            .map(|u| (u.address.clone(), u.password_hash.clone())),
    )
    .map_err(|e| ServerError::Users(e.to_string()))?;
    let user_addresses: Vec<String> = config.users.iter().map(|u| u.address.clone()).collect();
    let directory = Directory::new(&config.local_domains, &user_addresses, &config.postmaster)
        .map_err(|e| ServerError::Users(e.to_string()))?;
    let relay = crate::shard::relay::RelayShared::from_config(&config, &listeners)
        .map_err(ServerError::Relay)?;
    let shared = Arc::new(Shared {
        tls: tls.clone(),
        relay,
        users: Arc::new(users),
        directory,
        smtp_limits: ConnectionLimits::new(
            config.smtp.max_connections,
            config.smtp.max_connections_per_ip,
        ),
        pop3_limits: ConnectionLimits::new(
            config.smtp.max_connections,
            config.smtp.max_connections_per_ip,
        ),
        metrics: ShardMetrics::for_shards(shard_count).into(),
        metrics_addr,
        config,
        shard_count,
        listeners,
    });

    // Signals are caught before any shard starts so that an early SIGTERM is never lost.
    let (events_tx, events_rx) = mpsc::channel::<ShardEvent>();
    watch_signals(events_tx.clone(), tls)?;

    let cpus = allowed_cpus();
    let mut shutdowns = Vec::with_capacity(shard_count);
    let mut starts = Vec::with_capacity(shard_count);
    let mut handles = Vec::with_capacity(shard_count);
    let (mesh, inboxes) = shard::Mesh::new(shard_count);
    for (id, inbox) in inboxes.into_iter().enumerate() {
        let (shutdown_tx, shutdown_rx) = flume::bounded(1);
        shutdowns.push(shutdown_tx);
        let (start_tx, start_rx) = flume::bounded(1);
        starts.push(start_tx);
        let ctx = ShardContext {
            id,
            shared: Arc::clone(&shared),
            events: events_tx.clone(),
            start: start_rx,
            shutdown: shutdown_rx,
            mesh: mesh.clone(),
            inbox,
        };
        let cpu = cpus[id % cpus.len()];
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{id}"))
            .io_memory(plan.io_memory_per_shard_bytes as usize)
            .spawn(move || shard::run(ctx))
            .map_err(|e| ServerError::ShardStart {
                shard: id,
                message: e.to_string(),
            })?;
        handles.push(handle);
    }
    drop(events_tx);

    let stop = |shutdowns: &[flume::Sender<()>], handles: Vec<glommio::ExecutorJoinHandle<_>>| {
        for s in shutdowns {
            let _ = s.try_send(());
        }
        for h in handles {
            let _ = h.join();
        }
    };

    let mut ready = 0;
    let mut recovered = 0;
    let outcome = loop {
        match events_rx.recv() {
            Ok(ShardEvent::Recovered { .. }) => {
                recovered += 1;
                if recovered == shard_count {
                    // Every index entry has reached its owner: now clients may come.
                    for start in &starts {
                        let _ = start.try_send(());
                    }
                }
            }
            Ok(ShardEvent::Ready { .. }) => {
                ready += 1;
                if ready == shard_count {
                    // Every shard listens: the ports are ours without the claims now.
                    port_claims.clear();
                    announce(&shared);
                }
            }
            Ok(ShardEvent::Signal(signal)) => {
                tracing::info!(
                    "signal {signal}: draining (at most {:?})",
                    shared.config.shutdown_grace
                );
                break Ok(());
            }
            Ok(ShardEvent::Failed { shard, message }) => {
                break Err(if ready < shard_count {
                    ServerError::ShardStart { shard, message }
                } else {
                    ServerError::ShardFailed { shard, message }
                });
            }
            Err(_) => break Ok(()),
        }
    };
    stop(&shutdowns, handles);
    if outcome.is_ok() {
        tracing::info!("stopped");
    }
    outcome
}

/// Prints the start-up lines scripts wait for, once every shard is bound.
fn announce(shared: &Shared) {
    let mut out = std::io::stdout().lock();
    for l in &shared.listeners {
        let _ = writeln!(
            out,
            "{} listening on {} ({} shard{})",
            l.kind.label(),
            l.addr,
            shared.shard_count,
            if shared.shard_count == 1 { "" } else { "s" }
        );
    }
    if let Some(addr) = shared.metrics_addr {
        let _ = writeln!(out, "metrics listening on {addr}");
    }
    let _ = out.flush();
}

/// SIGTERM/SIGINT start the drain; SIGHUP re-reads the TLS certificate and key (on this
/// thread, where blocking file reads are allowed), keeping every open connection.
fn watch_signals(
    events: mpsc::Sender<ShardEvent>,
    tls: Option<Arc<ServerTls>>,
) -> Result<(), ServerError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(|e| {
            ServerError::ShardStart {
                shard: 0,
                message: format!("cannot install signal handlers: {e}"),
            }
        })?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGHUP {
                    match &tls {
                        Some(tls) => match tls.reload() {
                            Ok(()) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                            Err(e) => tracing::error!(
                                "SIGHUP: {e}; keeping the certificate and key loaded before"
                            ),
                        },
                        None => tracing::info!("SIGHUP: no [tls] configured, nothing to reload"),
                    }
                    continue;
                }
                let name = if signal == SIGTERM {
                    "SIGTERM"
                } else {
                    "SIGINT"
                };
                let _ = events.send(ShardEvent::Signal(name));
                break;
            }
        })
        .map_err(|e| ServerError::ShardStart {
            shard: 0,
            message: format!("cannot start the signal thread: {e}"),
        })?;
    Ok(())
}

/// The CPUs this process may run on, so that shard `i` is pinned to one that exists.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this process.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    let cpus: Vec<usize> = if rc == 0 {
        (0..libc::CPU_SETSIZE as usize)
            .filter(|cpu| unsafe { libc::CPU_ISSET(*cpu, &set) })
            .collect()
    } else {
        Vec::new()
    };
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}

/// Checks every listener address is free and resolves port 0 to a real port.
///
/// glommio binds with SO_REUSEPORT, which would silently let us share a port some other
/// process already listens on. A first bind *without* SO_REUSEPORT fails in that case, so we
/// can name the port; it also picks the port that every shard then shares when 0 was asked.
/// The probe sockets come back as [`PortClaim`]s: hold them until every shard listens.
fn resolve_listeners(config: &Config) -> Result<(Vec<ListenerSpec>, Vec<PortClaim>), ServerError> {
    let mut specs = Vec::new();
    let mut claims = Vec::new();
    for (key, addrs) in config.listeners() {
        for addr in addrs {
            let claim = probe_bind(key, *addr)?;
            specs.push(ListenerSpec {
                kind: ListenerKind::from_config_key(key),
                addr: claim.addr,
            });
            claims.push(claim);
        }
    }
    Ok((specs, claims))
}

/// A listener's port, held by a bound socket that never listens between the probe and the
/// moment the shards listen (log recovery lies in between, which can take seconds). Were the
/// port let go, the kernel could hand a port-0 bind of another process the same port, and
/// that process's SO_REUSEPORT listeners would join ours: clients of one server would land
/// on the other. The shards bind beside the claim: it has SO_REUSEADDR and does not listen.
struct PortClaim {
    addr: SocketAddr,
    _socket: socket2::Socket,
}

fn probe_bind(key: &'static str, addr: SocketAddr) -> Result<PortClaim, ServerError> {
    use socket2::{Domain, Socket, Type};
    let listen_error = |source| ServerError::Listen { key, addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(listen_error)?;
    // SO_REUSEADDR only forgives TIME_WAIT leftovers of an earlier run; on Linux it never
    // lets us bind next to a live listener.
    socket.set_reuse_address(true).map_err(listen_error)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(listen_error)?;
    }
    match socket.bind(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(ServerError::PortInUse { key, addr })
        }
        Err(e) => return Err(listen_error(e)),
    }
    let addr = socket
        .local_addr()
        .map_err(listen_error)?
        .as_socket()
        .ok_or_else(|| listen_error(std::io::Error::other("not an IP socket")))?;
    Ok(PortClaim {
        addr,
        _socket: socket,
    })
}

/// The exclusive lock on `data_dir`, held for the life of the process.
struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    fn acquire(dir: &Path) -> Result<DataDirLock, ServerError> {
        let io = |source| ServerError::DataDir {
            path: dir.to_path_buf(),
            source,
        };
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io)?;
            // Make the new name durable (the shards sync what they create below it).
            File::open(crate::store::backend::parent_dir(dir))
                .and_then(|parent| parent.sync_all())
                .map_err(io)?;
        }
        let lock_path = dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = std::fs::read_to_string(&lock_path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .map(|pid| format!(" (pid {pid})"))
                    .unwrap_or_default();
                return Err(ServerError::DataDirLocked {
                    path: dir.to_path_buf(),
                    lock: lock_path,
                    holder,
                });
            }
            return Err(io(err));
        }
        file.set_len(0).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bind without SO_REUSEADDR conflicts wherever the kernel's choice of a port for a
    /// port-0 bind does: a port such a bind cannot take is one no other process is handed.
    fn taken_by_others(addr: SocketAddr) -> bool {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        match socket.bind(&addr.into()) {
            Ok(()) => false,
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
                true
            }
        }
    }

    #[test]
    fn a_probed_port_stays_claimed_until_the_shards_listen_beside_the_claim() {
        let claim = probe_bind("smtp.listen", "127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(claim.addr.port(), 0);
        assert!(taken_by_others(claim.addr));
        let shards: Vec<_> = (0..2)
            .map(|_| crate::shard::listening_socket(claim.addr).unwrap())
            .collect();
        drop(claim);
        assert!(taken_by_others(
            shards[0].local_addr().unwrap().as_socket().unwrap()
        ));
    }

    #[test]
    fn a_port_with_a_listener_of_another_socket_is_refused_by_name() {
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = other.local_addr().unwrap();
        assert!(matches!(
            probe_bind("smtp.listen", addr),
            Err(ServerError::PortInUse {
                key: "smtp.listen",
                ..
            })
        ));
    }
}
