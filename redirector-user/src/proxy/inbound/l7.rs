//! Destination-side L7: HTTP arriving for an HTTP-declared port of a pod
//! (on an HBONE stream, or plaintext under PERMISSIVE) is served by the
//! node proxy as the pod's sidecar would: AuthorizationPolicy per request
//! with every field (paths, methods, hosts, request headers; 403 `RBAC:
//! access denied`), Istio's request metrics with `reporter="destination"`,
//! one access-log line per request, and the request forwarded to the app
//! over a pooled connection made in the pod's namespace.
//!
//! It does not route: the source node chose this pod already.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::identity::Identity;
use crate::mesh::model::Protocol;
use crate::mesh::security::RequestAttrs;
use crate::telemetry::{Labels, RequestSeries};
use crate::transport::http_client::Body;
use crate::transport::socket::WorkloadNet;

/// The largest request head accepted (as the source side's).
const MAX_HEAD: usize = 60 * 1024;

/// Envoy's body for a request RBAC denied.
const RBAC_DENIED: &str = "RBAC: access denied";

/// Dials the app from inside the pod's namespace.
#[derive(Clone)]
pub struct AppConnector {
    workload: Arc<WorkloadNet>,
    mark: u32,
    timeout: Duration,
}

impl tower_service::Service<Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_matches(|c| c == '[' || c == ']');
            let ip = host.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not an address"))?;
            let target = SocketAddr::new(ip, uri.port_u16().unwrap_or(80));
            match tokio::time::timeout(this.timeout, this.workload.connect(target, this.mark)).await {
                Ok(s) => s.map(TokioIo::new),
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {target} timed out"))),
            }
        })
    }
}

/// The pod's app as an HTTP upstream: pooled connections, HTTP/1.1 or
/// HTTP/2 as its port declares.
pub struct AppClients {
    http1: Client<AppConnector, Incoming>,
    http2: Client<AppConnector, Incoming>,
}

impl AppClients {
    pub fn new(workload: Arc<WorkloadNet>, mark: u32, timeout: Duration) -> AppClients {
        let connector = AppConnector { workload, mark, timeout };
        let mut b1 = Client::builder(TokioExecutor::new());
        b1.pool_idle_timeout(Duration::from_secs(30));
        let mut b2 = Client::builder(TokioExecutor::new());
        b2.http2_only(true);
        AppClients { http1: b1.build(connector.clone()), http2: b2.build(connector) }
    }
}

/// What destination-side L7 needs of one pod.
pub struct Local {
    pub workload: Arc<WorkloadNet>,
    pub mesh: crate::mesh::MeshHandle,
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// One access-log line per request.
    pub access_log: bool,
    pub app: AppClients,
    /// A request head not in by then (from the connection's opening or
    /// its previous response) closes the connection.
    pub header_read_timeout: std::time::Duration,
}

/// One inbound HTTP connection: who it is from and where it goes.
pub(super) struct Conn {
    pub(super) peer: SocketAddr,
    /// The peer's identity (HBONE); `None`: plaintext.
    pub(super) peer_id: Option<Identity>,
    pub(super) dst: SocketAddr,
    /// The Service whose port targets `dst`'s port, and that port's protocol.
    pub(super) service: usize,
    pub(super) protocol: Protocol,
    /// The source workload (name, namespace), when the peer named it and
    /// its identity vouches for it.
    pub(super) source: Option<(String, String)>,
}

/// Serve HTTP on an admitted inbound stream until the peer closes it.
pub(super) async fn serve<S>(stream: S, conn: Conn, ctx: Arc<Local>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let head_timeout = ctx.header_read_timeout;
    let svc = hyper::service::service_fn(move |req| {
        let (conn, ctx) = (Arc::clone(&conn), Arc::clone(&ctx));
        async move { Ok::<_, Infallible>(handle(req, &conn, &ctx).await) }
    });
    // A port declared HTTP that carries something else gets hyper's 400
    // and the connection closes.
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(MAX_HEAD).timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(head_timeout);
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
        debug!(error = %e, "inbound HTTP connection ended with an error");
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// One request: the policy check, then the app.
async fn handle(req: Request<Incoming>, conn: &Conn, ctx: &Local) -> Response<Body> {
    let started = Instant::now();
    let mesh = ctx.mesh.current();
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(hyper::http::uri::Authority::as_str))
        .unwrap_or_default()
        .to_string();
    let method = req.method().clone();
    let path = req.uri().path_and_query().map_or_else(|| "/".into(), ToString::to_string);
    let pod = mesh.pods.iter().find(|p| p.namespace == ctx.workload.namespace && p.name == ctx.workload.name);
    let attrs = RequestAttrs { method: method.as_str(), path: req.uri().path(), host: &host, headers: req.headers() };
    let decision = match pod {
        Some(pod) => {
            mesh.security.authorize_request(pod, conn.peer_id.as_ref(), conn.peer.ip(), conn.dst.port(), &attrs)
        }
        None => Ok(()),
    };
    let request_bytes = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let (response, flags, denied) = if let Err(why) = decision {
        ctx.metrics.denied(ctx.workload.labels(), conn.peer_id.as_ref()).inc();
        (text(StatusCode::FORBIDDEN, RBAC_DENIED), "-", Some(why))
    } else {
        let (r, f) = forward(req, conn, ctx, &host, &path).await;
        (r, f, None)
    };
    let status = response.status().as_u16();
    let grpc = response.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let series = record(ctx, conn, &mesh, (status, flags, grpc), request_bytes, started);
    let (parts, body) = response.into_parts();
    let response_bytes = series.response_bytes;
    let body = crate::route::http::Observed::new(body, move |n| response_bytes.observe(n as f64));
    let response = Response::from_parts(parts, body.boxed());
    if ctx.access_log {
        info!(
            target: "access",
            peer = %conn.peer,
            peer_identity = conn.peer_id.as_ref().map_or_else(|| "-".to_string(), ToString::to_string),
            source_workload = conn.source.as_ref().map_or("unknown", |s| s.0.as_str()),
            dst = %conn.dst,
            workload = %ctx.workload.describe(),
            method = %method,
            authority = %host,
            path = %path,
            response_code = status,
            response_flags = flags,
            reason = denied.as_deref().unwrap_or("-"),
            duration_ms = started.elapsed().as_millis() as u64,
            "inbound request"
        );
    }
    response
}

