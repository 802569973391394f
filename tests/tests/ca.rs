//! The control-plane CA (`redirector ca serve`) with real node agents:
//! Istio's certificate API over gRPC and TLS, callers authenticated by
//! TokenReview against the test API server and authorized by the node
//! their token's pod runs on. No node agent here holds the CA key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use redirector::identity::istio_api::{CaClient, IstioCertificateRequest, IstioCertificateResponse};
use redirector::identity::Identity;
use redirector_tests::cluster::{ns_path, Cluster, AGENT_NAMESPACE};
use redirector_tests::kubeapi::KubeApi;
use redirector_tests::{eventually, pem_der, privileged};
use serde_json::json;

const TD: &str = "cluster.local";
/// The CA's Service, as agents are told it (`mesh.caAddress`).
const CA_SERVICE: &str = "redirector-ca.istio-system.svc:15012";

fn id(sa: &str) -> Identity {
    Identity::new(TD, "default", sa)
}

/// Run `f` on a thread inside the network namespace `netns` (with a
/// runtime of its own): the CA listens on a node's address.
fn in_netns<T: Send>(netns: &Path, f: impl FnOnce(&tokio::runtime::Runtime) -> T + Send) -> T {
    let ns = std::fs::File::open(netns).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            // SAFETY: a namespace descriptor; only this thread moves.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            f(&rt)
        })
        .join()
        .unwrap()
    })
}

/// A client of the CA replicas at `addresses`, trusting the mesh's roots.
fn client(ca_dir: &Path, addresses: Vec<std::net::SocketAddr>) -> CaClient {
    client_waiting(ca_dir, addresses, Duration::from_secs(5))
}

/// [`client`] whose calls may take up to `timeout`.
fn client_waiting(ca_dir: &Path, addresses: Vec<std::net::SocketAddr>, timeout: Duration) -> CaClient {
    let bundle = ca_dir.join("root-cert.pem");
    let roots = redirector::identity::remote::read_bundle(&bundle).unwrap().0;
    let roots = std::sync::Arc::new(roots);
    let addresses = std::sync::Arc::new(addresses);
    CaClient::new(
        CA_SERVICE,
        std::sync::Arc::new(move || {
            let a = (*addresses).clone();
            Box::pin(async move { a })
        }),
        std::sync::Arc::new(move || std::sync::Arc::clone(&roots)),
        timeout,
    )
    .unwrap()
}

/// (gRPC code name, message), or the response.
type Answer = Result<IstioCertificateResponse, (String, String)>;

fn ask(rt: &tokio::runtime::Runtime, c: &CaClient, token: &str, req: IstioCertificateRequest) -> Answer {
    rt.block_on(c.create_certificate(token, req)).map_err(|s| (format!("{:?}", s.code()), s.message().to_string()))
}

/// One HTTP/2 request to the CA at `addr` carrying `body` as it is (gRPC
/// framing included or not): the `grpc-status` and `grpc-message` the CA
/// answered with, from the headers or the trailers.
async fn raw_grpc(ca_dir: &Path, addr: std::net::SocketAddr, token: &str, body: Vec<u8>) -> (String, String) {
    let roots = redirector::identity::remote::read_bundle(&ca_dir.join("root-cert.pem")).unwrap().0;
    let mut cfg =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp).await.unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://{addr}/istio.v1.auth.IstioCertificateService/CreateCertificate"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let (resp, mut stream) = send.send_request(req, false).unwrap();
    stream.send_data(body.into(), true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp).await.unwrap().unwrap();
    let pick = |h: &http::HeaderMap| {
        h.get("grpc-status").map(|s| {
            let m = h.get("grpc-message").map(|m| m.to_str().unwrap_or_default().to_string()).unwrap_or_default();
            (s.to_str().unwrap().to_string(), m)
        })
    };
    if let Some(found) = pick(resp.headers()) {
        return found;
    }
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let _ = chunk.unwrap();
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    pick(&trailers).unwrap_or_else(|| ("none".into(), String::new()))
}

