//! Thread-per-core: one glommio executor per thread, each running the same future, while
//! the main thread prints the status line once a second.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorPoolBuilder, PoolPlacement};

use crate::report::{Live, StatusLine};

/// io_uring registered-buffer memory per executor; we do no DMA file I/O on the hot path,
/// and the default (10 MiB) would exceed common `ulimit -l` values with several threads.
const IO_MEMORY_BYTES: usize = 512 * 1024;

/// How long `refuse_if_listening` waits for a listener to answer.
const LISTEN_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// How often the status line is printed.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Counts a thread as finished when dropped, so a thread that panics (for instance on a
/// closed stderr) still lets the main thread stop waiting.
struct Done(Arc<AtomicUsize>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Runs `make_future(thread_index)` on `threads` executors and collects their results.
/// Prints a status line from `live` every second until all threads are done.
pub fn run_threads<G, F, T>(
    threads: usize,
    live: Arc<Live>,
    quiet: bool,
    make_future: G,
) -> anyhow::Result<(Vec<T>, Duration)>
where
    G: Fn(usize) -> F + Clone + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let next_index = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let handles = {
        let next_index = next_index.clone();
        let finished = finished.clone();
        LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(threads))
            .name("loadgen")
            .io_memory(IO_MEMORY_BYTES)
            .on_all_shards(move || {
                let index = next_index.fetch_add(1, Ordering::Relaxed);
                let future = make_future(index);
                let done = Done(finished.clone());
                async move {
                    let result = future.await;
                    drop(done);
                    result
                }
            })
            .map_err(std::io::Error::from)?
    };
    let mut status = StatusLine::default();
    let mut last_tick = started;
    while finished.load(Ordering::Acquire) < threads {
        std::thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        if now.duration_since(last_tick) >= STATUS_INTERVAL {
            if !quiet {
                eprintln!(
                    "{}",
                    status.tick(
                        &live,
                        now.duration_since(started),
                        now.duration_since(last_tick)
                    )
                );
            }
            last_tick = now;
        }
    }
    let elapsed = started.elapsed();
    let mut results = Vec::with_capacity(threads);
    for result in handles.join_all() {
        results.push(result.map_err(|e| anyhow::anyhow!("executor thread failed: {e}"))?);
    }
    Ok((results, elapsed))
}

/// Fails when a TCP server already listens on `address`. Servers here bind with
/// SO_REUSEPORT, which would otherwise let them share a port with another server that set
/// it too. A probe bind would also trip over our own previous run's TIME_WAIT sockets
/// (which carry SO_REUSEPORT but not SO_REUSEADDR), so we connect instead: only a
/// listener answers. Runs on the main thread, before any executor starts.
pub fn refuse_if_listening(address: SocketAddr) -> anyhow::Result<()> {
    let mut probe = address;
    if probe.ip().is_unspecified() {
        probe.set_ip(match probe.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    match std::net::TcpStream::connect_timeout(&probe, LISTEN_PROBE_TIMEOUT) {
        Ok(_) => anyhow::bail!("cannot listen on {address}: another server is listening there"),
        Err(_) => Ok(()),
    }
}
