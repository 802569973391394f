//! The Kubernetes manifests of a profile, from the files in
//! deploy/kubernetes (the kustomize base and its demo overlay), so
//! `redirector manifest generate`, `redirector install` and
//! `kubectl apply -k` deploy the same objects.

#![forbid(unsafe_code)]

use anyhow::{bail, Result};

/// The base (minimal profile), in its kustomization's order.
const BASE: [(&str, &str); 6] = [
    ("namespace.yaml", include_str!("../../../deploy/kubernetes/base/namespace.yaml")),
    ("serviceaccount.yaml", include_str!("../../../deploy/kubernetes/base/serviceaccount.yaml")),
    ("rbac.yaml", include_str!("../../../deploy/kubernetes/base/rbac.yaml")),
    ("configmap.yaml", include_str!("../../../deploy/kubernetes/base/configmap.yaml")),
    ("ca.yaml", include_str!("../../../deploy/kubernetes/base/ca.yaml")),
    ("daemonset.yaml", include_str!("../../../deploy/kubernetes/base/daemonset.yaml")),
];

/// The demo overlay's resources, and its patch (a whole ConfigMap).
const DEMO: [(&str, &str); 2] = [
    ("ingressgateway.yaml", include_str!("../../../deploy/kubernetes/demo/ingressgateway.yaml")),
    ("metrics.yaml", include_str!("../../../deploy/kubernetes/demo/metrics.yaml")),
];
const DEMO_CONFIGMAP: &str = include_str!("../../../deploy/kubernetes/demo/configmap.yaml");

pub const PROFILES: [&str; 2] = ["minimal", "demo"];
pub const DEFAULT_IMAGE: &str = "ghcr.io/redirector-mesh/redirector:0.1.0";
pub const NAMESPACE: &str = "redirector-system";
pub const DAEMONSET: &str = "redirector";
/// The CA's namespace, Deployment, Service and the agents' trust bundle.
pub const CA_NAMESPACE: &str = "redirector-ca";
pub const CA_DEPLOYMENT: &str = "redirector-ca";
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";

/// The YAML documents of `profile`, each as written in deploy/ (comments
/// kept), with the agent image replaced by `image`.
pub fn documents(profile: &str, image: &str) -> Result<Vec<String>> {
    if !PROFILES.contains(&profile) {
        bail!("unknown profile `{profile}`: choose one of {}", PROFILES.join(", "));
    }
    if image.trim().is_empty() || image.contains(char::is_whitespace) {
        bail!("--image `{image}` is not an image reference (e.g. {DEFAULT_IMAGE})");
    }
    let mut docs = Vec::new();
    for (name, text) in BASE {
        let text = if profile == "demo" && name == "configmap.yaml" { DEMO_CONFIGMAP } else { text };
        for doc in split(text) {
            docs.push(doc.replace(DEFAULT_IMAGE, image));
        }
    }
    if profile == "demo" {
        for (_, text) in DEMO {
            docs.extend(split(text));
        }
    }
    Ok(docs)
}

/// One multi-document YAML stream.
pub fn generate(profile: &str, image: &str) -> Result<String> {
    Ok(documents(profile, image)?.join("---\n"))
}

/// The objects of a YAML stream (`---`-separated documents) as JSON, for
/// comparing renderings and feeding an API.
pub fn yaml_objects(text: &str) -> Result<Vec<serde_json::Value>> {
    split(text).iter().map(|d| Ok(serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(d)?)?)).collect()
}

fn split(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.trim_end() == "---" {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    out.push(cur);
    out.into_iter().filter(|d| d.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(profile: &str) -> Vec<String> {
        documents(profile, DEFAULT_IMAGE)
            .unwrap()
            .iter()
            .map(|d| {
                let v: serde_yaml::Value = serde_yaml::from_str(d).unwrap();
                format!("{}/{}", v["kind"].as_str().unwrap(), v["metadata"]["name"].as_str().unwrap())
            })
            .collect()
    }

    #[test]
    fn profiles_hold_the_expected_objects() {
        assert_eq!(
            kinds("minimal"),
            [
                "Namespace/redirector-system",
                "ServiceAccount/redirector",
                "ClusterRole/redirector",
                "ClusterRoleBinding/redirector",
                "Role/redirector-gateway-secrets",
                "RoleBinding/redirector-gateway-secrets",
                "ConfigMap/redirector",
                "Namespace/redirector-ca",
                "ServiceAccount/redirector-ca",
                "ClusterRole/redirector-ca",
                "ClusterRoleBinding/redirector-ca",
                "Role/redirector-ca-key",
                "RoleBinding/redirector-ca-key",
                "Deployment/redirector-ca",
                "Service/redirector-ca",
                "DaemonSet/redirector"
            ]
        );
        let demo = kinds("demo");
        assert!(demo.contains(&"Service/istio-ingressgateway".to_string()));
        assert!(demo.contains(&"Service/redirector-metrics".to_string()));
        assert!(generate("demo", DEFAULT_IMAGE).unwrap().contains("accessLog: true"));
        assert!(generate("minimal", DEFAULT_IMAGE).unwrap().contains("accessLog: false"));
    }

    #[test]
    fn the_agent_settings_in_each_profile_are_valid() {
        for p in PROFILES {
            let docs = documents(p, DEFAULT_IMAGE).unwrap();
            let cm = docs.iter().find(|d| d.contains("kind: ConfigMap")).unwrap();
            let v: serde_yaml::Value = serde_yaml::from_str(cm).unwrap();
            let agent = v["data"]["agent.yaml"].as_str().unwrap();
            let dir = std::env::temp_dir().join(format!("redirector-manifest-{}-{p}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("agent.yaml"), agent).unwrap();
            crate::config::AgentConfig::load(&dir.join("agent.yaml")).unwrap_or_else(|e| panic!("{p}: {e}"));
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn bad_profile_and_image_are_named() {
        assert!(documents("default", DEFAULT_IMAGE)
            .unwrap_err()
            .to_string()
            .contains("unknown profile `default`: choose one of minimal, demo"));
        assert!(documents("demo", "a b").is_err());
        assert!(generate("minimal", "registry.local/redirector:dev")
            .unwrap()
            .contains("image: registry.local/redirector:dev"));
    }
}
