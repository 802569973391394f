//! Istio's certificate API, `istio.v1.auth.IstioCertificateService`, as
//! istiod serves it on 15012 and ztunnel calls it: gRPC over TLS (ALPN
//! h2), the caller's service-account token as `authorization: Bearer`, one
//! unary call, `CreateCertificate`.
//!
//! The messages are Istio's `security/v1alpha1/ca.proto`, written with
//! prost's derive (same field numbers and types, so the wire form is
//! Istio's): the request's `csr` (1), `validity_duration` in seconds (3)
//! and `metadata` (4, a `google.protobuf.Struct` whose
//! `ImpersonatedIdentity` names the identity a node agent asks for on a
//! pod's behalf); the response's `cert_chain` (1), leaf first, root last.
//!
//! This file holds the wire (messages, the client, the server's call
//! glue); who may get what is `crate::ca`.

#![forbid(unsafe_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::RootCertStore;

use super::Identity;

/// The gRPC service and method, as istiod registers them.
pub const SERVICE: &str = "istio.v1.auth.IstioCertificateService";
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The metadata key a node agent names the pod's identity with.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The token audience Istio's CA requires.
pub const TOKEN_AUDIENCE: &str = "istio-ca";
/// Istio's CA port.
pub const CA_PORT: u16 = 15012;
/// A request larger than this is refused before it is decoded.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested validity in seconds (optional; the CA caps it).
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Opaque metadata; `ImpersonatedIdentity` is read.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM-encoded certificate chain, leaf first, root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

impl IstioCertificateRequest {
    /// A request for `csr`; `on_behalf_of` set when a node agent asks for
    /// a pod's identity.
    pub fn new(csr: String, lifetime: Duration, on_behalf_of: Option<&Identity>) -> IstioCertificateRequest {
        let metadata = on_behalf_of.map(|id| prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
            )]
            .into_iter()
            .collect(),
        });
        IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
            metadata,
        }
    }

    /// The identity the caller asks for on another's behalf, if any.
    pub fn impersonated(&self) -> Option<&str> {
        match self.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?.kind.as_ref()? {
            prost_types::value::Kind::StringValue(s) => Some(s.as_str()),
            _ => None,
        }
    }
}

/// Where the CA is: each call resolves again (a Service's endpoints
/// change), and the addresses are tried in turn.
pub type Resolve = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Vec<SocketAddr>> + Send>> + Send + Sync>;
/// The roots the CA's serving certificate must chain to, now.
pub type Roots = Arc<dyn Fn() -> Arc<RootCertStore> + Send + Sync>;

/// A connection to an Istio-compatible CA.
#[derive(Clone)]
pub struct CaClient {
    channel: tonic::transport::Channel,
    pub address: String,
}

impl CaClient {
    /// A client of the CA at `address` (`host:port`, `host` the name its
    /// certificate carries), found through `resolve`, trusted through
    /// `roots`. Connects on first use and again after a failure.
    pub fn new(address: &str, resolve: Resolve, roots: Roots, timeout: Duration) -> Result<CaClient, String> {
        let host = address
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .ok_or_else(|| format!("mesh.caAddress `{address}` is not host:port"))?;
        let server_name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| format!("mesh.caAddress `{address}`: `{host}` is not a host name or address"))?;
        let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{address}"))
            .map_err(|e| format!("mesh.caAddress `{address}`: {e}"))?
            .connect_timeout(timeout)
            .timeout(timeout);
        let connector = Connector { server_name, resolve, roots, next: Arc::new(AtomicUsize::new(0)), timeout };
        Ok(CaClient { channel: endpoint.connect_with_connector_lazy(connector), address: address.to_string() })
    }

    /// `CreateCertificate` with `token` as the caller's credential.
    pub async fn create_certificate(
        &self,
        token: &str,
        request: IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, tonic::Status> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("the CA at {} is unreachable: {e}", self.address)))?;
        let mut req = tonic::Request::new(request);
        let bearer = format!("Bearer {}", token.trim());
        let value =
            bearer.parse().map_err(|_| tonic::Status::unauthenticated("the token is not a valid header value"))?;
        req.metadata_mut().insert("authorization", value);
        let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE);
        grpc.unary(req, path, tonic_prost::ProstCodec::default()).await.map(tonic::Response::into_inner)
    }
}

/// TCP to one of the CA's addresses, then TLS 1.3 checking its name.
#[derive(Clone)]
struct Connector {
    server_name: rustls::pki_types::ServerName<'static>,
    resolve: Resolve,
    roots: Roots,
    next: Arc<AtomicUsize>,
    timeout: Duration,
}

type Io = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower::Service<http::Uri> for Connector {
    type Response = Io;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Io, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addrs = (this.resolve)().await;
            if addrs.is_empty() {
                return Err(std::io::Error::other("the CA's address resolves to nothing"));
            }
            // Round robin over the replicas; each failure moves to the next.
            let first = this.next.fetch_add(1, Ordering::Relaxed);
            let mut last = None;
            for i in 0..addrs.len() {
                let addr = addrs[(first + i) % addrs.len()];
                match this.connect(addr).await {
                    Ok(io) => return Ok(io),
                    Err(e) => {
                        tracing::debug!(%addr, error = %e, "CA replica unreachable; trying the next");
                        last = Some(e);
                    }
                }
            }
            Err(last.unwrap_or_else(|| std::io::Error::other("no CA address")))
        })
    }
}

impl Connector {
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<Io> {
        let tcp = tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let _ = tcp.set_nodelay(true);
        let mut cfg = rustls::ClientConfig::builder_with_provider(super::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(std::io::Error::other)?
            .with_root_certificates((self.roots)())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tls = tokio::time::timeout(
            self.timeout,
            tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        Ok(TokioIo::new(tls))
    }
}

/// Answer one HTTP/2 request as the gRPC service: `CreateCertificate`
/// through `handler`, anything else `UNIMPLEMENTED`. Requests over
/// [`MAX_REQUEST_BYTES`] are refused undecoded.
pub async fn serve_request<B, H, F>(
    req: http::Request<B>,
    handler: H,
) -> (http::Response<tonic::body::Body>, Option<tonic::Status>)
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    H: Fn(tonic::Request<IstioCertificateRequest>) -> F + Clone + Send + 'static,
    F: Future<Output = Result<tonic::Response<IstioCertificateResponse>, tonic::Status>> + Send + 'static,
{
    if req.uri().path() != CREATE_CERTIFICATE {
        let status =
            tonic::Status::unimplemented(format!("{} is not served here; only {CREATE_CERTIFICATE}", req.uri().path()));
        return (status.clone().into_http(), Some(status));
    }
    let mut grpc = tonic::server::Grpc::new(
        tonic_prost::ProstCodec::<IstioCertificateResponse, IstioCertificateRequest>::default(),
    )
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    // Whether the message decoded and reached the handler: if not, tonic
    // answered by itself (a garbage, truncated or oversized frame), and
    // the caller is told which status it got.
    let reached = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::clone(&reached);
    let handler = move |r| {
        seen.store(true, Ordering::Relaxed);
        handler(r)
    };
    let resp = grpc.unary(tower::service_fn(handler), req).await;
    if reached.load(Ordering::Relaxed) {
        return (resp, None);
    }
    let status = tonic::Status::from_header_map(resp.headers())
        .unwrap_or_else(|| tonic::Status::internal("the request was not answered"));
    (resp, Some(status))
}
