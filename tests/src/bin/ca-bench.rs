//! Mesh CA figures (a benchmark, not a test): how fast `redirector ca
//! serve` answers a node's burst of new pods, and what it costs while
//! workloads renew.
//!
//! Run: `cargo run --release -p redirector-tests --bin ca-bench` (loopback
//! only, no root needed). It starts the project's test API server with a
//! node agent's pod and its pods, and a real CA service on 127.0.0.1, then:
//!
//! 1. burst: one node agent (one HTTP/2 connection, as an agent keeps)
//!    asks for `BURST` pods' certificates at once; each request's time
//!    from CSR sent to chain received (the CSRs are made before);
//! 2. renewals: `RENEWALS` more certificates at `RENEWAL_RATE` per second
//!    (under the per-caller limit); the CA process's CPU time per
//!    certificate, and its resident memory.
//!
//! The CPU a fleet costs at its default rate follows: a workload renews at
//! half its 24 h life, so 1,000 workloads ask 1000 / 43,200 s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use redirector::identity::istio_api::{CaClient, IstioCertificateRequest};
use redirector::identity::Identity;
use redirector_tests::kubeapi::KubeApi;
use serde_json::json;

const BURST: usize = 200;
const RENEWALS: usize = 1000;
const NAMESPACES: usize = 10;
/// Renewals per second in phase 2.
const RENEWAL_RATE: f64 = 40.0;
const AGENT_NS: &str = "redirector-system";

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// (CPU seconds, resident KiB, peak resident KiB) of a process.
fn usage(pid: u32) -> Result<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("/proc stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), in clock ticks.
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok((ticks / hz, kib("VmRSS:"), kib("VmHWM:")))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("redirector-ca-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = run(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(dir: &std::path::Path) -> Result<()> {
    let bin = redirector_tests::redirector_bin();
    let ca_dir = dir.join("ca");
    let out = std::process::Command::new(&bin).arg("ca").arg("create").arg(&ca_dir).output()?;
    if !out.status.success() {
        bail!("ca create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let api = KubeApi::start(&dir.join("api"))?;
    api.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "agent-node-a", "namespace": AGENT_NS, "uid": "agent-uid"},
        "spec": {"nodeName": "node-a", "serviceAccountName": "redirector"}, "status": {"phase": "Running"}}))?;
    let token = api.issue_token(
        AGENT_NS,
        "redirector",
        Some(("agent-node-a", "agent-uid")),
        &["istio-ca"],
        Duration::from_hours(1),
    );
    let workloads = BURST + RENEWALS;
    for i in 0..workloads {
        api.apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("w-{i}"), "namespace": format!("bench-{}", i % NAMESPACES), "uid": format!("uid-{i}")},
            "spec": {"nodeName": "node-a", "serviceAccountName": format!("sa-{i}")}, "status": {"phase": "Running"}}))?;
    }
    let (port, monitoring) = (free_port()?, free_port()?);
    let log = dir.join("ca.log");
    let mut ca = std::process::Command::new(&bin)
        .arg("--kubeconfig")
        .arg(&api.kubeconfig)
        .arg("ca")
        .arg("serve")
        .arg(&ca_dir)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--monitoring", &format!("127.0.0.1:{monitoring}")])
        .args(["--dns-name", "127.0.0.1"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let measured = measure(&ca_dir, port, ca.id(), &token);
    let _ = ca.kill();
    let _ = ca.wait();
    let (burst, cpu_per_cert, rss, hwm, rate) =
        measured.with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    let fleet_vcpu = cpu_per_cert * 1000.0 / 43_200.0;
    println!("| figure | value | target |");
    println!("|---|---|---|");
    println!("| burst of {BURST} new pods' CSRs, one agent: p50 | {:.1} ms | |", ms(percentile(&burst, 0.5)));
    println!("| burst: p99 | {:.1} ms | ≤ 50 ms |", ms(percentile(&burst, 0.99)));
    println!("| burst: max | {:.1} ms | |", ms(*burst.last().unwrap()));
    println!("| CA CPU per certificate (renewals) | {:.2} ms | |", cpu_per_cert * 1000.0);
    println!("| renewals served (paced) | {rate:.0} /s | |");
    println!("| CA CPU for 1,000 workloads renewing at half of 24 h | {fleet_vcpu:.5} vCPU | ≤ 0.05 vCPU |");
    println!(
        "| CA resident after {workloads} certificates (peak) | {:.1} MiB ({:.1} MiB) | ≤ 30 MiB |",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!("\n{} TokenReviews answered by the test API server.", api.token_reviews());
    Ok(())
}

type Figures = (Vec<Duration>, f64, u64, u64, f64);

fn measure(ca_dir: &std::path::Path, port: u16, pid: u32, token: &str) -> Result<Figures> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let roots = Arc::new(redirector::identity::remote::read_bundle(&ca_dir.join("root-cert.pem"))?.0);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let client = rt.block_on(async {
        CaClient::new(
            &addr.to_string(),
            Arc::new(move || Box::pin(async move { vec![addr] })),
            Arc::new(move || Arc::clone(&roots)),
            Duration::from_secs(10),
        )
        .map_err(anyhow::Error::msg)
    })?;
    let request = |i: usize| -> Result<IstioCertificateRequest> {
        let id = Identity::new("cluster.local", &format!("bench-{}", i % NAMESPACES), &format!("sa-{i}"));
        let (_key, csr) = redirector::identity::csr::new_key_and_csr(&id)?;
        Ok(IstioCertificateRequest::new(csr, Duration::from_hours(24), Some(&id)))
    };
    // The CA up and the agent's connection open, as on a running node.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match rt.block_on(client.create_certificate(token, request(0)?)) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => bail!("the CA does not answer: {e}"),
        }
    }
    let requests: Vec<IstioCertificateRequest> = (0..BURST).map(request).collect::<Result<_>>()?;
    let mut burst: Vec<Duration> = rt.block_on(async {
        let tasks: Vec<_> = requests
            .into_iter()
            .map(|r| {
                let (c, t) = (client.clone(), token.to_string());
                tokio::spawn(async move {
                    let started = Instant::now();
                    c.create_certificate(&t, r).await.map(|_| started.elapsed())
                })
            })
            .collect();
        let mut v = Vec::new();
        for t in tasks {
            v.push(t.await?.map_err(|e| anyhow::anyhow!("burst request refused: {e}"))?);
        }
        Ok::<_, anyhow::Error>(v)
    })?;
    burst.sort();
    let renewals: Vec<IstioCertificateRequest> = (BURST..BURST + RENEWALS).map(request).collect::<Result<_>>()?;
    let (cpu0, _, _) = usage(pid)?;
    let started = Instant::now();
    // Paced under the CA's per-caller limit (50/s after a burst of 500):
    // a node's renewals come from its one agent.
    for (i, r) in renewals.into_iter().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 / RENEWAL_RATE);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        rt.block_on(client.create_certificate(token, r)).map_err(|e| anyhow::anyhow!("renewal refused: {e}"))?;
    }
    let wall = started.elapsed().as_secs_f64();
    let (cpu1, rss, hwm) = usage(pid)?;
    Ok((burst, (cpu1 - cpu0) / RENEWALS as f64, rss, hwm, RENEWALS as f64 / wall))
}
