//! The compiled mesh: services with their addresses, ports and endpoints,
//! the HTTP and TCP routes that apply to each, and each destination's
//! policy. Built from [`Documents`] by [`Mesh::compile`], which is also
//! where a configuration that would route wrongly is rejected.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;

use super::export::{Export, ExportDefaults, Exported};
use super::pods::{pods, PodInfo};
use super::resources::{
    DestinationRuleSpec, GatewaySpec, Headers, HttpRedirect, HttpRewrite, IntOrString, LoadBalancer, Percent,
    RouteDestination, ServerTls, ServiceEntrySpec, ServiceSpec, StringMatch, TrafficPolicy, VirtualServiceSpec,
    GENERIC_CERT_KEY, GENERIC_KEY_KEY, TLS_CERT_KEY, TLS_KEY_KEY,
};
use super::source_dir::{fqdn, host_matches, labels_match, Doc, Documents, Origin, Problem};

/// How a service port's traffic is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Protocol {
    /// HTTP/1.1 (and HTTP/2 with prior knowledge, h2c).
    Http,
    Http2,
    /// Opaque TCP.
    Tcp,
    /// Not declared: the proxy sniffs the first bytes.
    Sniff,
}

impl Protocol {
    /// Istio's rules: `appProtocol` first, then the port name's prefix
    /// (`http`, `http-web`, `grpc-x`...), else detection.
    pub fn of(app_protocol: Option<&str>, name: Option<&str>, declared: Option<&str>) -> Protocol {
        Protocol::decide(app_protocol, name, declared).0
    }

