//! The iptables capture mode: the nat rules Istio's sidecar capture uses,
//! in chains of our own, for the workloads' cgroups (`-m cgroup --path`).
//!
//! ```text
//! nat OUTPUT      -p tcp -j REDIRECTOR_OUTPUT
//! REDIRECTOR_OUTPUT
//!   -m mark --mark <proxy mark>           -j RETURN   the proxy's own sockets
//!   -m cgroup --path <proxy cgroup>       -j RETURN
//!   -d 127.0.0.0/8 (::1/128)              -j RETURN   unless captureLoopback
//!   -p tcp --dport <excluded port>        -j RETURN
//!   -d <excluded cidr>                    -j RETURN
//!   -m cgroup --path <enrolled cgroup>    -j REDIRECTOR_REDIRECT   one per workload
//! REDIRECTOR_REDIRECT  -p tcp -j REDIRECT --to-ports 15001
//! nat PREROUTING  -p tcp -j REDIRECTOR_PREROUTING
//! REDIRECTOR_PREROUTING  -p tcp --dport <inbound port> -j REDIRECTOR_INBOUND
//! REDIRECTOR_INBOUND     -p tcp -j REDIRECT --to-ports 15006
//! ```
//!
//! The same rules go into ip6tables. Conntrack answers `SO_ORIGINAL_DST`
//! for the proxy. Chains are installed atomically with `iptables-restore
//! --noflush` and removed exactly (the two jumps, then our chains) on exit,
//! on `uninstall`, and before a start (a crashed run's leftovers).

#![forbid(unsafe_code)]

use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;
use tracing::info;

use crate::config::AgentConfig;

pub const CHAIN_OUTPUT: &str = "REDIRECTOR_OUTPUT";
pub const CHAIN_PREROUTING: &str = "REDIRECTOR_PREROUTING";
pub const CHAIN_REDIRECT: &str = "REDIRECTOR_REDIRECT";
pub const CHAIN_INBOUND: &str = "REDIRECTOR_INBOUND";
/// DNS capture: enrolled workloads' UDP/53 to the agent's DNS server.
pub const CHAIN_DNS: &str = "REDIRECTOR_DNS";
pub const CHAIN_DNS_REDIRECT: &str = "REDIRECTOR_DNS_REDIRECT";
const CHAINS: [&str; 6] =
    [CHAIN_OUTPUT, CHAIN_PREROUTING, CHAIN_REDIRECT, CHAIN_INBOUND, CHAIN_DNS, CHAIN_DNS_REDIRECT];

