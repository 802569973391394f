//! Sidecar semantics for pods without sidecars: a pod's HTTP to an
//! HTTP-declared Service port is routed per request by its node's proxy
//! (the tutorial's path routing with rewrite, a canary split, header
//! routing, faults, retries), and every request that leaves the node
//! reaches the destination pod over HBONE with the source pod's identity.
//! Client a1 on node-a; httpbin in b1 (node-b) and a2 (same node). Every
//! test runs in eBPF and in iptables capture, with certificates from the
//! CA service.

use std::path::{Path, PathBuf};
use std::time::Duration;

use redirector_tests::cluster::Cluster;
use redirector_tests::{eventually, httpbin_available, privileged};

macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod ebpf {
            $( #[test] fn $name() { if super::privileged() && super::httpbin_available() { super::$name("ebpf") } } )*
        }
        mod iptables {
            $( #[test] fn $name() { if super::privileged() && super::httpbin_available() { super::$name("iptables") } } )*
        }
    };
}

/// The isolation between namespaces is the proxy's (the capture mode only
/// brings the connection): one mode.
#[test]
fn a_namespace_cannot_take_another_namespaces_traffic_or_names() {
    if privileged() && httpbin_available() {
        namespaces_keep_their_traffic("ebpf");
    }
}

in_both_modes!(
    the_tutorials_routing_works_between_pods,
    the_gateway_reaches_a_strict_pod_over_hbone,
    breakers_outliers_hashing_and_delays_work_between_pods,
);

/// `api` (what the client calls) routes to `api-v1` (httpbin in b1, on the
/// other node) and `api-v2` (httpbin in a2, on the client's node).
const API: &str = "198.18.3.20";

fn services(b1: &str, a2: &str) -> String {
    let service = |name: &str, vip: &str, ip: Option<&str>| {
        let mut y = format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  ports: [{{name: http, port: 80, targetPort: 8000}}]\n"
        );
        if let Some(ip) = ip {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}, namespace: default}}\nsubsets:\n- addresses: [{{ip: {ip}}}]\n  ports: [{{name: http, port: 8000}}]\n"
            ));
        }
        y
    };
    let mut y = service("api", API, None);
    y.push_str(&service("api-v1", "198.18.3.21", Some(b1)));
    y.push_str(&service("api-v2", "198.18.3.22", Some(a2)));
    y.push_str(
        r"---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: default}
spec:
  hosts: [api]
  http:
  - match: [{uri: {prefix: /api/v1/}}]
    rewrite: {uri: /}
    route: [{destination: {host: api-v1}}]
  - match: [{uri: {prefix: /api/v2/}}]
    rewrite: {uri: /}
    route: [{destination: {host: api-v2}}]
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: api-v2}}]
  - match: [{uri: {prefix: /fault}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: api-v1}}]
  - match: [{uri: {exact: /flaky}}]
    rewrite: {uri: '/status/200:1,503:1'}
    retries: {attempts: 30, retryOn: 5xx}
    route: [{destination: {host: api-v1}}]
  - route:
    - {destination: {host: api-v1}, weight: 90}
    - {destination: {host: api-v2}, weight: 10}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-teapots, namespace: default}
spec:
  selector: {matchLabels: {app: b1}}
  action: DENY
  rules:
  - to: [{operation: {paths: [/status/418]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: read-only, namespace: default}
spec:
  selector: {matchLabels: {app: a2}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/sa-a1]}}]
    to: [{operation: {methods: [GET, HEAD]}}]
",
    );
    y
}

/// `curl` from a pod: status codes (one line each, for a URL glob) and
/// the last body.
fn curl(c: &Cluster, pod: &str, args: &[&str]) -> (Vec<u16>, String) {
    curl_in(c, pod, |all| c.in_pod(pod, "curl", all), args)
}

/// The same from a node's own network namespace (outside the mesh).
fn curl_node(c: &Cluster, node: usize, args: &[&str]) -> (Vec<u16>, String) {
    curl_in(c, &format!("node{node}"), |all| c.in_node(node, "curl", all), args)
}