    /// The protocol and what decided it, in words (for `proxy-config`).
    pub fn decide(app_protocol: Option<&str>, name: Option<&str>, declared: Option<&str>) -> (Protocol, String) {
        let word = |s: &str| -> Option<Protocol> {
            let p = s.split('-').next().unwrap_or(s).to_ascii_lowercase();
            match p.as_str() {
                "http" => Some(Protocol::Http),
                "http2" | "grpc" | "grpc-web" | "h2c" => Some(Protocol::Http2),
                "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "udp" => Some(Protocol::Tcp),
                _ => None,
            }
        };
        if let Some(p) = app_protocol.and_then(|a| word(a.trim_start_matches("kubernetes.io/"))) {
            return (p, format!("appProtocol {}", app_protocol.unwrap_or_default()));
        }
        if let Some(p) = declared.and_then(word) {
            return (p, format!("protocol {}", declared.unwrap_or_default()));
        }
        if let Some(p) = name.and_then(word) {
            return (p, format!("port name {}", name.unwrap_or_default()));
        }
        (Protocol::Sniff, "no protocol declared (appProtocol or port name)".into())
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ServicePortDef {
    pub port: u16,
    pub name: String,
    pub protocol: Protocol,
    /// What decided `protocol`, in words.
    pub protocol_from: String,
    /// The endpoint port when the endpoint does not name one.
    pub target_port: Option<u16>,
}

/// An endpoint address: an IP, or a DNS name resolved at connect time
/// (ServiceEntry `resolution: DNS`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Address {
    Ip(IpAddr),
    Dns(String),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Endpoint {
    pub address: Address,
    pub labels: BTreeMap<String, String>,
    /// Service port name -> endpoint port.
    pub ports: BTreeMap<String, u16>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Service {
    /// The FQDN (`name.namespace.svc.cluster.local`) or ServiceEntry host.
    pub hostname: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePortDef>,
    pub endpoints: Vec<Endpoint>,
    /// ServiceEntry `resolution: NONE`: forward to the original destination.
    pub passthrough: bool,
    /// Which client namespaces see it (a ServiceEntry's `exportTo`, a
    /// Service's `networking.istio.io/exportTo` annotation).
    pub export: Export,
}

impl Service {
    pub fn port(&self, port: u16) -> Option<&ServicePortDef> {
        self.ports.iter().find(|p| p.port == port)
    }
}

#[derive(Debug, Clone)]
pub enum StringMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl StringMatcher {
    pub fn matches(&self, s: &str) -> bool {
        match self {
            StringMatcher::Exact(e) => s == e,
            StringMatcher::Prefix(p) => s.starts_with(p.as_str()),
            // RE2 semantics: the whole value must match.
            StringMatcher::Regex(r) => r.find(s).is_some_and(|m| m.start() == 0 && m.end() == s.len()),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    pub uri: Option<StringMatcher>,
    pub ignore_uri_case: bool,
    pub method: Option<StringMatcher>,
    pub authority: Option<StringMatcher>,
    pub scheme: Option<StringMatcher>,
    pub headers: Vec<(String, StringMatcher)>,
    pub query_params: Vec<(String, StringMatcher)>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct WeightedDestination {
    /// Index into [`Mesh::services`].
    pub service: usize,
    pub subset: Option<String>,
    pub port: Option<u16>,
    pub weight: u32,
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone)]
pub enum Action {
    Route(Vec<WeightedDestination>),
    Redirect(HttpRedirect),
}

#[derive(Debug, Clone)]
pub struct Retry {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(u16, f64)>,
}

#[derive(Debug, Clone)]
pub struct HttpRouteRule {
    /// `<namespace>/<VirtualService>` and the rule's index or name.
    pub source: String,
    /// The VirtualService's namespace and which client namespaces see it.
    pub namespace: String,
    pub export: Export,
    pub matches: Vec<RequestMatch>,
    pub action: Action,
    pub rewrite: Option<HttpRewrite>,
    pub headers: Option<Headers>,
    pub timeout: Option<Duration>,
    pub retries: Option<Retry>,
    pub fault: Option<Fault>,
    /// mirror and mirrorPercentage: a copy of each request (that share)
    /// goes there too; its response is dropped.
    pub mirror: Option<(WeightedDestination, f64)>,
}

#[derive(Debug, Clone)]
pub struct TcpRouteRule {
    pub source: String,
    pub namespace: String,
    pub export: Export,
    pub port: Option<u16>,
    pub route: Vec<WeightedDestination>,
}

impl Exported for HttpRouteRule {
    fn export(&self) -> &Export {
        &self.export
    }
    fn namespace(&self) -> &str {
        &self.namespace
    }
}

impl Exported for TcpRouteRule {
    fn export(&self) -> &Export {
        &self.export
    }
    fn namespace(&self) -> &str {
        &self.namespace
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest,
    Random,
    Passthrough,
    /// consistentHash: the same key goes to the same endpoint (rendezvous
    /// hashing, so few keys move when endpoints change).
    HashHeader(String),
    HashQueryParameter(String),
    HashSourceIp,
}

/// connectionPool, as Envoy's circuit breakers apply it per destination.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolLimits {
    /// tcp.maxConnections: connections (for HTTP/1.1: requests in flight)
    /// to the destination.
    pub max_connections: Option<usize>,
    /// http.http1MaxPendingRequests: requests waiting for a connection.
    pub max_pending: Option<usize>,
    /// http.http2MaxRequests: requests in flight.
    pub max_requests: Option<usize>,
    /// http.maxRequestsPerConnection (1: a connection per request).
    pub max_requests_per_connection: Option<u32>,
    pub connect_timeout: Option<Duration>,
}

/// outlierDetection: endpoints that keep failing are ejected for a while.
#[derive(Debug, Clone)]
pub struct Outlier {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

/// A destination's policy (top level, or a subset's with its overrides).
#[derive(Debug, Clone)]
pub struct EffectivePolicy {
    pub labels: Option<BTreeMap<String, String>>,
    pub lb: LbPolicy,
    pub pool: PoolLimits,
    pub outlier: Option<Outlier>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    /// The DestinationRule's namespace: of two for one host, the host's
    /// own namespace's wins over the root namespace's.
    pub namespace: String,
    pub top: EffectivePolicy,
    pub subsets: BTreeMap<String, EffectivePolicy>,
    /// portLevelSettings: (subset, destination port) -> the policy with
    /// the port's settings over the subset's (or the top level's).
    pub ports: BTreeMap<(Option<String>, u16), EffectivePolicy>,
}

/// A Gateway server the agent listens for (it acts as the ingress
/// gateway the Gateway's selector names).
#[derive(Debug, Clone)]
pub struct GatewayListener {
    /// `namespace/name` of the Gateway.
    pub gateway: String,
    pub port: u16,
    pub protocol: String,
    pub hosts: Vec<String>,
    /// TLS termination (mode SIMPLE), checked: the chain and key match.
    pub tls: Option<GatewayTls>,
}

/// A gateway server's certificate chain and private key (PEM), read from
/// the files it names or from its `credentialName` Secret. Equal when the
/// bytes are: a rotated Secret is a different value, the same one re-read
/// is not.
#[derive(Clone)]
pub struct GatewayTls {
    /// Where it came from, for logs: `Secret istio-system/web-cert`, or the
    /// certificate file.
    pub source: String,
    /// The server's hosts, which the client's SNI selects by.
    pub hosts: Vec<String>,
    pub cert: Arc<[u8]>,
    pub key: Arc<[u8]>,
}

impl PartialEq for GatewayTls {
    fn eq(&self, other: &Self) -> bool {
        self.cert == other.cert && self.key == other.key && self.hosts == other.hosts
    }
}

impl std::fmt::Debug for GatewayTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayTls").field("source", &self.source).finish_non_exhaustive()
    }
}

/// A VirtualService bound to gateways.
#[derive(Debug, Clone)]
pub struct GatewayRoutes {
    pub gateways: Vec<String>,
    pub hosts: Vec<String>,
    pub rules: Vec<HttpRouteRule>,
}

/// Gateways whose selector is among these labels are served by the agent
/// (Istio's default ingress gateway labels).
pub const GATEWAY_LABELS: [(&str, &str); 2] = [("istio", "ingressgateway"), ("app", "istio-ingressgateway")];

/// The compiled mesh. Immutable; a change builds a new one. Runtime state
/// that must outlive a change (balancer cursors, ejections, pool slots) is
/// kept by the data path, keyed by what it describes.
#[derive(Debug, Default)]
pub struct Mesh {
    pub services: Vec<Service>,
    by_vip: HashMap<(IpAddr, u16), usize>,
    by_host: HashMap<String, usize>,
    /// (endpoint address, endpoint port) -> (service, index of its port):
    /// which Service port reaches a pod's port (the first one defined).
    by_endpoint: HashMap<(IpAddr, u16), (usize, usize)>,
    pub http_routes: HashMap<usize, Vec<HttpRouteRule>>,
    pub tcp_routes: HashMap<usize, Vec<TcpRouteRule>>,
    pub policies: HashMap<usize, Policy>,
    pub gateway_listeners: Vec<GatewayListener>,
    pub gateway_routes: Vec<GatewayRoutes>,
    /// Pods and WorkloadEntries by address: (workload name, namespace),
    /// the name being the `app` label where there is one.
    workloads_by_ip: HashMap<IpAddr, (String, String)>,
    /// Every Pod the config names, and which of them the mesh enrolls.
    pub pods: Vec<PodInfo>,
    /// PeerAuthentication and AuthorizationPolicy.
    pub security: super::security::Security,
    pods_by_ip: HashMap<IpAddr, usize>,
    pub warnings: Vec<Problem>,
    /// Objects left out because of an error in them (by a tolerant
    /// compile, [`Mesh::compile_tolerant`]); everything else applies.
    /// Security objects with an error stay in, failing closed.
    pub rejected: Vec<Problem>,
}

/// The endpoints Kubernetes would make for Service `s` from its selector:
/// each ready Pod of its namespace with an address whose labels match,
/// with every Service port's target (a named `targetPort` looked up in the
/// pod's container ports; a pod without that name is left out of that
/// port, and out entirely when no port resolves).
fn selected_pods(s: &Doc<ServiceSpec>, docs: &Documents) -> Vec<Endpoint> {
    let ns = s.namespace();
    let mut out = Vec::new();
    for p in docs.pods.iter().filter(|p| p.namespace() == ns && labels_match(&s.spec.selector, &p.meta.labels)) {
        let status = &p.spec.status;
        let running = status.phase.as_deref().is_none_or(|ph| ph == "Running");
        let ready = !status.conditions.iter().any(|c| c.type_ == "Ready" && c.status != "True");
        let Some(ip) = status.ips().first().copied() else { continue };
        if !running || !ready {
            continue;
        }
        let named = |name: &str| {
            p.spec
                .spec
                .containers
                .iter()
                .flat_map(|c| &c.ports)
                .find(|cp| cp.name.as_deref() == Some(name))
                .map(|cp| cp.container_port)
        };
        let ports: BTreeMap<String, u16> = s
            .spec
            .ports
            .iter()
            .filter_map(|sp| {
                let port = match &sp.target_port {
                    Some(IntOrString::Int(n)) => Some(*n),
                    Some(IntOrString::String(name)) => named(name),
                    None => Some(sp.port),
                };
                port.map(|n| (sp.name.clone().unwrap_or_default(), n))
            })
            .collect();
        if !ports.is_empty() {
            out.push(Endpoint { address: Address::Ip(ip), labels: p.meta.labels.clone(), ports });
        }
    }
    out
}

/// Istio's duration strings: `1s`, `500ms`, `1.5s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("`{s}` has no unit; write e.g. 500ms, 1s, 2m"))?;
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a duration (e.g. 500ms, 1s)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "us" | "µs" => n / 1_000_000.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}`; use ms, s, m or h")),
    };
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

struct Ctx<'a> {
    errors: &'a mut Vec<Problem>,
    warnings: &'a mut Vec<Problem>,
}

impl Ctx<'_> {
    fn error(&mut self, origin: &Origin, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(Problem { origin: origin.clone(), field: field.into(), reason: reason.into() });
    }
    fn warn(&mut self, origin: &Origin, field: impl Into<String>, reason: impl Into<String>) {
        self.warnings.push(Problem { origin: origin.clone(), field: field.into(), reason: reason.into() });
    }
}

fn string_matcher(m: &StringMatch, origin: &Origin, field: &str, ctx: &mut Ctx) -> Option<StringMatcher> {
    let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()].iter().filter(|b| **b).count();
    if set != 1 {
        ctx.error(origin, field, "exactly one of exact, prefix or regex is needed");
        return None;
    }
    if let Some(e) = &m.exact {
        return Some(StringMatcher::Exact(e.clone()));
    }
    if let Some(p) = &m.prefix {
        return Some(StringMatcher::Prefix(p.clone()));
    }
    let r = m.regex.as_deref().unwrap_or_default();
    match Regex::new(r) {
        Ok(re) => Some(StringMatcher::Regex(re)),
        Err(e) => {
            ctx.error(
                origin,
                format!("{field}.regex"),
                format!("invalid regex `{r}`: {}", e.to_string().lines().last().unwrap_or("")),
            );
            None
        }
    }
}

fn lb_policy(lb: Option<&LoadBalancer>, origin: &Origin, field: &str, ctx: &mut Ctx) -> LbPolicy {
    let Some(lb) = lb else { return LbPolicy::RoundRobin };
    if let Some(ch) = &lb.consistent_hash {
        if lb.simple.is_some() {
            ctx.error(origin, field, "simple and consistentHash are exclusive");
        }
        return match (&ch.http_header_name, ch.use_source_ip, &ch.http_query_parameter_name) {
            (Some(h), None | Some(false), None) => LbPolicy::HashHeader(h.to_ascii_lowercase()),
            (None, Some(true), None) => LbPolicy::HashSourceIp,
            (None, None | Some(false), Some(q)) => LbPolicy::HashQueryParameter(q.clone()),
            _ => {
                ctx.error(
                    origin,
                    format!("{field}.consistentHash"),
                    "exactly one of httpHeaderName, useSourceIp or httpQueryParameterName is needed",
                );
                LbPolicy::RoundRobin
            }
        };
    }
    match lb.simple.as_deref() {
        None | Some("ROUND_ROBIN" | "UNSPECIFIED") => LbPolicy::RoundRobin,
        Some("LEAST_REQUEST" | "LEAST_CONN") => LbPolicy::LeastRequest,
        Some("RANDOM") => LbPolicy::Random,
        Some("PASSTHROUGH") => LbPolicy::Passthrough,
        Some(other) => {
            ctx.error(
                origin,
                format!("{field}.simple"),
                format!("`{other}` is not a load balancer; use ROUND_ROBIN, LEAST_REQUEST, RANDOM or PASSTHROUGH"),
            );
            LbPolicy::RoundRobin
        }
    }
}

fn percent(p: &Option<Percent>, origin: &Origin, field: &str, ctx: &mut Ctx) -> f64 {
    match p {
        // Istio: no percentage means every request.
        None => 100.0,
        Some(p) if (0.0..=100.0).contains(&p.value) => p.value,
        Some(p) => {
            ctx.error(
                origin,
                format!("{field}.percentage.value"),
                format!("{} is not a percentage (0 to 100)", p.value),
            );
            100.0
        }
    }
}

/// Whether `path` is a readable PEM file holding a certificate (`cert`) or
/// a private key; an error names the field otherwise.
/// A gateway server's `serverCertificate` and `privateKey` files, read
/// and checked now; a missing or unreadable file, or a key that does not
/// match, rejects the configuration (the user named the files).
fn tls_files(
    t: &ServerTls,
    origin: &Origin,
    field: &str,
    dirs: Option<&[std::path::PathBuf]>,
    ctx: &mut Ctx,
) -> Option<GatewayTls> {
    let mut read = |path: &Option<String>, name: &str| -> Option<Vec<u8>> {
        let path = path.as_deref().unwrap_or_default();
        if path.is_empty() {
            ctx.error(
                origin,
                format!("{field}.tls.{name}"),
                "missing; name the PEM file, or the Secret in credentialName",
            );
            return None;
        }
        if let Some(dirs) = dirs {
            // The file itself, links resolved, must lie under an allowed
            // directory (so `..` and symlinks cannot leave it).
            let real = std::fs::canonicalize(path).ok();
            let allowed = real
                .as_ref()
                .is_some_and(|r| dirs.iter().filter_map(|d| std::fs::canonicalize(d).ok()).any(|d| r.starts_with(&d)));
            if !allowed {
                ctx.error(
                    origin,
                    format!("{field}.tls.{name}"),
                    format!("{path} is not under a directory of mesh.gatewayCertificateDirs in the agent settings; use credentialName (a TLS Secret of the gateway's namespace), or list its directory there"),
                );
                return None;
            }
        }
        std::fs::read(path)
            .map_err(|e| ctx.error(origin, format!("{field}.tls.{name}"), format!("cannot read {path}: {e}")))
            .ok()
    };
    let cert = read(&t.server_certificate, "serverCertificate");
    let key = read(&t.private_key, "privateKey");
    let (cert, key) = (cert?, key?);
    let cert_path = t.server_certificate.clone().unwrap_or_default();
    let key_path = t.private_key.clone().unwrap_or_default();
    match crate::tls::gateway_certified_key(&cert, &key) {
        Ok(_) => Some(GatewayTls { source: cert_path, hosts: Vec::new(), cert: cert.into(), key: key.into() }),
        Err(e) => {
            let (f, path) = match e {
                crate::tls::GatewayCertError::NoCertificate => ("serverCertificate", &cert_path),
                _ => ("privateKey", &key_path),
            };
            ctx.error(origin, format!("{field}.tls.{f}"), format!("{path} {e}"));
            None
        }
    }
}

/// A gateway server's `credentialName`: a TLS Secret (`kubernetes.io/tls`
/// with tls.crt and tls.key, or Istio's generic form with cert and key) in
/// the gateway's own namespace, as Istio's gateways read it. Anything else
/// skips the server with a warning naming the Secret; the other servers
/// keep serving.
fn credential(
    name: &str,
    docs: &Documents,
    gateway_namespace: &str,
    origin: &Origin,
    field: &str,
    ctx: &mut Ctx,
) -> Option<GatewayTls> {
    let field = format!("{field}.tls.credentialName");
    let full = format!("{gateway_namespace}/{name}");
    let Some(secret) = docs.secrets.iter().find(|s| s.meta.name == name && s.namespace() == gateway_namespace) else {
        let elsewhere: Vec<&str> = docs.secrets.iter().filter(|s| s.meta.name == name).map(Doc::namespace).collect();
        let hint = if elsewhere.is_empty() {
            format!("create it with `kubectl create -n {gateway_namespace} secret tls {name} --cert=... --key=...`")
        } else {
            format!(
                "one is in namespace {}, but the gateway reads Secrets only from its own namespace {gateway_namespace}; create it there",
                elsewhere.join(", ")
            )
        };
        ctx.warn(origin, field, format!("no Secret {full}: {hint}; server skipped"));
        return None;
    };
    let Some((cert_key, cert, key_key, key)) = secret.spec.tls_pair() else {
        let ty = secret.spec.type_.as_deref().unwrap_or("Opaque");
        ctx.warn(
            origin,
            field,
            format!(
                "Secret {full} is not a TLS Secret (type {ty}, without {TLS_CERT_KEY} and {TLS_KEY_KEY}, or {GENERIC_CERT_KEY} and {GENERIC_KEY_KEY}); create it with `kubectl create secret tls`; server skipped"
            ),
        );
        return None;
    };
    match crate::tls::gateway_certified_key(cert, key) {
        Ok(_) => {
            Some(GatewayTls { source: format!("Secret {full}"), hosts: Vec::new(), cert: cert.into(), key: key.into() })
        }
        Err(e) => {
            let which = if matches!(e, crate::tls::GatewayCertError::NoCertificate) { cert_key } else { key_key };
            ctx.warn(origin, field, format!("Secret {full}: its {which} {e}; server skipped"));
            None
        }
    }
}

/// A policy from a trafficPolicy: fields it sets replace the parent's
/// (a subset's policy overrides the top level field by field, as in Istio).
fn effective_policy(
    parent: Option<&EffectivePolicy>,
    tp: Option<&TrafficPolicy>,
    labels: Option<BTreeMap<String, String>>,
    origin: &Origin,
    field: &str,
    ctx: &mut Ctx,
) -> EffectivePolicy {
    let mut p = parent.cloned().unwrap_or(EffectivePolicy {
        labels: None,
        lb: LbPolicy::RoundRobin,
        pool: PoolLimits::default(),
        outlier: None,
    });
    p.labels = labels;
    let Some(tp) = tp else { return p };
    if let Some(lb) = &tp.load_balancer {
        p.lb = lb_policy(Some(lb), origin, &format!("{field}.loadBalancer"), ctx);
    }
    let dur = |s: &Option<String>, f: &str, ctx: &mut Ctx| -> Option<Duration> {
        s.as_deref().and_then(|s| match parse_duration(s) {
            Ok(d) => Some(d),
            Err(e) => {
                ctx.error(origin, format!("{field}.{f}"), e);
                None
            }
        })
    };
    if let Some(cp) = &tp.connection_pool {
        let mut pool = PoolLimits::default();
        if let Some(t) = &cp.tcp {
            pool.max_connections = t.max_connections.map(|n| n.max(1) as usize);
            pool.connect_timeout = dur(&t.connect_timeout, "connectionPool.tcp.connectTimeout", ctx);
        }
        if let Some(h) = &cp.http {
            pool.max_pending = h.http1_max_pending_requests.map(|n| n as usize);
            pool.max_requests = h.http2_max_requests.map(|n| n.max(1) as usize);
            pool.max_requests_per_connection = h.max_requests_per_connection;
        }
        p.pool = pool;
    }
    if let Some(od) = &tp.outlier_detection {
        p.outlier = Some(Outlier {
            // Istio's defaults.
            consecutive_5xx: od.consecutive_5xx_errors.unwrap_or(5),
            consecutive_gateway: od.consecutive_gateway_errors.unwrap_or(0),
            interval: dur(&od.interval, "outlierDetection.interval", ctx).unwrap_or(Duration::from_secs(10)),
            base_ejection: dur(&od.base_ejection_time, "outlierDetection.baseEjectionTime", ctx)
                .unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: od.max_ejection_percent.unwrap_or(10).min(100),
        });
    }
    p
}

/// What an agent compiles the mesh for: its namespace (where its gateway
/// runs and reads Secrets) and the mesh-wide `exportTo` defaults.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub namespace: String,
    pub exports: ExportDefaults,
    /// Where a Gateway's `serverCertificate` and `privateKey` files may
    /// be: `None`, anywhere (a dev box's own YAML); otherwise only under
    /// these directories (from the cluster a Gateway is a tenant's word,
    /// and must not name the agent's own keys).
    pub certificate_dirs: Option<Vec<std::path::PathBuf>>,
    /// The namespaces whose Gateways may open ports on the node: `None`,
    /// any (a dev box's own YAML); otherwise only these (`*`: any).
    pub gateway_namespaces: Option<Vec<String>>,
}

impl Scope {
    /// An agent in `namespace` with Istio's defaults (everything exported).
    pub fn new(namespace: &str) -> Scope {
        Scope {
            namespace: namespace.to_string(),
            exports: ExportDefaults::default(),
            certificate_dirs: None,
            gateway_namespaces: None,
        }
    }

    /// Whether a Gateway of `namespace` may bind the node's ports.
    pub fn may_bind_gateway(&self, namespace: &str) -> bool {
        self.gateway_namespaces.as_ref().is_none_or(|v| v.iter().any(|n| n == "*" || n == namespace))
    }
}

impl Mesh {
    /// Compile the documents for an agent in the default namespace
    /// (`istio-system`). Errors reject the whole configuration.
    pub fn compile(docs: &Documents) -> Result<Mesh, Vec<Problem>> {
        Mesh::compile_in(docs, &Scope::new(super::security::ROOT_NAMESPACE))
    }

    /// Compile the documents for an agent in `scope.namespace` (its
    /// `POD_NAMESPACE`), where its ingress gateway runs and reads the
    /// Secrets that `credentialName` names, with the mesh-wide `exportTo`
    /// defaults of `scope`.
    pub fn compile_in(docs: &Documents, scope: &Scope) -> Result<Mesh, Vec<Problem>> {
        let (mesh, errors) = Mesh::compile_all(docs, scope);
        if errors.is_empty() {
            Ok(mesh)
        } else {
            Err(errors)
        }
    }

    /// The running agent's compile: one bad object rejects that object,
    /// not the mesh. An object with an error is rejected as Istio's
    /// validation rejects a change: its last accepted version (from
    /// `previous`, the documents this returned last time) stays in force,
    /// and an object never accepted is left out. Either way it is named in
    /// [`Mesh::rejected`], and new pods, new policies and every other
    /// object keep applying. A PeerAuthentication or AuthorizationPolicy
    /// with an error is never left out (that would widen access): it is
    /// compiled failing closed (see [`super::security`]) and named too.
    /// Returns the mesh and the documents it was compiled from.
    pub fn compile_tolerant(docs: &Documents, previous: Option<&Documents>, scope: &Scope) -> (Mesh, Documents) {
        let security = |p: &Problem| matches!(p.origin.kind.as_str(), "PeerAuthentication" | "AuthorizationPolicy");
        let mut docs = docs.clone();
        let mut rejected: Vec<Problem> = Vec::new();
        let mut restored: Vec<super::source_dir::ObjectKey> = Vec::new();
        // A previous version can fail against what changed around it, and
        // leaving an object out can surface an error in another (a
        // VirtualService naming a dropped Gateway): a few rounds.
        for _ in 0..4 {
            let (mut mesh, errors) = Mesh::compile_all(&docs, scope);
            let (kept, dropped): (Vec<Problem>, Vec<Problem>) = errors.into_iter().partition(security);
            if dropped.is_empty() {
                rejected.extend(kept);
                mesh.rejected = rejected;
                return (mesh, docs);
            }
            let origins: Vec<Origin> = dropped.iter().map(|p| p.origin.clone()).collect();
            let keys: Vec<Vec<_>> = dropped.iter().map(|p| docs.keys_of(std::slice::from_ref(&p.origin))).collect();
            docs.remove_origins(&origins);
            let again: Vec<_> = keys.iter().flatten().filter(|k| !restored.contains(k)).cloned().collect();
            let back = previous.map(|p| docs.restore_from(p, &again)).unwrap_or_default();
            for (mut p, k) in dropped.into_iter().zip(keys) {
                let kept = k.iter().any(|k| back.contains(k));
                p.reason = format!(
                    "{}; {}",
                    p.reason,
                    if kept { "this change is rejected, its last accepted version stays in force" } else { "left out" }
                );
                rejected.push(p);
            }
            restored.extend(back);
        }
        // Still not clean: keep only what cannot widen access.
        let mut only = Documents::default();
        only.pods.clone_from(&docs.pods);
        only.namespaces.clone_from(&docs.namespaces);
        only.peer_authentications.clone_from(&docs.peer_authentications);
        only.authorization_policies.clone_from(&docs.authorization_policies);
        let (mut mesh, errors) = Mesh::compile_all(&only, scope);
        rejected.extend(errors);
        mesh.rejected = rejected;
        (mesh, only)
    }

    /// Compile everything; the errors found on the way.
    fn compile_all(docs: &Documents, scope: &Scope) -> (Mesh, Vec<Problem>) {
        let mut errors = Vec::new();
        let mut warnings = docs.warnings.clone();
        let mut ctx = Ctx { errors: &mut errors, warnings: &mut warnings };
        let mut mesh = Mesh::default();

        // Labels of a workload by IP, from Pods and WorkloadEntries.
        let mut labels_by_ip: HashMap<(String, IpAddr), BTreeMap<String, String>> = HashMap::new();
        for p in &docs.pods {
            for ip in p.spec.status.ips() {
                labels_by_ip.insert((p.namespace().into(), ip), p.meta.labels.clone());
            }
        }
        for w in &docs.workload_entries {
            if let Ok(ip) = w.spec.address.parse() {
                let mut l = w.meta.labels.clone();
                l.extend(w.spec.labels.clone());
                labels_by_ip.insert((w.namespace().into(), ip), l);
            }
        }

        mesh.pods = pods(docs);
        mesh.security = super::security::Security::compile(docs, ctx.errors, ctx.warnings);
        for (i, p) in mesh.pods.iter().enumerate() {
            for ip in &p.ips {
                mesh.pods_by_ip.insert(*ip, i);
            }
        }
        for p in &docs.pods {
            let name = p.meta.labels.get("app").cloned().unwrap_or_else(|| p.meta.name.clone());
            for ip in p.spec.status.ips() {
                mesh.workloads_by_ip.insert(ip, (name.clone(), p.namespace().to_string()));
            }
        }
        for w in &docs.workload_entries {
            if let Ok(ip) = w.spec.address.parse() {
                let name = w
                    .spec
                    .labels
                    .get("app")
                    .or(w.meta.labels.get("app"))
                    .cloned()
                    .unwrap_or_else(|| w.meta.name.clone());
                mesh.workloads_by_ip.insert(ip, (name, w.namespace().to_string()));
            }
        }
        let exports = &scope.exports;
        for s in &docs.services {
            mesh.add_kubernetes_service(s, docs, &labels_by_ip, exports, &mut ctx);
        }
        for se in &docs.service_entries {
            mesh.add_service_entry(se, docs, exports, &mut ctx);
        }
        for d in &docs.destination_rules {
            mesh.add_destination_rule(d, exports, &mut ctx);
        }
        for g in &docs.gateways {
            if !scope.may_bind_gateway(g.namespace()) {
                let allowed = scope.gateway_namespaces.as_deref().unwrap_or_default().join(", ");
                ctx.warn(
                    &g.origin,
                    "metadata.namespace",
                    format!("ignored: Gateways may open the node's ports only from the namespaces in mesh.gatewayNamespaces ({allowed}); add {} there to allow it", g.namespace()),
                );
                continue;
            }
            mesh.add_gateway(g, docs, &scope.namespace, scope.certificate_dirs.as_deref(), &mut ctx);
        }
        for v in &docs.virtual_services {
            mesh.add_virtual_service(v, exports, &mut ctx);
        }
        mesh.warn_http_policies_on_tcp_ports(docs, &mut ctx);
        mesh.warnings = warnings;
        (mesh, errors)
    }

    fn insert_service(&mut self, svc: Service, origin: &Origin, ctx: &mut Ctx) -> Option<usize> {
        if self.by_host.contains_key(&svc.hostname) {
            ctx.warn(origin, "", format!("{} is defined twice; the first definition is used", svc.hostname));
            return None;
        }
        let i = self.services.len();
        for vip in &svc.vips {
            for p in &svc.ports {
                if let Some(other) = self.by_vip.insert((*vip, p.port), i) {
                    ctx.error(
                        origin,
                        "",
                        format!("{vip}:{} is already the address of {}", p.port, self.services[other].hostname),
                    );
                }
            }
        }
        self.by_host.insert(svc.hostname.clone(), i);
        for e in &svc.endpoints {
            let Address::Ip(ip) = e.address else { continue };
            for (k, p) in svc.ports.iter().enumerate() {
                let port = e.ports.get(&p.name).copied().or(p.target_port).unwrap_or(p.port);
                self.by_endpoint.entry((ip, port)).or_insert((i, k));
            }
        }
        self.services.push(svc);
        Some(i)
    }

    fn add_kubernetes_service(
        &mut self,
        s: &Doc<ServiceSpec>,
        docs: &Documents,
        labels_by_ip: &HashMap<(String, IpAddr), BTreeMap<String, String>>,
        exports: &ExportDefaults,
        ctx: &mut Ctx,
    ) {
        let ns = s.namespace().to_string();
        // Istio's Service annotation: a comma-separated exportTo.
        let annotated_export: Vec<String> = s
            .meta
            .annotations
            .get("networking.istio.io/exportTo")
            .map(|a| a.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect())
            .unwrap_or_default();
        if let Err(e) = super::export::check(&annotated_export) {
            ctx.error(&s.origin, "metadata.annotations[networking.istio.io/exportTo]", e);
            return;
        }
        let mut vips = Vec::new();
        let ips = s.spec.cluster_ip.iter().chain(s.spec.cluster_ips.iter());
        for ip in ips {
            if ip.is_empty() || ip == "None" {
                continue;
            }
            match ip.parse::<IpAddr>() {
                Ok(a) if !vips.contains(&a) => vips.push(a),
                Ok(_) => {}
                Err(_) => ctx.error(&s.origin, "spec.clusterIP", format!("`{ip}` is not an IP address")),
            }
        }
        let mut ports = Vec::new();
        for (i, p) in s.spec.ports.iter().enumerate() {
            let target_port = match &p.target_port {
                Some(IntOrString::Int(n)) => Some(*n),
                Some(IntOrString::String(_)) => None,
                None => Some(p.port),
            };
            if p.port == 0 {
                ctx.error(&s.origin, format!("spec.ports[{i}].port"), "port 0 is not a port");
            }
            let (protocol, protocol_from) = Protocol::decide(p.app_protocol.as_deref(), p.name.as_deref(), None);
            ports.push(ServicePortDef {
                port: p.port,
                name: p.name.clone().unwrap_or_default(),
                protocol,
                protocol_from,
                target_port,
            });
        }
        let mut endpoints: Vec<Endpoint> = Vec::new();
        let label_of = |ip: IpAddr| labels_by_ip.get(&(ns.clone(), ip)).cloned().unwrap_or_default();
        for e in docs.endpoints.iter().filter(|e| e.meta.name == s.meta.name && e.namespace() == ns) {
            for (si, subset) in e.spec.iter().enumerate() {
                let ports: BTreeMap<String, u16> =
                    subset.ports.iter().map(|p| (p.name.clone().unwrap_or_default(), p.port)).collect();
                for (ai, a) in subset.addresses.iter().enumerate() {
                    match a.ip.parse::<IpAddr>() {
                        Ok(ip) => endpoints.push(Endpoint {
                            address: Address::Ip(ip),
                            labels: label_of(ip),
                            ports: ports.clone(),
                        }),
                        Err(_) => ctx.error(
                            &e.origin,
                            format!("subsets[{si}].addresses[{ai}].ip"),
                            format!("`{}` is not an IP address", a.ip),
                        ),
                    }
                }
            }
        }
        for sl in docs
            .slices
            .iter()
            .filter(|sl| sl.namespace() == ns && sl.meta.labels.get("kubernetes.io/service-name") == Some(&s.meta.name))
        {
            let ports: BTreeMap<String, u16> =
                sl.spec.ports.iter().map(|p| (p.name.clone().unwrap_or_default(), p.port)).collect();
            for (ei, ep) in sl.spec.endpoints.iter().enumerate() {
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                for a in &ep.addresses {
                    match a.parse::<IpAddr>() {
                        Ok(ip) => endpoints.push(Endpoint {
                            address: Address::Ip(ip),
                            labels: label_of(ip),
                            ports: ports.clone(),
                        }),
                        Err(_) => ctx.error(
                            &sl.origin,
                            format!("endpoints[{ei}].addresses"),
                            format!("`{a}` is not an IP address"),
                        ),
                    }
                }
            }
        }
        // No Endpoints and no EndpointSlice (a directory that mirrors a
        // cluster): the ready Pods the selector matches, as Kubernetes'
        // endpoints controller would make them.
        let listed = docs.endpoints.iter().any(|e| e.meta.name == s.meta.name && e.namespace() == ns)
            || docs.slices.iter().any(|sl| {
                sl.namespace() == ns && sl.meta.labels.get("kubernetes.io/service-name") == Some(&s.meta.name)
            });
        if !listed && !s.spec.selector.is_empty() {
            endpoints.extend(selected_pods(s, docs));
        }
        // WorkloadEntries the Service selects (VMs and local processes).
        if !s.spec.selector.is_empty() {
            for w in docs.workload_entries.iter().filter(|w| w.namespace() == ns) {
                let mut labels = w.meta.labels.clone();
                labels.extend(w.spec.labels.clone());
                if !labels_match(&s.spec.selector, &labels) {
                    continue;
                }
                match w.spec.address.parse::<IpAddr>() {
                    Ok(ip) => {
                        endpoints.push(Endpoint { address: Address::Ip(ip), labels, ports: w.spec.ports.clone() });
                    }
                    Err(_) => {
                        ctx.error(&w.origin, "spec.address", format!("`{}` is not an IP address", w.spec.address));
                    }
                }
            }
        }
        self.insert_service(
            Service {
                hostname: fqdn(&s.meta.name, &ns),
                export: Export::resolve(&annotated_export, &exports.services, &ns),
                namespace: ns,
                vips,
                ports,
                endpoints,
                passthrough: false,
            },
            &s.origin,
            ctx,
        );
    }

    fn add_service_entry(
        &mut self,
        se: &Doc<ServiceEntrySpec>,
        docs: &Documents,
        exports: &ExportDefaults,
        ctx: &mut Ctx,
    ) {
        let ns = se.namespace().to_string();
        if let Err(e) = super::export::check(&se.spec.export_to) {
            ctx.error(&se.origin, "spec.exportTo", e);
            return;
        }
        let export = Export::resolve(&se.spec.export_to, &exports.services, &ns);
        let mut vips = Vec::new();
        for (i, a) in se.spec.addresses.iter().enumerate() {
            match a.split('/').next().unwrap_or(a).parse::<IpAddr>() {
                Ok(ip) => vips.push(ip),
                Err(_) => ctx.error(&se.origin, format!("spec.addresses[{i}]"), format!("`{a}` is not an IP address")),
            }
        }
        if se.spec.hosts.is_empty() {
            ctx.error(&se.origin, "spec.hosts", "at least one host is needed");
        }
        let resolution = se.spec.resolution.as_deref().unwrap_or("NONE");
        if !["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"].contains(&resolution) {
            ctx.error(
                &se.origin,
                "spec.resolution",
                format!("`{resolution}` is not NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
            );
        }
        let ports: Vec<ServicePortDef> = se
            .spec
            .ports
            .iter()
            .map(|p| {
                let (protocol, protocol_from) = Protocol::decide(None, p.name.as_deref(), p.protocol.as_deref());
                ServicePortDef {
                    port: p.number,
                    name: p.name.clone().unwrap_or_default(),
                    protocol,
                    protocol_from,
                    target_port: p.target_port.or(Some(p.number)),
                }
            })
            .collect();
        let mut endpoints = Vec::new();
        for (i, e) in se.spec.endpoints.iter().enumerate() {
            let address = match e.address.parse::<IpAddr>() {
                Ok(ip) => Address::Ip(ip),
                Err(_) if resolution.starts_with("DNS") => Address::Dns(e.address.clone()),
                Err(_) => {
                    ctx.error(
                        &se.origin,
                        format!("spec.endpoints[{i}].address"),
                        format!("`{}` is not an IP address (resolution {resolution})", e.address),
                    );
                    continue;
                }
            };
            endpoints.push(Endpoint { address, labels: e.labels.clone(), ports: e.ports.clone() });
        }
        if let Some(sel) = &se.spec.workload_selector {
            for w in docs.workload_entries.iter().filter(|w| w.namespace() == ns) {
                let mut labels = w.meta.labels.clone();
                labels.extend(w.spec.labels.clone());
                if labels_match(&sel.labels, &labels) {
                    if let Ok(ip) = w.spec.address.parse() {
                        endpoints.push(Endpoint { address: Address::Ip(ip), labels, ports: w.spec.ports.clone() });
                    }
                }
            }
        }
        for host in &se.spec.hosts {
            let mut eps = endpoints.clone();
            if eps.is_empty() && resolution.starts_with("DNS") {
                eps.push(Endpoint {
                    address: Address::Dns(host.clone()),
                    labels: BTreeMap::new(),
                    ports: BTreeMap::new(),
                });
            }
            self.insert_service(
                Service {
                    hostname: host.clone(),
                    namespace: ns.clone(),
                    vips: vips.clone(),
                    ports: ports.clone(),
                    endpoints: eps,
                    passthrough: resolution == "NONE",
                    export: export.clone(),
                },
                &se.origin,
                ctx,
            );
        }
    }

    fn add_destination_rule(&mut self, d: &Doc<DestinationRuleSpec>, exports: &ExportDefaults, ctx: &mut Ctx) {
        let host = fqdn(&d.spec.host, d.namespace());
        let Some(&svc) = self.by_host.get(&host) else {
            ctx.warn(
                &d.origin,
                "spec.host",
                format!("no Service or ServiceEntry is {host}; the rule applies to nothing"),
            );
            return;
        };
        if let Err(e) = super::export::check(&d.spec.export_to) {
            ctx.error(&d.origin, "spec.exportTo", e);
            return;
        }
        // Istio applies a DestinationRule from the client's namespace, the
        // host's or the root namespace. The proxy keeps one per host for
        // every client, so it takes the host's namespace's or the root's:
        // a rule from a third namespace would apply to other tenants'
        // clients, and is left out.
        let (own, host_ns) = (d.namespace().to_string(), self.services[svc].namespace.clone());
        let root = super::security::ROOT_NAMESPACE;
        if own != host_ns && own != root {
            ctx.warn(
                &d.origin,
                "metadata.namespace",
                format!("a DestinationRule for {host} is taken only from its namespace {host_ns} (or {root}); this one, from {own}, would change how other namespaces reach it: ignored"),
            );
            return;
        }
        let export = Export::resolve(&d.spec.export_to, &exports.destination_rules, &own);
        if !export.visible_to(Some(&host_ns)) && !export.visible_to(Some(&own)) {
            ctx.warn(&d.origin, "spec.exportTo", "exported to neither its own namespace nor the host's: ignored");
            return;
        }
        if let Some(p) = self.policies.get(&svc) {
            if p.namespace == host_ns || own == root {
                ctx.warn(
                    &d.origin,
                    "spec.host",
                    format!("another DestinationRule (of {}) already applies to {host}; the older one is used, this one is ignored", p.namespace),
                );
                return;
            }
        }
        let origin = d.origin.clone();
        let top = effective_policy(None, d.spec.traffic_policy.as_ref(), None, &origin, "spec.trafficPolicy", ctx);
        let mut ports = BTreeMap::new();
        let service_ports: Vec<u16> = self.services[svc].ports.iter().map(|p| p.port).collect();
        let mut port_level =
            |base: &EffectivePolicy, subset: Option<&str>, tp: Option<&TrafficPolicy>, field: &str, ctx: &mut Ctx| {
                for (k, pl) in tp.map_or(&[][..], |t| t.port_level_settings.as_slice()).iter().enumerate() {
                    let f = format!("{field}.portLevelSettings[{k}]");
                    if !service_ports.contains(&pl.port.number) {
                        ctx.warn(
                            &origin,
                            format!("{f}.port.number"),
                            format!("{host} has no port {}; the settings apply to nothing", pl.port.number),
                        );
                    }
                    let p = effective_policy(Some(base), Some(&pl.as_policy()), base.labels.clone(), &origin, &f, ctx);
                    ports.insert((subset.map(str::to_string), pl.port.number), p);
                }
            };
        port_level(&top, None, d.spec.traffic_policy.as_ref(), "spec.trafficPolicy", ctx);
        let mut subsets = BTreeMap::new();
        for (i, s) in d.spec.subsets.iter().enumerate() {
            let field = format!("spec.subsets[{i}]");
            let p = effective_policy(
                Some(&top),
                s.traffic_policy.as_ref(),
                Some(s.labels.clone()),
                &origin,
                &format!("{field}.trafficPolicy"),
                ctx,
            );
            port_level(&p, Some(&s.name), s.traffic_policy.as_ref(), &format!("{field}.trafficPolicy"), ctx);
            if subsets.insert(s.name.clone(), p).is_some() {
                ctx.error(&d.origin, format!("{field}.name"), format!("subset `{}` is defined twice", s.name));
            }
        }
        self.policies.insert(svc, Policy { namespace: own, top, subsets, ports });
    }

    fn destinations(
        &self,
        route: &[RouteDestination],
        ns: &str,
        origin: &Origin,
        field: &str,
        ctx: &mut Ctx,
    ) -> Vec<WeightedDestination> {
        let mut out = Vec::new();
        let any_weight = route.iter().any(|r| r.weight.is_some());
        for (j, r) in route.iter().enumerate() {
            let f = format!("{field}[{j}]");
            let host = fqdn(&r.destination.host, ns);
            let Some(&svc) = self.by_host.get(&host) else {
                ctx.error(
                    origin,
                    format!("{f}.destination.host"),
                    format!("unknown host `{}`: no Service or ServiceEntry is {host}", r.destination.host),
                );
                continue;
            };
            if let Some(subset) = &r.destination.subset {
                let known = self.policies.get(&svc).is_some_and(|p| p.subsets.contains_key(subset));
                if !known {
                    ctx.error(
                        origin,
                        format!("{f}.destination.subset"),
                        format!("no DestinationRule for {host} defines subset `{subset}`"),
                    );
                }
            }
            if let Some(p) = &r.destination.port {
                if self.services[svc].port(p.number).is_none() {
                    ctx.error(
                        origin,
                        format!("{f}.destination.port.number"),
                        format!("{host} has no port {}", p.number),
                    );
                }
            }
            let weight = match r.weight {
                Some(w) if !(0..=100).contains(&w) => {
                    ctx.error(origin, format!("{f}.weight"), format!("{w} is not a weight (0 to 100)"));
                    0
                }
                Some(w) => w as u32,
                None if route.len() == 1 => 100,
                None => 0,
            };
            out.push(WeightedDestination {
                service: svc,
                subset: r.destination.subset.clone(),
                port: r.destination.port.as_ref().map(|p| p.number),
                weight,
                headers: r.headers.clone(),
            });
        }
        let sum: i64 = route.iter().map(|r| r.weight.unwrap_or(if route.len() == 1 { 100 } else { 0 })).sum();
        if (route.len() > 1 || any_weight) && sum != 100 {
            ctx.error(origin, field, format!("weights sum to {sum}; they must sum to 100"));
        }
        out
    }

    fn add_virtual_service(&mut self, v: &Doc<VirtualServiceSpec>, exports: &ExportDefaults, ctx: &mut Ctx) {
        let ns = v.namespace().to_string();
        if v.spec.hosts.is_empty() {
            ctx.error(&v.origin, "spec.hosts", "at least one host is needed");
            return;
        }
        // Bound to the mesh (sidecar traffic) unless only gateways are named.
        let mesh_bound = v.spec.gateways.is_empty() || v.spec.gateways.iter().any(|g| g == "mesh");
        if mesh_bound && v.spec.hosts.iter().any(|h| h == "*") {
            // It would take every service's traffic from every pod.
            ctx.error(
                &v.origin,
                "spec.hosts",
                "`*` is not allowed in a VirtualService bound to the mesh (Istio's validation rejects it too); name the hosts, or bind it to a Gateway only",
            );
            return;
        }
        if let Err(e) = super::export::check(&v.spec.export_to) {
            ctx.error(&v.origin, "spec.exportTo", e);
            return;
        }
        let export = Export::resolve(&v.spec.export_to, &exports.virtual_services, &ns);
        let hosts: Vec<String> = v.spec.hosts.iter().map(|h| fqdn(h, &ns)).collect();
        let targets: Vec<usize> = (0..self.services.len())
            .filter(|i| hosts.iter().any(|h| host_matches(h, &self.services[*i].hostname)))
            .collect();
        let source = format!("{ns}/{}", v.meta.name);
        let mut http = Vec::new();
        for (i, r) in v.spec.http.iter().enumerate() {
            let field = format!("spec.http[{i}]");
            let mut matches = Vec::new();
            for (k, m) in r.match_.iter().enumerate() {
                let mf = format!("{field}.match[{k}]");
                let mut rm = RequestMatch {
                    ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
                    port: m.port,
                    ..Default::default()
                };
                rm.uri = m.uri.as_ref().and_then(|s| string_matcher(s, &v.origin, &format!("{mf}.uri"), ctx));
                rm.method = m.method.as_ref().and_then(|s| string_matcher(s, &v.origin, &format!("{mf}.method"), ctx));
                rm.authority =
                    m.authority.as_ref().and_then(|s| string_matcher(s, &v.origin, &format!("{mf}.authority"), ctx));
                rm.scheme = m.scheme.as_ref().and_then(|s| string_matcher(s, &v.origin, &format!("{mf}.scheme"), ctx));
                for (h, s) in &m.headers {
                    if let Some(sm) = string_matcher(s, &v.origin, &format!("{mf}.headers.{h}"), ctx) {
                        rm.headers.push((h.to_ascii_lowercase(), sm));
                    }
                }
                for (q, s) in &m.query_params {
                    if let Some(sm) = string_matcher(s, &v.origin, &format!("{mf}.queryParams.{q}"), ctx) {
                        rm.query_params.push((q.clone(), sm));
                    }
                }
                if !m.gateways.is_empty() {
                    ctx.warn(
                        &v.origin,
                        format!("{mf}.gateways"),
                        "not supported yet; ignored (see docs/istio-conformance.md)",
                    );
                }
                matches.push(rm);
            }
            let action = match (&r.redirect, r.route.is_empty()) {
                (Some(_), false) => {
                    ctx.error(&v.origin, &field, "a rule has either route or redirect, not both");
                    continue;
                }
                (Some(red), true) => Action::Redirect(red.clone()),
                (None, true) => {
                    ctx.error(&v.origin, &field, "a rule needs a route or a redirect");
                    continue;
                }
                (None, false) => {
                    Action::Route(self.destinations(&r.route, &ns, &v.origin, &format!("{field}.route"), ctx))
                }
            };
            let dur = |s: &Option<String>, f: &str, ctx: &mut Ctx| -> Option<Duration> {
                s.as_deref().and_then(|s| match parse_duration(s) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        ctx.error(&v.origin, format!("{field}.{f}"), e);
                        None
                    }
                })
            };
            let timeout = dur(&r.timeout, "timeout", ctx);
            let retries = r.retries.as_ref().map(|rt| Retry {
                attempts: rt.attempts.unwrap_or(2),
                per_try_timeout: dur(&rt.per_try_timeout, "retries.perTryTimeout", ctx),
                retry_on: rt
                    .retry_on
                    .as_deref()
                    .unwrap_or("connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes,503")
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect(),
            });
            let fault = r.fault.as_ref().map(|f| Fault {
                delay: f.delay.as_ref().and_then(|d| {
                    let p = percent(&d.percentage, &v.origin, &format!("{field}.fault.delay"), ctx);
                    if let Some(s) = &d.fixed_delay {
                        dur(&Some(s.clone()), "fault.delay.fixedDelay", ctx).map(|d| (d, p))
                    } else {
                        ctx.error(&v.origin, format!("{field}.fault.delay.fixedDelay"), "missing");
                        None
                    }
                }),
                abort: f.abort.as_ref().and_then(|a| {
                    let p = percent(&a.percentage, &v.origin, &format!("{field}.fault.abort"), ctx);
                    match a.http_status {
                        Some(s) if (200..=599).contains(&s) => Some((s, p)),
                        Some(s) => {
                            ctx.error(
                                &v.origin,
                                format!("{field}.fault.abort.httpStatus"),
                                format!("{s} is not an HTTP status (200 to 599)"),
                            );
                            None
                        }
                        None => {
                            ctx.error(&v.origin, format!("{field}.fault.abort.httpStatus"), "missing");
                            None
                        }
                    }
                }),
            });
            let mirror = match (&r.mirror, &r.mirror_percentage) {
                (Some(m), pct) => {
                    let rd = RouteDestination { destination: m.clone(), weight: None, headers: None };
                    let p = percent(pct, &v.origin, &format!("{field}.mirrorPercentage"), ctx);
                    self.destinations(&[rd], &ns, &v.origin, &format!("{field}.mirror"), ctx)
                        .into_iter()
                        .next()
                        .map(|d| (d, p))
                }
                (None, Some(_)) => {
                    ctx.error(&v.origin, format!("{field}.mirrorPercentage"), "needs mirror");
                    None
                }
                (None, None) => None,
            };
            http.push(HttpRouteRule {
                source: format!("{source} http[{}]", r.name.clone().unwrap_or_else(|| i.to_string())),
                namespace: ns.clone(),
                export: export.clone(),
                matches,
                action,
                rewrite: r.rewrite.clone(),
                headers: r.headers.clone(),
                timeout,
                retries,
                fault,
                mirror,
            });
        }
        let mut tcp = Vec::new();
        for (i, r) in v.spec.tcp.iter().enumerate() {
            let field = format!("spec.tcp[{i}]");
            let route = self.destinations(&r.route, &ns, &v.origin, &format!("{field}.route"), ctx);
            if r.match_.iter().any(|m| !m.destination_subnets.is_empty() || !m.gateways.is_empty()) {
                ctx.warn(
                    &v.origin,
                    format!("{field}.match"),
                    "only port is matched yet; destinationSubnets and gateways are ignored",
                );
            }
            let ports: Vec<Option<u16>> =
                if r.match_.is_empty() { vec![None] } else { r.match_.iter().map(|m| m.port).collect() };
            for port in ports {
                tcp.push(TcpRouteRule {
                    source: format!("{source} tcp[{i}]"),
                    namespace: ns.clone(),
                    export: export.clone(),
                    port,
                    route: route.clone(),
                });
            }
        }
        let gateways: Vec<String> = v
            .spec
            .gateways
            .iter()
            .filter(|g| *g != "mesh")
            .map(|g| if g.contains('/') { g.clone() } else { format!("{ns}/{g}") })
            .collect();
        // A gateway takes only the VirtualServices exported to its
        // namespace, as Istio's.
        let (gateways, hidden): (Vec<String>, Vec<String>) =
            gateways.into_iter().partition(|g| export.visible_to(g.split('/').next()));
        for g in &hidden {
            ctx.warn(
                &v.origin,
                "spec.exportTo",
                format!("not exported to the namespace of Gateway {g}: not bound to it"),
            );
        }
        if !gateways.is_empty() {
            for g in &gateways {
                if !self.gateway_listeners.iter().any(|l| &l.gateway == g) {
                    ctx.warn(&v.origin, "spec.gateways", format!("no Gateway this agent serves is {g}"));
                }
            }
            self.gateway_routes.push(GatewayRoutes { gateways, hosts: v.spec.hosts.clone(), rules: http.clone() });
        }
        if !mesh_bound {
            return;
        }
        if targets.is_empty() {
            ctx.warn(
                &v.origin,
                "spec.hosts",
                "no Service or ServiceEntry matches these hosts; the VirtualService routes nothing",
            );
        }
        for t in targets {
            // Once per Service port (the first VirtualService to route it).
            if !http.is_empty() && !self.http_routes.contains_key(&t) {
                let svc = &self.services[t];
                for p in svc.ports.iter().filter(|p| p.protocol == Protocol::Sniff) {
                    ctx.warn(
                        &v.origin,
                        "spec.http",
                        format!(
                            "port {} of {} declares no protocol, so pods reach it as TCP and these http routes do not apply to them; name the port http-… (or set appProtocol: http)",
                            p.port, svc.hostname
                        ),
                    );
                }
            }
            self.http_routes.entry(t).or_default().extend(http.iter().cloned());
            self.tcp_routes.entry(t).or_default().extend(tcp.iter().cloned());
        }
    }

    /// An AuthorizationPolicy with HTTP fields on a pod whose Service ports
    /// are TCP (or undeclared): Istio never matches it there in ALLOW and
    /// applies a DENY to whole connections. Said once per policy and pod.
    fn warn_http_policies_on_tcp_ports(&self, docs: &Documents, ctx: &mut Ctx) {
        for pod in &self.pods {
            let policies = self.security.http_policies(pod);
            if policies.is_empty() {
                continue;
            }
            let tcp_ports: Vec<String> = self
                .by_endpoint
                .iter()
                .filter(|((ip, _), _)| pod.ips.contains(ip))
                .filter(|(_, (svc, k))| {
                    !matches!(self.services[*svc].ports[*k].protocol, Protocol::Http | Protocol::Http2)
                })
                .map(|((_, port), _)| port.to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if tcp_ports.is_empty() {
                continue;
            }
            let origin = docs
                .pods
                .iter()
                .find(|p| p.meta.name == pod.name && p.namespace() == pod.namespace)
                .map(|p| p.origin.clone());
            if let Some(origin) = origin {
                ctx.warn(
                    &origin,
                    "",
                    format!(
                        "AuthorizationPolicy {} names HTTP fields, but port(s) {} of this pod are not declared HTTP: there an ALLOW rule with them never matches and a DENY rule with them denies the whole connection",
                        policies.join(", "),
                        tcp_ports.join(", ")
                    ),
                );
            }
        }
    }

    fn add_gateway(
        &mut self,
        g: &Doc<GatewaySpec>,
        docs: &Documents,
        gateway_namespace: &str,
        certificate_dirs: Option<&[std::path::PathBuf]>,
        ctx: &mut Ctx,
    ) {
        let mut seen: BTreeMap<u16, (String, usize)> = BTreeMap::new();
        for (i, s) in g.spec.servers.iter().enumerate() {
            let proto = s.port.protocol.clone().unwrap_or_default().to_ascii_uppercase();
            if let Some((p, j)) = seen.get(&s.port.number) {
                if *p != proto || s.hosts.iter().any(|h| g.spec.servers[*j].hosts.contains(h)) {
                    ctx.error(
                        &g.origin,
                        format!("spec.servers[{i}].port.number"),
                        format!("port {} is already declared by servers[{j}]", s.port.number),
                    );
                }
            }
            seen.insert(s.port.number, (proto, i));
        }
        for other in docs.gateways.iter().take_while(|o| o.origin != g.origin) {
            if other.spec.selector != g.spec.selector || other.namespace() != g.namespace() {
                continue;
            }
            for (i, s) in g.spec.servers.iter().enumerate() {
                for o in &other.spec.servers {
                    let same_proto = o.port.protocol.as_deref().map(str::to_ascii_uppercase)
                        == s.port.protocol.as_deref().map(str::to_ascii_uppercase);
                    if o.port.number == s.port.number && (!same_proto || o.hosts.iter().any(|h| s.hosts.contains(h))) {
                        ctx.error(
                            &g.origin,
                            format!("spec.servers[{i}].port.number"),
                            format!("port {} is already declared by Gateway {}", s.port.number, other.meta.name),
                        );
                    }
                }
            }
        }
        let served = g.spec.selector.iter().all(|(k, v)| GATEWAY_LABELS.contains(&(k.as_str(), v.as_str())));
        if !served {
            ctx.warn(
                &g.origin,
                "spec.selector",
                "selects no gateway this agent runs (it serves istio: ingressgateway); ignored",
            );
            return;
        }
        let name = format!("{}/{}", g.namespace(), g.meta.name);
        for (i, s) in g.spec.servers.iter().enumerate() {
            let field = format!("spec.servers[{i}]");
            let protocol = s.port.protocol.clone().unwrap_or_else(|| "HTTP".into()).to_ascii_uppercase();
            let tls = match (&protocol[..], &s.tls) {
                ("HTTP", None) => None,
                ("HTTP", Some(t)) if t.https_redirect == Some(true) => {
                    ctx.warn(
                        &g.origin,
                        format!("{field}.tls.httpsRedirect"),
                        "not supported yet; ignored (see docs/istio-conformance.md)",
                    );
                    None
                }
                ("HTTPS", Some(t)) if t.mode.as_deref().unwrap_or("SIMPLE") == "SIMPLE" => {
                    let tls = match &t.credential_name {
                        Some(secret) => credential(secret, docs, gateway_namespace, &g.origin, &field, ctx),
                        None => tls_files(t, &g.origin, &field, certificate_dirs, ctx),
                    };
                    let Some(tls) = tls else { continue };
                    Some(tls)
                }
                (p, t) => {
                    ctx.warn(
                        &g.origin,
                        format!("{field}.port.protocol"),
                        format!(
                            "protocol {p}{} is not served yet (HTTP, and HTTPS with tls mode SIMPLE, are); server ignored",
                            t.as_ref().and_then(|t| t.mode.clone()).map(|m| format!(" with tls mode {m}")).unwrap_or_default()
                        ),
                    );
                    continue;
                }
            };
            self.gateway_listeners.push(GatewayListener {
                gateway: name.clone(),
                port: s.port.number,
                protocol,
                hosts: s.hosts.iter().map(|h| h.rsplit('/').next().unwrap_or(h).to_string()).collect(),
                tls,
            });
        }
    }

    /// The rules for a request to gateway `port` with `host` (no port), in
    /// order; `None` when no server or VirtualService takes the host.
    pub fn gateway_rules(&self, port: u16, host: &str) -> Option<Vec<&HttpRouteRule>> {
        let gateways: Vec<&str> = self
            .gateway_listeners
            .iter()
            .filter(|l| l.port == port && l.hosts.iter().any(|h| host_matches(h, host)))
            .map(|l| l.gateway.as_str())
            .collect();
        if gateways.is_empty() {
            return None;
        }
        let rules: Vec<&HttpRouteRule> = self
            .gateway_routes
            .iter()
            .filter(|r| r.gateways.iter().any(|g| gateways.contains(&g.as_str())))
            .filter(|r| r.hosts.iter().any(|h| host_matches(h, host)))
            .flat_map(|r| r.rules.iter())
            .collect();
        (!rules.is_empty()).then_some(rules)
    }

    /// The gateway ports to listen on, each with the certificates of its
    /// HTTPS servers in order, for their hosts (none: plain HTTP).
    pub fn gateway_ports(&self) -> BTreeMap<u16, Vec<GatewayTls>> {
        let mut out: BTreeMap<u16, Vec<GatewayTls>> = BTreeMap::new();
        for l in &self.gateway_listeners {
            let certs = out.entry(l.port).or_default();
            if let Some(t) = &l.tls {
                certs.push(GatewayTls { hosts: l.hosts.clone(), ..t.clone() });
            }
        }
        out
    }

    // -----------------------------------------------------------------------
    // Lookups at request time
    // -----------------------------------------------------------------------

    /// The service and port a connection's original destination addresses.
    pub fn service_at(&self, dst: SocketAddr) -> Option<(usize, &ServicePortDef)> {
        let ip = match dst.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let i = *self.by_vip.get(&(ip, dst.port()))?;
        Some((i, self.services[i].port(dst.port())?))
    }

    /// The Service port that reaches `port` of the workload at `ip`: as
    /// Istio's inbound listener, a pod's port takes the protocol of the
    /// Service port that targets it.
    pub fn inbound_port(&self, ip: IpAddr, port: u16) -> Option<(usize, &ServicePortDef)> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let (svc, k) = *self.by_endpoint.get(&(ip, port))?;
        Some((svc, &self.services[svc].ports[k]))
    }

    /// Every (pod port, service, service port) that reaches the workload
    /// at one of `ips`, sorted by port.
    pub fn inbound_ports_of(&self, ips: &[IpAddr]) -> Vec<(u16, usize, &ServicePortDef)> {
        let mut out: Vec<(u16, usize, &ServicePortDef)> = self
            .by_endpoint
            .iter()
            .filter(|((ip, _), _)| ips.contains(ip))
            .map(|((_, port), (svc, k))| (*port, *svc, &self.services[*svc].ports[*k]))
            .collect();
        out.sort_by_key(|(port, svc, _)| (*port, *svc));
        out
    }

    /// The Pod with this address.
    pub fn pod_at(&self, ip: IpAddr) -> Option<&PodInfo> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.pods_by_ip.get(&ip).map(|i| &self.pods[*i])
    }

    /// The workload (name, namespace) with this address, if the config
    /// names one.
    pub fn workload_at(&self, ip: IpAddr) -> Option<(String, String)> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.workloads_by_ip.get(&ip).cloned()
    }

    pub fn service_by_host(&self, host: &str) -> Option<usize> {
        self.by_host.get(host).copied()
    }

    /// The policy that applies to `svc` (and `subset`) on destination
    /// `port`: the port's settings where there are some.
    pub fn policy(&self, svc: usize, subset: Option<&str>, port: u16) -> Option<&EffectivePolicy> {
        let p = self.policies.get(&svc)?;
        if let Some(pp) = p.ports.get(&(subset.map(str::to_string), port)) {
            return Some(pp);
        }
        match subset {
            Some(name) => p.subsets.get(name),
            None => Some(&p.top),
        }
    }

    /// A uniform choice in 0..n.
    pub fn random(&self, n: usize) -> usize {
        use rand::Rng;
        if n <= 1 {
            return 0;
        }
        rand::thread_rng().gen_range(0..n)
    }

    /// A chance of `percent` (0 to 100).
    pub fn chance(&self, percent: f64) -> bool {
        use rand::Rng;
        percent >= 100.0 || (percent > 0.0 && rand::thread_rng().gen_range(0.0..100.0) < percent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::source_dir::load_text;

    fn compile(yaml: &str) -> Result<Mesh, Vec<Problem>> {
        let mut docs = Documents::default();
        let mut errors = Vec::new();
        load_text(std::path::Path::new("m.yaml"), yaml, &mut docs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        Mesh::compile(&docs)
    }

    /// A gateway server's `credentialName` from a `kind: Secret` document:
    /// `stringData` as users write it (or base64 `data`), in the agent's
    /// namespace; one elsewhere is named with where the gateway looks.
    #[test]
    fn credential_name_reads_a_secret_document_of_the_gateway_namespace() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["web.example.com".into()]).unwrap().self_signed(&key).unwrap();
        let indent = |pem: &str| pem.lines().flat_map(|l| ["      ", l, "\n"]).collect::<String>();
        let secret = |ns: &str| {
            format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: web-cert, namespace: {ns}}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}---\n",
                indent(&cert.pem()),
                indent(&key.serialize_pem())
            )
        };
        let gateway = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: web}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [web.example.com]\n    tls: {mode: SIMPLE, credentialName: web-cert}\n";
        let m = compile(&(secret("istio-system") + gateway)).unwrap();
        let tls = m.gateway_ports()[&443].first().cloned().expect("TLS from the Secret");
        assert_eq!(tls.source, "Secret istio-system/web-cert");
        assert_eq!(&*tls.cert, cert.pem().as_bytes());
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        // In the Gateway's namespace (default), not the gateway's own.
        let m = compile(&(secret("default") + gateway)).unwrap();
        assert!(!m.gateway_ports().contains_key(&443));
        let w = m.warnings.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(
            w.contains("spec.servers[0].tls.credentialName: no Secret istio-system/web-cert: one is in namespace default, but the gateway reads Secrets only from its own namespace istio-system; create it there; server skipped"),
            "{w}"
        );
        // An agent whose POD_NAMESPACE is default reads that one.
        let mut docs = Documents::default();
        let mut errors = Vec::new();
        load_text(std::path::Path::new("m.yaml"), &(secret("default") + gateway), &mut docs, &mut errors);
        assert_eq!(Mesh::compile_in(&docs, &Scope::new("default")).unwrap().gateway_ports()[&443].len(), 1);
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.5, ports: [{name: http, port: 80}, {name: http-admin, port: 9000}]}\n---\n";

    /// `analyze` says where pods will not get L7: a Service port that
    /// declares no protocol but carries http routes (once per port), and a
    /// policy with HTTP fields on a pod port that is TCP.
    #[test]
    fn undeclared_ports_with_http_routes_and_http_policies_on_tcp_are_warned() {
        let yaml = r"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.9, ports: [{port: 80}, {name: http-admin, port: 81}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: web, namespace: default}
subsets: [{addresses: [{ip: 10.1.0.5}], ports: [{port: 80}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
status: {podIP: 10.1.0.5}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a, namespace: default}
spec: {hosts: [web], http: [{route: [{destination: {host: web}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b, namespace: default}
spec: {hosts: [web], http: [{route: [{destination: {host: web}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{to: [{operation: {methods: [GET]}}]}]
";
        let mesh = compile(yaml).unwrap();
        let said: Vec<String> = mesh.warnings.iter().map(|w| w.reason.clone()).collect();
        let undeclared: Vec<&String> = said.iter().filter(|r| r.contains("declares no protocol")).collect();
        assert_eq!(undeclared.len(), 1, "{said:?}");
        assert!(undeclared[0].starts_with("port 80 of web.default.svc.cluster.local"), "{}", undeclared[0]);
        let policy: Vec<&String> = said.iter().filter(|r| r.contains("names HTTP fields")).collect();
        assert_eq!(policy.len(), 1, "{said:?}");
        assert!(policy[0].contains("default/get-only") && policy[0].contains("port(s) 80 "), "{}", policy[0]);
    }

    /// A Service with a selector and no Endpoints gets the ready Pods it
    /// selects, a named targetPort resolved per pod; one with Endpoints
    /// keeps them.
    #[test]
    fn a_selector_without_endpoints_selects_ready_pods() {
        let yaml = r"apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.7
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: web-port}, {name: metrics, port: 9090, targetPort: 9090}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, version: v1}}
spec: {containers: [{name: app, image: nginx, ports: [{name: web-port, containerPort: 8080}]}]}
status: {phase: Running, podIP: 10.1.0.5, conditions: [{type: Ready, status: 'True'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {containers: [{name: app, image: nginx, ports: [{name: web-port, containerPort: 8080}]}]}
status: {phase: Running, podIP: 10.1.0.6, conditions: [{type: Ready, status: 'False'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-3, namespace: shop, labels: {app: web}}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: web-4, namespace: other, labels: {app: web}}
status: {phase: Running, podIP: 10.1.0.8}
---
apiVersion: v1
kind: Service
metadata: {name: listed, namespace: shop}
spec: {clusterIP: 10.96.0.8, selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: listed, namespace: shop}
subsets: [{addresses: [{ip: 10.1.0.9}], ports: [{name: http, port: 80}]}]
";
        let mesh = compile(yaml).unwrap();
        let web = &mesh.services[mesh.service_by_host("web.shop.svc.cluster.local").unwrap()];
        assert_eq!(web.endpoints.len(), 1, "{:?}", web.endpoints);
        let e = &web.endpoints[0];
        assert_eq!(e.address, Address::Ip("10.1.0.5".parse().unwrap()));
        assert_eq!(e.ports.get("http"), Some(&8080));
        assert_eq!(e.ports.get("metrics"), Some(&9090));
        assert_eq!(e.labels.get("version").map(String::as_str), Some("v1"));
        // The pod's port 8080 is reached by web's http port.
        let (svc, port) = mesh.inbound_port("10.1.0.5".parse().unwrap(), 8080).unwrap();
        assert_eq!((mesh.services[svc].hostname.as_str(), port.name.as_str()), ("web.shop.svc.cluster.local", "http"));
        let listed = &mesh.services[mesh.service_by_host("listed.shop.svc.cluster.local").unwrap()];
        let ips: Vec<_> = listed.endpoints.iter().map(|e| e.address.clone()).collect();
        assert_eq!(ips, [Address::Ip("10.1.0.9".parse().unwrap())]);
    }

    #[test]
    fn port_level_settings_override_the_destination_and_the_subset() {
        let m = compile(&format!(
            "{SVC}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web}}\nspec:\n  host: web\n  trafficPolicy:\n    loadBalancer: {{simple: RANDOM}}\n    connectionPool: {{tcp: {{maxConnections: 10}}}}\n    portLevelSettings:\n    - port: {{number: 9000}}\n      connectionPool: {{tcp: {{maxConnections: 1}}}}\n  subsets:\n  - name: v1\n    labels: {{version: v1}}\n    trafficPolicy:\n      portLevelSettings:\n      - port: {{number: 80}}\n        loadBalancer: {{simple: LEAST_REQUEST}}\n"
        ))
        .unwrap();
        let svc = m.service_by_host("web.default.svc.cluster.local").unwrap();
        let p80 = m.policy(svc, None, 80).unwrap();
        assert_eq!((p80.lb.clone(), p80.pool.max_connections), (LbPolicy::Random, Some(10)));
        let p9000 = m.policy(svc, None, 9000).unwrap();
        assert_eq!((p9000.lb.clone(), p9000.pool.max_connections), (LbPolicy::Random, Some(1)));
        let v1 = m.policy(svc, Some("v1"), 80).unwrap();
        assert_eq!((v1.lb.clone(), v1.pool.max_connections), (LbPolicy::LeastRequest, Some(10)));
        assert_eq!(v1.labels.as_ref().unwrap().get("version").map(String::as_str), Some("v1"));
        assert_eq!(m.policy(svc, Some("v1"), 9000).unwrap().lb, LbPolicy::Random);
    }

    #[test]
    fn services_are_found_by_address_and_port_and_protocols_by_name() {
        let m = compile(SVC).unwrap();
        let (i, p) = m.service_at("10.96.0.5:9000".parse().unwrap()).unwrap();
        assert_eq!((m.services[i].hostname.as_str(), p.protocol), ("web.default.svc.cluster.local", Protocol::Http));
        assert!(m.service_at("10.96.0.5:81".parse().unwrap()).is_none());
        assert!(m.service_at("[::ffff:10.96.0.5]:80".parse().unwrap()).is_some(), "IPv4-mapped");
        assert_eq!(Protocol::of(Some("kubernetes.io/h2c"), None, None), Protocol::Http2);
        assert_eq!(Protocol::of(None, Some("grpc-web"), None), Protocol::Http2);
        assert_eq!(Protocol::of(None, Some("tcp-db"), None), Protocol::Tcp);
        assert_eq!(Protocol::of(None, Some("metrics"), None), Protocol::Sniff);
    }

    #[test]
    fn durations_parse_as_istio_writes_them() {
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
    }

    /// A YAML string for `s` (quoted, escaped), to fill a document's hole.
    fn q(s: &str) -> String {
        serde_json::to_string(s).unwrap()
    }

    proptest::proptest! {
        /// Any text as a file: documents or problems, never a panic; the
        /// tolerant compile (the running agent's) never panics either.
        #[test]
        fn any_text_loads_or_is_reported(text in "(?s).{0,400}") {
            let (mut docs, mut errors) = (Documents::default(), Vec::new());
            crate::mesh::source_dir::load_text(std::path::Path::new("x.yaml"), &text, &mut docs, &mut errors);
            let _ = Mesh::compile(&docs);
            let _ = Mesh::compile_tolerant(&docs, None, &Scope::new("istio-system"));
        }

        /// Istio objects whose values are arbitrary (hosts, regexes,
        /// durations, weights, ports, CIDRs, principals, exportTo): each
        /// compiles or is reported, never a panic.
        #[test]
        fn istio_objects_with_any_values_compile_or_are_reported(
            a in ".{0,30}", b in ".{0,30}", c in ".{0,30}",
            n in proptest::num::i64::ANY, port in proptest::num::u16::ANY,
        ) {
            let (a, b, c) = (q(&a), q(&b), q(&c));
            let yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.5, ports: [{{name: http, port: 80}}]}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [{a}, web]\n  exportTo: [{c}]\n  http:\n  - match: [{{uri: {{regex: {b}}}, headers: {{x: {{prefix: {c}}}}}, queryParams: {{q: {{exact: {a}}}}}}}]\n    timeout: {c}\n    retries: {{attempts: {n}, perTryTimeout: {b}, retryOn: {a}}}\n    fault: {{delay: {{fixedDelay: {b}, percentage: {{value: {n}}}}}}}\n    route: [{{destination: {{host: {a}, subset: {b}, port: {{number: {port}}}}}, weight: {n}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d}}\nspec:\n  host: {a}\n  exportTo: [{b}]\n  trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: {n}}}}}, outlierDetection: {{consecutive5xxErrors: {n}, baseEjectionTime: {c}}}, loadBalancer: {{consistentHash: {{httpHeaderName: {b}}}}}}}\n  subsets: [{{name: {b}, labels: {{version: {c}}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: s}}\nspec: {{hosts: [{b}], addresses: [{c}], ports: [{{number: {port}, name: {a}}}], resolution: {a}, endpoints: [{{address: {c}}}], exportTo: [{a}]}}\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: g}}\nspec: {{servers: [{{port: {{number: {port}, name: {a}, protocol: {b}}}, hosts: [{c}], tls: {{mode: {a}, credentialName: {b}}}}}]}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec:\n  action: {a}\n  rules:\n  - from: [{{source: {{principals: [{b}], ipBlocks: [{c}], namespaces: [{a}]}}}}]\n    to: [{{operation: {{ports: [{b}], paths: [{c}], hosts: [{a}]}}}}]\n    when: [{{key: {a}, values: [{b}]}}]\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default}}\nspec: {{mtls: {{mode: {b}}}, portLevelMtls: {{{port}: {{mode: {c}}}}}}}\n"
            );
            let (mut docs, mut errors) = (Documents::default(), Vec::new());
            crate::mesh::source_dir::load_text(std::path::Path::new("x.yaml"), &yaml, &mut docs, &mut errors);
            let _ = Mesh::compile(&docs);
            let _ = Mesh::compile_tolerant(&docs, Some(&docs), &Scope::new("istio-system"));
        }
    }

    /// From the cluster, only the namespaces the settings name may open
    /// ports on the node with a Gateway; another's is ignored with a
    /// warning naming the setting, and the rest of the mesh applies.
    #[test]
    fn only_allowed_namespaces_bind_gateway_ports() {
        let yaml = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g, namespace: evil}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 2379, name: http, protocol: HTTP}\n    hosts: ['*']\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g, namespace: istio-system}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 8080, name: http, protocol: HTTP}\n    hosts: ['*']\n";
        let (mut docs, mut errors) = (Documents::default(), Vec::new());
        load_text(std::path::Path::new("g.yaml"), yaml, &mut docs, &mut errors);
        let mut scope = Scope::new("istio-system");
        scope.gateway_namespaces = Some(vec!["istio-system".into()]);
        let m = Mesh::compile_in(&docs, &scope).unwrap();
        let ports: Vec<u16> = m.gateway_ports().keys().copied().collect();
        assert_eq!(ports, [8080], "only the agent's namespace binds");
        assert!(m.warnings.iter().any(|w| w.field == "metadata.namespace"
            && w.reason.contains("mesh.gatewayNamespaces")
            && w.reason.contains("evil")));
        scope.gateway_namespaces = Some(vec!["*".into()]);
        let ports: Vec<u16> = Mesh::compile_in(&docs, &scope).unwrap().gateway_ports().keys().copied().collect();
        assert_eq!(ports, [2379, 8080]);
    }

    /// From the cluster, a Gateway cannot name the agent's own files: a
    /// certificate path outside the allowed directories (directly, or
    /// through `..` or a link from inside one) is an error naming the
    /// field and the setting.
    #[test]
    fn a_gateway_cannot_read_files_outside_the_allowed_directories() {
        let base = std::env::temp_dir().join(format!("redirector-gw-dirs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (allowed, outside) = (base.join("certs"), base.join("ca"));
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("ca-key.pem"), "-----BEGIN PRIVATE KEY-----\n").unwrap();
        std::os::unix::fs::symlink(outside.join("ca-key.pem"), allowed.join("link.pem")).unwrap();
        let mut scope = Scope::new("istio-system");
        scope.certificate_dirs = Some(vec![allowed.clone()]);
        for path in [outside.join("ca-key.pem"), allowed.join("../ca/ca-key.pem"), allowed.join("link.pem")] {
            let yaml = format!(
                "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: g, namespace: evil}}\nspec:\n  servers:\n  - port: {{number: 8443, name: https, protocol: HTTPS}}\n    hosts: ['*']\n    tls: {{mode: SIMPLE, serverCertificate: {p}, privateKey: {p}}}\n",
                p = path.display()
            );
            let (mut docs, mut errors) = (Documents::default(), Vec::new());
            load_text(std::path::Path::new("g.yaml"), &yaml, &mut docs, &mut errors);
            let e = Mesh::compile_in(&docs, &scope).unwrap_err();
            assert!(
                e.iter().any(|p| p.field == "spec.servers[0].tls.serverCertificate"
                    && p.reason.contains("mesh.gatewayCertificateDirs")),
                "{path:?}: {e:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
