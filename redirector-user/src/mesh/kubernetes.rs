//! The Kubernetes API as the mesh's config source (the DaemonSet's): kube-rs
//! watchers on the kinds the mesh reads, feeding the same [`Documents`] →
//! [`Mesh`] path as a directory of YAML.
//!
//! - Pods: those scheduled on this node (field selector `spec.nodeName`),
//!   which the agent enrolls, and every pod as the address book (a remote
//!   pod's node and service account decide where an HBONE tunnel goes and
//!   which identity the peer must present).
//! - Namespaces (their `istio-injection` / `istio.io/dataplane-mode`
//!   labels), Services, EndpointSlices.
//! - Secrets of the agent's own namespace only (a Role there, nothing
//!   cluster-wide), for the gateway's `credentialName`; of each, only a
//!   certificate and key are kept in memory.
//! - Istio's kinds (networking.istio.io, security.istio.io) where their
//!   CRDs are installed; where they are not, a warning, and capture and
//!   mTLS work without them.
//!
//! Nothing is compiled until every watcher has listed its kind once, so a
//! pod is never enrolled under a half-read config (its policies missing).
//! A watch that ends (an API server restart) resumes from its last
//! resourceVersion; a relist replaces a kind's objects at once, and a
//! content that did not change does not touch the mesh, so pods already
//! served are not re-enrolled.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use futures_util::StreamExt;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use tracing::{error, info, warn};

use crate::mesh::source_dir::{load_value, Documents, Origin, Problem};
use crate::mesh::{Mesh, MeshHandle};

/// How to reach the cluster: a kubeconfig (and context), else the usual
/// search (`KUBECONFIG`, `~/.kube/config`, the in-cluster service account).
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
}

/// A client for the cluster, or one line saying why there is none.
pub async fn client(access: &Access) -> Result<kube::Client> {
    let options = kube::config::KubeConfigOptions { context: access.context.clone(), ..Default::default() };
    let config = match &access.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow!("kubeconfig {}: {e}; pass a readable kubeconfig with --kubeconfig", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|e| anyhow!("kubeconfig {}: {e}", path.display()))?
        }
        None if access.context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| anyhow!("kubeconfig: {e}"))?,
        None => kube::Config::infer().await.map_err(|e| {
            anyhow!("no access to a Kubernetes cluster ({e}); set KUBECONFIG or --kubeconfig, or run in a pod with a service account")
        })?,
    };
    let url = config.cluster_url.clone();
    kube::Client::try_from(config).map_err(|e| anyhow!("Kubernetes API at {url}: {e}"))
}

/// One line for an API error: what was asked, what the API server said,
/// and what to do.
pub fn explain(e: kube::Error, what: &str) -> anyhow::Error {
    match e {
        kube::Error::Api(s) if s.code == 403 => anyhow!(
            "the Kubernetes API refused to {what}: {}; grant it in the redirector ClusterRole (deploy/kubernetes/rbac.yaml)",
            s.message
        ),
        kube::Error::Api(s) if s.code == 401 => {
            anyhow!("the Kubernetes API did not accept our credentials to {what}: {}; check the kubeconfig's user or the service account token", s.message)
        }
        kube::Error::Api(s) => anyhow!("the Kubernetes API answered {} to {what}: {}", s.code, s.message),
        other => anyhow!("cannot reach the Kubernetes API to {what}: {other}; check that the API server is up and the kubeconfig points at it"),
    }
}

/// A kind the agent watches.
#[derive(Debug, Clone)]
pub struct Watched {
    pub resource: ApiResource,
    /// Only this namespace's objects (the gateway's Secrets); `None`: the
    /// whole cluster.
    pub namespace: Option<String>,
    pub field_selector: Option<String>,
    /// What this watch is for, in logs and status.
    pub role: String,
}

