//! What the running kernel can do, asked of the kernel itself (never read
//! from a version string): the program types, map types and helpers each
//! capture tier needs, and BTF. `redirector verify` prints the table.

#![forbid(unsafe_code)]

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper};
use serde::Serialize;

/// Capture tiers, richest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Tier {
    /// eBPF capture with the sockmap shortcut available.
    #[serde(rename = "ebpf+sockmap")]
    EbpfSockmap,
    /// eBPF capture with per-socket storage, no shortcut.
    #[serde(rename = "ebpf")]
    Ebpf,
    /// eBPF capture without per-socket storage: original destinations in
    /// keyed maps; no shortcut.
    #[serde(rename = "ebpf-keyed")]
    EbpfKeyed,
    /// iptables capture.
    #[serde(rename = "iptables")]
    Iptables,
}

/// The eBPF tiers, richest first.
pub const EBPF_TIERS: [Tier; 3] = [Tier::EbpfSockmap, Tier::Ebpf, Tier::EbpfKeyed];

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::EbpfSockmap => "ebpf+sockmap",
            Tier::Ebpf => "ebpf",
            Tier::EbpfKeyed => "ebpf-keyed",
            Tier::Iptables => "iptables",
        }
    }
}

/// One probed feature and the tiers that need it.
#[derive(Debug, Clone, Serialize)]
pub struct Feature {
    pub name: String,
    pub supported: bool,
    /// The tiers that cannot run without it (empty when optional).
    pub needed_by: Vec<Tier>,
    /// Used when present, worked around when not (the tier does not drop).
    pub optional: bool,
    /// Set when the kernel could not be asked.
    pub error: Option<String>,
}

impl Feature {
    pub fn needed_by_names(&self) -> String {
        if self.optional {
            return "optional".into();
        }
        self.needed_by.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
    }
}

enum Probe {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    Btf,
}

const ALL: &[Tier] = &EBPF_TIERS;
const STORAGE: &[Tier] = &[Tier::EbpfSockmap, Tier::Ebpf];
const KEYED: &[Tier] = &[Tier::EbpfKeyed];
const SOCKMAP: &[Tier] = &[Tier::EbpfSockmap];
const OPTIONAL: &[Tier] = &[];

fn features() -> Vec<(String, Probe, &'static [Tier])> {
    use BpfHelper as H;
    use ProgramType as P;
    let prog = |n: &str, t, tiers| (format!("program type {n}"), Probe::Program(t), tiers);
    let map = |n: &str, t, tiers| (format!("map type {n}"), Probe::Map(t), tiers);
    let helper = |p: &str, pt, h: &str, id, tiers| (format!("helper {h} in {p}"), Probe::Helper(pt, id), tiers);
    vec![
        // Only CO-RE relocations would need the kernel's own BTF; the
        // programs use none (maps carry the object's BTF, which every kernel
        // with cgroup_sockopt loads).
        ("BTF (/sys/kernel/btf/vmlinux)".into(), Probe::Btf, OPTIONAL),
        prog("cgroup_sock_addr (connect4/6)", P::CgroupSockAddr, ALL),
        prog("sock_ops", P::SockOps, ALL),
        prog("cgroup_sockopt (getsockopt)", P::CgroupSockopt, ALL),
        prog("sk_msg", P::SkMsg, SOCKMAP),
        // Pods' inbound steering; without it pods get a nat PREROUTING rule.
        prog("sk_lookup (pod inbound steering, 5.9+)", P::SkLookup, OPTIONAL),
        map("array", MapType::Array, ALL),
        map("percpu_array", MapType::PerCpuArray, ALL),
        map("hash", MapType::Hash, ALL),
        map("lru_hash", MapType::LruHash, ALL),
        map("percpu_hash", MapType::PerCpuHash, ALL),
        map("lpm_trie", MapType::LpmTrie, ALL),
        // Declared by the kernel object, so created on every eBPF tier
        // (every kernel with cgroup_sockopt has both map types).
        map("sk_storage", MapType::SkStorage, ALL),
        map("sockhash", MapType::SockHash, ALL),
        helper("cgroup_sock_addr", P::CgroupSockAddr, "get_current_cgroup_id", H::BPF_FUNC_get_current_cgroup_id, ALL),
        // A pod's cgroup covers its containers' cgroups.
        helper(
            "cgroup_sock_addr",
            P::CgroupSockAddr,
            "get_current_ancestor_cgroup_id",
            H::BPF_FUNC_get_current_ancestor_cgroup_id,
            ALL,
        ),
        helper("cgroup_sockopt", P::CgroupSockopt, "get_current_cgroup_id", H::BPF_FUNC_get_current_cgroup_id, ALL),
        helper("cgroup_sock_addr", P::CgroupSockAddr, "sk_storage_get", H::BPF_FUNC_sk_storage_get, STORAGE),
        helper("sock_ops", P::SockOps, "sk_storage_get", H::BPF_FUNC_sk_storage_get, STORAGE),
        helper("cgroup_sockopt", P::CgroupSockopt, "sk_storage_get", H::BPF_FUNC_sk_storage_get, STORAGE),
        helper("cgroup_sock_addr", P::CgroupSockAddr, "get_socket_cookie", H::BPF_FUNC_get_socket_cookie, KEYED),
        helper("sock_ops", P::SockOps, "get_socket_cookie", H::BPF_FUNC_get_socket_cookie, KEYED),
        // Without them the programs key connections with netns cookie 0:
        // capture works, namespaces sharing loopback addresses are not told
        // apart.
        helper("sock_ops", P::SockOps, "get_netns_cookie", H::BPF_FUNC_get_netns_cookie, OPTIONAL),
        helper("cgroup_sockopt", P::CgroupSockopt, "get_netns_cookie", H::BPF_FUNC_get_netns_cookie, OPTIONAL),
        helper("sk_msg", P::SkMsg, "get_netns_cookie", H::BPF_FUNC_get_netns_cookie, OPTIONAL),
        helper("sock_ops", P::SockOps, "sock_hash_update", H::BPF_FUNC_sock_hash_update, SOCKMAP),
        helper("sk_msg", P::SkMsg, "msg_redirect_hash", H::BPF_FUNC_msg_redirect_hash, SOCKMAP),
    ]
}

