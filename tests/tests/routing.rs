//! Mesh routing through the real capture path: an enrolled, unmodified
//! HTTP client, the agent applying Istio YAML from a watched directory, and
//! httpbin (from PyPI, under gunicorn) as the backend, one instance per
//! subset. Which instance served a request is read from its access log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use redirector_tests::*;
use serde_json::Value;

const SVC_IP: &str = "198.19.0.10";
const SVC_PORT: u16 = 8000;

/// The Service, its two workloads (v1 on SERVER_V4, v2 on SERVER_V4_B) and
/// the subsets.
fn base_yaml() -> String {
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: httpbin, namespace: default}}
spec:
  clusterIP: {SVC_IP}
  selector: {{app: httpbin}}
  ports:
  - {{name: http, port: {SVC_PORT}, targetPort: 8080}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: httpbin-v1, namespace: default}}
spec: {{address: {SERVER_V4}, labels: {{app: httpbin, version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: httpbin-v2, namespace: default}}
spec: {{address: {SERVER_V4_B}, labels: {{app: httpbin, version: v2}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: httpbin, namespace: default}}
spec:
  host: httpbin
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
"
    )
}

struct Mesh {
    t: Topology,
    dir: PathBuf,
    v1: PathBuf,
    v2: PathBuf,
}

/// A topology with both httpbin instances and the agent routing by `vs`.
fn mesh(mode: &'static str, vs: &str) -> Option<Mesh> {
    start_mesh(mode, true, true, vs)
}

/// The Service and its workloads, httpbin v1 (and v2 when `v2`), the base
/// DestinationRule when `base_rule`, `extra` YAML, and the agent. Without
/// `v2`, v2's address has nothing listening (its log path is still set).
fn start_mesh(mode: &'static str, v2: bool, base_rule: bool, extra: &str) -> Option<Mesh> {
    if !privileged() || !httpbin_available() {
        return None;
    }
    let mut t = Topology::with_mode(mode).unwrap();
    t.route_service_range().unwrap();
    let v1 = t.start_httpbin("httpbin-v1", SERVER_V4, 8080).unwrap();
    let v2 = if v2 {
        t.start_httpbin("httpbin-v2", SERVER_V4_B, 8080).unwrap()
    } else {
        t.state.parent().unwrap().join("httpbin-v2.access.log")
    };
    let dir = t.state.parent().unwrap().join("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    let base = base_yaml();
    let base = if base_rule {
        base
    } else {
        base.split("---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule").next().unwrap().to_string()
    };
    std::fs::write(dir.join("base.yaml"), base).unwrap();
    std::fs::write(dir.join("vs.yaml"), extra).unwrap();
    t.config_dir = Some(dir.clone());
    t.start_agent("").unwrap();
    Some(Mesh { t, dir, v1, v2 })
}

fn client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/http_client.py")
}

/// Run the keep-alive client as an enrolled workload; returns its report.
fn requests(m: &Mesh, path: &str, extra: &str) -> Value {
    let out = m.t.exec_workload(
        "client",
        &format!("python3 {} {SVC_IP} {SVC_PORT} '{path}' {extra}", client_script().display()),
    );
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

fn count(report: &Value, status: &str) -> u64 {
    report["counts"][status].as_u64().unwrap_or(0)
}

fn served(log: &Path) -> usize {
    settled_line_count(log)
}

const PATH_ROUTING: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: default}
spec:
  hosts: [httpbin]
  http:
  - match: [{uri: {prefix: /api/v1/}}]
    rewrite: {uri: /}
    route: [{destination: {host: httpbin, subset: v1}}]
  - match: [{uri: {prefix: /api/v2/}}]
    rewrite: {uri: /}
    route: [{destination: {host: httpbin, subset: v2}}]
  - match: [{headers: {x-canary: {exact: "true"}}}]
    route: [{destination: {host: httpbin, subset: v2}}]
  - match: [{uri: {prefix: /status/}}, {uri: {exact: /get}}, {uri: {prefix: /headers}}]
    headers: {request: {set: {x-mesh: redirector}}}
    route:
    - {destination: {host: httpbin, subset: v1}, weight: 90}
    - {destination: {host: httpbin, subset: v2}, weight: 10}
"#;

fn path_header_and_weight_routing(mode: &'static str) {
    let Some(m) = mesh(mode, PATH_ROUTING) else { return };

    let r = requests(&m, "/api/v1/status/200", "--count 20");
    assert_eq!(count(&r, "200"), 20, "{r}");
    assert_eq!((served(&m.v1), served(&m.v2)), (20, 0), "/api/v1 goes to v1, rewritten");

    let r = requests(&m, "/api/v2/get", "--count 20");
    assert_eq!(count(&r, "200"), 20, "{r}");
    assert_eq!((served(&m.v1), served(&m.v2)), (20, 20), "/api/v2 goes to v2");

    let r = requests(&m, "/get", "--count 20 --header x-canary=true");
    assert_eq!(count(&r, "200"), 20, "{r}");
    assert_eq!((served(&m.v1), served(&m.v2)), (20, 40), "the header routes to v2");

    let r = requests(&m, "/headers", "--count 1 --body-of-first");
    assert!(r["first_body"].as_str().unwrap().contains("\"X-Mesh\": \"redirector\""), "{r}");

    // No rule matches: 404 from the proxy, nothing reaches httpbin.
    let (b1, b2) = (served(&m.v1), served(&m.v2));
    let r = requests(&m, "/anything/else", "--count 3");
    assert_eq!(count(&r, "404"), 3, "{r}");
    assert_eq!((served(&m.v1), served(&m.v2)), (b1, b2));

    // 90/10 over 1,000 requests: v2's share within 6-14% (±4 standard
    // deviations of a binomial with p = 0.1).
    let r = requests(&m, "/status/200", "--count 1000");
    assert_eq!(count(&r, "200"), 1000, "{r}");
    let v2 = served(&m.v2) - b2;
    let v1 = served(&m.v1) - b1;
    assert_eq!(v1 + v2, 1000);
    assert!((60..=140).contains(&v2), "v2 served {v2} of 1000 (expected about 100)");

    // The access log names the route and the response flags.
    let log = std::fs::read_to_string(&m.t.log).unwrap();
    assert!(log.contains("\"response_flags\":\"NR\""), "no NR in the access log");
}

#[test]
fn path_header_and_weight_routing_with_ebpf_capture() {
    path_header_and_weight_routing("ebpf");
}

#[test]
fn path_header_and_weight_routing_with_iptables_capture() {
    path_header_and_weight_routing("iptables");
}

#[test]
fn abort_and_delay_faults_and_retries() {
    let vs = r"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: default}
spec:
  hosts: [httpbin.default.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /abort/}}]
    rewrite: {uri: /}
    fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
    route: [{destination: {host: httpbin, subset: v1}}]
  - match: [{uri: {prefix: /forbidden/}}]
    fault: {abort: {httpStatus: 403, percentage: {value: 100}}}
    route: [{destination: {host: httpbin, subset: v1}}]
  - match: [{uri: {exact: /slow}}]
    rewrite: {uri: /get}
    fault: {delay: {fixedDelay: 400ms, percentage: {value: 100}}}
    route: [{destination: {host: httpbin, subset: v1}}]
  - match: [{uri: {prefix: /retried/}}]
    rewrite: {uri: /}
    retries: {attempts: 10, retryOn: 5xx}
    route: [{destination: {host: httpbin, subset: v2}}]
  - match: [{uri: {prefix: /unretried/}}]
    rewrite: {uri: /}
    retries: {attempts: 0}
    route: [{destination: {host: httpbin, subset: v2}}]
