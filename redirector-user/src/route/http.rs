//! L7: HTTP/1.1 and HTTP/2 (h2c) through the node proxy, with hyper. A
//! connection is served here ([`serve`], with a lingering close); each
//! request goes through three steps, each its own file: [`select`] (which
//! VirtualService rule, first match wins), [`filters`] (faults, redirect,
//! rewrite, header operations) and [`forward`] (breakers, mirroring,
//! attempts, retries and timeouts, the endpoint from the balancer). Then
//! Istio's request metrics and one access-log line with Envoy's response
//! flags are written, once, in `handle`.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::HOST;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::info;

mod filters;
mod forward;
mod select;
#[cfg(test)]
mod tests;

use crate::mesh::model::{Action, Mesh, Protocol};
use crate::mesh::MeshHandle;
use crate::transport::http_client::{Body, MutualTls, Upstreams};
use filters::Fault;
use forward::{Dial, Outcome, Routed, Target};

/// The largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 60 * 1024;

/// After the proxy ends a client connection, how long and how much it keeps
/// reading (and discarding) before it closes: see `linger`.
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_BYTES: usize = 1024 * 1024;

/// What one connection carries into each request.
#[derive(Clone)]
pub struct ConnContext {
    pub mesh: MeshHandle,
    pub upstreams: Upstreams,
    pub balancer: std::sync::Arc<crate::endpoint::Balancer>,
    pub client: SocketAddr,
    pub original_dst: SocketAddr,
    /// The service the connection was addressed to (none on a gateway).
    pub service: Option<usize>,
    /// Set on a gateway listener: routes come from the VirtualServices
    /// bound to the Gateways on this port.
    pub gateway_port: Option<u16>,
    /// Set on a gateway listener: the scheme its clients use. The edge's
    /// headers are then set as Envoy's gateway does (see
    /// `filters::edge_headers`).
    pub forwarded_proto: Option<&'static str>,
    pub protocol: Protocol,
    pub metrics: std::sync::Arc<crate::telemetry::Metrics>,
    /// Write the per-request access log line.
    pub access_log: bool,
    /// The source workload (name, namespace), where known.
    pub source: Option<(String, String)>,
    /// A request head not in by then, from the connection's opening or
    /// its previous response, closes the connection (a slow client, or
    /// one idle between requests); `None`: no limit.
    pub header_read_timeout: Option<Duration>,
}

/// Streams an HTTP/2 client may reset before they are answered, or make
/// the proxy reset, before its connection is closed (h2's default for the
/// first; Envoy closes at a similar count).
const MAX_PENDING_RESETS: usize = 20;
/// Requests in flight on one HTTP/2 connection (Envoy's gateway default is
/// 100; a pod's connection shares a node proxy).
const MAX_STREAMS: u32 = 100;

/// Serve HTTP on a captured connection until the client closes it.
pub async fn serve<S>(stream: S, ctx: ConnContext)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (ctx_client, ctx_port, head_timeout) = (ctx.client, ctx.original_dst.port(), ctx.header_read_timeout);
    let (back, returned) = tokio::sync::oneshot::channel();
    let io = TokioIo::new(Returned { io: Some(stream), back: Some(back) });
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(req, ctx).await) }
    });
    // HTTP/1.1, or HTTP/2 when the client opens with its preface (h2c
    // prior knowledge). Malformed requests get 400 and oversized headers
    // 431 from hyper, and the connection closes.
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Request heads over 60 KiB get 431, as Envoy's default limit.
    builder.http1().max_buf_size(MAX_HEAD);
    if let Some(t) = head_timeout {
        builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(t);
    }
    // HTTP/2 from a pod: a client that opens streams and resets them before
    // they are answered (the "rapid reset" flood) loses its connection
    // (GOAWAY ENHANCE_YOUR_CALM) past MAX_PENDING_RESETS; at most
    // MAX_STREAMS requests of one connection are in flight at once.
    builder
        .http2()
        .max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .max_local_error_reset_streams(Some(MAX_PENDING_RESETS))
        .max_concurrent_streams(Some(MAX_STREAMS))
        .max_header_list_size(MAX_HEAD as u32);
    let (client, port) = (ctx_client, ctx_port);
    if let Err(e) = builder.serve_connection(io, svc).await {
        let malformed = e.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_parse() && !h.is_parse_too_large());
        if malformed && first_not_http(client.ip(), port) {
            tracing::warn!(
                %client,
                port,
                error = %e,
                "a connection to a port declared HTTP does not carry HTTP: answered 400 and closed (logged once per client and port); if this port carries another protocol, declare it (a port name `tcp-...` or appProtocol `tcp`)"
            );
        } else {
            tracing::debug!(error = %e, "HTTP connection ended with an error");
        }
    }
    if let Ok(stream) = returned.await {
        linger(stream).await;
    }
}

