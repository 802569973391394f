//! Forwarding one request to its destination, as Envoy's router does: the
//! body kept for a retry when it is small, the circuit breakers
//! (DestinationRule `connectionPool`), mirroring, the consistent-hash key,
//! then attempts: an endpoint from the balancer, the upstream request, the
//! per-try and overall timeouts, and the retry decision after each. It
//! decides nothing about which rule applies (that is `select`) and
//! rewrites nothing (that is `filters`).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::HOST;
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode, Uri};
use tokio::sync::OwnedSemaphorePermit;

use super::filters::{response_headers, text};
use super::select::url_query;
use crate::endpoint::{Balancer, Cluster, Result5xx};
use crate::mesh::model::{Address, HttpRouteRule, LbPolicy, Mesh, Protocol, Retry, WeightedDestination};
use crate::transport::http_client::{Body, Upstreams};

/// Request bodies up to this size are kept so a retry can send them again.
const REPLAYABLE_BODY: u64 = 64 * 1024;

/// The response and what the access log says about it.
pub(crate) struct Outcome {
    pub(crate) response: Response<Body>,
    pub(crate) flags: &'static str,
    pub(crate) upstream: Option<String>,
    pub(crate) route: Option<String>,
}

impl Outcome {
    /// An answer of the proxy's own, with Envoy's response flag.
    pub(crate) fn refuse(
        status: StatusCode,
        body: &'static str,
        flags: &'static str,
        route: Option<String>,
    ) -> Outcome {
        Outcome { response: text(status, body), flags, upstream: None, route }
    }
}

/// The destination a request went to, for its metric labels, and the
/// destination's connection slot the response holds.
#[derive(Default)]
pub(crate) struct Target {
    pub(crate) service: Option<usize>,
    pub(crate) labels: std::collections::BTreeMap<String, String>,
    pub(crate) slot: Option<OwnedSemaphorePermit>,
}

/// What forwarding needs from the connection.
pub(crate) struct Dial<'a> {
    pub(crate) upstreams: &'a Upstreams,
    pub(crate) balancer: &'a Balancer,
    pub(crate) client: SocketAddr,
    pub(crate) original_dst: SocketAddr,
    pub(crate) protocol: Protocol,
}

/// The rule and destination a request was routed by.
pub(crate) struct Routed<'r> {
    pub(crate) rule: &'r HttpRouteRule,
    pub(crate) dest: &'r WeightedDestination,
    /// The fault filter's flag, carried by a forwarded response.
    pub(crate) flags: &'static str,
    pub(crate) route: Option<String>,
}

/// How a request's body is sent: kept whole (small: a retry can resend
/// it) or streamed once.
enum RequestBody {
    Replayable(Bytes),
    Streaming(Option<Incoming>),
}

impl RequestBody {
    async fn read(parts: &Parts, body: Incoming) -> Result<RequestBody, hyper::Error> {
        let size = parts
            .headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let chunked = parts.headers.contains_key(hyper::header::TRANSFER_ENCODING);
        Ok(match (size, chunked) {
            (Some(0), _) | (None, false) => RequestBody::Replayable(Bytes::new()),
            (Some(n), false) if n <= REPLAYABLE_BODY => RequestBody::Replayable(body.collect().await?.to_bytes()),
            _ => RequestBody::Streaming(Some(body)),
        })
    }

    fn replay(&self) -> Option<&Bytes> {
        match self {
            RequestBody::Replayable(b) => Some(b),
            RequestBody::Streaming(_) => None,
        }
    }

    /// The body of the next attempt.
    fn next(&mut self) -> Body {
        match self {
            RequestBody::Replayable(b) if b.is_empty() => Empty::new().map_err(|e| match e {}).boxed(),
            RequestBody::Replayable(b) => Full::new(b.clone()).map_err(|e| match e {}).boxed(),
            RequestBody::Streaming(s) => match s.take() {
                Some(s) => s.boxed(),
                None => Empty::new().map_err(|e| match e {}).boxed(),
            },
        }
    }
}

/// Istio's default retry policy: two retries on connection failures,
/// refused streams and 503.
fn default_retry() -> Retry {
    Retry {
        attempts: 2,
        per_try_timeout: None,
        retry_on: ["connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes", "503"]
            .map(String::from)
            .to_vec(),
    }
}

