//! L7: HTTP/1.1 and HTTP/2 (h2c) through the node proxy, with hyper. Each
//! request is matched against the VirtualService rules of the service the
//! connection was addressed to (first match wins), then faults, redirects,
//! rewrites, header operations, weighted destinations, subsets, load
//! balancing, timeouts and retries are applied as Istio does, and one
//! access log line is written with Envoy's response flags.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::info;

use crate::endpoint::Result5xx;
use crate::mesh::model::{Action, Address, HttpRouteRule, Mesh, Protocol, StringMatcher};
use crate::mesh::resources::{HeaderOperations, Headers};
use crate::mesh::MeshHandle;
use crate::transport::http_client::{Body, Upstreams};

/// The largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 60 * 1024;

/// After the proxy ends a client connection, how long and how much it keeps
/// reading (and discarding) before it closes: see `linger`.
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_BYTES: usize = 1024 * 1024;

/// Request bodies up to this size are kept so a retry can send them again.
const REPLAYABLE_BODY: u64 = 64 * 1024;

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
    pub protocol: Protocol,
    pub metrics: std::sync::Arc<crate::telemetry::Metrics>,
    /// Write the per-request access log line.
    pub access_log: bool,
    /// The source workload (name, namespace), where known.
    pub source: Option<(String, String)>,
}

/// Serve HTTP on a captured connection until the client closes it.
pub async fn serve<S>(stream: S, ctx: ConnContext)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
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
    if let Err(e) = builder.serve_connection(io, svc).await {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
    if let Ok(stream) = returned.await {
        linger(stream).await;
    }
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

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn matches(rule: &HttpRouteRule, req: &Request<Incoming>, port: u16) -> Option<usize> {
    if rule.matches.is_empty() {
        return Some(usize::MAX);
    }
    let path = req.uri().path();
    let authority = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(hyper::http::uri::Authority::as_str))
        .unwrap_or_default();
    rule.matches.iter().position(|m| {
        let uri_ok = m.uri.as_ref().is_none_or(|u| {
            if m.ignore_uri_case {
                let lower = path.to_ascii_lowercase();
                match u {
                    StringMatcher::Exact(e) => lower == e.to_ascii_lowercase(),
                    StringMatcher::Prefix(p) => lower.starts_with(&p.to_ascii_lowercase()),
                    StringMatcher::Regex(_) => u.matches(path),
                }
            } else {
                u.matches(path)
            }
        });
        uri_ok
            && m.method.as_ref().is_none_or(|s| s.matches(req.method().as_str()))
            && m.authority.as_ref().is_none_or(|s| s.matches(authority))
            && m.scheme.as_ref().is_none_or(|s| s.matches("http"))
            && m.port.is_none_or(|p| p == port)
            && m.headers.iter().all(|(name, s)| {
                req.headers().get(name.as_str()).and_then(|v| v.to_str().ok()).is_some_and(|v| s.matches(v))
            })
            && m.query_params
                .iter()
                .all(|(name, s)| url_query(req.uri()).iter().any(|(k, v)| k == name && s.matches(v)))
    })
}

fn url_query(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

fn apply_ops(headers: &mut hyper::HeaderMap, ops: Option<&HeaderOperations>) {
    let Some(ops) = ops else { return };
    for (k, v) in &ops.set {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v.as_str())) {
            headers.insert(n, v);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v.as_str())) {
            headers.append(n, v);
        }
    }
    for k in &ops.remove {
        headers.remove(k.as_str());
    }
}

/// The access log line and the response.
struct Outcome {
    response: Response<Body>,
    flags: &'static str,
    upstream: Option<String>,
    route: Option<String>,
}

