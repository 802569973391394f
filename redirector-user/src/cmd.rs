//! The CLI commands that talk to an installed capture: `exec`, `enroll`,
//! `unenroll`, `status`, `verify`, `uninstall`. They find the agent through
//! its state record and work on the pinned maps directly, so enrollment
//! works (and is kept) across agent restarts.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod manifest;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use redirector_common::Decision;
use serde::Serialize;

use crate::capture::ebpf::{self};
use crate::capture::iptables;
use crate::capture::status::{named, AccelSocket, CgroupStatus, RuleCount, ShortcutTotals};
use crate::state::{pid_alive, AgentState, WORKLOADS_CGROUP};
use crate::sys::cgroup;
use crate::sys::machine::{self, Check};
use crate::telemetry::connection::StatsSnapshot;

/// The agent's record and the capture it installed.
fn installed(state_dir: &Path) -> Result<(AgentState, Box<dyn crate::capture::Installed>)> {
    let state = AgentState::load(state_dir)?;
    let capture = crate::capture::installed(state.mode, &state.bpffs_dir)?;
    Ok((state, capture))
}

fn require_root(what: &str) -> Result<()> {
    let missing = machine::missing_capabilities();
    if !missing.is_empty() {
        bail!("redirector {what} needs root or the capabilities {}: run it with sudo", missing.join(", "));
    }
    Ok(())
}

/// `redirector exec`: run a command in a fresh enrolled cgroup and wait for
/// it. Returns the command's exit code.
pub fn exec(state_dir: &Path, workload: Option<&str>, command: &[String]) -> Result<i32> {
    require_root("exec")?;
    let (state, maps) = installed(state_dir)?;
    if !state.agent_running() {
        bail!(
            "the agent (pid {}) is not running, so a captured command could not connect anywhere; start it with `redirector run`",
            state.pid
        );
    }
    let program = command.first().context("no command given")?;
    let name = match workload {
        Some(n) => n.to_string(),
        None => Path::new(program).file_name().map_or_else(|| "workload".into(), |f| f.to_string_lossy().into_owned()),
    };
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("workload name `{name}` is not usable as a cgroup name; use letters, digits, - and _");
    }
    let cg = state.cgroup_root.join(WORKLOADS_CGROUP).join(&name);
    cgroup::ensure(&cg)?;
    maps.enroll(&cg)?;

    let procs = CString::new(cg.join("cgroup.procs").as_os_str().as_encoded_bytes()).context("cgroup path")?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(&command[1..]);
    crate::sys::process::join_cgroup_before_exec(&mut cmd, procs);
    // The terminal's Ctrl-C reaches the command; we wait for it to finish.
    crate::sys::process::ignore_interrupts();
    let status = cmd.spawn().and_then(|mut c| c.wait());
    // Last one out turns off the light: the cgroup is unenrolled and goes
    // only when no other process of this workload is left in it (iptables
    // names the cgroup by path, so the rule goes before the directory).
    let empty = std::fs::read_to_string(cg.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty());
    if empty {
        let _ = maps.unenroll(&cg);
        cgroup::remove_if_empty(&cg);
    }
    let status = status.with_context(|| format!("cannot run `{program}`"))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// `redirector enroll` / `unenroll`.
