//! Which VirtualService rule a request takes: the gateway's bound rules
//! (by the request's host) or the service's, first match wins, and the
//! service itself when no VirtualService names it. Pure decisions over a
//! request's head, tested without sockets; nothing here touches the body,
//! the network or a clock.

#![forbid(unsafe_code)]

use std::borrow::Cow;

use hyper::header::HOST;
use hyper::{Request, StatusCode, Uri};

use crate::mesh::model::{Action, HttpRouteRule, Mesh, StringMatcher, WeightedDestination};

/// The rule a request takes, and which of its matches it met
/// (`usize::MAX`: a rule with no match conditions).
#[derive(Debug)]
pub(crate) struct Selected<'m> {
    pub(crate) rule: Cow<'m, HttpRouteRule>,
    pub(crate) matched: Option<usize>,
}

/// No rule applies: what to answer, with Envoy's response flag.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NoRoute {
    pub(crate) status: StatusCode,
    pub(crate) body: &'static str,
    pub(crate) flags: &'static str,
}

impl NoRoute {
    const fn new(body: &'static str) -> NoRoute {
        NoRoute { status: StatusCode::NOT_FOUND, body, flags: "NR" }
    }
}

/// Select the rule for `req`, which arrived for `service` (a captured
/// connection from a client in namespace `client_ns`) or on gateway port
/// `gateway_port`, at destination `port`.
pub(crate) fn select<'m, B>(
    mesh: &'m Mesh,
    service: Option<usize>,
    gateway_port: Option<u16>,
    client_ns: Option<&str>,
    req: &Request<B>,
    port: u16,
) -> Result<Selected<'m>, NoRoute> {
    let rules: Vec<&HttpRouteRule> = match (gateway_port, service) {
        (Some(gp), _) => mesh.gateway_rules(gp, request_host(req)).ok_or(NoRoute::new("no route for this host\n"))?,
        (None, Some(svc)) => {
            crate::mesh::export::visible(mesh.http_routes.get(&svc).map_or(&[][..], Vec::as_slice), client_ns)
        }
        (None, None) => Vec::new(),
    };
    if rules.is_empty() {
        // No VirtualService: the service itself, every endpoint.
        let service = service.ok_or(NoRoute::new("no route\n"))?;
        return Ok(Selected { rule: Cow::Owned(default_rule(service)), matched: Some(usize::MAX) });
    }
    rules
        .iter()
        .find_map(|r| matches(r, req, port).map(|m| Selected { rule: Cow::Borrowed(*r), matched: Some(m) }))
        .ok_or(NoRoute::new("no route matched\n"))
}