fn curl_in(
    c: &Cluster,
    who: &str,
    command: impl Fn(&[&str]) -> std::process::Command,
    args: &[&str],
) -> (Vec<u16>, String) {
    let body = c.dir.join(format!("curl-{who}.body"));
    let _ = std::fs::remove_file(&body);
    let mut all = vec!["-s", "--max-time", "20", "-o", body.to_str().unwrap(), "-w", "%{http_code}\\n"];
    all.extend_from_slice(args);
    let out = c.output(command(&all));
    let codes = String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().parse().unwrap_or(0)).collect();
    (codes, std::fs::read_to_string(body).unwrap_or_default())
}

/// The lines of an httpbin access log (`METHOD PATH STATUS`).
fn served(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log).unwrap_or_default().lines().map(str::to_string).collect()
}

/// The sum of a metric's samples on a node whose label sets contain every
/// one of `labels`.
fn metric_sum(c: &Cluster, node: usize, name: &str, labels: &[&str]) -> f64 {
    c.metrics(node)
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

fn the_tutorials_routing_works_between_pods(mode: &'static str) {
    let mut c = Cluster::with_ca_service(mode).unwrap();
    let (b1, a2) = (c.pod("b1").ip.clone(), c.pod("a2").ip.clone());
    c.extra_yaml = services(&b1, &a2);
    c.start().unwrap();
    let v1 = c.start_httpbin("b1", 8000).unwrap();
    let v2 = c.start_httpbin("a2", 8000).unwrap();
    let logs = || format!("node-a: {}\n", std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default());

    // `proxy-config routes` says where the L7 decision is made: api's port
    // is L7 for every pod (its name), b1's port 8000 is L7 inbound.
    let out = c.output(c.in_node(
        1,
        redirector_tests::redirector_bin().to_str().unwrap(),
        &["--state-dir", c.nodes[1].state.to_str().unwrap(), "proxy-config", "routes"],
    ));
    let table = String::from_utf8_lossy(&out.stdout);
    let row = |dir: &str, workload: &str, service: &str| {
        table
            .lines()
            .find(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() > 3 && w[0] == dir && w[1] == workload && w[2] == service
            })
            .unwrap_or_else(|| panic!("no {dir} row for {workload} {service}:\n{table}"))
            .to_string()
    };
    assert!(
        table.lines().any(|l| l.starts_with("outbound")
            && l.contains("api.default.svc.cluster.local")
            && l.contains("L7")
            && l.contains("port name http")),
        "{table}"
    );
    let b1_row = row("inbound", "default/b1", "api-v1.default.svc.cluster.local");
    assert!(b1_row.contains("8000") && b1_row.contains("L7"), "{b1_row}");

    // Path routing with rewrite: /api/v1/... reaches b1 as /...; /api/v2/
    // reaches a2.
    let (codes, body) = curl(&c, "a1", &[&format!("http://{API}/api/v1/anything/one")]);
    assert_eq!(codes, [200], "{body}\n{}", logs());
    assert!(body.contains("\"url\": \"http://api/anything/one\"") || body.contains("/anything/one"), "{body}");
    assert!(eventually(Duration::from_secs(5), || served(&v1).iter().any(|l| l == "GET /anything/one 200")));
    let (codes, _) = curl(&c, "a1", &[&format!("http://{API}/api/v2/anything/two")]);
    assert_eq!(codes, [200], "{}", logs());
    assert!(eventually(Duration::from_secs(5), || served(&v2).iter().any(|l| l == "GET /anything/two 200")));

    // Header routing: end-user jason goes to v2.
    let (codes, _) = curl(&c, "a1", &["-H", "end-user: jason", &format!("http://{API}/headers")]);
    assert_eq!(codes, [200]);
    assert!(eventually(Duration::from_secs(5), || served(&v2).iter().any(|l| l == "GET /headers 200")));
    assert!(!served(&v1).iter().any(|l| l.starts_with("GET /headers")), "jason's request went to v1");

    // A port declared HTTP that carries something else: the pod gets a 400
    // and the connection closes (no hang), and the source node warns once
    // per pod and port, not once per connection.
    let not_http =
        format!("exec 3<>/dev/tcp/{API}/80 && printf 'SSH-2.0-OpenSSH_9.6\\r\\n\\r\\n' >&3 && timeout 5 cat <&3");
    for _ in 0..2 {
        let out = c.output(c.in_pod("a1", "bash", &["-c", &not_http]));
        let reply = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && reply.starts_with("HTTP/1.1 400"), "{reply}\n{}", logs());
    }
    let warned = || c.logged(0, "a connection to a port declared HTTP does not carry HTTP");
    assert!(eventually(Duration::from_secs(5), || !warned().is_empty()), "{}", logs());
    assert_eq!(warned().len(), 1, "{:?}", warned());
    assert_eq!(warned()[0]["fields"]["port"], 80, "{:?}", warned());

    // Abort fault: 418 from the source node, nothing reaches the pod.
    let (codes, _) = curl(&c, "a1", &[&format!("http://{API}/fault")]);
    assert_eq!(codes, [418]);
    assert!(!served(&v1).iter().any(|l| l.starts_with("GET /fault")));

    // Retries: httpbin answers 503 half the time; with 30 attempts on 5xx
    // every one of 20 requests succeeds, and httpbin did answer 503s.
    let (codes, _) = curl(&c, "a1", &[&format!("http://{API}/flaky?[1-20]")]);
    assert_eq!(codes, vec![200; 20], "{}", logs());
    assert!(eventually(Duration::from_secs(5), || served(&v1).iter().any(|l| l == "GET /status/200:1,503:1 503")));

    // A 90/10 canary over 1,000 requests on one keepalive connection:
    // each request is routed on its own.
    let (codes, _) = curl(&c, "a1", &[&format!("http://{API}/get?[1-1000]")]);
    assert_eq!(codes.len(), 1000);
    assert!(codes.iter().all(|&s| s == 200), "{:?}", codes.iter().filter(|&&s| s != 200).collect::<Vec<_>>());
    let count = |log: &Path| served(log).iter().filter(|l| *l == "GET /get 200").count();
    assert!(eventually(Duration::from_secs(10), || count(&v1) + count(&v2) == 1000));
    let to_v2 = count(&v2);
    // 100 expected; 60..140 is over six standard deviations wide.
    eprintln!("canary: v2 {to_v2}, v1 {}", count(&v1));
    assert!((60..=140).contains(&to_v2), "v2 got {to_v2} of 1,000 requests, v1 {}", count(&v1));

    // Destination-side L7 policy, per request, on the rewritten path: b1
    // denies /status/418 (a DENY by path), a2 allows only reads (an ALLOW
    // by method); both answer Envoy's 403.
    let (codes, body) = curl(&c, "a1", &[&format!("http://{API}/api/v1/status/418")]);
    assert_eq!((codes.as_slice(), body.as_str()), (&[403][..], "RBAC: access denied"), "{}", logs());
    assert!(!served(&v1).iter().any(|l| l.starts_with("GET /status/418")), "the denied request reached b1");
    let (codes, _) = curl(&c, "a1", &[&format!("http://{API}/api/v1/status/200")]);
    assert_eq!(codes, [200], "the DENY names one path only");
    let (codes, body) = curl(&c, "a1", &["-X", "POST", "-d", "x=1", &format!("http://{API}/api/v2/post")]);
    assert_eq!((codes.as_slice(), body.as_str()), (&[403][..], "RBAC: access denied"));
    let (codes, _) = curl(&c, "a1", &[&format!("http://{API}/api/v2/get")]);
    assert_eq!(codes, [200], "the ALLOW admits a1's GET");
    let denied = c.logged(1, "inbound request");
    assert!(
        denied.iter().any(|l| l["fields"]["response_code"] == 403
            && l["fields"]["path"] == "/status/418"
            && l["fields"]["peer_identity"] == "spiffe://cluster.local/ns/default/sa/sa-a1"
            && l["fields"]["reason"].as_str().unwrap_or_default().contains("no-teapots")),
        "{denied:?}"
    );

    // Requests to b1 crossed the nodes over HBONE with a1's identity: the
    // source counts them as mutual TLS to b1's principal, the destination
    // reports them from a1's principal.
    let a1_id = "spiffe://cluster.local/ns/default/sa/sa-a1";
    let b1_id = "spiffe://cluster.local/ns/default/sa/sa-b1";
    let mtls_to_b1 = metric_sum(
        &c,
        0,
        "istio_requests_total",
        &[
            "reporter=\"source\"",
            &format!("source_principal=\"{a1_id}\""),
            &format!("destination_principal=\"{b1_id}\""),
            "connection_security_policy=\"mutual_tls\"",
        ],
    );
    assert!(mtls_to_b1 >= 800.0, "requests to b1 over mTLS: {mtls_to_b1}\n{}", c.metrics(0));
    let at_b1 = |code: &str| {
        metric_sum(
            &c,
            1,
            "istio_requests_total",
            &[
                "reporter=\"destination\"",
                &format!("source_principal=\"{a1_id}\""),
                &format!("destination_principal=\"{b1_id}\""),
                "connection_security_policy=\"mutual_tls\"",
                "destination_service=\"api-v1.default.svc.cluster.local\"",
                "source_workload=\"a1\"",
                &format!("response_code=\"{code}\""),
            ],
        )
    };
    assert!(at_b1("200") >= 800.0, "node-b reported {} requests from a1:\n{}", at_b1("200"), c.metrics(1));
    assert_eq!(at_b1("403"), 1.0, "{}", c.metrics(1));
    // The source counts each request once, retries included (2 + 1 + 1 +
    // 20 + 1,000 + 4); the destination counts every attempt it served, so
    // more for the flaky route.
    let counted = metric_sum(&c, 0, "istio_requests_total", &["reporter=\"source\"", "source_workload=\"a1\""]);
    assert_eq!(counted, 1028.0, "{}", c.metrics(0));
    let attempts = metric_sum(&c, 1, "istio_requests_total", &["reporter=\"destination\"", "response_code=\"503\""]);
    assert!(attempts >= 1.0, "node-b served none of the retried 503s:\n{}", c.metrics(1));
}

