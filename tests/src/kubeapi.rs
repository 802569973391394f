//! A Kubernetes API server for tests that need no cluster: the agent's
//! kube-rs client talks HTTP/1.1 to it on loopback, as to a real one. It
//! answers lists, watches (chunked streams of watch events), API group
//! discovery, single-object reads, SelfSubjectAccessReviews and
//! TokenReviews (of tokens a test issues, bound to a pod or not) in the API
//! server's wire format,
//! from objects a test loads from a List in the API's own form
//! (`tests/fixtures/kube`) and changes while the agent watches. A test can withhold a permission,
//! leave Istio's CRDs out, or end every watch stream at once as an API
//! server restart does, and count the lists and watches it was sent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};

/// The collections the fake serves: (API path, apiVersion, kind, plural).
const COLLECTIONS: [(&str, &str, &str, &str); 12] = [
    ("/api/v1/pods", "v1", "Pod", "pods"),
    ("/api/v1/secrets", "v1", "Secret", "secrets"),
    ("/api/v1/namespaces", "v1", "Namespace", "namespaces"),
    ("/api/v1/services", "v1", "Service", "services"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1", "EndpointSlice", "endpointslices"),
    ("/apis/networking.istio.io/v1/virtualservices", "networking.istio.io/v1", "VirtualService", "virtualservices"),
    ("/apis/networking.istio.io/v1/destinationrules", "networking.istio.io/v1", "DestinationRule", "destinationrules"),
    ("/apis/networking.istio.io/v1/gateways", "networking.istio.io/v1", "Gateway", "gateways"),
    ("/apis/networking.istio.io/v1/serviceentries", "networking.istio.io/v1", "ServiceEntry", "serviceentries"),
    ("/apis/networking.istio.io/v1/workloadentries", "networking.istio.io/v1", "WorkloadEntry", "workloadentries"),
    (
        "/apis/security.istio.io/v1/peerauthentications",
        "security.istio.io/v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    (
        "/apis/security.istio.io/v1/authorizationpolicies",
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
];

#[derive(Default)]
struct Inner {
    rv: u64,
    /// (collection path, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    /// Every change: (resourceVersion, collection, watch event).
    events: Vec<(u64, String, Value)>,
    /// (verb, resource) pairs SelfSubjectAccessReview refuses.
    deny: HashSet<(String, String)>,
    istio: bool,
    /// Bumped by `restart`: open watch streams end.
    generation: u64,
    lists: HashMap<String, usize>,
    watches: HashMap<String, usize>,
    /// Objects written by `redirector install` (server-side apply, create),
    /// by API path.
    applied: BTreeMap<String, Value>,
    /// Reads of the DaemonSet: its rollout advances one node per read.
    daemonset_reads: usize,
    /// Nodes the DaemonSet runs on.
    nodes: usize,
    /// Agent pods (name, node) and what their `/node` endpoint answers.
    agents: Vec<(String, String, Option<Value>)>,
    /// Service-account tokens issued by `issue_token`.
    tokens: HashMap<String, Token>,
    token_reviews: usize,
    /// (user, verb, resource, namespace) a SubjectAccessReview allows;
    /// everything else it denies.
    grants: HashSet<[String; 4]>,
}

/// A service-account token as the API server knows it.
struct Token {
    namespace: String,
    service_account: String,
    /// The pod it is bound to: (name, uid).
    pod: Option<(String, String)>,
    audiences: Vec<String>,
    expires: Instant,
}

pub struct KubeApi {
    pub port: u16,
    inner: Arc<(Mutex<Inner>, Condvar)>,
    stop: Arc<AtomicBool>,
    pub kubeconfig: PathBuf,
}

fn collection_of(obj: &Value) -> Result<&'static str> {
    let api = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    COLLECTIONS
        .iter()
        .find(|c| c.1 == api && c.2 == kind)
        .map(|c| c.0)
        .ok_or_else(|| anyhow!("the test API server does not serve {api} {kind}"))
}

fn key_of(obj: &Value) -> (String, String) {
    (
        obj["metadata"]["namespace"].as_str().unwrap_or_default().to_string(),
        obj["metadata"]["name"].as_str().unwrap_or_default().to_string(),
    )
}

impl KubeApi {
    /// Start serving on 127.0.0.1 with Istio's CRDs installed; the
    /// kubeconfig pointing at it is written into `dir`.
    pub fn start(dir: &Path) -> Result<KubeApi> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let inner =
            Arc::new((Mutex::new(Inner { istio: true, rv: 1000, nodes: 2, ..Default::default() }), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (inner, stop) = (Arc::clone(&inner), Arc::clone(&stop));
            std::thread::spawn(move || accept_loop(listener, inner, stop));
        }
        std::fs::create_dir_all(dir)?;
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, port)?;
        Ok(KubeApi { port, inner, stop, kubeconfig })
    }

    /// Serve the same API on 127.0.0.1 inside another network namespace
    /// (a test node's), with a kubeconfig for it at `kubeconfig`.
    pub fn listen_in_netns(&self, netns: &Path, kubeconfig: &Path) -> Result<u16> {
        let ns = std::fs::File::open(netns).with_context(|| netns.display().to_string())?;
        let (tx, rx) = std::sync::mpsc::channel();
        let (inner, stop) = (Arc::clone(&self.inner), Arc::clone(&self.stop));
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: a namespace descriptor; only this thread moves.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = tx.send(Err(anyhow!("setns: {}", std::io::Error::last_os_error())));
                return;
            }
            match TcpListener::bind("127.0.0.1:0") {
                Ok(l) => {
                    let _ = tx.send(Ok(l.local_addr().map_or(0, |a| a.port())));
                    accept_loop(l, inner, stop);
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                }
            }
        });
        let port = rx.recv()??;
        write_kubeconfig(kubeconfig, port)?;
        Ok(port)
    }
}

