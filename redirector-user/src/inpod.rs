//! Pods in their own network namespaces: the node proxy opens its listeners
//! (15001 outbound, 15006 inbound plaintext, 15008 HBONE) *inside* each
//! enrolled pod's namespace and originates the pod's connections from there,
//! as Istio ambient's ztunnel does. The kernel's rewrite to 127.0.0.1:15001
//! then lands on the proxy with any CNI, and the pod's source address is
//! kept.
//!
//! A socket belongs to the network namespace of the thread that created it,
//! for life: a thread switches into the pod's namespace, creates the socket
//! and switches back, with no await in between. This module owns that and
//! the set of pods served; what is done with the connections is
//! [`crate::proxy`] and [`crate::proxy::inbound`].

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

pub mod cgroups;

use crate::identity::Identity;
use crate::mesh::pods::PodInfo;
use crate::sys::handover::Handover;
use crate::sys::netns::Netns;
use crate::transport::socket::WorkloadNet;

/// The cgroups a pod's processes run in (the kernel programs key on the
/// socket's own cgroup): its annotation (relative to the cgroup2 mount or
/// absolute), else its containers' cgroups found from its UID under the
/// container runtime's layout.
/// The kubepods tree is searched for below `search` (the capture root)
/// first, then below the whole cgroup2 mount.
pub fn pod_cgroups(mount: &Path, search: &Path, pod: &PodInfo) -> Vec<PathBuf> {
    if let Some(c) = &pod.cgroup {
        let p = Path::new(c);
        return vec![if p.is_absolute() && p.starts_with(mount) {
            p.to_path_buf()
        } else {
            mount.join(c.trim_start_matches('/'))
        }];
    }
    let Some(uid) = pod.uid.as_deref() else { return Vec::new() };
    let found = crate::inpod::cgroups::find_pod(search, uid)
        .or_else(|| (search != mount).then(|| crate::inpod::cgroups::find_pod(mount, uid)).flatten());
    // The pod's own cgroup: enrolling it covers every container the
    // runtime starts under it, from the container's first connect.
    found.map(|p| vec![p.pod]).unwrap_or_default()
}

/// A pod's network namespace found from one of its processes (the
/// container runtime puts every container of a pod in the pod's
/// namespace): `/proc/<pid>/ns/net` of the first process in its cgroups.
pub fn netns_of_cgroups(cgroups: &[PathBuf]) -> anyhow::Result<Netns> {
    // The cgroups and, below a pod's cgroup, its containers'.
    let mut dirs: Vec<PathBuf> = Vec::new();
    for c in cgroups {
        dirs.push(c.clone());
        if let Ok(rd) = std::fs::read_dir(c) {
            let mut sub: Vec<PathBuf> =
                rd.flatten().map(|e| e.path()).filter(|p| p.join("cgroup.procs").exists()).collect();
            sub.sort();
            dirs.extend(sub);
        }
    }
    for c in &dirs {
        let procs = std::fs::read_to_string(c.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            // The process may exit between the two reads: try the next.
            if let Ok(ns) = Netns::open(&PathBuf::from(format!("/proc/{pid}/ns/net"))) {
                return Ok(ns);
            }
        }
    }
    anyhow::bail!("no process runs in the pod's containers yet, so its network namespace is unknown")
}

/// The listeners the proxy opens in a pod's namespace.
pub struct PodListeners {
    pub outbound: tokio::net::TcpListener,
    /// Outbound on `[::1]`, where the pod's IPv6 connects are sent; `None`
    /// where the pod's namespace has no IPv6.
    pub outbound6: Option<tokio::net::TcpListener>,
    /// Plaintext inbound (15006), IPv4.
    pub inbound: tokio::net::TcpListener,
    /// Plaintext inbound, IPv6 only; `None` where the pod's namespace has
    /// no IPv6 (then its IPv6 connections, if any, are refused).
    pub inbound6: Option<tokio::net::TcpListener>,
    pub hbone: tokio::net::TcpListener,
    pub hbone6: Option<tokio::net::TcpListener>,
}

/// The name prefix of a pod's sockets in a [`Handover`]: its network
/// namespace, which is the pod's for its whole life.
pub fn socket_prefix(w: &WorkloadNet) -> String {
    format!("pod/{}/", w.netns.as_ref().map_or(0, |n| n.inode))
}

