//! The benchmark kit behind `cargo xtask bench`: eBPF capture against
//! iptables capture, side by side, with the same proxy.
//!
//! It builds its own hosts (two network namespaces joined by veth, addresses
//! in 198.18.0.0/15), starts nginx (1 KB body, access log off) and an iperf3
//! server in the server namespace, and runs real load tools (oha, iperf3)
//! from a cgroup in the client namespace, in four modes interleaved round by
//! round (A B C D, A B C D, ...):
//! direct (no agent), iptables + proxy, eBPF + proxy, eBPF + proxy + sockmap.
//!
//! Scenarios: Istio's standard (1,000 requests/s, 16 connections, keepalive:
//! p50/p90/p99), maximum requests/s with keepalive, a new connection per
//! request, one bulk TCP stream. For each mesh mode it also samples the
//! proxy's CPU (/proc) and resident memory, and the client namespace's SYN
//! retransmissions (TcpExt TCPSynRetrans).
//!
//! The cross-node suite builds a two-node cluster (tests/src/cluster.rs:
//! two node namespaces joined by a veth link, pods in their own namespaces
//! and cgroups behind them), puts nginx and iperf3 in a pod of node-b and
//! the load tools in a pod of node-a, and runs the same scenarios direct
//! (routed, no agents) and through the mesh (each node's agent captures its
//! pods and carries the traffic over HBONE: HTTP/2 CONNECT in mutual TLS),
//! with eBPF and with iptables capture. CPU and resident memory are
//! sampled for each node's agent; the report compares them with the
//! targets set from Istio ambient's ztunnel in the same kind of run.
//!
//! Output: a markdown table, a JSON file and SVG charts under the results
//! folder (and `--json PATH`), every figure also as a ratio to direct.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use redirector_tests::cluster::{ns_path, Cluster};
use redirector_tests::{Topology, SERVER_V4};
use serde::{Deserialize, Serialize};

const NGINX_PORT: u16 = 8088;
const IPERF_PORT: u16 = 5201;
const MODES: [&str; 5] = ["direct", "iptables", "ebpf", "ebpf+sockmap", "ebpf+l7"];
/// Modes of the cross-node suite.
const XNODE_MODES: [&str; 4] = ["direct", "hbone", "hbone+l7", "hbone-iptables"];

/// The Service `hbone+l7` dials: nginx's port declared `http` (routed per
/// request on both nodes), iperf3's declared `tcp`.
const XNODE_VIP: &str = "198.18.3.30";
const ALL_MODES: [&str; 8] =
    ["direct", "iptables", "ebpf", "ebpf+sockmap", "ebpf+l7", "hbone", "hbone+l7", "hbone-iptables"];
const SUITES: [&str; 2] = ["local", "cross-node"];
/// Where the load goes in the cross-node suite: nginx and iperf3 in pod b1
/// (node-b), the load tools in pod a1 (node-a).
const XNODE_CLIENT: &str = "a1";
const XNODE_SERVER: &str = "b1";
const SCENARIOS: [&str; 4] = ["standard", "max-rps", "conn-rate", "bulk"];

struct Args {
    quick: bool,
    rounds: usize,
    seconds: f64,
    json: Option<PathBuf>,
    results: PathBuf,
    /// Re-render the table and chart of an earlier JSON report.
    render: Option<PathBuf>,
    /// Subsets to measure (default: all).
    modes: Vec<&'static str>,
    scenarios: Vec<&'static str>,
    suites: Vec<&'static str>,
    /// Extra `proxy:` settings for the cross-node agents (`key: value` lines).
    proxy_settings: String,
}