impl Watched {
    fn new(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        field_selector: Option<String>,
        role: &str,
    ) -> Watched {
        Watched {
            resource: ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural),
            namespace: None,
            field_selector,
            role: role.into(),
        }
    }

    /// `pods`, `virtualservices.networking.istio.io`: as RBAC and kubectl
    /// name it.
    pub fn resource_name(&self) -> String {
        if self.resource.group.is_empty() {
            self.resource.plural.clone()
        } else {
            format!("{}.{}", self.resource.plural, self.resource.group)
        }
    }
}

/// The Kubernetes kinds, always watched.
pub fn core_kinds(node: &str) -> Vec<Watched> {
    vec![
        Watched::new("", "v1", "Pod", "pods", Some(format!("spec.nodeName={node}")), "pods on this node"),
        Watched::new("", "v1", "Pod", "pods", None, "pods (address book)"),
        Watched::new("", "v1", "Namespace", "namespaces", None, "namespaces"),
        Watched::new("", "v1", "Service", "services", None, "services"),
        Watched::new("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", None, "endpoint slices"),
    ]
}

/// The Secrets of the agent's own namespace, where its ingress gateway
/// reads `credentialName` (a Role there grants it, nothing cluster-wide).
pub fn gateway_secrets(namespace: &str) -> Watched {
    let mut w = Watched::new("", "v1", "Secret", "secrets", None, "gateway secrets");
    w.namespace = Some(namespace.into());
    w
}

/// Istio's kinds the mesh reads, by API group.
pub const ISTIO_KINDS: [(&str, &[(&str, &str)]); 2] = [
    (
        "networking.istio.io",
        &[
            ("VirtualService", "virtualservices"),
            ("DestinationRule", "destinationrules"),
            ("Gateway", "gateways"),
            ("ServiceEntry", "serviceentries"),
            ("WorkloadEntry", "workloadentries"),
        ],
    ),
    (
        "security.istio.io",
        &[("PeerAuthentication", "peerauthentications"), ("AuthorizationPolicy", "authorizationpolicies")],
    ),
];

/// The Istio kinds the cluster serves (the newest version of each group
/// that has them), and a warning per group whose CRDs are absent.
pub async fn istio_kinds(client: &kube::Client) -> Result<(Vec<Watched>, Vec<String>)> {
    let mut found = Vec::new();
    let mut warnings = Vec::new();
    for (group, kinds) in ISTIO_KINDS {
        let mut served = None;
        for version in ["v1", "v1beta1", "v1alpha3"] {
            match client.list_api_group_resources(&format!("{group}/{version}")).await {
                Ok(list) => {
                    served = Some((version, list));
                    break;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => continue,
                Err(e) => return Err(explain(e, &format!("discover the {group} API group"))),
            }
        }
        let names: Vec<&str> = kinds.iter().map(|(k, _)| *k).collect();
        match served {
            None => warnings.push(format!(
                "the Istio CRDs of {group} are not installed: {} from the cluster are not applied (capture and mTLS still work); install Istio's CRDs to use them",
                names.join(", ")
            )),
            Some((version, list)) => {
                for (kind, plural) in kinds {
                    if list.resources.iter().any(|r| r.name == *plural) {
                        found.push(Watched::new(group, version, kind, plural, None, plural));
                    } else {
                        warnings.push(format!("{group}/{version} does not serve {kind}: it is not applied"));
                    }
                }
            }
        }
    }
    Ok((found, warnings))
}

/// Ask the API server (SelfSubjectAccessReview) whether this agent may
/// list and watch each kind; the first refusal is the error, naming verb
/// and resource.
pub async fn check_access(client: &kube::Client, watched: &[Watched]) -> Result<()> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut asked = HashSet::new();
    for w in watched {
        for verb in ["list", "watch"] {
            if !asked.insert((verb, w.resource_name())) {
                continue;
            }
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(verb.into()),
                        group: Some(w.resource.group.clone()),
                        resource: Some(w.resource.plural.clone()),
                        namespace: w.namespace.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let answer = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| explain(e, &format!("check whether the agent may {verb} {}", w.resource_name())))?;
            let status = answer.status.unwrap_or_default();
            if !status.allowed {
                let why = status.reason.filter(|r| !r.is_empty()).map(|r| format!(" ({r})")).unwrap_or_default();
                if let Some(ns) = &w.namespace {
                    bail!(
                        "the agent may not {verb} {} in namespace {ns}{why}: grant verb `{verb}` on resource `{}` in the redirector Role of namespace {ns} (deploy/kubernetes/base/rbac.yaml)",
                        w.resource_name(),
                        w.resource_name()
                    );
                }
                bail!(
                    "the agent may not {verb} {} in the cluster{why}: grant verb `{verb}` on resource `{}` in the redirector ClusterRole (deploy/kubernetes/rbac.yaml)",
                    w.resource_name(),
                    w.resource_name()
                );
            }
        }
    }
    Ok(())
}