";
    let Some(m) = mesh("ebpf", vs) else { return };

    // Abort at 50%: within 35-65% of 400 (±6 standard deviations); the
    // aborted ones never reach httpbin.
    let r = requests(&m, "/abort/status/200", "--count 400");
    let (aborted, ok) = (count(&r, "503"), count(&r, "200"));
    assert_eq!(aborted + ok, 400, "{r}");
    assert!((140..=260).contains(&aborted), "{aborted} of 400 aborted");
    assert_eq!(served(&m.v1) as u64, ok);

    // An abort answers before the request body is read. A plain client
    // that sends a 512 KiB body without waiting for 100-continue still
    // gets the 403 (a connection closed with unread bytes is reset, and
    // the reset can take the response with it).
    let script = format!(
        "exec 3<>/dev/tcp/{SVC_IP}/{SVC_PORT}; \
         {{ printf 'POST /forbidden/post HTTP/1.1\\r\\nHost: httpbin\\r\\nContent-Length: 524288\\r\\n\\r\\n'; \
            head -c 524288 /dev/zero; }} >&3; \
         timeout 5 cat <&3 | head -1"
    );
    for _ in 0..3 {
        let out = m.t.exec_workload("uploader", &script);
        let line = String::from_utf8_lossy(&out.stdout);
        assert!(line.starts_with("HTTP/1.1 403"), "{out:?}");
    }

    // A fixed delay of 400 ms on every request.
    let r = requests(&m, "/slow", "--count 3");
    assert_eq!(count(&r, "200"), 3, "{r}");
    assert!(r["seconds"].as_f64().unwrap() >= 1.2, "{r}");

    // httpbin answers 503 one time in four here. Without retries about a
    // quarter fail; with 10 retries on 5xx every request succeeds, and
    // httpbin saw the extra attempts.
    let r = requests(&m, "/unretried/status/200:3,503:1", "--count 200");
    assert!(count(&r, "503") >= 20, "{r}");
    let before = served(&m.v2);
    let r = requests(&m, "/retried/status/200:3,503:1", "--count 200");
    assert_eq!(count(&r, "200"), 200, "{r}");
    assert!(served(&m.v2) - before > 200, "no retry reached httpbin");
}

