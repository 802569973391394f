//! The capture path end to end, as root: real cgroups, network namespaces,
//! kernel programs, the agent binary and unmodified clients (bash's
//! /dev/tcp, curl).

use std::time::Duration;

use redirector_tests::*;

/// Runs a test body once per capture mode: `mod NAME { fn ebpf;
/// fn ebpf_keyed; fn iptables }` (ebpf_keyed: eBPF without per-socket
/// storage, the tier for kernels that lack it).
macro_rules! in_every_mode {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn ebpf() {
                if redirector_tests::privileged() {
                    super::$body("ebpf");
                }
            }
            #[test]
            fn ebpf_keyed() {
                if redirector_tests::privileged() {
                    super::$body("ebpf-keyed");
                }
            }
            #[test]
            fn iptables() {
                if redirector_tests::privileged() {
                    super::$body("iptables");
                }
            }
        }
    };
}

/// Programs attached to the capture cgroup: connect4/6, sockops,
/// getsockopt, and DNS's sendmsg4/6 and recvmsg4/6.
const CGROUP_PROGRAMS: usize = 8;

fn upstream_locals_contain(t: &Topology, peer: std::net::SocketAddr) -> bool {
    eventually(Duration::from_secs(5), || t.proxied_upstream_locals().contains(&peer.to_string()))
}

in_every_mode!(
    enrolled_client_reaches_its_server_through_the_proxy_in,
    enrolled_client_reaches_its_server_through_the_proxy
);