pub fn enroll(state_dir: &Path, path: Option<&Path>, pid: Option<u32>, on: bool) -> Result<()> {
    let verb = if on { "enroll" } else { "unenroll" };
    require_root(verb)?;
    let mount = cgroup::cgroup2_mount()?;
    let cg = match (path, pid) {
        (Some(p), _) => cgroup::resolve(&mount, p)?,
        (None, Some(pid)) => cgroup::cgroup_of_pid(&mount, pid)?,
        (None, None) => bail!("give a cgroup path or --pid"),
    };
    let (state, maps) = installed(state_dir)?;
    if on && !cg.starts_with(&state.cgroup_root) {
        bail!(
            "cgroup {} is outside the capture subtree {}: the programs would never see it; enroll a cgroup under it or run the agent with a wider --cgroup",
            cg.display(),
            state.cgroup_root.display()
        );
    }
    if on && cg.starts_with(&state.proxy_cgroup) {
        bail!("cgroup {} is the proxy's own; it is never captured", cg.display());
    }
    let id = cgroup::cgroup_id(&cg)?;
    if on {
        maps.enroll(&cg)?;
        println!("enrolled {} (cgroup id {id})", cg.display());
    } else if maps.unenroll(&cg)? {
        println!("unenrolled {} (cgroup id {id})", cg.display());
    } else {
        println!("{} was not enrolled", cg.display());
    }
    Ok(())
}

#[derive(Serialize)]
struct Status {
    agent_pid: u32,
    agent_running: bool,
    mode: String,
    mode_reason: String,
    version: String,
    cgroup_root: String,
    bpffs_dir: String,
    /// eBPF: the pinned programs; iptables: our chains.
    programs_attached: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    iptables_rules: Vec<RuleCount>,
    /// eBPF mode: whether the sockmap shortcut is on, and its sockets.
    #[serde(skip_serializing_if = "Option::is_none")]
    accelerate: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shortcut_totals: Option<ShortcutTotals>,
    accelerated_sockets: Vec<AccelSocket>,
    handshakes_in_flight: usize,
    cgroups: Vec<CgroupStatus>,
    proxy: Option<StatsSnapshot>,
    /// The running agent's node: pods served, held, not enrolled (why).
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<serde_json::Value>,
}

