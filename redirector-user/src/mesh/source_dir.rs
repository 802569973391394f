//! The file source: a directory of Kubernetes-style YAML, loaded, checked
//! and compiled into the [`Mesh`] the proxy routes with.
//!
//! Every document is read with its file and position so an error can name
//! them: `file, document N (Kind namespace/name), field: reason`. Unknown
//! kinds and fields the proxy does not act on are warnings, never silently
//! different behaviour; anything that would route wrongly is an error and
//! the whole change is rejected (the caller keeps the last good mesh).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::resources::{
    AuthorizationPolicySpec, DestinationRuleSpec, EndpointPort, EndpointsSubset, GatewaySpec, Metadata,
    PeerAuthenticationSpec, PodSpec, PodStatus, SecretDoc, ServiceEntrySpec, ServiceSpec, SliceEndpoint,
    VirtualServiceSpec, WorkloadEntrySpec, AGENT_CONFIG_API, AGENT_CONFIG_KIND,
};

/// Where a document came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based position among the file's documents.
    pub index: usize,
    pub kind: String,
    pub name: String,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind.as_str(), self.name.is_empty()) {
            // An object from the Kubernetes API: no file position.
            (kind, false) if self.index == 0 => write!(f, "{} ({kind} {})", self.file.display(), self.name),
            ("?", true) => write!(f, "{}, document {}", self.file.display(), self.index),
            (kind, true) => write!(f, "{}, document {} ({kind})", self.file.display(), self.index),
            (kind, false) => write!(f, "{}, document {} ({kind} {})", self.file.display(), self.index, self.name),
        }
    }
}

/// A problem in one document. `field` is a path such as
/// `spec.http[0].route[1].weight`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub origin: Origin,
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.origin, self.reason)
        } else {
            write!(f, "{}, field {}: {}", self.origin, self.field, self.reason)
        }
    }
}

/// One parsed object of a kind the mesh reads.
#[derive(Debug, Clone)]
pub struct Doc<T> {
    pub origin: Origin,
    pub meta: Metadata,
    pub spec: T,
}

impl<T> Doc<T> {
    pub fn namespace(&self) -> &str {
        self.meta.namespace.as_deref().unwrap_or("default")
    }
}

/// Everything the directory holds, by kind, in file order.
#[derive(Debug, Clone, Default)]
pub struct Documents {
    pub services: Vec<Doc<ServiceSpec>>,
    pub endpoints: Vec<Doc<Vec<EndpointsSubset>>>,
    pub slices: Vec<Doc<SliceDoc>>,
    pub pods: Vec<Doc<PodDoc>>,
    /// Namespaces, for their enrollment labels.
    pub namespaces: Vec<Doc<()>>,
    pub service_entries: Vec<Doc<ServiceEntrySpec>>,
    pub workload_entries: Vec<Doc<WorkloadEntrySpec>>,
    pub virtual_services: Vec<Doc<VirtualServiceSpec>>,
    pub destination_rules: Vec<Doc<DestinationRuleSpec>>,
    pub gateways: Vec<Doc<GatewaySpec>>,
    pub peer_authentications: Vec<Doc<PeerAuthenticationSpec>>,
    pub authorization_policies: Vec<Doc<AuthorizationPolicySpec>>,
    /// Secrets, for the gateway's `credentialName`.
    pub secrets: Vec<Doc<SecretDoc>>,
    /// Non-fatal findings: unknown kinds, fields not acted on.
    pub warnings: Vec<Problem>,
}

/// An object's identity across versions: kind, namespace, name.
pub type ObjectKey = (String, String, String);

/// The same for every kind of [`Documents`]: `$f!(field)` per field.
macro_rules! each_kind {
    ($m:ident) => {
        $m!(services);
        $m!(endpoints);
        $m!(slices);
        $m!(pods);
        $m!(namespaces);
        $m!(service_entries);
        $m!(workload_entries);
        $m!(virtual_services);
        $m!(destination_rules);
        $m!(gateways);
        $m!(peer_authentications);
        $m!(authorization_policies);
        $m!(secrets);
    };
}

