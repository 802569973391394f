//! The in-process tier: the HTTP router served on 127.0.0.1:0 with the
//! destination passed in, in front of real hyper backends on 127.0.0.1:0.
//! No root, no namespaces, no kernel programs: routing, faults, retries,
//! timeouts, circuit breaking and outlier detection as a client sees them.
//! The privileged suite (`tests/tests/routing.rs`) proves the same through
//! real capture.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::{serve, ConnContext};
use crate::endpoint::Balancer;
use crate::mesh::model::{Mesh, Protocol};
use crate::mesh::source_dir::{load_text, Documents};
use crate::mesh::MeshHandle;
use crate::telemetry::Metrics;
use crate::transport::http_client::{Connector, Upstreams};
use crate::transport::socket::WorkloadNet;
use crate::transport::Transport;

/// The address clients dial: the Service's; nothing listens there, the
/// router is handed the connection as capture would.
const VIP: &str = "10.96.0.5:80";

/// A backend: what it answers by path, and what it saw.
struct Backend {
    addr: SocketAddr,
    /// Requests seen, by path as they arrived.
    seen: Arc<Mutex<Vec<String>>>,
    /// Requests in progress now and the most at once.
    busy: Arc<(AtomicUsize, AtomicUsize)>,
}

impl Backend {
    /// A hyper server named `name` on 127.0.0.1:0. Paths: `/status/N`
    /// answers N; `/flaky/N` answers 503 to its first N requests, then 200;
    /// `/slow/MS` waits MS milliseconds; anything else 200. Every response
    /// says `x-backend: NAME` and `x-path: PATH`.
    async fn start(name: &'static str) -> Backend {
        Backend::serve(name, false).await
    }

    /// A backend that answers 500 to every request.
    async fn start_failing(name: &'static str) -> Backend {
        Backend::serve(name, true).await
    }

    async fn serve(name: &'static str, failing: bool) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let busy: Arc<(AtomicUsize, AtomicUsize)> = Arc::default();
        let flaky: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let (s, b) = (Arc::clone(&seen), Arc::clone(&busy));
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (seen, busy, flaky) = (Arc::clone(&s), Arc::clone(&b), Arc::clone(&flaky));
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (seen, busy, flaky) = (Arc::clone(&seen), Arc::clone(&busy), Arc::clone(&flaky));
                    async move {
                        let path = req.uri().path().to_string();
                        seen.lock().unwrap().push(path.clone());
                        let now = busy.0.fetch_add(1, Ordering::SeqCst) + 1;
                        busy.1.fetch_max(now, Ordering::SeqCst);
                        let status = if failing { 500 } else { answer(&path, &flaky).await };
                        busy.0.fetch_sub(1, Ordering::SeqCst);
                        let r = Response::builder()
                            .status(status)
                            .header("x-backend", name)
                            .header("x-path", path)
                            .body(Full::new(Bytes::from(name)))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        Backend { addr, seen, busy }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn most_at_once(&self) -> usize {
        self.busy.1.load(Ordering::SeqCst)
    }
}

async fn answer(path: &str, flaky: &Mutex<HashMap<String, usize>>) -> u16 {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (kind, arg) = (parts.next().unwrap_or_default(), parts.next().and_then(|a| a.parse::<u64>().ok()));
    match (kind, arg) {
        ("status", Some(code)) => code as u16,
        ("flaky", Some(n)) => {
            let mut f = flaky.lock().unwrap();
            let count = f.entry(path.to_string()).or_default();
            *count += 1;
            if *count as u64 <= n {
                503
            } else {
                200
            }
        }
        ("slow", Some(ms)) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            200
        }
        _ => 200,
    }
}

/// The router for `yaml` on 127.0.0.1:0, every connection handed to it as
/// if captured on its way to [`VIP`].
struct Router {
    addr: SocketAddr,
    client: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
}

impl Router {
    async fn start(yaml: &str) -> Router {
        let mut docs = Documents::default();
        let mut errors = Vec::new();
        load_text(std::path::Path::new("mesh.yaml"), yaml, &mut docs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let mesh = Mesh::compile(&docs).expect("the test mesh compiles");
        let service = mesh.service_at(VIP.parse().unwrap()).map(|(s, _)| s).expect("the service at the VIP");
        let mesh = MeshHandle::new(mesh);
        let transport = Transport { mark: 0, connect_timeout: Duration::from_secs(2), hbone: None };
        let upstreams = Upstreams::new(Connector {
            transport,
            from: Arc::new(WorkloadNet::host(None)),
            mesh: mesh.clone(),
            mtls: crate::transport::Mtls::WhenEnrolled,
        });
        let balancer = Arc::new(Balancer::default());
        let metrics = Arc::new(Metrics::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, client)) = listener.accept().await else { return };
                let ctx = ConnContext {
                    mesh: mesh.clone(),
                    upstreams: upstreams.clone(),
                    balancer: Arc::clone(&balancer),
                    client,
                    original_dst: VIP.parse().unwrap(),
                    service: Some(service),
                    gateway_port: None,
                    forwarded_proto: None,
                    protocol: Protocol::Http,
                    metrics: Arc::clone(&metrics),
                    access_log: false,
                    source: None,
                    header_read_timeout: None,
                };
                tokio::spawn(serve(tcp, ctx));
            }
        });
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
        Router { addr, client }
    }

    /// GET `path` with `headers`: the status, the backend that answered
    /// (`-`: the proxy itself), the path it saw, and the body.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String, String, String) {
        let mut b = Request::get(format!("http://{}{path}", self.addr)).header("host", "web");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self.client.request(b.body(Empty::new()).unwrap()).await.expect("the router answers");
        let header = |h: &str| resp.headers().get(h).map_or("-".to_string(), |v| v.to_str().unwrap().to_string());
        let (status, backend, seen) = (resp.status().as_u16(), header("x-backend"), header("x-path"));
        let body = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
        (status, backend, seen, body)
    }
}