#[derive(Debug, Error)]
pub enum IptablesError {
    #[error("{0} is not installed; install it with `apt-get install iptables`")]
    Missing(&'static str),
    #[error("{tool} refused the rules: {message}; the kernel may lack the nat table or the cgroup match (CONFIG_NETFILTER_XT_MATCH_CGROUP)")]
    Refused { tool: &'static str, message: String },
    #[error("a conflicting rule is installed: `{0}`; remove it (is Istio's sidecar capture or another mesh active in this namespace?)")]
    Conflict(String),
    #[error("running {tool}: {source}")]
    Run { tool: &'static str, source: std::io::Error },
    #[error("cgroup {0} is not under the cgroup v2 mount")]
    NotUnderMount(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    const ALL: [Family; 2] = [Family::V4, Family::V6];
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
}

/// What the rules are made from.
#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub proxy_mark: u32,
    /// The proxy's cgroup, relative to the cgroup2 mount ("/redirector-proxy").
    pub proxy_cgroup: String,
    pub capture_loopback: bool,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<(IpAddr, u8)>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub inbound_ports: Vec<u16>,
    /// Enrolled cgroups, relative to the cgroup2 mount.
    pub enrolled: Vec<String>,
    /// The agent's DNS server port, when DNS is captured.
    pub dns_port: Option<u16>,
}

impl RuleSpec {
    pub fn from_config(cfg: &AgentConfig, proxy_cgroup: String, enrolled: Vec<String>) -> RuleSpec {
        RuleSpec {
            proxy_mark: cfg.proxy_mark,
            proxy_cgroup,
            capture_loopback: cfg.capture_loopback,
            exclude_ports: cfg.exclude_ports.clone(),
            exclude_cidrs: cfg.exclude_cidrs.iter().map(|c| (c.addr, c.prefix_len)).collect(),
            outbound_port: cfg.outbound_port,
            inbound_port: cfg.inbound_port,
            inbound_ports: cfg.inbound_ports.clone(),
            enrolled,
            dns_port: cfg.dns_capture.then_some(cfg.dns_port),
        }
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The enrolled-workload rule, as `iptables -A` / `-D` arguments after the
/// chain name.
pub fn enroll_rule_args(cgroup_rel: &str) -> Vec<String> {
    vec![
        "-p".into(),
        "tcp".into(),
        "-m".into(),
        "cgroup".into(),
        "--path".into(),
        cgroup_rel.into(),
        "-j".into(),
        CHAIN_REDIRECT.into(),
    ]
}

/// The `iptables-restore --noflush` input that creates (or resets) our
/// chains and jumps for one family.
pub fn ruleset(spec: &RuleSpec, family: Family) -> String {
    let mut r = String::from("*nat\n");
    for c in CHAINS {
        r.push_str(&format!(":{c} - [0:0]\n"));
    }
    r.push_str(&format!("-A {CHAIN_REDIRECT} -p tcp -j REDIRECT --to-ports {}\n", spec.outbound_port));
    r.push_str(&format!("-A {CHAIN_INBOUND} -p tcp -j REDIRECT --to-ports {}\n", spec.inbound_port));
    r.push_str(&format!("-A {CHAIN_OUTPUT} -m mark --mark {} -j RETURN\n", spec.proxy_mark));
    r.push_str(&format!("-A {CHAIN_OUTPUT} -m cgroup --path {} -j RETURN\n", quote(&spec.proxy_cgroup)));
    if !spec.capture_loopback {
        r.push_str(&format!("-A {CHAIN_OUTPUT} -d {} -j RETURN\n", family.loopback()));
    }
    for p in &spec.exclude_ports {
        r.push_str(&format!("-A {CHAIN_OUTPUT} -p tcp --dport {p} -j RETURN\n"));
    }
    for (addr, len) in &spec.exclude_cidrs {
        let matches = matches!((addr, family), (IpAddr::V4(_), Family::V4) | (IpAddr::V6(_), Family::V6));
        if matches {
            r.push_str(&format!("-A {CHAIN_OUTPUT} -d {addr}/{len} -j RETURN\n"));
        }
    }
    for cg in &spec.enrolled {
        r.push_str(&format!("-A {CHAIN_OUTPUT} -p tcp -m cgroup --path {} -j {CHAIN_REDIRECT}\n", quote(cg)));
    }
    for p in &spec.inbound_ports {
        r.push_str(&format!("-A {CHAIN_PREROUTING} -p tcp --dport {p} -j {CHAIN_INBOUND}\n"));
    }
    if let Some(dns) = spec.dns_port {
        r.push_str(&format!("-A {CHAIN_DNS_REDIRECT} -p udp -j REDIRECT --to-ports {dns}\n"));
        r.push_str(&format!("-A {CHAIN_DNS} -m mark --mark {} -j RETURN\n", spec.proxy_mark));
        r.push_str(&format!("-A {CHAIN_DNS} -m cgroup --path {} -j RETURN\n", quote(&spec.proxy_cgroup)));
        for cg in &spec.enrolled {
            r.push_str(&format!("-A {CHAIN_DNS} -m cgroup --path {} -j {CHAIN_DNS_REDIRECT}\n", quote(cg)));
        }
    }
    r.push_str(&format!("-A OUTPUT -p tcp -j {CHAIN_OUTPUT}\n"));
    if spec.dns_port.is_some() {
        r.push_str(&format!("-A OUTPUT -p udp --dport 53 -j {CHAIN_DNS}\n"));
    }
    r.push_str(&format!("-A PREROUTING -p tcp -j {CHAIN_PREROUTING}\n"));
    r.push_str("COMMIT\n");
    r
}

fn run_tool(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, IptablesError> {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            IptablesError::Missing(tool)
        } else {
            IptablesError::Run { tool, source: e }
        }
    })?;
    if let Some(input) = stdin {
        let mut si = child.stdin.take().expect("piped stdin");
        si.write_all(input.as_bytes()).map_err(|source| IptablesError::Run { tool, source })?;
    }
    let out = child.wait_with_output().map_err(|source| IptablesError::Run { tool, source })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        return Err(IptablesError::Refused {
            tool,
            message: msg.lines().next().unwrap_or("failed").trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn save(family: Family) -> Result<String, IptablesError> {
    run_tool(family.save(), &["-t", "nat"], None)
}

/// Rules in the nat table that would fight ours: another REDIRECT to our
/// ports outside our chains, or Istio's own chains.
pub fn conflicts_in(saved: &str, ports: &[u16]) -> Option<String> {
    saved.lines().find_map(|l| {
        if !l.starts_with("-A ") || CHAINS.iter().any(|c| l.starts_with(&format!("-A {c} "))) {
            return None;
        }
        if l.contains("ISTIO_") {
            return Some(l.to_string());
        }
        if l.contains("REDIRECT") && ports.iter().any(|p| l.contains(&format!("--to-ports {p}"))) {
            return Some(l.to_string());
        }
        None
    })
}

/// Our rules as they stand in a saved nat table (jump rules and our chains).
pub fn our_rules_in(saved: &str) -> Vec<String> {
    saved
        .lines()
        .filter(|l| {
            l.starts_with("-A ")
                && CHAINS.iter().any(|c| l.contains(&format!("-j {c}")) || l.starts_with(&format!("-A {c} ")))
        })
        .map(str::to_string)
        .collect()
}

/// Enrolled cgroups (relative paths) found in a saved nat table.
pub fn enrolled_in(saved: &str) -> Vec<String> {
    let prefix = format!("-A {CHAIN_OUTPUT} ");
    saved
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.ends_with(&format!("-j {CHAIN_REDIRECT}")))
        .filter_map(|l| {
            let rest = l.split("--path ").nth(1)?;
            let rest = rest.trim_start();
            if let Some(q) = rest.strip_prefix('"') {
                q.split('"').next().map(str::to_string)
            } else {
                rest.split_whitespace().next().map(str::to_string)
            }
        })
        .collect()
}

/// Remove exactly our jumps and chains from both families. Returns how many
/// rules were removed.
pub fn remove_all() -> Result<usize, IptablesError> {
    let mut removed = 0;
    for family in Family::ALL {
        let saved = save(family)?;
        let ours = our_rules_in(&saved);
        if ours.is_empty() && !CHAINS.iter().any(|c| saved.contains(&format!(":{c} "))) {
            continue;
        }
        removed += ours.len();
        // Delete the jumps from the built-in chains, then flush and delete
        // our chains, in one transaction.
        let mut r = String::from("*nat\n");
        for l in &ours {
            if l.starts_with("-A OUTPUT ") || l.starts_with("-A PREROUTING ") {
                r.push_str(&l.replacen("-A ", "-D ", 1));
                r.push('\n');
            }
        }
        for c in CHAINS {
            if saved.contains(&format!(":{c} ")) {
                r.push_str(&format!("-F {c}\n"));
            }
        }
        for c in CHAINS {
            if saved.contains(&format!(":{c} ")) {
                r.push_str(&format!("-X {c}\n"));
            }
        }
        r.push_str("COMMIT\n");
        run_tool(family.restore(), &["--noflush"], Some(&r))?;
    }
    Ok(removed)
}

/// The relative path iptables' cgroup match wants.
pub fn relative(mount: &Path, cgroup: &Path) -> Result<String, IptablesError> {
    let rel = cgroup.strip_prefix(mount).map_err(|_| IptablesError::NotUnderMount(cgroup.into()))?;
    Ok(format!("/{}", rel.display()))
}

/// The installed iptables capture. Dropping it removes the rules, unless
/// they were handed to the next agent ([`IptablesCapture::keep_installed`]).
pub struct IptablesCapture {
    keep: std::sync::atomic::AtomicBool,
}

impl IptablesCapture {
    /// Clean stale chains (keeping the enrolled workloads they name), check
    /// for conflicts, then install the rules for both families at once.
    pub fn install(cfg: &AgentConfig, proxy_cgroup_rel: String) -> Result<IptablesCapture, IptablesError> {
        let mut enrolled = Vec::new();
        for family in Family::ALL {
            let saved = save(family)?;
            if let Some(c) = conflicts_in(&saved, &[cfg.outbound_port, cfg.inbound_port]) {
                return Err(IptablesError::Conflict(c));
            }
            for e in enrolled_in(&saved) {
                if !enrolled.contains(&e) {
                    enrolled.push(e);
                }
            }
        }
        let stale = remove_all()?;
        if stale > 0 {
            info!(rules = stale, "removed iptables rules a previous run left");
        }
        // Keep only workloads whose cgroup still exists.
        let mount = crate::sys::cgroup::cgroup2_mount().ok();
        enrolled.retain(|e| {
            mount.as_ref().is_some_and(|m| m.join(e.trim_start_matches('/')).join("cgroup.procs").exists())
        });
        let spec = RuleSpec::from_config(cfg, proxy_cgroup_rel, enrolled);
        let mut installed = Vec::new();
        for family in Family::ALL {
            if let Err(e) = run_tool(family.restore(), &["--noflush"], Some(&ruleset(&spec, family))) {
                let _ = remove_all();
                let _ = installed;
                return Err(e);
            }
            installed.push(family);
        }
        info!(
            chains = ?CHAINS,
            enrolled = spec.enrolled.len(),
            "iptables capture installed"
        );
        Ok(IptablesCapture { keep: false.into() })
    }

    /// Take over the rules an agent with the same settings installed, as
    /// they are (no gap); install them if there are none.
    pub fn adopt(cfg: &AgentConfig, proxy_cgroup_rel: String) -> Result<IptablesCapture, IptablesError> {
        if our_rules_in(&save(Family::V4)?).is_empty() {
            return Self::install(cfg, proxy_cgroup_rel);
        }
        info!(chains = ?CHAINS, "iptables capture adopted from the agent handing over");
        Ok(IptablesCapture { keep: false.into() })
    }

    /// The next agent serves with these rules: leave them when dropped.
    pub fn keep_installed(&self) {
        self.keep.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for IptablesCapture {
    fn drop(&mut self) {
        if self.keep.load(std::sync::atomic::Ordering::Relaxed) {
            info!("iptables capture left in place for the agent that took over");
            return;
        }
        match remove_all() {
            Ok(n) => info!(rules = n, "iptables capture removed"),
            Err(e) => tracing::warn!(error = %e, "removing the iptables capture"),
        }
    }
}

fn rule_tool(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

/// Append (`-A`) or delete (`-D`) a workload's rule in every family where
/// that changes something. Returns whether any family had the rule.
fn edit_enroll_rule(op: &str, cgroup_rel: &str) -> Result<bool, IptablesError> {
    let mut had = false;
    for family in Family::ALL {
        let present = enrolled_in(&save(family)?).iter().any(|e| e == cgroup_rel);
        had |= present;
        if present == (op == "-A") {
            continue;
        }
        let mut args = vec!["-w".to_string(), "-t".into(), "nat".into(), op.into(), CHAIN_OUTPUT.into()];
        args.extend(enroll_rule_args(cgroup_rel));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_tool(rule_tool(family), &a, None)?;
        // The workload's DNS rule, where DNS is captured.
        let saved = save(family)?;
        let dns_rule = format!("-A {CHAIN_DNS} -m cgroup --path {cgroup_rel} -j {CHAIN_DNS_REDIRECT}");
        let has_dns = saved.lines().any(|l| {
            l == dns_rule
                || l == format!("-A {CHAIN_DNS} -m cgroup --path {} -j {CHAIN_DNS_REDIRECT}", quote(cgroup_rel))
        });
        if saved.contains(&format!(":{CHAIN_DNS} ")) && has_dns != (op == "-A") {
            let args =
                ["-w", "-t", "nat", op, CHAIN_DNS, "-m", "cgroup", "--path", cgroup_rel, "-j", CHAIN_DNS_REDIRECT];
            run_tool(rule_tool(family), &args, None)?;
        }
    }
    Ok(had)
}

/// Enrollment in iptables mode: a rule per workload cgroup.
pub fn enroll(cgroup_rel: &str) -> Result<(), IptablesError> {
    edit_enroll_rule("-A", cgroup_rel).map(|_| ())
}

/// Returns whether the cgroup was enrolled.
pub fn unenroll(cgroup_rel: &str) -> Result<bool, IptablesError> {
    edit_enroll_rule("-D", cgroup_rel)
}

/// Enrolled cgroups (relative paths), from the IPv4 table.
pub fn enrolled() -> Result<Vec<String>, IptablesError> {
    Ok(enrolled_in(&save(Family::V4)?))
}

/// Packets (= connections: nat sees only the first packet) that each
/// REDIRECTOR_OUTPUT rule matched, summed over both families:
/// (rule target description, packets).
pub fn rule_counters() -> Result<Vec<(String, u64)>, IptablesError> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for family in Family::ALL {
        let saved = run_tool(family.save(), &["-c", "-t", "nat"], None)?;
        for l in saved.lines() {
            // [packets:bytes] -A CHAIN ...
            let Some(rest) = l.strip_prefix('[') else { continue };
            let Some((counts, rule)) = rest.split_once("] ") else { continue };
            if !rule.starts_with(&format!("-A {CHAIN_OUTPUT} ")) {
                continue;
            }
            let packets: u64 = counts.split(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
            let key = rule.trim_start_matches(&format!("-A {CHAIN_OUTPUT} ")).to_string();
            match out.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += packets,
                None => out.push((key, packets)),
            }
        }
    }
    Ok(out)
}

/// The chain holding a pod's outbound capture, in the pod's own namespace.
pub const POD_CHAIN_OUTPUT: &str = "REDIRECTOR_POD_OUTPUT";
/// The chain holding a pod's inbound capture (to the plaintext listener).
pub const POD_CHAIN_INBOUND: &str = "REDIRECTOR_POD_INBOUND";

/// Run an iptables tool inside a pod's network namespace.
fn run_in_pod(
    ns: &crate::sys::netns::Netns,
    tool: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, IptablesError> {
    let mut cmd = Command::new("nsenter");
    // The descriptor the agent holds: the namespace stays reachable even
    // when the path it was found under (a process's) is gone.
    cmd.arg(format!("--net=/proc/{}/fd/{}", std::process::id(), ns.as_fd().as_raw_fd()))
        .arg(tool)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| IptablesError::Run { tool, source: e })?;
    if let Some(input) = stdin {
        use std::io::Write;
        let _ = child.stdin.take().expect("piped stdin").write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| IptablesError::Run { tool, source: e })?;
    if !out.status.success() {
        return Err(IptablesError::Refused {
            tool,
            message: String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("failed").trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A pod's rules: every TCP connection its processes make goes to the
/// proxy's outbound listener in the pod's namespace, except the proxy's own
/// (marked), loopback and the configured exclusions; DNS to the pod's DNS
/// listener. The namespace is the pod's alone, so no cgroup match is
/// needed (Istio's sidecar rules have the same shape).
pub fn pod_ruleset(cfg: &AgentConfig, family: Family, outbound: bool) -> String {
    let mut r = String::from("*nat\n");
    // Inbound: every TCP connection to the pod goes to the plaintext
    // listener, except HBONE, the proxy's own ports and the pod's own
    // traffic to itself (the proxy delivering to the app).
    r.push_str(&format!(":{POD_CHAIN_INBOUND} - [0:0]\n"));
    r.push_str(&format!("-A PREROUTING -j {POD_CHAIN_INBOUND}\n"));
    for p in [cfg.hbone_port, cfg.inbound_port, cfg.outbound_port] {
        r.push_str(&format!("-A {POD_CHAIN_INBOUND} -p tcp --dport {p} -j RETURN\n"));
    }
    r.push_str(&format!("-A {POD_CHAIN_INBOUND} -i lo -j RETURN\n"));
    r.push_str(&format!("-A {POD_CHAIN_INBOUND} -p tcp -j REDIRECT --to-ports {}\n", cfg.inbound_port));
    if !outbound {
        r.push_str("COMMIT\n");
        return r;
    }
    r.push_str(&format!(":{POD_CHAIN_OUTPUT} - [0:0]\n"));
    r.push_str(&format!("-A OUTPUT -j {POD_CHAIN_OUTPUT}\n"));
    r.push_str(&format!("-A {POD_CHAIN_OUTPUT} -m mark --mark {} -j RETURN\n", cfg.proxy_mark));
    r.push_str(&format!("-A {POD_CHAIN_OUTPUT} -d {} -j RETURN\n", family.loopback()));
    for p in &cfg.exclude_ports {
        r.push_str(&format!("-A {POD_CHAIN_OUTPUT} -p tcp --dport {p} -j RETURN\n"));
    }
    for c in &cfg.exclude_cidrs {
        if c.addr.is_ipv4() == (family == Family::V4) {
            r.push_str(&format!("-A {POD_CHAIN_OUTPUT} -d {}/{} -j RETURN\n", c.addr, c.prefix_len));
        }
    }
    if cfg.dns_capture {
        r.push_str(&format!("-A {POD_CHAIN_OUTPUT} -p udp --dport 53 -j REDIRECT --to-ports {}\n", cfg.dns_port));
    }
    r.push_str(&format!("-A {POD_CHAIN_OUTPUT} -p tcp -j REDIRECT --to-ports {}\n", cfg.outbound_port));
    r.push_str("COMMIT\n");
    r
}

/// Install a pod's rules in its namespace (replacing what a crashed run
/// left there).
pub fn install_in_pod(ns: &crate::sys::netns::Netns, cfg: &AgentConfig, outbound: bool) -> Result<(), IptablesError> {
    remove_in_pod(ns)?;
    for family in Family::ALL {
        if let Err(e) = run_in_pod(ns, family.restore(), &["--noflush"], Some(&pod_ruleset(cfg, family, outbound))) {
            let _ = remove_in_pod(ns);
            return Err(e);
        }
    }
    Ok(())
}

/// Whether the pod's namespace has our rules (both chains, or the inbound
/// one without `outbound`), in every family.
pub fn in_pod_present(ns: &crate::sys::netns::Netns, outbound: bool) -> bool {
    Family::ALL.iter().all(|f| {
        run_in_pod(ns, f.save(), &["-t", "nat"], None).is_ok_and(|saved| {
            saved.contains(&format!(":{POD_CHAIN_INBOUND} "))
                && (!outbound || saved.contains(&format!(":{POD_CHAIN_OUTPUT} ")))
        })
    })
}

/// Remove exactly the pod's rules from its namespace.
pub fn remove_in_pod(ns: &crate::sys::netns::Netns) -> Result<(), IptablesError> {
    for family in Family::ALL {
        let saved = run_in_pod(ns, family.save(), &["-t", "nat"], None)?;
        let mut r = String::from("*nat\n");
        let mut any = false;
        for chain in [POD_CHAIN_OUTPUT, POD_CHAIN_INBOUND] {
            if !saved.contains(&format!(":{chain} ")) {
                continue;
            }
            any = true;
            for l in saved.lines() {
                if (l.starts_with("-A OUTPUT ") || l.starts_with("-A PREROUTING "))
                    && l.ends_with(&format!("-j {chain}"))
                {
                    r.push_str(&l.replacen("-A ", "-D ", 1));
                    r.push('\n');
                }
            }
            r.push_str(&format!("-F {chain}\n-X {chain}\n"));
        }
        r.push_str("COMMIT\n");
        if any {
            run_in_pod(ns, family.restore(), &["--noflush"], Some(&r))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RuleSpec {
        RuleSpec {
            proxy_mark: 1337,
            proxy_cgroup: "/t/redirector-proxy".into(),
            capture_loopback: false,
            exclude_ports: vec![22],
            exclude_cidrs: vec![("198.18.0.3".parse().unwrap(), 32), ("2001:2::9".parse().unwrap(), 128)],
            outbound_port: 15001,
            inbound_port: 15006,
            inbound_ports: vec![8080],
            enrolled: vec!["/t/app".into()],
            dns_port: Some(15053),
        }
    }

    #[test]
    fn the_ruleset_is_istios_capture_in_our_chains() {
        let r = ruleset(&spec(), Family::V4);
        let expected = [
            ":REDIRECTOR_OUTPUT - [0:0]",
            "-A REDIRECTOR_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A REDIRECTOR_INBOUND -p tcp -j REDIRECT --to-ports 15006",
            "-A REDIRECTOR_OUTPUT -m mark --mark 1337 -j RETURN",
            "-A REDIRECTOR_OUTPUT -m cgroup --path \"/t/redirector-proxy\" -j RETURN",
            "-A REDIRECTOR_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A REDIRECTOR_OUTPUT -p tcp --dport 22 -j RETURN",
            "-A REDIRECTOR_OUTPUT -d 198.18.0.3/32 -j RETURN",
            "-A REDIRECTOR_OUTPUT -p tcp -m cgroup --path \"/t/app\" -j REDIRECTOR_REDIRECT",
            "-A REDIRECTOR_PREROUTING -p tcp --dport 8080 -j REDIRECTOR_INBOUND",
            "-A OUTPUT -p tcp -j REDIRECTOR_OUTPUT",
            "-A PREROUTING -p tcp -j REDIRECTOR_PREROUTING",
            // DNS: enrolled workloads' UDP/53 to the agent's DNS server.
            "-A OUTPUT -p udp --dport 53 -j REDIRECTOR_DNS",
            "-A REDIRECTOR_DNS -m mark --mark 1337 -j RETURN",
            "-A REDIRECTOR_DNS -m cgroup --path \"/t/app\" -j REDIRECTOR_DNS_REDIRECT",
            "-A REDIRECTOR_DNS_REDIRECT -p udp -j REDIRECT --to-ports 15053",
        ];
        for e in expected {
            assert!(r.lines().any(|l| l == e), "missing `{e}` in\n{r}");
        }
        assert!(!r.contains("2001:2::9"), "IPv6 prefixes stay out of the IPv4 table");
        let r6 = ruleset(&spec(), Family::V6);
        assert!(r6.contains("-d ::1/128 -j RETURN") && r6.contains("-d 2001:2::9/128 -j RETURN"));
        // Exclusions come before the workload rule: first match wins.
        let pos = |s: &str| r.find(s).unwrap();
        assert!(pos("--dport 22 -j RETURN") < pos("-j REDIRECTOR_REDIRECT\n"));
    }

    #[test]
    fn enrolled_workloads_and_our_rules_are_read_back_from_iptables_save() {
        let saved = "*nat\n:OUTPUT ACCEPT [0:0]\n:REDIRECTOR_OUTPUT - [0:0]\n\
            -A OUTPUT -p tcp -j REDIRECTOR_OUTPUT\n\
            -A OUTPUT -p tcp -j DOCKER\n\
            -A REDIRECTOR_OUTPUT -p tcp -m cgroup --path \"/t/app one\" -j REDIRECTOR_REDIRECT\n\
            -A REDIRECTOR_OUTPUT -p tcp -m cgroup --path /t/b -j REDIRECTOR_REDIRECT\n\
            -A REDIRECTOR_OUTPUT -m cgroup --path \"/t/redirector-proxy\" -j RETURN\nCOMMIT\n";
        assert_eq!(enrolled_in(saved), vec!["/t/app one".to_string(), "/t/b".to_string()]);
        let ours = our_rules_in(saved);
        assert_eq!(ours.len(), 4);
        assert!(!ours.iter().any(|l| l.contains("DOCKER")));
    }

    #[test]
    fn istio_chains_and_foreign_redirects_to_our_ports_conflict() {
        let istio = "-A OUTPUT -p tcp -j ISTIO_OUTPUT\n";
        assert!(conflicts_in(istio, &[15001]).is_some());
        let foreign = "-A OUTPUT -p tcp -j REDIRECT --to-ports 15001\n";
        assert!(conflicts_in(foreign, &[15001]).is_some());
        let ours = "-A REDIRECTOR_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n";
        assert!(conflicts_in(ours, &[15001]).is_none());
        assert!(conflicts_in("-A OUTPUT -j REDIRECT --to-ports 8080\n", &[15001]).is_none());
    }
}
