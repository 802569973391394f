//! The zero-trust mesh across nodes: two node agents, two pods each,
//! unmodified clients, HBONE between the nodes. Every test runs in eBPF and
//! in iptables capture. The agents hold no CA key: every certificate comes
//! from a CA service (`redirector ca serve`) over Istio's certificate API,
//! as in a cluster ([`Cluster::with_ca_service`]).

use std::time::Duration;

use redirector_tests::cluster::{pcap_contains, Cluster};
use redirector_tests::{eventually, privileged};

macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod ebpf {
            $( #[test] fn $name() { if super::privileged() { super::$name("ebpf") } } )*
        }
        mod iptables {
            $( #[test] fn $name() { if super::privileged() { super::$name("iptables") } } )*
        }
    };
}

in_both_modes!(
    cross_node_request_goes_through_hbone,
    link_carries_only_tls,
    a_peer_with_the_wrong_identity_is_refused,
    source_identity_is_logged_and_labelled,
    certificate_rotation_keeps_long_lived_connections,
    strict_refuses_plaintext_and_permissive_accepts_it,
    authorization_policies_deny_and_allow,
    pod_inbound_is_steered_and_fails_closed_while_the_agent_is_down,
    a_server_first_protocol_to_a_service_is_not_held_for_sniffing,
    connections_to_a_pods_own_proxy_ports_are_refused_at_once,
    a_dual_stack_pod_under_strict_refuses_plaintext_on_both_families,
    a_takeover_on_either_node_fails_no_cross_node_connection,
);

fn cross_node_request_goes_through_hbone(mode: &'static str) {
    let mut c = Cluster::with_ca_service(mode).unwrap();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    let b1 = c.pod("b1").ip.clone();
    let (code, err) = c.curl("a1", &format!("http://{b1}:8080/"));
    assert_eq!(
        code,
        200,
        "curl from a1 to b1 failed: {err}\nnode-a: {}\nnode-b: {}",
        std::fs::read_to_string(&c.nodes[0].log).unwrap(),
        std::fs::read_to_string(&c.nodes[1].log).unwrap()
    );
    // node-a carried it over HBONE, node-b received it from a1's identity.
    assert!(eventually(Duration::from_secs(5), || !c.logged(1, "HBONE connection closed").is_empty()));
    let inbound = &c.logged(1, "HBONE connection closed")[0];
    assert_eq!(inbound["fields"]["source_principal"], "spiffe://cluster.local/ns/default/sa/sa-a1");
    // Both sides' certificates came from the CA service: the agents' own,
    // their gateways' and the four pods' identities, and no node holds a
    // CA key.
    let issued = || c.ca_counter(0, "redirector_ca_certificates_issued_total");
    assert!(eventually(Duration::from_secs(10), || issued() >= 8), "the CA issued {}: {}", issued(), c.ca_metrics(0));
    for n in &c.nodes {
        let keys = std::process::Command::new("find")
            .arg(n.state.parent().unwrap())
            .args(["-name", "*key*.pem"])
            .output()
            .unwrap();
        assert!(keys.stdout.is_empty(), "{} holds a key file: {}", n.name, String::from_utf8_lossy(&keys.stdout));
    }
    // The CA signs with an intermediate whose root is offline: b1's proxy
    // presents its leaf and that intermediate, and a peer trusting only
    // the root accepts it (it just did, for a1).
    use redirector_tests::hbone_client as hc;
    let a1 = redirector::identity::Identity::new("cluster.local", "default", "sa-a1");
    let now = std::time::SystemTime::now();
    let cert = hc::certificate(&c.ca_dir, "cluster.local", &a1, now, now + Duration::from_hours(1)).unwrap();
    let hbone: std::net::SocketAddr = format!("{b1}:15008").parse().unwrap();
    let node_a = redirector_tests::cluster::ns_path(&c.nodes[0].ns);
    let presented = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let tls = hc::tls(hc::connect_from(&node_a, hbone).unwrap(), cert).await.unwrap();
        tls.get_ref().1.peer_certificates().map(<[_]>::to_vec).unwrap_or_default()
    });
    let intermediate = std::fs::read_to_string(c.ca_dir.join("ca-cert.pem")).unwrap();
    assert_eq!(presented.len(), 2, "leaf and intermediate");
    assert_eq!(redirector_tests::pem_der(&intermediate), presented[1].as_ref(), "the intermediate follows the leaf");
}

/// The node-to-node link carries TLS only: none of the request's bytes, and
/// TLS application-data records on 15008.
fn link_carries_only_tls(mode: &'static str) {
    let mut c = Cluster::with_ca_service(mode).unwrap();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    let pcap = c.dir.join("link0.pcap");
    let mut dump = c
        .in_node(
            0,
            "tcpdump",
            &["--immediate-mode", "-Z", "root", "-i", "link0", "-U", "-s", "0", "-w", pcap.to_str().unwrap(), "tcp"],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tcpdump (apt-get install tcpdump)");
    // tcpdump says "listening on" once capturing.
    let err = dump.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(err));
    let mut said = String::new();
    for l in lines.by_ref() {
        let l = l.unwrap_or_default();
        said.push_str(&l);
        if l.contains("listening on") {
            break;
        }
    }
    assert!(said.contains("listening on"), "tcpdump did not start: {said}");
    std::thread::spawn(move || for _ in lines {});
    let marker = "plaintext-marker-7f3a9c";
    let b1 = c.pod("b1").ip.clone();
    let (code, e) = c.curl("a1", &format!("http://{b1}:8080/{marker}?q={marker}"));
    assert_eq!(code, 200, "{e}");
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: plain signal send.
    unsafe { libc::kill(dump.id() as i32, libc::SIGINT) };
    let _ = dump.wait();
    let data = std::fs::read(&pcap).unwrap();
    assert!(data.len() > 200, "tcpdump captured nothing ({} bytes)", data.len());
    assert!(!pcap_contains(&pcap, marker.as_bytes()), "the request's plaintext crossed the node link");
    assert!(!pcap_contains(&pcap, b"GET /"), "an HTTP request line crossed the node link");
    // TLS 1.3 application data records (type 23, legacy version 3.3).
    assert!(pcap_contains(&pcap, &[0x17, 0x03, 0x03]), "no TLS application data on the link");
    // Port 15008 (0x3aa0) in the TCP headers.
    assert!(pcap_contains(&pcap, &[0x3a, 0xa0]), "no traffic to 15008 on the link");
}