/// `redirector status`.
pub fn status(state_dir: &Path, json: bool) -> Result<()> {
    let st = gather_status(state_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    print_summary(&st);
    print_cgroups(&st);
    print_open(&st);
    Ok(())
}

/// What `status` shows: the agent's record, its capture's view, and (when
/// it runs) the proxy's stats and the node's pods.
fn gather_status(state_dir: &Path) -> Result<Status> {
    let state = AgentState::load(state_dir)?;
    let view = crate::capture::installed(state.mode, &state.bpffs_dir)?.view(&state.cgroup_root)?;
    let running = state.agent_running();
    let proxy = if running { crate::admin::fetch_stats(state.admin).ok() } else { None };
    Ok(Status {
        agent_pid: state.pid,
        agent_running: running,
        mode: state.mode.name().to_string(),
        version: state.version.clone(),
        cgroup_root: state.cgroup_root.display().to_string(),
        bpffs_dir: state.bpffs_dir.display().to_string(),
        mode_reason: state.mode_reason.clone(),
        programs_attached: view.attached,
        handshakes_in_flight: view.in_flight,
        cgroups: view.cgroups,
        iptables_rules: view.rules,
        accelerate: view.accelerate,
        shortcut_totals: view.totals,
        accelerated_sockets: view.accelerated,
        proxy,
        node: if running {
            crate::admin::fetch(state.admin, "/node").ok().and_then(|t| serde_json::from_str(&t).ok())
        } else {
            None
        },
    })
}

fn print_summary(st: &Status) {
    let running = st.agent_running;
    println!(
        "agent      {} (pid {}), mode {}, version {}",
        if running { "running" } else { "NOT RUNNING" },
        st.agent_pid,
        st.mode,
        st.version
    );
    println!("cgroup     {}", st.cgroup_root);
    println!("pins       {}", st.bpffs_dir);
    if !st.mode_reason.is_empty() {
        println!("mode       {} ({})", st.mode, st.mode_reason);
    }
    println!("attached   {}", st.programs_attached.join(", "));
    println!("in flight  {} handshake(s)", st.handshakes_in_flight);
    if let (Some(on), Some(t)) = (st.accelerate, &st.shortcut_totals) {
        println!(
            "shortcut   {}: {} socket(s) in it now; since start {} message(s) / {} B redirected, {} passed to TCP",
            if on { "on" } else { "off" },
            st.accelerated_sockets.len(),
            t.msgs_redirected,
            t.bytes_redirected,
            t.msgs_passed
        );
    }
    if let Some(p) = &st.proxy {
        println!(
            "proxy      {} open, {} accepted, {} forwarded, {} failed, {} over limit, {} B up, {} B down",
            p.open.len(),
            p.accepted,
            p.forwarded,
            p.failed,
            p.rejected_over_limit,
            p.bytes_up,
            p.bytes_down
        );
    }
    if let Some(n) = &st.node {
        let list = |k: &str| -> Vec<String> {
            n[k].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect()
        };
        let (served, held) = (list("pods"), list("held"));
        if !served.is_empty() || !held.is_empty() || n["podProblems"].as_object().is_some_and(|m| !m.is_empty()) {
            println!(
                "pods       {} served ({}), config from {} (version {})",
                served.len(),
                served.join(", "),
                n["configSource"].as_str().unwrap_or("?"),
                n["configVersion"]
            );
            for (p, why) in n["podProblems"].as_object().into_iter().flatten() {
                let state = if held.contains(p) { "HELD" } else { "NOT ENROLLED" };
                println!("           {state} {p}: {}", why.as_str().unwrap_or_default());
            }
        }
        let rejected = list("configRejected");
        if !rejected.is_empty() {
            println!("config     {} object problem(s); the rest of the config applies:", rejected.len());
            for r in rejected {
                println!("           REJECTED {r}");
            }
        }
    }
}

fn print_cgroups(st: &Status) {
    println!();
    // Enrolled cgroups, the proxy's, and any with a capture decision get a
    // row each; cgroups that only ever connected unenrolled are summed in one
    // row (on a whole-machine attach that is every process).
    let cols: Vec<&str> = Decision::ALL.iter().map(|d| d.name()).collect();
    println!("{:<8} {:<44} {:>8}  {}", "ENROLLED", "CGROUP", "ID", cols.join("  "));
    let row = |enrolled: &str, path: &str, id: String, counters: &BTreeMap<&'static str, u64>| {
        let vals: Vec<String> =
            Decision::ALL.iter().map(|d| format!("{:>w$}", counters[d.name()], w = d.name().len())).collect();
        println!("{enrolled:<8} {path:<44} {id:>8}  {}", vals.join("  "));
    };
    let mut others: BTreeMap<&'static str, u64> = named(None);
    let mut other_count = 0;
    for c in &st.cgroups {
        let only_unenrolled = c.counters.iter().all(|(k, v)| *k == Decision::NotEnrolled.name() || *v == 0);
        if !c.enrolled && only_unenrolled && c.cgroup_id != 0 {
            other_count += 1;
            for (k, v) in &c.counters {
                *others.get_mut(k).expect("same keys") += v;
            }
            continue;
        }
        let path = c.path.clone().unwrap_or_else(|| "(cgroup removed)".into());
        row(if c.enrolled { "yes" } else { "no" }, &path, c.cgroup_id.to_string(), &c.counters);
    }
    if other_count > 0 {
        row("no", &format!("(other cgroups: {other_count})"), "-".into(), &others);
    }
}

fn print_open(st: &Status) {
    if let Some(p) = &st.proxy {
        if !p.open.is_empty() {
            println!();
            println!("{:<6} {:<28} {:<28} {:<28} {:>8}", "ID", "CLIENT", "ORIGINAL DST", "UPSTREAM LOCAL", "AGE ms");
            for c in &p.open {
                println!(
                    "{:<6} {:<28} {:<28} {:<28} {:>8}",
                    c.id,
                    c.client,
                    c.original_dst,
                    c.upstream_local.map_or_else(|| "-".into(), |a| a.to_string()),
                    c.age_ms
                );
            }
        }
    }
}

