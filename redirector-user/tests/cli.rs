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
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("redirector {}", env!("CARGO_PKG_VERSION")));
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
    let out = redirector().arg("--state-dir").arg(&dir).args(["status"]).output().unwrap();
    one_line_error(&out, &["no agent state", "redirector run"]);
}

#[test]
fn an_unreadable_config_is_named() {
    let out = redirector().args(["run", "--config", "/nonexistent/agent.yaml"]).output().unwrap();
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

fn mesh_dir(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("redirector-analyze-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for (f, text) in files {
        std::fs::write(d.join(f), text).unwrap();
    }
    d
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  clusterIP: 10.96.0.20\n  ports: [{name: http, port: 9080}]\n---\napiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  host: reviews\n  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n";

#[test]
fn analyze_accepts_a_good_directory_and_names_fields_it_does_not_act_on() {
    let d = mesh_dir(
        "good",
        &[
            ("a-service.yaml", SERVICE),
            (
                "vs.yml",
                "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 75}\n    - {destination: {host: reviews, subset: v2}, weight: 25}\n    corsPolicy: {allowOrigins: [{exact: x}]}\n",
            ),
        ],
    );
    let out = redirector().arg("analyze").arg(&d).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("warning: ")
            && text.contains("vs.yml, document 1 (VirtualService bookinfo/reviews), field spec.http[0].corsPolicy"),
        "{text}"
    );
    assert!(text.contains("ok: 1 services, 1 HTTP route rules, 1 destination rules"), "{text}");
}

#[test]
fn analyze_rejects_what_would_route_wrongly_with_file_document_and_field() {
    let d = mesh_dir(
        "bad",
        &[
            ("a-service.yaml", SERVICE),
            (
                "vs.yaml",
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - match: [{uri: {regex: '[unclosed'}}]\n    route:\n    - {destination: {host: reviews, subset: v3}, weight: 50}\n    - {destination: {host: ratings}, weight: 40}\n",
            ),
            ("gw.yaml", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - {port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}\n  - {port: {number: 80, name: http2, protocol: HTTP}, hosts: ['*']}\n"),
        ],
    );
    let out = redirector().arg("analyze").arg(&d).output().unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for s in [
        "error: ", "vs.yaml, document 1 (VirtualService bookinfo/reviews), field spec.http[0].match[0].uri.regex: invalid regex",
        "field spec.http[0].route[0].destination.subset: no DestinationRule for reviews.bookinfo.svc.cluster.local defines subset `v3`",
        "field spec.http[0].route[1].destination.host: unknown host `ratings`",
        "field spec.http[0].route: weights sum to 90; they must sum to 100",
        "gw.yaml, document 1 (Gateway gw), field spec.servers[1].port.number: port 80 is already declared",
    ] {
        assert!(text.contains(s), "`{s}` not in:\n{text}");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error(s); the configuration would be rejected"), "{err}");

    let malformed = mesh_dir("malformed", &[("x.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: a\n")]);
    let out = redirector().arg("analyze").arg(&malformed).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("x.yaml, document 1: malformed YAML"), "{out:?}");
}

#[test]
fn analyze_names_a_missing_certificate_file() {
    let d = mesh_dir(
        "cert",
        &[(
            "gw.yaml",
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: edge}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [a.example.com]\n    tls: {mode: SIMPLE, serverCertificate: /nonexistent/cert.pem, privateKey: /nonexistent/key.pem}\n",
        )],
    );
    let out = redirector().arg("analyze").arg(&d).output().unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("gw.yaml, document 1 (Gateway edge/gw), field spec.servers[0].tls.serverCertificate: cannot read /nonexistent/cert.pem"),
        "{text}"
    );
}
