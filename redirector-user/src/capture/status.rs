//! What capture shows `redirector status`: the programs or chains in
//! place, each enrolled cgroup's counters, the same-node shortcut's
//! sockets, read from the pinned maps (eBPF) or the nat table (iptables).
//! Gathering only; `cmd` renders it.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Result;
use redirector_common::Decision;
use serde::Serialize;

use super::ebpf::{self, PinnedMaps};
use super::iptables;
use crate::sys::cgroup;

#[derive(Serialize)]
pub(crate) struct CgroupStatus {
    pub(crate) cgroup_id: u64,
    pub(crate) path: Option<String>,
    pub(crate) enrolled: bool,
    pub(crate) counters: BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
pub(crate) struct ShortcutTotals {
    pub(crate) msgs_redirected: u64,
    pub(crate) bytes_redirected: u64,
    pub(crate) msgs_passed: u64,
}

#[derive(Serialize)]
pub(crate) struct AccelSocket {
    pub(crate) local: String,
    pub(crate) remote: String,
    pub(crate) msgs: u64,
    pub(crate) bytes: u64,
    pub(crate) passed: u64,
}

fn sock_addr(addr: &[u32; 4], port: u32) -> String {
    let mut b = [0u8; 16];
    for (i, w) in addr.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let ip = std::net::Ipv6Addr::from(b);
    match ip.to_ipv4_mapped() {
        Some(v4) => format!("{v4}:{port}"),
        None => format!("[{ip}]:{port}"),
    }
}

#[derive(Serialize)]
pub(crate) struct RuleCount {
    pub(crate) rule: String,
    /// Connections the rule matched (nat sees a connection's first packet).
    pub(crate) packets: u64,
}

pub(crate) struct CaptureView {
    pub(crate) accelerate: Option<bool>,
    pub(crate) totals: Option<ShortcutTotals>,
    pub(crate) accelerated: Vec<AccelSocket>,
    pub(crate) attached: Vec<String>,
    pub(crate) in_flight: usize,
    pub(crate) cgroups: Vec<CgroupStatus>,
    pub(crate) rules: Vec<RuleCount>,
}

pub(crate) fn ebpf_view(bpffs_dir: &Path, cgroup_root: &Path) -> Result<CaptureView> {
    let maps = PinnedMaps::open(bpffs_dir)?;
    let enrolled = maps.enrolled()?;
    let counters = maps.counters()?;
    let mut ids: Vec<u64> = enrolled.clone();
    ids.extend(counters.keys().copied().filter(|k| *k != 0));
    ids.sort_unstable();
    ids.dedup();
    let paths = cgroup_paths(cgroup_root, &ids);
    let mut cgroups: Vec<CgroupStatus> = ids
        .iter()
        .map(|id| CgroupStatus {
            cgroup_id: *id,
            path: paths.get(id).map(|p| p.display().to_string()),
            enrolled: enrolled.contains(id),
            counters: named(counters.get(id)),
        })
        .collect();
    if let Some(global) = counters.get(&0) {
        cgroups.push(CgroupStatus {
            cgroup_id: 0,
            path: Some("(kernel-wide: sockops)".into()),
            enrolled: false,
            counters: named(Some(global)),
        });
    }
    let accelerated = maps
        .accelerated_sockets()?
        .into_iter()
        .map(|(k, c)| AccelSocket {
            local: sock_addr(&k.local_addr, k.local_port),
            remote: sock_addr(&k.remote_addr, k.remote_port),
            msgs: c.msgs,
            bytes: c.bytes,
            passed: c.passed,
        })
        .collect();
    let (msgs_redirected, bytes_redirected, msgs_passed) = maps.accel_totals()?;
    Ok(CaptureView {
        totals: Some(ShortcutTotals { msgs_redirected, bytes_redirected, msgs_passed }),
        accelerate: Some(maps.accelerate()?),
        accelerated,
        attached: maps.links(),
        in_flight: maps.pending()?,
        cgroups,
        rules: Vec::new(),
    })
}

/// iptables mode: enrolled workloads are the cgroup rules, and each rule's
/// packet counter is its count of connections.
pub(crate) fn iptables_view() -> Result<CaptureView> {
    let mount = cgroup::cgroup2_mount()?;
    let counts = iptables::rule_counters()?;
    let mut cgroups = Vec::new();
    for rel in iptables::enrolled()? {
        let path = mount.join(rel.trim_start_matches('/'));
        let redirected: u64 = counts
            .iter()
            .filter(|(rule, _)| {
                rule.ends_with(&format!("-j {}", iptables::CHAIN_REDIRECT))
                    && (rule.contains(&format!("--path \"{rel}\"")) || rule.contains(&format!("--path {rel} ")))
            })
            .map(|(_, n)| *n)
            .sum();
        let mut counters = named(None);
        counters.insert(Decision::Redirected.name(), redirected);
        cgroups.push(CgroupStatus {
            cgroup_id: cgroup::cgroup_id(&path).unwrap_or(0),
            path: Some(path.display().to_string()),
            enrolled: true,
            counters,
        });
    }
    let attached = if counts.is_empty() {
        Vec::new()
    } else {
        [iptables::CHAIN_OUTPUT, iptables::CHAIN_PREROUTING, iptables::CHAIN_REDIRECT, iptables::CHAIN_INBOUND]
            .iter()
            .map(|c| format!("nat/{c}"))
            .collect()
    };
    Ok(CaptureView {
        totals: None,
        accelerate: None,
        accelerated: Vec::new(),
        attached,
        in_flight: 0,
        cgroups,
        rules: counts.into_iter().map(|(rule, packets)| RuleCount { rule, packets }).collect(),
    })
}

/// cgroup ids to paths, for the cgroups under `root` (bounded walk).
fn cgroup_paths(root: &Path, want: &[u64]) -> BTreeMap<u64, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    let mut seen = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        seen += 1;
        if seen > 50_000 || out.len() == want.len() {
            break;
        }
        if let Ok(m) = std::fs::metadata(&dir) {
            if want.contains(&m.ino()) {
                out.insert(m.ino(), dir.clone());
            }
        }
        if depth < 16 {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push((e.path(), depth + 1));
                    }
                }
            }
        }
    }
    out
}

pub(crate) fn named(c: Option<&ebpf::DecisionCounts>) -> BTreeMap<&'static str, u64> {
    Decision::ALL.iter().map(|d| (d.name(), c.map_or(0, |c| c[*d as usize]))).collect()
}
