//! The zero-trust mesh across nodes: two node agents, two pods each,
//! unmodified clients, HBONE between the nodes. Every test runs in eBPF and
//! in iptables capture.

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
);

fn cross_node_request_goes_through_hbone(mode: &'static str) {
    let mut c = Cluster::new(mode).unwrap();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    let b1 = c.pod("b1").ip.clone();
    let (code, err) = c.curl("a1", &format!("http://{b1}:8080/"));
    assert_eq!(code, 200, "curl from a1 to b1 failed: {err}\nnode-a: {}\nnode-b: {}", std::fs::read_to_string(&c.nodes[0].log).unwrap(), std::fs::read_to_string(&c.nodes[1].log).unwrap());
    // node-a carried it over HBONE, node-b received it from a1's identity.
    assert!(eventually(Duration::from_secs(5), || !c.logged(1, "HBONE connection closed").is_empty()));
    let inbound = &c.logged(1, "HBONE connection closed")[0];
    assert_eq!(inbound["fields"]["source_principal"], "spiffe://cluster.local/ns/default/sa/sa-a1");
}

/// The node-to-node link carries TLS only: none of the request's bytes, and
/// TLS application-data records on 15008.
fn link_carries_only_tls(mode: &'static str) {
    let mut c = Cluster::new(mode).unwrap();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    let pcap = c.dir.join("link0.pcap");
    let mut dump = c
        .in_node(0, "tcpdump", &["--immediate-mode", "-Z", "root", "-i", "link0", "-U", "-s", "0", "-w", pcap.to_str().unwrap(), "tcp"])
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
/// handshake, the request fails, the log names both identities.
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
    assert!(eventually(Duration::from_secs(10), || c.logged(1, "pod enrolled").len() >= 3), "node-b did not re-enroll b1");
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
    let mut c = Cluster::new(mode).unwrap();
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
    use std::io::{BufRead, BufReader, Write};
    let mut c = Cluster::new(mode).unwrap();
    c.mesh_settings = "  certLifetime: 4s\n".into();
    c.start().unwrap();
    let b1 = c.pod("b1").ip.clone();
    // A line echo server in b1 (socat-free: bash's coproc is not needed,
    // python3 is everywhere the tests run).
    let mut server = c
        .in_pod("b1", "python3", &["-c", &format!(
            "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('{b1}', 7000)); s.listen(8)\nwhile True:\n  c,_=s.accept(); f=c.makefile('rwb', 0)\n  for line in f: f.write(line)\n")])
        .spawn()
        .unwrap();
    c.wait_listening("b1", 7000).unwrap();
    let mut client = c
        .in_pod("a1", "python3", &["-u", "-c", &format!(
            "import socket,sys\ns=socket.create_connection(('{b1}', 7000)); f=s.makefile('rwb', 0)\nfor line in sys.stdin.buffer:\n  f.write(line); sys.stdout.buffer.write(f.readline()); sys.stdout.flush()\n")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut to = client.stdin.take().unwrap();
    let mut from = BufReader::new(client.stdout.take().unwrap());
    let rotated = |c: &Cluster| c.logged(0, "workload certificate rotated").len() + c.logged(1, "workload certificate rotated").len();
    let started = std::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(9) {
        n += 1;
        writeln!(to, "ping {n}").unwrap();
        let mut line = String::new();
        from.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), format!("ping {n}"), "the long-lived connection broke after {:?}", started.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(rotated(&c) >= 2, "no certificate rotation happened during the connection");
    drop(to);
    let _ = client.wait();
    let _ = server.kill();
    let _ = server.wait();
    // New connections use the new certificates.
    c.start_nginx("b1", 8080).unwrap();
    assert_eq!(c.curl("a2", &format!("http://{b1}:8080/")).0, 200);
}

/// A client outside the mesh (in node-b's own namespace) dials the app's
/// port directly: PERMISSIVE (the default) lets it in, STRICT refuses it,
/// while a mesh client keeps working.
fn strict_refuses_plaintext_and_permissive_accepts_it(mode: &'static str) {
    let mut c = Cluster::new(mode).unwrap();
    c.start().unwrap();
    c.start_nginx("b1", 8080).unwrap();
    let url = format!("http://{}:8080/", c.pod("b1").ip);
    let outside = |c: &Cluster| {
        let out = c.output(c.in_node(1, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", &url]));
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
    assert!(c.metrics(1).lines().any(|l| l.starts_with("redirector_policy_denied_total{") && l.contains("source_principal=\"unknown\"")));
}

/// DENY blocks the principal it names; ALLOW admits only its principals.
/// Denials are logged with the peer identity and counted.
fn authorization_policies_deny_and_allow(mode: &'static str) {
    let mut c = Cluster::new(mode).unwrap();
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
    assert!(denied.iter().any(|l| l["fields"]["peer_identity"] == "spiffe://cluster.local/ns/default/sa/sa-a2"
        && l["fields"]["reason"].as_str().unwrap_or_default().contains("deny-a2")), "{denied:?}");
    assert!(denied.iter().any(|l| l["fields"]["reason"].as_str().unwrap_or_default().contains("allow-a1")), "{denied:?}");
    let m = c.metrics(1);
    let line = m
        .lines()
        .find(|l| l.starts_with("redirector_policy_denied_total{") && l.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/sa-a2\""))
        .unwrap_or_else(|| panic!("{m}"));
    assert!(line.ends_with(" 1"), "{line}");
}
