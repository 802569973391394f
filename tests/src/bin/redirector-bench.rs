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
//! Output: a markdown table, a JSON file and an SVG chart under the results
//! folder (and `--json PATH`), every figure also as a ratio to direct.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use redirector_tests::*;
use serde::{Deserialize, Serialize};

const NGINX_PORT: u16 = 8088;
const IPERF_PORT: u16 = 5201;
const MODES: [&str; 5] = ["direct", "iptables", "ebpf", "ebpf+sockmap", "ebpf+l7"];
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
        modes: MODES.to_vec(),
        scenarios: SCENARIOS.to_vec(),
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
            "--modes" => a.modes = subset("--modes", &it.next().context("--modes LIST")?, &MODES)?,
            "--scenarios" => {
                a.scenarios = subset("--scenarios", &it.next().context("--scenarios LIST")?, &SCENARIOS)?
            }
            "-h" | "--help" => {
                println!("redirector-bench [--quick] [--rounds N] [--seconds S] [--json PATH] [--results DIR] [--modes direct,iptables,ebpf,ebpf+sockmap] [--scenarios standard,max-rps,conn-rate,bulk]");
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
        .map(|s| s.success())
        .unwrap_or(false)
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

#[derive(Serialize, Deserialize)]
struct Report {
    kernel: String,
    cpus: usize,
    rounds: usize,
    seconds_per_scenario: f64,
    quick: bool,
    /// mode -> scenario -> figure -> median over rounds
    medians: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    /// the same as a ratio to direct (where direct has the figure)
    ratios: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    samples: Vec<Sample>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("\nredirector-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = parse_args()?;
    if let Some(path) = &args.render {
        let report: Report = serde_json::from_slice(&std::fs::read(path)?).context("report JSON")?;
        println!("{}", markdown(&report));
        std::fs::create_dir_all(&args.results)?;
        chart(&report, &args.results.join("bench.svg"))?;
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark needs root (namespaces, cgroups, eBPF, iptables): run `sudo -E cargo xtask bench`");
    }
    let missing: Vec<&str> = ["oha", "nginx", "iperf3", "iptables", "nsenter"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing load tools: {}; install them with `apt-get install nginx-light iperf3 iptables && cargo install oha`",
            missing.join(", ")
        );
    }

    let mut t = Topology::new()?;
    t.tune_client_for_many_connections()?;
    t.start_nginx(NGINX_PORT)?;
    t.start_iperf3(IPERF_PORT)?;
    let load = t.cgroup.join("load");
    std::fs::create_dir_all(&load)?;

    let total = args.rounds * args.modes.len() * args.scenarios.len();
    let started = Instant::now();
    let mut done = 0;
    let mut samples = Vec::new();
    for round in 0..args.rounds {
        for mode in args.modes.iter().copied() {
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
            for scenario in args.scenarios.iter().copied() {
                done += 1;
                eprint!(
                    "\r\x1b[2K[{done}/{total}] round {}/{} {mode:<13} {scenario:<10} elapsed {:>4.0}s",
                    round + 1,
                    args.rounds,
                    started.elapsed().as_secs_f64()
                );
                let r = measure(&t, &load, mode, scenario, args.seconds);
                samples.push(match r {
                    Ok(values) => Sample {
                        mode: mode.into(),
                        round,
                        scenario: scenario.into(),
                        values,
                        error: None,
                    },
                    Err(e) => Sample {
                        mode: mode.into(),
                        round,
                        scenario: scenario.into(),
                        values: BTreeMap::new(),
                        error: Some(format!("{e:#}")),
                    },
                });
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
    eprintln!();

    let report = summarise(&args, samples);
    let md = markdown(&report);
    println!("{md}");
    std::fs::create_dir_all(&args.results)?;
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(args.results.join("bench.json"), &json)?;
    std::fs::write(args.results.join("bench.md"), &md)?;
    chart(&report, &args.results.join("bench.svg"))?;
    if let Some(p) = &args.json {
        std::fs::write(p, &json)?;
    }
    eprintln!(
        "results: {} (bench.md, bench.json, bench.svg)",
        args.results.display()
    );
    Ok(())
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
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn syn_retrans(t: &Topology) -> Option<f64> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", Topology::ns_path(&t.client_ns).display()))
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

fn in_load(t: &Topology, cg: &Path, program: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", Topology::ns_path(&t.client_ns).display()))
        .arg(program);
    let procs = cg.join("cgroup.procs");
    // SAFETY: moves the child into the load cgroup before exec.
    unsafe {
        c.pre_exec(move || std::fs::write(&procs, "0"));
    }
    c
}

fn oha(t: &Topology, cg: &Path, args: &[&str], seconds: f64) -> Result<serde_json::Value> {
    let url = format!("http://{SERVER_V4}:{NGINX_PORT}/");
    let dur = format!("{}ms", (seconds * 1000.0) as u64);
    let out = in_load(t, cg, "oha")
        .args(["--no-tui", "--output-format", "json", "-z", &dur])
        .args(args)
        .arg(&url)
        .output()?;
    if !out.status.success() {
        bail!("oha failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha JSON")?;
    // Requests cut off by the end of the run are not errors.
    let errors = v["errorDistribution"]
        .as_object()
        .map(|m| m.keys().filter(|k| !k.contains("deadline")).count())
        .unwrap_or(0);
    let ok = v["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
    if ok == 0 {
        bail!("no successful request (errors: {})", v["errorDistribution"]);
    }
    if errors > 0 {
        eprint!(" (errors: {})", v["errorDistribution"]);
    }
    Ok(v)
}

fn measure(t: &Topology, cg: &Path, mode: &str, scenario: &str, seconds: f64) -> Result<BTreeMap<String, f64>> {
    let mut m = BTreeMap::new();
    let pid = if mode == "direct" { None } else { t.agent_pid() };
    let cpu_before = pid.and_then(agent_cpu_seconds);
    let syn_before = syn_retrans(t);
    let wall = Instant::now();
    match scenario {
        "standard" => {
            let v = oha(t, cg, &["-c", "16", "-q", "1000", "--latency-correction"], seconds)?;
            let p = &v["latencyPercentiles"];
            for (k, name) in [("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms")] {
                m.insert(name.into(), p[k].as_f64().unwrap_or(f64::NAN) * 1000.0);
            }
            m.insert("rps".into(), v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0));
        }
        "max-rps" => {
            let v = oha(t, cg, &["-c", "16"], seconds)?;
            m.insert("rps".into(), v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0));
            m.insert("p99_ms".into(), v["latencyPercentiles"]["p99"].as_f64().unwrap_or(f64::NAN) * 1000.0);
        }
        "conn-rate" => {
            let v = oha(t, cg, &["-c", "16", "--disable-keepalive"], seconds)?;
            m.insert("conn_per_s".into(), v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0));
        }
        _ => {
            let secs = format!("{}", seconds.max(1.0) as u64);
            let out = in_load(t, cg, "iperf3")
                .args(["-c", SERVER_V4, "-p", &IPERF_PORT.to_string(), "-t", &secs, "-J"])
                .output()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
            if let Some(e) = v["error"].as_str() {
                bail!("iperf3: {e}");
            }
            let bps = v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .context("iperf3 result")?;
            m.insert("gbit_per_s".into(), bps / 1e9);
        }
    }
    let elapsed = wall.elapsed().as_secs_f64();
    if let (Some(pid), Some(before)) = (pid, cpu_before) {
        if let Some(after) = agent_cpu_seconds(pid) {
            let vcpu = (after - before) / elapsed;
            m.insert("proxy_vcpu".into(), vcpu);
            if let Some(rps) = m.get("rps").or(m.get("conn_per_s")).copied() {
                if rps > 0.0 {
                    m.insert("proxy_vcpu_per_krps".into(), vcpu / (rps / 1000.0));
                }
            }
        }
        if let Some(rss) = agent_rss_mb(pid) {
            m.insert("proxy_rss_mb".into(), rss);
        }
    }
    if scenario == "conn-rate" {
        if let (Some(a), Some(b)) = (syn_before, syn_retrans(t)) {
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
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn summarise(args: &Args, samples: Vec<Sample>) -> Report {
    let mut medians: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>> = BTreeMap::new();
    for mode in MODES {
        for scenario in SCENARIOS {
            let mut figures: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for s in samples.iter().filter(|s| s.mode == mode && s.scenario == scenario) {
                for (k, v) in &s.values {
                    figures.entry(k.clone()).or_default().push(*v);
                }
            }
            let m: BTreeMap<String, f64> = figures.into_iter().map(|(k, v)| (k, median(v))).collect();
            medians.entry(mode.into()).or_default().insert(scenario.into(), m);
        }
    }
    let mut ratios: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>> = BTreeMap::new();
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
    Report {
        kernel: redirector::system::kernel_release(),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        rounds: args.rounds,
        seconds_per_scenario: args.seconds,
        quick: args.quick,
        medians,
        ratios,
        samples,
    }
}

fn fmt(v: Option<f64>, unit: &str, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}{unit}"),
        _ => "—".into(),
    }
}

fn markdown(r: &Report) -> String {
    let get = |mode: &str, sc: &str, k: &str| r.medians.get(mode).and_then(|m| m.get(sc)).and_then(|f| f.get(k)).copied();
    let ratio = |mode: &str, sc: &str, k: &str| r.ratios.get(mode).and_then(|m| m.get(sc)).and_then(|f| f.get(k)).copied();
    let cell = |mode: &str, sc: &str, k: &str, unit: &str, digits: usize| {
        let v = fmt(get(mode, sc, k), unit, digits);
        match (mode, ratio(mode, sc, k)) {
            ("direct", _) | (_, None) => v,
            (_, Some(x)) => format!("{v} ({x:.2}×)"),
        }
    };
    let mut s = String::new();
    s.push_str(&format!(
        "## redirector benchmark\n\nkernel {}, {} CPUs, {} interleaved round(s), {} s per scenario{}; medians over rounds, (×) = ratio to direct\n\n",
        r.kernel,
        r.cpus,
        r.rounds,
        r.seconds_per_scenario,
        if r.quick { ", --quick" } else { "" }
    ));
    s.push_str("| mode | standard p50 | p90 | p99 | max req/s | new conn/s | SYN retrans | bulk Gbit/s | proxy vCPU per 1k req/s | proxy RSS |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for mode in MODES {
        s.push_str(&format!(
            "| {mode} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            cell(mode, "standard", "p50_ms", " ms", 3),
            cell(mode, "standard", "p90_ms", " ms", 3),
            cell(mode, "standard", "p99_ms", " ms", 3),
            cell(mode, "max-rps", "rps", "", 0),
            cell(mode, "conn-rate", "conn_per_s", "", 0),
            fmt(get(mode, "conn-rate", "syn_retrans"), "", 0),
            cell(mode, "bulk", "gbit_per_s", "", 2),
            fmt(get(mode, "standard", "proxy_vcpu_per_krps"), "", 3),
            fmt(get(mode, "standard", "proxy_rss_mb"), " MB", 1),
        ));
    }
    if let (Some(l7), Some(l4)) = (get("ebpf+l7", "standard", "p50_ms"), get("ebpf", "standard", "p50_ms")) {
        s.push_str(&format!(
            "\nL7 routing over L4 forwarding (eBPF capture, standard scenario): p50 {:+.0} µs ({:.3} ms vs {:.3} ms).\n",
            (l7 - l4) * 1000.0,
            l7,
            l4
        ));
    }
    let errors: Vec<&Sample> = r.samples.iter().filter(|s| s.error.is_some()).collect();
    if !errors.is_empty() {
        s.push_str("\nFailed measurements:\n\n");
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
    s
}

/// Labels at the middle of each group of bars (x = 0.5, 1.5, 2.5).
fn group_label(x: f64, names: &[&str]) -> String {
    if (x.fract() - 0.5).abs() < 1e-6 {
        names.get(x as usize).map(|s| s.to_string()).unwrap_or_default()
    } else {
        String::new()
    }
}

fn chart(r: &Report, path: &Path) -> Result<()> {
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
    let get = |mode: &str, sc: &str, k: &str| {
        r.medians
            .get(mode)
            .and_then(|m| m.get(sc))
            .and_then(|f| f.get(k))
            .copied()
            .filter(|v| v.is_finite())
            .unwrap_or(0.0)
    };

    // Left: standard scenario latency percentiles (ms), bars per mode.
    let pcts = ["p50_ms", "p90_ms", "p99_ms"];
    let ymax = MODES
        .iter()
        .flat_map(|m| pcts.iter().map(move |p| get(m, "standard", p)))
        .fold(0.0f64, f64::max)
        .max(0.001)
        * 1.15;
    let mut c = ChartBuilder::on(&left)
        .caption("Standard scenario latency (1,000 req/s, 16 conns)", ("sans-serif", 16))
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
    for (mi, mode) in MODES.iter().enumerate() {
        let color = colors[mi];
        c.draw_series(pcts.iter().enumerate().map(|(pi, p)| {
            let x0 = pi as f64 + 0.05 + mi as f64 * 0.18;
            Rectangle::new([(x0, 0.0), (x0 + 0.16, get(mode, "standard", p))], color.filled())
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
    let figs = [("max-rps", "rps", "max req/s"), ("conn-rate", "conn_per_s", "new conn/s"), ("bulk", "gbit_per_s", "bulk Gbit/s")];
    let ratio = |mode: &str, sc: &str, k: &str| {
        let d = get("direct", sc, k);
        if d > 0.0 { get(mode, sc, k) / d } else { 0.0 }
    };
    let ymax = MODES
        .iter()
        .flat_map(|m| figs.iter().map(move |(s, k, _)| ratio(m, s, k)))
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut c = ChartBuilder::on(&right)
        .caption("Throughput, ratio to direct", ("sans-serif", 16))
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
    for (mi, mode) in MODES.iter().enumerate() {
        let color = colors[mi];
        c.draw_series(figs.iter().enumerate().map(|(fi, (s, k, _))| {
            let x0 = fi as f64 + 0.05 + mi as f64 * 0.18;
            Rectangle::new([(x0, 0.0), (x0 + 0.16, ratio(mode, s, k))], color.filled())
        }))?;
    }
    root.present()?;
    Ok(())
}
