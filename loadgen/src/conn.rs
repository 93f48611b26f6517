//! A client connection with a bounded receive buffer, shared by the SMTP and POP3 clients.
//! Framing is done by the protocols' pure parsers; this module only moves bytes.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use thiserror::Error;

/// A server that neither answers nor closes for this long is counted as broken.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a session ended early. Every variant is counted, none panics.
#[derive(Debug, Error)]
pub enum SessionError {
    /// The socket failed (reset, timeout).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection in the middle of a reply.
    #[error("connection closed by server")]
    Closed,
    /// A reply or message larger than we are willing to buffer.
    #[error("server response longer than {0} bytes")]
    TooLong(usize),
    /// A reply that does not follow the protocol's syntax.
    #[error("malformed reply: {0}")]
    Malformed(&'static str),
    /// A well-formed reply that the protocol does not allow at this step.
    #[error("unexpected reply at {step}: {reply}")]
    Unexpected {
        /// The step we were at (greeting, EHLO, DATA, ...).
        step: &'static str,
        /// The first line of the reply, for the error report.
        reply: String,
    },
}

impl From<glommio::GlommioError<()>> for SessionError {
    fn from(error: glommio::GlommioError<()>) -> Self {
        SessionError::Io(error.into())
    }
}

/// The socket, plain or TLS.
enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP after STARTTLS/STLS; boxed because the rustls state is large.
    Tls(Box<futures_rustls::client::TlsStream<TcpStream>>),
    /// A handshake failed midway: the connection is unusable.
    Broken,
}

/// A connected socket and the bytes received but not yet consumed.
pub struct Conn {
    /// The socket.
    stream: Stream,
    /// Receive buffer; `buffer[start..end]` is unconsumed.
    buffer: Vec<u8>,
    /// First unconsumed byte.
    start: usize,
    /// End of received bytes.
    end: usize,
    /// The largest frame (reply, message) we accept.
    max_frame_bytes: usize,
}

impl Conn {
    /// Connects to `target` with Nagle off (we write whole commands ourselves). The receive
    /// buffer starts at `initial_buffer_bytes` and grows, while a frame does not fit, up to
    /// `max_frame_bytes`.
    pub async fn connect(
        target: SocketAddr,
        initial_buffer_bytes: usize,
        max_frame_bytes: usize,
    ) -> Result<Conn, SessionError> {
        let stream = glommio::timer::timeout(IO_TIMEOUT, TcpStream::connect(target))
            .await
            .map_err(SessionError::from)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Conn {
            stream: Stream::Plain(stream),
            buffer: vec![0; initial_buffer_bytes.min(max_frame_bytes)],
            start: 0,
            end: 0,
            max_frame_bytes,
        })
    }

    /// Sends all of `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        match &mut self.stream {
            Stream::Plain(tcp) => tcp.write_all(bytes).await?,
            Stream::Tls(tls) => {
                tls.write_all(bytes).await?;
                // rustls holds the records until flushed.
                tls.flush().await?;
            }
            Stream::Broken => return Err(SessionError::Closed),
        }
        Ok(())
    }

    /// Runs the TLS client handshake after the server said yes to STARTTLS/STLS. Bytes the
    /// server sent behind its yes would be plain text smuggled into the TLS session: refused.
    pub async fn start_tls(&mut self, config: &Arc<ClientConfig>) -> Result<(), SessionError> {
        if self.start != self.end {
            return Err(SessionError::Malformed(
                "data after the server's STARTTLS/STLS answer",
            ));
        }
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Broken) else {
            return Err(SessionError::Malformed("TLS started twice"));
        };
        // The name is only sent as SNI; the certificate is not verified (see `tls`).
        let name = ServerName::try_from("loadgen.invalid")
            .map_err(|_| SessionError::Malformed("server name"))?;
        let connector = futures_rustls::TlsConnector::from(Arc::clone(config));
        let tls = glommio::timer::timeout(IO_TIMEOUT, async {
            connector
                .connect(name, tcp)
                .await
                .map_err(glommio::GlommioError::IoError)
        })
        .await
        .map_err(SessionError::from)?;
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    /// Reads the next frame: `parse` looks at the unconsumed bytes and says how long the
    /// first complete frame is (`None` = need more). The returned range indexes `bytes()`
    /// and stays valid until the next read.
    pub async fn read_frame<P>(&mut self, mut parse: P) -> Result<Range<usize>, SessionError>
    where
        P: FnMut(&[u8]) -> Result<Option<usize>, SessionError>,
    {
        loop {
            if let Some(len) = parse(&self.buffer[self.start..self.end])? {
                let range = self.start..self.start + len;
                self.start += len;
                return Ok(range);
            }
            self.fill().await?;
        }
    }

    /// The receive buffer, to be indexed with a range from `read_frame`.
    pub fn bytes(&self) -> &[u8] {
        &self.buffer
    }

    /// Receives more bytes, compacting and growing the buffer within the frame limit.
    async fn fill(&mut self) -> Result<(), SessionError> {
        if self.start > 0 {
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buffer.len() {
            if self.buffer.len() >= self.max_frame_bytes {
                return Err(SessionError::TooLong(self.max_frame_bytes));
            }
            let grown = (self.buffer.len() * 2).min(self.max_frame_bytes);
            self.buffer.resize(grown, 0);
        }
        let spare = &mut self.buffer[self.end..];
        let received = match &mut self.stream {
            Stream::Plain(tcp) => tcp.read(spare).await?,
            Stream::Tls(tls) => tls.read(spare).await?,
            Stream::Broken => 0,
        };
        if received == 0 {
            return Err(SessionError::Closed);
        }
        self.end += received;
        Ok(())
    }
}

/// First line of a reply as text, for error reports.
pub fn first_line(reply: &[u8]) -> String {
    let line = reply.split(|&b| b == b'\n').next().unwrap_or(b"");
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned()
}