/// The rule of a service no VirtualService names: all of it, weight 100.
fn default_rule(service: usize) -> HttpRouteRule {
    HttpRouteRule {
        source: "default".into(),
        namespace: String::new(),
        export: crate::mesh::export::Export::All,
        matches: Vec::new(),
        action: Action::Route(vec![WeightedDestination {
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
    }
}

/// The request's host without a port: the Host header, else the URI's
/// (HTTP/2's `:authority`).
fn request_host<B>(req: &Request<B>) -> &str {
    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().host()).unwrap_or_default();
    host.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h)
}

/// Which of `rule`'s matches `req` meets (`usize::MAX` for a rule with
/// none), if any: every condition of one match block must hold.
pub(crate) fn matches<B>(rule: &HttpRouteRule, req: &Request<B>, port: u16) -> Option<usize> {
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

/// The query parameters of `uri`, in order; `a` alone has an empty value.
pub(crate) fn url_query(uri: &Uri) -> Vec<(String, String)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::source_dir::{load_text, Documents};

    fn compile(yaml: &str) -> Mesh {
        let mut docs = Documents::default();
        let mut errors = Vec::new();
        load_text(std::path::Path::new("m.yaml"), yaml, &mut docs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        Mesh::compile(&docs).expect("compiles")
    }

    const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.5, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api}
spec: {clusterIP: 10.96.0.6, ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - name: v1
    match: [{uri: {prefix: /api/v1/}, method: {exact: GET}}, {headers: {x-canary: {exact: "yes"}}}]
    route: [{destination: {host: api}}]
  - name: search
    match: [{uri: {exact: /search}, queryParams: {q: {prefix: rust}}}]
    route: [{destination: {host: api}}]
  - name: case
    match: [{uri: {prefix: /CaSe}, ignoreUriCase: true}]
    route: [{destination: {host: api}}]
"#;

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn web(m: &Mesh) -> usize {
        m.service_by_host("web.default.svc.cluster.local").unwrap()
    }

    fn rule_of(m: &Mesh, r: &Request<()>) -> Result<String, NoRoute> {
        select(m, Some(web(m)), None, None, r, 80).map(|s| s.rule.source.clone())
    }

    #[test]
    fn the_first_matching_rule_wins_and_each_match_block_is_all_of_its_conditions() {
        let m = compile(MESH);
        assert!(rule_of(&m, &req("GET", "/api/v1/users", &[])).unwrap().ends_with("http[v1]"));
        // The method condition of the first block fails; the second block
        // (a header) does not hold either.
        assert_eq!(rule_of(&m, &req("POST", "/api/v1/users", &[])).unwrap_err().flags, "NR");
        assert!(rule_of(&m, &req("POST", "/other", &[("x-canary", "yes")])).unwrap().ends_with("http[v1]"));
        let s = select(&m, Some(web(&m)), None, None, &req("POST", "/x", &[("x-canary", "yes")]), 80).unwrap();
        assert_eq!(s.matched, Some(1), "the second match block");
    }

    #[test]
    fn query_parameters_and_uri_case_are_matched_as_istio_does() {
        let m = compile(MESH);
        assert!(rule_of(&m, &req("GET", "/search?a=1&q=rustls", &[])).unwrap().ends_with("http[search]"));
        assert!(rule_of(&m, &req("GET", "/search?q=go", &[])).is_err());
        assert!(rule_of(&m, &req("GET", "/case/x", &[])).unwrap().ends_with("http[case]"));
    }

    #[test]
    fn a_service_without_a_virtual_service_routes_to_itself() {
        let m = compile(MESH);
        let api = m.service_by_host("api.default.svc.cluster.local").unwrap();
        let s = select(&m, Some(api), None, None, &req("GET", "/", &[]), 80).unwrap();
        assert_eq!(s.rule.source, "default");
        match &s.rule.action {
            Action::Route(d) => assert_eq!((d[0].service, d[0].weight), (api, 100)),
            Action::Redirect(_) => panic!("a route"),
        }
    }

    #[test]
    fn a_gateway_port_with_no_virtual_service_for_the_host_is_no_route() {
        let m = compile(MESH);
        let no = select(&m, None, Some(8080), None, &req("GET", "/", &[("host", "shop.example.com:8080")]), 8080)
            .unwrap_err();
        assert_eq!(no, NoRoute { status: StatusCode::NOT_FOUND, body: "no route for this host\n", flags: "NR" });
    }

    #[test]
    fn hosts_lose_their_port_and_query_parameters_are_split() {
        assert_eq!(request_host(&req("GET", "/", &[("host", "shop.example.com:8080")])), "shop.example.com");
        assert_eq!(request_host(&req("GET", "http://[::1]:80/", &[])), "[::1]");
        let u: Uri = "/p?a=1&b=&c".parse().unwrap();
        assert_eq!(
            url_query(&u),
            vec![("a".into(), "1".into()), ("b".into(), String::new()), ("c".into(), String::new())]
        );
    }

    proptest::proptest! {
        /// Any request head a client can send selects a rule or answers
        /// no route: regexes, prefixes, headers and query parameters over
        /// arbitrary text never panic.
        #[test]
        fn any_request_head_selects_or_answers_no_route(
            method in "[A-Z]{1,10}",
            path in "/[!-~]{0,80}",
            header in "[ -~]{0,80}",
            host in "[a-z0-9.:-]{0,40}",
        ) {
            let m = compile(MESH);
            let Ok(req) = Request::builder().method(method.as_str()).uri(path.as_str()).header("x-canary", header.as_str()).header("host", host.as_str()).body(()) else {
                return Ok(());
            };
            let _ = select(&m, Some(web(&m)), None, Some("default"), &req, 80);
            let _ = select(&m, None, Some(8080), None, &req, 8080);
        }
    }
}