/// A destination whose proxy presents another identity than the one its
/// service account gives is refused: the client's proxy ends the TLS
/// handshake, the request fails, the log names both identities. The
/// agents sign with a CA key here: node-b plays a node that mints what it
/// likes (a CA service refuses it the identity; `ca.rs` tests that).
fn a_peer_with_the_wrong_identity_is_refused(mode: &'static str) {
    let mut c = Cluster::new(mode).unwrap();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    // node-b now believes b1 runs as another service account, so its proxy
    // presents that identity; node-a still expects sa-b1.
    let mut yaml = c.mesh_yaml();
    let b1 = c.pods.iter().find(|p| p.name == "b1").unwrap();
    yaml = yaml.replace(&c.pod_yaml(b1, "sa-b1"), &c.pod_yaml(b1, "impostor"));
    c.write_mesh(1, &yaml);
    assert!(
        eventually(Duration::from_secs(10), || c.logged(1, "pod enrolled").len() >= 3),
        "node-b did not re-enroll b1"
    );
    let ip = c.pod("b1").ip.clone();
    let (code, _) = c.curl("a1", &format!("http://{ip}:8080/"));
    assert_ne!(code, 200, "a request reached a peer presenting the wrong identity");
    let failed = c.logged(0, "upstream connect failed");
    let why = failed.last().map(|l| l["fields"]["error"].to_string()).unwrap_or_default();
    assert!(
        why.contains("spiffe://cluster.local/ns/default/sa/impostor") && why.contains("sa-b1"),
        "node-a's log does not name the identities: {why}"
    );
    // The other pod on node-b is unaffected.
    c.start_nginx("b2", 8080).unwrap();
    let ip2 = c.pod("b2").ip.clone();
    assert_eq!(c.curl("a1", &format!("http://{ip2}:8080/")).0, 200);
}

/// Source identity in the destination's access log and in metric labels on
/// both sides.
fn source_identity_is_logged_and_labelled(mode: &'static str) {
    let mut c = Cluster::with_ca_service(mode).unwrap();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    let ip = c.pod("b1").ip.clone();
    for _ in 0..3 {
        assert_eq!(c.curl("a2", &format!("http://{ip}:8080/")).0, 200);
    }
    assert!(eventually(Duration::from_secs(5), || c.logged(1, "HBONE connection closed").len() >= 3));
    for l in c.logged(1, "HBONE connection closed") {
        assert_eq!(l["fields"]["source_principal"], "spiffe://cluster.local/ns/default/sa/sa-a2", "{l}");
        assert_eq!(l["target"], "access");
    }
    let dst = c.metrics(1);
    let line = dst
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_closed_total{") && l.contains("reporter=\"destination\""))
        .unwrap_or_else(|| panic!("no destination TCP series: {dst}"));
    assert!(line.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/sa-a2\""), "{line}");
    assert!(line.contains("destination_principal=\"spiffe://cluster.local/ns/default/sa/sa-b1\""), "{line}");
    assert!(line.contains("connection_security_policy=\"mutual_tls\""), "{line}");
    assert!(line.ends_with(" 3"), "{line}");
    let src = c.metrics(0);
    let line = src
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_closed_total{") && l.contains("reporter=\"source\""))
        .unwrap_or_else(|| panic!("no source TCP series: {src}"));
    assert!(line.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/sa-a2\""), "{line}");
    assert!(line.contains("source_workload=\"a2\""), "{line}");
    assert!(line.contains("destination_principal=\"spiffe://cluster.local/ns/default/sa/sa-b1\""), "{line}");
}

/// Workload certificates live 4 s here: several rotations happen while one
/// connection stays open and keeps exchanging bytes; new connections after
/// the rotations work too.
fn certificate_rotation_keeps_long_lived_connections(mode: &'static str) {
    let mut c = Cluster::with_ca_service(mode).unwrap();
    c.mesh_settings = "  certLifetime: 4s\n".into();
    c.start().unwrap();
    let b1 = c.pod("b1").ip.clone();
    let mut open = c.long_lived_connection("a1", "b1", 7000).unwrap();
    let rotated = |c: &Cluster| {
        c.logged(0, "workload certificate rotated").len() + c.logged(1, "workload certificate rotated").len()
    };
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(9) {
        open.exchange().unwrap_or_else(|e| panic!("{e} ({:?} in)", started.elapsed()));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(rotated(&c) >= 2, "no certificate rotation happened during the connection");
    drop(open);
    // New connections use the new certificates.
    c.start_nginx("b1", 8080).unwrap();
    assert_eq!(c.curl("a2", &format!("http://{b1}:8080/")).0, 200);
}

/// A client outside the mesh (in node-b's own namespace) dials the app's
/// port directly: PERMISSIVE (the default) lets it in, STRICT refuses it,
/// while a mesh client keeps working.
fn strict_refuses_plaintext_and_permissive_accepts_it(mode: &'static str) {
    let mut c = Cluster::with_ca_service(mode).unwrap();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    let url = format!("http://{}:8080/", c.pod("b1").ip);
    let outside = |c: &Cluster| {
        let out =
            c.output(c.in_node(1, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", &url]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(outside(&c), "200", "PERMISSIVE must accept a plaintext client");
    assert!(eventually(Duration::from_secs(3), || !c.logged(1, "plaintext connection closed").is_empty()));
    c.extra_yaml = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRICT}}\n".into();
    let yaml = c.mesh_yaml();
    c.write_mesh(0, &yaml);
    c.write_mesh(1, &yaml);
    assert!(eventually(Duration::from_secs(5), || !c.logged(1, "mesh config applied").is_empty()));
    assert_ne!(outside(&c), "200", "STRICT must refuse a plaintext client");
    let denied = c.logged(1, "connection denied by policy");
    assert!(denied.iter().any(|l| l["fields"]["reason"].as_str().unwrap_or_default().contains("STRICT")), "{denied:?}");
    assert_eq!(c.curl("a1", &url).0, 200, "a mesh client must still get through under STRICT");
    assert!(c
        .metrics(1)
        .lines()
        .any(|l| l.starts_with("redirector_policy_denied_total{") && l.contains("source_principal=\"unknown\"")));
}

/// A dual-stack pod (IPv4 and IPv6 in `podIPs`, and a second IPv6 address
/// the API does not list): every one of its addresses is steered to the
/// proxy. PERMISSIVE carries a plaintext client on each (seen by the
/// proxy); STRICT refuses it on each, while a mesh client keeps working.
fn a_dual_stack_pod_under_strict_refuses_plaintext_on_both_families(mode: &'static str) {
    let mut c = Cluster::with_ca_service(mode).unwrap();
    let (listed, unlisted) = c.dual_stack("b1").unwrap();
    let dual_a1 = c.dual_stack("a1").unwrap();
    c.dual_stack("a2").unwrap();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    let v4 = c.pod("b1").ip.clone();
    let urls = [format!("http://{v4}:8080/"), format!("http://[{listed}]:8080/"), format!("http://[{unlisted}]:8080/")];
    let outside = |c: &Cluster, url: &str| {
        let args = ["-g", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url];
        String::from_utf8_lossy(&c.output(c.in_node(1, "curl", &args)).stdout).trim().to_string()
    };
    let seen = |c: &Cluster, message: &str, dst: &str| {
        c.logged(1, message).iter().any(|l| l["fields"]["dst"].as_str().is_some_and(|d| d.contains(dst)))
    };
    for (url, addr) in urls.iter().zip([&v4, &listed, &unlisted]) {
        assert_eq!(outside(&c, url), "200", "PERMISSIVE must carry a plaintext client to {url}");
        assert!(
            eventually(Duration::from_secs(3), || seen(&c, "plaintext connection closed", addr)),
            "the proxy did not carry the plaintext connection to {addr}: it reached the app past the mesh"
        );
    }
    c.extra_yaml = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRICT}}\n".into();
    let yaml = c.mesh_yaml();
    c.write_mesh(0, &yaml);
    c.write_mesh(1, &yaml);
    assert!(eventually(Duration::from_secs(5), || !c.logged(1, "mesh config applied").is_empty()));
    for (url, addr) in urls.iter().zip([&v4, &listed, &unlisted]) {
        assert_ne!(outside(&c, url), "200", "STRICT must refuse a plaintext client to {url}");
        assert!(
            eventually(Duration::from_secs(3), || seen(&c, "connection denied by policy", addr)),
            "no STRICT refusal logged for {addr}"
        );
    }
    assert_eq!(c.curl("a1", &urls[0]).0, 200, "a mesh client must still get through under STRICT");

    // And out: a dual-stack pod's IPv6 connects are captured and carried
    // over HBONE to a dual-stack pod of its node, which STRICT admits.
    let a1_v6 = dual_a1.0.clone();
    c.start_nginx("a1", 8080).unwrap();
    let (code, err) = c.curl("a2", &format!("http://[{a1_v6}]:8080/"));
    assert_eq!(code, 200, "a2 -> a1 over IPv6: {err}");
    assert!(
        eventually(Duration::from_secs(3), || c
            .logged(0, "HBONE connection closed")
            .iter()
            .any(|l| l["fields"]["dst"].as_str().is_some_and(|d| d.contains(&a1_v6)))),
        "the IPv6 connection did not go over HBONE"
    );
}

