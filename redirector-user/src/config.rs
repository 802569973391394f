//! Agent settings: the YAML file `redirector run --config` reads, with the
//! embedded default that `cargo xtask run` uses. Field names are camelCase
//! like the rest of the mesh's YAML; [`AgentConfig::validate`] turns them into
//! checked values once, at load.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::mesh::resources::{AGENT_CONFIG_API, AGENT_CONFIG_KIND};
use crate::net::Cidr;

/// The settings `cargo xtask run` starts the agent with.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.yaml");

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}; check the path and its permissions")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("config {path}: {field}: {message}")]
    Invalid { path: String, field: &'static str, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    capture: RawCapture,
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    mesh: RawMesh,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMesh {
    node_name: Option<String>,
    trust_domain: Option<String>,
    ca_dir: Option<String>,
    ca_address: Option<String>,
    ca_root_cert: Option<String>,
    ca_token_path: Option<String>,
    compliance_policy: Option<String>,
    cert_lifetime: Option<String>,
    hbone_port: Option<u16>,
    handshake_timeout: Option<String>,
    /// Istio's MeshConfig fields: `exportTo` of objects that set none.
    default_service_export_to: Option<Vec<String>>,
    default_virtual_service_export_to: Option<Vec<String>>,
    default_destination_rule_export_to: Option<Vec<String>>,
    gateway_certificate_dirs: Option<Vec<String>>,
    gateway_namespaces: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCapture {
    cgroup_root: Option<String>,
    #[serde(default)]
    exclude_ports: Vec<u16>,
    #[serde(default)]
    exclude_cidrs: Vec<String>,
    #[serde(default)]
    capture_loopback: bool,
    proxy_mark: Option<u32>,
    bpffs_dir: Option<String>,
    mode: Option<String>,
    #[serde(default)]
    inbound_ports: Vec<u16>,
    #[serde(default)]
    accelerate: bool,
    storage: Option<String>,
    dns_capture: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawProxy {
    outbound_port: Option<u16>,
    inbound_port: Option<u16>,
    admin_port: Option<u16>,
    metrics_port: Option<u16>,
    readiness_port: Option<u16>,
    dns_port: Option<u16>,
    #[serde(default)]
    dns_upstreams: Vec<String>,
    access_log: Option<bool>,
    max_connections: Option<usize>,
    connect_timeout: Option<String>,
    idle_timeout: Option<String>,
    drain_timeout: Option<String>,
    concurrency: Option<usize>,
    header_read_timeout: Option<String>,
}

/// How connections are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// The kernel programs (cgroup/connect4,6, sockops, cgroup/getsockopt).
    Ebpf,
    /// Istio's nat REDIRECT rules, in our own chains.
    Iptables,
    /// eBPF where the kernel loads every program, iptables otherwise.
    Auto,
}

impl CaptureMode {
    pub fn parse(s: &str) -> Result<CaptureMode, String> {
        match s {
            "ebpf" => Ok(CaptureMode::Ebpf),
            "iptables" => Ok(CaptureMode::Iptables),
            "auto" => Ok(CaptureMode::Auto),
            other => Err(format!("`{other}` is not a capture mode; use ebpf, iptables or auto")),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            CaptureMode::Ebpf => "ebpf",
            CaptureMode::Iptables => "iptables",
            CaptureMode::Auto => "auto",
        }
    }
}

/// Where the eBPF capture keeps each connection's original destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Per-socket storage where the kernel has it, the keyed map otherwise.
    Auto,
    /// Per-socket storage (sk_storage) on the captured sockets.
    Socket,
    /// A hash map keyed by socket cookie and by the connection's client end,
    /// for kernels without per-socket storage.
    Map,
}

impl Storage {
    pub fn parse(s: &str) -> Result<Storage, String> {
        match s {
            "auto" => Ok(Storage::Auto),
            "socket" => Ok(Storage::Socket),
            "map" => Ok(Storage::Map),
            other => Err(format!("`{other}` is not a storage; use auto, socket or map")),
        }
    }
}

/// Checked agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub mode: CaptureMode,
    /// Destination ports of inbound connections that iptables mode sends to
    /// the inbound listener (Istio's includeInboundPorts); empty: none.
    pub inbound_ports: Vec<u16>,
    /// eBPF mode: same-node sockmap shortcut between apps and the proxy.
    pub accelerate: bool,
    /// eBPF mode: where original destinations are kept.
    pub storage: Storage,
    /// The cgroup subtree the programs attach to; `None`: the cgroup2 mount
    /// root (every process on the machine can be enrolled).
    pub cgroup_root: Option<PathBuf>,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<Cidr>,
    pub capture_loopback: bool,
    pub proxy_mark: u32,
    pub bpffs_dir: PathBuf,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub admin_port: u16,
    pub metrics_port: u16,
    pub readiness_port: u16,
    /// The agent's DNS server on loopback (mesh names; the rest forwarded).
    pub dns_port: u16,
    /// Resolvers the DNS server forwards to; empty: /etc/resolv.conf's.
    pub dns_upstreams: Vec<SocketAddr>,
    /// Send enrolled workloads' DNS queries (UDP/53) to the DNS server.
    pub dns_capture: bool,
    /// The access log: one line per HTTP request (Envoy's) and one per
    /// TCP connection on each side (ztunnel's). Off: none of them, as
    /// Istio's empty `accessLogFile` turns off HTTP and TCP entries alike.
    pub access_log: bool,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    /// The gateway's and the agent's own HTTP servers (admin, 15020,
    /// 15021) close a connection whose request head has not arrived by
    /// then, counted from its opening or its previous response (a slow
    /// client, or one idle between requests).
    pub header_read_timeout: Duration,
    /// Proxy worker threads (Istio's ProxyConfig `concurrency`); 0: one
    /// per CPU the agent may run on; unset: half of those, at least one.
    /// One worker is a single-threaded runtime.
    pub concurrency: Option<usize>,
    /// This node's name: the agent serves the Pods whose spec.nodeName it
    /// is (`NODE_NAME` in the environment wins, as the downward API sets
    /// it; default: the host name).
    pub node_name: String,
    /// The agent's own namespace (`POD_NAMESPACE`, as the downward API
    /// sets it; default `istio-system`): its ingress gateway's identity is
    /// the `istio-ingressgateway` service account there, as Istio's.
    pub namespace: String,
    pub trust_domain: String,
    /// Istio's plug-in CA files; `None`: a CA generated into the state
    /// directory.
    pub ca_dir: Option<PathBuf>,
    /// `mesh.caAddress`: an Istio-compatible CA (`redirector-ca.<ns>.svc:15012`,
    /// or an istiod's `istiod.istio-system.svc:15012`) the agent asks for
    /// every certificate; the node then holds no CA key.
    pub ca: Option<RemoteCaSettings>,
    /// `mesh.compliancePolicy` (else Istio's `COMPLIANCE_POLICY` from the
    /// environment): `pqc` allows only the X25519MLKEM768 key exchange.
    pub compliance_policy: crate::identity::CompliancePolicy,
    pub cert_lifetime: Duration,
    pub hbone_port: u16,
    /// An inbound mTLS handshake not finished by then is dropped.
    pub handshake_timeout: Duration,
    /// `mesh.defaultServiceExportTo`, `defaultVirtualServiceExportTo`,
    /// `defaultDestinationRuleExportTo` (empty: `*`, as Istio's).
    pub exports: crate::mesh::export::ExportDefaults,
    /// `mesh.gatewayCertificateDirs`: where a Gateway's certificate files
    /// may be (unset: anywhere from a directory source, nowhere from the
    /// cluster).
    pub gateway_certificate_dirs: Option<Vec<PathBuf>>,
    /// `mesh.gatewayNamespaces`: the namespaces whose Gateways may open
    /// ports on the node (unset: any from a directory source, the agent's
    /// own from the cluster; `*`: any).
    pub gateway_namespaces: Option<Vec<String>>,
}

