//! The benchmark harness runs end to end, both suites, and produces a
//! well-formed report (a smoke test: tiny durations, no figure is asserted).

use std::process::Command;

#[test]
fn the_bench_harness_produces_a_well_formed_report() {
    if !redirector_tests::privileged() {
        return;
    }
    let missing: Vec<&str> = ["oha", "nginx", "iperf3"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t} >/dev/null || test -x /usr/sbin/{t}")])
                .status()
                .unwrap()
                .success()
        })
        .collect();
    if !missing.is_empty() {
        assert!(std::env::var_os("CI").is_none(), "the bench smoke test needs {missing:?}; .ci/run installs them");
        eprintln!(
            "SKIPPED: the bench smoke test needs {missing:?} (apt-get install nginx-light iperf3; cargo install oha)"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("redirector-bench-smoke-{}", std::process::id()));
    let json = dir.join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_redirector-bench"))
        .env("REDIRECTOR_BIN", redirector_tests::redirector_bin())
        .args(["--quick", "--rounds", "1", "--seconds", "0.5", "--results"])
        .arg(&dir)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let md = String::from_utf8_lossy(&out.stdout);
    // Tables: local (header + 5 modes), cross-node (header + 4 modes), the
    // cross-node targets (header + 6 figures) and the L7-for-pods targets
    // (header + 5 figures).
    let table: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(table.len(), (1 + 5) + (1 + 4) + (1 + 6) + (1 + 5), "headers and one row per mode and target:\n{md}");
    for mode in ["direct", "iptables", "ebpf", "ebpf+sockmap", "ebpf+l7", "hbone", "hbone+l7", "hbone-iptables"] {
        let row = table.iter().find(|r| r.starts_with(&format!("| {mode} |"))).expect(mode);
        assert_eq!(row.matches('|').count(), 11, "{row}");
    }
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["samples"].as_array().unwrap().len(), 20, "5 local modes x 4 scenarios");
    assert_eq!(report["cross_node"]["samples"].as_array().unwrap().len(), 16, "4 cross-node modes x 4 scenarios");
    assert!(md.contains("L7 routing over L4 forwarding"), "{md}");
    assert!(report["medians"]["direct"]["max-rps"]["rps"].as_f64().unwrap() > 0.0);
    assert!(report["ratios"]["ebpf"]["max-rps"]["rps"].is_number());
    assert!(report["cross_node"]["ratios"]["hbone"]["max-rps"]["rps"].is_number(), "{md}");
    assert!(report["cross_node"]["medians"]["hbone"]["standard"]["proxy_rss_mb"].as_f64().unwrap() > 0.0);
    assert!(md.contains("L7 for pods (hbone+l7 against hbone"), "{md}");
    for t in ["new connections/s", "resident memory per proxy", "(× hbone)", "resident memory per agent"] {
        let row = table.iter().find(|r| r.contains(t)).expect(t);
        assert!(row.contains("met"), "each target says met or not met: {row}");
    }
    for f in ["bench.svg", "bench-cross-node.svg"] {
        let svg = std::fs::read_to_string(dir.join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{f}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
