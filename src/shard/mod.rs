//! A shard: one pinned executor that owns its listeners' sockets, its connections and (once
//! started) its log. The only place with sockets and timers.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::{mpsc, Arc};

use futures_lite::future;
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::{Gate, Semaphore};

use crate::server::{ListenerKind, ListenerSpec, Shared};

/// Everything a shard is started with.
pub struct ShardContext {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// Tells the main thread this shard is ready, or why it failed.
    pub events: mpsc::Sender<ShardEvent>,
    /// Fires once, when the process is asked to stop.
    pub shutdown: flume::Receiver<()>,
}

/// What the main thread hears from shards and the signal watcher.
#[derive(Debug)]
pub enum ShardEvent {
    Ready { shard: usize },
    Failed { shard: usize, message: String },
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
}

/// Listen backlog: room for a burst of connections while every shard is busy.
const LISTEN_BACKLOG: i32 = 4096;

/// The shard's entry point, run inside its executor.
pub async fn run(ctx: ShardContext) {
    if let Err(e) = serve(&ctx).await {
        let _ = ctx.events.send(ShardEvent::Failed {
            shard: ctx.id,
            message: e.to_string(),
        });
    }
}

async fn serve(ctx: &ShardContext) -> Result<(), ShardError> {
    let mut listeners = Vec::new();
    for spec in &ctx.shared.listeners {
        listeners.push((*spec, bind(spec.addr)?));
    }
    let _ = ctx.events.send(ShardEvent::Ready { shard: ctx.id });

    // Closing this semaphore is the shard-wide "stop": every waiter on it wakes with an error.
    let stopping = Rc::new(Semaphore::new(0));
    let connections = Rc::new(Gate::new());
    let shard = Rc::new(Shard {
        id: ctx.id,
        shared: Arc::clone(&ctx.shared),
        stopping: Rc::clone(&stopping),
    });
    let mut acceptors = Vec::new();
    for (spec, listener) in listeners {
        let shard = Rc::clone(&shard);
        let connections = Rc::clone(&connections);
        acceptors.push(glommio::spawn_local(accept_loop(
            shard,
            spec,
            listener,
            connections,
        )));
    }

    let _ = ctx.shutdown.recv_async().await;
    stopping.close();
    for acceptor in acceptors {
        acceptor.await;
    }
    let grace = ctx.shared.config.shutdown_grace;
    if glommio::timer::timeout(grace, async {
        let _ = connections.close().await;
        Ok(())
    })
    .await
    .is_err()
    {
        tracing::warn!(
            shard = ctx.id,
            "shutdown grace of {grace:?} ran out; closing the remaining connections"
        );
    }
    Ok(())
}

/// Binds one shard's socket for a listener: SO_REUSEPORT so every shard gets its own accept
/// queue and the kernel spreads connections across them.
fn bind(addr: SocketAddr) -> Result<TcpListener, ShardError> {
    use socket2::{Domain, Socket, Type};
    let listen_error = |source| ShardError::Listen { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(listen_error)?;
    socket.set_reuse_address(true).map_err(listen_error)?;
    socket.set_reuse_port(true).map_err(listen_error)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(listen_error)?;
    }
    socket.bind(&addr.into()).map_err(listen_error)?;
    socket.listen(LISTEN_BACKLOG).map_err(listen_error)?;
    // SAFETY: the descriptor is a listening TCP socket whose ownership moves to the listener.
    Ok(unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) })
}

/// Per-shard state every connection task can reach.
pub struct Shard {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// Closed when the shard stops; sessions wait on it to leave between transactions.
    pub stopping: Rc<Semaphore>,
}

impl Shard {
    /// Resolves when the shard is asked to stop.
    pub async fn stopped(&self) {
        let _ = self.stopping.acquire(1).await;
    }
}

async fn accept_loop(
    shard: Rc<Shard>,
    spec: ListenerSpec,
    listener: TcpListener,
    connections: Rc<Gate>,
) {
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            shard.stopped().await;
            None
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                // EMFILE and friends: say so and breathe instead of spinning on the error.
                tracing::warn!(shard = shard.id, listener = %spec.addr, "accept failed: {e}");
                glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
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
    let _ = (shard, kind, stream);
}
