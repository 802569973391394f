//! The HTTP clients of L7 routing (the sidecar's upstream clusters):
//! connection pools per endpoint for HTTP/1.1 and HTTP/2, per workload, dialling through
//! [`crate::transport::Transport::connect`] like every other caller. They
//! decide nothing about which endpoint a request goes to.

#![forbid(unsafe_code)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::identity::Identity;
use crate::mesh::MeshHandle;
use crate::transport::h2stream::H2Stream;
use crate::transport::socket::WorkloadNet;
use crate::transport::{Mtls, Transport, Upstream};

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// Opens upstream connections for the HTTP clients of one workload (a pod,
/// or the agent's own namespace), names resolved at connect time. With
/// [`Mtls::WhenEnrolled`] a connection to an enrolled pod is a CONNECT
/// stream on the pooled mutual-TLS connection to it, with the workload's
/// identity, the peer's checked as for L4.
#[derive(Clone)]
pub(crate) struct Connector {
    pub(crate) transport: Transport,
    pub(crate) from: Arc<WorkloadNet>,
    pub(crate) mesh: MeshHandle,
    pub(crate) mtls: Mtls,
}

/// Both identities of an upstream HTTP connection that went over HBONE:
/// set in the extensions of every response that came over it, for the
/// request metrics and the access log.
#[derive(Clone, Debug)]
pub(crate) struct MutualTls {
    pub(crate) own: Identity,
    pub(crate) peer: Identity,
}

/// An upstream HTTP connection: plain TCP, or an HBONE stream.
pub(crate) enum MeshIo {
    Plain(TcpStream),
    Hbone { stream: Box<H2Stream>, tls: MutualTls },
}

impl Connection for MeshIo {
    fn connected(&self) -> Connected {
        match self {
            MeshIo::Plain(s) => s.connected(),
            MeshIo::Hbone { tls, .. } => Connected::new().extra(tls.clone()),
        }
    }
}

impl AsyncRead for MeshIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MeshIo::Hbone { stream, .. } => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MeshIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MeshIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MeshIo::Hbone { stream, .. } => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshIo::Plain(s) => Pin::new(s).poll_flush(cx),
            MeshIo::Hbone { stream, .. } => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MeshIo::Hbone { stream, .. } => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<MeshIo>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_matches(|c| c == '[' || c == ']').to_string();
            let port = uri.port_u16().unwrap_or(80);
            let target = match host.parse() {
                Ok(ip) => SocketAddr::new(ip, port),
                Err(_) => tokio::net::lookup_host((host.as_str(), port))
                    .await?
                    .next()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address")))?,
            };
            let mesh = this.mesh.current();
            let connected = this.transport.connect(&mesh, target, &this.from, this.mtls, None).await?;
            Ok(TokioIo::new(match (connected.upstream, connected.peer_identity, this.from.identity.as_ref()) {
                (Upstream::Hbone(stream), Some(peer), Some(own)) => {
                    MeshIo::Hbone { stream: Box::new(stream), tls: MutualTls { own: own.clone(), peer } }
                }
                (Upstream::Plain(s), _, _) => MeshIo::Plain(s),
                (Upstream::Hbone(_), _, _) => {
                    return Err(io::Error::other("an HBONE stream without both identities (a bug): refused"))
                }
            }))
        })
    }
}

/// The upstream HTTP clients (connection pools per endpoint), shared by
/// every connection.
#[derive(Clone)]
pub(crate) struct Upstreams {
    pub(crate) http1: Client<Connector, Body>,
    pub(crate) http2: Client<Connector, Body>,
}

impl Upstreams {
    pub(crate) fn new(connector: Connector) -> Upstreams {
        let mut b1 = Client::builder(TokioExecutor::new());
        b1.pool_idle_timeout(Duration::from_secs(30));
        let mut b2 = Client::builder(TokioExecutor::new());
        b2.http2_only(true);
        Upstreams { http1: b1.build(connector.clone()), http2: b2.build(connector) }
    }
}