/// What the source has seen, for logs and `redirector status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceStatus {
    /// Every kind listed at least once.
    pub synced: bool,
    /// Objects per watch.
    pub objects: BTreeMap<String, usize>,
    /// Mesh changes applied from the cluster.
    pub applied: u64,
    /// Digest of the cluster-wide objects last applied (what
    /// `redirector status --cluster` compares with the cluster's own).
    pub digest: String,
    /// Objects the mesh rejected (kind namespace/name: reason).
    pub rejected: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Default)]
struct Store {
    /// Per watch: objects by (namespace, name), as the API sent them.
    objects: Vec<BTreeMap<(String, String), serde_json::Value>>,
    /// Objects listed since the last `Init`, replacing `objects` at `InitDone`.
    relisting: Vec<Option<BTreeMap<(String, String), serde_json::Value>>>,
    listed: Vec<bool>,
}

fn key_of(o: &DynamicObject) -> (String, String) {
    (o.metadata.namespace.clone().unwrap_or_default(), o.metadata.name.clone().unwrap_or_default())
}

/// The object as the file source would read it: apiVersion and kind set
/// (list items lack them), bookkeeping the mesh never reads dropped.
pub fn normalise(o: DynamicObject, r: &ApiResource) -> Option<serde_json::Value> {
    let mut v = serde_json::to_value(&o).ok()?;
    let m = v.as_object_mut()?;
    m.insert("apiVersion".into(), r.api_version.clone().into());
    m.insert("kind".into(), r.kind.clone().into());
    if let Some(meta) = m.get_mut("metadata").and_then(|x| x.as_object_mut()) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
        meta.remove("generation");
        // Istio's objects keep their creation time: of two that conflict,
        // the older wins ([`documents`] orders them by it).
        if matches!(r.kind.as_str(), "Pod" | "Secret" | "Namespace" | "Service" | "EndpointSlice" | "Endpoints") {
            meta.remove("creationTimestamp");
        }
    }
    if r.kind == "Secret" {
        keep_only_tls(m);
    }
    if r.kind == "Pod" {
        drop_host_annotations(m);
        // Finished pods hold no connections; their address is reused.
        let phase = m.get("status").and_then(|s| s.get("phase")).and_then(|p| p.as_str()).unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            return None;
        }
        // Only the addresses matter, not probe times and conditions.
        if let Some(status) = m.get_mut("status").and_then(|s| s.as_object_mut()) {
            status.retain(|k, _| k == "podIP" || k == "podIPs" || k == "hostIP" || k == "phase");
        }
    }
    Some(v)
}

/// The Pod annotations that name host state (a cgroup, a network
/// namespace) or change what happens to a pod's processes. From the
/// cluster they are the word of whoever may create a pod, so they are
/// dropped as the pod arrives: the agent finds a pod's cgroup and network
/// namespace from its UID under the kubelet's pod tree, and reads
/// `until-ready` from the pod's Namespace. The directory source (a dev
/// box, the tests) still honours them.
const HOST_ANNOTATIONS: [&str; 3] = [
    crate::mesh::pods::CGROUP_ANNOTATION,
    crate::mesh::pods::NETNS_ANNOTATION,
    crate::mesh::pods::UNTIL_READY_ANNOTATION,
];

