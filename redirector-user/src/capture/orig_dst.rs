//! The two answers capture gives the proxy about an accepted connection:
//! where the client was going (`SO_ORIGINAL_DST`, answered by our
//! getsockopt program under eBPF capture and by conntrack under iptables
//! capture) and, under eBPF capture, which cgroup it came from. The proxy
//! never learns which capture mode is in force.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::net::TcpStream;

/// The client's cgroup id, as the kernel programs recorded it at connect()
/// (eBPF capture; `None` under iptables capture or for an unknown socket).
pub fn source_cgroup(stream: &TcpStream) -> Option<u64> {
    let mut id: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: an 8-byte buffer and its length.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            redirector_common::SO_REDIRECTOR_SOURCE_CGROUP,
            (&raw mut id).cast(),
            &raw mut len,
        )
    };
    (rc == 0 && len as usize == std::mem::size_of::<u64>() && id != 0).then_some(id)
}

/// The destination the client dialled. `peer` is the client's address as
/// accept() returned it: its family is the socket's, which picks the
/// option's level (no getsockname per connection).
pub fn original_dst(stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    // SAFETY: the buffers are sized for the structures the kernel writes.
    unsafe {
        if peer.is_ipv4() {
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::getsockopt(
                fd,
                libc::SOL_IP,
                redirector_common::SO_ORIGINAL_DST,
                (&raw mut sa).cast(),
                &raw mut len,
            );
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                u16::from_be(sa.sin_port),
            )))
        } else {
            let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            let rc = libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                redirector_common::SO_ORIGINAL_DST,
                (&raw mut sa).cast(),
                &raw mut len,
            );
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
            let port = u16::from_be(sa.sin6_port);
            // An IPv4 destination reached over a dual-stack socket.
            Ok(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
            })
        }
    }
}
