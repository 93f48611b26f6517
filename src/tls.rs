//! TLS with rustls and its `ring` provider: the server identity loaded from `[tls]` (and
//! re-read on SIGHUP), handshakes bounded by [`HANDSHAKE_TIMEOUT`] over any futures-lite
//! stream (glommio's `TcpStream` in production), and the opportunistic client side the relay
//! uses when an MX offers STARTTLS.
//!
//! Blocking file reads happen only in [`ServerTls::load`] and [`ServerTls::reload`], which run
//! on the main thread and the signal thread, never inside a shard.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncWrite};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};

use crate::config::TlsConfig;

/// A TLS handshake (implicit TLS, STARTTLS, STLS, or outbound) that takes longer than this is
/// abandoned: a client that opens a connection and sends nothing must not hold it for the
/// whole idle timeout with a half-built TLS state.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest certificate chain or key file we read. Real chains are a few KiB; the cap keeps a
/// mistaken path (a log file, a device) from being read into memory whole.
pub const MAX_PEM_FILE_BYTES: u64 = 1 << 20;

/// Why the server's certificate or key could not be used. Each names the configuration key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `tls.cert` could not be read or holds no usable certificate.
    #[error("tls.cert {path}: {reason}")]
    Cert {
        /// The configured path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `tls.key` could not be read or holds no usable private key.
    #[error("tls.key {path}: {reason}")]
    Key {
        /// The configured path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Both files parse but rustls refuses them together (the key does not match the
    /// certificate, or its algorithm is unsupported).
    #[error("tls.cert/tls.key: {0}")]
    Pair(String),
}

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer did not finish within [`HANDSHAKE_TIMEOUT`].
    #[error("TLS handshake timed out")]
    TimedOut,
    /// The peer sent something that is not TLS, or TLS we refuse, or the socket failed.
    #[error("TLS handshake failed: {0}")]
    Failed(io::Error),
}

/// The crypto provider every config uses: ring, pure Rust and assembly, no C toolchain beyond
/// what ring builds, no aws-lc.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM file with a size cap, naming the configuration key on failure.
fn read_pem(path: &Path, what: fn(PathBuf, String) -> TlsError) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| what(path.to_path_buf(), e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| what(path.to_path_buf(), e.to_string()))?;
    if bytes.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(what(
            path.to_path_buf(),
            format!("larger than {MAX_PEM_FILE_BYTES} bytes; is this a PEM file?"),
        ));
    }
    Ok(bytes)
}