fn accept_loop(listener: TcpListener, inner: Arc<(Mutex<Inner>, Condvar)>, stop: Arc<AtomicBool>) {
    let _ = listener.set_nonblocking(true);
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                let _ = conn.set_nonblocking(false);
                let (inner, stop) = (Arc::clone(&inner), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let _ = serve(conn, &inner, &stop);
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn write_kubeconfig(path: &Path, port: u16) -> Result<()> {
    std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: test\n  user:\n    token: test-token\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\n"
            ),
        )?;
    Ok(())
}

impl KubeApi {
    /// Load the items of a List response as the API server sends it
    /// (`kind: List` or a typed list), as if created before the agent
    /// started.
    pub fn load_list(&self, file: &Path) -> Result<()> {
        let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
        let list: Value = serde_json::from_str(&text).with_context(|| file.display().to_string())?;
        for item in list["items"].as_array().cloned().unwrap_or_default() {
            self.apply(item)?;
        }
        Ok(())
    }

    /// Create or update an object (ADDED or MODIFIED to watchers).
    pub fn apply(&self, mut obj: Value) -> Result<()> {
        let coll = collection_of(&obj)?;
        let (ns, name) = key_of(&obj);
        let (lock, cv) = &*self.inner;
        let mut s = lock.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{rv:012}"));
        }
        let key = (coll.to_string(), ns, name);
        let kind = if s.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        s.objects.insert(key, obj.clone());
        s.events.push((rv, coll.to_string(), json!({"type": kind, "object": obj})));
        cv.notify_all();
        Ok(())
    }

    /// Delete an object (DELETED to watchers).
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Result<()> {
        let coll = collection_of(&json!({"apiVersion": api_version, "kind": kind}))?;
        let (lock, cv) = &*self.inner;
        let mut s = lock.lock().unwrap();
        let mut obj = s
            .objects
            .remove(&(coll.to_string(), namespace.to_string(), name.to_string()))
            .ok_or_else(|| anyhow!("no {kind} {namespace}/{name}"))?;
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.events.push((rv, coll.to_string(), json!({"type": "DELETED", "object": obj})));
        cv.notify_all();
        Ok(())
    }

    /// Refuse `verb` on `resource` (e.g. `watch`, `pods`) in access reviews.
    pub fn deny(&self, verb: &str, resource: &str) {
        self.inner.0.lock().unwrap().deny.insert((verb.into(), resource.into()));
    }

    /// Serve without Istio's API groups (CRDs not installed).
    pub fn without_istio(&self) {
        self.inner.0.lock().unwrap().istio = false;
    }

    /// End every open watch stream, as an API server restart does.
    pub fn restart(&self) {
        let (lock, cv) = &*self.inner;
        lock.lock().unwrap().generation += 1;
        cv.notify_all();
    }

    /// A node agent pod and its `/node` answer (`None`: unreachable).
    pub fn add_agent(&self, pod: &str, node: &str, answer: Option<Value>) {
        self.inner.0.lock().unwrap().agents.push((pod.into(), node.into(), answer));
    }

    /// What install wrote at an API path.
    pub fn applied(&self, path: &str) -> Option<Value> {
        self.inner.0.lock().unwrap().applied.get(path).cloned()
    }

    /// Every API path install wrote, in order of path.
    pub fn applied_paths(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().applied.keys().cloned().collect()
    }

    /// A service-account token for `namespace/service_account`, valid for
    /// `audiences` during `ttl`, bound to `pod` (name, uid) if given, as a
    /// kubelet's projected token is. Anything else presented is a forgery.
    pub fn issue_token(
        &self,
        namespace: &str,
        service_account: &str,
        pod: Option<(&str, &str)>,
        audiences: &[&str],
        ttl: Duration,
    ) -> String {
        let mut s = self.inner.0.lock().unwrap();
        s.rv += 1;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let token = format!("eyJ{:x}{:x}.{namespace}.{service_account}", s.rv, nanos);
        s.tokens.insert(
            token.clone(),
            Token {
                namespace: namespace.into(),
                service_account: service_account.into(),
                pod: pod.map(|(n, u)| (n.into(), u.into())),
                audiences: audiences.iter().map(|a| (*a).to_string()).collect(),
                expires: Instant::now() + ttl,
            },
        );
        token
    }

    /// Let SubjectAccessReviews allow `user` to `verb` `resource` in
    /// `namespace`.
    pub fn grant(&self, user: &str, verb: &str, resource: &str, namespace: &str) {
        self.inner.0.lock().unwrap().grants.insert([user, verb, resource, namespace].map(str::to_string));
    }

    /// How many TokenReviews were asked for.
    pub fn token_reviews(&self) -> usize {
        self.inner.0.lock().unwrap().token_reviews
    }

    /// How many lists and watches a collection path (`/api/v1/pods`) got.
    pub fn requests(&self, collection: &str) -> (usize, usize) {
        let s = self.inner.0.lock().unwrap();
        (s.lists.get(collection).copied().unwrap_or(0), s.watches.get(collection).copied().unwrap_or(0))
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.restart();
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(w: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        404 => "Not Found",
        _ => "Error",
    };
    // One write: a response in pieces meets Nagle and delayed ACKs (40 ms
    // stalls per call), which no API server has.
    let whole = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    );
    w.write_all(whole.as_bytes())
}

