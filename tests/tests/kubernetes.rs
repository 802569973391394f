//! Kubernetes without a cluster.
//!
//! - The config source: the agent's kube-rs watchers against a test API
//!   server (tests/src/kubeapi.rs) loaded with API objects in the form the
//!   API server returns them (tests/fixtures/kube/cluster.json), changed
//!   while the agent watches.
//!   No root needed: nothing is attached.
//! - Pods laid out as a kubelet does (cgroups under kubepods for the
//!   systemd and cgroupfs drivers, a process in each pod's network
//!   namespace) and described as the API server has them (UID, nodeName,
//!   no annotation of ours): the agents find and capture them (root; both
//!   capture modes).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use redirector::mesh::kubernetes::{prepare, spawn, Access};
use redirector::mesh::pods::PodInfo;
use redirector::mesh::MeshHandle;
use redirector_tests::cluster::Cluster;
use redirector_tests::kubeapi::KubeApi;
use redirector_tests::{eventually, privileged};
use serde_json::json;

/// The agent's namespace in these tests (its `POD_NAMESPACE`).
const GATEWAY_NS: &str = "istio-system";

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("redirector-kube-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/kube/cluster.json")
}

fn access(api: &KubeApi) -> Access {
    Access { kubeconfig: Some(api.kubeconfig.clone()), context: None }
}

async fn until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(15), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pod<'a>(pods: &'a [PodInfo], ns: &str, prefix: &str) -> Option<&'a PodInfo> {
    pods.iter().find(|p| p.namespace == ns && p.name.starts_with(prefix))
}

/// The agent's config source on node-a, as the agent runs it.
struct Source {
    handle: MeshHandle,
    warnings: Vec<String>,
    status: std::sync::Arc<std::sync::Mutex<redirector::mesh::kubernetes::SourceStatus>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Source {
    /// Prepare (discovery, access review) and watch, as the agent does;
    /// returns once the first config is applied.
    async fn start(api: &KubeApi) -> Source {
        let (client, watched, warnings) = prepare(&access(api), "node-a", GATEWAY_NS).await.expect("prepare");
        let handle = MeshHandle::default();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let (task, status) =
            spawn(client, watched, warnings.clone(), redirector::mesh::Scope::new(GATEWAY_NS), handle.clone(), stop_rx);
        until("the first config from the cluster is applied", || handle.version() > 1).await;
        Source { handle, warnings, status, stop, task }
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap();
    }
}

fn new_pod(name: &str, ns: &str, node: &str, ip: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
           "spec": {"nodeName": node, "serviceAccountName": name, "containers": [{"name": "app", "image": "curlimages/curl"}]},
           "status": {"phase": "Running", "podIP": ip, "hostIP": "198.18.10.1"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_feeds_the_mesh_and_the_watches_follow_it() {
    let dir = scratch("follow");
    let api = KubeApi::start(&dir).unwrap();
    api.load_list(&fixture()).unwrap();
    let source = Source::start(&api).await;
    assert!(source.warnings.is_empty(), "{:?}", source.warnings);
    let (handle, status) = (source.handle.clone(), std::sync::Arc::clone(&source.status));

    let m = handle.current();
    let enrolled =
        |ns: &str, prefix: &str| pod(&m.pods, ns, prefix).unwrap_or_else(|| panic!("{ns}/{prefix} missing")).enrolled;
    // Users' labels: istio-injection=enabled and istio.io/dataplane-mode=ambient
    // namespaces are in; the opt-outs and hostNetwork are not.
    assert!(enrolled("bookinfo", "productpage"));
    assert!(enrolled("ambient-demo", "sleep"));
    assert!(!enrolled("bookinfo", "ratings"), "sidecar.istio.io/inject: \"false\" opts out");
    assert!(!enrolled("ambient-demo", "batch"), "istio.io/dataplane-mode=none opts out");
    assert!(!enrolled("bookinfo", "node-exporter"), "hostNetwork pods are never captured");
    assert!(!enrolled("legacy", "legacy-app"), "an unlabelled namespace is not in the mesh");
    assert!(pod(&m.pods, "bookinfo", "migrate").is_none(), "a finished pod is not a workload");
    // The address book: pods of other nodes, with their identities.
    let r = pod(&m.pods, "bookinfo", "reviews-v1").expect("pods of other nodes are known");
    assert_eq!((r.node_name.as_deref(), r.service_account.as_str()), (Some("node-b"), "bookinfo-reviews"));
    let productpage = pod(&m.pods, "bookinfo", "productpage").unwrap().clone();
    assert_eq!(productpage.uid.as_deref(), Some("7f2a4c1e-3b5d-4e6f-8a9b-0c1d2e3f4a5b"));
    // Services, EndpointSlices and Istio's kinds feed the same model as
    // files do.
    let svc = m.service_by_host("reviews.bookinfo.svc.cluster.local").expect("the Service is in the mesh");
    assert_eq!(m.services[svc].endpoints.len(), 2);
    assert_eq!(m.http_routes.get(&svc).map(std::vec::Vec::len), Some(2), "the VirtualService's two rules");
    assert!(redirector::admin::config_dump::dump(&m, &|_, _| false).to_string().contains("jason"));
    assert_eq!(format!("{:?}", m.security.mtls_mode(&productpage, 9080)), "Strict");
    assert!(m.warnings.is_empty(), "Kubernetes' own fields are not warned about: {:?}", m.warnings);
    {
        let st = status.lock().unwrap();
        assert!(st.synced);
        assert_eq!(
            st.objects["pods on this node"], 6,
            "the field selector keeps other nodes' pods out: {:?}",
            st.objects
        );
    }

    // Live: a new pod, a namespace joining the mesh, a pod leaving.
    api.apply(new_pod("curl", "bookinfo", "node-a", "198.18.1.20")).unwrap();
    until("the new pod is in the mesh", || pod(&handle.current().pods, "bookinfo", "curl").is_some_and(|p| p.enrolled))
        .await;
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "legacy", "labels": {"istio-injection": "enabled"}}}))
        .unwrap();
    until("the labelled namespace's pods are enrolled", || {
        pod(&handle.current().pods, "legacy", "legacy-app").is_some_and(|p| p.enrolled)
    })
    .await;
    api.delete("v1", "Pod", "bookinfo", "curl").unwrap();
    until("the deleted pod is gone", || pod(&handle.current().pods, "bookinfo", "curl").is_none()).await;

    // An API server restart: every watch stream ends. The watches resume
    // from where they were, with no new list, and the mesh (so the pods
    // served) is not touched.
    let version = handle.version();
    let before = api.requests("/api/v1/pods");
    api.restart();
    until("both pod watches are re-established", || api.requests("/api/v1/pods").1 >= before.1 + 2).await;
    assert_eq!(api.requests("/api/v1/pods").0, before.0, "the pods were listed again after a restart");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(handle.version(), version, "a restart with no change re-applied the config");
    // And changes after the restart still arrive.
    api.apply(new_pod("late", "ambient-demo", "node-a", "198.18.1.21")).unwrap();
    until("a pod created after the restart is seen", || pod(&handle.current().pods, "ambient-demo", "late").is_some())
        .await;

    source.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// H2: one object with a semantic error, from any namespace, rejects that
