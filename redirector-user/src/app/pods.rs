//! Serving one pod: its listeners opened in its network namespace, its
//! capture (through the [`Capture`] the agent installed, whatever the
//! mode), and the proxy's tasks for it; or, until its proxy is ready, its
//! connects refused or its processes held. Every step pushes its undo
//! before the next, so a pod that fails half-way leaves nothing.

#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tracing::warn;

use crate::capture::{Capture, PodListeners};
use crate::config::AgentConfig;
use crate::identity::CertStore;
use crate::inpod::PodHandle;
use crate::mesh::pods::{PodInfo, UntilReady};
use crate::proxy::ProxySettings;
use crate::sys::handover::Handover;
use crate::telemetry::connection::ProxyStats;
use crate::telemetry::Metrics;
use crate::transport::http_client::{Connector, Upstreams};
use crate::transport::socket::WorkloadNet;
use crate::transport::Mtls;

/// The file listing the pod cgroups this agent froze (hold until ready),
/// so a crashed agent's holds are lifted by the next one.
const HELD_FILE: &str = "held-cgroups";

/// Serves the pods of this node.
pub(super) struct AgentPods {
    pub(super) settings: ProxySettings,
    pub(super) stats: Arc<ProxyStats>,
    pub(super) certs: Arc<CertStore>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) capture: Arc<dyn Capture>,
    pub(super) cfg: AgentConfig,
    pub(super) dns_upstreams: Arc<Vec<SocketAddr>>,
    pub(super) state_dir: PathBuf,
    /// Pod cgroups frozen until their proxy is ready.
    pub(super) held: Arc<Mutex<BTreeSet<PathBuf>>>,
    /// The pods' sockets: handed over by the agent before this one, and
    /// ours to hand to the next.
    pub(super) handover: Arc<Handover>,
}

fn set_frozen(cgroup: &Path, frozen: bool) -> std::io::Result<()> {
    std::fs::write(cgroup.join("cgroup.freeze"), if frozen { "1" } else { "0" })
}

/// Lift the holds a previous agent left (its pending pods' freezes and
/// refusals); this agent holds again the pods still pending.
pub(super) fn release_leftover_holds(state_dir: &Path, capture: &dyn Capture) {
    let file = state_dir.join(HELD_FILE);
    if let Ok(text) = std::fs::read_to_string(&file) {
        for line in text.lines().filter(|l| !l.is_empty()) {
            let _ = set_frozen(Path::new(line), false);
        }
        let _ = std::fs::remove_file(&file);
    }
    capture.clear_leftover_refusals();
}