fn not_found(path: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("the server could not find the requested resource ({path})"), "reason": "NotFound", "code": 404})
}

/// A namespaced collection path (`/api/v1/namespaces/NS/secrets`,
/// `/apis/G/V/namespaces/NS/PLURAL`) as the cluster-wide one and the
/// namespace; any other path as it is.
fn collection_path(path: &str) -> (String, Option<String>) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", v, "namespaces", ns, plural] => (format!("/api/{v}/{plural}"), Some((*ns).to_string())),
        ["apis", g, v, "namespaces", ns, plural] => (format!("/apis/{g}/{v}/{plural}"), Some((*ns).to_string())),
        _ => (path.to_string(), None),
    }
}

/// A namespaced object's path (`/api/v1/namespaces/NS/pods/NAME`) as its
/// key: (collection, namespace, name).
fn object_path(path: &str) -> Option<(String, String, String)> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (coll, ns, name) = match parts.as_slice() {
        ["api", v, "namespaces", ns, plural, name] => (format!("/api/{v}/{plural}"), ns, name),
        ["apis", g, v, "namespaces", ns, plural, name] => (format!("/apis/{g}/{v}/{plural}"), ns, name),
        _ => return None,
    };
    COLLECTIONS.iter().any(|c| c.0 == coll).then(|| (coll, (*ns).to_string(), (*name).to_string()))
}

