//! Types and names shared by the redirector kernel programs and user space.
//!
//! Everything here is `#[repr(C)]` with explicit padding and no `bool`, so the
//! kernel object and the loader agree on every byte. Each field says its byte
//! order. Program and map names are spelled once, here.
//!
//! With the `user` feature the types implement `aya::Pod` so user space can
//! read and write the maps.
#![no_std]

/// Program names, as the ELF symbols of the kernel object.
pub mod programs {
    pub const CONNECT4: &str = "redirector_connect4";
    pub const CONNECT6: &str = "redirector_connect6";
    pub const SOCKOPS: &str = "redirector_sockops";
    pub const GETSOCKOPT: &str = "redirector_getsockopt";
    /// DNS capture: unconnected UDP sends and the replies' source address.
    pub const SENDMSG4: &str = "redirector_sendmsg4";
    pub const SENDMSG6: &str = "redirector_sendmsg6";
    pub const RECVMSG4: &str = "redirector_recvmsg4";
    pub const RECVMSG6: &str = "redirector_recvmsg6";
    /// Same-node acceleration, attached to [`super::maps::SOCK_PAIRS`].
    pub const SK_MSG: &str = "redirector_sk_msg";
    /// Inbound steering in pods: attached to each served pod's network
    /// namespace (sk_lookup), it hands connections to the pod's addresses
    /// to the proxy's plaintext inbound listener there.
    pub const SK_LOOKUP: &str = "redirector_sk_lookup";
    /// Every program, in the order the loader attaches them. The getsockopt
    /// and sockops programs go first so that a connection redirected by
    /// connect4/6 always finds them in place.
    pub const ALL: [&str; 8] = [GETSOCKOPT, SOCKOPS, RECVMSG4, RECVMSG6, CONNECT4, CONNECT6, SENDMSG4, SENDMSG6];
}

/// Map names, as the ELF symbols of the kernel object and the file names of
/// their pins under the bpffs directory.
pub mod maps {
    /// cgroup id (u64) -> [`super::Enrollment`]. Written by user space.
    pub const ENROLLED: &str = "ENROLLED";
    /// destination port (u16, host order) -> u8. Written by user space.
    pub const EXCLUDED_PORTS: &str = "EXCL_PORTS";
    /// LPM trie of IPv4 prefixes that are never captured.
    pub const EXCLUDED_CIDRS4: &str = "EXCL_CIDR4";
    /// LPM trie of IPv6 prefixes that are never captured.
    pub const EXCLUDED_CIDRS6: &str = "EXCL_CIDR6";
    /// One [`super::CaptureConfig`] at index 0. Written by user space.
    pub const CONFIG: &str = "CONFIG";
    /// Per-CPU decision counters: [`super::CounterKey`] -> u64.
    pub const COUNTERS: &str = "COUNTERS";
    /// Original destinations of connections between the client's connect()
    /// and the proxy's accept: [`super::ConnKey`] -> [`super::OriginalDst`].
    /// An entry lives only for the TCP handshake.
    pub const PENDING: &str = "PENDING_DST";
    /// Socket-local storage holding each captured socket's original destination.
    pub const SOCKET_DST: &str = "SOCKET_DST";
    /// The keyed-map tier (kernels without per-socket storage): socket
    /// cookie (u64) -> [`super::OriginalDst`], from connect4/6 until the
    /// socket's SYN leaves (sockops moves it into [`PENDING`], where it then
    /// stays until the proxy's end of the connection closes). LRU, so a
    /// connect() that fails before its SYN cannot leak an entry for long.
    pub const DST_BY_COOKIE: &str = "DST_BY_COOKIE";
    /// DNS capture: socket cookie (u64) -> the resolver a workload's UDP
    /// socket last sent a query to ([`super::OriginalDst`]), so replies
    /// appear to come from it. LRU.
    pub const DNS_ORIG: &str = "DNS_ORIG";
    /// Same-node acceleration: both ends of each accelerated app<->proxy
    /// connection, [`super::SockKey`] -> socket.
    pub const SOCK_PAIRS: &str = "SOCK_PAIRS";
    /// Per-socket acceleration counters: [`super::SockKey`] ->
    /// [`super::AccelCount`]; an entry lives as long as its socket.
    pub const ACCEL_SOCKETS: &str = "ACCEL_SOCKETS";
    /// Per-CPU shortcut totals: [messages redirected, bytes redirected,
    /// messages passed to the TCP stack].
    pub const ACCEL_TOTALS: &str = "ACCEL_TOTALS";
    /// Inbound steering: a served pod's address (IPv4-mapped, network
    /// order words) -> [`super::PodInbound`]. Written by user space.
    pub const POD_INBOUND: &str = "POD_INBOUND";
    /// Inbound steering: a served pod's address -> the proxy's plaintext
    /// inbound listener in that pod's namespace. A socket leaves by itself
    /// when it closes.
    pub const POD_LISTENERS: &str = "POD_LISTENERS";
}

