//! The mesh's CA service, `redirector ca serve`: the one holder of the
//! signing key, in the control plane, never on a node.
//!
//! It answers Istio's certificate API ([`istio_api`]) on 15012 over TLS,
//! as istiod does, and decides who gets what as istiod does:
//!
//! 1. The caller is its bearer token, checked with a Kubernetes
//!    TokenReview for the audience `istio-ca`: a service account, and the
//!    pod the token is bound to.
//! 2. The CSR is checked ([`csr::check`]): one SPIFFE URI, an allowed key,
//!    a valid signature. The identity asked for is its SAN, and, from a
//!    node agent, the request's `ImpersonatedIdentity`, which must agree.
//! 3. Any caller may get its own identity. A node agent (`--node-agent`)
//!    may also get a service account's identity while a pod with that
//!    service account is scheduled on the node its own pod runs on (the
//!    token's bound pod, its `spec.nodeName`), and its gateway's.
//!    Everything else is refused with a gRPC status that says why, a log
//!    line and a count by reason.
//!
//! A compromised node can therefore mint the identities of the pods on
//! that node, while it is compromised, and no others.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tonic::Code;

use crate::identity::istio_api::{self, IstioCertificateRequest, IstioCertificateResponse};
use crate::identity::{csr, Identity, MeshCa};

/// How `ca serve` runs.
pub struct Settings {
    pub listen: SocketAddr,
    /// `/ready` and `/metrics` (istiod's monitoring port, 15014).
    pub monitoring: Option<SocketAddr>,
    /// The names the CA's serving certificate carries (what agents dial).
    pub dns_names: Vec<String>,
    /// Service accounts (`namespace/name`) of node agents.
    pub node_agents: Vec<(String, String)>,
    pub max_lifetime: Duration,
    pub trust_domain: String,
}

/// The names the Service `redirector-ca` in `namespace` is dialled by.
pub fn default_dns_names(namespace: &str) -> Vec<String> {
    vec![
        "redirector-ca".into(),
        format!("redirector-ca.{namespace}"),
        format!("redirector-ca.{namespace}.svc"),
        format!("redirector-ca.{namespace}.svc.cluster.local"),
    ]
}

/// `namespace/service-account` → its parts.
pub fn parse_service_account(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => Ok((ns.into(), sa.into())),
        _ => Err(format!("`{s}` is not namespace/service-account (e.g. redirector-system/redirector)")),
    }
}

/// Why a request was refused: the status the caller gets and the label
/// it is counted under.
#[derive(Debug)]
struct Refusal {
    code: Code,
    reason: &'static str,
    message: String,
}

fn refuse(code: Code, reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { code, reason, message: message.into() }
}

/// Who called, as the API server vouches.
struct Caller {
    identity: Identity,
    /// The pod the token is bound to: (name, uid).
    pod: Option<(String, String)>,
}

/// A token bucket per key (a caller's token, a client address).
struct Limiter {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<u64, (f64, Instant)>>,
}

impl Limiter {
    fn new(burst: u32, per_second: u32) -> Limiter {
        Limiter { burst: f64::from(burst), per_second: f64::from(per_second), buckets: Mutex::default() }
    }

