//! 6. sk_lookup: inbound steering in pods' namespaces to the proxy's
//! plaintext listener.

use crate::maps::*;
use crate::prelude::*;

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
pub(crate) fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
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
