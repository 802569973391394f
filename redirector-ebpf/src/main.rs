//! The redirector kernel programs.
//!
//! Capture path, one connection at a time:
//! 1. `connect4`/`connect6` (workload's cgroup): an enrolled workload's TCP
//!    connect() is rewritten to the proxy's outbound listener on loopback, and
//!    the original destination is kept in the socket's own storage.
//! 2. `sockops`, TCP_CONNECT_CB (workload's socket, local port now bound):
//!    the original destination is published under the client's address and
//!    port, for the length of the handshake only.
//! 3. `sockops`, PASSIVE_ESTABLISHED_CB (proxy's accepted socket): that entry
//!    moves into the accepted socket's own storage and leaves the shared map.
//! 4. `getsockopt` (proxy's socket): `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`
//!    is answered from the socket's storage, as conntrack answers it under
//!    iptables capture.
//!
//! Decisions needing configuration live in maps user space writes; the
//! programs stay small.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

// Shared first, then one module per program, in capture order.
#[cfg(target_arch = "bpf")]
mod prelude;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod sockops;
#[cfg(target_arch = "bpf")]
mod getsockopt;
#[cfg(target_arch = "bpf")]
mod dns;
#[cfg(target_arch = "bpf")]
mod sk_msg;
#[cfg(target_arch = "bpf")]
mod sk_lookup;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here.
    loop {}
}

/// The object only has meaning for the BPF target; on the host this crate
/// builds to an empty program so `cargo check --workspace` works.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