impl<T> Doc<T> {
    pub fn key(&self) -> ObjectKey {
        (self.origin.kind.clone(), self.namespace().to_string(), self.meta.name.clone())
    }
}

impl Documents {
    /// The keys of the objects that came from `origins`.
    pub fn keys_of(&self, origins: &[Origin]) -> Vec<ObjectKey> {
        let mut keys = Vec::new();
        macro_rules! find {
            ($f:ident) => {
                keys.extend(self.$f.iter().filter(|d| origins.contains(&d.origin)).map(Doc::key));
            };
        }
        each_kind!(find);
        keys
    }

    /// Leave out the objects that came from `origins` (and the warnings
    /// about them).
    pub fn remove_origins(&mut self, origins: &[Origin]) {
        macro_rules! remove {
            ($f:ident) => {
                self.$f.retain(|d| !origins.contains(&d.origin));
            };
        }
        each_kind!(remove);
        self.warnings.retain(|w| !origins.contains(&w.origin));
    }

    /// Put back `prev`'s version of each object of `keys` that this set
    /// does not hold: the last version that was accepted. Returns the keys
    /// put back.
    pub fn restore_from(&mut self, prev: &Documents, keys: &[ObjectKey]) -> Vec<ObjectKey> {
        let mut restored = Vec::new();
        macro_rules! restore {
            ($f:ident) => {
                for d in prev.$f.iter().filter(|d| keys.contains(&d.key())) {
                    if !self.$f.iter().any(|x| x.key() == d.key()) {
                        restored.push(d.key());
                        self.$f.push(d.clone());
                    }
                }
            };
        }
        each_kind!(restore);
        restored
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceDoc {
    #[serde(default)]
    pub address_type: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<SliceEndpoint>,
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodDoc {
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

const ISTIO_NETWORKING: [&str; 3] =
    ["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"];

/// Fields of a document that say what it is or are written by the cluster,
/// not by the user: never reported as "not acted on".
fn bookkeeping(path: &str) -> bool {
    path == "metadata" || path.starts_with("metadata.") || path == "status" || path.starts_with("status.")
}

/// Load every `*.yaml` / `*.yml` file of `dir` (sorted by name, not
/// recursive). Errors: the problems that reject this configuration.
pub fn load_dir(dir: &Path) -> Result<Documents, Vec<Problem>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect(),
        Err(e) => {
            return Err(vec![Problem {
                origin: Origin { file: dir.into(), index: 0, kind: "directory".into(), name: String::new() },
                field: String::new(),
                reason: format!("cannot read the directory: {e}"),
            }])
        }
    };
    files.sort();
    let mut docs = Documents::default();
    let mut errors = Vec::new();
    for f in files {
        match std::fs::read_to_string(&f) {
            Ok(text) => load_text(&f, &text, &mut docs, &mut errors),
            Err(e) => errors.push(Problem {
                origin: Origin { file: f.clone(), index: 0, kind: "file".into(), name: String::new() },
                field: String::new(),
                reason: format!("cannot read: {e}"),
            }),
        }
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    }
}

/// Parse the documents of one file into `docs`.
pub fn load_text(file: &Path, text: &str, docs: &mut Documents, errors: &mut Vec<Problem>) {
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let origin = Origin { file: file.into(), index, kind: "?".into(), name: String::new() };
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                errors.push(Problem { origin, field: String::new(), reason: format!("malformed YAML: {e}") });
                // The rest of the file cannot be trusted either.
                return;
            }
        };
        if value.is_null() {
            continue; // an empty document (a trailing `---`)
        }
        load_value(origin, value, docs, errors);
    }
}

