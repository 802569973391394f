//! What a rule does to a request before it is forwarded, as Envoy's HTTP
//! filters do: fault injection (a delay, then an abort), redirects, URI and
//! authority rewrites, and header operations on requests and responses. It
//! chooses no endpoint and sends nothing upstream.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};

use crate::mesh::model::{HttpRouteRule, StringMatcher, WeightedDestination};
use crate::mesh::resources::{HeaderOperations, HttpRedirect};
use crate::transport::http_client::Body;

/// A plain-text response the proxy answers itself.
pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// What fault injection decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Neither fault applied.
    None,
    /// Delayed by this much (Envoy's flag DI); then forwarded.
    Delay(Duration),
    /// Answered with this status (flag FI), after any delay.
    Abort { status: u16, delayed: Option<Duration> },
}

impl Fault {
    /// Decide the rule's faults with `chance(percent)` (true with that
    /// probability): the delay first, then the abort, as Envoy applies them.
    pub(crate) fn decide(rule: &HttpRouteRule, mut chance: impl FnMut(f64) -> bool) -> Fault {
        let Some(f) = &rule.fault else { return Fault::None };
        let delayed = f.delay.and_then(|(d, p)| chance(p).then_some(d));
        match f.abort {
            Some((status, p)) if chance(p) => Fault::Abort { status, delayed },
            _ => delayed.map_or(Fault::None, Fault::Delay),
        }
    }

    /// The delay to wait before anything else.
    pub(crate) fn delay(self) -> Option<Duration> {
        match self {
            Fault::None => None,
            Fault::Delay(d) => Some(d),
            Fault::Abort { delayed, .. } => delayed,
        }
    }

    /// The response flag a forwarded request carries.
    pub(crate) fn flags(self) -> &'static str {
        match self {
            Fault::Delay(_) => "DI",
            Fault::Abort { .. } => "FI",
            Fault::None => "-",
        }
    }

    /// The abort's response, with the rule's response header operations.
    pub(crate) fn abort_response(self, rule: &HttpRouteRule) -> Option<Response<Body>> {
        let Fault::Abort { status, .. } = self else { return None };
        let mut r =
            text(StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE), "fault filter abort\n");
        apply_ops(r.headers_mut(), rule.headers.as_ref().and_then(|h| h.response.as_ref()));
        Some(r)
    }
}

/// The redirect a rule answers with: `Location` from the rule's URI and
/// authority over the request's (its query kept when the path is kept).
pub(crate) fn redirect<B>(red: &HttpRedirect, req: &Request<B>) -> Response<Body> {
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
    r
}

/// Rewrite the request as the rule says: the matched prefix of the path
/// replaced by the rule's URI (a whole path for other matches), the
/// authority replaced.
pub(crate) fn rewrite(parts: &mut Parts, rule: &HttpRouteRule, matched: Option<usize>) {
    let Some(rw) = &rule.rewrite else { return };
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

/// The request's header operations (the rule's, then the destination's),
/// and a Host header where the client sent none (HTTP/2).
pub(crate) fn request_headers(
    parts: &mut Parts,
    rule: &HttpRouteRule,
    dest: &WeightedDestination,
    original_dst: SocketAddr,
) {
    apply_ops(&mut parts.headers, rule.headers.as_ref().and_then(|h| h.request.as_ref()));
    apply_ops(&mut parts.headers, dest.headers.as_ref().and_then(|h| h.request.as_ref()));
    if !parts.headers.contains_key(HOST) {
        if let Ok(v) = HeaderValue::try_from(original_dst.to_string()) {
            parts.headers.insert(HOST, v);
        }
    }
}

/// What Envoy's gateway (an edge proxy, `use_remote_address`) sets on a
/// request from outside: the client's address appended to
/// `x-forwarded-for`, `x-forwarded-proto` the scheme it used, an
/// `x-request-id` (a UUID v4) when it sent none, and no
/// `x-forwarded-client-cert` from the client (only the mesh may vouch for
/// a certificate).
pub(crate) fn edge_headers(
    headers: &mut hyper::HeaderMap,
    client: std::net::IpAddr,
    proto: &'static str,
    random: impl Fn(usize) -> usize,
) {
    headers.remove("x-forwarded-client-cert");
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{}, {client}", prior.trim()),
        _ => client.to_string(),
    };
    if let Ok(v) = HeaderValue::try_from(xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if headers.get("x-request-id").is_none_or(hyper::header::HeaderValue::is_empty) {
        let mut b = [0u8; 16];
        for byte in &mut b {
            *byte = u8::try_from(random(256)).unwrap_or(0);
        }
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let hex = b.iter().fold(String::new(), |mut h, x| {
            use std::fmt::Write;
            let _ = write!(h, "{x:02x}");
            h
        });
        let id = format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32]);
        if let Ok(v) = HeaderValue::try_from(id) {
            headers.insert("x-request-id", v);
        }
    }
}

/// The response's header operations: the rule's, then the destination's.
pub(crate) fn response_headers(headers: &mut hyper::HeaderMap, rule: &HttpRouteRule, dest: &WeightedDestination) {
    apply_ops(headers, rule.headers.as_ref().and_then(|h| h.response.as_ref()));
    apply_ops(headers, dest.headers.as_ref().and_then(|h| h.response.as_ref()));
}

