//! A small cluster on one machine: two "nodes" (a network namespace, a
//! cgroup subtree and an agent process each) joined by a veth link, and two
//! "pods" per node (a network namespace and a cgroup each, connected to
//! their node by veth, routed like a CNI does). Addresses in 198.18.0.0/15.
//! Everything is created here and removed on drop (and a crashed run's
//! leftovers by the next run).
//!
//! | what | address |
//! |---|---|
//! | node-a ↔ node-b link | 198.18.0.1 ↔ 198.18.0.2 |
//! | pods of node-a | 198.18.1.2, 198.18.1.6 (node side .1, .5) |
//! | pods of node-b | 198.18.2.2, 198.18.2.6 (node side .1, .5) |

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cgroup2_mount, eventually, ip, redirector_bin, remove_cgroup_tree, run, PREFIX, SEQ};

pub struct Node {
    pub name: String,
    pub ns: String,
    pub ip: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    /// This node's own copy of the mesh configuration (each agent computes
    /// its own view, as in a cluster).
    pub config_dir: PathBuf,
    agent: Option<Child>,
}

pub struct Pod {
    pub name: String,
    /// The pod's UID (a UUID in the Kubernetes layout).
    pub uid: String,
    pub namespace: String,
    pub service_account: String,
    pub node: usize,
    pub ns: String,
    pub ip: String,
    /// IPv6 addresses listed in the pod's `status.podIPs` after `ip`
    /// (see [`Cluster::dual_stack`]).
    pub ips6: Vec<String>,
    pub cgroup: PathBuf,
}

pub struct Cluster {
    pub name: String,
    pub dir: PathBuf,
    pub ca_dir: PathBuf,
    pub cgroup: PathBuf,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// "ebpf" or "iptables".
    pub mode: &'static str,
    /// Extra lines for the `mesh:` section of every agent's settings.
    pub mesh_settings: String,
    /// Extra lines for the `proxy:` section of every agent's settings.
    pub proxy_settings: String,
    /// Extra YAML documents in every node's mesh configuration.
    pub extra_yaml: String,
    /// Pods laid out as a kubelet does (see [`Cluster::kubernetes`]).
    pub kubernetes_layout: bool,
    /// Pods whose process `start` does not start (Kubernetes layout).
    pub late: Vec<String>,
    /// Per node: a kubeconfig; the agents then read the cluster from that
    /// API server (`run --kubernetes`) instead of their YAML directory.
    pub kubeconfigs: Option<Vec<PathBuf>>,
    /// Start each agent as a DaemonSet pod's container runs: in a cgroup
    /// of its own (`<node cgroup>/agent-pod`) under a private cgroup
    /// namespace.
    pub agent_in_pod_cgroup: bool,
    /// `mesh.caAddress`: the agents hold no CA key and ask this CA service
    /// (see [`Cluster::use_ca_service`]).
    pub ca_address: Option<String>,
    /// CA services started by [`Cluster::start_ca_server`].
    pub ca_servers: Vec<CaServer>,
    /// The API server the CA service of [`Cluster::with_ca_service`]
    /// asks: it reviews the agents' tokens and knows the cluster's pods
    /// (loaded from the mesh configuration at each [`Cluster::launch`]).
    pub ca_api: Option<crate::kubeapi::KubeApi>,
}

/// A `redirector ca serve` process in a node's network namespace.
pub struct CaServer {
    pub node: usize,
    pub child: Option<std::process::Child>,
    pub log: PathBuf,
    /// Its gRPC address and its monitoring (`/ready`, `/metrics`) address.
    pub listen: String,
    pub monitoring: String,
}

/// The namespace and service account the agents run as in these tests
/// (no `POD_NAMESPACE` is set: the agent's default).
pub const AGENT_NAMESPACE: &str = "istio-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "redirector";

/// A pod's `podIPs` lines (nothing for a single-stack pod, as a
/// single-stack cluster's API server may leave it out).
fn pod_ips(p: &Pod) -> String {
    if p.ips6.is_empty() {
        return String::new();
    }
    std::iter::once(&p.ip).chain(&p.ips6).map(|a| format!("  - ip: {a}\n")).fold("  podIPs:\n".into(), |s, l| s + &l)
}

pub const POD_NAMES: [(&str, usize); 4] = [("a1", 0), ("a2", 0), ("b1", 1), ("b2", 1)];

pub fn ns_path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

impl Cluster {
    pub fn new(mode: &'static str) -> Result<Cluster> {
        Cluster::build(mode, false)
    }