/// The (client address, port) pairs already warned about a connection that
/// is not HTTP on a port declared HTTP. Bounded: past `NOT_HTTP_KEPT`
/// pairs, further ones are logged at debug level only.
static NOT_HTTP: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<(std::net::IpAddr, u16)>>> =
    std::sync::LazyLock::new(Default::default);
const NOT_HTTP_KEPT: usize = 4096;

/// Whether this is the first non-HTTP connection from `client` to `port`.
fn first_not_http(client: std::net::IpAddr, port: u16) -> bool {
    let mut seen = NOT_HTTP.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    seen.len() < NOT_HTTP_KEPT && seen.insert((client, port))
}

/// Close a client connection as nginx's lingering close does: send FIN,
/// then read and discard what the client still sends until it closes, for
/// at most `LINGER_TIME` and `LINGER_BYTES`, and only then close the
/// socket. A socket closed with unread bytes in its receive queue sends a
/// reset instead of FIN, and a reset can destroy the last response before
/// the client reads it: the 400 or 431 for a request hyper stopped reading
/// half-way, or a response sent before a request body was read. When the
/// client closed first (the usual end) the first read returns end of file
/// and this costs one `shutdown` and one `read`.
async fn linger<S>(mut stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // hyper may have shut the write side already; a second shutdown's
    // error changes nothing here.
    let _ = stream.shutdown().await;
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut buf = vec![0u8; 16 * 1024];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
}

/// The client stream as hyper sees it. When hyper drops it (the connection
/// is over), the stream is sent back to `serve` instead of being closed, so
/// `linger` can close it without losing the last response.
struct Returned<S> {
    io: Option<S>,
    back: Option<tokio::sync::oneshot::Sender<S>>,
}

impl<S> Returned<S> {
    fn io(&mut self) -> Pin<&mut S>
    where
        S: Unpin,
    {
        Pin::new(self.io.as_mut().expect("the stream is only taken on drop"))
    }
}

impl<S> Drop for Returned<S> {
    fn drop(&mut self) {
        if let (Some(io), Some(back)) = (self.io.take(), self.back.take()) {
            let _ = back.send(io);
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Returned<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.get_mut().io().poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Returned<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.get_mut().io().poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().io().poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(tokio::io::AsyncWrite::is_write_vectored)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().io().poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().io().poll_shutdown(cx)
    }
}

/// A response body that counts its bytes and reports them when done, and
/// holds the destination's connection slot (its circuit breaker) until
/// then: an HTTP/1.1 connection is busy until its response is sent.
pub(crate) struct Observed {
    inner: Body,
    bytes: u64,
    done: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Observed {
    /// `body`, with `done` called with its length when it has been sent
    /// (or dropped).
    pub(crate) fn new(inner: Body, done: impl FnOnce(u64) + Send + Sync + 'static) -> Observed {
        Observed { inner, bytes: 0, done: Some(Box::new(done)), _slot: None }
    }
}

impl hyper::body::Body for Observed {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.bytes += d.len() as u64;
            }
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d(self.bytes);
        }
    }
}

