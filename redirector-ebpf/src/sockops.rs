//! 2, 3. sockops: the original destination is handed from the workload's
//! socket to the proxy's accepted one, for the length of the handshake.

use crate::maps::*;
use crate::prelude::*;

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
pub(crate) fn conn_key(ctx: &SockOpsContext, local: bool) -> ConnKey {
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
pub(crate) fn sock_key(ctx: &SockOpsContext) -> SockKey {
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
pub(crate) fn accelerate(ctx: &SockOpsContext) {
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
pub(crate) fn try_sockops(ctx: &SockOpsContext) -> Result<(), ()> {
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