/// DENY blocks the principal it names; ALLOW admits only its principals.
/// Denials are logged with the peer identity and counted.
fn authorization_policies_deny_and_allow(mode: &'static str) {
    let mut c = Cluster::with_ca_service(mode).unwrap();
    c.extra_yaml = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-a2, namespace: default}\nspec:\n  selector: {matchLabels: {app: b1}}\n  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/sa-a2]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-a1, namespace: default}\nspec:\n  selector: {matchLabels: {app: b2}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/sa-a1]}}]\n    to: [{operation: {ports: [\"8080\"]}}]\n".into();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    c.start_nginx("b2", 8080).unwrap();
    let b1 = format!("http://{}:8080/", c.pod("b1").ip);
    let b2 = format!("http://{}:8080/", c.pod("b2").ip);
    assert_eq!(c.curl("a1", &b1).0, 200, "DENY names sa-a2 only");
    assert_ne!(c.curl("a2", &b1).0, 200, "DENY must block sa-a2");
    assert_eq!(c.curl("a1", &b2).0, 200, "ALLOW admits sa-a1");
    assert_ne!(c.curl("a2", &b2).0, 200, "ALLOW admits nobody else");
    let denied = c.logged(1, "connection denied by policy");
    assert!(
        denied.iter().any(|l| l["fields"]["peer_identity"] == "spiffe://cluster.local/ns/default/sa/sa-a2"
            && l["fields"]["reason"].as_str().unwrap_or_default().contains("deny-a2")),
        "{denied:?}"
    );
    assert!(
        denied.iter().any(|l| l["fields"]["reason"].as_str().unwrap_or_default().contains("allow-a1")),
        "{denied:?}"
    );
    let m = c.metrics(1);
    let line = m
        .lines()
        .find(|l| {
            l.starts_with("redirector_policy_denied_total{")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/sa-a2\"")
        })
        .unwrap_or_else(|| panic!("{m}"));
    assert!(line.ends_with(" 1"), "{line}");
}

/// Inbound steering: eBPF mode does it with the sk_lookup program attached
/// to the pod's namespace (no netfilter rule there), iptables mode with a
/// nat PREROUTING chain. Either way a plaintext client reaches the proxy's
/// inbound listener, and while the node's agent is down (killed, or
/// stopped cleanly) it does not reach the app past the mesh: the steering
/// stays and has no listener to hand the connection to, and the pod's own
/// connects are refused. A restarted agent takes over.
fn pod_inbound_is_steered_and_fails_closed_while_the_agent_is_down(mode: &'static str) {
    let mut c = Cluster::with_ca_service(mode).unwrap();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    let url = format!("http://{}:8080/", c.pod("b1").ip);
    let outside = |c: &Cluster| {
        let out =
            c.output(c.in_node(1, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", &url]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let b1_ns = redirector_tests::cluster::ns_path(&c.pod("b1").ns);
    let nat = std::process::Command::new("nsenter")
        .arg(format!("--net={}", b1_ns.display()))
        .args(["iptables-save", "-t", "nat"])
        .output()
        .unwrap();
    let nat = String::from_utf8_lossy(&nat.stdout).into_owned();
    let links: Vec<String> = std::fs::read_dir(c.nodes[1].bpffs.join("links"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    if mode == "ebpf" {
        assert!(!nat.contains("REDIRECTOR"), "eBPF mode must not need netfilter in the pod:\n{nat}");
        assert_eq!(
            links.iter().filter(|l| l.starts_with("pod-inbound-")).count(),
            2,
            "one sk_lookup link per pod of node-b: {links:?}"
        );
    } else {
        assert!(nat.contains("REDIRECTOR_POD_INBOUND"), "{nat}");
    }
    assert_eq!(outside(&c), "200", "PERMISSIVE lets a plaintext client in, through the proxy");
    assert!(
        eventually(Duration::from_secs(3), || !c.logged(1, "plaintext connection closed").is_empty()),
        "the plaintext client must have gone through the proxy"
    );

    c.kill_agent(1);
    assert_ne!(outside(&c), "200", "with the agent down, a plaintext client must not reach the app directly");

    c.start_agent(1).unwrap();
    assert!(
        eventually(Duration::from_secs(15), || outside(&c) == "200"),
        "a restarted agent takes the pod's inbound over again"
    );
    // A pod's capture goes only when it leaves the mesh (here: its
    // namespace's label), and comes back when it returns.
    let carried = |c: &Cluster| c.logged(1, "plaintext connection closed").len();
    let yaml = c.mesh_yaml().replace("istio-injection: enabled", "istio-injection: disabled");
    c.write_mesh(1, &yaml);
    assert!(eventually(Duration::from_secs(5), || !c.logged(1, "pod left the mesh").is_empty()));
    std::thread::sleep(Duration::from_millis(300));
    let before = carried(&c);
    assert_eq!(outside(&c), "200", "a pod that left the mesh is reached directly");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(carried(&c), before, "a pod that left the mesh is no longer steered to the proxy");
    c.write_mesh(1, &c.mesh_yaml());
    assert!(eventually(Duration::from_secs(15), || outside(&c) == "200" && carried(&c) > before));

    // H3: a clean stop (SIGTERM: a rollout, a drain) fails closed too.
    // The inbound steering stays, and so does the pod's outbound capture:
    // its connects are refused at once instead of leaving around the mesh.
    c.stop_agent(1);
    assert_ne!(outside(&c), "200", "after a clean stop, a plaintext client must not reach the app directly");
    let a1 = format!("http://{}:8080/", c.pod("a1").ip);
    c.start_nginx("a1", 8080).unwrap();
    let started = std::time::Instant::now();
    let (code, _) = c.curl("b2", &a1);
    assert_ne!(code, 200, "after a clean stop, a pod's connects must not bypass the mesh");
    assert!(started.elapsed() < Duration::from_secs(2), "a refused connect must not hang: {:?}", started.elapsed());
    c.start_agent(1).unwrap();
    assert!(eventually(Duration::from_secs(15), || outside(&c) == "200"), "the next agent serves the pod again");
    assert!(eventually(Duration::from_secs(15), || c.curl("b2", &a1).0 == 200));
}

// Bad input at the HBONE listener. What the listener does does not depend
// on how the pods' traffic is captured, so these run once (eBPF capture).

fn refusals(c: &Cluster, node: usize, reason: &str) -> u64 {
    let m = c.metrics(node);
    m.lines()
        .find(|l| l.starts_with("redirector_hbone_refused_total{") && l.contains(&format!("reason=\"{reason}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// An expired certificate and one from another CA are refused at the
/// handshake; a client that never finishes its handshake is cut off after
/// `mesh.handshakeTimeout`. Each is logged and counted, and the pod keeps
/// serving mesh clients.
#[test]
fn hbone_refuses_bad_certificates_and_stalled_handshakes() {
    if !privileged() {
        return;
    }
    use redirector::identity::Identity;
    use redirector_tests::hbone_client as hc;
    use std::time::{Instant, SystemTime};
    let mut c = Cluster::with_ca_service("ebpf").unwrap();
    c.mesh_settings = "  handshakeTimeout: 1s\n".into();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    let hbone: std::net::SocketAddr = format!("{}:15008", c.pod("b1").ip).parse().unwrap();
    let node_a = redirector_tests::cluster::ns_path(&c.nodes[0].ns);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a1 = Identity::new("cluster.local", "default", "sa-a1");
    let day = Duration::from_hours(24);
    let now = SystemTime::now();

    // Expired: signed by the mesh CA, but over since yesterday.
    let expired = hc::certificate(&c.ca_dir, "cluster.local", &a1, now - 2 * day, now - day).unwrap();
    let refused = rt.block_on(async {
        match hc::tls(hc::connect_from(&node_a, hbone).unwrap(), expired).await {
            Ok(mut s) => hc::closed_by_server(&mut s, Duration::from_secs(3)).await,
            Err(_) => true,
        }
    });
    assert!(refused, "an expired client certificate must be refused");
    assert!(eventually(Duration::from_secs(3), || c.logged(1, "HBONE handshake refused").iter().any(|l| l["fields"]
        ["error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase()
        .contains("expired"))));

    // Another trust domain under the mesh's own root (L2): not a member.
    let evil = Identity::new("evil.example", "default", "sa-a1");
    let other_domain = hc::certificate(&c.ca_dir, "evil.example", &evil, now - day, now + day).unwrap();
    let before = refusals(&c, 1, "foreign_trust_domain");
    let alert = rt.block_on(async {
        let mut s = hc::tls(hc::connect_from(&node_a, hbone).unwrap(), other_domain).await.unwrap();
        hc::alert_from_server(&mut s, Duration::from_secs(3)).await
    });
    // Refused in the handshake with a certificate alert, not a bare close.
    assert_eq!(alert, Some(rustls::AlertDescription::CertificateUnknown), "another trust domain");
    assert!(eventually(Duration::from_secs(3), || refusals(&c, 1, "foreign_trust_domain") > before));

    // Foreign: a valid certificate from a CA the mesh does not trust.
    let foreign_ca = c.dir.join("foreign-ca");
    assert!(std::process::Command::new(redirector_tests::redirector_bin())
        .arg("ca")
        .arg("create")
        .arg(&foreign_ca)
        .status()
        .unwrap()
        .success());
    let foreign = hc::certificate(&foreign_ca, "cluster.local", &a1, now - day, now + day).unwrap();
    let alert = rt.block_on(async {
        let mut s = hc::tls(hc::connect_from(&node_a, hbone).unwrap(), foreign).await.unwrap();
        hc::alert_from_server(&mut s, Duration::from_secs(3)).await
    });
    assert_eq!(alert, Some(rustls::AlertDescription::UnknownCA), "a certificate from a foreign CA");
    assert!(eventually(Duration::from_secs(3), || c.logged(1, "HBONE handshake refused").len() >= 2));
    assert!(refusals(&c, 1, "handshake") >= 2, "{}", c.metrics(1));

    // Stalled: TCP connected, not one TLS byte sent.
    let mut stalled = hc::connect_from(&node_a, hbone).unwrap();
    stalled.set_nonblocking(false).unwrap();
    stalled.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let t = Instant::now();
    let mut b = [0u8; 16];
    let n = std::io::Read::read(&mut stalled, &mut b);
    assert!(
        matches!(n, Ok(0) | Err(_)) && t.elapsed() < Duration::from_secs(6),
        "the server must close a stalled handshake: {n:?} after {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() >= Duration::from_millis(800), "closed before the timeout: {:?}", t.elapsed());
    assert!(eventually(Duration::from_secs(3), || !c.logged(1, "HBONE handshake did not complete").is_empty()));
    assert!(refusals(&c, 1, "handshake_timeout") >= 1, "{}", c.metrics(1));

    // The pod's mesh clients never noticed.
    let (code, err) = c.curl("a1", &format!("http://{}:8080/", c.pod("b1").ip));
    assert_eq!(code, 200, "{err}");

    // A peer offering only the post-quantum hybrid (ztunnel under
    // COMPLIANCE_POLICY=pqc) is served, and the hybrid is what was used.
    let b1_app: std::net::SocketAddr = format!("{}:8080", c.pod("b1").ip).parse().unwrap();
    let valid = hc::certificate(&c.ca_dir, "cluster.local", &a1, now - day, now + day).unwrap();
    let (group, status) = rt
        .block_on(hc::connect_offering(
            &node_a,
            hbone,
            valid,
            &[rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768],
            b1_app,
        ))
        .unwrap();
    assert_eq!(group.as_deref(), Some("X25519MLKEM768"));
    assert_eq!(status, 200, "CONNECT over X25519MLKEM768");
}

/// `mesh.compliancePolicy: pqc` (Istio's COMPLIANCE_POLICY=pqc): the agents
/// speak only X25519MLKEM768, between themselves and to any peer; a peer
/// offering only X25519 is refused in the handshake, logged and counted.
#[test]
fn the_pqc_compliance_policy_allows_only_the_hybrid_key_exchange() {
    if !privileged() {
        return;
    }
    use redirector::identity::Identity;
    use redirector_tests::hbone_client as hc;
    use rustls::crypto::aws_lc_rs::kx_group;
    use std::time::SystemTime;
    let mut c = Cluster::with_ca_service("ebpf").unwrap();
    c.mesh_settings = "  compliancePolicy: pqc\n".into();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    assert!(!c.logged(1, "compliance policy pqc").is_empty(), "the agent must say it runs under pqc");
    // Agent to agent, under the policy on both sides.
    let (code, err) = c.curl("a1", &format!("http://{}:8080/", c.pod("b1").ip));
    assert_eq!(code, 200, "{err}");

    let hbone: std::net::SocketAddr = format!("{}:15008", c.pod("b1").ip).parse().unwrap();
    let b1_app: std::net::SocketAddr = format!("{}:8080", c.pod("b1").ip).parse().unwrap();
    let node_a = redirector_tests::cluster::ns_path(&c.nodes[0].ns);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a1 = Identity::new("cluster.local", "default", "sa-a1");
    let now = SystemTime::now();
    let hour = Duration::from_hours(1);
    let cert = hc::certificate(&c.ca_dir, "cluster.local", &a1, now - hour, now + hour).unwrap();

    // A client offering the hybrid and X25519 (the default) gets the hybrid.
    let default_groups = rustls::crypto::aws_lc_rs::DEFAULT_KX_GROUPS;
    let (group, status) = rt
        .block_on(hc::connect_offering(&node_a, hbone, std::sync::Arc::clone(&cert), default_groups, b1_app))
        .unwrap();
    assert_eq!((group.as_deref(), status), (Some("X25519MLKEM768"), 200));

    // X25519 only: no group in common, refused before any certificate.
    let before = refusals(&c, 1, "handshake");
    let x25519 = rt.block_on(async {
        let tcp = hc::connect_from(&node_a, hbone).unwrap();
        hc::tls_offering(tcp, std::sync::Arc::clone(&cert), &[kx_group::X25519]).await.map(|_| ())
    });
    let e = x25519.expect_err("an X25519-only client must be refused under pqc");
    let alert = e.get_ref().and_then(|x| x.downcast_ref::<rustls::Error>()).cloned();
    assert_eq!(alert, Some(rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure)), "{e}");
    assert!(eventually(Duration::from_secs(3), || refusals(&c, 1, "handshake") > before), "{}", c.metrics(1));
    assert!(c.logged(1, "HBONE handshake refused").iter().any(|l| l["fields"]["error"]
        .as_str()
        .unwrap_or_default()
        .contains("NoKxGroupsInCommon")
        || l["fields"]["error"].as_str().unwrap_or_default().contains("no kx group")));
}

/// A mesh peer that asks to CONNECT to an address that is not the pod's is
/// refused (no open relay); one that floods a connection with streams it
/// resets loses that connection. Both are logged and counted; the pod's
/// other peers are unaffected.
#[test]
fn hbone_refuses_foreign_destinations_and_stream_floods() {
    if !privileged() {
        return;
    }
    use redirector::identity::Identity;
    use redirector_tests::hbone_client as hc;
    use std::time::SystemTime;
    let mut c = Cluster::with_ca_service("ebpf").unwrap();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    c.start_nginx("b2", 8080).unwrap();
    let b1_app: std::net::SocketAddr = format!("{}:8080", c.pod("b1").ip).parse().unwrap();
    let b2_app: std::net::SocketAddr = format!("{}:8080", c.pod("b2").ip).parse().unwrap();
    let hbone: std::net::SocketAddr = format!("{}:15008", c.pod("b1").ip).parse().unwrap();
    let node_a = redirector_tests::cluster::ns_path(&c.nodes[0].ns);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a1 = Identity::new("cluster.local", "default", "sa-a1");
    let now = SystemTime::now();
    let hour = Duration::from_hours(1);
    let cert = hc::certificate(&c.ca_dir, "cluster.local", &a1, now - hour, now + hour).unwrap();

    let (relay, own) = rt.block_on(async {
        let tls = hc::tls(hc::connect_from(&node_a, hbone).unwrap(), std::sync::Arc::clone(&cert)).await.unwrap();
        let mut h2 = hc::h2(tls).await.unwrap();
        // b2's address through b1's listener: not b1's to give.
        let relay = hc::connect(&mut h2, b2_app).await.unwrap();
        // The same connection still works for b1's own address.
        let own = hc::connect(&mut h2, b1_app).await.unwrap();
        (relay, own)
    });
    assert_eq!(relay, 400, "CONNECT to another pod's address must be refused");
    assert_eq!(own, 200, "CONNECT to the pod's own address must work");
    assert!(eventually(Duration::from_secs(3), || !c
        .logged(1, "HBONE CONNECT to an address that is not this workload's")
        .is_empty()));
    assert!(refusals(&c, 1, "not_local") >= 1, "{}", c.metrics(1));

    // The flood: streams opened and reset as fast as the client can.
    let (sent, closed) = rt.block_on(async {
        let tls = hc::tls(hc::connect_from(&node_a, hbone).unwrap(), std::sync::Arc::clone(&cert)).await.unwrap();
        let h2 = hc::h2(tls).await.unwrap();
        let probe = h2.clone();
        let sent = hc::flood(h2, b1_app, 5000).await;
        // The server has ended the connection: no new stream gets through.
        let mut probe = probe;
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if hc::connect(&mut probe, b1_app).await.is_err() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .unwrap_or(false);
        (sent, closed)
    });
    assert!(closed, "the flooding connection must be closed by the server (sent {sent} resets)");
    assert!(
        eventually(Duration::from_secs(3), || !c
            .logged(1, "HBONE connection closed on an HTTP/2 protocol error")
            .is_empty()),
        "{}",
        std::fs::read_to_string(&c.nodes[1].log).unwrap()
    );
    assert!(refusals(&c, 1, "h2_protocol_error") >= 1, "{}", c.metrics(1));

    let (code, err) = c.curl("a1", &format!("http://{b1_app}/"));
    assert_eq!(code, 200, "{err}");
}

/// A stopping agent says goodbye on every HBONE connection it serves:
/// HTTP/2 GOAWAY, then TLS close_notify, so a peer (ours, ztunnel) moves
/// new streams to a new connection without an error. Capture plays no part
/// here: eBPF only.
#[test]
fn a_stopping_agent_sends_goaway_then_close_notify_on_hbone() {
    if !privileged() {
        return;
    }
    use redirector_tests::hbone_client as hc;
    let mut c = Cluster::with_ca_service("ebpf").unwrap();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    let hbone: std::net::SocketAddr = format!("{}:15008", c.pod("b1").ip).parse().unwrap();
    let b1_app: std::net::SocketAddr = format!("{}:8080", c.pod("b1").ip).parse().unwrap();
    let node_a = redirector_tests::cluster::ns_path(&c.nodes[0].ns);
    let a1 = redirector::identity::Identity::new("cluster.local", "default", "sa-a1");
    let now = std::time::SystemTime::now();
    let cert = hc::certificate(&c.ca_dir, "cluster.local", &a1, now, now + Duration::from_hours(1)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (send, conn) = rt.block_on(async {
        let tls = hc::tls(hc::connect_from(&node_a, hbone).unwrap(), cert).await.unwrap();
        let (mut send, conn) = hc::h2_watched(tls).await.unwrap();
        assert_eq!(hc::connect(&mut send, b1_app).await.unwrap(), 200);
        (send, conn)
    });
    let stopped = std::time::Instant::now();
    c.stop_agent(1);
    let ended = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), conn).await });
    let ended = ended.expect("the server did not end the HBONE connection").unwrap();
    assert!(ended.is_ok(), "the HBONE connection did not end cleanly (GOAWAY, close_notify): {ended:?}");
    let refused = rt.block_on(async { send.ready().await.map(|_| ()) }).expect_err("a stream after the goodbye");
    assert!(refused.is_go_away(), "the connection ended without GOAWAY: {refused:?}");
    assert_eq!(refused.reason(), Some(h2::Reason::NO_ERROR), "{refused:?}");
    assert!(stopped.elapsed() < Duration::from_secs(5), "{:?}", stopped.elapsed());
}

/// A server-first protocol (SMTP, MySQL: the server speaks first) to a
/// Service port that declares no protocol. In a pod the node proxy is L4,
/// so it does not wait for the client's first bytes to guess the protocol
/// (as it does where it may route HTTP itself: up to 100 ms): the greeting
/// comes through at once, the client having sent nothing.
fn a_server_first_protocol_to_a_service_is_not_held_for_sniffing(mode: &'static str) {
    let mut c = Cluster::with_ca_service(mode).unwrap();
    let b1 = c.pod("b1").ip.clone();
    let vip = "198.18.3.10";
    // No port name, no appProtocol: the protocol is left to sniffing.
    c.extra_yaml = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: greeter, namespace: default}}\nspec:\n  clusterIP: {vip}\n  ports: [{{port: 7070}}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: greeter, namespace: default}}\nsubsets:\n- addresses: [{{ip: {b1}}}]\n  ports: [{{port: 7070}}]\n"
    );
    c.start().unwrap();
    let server = format!(
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('{b1}', 7070))\ns.listen(16)\nwhile True:\n    c, _ = s.accept()\n    c.sendall(b'220 greeter ready\\r\\n')\n    c.close()\n"
    );
    // Ended with the pod's cgroup when the cluster goes, also on a failure.
    let mut server = c.in_pod("b1", "python3", &["-c", &server]).spawn().expect("python3");
    c.wait_listening("b1", 7070).unwrap();
    // The first connection also opens the pooled HBONE connection; the
    // second is timed.
    let client = format!(
        "import socket, time\nfor i in range(2):\n    s = socket.create_connection(('{vip}', 7070), timeout=5)\n    t = time.monotonic()\n    g = s.recv(64)\n    ms = (time.monotonic() - t) * 1000\n    s.close()\nprint(g.decode().strip(), round(ms, 1))\n"
    );
    let out = c.output(c.in_pod("a1", "python3", &["-c", &client]));
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(out.status.success(), "client failed: {said} {}", String::from_utf8_lossy(&out.stderr));
    let (greeting, ms) = said.rsplit_once(' ').expect("greeting and time");
    assert_eq!(greeting, "220 greeter ready");
    let ms: f64 = ms.parse().unwrap();
    assert!(ms < 80.0, "the greeting took {ms} ms: the proxy waited for the client to speak first");
    // Carried over HBONE to b1.
    assert!(eventually(Duration::from_secs(5), || !c.logged(1, "HBONE connection closed").is_empty()));
    let _ = server.kill();
    let _ = server.wait();
}

/// `proxy.accessLog: false` turns off the per-connection access lines on
/// both sides, as Istio's empty `accessLogFile` turns off TCP entries too;
/// the connection works and the metrics count it all the same. (The
/// capture mode plays no part: eBPF only.)
#[test]
fn access_log_off_silences_connection_lines() {
    if !privileged() {
        return;
    }
    let mut c = Cluster::with_ca_service("ebpf").unwrap();
    c.proxy_settings = "  accessLog: false\n".into();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    let ip = c.pod("b1").ip.clone();
    for _ in 0..2 {
        assert_eq!(c.curl("a1", &format!("http://{ip}:8080/")).0, 200);
    }
    let closed = |node: usize, reporter: &str| {
        c.metrics(node)
            .lines()
            .find(|l| {
                l.starts_with("istio_tcp_connections_closed_total{") && l.contains(&format!("reporter=\"{reporter}\""))
            })
            .is_some_and(|l| l.ends_with(" 2"))
    };
    assert!(
        eventually(Duration::from_secs(5), || closed(0, "source") && closed(1, "destination")),
        "metrics: {}",
        c.metrics(1)
    );
    for node in 0..2 {
        let access: Vec<_> = c.log_lines(node).into_iter().filter(|l| l["target"] == "access").collect();
        assert!(access.is_empty(), "node {node} wrote access lines with accessLog off: {access:?}");
    }
}

/// H4: connections to a pod's address on the proxy's own ports. 20
/// plaintext connections from the node to the pod's 15006 (which steering
/// leaves alone, so they land on the proxy's listener as if captured) and
/// one each to its 15001, 15020 and 15021, and CONNECTs to the pod's 15008
/// and 15006 from a mesh peer: each ends in exactly one refusal, and the
/// proxy makes no connection to itself (before this check, 20 such
/// connections made it dial itself about 200,000 times).
fn connections_to_a_pods_own_proxy_ports_are_refused_at_once(mode: &'static str) {
    use redirector::identity::Identity;
    use redirector_tests::hbone_client as hc;
    use std::time::{Instant, SystemTime};
    let mut c = Cluster::with_ca_service(mode).unwrap();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    let b1 = c.pod("b1").ip.clone();
    let node_a = redirector_tests::cluster::ns_path(&c.nodes[0].ns);
    let node_b = redirector_tests::cluster::ns_path(&c.nodes[1].ns);
    let log = |c: &Cluster| std::fs::read_to_string(&c.nodes[1].log).unwrap();
    let closed_soon = |mut s: std::net::TcpStream| {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let t = Instant::now();
        let mut b = [0u8; 64];
        let _ = std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let n = std::io::Read::read(&mut s, &mut b);
        matches!(n, Ok(0) | Err(_)) && t.elapsed() < Duration::from_secs(2)
    };
    let mut plaintext = 0;
    for i in 0..23usize {
        let port = [15001, 15020, 15021].get(i.saturating_sub(20)).copied().filter(|_| i >= 20).unwrap_or(15006);
        let to: std::net::SocketAddr = format!("{b1}:{port}").parse().unwrap();
        // From node-b, where the pod's traffic is steered by its agent.
        // A port with nothing on it in the pod and nothing steered is
        // refused by the kernel, which is no self-call either.
        if let Ok(s) = hc::connect_from(&node_b, to) {
            assert!(closed_soon(s), "a connection to {to} was not closed at once");
            plaintext += 1;
        }
    }
    assert!(plaintext >= 20, "only {plaintext} connections reached the pod");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a1 = Identity::new("cluster.local", "default", "sa-a1");
    let now = SystemTime::now();
    let hour = Duration::from_hours(1);
    let cert = hc::certificate(&c.ca_dir, "cluster.local", &a1, now - hour, now + hour).unwrap();
    let hbone: std::net::SocketAddr = format!("{b1}:15008").parse().unwrap();
    let codes = rt.block_on(async {
        let tls = hc::tls(hc::connect_from(&node_a, hbone).unwrap(), cert).await.unwrap();
        let mut h2 = hc::h2(tls).await.unwrap();
        let mut codes = Vec::new();
        for port in [15008, 15006, 8080] {
            codes.push(hc::connect(&mut h2, format!("{b1}:{port}").parse().unwrap()).await.unwrap());
        }
        codes
    });
    assert_eq!(codes, vec![400, 400, 200], "CONNECT to 15008, 15006 (refused) and the app's 8080");
    std::thread::sleep(Duration::from_millis(500));
    let refused = c.logged(1, "connection to one of the proxy's own ports refused");
    let inbound = refused.iter().filter(|l| l["fields"]["listener"] == "inbound").count();
    let hbone_refused = refused.iter().filter(|l| l["fields"]["listener"] == "hbone").count();
    assert_eq!((inbound, hbone_refused), (plaintext, 2), "one refusal per attempt\n{}", log(&c));
    // Not one connection was carried to a proxy port: no access-log line
    // names one as its destination.
    let own = [":15001", ":15006", ":15008", ":15020", ":15021"];
    for l in c.logged(1, "plaintext connection closed").iter().chain(c.logged(1, "HBONE connection closed").iter()) {
        let dst = l["fields"]["dst"].as_str().unwrap_or_default();
        assert!(!own.iter().any(|p| dst.ends_with(p)), "carried to the proxy itself: {l}");
    }
    let m = c.metrics(1);
    let count = |listener: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("redirector_self_calls_refused_total{") && l.contains(&format!("listener=\"{listener}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
    };
    assert_eq!((count("inbound"), count("hbone")), (plaintext, 2), "{m}");
    let (code, err) = c.curl("a1", &format!("http://{b1}:8080/"));
    assert_eq!(code, 200, "{err}");
}

/// Run a `tests/scripts/flood.py` command to its end; its JSON.
fn flood(c: &Cluster, command: std::process::Command) -> serde_json::Value {
    let out = c.output(command);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

fn flood_script() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/flood.py").to_string()
}

/// The agent's peak resident memory (VmHWM) and open descriptors.
fn agent_memory_and_fds(c: &Cluster, node: usize) -> (u64, usize) {
    let pid = c.agent_pid(node).expect("the agent runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches(" kB");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    (hwm.parse::<u64>().unwrap() / 1024, fds)
}

/// M2, M3, M9: slow, idle and flooding clients cannot take the agent from
/// anyone else. 200 slowloris connections to the gateway and 200 to
/// 15020 are each closed at the header-read timeout while the gateway
/// and the metrics endpoint serve others; 10,000 idle TCP connections to
/// a pod's 15008 from one address are closed (over that peer's cap at
/// once, the rest at the handshake timeout) while another node's pods
/// still reach the pod; a flood of DNS queries for unknown names leaves
/// the agent's descriptors bounded and mesh names answered. One capture
/// mode: these are the proxy's own listeners.
#[test]
fn slow_idle_and_flooding_clients_leave_the_agent_serving() {
    if !privileged() {
        return;
    }
    let mut c = Cluster::with_ca_service("ebpf").unwrap();
    c.proxy_settings = "  headerReadTimeout: 2s\n".into();
    c.mesh_settings = "  handshakeTimeout: 2s\n".into();
    let b1 = c.pod("b1").ip.clone();
    c.extra_yaml = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: 198.18.3.60\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: web, namespace: default}}\nsubsets:\n- addresses: [{{ip: {b1}}}]\n  ports: [{{name: http, port: 8080}}]\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: edge, namespace: default}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers: [{{port: {{number: 8081, name: http, protocol: HTTP}}, hosts: ['*']}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: edge, namespace: default}}\nspec:\n  hosts: ['*']\n  gateways: [edge]\n  http: [{{route: [{{destination: {{host: web}}}}]}}]\n"
    );
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    c.start_nginx("a1", 8080).unwrap();
    let logs = |c: &Cluster| std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default();
    let node_ip = |c: &Cluster, n: usize| c.nodes[n].ip.clone();
    let (_, fds_before) = agent_memory_and_fds(&c, 0);

    // Slowloris on the gateway and on 15020 (node-a's host addresses).
    for port in ["8081", "15020"] {
        let ip = node_ip(&c, 0);
        let mut attack = c.in_node(1, "python3", &[&flood_script(), "slow", &ip, port, "200", "6"]);
        let attack = attack.stdout(std::process::Stdio::piped()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let served = c.output(c.in_node(
            0,
            "curl",
            &["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", &format!("http://127.0.0.1:{port}/")],
        ));
        let code = String::from_utf8_lossy(&served.stdout).to_string();
        assert!(code == "200" || (port == "15020" && code == "404"), "port {port} did not serve: {code}\n{}", logs(&c));
        let out = attack.wait_with_output().unwrap();
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        assert_eq!(r["connected"], 200, "{r}");
        assert_eq!(r["closed"], 200, "port {port}: every slow head is closed at the timeout: {r}");
        assert!(r["last_close"].as_f64().unwrap() < 5.0, "{r}");
    }

    // 10,000 idle connections to a1's HBONE port from node-b's address.
    let a1 = c.pod("a1").ip.clone();
    let mut attack = c.in_node(1, "python3", &[&flood_script(), "idle", &a1, "15008", "10000", "8"]);
    let attack = attack.stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (code, err) = c.curl("b1", &format!("http://{a1}:8080/"));
    assert_eq!(code, 200, "b1 to a1 during the idle flood: {err}\n{}", logs(&c));
    let out = attack.wait_with_output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert!(r["connected"].as_u64().unwrap() > 1000, "{r}");
    assert_eq!(r["connected"], r["closed"], "every idle connection is closed: {r}");
    let m = c.metrics(0);
    assert!(m.contains("redirector_connections_over_limit_total{listener=\"hbone_handshakes\"}"), "not counted: {m}");

    // A DNS flood from a1: forwards are bounded, mesh names still answered.
    let flood_dns = c.in_pod("a1", "python3", &[&flood_script(), "dns", "127.0.0.1", "15053", "20000"]);
    let r = flood(&c, flood_dns);
    assert_eq!(r["sent"], 20000);
    let (_, fds_during) = agent_memory_and_fds(&c, 0);
    assert!(fds_during < fds_before + 64 + 100, "descriptors {fds_before} -> {fds_during}");
    let (code, _) = c.curl("a1", "http://198.18.3.60/");
    assert_eq!(code, 200, "{}", logs(&c));
    let (peak_mib, _) = agent_memory_and_fds(&c, 0);
    println!("agent peak resident memory through the floods: {peak_mib} MiB");
    assert!(peak_mib < 256, "peak {peak_mib} MiB");
}

/// M6: what the agent captures in its own namespace (the node's) speaks
/// as the agent's own identity, never as a tenant's: a policy that admits
/// `default/default` does not admit a node process.
#[test]
fn the_nodes_own_traffic_speaks_as_the_agent_not_as_a_tenant() {
    if !privileged() {
        return;
    }
    let mut c = Cluster::with_ca_service("ebpf").unwrap();
    c.extra_yaml = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: tenant-default-only, namespace: default}\nspec:\n  selector: {matchLabels: {app: b1}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/default]}}]\n".into();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    // A process of the node, in a cgroup the node's agent captures.
    let daemon = c.nodes[0].cgroup.join("node-daemon");
    std::fs::create_dir_all(&daemon).unwrap();
    let enroll = std::process::Command::new("nsenter")
        .arg(format!("--net={}", redirector_tests::cluster::ns_path(&c.nodes[0].ns).display()))
        .arg(redirector_tests::redirector_bin())
        .arg("--state-dir")
        .arg(&c.nodes[0].state)
        .arg("enroll")
        .arg(&daemon)
        .output()
        .unwrap();
    assert!(enroll.status.success(), "{enroll:?}");
    let url = format!("http://{}:8080/", c.pod("b1").ip);
    let script = format!(
        "echo $$ > {}/cgroup.procs; exec curl -s -o /dev/null -w %{{http_code}} --max-time 5 {url}",
        daemon.display()
    );
    let out = c.output(c.in_node(0, "sh", &["-c", &script]));
    assert_ne!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200",
        "the node's process was admitted as default/default"
    );
    let agent = "spiffe://cluster.local/ns/istio-system/sa/redirector";
    assert!(
        eventually(Duration::from_secs(3), || c
            .logged(1, "connection denied by policy")
            .iter()
            .any(|l| l["fields"]["peer_identity"] == agent)),
        "the node's process did not reach b1 over HBONE as {agent}: {:?}",
        c.logged(1, "connection denied")
    );
    let _ = std::fs::remove_dir(&daemon);
}

