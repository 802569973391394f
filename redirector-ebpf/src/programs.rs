//! Program entry points and the maps they share. Entry points are thin; the
//! logic is in the `try_*` functions.

use core::ffi::c_void;
use core::ptr;

use aya_ebpf::{
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
use aya_log_ebpf::warn;
use redirector_common::{
    is_v4_mapped, map_v4, AccelCount, CaptureConfig, ConnKey, CounterKey, Decision, Enrollment, OriginalDst,
    PodInbound, SockKey, AF_INET, AF_INET6, ENROLL_PENDING, FLAG_ACCELERATE, FLAG_CAPTURE_LOOPBACK, MAX_CGROUP_DEPTH,
    MAX_COUNTERS, MAX_ENROLLED, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, MAX_PENDING, SOL_IP, SOL_IPV6, SO_ORIGINAL_DST,
    SO_REDIRECTOR_SOURCE_CGROUP,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const DNS_PORT: u16 = 53;
const BPF_SK_STORAGE_GET_F_CREATE: u64 = 1;
const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_F_INGRESS: u64 = 1;
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const IPPROTO_TCP: u32 = 6;
const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const TCP_CLOSE: u32 = 7;
const TCP_SYN_SENT: u32 = 2;
const PAGE_SIZE: i32 = 4096;

#[map]
static ENROLLED: HashMap<u64, Enrollment> = HashMap::pinned(MAX_ENROLLED, 0);

#[map]
static EXCL_PORTS: HashMap<u16, u8> = HashMap::pinned(MAX_EXCLUDED_PORTS, 0);

// LPM tries must be created without preallocation.
#[map]
static EXCL_CIDR4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(MAX_EXCLUDED_CIDRS, 1);

#[map]
static EXCL_CIDR6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(MAX_EXCLUDED_CIDRS, 1);

#[map]
static CONFIG: Array<CaptureConfig> = Array::pinned(1, 0);

#[map]
static COUNTERS: PerCpuHashMap<CounterKey, u64> = PerCpuHashMap::pinned(MAX_COUNTERS, 0);

#[map]
static PENDING_DST: HashMap<ConnKey, OriginalDst> = HashMap::pinned(MAX_PENDING, 0);

#[map]
static SOCK_PAIRS: SockHash<SockKey> = SockHash::pinned(MAX_PENDING, 0);

#[map]
static ACCEL_SOCKETS: HashMap<SockKey, AccelCount> = HashMap::pinned(MAX_PENDING, 0);

/// Shortcut totals since load: [messages redirected, bytes redirected,
/// messages that took the TCP stack].
#[map]
static ACCEL_TOTALS: PerCpuArray<u64> = PerCpuArray::pinned(3, 0);

#[btf_map]
static SOCKET_DST: SkStorage<OriginalDst> = SkStorage::new();

/// The keyed-map tier's stand-in for [`SOCKET_DST`] between connect() and
/// the SYN: socket cookie -> original destination.
#[map]
static DST_BY_COOKIE: LruHashMap<u64, OriginalDst> = LruHashMap::pinned(MAX_PENDING, 0);

/// 1: original destinations live in per-socket storage (sk_storage). 0: the
/// keyed-map tier for kernels without it: [`DST_BY_COOKIE`] until the SYN,
/// then [`PENDING_DST`] until the proxy's end of the connection closes, and
/// getsockopt finds it by the peer's address. A load-time constant: the
/// verifier prunes the branch not taken, so the kernel never sees a helper
/// it lacks.
#[no_mangle]
static SOCKET_STORAGE: Global<u32> = Global::new(1);

#[map]
static DNS_ORIG: LruHashMap<u64, OriginalDst> = LruHashMap::pinned(MAX_PENDING, 0);

#[map]
static POD_INBOUND: HashMap<[u32; 4], PodInbound> = HashMap::pinned(MAX_ENROLLED, 0);

#[map]
static POD_LISTENERS: SockHash<[u32; 4]> = SockHash::pinned(MAX_ENROLLED, 0);

#[inline(always)]
fn socket_storage() -> bool {
    SOCKET_STORAGE.load() != 0
}

/// 1 when the kernel offers `bpf_get_netns_cookie` to sockops (5.15+); the
/// loader sets 0 otherwise. It is a read-only constant at load time, so the
/// verifier never visits the helper call on kernels without it, and keys
/// then carry cookie 0 (no isolation between network namespaces that share
/// loopback addresses).
#[no_mangle]
static NETNS_COOKIE: Global<u32> = Global::new(1);

#[inline(always)]
fn netns_cookie(ctx: *mut c_void) -> u64 {
    if NETNS_COOKIE.load() != 0 {
        unsafe { bpf_get_netns_cookie(ctx) }
    } else {
        0
    }
}

#[inline(always)]
fn socket_dst_map() -> *mut c_void {
    ptr::from_ref(&SOCKET_DST).cast_mut().cast()
}

#[inline(always)]
fn count(cgroup_id: u64, decision: Decision) {
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

// ---------------------------------------------------------------------------
// 1. connect4 / connect6
// ---------------------------------------------------------------------------

#[cgroup_sock_addr(connect4)]
pub fn redirector_connect4(ctx: SockAddrContext) -> i32 {
    // Captured or not, the connect proceeds; refused (EPERM) only for a
    // workload of the mesh whose proxy is not ready.
    let mut refuse = false;
    let _ = try_connect(&ctx, false, &mut refuse);
    if refuse {
        0
    } else {
        1
    }
}

#[cgroup_sock_addr(connect6)]
pub fn redirector_connect6(ctx: SockAddrContext) -> i32 {
    let mut refuse = false;
    let _ = try_connect(&ctx, true, &mut refuse);
    if refuse {
        0
    } else {
        1
    }
}

/// Not in the mesh: no entry for the current task's cgroup or any ancestor.
const NOT_ENROLLED: u32 = u32::MAX;

/// The `ENROLL_*` flags of the current task's cgroup: its own entry, else
/// that of its nearest enrolled ancestor (a pod's cgroup covers the
/// containers the runtime creates under it, from their first connect), else
/// [`NOT_ENROLLED`]. A plain integer, not an `Option` of a struct: older
/// verifiers (5.10) reject reading the unset half of one from the stack.
#[inline(always)]
fn enrollment(cgroup_id: u64) -> u32 {
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
fn is_loopback(addr: &[u32; 4], family: u16) -> bool {
    if family == AF_INET {
        // 127.0.0.0/8: the first byte of the network order word.
        addr[3].to_ne_bytes()[0] == 127
    } else {
        addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == u32::from_ne_bytes([0, 0, 0, 1])
    }
}

#[inline(always)]
fn is_excluded_cidr(addr: &[u32; 4], family: u16) -> bool {
    if family == AF_INET {
        let key = Key::new(32, addr[3].to_ne_bytes());
        EXCL_CIDR4.get(&key).is_some()
    } else {
        let mut bytes = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let w = addr[i].to_ne_bytes();
            bytes[i * 4] = w[0];
            bytes[i * 4 + 1] = w[1];
            bytes[i * 4 + 2] = w[2];
            bytes[i * 4 + 3] = w[3];
            i += 1;
        }
        EXCL_CIDR6.get(&Key::new(128, bytes)).is_some()
    }
}

/// The address a connect()/sendmsg() names, IPv4 in the IPv4-mapped form,
/// and the family it really is (an IPv4-mapped IPv6 address is IPv4).
#[inline(always)]
fn destination(sa: &bpf_sock_addr, v6: bool) -> ([u32; 4], u16) {
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
fn to_loopback(sa: &mut bpf_sock_addr, v6: bool, family: u16, port: u16) {
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

#[inline(always)]
fn try_connect(ctx: &SockAddrContext, v6: bool, refuse: &mut bool) -> Result<(), ()> {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ == SOCK_DGRAM {
        // A connected UDP socket to a resolver.
        return dns_out(ctx, v6);
    }
    if sa.type_ != SOCK_STREAM {
        return Ok(());
    }
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let cfg = CONFIG.get(0).ok_or(())?;
    if cfg.outbound_port == 0 {
        // The agent has not configured capture yet.
        return Ok(());
    }

    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return Ok(());
    }
    let mark = unsafe { (*sk).mark };
    if cgroup_id == cfg.proxy_cgroup_id || (cfg.proxy_mark != 0 && mark == cfg.proxy_mark) {
        count(cgroup_id, Decision::ProxyOwn);
        return Ok(());
    }
    let flags = enrollment(cgroup_id);
    if flags == NOT_ENROLLED {
        count(cgroup_id, Decision::NotEnrolled);
        return Ok(());
    }
    if flags & ENROLL_PENDING != 0 {
        count(cgroup_id, Decision::RefusedPending);
        *refuse = true;
        return Ok(());
    }

    let port = u16::from_be(sa.user_port as u16);
    let (addr, family) = destination(sa, v6);

    if is_loopback(&addr, family) && cfg.flags & FLAG_CAPTURE_LOOPBACK == 0 {
        count(cgroup_id, Decision::ExcludedLoopback);
        return Ok(());
    }
    if is_loopback(&addr, family) && port == cfg.outbound_port {
        // Already aimed at the proxy: never loop.
        count(cgroup_id, Decision::ExcludedLoopback);
        return Ok(());
    }
    if unsafe { EXCL_PORTS.get(&port) }.is_some() {
        count(cgroup_id, Decision::ExcludedPort);
        return Ok(());
    }
    if is_excluded_cidr(&addr, family) {
        count(cgroup_id, Decision::ExcludedCidr);
        return Ok(());
    }

    let mut dst = OriginalDst { addr, port, family, _pad: 0, cgroup_id };
    let stored = if socket_storage() {
        let stored = unsafe {
            bpf_sk_storage_get(socket_dst_map(), sk.cast(), ptr::from_mut(&mut dst).cast(), BPF_SK_STORAGE_GET_F_CREATE)
        };
        if !stored.is_null() {
            // The entry may predate this connect() on a reused socket.
            unsafe { *stored.cast::<OriginalDst>() = dst };
        }
        !stored.is_null()
    } else {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        DST_BY_COOKIE.insert(&cookie, &dst, 0).is_ok()
    };
    if !stored {
        // Fail open: the connection goes where it was going, uncaptured,
        // and the counter says so.
        count(cgroup_id, Decision::ErrorMapFull);
        warn!(ctx, "socket storage full: connection to port {} of cgroup {} not captured", port, cgroup_id);
        return Ok(());
    }

    to_loopback(sa, v6, family, cfg.outbound_port);
    count(cgroup_id, Decision::Redirected);
    Ok(())
}

// ---------------------------------------------------------------------------
// DNS: UDP/53 of enrolled workloads to the agent's DNS server
// ---------------------------------------------------------------------------

#[cgroup_sock_addr(sendmsg4)]
pub fn redirector_sendmsg4(ctx: SockAddrContext) -> i32 {
    if unsafe { (*ctx.sock_addr).type_ } == SOCK_DGRAM {
        let _ = dns_out(&ctx, false);
    }
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn redirector_sendmsg6(ctx: SockAddrContext) -> i32 {
    if unsafe { (*ctx.sock_addr).type_ } == SOCK_DGRAM {
        let _ = dns_out(&ctx, true);
    }
    1
}

#[cgroup_sock_addr(recvmsg4)]
pub fn redirector_recvmsg4(ctx: SockAddrContext) -> i32 {
    let _ = dns_in(&ctx, false);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn redirector_recvmsg6(ctx: SockAddrContext) -> i32 {
    let _ = dns_in(&ctx, true);
    1
}

/// A query to port 53 from an enrolled workload: remember the resolver it
/// was for and send it to the agent's DNS server on loopback.
#[inline(always)]
fn dns_out(ctx: &SockAddrContext, v6: bool) -> Result<(), ()> {
    let sa = unsafe { &mut *ctx.sock_addr };
    let cfg = CONFIG.get(0).ok_or(())?;
    if cfg.dns_port == 0 || u16::from_be(sa.user_port as u16) != DNS_PORT {
        return Ok(());
    }
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // A pending workload's queries go to its resolver as they are: no
    // connection of its is captured yet.
    // NOT_ENROLLED has every bit set: not enrolled or pending, left alone.
    if cgroup_id == cfg.proxy_cgroup_id || enrollment(cgroup_id) & ENROLL_PENDING != 0 {
        return Ok(());
    }
    let (addr, family) = destination(sa, v6);
    let dst = OriginalDst { addr, port: DNS_PORT, family, _pad: 0, cgroup_id };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if DNS_ORIG.insert(&cookie, &dst, 0).is_err() {
        count(cgroup_id, Decision::ErrorMapFull);
        return Ok(());
    }
    to_loopback(sa, v6, family, cfg.dns_port);
    count(cgroup_id, Decision::DnsRedirected);
    Ok(())
}

/// A datagram from the agent's DNS server to a socket that sent a query:
/// its source becomes the resolver the workload asked.
#[inline(always)]
fn dns_in(ctx: &SockAddrContext, v6: bool) -> Result<(), ()> {
    let sa = unsafe { &mut *ctx.sock_addr };
    let cfg = CONFIG.get(0).ok_or(())?;
    if cfg.dns_port == 0 || u16::from_be(sa.user_port as u16) != cfg.dns_port {
        return Ok(());
    }
    let from_agent = if v6 {
        let a = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
        is_loopback(&a, AF_INET6) || (is_v4_mapped(&a) && is_loopback(&a, AF_INET))
    } else {
        is_loopback(&map_v4(sa.user_ip4), AF_INET)
    };
    if !from_agent {
        return Ok(());
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { DNS_ORIG.get(&cookie) }) else {
        return Ok(());
    };
    let orig = *orig;
    if v6 {
        sa.user_ip6[0] = orig.addr[0];
        sa.user_ip6[1] = orig.addr[1];
        sa.user_ip6[2] = orig.addr[2];
        sa.user_ip6[3] = orig.addr[3];
    } else {
        sa.user_ip4 = orig.addr[3];
    }
    sa.user_port = u32::from(orig.port.to_be());
    Ok(())
}

// ---------------------------------------------------------------------------
// 2, 3. sockops
// ---------------------------------------------------------------------------

#[sock_ops]
pub fn redirector_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops(&ctx);
    1
}

/// The local (`local == true`) or remote end of the socket as a [`ConnKey`].
///
/// Every context field is read with its own volatile load: the verifier
/// rejects a context access through a computed offset, which is what the
/// compiler makes of "this field or that one".
#[inline(always)]
fn conn_key(ctx: &SockOpsContext, local: bool) -> ConnKey {
    let ops = ctx.ops;
    let netns_cookie = netns_cookie(ctx.as_ptr());
    let family = unsafe { ptr::read_volatile(&(*ops).family) };
    let (ip4, ip6, port) = unsafe {
        if local {
            (
                ptr::read_volatile(&(*ops).local_ip4),
                [
                    ptr::read_volatile(&(*ops).local_ip6[0]),
                    ptr::read_volatile(&(*ops).local_ip6[1]),
                    ptr::read_volatile(&(*ops).local_ip6[2]),
                    ptr::read_volatile(&(*ops).local_ip6[3]),
                ],
                // local_port is in host order.
                ptr::read_volatile(&(*ops).local_port),
            )
        } else {
            (
                ptr::read_volatile(&(*ops).remote_ip4),
                [
                    ptr::read_volatile(&(*ops).remote_ip6[0]),
                    ptr::read_volatile(&(*ops).remote_ip6[1]),
                    ptr::read_volatile(&(*ops).remote_ip6[2]),
                    ptr::read_volatile(&(*ops).remote_ip6[3]),
                ],
                // remote_port holds the network order port in its upper half
                // on little-endian machines; read as big-endian it is the port.
                u32::from_be(ptr::read_volatile(&(*ops).remote_port)),
            )
        }
    };
    let addr = if family == u32::from(AF_INET) { map_v4(ip4) } else { ip6 };
    ConnKey { netns_cookie, addr, port, _pad: 0 }
}

/// Both ends of the socket, as the sockmap key.
#[inline(always)]
fn sock_key(ctx: &SockOpsContext) -> SockKey {
    let local = conn_key(ctx, true);
    let remote = conn_key(ctx, false);
    SockKey {
        netns_cookie: local.netns_cookie,
        local_addr: local.addr,
        remote_addr: remote.addr,
        local_port: local.port,
        remote_port: remote.port,
    }
}

/// Put an established app<->proxy socket into the same-node shortcut, when
/// the switch is on.
#[inline(always)]
fn accelerate(ctx: &SockOpsContext) {
    let Some(cfg) = CONFIG.get(0) else { return };
    // The shortcut is offered only with per-socket storage.
    if cfg.flags & FLAG_ACCELERATE == 0 || !socket_storage() {
        return;
    }
    let mut key = sock_key(ctx);
    let ops = unsafe { &mut *ctx.ops };
    if SOCK_PAIRS.update(&mut key, ops, 0).is_err() {
        count(0, Decision::ErrorMapFull);
        return;
    }
    let zero = AccelCount::default();
    let _ = ACCEL_SOCKETS.insert(&key, &zero, 0);
    count(0, Decision::Accelerated);
    // Counters leave with the socket.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

#[inline(always)]
fn try_sockops(ctx: &SockOpsContext) -> Result<(), ()> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return Ok(());
    }
    let sk: *mut bpf_sock = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return Ok(());
    }

    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // The workload's socket: captured only if connect4/6 left its mark.
        let dst = if socket_storage() {
            let dst = unsafe { bpf_sk_storage_get(socket_dst_map(), sk.cast(), ptr::null_mut(), 0) };
            if dst.is_null() {
                return Ok(());
            }
            unsafe { *dst.cast::<OriginalDst>() }
        } else {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let Some(dst) = (unsafe { DST_BY_COOKIE.get(&cookie) }) else {
                return Ok(());
            };
            let dst = *dst;
            let _ = DST_BY_COOKIE.remove(&cookie);
            dst
        };
        let key = conn_key(ctx, true);
        if PENDING_DST.insert(&key, &dst, 0).is_err() {
            count(0, Decision::ErrorMapFull);
            return Ok(());
        }
        // Remove the entry should the handshake never complete.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // The workload's captured socket is now connected to the proxy (the
        // shortcut needs per-socket storage).
        if !socket_storage() {
            return Ok(());
        }
        let dst = unsafe { bpf_sk_storage_get(socket_dst_map(), sk.cast(), ptr::null_mut(), 0) };
        if !dst.is_null() {
            accelerate(ctx);
        }
    } else if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // Only the proxy's outbound listener takes over an entry: another
        // server in the subtree may accept a connection from the same client
        // address and port (the kernel shares a source port between
        // different destinations).
        let cfg = CONFIG.get(0).ok_or(())?;
        let local_port = unsafe { ptr::read_volatile(&(*ctx.ops).local_port) };
        if local_port != u32::from(cfg.outbound_port) {
            return Ok(());
        }
        let key = conn_key(ctx, false);
        let Some(dst) = (unsafe { PENDING_DST.get(&key) }) else {
            count(0, Decision::ErrorLookupMiss);
            return Ok(());
        };
        if !socket_storage() {
            // The keyed-map tier: the entry stays where getsockopt finds it
            // until this end of the connection closes.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            return Ok(());
        }
        let mut dst = *dst;
        let stored = unsafe {
            bpf_sk_storage_get(socket_dst_map(), sk.cast(), ptr::from_mut(&mut dst).cast(), BPF_SK_STORAGE_GET_F_CREATE)
        };
        if stored.is_null() {
            count(0, Decision::ErrorMapFull);
        }
        let _ = PENDING_DST.remove(&key);
        accelerate(ctx);
    } else {
        // STATE_CB: args[1] is the new state.
        if ctx.arg(1) == TCP_CLOSE {
            if socket_storage() {
                let _ = PENDING_DST.remove(&conn_key(ctx, true));
            } else {
                // Keyed-map tier: the proxy's end removes the entry it was
                // reading; the workload's end only a handshake that died.
                let cfg = CONFIG.get(0).ok_or(())?;
                let local_port = unsafe { ptr::read_volatile(&(*ctx.ops).local_port) };
                if local_port == u32::from(cfg.outbound_port) {
                    let _ = PENDING_DST.remove(&conn_key(ctx, false));
                } else if ctx.arg(0) == TCP_SYN_SENT {
                    let _ = PENDING_DST.remove(&conn_key(ctx, true));
                }
            }
            // The socket leaves SOCK_PAIRS by itself; its counters go here.
            let _ = ACCEL_SOCKETS.remove(&sock_key(ctx));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. getsockopt(SO_ORIGINAL_DST)
// ---------------------------------------------------------------------------

#[cgroup_sockopt(getsockopt)]
pub fn redirector_getsockopt(ctx: SockoptContext) -> i32 {
    let _ = try_getsockopt(&ctx);
    1
}

/// The peer end of the socket a getsockopt program runs for, as the
/// [`ConnKey`] sockops wrote for the workload's end.
#[inline(always)]
fn peer_key(ctx: &SockoptContext, sk: *mut bpf_sock) -> ConnKey {
    let netns_cookie = if NETNS_COOKIE.load() != 0 { unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } } else { 0 };
    // Every field is read, unconditionally and with its own load: the
    // verifier refuses arithmetic on a socket pointer, which is what the
    // compiler makes of loads chosen by a branch.
    let (family, ip4, ip6, raw) = unsafe {
        (
            ptr::read_volatile(&(*sk).family),
            ptr::read_volatile(&(*sk).dst_ip4),
            [
                ptr::read_volatile(&(*sk).dst_ip6[0]),
                ptr::read_volatile(&(*sk).dst_ip6[1]),
                ptr::read_volatile(&(*sk).dst_ip6[2]),
                ptr::read_volatile(&(*sk).dst_ip6[3]),
            ],
            // dst_port: the network order port in the low half of a 4-byte
            // load (the one width every kernel accepts for this field).
            ptr::read_volatile(ptr::addr_of!((*sk).dst_port).cast::<u32>()),
        )
    };
    let addr = if family == u32::from(AF_INET) { map_v4(ip4) } else { ip6 };
    ConnKey { netns_cookie, addr, port: u32::from(u16::from_be(raw as u16)), _pad: 0 }
}

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr: u32,
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port_be: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

#[inline(always)]
fn try_getsockopt(ctx: &SockoptContext) -> Result<(), ()> {
    let so = unsafe { &mut *ctx.sockopt };
    let level = so.level;
    let source = so.optname == SO_REDIRECTOR_SOURCE_CGROUP && level == SOL_IP;
    if !source && (so.optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6)) {
        // Options above a page are truncated for us; an optlen of 0 tells
        // the kernel to keep its own answer untouched.
        if so.optlen > PAGE_SIZE {
            so.optlen = 0;
        }
        return Ok(());
    }
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return Ok(());
    }
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let dst = if socket_storage() {
        let dst = unsafe { bpf_sk_storage_get(socket_dst_map(), sk.cast(), ptr::null_mut(), 0) };
        if dst.is_null() {
            // Not a socket we captured: leave the kernel's answer
            // (conntrack's, under iptables capture) as it is.
            return Ok(());
        }
        unsafe { *dst.cast::<OriginalDst>() }
    } else {
        // Keyed-map tier: the connection's entry, by its peer (the
        // workload's end).
        let Some(dst) = (unsafe { PENDING_DST.get(&peer_key(ctx, sk)) }) else {
            return Ok(());
        };
        *dst
    };
    let optval = unsafe { so.__bindgen_anon_2.optval } as usize;
    let optval_end = unsafe { so.__bindgen_anon_3.optval_end } as usize;

    if source {
        // The source workload's cgroup, for the proxy's telemetry.
        if optval + 8 > optval_end {
            return Ok(());
        }
        // Separate 4-byte stores: the verifier refuses one 8-byte store
        // across optlen and retval, which the compiler would make of them.
        unsafe {
            *(optval as *mut u64) = dst.cgroup_id;
            ptr::write_volatile(&mut so.optlen, 8);
            ptr::write_volatile(&mut so.retval, 0);
        }
        return Ok(());
    }
    if level == SOL_IP {
        let Some(ip4) = dst.ipv4() else {
            count(cgroup_id, Decision::ErrorLookupMiss);
            return Ok(());
        };
        let len = core::mem::size_of::<SockaddrIn>();
        if optval + len > optval_end {
            return Ok(());
        }
        let out = optval as *mut SockaddrIn;
        unsafe {
            (*out).family = AF_INET;
            (*out).port_be = dst.port.to_be();
            (*out).addr = ip4;
            (*out).zero = [0; 8];
        }
        so.optlen = len as i32;
    } else {
        let len = core::mem::size_of::<SockaddrIn6>();
        if optval + len > optval_end {
            return Ok(());
        }
        let out = optval as *mut SockaddrIn6;
        unsafe {
            (*out).family = AF_INET6;
            (*out).port_be = dst.port.to_be();
            (*out).flowinfo = 0;
            (*out).addr = dst.addr;
            (*out).scope_id = 0;
        }
        so.optlen = len as i32;
    }
    so.retval = 0;
    count(cgroup_id, Decision::OriginalDstAnswered);
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. sk_msg: the same-node shortcut
// ---------------------------------------------------------------------------

/// Runs on sendmsg() of a socket in SOCK_PAIRS: hand the bytes straight to
/// the other end's receive queue, skipping the loopback TCP stack. With the
/// switch off, or no peer, the message takes the TCP stack as usual.
#[sk_msg]
pub fn redirector_sk_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_sk_msg(ctx: &SkMsgContext) {
    let msg = ctx.msg;
    let (family, lip4, rip4, lport, rport_raw) = unsafe {
        (
            ptr::read_volatile(&(*msg).family),
            ptr::read_volatile(&(*msg).local_ip4),
            ptr::read_volatile(&(*msg).remote_ip4),
            ptr::read_volatile(&(*msg).local_port),
            ptr::read_volatile(&(*msg).remote_port),
        )
    };
    let (lip6, rip6) = unsafe {
        (
            [
                ptr::read_volatile(&(*msg).local_ip6[0]),
                ptr::read_volatile(&(*msg).local_ip6[1]),
                ptr::read_volatile(&(*msg).local_ip6[2]),
                ptr::read_volatile(&(*msg).local_ip6[3]),
            ],
            [
                ptr::read_volatile(&(*msg).remote_ip6[0]),
                ptr::read_volatile(&(*msg).remote_ip6[1]),
                ptr::read_volatile(&(*msg).remote_ip6[2]),
                ptr::read_volatile(&(*msg).remote_ip6[3]),
            ],
        )
    };
    let (local_addr, remote_addr) =
        if family == u32::from(AF_INET) { (map_v4(lip4), map_v4(rip4)) } else { (lip6, rip6) };
    let key = SockKey {
        netns_cookie: netns_cookie(ctx.as_ptr()),
        local_addr,
        remote_addr,
        local_port: lport,
        remote_port: u32::from_be(rport_raw),
    };
    let size = u64::from(unsafe { ptr::read_volatile(&(*msg).size) });
    // Only the proxy's writes take the shortcut. Ingress redirect has no
    // flow control: when the receiver falls behind, the writer gets ENOMEM
    // instead of blocking. The proxy retries that; an unmodified app would
    // not, so its writes keep the TCP stack (and its flow control).
    let on = CONFIG.get(0).is_some_and(|c| c.flags & FLAG_ACCELERATE != 0 && lport == u32::from(c.outbound_port));
    // A socket that ever sent through the TCP stack stays on it: the peer
    // reads the shortcut's queue before its TCP receive queue, so bytes sent
    // the other way later would overtake the earlier ones. This covers the
    // app that writes before the proxy's end joined the map, and the switch
    // turned off then on again.
    let entry = ACCEL_SOCKETS.get_ptr_mut(&key);
    let clean = entry.is_some_and(|c| unsafe { (*c).passed } == 0);
    let redirected = on && clean && {
        let mut peer = key.peer();
        SOCK_PAIRS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS) == i64::from(SK_PASS)
    };
    let add = |i: u32, n: u64| {
        if let Some(v) = ACCEL_TOTALS.get_ptr_mut(i) {
            unsafe { *v += n }
        }
    };
    if redirected {
        add(0, 1);
        add(1, size);
    } else {
        add(2, 1);
    }
    if let Some(c) = entry {
        unsafe {
            if redirected {
                (*c).msgs += 1;
                (*c).bytes += size;
            } else {
                (*c).passed += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 6. sk_lookup: inbound steering in pods
// ---------------------------------------------------------------------------

/// Attached to each served pod's network namespace; runs when an incoming
/// TCP connection looks for its listening socket. A connection to one of
/// the pod's addresses goes to the proxy's plaintext inbound listener in
/// that namespace (so PeerAuthentication and AuthorizationPolicy see every
/// client, also those that never went near our hooks), except HBONE and the
/// proxy's own ports, and except the pod's traffic to itself (the proxy
/// delivering to the app). This is what the nat PREROUTING rule does under
/// iptables, without netfilter.
#[sk_lookup]
pub fn redirector_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx)
}

#[inline(always)]
fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // Every field is read up front, each straight from the context at its
    // own offset: the verifier refuses context reads through a pointer the
    // compiler moved.
    let (family, protocol, lport, lip4, rip4) = unsafe {
        (
            ptr::read_volatile(&(*l).family),
            ptr::read_volatile(&(*l).protocol),
            ptr::read_volatile(&(*l).local_port),
            ptr::read_volatile(&(*l).local_ip4),
            ptr::read_volatile(&(*l).remote_ip4),
        )
    };
    let (lip6, rip6) = unsafe {
        (
            [
                ptr::read_volatile(&(*l).local_ip6[0]),
                ptr::read_volatile(&(*l).local_ip6[1]),
                ptr::read_volatile(&(*l).local_ip6[2]),
                ptr::read_volatile(&(*l).local_ip6[3]),
            ],
            [
                ptr::read_volatile(&(*l).remote_ip6[0]),
                ptr::read_volatile(&(*l).remote_ip6[1]),
                ptr::read_volatile(&(*l).remote_ip6[2]),
                ptr::read_volatile(&(*l).remote_ip6[3]),
            ],
        )
    };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let (local, remote) = if family == u32::from(AF_INET) {
        (map_v4(lip4), map_v4(rip4))
    } else if family == u32::from(AF_INET6) {
        (lip6, rip6)
    } else {
        return SK_PASS;
    };
    // The pod's own traffic to itself: the proxy delivering to the app.
    if local == remote {
        return SK_PASS;
    }
    let Some(pod) = (unsafe { POD_INBOUND.get(&local) }) else {
        return SK_PASS;
    };
    if lport == pod.hbone_port || lport == pod.inbound_port || lport == pod.outbound_port {
        return SK_PASS;
    }
    match POD_LISTENERS.redirect_sk_lookup(ctx, local, 0) {
        Ok(()) => SK_PASS,
        // A served pod whose listener is gone (its agent is down or
        // restarting): the connection is refused (the kernel answers the
        // SYN with a reset), as under iptables, rather than let plaintext
        // reach the app past the mesh's policy.
        Err(_) => SK_DROP,
    }
}