impl AgentConfig {
    /// What the agent compiles the mesh for: its namespace and the
    /// exportTo defaults.
    pub fn scope(&self) -> crate::mesh::Scope {
        crate::mesh::Scope {
            namespace: self.namespace.clone(),
            exports: self.exports.clone(),
            certificate_dirs: self.gateway_certificate_dirs.clone(),
            gateway_namespaces: self.gateway_namespaces.clone(),
        }
    }
}

/// Where a remote CA is and what the agent shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteCaSettings {
    /// `host:port`; `host` is the name the CA's certificate carries.
    pub address: String,
    /// The trust bundle (`mesh.caRootCert`): the ConfigMap
    /// `istio-ca-root-cert`'s `root-cert.pem`, as Istio mounts it.
    pub root_cert: PathBuf,
    /// The projected service-account token with audience `istio-ca`
    /// (`mesh.caTokenPath`).
    pub token_path: PathBuf,
}

pub const DEFAULT_CA_ROOT_CERT: &str = "/var/run/secrets/istio/root-cert.pem";
pub const DEFAULT_CA_TOKEN_PATH: &str = "/var/run/secrets/tokens/istio-token";

fn remote_ca(origin: &str, m: &RawMesh) -> Result<Option<RemoteCaSettings>, ConfigError> {
    let invalid = |field: &'static str, message: String| ConfigError::Invalid { path: origin.into(), field, message };
    let Some(address) = m.ca_address.clone().filter(|s| !s.is_empty()) else {
        for (field, set) in [("mesh.caRootCert", &m.ca_root_cert), ("mesh.caTokenPath", &m.ca_token_path)] {
            if set.is_some() {
                return Err(invalid(field, "is read only with mesh.caAddress; set that too, or remove it".into()));
            }
        }
        return Ok(None);
    };
    if m.ca_dir.as_deref().is_some_and(|d| !d.is_empty()) {
        return Err(invalid(
            "mesh.caAddress",
            "and mesh.caDir are both set: either the agent signs with a CA key (caDir) or asks a CA (caAddress); remove one".into(),
        ));
    }
    let port_ok =
        address.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
    if !port_ok {
        return Err(invalid(
            "mesh.caAddress",
            format!("`{address}` is not host:port (e.g. redirector-ca.redirector-system.svc:15012)"),
        ));
    }
    Ok(Some(RemoteCaSettings {
        address,
        root_cert: PathBuf::from(m.ca_root_cert.clone().unwrap_or_else(|| DEFAULT_CA_ROOT_CERT.into())),
        token_path: PathBuf::from(m.ca_token_path.clone().unwrap_or_else(|| DEFAULT_CA_TOKEN_PATH.into())),
    }))
}