/// Parse a comma-separated subset of `all`.
fn subset(flag: &str, value: &str, all: &[&'static str]) -> Result<Vec<&'static str>> {
    value
        .split(',')
        .map(|v| {
            all.iter()
                .copied()
                .find(|a| *a == v.trim())
                .with_context(|| format!("{flag}: `{v}` is not one of {}", all.join(", ")))
        })
        .collect()
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        rounds: 3,
        seconds: 10.0,
        json: None,
        results: PathBuf::from("results"),
        render: None,
        modes: ALL_MODES.to_vec(),
        scenarios: SCENARIOS.to_vec(),
        suites: SUITES.to_vec(),
        proxy_settings: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {
                a.quick = true;
                a.seconds = 2.0;
            }
            "--rounds" => a.rounds = it.next().context("--rounds N")?.parse()?,
            "--seconds" => a.seconds = it.next().context("--seconds S")?.parse()?,
            "--json" => a.json = Some(it.next().context("--json PATH")?.into()),
            "--results" => a.results = it.next().context("--results DIR")?.into(),
            "--render" => a.render = Some(it.next().context("--render JSON")?.into()),
            "--modes" => a.modes = subset("--modes", &it.next().context("--modes LIST")?, &ALL_MODES)?,
            "--suite" => a.suites = subset("--suite", &it.next().context("--suite LIST")?, &SUITES)?,
            "--scenarios" => a.scenarios = subset("--scenarios", &it.next().context("--scenarios LIST")?, &SCENARIOS)?,
            "--proxy-setting" => {
                let kv = it.next().context("--proxy-setting KEY=VALUE")?;
                let (k, v) = kv.split_once('=').context("--proxy-setting takes KEY=VALUE, e.g. concurrency=1")?;
                a.proxy_settings.push_str(&format!("  {k}: {v}\n"));
            }
            "-h" | "--help" => {
                println!("redirector-bench [--quick] [--rounds N] [--seconds S] [--json PATH] [--results DIR] [--suite local,cross-node] [--modes direct,iptables,ebpf,ebpf+sockmap,ebpf+l7,hbone,hbone+l7,hbone-iptables] [--scenarios standard,max-rps,conn-rate,bulk] [--proxy-setting KEY=VALUE (cross-node agents' proxy settings, e.g. concurrency=1)]");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`; see --help"),
        }
    }
    if a.rounds < 1 {
        bail!("--rounds must be at least 1");
    }
    Ok(a)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null || test -x /usr/sbin/{tool}")])
        .status()
        .is_ok_and(|s| s.success())
}

/// One measurement: scenario figures of one mode in one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sample {
    mode: String,
    round: usize,
    scenario: String,
    /// name -> value; absent when the scenario failed.
    values: BTreeMap<String, f64>,
    error: Option<String>,
}

type Figures = BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>;

#[derive(Serialize, Deserialize)]
struct Report {
    kernel: String,
    cpus: usize,
    rounds: usize,
    seconds_per_scenario: f64,
    quick: bool,
    /// Local suite: mode -> scenario -> figure -> median over rounds
    medians: Figures,
    /// the same as a ratio to direct (where direct has the figure)
    ratios: Figures,
    samples: Vec<Sample>,
    /// The cross-node suite (HBONE between two nodes), when it ran.
    #[serde(default)]
    cross_node: Option<Suite>,
}

#[derive(Serialize, Deserialize, Default)]
struct Suite {
    medians: Figures,
    ratios: Figures,
    samples: Vec<Sample>,
}

/// Where one suite's load runs.
struct Place<'a> {
    /// A command for `program` in the load's namespace and cgroup.
    load: Box<dyn Fn(&str) -> Command + 'a>,
    /// The address nginx and iperf3 listen on.
    server: String,
    /// The namespace the load runs in (for SYN retransmissions).
    client_ns: PathBuf,
    /// The agents serving this run (none for direct).
    pids: Vec<u32>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("\nredirector-bench: error: {e:#}");
        std::process::exit(1);
    }
}

struct Progress {
    done: usize,
    total: usize,
    started: Instant,
}

impl Progress {
    fn step(&mut self, suite: &str, round: usize, rounds: usize, mode: &str, scenario: &str) {
        self.done += 1;
        eprint!(
            "\r\x1b[2K[{}/{}] {suite} round {}/{} {mode:<14} {scenario:<10} elapsed {:>4.0}s",
            self.done,
            self.total,
            round + 1,
            rounds,
            self.started.elapsed().as_secs_f64()
        );
    }
}

fn sample(mode: &str, round: usize, scenario: &str, r: Result<BTreeMap<String, f64>>) -> Sample {
    match r {
        Ok(values) => Sample { mode: mode.into(), round, scenario: scenario.into(), values, error: None },
        Err(e) => Sample {
            mode: mode.into(),
            round,
            scenario: scenario.into(),
            values: BTreeMap::new(),
            error: Some(format!("{e:#}")),
        },
    }
}

fn run() -> Result<()> {
    let args = parse_args()?;
    if let Some(path) = &args.render {
        let report: Report = serde_json::from_slice(&std::fs::read(path)?).context("report JSON")?;
        println!("{}", markdown(&report));
        std::fs::create_dir_all(&args.results)?;
        write_charts(&report, &args.results)?;
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark needs root (namespaces, cgroups, eBPF, iptables): run `sudo -E cargo xtask bench`");
    }
    let missing: Vec<&str> =
        ["oha", "nginx", "iperf3", "iptables", "nsenter"].into_iter().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        bail!(
            "missing load tools: {}; install them with `apt-get install nginx-light iperf3 iptables && cargo install oha`",
            missing.join(", ")
        );
    }
    let local: Vec<&str> = if args.suites.contains(&"local") {
        MODES.iter().copied().filter(|m| args.modes.contains(m)).collect()
    } else {
        vec![]
    };
    let xnode: Vec<&str> = if args.suites.contains(&"cross-node") {
        XNODE_MODES.iter().copied().filter(|m| args.modes.contains(m)).collect()
    } else {
        vec![]
    };
    if local.is_empty() && xnode.is_empty() {
        bail!("nothing to measure: --modes and --suite select no mode of any suite");
    }
    let mut progress = Progress {
        done: 0,
        total: args.rounds * (local.len() + xnode.len()) * args.scenarios.len(),
        started: Instant::now(),
    };
    let samples = if local.is_empty() { vec![] } else { run_local(&args, &local, &mut progress)? };
    let cross = if xnode.is_empty() { vec![] } else { run_cross_node(&args, &xnode, &mut progress)? };
    eprintln!();

    let (medians, ratios) = summarise(&MODES, &samples);
    let cross_node = (!xnode.is_empty()).then(|| {
        let (medians, ratios) = summarise(&XNODE_MODES, &cross);
        Suite { medians, ratios, samples: cross }
    });
    let report = Report {
        kernel: redirector::sys::machine::kernel_release(),
        cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        rounds: args.rounds,
        seconds_per_scenario: args.seconds,
        quick: args.quick,
        medians,
        ratios,
        samples,
        cross_node,
    };
    let md = markdown(&report);
    println!("{md}");
    std::fs::create_dir_all(&args.results)?;
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(args.results.join("bench.json"), &json)?;
    std::fs::write(args.results.join("bench.md"), &md)?;
    write_charts(&report, &args.results)?;
    if let Some(p) = &args.json {
        std::fs::write(p, &json)?;
    }
    eprintln!(
        "results: {} (bench.md, bench.json, bench.svg{})",
        args.results.display(),
        if report.cross_node.is_some() { ", bench-cross-node.svg" } else { "" }
    );
    Ok(())
}

/// The local suite: one client namespace, one server namespace, the agent
/// in the client's.
fn run_local(args: &Args, modes: &[&str], progress: &mut Progress) -> Result<Vec<Sample>> {
    let mut t = Topology::new()?;
    t.tune_client_for_many_connections()?;
    t.start_nginx(NGINX_PORT)?;
    t.start_iperf3(IPERF_PORT)?;
    let load = t.cgroup.join("load");
    std::fs::create_dir_all(&load)?;
    let client_ns = Topology::ns_path(&t.client_ns);

    let mut samples = Vec::new();
    for round in 0..args.rounds {
        for mode in modes.iter().copied() {
            match mode {
                "direct" => {}
                "iptables" => {
                    t.mode = "iptables";
                    t.start_agent("")?;
                }
                "ebpf" => {
                    t.mode = "ebpf";
                    t.start_agent("")?;
                }
                "ebpf+sockmap" => {
                    t.mode = "ebpf";
                    t.start_agent("  accelerate: true\n")?;
                }
                _ => {
                    // L7: nginx's address is a mesh Service with an HTTP
                    // port, so every request is parsed, routed and
                    // forwarded by the proxy's HTTP path (hyper) instead of
                    // copied as bytes.
                    let dir = t.state.parent().unwrap().join("bench-mesh");
                    std::fs::create_dir_all(&dir)?;
                    std::fs::write(
                        dir.join("nginx.yaml"),
                        format!(
                            "apiVersion: v1\nkind: Service\nmetadata: {{name: nginx}}\nspec:\n  clusterIP: {SERVER_V4}\n  ports: [{{name: http, port: {NGINX_PORT}}}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: nginx}}\nsubsets:\n- addresses: [{{ip: {SERVER_V4}}}]\n  ports: [{{name: http, port: {NGINX_PORT}}}]\n"
                        ),
                    )?;
                    t.mode = "ebpf";
                    t.config_dir = Some(dir);
                    t.start_agent("")?;
                    t.config_dir = None;
                }
            }
            if mode != "direct" {
                let out = t.redirector().arg("enroll").arg(&load).output()?;
                if !out.status.success() {
                    bail!("enroll: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
            }
            let place = Place {
                load: Box::new(|program: &str| in_cgroup(&client_ns, &load, program)),
                server: SERVER_V4.into(),
                client_ns: client_ns.clone(),
                pids: if mode == "direct" { vec![] } else { t.agent_pid().into_iter().collect() },
            };
            for scenario in args.scenarios.iter().copied() {
                progress.step("local", round, args.rounds, mode, scenario);
                samples.push(sample(mode, round, scenario, measure(&place, scenario, args.seconds)));
            }
            if mode != "direct" {
                // The enrolment lives in the pinned map (eBPF) or in the rules
                // (iptables); a clean stop removes the rules, uninstall the
                // pins, so every mode starts from scratch.
                let _ = t.redirector().arg("unenroll").arg(&load).output();
                t.stop_agent();
                let _ = t.redirector().arg("uninstall").output();
            }
        }
    }
    Ok(samples)
}

/// The cross-node suite: pod a1 on node-a to pod b1 on node-b, direct
/// (routed through both nodes, no agent) and through both nodes' agents
/// (capture in each pod, HBONE between them).
fn run_cross_node(args: &Args, modes: &[&str], progress: &mut Progress) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    let mut c = Cluster::new("ebpf")?;
    c.proxy_settings.clone_from(&args.proxy_settings);
    for pod in [XNODE_CLIENT, XNODE_SERVER] {
        c.tune_for_many_connections(pod)?;
    }
    c.start_nginx(XNODE_SERVER, NGINX_PORT)?;
    c.start_iperf3(XNODE_SERVER, IPERF_PORT)?;
    let server = c.pod(XNODE_SERVER).ip.clone();
    let client_ns = ns_path(&c.pod(XNODE_CLIENT).ns);
    let client_cg = c.pod(XNODE_CLIENT).cgroup.clone();
    for round in 0..args.rounds {
        for mode in modes.iter().copied() {
            if mode != "direct" {
                c.mode = if mode == "hbone-iptables" { "iptables" } else { "ebpf" };
                c.extra_yaml = if mode == "hbone+l7" {
                    format!(
                        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {XNODE_VIP}\n  ports: [{{name: http, port: {NGINX_PORT}}}, {{name: tcp-iperf, port: {IPERF_PORT}}}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: web, namespace: default}}\nsubsets:\n- addresses: [{{ip: {server}}}]\n  ports: [{{name: http, port: {NGINX_PORT}}}, {{name: tcp-iperf, port: {IPERF_PORT}}}]\n"
                    )
                } else {
                    String::new()
                };
                c.start()?;
            }
            let pids: Vec<u32> = (0..c.nodes.len()).filter_map(|i| c.agent_pid(i)).collect();
            let place = Place {
                load: Box::new(|program: &str| in_cgroup(&client_ns, &client_cg, program)),
                server: if mode == "hbone+l7" { XNODE_VIP.to_string() } else { server.clone() },
                client_ns: client_ns.clone(),
                pids,
            };
            for scenario in args.scenarios.iter().copied() {
                progress.step("cross-node", round, args.rounds, mode, scenario);
                samples.push(sample(mode, round, scenario, measure(&place, scenario, args.seconds)));
            }
            if mode != "direct" {
                // Agents stopped and their pins and rules removed: the
                // next mode starts from plain routing.
                c.stop();
            }
        }
    }
    Ok(samples)
}

fn agent_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is [0]; utime [11], stime [12].
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

fn agent_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

fn syn_retrans(ns: &Path) -> Option<f64> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["cat", "/proc/net/netstat"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let i = names.iter().position(|n| *n == "TCPSynRetrans")?;
    values.get(i)?.parse().ok()
}

/// `program` in network namespace `ns`, in cgroup `cg`.
fn in_cgroup(ns: &Path, cg: &Path, program: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", ns.display())).arg(program);
    let procs = cg.join("cgroup.procs");
    // SAFETY: moves the child into the load cgroup before exec.
    unsafe {
        c.pre_exec(move || std::fs::write(&procs, "0"));
    }
    c
}

fn oha(p: &Place, args: &[&str], seconds: f64) -> Result<serde_json::Value> {
    let url = format!("http://{}:{NGINX_PORT}/", p.server);
    let dur = format!("{}ms", (seconds * 1000.0) as u64);
    let out =
        (p.load)("oha").args(["--no-tui", "--output-format", "json", "-z", &dur]).args(args).arg(&url).output()?;
    if !out.status.success() {
        bail!("oha failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha JSON")?;
    // Requests cut off by the end of the run are not errors.
    let errors = v["errorDistribution"].as_object().map_or(0, |m| m.keys().filter(|k| !k.contains("deadline")).count());
    let ok = v["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
    if ok == 0 {
        bail!("no successful request (errors: {})", v["errorDistribution"]);
    }
    if errors > 0 {
        eprint!(" (errors: {})", v["errorDistribution"]);
    }
    Ok(v)
}

fn measure(p: &Place, scenario: &str, seconds: f64) -> Result<BTreeMap<String, f64>> {
    let mut m = BTreeMap::new();
    let cpu_before: Vec<Option<f64>> = p.pids.iter().map(|pid| agent_cpu_seconds(*pid)).collect();
    let syn_before = syn_retrans(&p.client_ns);
    let wall = Instant::now();
    match scenario {
        "standard" => {
            let v = oha(p, &["-c", "16", "-q", "1000", "--latency-correction"], seconds)?;
            let pc = &v["latencyPercentiles"];
            for (k, name) in [("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms")] {
                m.insert(name.into(), pc[k].as_f64().unwrap_or(f64::NAN) * 1000.0);
            }
            m.insert("rps".into(), v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0));
        }
        "max-rps" => {
            let v = oha(p, &["-c", "16"], seconds)?;
            m.insert("rps".into(), v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0));
            m.insert("p99_ms".into(), v["latencyPercentiles"]["p99"].as_f64().unwrap_or(f64::NAN) * 1000.0);
        }
        "conn-rate" => {
            let v = oha(p, &["-c", "16", "--disable-keepalive"], seconds)?;
            m.insert("conn_per_s".into(), v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0));
        }
        _ => {
            let secs = format!("{}", seconds.max(1.0) as u64);
            let out = (p.load)("iperf3")
                .args(["-c", &p.server, "-p", &IPERF_PORT.to_string(), "-t", &secs, "-J"])
                .output()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
            if let Some(e) = v["error"].as_str() {
                bail!("iperf3: {e}");
            }
            let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 result")?;
            m.insert("gbit_per_s".into(), bps / 1e9);
        }
    }
    let elapsed = wall.elapsed().as_secs_f64();
    // Per proxy: the busiest (and largest) of the agents serving the run.
    let mut vcpu_max: Option<f64> = None;
    let mut vcpu_sum = 0.0;
    let mut rss_max: Option<f64> = None;
    for (pid, before) in p.pids.iter().zip(&cpu_before) {
        if let (Some(before), Some(after)) = (before, agent_cpu_seconds(*pid)) {
            let vcpu = (after - before) / elapsed;
            vcpu_sum += vcpu;
            vcpu_max = Some(vcpu_max.map_or(vcpu, |x: f64| x.max(vcpu)));
        }
        if let Some(rss) = agent_rss_mb(*pid) {
            rss_max = Some(rss_max.map_or(rss, |x: f64| x.max(rss)));
        }
    }
    if let Some(vcpu) = vcpu_max {
        m.insert("proxy_vcpu".into(), vcpu);
        if p.pids.len() > 1 {
            m.insert("proxy_vcpu_all".into(), vcpu_sum);
        }
        if let Some(rps) = m.get("rps").or(m.get("conn_per_s")).copied() {
            if rps > 0.0 {
                m.insert("proxy_vcpu_per_krps".into(), vcpu / (rps / 1000.0));
            }
        }
    }
    if let Some(rss) = rss_max {
        m.insert("proxy_rss_mb".into(), rss);
    }
    if scenario == "conn-rate" {
        if let (Some(a), Some(b)) = (syn_before, syn_retrans(&p.client_ns)) {
            m.insert("syn_retrans".into(), b - a);
        }
    }
    Ok(m)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

/// Medians over rounds for `modes`, and their ratios to direct.
fn summarise(modes: &[&str], samples: &[Sample]) -> (Figures, Figures) {
    let mut medians: Figures = BTreeMap::new();
    for mode in modes {
        if !samples.iter().any(|s| s.mode == *mode) {
            continue;
        }
        for scenario in SCENARIOS {
            let mut figures: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for s in samples.iter().filter(|s| s.mode == *mode && s.scenario == scenario) {
                for (k, v) in &s.values {
                    figures.entry(k.clone()).or_default().push(*v);
                }
            }
            let m: BTreeMap<String, f64> = figures.into_iter().map(|(k, v)| (k, median(v))).collect();
            medians.entry(mode.to_string()).or_default().insert(scenario.into(), m);
        }
    }
    let mut ratios: Figures = BTreeMap::new();
    let direct = medians.get("direct").cloned().unwrap_or_default();
    for (mode, scen) in &medians {
        for (scenario, figs) in scen {
            for (k, v) in figs {
                if let Some(d) = direct.get(scenario).and_then(|f| f.get(k)) {
                    if *d != 0.0 && d.is_finite() {
                        ratios
                            .entry(mode.clone())
                            .or_default()
                            .entry(scenario.clone())
                            .or_default()
                            .insert(k.clone(), v / d);
                    }
                }
            }
        }
    }
    (medians, ratios)
}

fn fmt(v: Option<f64>, unit: &str, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}{unit}"),
        _ => "—".into(),
    }
}

fn get(f: &Figures, mode: &str, sc: &str, k: &str) -> Option<f64> {
    f.get(mode).and_then(|m| m.get(sc)).and_then(|f| f.get(k)).copied().filter(|v| v.is_finite())
}

/// The largest of a figure over all scenarios of a mode (resident memory:
/// the proxy's size at its busiest).
fn max_over_scenarios(f: &Figures, mode: &str, k: &str) -> Option<f64> {
    SCENARIOS.iter().filter_map(|sc| get(f, mode, sc, k)).reduce(f64::max)
}

/// One table row per mode: latency, throughput, proxy cost.
fn table(s: &mut String, medians: &Figures, ratios: &Figures, modes: &[&str], per_proxy: bool) {
    let cell = |mode: &str, sc: &str, k: &str, unit: &str, digits: usize| {
        let v = fmt(get(medians, mode, sc, k), unit, digits);
        match (mode, get(ratios, mode, sc, k)) {
            ("direct", _) | (_, None) => v,
            (_, Some(x)) => format!("{v} ({x:.2}×)"),
        }
    };
    let per = if per_proxy { " (busiest node)" } else { "" };
    s.push_str(&format!(
        "| mode | standard p50 | p90 | p99 | max req/s | new conn/s | SYN retrans | bulk Gbit/s | proxy vCPU per 1k req/s{per} | proxy RSS{} |\n",
        if per_proxy { " (largest node, all scenarios)" } else { "" }
    ));
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for mode in modes {
        let rss = if per_proxy {
            max_over_scenarios(medians, mode, "proxy_rss_mb")
        } else {
            get(medians, mode, "standard", "proxy_rss_mb")
        };
        s.push_str(&format!(
            "| {mode} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            cell(mode, "standard", "p50_ms", " ms", 3),
            cell(mode, "standard", "p90_ms", " ms", 3),
            cell(mode, "standard", "p99_ms", " ms", 3),
            cell(mode, "max-rps", "rps", "", 0),
            cell(mode, "conn-rate", "conn_per_s", "", 0),
            fmt(get(medians, mode, "conn-rate", "syn_retrans"), "", 0),
            cell(mode, "bulk", "gbit_per_s", "", 2),
            fmt(get(medians, mode, "standard", "proxy_vcpu_per_krps"), "", 3),
            fmt(rss, " MB", 1),
        ));
    }
}

fn failures(s: &mut String, title: &str, samples: &[Sample]) {
    let errors: Vec<&Sample> = samples.iter().filter(|s| s.error.is_some()).collect();
    if !errors.is_empty() {
        s.push_str(&format!("\nFailed measurements ({title}):\n\n"));
        for e in errors {
            s.push_str(&format!(
                "- round {} {} {}: {}\n",
                e.round + 1,
                e.mode,
                e.scenario,
                e.error.as_deref().unwrap_or("")
            ));
        }
    }
}

/// The cross-node targets (from Istio ambient's ztunnel in the same kind
/// of run): (figure, scenario, key, ratio to direct?, bound, at most?).
const TARGETS: [(&str, &str, &str, bool, f64, bool); 6] = [
    ("p99 at 1,000 req/s, 16 conns (× direct)", "standard", "p99_ms", true, 1.5, true),
    ("max keepalive req/s (× direct)", "max-rps", "rps", true, 0.5, false),
    ("new connections/s (× direct)", "conn-rate", "conn_per_s", true, 0.5, false),
    ("single-stream bulk (× direct)", "bulk", "gbit_per_s", true, 0.35, false),
    ("vCPU per 1,000 req/s per proxy", "standard", "proxy_vcpu_per_krps", false, 0.06, true),
    ("resident memory per proxy (MiB)", "*", "proxy_rss_mb", false, 16.0, true),
];

fn targets(s: &mut String, x: &Suite, modes: &[&str]) {
    s.push_str("\nTargets (ztunnel in the same kind of run: p99 1.9×, keepalive 0.4×, new connections 0.4×, bulk 0.22×, 0.077 vCPU per 1k req/s, 20-26 MiB):\n\n| figure | target |");
    for m in modes {
        s.push_str(&format!(" {m} |"));
    }
    s.push_str("\n|---|---:|");
    for _ in modes {
        s.push_str("---:|");
    }
    s.push('\n');
    for (name, sc, k, ratio, bound, at_most) in TARGETS {
        s.push_str(&format!("| {name} | {} {bound} |", if at_most { "≤" } else { "≥" }));
        for m in modes {
            let v = if sc == "*" {
                // MiB: the figure is recorded in MiB (VmRSS / 1024).
                max_over_scenarios(&x.medians, m, k)
            } else if ratio {
                get(&x.ratios, m, sc, k)
            } else {
                get(&x.medians, m, sc, k)
            };
            let cell = match v {
                Some(v) => {
                    let met = if at_most { v <= bound } else { v >= bound };
                    format!("{v:.3} {}", if met { "met" } else { "**not met**" })
                }
                None => "—".into(),
            };
            s.push_str(&format!(" {cell} |"));
        }
        s.push('\n');
    }
}

/// The L7-for-pods targets: `hbone+l7` against `hbone` (L4) of the same
/// run (Istio's sidecar: +2.76 ms p90, 0.5 vCPU and 50 MB per 1,000 req/s).
fn l7_targets(s: &mut String, x: &Suite) {
    if !(x.medians.contains_key("hbone") && x.medians.contains_key("hbone+l7")) {
        return;
    }
    s.push_str(
        "\nL7 for pods (hbone+l7 against hbone in the same run):\n\n| figure | target | hbone+l7 |\n|---|---:|---:|\n",
    );
    let rel = |sc: &str, k: &str| Some(get(&x.medians, "hbone+l7", sc, k)? / get(&x.medians, "hbone", sc, k)?);
    let rows: [(&str, Option<f64>, f64, bool); 5] = [
        ("p50 at 1,000 req/s (× hbone)", rel("standard", "p50_ms"), 1.3, true),
        ("p99 at 1,000 req/s (× hbone)", rel("standard", "p99_ms"), 1.3, true),
        ("max keepalive req/s (× hbone)", rel("max-rps", "rps"), 0.7, false),
        (
            "vCPU per 1,000 req/s, busier node",
            get(&x.medians, "hbone+l7", "standard", "proxy_vcpu_per_krps"),
            0.12,
            true,
        ),
        ("resident memory per agent (MiB)", max_over_scenarios(&x.medians, "hbone+l7", "proxy_rss_mb"), 20.0, true),
    ];
    for (name, v, bound, at_most) in rows {
        let cell = match v {
            Some(v) => {
                let met = if at_most { v <= bound } else { v >= bound };
                format!("{v:.3} {}", if met { "met" } else { "**not met**" })
            }
            None => "—".into(),
        };
        s.push_str(&format!("| {name} | {} {bound} | {cell} |\n", if at_most { "≤" } else { "≥" }));
    }
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "## redirector benchmark\n\nkernel {}, {} CPUs, {} interleaved round(s), {} s per scenario{}; medians over rounds, (×) = ratio to direct\n\n",
        r.kernel,
        r.cpus,
        r.rounds,
        r.seconds_per_scenario,
        if r.quick { ", --quick" } else { "" }
    ));
    if !r.samples.is_empty() {
        s.push_str("### Local: capture on one host (client namespace → server namespace)\n\n");
        table(&mut s, &r.medians, &r.ratios, &MODES, false);
        if let (Some(l7), Some(l4)) =
            (get(&r.medians, "ebpf+l7", "standard", "p50_ms"), get(&r.medians, "ebpf", "standard", "p50_ms"))
        {
            s.push_str(&format!(
                "\nL7 routing over L4 forwarding (eBPF capture, standard scenario): p50 {:+.0} µs ({:.3} ms vs {:.3} ms).\n",
                (l7 - l4) * 1000.0,
                l7,
                l4
            ));
        }
        failures(&mut s, "local", &r.samples);
    }
    if let Some(x) = &r.cross_node {
        let modes: Vec<&str> = XNODE_MODES.iter().copied().filter(|m| x.medians.contains_key(*m)).collect();
        s.push_str(&format!(
            "\n### Cross-node: pod {XNODE_CLIENT} on node-a → pod {XNODE_SERVER} on node-b (direct = routed, no agent; hbone = both nodes' agents, eBPF capture, HTTP/2 CONNECT in mTLS; hbone+l7 = the same to a Service whose nginx port is declared `http`: routed per request at the source, served per request at the destination (bulk: its iperf3 port, declared `tcp`); hbone-iptables = hbone with iptables capture)\n\n"
        ));
        table(&mut s, &x.medians, &x.ratios, &modes, true);
        let measured: Vec<&str> = modes.iter().copied().filter(|m| *m != "direct").collect();
        if !measured.is_empty() {
            targets(&mut s, x, &measured);
        }
        l7_targets(&mut s, x);
        failures(&mut s, "cross-node", &x.samples);
    }
    s
}

/// Labels at the middle of each group of bars (x = 0.5, 1.5, 2.5).
fn group_label(x: f64, names: &[&str]) -> String {
    if (x.fract() - 0.5).abs() < 1e-6 {
        names.get(x as usize).map(std::string::ToString::to_string).unwrap_or_default()
    } else {
        String::new()
    }
}

fn write_charts(r: &Report, dir: &Path) -> Result<()> {
    if !r.samples.is_empty() {
        chart(&r.medians, &MODES, "", &dir.join("bench.svg"))?;
    }
    if let Some(x) = &r.cross_node {
        let modes: Vec<&str> = XNODE_MODES.iter().copied().filter(|m| x.medians.contains_key(*m)).collect();
        chart(&x.medians, &modes, "cross-node: ", &dir.join("bench-cross-node.svg"))?;
    }
    Ok(())
}

fn chart(medians: &Figures, modes: &[&str], title: &str, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(520);
    let colors = [
        RGBColor(120, 120, 120),
        RGBColor(214, 96, 77),
        RGBColor(67, 147, 195),
        RGBColor(33, 102, 172),
        RGBColor(90, 174, 97),
    ];
    let get = |mode: &str, sc: &str, k: &str| get(medians, mode, sc, k).unwrap_or(0.0);
    let width = 0.9 / modes.len().max(1) as f64;

    // Left: standard scenario latency percentiles (ms), bars per mode.
    let pcts = ["p50_ms", "p90_ms", "p99_ms"];
    let ymax =
        modes.iter().flat_map(|m| pcts.iter().map(move |p| get(m, "standard", p))).fold(0.0f64, f64::max).max(0.001)
            * 1.15;
    let mut c = ChartBuilder::on(&left)
        .caption(format!("{title}standard scenario latency (1,000 req/s, 16 conns)"), ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..3f64, 0f64..ymax)?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(7)
        .x_label_formatter(&|x| group_label(*x, &["p50", "p90", "p99"]))
        .y_desc("ms")
        .draw()?;
    for (mi, mode) in modes.iter().enumerate() {
        let color = colors[mi % colors.len()];
        c.draw_series(pcts.iter().enumerate().map(|(pi, p)| {
            let x0 = pi as f64 + 0.05 + mi as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width * 0.9, get(mode, "standard", p))], color.filled())
        }))?
        .label(*mode)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;

    // Right: throughput as a ratio to direct.
    let figs = [
        ("max-rps", "rps", "max req/s"),
        ("conn-rate", "conn_per_s", "new conn/s"),
        ("bulk", "gbit_per_s", "bulk Gbit/s"),
    ];
    let ratio = |mode: &str, sc: &str, k: &str| {
        let d = get("direct", sc, k);
        if d > 0.0 {
            get(mode, sc, k) / d
        } else {
            0.0
        }
    };
    let ymax =
        modes.iter().flat_map(|m| figs.iter().map(move |(s, k, _)| ratio(m, s, k))).fold(1.0f64, f64::max) * 1.15;
    let mut c = ChartBuilder::on(&right)
        .caption(format!("{title}throughput, ratio to direct"), ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..3f64, 0f64..ymax)?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(7)
        .x_label_formatter(&|x| group_label(*x, &["max req/s", "new conn/s", "bulk Gbit/s"]))
        .y_desc("× direct")
        .draw()?;
    for (mi, mode) in modes.iter().enumerate() {
        let color = colors[mi % colors.len()];
        c.draw_series(figs.iter().enumerate().map(|(fi, (s, k, _))| {
            let x0 = fi as f64 + 0.05 + mi as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width * 0.9, ratio(mode, s, k))], color.filled())
        }))?;
    }
    root.present()?;
    Ok(())
}