/// Open the pod's listeners in its namespace, or take those the agent
/// before this one handed over.
pub fn open_listeners(
    w: &WorkloadNet,
    h: &Handover,
    outbound: u16,
    inbound: u16,
    hbone: u16,
) -> io::Result<PodListeners> {
    let prefix = socket_prefix(w);
    let listen = |name: &str, addr: SocketAddr| h.tokio_tcp(&format!("{prefix}{name}"), || w.listen(addr));
    // One listener per family, each seeing its own family's addresses
    // (no v4-mapped addresses to unwrap).
    let v6 = |name: &str, port: u16, ip: Ipv6Addr| match listen(name, SocketAddr::from((ip, port))) {
        Ok(l) => Ok(Some(l)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)) => Ok(None),
        Err(e) => Err(e),
    };
    Ok(PodListeners {
        outbound: listen("outbound", SocketAddr::from((Ipv4Addr::LOCALHOST, outbound)))?,
        outbound6: v6("outbound6", outbound, Ipv6Addr::LOCALHOST)?,
        inbound: listen("inbound", SocketAddr::from((Ipv4Addr::UNSPECIFIED, inbound)))?,
        inbound6: v6("inbound6", inbound, Ipv6Addr::UNSPECIFIED)?,
        hbone: listen("hbone", SocketAddr::from((Ipv4Addr::UNSPECIFIED, hbone)))?,
        hbone6: v6("hbone6", hbone, Ipv6Addr::UNSPECIFIED)?,
    })
}

/// What the agent must do to serve a pod and to stop serving it: the
/// capture (enroll the cgroup or install rules in the namespace) and the
/// proxy tasks.
pub trait PodServer: Send + Sync {
    fn start(&self, pod: &PodInfo, w: Arc<WorkloadNet>, cgroups: Vec<PathBuf>) -> anyhow::Result<PodHandle>;
    /// Keep a pod of the mesh that cannot be served yet from reaching
    /// anything around the mesh: its connects refused, or its processes
    /// frozen (`UntilReady`), until it is served or leaves. The handle's
    /// undo lifts that without touching a served pod's capture.
    fn hold(&self, pod: &PodInfo, cgroups: &[PathBuf]) -> anyhow::Result<PodHandle>;
}

/// A pod being served. Dropping it stops the tasks (closing the pod's
/// listeners and connections) and runs the undo steps.
pub struct PodHandle {
    /// Turned true: the pod's listeners stop accepting.
    pub stop: tokio::sync::watch::Sender<bool>,
    /// Turned true or dropped: the pod's open connections end.
    close: tokio::sync::watch::Sender<bool>,
    /// Undoes the pod's state in the kernel (its enrollment or refusal,
    /// its inbound steering): run when the pod leaves the mesh, never when
    /// the agent stops (see [`PodHandle::keep_capture`]).
    pub capture: Vec<Box<dyn FnOnce() + Send>>,
    /// Undoes the rest (a freeze, pooled tunnels).
    pub undo: Vec<Box<dyn FnOnce() + Send>>,
}

impl PodHandle {
    pub fn new(stop: tokio::sync::watch::Sender<bool>) -> PodHandle {
        PodHandle { stop, close: tokio::sync::watch::channel(false).0, capture: Vec::new(), undo: Vec::new() }
    }

    /// What the pod's connections watch to know they must end.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.close.subscribe()
    }

    /// The agent is stopping, not the pod leaving: its capture stays in
    /// the kernel, where with no listener behind it the pod's connections
    /// are refused (as after a crash) until the next agent serves it,
    /// rather than pass around the mesh.
    pub fn keep_capture(&mut self) {
        self.capture.clear();
    }

    /// The agent hands the pod to the next one, which serves it with the
    /// same sockets: nothing is undone (capture, holds, steering are the
    /// next agent's now), the listeners stop accepting when the handle
    /// drops, and the open connections drain: they end when the returned
    /// sender turns true or is dropped.
    pub fn hand_over(&mut self) -> tokio::sync::watch::Sender<bool> {
        self.capture.clear();
        self.undo.clear();
        std::mem::replace(&mut self.close, tokio::sync::watch::channel(false).0)
    }
}