/// Istio's environment variable for the compliance policy (ztunnel's and
/// istiod's), read when `mesh.compliancePolicy` is not set.
pub const ENV_COMPLIANCE_POLICY: &str = "COMPLIANCE_POLICY";

fn compliance_policy(m: &RawMesh) -> Result<crate::identity::CompliancePolicy, String> {
    match &m.compliance_policy {
        Some(p) => p.parse(),
        None => std::env::var(ENV_COMPLIANCE_POLICY)
            .unwrap_or_default()
            .parse()
            .map_err(|e| format!("(from {ENV_COMPLIANCE_POLICY} in the environment) {e}")),
    }
}

/// The environment variable naming the node (Kubernetes' downward API).
pub const ENV_NODE_NAME: &str = "NODE_NAME";

/// The environment variable naming the agent's namespace (downward API).
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";

/// The environment variable naming the agent's service account (downward
/// API `spec.serviceAccountName`).
pub const ENV_SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";

/// The agent's own service account: `SERVICE_ACCOUNT`, else `redirector`
/// (the DaemonSet's). Traffic the agent captures in its own namespace (the
/// node's, in a cluster) speaks as this identity, never as a tenant's.
pub fn agent_service_account() -> String {
    std::env::var(ENV_SERVICE_ACCOUNT).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "redirector".into())
}

/// The agent's own identity: its service account in its namespace.
pub fn agent_identity(cfg: &AgentConfig) -> crate::identity::Identity {
    crate::identity::Identity::new(&cfg.trust_domain, &cfg.namespace, &agent_service_account())
}

/// The agent's namespace: `POD_NAMESPACE`, else `istio-system`.
pub fn agent_namespace() -> String {
    std::env::var(ENV_POD_NAMESPACE)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| crate::mesh::security::ROOT_NAMESPACE.into())
}

/// The service account the agent's ingress gateway speaks as.
pub const GATEWAY_SERVICE_ACCOUNT: &str = "istio-ingressgateway";

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| "localhost".into(), |s| s.trim().to_string())
}

