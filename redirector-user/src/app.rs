//! `redirector run`: the node agent. Checks the machine, binds the proxy's
//! listeners, installs the eBPF capture, serves until SIGTERM/SIGINT, then
//! drains. Every check that can fail runs before anything is attached, so a
//! failed start leaves nothing behind.

#![forbid(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::capture::ebpf::EbpfCapture;
use crate::capture::iptables::IptablesCapture;
use crate::config::{AgentConfig, CaptureMode};
use crate::proxy::{ProxySettings, ProxyStats};
use crate::state::{AgentState, PROXY_CGROUP};
use crate::sys::{cgroup, machine};
use crate::{admin, proxy};

pub struct RunOptions {
    pub config: AgentConfig,
    pub state_dir: PathBuf,
    /// A directory of Istio / Kubernetes YAML to route by, watched.
    pub config_dir: Option<PathBuf>,
    /// Read the mesh config from the Kubernetes API instead (the
    /// DaemonSet).
    pub kubernetes: Option<crate::mesh::kubernetes::Access>,
}

fn bind_error(port: u16, field: &str, e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::AddrInUse {
        anyhow!(
            "port {port} is already in use (another agent? see `ss -ltnp 'sport = :{port}'`); stop that process or set {field} in the config"
        )
    } else {
        anyhow!("cannot listen on port {port}: {e}")
    }
}