/// `redirector accelerate on|off`: the kill switch of the sockmap shortcut.
pub fn accelerate(state_dir: &Path, on: bool) -> Result<()> {
    require_root("accelerate")?;
    let (state, capture) = installed(state_dir)?;
    if on && !state.socket_storage {
        bail!("same-node acceleration needs per-socket storage; the agent keeps original destinations in a keyed map (tier ebpf-keyed); restart it with --storage socket on a kernel that has it");
    }
    capture.set_accelerate(on)?;
    println!("same-node acceleration {}", if on { "on (new connections)" } else { "off (every connection, at once)" });
    Ok(())
}

/// `redirector proxy-config routes|clusters|endpoints|all`.
pub fn proxy_config(state_dir: &Path, what: &str, json: bool) -> Result<()> {
    let state = AgentState::load(state_dir)?;
    if !state.agent_running() {
        bail!("the agent (pid {}) is not running; start it with `redirector run`", state.pid);
    }
    let body = crate::admin::fetch(state.admin, "/config_dump")
        .with_context(|| format!("reading /config_dump from the agent's admin endpoint {}", state.admin))?;
    let dump: serde_json::Value = serde_json::from_str(&body).context("the agent's /config_dump is not JSON")?;
    if json {
        let v = if what == "all" { dump.clone() } else { dump[what].clone() };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let empty = Vec::new();
    if what == "routes" || what == "all" {
        println!("{:<44} {:<28} {:<40} DESTINATIONS", "SERVICE", "RULE", "MATCH");
        for r in dump["routes"].as_array().unwrap_or(&empty) {
            let m: Vec<String> = r["match"].as_array().unwrap_or(&empty).iter().map(s).collect();
            println!("{:<44} {:<28} {:<40} {}", s(&r["service"]), s(&r["rule"]), m.join(" | "), s(&r["action"]));
        }
        println!();
        println!("{:<9} {:<28} {:<44} {:>6}  {:<44} WHY", "DIRECTION", "WORKLOAD", "SERVICE", "PORT", "LAYER");
        for p in dump["protocols"].as_array().unwrap_or(&empty) {
            println!(
                "{:<9} {:<28} {:<44} {:>6}  {:<44} {}",
                s(&p["direction"]),
                s(&p["workload"]),
                s(&p["service"]),
                s(&p["port"]),
                s(&p["layer"]),
                s(&p["why"])
            );
        }
    }
    if what == "clusters" || what == "all" {
        println!(
            "{:<44} {:<10} {:<12} {:>9} {:>9} {:>9}  OUTLIER",
            "SERVICE", "SUBSET", "LB", "MAXCONN", "PENDING", "MAXREQ"
        );
        for c in dump["clusters"].as_array().unwrap_or(&empty) {
            println!(
                "{:<44} {:<10} {:<12} {:>9} {:>9} {:>9}  {}",
                s(&c["service"]),
                s(&c["subset"]),
                s(&c["lb"]),
                s(&c["max_connections"]),
                s(&c["max_pending_requests"]),
                s(&c["max_requests"]),
                s(&c["outlier_detection"])
            );
        }
    }
    if what == "endpoints" || what == "all" {
        println!("{:<24} {:<9} {:<44} LABELS", "ENDPOINT", "HEALTH", "SERVICE");
        for svc in dump["services"].as_array().unwrap_or(&empty) {
            for e in svc["endpoints"].as_array().unwrap_or(&empty) {
                println!("{:<24} {:<9} {:<44} {}", s(&e["address"]), s(&e["health"]), s(&svc["hostname"]), e["labels"]);
            }
        }
    }
    Ok(())
}

/// `redirector analyze DIR`.
pub fn analyze(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!("{}: not a directory; pass the directory holding your YAML", dir.display());
    }
    let docs = match crate::mesh::source_dir::load_dir(dir) {
        Ok(d) => d,
        Err(problems) => return report_problems(&[], &problems),
    };
    match crate::mesh::Mesh::compile_in(&docs, &crate::mesh::Scope::new(&crate::config::agent_namespace())) {
        Ok(mesh) => {
            report_problems(&mesh.warnings, &[])?;
            let routes: usize = mesh.http_routes.values().map(Vec::len).sum();
            println!(
                "ok: {} services, {} HTTP route rules, {} destination rules",
                mesh.services.len(),
                routes,
                mesh.policies.len()
            );
            Ok(())
        }
        Err(problems) => report_problems(&docs.warnings, &problems),
    }
}