    fn allow(&self, key: &impl Hash) -> bool {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("limiter lock");
        if buckets.len() > 10_000 {
            // Forget callers whose bucket has refilled: they lose nothing.
            let (burst, rate) = (self.burst, self.per_second);
            buckets.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = buckets.entry(h.finish()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts for `/metrics`.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    issued: AtomicU64,
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

/// Refusals of one reason logged a second, at most.
const LOGGED_PER_SECOND: u32 = 20;

/// The CA service's state.
pub struct CaService {
    ca: MeshCa,
    kube: kube::Client,
    settings: Settings,
    per_caller: Limiter,
    per_address: Limiter,
    /// At most this many API calls at once (TokenReview, pod reads).
    api: tokio::sync::Semaphore,
    /// Every pod, kept by a watch (as istiod's informer): the node check
    /// reads it, and asks the API only for a pod it does not show yet.
    pods: kube::runtime::reflector::Store<Pod>,
    /// Per refusal reason: (second, logged in it, left out in it).
    log_gate: Mutex<HashMap<&'static str, (u64, u32, u32)>>,
    started: Instant,
    counts: Counts,
}

impl CaService {
    /// The service, and the pod watch to run beside it.
    pub fn new(
        ca: MeshCa,
        kube: kube::Client,
        settings: Settings,
    ) -> (Arc<CaService>, impl std::future::Future<Output = ()> + Send) {
        let (pods, writer) = kube::runtime::reflector::store();
        let watch = watch_pods(kube.clone(), writer);
        let service = Arc::new(CaService {
            ca,
            kube,
            settings,
            // A node of a few hundred pods restarting at once gets them
            // all; one caller's flood does not starve the others.
            per_caller: Limiter::new(500, 50),
            per_address: Limiter::new(2_000, 200),
            api: tokio::sync::Semaphore::new(64),
            pods,
            log_gate: Mutex::new(HashMap::new()),
            started: Instant::now(),
            counts: Counts::default(),
        });
        (service, watch)
    }

    /// One `CreateCertificate` call from `peer`.
    async fn create(
        self: Arc<Self>,
        req: tonic::Request<IstioCertificateRequest>,
        peer: SocketAddr,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        match self.decide(&req, peer.ip()).await {
            Ok((caller, id, lifetime, key)) => match self.ca.sign_csr(&key, &id, lifetime) {
                Ok(chain) => {
                    self.counts.issued.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%peer, caller = %caller.identity, identity = %id, lifetime_s = lifetime.as_secs(), took_us = started.elapsed().as_micros() as u64, "certificate issued");
                    Ok(tonic::Response::new(IstioCertificateResponse { cert_chain: chain }))
                }
                Err(e) => Err(self.refused(peer, refuse(Code::Internal, "sign_failed", e.to_string()))),
            },
            Err(r) => Err(self.refused(peer, r)),
        }
    }

    fn refused(&self, peer: SocketAddr, r: Refusal) -> tonic::Status {
        *self.counts.refused.lock().expect("counts lock").entry(r.reason).or_default() += 1;
        // Every refusal is counted; a flood's are logged at most
        // LOGGED_PER_SECOND a second per reason, then once with how many
        // were left out, so a caller cannot flood the log.
        let second = self.started.elapsed().as_secs();
        let left_out = {
            let mut gate = self.log_gate.lock().expect("log gate lock");
            let (at, n, dropped) = gate.entry(r.reason).or_insert((second, 0, 0));
            if *at != second {
                let d = *dropped;
                (*at, *n, *dropped) = (second, 0, 0);
                if d > 0 {
                    tracing::warn!(reason = r.reason, left_out = d, "certificate refusals not logged in the last second (counted in redirector_ca_requests_refused_total)");
                }
            }
            *n += 1;
            if *n > LOGGED_PER_SECOND {
                *dropped += 1;
            }
            *n > LOGGED_PER_SECOND
        };
        if !left_out {
            tracing::warn!(%peer, reason = r.reason, status = ?r.code, "certificate refused: {}", r.message);
        }
        tonic::Status::new(r.code, r.message)
    }

    /// Who is asking, for what, for how long, with which key, or why not.
    async fn decide(
        &self,
        req: &tonic::Request<IstioCertificateRequest>,
        addr: IpAddr,
    ) -> Result<(Caller, Identity, Duration, rcgen::PublicKey), Refusal> {
        if !self.per_address.allow(&addr) {
            return Err(refuse(
                Code::ResourceExhausted,
                "rate_limited",
                format!("too many requests from {addr}; retry later"),
            ));
        }
        let token = bearer(req.metadata())?;
        if !self.per_caller.allow(&token) {
            return Err(refuse(
                Code::ResourceExhausted,
                "rate_limited",
                "too many requests with this token; retry later",
            ));
        }
        let body = req.get_ref();
        // The CSR before the API server: garbage costs no TokenReview.
        let checked =
            csr::check(&body.csr).map_err(|e| refuse(Code::InvalidArgument, "bad_csr", format!("CSR refused: {e}")))?;
        let requested = match body.impersonated() {
            None => checked.identity.clone(),
            Some(s) => {
                let id: Identity = s.parse().map_err(|e| {
                    refuse(
                        Code::InvalidArgument,
                        "bad_request",
                        format!("ImpersonatedIdentity `{s}` is not a SPIFFE identity: {e}"),
                    )
                })?;
                if id != checked.identity {
                    return Err(refuse(
                        Code::InvalidArgument,
                        "identity_mismatch",
                        format!("the CSR's SAN {} is not the ImpersonatedIdentity {id}", checked.identity),
                    ));
                }
                id
            }
        };
        if requested.trust_domain != self.settings.trust_domain {
            return Err(refuse(
                Code::PermissionDenied,
                "other_trust_domain",
                format!("{requested} is not in this CA's trust domain {}", self.settings.trust_domain),
            ));
        }
        let caller = self.authenticate(token).await?;
        self.authorize(&caller, &requested).await?;
        let asked = u64::try_from(body.validity_duration).unwrap_or(0);
        let max = self.settings.max_lifetime;
        let lifetime = if asked == 0 { max } else { Duration::from_secs(asked).min(max) };
        Ok((caller, requested, lifetime, checked.public_key))
    }

    /// The token's service account and bound pod, from a TokenReview.
    async fn authenticate(&self, token: &str) -> Result<Caller, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![istio_api::TOKEN_AUDIENCE.into()]),
            },
            ..TokenReview::default()
        };
        let answer = {
            let _permit =
                self.api.acquire().await.map_err(|_| refuse(Code::Unavailable, "api_unavailable", "shutting down"))?;
            Api::<TokenReview>::all(self.kube.clone()).create(&PostParams::default(), &review).await.map_err(|e| {
                refuse(
                    Code::Unavailable,
                    "api_unavailable",
                    format!("cannot review the token with the API server: {e}"),
                )
            })?
        };
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into());
            return Err(refuse(
                Code::Unauthenticated,
                "token_refused",
                format!("the API server refused the token: {why}"),
            ));
        }
        if !status.audiences.as_ref().is_some_and(|a| a.iter().any(|a| a == istio_api::TOKEN_AUDIENCE)) {
            return Err(refuse(
                Code::Unauthenticated,
                "token_refused",
                "the token is not for the audience istio-ca; mount a projected token with audience istio-ca",
            ));
        }
        let user = status.user.unwrap_or_default();
        let name = user.username.unwrap_or_default();
        let Some((ns, sa)) = name.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':')) else {
            return Err(refuse(
                Code::Unauthenticated,
                "not_service_account",
                format!("`{name}` is not a service account"),
            ));
        };
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let pod = first("authentication.kubernetes.io/pod-name").zip(first("authentication.kubernetes.io/pod-uid"));
        Ok(Caller { identity: Identity::new(&self.settings.trust_domain, ns, sa), pod })
    }

    /// Whether `caller` may get `requested`.
    async fn authorize(&self, caller: &Caller, requested: &Identity) -> Result<(), Refusal> {
        if *requested == caller.identity {
            return Ok(());
        }
        let me = &caller.identity;
        let is_agent =
            self.settings.node_agents.iter().any(|(ns, sa)| *ns == me.namespace && *sa == me.service_account);
        if !is_agent {
            return Err(refuse(
                Code::PermissionDenied,
                "not_authorized",
                format!("{me} may get only its own identity, not {requested}"),
            ));
        }
        if requested.namespace == me.namespace && requested.service_account == crate::config::GATEWAY_SERVICE_ACCOUNT {
            return Ok(());
        }
        let Some((pod_name, pod_uid)) = &caller.pod else {
            return Err(refuse(
                Code::PermissionDenied,
                "pod_not_bound",
                format!("the node agent {me}'s token is bound to no pod, so its node is unknown; use a projected service-account token"),
            ));
        };
        let node = self.node_of(&me.namespace, pod_name, pod_uid).await?;
        if self.has_pod_on(&requested.namespace, &requested.service_account, &node).await? {
            Ok(())
        } else {
            Err(refuse(
                Code::PermissionDenied,
                "no_pod_on_node",
                format!(
                    "no pod with service account {}/{} runs on node {node}, where the node agent {me} runs",
                    requested.namespace, requested.service_account
                ),
            ))
        }
    }

    /// The node the caller's own pod is scheduled on.
    async fn node_of(&self, namespace: &str, name: &str, uid: &str) -> Result<String, Refusal> {
        let key = kube::runtime::reflector::ObjectRef::new(name).within(namespace);
        if let Some(pod) = self.pods.get(&key).filter(|p| p.metadata.uid.as_deref() == Some(uid)) {
            if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty()) {
                return Ok(node);
            }
        }
        // Not in the watch yet (or unscheduled there): the API decides.
        let pod = {
            let _permit =
                self.api.acquire().await.map_err(|_| refuse(Code::Unavailable, "api_unavailable", "shutting down"))?;
            Api::<Pod>::namespaced(self.kube.clone(), namespace).get_opt(name).await.map_err(|e| {
                refuse(Code::Unavailable, "api_unavailable", format!("cannot read pod {namespace}/{name}: {e}"))
            })?
        };
        let gone = || {
            refuse(Code::PermissionDenied, "pod_gone", format!("the caller's pod {namespace}/{name} no longer exists"))
        };
        let pod = pod.ok_or_else(gone)?;
        if pod.metadata.uid.as_deref() != Some(uid) {
            return Err(gone());
        }
        pod.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty()).ok_or_else(|| {
            refuse(
                Code::PermissionDenied,
                "pod_not_scheduled",
                format!("the caller's pod {namespace}/{name} is on no node"),
            )
        })
    }

    /// Whether a pod of `namespace`/`service_account` that has not ended
    /// is scheduled on `node`: the watch's pods first, and only if it
    /// shows none, the API's (a pod created a moment ago).
    async fn has_pod_on(&self, namespace: &str, service_account: &str, node: &str) -> Result<bool, Refusal> {
        let matches = |p: &Pod| {
            let spec = p.spec.as_ref();
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            p.metadata.namespace.as_deref() == Some(namespace)
                && spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                && spec.and_then(|s| s.service_account_name.as_deref()).unwrap_or("default") == service_account
                && !matches!(phase, Some("Succeeded" | "Failed"))
        };
        if self.pods.state().iter().any(|p| matches(p)) {
            return Ok(true);
        }
        Ok(self.pods_on(namespace, node).await?.iter().any(matches))
    }

    async fn pods_on(&self, namespace: &str, node: &str) -> Result<Vec<Pod>, Refusal> {
        let _permit =
            self.api.acquire().await.map_err(|_| refuse(Code::Unavailable, "api_unavailable", "shutting down"))?;
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        Api::<Pod>::namespaced(self.kube.clone(), namespace).list(&lp).await.map(|l| l.items).map_err(|e| {
            refuse(Code::Unavailable, "api_unavailable", format!("cannot list pods in {namespace} on node {node}: {e}"))
        })
    }

    /// Prometheus text: ours, and istiod's names for the same counts.
    fn metrics(&self) -> String {
        let mut s = String::new();
        let requests = self.counts.requests.load(Ordering::Relaxed);
        let issued = self.counts.issued.load(Ordering::Relaxed);
        let _ = writeln!(s, "# TYPE redirector_ca_requests_total counter\nredirector_ca_requests_total {requests}");
        let _ = writeln!(
            s,
            "# TYPE redirector_ca_certificates_issued_total counter\nredirector_ca_certificates_issued_total {issued}"
        );
        let _ = writeln!(s, "# TYPE redirector_ca_requests_refused_total counter");
        let refused = self.counts.refused.lock().expect("counts lock").clone();
        for (reason, n) in &refused {
            let _ = writeln!(s, "redirector_ca_requests_refused_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(s, "# TYPE citadel_server_csr_count counter\ncitadel_server_csr_count {requests}");
        let _ = writeln!(
            s,
            "# TYPE citadel_server_success_cert_issuance_count counter\ncitadel_server_success_cert_issuance_count {issued}"
        );
        let auth_failures: u64 = refused
            .iter()
            .filter(|(r, _)| matches!(**r, "no_token" | "token_refused" | "not_service_account"))
            .map(|(_, n)| n)
            .sum();
        let _ = writeln!(
            s,
            "# TYPE citadel_server_authentication_failure_count counter\ncitadel_server_authentication_failure_count {auth_failures}"
        );
        s
    }
}

/// The bearer token of a call, or a refusal naming what is missing.
fn bearer(md: &tonic::metadata::MetadataMap) -> Result<&str, Refusal> {
    let header = md.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let token =
        header.strip_prefix("Bearer ").or_else(|| header.strip_prefix("bearer ")).map(str::trim).unwrap_or_default();
    if token.is_empty() {
        return Err(refuse(
            Code::Unauthenticated,
            "no_token",
            "no bearer token; send the service-account token (audience istio-ca) as `authorization: Bearer`",
        ));
    }
    Ok(token)
}

/// The CA's serving certificate, renewed at half-life.
#[derive(Debug)]
struct Serving(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Serving {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.read().expect("serving cert lock")))
    }
}