/// An allowed request to the app, on the pod's pooled connections; the
/// response and its flags.
async fn forward(
    mut req: Request<Incoming>,
    conn: &Conn,
    ctx: &Local,
    host: &str,
    path: &str,
) -> (Response<Body>, &'static str) {
    // Absolute form for the client; the Host the source sent stays.
    if !req.headers().contains_key(HOST) {
        if let Ok(v) = HeaderValue::from_str(host) {
            req.headers_mut().insert(HOST, v);
        }
    }
    let uri = format!("http://{}{path}", conn.dst);
    *req.uri_mut() = uri.parse().unwrap_or_else(|_| Uri::from_static("/"));
    let client = if conn.protocol == Protocol::Http2 {
        *req.version_mut() = Version::HTTP_2;
        &ctx.app.http2
    } else {
        *req.version_mut() = Version::HTTP_11;
        &ctx.app.http1
    };
    match client.request(req).await {
        Ok(r) => (r.map(BodyExt::boxed), "-"),
        Err(e) => {
            debug!(error = %e, dst = %conn.dst, "inbound: the app did not answer");
            (text(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers"), "UF")
        }
    }
}

/// Istio's request metrics, as the destination reports them.
fn record(
    ctx: &Local,
    conn: &Conn,
    mesh: &crate::mesh::model::Mesh,
    (status, flags, grpc): (u16, &'static str, bool),
    request_bytes: f64,
    started: Instant,
) -> RequestSeries {
    let svc = mesh.services.get(conn.service);
    let (svc_host, svc_ns) = svc.map_or(("unknown", "unknown"), |s| (s.hostname.as_str(), s.namespace.as_str()));
    let pod = mesh.pods.iter().find(|p| p.namespace == ctx.workload.namespace && p.name == ctx.workload.name);
    let version = pod.and_then(|p| p.labels.get("version")).map_or("unknown", String::as_str);
    let workload = pod.and_then(|p| p.labels.get("app")).map_or(ctx.workload.name.as_str(), String::as_str);
    let protocol = if grpc { "grpc" } else { "http" };
    let key = (
        // Reporter, protocol and source: never a source workload name.
        match &conn.source {
            Some((name, ns)) => format!("destination/{protocol}/{ns}/{name}"),
            None => format!("destination/{protocol}"),
        },
        svc_host.to_string(),
        workload.to_string(),
        version.to_string(),
        status,
        flags,
        conn.peer_id.clone(),
    );
    let series = ctx.metrics.request_series(key, || {
        let mut l = Labels::to_service(svc_host, svc_ns, workload, version, protocol);
        l.reporter = "destination".into();
        l.response_code = status.to_string().into();
        l.response_flags = crate::telemetry::label(flags);
        l.destination_workload_namespace = crate::telemetry::label(&ctx.workload.namespace);
        if let Some(own) = &ctx.workload.identity {
            l.destination_principal = own.to_string().into();
        }
        if let Some((name, ns)) = &conn.source {
            l.source_workload = crate::telemetry::label(name);
            l.source_workload_namespace = crate::telemetry::label(ns);
        }
        if let Some(p) = &conn.peer_id {
            l.source_principal = p.to_string().into();
            if conn.source.is_none() {
                l.source_workload_namespace = crate::telemetry::label(&p.namespace);
            }
            l.connection_security_policy = "mutual_tls".into();
        }
        l
    });
    series.requests.inc();
    series.duration_ms.observe(started.elapsed().as_secs_f64() * 1000.0);
    series.request_bytes.observe(request_bytes);
    series
}
