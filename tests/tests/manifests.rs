//! Every Kubernetes manifest we ship, validated offline against
//! Kubernetes' OpenAPI schemas with `kubernetes-validate` (PyPI; .ci/run
//! installs it into the test venv), in strict mode (unknown fields are
//! errors): each profile as `redirector manifest generate` prints it, and
//! each file of deploy/kubernetes. A deliberately broken manifest must
//! fail, so a validator that passes everything cannot hide here.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Kubernetes version the manifests are checked against (the oldest
/// we support and the client library's).
const KUBERNETES: &str = "1.32.0";

fn validator() -> Option<PathBuf> {
    let v = redirector_tests::httpbin_venv().map_or_else(
        || PathBuf::from("/opt/redirector-venv/bin/kubernetes-validate"),
        |v| v.join("bin/kubernetes-validate"),
    );
    if v.exists() {
        return Some(v);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "kubernetes-validate is missing: .ci/run installs it into /opt/redirector-venv"
    );
    eprintln!("SKIPPED: kubernetes-validate is not installed: /opt/redirector-venv/bin/pip install kubernetes-validate==1.37.0");
    None
}

/// (passed, output) of validating `file`.
fn validate(tool: &Path, file: &Path) -> (bool, String) {
    let out = Command::new(tool)
        .args(["--strict", "-k", KUBERNETES])
        .arg(file)
        .output()
        .expect("running kubernetes-validate");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("redirector-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_profile_and_deploy_file_passes_the_kubernetes_schemas() {
    let Some(tool) = validator() else { return };
    let dir = scratch();
    for profile in redirector::cmd::manifest::PROFILES {
        let out = Command::new(redirector_tests::redirector_bin())
            .args(["manifest", "generate", "--profile", profile])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let file = dir.join(format!("{profile}.yaml"));
        std::fs::write(&file, &out.stdout).unwrap();
        let (ok, report) = validate(&tool, &file);
        assert!(ok, "profile {profile}:\n{report}");
        let objects =
            redirector::cmd::manifest::documents(profile, redirector::cmd::manifest::DEFAULT_IMAGE).unwrap().len();
        assert_eq!(
            report.matches(" passed for resource ").count(),
            objects,
            "every object of {profile} was checked:\n{report}"
        );
    }
    let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    for sub in ["base", "demo"] {
        for e in std::fs::read_dir(deploy.join(sub)).unwrap().flatten() {
            let p = e.path();
            if p.file_name().unwrap() == "kustomization.yaml" {
                continue;
            }
            let (ok, report) = validate(&tool, &p);
            assert!(ok, "{}:\n{report}", p.display());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The rollout takes over instead of replacing: a surge pod beside the old
/// one, never fewer than one per node, and no host port (a hostNetwork
/// pod's declared ports) that would keep the surge pod off the node.
#[test]
fn the_daemonset_rolls_out_by_takeover() {
    let yaml = redirector::cmd::manifest::generate("minimal", redirector::cmd::manifest::DEFAULT_IMAGE).unwrap();
    let ds = yaml.split("\n---").find(|d| d.contains("kind: DaemonSet\n") && d.contains("name: redirector\n")).unwrap();
    assert!(ds.contains("maxSurge: 1") && ds.contains("maxUnavailable: 0"), "{ds}");
    assert!(!ds.contains("containerPort") && !ds.contains("hostPort"), "{ds}");
}

#[test]
fn a_broken_manifest_is_caught() {
    let Some(tool) = validator() else { return };
    let dir = scratch();
    let yaml = redirector::cmd::manifest::generate("minimal", redirector::cmd::manifest::DEFAULT_IMAGE).unwrap();
    // A wrong type, as a hand edit might make it.
    let broken = yaml.replacen("terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: thirty", 1);
    let file = dir.join("broken.yaml");
    std::fs::write(&file, broken).unwrap();
    let (ok, report) = validate(&tool, &file);
    assert!(!ok, "the validator accepted a broken DaemonSet:\n{report}");
    assert!(
        report.contains("did not validate for resource daemonset/redirector")
            && report.contains("terminationGracePeriodSeconds: 'thirty' is not of type 'integer'"),
        "{report}"
    );
    // A misspelt field: strict mode rejects what Kubernetes would drop.
    std::fs::write(&file, yaml.replacen("hostNetwork: true", "hostNetwrk: true", 1)).unwrap();
    let (ok, report) = validate(&tool, &file);
    assert!(!ok && report.contains("'hostNetwrk' was unexpected"), "{report}");
    let _ = std::fs::remove_file(&file);
}

/// The kustomize base and overlay render to exactly what `manifest
/// generate` prints, where kubectl is installed (it is not a CI
/// requirement: the files are the generator's own input).
#[test]
fn kustomize_renders_what_manifest_generate_prints() {
    if Command::new("kubectl").arg("version").arg("--client").output().map_or(true, |o| !o.status.success()) {
        eprintln!("SKIPPED: kubectl is not installed; the kustomize rendering is not compared");
        return;
    }
    let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    for (profile, dir) in [("minimal", "base"), ("demo", "demo")] {
        let out = Command::new("kubectl").arg("kustomize").arg(deploy.join(dir)).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let parse = |text: &str| -> Vec<serde_json::Value> {
            let mut v = redirector::cmd::manifest::yaml_objects(text).unwrap();
            v.sort_by_key(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]));
            v
        };
        let rendered = parse(&String::from_utf8_lossy(&out.stdout));
        let generated =
            parse(&redirector::cmd::manifest::generate(profile, redirector::cmd::manifest::DEFAULT_IMAGE).unwrap());
        assert_eq!(rendered, generated, "{profile}");
    }
}
