//! The commands that work on a whole cluster, as istioctl's do: `install`,
//! `verify --cluster`, `status --cluster` (like `istioctl proxy-status`)
//! and `version --cluster`. They read the cluster through the same kube
//! client configuration as the agent (kubeconfig or in-cluster), and reach
//! each node agent's `/node` endpoint through the API server's pod proxy.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams};
use serde_json::Value;

use crate::cmd::manifest::{CA_DEPLOYMENT, CA_NAMESPACE, DAEMONSET, NAMESPACE, ROOT_CONFIGMAP};
use crate::mesh::kubernetes::{client, explain, Access};

/// The Istio plug-in CA Secret the CA service mounts (in its namespace
/// only).
pub const CA_SECRET: &str = "cacerts";

fn resource_of(doc: &Value) -> Result<(ApiResource, bool)> {
    let api = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let (group, version) = api.split_once('/').unwrap_or(("", api));
    let (plural, namespaced) = match kind {
        "Namespace" => ("namespaces", false),
        "ServiceAccount" => ("serviceaccounts", true),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "Role" => ("roles", true),
        "RoleBinding" => ("rolebindings", true),
        "ConfigMap" => ("configmaps", true),
        "DaemonSet" => ("daemonsets", true),
        "Deployment" => ("deployments", true),
        "Service" => ("services", true),
        other => bail!("the manifest holds a {other}, which install does not know how to apply"),
    };
    Ok((ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural), namespaced))
}