fn bind_std(addr: SocketAddr, v6only: bool) -> io::Result<std::net::TcpListener> {
    let s =
        socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if v6only {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    // Accepted connections inherit it: no Nagle delay on what the proxy
    // writes back, without a system call per connection.
    s.set_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Bind 127.0.0.1:port and, where the namespace has IPv6, [::1]:port.
fn bind_loopback(port: u16, field: &str) -> Result<Vec<TcpListener>> {
    let v4 = bind_std(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), false).map_err(|e| bind_error(port, field, e))?;
    let mut out = vec![TcpListener::from_std(v4)?];
    match bind_std(SocketAddr::from((Ipv6Addr::LOCALHOST, port)), true) {
        Ok(v6) => out.push(TcpListener::from_std(v6)?),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(bind_error(port, field, e)),
        Err(e) => warn!(port, error = %e, "no IPv6 loopback listener; IPv6 capture is off"),
    }
    Ok(out)
}

pub async fn run(opts: RunOptions) -> Result<()> {
    let cfg = opts.config;

    // The mesh config first: a bad one fails the start before anything is
    // bound or attached.
    let mesh = match &opts.config_dir {
        Some(dir) => match crate::mesh::load(dir) {
            Ok(m) => {
                crate::mesh::log_warnings(&m);
                info!(dir = %dir.display(), services = m.services.len(), "mesh config loaded");
                m
            }
            Err(problems) => bail!(
                "mesh config rejected: {}{}; fix it (`redirector analyze {}` lists every problem) and start again",
                problems[0],
                if problems.len() > 1 { format!(" (and {} more)", problems.len() - 1) } else { String::new() },
                dir.display()
            ),
        },
        None => crate::mesh::Mesh::default(),
    };
    let mesh = crate::mesh::MeshHandle::new(mesh);
    // The cluster: reachable, Istio's kinds found, RBAC enough; else the
    // start fails here, before anything is bound or attached.
    let kube = match &opts.kubernetes {
        Some(access) => {
            let (client, watched, warnings) = crate::mesh::kubernetes::prepare(access, &cfg.node_name).await?;
            info!(node = %cfg.node_name, kinds = watched.len(), "kubernetes API reachable; watching the cluster");
            Some((client, watched, warnings))
        }
        None => None,
    };

    let signals = catch_signals()?;
    let missing = machine::missing_capabilities();
    if !missing.is_empty() {
        bail!("redirector run needs root or the capabilities {}: run it with sudo", missing.join(", "));
    }
    crate::sys::netns::init_home().context("recording the agent's network namespace")?;

    // The mesh CA: a file that does not parse or a key that does not match
    // fails the start here, before anything is bound or attached.
    let ca = match &cfg.ca_dir {
        Some(dir) => crate::identity::MeshCa::load_plugin(dir, &cfg.trust_domain),
        None => crate::identity::MeshCa::load_or_generate(&opts.state_dir, &cfg.trust_domain),
    }
    .map_err(|e| anyhow!("mesh CA: {e}"))?;
    let ca_origin = ca.origin.clone();
    let certs = crate::identity::CertStore::new(ca, cfg.cert_lifetime);
    let hbone_pool = crate::transport::hbone::Pool::new(Arc::clone(&certs), cfg.proxy_mark, cfg.connect_timeout);
    let mount = cgroup::cgroup2_mount()?;
    let root = match &cfg.cgroup_root {
        Some(p) => cgroup::resolve(&mount, p).map_err(|e| anyhow!("capture.cgroupRoot: {e}"))?,
        None => mount.clone(),
    };

    // The proxy gets a cgroup of its own inside the capture subtree: its
    // accepted sockets must be seen by sockops and getsockopt, and its own
    // connects are recognised by this cgroup's id.
    let proxy_cgroup = root.join(PROXY_CGROUP);
    let created_proxy_cgroup = !proxy_cgroup.exists();
    cgroup::ensure(&proxy_cgroup)?;
    let previous_cgroup = cgroup::cgroup_of_pid(&mount, std::process::id())?;
    cgroup::move_pid(&proxy_cgroup, 0)?;
    let proxy_cgroup_id = cgroup::cgroup_id(&proxy_cgroup)?;
    let undo_move = || {
        let _ = cgroup::move_pid(&previous_cgroup, 0);
        if created_proxy_cgroup {
            cgroup::remove_if_empty(&proxy_cgroup);
        }
    };

    // Listeners before programs: a taken port must fail the start before
    // anything is attached.
    let bound = (|| -> Result<_> {
        let outbound = bind_loopback(cfg.outbound_port, "proxy.outboundPort")?;
        let inbound = bind_loopback(cfg.inbound_port, "proxy.inboundPort")?;
        let admin = bind_std(SocketAddr::from((Ipv4Addr::LOCALHOST, cfg.admin_port)), false)
            .map_err(|e| bind_error(cfg.admin_port, "proxy.adminPort", e))?;
        // Prometheus and the kubelet reach these from outside the node.
        let metrics = bind_std(SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.metrics_port)), false)
            .map_err(|e| bind_error(cfg.metrics_port, "proxy.metricsPort", e))?;
        let ready = bind_std(SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.readiness_port)), false)
            .map_err(|e| bind_error(cfg.readiness_port, "proxy.readinessPort", e))?;
        Ok((
            outbound,
            inbound,
            [TcpListener::from_std(admin)?, TcpListener::from_std(metrics)?, TcpListener::from_std(ready)?],
        ))
    })();
    let (outbound, inbound, [admin_listener, metrics_listener, ready_listener]) = match bound {
        Ok(b) => b,
        Err(e) => {
            undo_move();
            return Err(e);
        }
    };

    // The DNS server on loopback (IPv6 where the namespace has ::1).
    let dns_sockets = {
        let mut v = Vec::new();
        let v4 = std::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, cfg.dns_port)))
            .map_err(|e| bind_error(cfg.dns_port, "proxy.dnsPort", e));
        match v4 {
            Ok(s) => v.push(s),
            Err(e) => {
                undo_move();
                return Err(e);
            }
        }
        if let Ok(s) = std::net::UdpSocket::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, cfg.dns_port))) {
            v.push(s);
        }
        v
    };

    // The ingress gateway's listeners (Gateways selecting
    // istio: ingressgateway): like the others, before anything is attached.
    let metrics = Arc::new(crate::telemetry::Metrics::default());
    let transport = crate::transport::Transport {
        mark: cfg.proxy_mark,
        connect_timeout: cfg.connect_timeout,
        hbone: Some(Arc::clone(&hbone_pool)),
    };
    // The agent's own namespace is one more workload: the default service
    // account of the default namespace.
    let host_workload = Arc::new(crate::transport::socket::WorkloadNet::host(Some(crate::identity::Identity::new(
        &cfg.trust_domain,
        "default",
        "default",
    ))));
    // Load-balancing state: one for the node, kept across config reloads.
    let balancer = Arc::new(crate::endpoint::Balancer::default());
    let upstreams = crate::transport::http_client::Upstreams::new(crate::transport::http_client::Connector {
        transport: transport.clone(),
        from: Arc::clone(&host_workload),
        mesh: mesh.clone(),
    });
    let gateways = match crate::proxy::gateway::Gateways::start(crate::proxy::gateway::GatewayContext {
        mesh: mesh.clone(),
        upstreams: upstreams.clone(),
        balancer: Arc::clone(&balancer),
        metrics: Arc::clone(&metrics),
        access_log: cfg.access_log,
    })
    .await
    {
        Ok(g) => g,
        Err(e) => {
            undo_move();
            return Err(e.context("starting the gateway listeners"));
        }
    };

    // The kernel is asked once: for the capture mode, and for `/node`.
    let probed = crate::capture::features::probe();
    let cilium = crate::capture::features::cilium_socket_lb();
    let (mode, socket_storage, reason) = match choose_mode(&cfg, &probed) {
        Ok(m) => m,
        Err(e) => {
            undo_move();
            return Err(e);
        }
    };
    let installed = match mode {
        CaptureMode::Iptables => crate::capture::iptables::relative(&mount, &proxy_cgroup)
            .and_then(|rel| IptablesCapture::install(&cfg, rel))
            .map(Installed::Iptables)
            .map_err(anyhow::Error::from),
        _ => EbpfCapture::install(&cfg, &root, proxy_cgroup_id, socket_storage)
            .map(Installed::Ebpf)
            .map_err(anyhow::Error::from),
    };
    let capture = match installed {
        Ok(c) => c,
        Err(e) => {
            undo_move();
            return Err(e);
        }
    };
    info!(mode = mode.name(), reason = %reason, "capture mode chosen");
    if cilium {
        warn!(advice = crate::capture::features::CILIUM_ADVICE, "another program uses the connect hooks");
    }
    if let Installed::Ebpf(c) = &capture {
        if c.adopted {
            info!("adopted the capture a previous agent left pinned");
        }
    }

    let state = AgentState {
        pid: std::process::id(),
        mode: mode.name().into(),
        mode_reason: reason.clone(),
        cgroup_root: root.clone(),
        proxy_cgroup: proxy_cgroup.clone(),
        bpffs_dir: cfg.bpffs_dir.clone(),
        admin: admin_listener.local_addr()?,
        outbound_port: cfg.outbound_port,
        version: env!("CARGO_PKG_VERSION").into(),
        socket_storage,
    };
    state.store(&opts.state_dir).context("recording the agent state")?;

    info!(
        mode = mode.name(),
        cgroup_root = %root.display(),
        proxy_cgroup = %proxy_cgroup.display(),
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
    info!(ca = %ca_origin, trust_domain = %cfg.trust_domain, cert_lifetime_s = cfg.cert_lifetime.as_secs(), node = %cfg.node_name, "workload identity ready");

    let (tx_holder, rx_holder) = watch::channel(false);
    let settings = ProxySettings {
        max_connections: cfg.max_connections,
        idle_timeout: cfg.idle_timeout,
        transport,
        mesh: mesh.clone(),
        metrics: Arc::clone(&metrics),
        upstreams: upstreams.clone(),
        balancer: Arc::clone(&balancer),
        access_log: cfg.access_log,
        workloads: Arc::new(crate::proxy::source::Workloads::new(mount.clone())),
        workload: host_workload,
        close_on_stop: false,
    };
    let pods = Arc::new(crate::inpod::InPod::new(cfg.node_name.clone(), mount.clone(), root.clone()));
    let pod_server = Arc::new(AgentPods {
        settings: settings.clone(),
        stats: Arc::new(ProxyStats::default()),
        certs: Arc::clone(&certs),
        metrics: Arc::clone(&metrics),
        mode,
        bpffs_dir: cfg.bpffs_dir.clone(),
        outbound_port: cfg.outbound_port,
        inbound_port: cfg.inbound_port,
        hbone_port: cfg.hbone_port,
        dns_port: cfg.dns_port,
        dns_upstreams: if cfg.dns_upstreams.is_empty() {
            crate::proxy::dns::system_resolvers()
        } else {
            cfg.dns_upstreams.clone()
        },
        drain_timeout: cfg.drain_timeout,
        cfg: cfg.clone(),
        steering: match &capture {
            Installed::Ebpf(c) => c.steering.clone(),
            Installed::Iptables(_) => None,
        },
        state_dir: opts.state_dir.clone(),
        held: Arc::default(),
    });
    release_leftover_holds(&opts.state_dir, &cfg.bpffs_dir, mode != CaptureMode::Iptables);
    let pods_task = {
        let pods = Arc::clone(&pods);
        let server = Arc::clone(&pod_server);
        let mesh = mesh.clone();
        let certs = Arc::clone(&certs);
        let mut stop = rx_for_pods(&tx_holder);
        tokio::spawn(async move {
            let mut seen = 0;
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
            let mut retry = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => break,
                }
                // Idle identities are rotated too; identities of pods
                // that left are forgotten.
                {
                    let m = mesh.current();
                    certs.rotate_due(&|id| {
                        (id.namespace == "default" && id.service_account == "default")
                            || m.pods
                                .iter()
                                .any(|p| p.namespace == id.namespace && p.service_account == id.service_account)
                    });
                }
                let v = mesh.version();
                let has_problems = !pods.problems.lock().expect("in-pod lock").is_empty();
                if v == seen && !(has_problems && retry.elapsed() >= std::time::Duration::from_secs(2)) {
                    continue;
                }
                seen = v;
                retry = tokio::time::Instant::now();
                let m = mesh.current();
                pods.reconcile(&m.pods, server.as_ref(), certs.trust_domain());
            }
            pods.clear();
        })
    };
    let stats = Arc::new(ProxyStats::default());
    let (tx, rx) = (tx_holder, rx_holder);
    let gateway_task = gateways.run(rx.clone());
    let dns_upstreams = Arc::new(if cfg.dns_upstreams.is_empty() {
        crate::proxy::dns::system_resolvers()
    } else {
        cfg.dns_upstreams.clone()
    });
    let mut dns_tasks = Vec::new();
    for s in dns_sockets {
        s.set_nonblocking(true)?;
        dns_tasks.push(crate::proxy::dns::serve(
            tokio::net::UdpSocket::from_std(s)?,
            mesh.clone(),
            Arc::clone(&dns_upstreams),
            cfg.proxy_mark,
            rx.clone(),
        ));
    }
    let watcher = opts.config_dir.clone().map(|dir| crate::mesh::watch(dir, mesh.clone(), rx.clone()));
    let kube_source = kube.map(|(client, watched, warnings)| {
        crate::mesh::kubernetes::spawn(client, watched, warnings, mesh.clone(), rx.clone())
    });
    let mut listeners = outbound;
    listeners.extend(inbound);
    let proxy_task =
        tokio::spawn(proxy::outbound::run(listeners, settings, Arc::clone(&stats), rx.clone(), cfg.drain_timeout));
    let node = {
        let kernel = serde_json::json!({
            "release": crate::sys::machine::kernel_release(),
            "tier": crate::capture::features::tier(&probed).name(),
            "missing": crate::capture::features::missing_for(&probed, crate::capture::features::Tier::Ebpf),
            "ciliumSocketLb": cilium,
        });
        let pods = Arc::clone(&pods);
        let mesh = mesh.clone();
        let kube_status = kube_source.as_ref().map(|(_, s)| Arc::clone(s));
        let source = if kube_status.is_some() {
            "kubernetes"
        } else if opts.config_dir.is_some() {
            "directory"
        } else {
            "none"
        };
        let (node_name, mode_name) = (cfg.node_name.clone(), mode.name());
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
                "kubernetes": kube_status.as_ref().map(|s| serde_json::to_value(&*s.lock().expect("kubernetes status lock")).unwrap_or_default()),
                "pods": pods.served().iter().map(|(ns, n)| format!("{ns}/{n}")).collect::<Vec<_>>(),
                "held": pods.pending().iter().map(|(ns, n)| format!("{ns}/{n}")).collect::<Vec<_>>(),
                "podProblems": problems,
            })
        }) as Arc<dyn Fn() -> serde_json::Value + Send + Sync>
    };
    let sources = admin::Sources {
        stats: Arc::clone(&stats),
        mesh: mesh.clone(),
        balancer: Arc::clone(&balancer),
        metrics: Arc::clone(&metrics),
        node,
    };
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin::Role::Admin, sources.clone(), rx.clone()));
    let metrics_task = tokio::spawn(admin::serve(metrics_listener, admin::Role::Metrics, sources.clone(), rx.clone()));
    let ready_task = tokio::spawn(admin::serve(ready_listener, admin::Role::Readiness, sources, rx));

    // Once start-up is over (pods served, config applied), its code pages
    // are not needed in memory.
    tokio::spawn(async {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let advised = tokio::task::spawn_blocking(crate::sys::process::release_startup_pages).await.unwrap_or(0);
        tracing::debug!(bytes = advised, "start-up code pages given back");
    });
    wait_for_signal(signals).await;
    info!(
        open = stats.open_count(),
        drain_ms = cfg.drain_timeout.as_millis() as u64,
        "shutting down: no new connections, draining open ones"
    );
    let _ = tx.send(true);
    let _ = pods_task.await;
    let _ = proxy_task.await;
    let _ = admin_task.await;
    let _ = metrics_task.await;
    let _ = gateway_task.await;
    for t in dns_tasks {
        let _ = t.await;
    }
    let _ = ready_task.await;
    if let Some(w) = watcher {
        let _ = w.await;
    }
    if let Some((task, _)) = kube_source {
        let _ = task.await;
    }
    match capture {
        // Pinned: the next agent adopts it without a gap.
        Installed::Ebpf(c) => info!(
            pins = %c.pin_dir.display(),"eBPF capture stays installed for the next agent; `redirector uninstall` removes it"),
        // iptables rules would send workloads to a closed port: remove them.
        Installed::Iptables(c) => drop(c),
    }
    Ok(())
}

