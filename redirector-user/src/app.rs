//! `redirector run`: the node agent, composed. [`run`] reads as its phases:
//! the mesh config and the cluster, the machine checks, identity, the
//! agent's place in the cgroup tree ([`placement`]), its listeners
//! ([`listeners`]), the data path's shared parts, capture, the pods
//! ([`pods`]) and the servers; then it serves until SIGTERM/SIGINT and
//! drains. Every check that can fail runs before anything is attached, so
//! a failed start leaves nothing behind. This is the composition root:
//! nothing imports it.

#![forbid(unsafe_code)]

mod listeners;
mod placement;
mod pods;
mod takeover;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::watch;
use tracing::info;

use crate::capture::{Capture, Selection};
use crate::config::AgentConfig;
use crate::endpoint::Balancer;
use crate::identity::CertStore;
use crate::mesh::MeshHandle;
use crate::proxy::ProxySettings;
use crate::state::AgentState;
use crate::sys::handover::Handover;
use crate::telemetry::connection::ProxyStats;
use crate::telemetry::Metrics;
use crate::transport::http_client::Upstreams;
use crate::transport::socket::WorkloadNet;
use crate::transport::Transport;
use crate::{admin, proxy};
use listeners::HostListeners;
use placement::Placement;
use pods::AgentPods;

pub struct RunOptions {
    pub config: AgentConfig,
    pub state_dir: PathBuf,
    /// A directory of Istio / Kubernetes YAML to route by, watched.
    pub config_dir: Option<PathBuf>,
    /// Read the mesh config from the Kubernetes API instead (the
    /// DaemonSet).
    pub kubernetes: Option<crate::mesh::kubernetes::Access>,
}

/// What the Kubernetes source needs once the agent is up.
type Kube = (kube::Client, Vec<crate::mesh::kubernetes::Watched>, Vec<String>);

/// One TLS policy for every endpoint, fixed before any is built.
fn set_compliance_policy(cfg: &AgentConfig) -> Result<()> {
    crate::identity::set_compliance_policy(cfg.compliance_policy).map_err(anyhow::Error::msg)?;
    if cfg.compliance_policy == crate::identity::CompliancePolicy::Pqc {
        tracing::info!("compliance policy pqc: TLS 1.3, AES-GCM and the X25519MLKEM768 key exchange only");
    }
    Ok(())
}