/// A TokenReview's status for `spec`, as the API server's service-account
/// authenticator answers: the audiences must meet, the token must not have
/// expired, the pod it is bound to must still exist with its UID.
fn token_status(s: &Inner, spec: &Value) -> Value {
    let refused = |why: String| json!({"authenticated": false, "error": why});
    let Some(t) = spec["token"].as_str().and_then(|t| s.tokens.get(t)) else {
        return refused("invalid bearer token, square/go-jose: error in cryptographic primitive".into());
    };
    if Instant::now() > t.expires {
        return refused("invalid bearer token, service account token has expired".into());
    }
    let wanted: Vec<String> = spec["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let audiences: Vec<String> = if wanted.is_empty() {
        t.audiences.clone()
    } else {
        wanted.iter().filter(|a| t.audiences.contains(a)).cloned().collect()
    };
    if audiences.is_empty() {
        return refused(format!(
            "invalid bearer token, token audiences {:?} is invalid for the target audiences {wanted:?}",
            t.audiences
        ));
    }
    let mut extra = serde_json::Map::new();
    if let Some((name, uid)) = &t.pod {
        let pod = s.objects.get(&("/api/v1/pods".to_string(), t.namespace.clone(), name.clone()));
        if pod.is_none_or(|p| p["metadata"]["uid"].as_str() != Some(uid)) {
            return refused(format!(
                "invalid bearer token, pod \"{name}\" not found or its UID is not {uid}: the token was invalidated"
            ));
        }
        extra.insert("authentication.kubernetes.io/pod-name".into(), json!([name]));
        extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
    }
    json!({"authenticated": true, "audiences": audiences,
           "user": {"username": format!("system:serviceaccount:{}:{}", t.namespace, t.service_account),
                    "uid": format!("sa-uid-{}-{}", t.namespace, t.service_account),
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", t.namespace), "system:authenticated"],
                    "extra": extra}})
}

/// Whether `obj` is in `namespace`, when one is asked for.
fn in_namespace(obj: &Value, namespace: Option<&String>) -> bool {
    namespace.is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns.as_str()))
}

/// Whether `obj` passes a field selector such as `spec.nodeName=node-a`.
fn selected(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector else { return true };
    sel.split(',').all(|term| match term.split_once('=') {
        Some((field, want)) => {
            let mut v = obj;
            for part in field.split('.') {
                v = &v[part];
            }
            v.as_str().unwrap_or_default() == want.trim_start_matches('=')
        }
        None => true,
    })
}

