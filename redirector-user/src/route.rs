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
use crate::mesh::model::{Address, Mesh, WeightedDestination};

/// Where a TCP connection to a mesh service goes: its TCP route (weighted;
/// the rules a client in `client_ns` sees, [`crate::mesh::export::visible`]) or
/// the service's endpoints. `None`: the service has no endpoint.
pub(crate) async fn tcp_target(
    mesh: &Mesh,
    balancer: &Balancer,
    svc: usize,
    dst: SocketAddr,
    client_ns: Option<&str>,
) -> Option<(SocketAddr, usize, Option<String>, u16)> {
    let service = &mesh.services[svc];
    if service.passthrough {
        return Some((dst, svc, None, dst.port()));
    }
    let rules = crate::mesh::export::visible(mesh.tcp_routes.get(&svc).map_or(&[][..], Vec::as_slice), client_ns);
    let rule = rules.into_iter().find(|r| r.port.is_none_or(|p| p == dst.port()));
    let (target_svc, subset, port) = match rule {
        Some(r) => {
            let d = weighted(&r.route, mesh.random(total_weight(&r.route).max(1) as usize) as u32)?;
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

/// The sum of the destinations' weights.
pub(crate) fn total_weight(dests: &[WeightedDestination]) -> u32 {
    dests.iter().map(|d| d.weight).sum()
}

/// The destination a roll in `0..total_weight` lands on: each takes as
/// many values as its weight, in order.
pub(crate) fn weighted(dests: &[WeightedDestination], roll: u32) -> Option<&WeightedDestination> {
    let mut left = roll;
    dests.iter().find(|d| {
        if left < d.weight {
            true
        } else {
            left -= d.weight;
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(service: usize, weight: u32) -> WeightedDestination {
        WeightedDestination { service, subset: None, port: None, weight, headers: None }
    }

    #[test]
    fn a_90_10_split_gives_ninety_rolls_of_a_hundred_to_the_first() {
        let d = [dest(1, 90), dest(2, 10)];
        let to_first = (0..total_weight(&d)).filter(|r| weighted(&d, *r).unwrap().service == 1).count();
        assert_eq!(to_first, 90);
        assert!(weighted(&d, 100).is_none(), "a roll past the total lands nowhere");
        assert!(weighted(&[dest(1, 0)], 0).is_none());
    }
}