const SERVING_LIFETIME: Duration = Duration::from_hours(24);

/// Load the CA from `dir` (Istio's plug-in layout) and serve until the
/// process ends.
pub async fn serve(dir: &Path, settings: Settings, kube: kube::Client) -> Result<()> {
    let ca = MeshCa::load_plugin(dir, &settings.trust_domain)?;
    let serving = Arc::new(Serving(RwLock::new(ca.serving_cert(&settings.dns_names, SERVING_LIFETIME)?)));
    let mut tls = rustls::ServerConfig::builder_with_provider(crate::identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::clone(&serving) as Arc<dyn ResolvesServerCert>);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", settings.listen))?;
    let monitoring = match settings.monitoring {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a).await.with_context(|| format!("cannot listen on {a} (--monitoring)"))?,
        ),
        None => None,
    };
    tracing::info!(
        listen = %settings.listen,
        trust_domain = %settings.trust_domain,
        names = %settings.dns_names.join(","),
        node_agents = %settings.node_agents.iter().map(|(n, s)| format!("{n}/{s}")).collect::<Vec<_>>().join(","),
        max_lifetime_s = settings.max_lifetime.as_secs(),
        "mesh CA serving Istio's certificate API (istio.v1.auth.IstioCertificateService)"
    );
    let (service, watch) = CaService::new(ca, kube, settings);
    tokio::spawn(watch);
    if let Some(l) = monitoring {
        tokio::spawn(serve_monitoring(l, Arc::clone(&service)));
    }
    tokio::spawn(renew_serving(Arc::clone(&service), serving));
    // Connections at once; beyond it new ones wait in the backlog.
    let slots = Arc::new(tokio::sync::Semaphore::new(4096));
    loop {
        let permit = Arc::clone(&slots).acquire_owned().await?;
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, service) = (acceptor.clone(), Arc::clone(&service));
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(acceptor, tcp, peer, service).await;
        });
    }
}