/// Apply a profile (server-side apply, field manager `redirector`), make
/// the mesh CA Secret if there is none, and wait until the DaemonSet is
/// ready on every node, printing progress.
pub async fn install(
    access: &Access,
    profile: &str,
    image: &str,
    timeout: Duration,
    ca: Option<crate::identity::PluginCaPem>,
) -> Result<()> {
    let mut ca = ca;
    let docs = crate::cmd::manifest::documents(profile, image)?;
    let client = client(access).await?;
    let params = PatchParams::apply("redirector").force();
    let total = docs.len();
    for (i, text) in docs.iter().enumerate() {
        let doc: Value = serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(text)?)?;
        let (ar, namespaced) = resource_of(&doc)?;
        let name = doc["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let api: Api<DynamicObject> = if namespaced {
            Api::namespaced_with(client.clone(), doc["metadata"]["namespace"].as_str().unwrap_or(NAMESPACE), &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        api.patch(&name, &params, &Patch::Apply(&doc))
            .await
            .map_err(|e| explain(e, &format!("apply {} {name}", ar.kind)))?;
        println!("[{}/{total}] applied {} {name}", i + 1, ar.kind);
        if ar.kind == "Namespace" && name == CA_NAMESPACE {
            ensure_ca_secret(&client, ca.take()).await?;
        }
    }
    println!(
        "waiting for the DaemonSet {NAMESPACE}/{DAEMONSET} to be ready on every node (up to {} s)",
        timeout.as_secs()
    );
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let d = ds.get(DAEMONSET).await.map_err(|e| explain(e, &format!("read DaemonSet {NAMESPACE}/{DAEMONSET}")))?;
        let st = d.status.unwrap_or_default();
        let generation = d.metadata.generation.unwrap_or(0);
        let line = format!(
            "  {}/{} nodes ready, {} updated",
            st.number_ready,
            st.desired_number_scheduled,
            st.updated_number_scheduled.unwrap_or(0)
        );
        if line != last {
            println!("{line}");
            last = line;
        }
        let observed = st.observed_generation.unwrap_or(0) >= generation;
        if observed
            && st.desired_number_scheduled > 0
            && st.number_ready == st.desired_number_scheduled
            && st.updated_number_scheduled.unwrap_or(0) == st.desired_number_scheduled
        {
            println!("redirector ({profile} profile) is ready on {} node(s); next: `redirector verify --cluster`, then label a namespace: kubectl label namespace default istio-injection=enabled", st.number_ready);
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!(
                "the DaemonSet {NAMESPACE}/{DAEMONSET} is not ready after {} s ({}/{} nodes ready): see `kubectl -n {NAMESPACE} describe daemonset {DAEMONSET}` and the agents' logs",
                timeout.as_secs(),
                st.number_ready,
                st.desired_number_scheduled
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// `install --root-ca DIR`: the root in `dir` (made there if it holds no
/// CA key) and a fresh intermediate signed by it, for the CA Secret. The
/// root's key stays in `dir`.
pub fn offline_root(dir: &std::path::Path) -> Result<crate::identity::PluginCaPem> {
    let td = crate::identity::DEFAULT_TRUST_DOMAIN;
    if !dir.join(crate::identity::CA_KEY_FILE).exists() {
        crate::identity::write_self_signed_ca(dir, td).map_err(|e| anyhow!("--root-ca: {e}"))?;
        println!("root CA written to {}: keep it offline; it does not go into the cluster", dir.display());
    }
    crate::identity::intermediate_ca_pem(dir, td).map_err(|e| anyhow!("--root-ca: {e}"))
}

/// The mesh CA in Istio's plug-in layout, as a Secret of the CA's
/// namespace, unless one exists (an operator's own CA, or one made by an
/// earlier install, is kept); then its roots as the agents' trust bundle,
/// the ConfigMap `istio-ca-root-cert` of their namespace (no key in it).
/// With `intermediate` (`--root-ca`) the Secret holds that intermediate
/// and the root's certificate only; else a fresh self-signed root.
async fn ensure_ca_secret(client: &kube::Client, intermediate: Option<crate::identity::PluginCaPem>) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), CA_NAMESPACE);
    let existing =
        secrets.get_opt(CA_SECRET).await.map_err(|e| explain(e, &format!("read Secret {CA_NAMESPACE}/{CA_SECRET}")))?;
    let root = if let Some(s) = existing {
        println!("      mesh CA: Secret {CA_NAMESPACE}/{CA_SECRET} exists; kept");
        if intermediate.is_some() {
            println!("      mesh CA: --root-ca not used (the Secret is kept; delete it to install an intermediate)");
        }
        let file = crate::identity::ROOT_CERT_FILE;
        let from_data = s.data.as_ref().and_then(|d| d.get(file)).map(|b| String::from_utf8_lossy(&b.0).into_owned());
        let from_string = s.string_data.as_ref().and_then(|d| d.get(file)).cloned();
        from_data.or(from_string).filter(|r| r.contains("BEGIN CERTIFICATE")).ok_or_else(|| {
            anyhow!("Secret {CA_NAMESPACE}/{CA_SECRET} has no {file}; give it Istio's plug-in layout (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem)")
        })?
    } else {
        let offline = intermediate.is_some();
        let ca = if let Some(ca) = intermediate {
            ca
        } else {
            let (cert, key) = crate::identity::self_signed_ca_pem(crate::identity::DEFAULT_TRUST_DOMAIN)
                .map_err(|e| anyhow!("mesh CA: {e}"))?;
            crate::identity::PluginCaPem { cert: cert.clone(), key, root: cert.clone(), chain: cert }
        };
        let data = BTreeMap::from([
            (crate::identity::CA_CERT_FILE.to_string(), ca.cert),
            (crate::identity::CA_KEY_FILE.to_string(), ca.key),
            (crate::identity::ROOT_CERT_FILE.to_string(), ca.root.clone()),
            (crate::identity::CERT_CHAIN_FILE.to_string(), ca.chain),
        ]);
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(CA_SECRET.into()),
                namespace: Some(CA_NAMESPACE.into()),
                labels: Some(BTreeMap::from([("app.kubernetes.io/part-of".to_string(), "redirector".to_string())])),
                ..Default::default()
            },
            string_data: Some(data),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .map_err(|e| explain(e, &format!("create Secret {CA_NAMESPACE}/{CA_SECRET}")))?;
        if offline {
            println!("      mesh CA: an intermediate under your offline root, into Secret {CA_NAMESPACE}/{CA_SECRET} (Istio's plug-in layout; readable by the CA only; the root's key is not in the cluster)");
        } else {
            println!("      mesh CA: generated into Secret {CA_NAMESPACE}/{CA_SECRET} (Istio's plug-in layout; readable by the CA only)");
        }
        ca.root
    };
    let bundle = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(ROOT_CONFIGMAP.into()),
            namespace: Some(NAMESPACE.into()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/part-of".to_string(), "redirector".to_string())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(crate::identity::ROOT_CERT_FILE.to_string(), root)])),
        ..Default::default()
    };
    let mut doc = serde_json::to_value(&bundle)?;
    doc["apiVersion"] = "v1".into();
    doc["kind"] = "ConfigMap".into();
    Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE)
        .patch(ROOT_CONFIGMAP, &PatchParams::apply("redirector").force(), &Patch::Apply(&doc))
        .await
        .map_err(|e| explain(e, &format!("apply ConfigMap {NAMESPACE}/{ROOT_CONFIGMAP}")))?;
    println!("      trust bundle: ConfigMap {NAMESPACE}/{ROOT_CONFIGMAP} (roots only)");
    Ok(())
}