    /// Pods as a kubelet lays them out, with nothing naming their network
    /// namespace or cgroup: the agent must find them from the pod's UID.
    /// node-a uses the systemd cgroup driver with containerd
    /// (`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`),
    /// node-b the cgroupfs driver (`kubepods/burstable/pod<uid>/<id>`). A
    /// pod's "container" is a process started in its cgroup and network
    /// namespace before the agents start.
    pub fn kubernetes(mode: &'static str) -> Result<Cluster> {
        Cluster::build(mode, true)
    }

    /// A cluster whose agents hold no CA key, as in Kubernetes: a CA
    /// service (`redirector ca serve`, in node-a's network namespace as a
    /// CA pod on node-a would be) signs every certificate, after checking
    /// each agent's token and the node of the pod it asks for with the
    /// test API server. The agents ask it at node-a's address. The CA
    /// service holds an intermediate (`ca create --root`) whose root stays
    /// out of the cluster (in `offline-root`): workload chains are leaf,
    /// intermediate, root. The multi-node mesh tests run on this.
    pub fn with_ca_service(mode: &'static str) -> Result<Cluster> {
        let mut c = Cluster::build(mode, false)?;
        let root = c.dir.join("offline-root");
        fs::rename(&c.ca_dir, &root)?;
        run(Command::new(redirector_bin()).arg("ca").arg("create").arg(&c.ca_dir).arg("--root").arg(&root))?;
        let api = crate::kubeapi::KubeApi::start(&c.dir.join("api"))?;
        let kubeconfig = c.dir.join("ca.kubeconfig");
        api.listen_in_netns(&ns_path(&c.nodes[0].ns), &kubeconfig)?;
        let address = format!("{}:15012", c.nodes[0].ip);
        c.use_ca_service(&api, &address)?;
        c.start_ca_server(0, &kubeconfig, &[])?;
        c.ca_api = Some(api);
        Ok(c)
    }

