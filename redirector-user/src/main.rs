//! `redirector`: the node agent and its command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use redirector::cmd;
use redirector::config::AgentConfig;
use redirector::state::{DEFAULT_STATE_DIR, ENV_STATE_DIR};

#[derive(Parser)]
#[command(name = "redirector", version, about = "Sidecarless service-mesh data plane: eBPF capture and a node proxy")]
struct Cli {
    /// Where the agent records its runtime state (pins, cgroups, admin address).
    #[arg(long, global = true, env = ENV_STATE_DIR, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(flatten)]
    kube: KubeArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load and attach the kernel programs, serve the proxy.
    Run(RunArgs),
    /// Run an unmodified command in an enrolled cgroup (the dev-box
    /// equivalent of sidecar injection).
    Exec {
        /// Workload name: the cgroup is <capture root>/redirector-workloads/NAME.
        #[arg(long)]
        workload: Option<String>,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Enroll a cgroup (by path) or the cgroup of a process (by --pid).
    Enroll(Target),
    /// Stop capturing a cgroup (by path) or the cgroup of a process (by --pid).
    Unenroll(Target),
    /// Show attached programs, enrolled cgroups, counters and open
    /// connections; with --cluster, every node agent's config sync, capture
    /// mode and pods (like `istioctl proxy-status`).
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Every node of the cluster (kubeconfig or in-cluster).
        #[arg(long)]
        cluster: bool,
    },
    /// Check the kernel and this machine: version, BTF, cgroup v2, bpffs,
    /// capabilities, and that every program passes the verifier; with
    /// --cluster, the DaemonSet on every node, each node's kernel and
    /// Istio's CRDs.
    Verify {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        cluster: bool,
    },
    /// Print the Kubernetes manifests of a profile: minimal (capture and L4
    /// mTLS) or demo (adds the ingress gateway, access logs and a metrics
    /// Service).
    Manifest {
        #[arg(value_parser = ["generate"])]
        action: String,
        #[arg(long, default_value = "minimal")]
        profile: String,
        /// The agent image.
        #[arg(long, default_value = redirector::cmd::manifest::DEFAULT_IMAGE)]
        image: String,
    },
    /// Install a profile into the cluster (server-side apply), create the
    /// mesh CA Secret if absent, and wait until the agent runs on every node.
    Install {
        #[arg(long, default_value = "minimal")]
        profile: String,
        #[arg(long, default_value = redirector::cmd::manifest::DEFAULT_IMAGE)]
        image: String,
        /// How long to wait for the DaemonSet, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Keep the mesh's root CA out of the cluster: the CA Secret gets an
        /// intermediate CA signed by the root in this directory (made there
        /// first if it holds none; keep it offline).
        #[arg(long)]
        root_ca: Option<PathBuf>,
    },
    /// Turn the same-node sockmap shortcut on or off while the agent runs
    /// (the kill switch; eBPF mode).
    Accelerate {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Validate a directory of Istio / Kubernetes YAML offline, like
    /// `istioctl analyze`: every error and warning with file, document and
    /// field; non-zero exit on errors.
    Analyze { dir: PathBuf },
    /// Show the running agent's effective routing (from its /config_dump),
    /// like `istioctl proxy-config`.
    ProxyConfig {
        #[arg(value_parser = ["routes", "clusters", "endpoints", "all"])]
        what: String,
        /// The whole dump as JSON.
        #[arg(long)]
        json: bool,
    },
    /// `create`: make a mesh CA in Istio's plug-in layout (ca-cert.pem,
    /// ca-key.pem, root-cert.pem, cert-chain.pem) for `mesh.caDir` or for
    /// `serve`. `serve`: answer Istio's certificate API on 15012 with the
    /// CA in DIR (the cluster's CA Deployment; node agents then hold no
    /// key).
    Ca(CaArgs),
    /// Print the version; with --cluster, the API server's and every node
    /// agent's too.
    Version {
        #[arg(long)]
        cluster: bool,
    },
    /// Stop the agent if it runs, detach every program and remove every pin.
    Uninstall,
}

#[derive(Args)]
struct CaArgs {
    #[arg(value_parser = ["create", "serve"])]
    action: String,
    dir: PathBuf,
    #[arg(long, default_value = redirector::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// serve: the gRPC-over-TLS address.
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: std::net::SocketAddr,
    /// serve: /ready and /metrics over HTTP ("off" for none).
    #[arg(long, default_value = "0.0.0.0:15014")]
    monitoring: String,
    /// serve: a DNS name or address the serving certificate carries
    /// (repeat; default the Service redirector-ca's names in
    /// POD_NAMESPACE).
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// serve: a node agent's service account, namespace/name (repeat);
    /// it may get its pods' identities.
    #[arg(long = "node-agent", default_values = ["redirector-system/redirector"])]
    node_agents: Vec<String>,
    /// serve: the longest certificate life granted.
    #[arg(long, default_value = "24h")]
    max_cert_lifetime: String,
    /// serve: Istio's compliance policy for the CA's TLS ("pqc": only the
    /// X25519MLKEM768 key exchange).
    #[arg(long, env = "COMPLIANCE_POLICY", default_value = "")]
    compliance_policy: String,
    /// create: make an intermediate CA signed by the CA in this directory
    /// (a root kept offline: its key is read, never copied).
    #[arg(long)]
    root: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// Agent settings (YAML). Default: the embedded configuration.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory of mesh configuration (Istio YAML); read by the routing layer.
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// cgroup v2 subtree to attach to (overrides capture.cgroupRoot).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory for pins (overrides capture.bpffsDir).
    #[arg(long)]
    bpffs_dir: Option<PathBuf>,
    /// Turn on the same-node sockmap shortcut (overrides capture.accelerate).
    #[arg(long)]
    accelerate: bool,
    /// Capture mode (overrides capture.mode): ebpf, iptables or auto.
    #[arg(long, value_parser = ["ebpf", "iptables", "auto"])]
    mode: Option<String>,
    /// eBPF mode: where original destinations are kept (overrides
    /// capture.storage): socket, map (kernels without per-socket storage)
    /// or auto.
    #[arg(long, value_parser = ["socket", "map", "auto"])]
    storage: Option<String>,
    /// Read the mesh config (Pods, Namespaces, Services, EndpointSlices,
    /// Istio's kinds) from the Kubernetes API: the DaemonSet's way.
    #[arg(long, conflicts_with = "config_dir", env = "REDIRECTOR_KUBERNETES")]
    kubernetes: bool,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// How the commands that talk to the cluster reach it.
#[derive(Args, Clone, Default)]
struct KubeArgs {
    /// kubeconfig file (default: KUBECONFIG, ~/.kube/config, or the pod's
    /// service account).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
}

impl KubeArgs {
    fn access(&self) -> anyhow::Result<redirector::mesh::kubernetes::Access> {
        if let Some(p) = &self.kubeconfig {
            redirector::mesh::kubernetes::check_kubeconfig(p)?;
        }
        Ok(redirector::mesh::kubernetes::Access { kubeconfig: self.kubeconfig.clone(), context: self.context.clone() })
    }
}

#[derive(Args)]
pub struct Target {
    /// A cgroup v2 directory (absolute, or relative to the cgroup2 mount).
    #[arg(conflicts_with = "pid", required_unless_present = "pid")]
    cgroup: Option<PathBuf>,
    /// A process whose cgroup to use.
    #[arg(long)]
    pid: Option<u32>,
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REDIRECTOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(redirector::telemetry::logtime::LogTime)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// glibc gives each thread that meets contention an arena of its own,
/// which keeps freed memory per thread; with as many arenas as proxy
/// workers the agent held 14.6 instead of 16.0 MiB under a bulk stream (one
/// worker, 2 vCPUs) at the same throughput. `MALLOC_ARENA_MAX` in the
/// environment still wins.
fn limit_malloc_arenas(workers: usize) {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let n = i32::try_from(workers).unwrap_or(i32::MAX).max(1);
        // SAFETY: mallopt only sets an allocator parameter; called before
        // the runtime's threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, n);
        }
    }
}

/// The runtime the agent and its proxy run on. One worker is a
/// single-threaded runtime: the agent's own tasks and the proxy share the
/// thread, with none of the work-stealing scheduler's cross-thread
/// bookkeeping; on 2 vCPUs it carried 0.47x instead of 0.38x direct's
/// keepalive requests and 0.35x instead of 0.28x its new connections, at
/// 0.064 instead of 0.072 vCPU per 1k req/s (cross-node bench, alternating
/// runs of the same build).
fn proxy_runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()
    }
}