impl Drop for PodHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = self.close.send(true);
        for u in self.capture.drain(..).chain(self.undo.drain(..)) {
            u();
        }
    }
}

struct Served {
    pod: PodInfo,
    handle: PodHandle,
}

/// The pods this node serves, kept in step with the config.
pub struct InPod {
    pub node: String,
    mount: PathBuf,
    /// Where pods' cgroups are searched for first (the capture root).
    search: PathBuf,
    served: Mutex<HashMap<(String, String), Served>>,
    /// Pods of the mesh not served yet, held (see [`PodServer::hold`]).
    pending: Mutex<HashMap<(String, String), Served>>,
    /// Pods that could not be started (no namespace, no cgroup), with why:
    /// retried on each reconcile, shown by status.
    pub problems: Mutex<HashMap<(String, String), String>>,
    /// The agent is handing its pods to the next one.
    handing_over: std::sync::atomic::AtomicBool,
}

impl InPod {
    pub fn new(node: String, mount: PathBuf, search: PathBuf) -> InPod {
        InPod {
            node,
            mount,
            search,
            served: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            problems: Mutex::new(HashMap::new()),
            handing_over: false.into(),
        }
    }

    /// From now on the agent stops by handing its pods over.
    pub fn set_handing_over(&self) {
        self.handing_over.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn handing_over(&self) -> bool {
        self.handing_over.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The pods of this node the mesh enrolls and that live in a namespace
    /// of their own: named by annotation, or found from the pod's UID
    /// (its cgroups, then one of its processes).
    fn wanted<'a>(&self, pods: &'a [PodInfo]) -> Vec<&'a PodInfo> {
        pods.iter()
            .filter(|p| {
                p.enrolled
                    && p.node_name.as_deref() == Some(self.node.as_str())
                    && (p.netns.is_some() || p.uid.is_some())
            })
            .collect()
    }

    /// The identities of the pods this node serves (or will).
    pub fn identities(&self, pods: &[PodInfo], trust_domain: &str) -> Vec<Identity> {
        let mut ids: Vec<Identity> =
            self.wanted(pods).iter().map(|p| Identity::new(trust_domain, &p.namespace, &p.service_account)).collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Start serving new pods, stop serving removed (or changed) ones.
    pub fn reconcile(&self, pods: &[PodInfo], server: &dyn PodServer, trust_domain: &str) {
        let wanted = self.wanted(pods);
        let mut served = self.served.lock().expect("in-pod lock");
        let keep: Vec<(String, String)> = wanted.iter().map(|p| (p.namespace.clone(), p.name.clone())).collect();
        let gone: Vec<(String, String)> = served
            .iter()
            .filter(|(k, s)| !keep.contains(k) || !wanted.contains(&&s.pod))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            served.remove(&k);
            info!(pod = %format!("{}/{}", k.0, k.1), "pod left the mesh: its listeners and connections are closed");
        }
        let mut problems = self.problems.lock().expect("in-pod lock");
        problems.retain(|k, _| keep.contains(k));
        let mut pending = self.pending.lock().expect("in-pod lock");
        // Held pods that left the mesh, or changed, are let go.
        pending.retain(|k, s| keep.contains(k) && wanted.contains(&&s.pod));
        for p in wanted {
            let key = (p.namespace.clone(), p.name.clone());
            if served.contains_key(&key) {
                continue;
            }
            match self.start(p, server, trust_domain) {
                Ok(h) => {
                    problems.remove(&key);
                    served.insert(key.clone(), Served { pod: p.clone(), handle: h });
                    // After the capture is in place: nothing slips between.
                    pending.remove(&key);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if problems.get(&key) != Some(&msg) {
                        warn!(pod = %format!("{}/{}", p.namespace, p.name), error = %msg, "cannot serve this pod yet; retrying on the next change");
                    }
                    problems.insert(key.clone(), msg);
                    if let std::collections::hash_map::Entry::Vacant(slot) = pending.entry(key) {
                        let cgroups: Vec<PathBuf> = pod_cgroups(&self.mount, &self.search, p)
                            .into_iter()
                            .filter(|c| c.join("cgroup.procs").exists())
                            .collect();
                        if cgroups.is_empty() {
                            continue;
                        }
                        match server.hold(p, &cgroups) {
                            Ok(h) => {
                                info!(pod = %format!("{}/{}", p.namespace, p.name), until_ready = ?p.until_ready, "pod held until its proxy is ready: nothing it sends goes around the mesh");
                                slot.insert(Served { pod: p.clone(), handle: h });
                            }
                            Err(e) => {
                                warn!(pod = %format!("{}/{}", p.namespace, p.name), error = %format!("{e:#}"), "cannot hold this pod until it is served");
                            }
                        }
                    }
                }
            }
        }
    }

