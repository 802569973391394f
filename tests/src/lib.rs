//! Helpers for the privileged end-to-end tests.
//!
//! Each test builds its own [`Topology`]: a client network namespace (where
//! the agent and the workloads run) joined by a veth pair to a server
//! namespace, with addresses in 198.18.0.0/15 and 2001:2::/48 (the
//! benchmarking ranges), a test-only cgroup subtree, its own bpffs pin
//! directory and state directory. Dropping it removes all of that, also when
//! the test fails; [`clean_leftovers`] removes what a crashed run left.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod cluster;
pub mod hbone_client;
pub mod kubeapi;
use serde_json::Value;

pub const CLIENT_V4: &str = "198.18.0.1";
pub const SERVER_V4: &str = "198.18.0.2";
/// A second server address, for CIDR exclusion.
pub const SERVER_V4_B: &str = "198.18.0.3";
pub const CLIENT_V6: &str = "2001:2::1";
pub const SERVER_V6: &str = "2001:2::2";

pub(crate) const PREFIX: &str = "rdt";

/// Whether this process may run the privileged tests. Outside CI a non-root
/// run skips them with a printed reason; in CI it is a failure.
/// Addresses the tests give mesh services (clusterIPs).
pub const SERVICE_RANGE: &str = "198.19.0.0/16";

/// The Python environment with httpbin and gunicorn from PyPI (made by
/// .ci/run): `REDIRECTOR_HTTPBIN_VENV`, default /opt/redirector-venv.
pub fn httpbin_venv() -> Option<PathBuf> {
    let v = std::env::var_os("REDIRECTOR_HTTPBIN_VENV")
        .map_or_else(|| PathBuf::from("/opt/redirector-venv"), PathBuf::from);
    v.join("bin/gunicorn").exists().then_some(v)
}

/// Whether httpbin can run; in CI its absence is a failure.
pub fn httpbin_available() -> bool {
    if httpbin_venv().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "httpbin and gunicorn are missing: .ci/run installs them into /opt/redirector-venv"
    );
    eprintln!("SKIPPED: httpbin is not installed: python3 -m venv /opt/redirector-venv && /opt/redirector-venv/bin/pip install httpbin==0.10.4 gunicorn==27.0.1");
    false
}

/// Lines of a file (0 if it does not exist).
pub fn line_count(path: &Path) -> usize {
    fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// Lines of a server's access log once it has stopped growing: gunicorn
/// writes a request's line after it has sent the response, so a client can
/// see the response before the line is there. Waits until the count has not
/// changed for 200 ms (at most 5 s).
pub fn settled_line_count(path: &Path) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = line_count(path);
    let mut since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(25));
        let now = line_count(path);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_millis(200) {
            break;
        }
    }
    last
}

pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the privileged tests need root (cgroups, network namespaces, eBPF); CI must run them as root"
    );
    eprintln!("SKIPPED: this test needs root (cgroups, network namespaces, eBPF); run `sudo -E cargo xtask test`");
    false
}

/// The `redirector` binary under test.
pub fn redirector_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REDIRECTOR_BIN") {
        return p.into();
    }
    // target/<profile>/deps/<test> -> target/<profile>/redirector
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("redirector")).expect("target directory");
    assert!(
        bin.exists(),
        "{} does not exist: build it first with `cargo build -p redirector-user` (cargo xtask test does)",
        bin.display()
    );
    bin
}

pub fn cgroup2_mount() -> PathBuf {
    redirector::sys::cgroup::cgroup2_mount().expect("cgroup v2 mount")
}

pub(crate) fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

pub(crate) fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

static CLEAN: Once = Once::new();

/// Clean a crashed run's leftovers, once per test process.
pub(crate) fn clean_once() {
    CLEAN.call_once(clean_leftovers);
}
pub(crate) static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Remove network namespaces, cgroups and pins left by a test run whose
/// process is gone.
pub fn clean_leftovers() {
    let alive = |name: &str| -> bool {
        // Names are rdt<pid>x<n>.
        name.strip_prefix(PREFIX)
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(redirector::state::pid_alive)
    };
    if let Ok(rd) = fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(PREFIX) && !alive(&n) {
                let _ = ip(&["netns", "del", &n]);
            }
        }
    }
    if let Ok(rd) = fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(PREFIX) && !alive(&n) {
                redirector::capture::ebpf::remove_pins(&e.path());
            }
        }
    }
    if let Ok(rd) = fs::read_dir(cgroup2_mount()) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(PREFIX) && !alive(&n) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
}

