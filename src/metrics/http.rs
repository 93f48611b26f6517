//! The little HTTP/1.1 the metrics endpoint speaks, sans I/O: judge a request head, build the
//! response. One request per connection; the loop in `shard::metrics_http` owns the socket.

/// Largest request head we read; a scraper's `GET /metrics` is a few hundred bytes.
pub const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;

/// The only path served.
pub const METRICS_PATH: &str = "/metrics";

/// What the bytes received so far amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The head is not complete yet (no empty line); read more.
    Incomplete,
    /// `GET /metrics` (or `HEAD /metrics`, which gets the headers alone).
    Metrics {
        /// The client asked for the headers only.
        head_only: bool,
    },
    /// A well-formed request for anything else: 404.
    NotFound,
    /// Not HTTP/1.x, or the head outgrew [`MAX_REQUEST_HEAD_BYTES`]: 400.
    Malformed,
}

/// Judges the request head in `received` (everything read from the connection so far).
pub fn parse_request(received: &[u8]) -> Request {
    let Some(head_end) = find(received, b"\r\n\r\n") else {
        return if received.len() >= MAX_REQUEST_HEAD_BYTES {
            Request::Malformed
        } else {
            Request::Incomplete
        };
    };
    if head_end + 4 > MAX_REQUEST_HEAD_BYTES {
        return Request::Malformed;
    }
    let request_line = match find(received, b"\r\n") {
        Some(end) => &received[..end],
        None => return Request::Malformed,
    };
    let mut parts = request_line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Malformed;
    };
    if !version.starts_with(b"HTTP/1.") || method.is_empty() || target.is_empty() {
        return Request::Malformed;
    }
    // Scrapers may add a query string (`?name[]=…`); we always send everything.
    let path = target.split(|b| *b == b'?').next().unwrap_or(target);
    match (method, path == METRICS_PATH.as_bytes()) {
        (b"GET", true) => Request::Metrics { head_only: false },
        (b"HEAD", true) => Request::Metrics { head_only: true },
        _ => Request::NotFound,
    }
}

/// The whole response for `request` (which must not be [`Request::Incomplete`]); `body` is
/// only used for metrics. Every response closes the connection.
pub fn response(request: Request, body: &str, content_type: &str) -> Vec<u8> {
    let (status, content_type, body, head_only) = match request {
        Request::Metrics { head_only } => ("200 OK", content_type, body, head_only),
        Request::NotFound => ("404 Not Found", "text/plain", "not found\n", false),
        Request::Incomplete | Request::Malformed => {
            ("400 Bad Request", "text/plain", "bad request\n", false)
        }
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests() {
        let table: &[(&[u8], Request)] = &[
            (b"", Request::Incomplete),
            (b"GET /metrics HTTP/1.1\r\n", Request::Incomplete),
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", Request::Incomplete),
            (
                b"GET /metrics HTTP/1.1\r\n\r\n",
                Request::Metrics { head_only: false },
            ),
            (
                b"GET /metrics HTTP/1.0\r\nHost: x\r\nAccept: */*\r\n\r\n",
                Request::Metrics { head_only: false },
            ),
            (
                b"GET /metrics?name[]=x HTTP/1.1\r\n\r\n",
                Request::Metrics { head_only: false },
            ),
            (
                b"HEAD /metrics HTTP/1.1\r\n\r\n",
                Request::Metrics { head_only: true },
            ),
            (b"GET / HTTP/1.1\r\n\r\n", Request::NotFound),
            (b"GET /metrics/ HTTP/1.1\r\n\r\n", Request::NotFound),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", Request::NotFound),
            (b"POST /metrics HTTP/1.1\r\n\r\n", Request::NotFound),
            (b"get /metrics HTTP/1.1\r\n\r\n", Request::NotFound),
            (b"GET /metrics\r\n\r\n", Request::Malformed),
            (b"GET /metrics HTTP/2\r\n\r\n", Request::Malformed),
            (b"GET  /metrics HTTP/1.1\r\n\r\n", Request::Malformed),
            (b"GET /metrics HTTP/1.1 extra\r\n\r\n", Request::Malformed),
            (b"\r\n\r\n", Request::Malformed),
        ];
        for (input, expected) in table {
            assert_eq!(
                parse_request(input),
                *expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn oversized_heads_are_refused() {
        let mut head = b"GET /metrics HTTP/1.1\r\n".to_vec();
        head.resize(MAX_REQUEST_HEAD_BYTES, b'a');
        assert_eq!(parse_request(&head), Request::Malformed);
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_request(&head), Request::Malformed);
        let mut fits = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        fits.resize(MAX_REQUEST_HEAD_BYTES - 4, b'a');
        fits.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_request(&fits), Request::Metrics { head_only: false });
    }

    #[test]
    fn responses() {
        let ok = response(
            Request::Metrics { head_only: false },
            "a 1\n",
            "text/plain; version=0.0.4",
        );
        assert_eq!(
            ok,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: 4\r\nConnection: close\r\n\r\na 1\n"
        );
        let head = response(Request::Metrics { head_only: true }, "a 1\n", "t");
        assert!(head.ends_with(b"Content-Length: 4\r\nConnection: close\r\n\r\n"));
        let missing = response(Request::NotFound, "a 1\n", "t");
        assert!(missing.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
        assert!(missing.ends_with(b"\r\n\r\nnot found\n"));
        let bad = response(Request::Malformed, "a 1\n", "t");
        assert!(bad.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
    }

    proptest! {
        #[test]
        fn never_panics_and_is_stable(bytes in proptest::collection::vec(any::<u8>(), 0..10_000)) {
            let verdict = parse_request(&bytes);
            // Bytes after a complete head never change the verdict.
            if verdict != Request::Incomplete {
                let mut more = bytes.clone();
                more.extend_from_slice(b"trailing");
                prop_assert_eq!(parse_request(&more), verdict);
            }
        }

        #[test]
        fn any_prefix_of_a_good_request_is_incomplete(
            headers in proptest::collection::vec("[A-Za-z-]{1,20}: [ -~]{0,40}", 0..10),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut request = String::from("GET /metrics HTTP/1.1\r\n");
            for h in &headers {
                request.push_str(h);
                request.push_str("\r\n");
            }
            request.push_str("\r\n");
            let bytes = request.as_bytes();
            prop_assert_eq!(parse_request(bytes), Request::Metrics { head_only: false });
            let cut = cut.index(bytes.len());
            prop_assert_eq!(parse_request(&bytes[..cut]), Request::Incomplete);
        }
    }
}