fn drop_host_annotations(m: &mut serde_json::Map<String, serde_json::Value>) {
    let Some(meta) = m.get_mut("metadata").and_then(|x| x.as_object_mut()) else { return };
    let pod = format!(
        "{}/{}",
        meta.get("namespace").and_then(|v| v.as_str()).unwrap_or_default(),
        meta.get("name").and_then(|v| v.as_str()).unwrap_or_default()
    );
    let Some(a) = meta.get_mut("annotations").and_then(|x| x.as_object_mut()) else { return };
    let dropped: Vec<&str> = HOST_ANNOTATIONS.into_iter().filter(|k| a.remove(*k).is_some()).collect();
    if dropped.is_empty() {
        return;
    }
    // Once per pod and annotation set, however often the pod changes.
    static WARNED: std::sync::LazyLock<Mutex<HashSet<String>>> = std::sync::LazyLock::new(Default::default);
    let key = format!("{pod} {}", dropped.join(","));
    let mut warned = WARNED.lock().expect("warned lock");
    if warned.len() > 10_000 {
        warned.clear();
    }
    if warned.insert(key) {
        warn!(
            pod = %pod,
            annotations = %dropped.join(", "),
            "pod annotations ignored: from the cluster, a pod's cgroup and network namespace are found from its UID and until-ready is read from its Namespace"
        );
    }
}

/// Of a Secret, only what a gateway can serve stays in memory: its type
/// and a certificate and key under the names a TLS Secret uses. Every other
/// value of the namespace (tokens, a CA's key) and the annotations (kubectl
/// copies the whole Secret into one) are dropped as they arrive.
fn keep_only_tls(m: &mut serde_json::Map<String, serde_json::Value>) {
    use crate::mesh::resources::{GENERIC_CERT_KEY, GENERIC_KEY_KEY, TLS_CERT_KEY, TLS_KEY_KEY};
    m.remove("stringData");
    if let Some(meta) = m.get_mut("metadata").and_then(|x| x.as_object_mut()) {
        meta.remove("annotations");
    }
    if let Some(data) = m.get_mut("data").and_then(|d| d.as_object_mut()) {
        data.retain(|k, _| [TLS_CERT_KEY, TLS_KEY_KEY, GENERIC_CERT_KEY, GENERIC_KEY_KEY].contains(&k.as_str()));
    }
}

