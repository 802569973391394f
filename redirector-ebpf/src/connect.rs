//! 1. connect4 / connect6: an enrolled workload's TCP connect() goes to the
//! proxy's outbound listener on loopback; the original destination is kept.

use crate::dns::dns_out;
use crate::maps::*;
use crate::prelude::*;

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

#[inline(always)]
pub(crate) fn is_excluded_cidr(addr: &[u32; 4], family: u16) -> bool {
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

#[inline(always)]
pub(crate) fn try_connect(ctx: &SockAddrContext, v6: bool, refuse: &mut bool) -> Result<(), ()> {
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