fn report_problems(warnings: &[crate::mesh::Problem], errors: &[crate::mesh::Problem]) -> Result<()> {
    for w in warnings {
        println!("warning: {w}");
    }
    for e in errors {
        println!("error: {e}");
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("{} error(s); the configuration would be rejected", errors.len()))
    }
}

/// `redirector verify`.
pub fn verify(json: bool) -> Result<()> {
    let mut checks = vec![Check::new("kernel", true, machine::kernel_release())];
    checks.push(Check::new(
        "btf",
        true,
        if machine::has_btf() {
            "/sys/kernel/btf/vmlinux".to_string()
        } else {
            "no /sys/kernel/btf/vmlinux (not needed: the programs use no CO-RE relocations)".to_string()
        },
    ));
    let mount = cgroup::cgroup2_mount();
    checks.push(match &mount {
        Ok(m) => Check::new("cgroup v2", true, m.display().to_string()),
        Err(e) => Check::new("cgroup v2", false, e.to_string()),
    });
    let missing = machine::missing_capabilities();
    checks.push(Check::new(
        "capabilities",
        missing.is_empty(),
        if missing.is_empty() {
            "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN".to_string()
        } else {
            format!("missing {}: run as root", missing.join(", "))
        },
    ));
    if crate::capture::features::cilium_socket_lb() {
        checks.push(Check::new("cilium socket-LB", true, crate::capture::features::CILIUM_ADVICE.to_string()));
    }
    let bpffs = Path::new("/sys/fs/bpf");
    let bpffs_ok = ebpf::is_bpffs(bpffs);
    checks.push(Check::new(
        "bpffs",
        bpffs_ok || missing.is_empty(),
        if bpffs_ok {
            "/sys/fs/bpf".to_string()
        } else if missing.is_empty() {
            "not mounted at /sys/fs/bpf; the agent mounts it at start".to_string()
        } else {
            "not mounted: mount -t bpf bpf /sys/fs/bpf".to_string()
        },
    ));
    // What the kernel offers, feature by feature, and the tier it allows;
    // then the programs through the verifier, as that tier loads them.
    let features = if missing.is_empty() { crate::capture::features::probe() } else { Vec::new() };
    let tier = if features.is_empty() { None } else { Some(crate::capture::features::tier(&features)) };
    let mut programs = Vec::new();
    if missing.is_empty() {
        let socket_storage = tier != Some(crate::capture::features::Tier::EbpfKeyed);
        match ebpf::check_programs(socket_storage) {
            Ok(progs) => {
                for p in &progs {
                    // The shortcut's program is optional below its tier.
                    let optional = p.program == redirector_common::programs::SK_MSG
                        && tier != Some(crate::capture::features::Tier::EbpfSockmap);
                    checks.push(Check::new(
                        format!("program {}", p.program),
                        p.ok || optional,
                        match (&p.error, p.verified_instructions, p.instructions) {
                            (Some(e), _, _) if optional => format!("not loaded ({e}); the shortcut is unavailable"),
                            (Some(e), _, _) => e.clone(),
                            (None, Some(n), Some(own)) => {
                                format!("verifier accepted ({n} instructions processed, {own} instructions)")
                            }
                            (None, Some(n), None) => format!("verifier accepted ({n} instructions processed)"),
                            (None, None, Some(own)) => format!("verifier accepted ({own} instructions)"),
                            (None, None, None) => "verifier accepted".into(),
                        },
                    ));
                }
                programs = progs;
            }
            Err(e) => checks.push(Check::new("programs", false, e.to_string())),
        }
    } else {
        checks.push(Check::new("programs", false, "not checked: loading programs needs root"));
    }
    let ok = checks.iter().all(|c| c.ok);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": ok,
                "checks": checks,
                "features": features,
                "programs": programs,
                "tier": tier.map(super::capture::features::Tier::name),
            }))?
        );
    } else {
        for c in &checks {
            println!("{:<4} {:<32} {}", if c.ok { "ok" } else { "FAIL" }, c.name, c.detail);
        }
        if let Some(t) = tier {
            println!();
            println!("{:<4} {:<52} NEEDED BY TIER", "", "KERNEL FEATURE");
            for f in &features {
                println!(
                    "{:<4} {:<52} {}{}",
                    if f.supported { "yes" } else { "no" },
                    f.name,
                    f.needed_by_names(),
                    f.error.as_deref().map(|e| format!(" (probe failed: {e})")).unwrap_or_default()
                );
            }
            println!();
            let lacking = crate::capture::features::missing_for(&features, crate::capture::features::Tier::EbpfSockmap);
            if lacking.is_empty() {
                println!("tier: {} (every feature present)", t.name());
            } else {
                println!("tier: {} (kernel {} lacks: {})", t.name(), machine::kernel_release(), lacking.join(", "));
            }
        }
    }
    if ok {
        Ok(())
    } else {
        Err(anyhow!("{} check(s) failed; see the rows marked FAIL", checks.iter().filter(|c| !c.ok).count()))
    }
}