/// A gRPC frame: uncompressed, `declared` as its length, then `bytes`.
fn frame(declared: u32, bytes: &[u8]) -> Vec<u8> {
    let mut f = vec![0];
    f.extend_from_slice(&declared.to_be_bytes());
    f.extend_from_slice(bytes);
    f
}

/// A fresh key's CSR for `csr_for`, asked as `as_of` (ImpersonatedIdentity).
fn request(csr_for: &Identity, as_of: Option<&Identity>) -> IstioCertificateRequest {
    let (_key, csr) = redirector::identity::csr::new_key_and_csr(csr_for).unwrap();
    IstioCertificateRequest::new(csr, Duration::from_hours(1), as_of)
}

/// A CSR made by OpenSSL with `newkey` (e.g. `rsa:1024`) and `sans`.
fn openssl_csr(dir: &Path, newkey: &str, sans: &str) -> String {
    let key = dir.join("openssl.key");
    let out = std::process::Command::new("openssl")
        .args(["req", "-new", "-newkey", newkey, "-nodes", "-subj", "/O=test", "-keyout"])
        .arg(&key)
        .args(["-addext", &format!("subjectAltName={sans}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl req: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The CSR with one bit of its signature flipped.
fn with_bad_signature(pem: &str) -> String {
    use base64::Engine as _;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", lines.join("\n"))
}

fn logs(c: &Cluster) -> String {
    let mut s = String::new();
    for n in &c.nodes {
        s += &format!("{}: {}\n", n.name, std::fs::read_to_string(&n.log).unwrap_or_default());
    }
    for (k, ca) in c.ca_servers.iter().enumerate() {
        s += &format!("ca-{k}: {}\n", std::fs::read_to_string(&ca.log).unwrap_or_default());
    }
    s
}

/// The cluster of the test: both agents read the API server and ask the
/// CA Service `redirector-ca` (two endpoints: node-a's and node-b's
/// address) for every certificate.
fn cluster(dir_name: &str) -> (Cluster, KubeApi, Vec<PathBuf>) {
    let mut c = Cluster::kubernetes("ebpf").unwrap();
    let api = KubeApi::start(&c.dir.join(dir_name)).unwrap();
    let mut kubeconfigs = Vec::new();
    for n in &c.nodes {
        let k = c.dir.join(format!("{}.kubeconfig", n.name));
        api.listen_in_netns(&ns_path(&n.ns), &k).unwrap();
        kubeconfigs.push(k);
    }
    c.kubeconfigs = Some(kubeconfigs.clone());
    for o in redirector::cmd::manifest::yaml_objects(&c.mesh_yaml()).unwrap() {
        api.apply(o).unwrap();
    }
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "redirector-ca", "namespace": AGENT_NAMESPACE, "uid": "svc-ca"},
        "spec": {"clusterIP": "198.19.0.12", "ports": [{"name": "grpc", "port": 15012, "protocol": "TCP", "targetPort": 15012}],
                 "selector": {"app": "redirector-ca"}}}))
    .unwrap();
    let endpoints: Vec<_> = c
        .nodes
        .iter()
        .map(|n| json!({"addresses": [n.ip], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": n.name}))
        .collect();
    api.apply(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "redirector-ca-x1", "namespace": AGENT_NAMESPACE, "uid": "eps-ca",
                     "labels": {"kubernetes.io/service-name": "redirector-ca"}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "grpc", "port": 15012, "protocol": "TCP"}]}))
        .unwrap();
    c.use_ca_service(&api, CA_SERVICE).unwrap();
    (c, api, kubeconfigs)
}

