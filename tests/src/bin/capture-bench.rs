//! Capture-path figures (a benchmark, not a test): the cost of the connect
//! hook, and keepalive HTTP load through the proxy against direct.
//!
//! Run as root: `cargo run --release -p redirector-tests --bin capture-bench`
//! (needs nginx and wrk: `apt-get install nginx-light wrk`). It builds its
//! own namespaces, cgroups and agent, interleaves the modes round by round,
//! prints a markdown table and cleans up.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use redirector_tests::{privileged, Topology, SERVER_V4};

const ROUNDS: usize = 5;
const CONNECTS: usize = 20_000;
const NGINX_PORT: u16 = 8088;
const EXCLUDED_PORT: u16 = 9099;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("connect-loop") {
        return connect_loop(args[2].parse()?, args[3].parse()?);
    }
    if !privileged() {
        bail!("capture-bench needs root");
    }
    for tool in ["nginx", "wrk"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool} || test -x /usr/sbin/{tool}")])
            .stdout(Stdio::null())
            .status()?
            .success()
        {
            continue;
        }
        bail!("{tool} is missing: apt-get install nginx-light wrk");
    }
    let mut t = Topology::new()?;
    t.tune_client_for_many_connections()?;
    t.start_nginx(NGINX_PORT)?;
    t.start_agent(&format!("  excludePorts: [22, {EXCLUDED_PORT}]\n"))?;

    let mount = redirector::sys::cgroup::cgroup2_mount()?;
    // Outside the attach point: no program runs at all.
    let bare = mount.join(format!("{}-bare", t.name));
    std::fs::create_dir_all(&bare)?;
    let plain = t.cgroup.join("plain");
    let enrolled = t.cgroup.join("enrolled");
    for c in [&plain, &enrolled] {
        std::fs::create_dir_all(c)?;
    }
    let out = t.redirector().arg("enroll").arg(&enrolled).output()?;
    if !out.status.success() {
        bail!("enroll: {}", String::from_utf8_lossy(&out.stderr));
    }

    // 1. connect()+close() cost, to an excluded port where nothing listens.
    let target = format!("{SERVER_V4}:{EXCLUDED_PORT}");
    let mut hook: [Vec<f64>; 3] = Default::default();
    for round in 0..ROUNDS {
        for (i, cg) in [&bare, &plain, &enrolled].iter().enumerate() {
            let ns = connect_in(&t, cg, &target)?;
            hook[i].push(ns);
        }
        eprintln!("connect+close round {}/{ROUNDS}", round + 1);
    }

    // 2. keepalive HTTP through the proxy against direct.
    let url = format!("http://{SERVER_V4}:{NGINX_PORT}/");
    let mut http: [Vec<(f64, f64, f64)>; 2] = Default::default();
    for round in 0..3 {
        for (i, cg) in [&plain, &enrolled].iter().enumerate() {
            http[i].push(wrk_in(&t, cg, &url)?);
        }
        eprintln!("http round {}/3", round + 1);
    }
    let s = t.status();
    let _ = std::fs::remove_dir(&bare);

    println!("\n## Capture path figures\n");
    println!("kernel {}, {} CPUs, {ROUNDS} interleaved rounds of {CONNECTS} connect()+close() each to an excluded port that refuses (median of rounds)\n", redirector::sys::machine::kernel_release(), std::thread::available_parallelism().map_or(0, std::num::NonZero::get));
    println!("| cgroup | connect()+close() | vs no program |");
    println!("|---|---:|---:|");
    let base = median(&hook[0]);
    for (name, v) in ["no program attached", "attached, not enrolled", "enrolled, port excluded"].iter().zip(&hook) {
        let m = median(v);
        println!(
            "| {name} | {:.2} µs | {:+.2} µs ({:+.1}%) |",
            m / 1000.0,
            (m - base) / 1000.0,
            (m / base - 1.0) * 100.0
        );
    }
    println!("\nwrk -t2 -c16 -d10s against nginx (1 KB body, keepalive), 3 interleaved rounds (median)\n");
    println!("| path | requests/s | p50 | p99 |");
    println!("|---|---:|---:|---:|");
    for (name, v) in ["direct", "eBPF capture + proxy"].iter().zip(&http) {
        let rps = median(&v.iter().map(|x| x.0).collect::<Vec<_>>());
        let p50 = median(&v.iter().map(|x| x.1).collect::<Vec<_>>());
        let p99 = median(&v.iter().map(|x| x.2).collect::<Vec<_>>());
        println!("| {name} | {rps:.0} | {p50:.0} µs | {p99:.0} µs |");
    }
    println!("\nthe proxy forwarded {} connections in this run", s["proxy"]["forwarded"]);
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// In a child: CONNECTS times connect()+close(); prints ns per pair.
fn connect_loop(addr: SocketAddr, n: usize) -> Result<()> {
    let start = Instant::now();
    for _ in 0..n {
        // Nothing listens there: the SYN is answered by a RST, so no port is
        // held in TIME_WAIT and every iteration costs the same.
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => drop(s),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e.into()),
        }
    }
    println!("{}", start.elapsed().as_nanos() as f64 / n as f64);
    Ok(())
}

fn in_cgroup(t: &Topology, cg: &Path, program: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", Topology::ns_path(&t.client_ns).display())).arg(program);
    let procs = cg.join("cgroup.procs");
    // SAFETY: benchmark helper; moves the child into the cgroup before exec.
    unsafe {
        c.pre_exec(move || std::fs::write(&procs, "0"));
    }
    c
}

fn connect_in(t: &Topology, cg: &Path, target: &str) -> Result<f64> {
    let me = std::env::current_exe()?;
    let out = in_cgroup(t, cg, &me).args(["connect-loop", target, &CONNECTS.to_string()]).output()?;
    if !out.status.success() {
        bail!("connect loop failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// (requests/s, p50 µs, p99 µs) from wrk.
fn wrk_in(t: &Topology, cg: &Path, url: &str) -> Result<(f64, f64, f64)> {
    let out = in_cgroup(t, cg, Path::new("/usr/bin/wrk")).args(["-t2", "-c16", "-d10s", "--latency", url]).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || text.contains("Socket errors") && text.contains("read 0") {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |prefix: &str| -> Option<String> {
        text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()))
    };
    let rps: f64 = field("Requests/sec:").context("Requests/sec")?.parse()?;
    let to_us = |s: String| -> Result<f64> {
        let s = s.trim();
        Ok(if let Some(v) = s.strip_suffix("us") {
            v.parse()?
        } else if let Some(v) = s.strip_suffix("ms") {
            v.parse::<f64>()? * 1000.0
        } else if let Some(v) = s.strip_suffix('s') {
            v.parse::<f64>()? * 1e6
        } else {
            s.parse()?
        })
    };
    let p50 = to_us(field("50%").context("p50")?)?;
    let p99 = to_us(field("99%").context("p99")?)?;
    Ok((rps, p50, p99))
}
