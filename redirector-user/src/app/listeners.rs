//! The agent's own listeners in its namespace: outbound (15001) and host
//! inbound (15006) on loopback, admin (localhost), metrics and readiness,
//! DNS. All bound before anything is attached, so a taken port fails the
//! start with nothing left behind. An agent taking over from another is
//! handed the same sockets instead ([`Handover`]), each by its name.

#![forbid(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{anyhow, Result};
use tokio::net::TcpListener;
use tracing::warn;

use crate::config::AgentConfig;
use crate::sys::handover::Handover;

/// Every listener of the agent's own namespace.
pub(super) struct HostListeners {
    pub(super) outbound: Vec<TcpListener>,
    pub(super) inbound: Vec<TcpListener>,
    pub(super) admin: TcpListener,
    pub(super) metrics: TcpListener,
    pub(super) ready: TcpListener,
    pub(super) dns: Vec<std::net::UdpSocket>,
}

impl HostListeners {
    pub(super) fn bind(cfg: &AgentConfig, h: &Handover) -> Result<HostListeners> {
        let outbound = bind_loopback(h, "outbound", cfg.outbound_port, "proxy.outboundPort")?;
        let inbound = bind_loopback(h, "inbound", cfg.inbound_port, "proxy.inboundPort")?;
        let tcp = |name: &str, ip: IpAddr, port: u16, field: &str| -> Result<TcpListener> {
            let addr = SocketAddr::new(ip, port);
            let l = h
                .tcp(&format!("host/{name}/{addr}"), || bind_std(addr, false))
                .map_err(|e| bind_error(port, field, e))?;
            Ok(TcpListener::from_std(l)?)
        };
        let admin = tcp("admin", Ipv4Addr::LOCALHOST.into(), cfg.admin_port, "proxy.adminPort")?;
        // Prometheus and the kubelet reach these from outside the node.
        let metrics = tcp("metrics", Ipv4Addr::UNSPECIFIED.into(), cfg.metrics_port, "proxy.metricsPort")?;
        let ready = tcp("ready", Ipv4Addr::UNSPECIFIED.into(), cfg.readiness_port, "proxy.readinessPort")?;
        // The DNS server on loopback (IPv6 where the namespace has ::1).
        let udp = |ip: IpAddr| {
            let addr = SocketAddr::new(ip, cfg.dns_port);
            h.udp(&format!("host/dns/{addr}"), || std::net::UdpSocket::bind(addr))
        };
        let mut dns = vec![udp(Ipv4Addr::LOCALHOST.into()).map_err(|e| bind_error(cfg.dns_port, "proxy.dnsPort", e))?];
        if let Ok(s) = udp(Ipv6Addr::LOCALHOST.into()) {
            dns.push(s);
        }
        Ok(HostListeners { outbound, inbound, admin, metrics, ready, dns })
    }
}

fn bind_error(port: u16, field: &str, e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::AddrInUse {
        anyhow!(
            "port {port} is already in use (another agent? see `ss -ltnp 'sport = :{port}'`); stop that process or set {field} in the config"
        )
    } else {
        anyhow!("cannot listen on port {port}: {e}")
    }
}

fn bind_std(addr: SocketAddr, v6only: bool) -> io::Result<std::net::TcpListener> {
    let s =
        socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if v6only {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    // Accepted connections inherit it: no Nagle delay on what the proxy
    // writes back, without a system call per connection.
    s.set_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Bind 127.0.0.1:port and, where the namespace has IPv6, [::1]:port
/// (or take those handed over).
fn bind_loopback(h: &Handover, name: &str, port: u16, field: &str) -> Result<Vec<TcpListener>> {
    let listen = |ip: IpAddr, v6only: bool| {
        let addr = SocketAddr::new(ip, port);
        h.tcp(&format!("host/{name}/{addr}"), || bind_std(addr, v6only))
    };
    let v4 = listen(Ipv4Addr::LOCALHOST.into(), false).map_err(|e| bind_error(port, field, e))?;
    let mut out = vec![TcpListener::from_std(v4)?];
    match listen(Ipv6Addr::LOCALHOST.into(), true) {
        Ok(v6) => out.push(TcpListener::from_std(v6)?),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(bind_error(port, field, e)),
        Err(e) => warn!(port, error = %e, "no IPv6 loopback listener; IPv6 capture is off"),
    }
    Ok(out)
}