fn enrolled_client_reaches_its_server_through_the_proxy(mode: &'static str) {
    let mut t = Topology::with_mode(mode).unwrap();
    let peers = t.server(&format!("{SERVER_V4}:8080"));
    t.start_agent("").unwrap();

    let out = t.exec_workload("app", &bash_connect(SERVER_V4, 8080));
    assert!(out.status.success(), "client failed: {out:?}");
    let peer = printed_peer(&out).expect("server answered with the peer it saw");
    assert_eq!(peers.lock().unwrap().len(), 1, "exactly one connection reached the server");
    // The server's peer is the proxy's upstream socket, not the client.
    assert!(
        upstream_locals_contain(&t, peer),
        "server saw {peer}, proxy's upstream sockets were {:?}",
        t.proxied_upstream_locals()
    );

    // curl over HTTP, same path.
    let out = t.exec_workload("app", &format!("curl -sS -m 5 http://{SERVER_V4}:8080/"));
    assert!(out.status.success(), "curl failed: {out:?}");
    let peer = printed_peer(&out).unwrap();
    assert!(upstream_locals_contain(&t, peer));

    assert_eq!(peers.lock().unwrap().len(), 2, "no connection was captured twice");
    if !mode.starts_with("ebpf") {
        return;
    }
    // The proxy's own upstream connects were seen and left alone.
    let s = t.status();
    let proxy_cg = t.cgroup.join("redirector-proxy");
    let proxy = t.counters_of(&proxy_cg);
    assert!(proxy["proxy_own"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(proxy["redirected"], 0, "{s}");
    assert!(proxy["original_dst_answered"].as_u64().unwrap() >= 2, "{s}");
}

in_every_mode!(
    a_process_outside_enrolled_cgroups_is_not_captured_in,
    a_process_outside_enrolled_cgroups_is_not_captured
);

fn a_process_outside_enrolled_cgroups_is_not_captured(mode: &'static str) {
    let mut t = Topology::with_mode(mode).unwrap();
    let peers = t.server(&format!("{SERVER_V4}:8080"));
    t.start_agent("").unwrap();

    let plain = t.cgroup.join("plain");
    let out = t.run_in_cgroup(&plain, &bash_connect(SERVER_V4, 8080));
    assert!(out.status.success(), "{out:?}");
    let peer = printed_peer(&out).unwrap();
    assert_eq!(peers.lock().unwrap().as_slice(), &[peer]);
    assert!(t.proxied_upstream_locals().is_empty(), "the proxy carried nothing");
    assert_eq!(t.status()["proxy"]["accepted"], 0);
    if !mode.starts_with("ebpf") {
        return;
    }
    let c = t.counters_of(&plain);
    assert!(c["not_enrolled"].as_u64().unwrap() >= 1, "{c}");
    assert_eq!(c["redirected"], 0, "{c}");
    assert_eq!(t.status()["proxy"]["accepted"], 0);
}

in_every_mode!(excluded_ports_and_cidrs_pass_untouched_in, excluded_ports_and_cidrs_pass_untouched);

fn excluded_ports_and_cidrs_pass_untouched(mode: &'static str) {
    let mut t = Topology::with_mode(mode).unwrap();
    let p9090 = t.server(&format!("{SERVER_V4}:9090"));
    let pcidr = t.server(&format!("{SERVER_V4_B}:8080"));
    t.start_agent(&format!("  excludePorts: [22, 9090]\n  excludeCidrs: [{SERVER_V4_B}/32]\n")).unwrap();

    let out =
        t.exec_workload("app", &format!("{} && {}", bash_connect(SERVER_V4, 9090), bash_connect(SERVER_V4_B, 8080)));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(p9090.lock().unwrap().len(), 1);
    assert_eq!(pcidr.lock().unwrap().len(), 1);
    // The servers saw the workload itself: its address, a port the proxy
    // never used.
    let locals = t.proxied_upstream_locals();
    for p in p9090.lock().unwrap().iter().chain(pcidr.lock().unwrap().iter()) {
        assert!(!locals.contains(&p.to_string()));
    }
    assert_eq!(t.status()["proxy"]["accepted"], 0);
    if !mode.starts_with("ebpf") {
        return;
    }
    // Counters went to the workload's cgroup, which exec removed on exit:
    // find them by decision.
    let s = t.status();
    let sum = |name: &str| counter_sum(&s, name);
    assert_eq!(sum("excluded_port"), 1, "{s}");
    assert_eq!(sum("excluded_loopback"), 0, "{s}");
    assert_eq!(sum("excluded_cidr"), 1, "{s}");
    assert_eq!(sum("redirected"), 0, "{s}");
}

in_every_mode!(loopback_destinations_are_left_alone_by_default_in, loopback_destinations_are_left_alone_by_default);

fn loopback_destinations_are_left_alone_by_default(mode: &'static str) {
    let mut t = Topology::with_mode(mode).unwrap();
    t.start_agent("").unwrap();
    // The agent's admin port is a loopback server in the client namespace.
    let out = t.exec_workload("app", &bash_connect("127.0.0.1", 15000));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(t.status()["proxy"]["accepted"], 0);
    if !mode.starts_with("ebpf") {
        return;
    }
    let s = t.status();
    let sum = |name: &str| counter_sum(&s, name);
    assert_eq!(sum("excluded_loopback"), 1, "{s}");
    assert_eq!(sum("redirected"), 0, "{s}");
    assert_eq!(s["proxy"]["accepted"], 0, "{s}");
}

in_every_mode!(ipv6_and_ipv4_mapped_destinations_are_captured_in, ipv6_and_ipv4_mapped_destinations_are_captured);

fn ipv6_and_ipv4_mapped_destinations_are_captured(mode: &'static str) {
    let mut t = Topology::with_mode(mode).unwrap();
    let peers = t.server(&format!("[{SERVER_V6}]:8080"));
    let peers4 = t.server(&format!("{SERVER_V4}:8081"));
    t.start_agent("").unwrap();

    let out = t.exec_workload("app", &format!("curl -sS -m 5 -g 'http://[{SERVER_V6}]:8080/'"));
    assert!(out.status.success(), "{out:?}");
    let peer = printed_peer(&out).unwrap();
    assert!(peer.is_ipv6());
    assert!(upstream_locals_contain(&t, peer), "{:?}", t.proxied_upstream_locals());

    // A dual-stack socket connecting to an IPv4-mapped address.
    let out = t.exec_workload("app", &bash_connect(&format!("::ffff:{SERVER_V4}"), 8081));
    assert!(out.status.success(), "{out:?}");
    let peer = printed_peer(&out).unwrap();
    assert!(upstream_locals_contain(&t, peer), "{:?}", t.proxied_upstream_locals());
    assert_eq!(peers.lock().unwrap().len(), 1);
    assert_eq!(peers4.lock().unwrap().len(), 1);
}

in_every_mode!(
    two_thousand_short_connections_leave_no_per_connection_state_in,
    two_thousand_short_connections_leave_no_per_connection_state
);

fn two_thousand_short_connections_leave_no_per_connection_state(mode: &'static str) {
    let mut t = Topology::with_mode(mode).unwrap();
    let peers = t.server(&format!("{SERVER_V4}:8080"));
    t.start_agent("").unwrap();

    let script = format!(
        "for i in $(seq 2000); do exec 3<>/dev/tcp/{SERVER_V4}/8080 || exit 1; echo x >&3; read -r l <&3 || exit 2; exec 3<&-; done"
    );
    let out = t.exec_workload("churn", &script);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(peers.lock().unwrap().len(), 2000);
    assert!(
        eventually(Duration::from_secs(10), || {
            let s = t.status();
            s["handshakes_in_flight"] == 0 && s["proxy"]["open"].as_array().is_some_and(std::vec::Vec::is_empty)
        }),
        "state left behind: {}",
        t.status()
    );
    let s = t.status();
    assert_eq!(s["proxy"]["forwarded"], 2000, "{s}");
    assert_eq!(s["proxy"]["failed"], 0, "{s}");
}

in_every_mode!(
    a_restarted_agent_adopts_the_capture_and_keeps_capturing_in,
    a_restarted_agent_adopts_the_capture_and_keeps_capturing
);

fn a_restarted_agent_adopts_the_capture_and_keeps_capturing(mode: &'static str) {
    let mut t = Topology::with_mode(mode).unwrap();
    let peers = t.server(&format!("{SERVER_V4}:8080"));
    t.start_agent("").unwrap();
    // A long-lived enrolled cgroup, enrolled by path.
    let app = t.cgroup.join("longlived");
    std::fs::create_dir_all(&app).unwrap();
    let out = t.redirector().arg("enroll").arg(&app).output().unwrap();
    assert!(out.status.success(), "{out:?}");

    let out = t.run_in_cgroup(&app, &bash_connect(SERVER_V4, 8080));
    assert!(upstream_locals_contain(&t, printed_peer(&out).unwrap()));

    t.kill_agent();
    t.start_agent("").unwrap();
    if mode.starts_with("ebpf") {
        assert!(t.log_lines().iter().any(|l| l["fields"]["message"].as_str().is_some_and(|m| m.contains("adopted"))));
        let s = t.status();
        assert_eq!(s["programs_attached"].as_array().unwrap().len(), CGROUP_PROGRAMS, "{s}");
        // One link per program on the cgroup: the old ones were replaced.
        assert_eq!(attached_programs(&t.cgroup).len(), CGROUP_PROGRAMS);
    } else {
        // The crashed agent's rules were replaced, not doubled, and the
        // enrolled workload was kept.
        let rules = t.nat_rules();
        let jumps = rules.iter().filter(|r| r.contains("-A OUTPUT -p tcp -j REDIRECTOR_OUTPUT")).count();
        assert_eq!(jumps, 2, "one jump per family: {rules:#?}");
        assert_eq!(t.status()["cgroups"].as_array().unwrap().len(), 1);
    }

    let out = t.run_in_cgroup(&app, &bash_connect(SERVER_V4, 8080));
    assert!(out.status.success(), "{out:?}");
    assert!(upstream_locals_contain(&t, printed_peer(&out).unwrap()));
    assert_eq!(peers.lock().unwrap().len(), 2);
}

in_every_mode!(
    uninstall_leaves_nothing_attached_pinned_or_installed_in,
    uninstall_leaves_no_program_attached_and_nothing_pinned
);

fn uninstall_leaves_no_program_attached_and_nothing_pinned(mode: &'static str) {
    let mut t = Topology::with_mode(mode).unwrap();
    t.start_agent("").unwrap();
    if mode.starts_with("ebpf") {
        assert_eq!(attached_programs(&t.cgroup).len(), CGROUP_PROGRAMS);
        assert!(t.bpffs.exists());
    } else {
        assert!(!t.nat_rules().is_empty());
    }

    let out = t.redirector().arg("uninstall").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(attached_programs(&t.cgroup).is_empty());
    assert!(!t.bpffs.exists());
    assert_eq!(t.nat_rules(), Vec::<String>::new());
    let pid = t.agent_pid().unwrap();
    assert!(eventually(Duration::from_secs(5), || !redirector::state::pid_alive(pid)
        || std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z"))));
}

#[test]
fn iptables_mode_leaves_no_rule_behind_after_exit_or_a_crash_and_restart() {
    if !privileged() {
        return;
    }
    let mut t = Topology::with_mode("iptables").unwrap();
    t.start_agent("").unwrap();
    assert!(!t.nat_rules().is_empty());
    let status = t.stop_agent().unwrap();
    assert!(status.success());
    assert_eq!(t.nat_rules(), Vec::<String>::new(), "rules left after a clean exit");

    t.start_agent("").unwrap();
    let installed = t.nat_rules();
    t.kill_agent();
    assert_eq!(t.nat_rules(), installed, "a crash leaves its rules (nothing to remove them)");
    t.start_agent("").unwrap();
    assert_eq!(t.nat_rules(), installed, "a restart replaces stale rules instead of adding to them");
    assert!(t.stop_agent().unwrap().success());
    assert_eq!(t.nat_rules(), Vec::<String>::new());
}

#[test]
fn auto_mode_says_which_mode_it_chose_and_why() {
    if !privileged() {
        return;
    }
    let mut t = Topology::with_mode("auto").unwrap();
    t.start_agent("").unwrap();
    let s = t.status();
    // This kernel loads every program, so auto picks eBPF.
    assert_eq!(s["mode"], "ebpf", "{s}");
    assert!(s["mode_reason"].as_str().unwrap().contains("loads every program"), "{s}");
    assert!(t
        .log_lines()
        .iter()
        .any(|l| l["fields"]["message"] == "capture mode chosen" && l["fields"]["mode"] == "ebpf"));
}

#[test]
fn verify_probes_the_kernel_and_names_the_tier() {
    if !privileged() {
        return;
    }
    let out = std::process::Command::new(redirector_bin()).args(["verify", "--json"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let features = v["features"].as_array().unwrap();
    for name in ["map type sk_storage", "program type sock_ops", "helper get_netns_cookie in sock_ops"] {
        let f = features.iter().find(|f| f["name"] == name).expect(name);
        assert!(f["supported"].is_boolean(), "{f}");
    }
    // Every feature of the eBPF tier this kernel has is also what lets the
    // programs load; the reported tier must agree with the program checks.
    let programs_ok = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("program "))
        .all(|c| c["ok"] == true);
    let tier = v["tier"].as_str().unwrap();
    assert_eq!(programs_ok, tier.starts_with("ebpf"), "{v}");
}

/// Start an agent in `mode` with the named kernel features reported missing.
fn topology_hiding(mode: &'static str, features: &[&str]) -> Topology {
    let mut t = Topology::with_mode(mode).unwrap();
    t.agent_env.push(("REDIRECTOR_HIDE_FEATURES".into(), features.join(",")));
    t
}

#[test]
fn auto_takes_the_keyed_tier_on_a_kernel_without_per_socket_storage_and_captures() {
    if !privileged() {
        return;
    }
    let mut t = topology_hiding("auto", &["helper sk_storage_get in cgroup_sock_addr"]);
    let peers = t.server(&format!("{SERVER_V4}:8080"));
    t.start_agent("").unwrap();
    let s = t.status();
    assert_eq!(s["mode"], "ebpf", "{s}");
    let reason = s["mode_reason"].as_str().unwrap();
    assert!(reason.contains("tier ebpf-keyed") && reason.contains("sk_storage_get in cgroup_sock_addr"), "{s}");
    // One line names the kernel, the missing feature's consequence and the tier.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(t.log_lines().iter().any(|l| l["level"] == "WARN"
        && l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(release.trim()) && m.contains("tier ebpf-keyed"))));

    let out = t.exec_workload("app", &bash_connect(SERVER_V4, 8080));
    assert!(out.status.success(), "{out:?}");
    let peer = printed_peer(&out).unwrap();
    assert!(upstream_locals_contain(&t, peer), "{:?}", t.proxied_upstream_locals());
    assert_eq!(peers.lock().unwrap().len(), 1);
    assert!(counter_sum(&t.status(), "original_dst_answered") >= 1);
    // The shortcut needs per-socket storage: refused with a reason.
    let out = t.redirector().args(["accelerate", "on"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("per-socket storage"), "{out:?}");
}

#[test]
fn auto_falls_back_to_iptables_when_a_hook_is_missing_and_says_which() {
    if !privileged() {
        return;
    }
    let mut t = topology_hiding("auto", &["program type cgroup_sockopt (getsockopt)"]);
    let peers = t.server(&format!("{SERVER_V4}:8080"));
    t.start_agent("").unwrap();
    let s = t.status();
    assert_eq!(s["mode"], "iptables", "{s}");
    let reason = s["mode_reason"].as_str().unwrap();
    assert!(reason.contains("cgroup_sockopt") && reason.contains("tier iptables"), "{s}");
    let out = t.exec_workload("app", &bash_connect(SERVER_V4, 8080));
    assert!(out.status.success(), "{out:?}");
    assert!(upstream_locals_contain(&t, printed_peer(&out).unwrap()));
    assert_eq!(peers.lock().unwrap().len(), 1);
}

#[test]
fn a_forced_ebpf_mode_on_a_kernel_without_a_hook_fails_naming_it() {
    if !privileged() {
        return;
    }
    let t = Topology::new().unwrap();
    let out = t
        .redirector()
        .env("REDIRECTOR_HIDE_FEATURES", "program type cgroup_sockopt (getsockopt)")
        .args(["run", "--mode", "ebpf", "--cgroup"])
        .arg(&t.cgroup)
        .arg("--bpffs-dir")
        .arg(&t.bpffs)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    for s in ["cannot run --mode ebpf", "program type cgroup_sockopt", "--mode iptables"] {
        assert!(lines[0].contains(s), "`{s}` not in {err}");
    }
    assert!(attached_programs(&t.cgroup).is_empty());
    assert!(!t.bpffs.exists());
    assert!(!t.cgroup.join("redirector-proxy").exists());
}

/// Issue 21's takeover on a dev box: a second `redirector run` with the
/// same settings takes the running agent's sockets and serves; under a
/// new connection every 10 ms not one fails, a connection opened before
/// keeps working through the old agent, which drains and exits by itself
/// once that connection ends; a second takeover in a row works too.
fn a_takeover_fails_no_connection_and_the_old_agent_drains_and_exits(mode: &'static str) {
    let mut t = Topology::with_mode(mode).unwrap();
    let peers = t.server(&format!("{SERVER_V4}:8080"));
    t.start_agent_with_proxy("  drainTimeout: 30s\n").unwrap();
    let app = t.cgroup.join("steady");
    std::fs::create_dir_all(&app).unwrap();
    let out = t.redirector().arg("enroll").arg(&app).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let first_pid = t.agent_pid().unwrap();

    let script = steady_load_script(SERVER_V4, 8080, 6.0);
    let load = t.spawn_in_cgroup(&app, &script);
    std::thread::sleep(Duration::from_secs(1));
    let mut old = t.take_over().unwrap();
    let out = load.wait_with_output().unwrap();
    // The long-lived connection closed with the script: the old agent has
    // nothing left to drain and exits by itself, well before the 30 s
    // drain timeout.
    let old_exit = eventually(Duration::from_secs(10), || old.try_wait().unwrap().is_some());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    assert!(old_exit, "the old agent did not exit after draining: {}", std::fs::read_to_string(&t.log).unwrap());
    assert!(old.wait().unwrap().success());
    assert_eq!(field(&text, "new_failed"), 0, "{text}");
    assert_eq!(field(&text, "long_failed"), 0, "{text}");
    assert!(field(&text, "new_ok") > 100, "{text}");
    assert!(field(&text, "long_ok") > 20, "{text}");
    assert!(peers.lock().unwrap().len() as u64 > field(&text, "new_ok"));
    let said =
        |m: &str| t.log_lines().iter().any(|l| l["fields"]["message"].as_str().is_some_and(|x| x.starts_with(m)));
    assert!(said("takeover: sockets handed to the new agent"));
    assert!(said("takeover: sockets received from the running agent"));
    assert!(said("drained; exiting"));
    // The new agent serves (its own record, its own count).
    let second_pid = t.agent_pid().unwrap();
    assert_ne!(first_pid, second_pid);
    let s = t.status();
    assert_eq!(s["agent_pid"], second_pid, "{s}");
    assert!(s["proxy"]["forwarded"].as_u64().unwrap() > 0, "{s}");
    if mode == "iptables" {
        let jumps = t.nat_rules().iter().filter(|r| r.contains("-A OUTPUT -p tcp -j REDIRECTOR_OUTPUT")).count();
        assert_eq!(jumps, 2, "the rules stay, not doubled: {:#?}", t.nat_rules());
    } else {
        assert_eq!(attached_programs(&t.cgroup).len(), CGROUP_PROGRAMS);
    }

    // And again, with no load: the third agent takes over from the second.
    let mut second = t.take_over().unwrap();
    assert!(eventually(Duration::from_secs(10), || second.try_wait().unwrap().is_some()));
    let out = t.run_in_cgroup(&app, &bash_connect(SERVER_V4, 8080));
    assert!(out.status.success(), "{out:?}");
    assert!(upstream_locals_contain(&t, printed_peer(&out).unwrap()));
}

mod a_takeover_fails_no_connection_and_the_old_agent_drains_and_exits_in {
    #[test]
    fn ebpf() {
        if redirector_tests::privileged() {
            super::a_takeover_fails_no_connection_and_the_old_agent_drains_and_exits("ebpf");
        }
    }
    #[test]
    fn iptables() {
        if redirector_tests::privileged() {
            super::a_takeover_fails_no_connection_and_the_old_agent_drains_and_exits("iptables");
        }
    }
}

/// A mesh config change made while a second agent takes over is applied
/// once, by the agent that serves afterwards: not lost in the window
/// between the new agent reading the directory and watching it (it
/// watches from what it read), not applied by the old agent once it has
/// handed over (its watch stops there). One capture mode: the config path
/// is the same in both.
#[test]
fn a_config_change_during_a_takeover_applies_once() {
    if !privileged() {
        return;
    }
    let mut t = Topology::new().unwrap();
    let peers = t.server(&format!("{SERVER_V4}:8080"));
    let dir = t.state.parent().unwrap().join("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    let service = |name: &str, vip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {vip}\n  ports: [{{name: tcp, port: 7000, targetPort: 8080}}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}}}\nsubsets:\n- addresses: [{{ip: {SERVER_V4}}}]\n  ports: [{{name: tcp, port: 8080}}]\n"
        )
    };
    std::fs::write(dir.join("first.yaml"), service("first", "198.19.0.30")).unwrap();
    t.config_dir = Some(dir.clone());
    t.start_agent("").unwrap();
    let app = t.cgroup.join("app");
    std::fs::create_dir_all(&app).unwrap();
    assert!(t.redirector().arg("enroll").arg(&app).output().unwrap().status.success());
    let out = t.run_in_cgroup(&app, &bash_connect("198.19.0.30", 7000));
    assert!(out.status.success(), "the first Service is routed: {out:?}");

    // The new agent logs apart, so its own lines can be counted.
    let old_log = t.log.clone();
    t.log = t.state.parent().unwrap().join("agent-2.log");
    let writer = {
        let dir = dir.clone();
        let second = service("second", "198.19.0.31");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(40));
            std::fs::write(dir.join("second.yaml"), second).unwrap();
        })
    };
    let mut old = t.take_over().unwrap();
    writer.join().unwrap();
    let before = peers.lock().unwrap().len();
    let routed = eventually(Duration::from_secs(5), || {
        t.run_in_cgroup(&app, &bash_connect("198.19.0.31", 7000)).status.success()
    });
    let new_log = std::fs::read_to_string(&t.log).unwrap();
    assert!(routed, "the change made during the takeover is applied by the new agent: {new_log}");
    assert!(peers.lock().unwrap().len() > before);
    // Once: the new agent read it at its start or applied it after, not both.
    let with_both = t
        .log_lines()
        .iter()
        .filter(|l| {
            let m = l["fields"]["message"].as_str().unwrap_or("");
            (m == "mesh config loaded" || m == "mesh config applied") && l["fields"]["services"] == 2
        })
        .count();
    assert_eq!(with_both, 1, "{new_log}");
    // The old agent applies nothing once it has handed over.
    assert!(eventually(Duration::from_secs(10), || old.try_wait().unwrap().is_some()));
    let old_lines = std::fs::read_to_string(&old_log).unwrap();
    let after_handover = old_lines.split("handed over: no new connections here").nth(1).unwrap_or("");
    assert!(after_handover.contains("drained; exiting"), "{old_lines}");
    assert!(!after_handover.contains("mesh config applied"), "{old_lines}");
}