    /// (namespace, name) of the pods held until they can be served.
    pub fn pending(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self.pending.lock().expect("in-pod lock").keys().cloned().collect();
        v.sort();
        v
    }

    fn start(&self, p: &PodInfo, server: &dyn PodServer, trust_domain: &str) -> anyhow::Result<PodHandle> {
        use anyhow::Context;
        let cgroups = pod_cgroups(&self.mount, &self.search, p);
        for c in &cgroups {
            anyhow::ensure!(c.join("cgroup.procs").exists(), "cgroup {} does not exist", c.display());
        }
        let netns = if let Some(path) = p.netns.as_deref() {
            Netns::open(Path::new(path)).with_context(|| format!("network namespace {path}"))?
        } else {
            anyhow::ensure!(
                !cgroups.is_empty(),
                "no cgroup found for pod UID {} (searched the kubelet's kubepods tree for the systemd and cgroupfs drivers; a pod is served only from there)",
                p.uid.as_deref().unwrap_or_default(),
            );
            netns_of_cgroups(&cgroups)?
        };
        // A pod sharing the node's namespace (hostNetwork) is never
        // captured: its listeners would be the node's.
        anyhow::ensure!(
            Some(netns.inode) != crate::sys::netns::home_inode(),
            "the pod runs in the node's network namespace (hostNetwork); not captured"
        );
        let path = netns.path.display().to_string();
        let path = path.as_str();
        // Every address of the pod is steered: the API's (`podIPs`, both
        // families) and whatever its interfaces carry (a second network,
        // IPv6 link-local), so no address reaches the app past policy.
        let mut ips = p.ips.clone();
        let found = netns
            .run(crate::sys::netns::interface_addresses)
            .and_then(|r| r)
            .context("listing the addresses of the pod's interfaces")?;
        for ip in found {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        let w = Arc::new(WorkloadNet::pod(
            Arc::new(netns),
            p.name.clone(),
            p.namespace.clone(),
            Some(Identity::new(trust_domain, &p.namespace, &p.service_account)),
            ips,
        ));
        let ips = w.ips.clone();
        let h = server.start(p, w, cgroups)?;
        info!(pod = %format!("{}/{}", p.namespace, p.name), netns = path, ips = ?ips, "pod enrolled: listeners open in its network namespace");
        Ok(h)
    }

    /// (namespace, name) of the pods served now.
    pub fn served(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self.served.lock().expect("in-pod lock").keys().cloned().collect();
        v.sort();
        v
    }

    /// The agent stops: stop serving every pod and every hold, with each
    /// pod's capture left in the kernel, so a pod fails closed until the
    /// next agent (only `redirector uninstall` or the pod leaving the mesh
    /// removes it).
    pub fn stop_keeping_capture(&self) {
        for map in [&self.served, &self.pending] {
            let mut m = map.lock().expect("in-pod lock");
            for s in m.values_mut() {
                s.handle.keep_capture();
            }
            m.clear();
        }
    }

    /// The agent handed its pods to the next one: stop accepting, undo
    /// nothing, and return what ends each pod's open connections (see
    /// [`PodHandle::hand_over`]).
    pub fn hand_over(&self) -> Vec<tokio::sync::watch::Sender<bool>> {
        let mut closers = Vec::new();
        for map in [&self.served, &self.pending] {
            let mut m = map.lock().expect("in-pod lock");
            closers.extend(m.values_mut().map(|s| s.handle.hand_over()));
            m.clear();
        }
        closers
    }
}