/// The agent's ingress gateway reaches a STRICT pod over HBONE with its own
/// identity (`istio-ingressgateway` of the agent's namespace), which an
/// AuthorizationPolicy can name; it sets the edge headers as Envoy's
/// gateway does and drops a client's `x-forwarded-client-cert`. A plaintext
/// client outside the mesh is refused by the same pod. Its HTTPS server
/// takes the certificate from a `kind: Secret` document of the agent's
/// namespace (`credentialName`) and a rotated Secret in place; a server
/// whose Secret is not a TLS Secret is skipped, named, and the others serve.
fn the_gateway_reaches_a_strict_pod_over_hbone(mode: &'static str) {
    let mut c = Cluster::with_ca_service(mode).unwrap();
    let (b1, a2) = (c.pod("b1").ip.clone(), c.pod("a2").ip.clone());
    let gateway_id = "cluster.local/ns/istio-system/sa/istio-ingressgateway";
    let (cert1, key1) = certificate(&c.dir, "api.example.com", "one");
    let (cert2, key2) = certificate(&c.dir, "api.example.com", "two");
    let (web_cert, web_key) = certificate(&c.dir, "web.example.com", "web");
    let base = services(&b1, &a2)
        + &format!(
            r"---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: b1-strict, namespace: default}}
spec: {{selector: {{matchLabels: {{app: b1}}}}, mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: gateway-only, namespace: default}}
spec:
  selector: {{matchLabels: {{app: b1}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [{gateway_id}]}}}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: api-gateway, namespace: default}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 8081, name: http, protocol: HTTP}}
    hosts: [api.example.com]
  - port: {{number: 8443, name: https, protocol: HTTPS}}
    hosts: [api.example.com]
    tls: {{mode: SIMPLE, credentialName: api-cert}}
  - port: {{number: 8443, name: https-web, protocol: HTTPS}}
    hosts: [web.example.com]
    tls: {{mode: SIMPLE, credentialName: web-cert}}
  - port: {{number: 8444, name: https-admin, protocol: HTTPS}}
    hosts: [api.example.com]
    tls: {{mode: SIMPLE, credentialName: admin-cert}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec: {{clusterIP: 198.18.3.23, ports: [{{name: http, port: 80, targetPort: 8000}}]}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: empty, namespace: default}}