/// Run a command that talks to the cluster.
fn in_cluster<F, Fut>(kube: &KubeArgs, f: F) -> anyhow::Result<()>
where
    F: FnOnce(redirector::mesh::kubernetes::Access) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let access = kube.access()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(f(access))
}

/// `ca create DIR` and `ca serve DIR`.
fn ca(kube: &KubeArgs, c: CaArgs) -> anyhow::Result<()> {
    let CaArgs {
        action,
        dir,
        trust_domain,
        listen,
        monitoring,
        dns_names,
        node_agents,
        max_cert_lifetime,
        compliance_policy,
        root,
    } = c;
    if action == "create" {
        if dir.join(redirector::identity::CA_KEY_FILE).exists() {
            anyhow::bail!("{} already holds a CA key; choose an empty directory", dir.display());
        }
        if let Some(root) = root {
            let ca = redirector::identity::intermediate_ca_pem(&root, &trust_domain)?;
            redirector::identity::write_plugin_ca(&dir, &ca)?;
            println!(
                "intermediate CA written to {} (signed by the CA in {}, trust domain {trust_domain}); give it to the CA service (Secret cacerts) and keep {} offline",
                dir.display(),
                root.display(),
                root.display()
            );
            return Ok(());
        }
        redirector::identity::write_self_signed_ca(&dir, &trust_domain)?;
        println!(
            "mesh CA written to {} (trust domain {trust_domain}); set mesh.caDir to it on every node",
            dir.display()
        );
        return Ok(());
    } else if root.is_some() {
        anyhow::bail!("--root is for `ca create` (an intermediate CA); `ca serve` reads its CA from DIR alone");
    }
    init_logging(false);
    let policy = compliance_policy.parse().map_err(|e| anyhow::anyhow!("--compliance-policy: {e}"))?;
    redirector::identity::set_compliance_policy(policy).map_err(anyhow::Error::msg)?;
    let settings = ca_settings(trust_domain, listen, &monitoring, dns_names, &node_agents, &max_cert_lifetime)?;
    let access = kube.access()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let client = redirector::mesh::kubernetes::client(&access).await?;
        redirector::ca::serve(&dir, settings, client).await
    })
}

