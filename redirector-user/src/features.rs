//! What the running kernel can do, asked of the kernel itself (never read
//! from a version string): the program types, map types and helpers each
//! capture tier needs, and BTF. `redirector verify` prints the table.

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
    /// eBPF capture, no shortcut.
    #[serde(rename = "ebpf")]
    Ebpf,
    /// iptables capture.
    #[serde(rename = "iptables")]
    Iptables,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::EbpfSockmap => "ebpf+sockmap",
            Tier::Ebpf => "ebpf",
            Tier::Iptables => "iptables",
        }
    }
}

/// One probed feature and the tier that needs it.
#[derive(Debug, Clone, Serialize)]
pub struct Feature {
    pub name: String,
    pub supported: bool,
    /// The lowest tier that needs this feature.
    pub needed_by: Tier,
    /// Used when present, worked around when not (the tier does not drop).
    pub optional: bool,
    /// Set when the kernel could not be asked.
    pub error: Option<String>,
}

enum Probe {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    Btf,
}

fn features() -> Vec<(String, Probe, Tier)> {
    let prog = |n: &str, t| (format!("program type {n}"), Probe::Program(t), Tier::Ebpf);
    let map = |n: &str, t, tier| (format!("map type {n}"), Probe::Map(t), tier);
    let helper = |p: &str, pt, h: &str, id, tier| (format!("helper {h} in {p}"), Probe::Helper(pt, id), tier);
    vec![
        ("BTF (/sys/kernel/btf/vmlinux)".into(), Probe::Btf, Tier::Ebpf),
        prog("cgroup_sock_addr (connect4/6)", ProgramType::CgroupSockAddr),
        prog("sock_ops", ProgramType::SockOps),
        prog("cgroup_sockopt (getsockopt)", ProgramType::CgroupSockopt),
        (
            "program type sk_msg".into(),
            Probe::Program(ProgramType::SkMsg),
            Tier::EbpfSockmap,
        ),
        map("hash", MapType::Hash, Tier::Ebpf),
        map("percpu_hash", MapType::PerCpuHash, Tier::Ebpf),
        map("lpm_trie", MapType::LpmTrie, Tier::Ebpf),
        map("sk_storage", MapType::SkStorage, Tier::Ebpf),
        map("sockhash", MapType::SockHash, Tier::EbpfSockmap),
        helper("cgroup_sock_addr", ProgramType::CgroupSockAddr, "get_current_cgroup_id", BpfHelper::BPF_FUNC_get_current_cgroup_id, Tier::Ebpf),
        helper("cgroup_sock_addr", ProgramType::CgroupSockAddr, "sk_storage_get", BpfHelper::BPF_FUNC_sk_storage_get, Tier::Ebpf),
        helper("sock_ops", ProgramType::SockOps, "sk_storage_get", BpfHelper::BPF_FUNC_sk_storage_get, Tier::Ebpf),
        helper("sock_ops", ProgramType::SockOps, "get_netns_cookie", BpfHelper::BPF_FUNC_get_netns_cookie, Tier::Ebpf),
        helper("cgroup_sockopt", ProgramType::CgroupSockopt, "sk_storage_get", BpfHelper::BPF_FUNC_sk_storage_get, Tier::Ebpf),
        helper("cgroup_sockopt", ProgramType::CgroupSockopt, "get_current_cgroup_id", BpfHelper::BPF_FUNC_get_current_cgroup_id, Tier::Ebpf),
        helper("sock_ops", ProgramType::SockOps, "sock_hash_update", BpfHelper::BPF_FUNC_sock_hash_update, Tier::EbpfSockmap),
        helper("sk_msg", ProgramType::SkMsg, "msg_redirect_hash", BpfHelper::BPF_FUNC_msg_redirect_hash, Tier::EbpfSockmap),
        helper("sk_msg", ProgramType::SkMsg, "get_netns_cookie", BpfHelper::BPF_FUNC_get_netns_cookie, Tier::EbpfSockmap),
    ]
}

/// Ask the kernel about every feature. Needs CAP_BPF (or root).
pub fn probe() -> Vec<Feature> {
    features()
        .into_iter()
        .map(|(name, p, needed_by)| {
            // Without it the programs key connections with netns cookie 0:
            // capture works, namespaces sharing loopback addresses are not
            // told apart.
            let optional = name.starts_with("helper get_netns_cookie in ");
            let r: Result<bool, String> = match p {
                Probe::Btf => Ok(std::path::Path::new("/sys/kernel/btf/vmlinux").exists()),
                Probe::Program(t) => is_program_supported(t).map_err(|e| e.to_string()),
                Probe::Map(t) => is_map_supported(t).map_err(|e| e.to_string()),
                Probe::Helper(t, h) => is_helper_supported(t, h).map_err(|e| e.to_string()),
            };
            match r {
                Ok(supported) => Feature {
                    name,
                    supported,
                    needed_by,
                    optional,
                    error: None,
                },
                Err(e) => Feature {
                    name,
                    supported: false,
                    needed_by,
                    optional,
                    error: Some(e),
                },
            }
        })
        .collect()
}

/// The richest tier every needed feature allows.
pub fn tier(features: &[Feature]) -> Tier {
    let all = |t: Tier| {
        features
            .iter()
            .filter(|f| f.needed_by == t && !f.optional)
            .all(|f| f.supported)
    };
    if !all(Tier::Ebpf) {
        Tier::Iptables
    } else if !all(Tier::EbpfSockmap) {
        Tier::Ebpf
    } else {
        Tier::EbpfSockmap
    }
}

/// The features a tier lacks, for the one-line explanation.
pub fn missing_for(features: &[Feature], t: Tier) -> Vec<String> {
    features
        .iter()
        .filter(|f| {
            !f.supported && (f.needed_by == t || (t == Tier::EbpfSockmap && f.needed_by == Tier::Ebpf))
        })
        .map(|f| f.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, supported: bool, needed_by: Tier) -> Feature {
        Feature {
            name: name.into(),
            supported,
            needed_by,
            optional: false,
            error: None,
        }
    }

    #[test]
    fn the_tier_is_the_richest_one_whose_features_are_all_there() {
        let all = vec![f("a", true, Tier::Ebpf), f("b", true, Tier::EbpfSockmap)];
        assert_eq!(tier(&all), Tier::EbpfSockmap);
        let no_msg = vec![f("a", true, Tier::Ebpf), f("sk_msg", false, Tier::EbpfSockmap)];
        assert_eq!(tier(&no_msg), Tier::Ebpf);
        assert_eq!(missing_for(&no_msg, Tier::EbpfSockmap), vec!["sk_msg".to_string()]);
        let no_storage = vec![f("sk_storage", false, Tier::Ebpf), f("b", true, Tier::EbpfSockmap)];
        assert_eq!(tier(&no_storage), Tier::Iptables);
        assert_eq!(missing_for(&no_storage, Tier::Ebpf), vec!["sk_storage".to_string()]);
        let mut no_cookie = vec![f("cookie", false, Tier::Ebpf), f("b", true, Tier::EbpfSockmap)];
        no_cookie[0].optional = true;
        assert_eq!(tier(&no_cookie), Tier::EbpfSockmap, "an optional feature never lowers the tier");
    }
}