spec:
  hosts: [empty]
  http:
  - route: [{{destination: {{host: empty}}}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: admin-cert, namespace: istio-system}}
type: Opaque
stringData: {{password: hunter2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api-edge, namespace: default}}
spec:
  hosts: [api.example.com]
  gateways: [api-gateway]
  http:
  - route: [{{destination: {{host: api-v1}}}}]
"
        );
    let base = base + &tls_secret("web-cert", &web_cert, &web_key);
    c.extra_yaml = base.clone() + &tls_secret("api-cert", &cert1, &key1);
    c.start().unwrap();
    let v1 = c.start_httpbin("b1", 8000).unwrap();
    let v2 = c.start_httpbin("a2", 8000).unwrap();
    let logs = || {
        format!(
            "node-a: {}\nnode-b: {}",
            std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default(),
            std::fs::read_to_string(&c.nodes[1].log).unwrap_or_default()
        )
    };
    // Through node-a's gateway, from node-a's own namespace (httpbin
    // shows the forwarding headers only with show_env).
    let (codes, body) = curl_node(
        &c,
        0,
        &[
            "-H",
            "Host: api.example.com",
            "-H",
            "X-Forwarded-Client-Cert: By=spiffe://cluster.local/ns/default/sa/admin",
            "http://127.0.0.1:8081/headers?show_env=1",
        ],
    );
    assert_eq!(codes, [200], "{body}\n{}", logs());
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let h = &seen["headers"];
    assert_eq!(h["X-Forwarded-Proto"], "http", "{body}");
    assert!(h["X-Forwarded-For"].as_str().is_some_and(|x| x.ends_with("127.0.0.1")), "{body}");
    assert_eq!(h["X-Request-Id"].as_str().map(str::len), Some(36), "{body}");
    assert!(h.get("X-Forwarded-Client-Cert").is_none(), "the client's XFCC reached the pod: {body}");
    assert!(eventually(Duration::from_secs(5), || served(&v1).iter().any(|l| l == "GET /headers 200")));
    // b1 reported it from the gateway's identity, over mTLS.
    let m = c.metrics(1);
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("reporter=\"destination\"")
            && l.contains(&format!("source_principal=\"spiffe://{gateway_id}\""))
            && l.contains("connection_security_policy=\"mutual_tls\"")
            && l.contains("response_code=\"200\"")),
        "{m}"
    );
    // A pod that is not the gateway is not allowed by b1's policy; a
    // plaintext client outside the mesh is refused by STRICT.
    let (codes, body) = curl(&c, "a1", &[&format!("http://{API}/api/v1/get")]);
    assert_eq!((codes.as_slice(), body.as_str()), (&[403][..], "RBAC: access denied"));
    // Bad input from a pod: a VirtualService whose destination has no
    // endpoints answers 503 UH; a request head over 60 KiB gets 431; the
    // pod's next request is served.
    let (codes, _) = curl(&c, "a1", &["http://198.18.3.23/get"]);
    assert_eq!(codes, [503], "{}", logs());
    assert_eq!(
        metric_sum(
            &c,
            0,
            "istio_requests_total",
            &["reporter=\"source\"", "response_flags=\"UH\"", "response_code=\"503\""]
        ),
        1.0,
        "{}",
        c.metrics(0)
    );
    let big = format!("X-Big: {}", "a".repeat(70 * 1024));
    let (codes, _) = curl(&c, "a1", &["-H", &big, &format!("http://{API}/api/v2/get")]);
    assert_eq!(codes, [431], "{}", logs());
    let (codes, _) = curl(&c, "a1", &[&format!("http://{API}/api/v2/get")]);
    assert_eq!(codes, [200], "{}", logs());
    assert!(eventually(Duration::from_secs(5), || served(&v2) == ["GET /get 200"]), "{:?}", served(&v2));
    let (codes, _) = curl_node(&c, 0, &[&format!("http://{b1}:8000/get")]);
    assert_eq!(codes, [0], "a plaintext client reached the STRICT pod");
    assert!(eventually(Duration::from_secs(5), || c
        .logged(1, "connection denied by policy")
        .iter()
        .any(|l| l["fields"]["reason"].as_str().is_some_and(|r| r.contains("STRICT")))));

    // HTTPS with the certificate of Secret istio-system/api-cert.
    let https = |ca: &Path| {
        let ca = ca.to_str().unwrap().to_string();
        curl_node(
            &c,
            0,
            &[
                "--cacert",
                &ca,
                "--resolve",
                "api.example.com:8443:127.0.0.1",
                "https://api.example.com:8443/headers?show_env=1",
            ],
        )
    };
    let (codes, body) = https(&cert1);
    assert_eq!(codes, [200], "{body}\n{}", logs());
    assert!(body.contains("\"X-Forwarded-Proto\": \"https\""), "{body}");
    assert!(
        c.logged(0, "mesh config").iter().any(|l| l["fields"]["problem"].as_str().is_some_and(|p| p.contains(
            "spec.servers[3].tls.credentialName: Secret istio-system/admin-cert is not a TLS Secret (type Opaque"
        ))),
        "{}",
        logs()
    );
    // The same port, another server: its own certificate, by SNI (no
    // VirtualService takes web.example.com, so the gateway answers 404).
    let web_ca = web_cert.to_str().unwrap().to_string();
    let (codes, _) = curl_node(
        &c,
        0,
        &["--cacert", &web_ca, "--resolve", "web.example.com:8443:127.0.0.1", "https://web.example.com:8443/"],
    );
    assert_eq!(codes, [404], "{}", logs());
    let (codes, _) = curl_node(&c, 0, &["-k", "https://127.0.0.1:8444/"]);
    assert_eq!(codes, [0], "the server whose Secret is not TLS listens");
    // Rotation: the new Secret is served by the same listener.
    c.write_mesh(0, &(c.mesh_yaml().replace(&c.extra_yaml, "") + &base + &tls_secret("api-cert", &cert2, &key2)));
    assert!(
        eventually(Duration::from_secs(10), || https(&cert2).0 == [200]),
        "the rotated certificate is not served: {}",
        logs()
    );
    assert_eq!(https(&cert1).0, [0], "the old certificate is still served");
    assert_eq!(c.logged(0, "gateway certificate updated").len(), 1, "{}", logs());
    assert!(
        !c.logged(0, "gateway listener closed").iter().any(|l| l["fields"]["port"] == 8443),
        "the listener was reopened instead: {}",
        logs()
    );
}