/// Service `web` at [`VIP`] with endpoints (name, address, version), then
/// `rest` (VirtualServices, DestinationRules).
fn mesh(endpoints: &[(&str, &Backend, &str)], rest: &str) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.5, ports: [{name: http, port: 80}], selector: {app: web}}\n",
    );
    for (name, b, version) in endpoints {
        y.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}}}\nspec: {{address: 127.0.0.1, ports: {{http: {}}}, labels: {{app: web, version: {version}}}}}\n",
            b.addr.port()
        ));
    }
    y.push_str(rest);
    y
}

#[tokio::test]
async fn path_routing_rewrites_the_matched_prefix_and_header_routing_picks_a_subset() {
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let r = Router::start(&mesh(
        &[("v1", &v1, "v1"), ("v2", &v2, "v2")],
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web}\nspec: {host: web, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web}\nspec:\n  hosts: [web]\n  http:\n\
         \x20 - match: [{uri: {prefix: /api/v2/}}]\n    rewrite: {uri: /}\n    route: [{destination: {host: web, subset: v2}}]\n\
         \x20 - match: [{headers: {x-canary: {exact: \"yes\"}}}]\n    route: [{destination: {host: web, subset: v2}}]\n\
         \x20 - route: [{destination: {host: web, subset: v1}}]\n",
    ))
    .await;
    let (_, backend, seen, _) = r.get("/api/v2/users", &[]).await;
    assert_eq!((backend.as_str(), seen.as_str()), ("v2", "/users"), "the prefix is rewritten");
    assert_eq!(r.get("/other", &[("x-canary", "yes")]).await.1, "v2");
    assert_eq!(r.get("/other", &[]).await.1, "v1");
}

/// A DestinationRule for `web` with `policy` (YAML flow mapping text) as
/// its trafficPolicy, and a VirtualService with `http` as its only rule.
fn rules(policy: &str, http: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web}}\nspec: {{host: web, trafficPolicy: {policy}, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web}}\nspec: {{hosts: [web], http: [{http}]}}\n"
    )
}

