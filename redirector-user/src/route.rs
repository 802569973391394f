//! Routing: where a captured connection goes once its original destination
//! and source are known. This file is the L4 decision (a Service's TCP
//! routes and endpoints); [`http`] routes HTTP per request and [`sniff`]
//! tells HTTP from opaque TCP on undeclared ports. Routing decides; it
//! opens no upstream connection (that is [`crate::transport`]).

#![forbid(unsafe_code)]

pub(crate) mod http;
pub(crate) mod sniff;

use std::net::SocketAddr;

use crate::endpoint::Balancer;
use crate::mesh::model::{Address, Mesh};

/// Where a TCP connection to a mesh service goes: its TCP route (weighted)
/// or the service's endpoints. `None`: the service has no endpoint.
pub(crate) async fn tcp_target(
    mesh: &Mesh,
    balancer: &Balancer,
    svc: usize,
    dst: SocketAddr,
) -> Option<(SocketAddr, usize, Option<String>, u16)> {
    let service = &mesh.services[svc];
    if service.passthrough {
        return Some((dst, svc, None, dst.port()));
    }
    let rule =
        mesh.tcp_routes.get(&svc).and_then(|rules| rules.iter().find(|r| r.port.is_none_or(|p| p == dst.port())));
    let (target_svc, subset, port) = match rule {
        Some(r) => {
            let total: u32 = r.route.iter().map(|d| d.weight).sum();
            let mut pick = mesh.random(total.max(1) as usize) as u32;
            let d = r.route.iter().find(|d| {
                if pick < d.weight {
                    true
                } else {
                    pick -= d.weight;
                    false
                }
            })?;
            let port = d.port.unwrap_or(dst.port());
            (d.service, d.subset.clone(), port)
        }
        None => (svc, None, dst.port()),
    };
    let (addr, port) = balancer.pick_endpoint(mesh, target_svc, subset.as_deref(), port)?;
    let a = match addr {
        Address::Ip(ip) => SocketAddr::new(ip, port),
        Address::Dns(host) => tokio::net::lookup_host((host.as_str(), port)).await.ok()?.next()?,
    };
    Some((a, target_svc, subset, port))
}