/// Whether the node agents' service account may read the CA key (it must
/// not): a SubjectAccessReview.
async fn agents_can_read_ca_key(client: &kube::Client) -> Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{NAMESPACE}:{DAEMONSET}")),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{NAMESPACE}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(CA_NAMESPACE.into()),
                verb: Some("get".into()),
                resource: Some("secrets".into()),
                name: Some(CA_SECRET.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| explain(e, "create a SubjectAccessReview"))?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// The CA Deployment's check line: (ok, detail).
async fn ca_check(client: &kube::Client) -> Result<(bool, String)> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), CA_NAMESPACE);
    let d = deployments
        .get_opt(CA_DEPLOYMENT)
        .await
        .map_err(|e| explain(e, &format!("read Deployment {CA_NAMESPACE}/{CA_DEPLOYMENT}")))?;
    Ok(match d {
        None => {
            (false, format!("{CA_NAMESPACE}/{CA_DEPLOYMENT} not found: run `redirector install --profile minimal`"))
        }
        Some(d) => {
            let want = d.spec.and_then(|s| s.replicas).unwrap_or(1);
            let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            (
                ready > 0,
                format!(
                    "{ready}/{want} replicas ready{}",
                    if ready == 0 { "; no node gets new certificates" } else { "" }
                ),
            )
        }
    })
}

/// One node agent as the cluster shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Agent {
    pub pod: String,
    pub node: String,
    pub ready: bool,
    /// The agent's `/node` answer, or why it could not be read.
    pub info: Result<Value, String>,
}

/// Every agent pod of the DaemonSet and what its `/node` says.
pub async fn agents(client: &kube::Client) -> Result<Vec<Agent>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let list = pods
        .list(&ListParams::default().labels("app=redirector"))
        .await
        .map_err(|e| explain(e, &format!("list pods in {NAMESPACE}")))?;
    let mut out = Vec::new();
    for p in list.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let path = format!("/api/v1/namespaces/{NAMESPACE}/pods/{name}:15020/proxy/node");
        let req = hyper::Request::get(&path).body(Vec::new()).expect("a valid request");
        let info = match client.request_text(req).await {
            Ok(text) => serde_json::from_str(&text).map_err(|e| format!("unreadable /node answer: {e}")),
            Err(e) => Err(explain(e, &format!("reach the agent {name} through the API server")).to_string()),
        };
        out.push(Agent { pod: name, node, ready, info });
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(out)
}

/// The digest of the config the cluster holds now, computed as each agent
/// computes the one it applied.
pub async fn cluster_digest(client: &kube::Client) -> Result<String> {
    let (istio, _) = crate::mesh::kubernetes::istio_kinds(client).await?;
    let mut watched = crate::mesh::kubernetes::core_kinds("");
    watched.extend(istio);
    let mut objects = Vec::new();
    for w in watched.iter().filter(|w| w.field_selector.is_none()) {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &w.resource);
        let list =
            api.list(&ListParams::default()).await.map_err(|e| explain(e, &format!("list {}", w.resource_name())))?;
        let mut m = BTreeMap::new();
        for o in list.items {
            let key = (o.metadata.namespace.clone().unwrap_or_default(), o.metadata.name.clone().unwrap_or_default());
            if let Some(v) = crate::mesh::kubernetes::normalise(o, &w.resource) {
                m.insert(key, v);
            }
        }
        objects.push(m);
    }
    Ok(crate::mesh::kubernetes::digest(objects.iter().flat_map(|m| m.values())))
}

