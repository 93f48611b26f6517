//! A connection's byte stream: plain TCP, or TLS over it (implicit TLS, STARTTLS / STLS on
//! the server side, STARTTLS to an MX on the relay side). One type per side lets the
//! connection loops upgrade in place without becoming generic over two stream types.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::ClientConfig;

use crate::tls::{HandshakeError, ServerTls};

/// Plain TCP, or TLS of type `T` over it.
pub enum MaybeTls<T> {
    /// Plain TCP: bytes go to the socket as they are (zero-copy sends from the log map).
    Plain(TcpStream),
    /// TLS over TCP; boxed because the rustls state is large.
    Tls(Box<T>),
}

/// The stream an SMTP or POP3 connection loop reads and writes.
pub type ConnStream = MaybeTls<futures_rustls::server::TlsStream<TcpStream>>;

/// An outbound (relay) connection: plain TCP, or TLS after the MX accepted STARTTLS.
pub type OutboundStream = MaybeTls<futures_rustls::client::TlsStream<TcpStream>>;

impl<T> MaybeTls<T> {
    /// Whether the bytes are encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }

    /// The plain stream to upgrade; a second handshake inside TLS is never asked for (the
    /// sessions refuse it), so asking is an error.
    fn into_plain(self) -> Result<TcpStream, HandshakeError> {
        match self {
            MaybeTls::Plain(tcp) => Ok(tcp),
            MaybeTls::Tls(_) => Err(HandshakeError::Failed(io::Error::other(
                "TLS is already active",
            ))),
        }
    }
}

impl ConnStream {
    /// Runs the server handshake on a plain stream (bounded by the handshake timeout). The
    /// caller has checked that no plain-text input is buffered: rustls reads straight from
    /// the socket, so anything still in flight is taken as handshake bytes and, not being a
    /// ClientHello, fails the handshake. On failure the connection is gone.
    pub async fn start_tls(self, tls: &ServerTls) -> Result<ConnStream, HandshakeError> {
        let tcp = self.into_plain()?;
        Ok(MaybeTls::Tls(Box::new(tls.accept(tcp).await?)))
    }
}

impl OutboundStream {
    /// Runs the client handshake after the MX's 220 to STARTTLS (see [`crate::tls::connect`]).
    /// On error the connection is gone: reconnect in plain text (`relay::client` module docs).
    pub async fn start_tls(
        self,
        config: Arc<ClientConfig>,
        mx_host: &str,
    ) -> Result<OutboundStream, HandshakeError> {
        let tcp = self.into_plain()?;
        Ok(MaybeTls::Tls(Box::new(
            crate::tls::connect(config, mx_host, tcp).await?,
        )))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    /// One `sendmsg` for several pieces (a reply line, a message straight from the log's map,
    /// the terminating dot) instead of a system call per piece. Like glommio's own writes it
    /// first tries the non-blocking call directly; only when the socket is full does it fall
    /// back to glommio, which waits for room.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => {
                // SAFETY: IoSlice is ABI-compatible with iovec (std guarantees it on Unix), the
                // slices outlive the call, and the descriptor is this stream's open socket.
                let sent = unsafe {
                    let mut header: libc::msghdr = std::mem::zeroed();
                    header.msg_iov = bufs.as_ptr() as *mut libc::iovec;
                    header.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
                    libc::sendmsg(
                        std::os::fd::AsRawFd::as_raw_fd(tcp),
                        &header,
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if sent >= 0 {
                    return Poll::Ready(Ok(sent as usize));
                }
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::WouldBlock {
                    return Poll::Ready(Err(error));
                }
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
                Pin::new(tcp).poll_write(cx, first)
            }
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => Pin::new(tcp).poll_close(cx),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_close(cx),
        }
    }
}
