//! The HTTP clients of L7 routing (the sidecar's upstream clusters):
//! connection pools per endpoint for HTTP/1.1 and HTTP/2, dialling through
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
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::mesh::MeshHandle;
use crate::transport::socket::WorkloadNet;
use crate::transport::{Mtls, Transport, Upstream};

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// Opens upstream connections for the HTTP clients from the agent's own
/// namespace, names resolved at connect time. L7 requests carry no
/// per-request source identity yet, so they never take HBONE.
#[derive(Clone)]
pub(crate) struct Connector {
    pub(crate) transport: Transport,
    pub(crate) from: Arc<WorkloadNet>,
    pub(crate) mesh: MeshHandle,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
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
            match this.transport.connect(&mesh, target, &this.from, Mtls::Never, None).await?.upstream {
                Upstream::Plain(s) => Ok(TokioIo::new(s)),
                Upstream::Hbone(_) => {
                    Err(io::Error::other("the HTTP client was handed an HBONE stream it cannot carry"))
                }
            }
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