/// object, not the mesh. While a broken VirtualService from namespace `x`
/// is in the cluster, a new pod is enrolled and a new DENY policy applies;
/// the broken object is named in the source's status and the mesh's
/// rejected list. A broken AuthorizationPolicy is not left out (that would
/// widen access): it is compiled failing closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broken_object_is_left_out_and_the_rest_keeps_applying() {
    let dir = scratch("broken");
    let api = KubeApi::start(&dir).unwrap();
    api.load_list(&fixture()).unwrap();
    let source = Source::start(&api).await;
    let (handle, status) = (source.handle.clone(), std::sync::Arc::clone(&source.status));
    let vs = |name: &str, ns: &str, weights: [u32; 2]| {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
               "metadata": {"name": name, "namespace": ns},
               "spec": {"hosts": ["reviews.bookinfo.svc.cluster.local"],
                        "http": [{"route": [
                            {"destination": {"host": "reviews.bookinfo.svc.cluster.local", "subset": "v1"}, "weight": weights[0]},
                            {"destination": {"host": "reviews.bookinfo.svc.cluster.local", "subset": "v2"}, "weight": weights[1]}]}]}})
    };
    api.apply(vs("broken", "x", [50, 20])).unwrap();
    until("the broken VirtualService is named", || {
        handle.current().rejected.iter().any(|p| p.origin.name == "x/broken" && p.reason.contains("weights sum to 70"))
    })
    .await;
    api.apply(new_pod("curl", "bookinfo", "node-a", "198.18.1.20")).unwrap();
    api.apply(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                     "metadata": {"name": "deny-curl", "namespace": "bookinfo"},
                     "spec": {"selector": {"matchLabels": {"app": "curl"}}, "action": "DENY", "rules": [{}]}}))
        .unwrap();
    until("the new pod is enrolled and the new DENY applies", || {
        let m = handle.current();
        pod(&m.pods, "bookinfo", "curl").is_some_and(|p| {
            p.enrolled
                && m.security
                    .authorize(p, None, "198.18.1.9".parse().unwrap(), 80)
                    .is_err_and(|e| e.contains("bookinfo/deny-curl"))
        })
    })
    .await;
    let m = handle.current();
    let svc = m.service_by_host("reviews.bookinfo.svc.cluster.local").unwrap();
    assert_eq!(m.http_routes.get(&svc).map(Vec::len), Some(2), "the good VirtualService still routes");
    assert!(
        status.lock().unwrap().rejected.iter().any(|r| r.contains("x/broken")),
        "{:?}",
        status.lock().unwrap().rejected
    );
    // Fixed: it applies, and nothing is rejected any more.
    api.apply(vs("broken", "x", [50, 50])).unwrap();
    until("the fixed object is no longer rejected", || handle.current().rejected.is_empty()).await;

    // A broken ALLOW policy: its workload is denied everything until it is
    // fixed, not opened to everyone.
    api.apply(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                     "metadata": {"name": "only-lan", "namespace": "bookinfo"},
                     "spec": {"selector": {"matchLabels": {"app": "curl"}}, "action": "ALLOW",
                              "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}}))
        .unwrap();
    api.delete("security.istio.io/v1", "AuthorizationPolicy", "bookinfo", "deny-curl").unwrap();
    until("the broken policy is named and fails closed", || {
        let m = handle.current();
        m.rejected.iter().any(|p| p.origin.name == "bookinfo/only-lan")
            && pod(&m.pods, "bookinfo", "curl").is_some_and(|p| {
                m.security
                    .authorize(p, None, "10.0.0.1".parse().unwrap(), 80)
                    .is_err_and(|e| e.contains("bookinfo/only-lan"))
            })
    })
    .await;
    source.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A self-signed certificate for `host` and its key, PEM, made by openssl.
fn certificate(dir: &std::path::Path, host: &str) -> (String, String) {
    let (cert, key) = (dir.join(format!("{host}.crt")), dir.join(format!("{host}.key")));
    let st = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", &format!("/CN={host}"), "-addext", &format!("subjectAltName=DNS:{host}"), "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success());
    (std::fs::read_to_string(cert).unwrap(), std::fs::read_to_string(key).unwrap())
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn tls_secret(ns: &str, name: &str, cert: &str, key: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
           "metadata": {"name": name, "namespace": ns,
                        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{{\"data\":{{\"tls.key\":\"{}\"}}}}", b64(key))}},
           "data": {"tls.crt": b64(cert), "tls.key": b64(key)}})
}

