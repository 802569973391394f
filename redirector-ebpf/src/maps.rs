//! Every map and global of the object (one object shares them), and the
//! small helpers more than one program calls.

use crate::prelude::*;

/// Not in the mesh: no entry for the current task's cgroup or any ancestor.
pub(crate) const NOT_ENROLLED: u32 = u32::MAX;

#[map]
pub(crate) static ENROLLED: HashMap<u64, Enrollment> = HashMap::pinned(MAX_ENROLLED, 0);

#[map]
pub(crate) static EXCL_PORTS: HashMap<u16, u8> = HashMap::pinned(MAX_EXCLUDED_PORTS, 0);

// LPM tries must be created without preallocation.
#[map]
pub(crate) static EXCL_CIDR4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(MAX_EXCLUDED_CIDRS, 1);

#[map]
pub(crate) static EXCL_CIDR6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(MAX_EXCLUDED_CIDRS, 1);

#[map]
pub(crate) static CONFIG: Array<CaptureConfig> = Array::pinned(1, 0);

#[map]
pub(crate) static COUNTERS: PerCpuHashMap<CounterKey, u64> = PerCpuHashMap::pinned(MAX_COUNTERS, 0);

#[map]
pub(crate) static PENDING_DST: HashMap<ConnKey, OriginalDst> = HashMap::pinned(MAX_PENDING, 0);

#[map]
pub(crate) static SOCK_PAIRS: SockHash<SockKey> = SockHash::pinned(MAX_PENDING, 0);

#[map]
pub(crate) static ACCEL_SOCKETS: HashMap<SockKey, AccelCount> = HashMap::pinned(MAX_PENDING, 0);

/// Shortcut totals since load: [messages redirected, bytes redirected,
/// messages that took the TCP stack].
#[map]
pub(crate) static ACCEL_TOTALS: PerCpuArray<u64> = PerCpuArray::pinned(3, 0);

#[btf_map]
pub(crate) static SOCKET_DST: SkStorage<OriginalDst> = SkStorage::new();

/// The keyed-map tier's stand-in for [`SOCKET_DST`] between connect() and
/// the SYN: socket cookie -> original destination.
#[map]
pub(crate) static DST_BY_COOKIE: LruHashMap<u64, OriginalDst> = LruHashMap::pinned(MAX_PENDING, 0);

/// 1: original destinations live in per-socket storage (sk_storage). 0: the
/// keyed-map tier for kernels without it: [`DST_BY_COOKIE`] until the SYN,
/// then [`PENDING_DST`] until the proxy's end of the connection closes, and
/// getsockopt finds it by the peer's address. A load-time constant: the
/// verifier prunes the branch not taken, so the kernel never sees a helper
/// it lacks.
#[no_mangle]
pub(crate) static SOCKET_STORAGE: Global<u32> = Global::new(1);

#[map]
pub(crate) static DNS_ORIG: LruHashMap<u64, OriginalDst> = LruHashMap::pinned(MAX_PENDING, 0);

#[map]
pub(crate) static POD_INBOUND: HashMap<[u32; 4], PodInbound> = HashMap::pinned(MAX_ENROLLED, 0);

#[map]
pub(crate) static POD_LISTENERS: SockHash<[u32; 4]> = SockHash::pinned(MAX_ENROLLED, 0);

#[inline(always)]
pub(crate) fn socket_storage() -> bool {
    SOCKET_STORAGE.load() != 0
}

/// 1 when the kernel offers `bpf_get_netns_cookie` to sockops (5.15+); the
/// loader sets 0 otherwise. It is a read-only constant at load time, so the
/// verifier never visits the helper call on kernels without it, and keys
/// then carry cookie 0 (no isolation between network namespaces that share
/// loopback addresses).
#[no_mangle]
pub(crate) static NETNS_COOKIE: Global<u32> = Global::new(1);

#[inline(always)]
pub(crate) fn netns_cookie(ctx: *mut c_void) -> u64 {
    if NETNS_COOKIE.load() != 0 {
        unsafe { bpf_get_netns_cookie(ctx) }
    } else {
        0
    }
}

#[inline(always)]
pub(crate) fn socket_dst_map() -> *mut c_void {
    ptr::from_ref(&SOCKET_DST).cast_mut().cast()
}

#[inline(always)]
pub(crate) fn count(cgroup_id: u64, decision: Decision) {
    let key = CounterKey { cgroup_id, decision: decision as u32, _pad: 0 };
    match COUNTERS.get_ptr_mut(&key) {
        // Per-CPU value: no other CPU touches it.
        Some(v) => unsafe { *v += 1 },
        None => {
            if COUNTERS.insert(&key, &1, 0).is_err() {
                let global = CounterKey { cgroup_id: 0, decision: Decision::ErrorMapFull as u32, _pad: 0 };
                if let Some(v) = COUNTERS.get_ptr_mut(&global) {
                    unsafe { *v += 1 }
                }
            }
        }
    }
}

/// The `ENROLL_*` flags of the current task's cgroup: its own entry, else
/// that of its nearest enrolled ancestor (a pod's cgroup covers the
/// containers the runtime creates under it, from their first connect), else
/// [`NOT_ENROLLED`]. A plain integer, not an `Option` of a struct: older
/// verifiers (5.10) reject reading the unset half of one from the stack.
#[inline(always)]
pub(crate) fn enrollment(cgroup_id: u64) -> u32 {
    if let Some(e) = unsafe { ENROLLED.get(&cgroup_id) } {
        return e.flags;
    }
    let mut flags = NOT_ENROLLED;
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == cgroup_id {
            break;
        }
        if let Some(e) = unsafe { ENROLLED.get(&id) } {
            flags = e.flags;
        }
        level += 1;
    }
    flags
}

#[inline(always)]
pub(crate) fn is_loopback(addr: &[u32; 4], family: u16) -> bool {
    if family == AF_INET {
        // 127.0.0.0/8: the first byte of the network order word.
        addr[3].to_ne_bytes()[0] == 127
    } else {
        addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == u32::from_ne_bytes([0, 0, 0, 1])
    }
}

/// The address a connect()/sendmsg() names, IPv4 in the IPv4-mapped form,
/// and the family it really is (an IPv4-mapped IPv6 address is IPv4).
#[inline(always)]
pub(crate) fn destination(sa: &bpf_sock_addr, v6: bool) -> ([u32; 4], u16) {
    if v6 {
        let a = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
        if is_v4_mapped(&a) {
            (a, AF_INET)
        } else {
            (a, AF_INET6)
        }
    } else {
        (map_v4(sa.user_ip4), AF_INET)
    }
}

/// Point a connect()/sendmsg() at `port` on loopback: 127.0.0.1 (in its
/// IPv4-mapped form on a dual-stack socket) or ::1.
#[inline(always)]
pub(crate) fn to_loopback(sa: &mut bpf_sock_addr, v6: bool, family: u16, port: u16) {
    if v6 {
        let lo = if family == AF_INET {
            map_v4(u32::from_ne_bytes([127, 0, 0, 1]))
        } else {
            [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
        };
        sa.user_ip6[0] = lo[0];
        sa.user_ip6[1] = lo[1];
        sa.user_ip6[2] = lo[2];
        sa.user_ip6[3] = lo[3];
    } else {
        sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    }
    sa.user_port = u32::from(port.to_be());
}
