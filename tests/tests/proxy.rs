//! The proxy's transparent TCP path under real capture: large transfers with
//! half-close, the connection limit, the idle timeout, draining on SIGTERM
//! and no file descriptors left behind. Clients are unmodified python3
//! programs run as workloads.

use std::time::Duration;

use redirector_tests::*;

fn python(t: &Topology, script: &str) -> std::process::Output {
    t.redirector().args(["exec", "--workload", "py", "--", "python3", "-c", script]).output().expect("python3 workload")
}

#[test]
fn a_large_transfer_with_half_close_arrives_whole() {
    if !privileged() {
        return;
    }
    let mut t = Topology::new().unwrap();
    t.server(&format!("{SERVER_V4}:8080"));
    t.start_agent("").unwrap();
    // 8 MiB up while reading the echo, then shut down the write side: the
    // server sees EOF, finishes echoing and closes; the client must read it
    // all, then EOF.
    let script = echo_transfer_script(8, false);
    let out = python(&t, &script);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ok 8388608 peer="), "{text}");
    let s = t.status();
    assert!(s["proxy"]["bytes_up"].as_u64().unwrap() >= 8 * 1024 * 1024, "{s}");
}

#[test]
fn connections_over_the_limit_are_closed_and_counted() {
    if !privileged() {
        return;
    }
    let mut t = Topology::new().unwrap();
    t.server(&format!("{SERVER_V4}:8080"));
    t.start_agent_with_proxy("  maxConnections: 2\n").unwrap();
    let script = format!(
        r#"
import socket, time
held = []
for i in range(2):
    s = socket.create_connection(("{SERVER_V4}", 8080)); s.sendall(b"hi\n")
    assert s.makefile("rb").readline().startswith(b"peer="); held.append(s)
s = socket.create_connection(("{SERVER_V4}", 8080))
s.settimeout(5)
try:
    s.sendall(b"hi\n")
    r = s.recv(100)
except (ConnectionResetError, BrokenPipeError):
    r = b""
print("third", repr(r))
"#
    );
    let out = python(&t, &script);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "third b''");
    assert_eq!(t.status()["proxy"]["rejected_over_limit"], 1);
}

#[test]
fn an_idle_connection_is_closed_after_the_idle_timeout() {
    if !privileged() {
        return;
    }
    let mut t = Topology::new().unwrap();
    t.server(&format!("{SERVER_V4}:8080"));
    t.start_agent_with_proxy("  idleTimeout: 1s\n").unwrap();
    let script = format!(
        r#"
import socket, time
s = socket.create_connection(("{SERVER_V4}", 8080)); s.sendall(b"hi\n")
f = s.makefile("rb"); assert f.readline().startswith(b"peer=")
s.settimeout(10)
t0 = time.time()
r = s.recv(100)
print("closed", repr(r), round(time.time() - t0))
"#
    );
    let out = python(&t, &script);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("closed b'' "), "{text}");
    assert!(t.log_lines().iter().any(|l| l["fields"]["message"] == "idle timeout: connection closed"));
}

#[test]
fn sigterm_drains_open_connections_and_refuses_new_ones() {
    if !privileged() {
        return;
    }
    let mut t = Topology::new().unwrap();
    t.server(&format!("{SERVER_V4}:8080"));
    t.start_agent_with_proxy("  drainTimeout: 10s\n").unwrap();
    let pid = t.agent_pid().unwrap();
    // The workload holds a connection, signals readiness, and after the
    // agent got SIGTERM uses it again and tries a new one.
    let dir = t.state.parent().unwrap().to_path_buf();
    let ready = dir.join("ready");
    let go = dir.join("go");
    let script = format!(
        r#"
import os, socket, time
s = socket.create_connection(("{SERVER_V4}", 8080)); s.sendall(b"hi\n")
f = s.makefile("rb"); assert f.readline().startswith(b"peer=")
open("{ready}", "w").close()
while not os.path.exists("{go}"):
    time.sleep(0.05)
s.sendall(b"still here\n")
print("echo", f.readline().decode().strip())
try:
    socket.create_connection(("{SERVER_V4}", 8080), timeout=3)
    print("new connected")
except OSError as e:
    print("new refused")
s.close()
"#,
        ready = ready.display(),
        go = go.display()
    );
    let child = t
        .redirector()
        .args(["exec", "--workload", "py", "--", "python3", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || ready.exists()));
    // SAFETY: plain signal send.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(eventually(Duration::from_secs(5), || t
        .log_lines()
        .iter()
        .any(|l| l["fields"]["message"].as_str().is_some_and(|m| m.starts_with("shutting down")))));
    std::fs::write(&go, "").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("echo still here"), "{text}");
    assert!(text.contains("new refused"), "{text}");
    let status = t.stop_agent().unwrap();
    assert!(status.success(), "agent exit: {status}");
    assert!(t.log_lines().iter().any(|l| l["fields"]["message"] == "drained"));
}

#[test]
fn short_connections_leave_no_file_descriptors_behind() {
    if !privileged() {
        return;
    }
    let mut t = Topology::new().unwrap();
    t.server(&format!("{SERVER_V4}:8080"));
    t.start_agent("").unwrap();
    let pid = t.agent_pid().unwrap();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let before = fds();
    let out = t.exec_workload(
        "churn",
        &format!("for i in $(seq 500); do exec 3<>/dev/tcp/{SERVER_V4}/8080 || exit 1; echo x >&3; read -r l <&3 || exit 2; exec 3<&-; done"),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(eventually(Duration::from_secs(10), || fds() <= before), "agent had {before} fds before, {} after", fds());
}