/// Kill what is left in a cgroup tree and remove it, deepest first.
pub(crate) fn remove_cgroup_tree(root: &Path) {
    let mut dirs = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        dirs.push(d);
    }
    for d in dirs.iter().rev() {
        if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: plain signal send.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while fs::remove_dir(d).is_err() && d.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A test's own hosts, cgroups and agent.
pub struct Topology {
    pub name: String,
    pub client_ns: String,
    pub server_ns: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    /// Capture mode the agent runs in: "ebpf", "ebpf-keyed" (eBPF with
    /// original destinations in keyed maps), "iptables" or "auto".
    pub mode: &'static str,
    /// Extra environment of the agent process.
    pub agent_env: Vec<(String, String)>,
    /// A directory of Istio / Kubernetes YAML the agent routes by.
    pub config_dir: Option<PathBuf>,
    agent: Option<Child>,
    servers: Vec<Server>,
}

impl Topology {
    /// Build the namespaces, veth pair, addresses and cgroup subtree.
    pub fn new() -> Result<Topology> {
        CLEAN.call_once(clean_leftovers);
        let name = format!("{PREFIX}{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst));
        let tmp = std::env::temp_dir().join(&name);
        fs::create_dir_all(&tmp)?;
        let t = Topology {
            client_ns: format!("{name}c"),
            server_ns: format!("{name}s"),
            cgroup: cgroup2_mount().join(&name),
            bpffs: PathBuf::from("/sys/fs/bpf").join(&name),
            state: tmp.join("state"),
            log: tmp.join("agent.log"),
            name,
            mode: "ebpf",
            agent_env: Vec::new(),
            config_dir: None,
            agent: None,
            servers: Vec::new(),
        };
        ip(&["netns", "add", &t.client_ns])?;
        ip(&["netns", "add", &t.server_ns])?;
        ip(&[
            "link",
            "add",
            "veth-c",
            "netns",
            &t.client_ns,
            "type",
            "veth",
            "peer",
            "name",
            "veth-s",
            "netns",
            &t.server_ns,
        ])?;
        for (ns, dev, v4, v6) in
            [(&t.client_ns, "veth-c", CLIENT_V4, CLIENT_V6), (&t.server_ns, "veth-s", SERVER_V4, SERVER_V6)]
        {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ip(&["-n", ns, "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
        }
        ip(&["-n", &t.server_ns, "addr", "add", &format!("{SERVER_V4_B}/24"), "dev", "veth-s"])?;
        fs::create_dir_all(&t.cgroup)?;
        Ok(t)
    }

    /// A topology whose agent runs in `mode` (see [`Topology::mode`]).
    pub fn with_mode(mode: &'static str) -> Result<Topology> {
        let mut t = Topology::new()?;
        t.mode = mode;
        Ok(t)
    }

    /// Our nat rules in the client namespace, from iptables-save and
    /// ip6tables-save.
    pub fn nat_rules(&self) -> Vec<String> {
        let mut rules = Vec::new();
        for tool in ["iptables-save", "ip6tables-save"] {
            let out = Command::new("nsenter")
                .arg(format!("--net={}", Self::ns_path(&self.client_ns).display()))
                .args([tool, "-t", "nat"])
                .output()
                .expect("iptables-save");
            rules.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.contains("REDIRECTOR"))
                    .map(|l| format!("{tool}: {l}")),
            );
        }
        rules
    }

    pub fn ns_path(ns: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(ns)
    }

    /// A command that runs `redirector ARGS` in the client namespace.
    pub fn redirector(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", Self::ns_path(&self.client_ns).display()))
            .arg(redirector_bin())
            .arg("--state-dir")
            .arg(&self.state);
        c
    }

    /// Write the agent settings for this topology (pins and cgroup are set
    /// on the command line).
    pub fn write_config(&self, extra_capture_yaml: &str) -> PathBuf {
        self.write_config_full(extra_capture_yaml, "")
    }

    /// Agent settings with extra lines in the capture and proxy sections.
    pub fn write_config_full(&self, extra_capture_yaml: &str, extra_proxy_yaml: &str) -> PathBuf {
        let path = self.state.parent().unwrap().join("agent.yaml");
        let mut proxy = String::from(extra_proxy_yaml);
        for (key, default) in [("drainTimeout", "  drainTimeout: 1s\n"), ("connectTimeout", "  connectTimeout: 3s\n")] {
            if !proxy.contains(key) {
                proxy.push_str(default);
            }
        }
        let text = format!("capture:\n  cgroupRoot: \"\"\n{extra_capture_yaml}proxy:\n{proxy}");
        fs::write(&path, text).unwrap();
        path
    }

    /// Start the agent and wait until it is ready.
    pub fn start_agent(&mut self, extra_capture_yaml: &str) -> Result<()> {
        let config = self.write_config(extra_capture_yaml);
        self.start_agent_with(config)
    }

    /// Start the agent with extra lines in the proxy section of its settings.
    pub fn start_agent_with_proxy(&mut self, extra_proxy_yaml: &str) -> Result<()> {
        let config = self.write_config_full("", extra_proxy_yaml);
        self.start_agent_with(config)
    }

    fn start_agent_with(&mut self, config: PathBuf) -> Result<()> {
        let ready = |t: &Topology| t.log_lines().iter().filter(|l| l["fields"]["message"] == "agent ready").count();
        let ready_before = ready(self);
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = self
            .redirector()
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--bpffs-dir")
            .arg(&self.bpffs)
            .arg("--log-format")
            .arg("json")
            .args(match self.mode {
                // eBPF without per-socket storage (the keyed-map tier).
                "ebpf-keyed" => vec!["--mode", "ebpf", "--storage", "map"],
                m => vec!["--mode", m],
            })
            .args(self.config_dir.iter().flat_map(|d| [PathBuf::from("--config-dir"), d.clone()]))
            .envs(self.agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if ready(self) > ready_before {
                return Ok(());
            }
            if let Some(status) = self.agent.as_mut().unwrap().try_wait()? {
                bail!("agent exited with {status} before ready: {}", fs::read_to_string(&self.log)?);
            }
            if Instant::now() > deadline {
                bail!("agent not ready after 20 s: {}", fs::read_to_string(&self.log)?);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start a second agent with the same settings while one runs: it
    /// takes over. Waits until it says it serves; returns the agent it
    /// took over from (still draining, or gone).
    pub fn take_over(&mut self) -> Result<Child> {
        let complete = |t: &Topology| {
            t.log_lines()
                .iter()
                .filter(|l| l["fields"]["message"].as_str().is_some_and(|m| m.starts_with("takeover complete")))
                .count()
        };
        let before = complete(self);
        let old = self.agent.take().context("no agent runs")?;
        let config = self.state.parent().unwrap().join("agent.yaml");
        self.start_agent_with(config)?;
        if !eventually(Duration::from_secs(20), || complete(self) > before) {
            bail!("the takeover did not complete: {}", fs::read_to_string(&self.log)?);
        }
        Ok(old)
    }

    /// The running agent's process, which this topology no longer stops
    /// (the caller does).
    pub fn detach_agent(&mut self) -> Option<Child> {
        self.agent.take()
    }

    /// Kill the agent without letting it clean up (a crash).
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop the agent with SIGTERM and wait for it.
    pub fn stop_agent(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.agent.take()?;
        // SAFETY: plain signal send.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().ok()
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(std::process::Child::id)
    }

    /// The agent's JSON log lines so far.
    pub fn log_lines(&self) -> Vec<Value> {
        fs::read_to_string(&self.log).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Upstream local addresses of the connections the proxy closed, from
    /// its log.
    pub fn proxied_upstream_locals(&self) -> BTreeSet<String> {
        self.log_lines()
            .iter()
            .filter(|l| l["fields"]["message"] == "connection closed")
            .filter_map(|l| l["fields"]["upstream_local"].as_str().map(str::to_string))
            .map(|s| s.trim_start_matches("Some(").trim_end_matches(')').to_string())
            .collect()
    }

    /// `redirector status --json`.
    pub fn status(&self) -> Value {
        let out = run(self.redirector().args(["status", "--json"])).expect("status");
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Counters of the cgroup at `path`, by decision name.
    pub fn counters_of(&self, path: &Path) -> Value {
        let s = self.status();
        let p = path.display().to_string();
        s["cgroups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["path"].as_str() == Some(p.as_str()))
            .map_or(Value::Null, |c| c["counters"].clone())
    }

    /// Run a shell script as a workload (`redirector exec`) in the client
    /// namespace.
    pub fn exec_workload(&self, workload: &str, script: &str) -> Output {
        self.redirector()
            .args(["exec", "--workload", workload, "--", "bash", "-c", script])
            .output()
            .expect("redirector exec")
    }

    /// Run a shell script in the client namespace in the cgroup `cg` (which
    /// is created; it is not enrolled).
    pub fn run_in_cgroup(&self, cg: &Path, script: &str) -> Output {
        fs::create_dir_all(cg).unwrap();
        let procs = cg.join("cgroup.procs");
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", Self::ns_path(&self.client_ns).display())).args(["bash", "-c", script]);
        // SAFETY: test helper; writes this child's pid into the cgroup.
        unsafe {
            c.pre_exec(move || fs::write(&procs, "0"));
        }
        c.output().expect("run in cgroup")
    }

    /// As [`Topology::run_in_cgroup`], started in the background (its
    /// output piped).
    pub fn spawn_in_cgroup(&self, cg: &Path, script: &str) -> Child {
        fs::create_dir_all(cg).unwrap();
        let procs = cg.join("cgroup.procs");
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", Self::ns_path(&self.client_ns).display()))
            .args(["bash", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: test helper; writes this child's pid into the cgroup.
        unsafe {
            c.pre_exec(move || fs::write(&procs, "0"));
        }
        c.spawn().expect("spawn in cgroup")
    }

    /// Start a server in the server namespace on `addr`.
    pub fn server(&mut self, addr: &str) -> Arc<Mutex<Vec<SocketAddr>>> {
        let s = Server::start(&Self::ns_path(&self.server_ns), addr.parse().unwrap());
        let peers = Arc::clone(&s.peers);
        self.servers.push(s);
        peers
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Uninstall through the product first (stops the agent, unpins).
        if self.state.join("agent.json").exists() {
            let _ = self.redirector().arg("uninstall").output();
        }
        self.kill_agent();
        redirector::capture::ebpf::remove_pins(&self.bpffs);
        remove_cgroup_tree(&self.cgroup);
        let _ = ip(&["netns", "del", &self.client_ns]);
        let _ = ip(&["netns", "del", &self.server_ns]);
        if let Some(p) = self.state.parent() {
            if std::env::var_os("REDIRECTOR_KEEP_LOGS").is_none() {
                let _ = fs::remove_dir_all(p);
            }
        }
    }
}

impl Topology {
    /// Start a process in the server namespace, inside a cgroup of this
    /// topology (so dropping the topology stops it).
    pub fn spawn_in_server(&self, name: &str, program: &str, args: &[&str]) -> Result<()> {
        let cg = self.cgroup.join(name);
        fs::create_dir_all(&cg)?;
        let procs = cg.join("cgroup.procs");
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", Self::ns_path(&self.server_ns).display()))
            .arg(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: moves the child into the cgroup before exec.
        unsafe {
            c.pre_exec(move || fs::write(&procs, "0"));
        }
        c.spawn().with_context(|| format!("starting {program}"))?;
        Ok(())
    }

    /// nginx in the server namespace on `SERVER_V4:port`, serving a 1 KB
    /// body, access log off, keepalive without a request limit.
    pub fn start_nginx(&self, port: u16) -> Result<()> {
        let dir = self.state.parent().unwrap().join("nginx");
        fs::create_dir_all(&dir)?;
        let body = "x".repeat(1024);
        let conf = dir.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  server {{\n    listen {SERVER_V4}:{port} backlog=4096;\n    location / {{ default_type text/plain; return 200 \"{body}\"; }}\n  }}\n}}\n",
                d = dir.display()
            ),
        )?;
        self.spawn_in_server("nginx", "nginx", &["-c", conf.to_str().unwrap()])?;
        self.wait_for_server(port)
    }

    /// iperf3 server in the server namespace on `SERVER_V4:port`.
    pub fn start_iperf3(&self, port: u16) -> Result<()> {
        let p = port.to_string();
        self.spawn_in_server("iperf3", "iperf3", &["-s", "-B", SERVER_V4, "-p", &p])?;
        self.wait_for_server(port)
    }

    fn wait_for_server(&self, port: u16) -> Result<()> {
        self.wait_for_server_at(SERVER_V4, port, Duration::from_secs(10))
    }

    fn wait_for_server_at(&self, ip: &str, port: u16, wait: Duration) -> Result<()> {
        let ok = eventually(wait, || {
            Command::new("nsenter")
                .arg(format!("--net={}", Self::ns_path(&self.server_ns).display()))
                .args(["bash", "-c", &format!("exec 3<>/dev/tcp/{ip}/{port}")])
                .status()
                .is_ok_and(|s| s.success())
        });
        if !ok {
            bail!("nothing listens on {ip}:{port} in the server namespace");
        }
        Ok(())
    }

    /// httpbin (from PyPI) under gunicorn in the server namespace on
    /// `ip:port`; returns its access log, one line per request.
    pub fn start_httpbin(&self, name: &str, ip: &str, port: u16) -> Result<PathBuf> {
        let venv = httpbin_venv().context("httpbin is not installed; run .ci/run or see README (Tests)")?;
        let log = self.state.parent().unwrap().join(format!("{name}.access.log"));
        let bind = format!("{ip}:{port}");
        let gunicorn = venv.join("bin/gunicorn");
        self.spawn_in_server(
            name,
            gunicorn.to_str().unwrap(),
            &[
                "-b",
                &bind,
                "-w",
                "2",
                "--threads",
                "8",
                "--access-logfile",
                log.to_str().unwrap(),
                "--access-logformat",
                "%(m)s %(U)s %(s)s",
                "httpbin:app",
            ],
        )?;
        self.wait_for_server_at(ip, port, Duration::from_secs(30))?;
        Ok(log)
    }

    /// A default route out of the client namespace (over the veth pair), as
    /// every pod has: iptables capture rewrites packets after the route
    /// lookup, so a destination needs a route to be captured.
    pub fn route_default(&self) -> Result<()> {
        ip(&["-n", &self.client_ns, "route", "add", "default", "dev", "veth-c"])
    }

    /// Route the service address range (198.19.0.0/16) out of the client
    /// namespace, as a cluster network does for its service CIDR.
    pub fn route_service_range(&self) -> Result<()> {
        ip(&["-n", &self.client_ns, "route", "add", SERVICE_RANGE, "dev", "veth-c"])
    }
}

/// A TCP server inside a network namespace. It answers each connection
/// with the peer address it sees: for an HTTP request, as the body of a 200
/// response; otherwise as a first line `peer=ADDR`, then it echoes (and
/// closes first when a read ends with `close-now`).
pub struct Server {
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    pub addr: SocketAddr,
}

impl Server {
    pub fn start(netns: &Path, addr: SocketAddr) -> Server {
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let p = Arc::clone(&peers);
        let ns = netns.to_path_buf();
        std::thread::spawn(move || {
            // setns affects only this thread: the listener lives in the
            // server namespace, the rest of the test process does not move.
            let f = fs::File::open(&ns).expect("open netns");
            use std::os::fd::AsRawFd;
            // SAFETY: valid namespace fd.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let l = TcpListener::bind(addr).expect("bind test server");
            tx.send(()).unwrap();
            for stream in l.incoming().flatten() {
                let p = Arc::clone(&p);
                std::thread::spawn(move || serve(stream, p));
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("server started");
        Server { peers, addr }
    }
}

fn serve(stream: TcpStream, peers: Arc<Mutex<Vec<SocketAddr>>>) {
    let Ok(peer) = stream.peer_addr() else { return };
    peers.lock().unwrap().push(peer);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    let mut first = String::new();
    if reader.read_line(&mut first).unwrap_or(0) == 0 {
        return;
    }
    if first.starts_with("GET ") {
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 && line.trim() != "" {
            line.clear();
        }
        let body = format!("peer={peer}\n");
        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        return;
    }
    let _ = writeln!(w, "peer={peer}");
    let mut buf = [0u8; 16384];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                // A client asks the server to close first.
                if buf[..n].ends_with(b"close-now\n") {
                    return;
                }
                if w.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// A bash snippet: connect with bash's own /dev/tcp (a plain connect() from
/// an unmodified program), send a line, print the server's first line.
pub fn bash_connect(host: &str, port: u16) -> String {
    format!("exec 3<>/dev/tcp/{host}/{port} && echo hello >&3 && read -r line <&3 && echo \"$line\" && exec 3<&-")
}

/// A python3 client (an unmodified program) that sends `mib` MiB of random
/// bytes to the echo server while reading the echo, then shuts down its
/// write side and reads to EOF; it prints `ok <bytes>` when what came back is
/// what it sent. `varied_writes` uses writes of many sizes instead of one.
pub fn echo_transfer_script(mib: usize, varied_writes: bool) -> String {
    let send = if varied_writes {
        "    i, n = 0, 1\n    while i < len(data):\n        s.sendall(data[i:i + n]); i += n; n = (n * 7 + 13) % 200000 + 1\n"
    } else {
        "    s.sendall(data)\n"
    };
    format!(
        r#"
import hashlib, os, socket, threading
data = os.urandom({mib} * 1024 * 1024)
s = socket.create_connection(("{SERVER_V4}", 8080))
s.sendall(b"hello\n")
f = s.makefile("rb")
peer = f.readline()
def send():
{send}    s.shutdown(socket.SHUT_WR)
th = threading.Thread(target=send); th.start()
got = bytearray()
while True:
    b = f.read1(65536)
    if not b:
        break
    got += b
th.join()
assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), (len(got), len(data))
print("ok", len(got), peer.decode().strip())
"#
    )
}

/// A status counter summed over every cgroup row.
pub fn counter_sum(status: &Value, name: &str) -> u64 {
    status["cgroups"].as_array().map_or(0, |a| a.iter().filter_map(|c| c["counters"][name].as_u64()).sum())
}

impl Topology {
    /// Let the client namespace make many short connections from one
    /// address, as a real client host would: reuse TIME_WAIT ports and widen
    /// the ephemeral range (both per network namespace).
    pub fn tune_client_for_many_connections(&self) -> Result<()> {
        for (k, v) in [("net.ipv4.tcp_tw_reuse", "1"), ("net.ipv4.ip_local_port_range", "1024 65000")] {
            let st = Command::new("nsenter")
                .arg(format!("--net={}", Self::ns_path(&self.client_ns).display()))
                .args(["sysctl", "-qw", &format!("{k}={v}")])
                .status()?;
            if !st.success() {
                bail!("sysctl {k} failed in the client namespace");
            }
        }
        Ok(())
    }
}

/// The `peer=ADDR` a client printed, as an address.
pub fn printed_peer(out: &Output) -> Option<SocketAddr> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("peer=").map(str::to_string))
        .and_then(|s| s.parse().ok())
}

/// What `bpftool` says is attached to a cgroup (JSON), or None if bpftool is
/// missing.
pub fn attached_programs(cgroup: &Path) -> Vec<Value> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool is needed by the tests (apt-get install bpftool)");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    v.as_array().cloned().unwrap_or_default()
}

/// Wait until `f` holds or the timeout passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The DER of the first PEM block of `pem`.
pub fn pem_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).expect("PEM")
}

/// A python3 client (run it in an enrolled cgroup or a pod): a new connection to
/// `host:port` every 10 ms for `secs` seconds (each sends a line and reads
/// the server's first), and beside them one connection opened first that
/// exchanges a line every 100 ms for the whole run. Prints
/// `new_ok= new_failed= long_ok= long_failed= errors=`.
pub fn steady_load_script(host: &str, port: u16, secs: f64) -> String {
    format!(
        r#"python3 - <<'PY'
import socket, time
def one(s):
    s.sendall(b"hello\n")
    return s.makefile().readline()
long = socket.create_connection(("{host}", {port}), timeout=5)
lf = long.makefile("rwb")
lf.write(b"hello\n"); lf.flush()
first = lf.readline()
long_ok = long_failed = ok = failed = 0
errors = []
end = time.time() + {secs}
next_long = 0.0
while time.time() < end:
    t0 = time.time()
    try:
        s = socket.create_connection(("{host}", {port}), timeout=5)
        line = one(s)
        s.close()
        if line.startswith("peer="):
            ok += 1
        else:
            failed += 1; errors.append("new: " + repr(line))
    except Exception as e:
        failed += 1; errors.append("new: " + str(e))
    if t0 >= next_long:
        next_long = t0 + 0.1
        try:
            lf.write(b"ping %d\n" % long_ok); lf.flush()
            if lf.readline() == b"ping %d\n" % long_ok:
                long_ok += 1
            else:
                long_failed += 1; errors.append("long: bad echo")
        except Exception as e:
            long_failed += 1; errors.append("long: " + str(e))
    time.sleep(max(0.0, 0.01 - (time.time() - t0)))
long.close()
print("new_ok=%d new_failed=%d long_ok=%d long_failed=%d errors=%r" % (ok, failed, long_ok, long_failed, errors[:5]))
PY"#
    )
}

/// The number `name=N` in a line of `name=value` words.
pub fn field(out: &str, name: &str) -> u64 {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {out:?}"))
}