/// A self-signed certificate and key for `host`, files in `dir`.
fn certificate(dir: &Path, host: &str, tag: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join(format!("{tag}.crt")), dir.join(format!("{tag}.key")));
    let st = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", &format!("/CN={host}"), "-addext", &format!("subjectAltName=DNS:{host}"), "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    (cert, key)
}

/// A `kubernetes.io/tls` Secret document of the agent's namespace, as
/// users write one (`stringData`).
fn tls_secret(name: &str, cert: &Path, key: &Path) -> String {
    let indent =
        |p: &Path| std::fs::read_to_string(p).unwrap().lines().flat_map(|l| ["    ", l, "\n"]).collect::<String>();
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: istio-system}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(cert),
        indent(key)
    )
}

/// A Service (http port 80 to 8000) with Endpoints at `ips`.
fn service_at(name: &str, vip: &str, ips: &[&str]) -> String {
    let addresses: Vec<String> = ips.iter().map(|ip| format!("{{ip: {ip}}}")).collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  ports: [{{name: http, port: 80, targetPort: 8000}}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}, namespace: default}}\nsubsets:\n- addresses: [{}]\n  ports: [{{name: http, port: 8000}}]\n",
        addresses.join(", ")
    )
}

/// DestinationRule traffic policies for pods, at the source node: a
/// circuit breaker (503 UO over maxConnections + http1MaxPendingRequests),
/// outlier detection ejecting a failing pod and taking it back, consistent
/// hashing on a header, and a delay fault.
fn breakers_outliers_hashing_and_delays_work_between_pods(mode: &'static str) {
    let mut c = Cluster::with_ca_service(mode).unwrap();
    let (b1, b2, a2) = (c.pod("b1").ip.clone(), c.pod("b2").ip.clone(), c.pod("a2").ip.clone());
    c.extra_yaml = service_at("slow", "198.18.3.31", &[&b1])
        + &service_at("pool", "198.18.3.32", &[&b1, &b2])
        + &service_at("sticky", "198.18.3.33", &[&b1, &a2])
        + r"---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: slow, namespace: default}
spec:
  host: slow
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pool, namespace: default}
spec:
  host: pool
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 4s, maxEjectionPercent: 50}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: sticky, namespace: default}
spec:
  host: sticky
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: slow, namespace: default}
spec:
  hosts: [slow]
  http:
  - match: [{uri: {prefix: /slowly}}]
    fault: {delay: {fixedDelay: 1s, percentage: {value: 100}}}
    rewrite: {uri: /get}
    route: [{destination: {host: slow}}]
  - route: [{destination: {host: slow}}]