fn serve(conn: TcpStream, inner: &Arc<(Mutex<Inner>, Condvar)>, stop: &AtomicBool) -> Result<()> {
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            if h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        r.read_exact(&mut body)?;
        let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
        let q: HashMap<String, String> =
            query.split('&').filter_map(|kv| kv.split_once('=').map(|(k, v)| (decode(k), decode(v)))).collect();
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(done) = serve_install(&mut w, &method, path, &body, inner)? {
            if done {
                continue;
            }
        }
        if method == "POST" && path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" {
            let mut review: Value = serde_json::from_slice(&body)?;
            let attrs = &review["spec"]["resourceAttributes"];
            let verb = attrs["verb"].as_str().unwrap_or_default().to_string();
            let resource = attrs["resource"].as_str().unwrap_or_default().to_string();
            let denied = inner.0.lock().unwrap().deny.contains(&(verb, resource));
            review["status"] = if denied {
                json!({"allowed": false, "reason": "RBAC: no rule grants it"})
            } else {
                json!({"allowed": true, "reason": "RBAC: allowed by ClusterRoleBinding \"redirector\""})
            };
            respond(&mut w, 201, &review)?;
            continue;
        }
        if method == "POST" && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            let mut review: Value = serde_json::from_slice(&body)?;
            let mut st = inner.0.lock().unwrap();
            st.token_reviews += 1;
            review["status"] = token_status(&st, &review["spec"]);
            drop(st);
            respond(&mut w, 201, &review)?;
            continue;
        }
        // API group discovery for Istio's groups.
        if let Some(gv) =
            path.strip_prefix("/apis/").filter(|p| p.contains(".istio.io/") && p.matches('/').count() == 1)
        {
            let istio = inner.0.lock().unwrap().istio;
            let resources: Vec<Value> = COLLECTIONS
                .iter()
                .filter(|c| c.1 == gv)
                .map(|c| json!({"name": c.3, "singularName": "", "namespaced": true, "kind": c.2, "verbs": ["get", "list", "watch"]}))
                .collect();
            if !istio || resources.is_empty() {
                respond(&mut w, 404, &not_found(path))?;
            } else {
                respond(
                    &mut w,
                    200,
                    &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
                )?;
            }
            continue;
        }
        if method == "GET" {
            if let Some((coll, ns, name)) = object_path(path) {
                let found = inner.0.lock().unwrap().objects.get(&(coll, ns, name)).cloned();
                match found {
                    Some(o) => respond(&mut w, 200, &o)?,
                    None => respond(&mut w, 404, &not_found(path))?,
                }
                continue;
            }
        }
        let (cluster_path, namespace) = collection_path(path);
        let Some(&(coll, api, kind, _)) = COLLECTIONS.iter().find(|c| c.0 == cluster_path) else {
            respond(&mut w, 404, &not_found(path))?;
            continue;
        };
        if coll.contains(".istio.io/") && !inner.0.lock().unwrap().istio {
            respond(&mut w, 404, &not_found(path))?;
            continue;
        }
        let selector = q.get("fieldSelector");
        let watch = q.get("watch").is_some_and(|v| v == "true" || v == "1");
        if !watch {
            let s = inner.0.lock().unwrap();
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|((c, _, _), o)| c == coll && selected(o, selector) && in_namespace(o, namespace.as_ref()))
                .map(|(_, o)| o.clone())
                .collect();
            let rv = s.rv;
            drop(s);
            inner.0.lock().unwrap().lists.entry(coll.into()).and_modify(|n| *n += 1).or_insert(1);
            respond(
                &mut w,
                200,
                &json!({"apiVersion": api, "kind": format!("{kind}List"), "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
            )?;
            continue;
        }
        // A watch: every change after the given version, then new ones as
        // they come, until the timeout or a restart.
        let mut since: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let timeout = Duration::from_secs(q.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290));
        let started = Instant::now();
        let generation = {
            let mut s = inner.0.lock().unwrap();
            s.watches.entry(coll.into()).and_modify(|n| *n += 1).or_insert(1);
            s.generation
        };
        write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")?;
        w.flush()?;
        loop {
            let pending: Vec<Value> = {
                let (lock, cv) = &**inner;
                let mut s = lock.lock().unwrap();
                if s.generation != generation || stop.load(Ordering::Relaxed) || started.elapsed() > timeout {
                    break;
                }
                let new: Vec<(u64, Value)> = s
                    .events
                    .iter()
                    .filter(|(rv, c, e)| {
                        *rv > since
                            && c == coll
                            && selected(&e["object"], selector)
                            && in_namespace(&e["object"], namespace.as_ref())
                    })
                    .map(|(rv, _, e)| (*rv, e.clone()))
                    .collect();
                if new.is_empty() {
                    s = cv.wait_timeout(s, Duration::from_millis(200)).unwrap().0;
                    drop(s);
                    continue;
                }
                since = new.last().map_or(since, |(rv, _)| *rv);
                new.into_iter().map(|(_, e)| e).collect()
            };
            for e in pending {
                let line = format!("{e}\n");
                write!(w, "{:x}\r\n{line}\r\n", line.len())?;
            }
            w.flush()?;
        }
        // An API server going away closes its connections.
        let _ = w.shutdown(std::net::Shutdown::Both);
        return Ok(());
    }
}