/// A digest of objects (FNV-1a over their JSON, in order): the same code
/// in the agent and in `redirector status --cluster`.
pub fn digest<'a>(objects: impl Iterator<Item = &'a serde_json::Value>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for o in objects {
        for b in o.to_string().bytes().chain(std::iter::once(b'\n')) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Kubernetes' own kinds have many fields the mesh does not read by
/// design; only the mesh kinds' unread fields are worth a warning.
const CORE_KINDS: [&str; 6] = ["Pod", "Namespace", "Service", "EndpointSlice", "Endpoints", "Secret"];

/// The documents the stored objects make. Pods on this node come from
/// their own watch; the address book fills in the rest.
fn documents(store: &Store, watched: &[Watched]) -> (Documents, Vec<Problem>) {
    let mut docs = Documents::default();
    let mut errors = Vec::new();
    let mut pods_seen = HashSet::new();
    for (i, w) in watched.iter().enumerate() {
        // Oldest first, as Istio resolves two objects that claim the same
        // thing (a host of two VirtualServices, a subset of two
        // DestinationRules): the older wins. Name order breaks a tie.
        let mut objects: Vec<_> = store.objects[i].iter().collect();
        objects.sort_by_key(|(key, v)| (created(v), *key));
        for ((ns, name), value) in objects {
            if w.resource.kind == "Pod" && !pods_seen.insert((ns.clone(), name.clone())) {
                continue;
            }
            let Ok(yaml) = serde_yaml::to_value(value) else { continue };
            let origin = Origin {
                file: PathBuf::from("kubernetes"),
                index: 0,
                kind: w.resource.kind.clone(),
                name: if ns.is_empty() { name.clone() } else { format!("{ns}/{name}") },
            };
            load_value(origin, yaml, &mut docs, &mut errors);
        }
    }
    docs.warnings.retain(|w| !CORE_KINDS.contains(&w.origin.kind.as_str()));
    (docs, errors)
}

/// An object's `metadata.creationTimestamp` (RFC 3339 in UTC, so the
/// text sorts as the time does); empty when absent.
fn created(v: &serde_json::Value) -> &str {
    v.pointer("/metadata/creationTimestamp").and_then(|t| t.as_str()).unwrap_or_default()
}

/// Watch every kind and keep `handle` compiled from what the cluster
/// holds. Returns the task and the source's status.
pub fn spawn(
    client: kube::Client,
    watched: Vec<Watched>,
    warnings: Vec<String>,
    scope: crate::mesh::Scope,
    handle: MeshHandle,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<SourceStatus>>) {
    let n = watched.len();
    let store = Arc::new(Mutex::new(Store {
        objects: vec![BTreeMap::new(); n],
        relisting: vec![None; n],
        listed: vec![false; n],
    }));
    let status = Arc::new(Mutex::new(SourceStatus { warnings: warnings.clone(), ..Default::default() }));
    for w in &warnings {
        warn!(warning = %w, "kubernetes config source");
    }
    let changed = Arc::new(tokio::sync::Notify::new());
    let watched = Arc::new(watched);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(watch_kind(client.clone(), watched[i].clone(), i, Arc::clone(&store), Arc::clone(&changed)))
        })
        .collect();
    let applier = Applier {
        store,
        watched,
        status: Arc::clone(&status),
        scope,
        handle,
        last: None,
        announced: false,
        accepted: None,
    };
    let task = tokio::spawn(applier.run(changed, stop, tasks));
    (task, status)
}

/// Fold one kind's watch events into the store (slot `i`), waking the
/// applier on every change; the watcher backs off and retries by itself.
async fn watch_kind(
    client: kube::Client,
    w: Watched,
    i: usize,
    store: Arc<Mutex<Store>>,
    changed: Arc<tokio::sync::Notify>,
) {
    let api: Api<DynamicObject> = match &w.namespace {
        Some(ns) => Api::namespaced_with(client, ns, &w.resource),
        None => Api::all_with(client, &w.resource),
    };
    let mut config = watcher::Config::default();
    if let Some(f) = &w.field_selector {
        config = config.fields(f);
    }
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut failing = false;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => {
                if failing {
                    info!(watch = %w.role, "kubernetes watch resumed");
                    failing = false;
                }
                e
            }
            Err(e) => {
                if !failing {
                    warn!(watch = %w.role, error = %e, "kubernetes watch failed; retrying with backoff, the last config stays in force");
                    failing = true;
                }
                continue;
            }
        };
        let mut s = store.lock().expect("kubernetes store lock");
        match event {
            watcher::Event::Init => s.relisting[i] = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                let k = key_of(&o);
                if let (Some(v), Some(buf)) = (normalise(o, &w.resource), s.relisting[i].as_mut()) {
                    buf.insert(k, v);
                }
            }
            watcher::Event::InitDone => {
                let listed = s.relisting[i].take().unwrap_or_default();
                s.objects[i] = listed;
                s.listed[i] = true;
                changed.notify_one();
            }
            watcher::Event::Apply(o) => {
                let k = key_of(&o);
                match normalise(o, &w.resource) {
                    Some(v) => s.objects[i].insert(k, v),
                    None => s.objects[i].remove(&k),
                };
                changed.notify_one();
            }
            watcher::Event::Delete(o) => {
                s.objects[i].remove(&key_of(&o));
                changed.notify_one();
            }
        }
    }
}