pub async fn run(opts: RunOptions) -> Result<()> {
    let cfg = &opts.config;
    set_compliance_policy(cfg)?;
    // The mesh config and the cluster first: a bad config or missing RBAC
    // fails the start before anything is bound or attached.
    let (mesh, since) = load_mesh(opts.config_dir.as_deref(), &cfg.scope())?;
    let mesh = MeshHandle::new(mesh);
    let kube = prepare_kube(&opts).await?;
    let mut signals = catch_signals()?;
    let missing = crate::sys::machine::missing_capabilities();
    if !missing.is_empty() {
        bail!("redirector run needs root or the capabilities {}: run it with sudo", missing.join(", "));
    }
    crate::sys::netns::init_home().context("recording the agent's network namespace")?;
    let (certs, ca_origin) = identity(&opts, &mesh)?;

    // An agent running with this state directory hands over its sockets
    // (the checks above passed: a bad config never disturbs it).
    let handover = Arc::new(Handover::default());
    let incoming = {
        let (dir, h) = (opts.state_dir.clone(), Arc::clone(&handover));
        tokio::task::spawn_blocking(move || takeover::request(&dir, &h)).await??
    };
    // The agent's cgroup, then its listeners before any program: a taken
    // port must fail the start before anything is attached (the placement
    // guard moves the agent back on any failure until capture is in).
    let mut placement = Placement::enter(cfg)?;
    let host = HostListeners::bind(cfg, &handover)?;
    let shared = Shared::new(cfg, &mesh, &certs);
    let gateways = crate::proxy::gateway::Gateways::start(shared.gateway_context(cfg, &mesh, &handover))
        .map_err(|e| e.context("starting the gateway listeners"))?;
    let selection = crate::capture::select(cfg)?;
    let taking_over = incoming.is_some();
    let capture: Arc<dyn Capture> =
        Arc::from(crate::capture::install(cfg, &selection, &placement.capture_at(), taking_over)?);
    placement.keep();

    record_state(&opts, &selection, &placement, &host)?;
    info!(ca = %ca_origin, trust_domain = %cfg.trust_domain, cert_lifetime_s = cfg.cert_lifetime.as_secs(), node = %cfg.node_name, "workload identity ready");

    let (tx, rx) = watch::channel(false);
    let settings = shared.proxy_settings(cfg, &mesh, placement.mount());
    let in_pod =
        Arc::new(crate::inpod::InPod::new(cfg.node_name.clone(), placement.mount.clone(), placement.root.clone()));
    let pod_server = Arc::new(AgentPods {
        settings: settings.clone(),
        stats: Arc::new(ProxyStats::default()),
        certs: Arc::clone(&certs),
        metrics: Arc::clone(&shared.metrics),
        capture: Arc::clone(&capture),
        cfg: cfg.clone(),
        dns_upstreams: Arc::clone(&shared.dns_upstreams),
        state_dir: opts.state_dir.clone(),
        held: Arc::default(),
        handover: Arc::clone(&handover),
    });
    // After a crash, the holds the last agent left are lifted (this one
    // holds again what is still pending); in a takeover, only those this
    // agent does not hold once it has looked at every pod.
    let leftover_holds = if taking_over {
        pods::leftover_holds(&opts.state_dir)
    } else {
        pods::release_leftover_holds(&opts.state_dir, capture.as_ref());
        Vec::new()
    };
    if taking_over {
        certificates_before_taking_over(&in_pod, &mesh, &certs).await;
    }
    let (first_pass, first_pass_done) = tokio::sync::oneshot::channel();
    let pod_loop = tokio::spawn(pods::run_pod_loop(
        Arc::clone(&in_pod),
        Arc::clone(&pod_server),
        mesh.clone(),
        (Arc::clone(&certs), crate::config::agent_identity(cfg)),
        first_pass,
        rx.clone(),
    ));
    let mut tasks = vec![gateways.run(rx.clone())];
    let stats = Arc::new(ProxyStats::default());
    let kube_status = config_and_dns_tasks(&opts, host.dns, &shared, (&mesh, since), kube, &rx, &mut tasks)?;
    let mut listeners = host.outbound;
    listeners.extend(host.inbound);
    tasks.push(tokio::spawn(proxy::outbound::run(
        listeners,
        settings,
        Arc::clone(&stats),
        rx.clone(),
        cfg.drain_timeout,
    )));
    let node = node_status(&opts, &selection, &in_pod, &mesh, kube_status);
    let sources = admin::Sources {
        stats: Arc::clone(&stats),
        mesh: mesh.clone(),
        balancer: Arc::clone(&shared.balancer),
        metrics: Arc::clone(&shared.metrics),
        node,
    };
    let heads = cfg.header_read_timeout;
    tasks.push(tokio::spawn(admin::serve(host.admin, admin::Role::Admin, sources.clone(), heads, rx.clone())));
    tasks.push(tokio::spawn(admin::serve(host.metrics, admin::Role::Metrics, sources.clone(), heads, rx.clone())));
    tasks.push(tokio::spawn(admin::serve(host.ready, admin::Role::Readiness, sources, heads, rx)));
    give_back_startup_pages();

    if let Some(from) = incoming {
        let _ = first_pass_done.await;
        finish_takeover(from, &handover, &pod_server, leftover_holds).await;
    }
    let handed_over = offer_takeover(&opts.state_dir, &handover);
    let stop = wait_for_stop(&mut signals, handed_over).await;
    Running { tx, pod_loop, tasks, capture, in_pod, stats, handover }.stop(stop, cfg, &opts.state_dir).await;
    if let (Stop::HandedOver(_), Some(_)) = (stop, &opts.kubernetes) {
        // A DaemonSet pod's container that exits by itself is restarted
        // (and would take the node back): this one, drained and holding
        // nothing, waits for the rollout to delete its pod.
        info!("handed over and drained: waiting for SIGTERM (the rollout removes this pod)");
        wait_for_stop(&mut signals, tokio::sync::oneshot::channel().1).await;
    }
    Ok(())
}

