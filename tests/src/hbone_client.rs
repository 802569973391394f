//! A hostile HBONE peer for the bad-input tests: a real TLS 1.3 + HTTP/2
//! client (rustls, h2) that presents whatever certificate the test gives
//! it (expired, from a foreign CA, or a valid mesh one), and then does what
//! a well-behaved ztunnel would not: CONNECT to an address that is not the
//! pod's, open and reset streams as fast as it can, or never finish its
//! handshake.
//!
//! Sockets are made inside a given network namespace (a node's), so the
//! traffic takes the cluster's own routes.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use redirector::identity::{Identity, MeshCa};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// A TCP connection to `to` made from inside network namespace `netns`
/// (a path under /run/netns).
pub fn connect_from(netns: &Path, to: SocketAddr) -> Result<std::net::TcpStream> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || -> Result<std::net::TcpStream> {
        let f = File::open(&netns).with_context(|| format!("{}", netns.display()))?;
        // SAFETY: setns on this short-lived thread only; it exits after.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            anyhow::bail!("setns {}: {}", netns.display(), std::io::Error::last_os_error());
        }
        let s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .join()
    .expect("connect thread")
}

/// A certificate for `id` from the CA in `ca_dir` (Istio's plug-in
/// layout), valid between the two times.
pub fn certificate(
    ca_dir: &Path,
    trust_domain: &str,
    id: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<Arc<CertifiedKey>> {
    let ca = MeshCa::load_plugin(ca_dir, trust_domain)?;
    Ok(ca.issue_between(id, not_before, not_after)?.key)
}

/// Accepts any server: this client is the one under suspicion.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
    fn has_certs(&self) -> bool {
        true
    }
}

pub type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// mTLS (TLS 1.3, ALPN h2) over `tcp`, presenting `cert`, offering the
/// key exchanges of rustls' aws-lc-rs provider.
pub async fn tls(tcp: std::net::TcpStream, cert: Arc<CertifiedKey>) -> std::io::Result<Tls> {
    tls_offering(tcp, cert, rustls::crypto::aws_lc_rs::DEFAULT_KX_GROUPS).await
}

/// [`tls`] offering only the key exchange groups `groups` (in order).
pub async fn tls_offering(
    tcp: std::net::TcpStream,
    cert: Arc<CertifiedKey>,
    groups: &[&'static dyn rustls::crypto::SupportedKxGroup],
) -> std::io::Result<Tls> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = groups.to_vec();
    let provider = Arc::new(provider);
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_client_cert_resolver(Arc::new(Fixed(cert)));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let peer = tcp.peer_addr()?;
    let tcp = tokio::net::TcpStream::from_std(tcp)?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(ServerName::IpAddress(peer.ip().into()), tcp).await
}

/// Whether the server ended the session (an alert or a close) within
/// `wait` instead of talking HTTP/2. In TLS 1.3 the server judges the
/// client certificate after the client's side of the handshake is done, so
/// a refusal shows up on the first read.
pub async fn closed_by_server(tls: &mut Tls, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 64];
    matches!(tokio::time::timeout(wait, tls.read(&mut b)).await, Ok(Ok(0) | Err(_)))
}

/// The alert the server ended the session with, if it sent one within
/// `wait` (a refused client certificate is judged after the client's
/// side of the TLS 1.3 handshake, so it shows on the first read).
pub async fn alert_from_server(tls: &mut Tls, wait: Duration) -> Option<rustls::AlertDescription> {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 64];
    match tokio::time::timeout(wait, tls.read(&mut b)).await {
        Ok(Err(e)) => match e.get_ref()?.downcast_ref::<rustls::Error>()? {
            rustls::Error::AlertReceived(a) => Some(*a),
            _ => None,
        },
        _ => None,
    }
}

/// The name of the key exchange a finished handshake used.
pub fn key_exchange(tls: &Tls) -> Option<String> {
    tls.get_ref().1.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()))
}

/// HTTP/2 over an established mTLS stream.
pub async fn h2(tls: Tls) -> Result<h2::client::SendRequest<bytes::Bytes>> {
    let (send, conn) = h2::client::handshake(tls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// [`h2`], with the connection's own task returned: its result says how
/// the server ended the connection (`Ok` only after a clean end: with TLS
/// close_notify; an EOF without it is an error).
pub async fn h2_watched(
    tls: Tls,
) -> Result<(h2::client::SendRequest<bytes::Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>)> {
    let (send, conn) = h2::client::handshake(tls).await?;
    Ok((send, tokio::spawn(conn)))
}

/// CONNECT `authority` on an HTTP/2 connection; the response status.
pub async fn connect(send: &mut h2::client::SendRequest<bytes::Bytes>, authority: SocketAddr) -> Result<u16> {
    let mut send = send.clone().ready().await?;
    let req = http::Request::builder().method(http::Method::CONNECT).uri(authority.to_string()).body(())?;
    let (resp, _stream) = send.send_request(req, false)?;
    let resp = tokio::time::timeout(Duration::from_secs(5), resp).await??;
    Ok(resp.status().as_u16())
}

/// A whole HBONE CONNECT from network namespace `netns`: TCP to `hbone`,
/// mTLS with `cert` offering `groups`, HTTP/2, CONNECT `target`. The key
/// exchange the handshake used and the CONNECT's status.
pub async fn connect_offering(
    netns: &Path,
    hbone: SocketAddr,
    cert: Arc<CertifiedKey>,
    groups: &[&'static dyn rustls::crypto::SupportedKxGroup],
    target: SocketAddr,
) -> Result<(Option<String>, u16)> {
    let tls = tls_offering(connect_from(netns, hbone)?, cert, groups).await?;
    let group = key_exchange(&tls);
    let mut send = h2(tls).await?;
    Ok((group, connect(&mut send, target).await?))
}

/// Open `n` CONNECT streams and reset each at once (the "rapid reset"
/// flood). Returns how many were sent before the server closed the
/// connection.
pub async fn flood(mut send: h2::client::SendRequest<bytes::Bytes>, authority: SocketAddr, n: usize) -> usize {
    let mut sent = 0;
    for _ in 0..n {
        send = match send.ready().await {
            Ok(s) => s,
            Err(_) => break,
        };
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority.to_string())
            .body(())
            .expect("request");
        match send.send_request(req, false) {
            Ok((_resp, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                sent += 1;
            }
            Err(_) => break,
        }
    }
    sent
}
