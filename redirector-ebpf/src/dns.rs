//! DNS: an enrolled workload's UDP/53 goes to the agent's DNS server, and
//! the replies look as if the original resolver sent them.

use crate::maps::*;
use crate::prelude::*;

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
pub(crate) fn dns_out(ctx: &SockAddrContext, v6: bool) -> Result<(), ()> {
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
pub(crate) fn dns_in(ctx: &SockAddrContext, v6: bool) -> Result<(), ()> {
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