    fn build(mode: &'static str, kubernetes_layout: bool) -> Result<Cluster> {
        crate::clean_once();
        let name = format!("{PREFIX}{}x{}", std::process::id(), SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        let dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&dir)?;
        let cgroup = cgroup2_mount().join(&name);
        fs::create_dir_all(&cgroup)?;
        let mut c = Cluster {
            ca_dir: dir.join("ca"),
            dir: dir.clone(),
            cgroup: cgroup.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            mode,
            mesh_settings: String::new(),
            proxy_settings: String::new(),
            extra_yaml: String::new(),
            name: name.clone(),
            kubernetes_layout,
            late: Vec::new(),
            kubeconfigs: None,
            agent_in_pod_cgroup: false,
            ca_address: None,
            ca_servers: Vec::new(),
            ca_api: None,
        };
        for (i, n) in ["node-a", "node-b"].iter().enumerate() {
            let node = Node {
                name: n.to_string(),
                ns: format!("{name}n{i}"),
                ip: format!("198.18.0.{}", i + 1),
                cgroup: cgroup.join(n),
                bpffs: PathBuf::from("/sys/fs/bpf").join(format!("{name}n{i}")),
                state: dir.join(n).join("state"),
                log: dir.join(n).join("agent.log"),
                config_dir: dir.join(n).join("mesh"),
                agent: None,
            };
            fs::create_dir_all(&node.config_dir)?;
            fs::create_dir_all(&node.cgroup)?;
            ip(&["netns", "add", &node.ns])?;
            ip(&["-n", &node.ns, "link", "set", "lo", "up"])?;
            run(Command::new("ip").args(["netns", "exec", &node.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]))?;
            c.nodes.push(node);
        }
        ip(&[
            "link",
            "add",
            "link0",
            "netns",
            &c.nodes[0].ns,
            "type",
            "veth",
            "peer",
            "name",
            "link0",
            "netns",
            &c.nodes[1].ns,
        ])?;
        for (i, n) in c.nodes.iter().enumerate() {
            ip(&["-n", &n.ns, "addr", "add", &format!("{}/30", n.ip), "dev", "link0"])?;
            ip(&["-n", &n.ns, "link", "set", "link0", "up"])?;
            let other = &c.nodes[1 - i];
            ip(&["-n", &n.ns, "route", "add", &format!("198.18.{}.0/24", 2 - i), "via", &other.ip])?;
        }
        for (k, (p, node)) in POD_NAMES.iter().enumerate() {
            let base = 4 * (k % 2);
            let subnet = node + 1;
            let uid = format!(
                "{:08x}-5e1f-4c2a-9b3d-{:012x}",
                std::process::id(),
                k * 7919 + SEQ.load(std::sync::atomic::Ordering::SeqCst)
            );
            let container = format!("{:0>64}", format!("{:x}", 0xc0ff_ee00_u64 + k as u64));
            let cgroup = match (kubernetes_layout, node) {
                (false, _) => c.nodes[*node].cgroup.join(format!("pod-{p}")),
                (true, 0) => c.nodes[*node].cgroup.join(format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{container}.scope",
                    uid.replace('-', "_")
                )),
                (true, _) => c.nodes[*node].cgroup.join(format!("kubepods/burstable/pod{uid}/{container}")),
            };
            let pod = Pod {
                name: p.to_string(),
                uid,
                namespace: "default".into(),
                service_account: format!("sa-{p}"),
                node: *node,
                ns: format!("{name}p{p}"),
                ip: format!("198.18.{subnet}.{}", base + 2),
                ips6: Vec::new(),
                cgroup,
            };
            let gw = format!("198.18.{subnet}.{}", base + 1);
            ip(&["netns", "add", &pod.ns])?;
            ip(&["-n", &pod.ns, "link", "set", "lo", "up"])?;
            let host_side = format!("veth-{p}");
            ip(&[
                "link",
                "add",
                "eth0",
                "netns",
                &pod.ns,
                "type",
                "veth",
                "peer",
                "name",
                &host_side,
                "netns",
                &c.nodes[*node].ns,
            ])?;
            ip(&["-n", &pod.ns, "addr", "add", &format!("{}/30", pod.ip), "dev", "eth0"])?;
            ip(&["-n", &pod.ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &pod.ns, "route", "add", "default", "via", &gw])?;
            ip(&["-n", &c.nodes[*node].ns, "addr", "add", &format!("{gw}/30"), "dev", &host_side])?;
            ip(&["-n", &c.nodes[*node].ns, "link", "set", &host_side, "up"])?;
            if !kubernetes_layout {
                fs::create_dir_all(&pod.cgroup)?;
            }
            c.pods.push(pod);
        }
        run(Command::new(redirector_bin()).arg("ca").arg("create").arg(&c.ca_dir))?;
        Ok(c)
    }

    /// Make a pod dual-stack, as a CNI does: an IPv6 address on its eth0
    /// (listed in `status.podIPs`) with its node's side on the veth, and a
    /// second IPv6 address the API does not list (a second network's, as
    /// Multus adds). Addresses from 2001:2::/48 (RFC 5180). Returns
    /// (listed, unlisted).
    pub fn dual_stack(&mut self, pod: &str) -> Result<(String, String)> {
        let k = POD_NAMES.iter().position(|(p, _)| *p == pod).context("a pod of the cluster")?;
        let p = &self.pods[k];
        let prefix = format!("2001:2:{}:{k}", p.node + 1);
        // Written as the agent prints them (2001:2:1:0::2 is 2001:2:1::2).
        let canonical = |a: String| a.parse::<std::net::Ipv6Addr>().map_or(a.clone(), |ip| ip.to_string());
        let (listed, unlisted) = (canonical(format!("{prefix}::2")), canonical(format!("{prefix}::12")));
        let node_ns = &self.nodes[p.node].ns;
        for a in [&listed, &unlisted] {
            ip(&["-n", &p.ns, "-6", "addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"])?;
        }
        ip(&["-n", node_ns, "-6", "addr", "add", &format!("{prefix}::1/64"), "dev", &format!("veth-{pod}"), "nodad"])?;
        ip(&["-n", &p.ns, "-6", "route", "add", "default", "via", &format!("{prefix}::1")])?;
        // The node routes between its pods' IPv6 networks, as a CNI does.
        crate::run(Command::new("ip").args([
            "netns",
            "exec",
            node_ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.forwarding=1",
        ]))?;
        self.pods[k].ips6.push(listed.clone());
        Ok((listed, unlisted))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).expect("a pod of the cluster")
    }

    /// The mesh configuration every node reads: the namespace enrolled
    /// with Istio's label, each pod with its node, service account,
    /// address, network namespace and cgroup.
    pub fn mesh_yaml(&self) -> String {
        let mut y = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels:\n    istio-injection: enabled\n",
        );
        for p in &self.pods {
            y.push_str(&self.pod_yaml(p, &p.service_account));
        }
        y.push_str(&self.extra_yaml);
        y
    }

    pub fn pod_yaml(&self, p: &Pod, service_account: &str) -> String {
        if self.kubernetes_layout {
            // As the API server has it: UID and node, nothing of ours.
            return format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: {uid}\n  labels:\n    app: {name}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers:\n  - name: app\n    image: nginx\nstatus:\n  phase: Running\n  podIP: {ip}\n{ips}  hostIP: {host}\n",
                name = p.name,
                ns = p.namespace,
                uid = p.uid,
                node = self.nodes[p.node].name,
                sa = service_account,
                ip = p.ip,
                ips = pod_ips(p),
                host = self.nodes[p.node].ip,
            );
        }
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: {cluster}-{name}\n  labels:\n    app: {name}\n  annotations:\n    redirector.dev/netns: {netns}\n    redirector.dev/cgroup: {cgroup}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\nstatus:\n  podIP: {ip}\n{ips}  hostIP: {host}\n",
            name = p.name,
            ns = p.namespace,
            cluster = self.name,
            netns = ns_path(&p.ns).display(),
            cgroup = p.cgroup.display(),
            node = self.nodes[p.node].name,
            sa = service_account,
            ip = p.ip,
            ips = pod_ips(p),
            host = self.nodes[p.node].ip,
        )
    }

    /// Write `yaml` as a node's mesh configuration.
    pub fn write_mesh(&self, node: usize, yaml: &str) {
        let path = self.nodes[node].config_dir.join("mesh.yaml");
        let tmp = self.nodes[node].config_dir.join(".mesh.yaml.tmp");
        fs::write(&tmp, yaml).unwrap();
        fs::rename(tmp, path).unwrap();
    }

    /// Start both agents with the shared CA and wait until each serves its
    /// two pods.
    pub fn start(&mut self) -> Result<()> {
        let before = self.launch()?;
        self.wait_served(&before)
    }

    /// Start both agents (and, in the Kubernetes layout, the pods'
    /// processes) without waiting for any pod to be served; returns each
    /// node's count of served pods before, for [`Cluster::wait_served`].
    pub fn launch(&mut self) -> Result<Vec<usize>> {
        let yaml = self.mesh_yaml();
        for i in 0..self.nodes.len() {
            self.write_mesh(i, &yaml);
        }
        if let Some(api) = &self.ca_api {
            // What the CA's node check reads: the pods, as scheduled.
            for o in redirector::cmd::manifest::yaml_objects(&yaml)? {
                if o["kind"] == "Pod" {
                    api.apply(o)?;
                }
            }
        }
        // A restarted agent appends to its log: count only what this start
        // adds.
        let before: Vec<usize> = (0..self.nodes.len()).map(|i| self.served(i)).collect();
        if self.kubernetes_layout {
            for p in self.pods.iter().map(|p| p.name.clone()).collect::<Vec<_>>() {
                if !self.late.contains(&p) && !self.pod_running(&p) {
                    self.start_pod_process(&p)?;
                }
            }
        }
        for i in 0..self.nodes.len() {
            self.start_agent(i)?;
        }
        Ok(before)
    }

    /// Wait until each node serves its pods (beyond `before`, from
    /// [`Cluster::launch`]).
    pub fn wait_served(&self, before: &[usize]) -> Result<()> {
        for (i, &before) in before.iter().enumerate() {
            let n = &self.nodes[i];
            let want = self.pods.iter().filter(|p| p.node == i && !self.late.contains(&p.name)).count();
            if !eventually(Duration::from_secs(15), || self.served(i) >= before + want) {
                bail!("{} does not serve its pods: {}", n.name, fs::read_to_string(&n.log).unwrap_or_default());
            }
        }
        Ok(())
    }

    /// Kubernetes layout: the pod's "container", a process in its cgroup
    /// and network namespace (as a pod's pause container and app are).
    pub fn start_pod_process(&self, pod: &str) -> Result<()> {
        let p = self.pod(pod);
        fs::create_dir_all(&p.cgroup)?;
        // As a container runtime does: into the pod's network namespace
        // first, then into the container's cgroup (which may be frozen).
        let script = format!("echo 0 > {}; exec sleep infinity", p.cgroup.join("cgroup.procs").display());
        Command::new("nsenter")
            .arg(format!("--net={}", ns_path(&p.ns).display()))
            .args(["sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a pod's process")?;
        if !eventually(Duration::from_secs(5), || self.pod_running(pod)) {
            bail!("the process of pod {pod} did not start");
        }
        Ok(())
    }

    fn pod_running(&self, pod: &str) -> bool {
        fs::read_to_string(self.pod(pod).cgroup.join("cgroup.procs")).is_ok_and(|s| !s.trim().is_empty())
    }

    pub fn served(&self, node: usize) -> usize {
        self.log_lines(node)
            .iter()
            .filter(|l| l["fields"]["message"].as_str().is_some_and(|m| m.starts_with("pod enrolled")))
            .count()
    }

    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        let seen = self.log_lines(i).len();
        fs::create_dir_all(n.state.parent().unwrap())?;
        let cfg = n.state.parent().unwrap().join("agent.yaml");
        fs::write(
            &cfg,
            format!(
                "capture:\n  cgroupRoot: \"\"\nproxy:\n{}  connectTimeout: 3s\n{}mesh:\n{}{}",
                if self.proxy_settings.contains("drainTimeout") { "" } else { "  drainTimeout: 1s\n" },
                self.proxy_settings,
                match &self.ca_address {
                    None => format!("  caDir: {}\n", self.ca_dir.display()),
                    Some(a) => format!(
                        "  caAddress: {a}\n  caRootCert: {}\n  caTokenPath: {}\n",
                        self.ca_dir.join("root-cert.pem").display(),
                        self.token_path(i).display()
                    ),
                },
                self.mesh_settings
            ),
        )?;
        let log = fs::OpenOptions::new().create(true).append(true).open(&n.log)?;
        let mut command = Command::new("nsenter");
        if self.agent_in_pod_cgroup {
            let procs = self.agent_pod_cgroup(i).join("cgroup.procs");
            fs::create_dir_all(self.agent_pod_cgroup(i))?;
            command = Command::new("unshare");
            command.arg("--cgroup").arg("nsenter");
            // SAFETY: moves the child into the agent's pod cgroup before
            // exec (the cgroup namespace is then rooted there).
            unsafe {
                command.pre_exec(move || fs::write(&procs, "0"));
            }
        }
        let child = command
            .arg(format!("--net={}", ns_path(&n.ns).display()))
            .arg(redirector_bin())
            .arg("--state-dir")
            .arg(&n.state)
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .arg("--cgroup")
            .arg(&n.cgroup)
            .arg("--bpffs-dir")
            .arg(&n.bpffs)
            .args(["--log-format", "json", "--mode", self.mode])
            .args(match &self.kubeconfigs {
                Some(k) => vec!["--kubernetes".into(), "--kubeconfig".into(), k[i].clone().into_os_string()],
                None => vec!["--config-dir".into(), n.config_dir.clone().into_os_string()],
            })
            .env("NODE_NAME", &n.name)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.nodes[i].agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.log_lines(i).iter().skip(seen).any(|l| l["fields"]["message"] == "agent ready") {
                return Ok(());
            }
            if let Some(status) = self.nodes[i].agent.as_mut().unwrap().try_wait()? {
                bail!(
                    "agent of {} exited with {status}: {}",
                    self.nodes[i].name,
                    fs::read_to_string(&self.nodes[i].log)?
                );
            }
            if Instant::now() > deadline {
                bail!("agent of {} not ready after 20 s", self.nodes[i].name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The cgroup an agent runs in with [`Cluster::agent_in_pod_cgroup`].
    pub fn agent_pod_cgroup(&self, node: usize) -> PathBuf {
        self.nodes[node].cgroup.join("agent-pod")
    }

    pub fn log_lines(&self, node: usize) -> Vec<Value> {
        fs::read_to_string(&self.nodes[node].log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Log lines of a node whose message starts with `prefix`.
    pub fn logged(&self, node: usize, prefix: &str) -> Vec<Value> {
        self.log_lines(node)
            .into_iter()
            .filter(|l| l["fields"]["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
            .collect()
    }

    /// A command run in a pod: its network namespace and its cgroup.
    pub fn in_pod(&self, pod: &str, program: &str, args: &[&str]) -> Command {
        let p = self.pod(pod);
        let procs = p.cgroup.join("cgroup.procs");
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", ns_path(&p.ns).display())).arg(program).args(args);
        // SAFETY: moves the child into the pod's cgroup before exec.
        unsafe {
            c.pre_exec(move || fs::write(&procs, "0"));
        }
        c
    }

    /// A command run in a network namespace outside the mesh (a node's).
    pub fn in_node(&self, node: usize, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", ns_path(&self.nodes[node].ns).display())).arg(program).args(args);
        c
    }

    pub fn output(&self, mut c: Command) -> Output {
        c.output().expect("running a command")
    }

    /// nginx in a pod on its address and `port`, with a 1 KB body.
    pub fn start_nginx(&self, pod: &str, port: u16) -> Result<()> {
        let p = self.pod(pod);
        let dir = self.dir.join(format!("nginx-{pod}"));
        fs::create_dir_all(&dir)?;
        let conf = dir.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  server {{\n    listen {ip}:{port} backlog=4096;\n{listen6}    location / {{ default_type text/plain; return 200 \"{body}\"; }}\n  }}\n}}\n",
                d = dir.display(),
                ip = p.ip,
                // A dual-stack pod's app takes every IPv6 address of the pod.
                listen6 = if p.ips6.is_empty() { String::new() } else { format!("    listen [::]:{port};\n") },
                body = "x".repeat(1024),
            ),
        )?;
        self.in_pod(pod, "nginx", &["-c", conf.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        self.wait_listening(pod, port)
    }

    /// httpbin (from PyPI, under gunicorn) in a pod on its address and
    /// `port`; returns its access log, one `METHOD PATH STATUS` line per
    /// request.
    pub fn start_httpbin(&self, pod: &str, port: u16) -> Result<PathBuf> {
        let venv = crate::httpbin_venv().context("httpbin is not installed; run .ci/run or see README (Tests)")?;
        let p = self.pod(pod);
        let log = self.dir.join(format!("httpbin-{pod}.log"));
        let bind = format!("{}:{port}", p.ip);
        self.in_pod(
            pod,
            venv.join("bin/gunicorn").to_str().unwrap(),
            &[
                "-b",
                &bind,
                "-w",
                "1",
                "--threads",
                "16",
                "--access-logfile",
                log.to_str().unwrap(),
                "--access-logformat",
                "%(m)s %(U)s %(s)s",
                "httpbin:app",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting httpbin")?;
        // gunicorn imports httpbin before it listens.
        let p = self.pod(pod);
        let ok = eventually(Duration::from_secs(30), || {
            Command::new("nsenter")
                .arg(format!("--net={}", ns_path(&p.ns).display()))
                .args(["ss", "-Htln", &format!("sport = :{port}")])
                .output()
                .is_ok_and(|o| !o.stdout.is_empty())
        });
        if !ok {
            bail!("httpbin does not listen on {}:{port} in pod {pod}", p.ip);
        }
        Ok(log)
    }

    /// Wait until something listens on the pod's address and `port`.
    pub fn wait_listening(&self, pod: &str, port: u16) -> Result<()> {
        let p = self.pod(pod);
        let ok = eventually(Duration::from_secs(10), || {
            Command::new("nsenter")
                .arg(format!("--net={}", ns_path(&p.ns).display()))
                .args(["ss", "-Htln", &format!("sport = :{port}")])
                .output()
                .is_ok_and(|o| !o.stdout.is_empty())
        });
        if !ok {
            bail!("nothing listens on {}:{port} in pod {pod}", p.ip);
        }
        Ok(())
    }

    /// `curl` from a pod; returns (HTTP status or 0, stderr).
    pub fn curl(&self, pod: &str, url: &str) -> (u16, String) {
        let out = self.output(self.in_pod(
            pod,
            "curl",
            &["-g", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", url],
        ));
        let code = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
        (code, String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// The node agent's Prometheus text.
    pub fn metrics(&self, node: usize) -> String {
        let out = self.output(self.in_node(
            node,
            "curl",
            &["-s", "--max-time", "5", "http://127.0.0.1:15020/stats/prometheus"],
        ));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Where node `i`'s agent reads its projected service-account token.
    pub fn token_path(&self, i: usize) -> PathBuf {
        self.nodes[i].state.parent().unwrap().join("istio-token")
    }

    /// The agents ask the CA service at `address` for every certificate,
    /// as in a cluster: each runs as a pod of the DaemonSet
    /// (`agent-<node>`, scheduled on its node) whose projected token, for
    /// the audience `istio-ca` and bound to that pod, the API server
    /// `api` vouches for.
    pub fn use_ca_service(&mut self, api: &crate::kubeapi::KubeApi, address: &str) -> Result<()> {
        for i in 0..self.nodes.len() {
            let (pod, uid) = (format!("agent-{}", self.nodes[i].name), format!("{}-agent-{i}", self.name));
            api.apply(serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": AGENT_NAMESPACE, "uid": uid, "labels": {"app": "redirector"}},
                "spec": {"nodeName": self.nodes[i].name, "serviceAccountName": AGENT_SERVICE_ACCOUNT,
                         "containers": [{"name": "agent", "image": "redirector"}]},
                "status": {"phase": "Running"}}))?;
            let token = api.issue_token(
                AGENT_NAMESPACE,
                AGENT_SERVICE_ACCOUNT,
                Some((&pod, &uid)),
                &["istio-ca"],
                Duration::from_hours(1),
            );
            fs::create_dir_all(self.token_path(i).parent().unwrap())?;
            fs::write(self.token_path(i), token)?;
        }
        self.ca_address = Some(address.into());
        Ok(())
    }

    /// Start `redirector ca serve` with the cluster's CA in node `node`'s
    /// network namespace on its address (port 15012, monitoring 15014),
    /// reading the API server through `kubeconfig`, with `args` added;
    /// waits until it listens. Returns its index in `ca_servers`.
    pub fn start_ca_server(&mut self, node: usize, kubeconfig: &Path, args: &[&str]) -> Result<usize> {
        let n = &self.nodes[node];
        let k = self.ca_servers.len();
        let log = self.dir.join(format!("ca-{k}.log"));
        let (listen, monitoring) = (format!("{}:15012", n.ip), format!("{}:15014", n.ip));
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns_path(&n.ns).display()))
            .arg(redirector_bin())
            .args(["--kubeconfig"])
            .arg(kubeconfig)
            .arg("ca")
            .arg("serve")
            .arg(&self.ca_dir)
            .args(["--listen", &listen, "--monitoring", &monitoring, "--dns-name", &n.ip])
            .args(["--dns-name", &format!("redirector-ca.{AGENT_NAMESPACE}.svc")])
            .args(["--node-agent", &format!("{AGENT_NAMESPACE}/{AGENT_SERVICE_ACCOUNT}")])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()?;
        self.ca_servers.push(CaServer { node, child: Some(child), log, listen, monitoring });
        self.wait_ca_ready(k)?;
        Ok(k)
    }

    fn wait_ca_ready(&mut self, k: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = &mut self.ca_servers[k];
            if fs::read_to_string(&s.log).unwrap_or_default().contains("mesh CA serving") {
                return Ok(());
            }
            if let Some(status) = s.child.as_mut().unwrap().try_wait()? {
                bail!("the CA service exited with {status}: {}", fs::read_to_string(&s.log).unwrap_or_default());
            }
            if Instant::now() > deadline {
                bail!("the CA service is not serving after 15 s: {}", fs::read_to_string(&s.log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop a CA service (SIGKILL: as its node going away).
    pub fn stop_ca_server(&mut self, k: usize) {
        if let Some(mut c) = self.ca_servers[k].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A CA service's `/metrics`, read inside its node.
    pub fn ca_metrics(&self, k: usize) -> String {
        let s = &self.ca_servers[k];
        let url = format!("http://{}/metrics", s.monitoring);
        let out = self.output(self.in_node(s.node, "curl", &["-s", "--max-time", "3", &url]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A counter of a CA service's `/metrics` (0 if absent).
    pub fn ca_counter(&self, k: usize, series: &str) -> u64 {
        self.ca_metrics(k).lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0)
    }

    /// A line echo server in pod `server` on `port` and one connection to
    /// it from pod `client`, kept open (python3: everywhere the tests run).
    pub fn long_lived_connection(&self, client: &str, server: &str, port: u16) -> Result<LongLived> {
        let ip = &self.pod(server).ip;
        let echo = format!(
            "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('{ip}', {port})); s.listen(8)\nwhile True:\n  c,_=s.accept(); f=c.makefile('rwb', 0)\n  for line in f: f.write(line)\n"
        );
        let mut server_process = self.in_pod(server, "python3", &["-c", &echo]).spawn()?;
        if let Err(e) = self.wait_listening(server, port) {
            let _ = server_process.kill();
            let _ = server_process.wait();
            return Err(e);
        }
        let lines = format!(
            "import socket,sys\ns=socket.create_connection(('{ip}', {port})); f=s.makefile('rwb', 0)\nfor line in sys.stdin.buffer:\n  f.write(line); sys.stdout.buffer.write(f.readline()); sys.stdout.flush()\n"
        );
        let mut client_process = match self
            .in_pod(client, "python3", &["-u", "-c", &lines])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
        {
            Ok(p) => p,
            Err(e) => {
                let _ = server_process.kill();
                let _ = server_process.wait();
                return Err(e.into());
            }
        };
        let to = client_process.stdin.take().context("the client's stdin")?;
        let from = std::io::BufReader::new(client_process.stdout.take().context("the client's stdout")?);
        Ok(LongLived { server: server_process, client: client_process, to, from, sent: 0 })
    }

    /// Start a second agent on node `i` with the same settings while one
    /// runs: it takes over. Waits until it says it serves; returns the
    /// agent it took over from (draining, or gone).
    pub fn take_over(&mut self, i: usize) -> Result<Child> {
        let before = self.logged(i, "takeover complete").len();
        let old = self.nodes[i].agent.take().context("no agent runs")?;
        self.start_agent(i)?;
        if !eventually(Duration::from_secs(20), || self.logged(i, "takeover complete").len() > before) {
            bail!(
                "the takeover on {} did not complete: {}",
                self.nodes[i].name,
                fs::read_to_string(&self.nodes[i].log)?
            );
        }
        Ok(old)
    }

    /// Kill a node's agent as a crash would: nothing is cleaned up.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].agent.take() {
            // SAFETY: plain signal send.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop both agents and remove whatever they left (pins, rules), so
    /// the cluster is back to plain routing (or ready for another start).
    pub fn stop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop_agent(i);
            let n = &self.nodes[i];
            if n.state.join("agent.json").exists() {
                let _ = Command::new("nsenter")
                    .arg(format!("--net={}", ns_path(&n.ns).display()))
                    .arg(redirector_bin())
                    .arg("--state-dir")
                    .arg(&n.state)
                    .arg("uninstall")
                    .output();
            }
            redirector::capture::ebpf::remove_pins(&n.bpffs);
        }
    }

    /// The process id of a node's agent, while it runs.
    pub fn agent_pid(&self, node: usize) -> Option<u32> {
        self.nodes[node].agent.as_ref().map(std::process::Child::id)
    }

    /// An iperf3 server in a pod on its address and `port`.
    pub fn start_iperf3(&self, pod: &str, port: u16) -> Result<()> {
        let ip = self.pod(pod).ip.clone();
        self.in_pod(pod, "iperf3", &["-s", "-B", &ip, "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3")?;
        self.wait_listening(pod, port)
    }

    /// Let a pod open (and close) connections at a high rate: reuse
    /// TIME_WAIT ports and widen the ephemeral range, above the proxy's
    /// ports (150xx) so no client's TIME_WAIT socket holds one of them when
    /// an agent opens its listeners in the pod again.
    pub fn tune_for_many_connections(&self, pod: &str) -> Result<()> {
        for kv in ["net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=15100 65000"] {
            let p = self.pod(pod);
            run(Command::new("nsenter")
                .arg(format!("--net={}", ns_path(&p.ns).display()))
                .args(["sysctl", "-qw", kv]))?;
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        for k in 0..self.ca_servers.len() {
            self.stop_ca_server(k);
        }
        remove_cgroup_tree(&self.cgroup);
        for p in &self.pods {
            let _ = ip(&["netns", "del", &p.ns]);
        }
        for n in &self.nodes {
            let _ = ip(&["netns", "del", &n.ns]);
        }
        if std::env::var_os("REDIRECTOR_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("logs kept in {}", self.dir.display());
        }
    }
}

/// A long-lived TCP connection from a pod to a line echo server in
/// another (see [`Cluster::long_lived_connection`]): each
/// [`LongLived::exchange`] sends a line over it and reads it back. Both
/// processes end on drop.
pub struct LongLived {
    server: Child,
    client: Child,
    to: std::process::ChildStdin,
    from: std::io::BufReader<std::process::ChildStdout>,
    sent: u64,
}

impl LongLived {
    /// One line there and back over the same connection; an error says
    /// what came back instead (nothing: the connection broke).
    pub fn exchange(&mut self) -> Result<()> {
        use std::io::{BufRead, Write};
        self.sent += 1;
        let line = format!("ping {}", self.sent);
        writeln!(self.to, "{line}").context("the client of the long-lived connection is gone")?;
        let mut back = String::new();
        self.from.read_line(&mut back)?;
        if back.trim() != line {
            bail!(
                "the long-lived connection broke after {} lines: sent `{line}`, got `{}`",
                self.sent - 1,
                back.trim()
            );
        }
        Ok(())
    }
}

impl Drop for LongLived {
    fn drop(&mut self) {
        for p in [&mut self.client, &mut self.server] {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// Whether `path` (a pcap) holds `needle` anywhere.
pub fn pcap_contains(path: &Path, needle: &[u8]) -> bool {
    let data = fs::read(path).unwrap_or_default();
    data.windows(needle.len()).any(|w| w == needle)
}