/// Take one object (a YAML document, or an object from the Kubernetes API)
/// into `docs` by its kind. `origin` names where it came from.
pub fn load_value(mut origin: Origin, value: serde_yaml::Value, docs: &mut Documents, errors: &mut Vec<Problem>) {
    let api = value.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    origin.kind = if kind.is_empty() { "?".into() } else { kind.clone() };
    let meta: Metadata =
        value.get("metadata").cloned().and_then(|m| serde_yaml::from_value(m).ok()).unwrap_or_default();
    origin.name = match &meta.namespace {
        Some(ns) => format!("{ns}/{}", meta.name),
        None => meta.name.clone(),
    };
    if kind.is_empty() || api.is_empty() {
        errors.push(Problem {
            origin,
            field: if kind.is_empty() { "kind".into() } else { "apiVersion".into() },
            reason: "missing; every document needs apiVersion and kind".into(),
        });
        return;
    }
    if meta.name.is_empty() {
        errors.push(Problem { origin, field: "metadata.name".into(), reason: "missing".into() });
        return;
    }
    let istio = ISTIO_NETWORKING.contains(&api.as_str());
    macro_rules! take {
        ($list:ident, $ty:ty, $part:expr) => {{
            let part = match $part {
                Some(p) => value.get(p).cloned().unwrap_or(serde_yaml::Value::Null),
                None => value.clone(),
            };
            let prefix = $part.map(|p: &str| format!("{p}.")).unwrap_or_default();
            if let Some(spec) = parse::<$ty>(part, &prefix, &origin, docs, errors) {
                docs.$list.push(Doc { origin: origin.clone(), meta: meta.clone(), spec });
            }
        }};
    }
    match (api.as_str(), kind.as_str()) {
        ("v1", "Service") => take!(services, ServiceSpec, Some("spec")),
        ("v1", "Endpoints") => take!(endpoints, Vec<EndpointsSubset>, Some("subsets")),
        ("v1", "Pod") => take!(pods, PodDoc, None::<&str>),
        ("v1", "Secret") => take!(secrets, SecretDoc, None::<&str>),
        ("v1", "Namespace") => docs.namespaces.push(Doc { origin: origin.clone(), meta: meta.clone(), spec: () }),
        ("discovery.k8s.io/v1", "EndpointSlice") => take!(slices, SliceDoc, None::<&str>),
        (_, "ServiceEntry") if istio => take!(service_entries, ServiceEntrySpec, Some("spec")),
        (_, "WorkloadEntry") if istio => take!(workload_entries, WorkloadEntrySpec, Some("spec")),
        (_, "VirtualService") if istio => take!(virtual_services, VirtualServiceSpec, Some("spec")),
        (_, "DestinationRule") if istio => take!(destination_rules, DestinationRuleSpec, Some("spec")),
        (_, "Gateway") if istio => take!(gateways, GatewaySpec, Some("spec")),
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "PeerAuthentication") => {
            take!(peer_authentications, PeerAuthenticationSpec, Some("spec"));
        }
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
            take!(authorization_policies, AuthorizationPolicySpec, Some("spec"));
        }
        (AGENT_CONFIG_API, AGENT_CONFIG_KIND) => docs.warnings.push(Problem {
            origin,
            field: String::new(),
            reason: "agent settings are read from `redirector run --config FILE`, not from the mesh directory; ignored"
                .into(),
        }),
        _ => docs.warnings.push(Problem {
            origin,
            field: String::new(),
            reason: format!("{api} {kind} is not a kind the mesh reads; ignored"),
        }),
    }
}