#[tokio::test]
async fn a_90_10_canary_sends_about_nine_requests_in_ten_to_the_stable_subset() {
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let r = Router::start(&mesh(
        &[("v1", &v1, "v1"), ("v2", &v2, "v2")],
        &rules(
            "{}",
            "{route: [{destination: {host: web, subset: v1}, weight: 90}, {destination: {host: web, subset: v2}, weight: 10}]}",
        ),
    ))
    .await;
    let mut to_v1 = 0;
    for _ in 0..400 {
        if r.get("/", &[]).await.1 == "v1" {
            to_v1 += 1;
        }
    }
    // Binomial(400, 0.9): mean 360, standard deviation 6.
    assert!((320..=395).contains(&to_v1), "{to_v1} of 400 went to v1");
    assert_eq!(v1.seen().len() + v2.seen().len(), 400);
}

#[tokio::test]
async fn an_abort_fault_answers_without_the_backend_and_a_delay_fault_waits_first() {
    let v1 = Backend::start("v1").await;
    let r = Router::start(&mesh(
        &[("v1", &v1, "v1")],
        &rules(
            "{}",
            "{match: [{uri: {prefix: /abort}}], fault: {abort: {httpStatus: 418, percentage: {value: 100}}}, route: [{destination: {host: web}}]}, \
             {match: [{uri: {prefix: /delay}}], fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}, route: [{destination: {host: web}}]}",
        ),
    ))
    .await;
    let (status, backend, _, body) = r.get("/abort", &[]).await;
    assert_eq!((status, backend.as_str(), body.as_str()), (418, "-", "fault filter abort\n"));
    assert!(v1.seen().is_empty(), "an aborted request never reaches the backend");
    let started = Instant::now();
    let (status, backend, _, _) = r.get("/delay", &[]).await;
    assert_eq!((status, backend.as_str()), (200, "v1"));
    assert!(started.elapsed() >= Duration::from_millis(300), "the delay fault held the request");
}

#[tokio::test]
async fn retries_turn_a_flaky_backend_into_a_success_and_give_up_after_their_attempts() {
    let v1 = Backend::start("v1").await;
    let r = Router::start(&mesh(
        &[("v1", &v1, "v1")],
        &rules("{}", "{retries: {attempts: 3, retryOn: 5xx}, route: [{destination: {host: web}}]}"),
    ))
    .await;
    assert_eq!(r.get("/flaky/2", &[]).await.0, 200, "two 503s, then the third attempt succeeds");
    assert_eq!(v1.seen().iter().filter(|p| *p == "/flaky/2").count(), 3);
    assert_eq!(r.get("/status/500", &[]).await.0, 500, "the last attempt's answer");
    assert_eq!(v1.seen().iter().filter(|p| *p == "/status/500").count(), 4, "one try and three retries");
}

#[tokio::test]
async fn a_per_try_timeout_is_retried_and_the_route_timeout_answers_504() {
    let v1 = Backend::start("v1").await;
    let r = Router::start(&mesh(
        &[("v1", &v1, "v1")],
        &rules(
            "{}",
            "{match: [{uri: {prefix: /slow/2000}}], timeout: 300ms, route: [{destination: {host: web}}]}, \
             {retries: {attempts: 2, perTryTimeout: 100ms, retryOn: 5xx}, route: [{destination: {host: web}}]}",
        ),
    ))
    .await;
    let started = Instant::now();
    let (status, _, _, body) = r.get("/slow/2000", &[]).await;
    assert_eq!((status, body.as_str()), (504, "upstream request timeout\n"));
    assert!(started.elapsed() < Duration::from_millis(1900), "the route's timeout, not the backend, ended it");
    let (status, ..) = r.get("/slow/1000", &[]).await;
    assert_eq!(status, 504, "every attempt timed out");
    assert_eq!(v1.seen().iter().filter(|p| *p == "/slow/1000").count(), 3, "one try and two retries, 100 ms each");
}