/// M10: each agent runs as a DaemonSet pod's container does, in a cgroup
/// of its own under a private cgroup namespace. It enters the host's
/// cgroup namespace (else neither the hierarchy nor pods' cgroups could be
/// named), its proxy cgroup is a child of its own cgroup (so the pod's
/// limits bind the proxy), not a top-level cgroup, and the mesh works. Where cgroup v2 has
/// the memory controller, the pod's cgroup is also seen charged for the
/// agent's memory.
#[test]
fn the_agent_stays_under_its_pods_cgroup() {
    if !privileged() {
        return;
    }
    let mut c = Cluster::with_ca_service("ebpf").unwrap();
    c.agent_in_pod_cgroup = true;
    c.start().unwrap();
    let mount = redirector_tests::cgroup2_mount();
    for node in 0..2 {
        let pid = c.agent_pid(node).unwrap();
        // This process is in the host's cgroup namespace: the full path.
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let rel = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        let at = mount.join(rel.trim_start_matches('/'));
        assert_eq!(at, c.agent_pod_cgroup(node).join("redirector-proxy"), "node {node}'s agent left its pod's cgroup");
        // Started in a private cgroup namespace, it names cgroups as the
        // host does.
        assert!(!c.logged(node, "entered the host's cgroup namespace").is_empty(), "node {node}");
        let controllers =
            std::fs::read_to_string(c.agent_pod_cgroup(node).join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|x| x == "memory") {
            let current: u64 = std::fs::read_to_string(c.agent_pod_cgroup(node).join("memory.current"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert!(current > 1 << 20, "the pod's cgroup is not charged for the agent ({current} bytes)");
        } else {
            eprintln!("cgroup v2 has no memory controller here: the charge is not checked");
        }
    }
    c.start_nginx("b1", 8080).unwrap();
    let url = format!("http://{}:8080/", c.pod("b1").ip);
    assert_eq!(c.curl("a1", &url).0, 200, "the mesh must work with the agents in their pods' cgroups");
    assert!(eventually(Duration::from_secs(3), || !c.logged(1, "HBONE connection closed").is_empty()));
}

/// Issue 21's takeover across nodes: under a new connection every 10 ms
/// from a pod on node-a to a pod on node-b (HBONE), node-b's agent and
/// then node-a's are taken over; not one connection fails, and an HBONE
/// connection opened before both completes its exchanges through the old
/// agents, which exit by themselves once it ends.
fn a_takeover_on_either_node_fails_no_cross_node_connection(mode: &'static str) {
    let mut c = Cluster::with_ca_service(mode).unwrap();
    c.proxy_settings = "  drainTimeout: 30s\n".into();
    c.start().unwrap();
    let b1 = c.pod("b1").ip.clone();
    let addr: std::net::SocketAddr = format!("{b1}:7100").parse().unwrap();
    let _server = redirector_tests::Server::start(&redirector_tests::cluster::ns_path(&c.pod("b1").ns), addr);
    let script = redirector_tests::steady_load_script(&b1, 7100, 9.0);
    let load = c.in_pod("a1", "bash", &["-c", &script]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let mut old_b = c.take_over(1).unwrap();
    let mut old_a = c.take_over(0).unwrap();
    let out = load.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let logs = || {
        format!(
            "node-a: {}\nnode-b: {}",
            std::fs::read_to_string(&c.nodes[0].log).unwrap(),
            std::fs::read_to_string(&c.nodes[1].log).unwrap()
        )
    };
    assert!(out.status.success(), "{out:?}");
    assert_eq!(redirector_tests::field(&text, "new_failed"), 0, "{text}\n{}", logs());
    assert_eq!(redirector_tests::field(&text, "long_failed"), 0, "{text}\n{}", logs());
    assert!(redirector_tests::field(&text, "new_ok") > 100, "{text}");
    // The takeovers happened while the load ran (the script lasts 9 s).
    assert!(c.logged(0, "takeover complete").len() == 1 && c.logged(1, "takeover complete").len() == 1);
    for (old, node) in [(&mut old_a, 0), (&mut old_b, 1)] {
        assert!(
            eventually(Duration::from_secs(10), || old.try_wait().unwrap().is_some()),
            "the old agent of node {node} did not exit after draining: {}",
            logs()
        );
        assert!(old.wait().unwrap().success());
        assert_eq!(c.logged(node, "drained; exiting").len(), 1);
    }
    // Served by the new agents: the next request still carried over HBONE.
    c.start_nginx("b1", 8080).unwrap();
    assert_eq!(c.curl("a1", &format!("http://{b1}:8080/")).0, 200);
}