/// `redirector status --cluster`: each node agent's config against the
/// cluster's, its capture mode and the pods it serves.
pub async fn status(access: &Access, json: bool) -> Result<()> {
    let client = client(access).await?;
    let agents = agents(&client).await?;
    let latest = cluster_digest(&client).await?;
    let rows: Vec<Value> = agents
        .iter()
        .map(|a| {
            let held = a.info.as_ref().map_or(Value::Null, |i| i["held"].clone());
            let (sync, mode, version, pods, problems) = match &a.info {
                Ok(i) => {
                    let digest = i["kubernetes"]["digest"].as_str().unwrap_or_default();
                    let sync = if !i["kubernetes"]["synced"].as_bool().unwrap_or(false) {
                        "NOT SYNCED"
                    } else if digest == latest {
                        "SYNCED"
                    } else {
                        "STALE"
                    };
                    (
                        sync.to_string(),
                        i["mode"].as_str().unwrap_or("?").to_string(),
                        i["configVersion"].as_u64().unwrap_or(0),
                        i["pods"].as_array().cloned().unwrap_or_default(),
                        i["podProblems"].clone(),
                    )
                }
                Err(e) => (format!("UNREACHABLE ({e})"), "?".into(), 0, Vec::new(), Value::Null),
            };
            // Two agent pods on one node: a rollout's surge pod took over
            // (or is taking over) and the other drains.
            let on_node = agents.iter().filter(|b| b.node == a.node).count();
            let takeover = (on_node > 1)
                .then(|| format!("{on_node} agent pods on this node: the newest serves, the others drain"));
            serde_json::json!({"node": a.node, "pod": a.pod, "ready": a.ready, "config": sync, "configVersion": version,
                               "mode": mode, "pods": pods, "podProblems": problems, "held": held, "takeover": takeover})
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"latest": latest, "agents": rows}))?);
        return Ok(());
    }
    println!("{:<20} {:<28} {:<10} {:<12} {:<8} PODS", "NODE", "AGENT", "MODE", "CONFIG", "VERSION");
    for r in &rows {
        println!(
            "{:<20} {:<28} {:<10} {:<12} {:<8} {}",
            r["node"].as_str().unwrap_or_default(),
            r["pod"].as_str().unwrap_or_default(),
            r["mode"].as_str().unwrap_or_default(),
            r["config"].as_str().unwrap_or_default(),
            r["configVersion"],
            r["pods"].as_array().map_or(0, std::vec::Vec::len)
        );
        if let Some(t) = r["takeover"].as_str() {
            println!("    IN TAKEOVER: {t}");
        }
        for p in r["pods"].as_array().into_iter().flatten() {
            println!("    enrolled {}", p.as_str().unwrap_or_default());
        }
        let held: Vec<&str> = r["held"].as_array().into_iter().flatten().filter_map(|h| h.as_str()).collect();
        for (p, why) in r["podProblems"].as_object().into_iter().flatten() {
            let state = if held.contains(&p.as_str()) { "HELD" } else { "NOT ENROLLED" };
            println!("    {state} {p}: {}", why.as_str().unwrap_or_default());
        }
    }
    if rows.is_empty() {
        bail!("no redirector agents in {NAMESPACE}: install with `redirector install --profile minimal`");
    }
    Ok(())
}