#[tokio::test]
async fn circuit_breaking_answers_overflow_with_503_once_connections_and_the_queue_are_full() {
    let v1 = Backend::start("v1").await;
    let r = Arc::new(
        Router::start(&mesh(
            &[("v1", &v1, "v1")],
            &rules(
                "{connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}",
                "{retries: {attempts: 0}, route: [{destination: {host: web}}]}",
            ),
        ))
        .await,
    );
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let r = Arc::clone(&r);
            tokio::spawn(async move { r.get("/slow/400", &[]).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for c in calls {
        let (status, _, _, body) = c.await.unwrap();
        if status == 503 {
            assert!(body.contains("overflow"), "{body}");
        }
        statuses.push(status);
    }
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(served >= 1 && statuses.iter().filter(|s| **s == 503).count() >= 1, "{statuses:?}");
    assert_eq!(v1.most_at_once(), 1, "maxConnections 1: one request at a time reached the backend");
}

#[tokio::test]
async fn outlier_detection_ejects_a_failing_endpoint_and_traffic_moves_to_the_healthy_one() {
    let (good, bad) = (Backend::start("good").await, Backend::start_failing("bad").await);
    let r = Router::start(&mesh(
        &[("good", &good, "v1"), ("bad", &bad, "v1")],
        &rules(
            "{outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}}",
            "{retries: {attempts: 0}, route: [{destination: {host: web}}]}",
        ),
    ))
    .await;
    let mut failures = 0;
    for _ in 0..20 {
        let (status, backend, ..) = r.get("/", &[]).await;
        if status != 200 {
            assert_eq!((status, backend.as_str()), (500, "bad"));
            failures += 1;
        }
    }
    assert_eq!((failures, bad.seen().len(), good.seen().len()), (1, 1, 19), "ejected after its first 5xx");
}

#[tokio::test]
async fn consistent_hashing_on_a_header_keeps_a_user_on_one_endpoint() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let r = Router::start(&mesh(
        &[("a", &a, "v1"), ("b", &b, "v1")],
        &rules("{loadBalancer: {consistentHash: {httpHeaderName: x-user}}}", "{route: [{destination: {host: web}}]}"),
    ))
    .await;
    let mut by_user: HashMap<String, std::collections::BTreeSet<String>> = HashMap::new();
    for i in 0..60 {
        let user = format!("user-{}", i % 6);
        let backend = r.get("/", &[("x-user", &user)]).await.1;
        by_user.entry(user).or_default().insert(backend);
    }
    assert!(by_user.values().all(|s| s.len() == 1), "{by_user:?}");
}

/// A pod's HTTP/2 client that opens requests and resets each at once (the
/// "rapid reset" flood) loses its connection; another client of the same
/// proxy is served as before.
#[tokio::test]
async fn an_h2_client_that_floods_resets_loses_its_connection_and_others_are_served() {
    let v1 = Backend::start("v1").await;
    let r = Router::start(&mesh(&[("v1", &v1, "v1")], "")).await;
    let tcp = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let mut sent = 0;
    for _ in 0..10_000 {
        send = match send.ready().await {
            Ok(s) => s,
            Err(_) => break,
        };
        let req = Request::get("http://web/").body(()).unwrap();
        match send.send_request(req, true) {
            Ok((_, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                sent += 1;
            }
            Err(_) => break,
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), driver).await.expect("the server ended the connection");
    let e = ended.unwrap().expect_err("the connection ended with an error");
    assert_eq!(e.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{e} after {sent} resets");
    // The flood did not become upstream work: few of its requests reached
    // the backend before the connection was closed.
    let reached = v1.seen().len();
    assert!(reached < 200, "{reached} of {sent} reset requests reached the backend");
    assert_eq!(r.get("/", &[]).await.0, 200, "another client is served");
}