";
    c.start().unwrap();
    // b2 runs nothing on 8000: every connection to it fails.
    let v1 = c.start_httpbin("b1", 8000).unwrap();
    let v2 = c.start_httpbin("a2", 8000).unwrap();
    let logs = || format!("node-a: {}", std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default());

    // Circuit breaking: eight requests at once that each take a second,
    // against one connection and one pending request.
    let (codes, _) = curl(&c, "a1", &["--parallel", "--parallel-max", "8", "http://198.18.3.31/delay/1?[1-8]"]);
    assert_eq!(codes.len(), 8, "{codes:?}");
    let overflow = codes.iter().filter(|&&s| s == 503).count();
    assert!(overflow >= 1 && codes.contains(&200), "{codes:?}\n{}", logs());
    assert!(eventually(Duration::from_secs(5), || c
        .logged(0, "request")
        .iter()
        .any(|l| l["fields"]["response_flags"] == "UO" && l["fields"]["response_code"] == 503)));

    // A delay fault: the source node holds the request for a second.
    let t = std::time::Instant::now();
    let (codes, _) = curl(&c, "a1", &["http://198.18.3.31/slowly"]);
    assert_eq!(codes, [200]);
    assert!(t.elapsed() >= Duration::from_secs(1), "the delay was not applied: {:?}", t.elapsed());
    assert!(c.logged(0, "request").iter().any(|l| l["fields"]["response_flags"] == "DI"));

    // Consistent hashing on x-user: twenty requests of one user land on
    // one pod.
    let (codes, _) = curl(&c, "a1", &["-H", "x-user: alice", "http://198.18.3.33/anything/alice?[1-20]"]);
    assert_eq!(codes, vec![200; 20]);
    let count = |log: &Path| served(log).iter().filter(|l| *l == "GET /anything/alice 200").count();
    assert!(eventually(Duration::from_secs(5), || count(&v1) + count(&v2) == 20));
    assert!(count(&v1) == 20 || count(&v2) == 20, "alice was split: b1 {} a2 {}", count(&v1), count(&v2));

    // Outlier detection: b2 fails, is ejected, and every request then
    // goes to b1; after baseEjectionTime it is taken back.
    let (codes, _) = curl(&c, "a1", &["http://198.18.3.32/anything/pool?[1-10]"]);
    assert!(codes.iter().filter(|&&s| s == 200).count() >= 8, "{codes:?}");
    let health = |want: &str| {
        let out = c.output(c.in_node(
            0,
            redirector_tests::redirector_bin().to_str().unwrap(),
            &["--state-dir", c.nodes[0].state.to_str().unwrap(), "proxy-config", "endpoints"],
        ));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(b2.as_str()) && l.contains(want) && l.contains("pool.default"))
    };
    assert!(health("EJECTED"), "b2 is not ejected\n{}", logs());
    let (codes, _) = curl(&c, "a1", &["http://198.18.3.32/anything/pool?[1-10]"]);
    assert_eq!(codes, vec![200; 10], "an ejected pod was still chosen");
    assert!(eventually(Duration::from_secs(10), || health("HEALTHY")), "b2 never came back");
}