fn rx_for_pods(tx: &watch::Sender<bool>) -> watch::Receiver<bool> {
    tx.subscribe()
}

/// Serves one pod: its listeners in its namespace, its capture, its proxy
/// tasks.
struct AgentPods {
    settings: ProxySettings,
    stats: Arc<ProxyStats>,
    certs: Arc<crate::identity::CertStore>,
    metrics: Arc<crate::telemetry::Metrics>,
    mode: CaptureMode,
    bpffs_dir: PathBuf,
    outbound_port: u16,
    inbound_port: u16,
    hbone_port: u16,
    dns_port: u16,
    dns_upstreams: Vec<SocketAddr>,
    drain_timeout: std::time::Duration,
    cfg: AgentConfig,
    /// eBPF inbound steering (sk_lookup), when the kernel has it.
    steering: Option<Arc<crate::capture::ebpf::PodSteering>>,
    state_dir: PathBuf,
    /// Pod cgroups frozen until their proxy is ready.
    held: Arc<std::sync::Mutex<std::collections::BTreeSet<PathBuf>>>,
}

/// The file listing the pod cgroups this agent froze (hold until ready),
/// so a crashed agent's holds are lifted by the next one.
const HELD_FILE: &str = "held-cgroups";

fn set_frozen(cgroup: &std::path::Path, frozen: bool) -> std::io::Result<()> {
    std::fs::write(cgroup.join("cgroup.freeze"), if frozen { "1" } else { "0" })
}