fn ca_settings(
    trust_domain: String,
    listen: std::net::SocketAddr,
    monitoring: &str,
    dns_names: Vec<String>,
    node_agents: &[String],
    max_cert_lifetime: &str,
) -> anyhow::Result<redirector::ca::Settings> {
    let monitoring = match monitoring {
        "off" => None,
        m => Some(m.parse().map_err(|_| anyhow::anyhow!("--monitoring `{m}` is not an address:port (or off)"))?),
    };
    let node_agents = node_agents
        .iter()
        .map(|s| redirector::ca::parse_service_account(s).map_err(|e| anyhow::anyhow!("--node-agent: {e}")))
        .collect::<anyhow::Result<_>>()?;
    let max_lifetime = redirector::config::parse_duration(max_cert_lifetime)
        .map_err(|e| anyhow::anyhow!("--max-cert-lifetime: {e}"))?;
    if max_lifetime < std::time::Duration::from_secs(10) {
        anyhow::bail!("--max-cert-lifetime {max_cert_lifetime} is too short; give at least 10s");
    }
    let dns_names = if dns_names.is_empty() {
        redirector::ca::default_dns_names(&redirector::config::agent_namespace())
    } else {
        dns_names
    };
    Ok(redirector::ca::Settings { listen, monitoring, dns_names, node_agents, max_lifetime, trust_domain })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => (|| {
            // Before any thread: the threads inherit it.
            let entered = redirector::sys::cgroup::enter_host_cgroup_namespace();
            init_logging(a.log_format == "json");
            match entered {
                Ok(true) => {
                    tracing::info!("entered the host's cgroup namespace (the agent was started in a private one)");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot enter the host's cgroup namespace; cgroups are named as this namespace shows them");
                }
            }
            let mut config = match &a.config {
                Some(p) => AgentConfig::load(p)?,
                None => AgentConfig::embedded(),
            };
            if let Some(c) = a.cgroup {
                config.cgroup_root = Some(c);
            }
            if let Some(d) = a.bpffs_dir {
                config.bpffs_dir = d;
            }
            if a.accelerate {
                config.accelerate = true;
            }
            if let Some(m) = &a.mode {
                config.mode = redirector::config::CaptureMode::parse(m).map_err(anyhow::Error::msg)?;
            }
            if let Some(st) = &a.storage {
                config.storage = redirector::config::Storage::parse(st).map_err(anyhow::Error::msg)?;
            }
            if let Some(d) = &a.config_dir {
                if !d.is_dir() {
                    anyhow::bail!("--config-dir {}: not a readable directory; create it or fix the path", d.display());
                }
            }
            let workers = config.worker_threads();
            limit_malloc_arenas(workers);
            let rt = proxy_runtime(workers)?;
            let kubernetes = if a.kubernetes { Some(cli.kube.access()?) } else { None };
            rt.block_on(redirector::app::run(redirector::app::RunOptions {
                config,
                state_dir: cli.state_dir,
                config_dir: a.config_dir.clone(),
                kubernetes,
            }))
        })(),
        Command::Exec { workload, command } => cmd::exec(&cli.state_dir, workload.as_deref(), &command).map(|code| {
            std::process::exit(code);
        }),
        Command::Enroll(t) => cmd::enroll(&cli.state_dir, t.cgroup.as_deref(), t.pid, true),
        Command::Unenroll(t) => cmd::enroll(&cli.state_dir, t.cgroup.as_deref(), t.pid, false),
        Command::Status { json, cluster: false } => cmd::status(&cli.state_dir, json),
        Command::Status { json, cluster: true } => {
            in_cluster(&cli.kube, |a| async move { redirector::cmd::cluster::status(&a, json).await })
        }
        Command::Verify { json, cluster: false } => cmd::verify(json),
        Command::Verify { json, cluster: true } => {
            in_cluster(&cli.kube, |a| async move { redirector::cmd::cluster::verify(&a, json).await })
        }
        Command::Manifest { profile, image, .. } => {
            redirector::cmd::manifest::generate(&profile, &image).map(|y| print!("{y}"))
        }
        Command::Install { profile, image, timeout, root_ca } => (|| {
            // Check the profile and the root before reaching for the cluster.
            redirector::cmd::manifest::documents(&profile, &image)?;
            let ca = root_ca.as_deref().map(redirector::cmd::cluster::offline_root).transpose()?;
            in_cluster(&cli.kube, |a| async move {
                let wait = std::time::Duration::from_secs(timeout);
                redirector::cmd::cluster::install(&a, &profile, &image, wait, ca).await
            })
        })(),
        Command::Accelerate { state } => cmd::accelerate(&cli.state_dir, state == "on"),
        Command::Analyze { dir } => cmd::analyze(&dir),
        Command::ProxyConfig { what, json } => cmd::proxy_config(&cli.state_dir, &what, json),
        Command::Ca(c) => ca(&cli.kube, c),
        Command::Version { cluster: false } => {
            println!("redirector {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Version { cluster: true } => {
            in_cluster(&cli.kube, |a| async move { redirector::cmd::cluster::version(&a).await })
        }
        Command::Uninstall => cmd::uninstall(&cli.state_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: what failed and what to do.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("redirector: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