/// `redirector uninstall`.
pub fn uninstall(state_dir: &Path) -> Result<()> {
    require_root("uninstall")?;
    let state = match AgentState::load(state_dir) {
        Ok(s) => Some(s),
        Err(crate::state::StateError::Missing(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let bpffs_dir =
        state.as_ref().map_or_else(|| PathBuf::from(crate::config::DEFAULT_BPFFS_DIR), |s| s.bpffs_dir.clone());
    if let Some(s) = &state {
        if s.agent_running() && s.pid != std::process::id() {
            println!("stopping the agent (pid {})", s.pid);
            crate::sys::process::signal(s.pid, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while pid_alive(s.pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if pid_alive(s.pid) {
                crate::sys::process::signal(s.pid, libc::SIGKILL);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    let mut removed = ebpf::remove_pins(&bpffs_dir);
    match iptables::remove_all() {
        Ok(n) => removed.extend((0..n).map(|i| PathBuf::from(format!("iptables rule {i}")))),
        // No iptables on the machine: nothing of ours can be there.
        Err(iptables::IptablesError::Missing(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let mut cgroups_removed = 0;
    if let Some(s) = &state {
        let workloads = s.cgroup_root.join(WORKLOADS_CGROUP);
        if let Ok(rd) = std::fs::read_dir(&workloads) {
            for e in rd.flatten() {
                if e.path().is_dir() && cgroup::remove_if_empty(&e.path()) {
                    cgroups_removed += 1;
                }
            }
        }
        cgroup::remove_if_empty(&workloads);
        if cgroup::remove_if_empty(&s.proxy_cgroup) {
            cgroups_removed += 1;
        }
        let _ = std::fs::remove_file(AgentState::path(state_dir));
    }
    if removed.is_empty() && state.is_none() {
        println!("nothing to uninstall (no pins under {})", bpffs_dir.display());
    } else {
        println!(
            "uninstalled: {} pin(s) and rule(s) removed ({}), {} cgroup(s) removed; nothing of ours is attached",
            removed.len(),
            bpffs_dir.display(),
            cgroups_removed
        );
    }
    Ok(())
}
