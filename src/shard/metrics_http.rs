//! The Prometheus scrape endpoint: a tiny HTTP/1.1 responder that shard 0 runs beside its
//! mail listeners. One request per connection; the protocol itself is `metrics::http`.
//!
//! A scrape only loads other shards' atomics and encodes them — it never awaits another
//! shard — and scrapers are few and bounded, so mail traffic on shard 0 barely notices.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};
use prometheus_client::registry::Registry;

use super::conn::{read_some, write_all, ReadOutcome};
use super::Shard;
use crate::metrics::http::{parse_request, response, Request, MAX_REQUEST_HEAD_BYTES};
use crate::metrics::{encode, CONTENT_TYPE};

/// Scrapes served at once; more connections are closed at once (Prometheus scrapes serially).
const MAX_CONCURRENT_SCRAPES: usize = 8;
/// How long a scraper has to send its request head, in all.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a scraper has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `/metrics` on `listener` until the shard stops.
pub async fn serve(shard: Rc<Shard>, listener: TcpListener, registry: Rc<Registry>) {
    let in_flight = Rc::new(Cell::new(0usize));
    while let Some(stream) = shard.accept(&listener, "metrics").await {
        if in_flight.get() >= MAX_CONCURRENT_SCRAPES {
            drop(stream);
            continue;
        }
        in_flight.set(in_flight.get() + 1);
        let in_flight = Rc::clone(&in_flight);
        let registry = Rc::clone(&registry);
        glommio::spawn_local(async move {
            answer(stream, &registry).await;
            in_flight.set(in_flight.get() - 1);
        })
        .detach();
    }
}

/// Reads one request head (bounded in size and time) and answers it.
async fn answer(mut stream: TcpStream, registry: &Registry) {
    let mut received = vec![0u8; MAX_REQUEST_HEAD_BYTES];
    let mut filled = 0;
    let request = glommio::timer::timeout(REQUEST_TIMEOUT, async {
        loop {
            match parse_request(&received[..filled]) {
                Request::Incomplete => {}
                verdict => return Ok(Some(verdict)),
            }
            match read_some(&mut stream, &mut received[filled..], REQUEST_TIMEOUT).await {
                ReadOutcome::Data(n) => filled += n,
                _ => return Ok(None),
            }
        }
    })
    .await;
    let Ok(Some(request)) = request else {
        return;
    };
    let body = match request {
        Request::Metrics { .. } => encode(registry),
        _ => String::new(),
    };
    let _ = write_all(
        &mut stream,
        &response(request, &body, CONTENT_TYPE),
        WRITE_TIMEOUT,
    )
    .await;
}