/// Load-time constants of the kernel object.
pub mod globals {
    /// u32: 1 when sockops may call `bpf_get_netns_cookie`.
    pub const NETNS_COOKIE: &str = "NETNS_COOKIE";
    /// u32: 1 to keep original destinations in per-socket storage
    /// (sk_storage); 0 for the keyed-map tier.
    pub const SOCKET_STORAGE: &str = "SOCKET_STORAGE";
}

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `SO_ORIGINAL_DST` (`SOL_IP`) and `IP6T_SO_ORIGINAL_DST` (`SOL_IPV6`) share
/// this option number.
pub const SO_ORIGINAL_DST: i32 = 80;
/// `getsockopt(SOL_IP, SO_REDIRECTOR_SOURCE_CGROUP)` on a socket the proxy
/// accepted: the client's cgroup id (u64), answered by our getsockopt
/// program (the kernel has no such option). "RD" in ASCII.
pub const SO_REDIRECTOR_SOURCE_CGROUP: i32 = 0x5244;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;

/// The default outbound listener port (Istio's).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// The default socket mark of the proxy's own upstream sockets (Istio's
/// 1337 is a uid; the mark is ours).
pub const DEFAULT_PROXY_MARK: u32 = 0x539;

/// [`CaptureConfig::flags`]: capture connections to loopback destinations too.
pub const FLAG_CAPTURE_LOOPBACK: u32 = 1;
/// [`CaptureConfig::flags`]: same-node acceleration (sockmap) is on. The
/// agent flips it at run time: the kill switch.
pub const FLAG_ACCELERATE: u32 = 2;

/// Settings the kernel programs read on every connect. Index 0 of
/// [`maps::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// cgroup v2 id (inode number) of the proxy's cgroup; host order.
    pub proxy_cgroup_id: u64,
    /// Socket mark the proxy sets on its upstream sockets; host order.
    pub proxy_mark: u32,
    /// `FLAG_*` bits; host order.
    pub flags: u32,
    /// Port of the proxy's outbound listener; host order.
    pub outbound_port: u16,
    /// Port of the agent's DNS server on loopback; 0: DNS is not captured.
    pub dns_port: u16,
    pub _pad: [u8; 4],
}

/// Value of [`maps::ENROLLED`]: how a cgroup is enrolled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enrollment {
    /// `ENROLL_*` flags. Host order.
    pub flags: u32,
    pub _pad: u32,
}

/// A cgroup in the mesh whose proxy is not ready yet (a pod whose network
/// namespace is not known, or not served yet): its TCP connects are
/// refused (EPERM) rather than sent around the mesh.
pub const ENROLL_PENDING: u32 = 1;

/// How many cgroup levels above a socket's own cgroup are searched for an
/// enrolled ancestor (a pod's cgroup covers its containers' cgroups).
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Value of [`maps::POD_INBOUND`]: the ports of a served pod that keep
/// their own listeners (HBONE, and the proxy's own). Host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInbound {
    pub hbone_port: u32,
    pub inbound_port: u32,
    pub outbound_port: u32,
    pub _pad: u32,
}

/// Where a captured connection was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalDst {
    /// The address as the kernel holds it: network byte order, four 32-bit
    /// words laid out as the 16 address bytes. An IPv4 destination sits in
    /// the IPv4-mapped form `::ffff:a.b.c.d`.
    pub addr: [u32; 4],
    /// Destination port; host order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family the application connected with
    /// (IPv4-mapped IPv6 destinations are `AF_INET`); host order.
    pub family: u16,
    pub _pad: u32,
    /// The cgroup of the process that connected (the source workload);
    /// host order. 0 where unknown.
    pub cgroup_id: u64,
}