const MAX_CONCURRENCY: usize = 1024;

impl AgentConfig {
    /// The proxy's own ports (outbound, inbound, HBONE, DNS, metrics,
    /// readiness, admin): a connection or CONNECT to a pod's address on one
    /// of them is a self-call and is refused (see
    /// [`crate::proxy::inbound`]).
    pub fn own_ports(&self) -> Vec<u16> {
        let mut v = vec![
            self.outbound_port,
            self.inbound_port,
            self.hbone_port,
            self.dns_port,
            self.metrics_port,
            self.readiness_port,
            self.admin_port,
        ];
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The worker threads the proxy runs on: `proxy.concurrency`; 0: one
    /// per CPU the agent may run on; unset: half of those, at least one.
    /// The node proxy shares its node with the workloads it serves: a
    /// thread it cannot keep on a core of its own costs more in wake-ups
    /// between threads than it gives (measured on 2 vCPUs: one thread
    /// carried 13% more requests/s at 9% less CPU per request than two).
    pub fn worker_threads(&self) -> usize {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        match self.concurrency {
            None => (cpus / 2).max(1),
            Some(0) => cpus,
            Some(n) => n,
        }
    }
}

pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/redirector";
/// The agent settings' Kubernetes-style type.
/// The HBONE port of every pod (Istio's).
pub const HBONE_PORT: u16 = 15008;
/// A TLS handshake that has not finished by then is dropped (default of
/// `mesh.handshakeTimeout`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl AgentConfig {
    /// The embedded default settings.
    pub fn embedded() -> AgentConfig {
        Self::from_yaml("<embedded default>", DEFAULT_CONFIG).expect("embedded config is valid")
    }

    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::from_yaml(&path.display().to_string(), &text)
    }

    /// Settings as a Kubernetes-style document (`apiVersion:
    /// redirector.dev/v1alpha1`, `kind: AgentConfig`, settings under
    /// `spec`), the format of the mesh configuration, or as the bare
    /// `capture:` / `proxy:` sections.
    pub fn from_yaml(origin: &str, text: &str) -> Result<AgentConfig, ConfigError> {
        let parse = |message: String| ConfigError::Parse { path: origin.into(), message };
        let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| parse(e.to_string()))?;
        let body = match value.get("kind") {
            None => value,
            Some(kind) => {
                let api = value.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default();
                if kind.as_str() != Some(AGENT_CONFIG_KIND) || api != AGENT_CONFIG_API {
                    return Err(parse(format!(
                        "expected apiVersion {AGENT_CONFIG_API} and kind {AGENT_CONFIG_KIND}, found {api} {}",
                        kind.as_str().unwrap_or("?")
                    )));
                }
                value.get("spec").cloned().unwrap_or(serde_yaml::Value::Null)
            }
        };
        let body = if body.is_null() { serde_yaml::Value::Mapping(Default::default()) } else { body };
        let raw: RawConfig = serde_yaml::from_value(body).map_err(|e| parse(e.to_string()))?;
        Self::validate(origin, raw)
    }

    fn validate(origin: &str, raw: RawConfig) -> Result<AgentConfig, ConfigError> {
        let remote = remote_ca(origin, &raw.mesh)?;
        let invalid =
            |field: &'static str, message: String| ConfigError::Invalid { path: origin.into(), field, message };
        let exclude_cidrs = raw
            .capture
            .exclude_cidrs
            .iter()
            .map(|s| Cidr::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| invalid("capture.excludeCidrs", m))?;
        let dur = |field: &'static str, v: &Option<String>, d: Duration| match v {
            None => Ok(d),
            Some(s) => parse_duration(s).map_err(|m| invalid(field, m)),
        };
        let outbound_port = raw.proxy.outbound_port.unwrap_or(15001);
        let inbound_port = raw.proxy.inbound_port.unwrap_or(15006);
        let admin_port = raw.proxy.admin_port.unwrap_or(15000);
        let metrics_port = raw.proxy.metrics_port.unwrap_or(15020);
        let readiness_port = raw.proxy.readiness_port.unwrap_or(15021);
        let dns_port = raw.proxy.dns_port.unwrap_or(15053);
        let dns_upstreams = raw
            .proxy
            .dns_upstreams
            .iter()
            .map(|s| {
                s.parse::<SocketAddr>().or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53))).map_err(
                    |_| {
                        invalid("proxy.dnsUpstreams", format!("`{s}` is not an address (e.g. 10.0.0.2 or 10.0.0.2:53)"))
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ports = [
            ("proxy.outboundPort", outbound_port),
            ("proxy.inboundPort", inbound_port),
            ("proxy.adminPort", admin_port),
            ("proxy.metricsPort", metrics_port),
            ("proxy.readinessPort", readiness_port),
            ("proxy.dnsPort", dns_port),
        ];
        for (field, p) in ports {
            if p == 0 {
                return Err(invalid(field, "port 0 is not allowed".into()));
            }
        }
        for (i, (_, a)) in ports.iter().enumerate() {
            if ports[i + 1..].iter().any(|(_, b)| a == b) {
                return Err(invalid(
                    "proxy",
                    "outboundPort, inboundPort, adminPort, metricsPort, readinessPort and dnsPort must differ".into(),
                ));
            }
        }
        let max_connections = raw.proxy.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(invalid("proxy.maxConnections", "must be at least 1".into()));
        }
        if raw.proxy.concurrency.is_some_and(|n| n > MAX_CONCURRENCY) {
            return Err(invalid(
                "proxy.concurrency",
                format!("at most {MAX_CONCURRENCY} worker threads; 0 means one per CPU"),
            ));
        }
        if raw.capture.exclude_ports.contains(&0) {
            return Err(invalid("capture.excludePorts", "port 0 is not a port".into()));
        }
        let proxy_mark = raw.capture.proxy_mark.unwrap_or(redirector_common::DEFAULT_PROXY_MARK);
        if proxy_mark == 0 {
            return Err(invalid("capture.proxyMark", "0 would mark nothing; choose a non-zero mark".into()));
        }
        let mode = CaptureMode::parse(raw.capture.mode.as_deref().unwrap_or("auto"))
            .map_err(|m| invalid("capture.mode", m))?;
        if raw.capture.inbound_ports.contains(&0) {
            return Err(invalid("capture.inboundPorts", "port 0 is not a port".into()));
        }
        let compliance_policy = compliance_policy(&raw.mesh).map_err(|m| invalid("mesh.compliancePolicy", m))?;
        Ok(AgentConfig {
            mode,
            inbound_ports: raw.capture.inbound_ports,
            accelerate: raw.capture.accelerate,
            storage: Storage::parse(raw.capture.storage.as_deref().unwrap_or("auto"))
                .map_err(|m| invalid("capture.storage", m))?,
            cgroup_root: raw.capture.cgroup_root.filter(|s| !s.is_empty()).map(PathBuf::from),
            exclude_ports: raw.capture.exclude_ports,
            exclude_cidrs,
            capture_loopback: raw.capture.capture_loopback,
            proxy_mark,
            bpffs_dir: raw.capture.bpffs_dir.map_or_else(|| DEFAULT_BPFFS_DIR.into(), PathBuf::from),
            outbound_port,
            inbound_port,
            admin_port,
            metrics_port,
            readiness_port,
            dns_port,
            dns_upstreams,
            dns_capture: raw.capture.dns_capture.unwrap_or(true),
            access_log: raw.proxy.access_log.unwrap_or(true),
            max_connections,
            connect_timeout: dur("proxy.connectTimeout", &raw.proxy.connect_timeout, Duration::from_secs(10))?,
            idle_timeout: dur("proxy.idleTimeout", &raw.proxy.idle_timeout, Duration::from_hours(1))?,
            drain_timeout: dur("proxy.drainTimeout", &raw.proxy.drain_timeout, Duration::from_secs(5))?,
            header_read_timeout: {
                let d = dur("proxy.headerReadTimeout", &raw.proxy.header_read_timeout, Duration::from_secs(30))?;
                if d.is_zero() {
                    return Err(invalid("proxy.headerReadTimeout", "must be more than 0s".into()));
                }
                d
            },
            concurrency: raw.proxy.concurrency,
            node_name: std::env::var(ENV_NODE_NAME)
                .ok()
                .filter(|s| !s.is_empty())
                .or(raw.mesh.node_name.filter(|s| !s.is_empty()))
                .unwrap_or_else(host_name),
            namespace: agent_namespace(),
            compliance_policy,
            gateway_certificate_dirs: raw
                .mesh
                .gateway_certificate_dirs
                .map(|v| v.into_iter().filter(|s| !s.is_empty()).map(PathBuf::from).collect()),
            gateway_namespaces: match raw.mesh.gateway_namespaces {
                Some(v) => {
                    for n in &v {
                        if n != "*" && !crate::mesh::export::is_namespace_name(n) {
                            return Err(invalid(
                                "mesh.gatewayNamespaces",
                                format!("{n:?} is not a namespace name; list namespaces, or \"*\" for any"),
                            ));
                        }
                    }
                    Some(v)
                }
                None => None,
            },
            exports: {
                let field = |name: &'static str, v: &Option<Vec<String>>| -> Result<Vec<String>, ConfigError> {
                    let v = v.clone().unwrap_or_default();
                    crate::mesh::export::check(&v).map_err(|e| invalid(name, e))?;
                    Ok(v)
                };
                crate::mesh::export::ExportDefaults {
                    services: field("mesh.defaultServiceExportTo", &raw.mesh.default_service_export_to)?,
                    virtual_services: field(
                        "mesh.defaultVirtualServiceExportTo",
                        &raw.mesh.default_virtual_service_export_to,
                    )?,
                    destination_rules: field(
                        "mesh.defaultDestinationRuleExportTo",
                        &raw.mesh.default_destination_rule_export_to,
                    )?,
                }
            },
            trust_domain: {
                let td = raw.mesh.trust_domain.unwrap_or_else(|| crate::identity::DEFAULT_TRUST_DOMAIN.into());
                if td.is_empty() || td.contains('/') {
                    return Err(invalid(
                        "mesh.trustDomain",
                        format!("`{td}` is not a trust domain (e.g. cluster.local)"),
                    ));
                }
                td
            },
            ca_dir: raw.mesh.ca_dir.clone().filter(|s| !s.is_empty()).map(PathBuf::from),
            ca: remote,
            cert_lifetime: {
                let d = dur("mesh.certLifetime", &raw.mesh.cert_lifetime, crate::identity::DEFAULT_CERT_LIFETIME)?;
                if d < Duration::from_secs(2) {
                    return Err(invalid("mesh.certLifetime", "must be at least 2s".into()));
                }
                d
            },
            hbone_port: match raw.mesh.hbone_port.unwrap_or(15008) {
                0 => return Err(invalid("mesh.hbonePort", "port 0 is not allowed".into())),
                p if ports.iter().any(|(_, q)| *q == p) => {
                    return Err(invalid("mesh.hbonePort", format!("{p} is already one of the proxy's ports")))
                }
                p => p,
            },
            handshake_timeout: {
                let d = dur("mesh.handshakeTimeout", &raw.mesh.handshake_timeout, HANDSHAKE_TIMEOUT)?;
                if d.is_zero() {
                    return Err(invalid("mesh.handshakeTimeout", "must be more than 0s".into()));
                }
                d
            },
        })
    }

    /// Whether the kernel programs leave a connection to `dst` alone because
    /// of an exclusion (the same rules as the kernel, for status and tests).
    pub fn is_excluded(&self, dst: std::net::SocketAddr) -> bool {
        let ip = match dst.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        (ip.is_loopback() && !self.capture_loopback)
            || self.exclude_ports.contains(&dst.port())
            || self.exclude_cidrs.iter().any(|c| c.contains(ip))
    }
}

