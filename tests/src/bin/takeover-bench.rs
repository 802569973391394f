//! Takeover figures (a benchmark, not a test): an enrolled client opens a
//! new HTTP connection to nginx every 10 ms through the agent while a
//! second agent takes over from the first; reports failed connections
//! (which must be 0), connection latency (p50/p99) before and during the
//! takeover, the time from the new agent's start to its serving, and how
//! long the old agent took to drain and exit.
//!
//! Run as root: `cargo xtask bench --scenarios takeover` (or
//! `cargo run --release -p redirector-tests --bin takeover-bench`, with
//! REDIRECTOR_BIN set). It builds its own namespaces, cgroups and agents,
//! interleaves the capture modes round by round, prints a markdown table,
//! writes `takeover.md` and `takeover.json` to the results directory and
//! cleans up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use redirector_tests::{privileged, Topology, SERVER_V4};
use serde::Serialize;

const NGINX_PORT: u16 = 8089;
const MODES: [&str; 2] = ["ebpf", "iptables"];
/// The takeover window runs this long (seconds) past the old agent's exit,
/// so a new agent that serves slowly at first shows in "during".
const AFTER: f64 = 1.0;

/// The load: a new connection every 10 ms, each one HTTP/1.0 request that
/// nginx answers and closes. Prints JSON: per connection its start (Unix
/// seconds), latency (ms, connect to the response's end) and whether it
/// got a 200.
fn load_script(secs: f64) -> String {
    format!(
        r#"
import json, socket, time
samples, errors = [], []
end = time.time() + {secs}
while time.time() < end:
    t0 = time.time()
    ok = False
    try:
        s = socket.create_connection(("{SERVER_V4}", {NGINX_PORT}), timeout=5)
        s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        ok = data.startswith(b"HTTP/1.1 200")
        if not ok:
            errors.append(repr(data[:40]))
    except Exception as e:
        errors.append(str(e))
    samples.append([t0, (time.time() - t0) * 1000.0, ok])
    time.sleep(max(0.0, 0.01 - (time.time() - t0)))
print(json.dumps({{"samples": samples, "errors": errors[:5]}}))
"#
    )
}

#[derive(Serialize)]
struct Measured {
    mode: String,
    round: usize,
    connections: usize,
    failed: usize,
    errors: Vec<String>,
    before_p50_ms: f64,
    before_p99_ms: f64,
    during_p50_ms: f64,
    during_p99_ms: f64,
    /// Connections started between the new agent's start and a second
    /// after the old agent's exit.
    during_connections: usize,
    start_to_serving_ms: f64,
    old_agent_exit_ms: f64,
}

fn epoch() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short vector"
    )]
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// Take over from the running agent; wait for the old one to exit. Returns
/// how long the new agent took to serve.
fn take_over_and_wait(t: &mut Topology) -> Result<Duration> {
    let started_at = Instant::now();
    let mut old = t.take_over()?;
    let serving = started_at.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    while old.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = old.kill();
            let _ = old.wait();
            bail!("the old agent did not exit within 30 s of the takeover");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(serving)
}