/// Istio's header operations: set, then add, then remove.
pub(crate) fn apply_ops(headers: &mut hyper::HeaderMap, ops: Option<&HeaderOperations>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::model::{Action, Fault as RuleFault, RequestMatch};
    use crate::mesh::resources::HttpRewrite;

    fn rule(fault: Option<RuleFault>) -> HttpRouteRule {
        HttpRouteRule {
            source: "default/web/0".into(),
            namespace: "default".into(),
            export: crate::mesh::export::Export::All,
            matches: Vec::new(),
            action: Action::Route(Vec::new()),
            rewrite: None,
            headers: None,
            timeout: None,
            retries: None,
            fault,
            mirror: None,
        }
    }

    #[test]
    fn the_delay_is_decided_before_the_abort_and_both_can_apply() {
        let both = rule(Some(RuleFault { delay: Some((Duration::from_millis(5), 100.0)), abort: Some((418, 100.0)) }));
        let f = Fault::decide(&both, |p| p >= 100.0);
        assert_eq!(f, Fault::Abort { status: 418, delayed: Some(Duration::from_millis(5)) });
        assert_eq!((f.delay(), f.flags()), (Some(Duration::from_millis(5)), "FI"));
        assert_eq!(f.abort_response(&both).unwrap().status().as_u16(), 418);
        let mut asked = Vec::new();
        let f = Fault::decide(&both, |p| {
            asked.push(p);
            asked.len() == 1
        });
        assert_eq!((f, asked.len()), (Fault::Delay(Duration::from_millis(5)), 2), "delay asked first, then abort");
        assert_eq!(Fault::decide(&rule(None), |_| true), Fault::None);
    }

    #[test]
    fn a_prefix_rewrite_keeps_the_rest_of_the_path_and_the_query() {
        let mut r = rule(None);
        r.matches = vec![RequestMatch { uri: Some(StringMatcher::Prefix("/api/v1/".into())), ..Default::default() }];
        r.rewrite = Some(HttpRewrite { uri: Some("/".into()), authority: Some("backend".into()) });
        let (mut parts, ()) = Request::builder().uri("/api/v1/users?page=2").body(()).unwrap().into_parts();
        rewrite(&mut parts, &r, Some(0));
        assert_eq!(parts.uri.to_string(), "/users?page=2");
        assert_eq!(parts.headers.get(HOST).unwrap(), "backend");
    }

    #[test]
    fn a_redirect_keeps_the_query_only_when_the_path_is_kept() {
        let req = Request::builder().uri("/old?x=1").header(HOST, "shop").body(()).unwrap();
        let kept = redirect(&HttpRedirect { uri: None, authority: Some("new".into()), redirect_code: Some(302) }, &req);
        assert_eq!((kept.status().as_u16(), kept.headers()["location"].to_str().unwrap()), (302, "http://new/old?x=1"));
        let moved = redirect(&HttpRedirect { uri: Some("/new".into()), authority: None, redirect_code: None }, &req);
        assert_eq!((moved.status().as_u16(), moved.headers()["location"].to_str().unwrap()), (301, "http://shop/new"));
    }

    #[test]
    fn header_operations_set_then_add_then_remove() {
        let mut h = hyper::HeaderMap::new();
        h.insert("x-old", HeaderValue::from_static("1"));
        h.insert("x-set", HeaderValue::from_static("before"));
        let ops = HeaderOperations {
            set: [("x-set".to_string(), "after".to_string())].into(),
            add: [("x-add".to_string(), "a".to_string())].into(),
            remove: vec!["x-old".into()],
        };
        apply_ops(&mut h, Some(&ops));
        assert_eq!((h["x-set"].to_str().unwrap(), h["x-add"].to_str().unwrap(), h.get("x-old")), ("after", "a", None));
    }

    #[test]
    fn the_edge_appends_the_client_sets_the_scheme_and_an_id_and_drops_xfcc() {
        let mut h = hyper::HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        h.insert("x-forwarded-client-cert", HeaderValue::from_static("By=spiffe://cluster.local/ns/x/sa/admin"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let mut n = 0;
        let counter = std::cell::Cell::new(0usize);
        edge_headers(&mut h, "198.18.0.9".parse().unwrap(), "http", |_| {
            counter.set(counter.get() + 1);
            counter.get()
        });
        n += counter.get();
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 198.18.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("x-forwarded-client-cert"));
        let id = h["x-request-id"].to_str().unwrap().to_string();
        assert_eq!((id.len(), &id[14..15]), (36, "4"), "{id}");
        assert_eq!(n, 16);
        // A client's own request id is kept.
        let mut h = hyper::HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        edge_headers(&mut h, "198.18.0.9".parse().unwrap(), "https", |_| 0);
        assert_eq!(
            (h["x-request-id"].to_str().unwrap(), h["x-forwarded-for"].to_str().unwrap()),
            ("abc", "198.18.0.9")
        );
    }
}