#[test]
fn a_config_change_under_steady_load_fails_no_request_and_a_bad_one_is_rejected() {
    let to = |subset: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: httpbin, namespace: default}}\nspec:\n  hosts: [httpbin]\n  http:\n  - route: [{{destination: {{host: httpbin, subset: {subset}}}}}]\n"
        )
    };
    let Some(m) = mesh("ebpf", &to("v1")) else { return };
    let child =
        m.t.redirector()
            .args(["exec", "--workload", "load", "--", "python3"])
            .arg(client_script())
            .args([SVC_IP, &SVC_PORT.to_string(), "/get", "--seconds", "6"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // Under load the logs never settle: plain counts here.
    assert!(line_count(&m.v1) > 0 && line_count(&m.v2) == 0);
    std::fs::write(m.dir.join("vs.yaml"), to("v2")).unwrap();
    assert!(eventually(Duration::from_secs(3), || line_count(&m.v2) > 0), "the change was not applied");
    // A bad change to the VirtualService: that change is rejected, the
    // object's last accepted version (v2) stays in force.
    std::fs::write(m.dir.join("vs.yaml"), to("v9")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let out = child.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let total: u64 = r["counts"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(count(&r, "200"), total, "a request failed during the changes: {r}");
    let log = std::fs::read_to_string(&m.t.log).unwrap();
    assert!(log.contains("mesh config applied"));
    assert!(
        log.lines().any(|l| l.contains("object rejected; the rest of the config applies")
            && l.contains("subset `v9`")
            && l.contains("its last accepted version stays in force")),
        "{log}"
    );
    let v2_before = served(&m.v2);
    let r = requests(&m, "/get", "--count 10");
    assert_eq!(count(&r, "200"), 10);
    assert_eq!(served(&m.v2), v2_before + 10, "the last good config (v2) stays in force");
}

#[test]
fn a_tcp_service_is_routed_to_its_endpoints() {
    if !privileged() {
        return;
    }
    let mut t = Topology::new().unwrap();
    t.route_service_range().unwrap();
    let peers = t.server(&format!("{SERVER_V4_B}:9000"));
    let dir = t.state.parent().unwrap().join("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("tcp.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: echo}}\nspec:\n  clusterIP: 198.19.0.20\n  ports: [{{name: tcp-echo, port: 7000, targetPort: 9000}}, {{port: 7001, targetPort: 9000}}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: echo}}\nsubsets:\n- addresses: [{{ip: {SERVER_V4_B}}}]\n  ports: [{{name: tcp-echo, port: 9000}}, {{name: '', port: 9000}}]\n"
        ),
    )
    .unwrap();
    t.config_dir = Some(dir);
    t.start_agent("").unwrap();
    let out = t.exec_workload("app", &bash_connect("198.19.0.20", 7000));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(peers.lock().unwrap().len(), 1, "the service's endpoint answered");
    // A port without a name or appProtocol: the first bytes decide. HTTP is
    // routed per request (an access log line); anything else is TCP.
    let out = t.exec_workload("sniff", "curl -sS -m 5 -o /dev/null -w '%{http_code}' http://198.19.0.20:7001/");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
    let out = t.exec_workload("sniff", &bash_connect("198.19.0.20", 7001));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(peers.lock().unwrap().len(), 3);
    let log = std::fs::read_to_string(&t.log).unwrap();
    assert_eq!(
        log.matches("\"original_dst\":\"198.19.0.20:7001\",\"method\":\"GET\"").count(),
        1,
        "one HTTP request line"
    );
    let series = "destination_service=\"echo.default.svc.cluster.local\"";
    assert!(eventually(Duration::from_secs(5), || {
        let text = local_get(&t, "http://127.0.0.1:15020/metrics");
        // The two TCP connections (the sniffed HTTP one is counted as requests).
        metric_sum(&text, "istio_tcp_connections_opened_total", &[series]) == 2.0
            && metric_sum(&text, "istio_tcp_connections_closed_total", &[series]) == 2.0
            && metric_sum(&text, "istio_tcp_sent_bytes_total", &[series]) > 0.0
    }));
}