/// One round in `mode`: start an agent, enrol the load's cgroup, start the
/// load, take over at a third of the run, wait for the old agent to exit,
/// collect the load's samples.
fn round(t: &mut Topology, mode: &'static str, n: usize, secs: f64) -> Result<Measured> {
    t.mode = mode;
    t.start_agent_with_proxy("  drainTimeout: 5s\n")?;
    let load = t.cgroup.join("load");
    std::fs::create_dir_all(&load)?;
    let out = t.redirector().arg("enroll").arg(&load).output()?;
    if !out.status.success() {
        bail!("enroll: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let mut client = t.spawn_in_cgroup(&load, &format!("python3 -c '{}'", load_script(secs).replace('\'', "'\\''")));
    std::thread::sleep(Duration::from_secs_f64(secs / 3.0));
    let (started, started_at) = (epoch(), Instant::now());
    let serving = match take_over_and_wait(t) {
        Ok(serving) => serving,
        Err(e) => {
            let _ = client.kill();
            let _ = client.wait();
            return Err(e);
        }
    };
    let (exited, exit_after) = (epoch(), started_at.elapsed());
    let out = client.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("load output ({}): {stdout} {}", out.status, String::from_utf8_lossy(&out.stderr)))?;
    let _ = t.redirector().arg("unenroll").arg(&load).output();
    t.stop_agent();
    let _ = t.redirector().arg("uninstall").output();

    let samples: Vec<(f64, f64, bool)> = r["samples"]
        .as_array()
        .context("samples")?
        .iter()
        .map(|s| (s[0].as_f64().unwrap_or(0.0), s[1].as_f64().unwrap_or(0.0), s[2].as_bool().unwrap_or(false)))
        .collect();
    let ok_latency =
        |f: &dyn Fn(f64) -> bool| -> Vec<f64> { samples.iter().filter(|s| s.2 && f(s.0)).map(|s| s.1).collect() };
    let before = ok_latency(&|at| at < started);
    let until = exited + AFTER;
    let during = ok_latency(&|at| at >= started && at <= until);
    Ok(Measured {
        mode: mode.into(),
        round: n,
        connections: samples.len(),
        failed: samples.iter().filter(|s| !s.2).count(),
        errors: r["errors"].as_array().map(|e| e.iter().map(ToString::to_string).collect()).unwrap_or_default(),
        before_p50_ms: percentile(before.clone(), 0.5),
        before_p99_ms: percentile(before, 0.99),
        during_p50_ms: percentile(during.clone(), 0.5),
        during_p99_ms: percentile(during.clone(), 0.99),
        during_connections: samples.iter().filter(|s| s.0 >= started && s.0 <= until).count(),
        start_to_serving_ms: serving.as_secs_f64() * 1000.0,
        old_agent_exit_ms: exit_after.as_secs_f64() * 1000.0,
    })
}

fn markdown(rounds: &[Measured], secs: f64) -> String {
    let mut s = format!(
        "## takeover benchmark\n\nkernel {}, {} CPUs; a new HTTP connection every 10 ms from an enrolled cgroup to nginx for {secs} s, a second agent started at a third of the run; latency is connect to the response's end; \"during\" is from the new agent's start to a second after the old agent's exit (drained); \"before\" is the third of the run before it\n\n",
        redirector::sys::machine::kernel_release(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
    );
    s.push_str("| mode | round | connections | failed (must be 0) | p50 before | p50 during | p99 before | p99 during | connections during | start to serving | old agent exits |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rounds {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {} | {:.0} ms | {:.0} ms |\n",
            r.mode,
            r.round + 1,
            r.connections,
            r.failed,
            r.before_p50_ms,
            r.during_p50_ms,
            r.before_p99_ms,
            r.during_p99_ms,
            r.during_connections,
            r.start_to_serving_ms,
            r.old_agent_exit_ms
        ));
    }
    for r in rounds.iter().filter(|r| !r.errors.is_empty()) {
        s.push_str(&format!("\n{} round {}: {}\n", r.mode, r.round + 1, r.errors.join("; ")));
    }
    s.push_str("\nstart to serving: from starting the second `redirector run` to its log saying `takeover complete: serving` (polled every 50 ms)\n");
    s
}

struct Args {
    rounds: usize,
    seconds: f64,
    modes: Vec<&'static str>,
    results: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut a = Args { rounds: 3, seconds: 12.0, modes: MODES.to_vec(), results: PathBuf::from("results") };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {
                a.rounds = 1;
                a.seconds = 6.0;
            }
            "--rounds" => a.rounds = it.next().context("--rounds N")?.parse().context("--rounds takes a number")?,
            "--seconds" => a.seconds = it.next().context("--seconds S")?.parse().context("--seconds takes a number")?,
            "--results" => a.results = it.next().context("--results DIR")?.into(),
            "--modes" => {
                let list = it.next().context("--modes LIST")?;
                a.modes =
                    list.split(',')
                        .map(|m| {
                            MODES.iter().copied().find(|x| *x == m).with_context(|| {
                                format!("--modes: unknown mode `{m}` (takeover modes: ebpf, iptables)")
                            })
                        })
                        .collect::<Result<_>>()?;
            }
            "-h" | "--help" => {
                println!("takeover-bench [--quick] [--rounds N] [--seconds S (at least 3)] [--modes ebpf,iptables] [--results DIR]");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`; see --help"),
        }
    }
    if a.rounds < 1 || a.seconds < 3.0 {
        bail!("--rounds must be at least 1 and --seconds at least 3");
    }
    Ok(a)
}

fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null || test -x /usr/sbin/{tool}")])
        .status()
        .is_ok_and(|s| s.success())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if !privileged() {
        bail!("the takeover benchmark needs root (namespaces, cgroups, eBPF, iptables): run `sudo -E cargo xtask bench --scenarios takeover`");
    }
    for tool in ["nginx", "python3", "nsenter"] {
        if !have(tool) {
            bail!("missing {tool}; install it (apt-get install nginx-light python3 util-linux)");
        }
    }
    let mut t = Topology::new()?;
    t.start_nginx(NGINX_PORT)?;
    let mut rounds = Vec::new();
    for n in 0..args.rounds {
        for mode in args.modes.iter().copied() {
            eprintln!("takeover round {}/{} {mode}", n + 1, args.rounds);
            rounds.push(round(&mut t, mode, n, args.seconds).with_context(|| format!("{mode} round {}", n + 1))?);
        }
    }
    let md = markdown(&rounds, args.seconds);
    println!("{md}");
    std::fs::create_dir_all(&args.results)?;
    std::fs::write(args.results.join("takeover.md"), &md)?;
    let by_mode: BTreeMap<&str, Vec<&Measured>> =
        args.modes.iter().map(|m| (*m, rounds.iter().filter(|r| r.mode == *m).collect())).collect();
    std::fs::write(args.results.join("takeover.json"), serde_json::to_string_pretty(&by_mode)?)?;
    eprintln!("results: {} (takeover.md, takeover.json)", args.results.display());
    if rounds.iter().any(|r| r.failed > 0) {
        bail!("a takeover failed connections (see the table)");
    }
    Ok(())
}
