//! The agent's own listeners in its namespace: outbound (15001) and host
//! inbound (15006) on loopback, admin (localhost), metrics and readiness,
//! DNS. All bound before anything is attached, so a taken port fails the
//! start with nothing left behind.

#![forbid(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{anyhow, Result};
use tokio::net::TcpListener;
use tracing::warn;

use crate::config::AgentConfig;

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
    pub(super) fn bind(cfg: &AgentConfig) -> Result<HostListeners> {
        let outbound = bind_loopback(cfg.outbound_port, "proxy.outboundPort")?;
        let inbound = bind_loopback(cfg.inbound_port, "proxy.inboundPort")?;
        let admin = bind_std(SocketAddr::from((Ipv4Addr::LOCALHOST, cfg.admin_port)), false)
            .map_err(|e| bind_error(cfg.admin_port, "proxy.adminPort", e))?;
        // Prometheus and the kubelet reach these from outside the node.
        let metrics = bind_std(SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.metrics_port)), false)
            .map_err(|e| bind_error(cfg.metrics_port, "proxy.metricsPort", e))?;
        let ready = bind_std(SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.readiness_port)), false)
            .map_err(|e| bind_error(cfg.readiness_port, "proxy.readinessPort", e))?;
        // The DNS server on loopback (IPv6 where the namespace has ::1).
        let mut dns = vec![std::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, cfg.dns_port)))
            .map_err(|e| bind_error(cfg.dns_port, "proxy.dnsPort", e))?];
        if let Ok(s) = std::net::UdpSocket::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, cfg.dns_port))) {
            dns.push(s);
        }
        Ok(HostListeners {
            outbound,
            inbound,
            admin: TcpListener::from_std(admin)?,
            metrics: TcpListener::from_std(metrics)?,
            ready: TcpListener::from_std(ready)?,
            dns,
        })
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

/// Bind 127.0.0.1:port and, where the namespace has IPv6, [::1]:port.
fn bind_loopback(port: u16, field: &str) -> Result<Vec<TcpListener>> {
    let v4 = bind_std(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), false).map_err(|e| bind_error(port, field, e))?;
    let mut out = vec![TcpListener::from_std(v4)?];
    match bind_std(SocketAddr::from((Ipv6Addr::LOCALHOST, port)), true) {
        Ok(v6) => out.push(TcpListener::from_std(v6)?),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(bind_error(port, field, e)),
        Err(e) => warn!(port, error = %e, "no IPv6 loopback listener; IPv6 capture is off"),
    }
    Ok(out)
}