/// The API `redirector install`, `status`, `verify` and `version` use:
/// server-side apply, the CA Secret, the DaemonSet's rollout, the agent
/// pods and their `/node` through the pod proxy, the server version.
/// `Some(true)`: answered.
fn serve_install(
    w: &mut TcpStream,
    method: &str,
    path: &str,
    body: &[u8],
    inner: &Arc<(Mutex<Inner>, Condvar)>,
) -> Result<Option<bool>> {
    const NS: &str = "/api/v1/namespaces/redirector-system";
    const DS: &str = "/apis/apps/v1/namespaces/redirector-system/daemonsets/redirector";
    let mut s = inner.0.lock().unwrap();
    if method == "GET" && path == "/version" {
        drop(s);
        respond(w, 200, &json!({"major": "1", "minor": "32", "gitVersion": "v1.32.4", "platform": "linux/amd64"}))?;
        return Ok(Some(true));
    }
    if method == "PATCH" {
        let mut obj: Value = serde_json::from_slice(body)?;
        obj["metadata"]["resourceVersion"] = json!("1");
        obj["metadata"]["generation"] = json!(1);
        s.applied.insert(path.to_string(), obj.clone());
        drop(s);
        respond(w, 200, &obj)?;
        return Ok(Some(true));
    }
    let secrets_of = |p: &str| {
        p.strip_prefix("/api/v1/namespaces/").and_then(|r| r.split_once('/')).is_some_and(|(_, r)| r == "secrets")
    };
    if method == "POST" && secrets_of(path) {
        let obj: Value = serde_json::from_slice(body)?;
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
        s.applied.insert(format!("{path}/{name}"), obj.clone());
        drop(s);
        respond(w, 201, &obj)?;
        return Ok(Some(true));
    }
    if method == "POST" && path == "/apis/authorization.k8s.io/v1/subjectaccessreviews" {
        let mut review: Value = serde_json::from_slice(body)?;
        let spec = &review["spec"];
        let attrs = &spec["resourceAttributes"];
        let key = [&spec["user"], &attrs["verb"], &attrs["resource"], &attrs["namespace"]]
            .map(|v| v.as_str().unwrap_or_default().to_string());
        let allowed = s.grants.contains(&key);
        drop(s);
        review["status"] = json!({"allowed": allowed});
        respond(w, 201, &review)?;
        return Ok(Some(true));
    }
    if method == "GET" && path == "/apis/apps/v1/namespaces/redirector-ca/deployments/redirector-ca" {
        let Some(mut d) = s.applied.get(path).cloned() else {
            drop(s);
            respond(w, 404, &not_found(path))?;
            return Ok(Some(true));
        };
        let replicas = d["spec"]["replicas"].as_u64().unwrap_or(1);
        d["status"] = json!({"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas});
        drop(s);
        respond(w, 200, &d)?;
        return Ok(Some(true));
    }
    if method == "GET" && path.rsplit_once('/').is_some_and(|(p, _)| secrets_of(p)) {
        let found = s.applied.get(path).cloned();
        drop(s);
        match found {
            Some(o) => respond(w, 200, &o)?,
            None => respond(w, 404, &not_found(path))?,
        }
        return Ok(Some(true));
    }
    if method == "GET" && path == DS {
        let Some(mut ds) = s.applied.get(DS).cloned() else {
            drop(s);
            respond(w, 404, &not_found(path))?;
            return Ok(Some(true));
        };
        s.daemonset_reads += 1;
        let ready = s.daemonset_reads.saturating_sub(1).min(s.nodes);
        ds["status"] = json!({"desiredNumberScheduled": s.nodes, "currentNumberScheduled": s.nodes, "numberReady": ready,
                              "updatedNumberScheduled": ready, "numberAvailable": ready, "numberMisscheduled": 0, "observedGeneration": 1});
        drop(s);
        respond(w, 200, &ds)?;
        return Ok(Some(true));
    }
    if method == "GET" && path == format!("{NS}/pods") {
        let items: Vec<Value> = s
            .agents
            .iter()
            .map(|(pod, node, _)| {
                json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": "redirector-system", "labels": {"app": "redirector"}},
                "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "redirector"}]},
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
            })
            .collect();
        drop(s);
        respond(
            w,
            200,
            &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items}),
        )?;
        return Ok(Some(true));
    }
    if let Some(rest) = path.strip_prefix(&format!("{NS}/pods/")) {
        if let Some(pod) = rest.strip_suffix(":15020/proxy/node") {
            let answer = s.agents.iter().find(|a| a.0 == pod).and_then(|a| a.2.clone());
            drop(s);
            match answer {
                Some(v) => respond(w, 200, &v)?,
                None => respond(
                    w,
                    503,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": format!("error trying to reach service: dial tcp 198.18.10.9:15020: connect: connection refused"), "reason": "ServiceUnavailable", "code": 503}),
                )?,
            }
            return Ok(Some(true));
        }
    }
    Ok(None)
}