/// A takeover while the running agent is wedged (SIGSTOPped): the new
/// agent gets no answer, kills it, and serves alone; what the old agent's
/// stop left in the kernel refuses connections in between instead of
/// letting them around the proxy.
#[test]
fn a_takeover_from_a_wedged_agent_times_out_and_the_new_one_serves_alone() {
    if !privileged() {
        return;
    }
    let mut t = Topology::new().unwrap();
    let peers = t.server(&format!("{SERVER_V4}:8080"));
    t.start_agent("").unwrap();
    let app = t.cgroup.join("app");
    std::fs::create_dir_all(&app).unwrap();
    assert!(t.redirector().arg("enroll").arg(&app).output().unwrap().status.success());
    let mut old = t.detach_agent().unwrap();
    // SAFETY: plain signal send to our own child.
    unsafe { libc::kill(old.id() as i32, libc::SIGSTOP) };
    t.start_agent("").unwrap();
    let said =
        |m: &str| t.log_lines().iter().any(|l| l["fields"]["message"].as_str().is_some_and(|x| x.starts_with(m)));
    assert!(said("the running agent did not answer the takeover in time"));
    let status = old.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "{status:?}");
    let out = t.run_in_cgroup(&app, &bash_connect(SERVER_V4, 8080));
    assert!(out.status.success(), "{out:?}");
    assert!(upstream_locals_contain(&t, printed_peer(&out).unwrap()));
    assert_eq!(peers.lock().unwrap().len(), 1);
}

