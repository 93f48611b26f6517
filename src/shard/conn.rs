//! Socket helpers shared by the connection loops, generic over the stream so that TLS streams
//! slot in beside plain TCP.

use std::io;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// When a quiet client is cut off: `idle_timeout` after the last reply went out (or a TLS
/// handshake ended), not after its last byte came in, so a client that trickles a command a
/// byte at a time cannot hold its connection for ever.
pub struct IdleClock {
    timeout: Duration,
    since: Instant,
}

impl IdleClock {
    /// A clock running from now.
    pub fn start(timeout: Duration) -> IdleClock {
        IdleClock {
            timeout,
            since: Instant::now(),
        }
    }

    /// The client's turn begins again now.
    pub fn restart(&mut self) {
        self.since = Instant::now();
    }

    /// How long the next read may wait (zero once the time is up).
    pub fn remaining(&self) -> Duration {
        self.timeout.saturating_sub(self.since.elapsed())
    }
}

/// How a read ended.
pub enum ReadOutcome {
    Data(usize),
    /// The peer closed its side.
    Closed,
    TimedOut,
    Failed(#[allow(dead_code)] io::Error),
}

/// Reads what is available into `buf`, waiting at most `timeout`.
pub async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    timeout: Duration,
) -> ReadOutcome {
    let read = glommio::timer::timeout(timeout, async {
        stream
            .read(buf)
            .await
            .map_err(glommio::GlommioError::IoError)
    })
    .await;
    match read {
        Ok(0) => ReadOutcome::Closed,
        Ok(n) => ReadOutcome::Data(n),
        Err(glommio::GlommioError::TimedOut(_)) => ReadOutcome::TimedOut,
        Err(glommio::GlommioError::IoError(e)) => ReadOutcome::Failed(e),
        Err(e) => ReadOutcome::Failed(io::Error::other(e.to_string())),
    }
}

/// Writes all of `bytes` (from wherever they live: a reply buffer, a log segment's memory
/// map) straight to the stream, waiting at most `timeout` for the peer to take them.
pub async fn write_all<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    glommio::timer::timeout(timeout, async {
        async {
            // Flush too: a TLS stream holds encrypted records until flushed.
            stream.write_all(bytes).await?;
            stream.flush().await
        }
        .await
        .map_err(glommio::GlommioError::IoError)
    })
    .await
    .map_err(|e| match e {
        glommio::GlommioError::IoError(e) => e,
        other => io::Error::new(io::ErrorKind::TimedOut, other.to_string()),
    })
}

/// Writes every piece, in order, with as few system calls as the socket allows (one, unless
/// it is full), then flushes: used to send reply lines, stored message bytes and terminators
/// together without first copying them into one buffer.
///
/// `timeout` bounds each wait for the peer to take more bytes, not the whole transfer (RFC
/// 5321 §4.5.3.2.5 times each data block): a slow peer that keeps reading a large message is
/// never cut off, one that stops is.
pub async fn write_all_vectored<S: AsyncWrite + Unpin>(
    stream: &mut S,
    pieces: &[&[u8]],
    timeout: Duration,
) -> io::Result<()> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "peer took no bytes in time");
    let mut piece = 0;
    let mut offset = 0;
    while piece < pieces.len() {
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(&pieces[piece][offset..])
            .chain(pieces[piece + 1..].iter().copied())
            .map(io::IoSlice::new)
            .collect();
        let mut written = futures_lite::future::or(
            async { Some(stream.write_vectored(&slices).await) },
            async {
                glommio::timer::sleep(timeout).await;
                None
            },
        )
        .await
        .ok_or_else(timed_out)??;
        if written == 0 && slices.iter().any(|s| !s.is_empty()) {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while piece < pieces.len() && written >= pieces[piece].len() - offset {
            written -= pieces[piece].len() - offset;
            piece += 1;
            offset = 0;
        }
        offset += written;
    }
    // Like `write_all`: a TLS stream holds its records until flushed.
    futures_lite::future::or(async { Some(stream.flush().await) }, async {
        glommio::timer::sleep(timeout).await;
        None
    })
    .await
    .ok_or_else(timed_out)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Writes `total` bytes with [`write_all_vectored`] to a reader that takes up to `chunk`
    /// bytes every `pause` (or none at all), and returns the writer's result.
    fn write_to_reader(
        total: usize,
        chunk: Option<usize>,
        pause: Duration,
        timeout: Duration,
    ) -> io::Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            let mut buffer = vec![0u8; chunk.unwrap_or(1)];
            loop {
                std::thread::sleep(pause);
                if chunk.is_none() || !matches!(socket.read(&mut buffer), Ok(n) if n > 0) {
                    break;
                }
            }
        });
        let result = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let mut stream = glommio::net::TcpStream::connect(addr).await.unwrap();
                let body = vec![b'x'; total];
                write_all_vectored(&mut stream, &[b"+OK\r\n", &body], timeout).await
            })
            .unwrap()
            .join()
            .unwrap();
        reader.join().unwrap();
        result
    }

    #[test]
    fn a_slow_reader_that_keeps_reading_is_never_cut_off() {
        // 128 MiB at 1 MiB every 20 ms takes seconds: longer than the timeout, which bounds
        // each wait for progress, not the transfer.
        write_to_reader(
            128 << 20,
            Some(1 << 20),
            Duration::from_millis(20),
            Duration::from_secs(1),
        )
        .unwrap();
    }

    #[test]
    fn a_reader_that_stops_is_cut_off() {
        let error = write_to_reader(
            64 << 20,
            None,
            Duration::from_secs(3),
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }
}
