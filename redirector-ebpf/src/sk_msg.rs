//! 5. sk_msg: the same-node shortcut, bytes straight to the other end's
//! receive queue.

use crate::maps::*;
use crate::prelude::*;

/// Runs on sendmsg() of a socket in SOCK_PAIRS: hand the bytes straight to
/// the other end's receive queue, skipping the loopback TCP stack. With the
/// switch off, or no peer, the message takes the TCP stack as usual.
#[sk_msg]
pub fn redirector_sk_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx);
    SK_PASS
}

#[inline(always)]
pub(crate) fn try_sk_msg(ctx: &SkMsgContext) {
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