/// Lift the holds a previous agent left (its pending pods' freezes and
/// refusals); this agent holds again the pods still pending.
fn release_leftover_holds(state_dir: &std::path::Path, bpffs_dir: &std::path::Path, ebpf: bool) {
    let file = state_dir.join(HELD_FILE);
    if let Ok(text) = std::fs::read_to_string(&file) {
        for line in text.lines().filter(|l| !l.is_empty()) {
            let _ = set_frozen(std::path::Path::new(line), false);
        }
        let _ = std::fs::remove_file(&file);
    }
    if ebpf {
        if let Ok(maps) = crate::capture::ebpf::PinnedMaps::open(bpffs_dir) {
            if let Ok(n) = maps.clear_pending() {
                if n > 0 {
                    info!(cgroups = n, "lifted the refusals a previous agent left on pending pods");
                }
            }
        }
    }
}

/// Record the frozen pod cgroups (one path a line) for the next agent.
fn write_held(file: &std::path::Path, held: &std::collections::BTreeSet<PathBuf>) {
    let text: String = held.iter().fold(String::new(), |mut t, p| {
        t.push_str(&p.display().to_string());
        t.push('\n');
        t
    });
    let _ = std::fs::write(file, text);
}

impl crate::inpod::PodServer for AgentPods {
    fn hold(&self, pod: &crate::mesh::pods::PodInfo, cgroups: &[PathBuf]) -> Result<crate::inpod::PodHandle> {
        use crate::mesh::pods::UntilReady;
        // Each undo step is in the handle before its action: a step that
        // fails drops the handle, which undoes what was done.
        let mut handle = crate::inpod::PodHandle { stop: watch::channel(false).0, undo: Vec::new() };
        // iptables capture has no per-cgroup refusal: a pending pod is held.
        let freeze = pod.until_ready == UntilReady::Hold || self.mode == CaptureMode::Iptables;
        if self.mode != CaptureMode::Iptables {
            let maps = crate::capture::ebpf::PinnedMaps::open(&self.bpffs_dir)?;
            let ids = cgroups.iter().map(|c| cgroup::cgroup_id(c)).collect::<Result<Vec<u64>, _>>()?;
            let (dir, pending) = (self.bpffs_dir.clone(), ids.clone());
            handle.undo.push(Box::new(move || {
                if let Ok(maps) = crate::capture::ebpf::PinnedMaps::open(&dir) {
                    for id in pending {
                        let _ = maps.unenroll_if_pending(id);
                    }
                }
            }));
            for id in ids {
                maps.enroll_with(id, redirector_common::ENROLL_PENDING)?;
            }
        }
        if freeze {
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
        }
        Ok(handle)
    }