#[test]
fn a_bad_mesh_config_fails_the_start_naming_file_and_field() {
    if !privileged() {
        return;
    }
    let t = Topology::new().unwrap();
    let dir = t.state.parent().unwrap().join("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("vs.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: nowhere}}]\n",
    )
    .unwrap();
    let out = t
        .redirector()
        .args(["run", "--cgroup"])
        .arg(&t.cgroup)
        .arg("--bpffs-dir")
        .arg(&t.bpffs)
        .arg("--config-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    for s in ["vs.yaml, document 1 (VirtualService x)", "spec.http[0].route[0].destination.host", "unknown host"] {
        assert!(lines[0].contains(s), "`{s}` not in {err}");
    }
    assert!(attached_programs(&t.cgroup).is_empty());
    assert!(!t.bpffs.exists());
}

#[test]
fn circuit_breaking_sends_overflow_a_503_with_flag_uo() {
    let dr = r"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: default}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
  subsets:
  - {name: v1, labels: {version: v1}}
";
    let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: httpbin, namespace: default}\nspec:\n  hosts: [httpbin]\n  http:\n  - route: [{destination: {host: httpbin, subset: v1}}]\n";
    let Some(Mesh { t, v1, .. }) = start_mesh("ebpf", false, false, &format!("{dr}{vs}")) else { return };
    // Six clients at once, each one request that takes a second: one in
    // flight, one waiting, the rest overflow at once.
    let script = format!(
        "for i in 1 2 3 4 5 6; do python3 {} {SVC_IP} {SVC_PORT} /delay/1 --count 1 & done; wait",
        client_script().display()
    );
    let out = t.exec_workload("burst", &script);
    assert!(out.status.success(), "{out:?}");
    let mut ok = 0;
    let mut overflow = 0;
    // One report per client; six processes share the pipe, so read them
    // as a stream of JSON values rather than trusting line boundaries.
    let stdout = String::from_utf8_lossy(&out.stdout);
    for r in serde_json::Deserializer::from_str(&stdout).into_iter::<Value>() {
        let r = r.unwrap_or_else(|e| panic!("a client's report does not parse ({e}): {stdout}"));
        ok += count(&r, "200");
        overflow += count(&r, "503");
    }
    assert_eq!(ok + overflow, 6);
    assert!((2..=3).contains(&ok), "{ok} succeeded, {overflow} overflowed");
    assert_eq!(settled_line_count(&v1) as u64, ok, "overflowed requests never reached httpbin");
    let log = std::fs::read_to_string(&t.log).unwrap();
    assert_eq!(log.matches("\"response_flags\":\"UO\"").count() as u64, overflow, "each overflow is logged with UO");
}