/// Durations as Istio writes them: `10s`, `500ms`, `1m`, `1h`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration (e.g. 500ms, 10s, 5m, 1h)");
    let s = s.trim();
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        total += match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => return Err(bad()),
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_is_valid_and_uses_istio_ports() {
        let c = AgentConfig::embedded();
        assert_eq!(c.outbound_port, 15001);
        assert_eq!(c.inbound_port, 15006);
        assert_eq!(c.admin_port, 15000);
        assert!(!c.capture_loopback);
        assert_eq!(c.bpffs_dir, PathBuf::from(DEFAULT_BPFFS_DIR));
    }

    #[test]
    fn settings_read_as_a_kubernetes_style_document_or_bare() {
        let k = "apiVersion: redirector.dev/v1alpha1\nkind: AgentConfig\nmetadata: {name: x}\nspec:\n  capture: {mode: iptables}\n";
        assert_eq!(AgentConfig::from_yaml("f", k).unwrap().mode, CaptureMode::Iptables);
        let wrong = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n";
        let err = AgentConfig::from_yaml("f", wrong).unwrap_err().to_string();
        assert!(err.contains("expected apiVersion redirector.dev/v1alpha1 and kind AgentConfig"), "{err}");
        assert_eq!(AgentConfig::from_yaml("f", "capture: {mode: ebpf}\n").unwrap().mode, CaptureMode::Ebpf);
    }

    #[test]
    fn concurrency_is_istios_worker_threads_setting() {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        assert_eq!(AgentConfig::embedded().worker_threads(), (cpus / 2).max(1));
        assert_eq!(AgentConfig::from_yaml("f", "proxy:\n  concurrency: 3\n").unwrap().worker_threads(), 3);
        assert_eq!(AgentConfig::from_yaml("f", "proxy:\n  concurrency: 0\n").unwrap().worker_threads(), cpus);
        let e = AgentConfig::from_yaml("f", "proxy:\n  concurrency: 5000\n").unwrap_err().to_string();
        assert!(e.contains("proxy.concurrency") && e.contains("at most 1024"), "{e}");
    }

    #[test]
    fn capture_modes_parse_and_default_to_auto() {
        assert_eq!(AgentConfig::embedded().mode, CaptureMode::Auto);
        let c = AgentConfig::from_yaml("f", "capture:\n  mode: iptables\n").unwrap();
        assert_eq!(c.mode, CaptureMode::Iptables);
        let err = AgentConfig::from_yaml("f", "capture:\n  mode: tproxy\n").unwrap_err().to_string();
        assert!(err.contains("capture.mode") && err.contains("tproxy"), "{err}");
    }

    #[test]
    fn durations_parse_like_istio_writes_them() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_mins(90)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let err = AgentConfig::from_yaml("f.yaml", "proxy:\n  outbandPort: 1\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("f.yaml") && msg.contains("outbandPort"), "{msg}");
    }

    #[test]
    fn a_bad_cidr_names_the_field_and_the_value() {
        let err =
            AgentConfig::from_yaml("f.yaml", "capture:\n  excludeCidrs: [10.0.0.0/33]\n").unwrap_err().to_string();
        assert!(err.contains("capture.excludeCidrs") && err.contains("10.0.0.0/33"), "{err}");
    }

    #[test]
    fn clashing_ports_are_rejected() {
        assert!(AgentConfig::from_yaml("f", "proxy:\n  outboundPort: 15006\n").is_err());
    }

    #[test]
    fn cidr_matching_follows_the_prefix() {
        let c = Cidr::parse("198.18.0.0/15").unwrap();
        assert!(c.contains("198.19.255.1".parse().unwrap()));
        assert!(!c.contains("198.20.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:198.18.1.1".parse().unwrap()));
        let c6 = Cidr::parse("2001:2::/48").unwrap();
        assert!(c6.contains("2001:2::1".parse().unwrap()));
        assert!(!c6.contains("2001:3::1".parse().unwrap()));
        assert_eq!(Cidr::parse("10.1.2.3").unwrap().prefix_len, 32);
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn exclusions_cover_loopback_ports_and_cidrs() {
        let c =
            AgentConfig::from_yaml("f", "capture:\n  excludePorts: [22]\n  excludeCidrs: [198.18.5.0/24]\n").unwrap();
        assert!(c.is_excluded("127.0.0.1:80".parse().unwrap()));
        assert!(c.is_excluded("[::1]:80".parse().unwrap()));
        assert!(c.is_excluded("198.18.0.1:22".parse().unwrap()));
        assert!(c.is_excluded("198.18.5.9:80".parse().unwrap()));
        assert!(c.is_excluded("[::ffff:198.18.5.9]:80".parse().unwrap()));
        assert!(!c.is_excluded("198.18.0.1:80".parse().unwrap()));
    }
}