    fn start(
        &self,
        pod: &crate::mesh::pods::PodInfo,
        w: Arc<crate::transport::socket::WorkloadNet>,
        cgroups: Vec<PathBuf>,
    ) -> Result<crate::inpod::PodHandle> {
        let listeners = crate::inpod::open_listeners(&w, self.outbound_port, self.inbound_port, self.hbone_port)
            .context("opening the proxy's listeners in the pod's network namespace")?;
        let dns = w
            .netns
            .as_ref()
            .map(|ns| ns.run(|| std::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, self.dns_port)))))
            .transpose()?
            .transpose()
            .context("opening the DNS listener in the pod's network namespace")?
            .map(|s| -> Result<tokio::net::UdpSocket> {
                s.set_nonblocking(true)?;
                Ok(tokio::net::UdpSocket::from_std(s)?)
            })
            .transpose()?;
        let (stop, stop_rx) = watch::channel(false);
        // As in `hold`: a step that fails drops the handle, undoing the
        // steps before it.
        let mut handle = crate::inpod::PodHandle { stop, undo: Vec::new() };
        // The capture: the pod's cgroups enrolled (eBPF), or nat rules in
        // its namespace (iptables). Inbound steering to the plaintext
        // listener (so STRICT holds for clients that never went near our
        // hooks): in eBPF mode the sk_lookup program attached to the pod's
        // namespace, for IPv4 pods on kernels that have it; otherwise a nat
        // PREROUTING rule in the pod's namespace, as ztunnel's in-pod mode
        // does.
        let ns = w.netns.clone().expect("an in-pod workload has a namespace");
        let steering =
            self.steering.as_ref().filter(|_| w.ips.iter().all(std::net::IpAddr::is_ipv4) && !w.ips.is_empty());
        if let Some(steering) = steering {
            // Rules an iptables-mode agent left in this namespace go first.
            let _ = crate::capture::iptables::remove_in_pod(&ns);
            let ports = redirector_common::PodInbound {
                hbone_port: self.hbone_port.into(),
                inbound_port: self.inbound_port.into(),
                outbound_port: self.outbound_port.into(),
                _pad: 0,
            };
            use std::os::fd::AsFd;
            steering
                .steer(ns.as_fd(), ns.inode, &w.ips, listeners.inbound.as_fd(), ports)
                .context("steering the pod's inbound connections (sk_lookup)")?;
            let (steering, inode, ips) = (Arc::clone(steering), ns.inode, w.ips.clone());
            handle.undo.push(Box::new(move || steering.unsteer(inode, &ips)));
        } else {
            crate::capture::iptables::install_in_pod(&ns, &self.cfg, self.mode == CaptureMode::Iptables)
                .context("installing the pod's iptables rules")?;
            handle.undo.push(Box::new(move || {
                if let Err(e) = crate::capture::iptables::remove_in_pod(&ns) {
                    warn!(error = %e, "removing a pod's iptables rules");
                }
            }));
        }
        if self.mode == CaptureMode::Iptables {
        } else {
            // The last step that can fail: a pending pod's refusal is
            // replaced only when everything else is in place.
            let maps = crate::capture::ebpf::PinnedMaps::open(&self.bpffs_dir)?;
            let ids = cgroups.iter().map(|c| cgroup::cgroup_id(c)).collect::<Result<Vec<u64>, _>>()?;
            let (dir, enrolled) = (self.bpffs_dir.clone(), ids.clone());
            handle.undo.push(Box::new(move || {
                if let Ok(maps) = crate::capture::ebpf::PinnedMaps::open(&dir) {
                    for id in enrolled {
                        let _ = maps.unenroll(id);
                    }
                }
            }));
            for id in ids {
                maps.enroll(id)?;
            }
        }
        if let Some(pool) = &self.settings.transport.hbone {
            let pool = Arc::clone(pool);
            let inode = w.netns.as_ref().map_or(0, |n| n.inode);
            handle.undo.push(Box::new(move || pool.forget(inode)));
        }
        let mut settings = self.settings.clone();
        settings.workload = Arc::clone(&w);
        settings.close_on_stop = true;
        tokio::spawn(proxy::outbound::run(
            vec![listeners.outbound],
            settings,
            Arc::clone(&self.stats),
            stop_rx.clone(),
            self.drain_timeout,
        ));
        let inbound = Arc::new(crate::proxy::inbound::Inbound {
            workload: Arc::clone(&w),
            certs: Arc::clone(&self.certs),
            mark: self.cfg.proxy_mark,
            connect_timeout: self.cfg.connect_timeout,
            handshake_timeout: self.cfg.handshake_timeout,
            metrics: Arc::clone(&self.metrics),
            mesh: self.settings.mesh.clone(),
            access_log: self.settings.access_log,
        });
        tokio::spawn(crate::proxy::inbound::serve(listeners.hbone, Arc::clone(&inbound), stop_rx.clone()));
        tokio::spawn(crate::proxy::inbound::serve_plaintext(listeners.inbound, inbound, stop_rx.clone()));
        if let Some(s) = dns {
            tokio::spawn(crate::proxy::dns::serve(
                s,
                self.settings.mesh.clone(),
                Arc::new(self.dns_upstreams.clone()),
                self.cfg.proxy_mark,
                stop_rx,
            ));
        }
        let _ = pod;
        Ok(handle)
    }
}