/// The destination a request went to, for its metric labels, and the
/// destination's connection slot the response holds.
#[derive(Default)]
struct Target {
    service: Option<usize>,
    labels: std::collections::BTreeMap<String, String>,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// A response body that counts its bytes and reports them when done, and
/// holds the destination's connection slot (its circuit breaker) until
/// then: an HTTP/1.1 connection is busy until its response is sent.
struct Observed {
    inner: Body,
    bytes: u64,
    done: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
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
    let series = ctx.metrics.request_series(
        (
            source.map(|s| s.0.clone()).unwrap_or_default(),
            svc_host.to_string(),
            workload.to_string(),
            version.to_string(),
            status,
            out.flags,
        ),
        || {
            let mut l = crate::telemetry::Labels::to_service(svc_host, svc_ns, workload, version, "http");
            l.response_code = status.to_string().into();
            l.response_flags = crate::telemetry::label(out.flags);
            if let Some((name, ns)) = source {
                l.source_workload = crate::telemetry::label(name);
                l.source_workload_namespace = crate::telemetry::label(ns);
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
        route = out.route.as_deref().unwrap_or("-"),
        duration_ms = started.elapsed().as_millis() as u64,
        "request"
    );
    response
}

async fn route(req: Request<Incoming>, ctx: &ConnContext, mesh: &Mesh, target: &mut Target) -> Outcome {
    let port = ctx.original_dst.port();
    let rules: Vec<&HttpRouteRule> = match (ctx.gateway_port, ctx.service) {
        (Some(gp), _) => {
            let host =
                req.headers().get(HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().host()).unwrap_or_default();
            let host =
                host.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h);
            match mesh.gateway_rules(gp, host) {
                Some(r) => r,
                None => {
                    return Outcome {
                        response: text(StatusCode::NOT_FOUND, "no route for this host\n"),
                        flags: "NR",
                        upstream: None,
                        route: None,
                    }
                }
            }
        }
        (None, Some(svc)) => mesh.http_routes.get(&svc).map(|v| v.iter().collect()).unwrap_or_default(),
        (None, None) => Vec::new(),
    };
    // No VirtualService: the service itself, every endpoint.
    let default_rule;
    let (rule, matched) = if rules.is_empty() {
        let Some(service) = ctx.service else {
            return Outcome {
                response: text(StatusCode::NOT_FOUND, "no route\n"),
                flags: "NR",
                upstream: None,
                route: None,
            };
        };
        default_rule = HttpRouteRule {
            source: "default".into(),
            matches: Vec::new(),
            action: Action::Route(vec![crate::mesh::model::WeightedDestination {
                service,
                subset: None,
                port: None,
                weight: 100,
                headers: None,
            }]),
            rewrite: None,
            headers: None,
            timeout: None,
            retries: None,
            fault: None,
            mirror: None,
        };
        (&default_rule, Some(usize::MAX))
    } else {
        match rules.iter().find_map(|r| matches(r, &req, port).map(|m| (*r, Some(m)))) {
            Some(x) => x,
            None => {
                return Outcome {
                    response: text(StatusCode::NOT_FOUND, "no route matched\n"),
                    flags: "NR",
                    upstream: None,
                    route: None,
                }
            }
        }
    };
    let route_name = Some(rule.source.clone());

    // Faults: the delay first, then the abort, as Envoy applies them.
    let mut flags = "-";
    if let Some(f) = &rule.fault {
        if let Some((d, p)) = f.delay {
            if mesh.chance(p) {
                tokio::time::sleep(d).await;
                flags = "DI";
            }
        }
        if let Some((status, p)) = f.abort {
            if mesh.chance(p) {
                let mut r = text(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    "fault filter abort\n",
                );
                apply_ops(r.headers_mut(), rule.headers.as_ref().and_then(|h| h.response.as_ref()));
                return Outcome { response: r, flags: "FI", upstream: None, route: route_name };
            }
        }
    }

    let dests = match &rule.action {
        Action::Redirect(red) => {
            let (req_path, query) = (req.uri().path().to_string(), req.uri().query().map(str::to_string));
            let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).unwrap_or_default().to_string();
            let new_path = red.uri.clone().unwrap_or(req_path);
            let new_host = red.authority.clone().unwrap_or(host);
            let location = match query {
                Some(q) if red.uri.is_none() => format!("http://{new_host}{new_path}?{q}"),
                _ => format!("http://{new_host}{new_path}"),
            };
            let code = StatusCode::from_u16(red.redirect_code.unwrap_or(301)).unwrap_or(StatusCode::MOVED_PERMANENTLY);
            let mut r = text(code, "");
            if let Ok(v) = HeaderValue::try_from(location) {
                r.headers_mut().insert(hyper::header::LOCATION, v);
            }
            return Outcome { response: r, flags, upstream: None, route: route_name };
        }
        Action::Route(d) => d,
    };

    // The weighted choice.
    let total: u32 = dests.iter().map(|d| d.weight).sum();
    let mut pick = mesh.random(total.max(1) as usize) as u32;
    let dest = dests
        .iter()
        .find(|d| {
            if pick < d.weight {
                true
            } else {
                pick -= d.weight;
                false
            }
        })
        .or(dests.first());
    let Some(dest) = dest else {
        return Outcome {
            response: text(StatusCode::SERVICE_UNAVAILABLE, "no destination\n"),
            flags: "NR",
            upstream: None,
            route: route_name,
        };
    };