/// The pod cgroups the agent before this one froze, as it recorded them.
pub(super) fn leftover_holds(state_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string(state_dir.join(HELD_FILE))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Record the frozen pod cgroups (one path a line) for the next agent.
fn write_held(file: &Path, held: &BTreeSet<PathBuf>) {
    let text: String = held.iter().fold(String::new(), |mut t, p| {
        t.push_str(&p.display().to_string());
        t.push('\n');
        t
    });
    let _ = std::fs::write(file, text);
}

impl AgentPods {
    /// Thaw the cgroups of `holds` (an agent handing over froze them)
    /// that this agent does not hold itself.
    pub(super) fn release_holds_not_ours(&self, holds: &[PathBuf]) {
        let held = self.held.lock().expect("held lock");
        for c in holds.iter().filter(|c| !held.contains(*c)) {
            let _ = set_frozen(c, false);
        }
    }

    /// Freeze `cgroups` until their proxy is ready (Istio's
    /// holdApplicationUntilProxyStarts), recorded for the next agent.
    fn freeze(&self, handle: &mut PodHandle, cgroups: &[PathBuf]) -> Result<()> {
        let (frozen, held, file) = (cgroups.to_vec(), Arc::clone(&self.held), self.state_dir.join(HELD_FILE));
        handle.undo.push(Box::new(move || {
            let mut h = held.lock().expect("held lock");
            for c in &frozen {
                if let Err(e) = set_frozen(c, false) {
                    if c.exists() {
                        warn!(cgroup = %c.display(), error = %e, "thawing a held pod");
                    }
                }
                h.remove(c);
            }
            write_held(&file, &h);
        }));
        let mut held = self.held.lock().expect("held lock");
        for c in cgroups {
            held.insert(c.clone());
            set_frozen(c, true).with_context(|| format!("freezing {}", c.display()))?;
        }
        write_held(&self.state_dir.join(HELD_FILE), &held);
        Ok(())
    }

    /// The pod's DNS socket, in its namespace.
    fn dns_socket(&self, w: &WorkloadNet) -> Result<Option<tokio::net::UdpSocket>> {
        let Some(ns) = w.netns.as_ref() else { return Ok(None) };
        let name = format!("{}dns", crate::inpod::socket_prefix(w));
        let s = self
            .handover
            .udp(&name, || {
                ns.run(|| std::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, self.cfg.dns_port))))?
            })
            .context("opening the DNS listener in the pod's network namespace")?;
        s.set_nonblocking(true)?;
        Ok(Some(tokio::net::UdpSocket::from_std(s)?))
    }

    /// The proxy's tasks for the pod: outbound, HBONE, plaintext inbound,
    /// DNS, all ending with `ending`.
    fn spawn_servers(
        &self,
        w: &Arc<WorkloadNet>,
        listeners: crate::inpod::PodListeners,
        dns: Option<tokio::net::UdpSocket>,
        ending: &crate::proxy::inbound::Ending,
    ) {
        let stop = &ending.stop;
        let mut settings = self.settings.clone();
        settings.workload = Arc::clone(w);
        settings.close = Some(ending.close.clone());
        // The pod's own HTTP clients: its requests leave from its namespace
        // with its identity, over HBONE to enrolled pods.
        settings.upstreams = Upstreams::new(Connector {
            transport: settings.transport.clone(),
            from: Arc::clone(w),
            mesh: settings.mesh.clone(),
            mtls: Mtls::WhenEnrolled,
        });
        let drain = self.cfg.drain_timeout;
        tokio::spawn(crate::proxy::outbound::run(
            std::iter::once(listeners.outbound).chain(listeners.outbound6).collect(),
            settings,
            Arc::clone(&self.stats),
            stop.clone(),
            drain,
        ));
        let inbound = Arc::new(crate::proxy::inbound::Inbound {
            workload: Arc::clone(w),
            certs: Arc::clone(&self.certs),
            mark: self.cfg.proxy_mark,
            connect_timeout: self.cfg.connect_timeout,
            handshake_timeout: self.cfg.handshake_timeout,
            metrics: Arc::clone(&self.metrics),
            mesh: self.settings.mesh.clone(),
            access_log: self.settings.access_log,
            own_ports: self.cfg.own_ports().into(),
            idle_timeout: self.cfg.idle_timeout,
            caps: crate::proxy::inbound::InboundCaps::new(self.cfg.max_connections),
            l7: Arc::new(crate::proxy::inbound::l7::Local {
                workload: Arc::clone(w),
                mesh: self.settings.mesh.clone(),
                metrics: Arc::clone(&self.metrics),
                access_log: self.settings.access_log,
                header_read_timeout: self.cfg.idle_timeout,
                app: crate::proxy::inbound::l7::AppClients::new(
                    Arc::clone(w),
                    self.cfg.proxy_mark,
                    self.cfg.connect_timeout,
                ),
            }),
        });
        // Each family's listener, with the pod's caps shared between them.
        for l in std::iter::once(listeners.hbone).chain(listeners.hbone6) {
            tokio::spawn(crate::proxy::inbound::serve(l, Arc::clone(&inbound), ending.clone()));
        }
        for l in std::iter::once(listeners.inbound).chain(listeners.inbound6) {
            tokio::spawn(crate::proxy::inbound::serve_plaintext(l, Arc::clone(&inbound), ending.clone()));
        }
        if let Some(s) = dns {
            let upstreams = Arc::clone(&self.dns_upstreams);
            tokio::spawn(crate::proxy::dns::serve(
                s,
                Some(w.namespace.clone()),
                self.settings.mesh.clone(),
                upstreams,
                self.cfg.proxy_mark,
                stop.clone(),
            ));
        }
    }
}

impl crate::inpod::PodServer for AgentPods {
    fn hold(&self, pod: &PodInfo, cgroups: &[PathBuf]) -> Result<PodHandle> {
        // Each undo step is in the handle before its action: a step that
        // fails drops the handle, which undoes what was done.
        let mut handle = PodHandle::new(watch::channel(false).0);
        let refused = match self.capture.refuse_until_ready(cgroups)? {
            Some(undo) => {
                handle.capture.push(undo);
                true
            }
            None => false,
        };
        // A capture that cannot refuse per cgroup holds the pod instead.
        if pod.until_ready == UntilReady::Hold || !refused {
            self.freeze(&mut handle, cgroups)?;
        }
        Ok(handle)
    }