#[test]
fn outlier_detection_ejects_a_failing_endpoint_and_brings_it_back() {
    let dr = r"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: default}
spec:
  host: httpbin
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 4s, maxEjectionPercent: 100}
";
    let Some(Mesh { t, v1, .. }) = start_mesh("ebpf", false, false, dr) else { return };
    // v2 refuses connections: after two failures it is ejected; retries
    // carry every request to v1.
    let r = requests_on(&t, "/get", "--count 20");
    assert_eq!(count(&r, "200"), 20, "{r}");
    let log = std::fs::read_to_string(&t.log).unwrap();
    assert!(
        log.contains("outlier detection: endpoint ejected") && log.contains(&format!("{SERVER_V4_B}:8080")),
        "no ejection logged"
    );
    let v2 = t.start_httpbin("httpbin-v2", SERVER_V4_B, 8080).unwrap();
    let ejected_at = std::time::Instant::now();
    let r = requests_on(&t, "/get", "--count 10");
    assert_eq!(count(&r, "200"), 10);
    if ejected_at.elapsed() < Duration::from_secs(3) {
        assert_eq!(line_count(&v2), 0, "an ejected endpoint got traffic");
    }
    // After baseEjectionTime it is back.
    std::thread::sleep(Duration::from_secs(4));
    let before = settled_line_count(&v1);
    let r = requests_on(&t, "/get", "--count 20");
    assert_eq!(count(&r, "200"), 20);
    let back = settled_line_count(&v2);
    assert!(back >= 5, "v2 is back: {back} requests");
    assert!(settled_line_count(&v1) - before < 20);
}

