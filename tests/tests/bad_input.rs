//! Bad input: one line naming the problem and the fix, a non-zero exit, and
//! nothing left attached, pinned or created.

use std::net::TcpListener;
use std::process::Output;

use redirector_tests::*;

fn one_line_error(out: &Output, must_contain: &[&str]) {
    assert!(!out.status.success(), "expected failure: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    assert!(lines[0].starts_with("redirector: error: "), "{err}");
    for s in must_contain {
        assert!(lines[0].contains(s), "`{s}` not in: {err}");
    }
}

fn nothing_installed(t: &Topology) {
    assert!(attached_programs(&t.cgroup).is_empty(), "a program was left attached");
    assert!(!t.bpffs.exists(), "pins were left in {}", t.bpffs.display());
    assert!(!t.cgroup.join("redirector-proxy").exists(), "the proxy cgroup was left");
}

fn run_agent(t: &Topology, extra: &[&str]) -> Output {
    t.redirector()
        .arg("run")
        .arg("--cgroup")
        .arg(&t.cgroup)
        .arg("--bpffs-dir")
        .arg(&t.bpffs)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_taken_outbound_port_fails_the_start_and_attaches_nothing() {
    if !privileged() {
        return;
    }
    let t = Topology::new().unwrap();
    // Hold 127.0.0.1:15001 inside the client namespace.
    let ns = std::fs::File::open(Topology::ns_path(&t.client_ns)).unwrap();
    let holder = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: valid namespace fd; affects this thread only.
        assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let l = TcpListener::bind("127.0.0.1:15001").unwrap();
        std::thread::sleep(std::time::Duration::from_secs(5));
        drop(l);
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    let out = run_agent(&t, &[]);
    one_line_error(&out, &["15001", "already in use", "proxy.outboundPort"]);
    nothing_installed(&t);
    holder.join().unwrap();
}

#[test]
fn a_missing_capture_cgroup_is_named() {
    if !privileged() {
        return;
    }
    let t = Topology::new().unwrap();
    let missing = t.cgroup.join("does-not-exist");
    let out =
        t.redirector().arg("run").arg("--cgroup").arg(&missing).arg("--bpffs-dir").arg(&t.bpffs).output().unwrap();
    one_line_error(&out, &["does-not-exist", "does not exist"]);
    nothing_installed(&t);
}

#[test]
fn an_unreadable_or_invalid_config_is_named_with_its_field() {
    if !privileged() {
        return;
    }
    let t = Topology::new().unwrap();
    let out = run_agent(&t, &["--config", "/nonexistent/redirector.yaml"]);
    one_line_error(&out, &["cannot read config", "/nonexistent/redirector.yaml"]);
    nothing_installed(&t);

    let bad = t.write_config("  excludeCidrs: [not-a-cidr]\n");
    let out = run_agent(&t, &["--config", bad.to_str().unwrap()]);
    one_line_error(&out, &["capture.excludeCidrs", "not-a-cidr"]);
    nothing_installed(&t);
}

#[test]
fn enrolling_a_missing_cgroup_or_a_gone_pid_is_refused() {
    if !privileged() {
        return;
    }
    let mut t = Topology::new().unwrap();
    t.start_agent("").unwrap();
    let missing = t.cgroup.join("nope");
    let out = t.redirector().arg("enroll").arg(&missing).output().unwrap();
    one_line_error(&out, &["nope", "does not exist"]);

    // A PID that is certainly gone: a child we reaped.
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    let out = t.redirector().args(["enroll", "--pid", &pid.to_string()]).output().unwrap();
    one_line_error(&out, &[&pid.to_string(), "does not exist"]);

    // A cgroup outside the capture subtree would never be seen.
    let outside = redirector::sys::cgroup::cgroup2_mount().unwrap();
    let out = t.redirector().arg("enroll").arg(&outside).output().unwrap();
    one_line_error(&out, &["outside the capture subtree"]);
    assert_eq!(t.status()["cgroups"].as_array().unwrap().iter().filter(|c| c["enrolled"] == true).count(), 0);
}

#[test]
fn running_without_root_says_so() {
    if !privileged() {
        return;
    }
    let t = Topology::new().unwrap();
    // The agent started as nobody, with no capabilities.
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--"])
        .arg(redirector_bin())
        .args(["--state-dir", "/tmp", "run", "--cgroup"])
        .arg(&t.cgroup)
        .arg("--bpffs-dir")
        .arg(&t.bpffs);
    let out = cmd.output().unwrap();
    one_line_error(&out, &["needs root", "CAP_BPF", "sudo"]);
    nothing_installed(&t);
}

#[test]
fn iptables_mode_refuses_to_fight_an_existing_sidecar_capture() {
    if !privileged() {
        return;
    }
    let t = Topology::with_mode("iptables").unwrap();
    // Istio's sidecar rules already in the namespace.
    let ns = format!("--net={}", Topology::ns_path(&t.client_ns).display());
    for args in [
        vec!["iptables", "-t", "nat", "-N", "ISTIO_OUTPUT"],
        vec!["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "ISTIO_OUTPUT"],
    ] {
        let st = std::process::Command::new("nsenter").arg(&ns).args(&args).status().unwrap();
        assert!(st.success());
    }
    let out = run_agent(&t, &["--mode", "iptables"]);
    one_line_error(&out, &["conflicting rule", "ISTIO_OUTPUT"]);
    nothing_installed(&t);
    assert_eq!(t.nat_rules(), Vec::<String>::new(), "no rule of ours was installed");
}

/// A mesh CA whose certificate file does not parse, or whose key is not
/// the certificate's, fails the start with one line naming the file; no
/// program is attached, no listener opened.
#[test]
fn a_broken_mesh_ca_is_named_and_nothing_starts() {
    if !privileged() {
        return;
    }
    let t = Topology::new().unwrap();
    let dir = t.state.parent().unwrap();
    let (ca, other) = (dir.join("ca"), dir.join("other-ca"));
    for d in [&ca, &other] {
        let out = std::process::Command::new(redirector_bin()).arg("ca").arg("create").arg(d).output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let cfg = t.write_config_full(
        "",
        &format!("  drainTimeout: 1s\n  connectTimeout: 3s\nmesh:\n  caDir: {}\n", ca.display()),
    );
    let good_cert = std::fs::read(ca.join("ca-cert.pem")).unwrap();

    std::fs::write(ca.join("ca-cert.pem"), "this is not a certificate\n").unwrap();
    let out = run_agent(&t, &["--config", cfg.to_str().unwrap()]);
    one_line_error(&out, &["ca-cert.pem"]);
    nothing_installed(&t);

    std::fs::write(ca.join("ca-cert.pem"), &good_cert).unwrap();
    std::fs::copy(other.join("ca-key.pem"), ca.join("ca-key.pem")).unwrap();
    let out = run_agent(&t, &["--config", cfg.to_str().unwrap()]);
    one_line_error(&out, &["ca-key.pem", "ca-cert.pem"]);
    nothing_installed(&t);
}
