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

in_both_modes!(cross_node_request_goes_through_hbone);

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
    let _ = pcap_contains;
}