/// The config sources and the host's DNS servers, as tasks; what `status`
/// shows of the cluster source.
fn config_and_dns_tasks(
    opts: &RunOptions,
    dns: Vec<std::net::UdpSocket>,
    shared: &Shared,
    (mesh, since): (&MeshHandle, Option<crate::mesh::Since>),
    kube: Option<Kube>,
    rx: &watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<Option<Arc<std::sync::Mutex<crate::mesh::kubernetes::SourceStatus>>>> {
    let cfg = &opts.config;
    for s in dns {
        s.set_nonblocking(true)?;
        let socket = tokio::net::UdpSocket::from_std(s)?;
        let upstreams = Arc::clone(&shared.dns_upstreams);
        tasks.push(crate::proxy::dns::serve(socket, None, mesh.clone(), upstreams, cfg.proxy_mark, rx.clone()));
    }
    if let (Some(dir), Some(since)) = (opts.config_dir.clone(), since) {
        tasks.push(crate::mesh::watch(dir, cfg.scope(), mesh.clone(), since, rx.clone()));
    }
    Ok(kube.map(|(client, watched, warnings)| {
        // From the cluster, Gateway certificate files only from the
        // directories the settings name (none unless set).
        let mut scope = cfg.scope();
        scope.certificate_dirs.get_or_insert_with(Vec::new);
        // and host ports only for the agent's own namespace's Gateways
        // unless the settings say more.
        scope.gateway_namespaces.get_or_insert_with(|| vec![scope.namespace.clone()]);
        let (task, status) = crate::mesh::kubernetes::spawn(client, watched, warnings, scope, mesh.clone(), rx.clone());
        tasks.push(task);
        status
    }))
}

/// What runs, to be stopped.
struct Running {
    tx: watch::Sender<bool>,
    pod_loop: tokio::task::JoinHandle<Vec<watch::Sender<bool>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    capture: Arc<dyn Capture>,
    in_pod: Arc<crate::inpod::InPod>,
    stats: Arc<ProxyStats>,
    handover: Arc<Handover>,
}

impl Running {
    /// Stop accepting, drain, and leave the capture in the kernel (and,
    /// handed over, everything else the next agent serves with).
    async fn stop(self, stop: Stop, cfg: &AgentConfig, state_dir: &std::path::Path) {
        let Running { tx, pod_loop, tasks, capture, in_pod, stats, handover } = self;
        let drain_ms = cfg.drain_timeout.as_millis() as u64;
        if let Stop::HandedOver(pid) = stop {
            info!(
                to_pid = pid,
                open = stats.open_count(),
                drain_ms,
                "handed over: no new connections here, draining open ones"
            );
            in_pod.set_handing_over();
            capture.hand_over();
        } else {
            info!(open = stats.open_count(), drain_ms, "shutting down: no new connections, draining open ones");
            let _ = std::fs::remove_file(state_dir.join(takeover::SOCKET));
        }
        // The duplicates kept for a takeover go first: a listener must close
        // when its accept loop ends, so a new connection is refused at
        // once (not completed by the kernel and left unanswered).
        handover.ours.forget("");
        handover.inherited.forget("");
        let _ = tx.send(true);
        let closers = pod_loop.await.unwrap_or_default();
        for t in tasks {
            let _ = t.await;
        }
        // Pods handed over drain too: their connections end by themselves
        // or at the drain timeout.
        drain_pods(closers, cfg.drain_timeout).await;
        // Every task is done (the pod loop held the last other reference):
        // eBPF capture stays pinned, iptables rules go with the last
        // reference (unless handed over).
        capture.finish();
        drop(capture);
        if let Stop::HandedOver(pid) = stop {
            info!(to_pid = pid, "drained; exiting: the agent that took over serves");
        }
    }
}

/// The new agent serves every pod it was handed (or the wait is over):
/// the old one may stop accepting. Sockets of pods not served here are
/// closed; holds the old agent left on pods this one does not hold are
/// lifted.
async fn finish_takeover(from: takeover::Incoming, h: &Arc<Handover>, pods: &Arc<AgentPods>, holds: Vec<PathBuf>) {
    let deadline = tokio::time::Instant::now() + takeover::ANSWER * 2;
    while h.inherited.names().iter().any(|n| n.starts_with("pod/")) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let left = h.inherited.names();
    h.inherited.forget("");
    pods.release_holds_not_ours(&holds);
    let _ = tokio::task::spawn_blocking(move || from.serving(&left)).await;
}

/// Answer takeovers from now on; without the socket, none can happen.
fn offer_takeover(state_dir: &std::path::Path, handover: &Arc<Handover>) -> tokio::sync::oneshot::Receiver<u32> {
    takeover::offer(state_dir, Arc::clone(handover)).unwrap_or_else(|e| {
        tracing::warn!(error = %format!("{e:#}"), "no takeover socket: a new agent cannot take over from this one without a gap");
        tokio::sync::oneshot::channel().1
    })
}

/// In a takeover, the pods' certificates first: a pod this agent cannot
/// serve yet would be held (its connects refused) while the old agent
/// still serves it well. Waits [`takeover::ANSWER`] twice at most; a pod
/// still without one is held as at any start.
async fn certificates_before_taking_over(pods: &crate::inpod::InPod, mesh: &MeshHandle, certs: &Arc<CertStore>) {
    let ids = pods.identities(&mesh.current().pods, certs.trust_domain());
    certs.want(ids.iter());
    let deadline = tokio::time::Instant::now() + takeover::ANSWER * 2;
    while !ids.iter().all(|id| certs.ready(id)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Wait for every handed-over pod's connections to end, `drain` at most;
/// then the rest are closed.
async fn drain_pods(closers: Vec<watch::Sender<bool>>, drain: std::time::Duration) {
    if closers.is_empty() {
        return;
    }
    let all = futures_util::future::join_all(closers.iter().map(watch::Sender::closed));
    if tokio::time::timeout(drain, all).await.is_err() {
        tracing::warn!("drain timeout: closing the pods' connections still open");
    }
    drop(closers);
}

/// Load and compile the mesh directory; a config with errors fails the
/// start, naming the first problem (the directory is the user's own YAML:
/// a mistake is said at once, and nothing is half-started). Once running,
/// a bad change rejects only the object it breaks ([`crate::mesh::watch`]).
fn load_mesh(
    dir: Option<&std::path::Path>,
    scope: &crate::mesh::Scope,
) -> Result<(crate::mesh::Mesh, Option<crate::mesh::Since>)> {
    let Some(dir) = dir else { return Ok((crate::mesh::Mesh::default(), None)) };
    let (docs, since) = crate::mesh::read_dir(dir);
    match docs.and_then(|docs| crate::mesh::Mesh::compile_in(&docs, scope)) {
        Ok(m) => {
            crate::mesh::log_warnings(&m);
            info!(dir = %dir.display(), services = m.services.len(), "mesh config loaded");
            Ok((m, Some(since)))
        }
        Err(problems) => bail!(
            "mesh config rejected: {}{}; fix it (`redirector analyze {}` lists every problem) and start again",
            problems[0],
            if problems.len() > 1 { format!(" (and {} more)", problems.len() - 1) } else { String::new() },
            dir.display()
        ),
    }
}

/// The cluster: reachable, Istio's kinds found, RBAC enough.
async fn prepare_kube(opts: &RunOptions) -> Result<Option<Kube>> {
    let Some(access) = &opts.kubernetes else { return Ok(None) };
    let node = &opts.config.node_name;
    let (client, watched, warnings) = crate::mesh::kubernetes::prepare(access, node, &opts.config.namespace).await?;
    info!(node = %node, kinds = watched.len(), "kubernetes API reachable; watching the cluster");
    Ok(Some((client, watched, warnings)))
}

/// The mesh CA and the certificate store: a file that does not parse or a
/// key that does not match fails the start here. With `mesh.caAddress`
/// the node holds no key: each certificate is asked for (the agent's own
/// and its gateway's at once, pods' as they come).
fn identity(opts: &RunOptions, mesh: &MeshHandle) -> Result<(Arc<CertStore>, String)> {
    let cfg = &opts.config;
    if let Some(remote) = &cfg.ca {
        let bundle = remote.root_cert.clone();
        crate::identity::remote::read_bundle(&bundle).map_err(|e| anyhow!("mesh CA: {e}"))?;
        let roots: crate::identity::istio_api::Roots = Arc::new(move || {
            Arc::new(
                crate::identity::remote::read_bundle(&bundle).map_or_else(|_| rustls::RootCertStore::empty(), |r| r.0),
            )
        });
        let client = crate::identity::istio_api::CaClient::new(
            &remote.address,
            ca_resolver(&remote.address, mesh),
            roots,
            std::time::Duration::from_secs(5),
        )
        .map_err(|e| anyhow!("mesh CA: {e}"))?;
        let ca = Arc::new(crate::identity::remote::RemoteCa {
            client,
            token_path: remote.token_path.clone(),
            root_path: remote.root_cert.clone(),
            own: crate::config::agent_identity(cfg),
        });
        let store = CertStore::remote(ca, &cfg.trust_domain, cfg.cert_lifetime).map_err(|e| anyhow!("mesh CA: {e}"))?;
        let gateway =
            crate::identity::Identity::new(&cfg.trust_domain, &cfg.namespace, crate::config::GATEWAY_SERVICE_ACCOUNT);
        store.want([&crate::config::agent_identity(cfg), &gateway]);
        let origin = store.origin();
        return Ok((store, origin));
    }
    let ca = match &cfg.ca_dir {
        Some(dir) => crate::identity::MeshCa::load_plugin(dir, &cfg.trust_domain),
        None => crate::identity::MeshCa::load_or_generate(&opts.state_dir, &cfg.trust_domain),
    }
    .map_err(|e| anyhow!("mesh CA: {e}"))?;
    let origin = ca.origin.clone();
    Ok((CertStore::new(ca, cfg.cert_lifetime), origin))
}

/// Where the CA at `address` is, asked again at each connection: an
/// address as it is; a Service of the mesh (`name.namespace.svc[...]`)
/// by its endpoints, so every replica is used and none behind a VIP the
/// node may not route; any other name through DNS.
fn ca_resolver(address: &str, mesh: &MeshHandle) -> crate::identity::istio_api::Resolve {
    let (address, mesh) = (address.to_string(), mesh.clone());
    Arc::new(move || {
        let (address, mesh) = (address.clone(), mesh.clone());
        Box::pin(async move {
            let Some((host, port)) = address.rsplit_once(':') else { return Vec::new() };
            let port: u16 = port.parse().unwrap_or(crate::identity::istio_api::CA_PORT);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                return vec![std::net::SocketAddr::new(ip, port)];
            }
            let from_mesh = service_endpoints(&mesh.current(), host, port);
            if !from_mesh.is_empty() {
                return from_mesh;
            }
            tokio::net::lookup_host(address.as_str()).await.map(Iterator::collect).unwrap_or_default()
        })
    })
}

/// The endpoint addresses of the mesh's Service `host` for its `port`.
fn service_endpoints(m: &crate::mesh::model::Mesh, host: &str, port: u16) -> Vec<std::net::SocketAddr> {
    let labels = host.split('.').count();
    let fqdn = match labels {
        2 => format!("{host}.svc.cluster.local"),
        3 if host.ends_with(".svc") => format!("{host}.cluster.local"),
        _ => host.to_string(),
    };
    let Some(svc) = m.service_by_host(&fqdn).map(|i| &m.services[i]) else { return Vec::new() };
    let Some(def) = svc.port(port) else { return Vec::new() };
    svc.endpoints
        .iter()
        .filter_map(|e| {
            let crate::mesh::model::Address::Ip(ip) = e.address else { return None };
            let p = e.ports.get(&def.name).copied().or(def.target_port).unwrap_or(port);
            Some(std::net::SocketAddr::new(ip, p))
        })
        .collect()
}

/// The data path's parts every listener shares.
struct Shared {
    transport: Transport,
    /// The agent's own namespace as one more workload: the default service
    /// account of the default namespace.
    host_workload: Arc<WorkloadNet>,
    /// Load-balancing state: one for the node, kept across config reloads.
    balancer: Arc<Balancer>,
    upstreams: Upstreams,
    /// The ingress gateway's HTTP clients: its own identity, HBONE to
    /// enrolled pods.
    gateway_upstreams: Upstreams,
    metrics: Arc<Metrics>,
    dns_upstreams: Arc<Vec<std::net::SocketAddr>>,
}

impl Shared {
    fn new(cfg: &AgentConfig, mesh: &MeshHandle, certs: &Arc<CertStore>) -> Shared {
        let hbone = crate::transport::hbone::Pool::new(Arc::clone(certs), cfg.proxy_mark, cfg.connect_timeout);
        let transport = Transport { mark: cfg.proxy_mark, connect_timeout: cfg.connect_timeout, hbone: Some(hbone) };
        // What the agent's own namespace sends (the node's, in a cluster):
        // the agent's identity, which no tenant's policy names by accident
        // (not `default/default`, a tenant's).
        let host_identity = crate::config::agent_identity(cfg);
        let host_workload = Arc::new(WorkloadNet::host(Some(host_identity)));
        let upstreams = Upstreams::new(crate::transport::http_client::Connector {
            transport: transport.clone(),
            from: Arc::clone(&host_workload),
            mesh: mesh.clone(),
            // The agent's own namespace's L7 clients (a dev box's
            // processes): plain, as before pods had L7.
            mtls: crate::transport::Mtls::Never,
        });
        let gateway_identity =
            crate::identity::Identity::new(&cfg.trust_domain, &cfg.namespace, crate::config::GATEWAY_SERVICE_ACCOUNT);
        let gateway_upstreams = Upstreams::new(crate::transport::http_client::Connector {
            transport: transport.clone(),
            from: Arc::new(WorkloadNet::host(Some(gateway_identity))),
            mesh: mesh.clone(),
            mtls: crate::transport::Mtls::WhenEnrolled,
        });
        let dns_upstreams = if cfg.dns_upstreams.is_empty() {
            crate::proxy::dns::system_resolvers()
        } else {
            cfg.dns_upstreams.clone()
        };
        Shared {
            transport,
            host_workload,
            balancer: Arc::default(),
            upstreams,
            gateway_upstreams,
            metrics: Arc::default(),
            dns_upstreams: Arc::new(dns_upstreams),
        }
    }

    fn gateway_context(
        &self,
        cfg: &AgentConfig,
        mesh: &MeshHandle,
        handover: &Arc<Handover>,
    ) -> crate::proxy::gateway::GatewayContext {
        crate::proxy::gateway::GatewayContext {
            mesh: mesh.clone(),
            upstreams: self.gateway_upstreams.clone(),
            balancer: Arc::clone(&self.balancer),
            metrics: Arc::clone(&self.metrics),
            access_log: cfg.access_log,
            header_read_timeout: cfg.header_read_timeout,
            handshake_timeout: cfg.handshake_timeout,
            max_connections: cfg.max_connections,
            handover: Arc::clone(handover),
        }
    }

    fn proxy_settings(&self, cfg: &AgentConfig, mesh: &MeshHandle, mount: &std::path::Path) -> ProxySettings {
        ProxySettings {
            max_connections: cfg.max_connections,
            idle_timeout: cfg.idle_timeout,
            transport: self.transport.clone(),
            mesh: mesh.clone(),
            metrics: Arc::clone(&self.metrics),
            upstreams: self.upstreams.clone(),
            balancer: Arc::clone(&self.balancer),
            access_log: cfg.access_log,
            workloads: Arc::new(crate::proxy::source::Workloads::new(mount.to_path_buf())),
            workload: Arc::clone(&self.host_workload),
            close: None,
        }
    }
}

/// Record the agent for the CLI and log the effective settings.
fn record_state(opts: &RunOptions, sel: &Selection, at: &Placement, host: &HostListeners) -> Result<()> {
    let cfg = &opts.config;
    let state = AgentState {
        pid: std::process::id(),
        mode: sel.mode,
        mode_reason: sel.reason.clone(),
        cgroup_root: at.root.clone(),
        proxy_cgroup: at.proxy_cgroup.clone(),
        bpffs_dir: cfg.bpffs_dir.clone(),
        admin: host.admin.local_addr()?,
        outbound_port: cfg.outbound_port,
        version: env!("CARGO_PKG_VERSION").into(),
        socket_storage: sel.socket_storage,
    };
    state.store(&opts.state_dir).context("recording the agent state")?;
    info!(
        mode = sel.mode.name(),
        cgroup_root = %at.root.display(),
        proxy_cgroup = %at.proxy_cgroup.display(),
        bpffs = %cfg.bpffs_dir.display(),
        outbound = cfg.outbound_port,
        inbound = cfg.inbound_port,
        admin = %state.admin,
        max_connections = cfg.max_connections,
        connect_timeout_ms = cfg.connect_timeout.as_millis() as u64,
        idle_timeout_ms = cfg.idle_timeout.as_millis() as u64,
        exclude_ports = ?cfg.exclude_ports,
        exclude_cidrs = ?cfg.exclude_cidrs.iter().map(|c| format!("{}/{}", c.addr, c.prefix_len)).collect::<Vec<_>>(),
        capture_loopback = cfg.capture_loopback,
        "agent ready"
    );
    Ok(())
}

type NodeStatus = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// `/node`: this node's agent as `redirector status` and `status
/// --cluster` read it.
fn node_status(
    opts: &RunOptions,
    sel: &Selection,
    pods: &Arc<crate::inpod::InPod>,
    mesh: &MeshHandle,
    kube_status: Option<Arc<std::sync::Mutex<crate::mesh::kubernetes::SourceStatus>>>,
) -> NodeStatus {
    use crate::capture::features;
    let kernel = serde_json::json!({
        "release": crate::sys::machine::kernel_release(),
        "tier": features::tier(&sel.probed).name(),
        "missing": features::missing_for(&sel.probed, features::Tier::Ebpf),
        "ciliumSocketLb": sel.cilium,
    });
    let (pods, mesh) = (Arc::clone(pods), mesh.clone());
    let source = match (&kube_status, &opts.config_dir) {
        (Some(_), _) => "kubernetes",
        (None, Some(_)) => "directory",
        (None, None) => "none",
    };
    let (node_name, mode_name) = (opts.config.node_name.clone(), sel.mode.name());
    Arc::new(move || {
        let problems: std::collections::BTreeMap<String, String> = pods
            .problems
            .lock()
            .expect("in-pod lock")
            .iter()
            .map(|((ns, n), why)| (format!("{ns}/{n}"), why.clone()))
            .collect();
        serde_json::json!({
            "node": node_name,
            "version": env!("CARGO_PKG_VERSION"),
            "mode": mode_name,
            "kernel": kernel,
            "configSource": source,
            "configVersion": mesh.version(),
            "configRejected": mesh.current().rejected.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "kubernetes": kube_status.as_ref().map(|s| serde_json::to_value(&*s.lock().expect("kubernetes status lock")).unwrap_or_default()),
            "pods": pods.served().iter().map(|(ns, n)| format!("{ns}/{n}")).collect::<Vec<_>>(),
            "held": pods.pending().iter().map(|(ns, n)| format!("{ns}/{n}")).collect::<Vec<_>>(),
            "podProblems": problems,
        })
    })
}

/// Once start-up is over (pods served, config applied), its code pages are
/// not needed in memory.
fn give_back_startup_pages() {
    tokio::spawn(async {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let advised = tokio::task::spawn_blocking(crate::sys::process::release_startup_pages).await.unwrap_or(0);
        tracing::debug!(bytes = advised, "start-up code pages given back");
    });
}

/// SIGTERM and SIGINT, caught from the start: one that arrives while the
/// agent is still starting stops it cleanly once it is up.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

fn catch_signals() -> Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    Ok(Signals {
        term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
        int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
    })
}

/// Why the agent stops.
#[derive(Clone, Copy)]
enum Stop {
    Signal,
    /// A new agent (this pid) took over.
    HandedOver(u32),
}

async fn wait_for_stop(signals: &mut Signals, handed_over: tokio::sync::oneshot::Receiver<u32>) -> Stop {
    tokio::select! {
        _ = signals.term.recv() => Stop::Signal,
        _ = signals.int.recv() => Stop::Signal,
        Ok(pid) = handed_over => Stop::HandedOver(pid),
    }
}