    // The request as it goes upstream.
    let (mut parts, body) = req.into_parts();
    if let Some(rw) = &rule.rewrite {
        if let Some(new_uri) = &rw.uri {
            let path = parts.uri.path().to_string();
            let matched_prefix = matched.and_then(|i| rule.matches.get(i)).and_then(|m| match &m.uri {
                Some(StringMatcher::Prefix(p)) => Some(p.clone()),
                _ => None,
            });
            let rest = match matched_prefix {
                Some(p) if path.starts_with(&p) => path[p.len()..].to_string(),
                _ => String::new(),
            };
            let mut np = format!("{new_uri}{rest}");
            if let Some(q) = parts.uri.query() {
                np.push('?');
                np.push_str(q);
            }
            if let Ok(u) = np.parse() {
                parts.uri = u;
            }
        }
        if let Some(a) = &rw.authority {
            if let Ok(v) = HeaderValue::try_from(a.as_str()) {
                parts.headers.insert(HOST, v);
            }
        }
    }
    apply_ops(&mut parts.headers, rule.headers.as_ref().and_then(|h| h.request.as_ref()));
    apply_ops(&mut parts.headers, dest.headers.as_ref().and_then(|h: &Headers| h.request.as_ref()));
    if !parts.headers.contains_key(HOST) {
        if let Ok(v) = HeaderValue::try_from(ctx.original_dst.to_string()) {
            parts.headers.insert(HOST, v);
        }
    }

    // A body small enough is kept for retries; a larger one streams once.
    let size = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = parts.headers.contains_key(hyper::header::TRANSFER_ENCODING);
    let mut streaming: Option<Incoming> = None;
    let replay: Option<Bytes> = match (size, chunked) {
        (Some(0), _) | (None, false) => Some(Bytes::new()),
        (Some(n), false) if n <= REPLAYABLE_BODY => match body.collect().await {
            Ok(c) => Some(c.to_bytes()),
            Err(_) => {
                return Outcome {
                    response: text(StatusCode::BAD_REQUEST, "request body not received\n"),
                    flags: "DPE",
                    upstream: None,
                    route: route_name,
                }
            }
        },
        _ => {
            streaming = Some(body);
            None
        }
    };

    let svc = &mesh.services[dest.service];
    target.service = Some(dest.service);
    let svc_port = dest
        .port
        .or_else(|| svc.port(port).map(|p| p.port))
        .or_else(|| svc.ports.first().map(|p| p.port))
        .unwrap_or(port);
    let protocol = svc.port(svc_port).map_or(ctx.protocol, |p| p.protocol);
    let retry = rule.retries.clone().unwrap_or(crate::mesh::model::Retry {
        attempts: 2,
        per_try_timeout: None,
        retry_on: vec![
            "connect-failure".into(),
            "refused-stream".into(),
            "unavailable".into(),
            "cancelled".into(),
            "retriable-status-codes".into(),
            "503".into(),
        ],
    });
    let attempts = if replay.is_some() { retry.attempts + 1 } else { 1 };
    let deadline = rule.timeout.map(|t| Instant::now() + t);

