//! 4. getsockopt: `SO_ORIGINAL_DST` answered from the accepted socket's
//! storage, as conntrack answers it under iptables capture.

use crate::maps::*;
use crate::prelude::*;

#[cgroup_sockopt(getsockopt)]
pub fn redirector_getsockopt(ctx: SockoptContext) -> i32 {
    let _ = try_getsockopt(&ctx);
    1
}

/// The peer end of the socket a getsockopt program runs for, as the
/// [`ConnKey`] sockops wrote for the workload's end.
#[inline(always)]
pub(crate) fn peer_key(ctx: &SockoptContext, sk: *mut bpf_sock) -> ConnKey {
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
pub(crate) fn try_getsockopt(ctx: &SockoptContext) -> Result<(), ()> {
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