    fn start(&self, _pod: &PodInfo, w: Arc<WorkloadNet>, cgroups: Vec<PathBuf>) -> Result<PodHandle> {
        // A pod is served only with its certificate in hand: from a
        // remote CA it may still be on its way (the pod is held).
        if let Some(id) = w.identity.as_ref().filter(|id| !self.certs.ready(id)) {
            anyhow::bail!("waiting for its certificate ({id}) from {}", self.certs.origin());
        }
        let ports = (self.cfg.outbound_port, self.cfg.inbound_port, self.cfg.hbone_port);
        let (stop, stop_rx) = watch::channel(false);
        // As in `hold`: a step that fails drops the handle, undoing the
        // steps before it.
        let mut handle = PodHandle::new(stop);
        let (handover, prefix) = (Arc::clone(&self.handover), crate::inpod::socket_prefix(&w));
        handle.undo.push(Box::new(move || {
            handover.ours.forget(&prefix);
        }));
        let listeners = crate::inpod::open_listeners(&w, &self.handover, ports.0, ports.1, ports.2)
            .context("opening the proxy's listeners in the pod's network namespace")?;
        let dns = self.dns_socket(&w)?;
        let at = PodListeners {
            inbound: &listeners.inbound,
            inbound6: listeners.inbound6.as_ref(),
            outbound_port: ports.0,
            inbound_port: ports.1,
            hbone_port: ports.2,
        };
        handle.capture.push(self.capture.steer_inbound(&w, &at)?);
        // The last step that can fail: a pending pod's refusal is replaced
        // only when everything else is in place.
        handle.capture.push(self.capture.enroll(&cgroups)?);
        if let Some(pool) = &self.settings.transport.hbone {
            let pool = Arc::clone(pool);
            let inode = w.netns.as_ref().map_or(0, |n| n.inode);
            handle.undo.push(Box::new(move || pool.forget(inode)));
        }
        let ending = crate::proxy::inbound::Ending { stop: stop_rx, close: handle.closing() };
        self.spawn_servers(&w, listeners, dns, &ending);
        Ok(handle)
    }
}

/// The pod loop: every 250 ms, rotate due certificates (forgetting those
/// of service accounts no pod uses), and on a mesh change (or every 2 s
/// while a pod has a problem) reconcile the pods this node serves;
/// `first_pass` is told when every pod has been looked at once. On stop,
/// what ends the connections of pods handed to the next agent.
pub(super) async fn run_pod_loop(
    pods: Arc<crate::inpod::InPod>,
    server: Arc<AgentPods>,
    mesh: crate::mesh::MeshHandle,
    (certs, own): (Arc<CertStore>, crate::identity::Identity),
    first_pass: tokio::sync::oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> Vec<watch::Sender<bool>> {
    let mut first_pass = Some(first_pass);
    let mut seen = 0;
    let mut arrivals = certs.arrivals();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut retry = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        // Idle identities are rotated too; identities of pods that left
        // are forgotten (not the agent's own, nor its gateway's).
        {
            let m = mesh.current();
            certs.rotate_due(&|id| {
                *id == own
                    || id.namespace == own.namespace && id.service_account == crate::config::GATEWAY_SERVICE_ACCOUNT
                    || m.pods.iter().any(|p| p.namespace == id.namespace && p.service_account == id.service_account)
            });
        }
        // A remote CA's certificates are asked for ahead of serving, and
        // a pod waiting for one is served when it arrives.
        {
            let m = mesh.current();
            let ids = pods.identities(&m.pods, certs.trust_domain());
            let gateway = crate::identity::Identity::new(
                &own.trust_domain,
                &own.namespace,
                crate::config::GATEWAY_SERVICE_ACCOUNT,
            );
            certs.want(ids.iter().chain([&own, &gateway]));
        }
        let arrived = arrivals.has_changed().unwrap_or(false);
        if arrived {
            arrivals.borrow_and_update();
        }
        let v = mesh.version();
        let has_problems = !pods.problems.lock().expect("in-pod lock").is_empty();
        if v == seen && !(has_problems && (arrived || retry.elapsed() >= Duration::from_secs(2))) {
            continue;
        }
        seen = v;
        retry = tokio::time::Instant::now();
        let m = mesh.current();
        pods.reconcile(&m.pods, server.as_ref(), certs.trust_domain());
        if let Some(tx) = first_pass.take() {
            let _ = tx.send(());
        }
    }
    if pods.handing_over() {
        return pods.hand_over();
    }
    pods.stop_keeping_capture();
    Vec::new()
}