async fn handle(req: Request<Incoming>, ctx: ConnContext) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path_and_query().map_or_else(|| "/".into(), std::string::ToString::to_string);
    let authority = req.headers().get(HOST).and_then(|h| h.to_str().ok()).unwrap_or_default().to_string();
    let mesh = ctx.mesh.current();
    let request_bytes = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let mut target = Target { service: ctx.service, ..Default::default() };
    let out = route(req, &ctx, &mesh, &mut target).await;
    let status = out.response.status().as_u16();
    // Istio's request metrics.
    let (svc_host, svc_ns) = match target.service.and_then(|i| mesh.services.get(i)) {
        Some(s) => (s.hostname.as_str(), s.namespace.as_str()),
        None => ("unknown", "unknown"),
    };
    let workload = target.labels.get("app").map_or("unknown", String::as_str);
    let version = target.labels.get("version").map_or("unknown", String::as_str);
    let source = ctx.source.as_ref();
    // Over HBONE the response carries both identities of its connection.
    let tls = out.response.extensions().get::<MutualTls>().cloned();
    let series = ctx.metrics.request_series(
        (
            source.map(|s| s.0.clone()).unwrap_or_default(),
            svc_host.to_string(),
            workload.to_string(),
            version.to_string(),
            status,
            out.flags,
            tls.as_ref().map(|t| t.peer.clone()),
        ),
        || {
            let mut l = crate::telemetry::Labels::to_service(svc_host, svc_ns, workload, version, "http");
            l.response_code = status.to_string().into();
            l.response_flags = crate::telemetry::label(out.flags);
            if let Some((name, ns)) = source {
                l.source_workload = crate::telemetry::label(name);
                l.source_workload_namespace = crate::telemetry::label(ns);
            }
            if let Some(t) = &tls {
                l.source_principal = t.own.to_string().into();
                l.destination_principal = t.peer.to_string().into();
                l.connection_security_policy = "mutual_tls".into();
            }
            l
        },
    );
    series.requests.inc();
    series.duration_ms.observe(started.elapsed().as_secs_f64() * 1000.0);
    series.request_bytes.observe(request_bytes);
    let response_bytes = series.response_bytes.clone();
    let (parts, body) = out.response.into_parts();
    let observed = Observed {
        inner: body,
        bytes: 0,
        done: Some(Box::new(move |n| response_bytes.observe(n as f64))),
        _slot: target.slot.take(),
    };
    let response = Response::from_parts(parts, observed.boxed());
    if !ctx.access_log {
        return response;
    }
    info!(
        target: "access",
        client = %ctx.client,
        source_workload = ctx.source.as_ref().map_or("unknown", |s| s.0.as_str()),
        original_dst = %ctx.original_dst,
        method = %method,
        authority = %authority,
        path = %path,
        response_code = status,
        response_flags = out.flags,
        upstream = out.upstream.as_deref().unwrap_or("-"),
        upstream_principal = tls.as_ref().map_or_else(|| "-".to_string(), |t| t.peer.to_string()),
        route = out.route.as_deref().unwrap_or("-"),
        duration_ms = started.elapsed().as_millis() as u64,
        "request"
    );
    response
}

/// Route one request: select the rule, apply its filters, forward.
async fn route(mut req: Request<Incoming>, ctx: &ConnContext, mesh: &Mesh, target: &mut Target) -> Outcome {
    if let Some(proto) = ctx.forwarded_proto {
        filters::edge_headers(req.headers_mut(), ctx.client.ip(), proto, |n| mesh.random(n));
    }
    let port = ctx.original_dst.port();
    let client_ns = ctx.source.as_ref().map(|s| s.1.as_str());
    let selected = match select::select(mesh, ctx.service, ctx.gateway_port, client_ns, &req, port) {
        Ok(s) => s,
        Err(no) => return Outcome::refuse(no.status, no.body, no.flags, None),
    };
    let rule = selected.rule.as_ref();
    let route = Some(rule.source.clone());
    let fault = Fault::decide(rule, |p| mesh.chance(p));
    if let Some(d) = fault.delay() {
        tokio::time::sleep(d).await;
    }
    if let Some(response) = fault.abort_response(rule) {
        return Outcome { response, flags: "FI", upstream: None, route };
    }
    let dests = match &rule.action {
        Action::Redirect(red) => {
            return Outcome { response: filters::redirect(red, &req), flags: fault.flags(), upstream: None, route }
        }
        Action::Route(d) => d,
    };
    let roll = mesh.random(crate::route::total_weight(dests).max(1) as usize) as u32;
    let Some(dest) = crate::route::weighted(dests, roll).or(dests.first()) else {
        return Outcome::refuse(StatusCode::SERVICE_UNAVAILABLE, "no destination\n", "NR", route);
    };
    let (mut parts, body) = req.into_parts();
    filters::rewrite(&mut parts, rule, selected.matched);
    filters::request_headers(&mut parts, rule, dest, ctx.original_dst);
    let dial = Dial {
        upstreams: &ctx.upstreams,
        balancer: &ctx.balancer,
        client: ctx.client,
        original_dst: ctx.original_dst,
        protocol: ctx.protocol,
    };
    let routed = Routed { rule, dest, flags: fault.flags(), route };
    forward::forward(parts, body, routed, &dial, mesh, target).await
}