/// Environment variable naming features (comma-separated, as `verify`
/// spells them) to report as missing: how the fallback tiers are exercised
/// on a kernel that has everything.
pub const ENV_HIDE: &str = "REDIRECTOR_HIDE_FEATURES";

/// Ask the kernel about every feature. Needs CAP_BPF (or root).
pub fn probe() -> Vec<Feature> {
    let hidden: Vec<String> = std::env::var(ENV_HIDE)
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    features()
        .into_iter()
        .map(|(name, p, tiers)| {
            let r: Result<bool, String> = match p {
                _ if hidden.contains(&name) => Err(format!("hidden by {ENV_HIDE}")),
                Probe::Btf => Ok(std::path::Path::new("/sys/kernel/btf/vmlinux").exists()),
                Probe::Program(t) => is_program_supported(t).map_err(|e| e.to_string()),
                Probe::Map(t) => is_map_supported(t).map_err(|e| e.to_string()),
                Probe::Helper(t, h) => is_helper_supported(t, h).map_err(|e| e.to_string()),
            };
            let (supported, error) = match r {
                Ok(s) => (s, None),
                Err(e) => (false, Some(e)),
            };
            Feature { name, supported, needed_by: tiers.to_vec(), optional: tiers.is_empty(), error }
        })
        .collect()
}

/// Cilium's socket load balancing: its cgroup connect programs
/// (`cil_sock4_connect`, `cil_sock6_connect`, ...) are loaded. They use the
/// same hook as our capture; unless Cilium keeps them to the host's
/// namespace, a pod's connect to a Service is rewritten to a backend pod
/// before the mesh sees the Service.
pub fn cilium_socket_lb() -> bool {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.name_as_str().is_some_and(|n| n.starts_with("cil_sock")))
}

/// What to tell an operator whose cluster runs Cilium's socket LB.
pub const CILIUM_ADVICE: &str = "Cilium's socket-based load balancing is active on this node: set socketLB.hostNamespaceOnly=true in Cilium's Helm values (bpf-lb-sock-hostns-only: \"true\" in the cilium-config ConfigMap) so pods' connections to Services reach the mesh with the Service address; see docs/kubernetes.md";

/// Whether the kernel has a named optional feature.
pub fn has(features: &[Feature], name: &str) -> bool {
    features.iter().any(|f| f.name == name && f.supported)
}

/// The richest tier every needed feature allows.
pub fn tier(features: &[Feature]) -> Tier {
    EBPF_TIERS.into_iter().find(|t| missing_for(features, *t).is_empty()).unwrap_or(Tier::Iptables)
}

/// The features tier `t` needs that the kernel lacks.
pub fn missing_for(features: &[Feature], t: Tier) -> Vec<String> {
    features
        .iter()
        .filter(|f| !f.supported && !f.optional && f.needed_by.contains(&t))
        .map(|f| f.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, supported: bool, needed_by: &[Tier]) -> Feature {
        Feature {
            name: name.into(),
            supported,
            needed_by: needed_by.to_vec(),
            optional: needed_by.is_empty(),
            error: None,
        }
    }

    #[test]
    fn the_tier_is_the_richest_one_whose_features_are_all_there() {
        let all = vec![f("a", true, ALL), f("b", true, SOCKMAP), f("c", true, STORAGE), f("k", true, KEYED)];
        assert_eq!(tier(&all), Tier::EbpfSockmap);
        let no_msg = vec![f("a", true, ALL), f("sk_msg", false, SOCKMAP), f("c", true, STORAGE)];
        assert_eq!(tier(&no_msg), Tier::Ebpf);
        assert_eq!(missing_for(&no_msg, Tier::EbpfSockmap), vec!["sk_msg".to_string()]);
        let no_storage = vec![
            f("a", true, ALL),
            f("b", true, SOCKMAP),
            f("sk_storage_get", false, STORAGE),
            f("cookie", true, KEYED),
        ];
        assert_eq!(tier(&no_storage), Tier::EbpfKeyed);
        assert_eq!(missing_for(&no_storage, Tier::Ebpf), vec!["sk_storage_get".to_string()]);
        let neither = vec![f("a", true, ALL), f("sk_storage_get", false, STORAGE), f("cookie", false, KEYED)];
        assert_eq!(tier(&neither), Tier::Iptables);
        let no_prog = vec![f("cgroup_sockopt", false, ALL), f("b", true, SOCKMAP)];
        assert_eq!(tier(&no_prog), Tier::Iptables);
        assert_eq!(missing_for(&no_prog, Tier::EbpfKeyed), vec!["cgroup_sockopt".to_string()]);
        let no_cookie = vec![f("netns cookie", false, OPTIONAL), f("b", true, SOCKMAP)];
        assert_eq!(tier(&no_cookie), Tier::EbpfSockmap, "an optional feature never lowers the tier");
    }
}