/// A DNS query for `name` (type A) to the pod's DNS proxy on 127.0.0.1:15053;
/// the IPv4 addresses answered (empty: none, or no mesh answer in time).
fn mesh_dns(c: &Cluster, pod: &str, name: &str) -> Vec<String> {
    let script = r#"
import socket, struct, sys
name = sys.argv[1]
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(q, ("127.0.0.1", 15053))
try:
    r = s.recv(4096)
except socket.timeout:
    sys.exit(0)
an = struct.unpack(">H", r[6:8])[0]
i = len(q)
for _ in range(an):
    i += 2 if r[i] & 0xC0 == 0xC0 else r.index(b"\0", i) + 1 - i
    t, _, _, l = struct.unpack(">HHIH", r[i:i + 10])
    i += 10
    if t == 1:
        print(".".join(str(b) for b in r[i:i + 4]))
    i += l
"#;
    let out = c.output(c.in_pod(pod, "python3", &["-c", script, name]));
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// H5: pod a2 is in namespace `evil`, a1 in `default`. `evil` routes
/// `default`'s `web` to its own `sink`, once kept to itself (`exportTo:
/// .`) and once exported (Istio's default) but newer than `default`'s own
/// VirtualService; it binds `*` to the mesh, writes a DestinationRule for
/// `web` and a ServiceEntry it keeps to itself. `default`'s client still
/// reaches `web` and cannot resolve evil's name; evil's own client sees
/// what evil configured; the `*` is rejected, the DestinationRule ignored.
fn namespaces_keep_their_traffic(mode: &'static str) {
    let mut c = Cluster::with_ca_service(mode).unwrap();
    c.pods[1].namespace = "evil".into();
    let (b1, b2) = (c.pod("b1").ip.clone(), c.pod("b2").ip.clone());
    let web = service_at("web", "198.18.3.50", &[&b1]);
    let sink = service_at("sink", "198.18.3.51", &[&b2]).replace("namespace: default", "namespace: evil");
    let take = |name: &str, export: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: evil}}\nspec:\n  hosts: [web.default.svc.cluster.local]\n{export}  http: [{{route: [{{destination: {{host: sink.evil.svc.cluster.local}}}}]}}]\n"
        )
    };
    c.extra_yaml = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: evil, labels: {istio-injection: enabled}}\n"
        .to_string()
        + &web
        + &sink
        + &take("keep-to-itself", "  exportTo: ['.']\n")
        + &take("exported", "")
        + r"---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http: [{route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: evil}