enum Installed {
    Ebpf(EbpfCapture),
    Iptables(IptablesCapture),
}

/// The mode to run in, whether eBPF keeps original destinations in
/// per-socket storage, and why. The kernel is asked feature by feature
/// (never by version); `auto` then loads every program through the verifier
/// and takes iptables if one is refused. A forced `ebpf` on a kernel that
/// lacks a feature fails here, naming it.
fn choose_mode(cfg: &AgentConfig, probed: &[crate::capture::features::Feature]) -> Result<(CaptureMode, bool, String)> {
    use crate::capture::features::{self, Tier};
    use crate::config::Storage;
    if cfg.mode == CaptureMode::Iptables {
        return Ok((CaptureMode::Iptables, true, "requested".into()));
    }
    let release = machine::kernel_release();
    let best = features::tier(probed);
    let socket_storage = match cfg.storage {
        Storage::Socket => true,
        Storage::Map => false,
        Storage::Auto => best != Tier::EbpfKeyed,
    };
    let tier = if socket_storage { Tier::Ebpf } else { Tier::EbpfKeyed };
    let lacking = features::missing_for(probed, tier);
    let shortcut_lacking = features::missing_for(probed, Tier::EbpfSockmap);
    let storage_note = if socket_storage {
        String::new()
    } else if cfg.storage == Storage::Map {
        "; original destinations in a keyed map (capture.storage: map)".to_string()
    } else {
        format!(
            "; kernel {release} lacks {}: original destinations in a keyed map",
            features::missing_for(probed, Tier::Ebpf).join(", ")
        )
    };
    if cfg.accelerate && !socket_storage {
        bail!("the same-node shortcut (--accelerate) needs per-socket storage, but capture.storage is `map` or the kernel lacks it; drop --accelerate or use storage socket");
    }
    if cfg.accelerate && !shortcut_lacking.is_empty() {
        bail!(
            "kernel {release} cannot run the same-node shortcut (--accelerate): it lacks {}; drop --accelerate",
            shortcut_lacking.join(", ")
        );
    }
    if cfg.mode == CaptureMode::Ebpf {
        if !lacking.is_empty() {
            bail!(
                "kernel {release} cannot run --mode ebpf (tier {}): it lacks {}; use --mode iptables, or --mode auto (it picks {})",
                tier.name(),
                lacking.join(", "),
                best.name()
            );
        }
        let t = if socket_storage && shortcut_lacking.is_empty() { Tier::EbpfSockmap } else { tier };
        return Ok((CaptureMode::Ebpf, socket_storage, format!("requested; tier {}{storage_note}", t.name())));
    }
    // auto
    if !lacking.is_empty() {
        let reason = format!("auto: kernel {release} lacks {}; tier iptables", lacking.join(", "));
        warn!("{reason}");
        return Ok((CaptureMode::Iptables, true, reason));
    }
    match crate::capture::ebpf::check_programs(socket_storage) {
        // The shortcut's sk_msg program is optional: without it the kernel
        // still gets eBPF capture.
        Ok(checks) => match checks.iter().find(|c| !c.ok && c.program != redirector_common::programs::SK_MSG) {
            None => {
                let msg_ok = checks.iter().any(|c| c.ok && c.program == redirector_common::programs::SK_MSG);
                let t = if socket_storage && shortcut_lacking.is_empty() && msg_ok { Tier::EbpfSockmap } else { tier };
                if !socket_storage && cfg.storage == Storage::Auto {
                    warn!(
                        "kernel {release} lacks {} (per-socket storage); tier {} chosen instead",
                        features::missing_for(probed, Tier::Ebpf).join(", "),
                        t.name()
                    );
                }
                Ok((
                    CaptureMode::Ebpf,
                    socket_storage,
                    format!("auto: kernel {release} loads every program; tier {}{storage_note}", t.name()),
                ))
            }
            Some(bad) => {
                let reason = format!(
                    "auto: kernel {release} refused {} ({}); tier iptables",
                    bad.program,
                    bad.error.clone().unwrap_or_default()
                );
                warn!("{reason}");
                Ok((CaptureMode::Iptables, true, reason))
            }
        },
        Err(e) => Ok((CaptureMode::Iptables, true, format!("auto: eBPF unavailable ({e}); tier iptables"))),
    }
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

async fn wait_for_signal(signals: Signals) {
    let Signals { mut term, mut int } = signals;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
