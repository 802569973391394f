//! The command line as a user meets it, without root: version, help, and
//! one-line errors for what can be checked before anything is loaded.

use std::process::{Command, Output};

fn redirector() -> Command {
    Command::new(env!("CARGO_BIN_EXE_redirector"))
}

fn one_line_error(out: &Output, must_contain: &[&str]) {
    assert!(!out.status.success(), "expected failure: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    for s in must_contain {
        assert!(lines[0].contains(s), "`{s}` not in: {err}");
    }
}

#[test]
fn version_prints_the_crate_version() {
    let out = redirector().arg("version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("redirector {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn every_command_is_listed_in_help() {
    let out = redirector().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "exec", "enroll", "unenroll", "status", "verify", "version", "uninstall"] {
        assert!(text.contains(cmd), "{cmd} missing from --help: {text}");
    }
}

#[test]
fn status_without_an_agent_says_how_to_start_one() {
    let dir = std::env::temp_dir().join(format!("redirector-cli-{}", std::process::id()));
    let out = redirector()
        .arg("--state-dir")
        .arg(&dir)
        .args(["status"])
        .output()
        .unwrap();
    one_line_error(&out, &["no agent state", "redirector run"]);
}

#[test]
fn an_unreadable_config_is_named() {
    let out = redirector()
        .args(["run", "--config", "/nonexistent/agent.yaml"])
        .output()
        .unwrap();
    one_line_error(&out, &["cannot read config", "/nonexistent/agent.yaml"]);
}

#[test]
fn a_config_with_a_misspelt_field_is_named() {
    let path = std::env::temp_dir().join(format!("redirector-cli-{}.yaml", std::process::id()));
    std::fs::write(&path, "proxy:\n  outboundport: 15001\n").unwrap();
    let out = redirector().arg("run").arg("--config").arg(&path).output().unwrap();
    let _ = std::fs::remove_file(&path);
    one_line_error(&out, &["outboundport", path.to_str().unwrap()]);
}

#[test]
fn exec_needs_a_command() {
    let out = redirector().arg("exec").output().unwrap();
    assert!(!out.status.success());
}