/// Builds a server configuration from PEM bytes: a certificate chain (leaf first) and one
/// private key (PKCS#8, PKCS#1 or SEC1).
pub fn server_config_from_pem(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_error = |reason: String| TlsError::Cert {
        path: cert_path.to_path_buf(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error(format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(cert_error("no CERTIFICATE block found".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Key {
        path: key_path.to_path_buf(),
        reason: format!("no usable PEM private key: {e}"),
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Pair(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Pair(e.to_string()))?;
    Ok(Arc::new(config))
}

/// The server's TLS identity, shared by every shard and replaceable while connections run.
#[derive(Debug)]
pub struct ServerTls {
    /// `tls.cert`, re-read on SIGHUP.
    cert_path: PathBuf,
    /// `tls.key`, re-read on SIGHUP.
    key_path: PathBuf,
    /// The configuration new handshakes use. Connections keep the `Arc` they started with,
    /// so a reload never disturbs them. Written only on reload; each handshake takes the read
    /// lock for one `Arc` clone, so shards never wait on it in practice.
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Loads the certificate and key named by `[tls]`; `Ok(None)` when TLS is off.
    /// Blocking: call it before the shards start.
    pub fn load(config: &TlsConfig) -> Result<Option<ServerTls>, TlsError> {
        let (Some(cert_path), Some(key_path)) = (&config.cert, &config.key) else {
            return Ok(None);
        };
        let current = Self::read(cert_path, key_path)?;
        Ok(Some(ServerTls {
            cert_path: cert_path.clone(),
            key_path: key_path.clone(),
            current: RwLock::new(current),
        }))
    }

    fn read(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, TlsError> {
        let cert_pem = read_pem(cert_path, |path, reason| TlsError::Cert { path, reason })?;
        let key_pem = read_pem(key_path, |path, reason| TlsError::Key { path, reason })?;
        server_config_from_pem(cert_path, &cert_pem, key_path, &key_pem)
    }

    /// Re-reads both files; on success new handshakes use them, on failure the old identity
    /// stays and the error is returned for the caller to log. Blocking: signal thread only.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = Self::read(&self.cert_path, &self.key_path)?;
        match self.current.write() {
            Ok(mut current) => *current = fresh,
            // A panic while holding the lock cannot leave a half-written Arc behind.
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Runs the server side of a handshake on `stream`, bounded by [`HANDSHAKE_TIMEOUT`].
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
    ) -> Result<futures_rustls::server::TlsStream<S>, HandshakeError> {
        let acceptor = futures_rustls::TlsAcceptor::from(self.config());
        with_timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
    }
}

/// Runs a handshake future under a timeout, mapping glommio's error shapes to ours.
async fn with_timeout<T>(
    timeout: Duration,
    handshake: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, HandshakeError> {
    let outcome = glommio::timer::timeout(timeout, async {
        handshake.await.map_err(glommio::GlommioError::IoError)
    })
    .await;
    match outcome {
        Ok(stream) => Ok(stream),
        Err(glommio::GlommioError::TimedOut(_)) => Err(HandshakeError::TimedOut),
        Err(glommio::GlommioError::IoError(e)) => Err(HandshakeError::Failed(e)),
        Err(other) => Err(HandshakeError::Failed(io::Error::other(other.to_string()))),
    }
}

/// How the relay treats an MX's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificatePolicy {
    /// Opportunistic TLS (RFC 7435): encrypt against passive eavesdroppers, accept any
    /// certificate. The default for MX delivery, where most certificates do not match the MX
    /// name and refusing them would only push mail back to plain text.
    Unverified,
}

/// The client configuration for outbound STARTTLS under `policy`. Build it once per shard
/// (it holds the session-resumption cache) and share it between deliveries.
pub fn client_config(policy: CertificatePolicy) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = provider();
    let verifier = match policy {
        CertificatePolicy::Unverified => Arc::new(AcceptAnyCertificate {
            provider: Arc::clone(&provider),
        }),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Upgrades an outbound connection after the MX answered `220` to our STARTTLS: runs the
/// client handshake, bounded by [`HANDSHAKE_TIMEOUT`]. `mx_host` is sent as SNI when it is a
/// DNS name. On error the connection is unusable: the caller reconnects in plain text (see
/// `relay::client` for the fallback rule).
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ClientConfig>,
    mx_host: &str,
    stream: S,
) -> Result<futures_rustls::client::TlsStream<S>, HandshakeError> {
    let name = ServerName::try_from(mx_host.trim_end_matches('.').to_string())
        .unwrap_or_else(|_| ServerName::try_from("mx.invalid").expect("a valid DNS name"));
    let connector = futures_rustls::TlsConnector::from(config);
    with_timeout(HANDSHAKE_TIMEOUT, connector.connect(name, stream)).await
}

/// Accepts any certificate but still checks that the handshake signatures are genuine, so the
/// session keys are those of whoever holds the presented key.
#[derive(Debug)]
struct AcceptAnyCertificate {
    /// For the signature algorithms the handshake signatures are checked with.
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throw-away self-signed certificate for `name`, as PEM (cert, key).
    pub(crate) fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    fn load(cert: &[u8], key: &[u8]) -> Result<Arc<ServerConfig>, TlsError> {
        server_config_from_pem(Path::new("c.pem"), cert, Path::new("k.pem"), key)
    }

    #[test]
    fn good_pair_loads_and_bad_inputs_name_their_key() {
        let (cert, key) = self_signed("mx.ringmail.test");
        let (other_cert, _) = self_signed("other.test");
        assert!(load(cert.as_bytes(), key.as_bytes()).is_ok());
        let cases: [(&[u8], &[u8], &str); 4] = [
            (b"", key.as_bytes(), "tls.cert c.pem"),
            (b"hello", key.as_bytes(), "tls.cert c.pem"),
            (cert.as_bytes(), b"not a key", "tls.key k.pem"),
            (other_cert.as_bytes(), key.as_bytes(), "tls.cert/tls.key"),
        ];
        for (cert, key, prefix) in cases {
            let message = load(cert, key).expect_err("must refuse").to_string();
            assert!(
                message.starts_with(prefix),
                "{message:?} should start with {prefix:?}"
            );
        }
    }

    #[test]
    fn reload_keeps_the_old_identity_when_the_new_files_are_bad() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed("mx.ringmail.test");
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, &cert).unwrap();
        std::fs::write(&key_path, &key).unwrap();
        let config = TlsConfig {
            cert: Some(cert_path.clone()),
            key: Some(key_path.clone()),
        };
        let tls = ServerTls::load(&config).unwrap().expect("tls on");
        let before = tls.config();
        std::fs::write(&key_path, "garbage").unwrap();
        assert!(matches!(tls.reload(), Err(TlsError::Key { .. })));
        assert!(
            Arc::ptr_eq(&before, &tls.config()),
            "bad reload must keep the old config"
        );
        let (cert2, key2) = self_signed("mx2.ringmail.test");
        std::fs::write(&cert_path, &cert2).unwrap();
        std::fs::write(&key_path, &key2).unwrap();
        tls.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &tls.config()));
        assert!(ServerTls::load(&TlsConfig::default()).unwrap().is_none());
    }

    #[test]
    fn oversized_files_are_refused_before_reading_them_whole() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'a'; MAX_PEM_FILE_BYTES as usize + 10]).unwrap();
        let config = TlsConfig {
            cert: Some(big.clone()),
            key: Some(big),
        };
        let message = ServerTls::load(&config).unwrap_err().to_string();
        assert!(message.contains("larger than"), "{message}");
    }

    #[test]
    fn a_silent_client_times_out_and_garbage_fails_the_handshake() {
        let (cert, key) = self_signed("mx.ringmail.test");
        let config = load(cert.as_bytes(), key.as_bytes()).unwrap();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                use futures_lite::AsyncWriteExt;
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                // Silent: nothing arrives, the bounded handshake gives up.
                let _silent = glommio::net::TcpStream::connect(addr).await.unwrap();
                let stream = listener.accept().await.unwrap();
                let acceptor = futures_rustls::TlsAcceptor::from(Arc::clone(&config));
                let started = std::time::Instant::now();
                let outcome =
                    with_timeout(Duration::from_millis(200), acceptor.accept(stream)).await;
                assert!(matches!(outcome, Err(HandshakeError::TimedOut)));
                assert!(started.elapsed() < Duration::from_secs(5));
                // Plain text instead of a ClientHello: a clean failure, not a hang.
                let mut talker = glommio::net::TcpStream::connect(addr).await.unwrap();
                talker.write_all(b"MAIL FROM:<a@b.test>\r\n").await.unwrap();
                let stream = listener.accept().await.unwrap();
                let outcome = with_timeout(Duration::from_secs(5), acceptor.accept(stream)).await;
                assert!(matches!(outcome, Err(HandshakeError::Failed(_))));
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn client_and_server_complete_a_handshake_over_a_socket_pair() {
        let (cert, key) = self_signed("mx.ringmail.test");
        let server = load(cert.as_bytes(), key.as_bytes()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c"), &cert).unwrap();
        std::fs::write(dir.path().join("k"), &key).unwrap();
        let tls = ServerTls::load(&TlsConfig {
            cert: Some(dir.path().join("c")),
            key: Some(dir.path().join("k")),
        })
        .unwrap()
        .unwrap();
        drop(server);
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                use futures_lite::{AsyncReadExt, AsyncWriteExt};
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let server = glommio::spawn_local(async move {
                    let stream = listener.accept().await.unwrap();
                    let mut tls_stream = tls.accept(stream).await.unwrap();
                    let mut buf = [0u8; 5];
                    tls_stream.read_exact(&mut buf).await.unwrap();
                    tls_stream.write_all(b"pong!").await.unwrap();
                    tls_stream.flush().await.unwrap();
                    buf
                });
                let stream = glommio::net::TcpStream::connect(addr).await.unwrap();
                let mut client = connect(
                    client_config(CertificatePolicy::Unverified).unwrap(),
                    "mx.ringmail.test",
                    stream,
                )
                .await
                .unwrap();
                client.write_all(b"ping!").await.unwrap();
                client.flush().await.unwrap();
                let mut reply = [0u8; 5];
                client.read_exact(&mut reply).await.unwrap();
                assert_eq!(&reply, b"pong!");
                assert_eq!(&server.await, b"ping!");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    mod outbound {
        //! The relay side against a fake MX: the loop shape `relay::client` documents.

        use std::net::SocketAddr;

        use futures_lite::{AsyncReadExt, AsyncWriteExt};
        use glommio::net::{TcpListener, TcpStream};

        use super::super::*;
        use crate::relay::client::{
            data_terminator, ClientAction, OutgoingMessage, RecipientOutcome, SmtpClient, TlsStatus,
        };
        use crate::shard::stream::OutboundStream;

        /// How the fake MX treats STARTTLS.
        #[derive(Clone, Copy, PartialEq)]
        enum MxTls {
            /// Offers it and completes the handshake.
            Works,
            /// Offers it, says 220, then sends plain text instead of a ServerHello.
            Broken,
            /// Does not offer it.
            Absent,
        }

        /// What one fake-MX session saw.
        #[derive(Default, Debug)]
        struct Seen {
            /// Commands, one per line, in order.
            commands: Vec<String>,
            /// The message data (dot-stuffed, terminator excluded).
            data: Vec<u8>,
            /// Whether the data came over TLS.
            data_over_tls: bool,
        }

        async fn read_line<S: AsyncRead + Unpin>(stream: &mut S) -> Option<String> {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while !line.ends_with(b"\r\n") {
                if stream.read(&mut byte).await.ok()? == 0 {
                    return None;
                }
                line.push(byte[0]);
            }
            line.truncate(line.len() - 2);
            String::from_utf8(line).ok()
        }

        /// Serves SMTP lines until QUIT (None) or an accepted STARTTLS (Some(())).
        async fn mx_lines<S: AsyncRead + AsyncWrite + Unpin>(
            stream: &mut S,
            offer_starttls: bool,
            tls: bool,
            seen: &mut Seen,
        ) -> Option<()> {
            while let Some(line) = read_line(stream).await {
                seen.commands.push(line.clone());
                let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
                let reply: &[u8] = match verb.as_str() {
                    "EHLO" if offer_starttls => {
                        b"250-fake.mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
                    }
                    "EHLO" => b"250-fake.mx\r\n250 PIPELINING\r\n",
                    "STARTTLS" => {
                        stream.write_all(b"220 2.0.0 go ahead\r\n").await.ok()?;
                        stream.flush().await.ok()?;
                        return Some(());
                    }
                    "DATA" => {
                        stream.write_all(b"354 go\r\n").await.ok()?;
                        stream.flush().await.ok()?;
                        loop {
                            let line = read_line(stream).await?;
                            if line == "." {
                                break;
                            }
                            seen.data.extend_from_slice(line.as_bytes());
                            seen.data.extend_from_slice(b"\r\n");
                        }
                        seen.data_over_tls = tls;
                        b"250 2.0.0 queued\r\n"
                    }
                    "QUIT" => {
                        let _ = stream.write_all(b"221 bye\r\n").await;
                        let _ = stream.flush().await;
                        return None;
                    }
                    _ => b"250 2.0.0 ok\r\n",
                };
                stream.write_all(reply).await.ok()?;
                stream.flush().await.ok()?;
            }
            None
        }

        /// One fake-MX connection.
        async fn fake_mx(tcp: TcpStream, mode: MxTls, server: Rc<ServerTls>) -> Seen {
            let mut seen = Seen::default();
            let mut tcp = tcp;
            if tcp.write_all(b"220 fake.mx ESMTP\r\n").await.is_err() {
                return seen;
            }
            let offer = mode != MxTls::Absent;
            if mx_lines(&mut tcp, offer, false, &mut seen).await.is_none() {
                return seen;
            }
            if mode == MxTls::Broken {
                let _ = tcp.write_all(b"this is not a ServerHello\r\n").await;
                return seen;
            }
            let Ok(mut tls) = server.accept(tcp).await else {
                return seen;
            };
            mx_lines(&mut tls, false, true, &mut seen).await;
            seen
        }

        /// The relay delivery loop as `relay::client` documents it: one message, opportunistic
        /// STARTTLS, plain-text fallback on a failed handshake.
        async fn deliver(addr: SocketAddr, body: &[u8]) -> (TlsStatus, Vec<RecipientOutcome>) {
            let config = client_config(CertificatePolicy::Unverified).unwrap();
            let recipients = vec!["bob@far.test".to_string()];
            let message = OutgoingMessage {
                sender: "alice@example.test",
                recipients: &recipients,
                size_bytes: body.len() as u64,
                needs_8bitmime: false,
                needs_smtputf8: false,
            };
            let mut stream = OutboundStream::Plain(TcpStream::connect(addr).await.unwrap());
            let mut client = SmtpClient::opportunistic_tls("relay.example.test");
            let mut outcomes = Vec::new();
            let mut buf = vec![0u8; 4096];
            loop {
                match client.poll_action() {
                    Some(ClientAction::Send(bytes)) => {
                        stream.write_all(&bytes).await.unwrap();
                        stream.flush().await.unwrap();
                    }
                    Some(ClientAction::SendBody) => {
                        stream.write_all(body).await.unwrap();
                        stream.write_all(data_terminator(body)).await.unwrap();
                        stream.flush().await.unwrap();
                    }
                    Some(ClientAction::StartTls) => {
                        match stream.start_tls(Arc::clone(&config), "fake.mx").await {
                            Ok(tls) => {
                                stream = tls;
                                client.tls_established();
                            }
                            Err(e) => {
                                stream =
                                    OutboundStream::Plain(TcpStream::connect(addr).await.unwrap());
                                client = SmtpClient::after_tls_failure(
                                    "relay.example.test",
                                    &e.to_string(),
                                );
                            }
                        }
                    }
                    Some(ClientAction::Ready) if outcomes.is_empty() => {
                        client.send_message(&message).unwrap();
                    }
                    Some(ClientAction::Ready) => client.quit(),
                    Some(ClientAction::MessageDone(done)) => outcomes = done,
                    Some(ClientAction::Failed(reply)) => panic!("session failed: {reply}"),
                    Some(ClientAction::Close) => break,
                    None => match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => client.connection_closed(),
                        Ok(n) => client.received(&buf[..n]),
                    },
                }
            }
            (client.tls_status().clone(), outcomes)
        }

        fn run(mode: MxTls) -> (TlsStatus, Vec<RecipientOutcome>, Vec<Seen>) {
            let (cert, key) = super::self_signed("fake.mx");
            let server = server_config_from_pem(
                Path::new("c"),
                cert.as_bytes(),
                Path::new("k"),
                key.as_bytes(),
            )
            .unwrap();
            glommio::LocalExecutorBuilder::default()
                .spawn(move || async move {
                    let server = Rc::new(ServerTls {
                        cert_path: PathBuf::new(),
                        key_path: PathBuf::new(),
                        current: RwLock::new(server),
                    });
                    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                    let addr = listener.local_addr().unwrap();
                    let mx = glommio::spawn_local(async move {
                        let mut sessions = Vec::new();
                        // The fallback case connects twice.
                        let connections = if mode == MxTls::Broken { 2 } else { 1 };
                        for _ in 0..connections {
                            let tcp = listener.accept().await.unwrap();
                            sessions.push(fake_mx(tcp, mode, Rc::clone(&server)).await);
                        }
                        sessions
                    });
                    let body = b"Subject: hi\r\n\r\nover the relay\r\n";
                    let (status, outcomes) = deliver(addr, body).await;
                    (status, outcomes, mx.await)
                })
                .unwrap()
                .join()
                .unwrap()
        }

        use std::rc::Rc;

        #[test]
        fn relays_over_starttls_when_the_mx_offers_it() {
            let (status, outcomes, seen) = run(MxTls::Works);
            assert_eq!(status, TlsStatus::Encrypted);
            assert_eq!(outcomes, [RecipientOutcome::Delivered]);
            let seen = &seen[0];
            assert_eq!(
                seen.commands[..3],
                [
                    "EHLO relay.example.test",
                    "STARTTLS",
                    "EHLO relay.example.test"
                ]
            );
            assert!(seen.data_over_tls);
            assert_eq!(seen.data, b"Subject: hi\r\n\r\nover the relay\r\n");
        }

        #[test]
        fn falls_back_to_plain_text_when_the_handshake_fails() {
            let (status, outcomes, seen) = run(MxTls::Broken);
            assert!(matches!(status, TlsStatus::FellBack(_)), "{status:?}");
            assert_eq!(outcomes, [RecipientOutcome::Delivered]);
            assert!(seen[0].data.is_empty());
            assert!(!seen[1].commands.contains(&"STARTTLS".to_string()));
            assert!(!seen[1].data_over_tls && !seen[1].data.is_empty());
        }

        #[test]
        fn stays_plain_when_starttls_is_not_offered() {
            let (status, outcomes, seen) = run(MxTls::Absent);
            assert_eq!(status, TlsStatus::NotOffered);
            assert_eq!(outcomes, [RecipientOutcome::Delivered]);
            assert!(!seen[0].data_over_tls);
        }
    }
}