/// `redirector version --cluster`: this binary and every node's agent.
pub async fn version(access: &Access) -> Result<()> {
    println!("client version: {}", env!("CARGO_PKG_VERSION"));
    let client = client(access).await?;
    let server = client.apiserver_version().await.map_err(|e| explain(e, "read the API server version"))?;
    println!("kubernetes: {}", server.git_version);
    let agents = agents(&client).await?;
    if agents.is_empty() {
        println!("no agents (not installed: `redirector install --profile minimal`)");
    }
    for a in agents {
        match a.info {
            Ok(i) => println!("agent on {}: {} ({})", a.node, i["version"].as_str().unwrap_or("?"), a.pod),
            Err(e) => println!("agent on {}: unknown ({}: {e})", a.node, a.pod),
        }
    }
    Ok(())
}

/// `redirector verify --cluster`: the API reachable, the DaemonSet ready on
/// every node, each node's kernel, Istio's CRDs. Non-zero exit when the
/// mesh cannot work.
pub async fn verify(access: &Access, json: bool) -> Result<()> {
    let client = client(access).await?;
    let mut checks: Vec<(String, bool, String)> = Vec::new();
    let server = client.apiserver_version().await.map_err(|e| explain(e, "read the API server version"))?;
    checks.push(("kubernetes API".into(), true, server.git_version.clone()));
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    match ds.get_opt(DAEMONSET).await.map_err(|e| explain(e, &format!("read DaemonSet {NAMESPACE}/{DAEMONSET}")))? {
        None => checks.push((
            "daemonset".into(),
            false,
            format!("{NAMESPACE}/{DAEMONSET} not found: run `redirector install --profile minimal`"),
        )),
        Some(d) => {
            let st = d.status.unwrap_or_default();
            let ok = st.desired_number_scheduled > 0 && st.number_ready == st.desired_number_scheduled;
            checks.push((
                "daemonset".into(),
                ok,
                format!("{}/{} nodes ready", st.number_ready, st.desired_number_scheduled),
            ));
        }
    }
    let (ok, detail) = ca_check(&client).await?;
    checks.push(("mesh CA".into(), ok, detail));
    let readable = agents_can_read_ca_key(&client).await?;
    checks.push((
        "CA key".into(),
        !readable,
        if readable {
            format!("the node agents ({NAMESPACE}/{DAEMONSET}) can read Secret {CA_NAMESPACE}/{CA_SECRET}: remove the RBAC rule that grants it")
        } else {
            format!("Secret {CA_NAMESPACE}/{CA_SECRET} is not readable by the node agents")
        },
    ));
    for a in agents(&client).await? {
        let name = format!("node {}", a.node);
        match &a.info {
            Ok(i) => {
                let tier = i["kernel"]["tier"].as_str().unwrap_or("?");
                let missing: Vec<&str> =
                    i["kernel"]["missing"].as_array().into_iter().flatten().filter_map(|m| m.as_str()).collect();
                checks.push((
                    name,
                    true,
                    format!(
                        "kernel {}, capture {} (kernel supports {tier}{})",
                        i["kernel"]["release"].as_str().unwrap_or("?"),
                        i["mode"].as_str().unwrap_or("?"),
                        if missing.is_empty() { String::new() } else { format!("; eBPF needs {}", missing.join(", ")) }
                    ) + if i["kernel"]["ciliumSocketLb"].as_bool().unwrap_or(false) {
                        format!("; {}", crate::capture::features::CILIUM_ADVICE)
                    } else {
                        String::new()
                    }
                    .as_str(),
                ));
            }
            Err(e) => checks.push((name, false, e.clone())),
        }
    }
    let (_, warnings) = crate::mesh::kubernetes::istio_kinds(&client).await?;
    checks.push(("istio CRDs".into(), true, if warnings.is_empty() { "present".into() } else { warnings.join("; ") }));
    let ok = checks.iter().all(|c| c.1);
    if json {
        let v: Vec<Value> =
            checks.iter().map(|(n, ok, d)| serde_json::json!({"check": n, "ok": ok, "detail": d})).collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"ok": ok, "checks": v}))?);
    } else {
        for (n, good, d) in &checks {
            println!("{:<4} {:<20} {d}", if *good { "ok" } else { "FAIL" }, n);
        }
    }
    if !ok {
        bail!("the cluster is not ready for the mesh: see the FAIL lines above");
    }
    Ok(())
}
