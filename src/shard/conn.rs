//! Socket helpers shared by the connection loops, generic over the stream so that TLS streams
//! slot in beside plain TCP.

use std::io;
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
pub async fn write_all_vectored<S: AsyncWrite + Unpin>(
    stream: &mut S,
    pieces: &[&[u8]],
    timeout: Duration,
) -> io::Result<()> {
    let mut piece = 0;
    let mut offset = 0;
    glommio::timer::timeout(timeout, async {
        while piece < pieces.len() {
            let slices: Vec<io::IoSlice<'_>> = std::iter::once(&pieces[piece][offset..])
                .chain(pieces[piece + 1..].iter().copied())
                .map(io::IoSlice::new)
                .collect();
            let mut written = stream
                .write_vectored(&slices)
                .await
                .map_err(glommio::GlommioError::IoError)?;
            if written == 0 && slices.iter().any(|s| !s.is_empty()) {
                return Err(glommio::GlommioError::IoError(
                    io::ErrorKind::WriteZero.into(),
                ));
            }
            while piece < pieces.len() && written >= pieces[piece].len() - offset {
                written -= pieces[piece].len() - offset;
                piece += 1;
                offset = 0;
            }
            offset += written;
        }
        // Like `write_all`: a TLS stream holds its records until flushed.
        stream.flush().await.map_err(glommio::GlommioError::IoError)
    })
    .await
    .map_err(|e| match e {
        glommio::GlommioError::IoError(e) => e,
        other => io::Error::new(io::ErrorKind::TimedOut, other.to_string()),
    })
}