/// Keep `writer` (the service's pod store) in step with the cluster's
/// pods; the watcher backs off and relists by itself after an error.
async fn watch_pods(kube: kube::Client, writer: kube::runtime::reflector::store::Writer<Pod>) {
    use futures_util::StreamExt as _;
    use kube::runtime::{reflector, watcher, WatchStreamExt as _};
    let pods = Api::<Pod>::all(kube);
    // Only what the node check reads is kept: a pod's containers, labels
    // and status would be most of the CA's memory in a large cluster.
    let slim = watcher(pods, watcher::Config::default()).modify(|p| {
        p.metadata.managed_fields = None;
        p.metadata.annotations = None;
        p.metadata.labels = None;
        p.metadata.owner_references = None;
        if let Some(s) = p.spec.as_mut() {
            *s = k8s_openapi::api::core::v1::PodSpec {
                node_name: s.node_name.take(),
                service_account_name: s.service_account_name.take(),
                ..Default::default()
            };
        }
        if let Some(st) = p.status.as_mut() {
            *st = k8s_openapi::api::core::v1::PodStatus { phase: st.phase.take(), ..Default::default() };
        }
    });
    let stream = reflector(writer, slim).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        if let Err(e) = event {
            tracing::warn!(error = %e, "the CA's pod watch failed; retrying (node checks ask the API meanwhile)");
        }
    }
}