fn requests_on(t: &Topology, path: &str, extra: &str) -> Value {
    let out = t.exec_workload(
        "client",
        &format!("python3 {} {SVC_IP} {SVC_PORT} '{path}' {extra}", client_script().display()),
    );
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// GET a URL on the agent's own ports from the client namespace (an
/// unenrolled process).
fn local_get(t: &Topology, url: &str) -> String {
    let out = t.run_in_cgroup(&t.cgroup.join("probe"), &format!("curl -sS -m 5 {url}"));
    assert!(out.status.success(), "{url}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sum of a Prometheus series over the lines that contain every `filter`.
fn metric_sum(text: &str, name: &str, filters: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[test]
fn metrics_readiness_config_dump_and_proxy_config() {
    let Some(m) = mesh("ebpf", PATH_ROUTING) else { return };
    let r = requests(&m, "/status/200", "--count 30");
    assert_eq!(count(&r, "200"), 30);
    let r = requests(&m, "/anything/else", "--count 5");
    assert_eq!(count(&r, "404"), 5);

    let text = local_get(&m.t, "http://127.0.0.1:15020/stats/prometheus");
    let svc = "destination_service=\"httpbin.default.svc.cluster.local\"";
    assert_eq!(metric_sum(&text, "istio_requests_total", &[svc, "response_code=\"200\""]), 30.0, "{text}");
    assert_eq!(
        metric_sum(&text, "istio_requests_total", &[svc, "response_code=\"404\"", "response_flags=\"NR\""]),
        5.0
    );
    assert_eq!(metric_sum(&text, "istio_request_duration_milliseconds_count", &[svc]), 35.0);
    assert!(metric_sum(&text, "istio_requests_total", &["destination_version=\"v1\""]) > 0.0);
    // The source workload: the enrolled client's cgroup (`exec --workload client`).
    assert_eq!(metric_sum(&text, "istio_requests_total", &[svc, "source_workload=\"client\""]), 35.0, "{text}");
    assert!(text.contains("istio_response_bytes_bucket{"));

    assert_eq!(local_get(&m.t, "http://127.0.0.1:15021/healthz/ready").trim(), "ready");

    let dump: Value = serde_json::from_str(&local_get(&m.t, "http://127.0.0.1:15000/config_dump")).unwrap();
    assert_eq!(dump["services"][0]["hostname"], "httpbin.default.svc.cluster.local");
    let out = m.t.redirector().args(["proxy-config", "routes"]).output().unwrap();
    let routes = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(routes.contains("default/httpbin http[0]") && routes.contains("uri prefix /api/v1/"), "{routes}");
    assert!(routes.contains("httpbin.default.svc.cluster.local|v1 90%"), "{routes}");
    let out = m.t.redirector().args(["proxy-config", "endpoints"]).output().unwrap();
    let eps = String::from_utf8_lossy(&out.stdout);
    assert!(eps.contains(SERVER_V4) && eps.contains("HEALTHY"), "{eps}");
    let out = m.t.redirector().args(["proxy-config", "clusters"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("v2"), "{out:?}");
}

#[test]
fn the_seed_gateway_and_virtual_service_route_http_and_https() {
    if !privileged() || !httpbin_available() {
        return;
    }
    let mut t = Topology::new().unwrap();
    let v1 = t.start_httpbin("httpbin-v1", SERVER_V4, 8080).unwrap();
    let dir = t.state.parent().unwrap().join("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let st = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=httpbin.example.com"])
        .args(["-addext", "subjectAltName=DNS:httpbin.example.com", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    // The seed's YAML, as users have it (plus an HTTPS server).
    std::fs::write(
        dir.join("httpbin.yaml"),
        format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: httpbin}}
spec:
  clusterIP: {SVC_IP}
  selector: {{app: httpbin}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: httpbin-v1}}
spec: {{address: {SERVER_V4}, labels: {{app: httpbin, version: v1}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata:
  name: httpbin-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 80
      name: http
      protocol: HTTP
    hosts:
    - "httpbin.example.com"
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: ["httpbin.example.com"]
    tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: httpbin-vs
spec:
  hosts:
  - "httpbin.example.com"
  gateways:
  - httpbin-gateway
  http:
  - match:
    - uri:
        prefix: /status
    - uri:
        prefix: /headers
    route:
    - destination:
        host: httpbin
        port:
          number: 80
"#,
            cert = cert.display(),
            key = key.display()
        ),
    )
    .unwrap();
    t.config_dir = Some(dir);
    t.start_agent("").unwrap();

    let curl = |args: &str| -> String {
        let out = t.run_in_cgroup(&t.cgroup.join("outside"), &format!("curl -sS -m 5 {args}"));
        assert!(out.status.success(), "curl {args}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let code = |url: &str, host: &str| curl(&format!("-o /dev/null -w '%{{http_code}}' -H 'Host: {host}' {url}"));
    assert_eq!(code("http://127.0.0.1/status/200", "httpbin.example.com"), "200");
    assert_eq!(code("http://127.0.0.1/status/418", "httpbin.example.com"), "418");
    let headers = curl("-H 'Host: httpbin.example.com' http://127.0.0.1/headers");
    assert!(headers.contains("\"Host\": \"httpbin.example.com\""), "{headers}");
    assert_eq!(code("http://127.0.0.1/get", "httpbin.example.com"), "404", "unmatched path");
    assert_eq!(code("http://127.0.0.1/status/200", "other.example.com"), "404", "unknown host");
    let served = settled_line_count(&v1);
    assert_eq!(served, 3, "only the routed requests reached httpbin");

    let https = curl(&format!(
        "-o /dev/null -w '%{{http_code}}' --cacert {} --resolve httpbin.example.com:443:127.0.0.1 https://httpbin.example.com/status/200",
        cert.display()
    ));
    assert_eq!(https, "200");
    assert_eq!(settled_line_count(&v1), served + 1);
}

#[test]
fn an_enrolled_client_resolves_mesh_names_with_ebpf_capture() {
    resolves_mesh_names_and_forwards_the_rest("ebpf");
}

#[test]
fn an_enrolled_client_resolves_mesh_names_with_iptables_capture() {
    resolves_mesh_names_and_forwards_the_rest("iptables");
}

fn resolves_mesh_names_and_forwards_the_rest(mode: &'static str) {
    if !privileged() || !httpbin_available() {
        return;
    }
    let mut t = Topology::with_mode(mode).unwrap();
    t.route_default().unwrap();
    t.start_httpbin("httpbin-v1", SERVER_V4, 8080).unwrap();
    // The node's resolver, as far as this test's namespaces go: dnsmasq in
    // the server namespace, knowing one outside name.
    let dnsmasq_dir = t.state.parent().unwrap().join("dnsmasq");
    std::fs::create_dir_all(&dnsmasq_dir).unwrap();
    t.spawn_in_server(
        "dnsmasq",
        "dnsmasq",
        &[
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--port=53",
            &format!("--listen-address={SERVER_V4}"),
            "--address=/outside.example/198.18.0.99",
            &format!("--pid-file={}/pid", dnsmasq_dir.display()),
            "--user=root",
        ],
    )
    .unwrap();
    let dir = t.state.parent().unwrap().join("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("base.yaml"), base_yaml()).unwrap();
    t.config_dir = Some(dir);
    t.start_agent_with_proxy(&format!("  dnsUpstreams: [\"{SERVER_V4}\"]\n")).unwrap();

    let out = t.exec_workload(
        "client",
        "getent hosts httpbin && getent hosts httpbin.default && getent ahostsv4 httpbin.default.svc.cluster.local | head -1 && getent hosts outside.example && curl -sS -m 5 -o /dev/null -w '%{http_code}\\n' http://httpbin:8000/status/200",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with(SVC_IP) && lines[0].contains("httpbin"), "{text}");
    assert!(lines[1].starts_with(SVC_IP), "{text}");
    assert!(lines[2].starts_with(SVC_IP), "{text}");
    assert!(lines[3].starts_with("198.18.0.99"), "forwarded to the node's resolver: {text}");
    assert_eq!(lines[4], "200", "{text}");
    if mode == "ebpf" {
        assert!(counter_sum(&t.status(), "dns_redirected") >= 4, "{}", t.status());
    }

    // A process that is not enrolled asks the real resolver, which this
    // namespace cannot reach: no answer.
    let out = t.run_in_cgroup(&t.cgroup.join("plain"), "timeout 3 getent hosts httpbin");
    assert!(!out.status.success(), "{out:?}");
}

#[test]
fn consistent_hash_mirror_h2c_and_malformed_requests() {
    let vs = r"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: default}
spec:
  hosts: [httpbin]
  http:
  - match: [{uri: {prefix: /mirrored/}}]
    rewrite: {uri: /}
    route: [{destination: {host: httpbin, subset: v1}}]
    mirror: {host: httpbin, subset: v2}
    mirrorPercentage: {value: 100}
  - route: [{destination: {host: httpbin}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin-hash, namespace: default}
spec:
  host: httpbin
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: x-user}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";
    let Some(m) = start_mesh("ebpf", true, false, vs) else { return };

    // consistentHash on a header: each user's requests all go to one
    // instance.
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let (a, b) = (served(&m.v1), served(&m.v2));
        let r = requests(&m, "/get", &format!("--count 10 --header x-user={user}"));
        assert_eq!(count(&r, "200"), 10);
        let (da, db) = (served(&m.v1) - a, served(&m.v2) - b);
        assert!((da, db) == (10, 0) || (da, db) == (0, 10), "{user}: v1 +{da}, v2 +{db}");
    }

    // mirror: v1 answers, v2 gets a copy.
    let (a, b) = (served(&m.v1), served(&m.v2));
    let r = requests(&m, "/mirrored/get", "--count 10");
    assert_eq!(count(&r, "200"), 10);
    assert_eq!(served(&m.v1) - a, 10);
    assert!(eventually(Duration::from_secs(5), || served(&m.v2) - b == 10), "mirrored {} of 10", served(&m.v2) - b);

    // h2c with prior knowledge from the client; HTTP/1.1 to httpbin.
    let out = m.t.exec_workload(
        "h2",
        &format!("curl -sS -m 5 --http2-prior-knowledge -o /dev/null -w '%{{http_version}} %{{http_code}}' http://{SVC_IP}:{SVC_PORT}/get"),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200", "{out:?}");

    // Malformed and oversized requests: 400 and 431, the connection
    // closed, the next client served.
    let raw = |payload: &str| -> String {
        let script =
            format!("exec 3<>/dev/tcp/{SVC_IP}/{SVC_PORT}; printf '{payload}' >&3; timeout 5 cat <&3 | head -1");
        let out = m.t.exec_workload("raw", &script);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(raw("NOT HTTP AT ALL\\r\\n\\r\\n").starts_with("HTTP/1.1 400"));
    let big = "x".repeat(70 * 1024);
    assert!(raw(&format!("GET /get HTTP/1.1\\r\\nHost: a\\r\\nX-Big: {big}\\r\\n\\r\\n")).starts_with("HTTP/1.1 431"));
    let r = requests(&m, "/get", "--count 3");
    assert_eq!(count(&r, "200"), 3, "the proxy is unaffected");
}
