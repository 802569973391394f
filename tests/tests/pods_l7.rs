//! Sidecar semantics for pods without sidecars: a pod's HTTP to an
//! HTTP-declared Service port is routed per request by its node's proxy
//! (the tutorial's path routing with rewrite, a canary split, header
//! routing, faults, retries), and every request that leaves the node
//! reaches the destination pod over HBONE with the source pod's identity.
//! Client a1 on node-a; httpbin in b1 (node-b) and a2 (same node). Every
//! test runs in eBPF and in iptables capture.

use std::path::Path;
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

in_both_modes!(the_tutorials_routing_works_between_pods);

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
    let body = c.dir.join(format!("curl-{pod}.body"));
    let mut all = vec!["-s", "--max-time", "60", "-o", body.to_str().unwrap(), "-w", "%{http_code}\\n"];
    all.extend_from_slice(args);
    let out = c.output(c.in_pod(pod, "curl", &all));
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
    let mut c = Cluster::new(mode).unwrap();
    let (b1, a2) = (c.pod("b1").ip.clone(), c.pod("a2").ip.clone());
    c.extra_yaml = services(&b1, &a2);
    c.start().unwrap();
    let v1 = c.start_httpbin("b1", 8000).unwrap();
    let v2 = c.start_httpbin("a2", 8000).unwrap();
    let logs = || format!("node-a: {}\n", std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default());

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