/// Key of [`maps::PENDING`]: the client end of a captured connection as both
/// ends of the handshake see it. The network namespace cookie keeps two
/// pods' identical loopback addresses apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Network namespace cookie; host order.
    pub netns_cookie: u64,
    /// Client address, IPv4 in the IPv4-mapped form; network order words.
    pub addr: [u32; 4],
    /// Client port; host order.
    pub port: u32,
    pub _pad: u32,
}

/// Key of [`maps::SOCK_PAIRS`] and [`maps::ACCEL_SOCKETS`]: one end of a
/// connection, seen from that end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Network namespace cookie; host order.
    pub netns_cookie: u64,
    /// Local address, IPv4 in the IPv4-mapped form; network order words.
    pub local_addr: [u32; 4],
    /// Remote address, IPv4 in the IPv4-mapped form; network order words.
    pub remote_addr: [u32; 4],
    /// Local port; host order.
    pub local_port: u32,
    /// Remote port; host order.
    pub remote_port: u32,
}

impl SockKey {
    /// The same connection seen from the other end.
    pub const fn peer(&self) -> SockKey {
        SockKey {
            netns_cookie: self.netns_cookie,
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Value of [`maps::ACCEL_SOCKETS`]: what one socket sent through the
/// shortcut.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccelCount {
    /// Messages redirected to the peer socket; host order.
    pub msgs: u64,
    /// Bytes redirected to the peer socket; host order.
    pub bytes: u64,
    /// Messages that took the TCP stack (peer not found, or switch off).
    pub passed: u64,
}

/// Every decision the kernel programs count.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// connect() of an enrolled workload sent to the proxy.
    Redirected = 0,
    /// connect() from a cgroup that is not enrolled.
    NotEnrolled = 1,
    /// Destination port is excluded.
    ExcludedPort = 2,
    /// Destination address is in an excluded CIDR.
    ExcludedCidr = 3,
    /// Destination is loopback and loopback capture is off.
    ExcludedLoopback = 4,
    /// connect() by the proxy itself (its cgroup or its socket mark).
    ProxyOwn = 5,
    /// A map or socket storage was full: the connection went uncaptured.
    ErrorMapFull = 6,
    /// The proxy accepted a connection whose original destination was not
    /// found.
    ErrorLookupMiss = 7,
    /// The proxy asked for a connection's original destination and got it.
    OriginalDstAnswered = 8,
    /// A socket joined the same-node shortcut (sockmap).
    Accelerated = 9,
    /// A DNS query (UDP to port 53) of an enrolled workload sent to the
    /// agent's DNS server.
    DnsRedirected = 10,
    /// connect() of a workload whose proxy is not ready yet: refused.
    RefusedPending = 11,
}

impl Decision {
    pub const COUNT: usize = 12;
    pub const ALL: [Decision; Self::COUNT] = [
        Decision::Redirected,
        Decision::NotEnrolled,
        Decision::ExcludedPort,
        Decision::ExcludedCidr,
        Decision::ExcludedLoopback,
        Decision::ProxyOwn,
        Decision::ErrorMapFull,
        Decision::ErrorLookupMiss,
        Decision::OriginalDstAnswered,
        Decision::Accelerated,
        Decision::DnsRedirected,
        Decision::RefusedPending,
    ];

    /// The name used in `redirector status` and its JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Decision::Redirected => "redirected",
            Decision::NotEnrolled => "not_enrolled",
            Decision::ExcludedPort => "excluded_port",
            Decision::ExcludedCidr => "excluded_cidr",
            Decision::ExcludedLoopback => "excluded_loopback",
            Decision::ProxyOwn => "proxy_own",
            Decision::ErrorMapFull => "error_map_full",
            Decision::ErrorLookupMiss => "error_lookup_miss",
            Decision::OriginalDstAnswered => "original_dst_answered",
            Decision::Accelerated => "accelerated",
            Decision::DnsRedirected => "dns_redirected",
            Decision::RefusedPending => "refused_pending",
        }
    }

    pub const fn from_u32(v: u32) -> Option<Decision> {
        if (v as usize) < Self::COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }
}

