//! What every program module uses: the helper bindings, the shared
//! crate's types and names, and the kernel constants aya does not export.

pub(crate) use core::ffi::c_void;
pub(crate) use core::ptr;

pub(crate) use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr, BPF_SOCK_OPS_STATE_CB_FLAG},
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sk_msg, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext},
    EbpfContext, Global,
};
pub(crate) use aya_log_ebpf::warn;
pub(crate) use redirector_common::{
    is_v4_mapped, map_v4, AccelCount, CaptureConfig, ConnKey, CounterKey, Decision, Enrollment, OriginalDst,
    PodInbound, SockKey, AF_INET, AF_INET6, ENROLL_PENDING, FLAG_ACCELERATE, FLAG_CAPTURE_LOOPBACK, MAX_CGROUP_DEPTH,
    MAX_COUNTERS, MAX_ENROLLED, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, MAX_PENDING, SOL_IP, SOL_IPV6, SO_ORIGINAL_DST,
    SO_REDIRECTOR_SOURCE_CGROUP,
};

pub(crate) const SOCK_STREAM: u32 = 1;
pub(crate) const SOCK_DGRAM: u32 = 2;
pub(crate) const DNS_PORT: u16 = 53;
pub(crate) const BPF_SK_STORAGE_GET_F_CREATE: u64 = 1;
pub(crate) const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
pub(crate) const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
pub(crate) const BPF_F_INGRESS: u64 = 1;
pub(crate) const SK_PASS: u32 = 1;
pub(crate) const SK_DROP: u32 = 0;
pub(crate) const IPPROTO_TCP: u32 = 6;
pub(crate) const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
pub(crate) const BPF_SOCK_OPS_STATE_CB: u32 = 10;
pub(crate) const TCP_CLOSE: u32 = 7;
pub(crate) const TCP_SYN_SENT: u32 = 2;
pub(crate) const PAGE_SIZE: i32 = 4096;