/// Compiles the store into the mesh in force when it changes.
struct Applier {
    store: Arc<Mutex<Store>>,
    watched: Arc<Vec<Watched>>,
    status: Arc<Mutex<SourceStatus>>,
    /// The agent's namespace (whose Secrets the gateway reads) and the
    /// mesh-wide exportTo defaults.
    scope: crate::mesh::Scope,
    handle: MeshHandle,
    /// What the last compile saw, as a digest of every object (a copy of
    /// them all would double the source's memory).
    last: Option<String>,
    announced: bool,
    /// What the mesh in force was compiled from: a rejected change to an
    /// object falls back to its version here.
    accepted: Option<Documents>,
}

impl Applier {
    async fn run(
        mut self,
        changed: Arc<tokio::sync::Notify>,
        mut stop: tokio::sync::watch::Receiver<bool>,
        watches: Vec<tokio::task::JoinHandle<()>>,
    ) {
        loop {
            tokio::select! {
                () = changed.notified() => {}
                _ = stop.changed() => break,
            }
            // Let a burst of events (a relist, a kubectl apply of many
            // objects) settle into one change.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some((docs, errors, content, count)) = self.changed_documents() {
                self.apply(&docs, &errors, content, count);
            }
        }
        for t in watches {
            t.abort();
        }
    }

    /// The documents to compile, when every kind is listed and something
    /// changed since the last compile; the status's counts either way.
    fn changed_documents(&mut self) -> Option<(Documents, Vec<Problem>, String, usize)> {
        let s = self.store.lock().expect("kubernetes store lock");
        let mut st = self.status.lock().expect("kubernetes status lock");
        st.objects = self.watched.iter().enumerate().map(|(i, w)| (w.role.clone(), s.objects[i].len())).collect();
        if !s.listed.iter().all(|l| *l) {
            return None;
        }
        st.synced = true;
        let content = digest(s.objects.iter().flat_map(|m| m.values()));
        let count: usize = s.objects.iter().map(BTreeMap::len).sum();
        if self.last.as_ref() == Some(&content) {
            return None;
        }
        // The cluster-wide watches (not this node's pods).
        st.digest = digest(
            self.watched
                .iter()
                .enumerate()
                .filter(|(_, w)| w.field_selector.is_none() && w.namespace.is_none())
                .flat_map(|(i, _)| s.objects[i].values()),
        );
        let (docs, errors) = documents(&s, &self.watched);
        Some((docs, errors, content, count))
    }

    /// Compile and swap in; a config that does not compile leaves the last
    /// good one in force.
    fn apply(&mut self, docs: &Documents, errors: &[Problem], content: String, count: usize) {
        if !self.announced {
            info!(objects = count, "kubernetes config source synced: every kind listed");
            self.announced = true;
        }
        for e in errors {
            error!(problem = %e, "object from the cluster rejected; the rest of the config applies");
        }
        self.last = Some(content);
        // One bad object rejects that object, not the mesh.
        let (mut mesh, accepted) = Mesh::compile_tolerant(docs, self.accepted.as_ref(), &self.scope);
        self.accepted = Some(accepted);
        crate::mesh::log_warnings(&mesh);
        crate::mesh::log_rejected(&mesh);
        let mut rejected = errors.to_vec();
        rejected.append(&mut mesh.rejected);
        let shown: Vec<String> = rejected.iter().map(ToString::to_string).collect();
        mesh.rejected = rejected;
        let (services, pods) = (mesh.services.len(), mesh.pods.len());
        self.handle.replace(mesh);
        let mut st = self.status.lock().expect("kubernetes status lock");
        st.applied += 1;
        st.rejected = shown;
        info!(version = self.handle.version(), services, pods, "mesh config applied from the cluster");
    }
}