/// The gateway's `credentialName`: a TLS Secret of the agent's namespace,
/// read through a namespaced watch (the Role's scope), taken again when it
/// changes; a Secret elsewhere, of another type or whose key does not
/// match skips the server with a warning naming it, and the other servers
/// stay. Of the namespace's other Secrets (the CA's key), nothing but the
/// name is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reads_its_certificate_from_a_secret_of_its_namespace_and_follows_it() {
    let dir = scratch("secret");
    let api = KubeApi::start(&dir).unwrap();
    api.load_list(&fixture()).unwrap();
    let (cert1, key1) = certificate(&dir, "web.example.com");
    let (cert2, key2) = certificate(&dir, "web2.example.com");
    api.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
        "metadata": {"name": "web", "namespace": "bookinfo"},
        "spec": {"selector": {"istio": "ingressgateway"}, "servers": [
            {"port": {"number": 8443, "name": "https", "protocol": "HTTPS"}, "hosts": ["web.example.com"],
             "tls": {"mode": "SIMPLE", "credentialName": "web-cert"}},
            {"port": {"number": 8444, "name": "https-other", "protocol": "HTTPS"}, "hosts": ["other.example.com"],
             "tls": {"mode": "SIMPLE", "credentialName": "other-cert"}},
            {"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["web.example.com"]}]}}))
        .unwrap();
    api.apply(tls_secret(GATEWAY_NS, "web-cert", &cert1, &key1)).unwrap();
    // other-cert exists only in the Gateway's own namespace, which is not
    // where a gateway reads it (nor what the agent may read).
    api.apply(tls_secret("bookinfo", "other-cert", &cert2, &key2)).unwrap();
    api.apply(json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "cacerts", "namespace": GATEWAY_NS},
        "data": {"ca-key.pem": b64(&key2), "ca-cert.pem": b64(&cert2)}}))
        .unwrap();
    let source = Source::start(&api).await;
    let handle = source.handle.clone();
    let tls_of = |port: u16| handle.current().gateway_ports().get(&port).and_then(|c| c.first().cloned());
    let t = tls_of(8443).expect("port 8443 terminates TLS with the Secret");
    assert_eq!(
        (t.source.as_str(), &*t.cert, &*t.key),
        ("Secret istio-system/web-cert", cert1.as_bytes(), key1.as_bytes())
    );
    assert!(handle.current().gateway_ports().contains_key(&8080), "the HTTP server is served");
    assert!(!handle.current().gateway_ports().contains_key(&8444), "a server without its Secret is skipped");
    let warned = |needle: &str| handle.current().warnings.iter().any(|w| w.to_string().contains(needle));
    assert!(
        warned(
            "no Secret istio-system/other-cert: create it with `kubectl create -n istio-system secret tls other-cert"
        ),
        "{:?}",
        handle.current().warnings
    );
    assert_eq!(source.status.lock().unwrap().objects["gateway secrets"], 2, "only the agent's namespace is watched");
    assert_eq!(api.requests("/api/v1/secrets").1, 1, "one namespaced watch");

    // Rotation: the new certificate is taken.
    api.apply(tls_secret(GATEWAY_NS, "web-cert", &cert2, &key2)).unwrap();
    until("the rotated certificate is in force", || tls_of(8443).is_some_and(|t| *t.cert == *cert2.as_bytes())).await;
    // A key that does not match: the server is skipped, named; the rest stay.
    api.apply(tls_secret(GATEWAY_NS, "web-cert", &cert1, &key2)).unwrap();
    until("a mismatched key skips the server", || tls_of(8443).is_none()).await;
    assert!(
        warned("Secret istio-system/web-cert: its tls.key the private key does not match the certificate"),
        "{:?}",
        handle.current().warnings
    );
    assert!(handle.current().gateway_ports().contains_key(&8080));
    // Not a TLS Secret.
    api.apply(json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "web-cert", "namespace": GATEWAY_NS}, "data": {"password": b64("hunter2")}}))
        .unwrap();
    until("a Secret that is not TLS is named", || {
        warned("Secret istio-system/web-cert is not a TLS Secret (type Opaque")
    })
    .await;
    source.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_istio_crds_routing_is_off_with_a_warning_and_pods_still_enroll() {
    let dir = scratch("nocrd");
    let api = KubeApi::start(&dir).unwrap();
    api.without_istio();
    let mut list: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture()).unwrap()).unwrap();
    list["items"].as_array_mut().unwrap().retain(|o| !o["apiVersion"].as_str().unwrap().contains("istio.io"));
    let recorded = dir.join("core.json");
    std::fs::write(&recorded, list.to_string()).unwrap();
    api.load_list(&recorded).unwrap();
    let (_, watched, _) = prepare(&access(&api), "node-a", GATEWAY_NS).await.expect("prepare without CRDs");
    assert!(!watched.iter().any(|w| w.resource.group.contains("istio")));
    let source = Source::start(&api).await;
    let warnings = &source.warnings;
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("the Istio CRDs of networking.istio.io are not installed"), "{warnings:?}");
    assert!(warnings[0].contains("capture and mTLS still work"), "{warnings:?}");
    let m = source.handle.current();
    assert!(pod(&m.pods, "bookinfo", "productpage").unwrap().enrolled);
    assert!(m.service_by_host("reviews.bookinfo.svc.cluster.local").is_some());
    assert!(m.http_routes.is_empty());
    assert_eq!(source.status.lock().unwrap().warnings.len(), 2);
    source.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_rbac_is_named_by_verb_and_resource() {
    let dir = scratch("rbac");
    let api = KubeApi::start(&dir).unwrap();
    api.deny("watch", "pods");
    let e =
        prepare(&access(&api), "node-a", GATEWAY_NS).await.err().expect("a refused watch fails the start").to_string();
    assert!(
        e.starts_with("the agent may not watch pods in the cluster (RBAC: no rule grants it): grant verb `watch` on resource `pods`"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    let api = KubeApi::start(&dir).unwrap();
    api.deny("list", "authorizationpolicies");
    let e = prepare(&access(&api), "node-a", GATEWAY_NS).await.err().unwrap().to_string();
    assert!(e.contains("may not list authorizationpolicies.security.istio.io"), "{e}");
    // The gateway's Secrets are asked of its namespace only, and a refusal
    // names the Role to grant there.
    let api = KubeApi::start(&dir).unwrap();
    api.deny("watch", "secrets");
    let e = prepare(&access(&api), "node-a", GATEWAY_NS).await.err().unwrap().to_string();
    assert!(
        e.starts_with("the agent may not watch secrets in namespace istio-system (RBAC: no rule grants it): grant verb `watch` on resource `secrets` in the redirector Role of namespace istio-system"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_is_one_clear_line() {
    let dir = scratch("down");
    let port = {
        let api = KubeApi::start(&dir).unwrap();
        api.port
    };
    // The server is gone; its port refuses.
    std::thread::sleep(Duration::from_millis(100));
    let _ = port;
    let e = prepare(&Access { kubeconfig: Some(dir.join("kubeconfig")), context: None }, "node-a", GATEWAY_NS)
        .await
        .err()
        .expect("no API server")
        .to_string();
    assert!(e.starts_with("cannot reach the Kubernetes API to discover the networking.istio.io API group"), "{e}");
    assert!(e.contains("check that the API server is up"), "{e}");
    let e = prepare(&Access { kubeconfig: Some(dir.join("missing")), context: None }, "node-a", GATEWAY_NS)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("kubeconfig "), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ebpf_pods_found_from_their_uid_are_captured() {
    if privileged() {
        pods_found_from_their_uid_are_captured("ebpf");
    }
}

#[test]
fn iptables_pods_found_from_their_uid_are_captured() {
    if privileged() {
        pods_found_from_their_uid_are_captured("iptables");
    }
}

fn pods_found_from_their_uid_are_captured(mode: &'static str) {
    let mut c = Cluster::kubernetes(mode).unwrap();
    // a2's containers have not started when the agents start.
    c.late = vec!["a2".into()];
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    let b1 = c.pod("b1").ip.clone();
    let logs = |c: &Cluster| {
        format!(
            "node-a: {}\nnode-b: {}",
            std::fs::read_to_string(&c.nodes[0].log).unwrap(),
            std::fs::read_to_string(&c.nodes[1].log).unwrap()
        )
    };
    // Pods already running when the agents started are enrolled: the
    // cgroup found from the UID (systemd driver on node-a, cgroupfs on
    // node-b), the network namespace from the pod's process.
    let enrolled = c.logged(0, "pod enrolled");
    assert_eq!(enrolled.len(), 1, "{}", logs(&c));
    assert!(enrolled[0]["fields"]["netns"].as_str().unwrap().starts_with("/proc/"), "{}", enrolled[0]);
    let (code, err) = c.curl("a1", &format!("http://{b1}:8080/"));
    assert_eq!(code, 200, "curl a1 -> b1: {err}\n{}", logs(&c));
    assert!(eventually(Duration::from_secs(5), || c
        .logged(1, "HBONE connection closed")
        .iter()
        .any(|l| l["fields"]["source_principal"] == "spiffe://cluster.local/ns/default/sa/sa-a1")));

    // A pod whose cgroup does not exist yet is reported and retried...
    assert!(
        eventually(Duration::from_secs(5), || c
            .logged(0, "cannot serve this pod yet")
            .iter()
            .any(|l| l["fields"]["pod"] == "default/a2"
                && l["fields"]["error"].as_str().unwrap_or_default().contains("no cgroup found for pod UID"))),
        "{}",
        logs(&c)
    );
    // ...and once the kubelet has made its cgroup, held until its proxy is
    // ready: nothing it sends may go around the mesh.
    let a2 = c.pod("a2").cgroup.clone();
    let pod_cgroup = a2.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&pod_cgroup).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || c
            .logged(0, "pod held until its proxy is ready")
            .iter()
            .any(|l| l["fields"]["pod"] == "default/a2")),
        "{}",
        logs(&c)
    );
    // `redirector status` on the node reports it.
    let status = c.output(c.in_node(
        0,
        redirector_tests::redirector_bin().to_str().unwrap(),
        &["--state-dir", c.nodes[0].state.to_str().unwrap(), "status"],
    ));
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("pods       1 served (default/a1)")
            && status.contains("HELD default/a2: no process runs in the pod's containers yet"),
        "{status}"
    );
    // Readiness (15021) says not ready while a pod is held.
    let ready = |c: &Cluster| {
        let out = c.output(c.in_node(
            0,
            "curl",
            &["-s", "-w", " %{http_code}", "--max-time", "5", "http://127.0.0.1:15021/healthz/ready"],
        ));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let r = ready(&c);
    assert!(r.ends_with("503") && r.contains("held") && r.contains("default/a2"), "{r}");
    // A process of a2 the agent cannot serve (it runs in the node's
    // network namespace, where b1 is reachable directly).
    std::fs::create_dir_all(&a2).unwrap();
    // It joins a2's container cgroup itself, once in the node's namespace.
    let script = format!(
        "echo 0 > {}; exec curl -sS -o /dev/null -w %{{http_code}} --max-time 5 http://{b1}:8080/",
        a2.join("cgroup.procs").display()
    );
    let mut direct = c.in_node(0, "sh", &["-c", &script]);
    if mode == "ebpf" {
        // eBPF capture refuses its connects (EPERM).
        let out = direct.output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "000",
            "a pending pod reached b1 around the mesh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success());
    } else {
        // iptables capture has no per-cgroup refusal: the pod is frozen.
        let mut child = direct.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        let events = pod_cgroup.join("cgroup.events");
        assert!(eventually(Duration::from_secs(3), || std::fs::read_to_string(&events)
            .unwrap_or_default()
            .contains("frozen 1")));
        std::thread::sleep(Duration::from_millis(500));
        assert!(child.try_wait().unwrap().is_none(), "a held pod's process ran");
        child.kill().unwrap();
        child.wait().unwrap();
    }
    // Its real process (its own network namespace): enrolled on the next
    // retry, released, and its connections go through the mesh.
    c.start_pod_process("a2").unwrap();
    assert!(eventually(Duration::from_secs(10), || c.served(0) == 2), "{}", logs(&c));
    assert!(
        !std::fs::read_to_string(pod_cgroup.join("cgroup.events")).unwrap().contains("frozen 1"),
        "a served pod stays frozen"
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            let r = ready(&c);
            r.starts_with("ready") && r.ends_with("200")
        }),
        "{}",
        ready(&c)
    );
    let (code, err) = c.curl("a2", &format!("http://{b1}:8080/"));
    assert_eq!(code, 200, "curl a2 -> b1: {err}\n{}", logs(&c));
    assert!(eventually(Duration::from_secs(5), || c
        .logged(1, "HBONE connection closed")
        .iter()
        .any(|l| l["fields"]["source_principal"] == "spiffe://cluster.local/ns/default/sa/sa-a2")));
}

/// Run the CLI against the test API server; (exit ok, stdout, stderr).
fn cli(api: &KubeApi, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(redirector_tests::redirector_bin())
        .arg("--kubeconfig")
        .arg(&api.kubeconfig)
        .args(args)
        .output()
        .expect("running redirector");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn install_applies_the_profile_makes_the_ca_and_waits_for_every_node() {
    let dir = scratch("install");
    let api = KubeApi::start(&dir).unwrap();
    let (ok, out, err) =
        cli(&api, &["install", "--profile", "demo", "--image", "registry.example/redirector:test", "--timeout", "60"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("[1/18] applied Namespace redirector-system"), "{out}");
    assert!(out.contains("[18/18] applied Service redirector-metrics"), "{out}");
    assert!(out.contains("applied Deployment redirector-ca"), "{out}");
    assert!(out.contains("mesh CA: generated into Secret redirector-ca/cacerts"), "{out}");
    assert!(out.contains("trust bundle: ConfigMap redirector-system/istio-ca-root-cert"), "{out}");
    assert!(out.contains("0/2 nodes ready") && out.contains("2/2 nodes ready, 2 updated"), "progress is shown: {out}");
    assert!(out.contains("redirector (demo profile) is ready on 2 node(s)"), "{out}");
    let ds = api
        .applied("/apis/apps/v1/namespaces/redirector-system/daemonsets/redirector")
        .expect("the DaemonSet was applied");
    assert_eq!(ds["spec"]["template"]["spec"]["containers"][0]["image"], "registry.example/redirector:test");
    // The key only in the CA's namespace; the agents get the roots and no
    // key (no CA Secret mounted, a projected token for istio-ca instead).
    assert!(api.applied("/api/v1/namespaces/redirector-system/secrets/cacerts").is_none());
    let secret = api.applied("/api/v1/namespaces/redirector-ca/secrets/cacerts").expect("the CA Secret was created");
    for f in ["ca-cert.pem", "root-cert.pem", "cert-chain.pem"] {
        assert!(secret["stringData"][f].as_str().unwrap().starts_with("-----BEGIN CERTIFICATE-----"), "{f}");
    }
    assert!(secret["stringData"]["ca-key.pem"].as_str().unwrap().contains("PRIVATE KEY"));
    let bundle = api
        .applied("/api/v1/namespaces/redirector-system/configmaps/istio-ca-root-cert")
        .expect("the trust bundle was applied");
    assert_eq!(bundle["data"]["root-cert.pem"], secret["stringData"]["root-cert.pem"]);
    let pod = &ds["spec"]["template"]["spec"];
    let volumes = pod["volumes"].to_string();
    assert!(!volumes.contains("cacerts") && volumes.contains("\"audience\":\"istio-ca\""), "{volumes}");
    let ca = api
        .applied("/apis/apps/v1/namespaces/redirector-ca/deployments/redirector-ca")
        .expect("the CA Deployment was applied");
    assert_eq!(ca["spec"]["replicas"], 2);
    assert_eq!(ca["spec"]["template"]["spec"]["containers"][0]["image"], "registry.example/redirector:test");
    assert!(api.applied("/api/v1/namespaces/redirector-system/services/istio-ingressgateway").is_some());
    let role = api
        .applied("/apis/rbac.authorization.k8s.io/v1/namespaces/redirector-system/roles/redirector-gateway-secrets")
        .expect("the gateway's Role was applied in the agent's namespace");
    assert_eq!(role["rules"][0]["resources"][0], "secrets");
    // A second install keeps the CA (workload certificates stay valid).
    let (ok, out, _) = cli(&api, &["install", "--profile", "minimal", "--timeout", "60"]);
    assert!(ok && out.contains("Secret redirector-ca/cacerts exists; kept"), "{out}");
    // A profile that does not exist fails before anything is applied.
    let fresh = KubeApi::start(&dir.join("fresh")).unwrap();
    let (ok, out, err) = cli(&fresh, &["install", "--profile", "default"]);
    assert!(!ok && out.is_empty(), "{out}");
    assert_eq!(err.trim(), "redirector: error: unknown profile `default`: choose one of minimal, demo");
    assert!(fresh.applied_paths().is_empty());

    // --root-ca: the root is made (or kept) outside the cluster; the
    // Secret gets an intermediate it signed and the root's certificate,
    // never the root's key.
    let offline = KubeApi::start(&dir.join("offline")).unwrap();
    let root = dir.join("offline-root");
    let root_arg = root.to_str().unwrap();
    let (ok, out, err) = cli(&offline, &["install", "--timeout", "60", "--root-ca", root_arg]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("root CA written to") && out.contains("an intermediate under your offline root"), "{out}");
    let secret = offline.applied("/api/v1/namespaces/redirector-ca/secrets/cacerts").expect("the CA Secret");
    let data = |f: &str| secret["stringData"][f].as_str().unwrap().to_string();
    let root_cert = std::fs::read_to_string(root.join("root-cert.pem")).unwrap();
    let root_key = std::fs::read_to_string(root.join("ca-key.pem")).unwrap();
    assert_eq!(data("root-cert.pem"), root_cert);
    assert_ne!(data("ca-cert.pem"), root_cert, "the Secret must hold an intermediate, not the root");
    assert_eq!(data("cert-chain.pem").matches("BEGIN CERTIFICATE").count(), 2, "intermediate, then root");
    for path in offline.applied_paths() {
        let text = offline.applied(&path).unwrap().to_string();
        assert!(!text.contains(root_key.lines().nth(1).unwrap()), "the root's key went into {path}");
    }
    let bundle = offline.applied("/api/v1/namespaces/redirector-system/configmaps/istio-ca-root-cert").unwrap();
    assert_eq!(bundle["data"]["root-cert.pem"].as_str(), Some(root_cert.as_str()));
    std::fs::write(dir.join("intermediate.pem"), data("ca-cert.pem")).unwrap();
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(root.join("root-cert.pem"))
        .arg(dir.join("intermediate.pem"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "the intermediate does not chain to the root: {verify:?}");
    // A second cluster under the same root: the root is reused, a new
    // intermediate made.
    let second = KubeApi::start(&dir.join("second")).unwrap();
    let (ok, out, err) = cli(&second, &["install", "--timeout", "60", "--root-ca", root_arg]);
    assert!(ok && !out.contains("root CA written to"), "{out}\n{err}");
    assert_eq!(std::fs::read_to_string(root.join("ca-key.pem")).unwrap(), root_key, "the root was replaced");
    let other = second.applied("/api/v1/namespaces/redirector-ca/secrets/cacerts").unwrap();
    assert_ne!(other["stringData"]["ca-cert.pem"].as_str().unwrap(), data("ca-cert.pem"));
    // An unreadable root fails before anything is applied.
    let broken = dir.join("broken-root");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("ca-key.pem"), "not a key").unwrap();
    let untouched = KubeApi::start(&dir.join("untouched")).unwrap();
    let (ok, _, err) = cli(&untouched, &["install", "--root-ca", broken.to_str().unwrap()]);
    assert!(!ok && err.contains("--root-ca") && err.lines().count() == 1, "{err}");
    assert!(untouched.applied_paths().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_verify_and_version_read_every_node_agent() {
    let dir = scratch("status");
    let api = KubeApi::start(&dir).unwrap();
    api.load_list(&fixture()).unwrap();
    // node-a's agent: the real config source, synced with the cluster.
    let source = Source::start(&api).await;
    let (handle, status) = (source.handle.clone(), std::sync::Arc::clone(&source.status));
    let synced = serde_json::to_value(&*status.lock().unwrap()).unwrap();
    let node = |name: &str, source: serde_json::Value| {
        json!({"node": name, "version": "0.1.0", "mode": "ebpf", "configSource": "kubernetes", "configVersion": 3,
               "kernel": {"release": "6.1.0-41-amd64", "tier": "ebpf+sockmap", "missing": []},
               "kubernetes": source, "pods": ["bookinfo/productpage-v1-6c8f9d7b5-x2k4p"],
               "podProblems": {"ambient-demo/sleep-5b8d7f9c4-t7w2n": "no process runs in the pod's containers yet, so its network namespace is unknown"}})
    };
    api.add_agent("redirector-a1b2c", "node-a", Some(node("node-a", synced.clone())));
    // node-b's agent applied an older config.
    let mut old = synced.clone();
    old["digest"] = json!("0123456789abcdef");
    api.add_agent("redirector-d3e4f", "node-b", Some(node("node-b", old)));

    let (ok, out, err) = cli(&api, &["status", "--cluster"]);
    assert!(ok, "{out}\n{err}");
    let line =
        |n: &str| out.lines().find(|l| l.starts_with(n)).unwrap_or_else(|| panic!("no {n} line: {out}")).to_string();
    assert!(line("node-a").contains("SYNCED") && line("node-a").contains("redirector-a1b2c"), "{out}");
    assert!(line("node-b").contains("STALE"), "{out}");
    assert!(out.contains("enrolled bookinfo/productpage-v1-6c8f9d7b5-x2k4p"), "{out}");
    assert!(out.contains("NOT ENROLLED ambient-demo/sleep-5b8d7f9c4-t7w2n: no process runs"), "{out}");
    // A change in the cluster makes the synced agent's config stale until
    // it applies it.
    api.apply(new_pod("curl", "bookinfo", "node-b", "198.18.2.30")).unwrap();
    let (_, out, _) = cli(&api, &["status", "--cluster"]);
    assert!(line_of(&out, "node-a").contains("STALE"), "{out}");
    until("node-a's source applied the change", || pod(&handle.current().pods, "bookinfo", "curl").is_some()).await;
    let fresh = serde_json::to_value(&*status.lock().unwrap()).unwrap();
    let (_, out, _) = cli(&api, &["status", "--cluster", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["latest"], fresh["digest"], "the agent's digest and the CLI's agree on the same objects");

    let (ok, out, err) = cli(&api, &["version", "--cluster"]);
    assert!(ok, "{err}");
    assert!(out.contains("kubernetes: v1.32.4") && out.contains("agent on node-a: 0.1.0 (redirector-a1b2c)"), "{out}");

    // verify: no DaemonSet yet → a FAIL line and a non-zero exit.
    let (ok, out, err) = cli(&api, &["verify", "--cluster"]);
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL daemonset") && out.contains("run `redirector install --profile minimal`"), "{out}");
    assert_eq!(err.trim(), "redirector: error: the cluster is not ready for the mesh: see the FAIL lines above");
    assert!(
        out.contains("node node-a")
            && out.contains("kernel 6.1.0-41-amd64, capture ebpf (kernel supports ebpf+sockmap)"),
        "{out}"
    );
    assert!(out.contains("ok   istio CRDs") && out.contains("present"), "{out}");
    // A rollout's surge pod beside node-b's agent (the takeover): the node
    // shows two agent pods in takeover; node-a does not.
    api.add_agent("redirector-g5h6i", "node-b", Some(node("node-b", synced.clone())));
    let (ok, out, err) = cli(&api, &["status", "--cluster"]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(out.matches("IN TAKEOVER: 2 agent pods on this node").count(), 2, "{out}");
    let (_, out, _) = cli(&api, &["status", "--cluster", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let takeover = |node: &str| {
        v["agents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["node"] == node)
            .map(|a| a["takeover"].clone())
            .collect::<Vec<_>>()
    };
    assert!(takeover("node-a").iter().all(serde_json::Value::is_null), "{v}");
    assert!(takeover("node-b").iter().all(serde_json::Value::is_string), "{v}");
    source.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn verify_passes_on_a_ready_cluster_and_names_an_unreachable_agent() {
    let dir = scratch("verify");
    let api = KubeApi::start(&dir).unwrap();
    api.without_istio();
    let (ok, out, err) = cli(&api, &["install", "--timeout", "60"]);
    assert!(ok, "{out}{err}");
    api.add_agent("redirector-a1b2c", "node-a", Some(json!({"version": "0.1.0", "mode": "iptables", "kernel": {"release": "5.10.0-35-amd64", "tier": "ebpf", "missing": []}})));
    let (ok, out, err) = cli(&api, &["verify", "--cluster"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("ok   daemonset            2/2 nodes ready"), "{out}");
    assert!(out.contains("ok   mesh CA              2/2 replicas ready"), "{out}");
    assert!(
        out.contains("ok   CA key               Secret redirector-ca/cacerts is not readable by the node agents"),
        "{out}"
    );
    // An RBAC rule that lets the agents read the key fails verify.
    api.grant("system:serviceaccount:redirector-system:redirector", "get", "secrets", "redirector-ca");
    let (ok, out, _) = cli(&api, &["verify", "--cluster"]);
    assert!(!ok && out.contains("FAIL CA key") && out.contains("can read Secret redirector-ca/cacerts"), "{out}");
    let api = KubeApi::start(&dir.join("again")).unwrap();
    api.without_istio();
    assert!(cli(&api, &["install", "--timeout", "60"]).0);
    api.add_agent("redirector-a1b2c", "node-a", Some(json!({"version": "0.1.0", "mode": "iptables", "kernel": {"release": "5.10.0-35-amd64", "tier": "ebpf", "missing": []}})));
    assert!(out.contains("the Istio CRDs of networking.istio.io are not installed"), "{out}");
    api.add_agent("redirector-zzzzz", "node-b", None);
    let (ok, out, _) = cli(&api, &["verify", "--cluster"]);
    assert!(!ok);
    assert!(out.contains("FAIL node node-b") && out.contains("connection refused"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn line_of(out: &str, prefix: &str) -> String {
    out.lines().find(|l| l.starts_with(prefix)).unwrap_or_default().to_string()
}

/// Two node agents run with `--kubernetes` against the test API server
/// (reached inside each node's namespace): pods described only by the API
/// (UID, nodeName) are found, enrolled and carried over HBONE; a namespace
/// label removed and put back through the API takes them out and back in;
/// an API server restart re-enrolls nothing.
#[test]
fn agents_read_the_cluster_from_the_api_server() {
    if !privileged() {
        return;
    }
    let mut c = Cluster::kubernetes("ebpf").unwrap();
    let api = KubeApi::start(&c.dir.join("api")).unwrap();
    let mut kubeconfigs = Vec::new();
    for n in &c.nodes {
        let k = c.dir.join(format!("{}.kubeconfig", n.name));
        api.listen_in_netns(&redirector_tests::cluster::ns_path(&n.ns), &k).unwrap();
        kubeconfigs.push(k);
    }
    c.kubeconfigs = Some(kubeconfigs);
    for o in redirector::cmd::manifest::yaml_objects(&c.mesh_yaml()).unwrap() {
        api.apply(o).unwrap();
    }
    c.start().unwrap();
    let logs = |c: &Cluster| {
        format!(
            "node-a: {}\nnode-b: {}",
            std::fs::read_to_string(&c.nodes[0].log).unwrap(),
            std::fs::read_to_string(&c.nodes[1].log).unwrap()
        )
    };
    assert!(!c.logged(0, "kubernetes config source synced").is_empty(), "{}", logs(&c));
    c.start_nginx("b1", 8080).unwrap();
    let b1 = c.pod("b1").ip.clone();
    let (code, err) = c.curl("a1", &format!("http://{b1}:8080/"));
    assert_eq!(code, 200, "curl a1 -> b1: {err}\n{}", logs(&c));
    assert!(eventually(Duration::from_secs(5), || c
        .logged(1, "HBONE connection closed")
        .iter()
        .any(|l| l["fields"]["source_principal"] == "spiffe://cluster.local/ns/default/sa/sa-a1")));

    // C1: a pod creator names host state in annotations: another pod's
    // cgroup with a hold, a stand-in for the node's system.slice (a
    // process of the node in it), the agent's own cgroup, another pod's
    // network namespace and the node's. None of it touches the node.
    let a1_pod_cgroup = c.pod("a1").cgroup.parent().unwrap().to_path_buf();
    let system_slice = c.nodes[0].cgroup.join("system.slice");
    std::fs::create_dir_all(&system_slice).unwrap();
    let mut daemon = c
        .in_node(0, "sh", &["-c", &format!("echo $$ > {}; exec sleep 60", system_slice.join("cgroup.procs").display())])
        .spawn()
        .unwrap();
    let agent_pid = c.agent_pid(0).unwrap();
    let agent_cgroup = std::fs::read_to_string(format!("/proc/{agent_pid}/cgroup")).unwrap();
    let agent_cgroup =
        agent_cgroup.lines().find_map(|l| l.strip_prefix("0::")).expect("the agent's cgroup2 path").to_string();
    let b1_netns = redirector_tests::cluster::ns_path(&c.pod("b1").ns).display().to_string();
    let node_netns = redirector_tests::cluster::ns_path(&c.nodes[0].ns).display().to_string();
    let evil = [
        ("evil-a1", a1_pod_cgroup.display().to_string(), b1_netns),
        ("evil-system", system_slice.display().to_string(), node_netns.clone()),
        ("evil-agent", agent_cgroup.clone(), node_netns),
    ];
    for (k, (name, cgroup, netns)) in evil.iter().enumerate() {
        let mut o = new_pod(name, "default", "node-a", &format!("198.18.1.{}", 60 + k));
        o["metadata"]["uid"] = json!(format!("evil-{k}-{}", std::process::id()));
        o["metadata"]["annotations"] = json!({"redirector.dev/cgroup": cgroup, "redirector.dev/netns": netns, "redirector.dev/until-ready": "hold"});
        api.apply(o).unwrap();
    }
    let ignored = |c: &Cluster| {
        c.logged(0, "pod annotations ignored")
            .iter()
            .filter(|l| {
                l["fields"]["annotations"] == "redirector.dev/cgroup, redirector.dev/netns, redirector.dev/until-ready"
            })
            .filter_map(|l| l["fields"]["pod"].as_str().map(str::to_string))
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert!(eventually(Duration::from_secs(10), || ignored(&c).len() == 3), "{:?}\n{}", ignored(&c), logs(&c));
    assert!(
        eventually(Duration::from_secs(10), || c
            .logged(0, "cannot serve this pod yet")
            .iter()
            .filter(|l| l["fields"]["pod"].as_str().is_some_and(|p| p.starts_with("default/evil-")))
            .count()
            >= 3),
        "{}",
        logs(&c)
    );
    std::thread::sleep(Duration::from_millis(500));
    for l in c.logged(0, "pod enrolled").iter().chain(c.logged(0, "pod held").iter()) {
        assert!(!l["fields"]["pod"].as_str().unwrap_or_default().contains("evil"), "{l}\n{}", logs(&c));
    }
    for cg in [
        a1_pod_cgroup.clone(),
        system_slice.clone(),
        redirector_tests::cgroup2_mount().join(agent_cgroup.trim_start_matches('/')),
    ] {
        // The root cgroup (where a test runner may keep the agent) has no
        // freezer; the request below shows the agent is not stopped.
        let Ok(events) = std::fs::read_to_string(cg.join("cgroup.events")) else { continue };
        assert!(events.contains("frozen 0"), "{} was frozen: {events}", cg.display());
    }
    assert!(daemon.try_wait().unwrap().is_none(), "the node's process in system.slice is gone");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let (code, err) = c.curl("a1", &format!("http://{b1}:8080/"));
    assert_eq!(code, 200, "curl a1 -> b1 after the annotations: {err}\n{}", logs(&c));
    for (name, _, _) in &evil {
        api.delete("v1", "Pod", "default", name).unwrap();
    }

    // M5: a Gateway of a tenant's namespace asks every node for a host
    // port (etcd's, here); only the agent's own namespace may open one.
    for (ns, port) in [("evil", 2379), ("istio-system", 18080)] {
        api.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
            "metadata": {"name": "gw", "namespace": ns, "uid": format!("gw-{ns}")},
            "spec": {"selector": {"istio": "ingressgateway"},
                     "servers": [{"port": {"number": port, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}}))
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || c
            .logged(0, "gateway listening")
            .iter()
            .any(|l| l["fields"]["port"] == 18080)),
        "{}",
        logs(&c)
    );
    assert!(
        eventually(Duration::from_secs(5), || c.logged(0, "mesh config").iter().any(|l| {
            l["fields"]["problem"].as_str().is_some_and(|p| p.contains("mesh.gatewayNamespaces") && p.contains("evil"))
        })),
        "{}",
        logs(&c)
    );
    assert!(c.logged(0, "gateway listening").iter().all(|l| l["fields"]["port"] != 2379), "{}", logs(&c));
    let probe = |port: u16| {
        let url = format!("http://127.0.0.1:{port}/");
        let out =
            c.output(c.in_node(0, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", &url]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(probe(2379), "000", "a tenant's Gateway opened a port on the node");
    assert_ne!(probe(18080), "000", "the agent namespace's Gateway must listen");
    for ns in ["evil", "istio-system"] {
        api.delete("networking.istio.io/v1", "Gateway", ns, "gw").unwrap();
    }

    // An API server restart: watches resume, nothing is re-enrolled or let go.
    let (enrolled, left) = (c.logged(0, "pod enrolled").len(), c.logged(0, "pod left the mesh").len());
    let watches = api.requests("/api/v1/pods").1;
    api.restart();
    assert!(
        eventually(Duration::from_secs(10), || api.requests("/api/v1/pods").1 >= watches + 4),
        "both agents' pod watches resume"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        (c.logged(0, "pod enrolled").len(), c.logged(0, "pod left the mesh").len()),
        (enrolled, left),
        "{}",
        logs(&c)
    );

    // The namespace label removed through the API: the pods leave the mesh
    // on both nodes.
    let b1_lines =
        |c: &Cluster, prefix: &str| c.logged(1, prefix).iter().filter(|l| l["fields"]["pod"] == "default/b1").count();
    let (enrolled_b, left_b) = (b1_lines(&c, "pod enrolled"), b1_lines(&c, "pod left the mesh"));
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default", "labels": {}}})).unwrap();
    assert!(eventually(Duration::from_secs(10), || c.logged(0, "pod left the mesh").len() >= left + 2), "{}", logs(&c));
    assert!(eventually(Duration::from_secs(10), || b1_lines(&c, "pod left the mesh") > left_b), "{}", logs(&c));
    // And put back: enrolled again, no restart of anything. The request
    // below needs a2 served on node-a and b1 on node-b (b1's 15008 is
    // opened in its own namespace), so both agents are waited for.
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default", "labels": {"istio-injection": "enabled"}}}))
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || c.logged(0, "pod enrolled").len() >= enrolled + 2), "{}", logs(&c));
    assert!(eventually(Duration::from_secs(10), || b1_lines(&c, "pod enrolled") > enrolled_b), "{}", logs(&c));
    let (code, err) = c.curl("a2", &format!("http://{b1}:8080/"));
    assert_eq!(code, 200, "curl a2 -> b1: {err}\n{}", logs(&c));
}