/// Forward the request (its head already rewritten) by `routed`.
pub(crate) async fn forward(
    parts: Parts,
    body: Incoming,
    routed: Routed<'_>,
    dial: &Dial<'_>,
    mesh: &Mesh,
    target: &mut Target,
) -> Outcome {
    let Routed { rule, dest, flags, route } = routed;
    let Ok(mut body) = RequestBody::read(&parts, body).await else {
        return Outcome::refuse(StatusCode::BAD_REQUEST, "request body not received\n", "DPE", route);
    };
    let port = dial.original_dst.port();
    let svc = &mesh.services[dest.service];
    target.service = Some(dest.service);
    let svc_port = dest
        .port
        .or_else(|| svc.port(port).map(|p| p.port))
        .or_else(|| svc.ports.first().map(|p| p.port))
        .unwrap_or(port);
    let protocol = svc.port(svc_port).map_or(dial.protocol, |p| p.protocol);
    let retry = rule.retries.clone().unwrap_or_else(default_retry);
    let attempts = if body.replay().is_some() { retry.attempts + 1 } else { 1 };
    let deadline = rule.timeout.map(|t| Instant::now() + t);

    // Circuit breakers: requests in flight, then a connection slot per
    // request, with a bounded queue.
    let cluster = dial.balancer.cluster(mesh, dest.service, dest.subset.as_deref(), svc_port);
    let _request_slot = match &cluster.requests {
        Some(sem) => match std::sync::Arc::clone(sem).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => return overflow(route),
        },
        None => None,
    };
    let close_after = cluster.limits.max_requests_per_connection == Some(1);
    if let (Some(mirror), Some(b)) = (&rule.mirror, body.replay()) {
        send_mirror(mirror, &parts, b.clone(), dial, mesh);
    }
    let hash_key = hash_key(mesh, dest, svc_port, &parts, dial.client);
    let mut last: Option<Outcome> = None;
    for attempt in 0..attempts {
        let picked = if svc.passthrough {
            Some((Address::Ip(dial.original_dst.ip()), dial.original_dst.port()))
        } else {
            dial.balancer.pick(mesh, dest.service, dest.subset.as_deref(), svc_port, hash_key).map(|p| {
                target.labels = p.labels;
                (p.address, p.port)
            })
        };
        let Some((addr, ep_port)) = picked else {
            return Outcome::refuse(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n", "UH", route);
        };
        let upstream = format!("{}:{ep_port}", host_of(&addr));
        let Ok(up_req) = upstream_request(&parts, &upstream, close_after, &mut body) else {
            return Outcome::refuse(StatusCode::BAD_REQUEST, "bad request target\n", "-", route);
        };
        let connection_slot = match connection_slot(&cluster, deadline).await {
            Ok(s) => s,
            Err(Refused::Overflow) => return overflow(route),
            Err(Refused::Timeout) => {
                return Outcome::refuse(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n", "UT", route)
            }
        };
        let client = if protocol == Protocol::Http2 { &dial.upstreams.http2 } else { &dial.upstreams.http1 };
        let ep_key = match &addr {
            Address::Ip(ip) => Some(SocketAddr::new(*ip, ep_port)),
            Address::Dns(_) => None,
        };
        let in_flight = ep_key.map(|k| dial.balancer.start_request(k));
        let call = client.request(up_req);
        let result = match attempt_limit(deadline, retry.per_try_timeout) {
            Some(l) => tokio::time::timeout(l, call).await.map_err(|_| ()),
            None => Ok(call.await),
        };
        drop(in_flight);
        if let Some(ep) = ep_key {
            let r = match &result {
                Ok(Ok(resp)) => Result5xx::Status(resp.status().as_u16()),
                _ => Result5xx::Failed,
            };
            if dial.balancer.report(mesh, dest.service, dest.subset.as_deref(), svc_port, ep, r) {
                tracing::warn!(endpoint = %ep, service = %svc.hostname, "outlier detection: endpoint ejected");
            }
        }
        let more = attempt + 1 < attempts && deadline.is_none_or(|d| Instant::now() < d);
        let tried = Attempt::of(result, attempt);
        match next_step(&tried, &retry, more, deadline.is_some_and(|d| Instant::now() >= d)) {
            Step::Answer => {
                let Attempt::Response(resp) = tried else { unreachable!("only a response is answered") };
                let (mut rp, rb) = resp.into_parts();
                response_headers(&mut rp.headers, rule, dest);
                target.slot = connection_slot;
                return Outcome {
                    response: Response::from_parts(rp, rb.boxed()),
                    flags,
                    upstream: Some(upstream),
                    route,
                };
            }
            step => {
                last = Some(tried.outcome(upstream, route.clone()));
                if step == Step::GiveUp {
                    break;
                }
            }
        }
    }
    last.unwrap_or_else(|| Outcome::refuse(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n", "UH", route))
}

/// Envoy's overflow answer (flag UO).
fn overflow(route: Option<String>) -> Outcome {
    Outcome::refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream connect error or disconnect/reset before headers. reset reason: overflow\n",
        "UO",
        route,
    )
}

/// An address as the host part of a URI.
fn host_of(addr: &Address) -> String {
    match addr {
        Address::Ip(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
        Address::Ip(ip) => ip.to_string(),
        Address::Dns(h) => h.clone(),
    }
}

/// The request as it goes to `upstream` (`host:port`): hop-by-hop headers
/// dropped, `Connection: close` when each request gets its own connection.
fn upstream_request(
    parts: &Parts,
    upstream: &str,
    close_after: bool,
    body: &mut RequestBody,
) -> Result<Request<Body>, hyper::http::Error> {
    let path = parts.uri.path_and_query().map_or("/", hyper::http::uri::PathAndQuery::as_str);
    let uri: Uri = format!("http://{upstream}{path}").parse()?;
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
    up_req.body(body.next())
}

/// Why a request got no connection slot.
enum Refused {
    /// The pending queue is full (http1MaxPendingRequests): 503 UO.
    Overflow,
    /// The route's timeout passed while queued: 504 UT.
    Timeout,
}

/// A connection slot of the destination (tcp.maxConnections): at once, or
/// after waiting in the bounded pending queue until `deadline`.
async fn connection_slot(
    cluster: &Cluster,
    deadline: Option<Instant>,
) -> Result<Option<OwnedSemaphorePermit>, Refused> {
    let Some(sem) = &cluster.connections else { return Ok(None) };
    if let Ok(p) = std::sync::Arc::clone(sem).try_acquire_owned() {
        return Ok(Some(p));
    }
    let max_pending = cluster.limits.max_pending.unwrap_or(usize::MAX);
    let queued = cluster.pending.fetch_add(1, Ordering::SeqCst);
    if queued >= max_pending {
        cluster.pending.fetch_sub(1, Ordering::SeqCst);
        return Err(Refused::Overflow);
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
    cluster.pending.fetch_sub(1, Ordering::SeqCst);
    waited.map(Some).ok_or(Refused::Timeout)
}

/// How long one attempt may take: the per-try timeout, within what is left
/// of the route's.
fn attempt_limit(deadline: Option<Instant>, per_try: Option<Duration>) -> Option<Duration> {
    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
    match (left, per_try) {
        (Some(l), Some(p)) => Some(l.min(p)),
        (l, p) => l.or(p),
    }
}

/// The mirror's copy of the request, sent and forgotten (Istio marks its
/// authority with `-shadow`); only replayable bodies are mirrored.
fn send_mirror(mirror: &(WeightedDestination, f64), parts: &Parts, body: Bytes, dial: &Dial<'_>, mesh: &Mesh) {
    let (md, pct) = mirror;
    if !mesh.chance(*pct) {
        return;
    }
    let port = dial.original_dst.port();
    let shadow_port = md.port.or_else(|| mesh.services[md.service].ports.first().map(|p| p.port)).unwrap_or(port);
    let Some(p) = dial.balancer.pick(mesh, md.service, md.subset.as_deref(), shadow_port, None) else { return };
    let path = parts.uri.path_and_query().map_or("/", hyper::http::uri::PathAndQuery::as_str);
    let mut b =
        Request::builder().method(parts.method.clone()).uri(format!("http://{}:{}{path}", host_of(&p.address), p.port));
    for (k, v) in &parts.headers {
        if k != HOST && k != hyper::header::CONNECTION {
            b = b.header(k, v);
        }
    }
    let authority = parts.headers.get(HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    b = b.header(HOST, format!("{}-shadow", authority.split(':').next().unwrap_or(authority)));
    if let Ok(req) = b.body(Full::new(body).map_err(|e| match e {}).boxed()) {
        let client = dial.upstreams.http1.clone();
        tokio::spawn(async move {
            let _ = client.request(req).await;
        });
    }
}

/// The request's consistent-hash key, where the destination's policy
/// hashes (a header, a query parameter or the source IP).
fn hash_key(mesh: &Mesh, dest: &WeightedDestination, port: u16, parts: &Parts, client: SocketAddr) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let key: Option<String> = match mesh.policy(dest.service, dest.subset.as_deref(), port).map(|p| &p.lb) {
        Some(LbPolicy::HashHeader(h)) => {
            parts.headers.get(h.as_str()).and_then(|v| v.to_str().ok()).map(str::to_string)
        }
        Some(LbPolicy::HashQueryParameter(q)) => {
            url_query(&parts.uri).into_iter().find(|(k, _)| k == q).map(|(_, v)| v)
        }
        Some(LbPolicy::HashSourceIp) => Some(client.ip().to_string()),
        _ => None,
    };
    key.map(|k| {
        let mut h = std::hash::DefaultHasher::new();
        k.hash(&mut h);
        h.finish()
    })
}

/// How one attempt ended.
enum Attempt {
    Response(Response<Incoming>),
    /// No response: connect failure, reset (`connect`: failed to connect).
    Failed {
        connect: bool,
        retried: bool,
    },
    TimedOut,
}

impl Attempt {
    fn of(result: Result<Result<Response<Incoming>, hyper_util::client::legacy::Error>, ()>, attempt: u32) -> Attempt {
        match result {
            Ok(Ok(r)) => Attempt::Response(r),
            Ok(Err(e)) => Attempt::Failed { connect: e.is_connect(), retried: attempt > 0 },
            Err(()) => Attempt::TimedOut,
        }
    }

    /// What the client gets if this is the last attempt.
    fn outcome(self, upstream: String, route: Option<String>) -> Outcome {
        let upstream = Some(upstream);
        match self {
            Attempt::Response(resp) => Outcome { response: resp.map(BodyExt::boxed), flags: "URX", upstream, route },
            Attempt::Failed { retried, .. } => Outcome {
                response: text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers\n",
                ),
                flags: if retried { "URX" } else { "UF" },
                upstream,
                route,
            },
            Attempt::TimedOut => Outcome {
                response: text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n"),
                flags: "UT",
                upstream,
                route,
            },
        }
    }
}

/// What follows an attempt.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Send this response to the client.
    Answer,
    /// Try again.
    Retry,
    /// Stop; the client gets this attempt's outcome.
    GiveUp,
}

/// Envoy's retry decision (`retryOn`) for an attempt; `more`: attempts and
/// time are left; `overall_timeout`: the route's timeout has passed.
fn next_step(tried: &Attempt, retry: &Retry, more: bool, overall_timeout: bool) -> Step {
    let on = |names: &[&str]| retry.retry_on.iter().any(|r| names.contains(&r.as_str()));
    let again = |yes: bool| if yes && more { Step::Retry } else { Step::GiveUp };
    match tried {
        Attempt::Response(resp) => {
            let s = resp.status().as_u16();
            let retryable = retry.retry_on.iter().any(|r| match r.as_str() {
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
            });
            if retryable && more {
                Step::Retry
            } else {
                Step::Answer
            }
        }
        Attempt::TimedOut => again(!overall_timeout && on(&["5xx", "gateway-error", "reset"])),
        Attempt::Failed { connect, .. } => again(
            on(&["5xx", "gateway-error", "reset"])
                || (*connect && on(&["connect-failure", "refused-stream", "unavailable"])),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(on: &[&str]) -> Retry {
        Retry { attempts: 2, per_try_timeout: None, retry_on: on.iter().map(ToString::to_string).collect() }
    }

    #[test]
    fn timeouts_and_resets_are_retried_only_when_retry_on_names_them() {
        let failed = Attempt::Failed { connect: false, retried: false };
        let refused = Attempt::Failed { connect: true, retried: false };
        assert_eq!(next_step(&failed, &retry(&["connect-failure"]), true, false), Step::GiveUp);
        assert_eq!(next_step(&refused, &retry(&["connect-failure"]), true, false), Step::Retry);
        assert_eq!(next_step(&failed, &retry(&["reset"]), true, false), Step::Retry);
        assert_eq!(next_step(&failed, &retry(&["reset"]), false, false), Step::GiveUp, "no attempt left");
        assert_eq!(next_step(&Attempt::TimedOut, &retry(&["5xx"]), true, false), Step::Retry);
        assert_eq!(
            next_step(&Attempt::TimedOut, &retry(&["5xx"]), true, true),
            Step::GiveUp,
            "the route's timeout passed"
        );
        assert_eq!(next_step(&Attempt::TimedOut, &default_retry(), true, false), Step::GiveUp);
    }

    #[test]
    fn the_last_failed_attempt_reads_as_envoy_flags_it() {
        let first = Attempt::Failed { connect: true, retried: false }.outcome("a:1".into(), None);
        let later = Attempt::Failed { connect: true, retried: true }.outcome("a:1".into(), None);
        let slow = Attempt::TimedOut.outcome("a:1".into(), None);
        assert_eq!((first.flags, later.flags, slow.flags), ("UF", "URX", "UT"));
        assert_eq!(slow.response.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[test]
    fn an_attempt_gets_the_shorter_of_its_per_try_timeout_and_what_is_left() {
        let soon = Some(Instant::now() + Duration::from_secs(1));
        assert!(attempt_limit(soon, Some(Duration::from_secs(5))).unwrap() <= Duration::from_secs(1));
        assert_eq!(attempt_limit(None, Some(Duration::from_secs(5))), Some(Duration::from_secs(5)));
        assert_eq!(attempt_limit(None, None), None);
    }
}