async fn renew_serving(service: Arc<CaService>, serving: Arc<Serving>) {
    loop {
        tokio::time::sleep(SERVING_LIFETIME / 2).await;
        match service.ca.serving_cert(&service.settings.dns_names, SERVING_LIFETIME) {
            Ok(c) => *serving.0.write().expect("serving cert lock") = c,
            Err(e) => tracing::warn!(error = %e, "cannot renew the CA's serving certificate; the current one stays"),
        }
    }
}

/// TLS, then HTTP/2 with each request answered as the gRPC service.
async fn serve_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    service: Arc<CaService>,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let service = Arc::clone(&service);
        async move {
            let handler = {
                let service = Arc::clone(&service);
                move |r| Arc::clone(&service).create(r, peer)
            };
            let (resp, undecoded) = istio_api::serve_request(req, handler).await;
            if let Some(status) = undecoded {
                let reason = if status.code() == Code::Unimplemented { "unknown_method" } else { "bad_frame" };
                service.refused(peer, refuse(status.code(), reason, status.message().to_string()));
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .max_concurrent_streams(256)
        .max_header_list_size(16 * 1024)
        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "CA connection ended with an error");
    }
}

/// `/ready` and `/metrics` over plain HTTP/1.
async fn serve_monitoring(listener: tokio::net::TcpListener, service: Arc<CaService>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let service = Arc::clone(&service);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/ready" => (200, "ready\n".to_string()),
                    "/metrics" => (200, service.metrics()),
                    _ => (404, "not found; try /ready or /metrics\n".to_string()),
                };
                let resp = http::Response::builder()
                    .status(status)
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .expect("static response");
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_allows_a_burst_then_refuses() {
        let l = Limiter::new(3, 1);
        assert!(l.allow(&"a") && l.allow(&"a") && l.allow(&"a"));
        assert!(!l.allow(&"a"), "the fourth at once is over the burst");
        assert!(l.allow(&"b"), "another caller has its own bucket");
    }

    #[test]
    fn service_accounts_parse() {
        assert_eq!(parse_service_account("istio-system/ztunnel").unwrap(), ("istio-system".into(), "ztunnel".into()));
        assert!(parse_service_account("ztunnel").is_err());
        assert!(parse_service_account("a/b/c").is_err());
    }

    #[test]
    fn a_call_without_a_token_is_refused_by_name() {
        let md = tonic::metadata::MetadataMap::new();
        let r = bearer(&md).unwrap_err();
        assert_eq!(r.code, Code::Unauthenticated);
        assert_eq!(r.reason, "no_token");
    }
}