/// Key of [`maps::COUNTERS`]. Counts from sockops, where no cgroup id is at
/// hand, use cgroup id 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CounterKey {
    /// cgroup v2 id; host order.
    pub cgroup_id: u64,
    /// A [`Decision`]; host order.
    pub decision: u32,
    pub _pad: u32,
}

/// Sizes of the maps, shared so user space can say when one is full.
pub const MAX_ENROLLED: u32 = 16_384;
pub const MAX_EXCLUDED_PORTS: u32 = 1_024;
pub const MAX_EXCLUDED_CIDRS: u32 = 1_024;
pub const MAX_COUNTERS: u32 = 65_536;
/// Handshakes in flight at once (entries live from SYN to accept).
pub const MAX_PENDING: u32 = 65_536;

impl OriginalDst {
    /// The IPv4 address (network order word) when the destination is IPv4.
    pub const fn ipv4(&self) -> Option<u32> {
        if self.family == AF_INET {
            Some(self.addr[3])
        } else {
            None
        }
    }
}

/// `::ffff:0:0/96` in the kernel's word layout, on a little-endian machine:
/// the third word holds bytes 00 00 ff ff.
pub const fn v4_mapped_word() -> u32 {
    u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// Whether `addr` (network order words) is an IPv4-mapped IPv6 address.
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == v4_mapped_word()
}

/// The IPv4-mapped form of an IPv4 address given as a network order word.
pub const fn map_v4(ip4: u32) -> [u32; 4] {
    [0, 0, v4_mapped_word(), ip4]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these are repr(C), made of integers, with explicit padding.
    unsafe impl aya::Pod for super::CaptureConfig {}
    unsafe impl aya::Pod for super::Enrollment {}
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::AccelCount {}
    unsafe impl aya::Pod for super::PodInbound {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<CaptureConfig>(), 24);
        assert_eq!(size_of::<Enrollment>(), 8);
        assert_eq!(size_of::<OriginalDst>(), 32);
        assert_eq!(size_of::<ConnKey>(), 32);
        assert_eq!(size_of::<CounterKey>(), 16);
        assert_eq!(size_of::<SockKey>(), 48);
        assert_eq!(size_of::<AccelCount>(), 24);
        assert_eq!(size_of::<PodInbound>(), 16);
        assert_eq!(align_of::<ConnKey>(), 8);
    }

    #[test]
    fn v4_mapped_words_hold_the_address_bytes_in_network_order() {
        let ip = u32::from_ne_bytes([198, 18, 0, 1]);
        let mapped = map_v4(ip);
        let mut bytes = [0u8; 16];
        for (i, w) in mapped.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(bytes, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1]);
        assert!(is_v4_mapped(&mapped));
        assert!(!is_v4_mapped(&[0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]));
    }

    #[test]
    fn original_dst_reports_ipv4_only_for_ipv4() {
        let v4 = OriginalDst {
            addr: map_v4(u32::from_ne_bytes([198, 18, 0, 1])),
            port: 80,
            family: AF_INET,
            _pad: 0,
            cgroup_id: 0,
        };
        assert_eq!(v4.ipv4(), Some(u32::from_ne_bytes([198, 18, 0, 1])));
        let v6 = OriginalDst { family: AF_INET6, ..v4 };
        assert_eq!(v6.ipv4(), None);
    }

    #[test]
    fn a_socket_keys_peer_is_the_other_end_and_back() {
        let k = SockKey {
            netns_cookie: 7,
            local_addr: map_v4(1),
            remote_addr: map_v4(2),
            local_port: 40000,
            remote_port: 15001,
        };
        let p = k.peer();
        assert_eq!((p.local_port, p.remote_port), (15001, 40000));
        assert_eq!(p.local_addr, k.remote_addr);
        assert_eq!(p.peer(), k);
    }

    #[test]
    fn decisions_round_trip_through_their_numbers() {
        for d in Decision::ALL {
            assert_eq!(Decision::from_u32(d as u32), Some(d));
        }
        assert_eq!(Decision::from_u32(Decision::COUNT as u32), None);
    }
}