/// Deserialize `value` as `T`, recording fields `T` does not have as
/// warnings (with `prefix` before their path) and a type error as an error.
fn parse<T: DeserializeOwned>(
    value: serde_yaml::Value,
    prefix: &str,
    origin: &Origin,
    docs: &mut Documents,
    errors: &mut Vec<Problem>,
) -> Option<T> {
    let mut unknown = Vec::new();
    let r: Result<T, _> = serde_ignored::deserialize(value, |path| unknown.push(path.to_string()));
    match r {
        Ok(t) => {
            for p in unknown {
                let field = format!("{prefix}{}", indexed(&p));
                if bookkeeping(&field) || field == "apiVersion" || field == "kind" {
                    continue;
                }
                docs.warnings.push(Problem {
                    origin: origin.clone(),
                    field,
                    reason: "not supported yet; ignored (see docs/istio-conformance.md)".into(),
                });
            }
            Some(t)
        }
        Err(e) => {
            errors.push(Problem {
                origin: origin.clone(),
                field: prefix.trim_end_matches('.').to_string(),
                reason: e.to_string(),
            });
            None
        }
    }
}

/// serde_ignored's `http.1.corsPolicy` as `http[1].corsPolicy`, the way
/// the other messages write list positions.
fn indexed(path: &str) -> String {
    let mut out = String::new();
    for seg in path.split('.') {
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

/// Kubernetes' short names: `name`, `name.namespace`, and the FQDN
/// `name.namespace.svc.cluster.local` all name the same service.
pub fn fqdn(host: &str, namespace: &str) -> String {
    let h = host.trim_end_matches('.');
    if h.contains('*') {
        return h.to_string();
    }
    match h.matches('.').count() {
        0 => format!("{h}.{namespace}.svc.cluster.local"),
        1 => format!("{h}.svc.cluster.local"),
        _ => h.to_string(),
    }
}

/// Whether `pattern` (an Istio host, possibly `*.suffix` or `*`) covers
/// `host`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix),
        None => pattern == host,
    }
}

/// Labels `want` are all in `have`.
pub fn labels_match(want: &BTreeMap<String, String>, have: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> (Documents, Vec<Problem>) {
        let mut docs = Documents::default();
        let mut errors = Vec::new();
        load_text(Path::new("mesh.yaml"), text, &mut docs, &mut errors);
        (docs, errors)
    }

    #[test]
    fn multi_document_files_load_by_kind_and_unknown_kinds_warn() {
        let (docs, errors) = load(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec:\n  clusterIP: 10.0.0.1\n  ports: [{port: 80, name: http}]\n---\napiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: vs}\nspec: {hosts: [a.ns]}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(docs.services.len(), 1);
        assert_eq!(docs.virtual_services.len(), 1);
        assert_eq!(docs.warnings.len(), 1);
        assert!(docs.warnings[0].to_string().contains("document 3 (ConfigMap c)"), "{}", docs.warnings[0]);
    }

    #[test]
    fn a_field_not_acted_on_is_named_in_a_warning() {
        let (docs, errors) = load(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: ns, uid: x}\nspec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n    corsPolicy: {allowOrigins: []}\n",
        );
        assert!(errors.is_empty());
        let w: Vec<String> = docs.warnings.iter().map(std::string::ToString::to_string).collect();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("field spec.http[0].corsPolicy: not supported yet"), "{w:?}");
    }

    #[test]
    fn malformed_yaml_and_wrong_types_are_errors_with_file_and_document() {
        let (_, errors) = load("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: eighty}]}\n");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().starts_with("mesh.yaml, document 1 (Service a), field spec:"), "{}", errors[0]);
        let (_, errors) = load("a: [b\n");
        assert!(errors[0].reason.starts_with("malformed YAML"), "{errors:?}");
    }

    #[test]
    fn short_names_expand_to_the_service_fqdn() {
        assert_eq!(fqdn("reviews", "bookinfo"), "reviews.bookinfo.svc.cluster.local");
        assert_eq!(fqdn("reviews.bookinfo", "x"), "reviews.bookinfo.svc.cluster.local");
        assert_eq!(fqdn("httpbin.example.com", "x"), "httpbin.example.com");
        assert!(host_matches("*.example.com", "httpbin.example.com"));
        assert!(!host_matches("*.example.com", "example.org"));
    }
}