spec:
  host: web.default.svc.cluster.local
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: evil}
spec:
  hosts: [api.example.com]
  addresses: [240.0.0.9]
  ports: [{number: 443, name: tls}]
  resolution: STATIC
  endpoints: [{address: 198.18.9.9}]
  exportTo: ['.']
";
    c.start().unwrap();
    let (web_log, sink_log) = (c.start_httpbin("b1", 8000).unwrap(), c.start_httpbin("b2", 8000).unwrap());
    let logs = || format!("node-a: {}\n", std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default());

    let (codes, _) = curl(&c, "a1", &["http://198.18.3.50/anything/from-default-[1-5]"]);
    assert_eq!(codes, [200; 5], "{}", logs());
    assert_eq!(served(&web_log).iter().filter(|l| l.contains("from-default")).count(), 5, "{}", logs());
    assert!(!served(&sink_log).iter().any(|l| l.contains("from-default")), "evil took default's traffic");
    // evil's own client: evil's routes, its own first.
    let (codes, _) = curl(&c, "a2", &["http://198.18.3.50/anything/from-evil"]);
    assert_eq!(codes, [200], "{}", logs());
    assert!(
        eventually(Duration::from_secs(3), || served(&sink_log).iter().any(|l| l.contains("from-evil"))),
        "{}",
        logs()
    );

    // evil adds a VirtualService for `*` bound to the mesh: that object
    // is rejected, the rest applies, and default's client is unmoved.
    let everything = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: everything, namespace: evil}\nspec:\n  hosts: ['*']\n  tcp: [{route: [{destination: {host: sink.evil.svc.cluster.local}}]}]\n";
    c.write_mesh(0, &(c.mesh_yaml() + everything));
    let rejected = |c: &Cluster| {
        c.logged(0, "object rejected").iter().any(|l| {
            l["fields"]["problem"]
                .as_str()
                .is_some_and(|p| p.contains("evil/everything") && p.contains("`*` is not allowed"))
        })
    };
    assert!(eventually(Duration::from_secs(10), || rejected(&c)), "{}", logs());
    let (codes, _) = curl(&c, "a1", &["http://198.18.3.50/anything/from-default-again"]);
    assert_eq!(codes, [200], "{}", logs());
    assert!(served(&web_log).iter().any(|l| l.contains("from-default-again")), "{}", logs());
    assert!(
        c.logged(0, "mesh config")
            .iter()
            .any(|l| l["fields"]["problem"].as_str().is_some_and(|p| p.contains("evil/web") && p.contains("ignored"))),
        "{}",
        logs()
    );
    // default's pod does not get evil's name; evil's does.
    assert!(!mesh_dns(&c, "a1", "api.example.com").contains(&"240.0.0.9".to_string()));
    assert_eq!(mesh_dns(&c, "a2", "api.example.com"), ["240.0.0.9"], "{}", logs());
}
