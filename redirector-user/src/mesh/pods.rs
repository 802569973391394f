//! Pods as the mesh sees them: which are enrolled (Istio's namespace and
//! pod labels), their addresses, service accounts and what happens to
//! their connections until their proxy is ready. Compiled from the
//! documents with the rest of the model; read by policy and by the node's
//! pod loop. It does not find a pod's cgroups or namespace on the node.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::source_dir::Documents;

/// The annotation naming a pod's network namespace (a path such as
/// `/var/run/netns/NAME`) where no container runtime tells us.
pub const NETNS_ANNOTATION: &str = "redirector.dev/netns";
/// The annotation naming a pod's cgroup (relative to the cgroup2 mount, or
/// absolute) where it cannot be found from the pod's UID.
pub const CGROUP_ANNOTATION: &str = "redirector.dev/cgroup";

/// The annotation (on a Namespace, or a Pod to override it) choosing what
/// happens to a pod's connections until its proxy is ready: `refuse`
/// (default: connects fail with EPERM) or `hold` (the pod's processes are
/// frozen until then, as Istio's holdApplicationUntilProxyStarts holds the
/// app). Either way nothing goes around the mesh.
pub const UNTIL_READY_ANNOTATION: &str = "redirector.dev/until-ready";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UntilReady {
    #[default]
    Refuse,
    Hold,
}

/// A Pod as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub uid: Option<String>,
    pub node_name: Option<String>,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub host_ip: Option<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub netns: Option<String>,
    pub cgroup: Option<String>,
    pub until_ready: UntilReady,
    /// In the mesh: its namespace (or the pod itself) opts in the way Istio
    /// users label them, it does not opt out, and it is not on the host
    /// network.
    pub enrolled: bool,
}

/// Istio's enrollment rules: a namespace labelled
/// `istio-injection=enabled` or `istio.io/dataplane-mode=ambient` (or a pod
/// labelled `sidecar.istio.io/inject: "true"` / `istio.io/dataplane-mode:
/// ambient`) is in; the pod label or annotation `sidecar.istio.io/inject:
/// "false"` and the label `istio.io/dataplane-mode=none` opt out;
/// hostNetwork pods are never captured.
pub(crate) fn pods(docs: &Documents) -> Vec<PodInfo> {
    let ns_in: std::collections::HashSet<&str> = docs
        .namespaces
        .iter()
        .filter(|n| {
            n.meta.labels.get("istio-injection").is_some_and(|v| v == "enabled")
                || n.meta.labels.get("istio.io/dataplane-mode").is_some_and(|v| v == "ambient")
        })
        .map(|n| n.meta.name.as_str())
        .collect();
    let hold_ns: std::collections::HashSet<&str> = docs
        .namespaces
        .iter()
        .filter(|n| n.meta.annotations.get(UNTIL_READY_ANNOTATION).is_some_and(|v| v == "hold"))
        .map(|n| n.meta.name.as_str())
        .collect();
    docs.pods
        .iter()
        .map(|p| {
            let l = &p.meta.labels;
            let a = &p.meta.annotations;
            let opted_in = l.get("sidecar.istio.io/inject").is_some_and(|v| v == "true")
                || l.get("istio.io/dataplane-mode").is_some_and(|v| v == "ambient");
            let opted_out = l.get("sidecar.istio.io/inject").is_some_and(|v| v == "false")
                || a.get("sidecar.istio.io/inject").is_some_and(|v| v == "false")
                || l.get("istio.io/dataplane-mode").is_some_and(|v| v == "none");
            let host_network = p.spec.spec.host_network.unwrap_or(false);
            PodInfo {
                name: p.meta.name.clone(),
                namespace: p.namespace().to_string(),
                uid: p.meta.uid.clone(),
                node_name: p.spec.spec.node_name.clone(),
                service_account: p.spec.spec.service_account_name.clone().unwrap_or_else(|| "default".into()),
                ips: p.spec.status.ips(),
                host_ip: p.spec.status.host_ip.as_deref().and_then(|s| s.parse().ok()),
                labels: l.clone(),
                netns: a.get(NETNS_ANNOTATION).cloned(),
                cgroup: a.get(CGROUP_ANNOTATION).cloned(),
                until_ready: match a.get(UNTIL_READY_ANNOTATION).map(String::as_str) {
                    Some("hold") => UntilReady::Hold,
                    Some(_) => UntilReady::Refuse,
                    None if hold_ns.contains(p.namespace()) => UntilReady::Hold,
                    None => UntilReady::Refuse,
                },
                enrolled: !host_network && !opted_out && (opted_in || ns_in.contains(p.namespace())),
            }
        })
        .collect()
}