/// Bad input in the state directory: a stale takeover socket (nothing
/// listens) is removed; one answered by a program that is not an agent is
/// not trusted. Either way the agent says so in one line and starts alone.
#[test]
fn a_stale_or_foreign_takeover_socket_is_not_trusted() {
    if !privileged() {
        return;
    }
    let mut t = Topology::new().unwrap();
    std::fs::create_dir_all(&t.state).unwrap();
    let path = t.state.join("takeover.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    t.start_agent("").unwrap();
    let said = |t: &Topology, m: &str| {
        t.log_lines().iter().any(|l| l["fields"]["message"].as_str().is_some_and(|x| x.starts_with(m)))
    };
    assert!(said(&t, "a stale takeover socket was left"));
    assert!(!said(&t, "takeover: sockets received"));
    t.stop_agent();

    // A python3 process listening on the path: not an agent.
    let script = format!(
        "import socket,time\ns=socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\ns.bind('{}')\ns.listen(4)\nprint('up', flush=True)\ntime.sleep(60)\n",
        path.display()
    );
    let _ = std::fs::remove_file(&path);
    let mut foreign = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(foreign.stdout.take().unwrap()), &mut up).unwrap();
    t.start_agent("").unwrap();
    let _ = foreign.kill();
    let _ = foreign.wait();
    assert!(
        said(&t, "the takeover socket is not answered by an agent"),
        "{}",
        std::fs::read_to_string(&t.log).unwrap()
    );
    assert!(!said(&t, "takeover: sockets received"));
    let s = t.status();
    assert_eq!(s["agent_pid"], t.agent_pid().unwrap(), "{s}");
}