/// Everything the agent does before it watches: reach the API server,
/// find Istio's kinds, check RBAC. Fails with one line, before anything is
/// attached.
pub async fn prepare(
    access: &Access,
    node: &str,
    namespace: &str,
) -> Result<(kube::Client, Vec<Watched>, Vec<String>)> {
    let client = client(access).await?;
    let (istio, warnings) = istio_kinds(&client).await?;
    let mut watched = core_kinds(node);
    watched.extend(istio);
    watched.push(gateway_secrets(namespace));
    check_access(&client, &watched).await?;
    Ok((client, watched, warnings))
}

/// A kubeconfig path given on the command line must exist.
pub fn check_kubeconfig(path: &Path) -> Result<()> {
    if !path.is_file() {
        bail!("--kubeconfig {}: no such file; pass the path of a kubeconfig", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the source keeps of a Secret: a certificate and a key, never
    /// another value or the annotation kubectl copies the Secret into.
    #[test]
    fn of_a_secret_only_tls_material_is_kept() {
        let o: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "cacerts", "namespace": "istio-system",
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"}},
            "data": {"ca-key.pem": "a2V5", "cert": "Y2VydA==", "key": "a2V5"},
            "stringData": {"ca-key.pem": "key"}}))
        .unwrap();
        let kept = normalise(o, &gateway_secrets("istio-system").resource).unwrap();
        assert_eq!(kept["data"], serde_json::json!({"cert": "Y2VydA==", "key": "a2V5"}));
        assert!(kept["metadata"].get("annotations").is_none(), "{kept}");
        assert!(kept.get("stringData").is_none(), "{kept}");
    }

    /// A pod creator cannot name host state: the annotations that would
    /// pick a cgroup, a network namespace or a hold are gone before the
    /// mesh reads the pod; other annotations stay.
    #[test]
    fn a_pod_from_the_cluster_cannot_name_a_cgroup_a_namespace_or_a_hold() {
        let o: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "evil", "namespace": "default", "uid": "u1",
                         "annotations": {"redirector.dev/cgroup": "/sys/fs/cgroup/system.slice",
                                         "redirector.dev/netns": "/proc/1/ns/net",
                                         "redirector.dev/until-ready": "hold",
                                         "sidecar.istio.io/inject": "false"}},
            "spec": {"nodeName": "node-a"}, "status": {"podIP": "198.18.1.2", "phase": "Running"}}))
        .unwrap();
        let pods = core_kinds("node-a");
        let kept = normalise(o, &pods[0].resource).unwrap();
        assert_eq!(kept["metadata"]["annotations"], serde_json::json!({"sidecar.istio.io/inject": "false"}));
    }

    /// Of two VirtualServices for one host, the older comes first (its
    /// routes match first), whatever their names: a namespace cannot get
    /// ahead of an existing route by picking a name that sorts first.
    #[test]
    fn the_older_of_two_objects_comes_first() {
        let w = Watched::new("networking.istio.io", "v1", "VirtualService", "virtualservices", None, "vs");
        let vs = |ns: &str, name: &str, created: &str| {
            let o: DynamicObject = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
                "spec": {"hosts": ["web.default.svc.cluster.local"], "http": [{"route": [{"destination": {"host": "web"}}]}]}}))
            .unwrap();
            ((ns.to_string(), name.to_string()), normalise(o, &w.resource).unwrap())
        };
        let store = Store {
            objects: vec![BTreeMap::from([
                vs("aaa", "first-by-name", "2026-12-02T10:00:00Z"),
                vs("default", "web", "2026-01-01T00:00:00Z"),
            ])],
            relisting: vec![None],
            listed: vec![true],
        };
        let (docs, errors) = documents(&store, std::slice::from_ref(&w));
        assert!(errors.is_empty(), "{errors:?}");
        let names: Vec<&str> = docs.virtual_services.iter().map(|v| v.origin.name.as_str()).collect();
        assert_eq!(names, ["default/web", "aaa/first-by-name"]);
    }
}