    // Circuit breakers (DestinationRule connectionPool): requests in
    // flight, then a connection slot per request, with a bounded queue.
    let cluster = ctx.balancer.cluster(mesh, dest.service, dest.subset.as_deref(), svc_port);
    let overflow = |route: Option<String>| Outcome {
        response: text(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers. reset reason: overflow\n",
        ),
        flags: "UO",
        upstream: None,
        route,
    };
    let _request_slot = match &cluster.requests {
        Some(sem) => match std::sync::Arc::clone(sem).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => return overflow(route_name),
        },
        None => None,
    };
    let close_after = cluster.limits.max_requests_per_connection == Some(1);
    // mirror: a copy to the shadow destination, its response dropped
    // (bodies kept for replay only).
    if let (Some((md, pct)), Some(body)) = (&rule.mirror, &replay) {
        if mesh.chance(*pct) {
            let shadow_port =
                md.port.or_else(|| mesh.services[md.service].ports.first().map(|p| p.port)).unwrap_or(port);
            if let Some(p) = ctx.balancer.pick(mesh, md.service, md.subset.as_deref(), shadow_port, None) {
                let host = match &p.address {
                    Address::Ip(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
                    Address::Ip(ip) => ip.to_string(),
                    Address::Dns(h) => h.clone(),
                };
                let uri = format!(
                    "http://{host}:{}{}",
                    p.port,
                    parts.uri.path_and_query().map_or("/", hyper::http::uri::PathAndQuery::as_str)
                );
                let mut b = Request::builder().method(parts.method.clone()).uri(uri);
                for (k, v) in &parts.headers {
                    if k == HOST || k == hyper::header::CONNECTION {
                        continue;
                    }
                    b = b.header(k, v);
                }
                // Istio marks the copy's authority with -shadow.
                let authority = parts.headers.get(HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
                b = b.header(HOST, format!("{}-shadow", authority.split(':').next().unwrap_or(authority)));
                let body: Body = Full::new(body.clone()).map_err(|e| match e {}).boxed();
                if let Ok(req) = b.body(body) {
                    let client = ctx.upstreams.http1.clone();
                    tokio::spawn(async move {
                        let _ = client.request(req).await;
                    });
                }
            }
        }
    }

    // consistentHash: the request's key.
    let hash_key = {
        use std::hash::{Hash, Hasher};
        let key: Option<String> = match mesh.policy(dest.service, dest.subset.as_deref(), svc_port).map(|p| &p.lb) {
            Some(crate::mesh::model::LbPolicy::HashHeader(h)) => {
                parts.headers.get(h.as_str()).and_then(|v| v.to_str().ok()).map(str::to_string)
            }
            Some(crate::mesh::model::LbPolicy::HashQueryParameter(q)) => {
                url_query(&parts.uri).into_iter().find(|(k, _)| k == q).map(|(_, v)| v)
            }
            Some(crate::mesh::model::LbPolicy::HashSourceIp) => Some(ctx.client.ip().to_string()),
            _ => None,
        };
        key.map(|k| {
            let mut h = std::hash::DefaultHasher::new();
            k.hash(&mut h);
            h.finish()
        })
    };
    let mut last: Option<Outcome> = None;
    for attempt in 0..attempts {
        let picked = if svc.passthrough {
            Some((Address::Ip(ctx.original_dst.ip()), ctx.original_dst.port()))
        } else {
            ctx.balancer.pick(mesh, dest.service, dest.subset.as_deref(), svc_port, hash_key).map(|p| {
                target.labels = p.labels;
                (p.address, p.port)
            })
        };
        let Some((addr, ep_port)) = picked else {
            return Outcome {
                response: text(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n"),
                flags: "UH",
                upstream: None,
                route: route_name,
            };
        };
        let host = match &addr {
            Address::Ip(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
            Address::Ip(ip) => ip.to_string(),
            Address::Dns(h) => h.clone(),
        };
        let upstream = format!("{host}:{ep_port}");
        let uri: Uri = match format!(
            "http://{upstream}{}",
            parts.uri.path_and_query().map_or("/", hyper::http::uri::PathAndQuery::as_str)
        )
        .parse()
        {
            Ok(u) => u,
            Err(_) => {
                return Outcome {
                    response: text(StatusCode::BAD_REQUEST, "bad request target\n"),
                    flags: "-",
                    upstream: None,
                    route: route_name,
                }
            }
        };
        let mut up_req = Request::builder().method(parts.method.clone()).uri(uri).version(hyper::Version::HTTP_11);
        for (k, v) in &parts.headers {
            if k == hyper::header::CONNECTION || k.as_str() == "keep-alive" || k.as_str() == "proxy-connection" {
                continue;
            }
            up_req = up_req.header(k, v);
        }
        if close_after {
            up_req = up_req.header(hyper::header::CONNECTION, "close");
        }
        let connection_slot = match &cluster.connections {
            None => None,
            Some(sem) => {
                if let Ok(p) = std::sync::Arc::clone(sem).try_acquire_owned() {
                    Some(p)
                } else {
                    let max_pending = cluster.limits.max_pending.unwrap_or(usize::MAX);
                    let queued = cluster.pending.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if queued >= max_pending {
                        cluster.pending.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        return overflow(route_name);
                    }
                    let waited = match deadline {
                        Some(d) => tokio::time::timeout(
                            d.saturating_duration_since(Instant::now()),
                            std::sync::Arc::clone(sem).acquire_owned(),
                        )
                        .await
                        .ok()
                        .and_then(Result::ok),
                        None => std::sync::Arc::clone(sem).acquire_owned().await.ok(),
                    };
                    cluster.pending.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    match waited {
                        Some(p) => Some(p),
                        None => {
                            return Outcome {
                                response: text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n"),
                                flags: "UT",
                                upstream: None,
                                route: route_name,
                            }
                        }
                    }
                }
            }
        };
        let body: Body = match (&replay, streaming.take()) {
            (Some(b), _) if b.is_empty() => Empty::new().map_err(|e| match e {}).boxed(),
            (Some(b), _) => Full::new(b.clone()).map_err(|e| match e {}).boxed(),
            (None, Some(s)) => s.boxed(),
            (None, None) => Empty::new().map_err(|e| match e {}).boxed(),
        };
        let Ok(up_req) = up_req.body(body) else {
            return Outcome {
                response: text(StatusCode::BAD_REQUEST, "bad request\n"),
                flags: "-",
                upstream: None,
                route: route_name,
            };
        };
        let client = if protocol == Protocol::Http2 { &ctx.upstreams.http2 } else { &ctx.upstreams.http1 };
        let ep_key = match &addr {
            Address::Ip(ip) => Some(SocketAddr::new(*ip, ep_port)),
            Address::Dns(_) => None,
        };
        let in_flight = ep_key.map(|k| ctx.balancer.start_request(k));
        let per_try = retry.per_try_timeout;
        let limit = match (deadline, per_try) {
            (Some(d), Some(p)) => Some(d.saturating_duration_since(Instant::now()).min(p)),
            (Some(d), None) => Some(d.saturating_duration_since(Instant::now())),
            (None, Some(p)) => Some(p),
            (None, None) => None,
        };
        let call = client.request(up_req);
        let result = match limit {
            Some(l) => tokio::time::timeout(l, call).await.map_err(|_| ()),
            None => Ok(call.await),
        };
        drop(in_flight);
        let retryable_status = |s: u16| {
            retry.retry_on.iter().any(|r| match r.as_str() {
                "5xx" => s >= 500,
                "gateway-error" => matches!(s, 502..=504),
                "retriable-4xx" => s == 409,
                "reset"
                | "connect-failure"
                | "refused-stream"
                | "cancelled"
                | "unavailable"
                | "retriable-status-codes" => false,
                code => code.parse::<u16>().ok() == Some(s),
            })
        };
        let more = attempt + 1 < attempts && deadline.is_none_or(|d| Instant::now() < d);
        if let Some(ep) = ep_key {
            let r = match &result {
                Ok(Ok(resp)) => Result5xx::Status(resp.status().as_u16()),
                _ => Result5xx::Failed,
            };
            if ctx.balancer.report(mesh, dest.service, dest.subset.as_deref(), svc_port, ep, r) {
                tracing::warn!(endpoint = %ep, service = %svc.hostname, "outlier detection: endpoint ejected");
            }
        }
        match result {
            Err(()) => {
                let overall = deadline.is_some_and(|d| Instant::now() >= d);
                last = Some(Outcome {
                    response: text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n"),
                    flags: "UT",
                    upstream: Some(upstream),
                    route: route_name.clone(),
                });
                let per_try_retry = retry.retry_on.iter().any(|r| r == "5xx" || r == "gateway-error" || r == "reset");
                if overall || !per_try_retry || !more {
                    break;
                }
            }
            Ok(Err(e)) => {
                let connect = e.is_connect();
                last = Some(Outcome {
                    response: text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers\n",
                    ),
                    flags: if attempt > 0 { "URX" } else { "UF" },
                    upstream: Some(upstream),
                    route: route_name.clone(),
                });
                let retry_it = retry.retry_on.iter().any(|r| {
                    matches!(r.as_str(), "5xx" | "gateway-error" | "reset")
                        || (connect && matches!(r.as_str(), "connect-failure" | "refused-stream" | "unavailable"))
                });
                if !retry_it || !more {
                    break;
                }
            }
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                if retryable_status(status) && more {
                    last = Some(Outcome {
                        response: resp.map(http_body_util::BodyExt::boxed),
                        flags: "URX",
                        upstream: Some(upstream),
                        route: route_name.clone(),
                    });
                    continue;
                }
                let (mut rp, rb) = resp.into_parts();
                apply_ops(&mut rp.headers, rule.headers.as_ref().and_then(|h| h.response.as_ref()));
                apply_ops(&mut rp.headers, dest.headers.as_ref().and_then(|h| h.response.as_ref()));
                target.slot = connection_slot;
                return Outcome {
                    response: Response::from_parts(rp, rb.boxed()),
                    flags,
                    upstream: Some(upstream),
                    route: route_name,
                };
            }
        }
    }
    last.unwrap_or(Outcome {
        response: text(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n"),
        flags: "UH",
        upstream: None,
        route: route_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_split() {
        let u: Uri = "/p?a=1&b=&c".parse().unwrap();
        assert_eq!(
            url_query(&u),
            vec![("a".into(), "1".into()), ("b".into(), String::new()), ("c".into(), String::new())]
        );
    }
}