/// Deliverables 3 and 6: with the CA down at start the pods are held;
/// once one replica is up every pod is served with a certificate from
/// it and traffic flows over HBONE between the nodes. Then, with
/// certificates of 20 s: renewals under an open connection, from either
/// replica, and through a CA outage the open connection is not lost and
/// renewal is retried until the CA is back.
#[test]
fn agents_ask_the_ca_service_and_keep_serving_through_its_outages() {
    if !privileged() {
        return;
    }
    let (mut c, _api, kubeconfigs) = cluster("api");
    let before = c.launch().unwrap();
    // No CA yet: the pods wait for their certificates.
    assert!(
        eventually(Duration::from_secs(10), || c
            .logged(0, "cannot serve this pod yet")
            .iter()
            .any(|l| l.to_string().contains("waiting for its certificate"))),
        "{}",
        logs(&c)
    );
    assert_eq!(c.served(0), before[0], "a pod was served without a certificate: {}", logs(&c));
    assert!(
        !c.logged(0, "no certificate from the mesh CA").is_empty(),
        "the agent does not say it cannot reach the CA: {}",
        logs(&c)
    );
    let ca0 = c.start_ca_server(0, &kubeconfigs[0], &["--max-cert-lifetime", "20s"]).unwrap();
    c.wait_served(&before).unwrap_or_else(|e| panic!("{e}\n{}", logs(&c)));
    // The agents' own, their gateways' and the four pods' identities (the
    // first two may wait out a retry backoff of up to 30 s: the CA was down).
    assert!(
        eventually(Duration::from_secs(35), || c.ca_counter(ca0, "redirector_ca_certificates_issued_total") >= 8),
        "{}",
        c.ca_metrics(ca0)
    );
    let b1 = c.pod("b1").ip.clone();
    c.start_nginx("b1", 8080).unwrap();
    let (code, err) = c.curl("a1", &format!("http://{b1}:8080/"));
    assert_eq!(code, 200, "curl a1 -> b1: {err}\n{}", logs(&c));
    assert!(eventually(Duration::from_secs(5), || c
        .logged(1, "HBONE connection closed")
        .iter()
        .any(|l| l["fields"]["source_principal"] == "spiffe://cluster.local/ns/default/sa/sa-a1")));

    // A long-lived connection a1 -> b1 while certificates are renewed, a
    // second replica takes over from the first, and both go away a while.
    let mut open = c.long_lived_connection("a1", "b1", 7000).unwrap();
    let mut exchange = |c: &Cluster, for_how_long: Duration| {
        let started = std::time::Instant::now();
        while started.elapsed() < for_how_long {
            open.exchange().unwrap_or_else(|e| panic!("{e}\n{}", logs(c)));
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    let rotated = |c: &Cluster| {
        c.logged(0, "workload certificate rotated").len() + c.logged(1, "workload certificate rotated").len()
    };
    // Renewed at half-life (10 s less jitter) by replica 0.
    exchange(&c, Duration::from_secs(11));
    assert!(rotated(&c) >= 2, "no renewal in 11 s of certificates of 20 s\n{}", logs(&c));

    // Replica 1 comes up, replica 0 goes: renewals go on through the
    // Service's other endpoint.
    let ca1 = c.start_ca_server(1, &kubeconfigs[1], &["--max-cert-lifetime", "20s"]).unwrap();
    c.stop_ca_server(ca0);
    let (issued1, rotated1) = (c.ca_counter(ca1, "redirector_ca_certificates_issued_total"), rotated(&c));
    exchange(&c, Duration::from_secs(11));
    assert!(rotated(&c) > rotated1, "no renewal after replica 0 went away\n{}", logs(&c));
    assert!(c.ca_counter(ca1, "redirector_ca_certificates_issued_total") > issued1, "replica 1 issued nothing");

    // No CA at all until a renewal has failed (renewals fall due every
    // ~10 s; a renewed certificate then still has 10 s): the connection
    // stays, the failure is logged and retried, and renewal succeeds once
    // the CA is back.
    let failed = |c: &Cluster| {
        c.logged(0, "no certificate from the mesh CA").len() + c.logged(1, "no certificate from the mesh CA").len()
    };
    let failures = failed(&c);
    c.stop_ca_server(ca1);
    let outage = std::time::Instant::now();
    while failed(&c) == failures {
        assert!(outage.elapsed() < Duration::from_secs(14), "no renewal was attempted during the outage\n{}", logs(&c));
        exchange(&c, Duration::from_millis(500));
    }
    let rotated2 = rotated(&c);
    let back = c.start_ca_server(0, &kubeconfigs[0], &["--max-cert-lifetime", "20s"]).unwrap();
    let resumed = std::time::Instant::now();
    while rotated(&c) == rotated2 {
        assert!(
            resumed.elapsed() < Duration::from_secs(8),
            "renewal did not resume when the CA came back\n{}",
            logs(&c)
        );
        exchange(&c, Duration::from_millis(500));
    }
    assert!(c.ca_counter(back, "redirector_ca_certificates_issued_total") > 0);
    // New connections use the renewed certificates.
    let (code, err) = c.curl("a2", &format!("http://{b1}:8080/"));
    assert_eq!(code, 200, "curl a2 -> b1 after the outage: {err}\n{}", logs(&c));
}

/// Deliverables 2 and 6, and the bad input: what the CA refuses, with
/// which status, and that it serves others meanwhile.
#[test]
fn the_ca_grants_only_what_the_node_check_allows_and_refuses_bad_requests() {
    if !privileged() {
        return;
    }
    let (mut c, api, kubeconfigs) = cluster("api");
    let ca = c.start_ca_server(0, &kubeconfigs[0], &[]).unwrap();
    let agent_a = std::fs::read_to_string(c.token_path(0)).unwrap();
    let a1 = (c.pod("a1").name.clone(), c.pod("a1").uid.clone());
    let a1_token = api.issue_token("default", "sa-a1", Some((&a1.0, &a1.1)), &["istio-ca"], Duration::from_mins(10));
    let forged = "eyJhbGciOiJSUzI1NiJ9.forged.signature".to_string();
    let expired = api.issue_token(
        AGENT_NAMESPACE,
        "redirector",
        Some(("agent-node-a", &format!("{}-agent-0", c.name))),
        &["istio-ca"],
        Duration::ZERO,
    );
    let wrong_audience = api.issue_token(
        AGENT_NAMESPACE,
        "redirector",
        Some(("agent-node-a", &format!("{}-agent-0", c.name))),
        &["https://kubernetes.default.svc.cluster.local"],
        Duration::from_mins(10),
    );
    let gone_pod = api.issue_token(
        AGENT_NAMESPACE,
        "redirector",
        Some(("agent-gone", "uid-gone")),
        &["istio-ca"],
        Duration::from_mins(10),
    );
    let addr: std::net::SocketAddr = c.ca_servers[ca].listen.parse().unwrap();
    let root = pem_der(&std::fs::read_to_string(c.ca_dir.join("root-cert.pem")).unwrap());
    let scratch = c.dir.clone();
    let netns = ns_path(&c.nodes[0].ns);
    let results = in_netns(&netns, |rt| {
        let ca = rt.block_on(async { client(&c.ca_dir, vec![addr]) });
        let mut r: Vec<(&str, Answer)> = Vec::new();
        // Granted: a pod on the agent's node, the agent's own identity, a
        // workload's own identity.
        r.push(("a1 by node-a", ask(rt, &ca, &agent_a, request(&id("sa-a1"), Some(&id("sa-a1"))))));
        let own = Identity::new(TD, AGENT_NAMESPACE, "redirector");
        r.push(("agent's own", ask(rt, &ca, &agent_a, request(&own, None))));
        r.push(("a1's own", ask(rt, &ca, &a1_token, request(&id("sa-a1"), None))));
        // Refused.
        r.push(("b1 by node-a", ask(rt, &ca, &agent_a, request(&id("sa-b1"), Some(&id("sa-b1"))))));
        r.push(("no pod", ask(rt, &ca, &agent_a, request(&id("sa-nobody"), Some(&id("sa-nobody"))))));
        r.push(("a2 by a1", ask(rt, &ca, &a1_token, request(&id("sa-a2"), None))));
        r.push(("forged", ask(rt, &ca, &forged, request(&id("sa-a1"), Some(&id("sa-a1"))))));
        r.push(("expired", ask(rt, &ca, &expired, request(&id("sa-a1"), Some(&id("sa-a1"))))));
        r.push(("audience", ask(rt, &ca, &wrong_audience, request(&id("sa-a1"), Some(&id("sa-a1"))))));
        r.push(("deleted pod", ask(rt, &ca, &gone_pod, request(&id("sa-a1"), Some(&id("sa-a1"))))));
        r.push(("no token", ask(rt, &ca, "", request(&id("sa-a1"), Some(&id("sa-a1"))))));
        let sans = "URI:spiffe://cluster.local/ns/default/sa/sa-a1,URI:spiffe://cluster.local/ns/default/sa/sa-a2";
        let csr = openssl_csr(&scratch, "rsa:2048", sans);
        r.push((
            "second SAN",
            ask(rt, &ca, &agent_a, IstioCertificateRequest::new(csr, Duration::from_mins(1), Some(&id("sa-a1")))),
        ));
        r.push(("other SAN", ask(rt, &ca, &agent_a, request(&id("sa-a2"), Some(&id("sa-a1"))))));
        let weak = openssl_csr(&scratch, "rsa:1024", "URI:spiffe://cluster.local/ns/default/sa/sa-a1");
        r.push((
            "weak key",
            ask(rt, &ca, &agent_a, IstioCertificateRequest::new(weak, Duration::from_mins(1), Some(&id("sa-a1")))),
        ));
        let (_k, good) = redirector::identity::csr::new_key_and_csr(&id("sa-a1")).unwrap();
        let bad = with_bad_signature(&good);
        r.push((
            "bad signature",
            ask(rt, &ca, &agent_a, IstioCertificateRequest::new(bad, Duration::from_mins(1), Some(&id("sa-a1")))),
        ));
        let huge = "A".repeat(1 << 20);
        r.push((
            "1 MiB CSR",
            ask(rt, &ca, &agent_a, IstioCertificateRequest::new(huge, Duration::from_mins(1), Some(&id("sa-a1")))),
        ));
        // Frames that are not a request: garbage protobuf, a frame cut
        // short, one that claims 1 GiB, a method not served.
        let frames = rt.block_on(async {
            let mut out = Vec::new();
            for (name, body) in [
                ("garbage", frame(8, &[0xff; 8])),
                ("truncated", frame(100, &[0x0a; 10])),
                ("1 GiB frame", frame(1 << 30, &[0x0a; 16])),
            ] {
                out.push((name, raw_grpc(&c.ca_dir, addr, &agent_a, body).await));
            }
            out
        });
        // Still serving others after all of it.
        r.push(("a2 by node-a", ask(rt, &ca, &agent_a, request(&id("sa-a2"), Some(&id("sa-a2"))))));
        (r, frames)
    });
    let (results, frames) = results;
    for (name, (status, message)) in &frames {
        // INTERNAL (13) for what does not decode, OUT_OF_RANGE (11) over
        // the size limit: never OK, always a message.
        assert!(status == "13" || status == "11" || status == "3", "{name}: grpc-status {status} {message}");
        assert!(!message.is_empty(), "{name}: no grpc-message");
    }
    assert_eq!(frames.iter().find(|f| f.0 == "1 GiB frame").unwrap().1 .0, "11", "{frames:?}");
    let get = |name: &str| results.iter().find(|(n, _)| *n == name).map(|(_, a)| a.clone()).unwrap();
    for name in ["a1 by node-a", "agent's own", "a1's own", "a2 by node-a"] {
        let chain = get(name).unwrap_or_else(|e| panic!("{name}: refused {e:?}\n{}", logs(&c))).cert_chain;
        assert!(chain.len() >= 2, "{name}: chain of {}", chain.len());
        assert_eq!(pem_der(chain.last().unwrap()), root, "{name}: the chain does not end at the root");
    }
    let refused = |name: &str, code: &str, says: &str| {
        let (got, message) = get(name).err().unwrap_or_else(|| panic!("{name}: granted\n{}", logs(&c)));
        assert_eq!(got, code, "{name}: {message}");
        assert!(message.contains(says), "{name}: `{message}` does not say `{says}`");
    };
    refused("b1 by node-a", "PermissionDenied", "no pod with service account default/sa-b1 runs on node node-a");
    refused("no pod", "PermissionDenied", "no pod with service account default/sa-nobody");
    refused("a2 by a1", "PermissionDenied", "may get only its own identity");
    refused("forged", "Unauthenticated", "invalid bearer token");
    refused("expired", "Unauthenticated", "expired");
    refused("audience", "Unauthenticated", "audiences");
    refused("deleted pod", "Unauthenticated", "agent-gone");
    refused("no token", "Unauthenticated", "token");
    refused("second SAN", "InvalidArgument", "2 subject alternative names");
    refused("other SAN", "InvalidArgument", "is not the ImpersonatedIdentity");
    refused("weak key", "InvalidArgument", "1024 bits");
    refused("bad signature", "InvalidArgument", "signature");
    let (code, message) = get("1 MiB CSR").unwrap_err();
    assert!(
        code == "OutOfRange" || code == "ResourceExhausted" || code == "InvalidArgument",
        "1 MiB CSR: {code} {message}"
    );
    // Counted by reason, and logged.
    let metrics = c.ca_metrics(ca);
    for reason in
        ["no_pod_on_node", "not_authorized", "token_refused", "no_token", "bad_csr", "identity_mismatch", "bad_frame"]
    {
        assert!(
            metrics.contains(&format!("redirector_ca_requests_refused_total{{reason=\"{reason}\"}}")),
            "{reason} not counted: {metrics}"
        );
    }
    let log = std::fs::read_to_string(&c.ca_servers[ca].log).unwrap();
    assert!(log.contains("certificate refused"), "{log}");
    assert!(log.lines().any(|l| l.contains("certificate refused") && l.contains("bad_frame")), "{log}");
    assert!(eventually(Duration::from_secs(1), || api.token_reviews() > 0));
    // The three frames and the 1 MiB CSR (over the 64 KiB request limit).
    assert_eq!(c.ca_counter(ca, "redirector_ca_requests_refused_total{reason=\"bad_frame\"}"), 4, "{metrics}");

    // 10,000 requests at once from one node agent: the first ones are
    // served, the rest refused as rate limited, and another node's agent,
    // asking meanwhile, is served.
    let agent_b = std::fs::read_to_string(c.token_path(1)).unwrap();
    let (_k, csr) = redirector::identity::csr::new_key_and_csr(&id("sa-a1")).unwrap();
    let flood = IstioCertificateRequest::new(csr, Duration::from_hours(1), Some(&id("sa-a1")));
    let (granted, limited, other) = std::thread::scope(|s| {
        let flooding = s.spawn(|| {
            in_netns(&netns, |rt| {
                rt.block_on(async {
                    let ca = client_waiting(&c.ca_dir, vec![addr], Duration::from_mins(1));
                    let mut all = tokio::task::JoinSet::new();
                    for _ in 0..10_000 {
                        let (ca, token, req) = (ca.clone(), agent_a.clone(), flood.clone());
                        all.spawn(async move { ca.create_certificate(&token, req).await });
                    }
                    let (mut granted, mut limited) = (0, 0);
                    while let Some(a) = all.join_next().await {
                        match a.unwrap() {
                            Ok(_) => granted += 1,
                            Err(s) if format!("{:?}", s.code()) == "ResourceExhausted" => limited += 1,
                            Err(s) => panic!("a flood request failed otherwise: {s:?}"),
                        }
                    }
                    (granted, limited)
                })
            })
        });
        std::thread::sleep(Duration::from_millis(300));
        let other = in_netns(&ns_path(&c.nodes[1].ns), |rt| {
            let ca = rt.block_on(async { client(&c.ca_dir, vec![addr]) });
            ask(rt, &ca, &agent_b, request(&id("sa-b1"), Some(&id("sa-b1"))))
        });
        let (g, l) = flooding.join().unwrap();
        (g, l, other)
    });
    assert!(granted >= 100, "the flood's first requests must be served: {granted} granted, {limited} limited");
    assert!(limited >= 9_000, "the flood must be rate limited: {granted} granted, {limited} limited");
    assert_eq!(granted + limited, 10_000, "every request answered as granted or rate limited");
    assert!(other.is_ok(), "another node's agent must be served during the flood: {other:?}\n{}", logs(&c));
    let log = std::fs::read_to_string(&c.ca_servers[ca].log).unwrap();
    let lines = log.lines().filter(|l| l.contains("rate_limited") && l.contains("certificate refused")).count();
    assert!(lines < 1_000, "the flood's refusals flooded the log: {lines} lines");
}

/// Deliverable 3, root rotation: the trust bundle gains a new root beside
/// the old one, the CA moves to a key under the new root, and the agents
/// renew onto it at different moments. Throughout, a long-lived
/// connection a1 -> b1 keeps going, and new connections between a pod
/// still on the old root and one already on the new work: both roots are
/// trusted during the overlap.
#[test]
fn a_root_rotation_with_both_roots_in_the_bundle_loses_no_connection() {
    if !privileged() {
        return;
    }
    let (mut c, _api, kubeconfigs) = cluster("api");
    let before = c.launch().unwrap();
    let old = c.start_ca_server(0, &kubeconfigs[0], &["--max-cert-lifetime", "20s"]).unwrap();
    c.wait_served(&before).unwrap_or_else(|e| panic!("{e}\n{}", logs(&c)));
    let b1 = c.pod("b1").ip.clone();
    c.start_nginx("b1", 8080).unwrap();
    let mut open = c.long_lived_connection("a1", "b1", 7000).unwrap();
    let mut exchange = |c: &Cluster| open.exchange().unwrap_or_else(|e| panic!("{e}\n{}", logs(c)));
    exchange(&c);

    // The new root, and the bundle the agents read with both roots.
    let new_dir = c.dir.join("new-ca");
    assert!(std::process::Command::new(redirector_tests::redirector_bin())
        .args(["ca", "create"])
        .arg(&new_dir)
        .status()
        .unwrap()
        .success());
    let old_root = std::fs::read_to_string(c.ca_dir.join("root-cert.pem")).unwrap();
    let new_root = std::fs::read_to_string(new_dir.join("root-cert.pem")).unwrap();
    let bundle = c.ca_dir.join("root-cert.pem");
    std::fs::write(&bundle, format!("{old_root}{new_root}")).unwrap();
    for node in 0..2 {
        assert!(
            eventually(Duration::from_secs(10), || c
                .logged(node, "trust bundle changed")
                .iter()
                .any(|l| l["fields"]["roots"] == 2)),
            "node {node} did not take the two-root bundle\n{}",
            logs(&c)
        );
    }
    exchange(&c);

    // The CA moves to the new root's key (what a rollout of the CA's
    // Deployment with the new Secret does).
    let old_dir = std::mem::replace(&mut c.ca_dir, new_dir.clone());
    let new = c.start_ca_server(1, &kubeconfigs[1], &["--max-cert-lifetime", "20s"]).unwrap();
    c.stop_ca_server(old);
    let rotated = |c: &Cluster, node: usize| c.logged(node, "workload certificate rotated").len();
    let (r0, r1) = (rotated(&c, 0), rotated(&c, 1));
    // Renewals fall due within 10 s; each node's come at its own moment,
    // so for a while one side is on the new root and the other the old.
    let started = std::time::Instant::now();
    let mut mixed_ok = 0;
    while started.elapsed() < Duration::from_secs(13) {
        exchange(&c);
        let (code, err) = c.curl("a1", &format!("http://{b1}:8080/"));
        assert_eq!(code, 200, "a new connection during the overlap: {err}\n{}", logs(&c));
        mixed_ok += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(rotated(&c, 0) > r0 && rotated(&c, 1) > r1, "both nodes must renew from the new CA\n{}", logs(&c));
    assert!(c.ca_counter(new, "redirector_ca_certificates_issued_total") >= 2, "{}", c.ca_metrics(new));
    assert!(mixed_ok > 10);
    exchange(&c);
    // The old root leaves the bundle: everything now chains to the new.
    std::fs::write(&bundle, &new_root).unwrap();
    assert!(eventually(Duration::from_secs(10), || c
        .logged(1, "trust bundle changed")
        .iter()
        .any(|l| l["fields"]["roots"] == 1)));
    let (code, err) = c.curl("a1", &format!("http://{b1}:8080/"));
    assert_eq!(code, 200, "after the old root left the bundle: {err}\n{}", logs(&c));
    c.ca_dir = old_dir;
}
