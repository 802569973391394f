//! `/config_dump`: the effective configuration as `redirector
//! proxy-config` reads it: services with their endpoints' health (from the
//! balancer), HTTP routes, and the clusters' policies. Presentation only.

#![forbid(unsafe_code)]

use std::net::IpAddr;

use serde_json::{json, Value};

use crate::mesh::model::{Action, Address, EffectivePolicy, LbPolicy, Mesh, Protocol, StringMatcher};

/// The whole dump; `ejected(hostname, address)`: whether the balancer has
/// ejected that endpoint now.
pub fn dump(mesh: &Mesh, ejected: &dyn Fn(&str, IpAddr) -> bool) -> Value {
    json!({
        "services": services(mesh, ejected),
        "routes": routes(mesh),
        "protocols": protocols(mesh),
        "clusters": clusters(mesh),
        "warnings": mesh.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

fn services(mesh: &Mesh, ejected: &dyn Fn(&str, IpAddr) -> bool) -> Vec<Value> {
    mesh.services
        .iter()
        .map(|s| {
            let endpoints: Vec<_> = s
                .endpoints
                .iter()
                .map(|e| {
                    let ejected = match &e.address {
                        Address::Ip(ip) => ejected(&s.hostname, *ip),
                        Address::Dns(_) => false,
                    };
                    json!({
                        "address": match &e.address { Address::Ip(ip) => ip.to_string(), Address::Dns(h) => h.clone() },
                        "ports": e.ports,
                        "labels": e.labels,
                        "health": if ejected { "EJECTED" } else { "HEALTHY" },
                    })
                })
                .collect();
            json!({
                "hostname": s.hostname,
                "namespace": s.namespace,
                "addresses": s.vips.iter().map(std::string::ToString::to_string).collect::<Vec<_>>(),
                "ports": s.ports,
                "passthrough": s.passthrough,
                "endpoints": endpoints,
            })
        })
        .collect()
}

/// Where the L7 decision is made: per Service port for what pods send
/// (outbound, at the source node), per enrolled pod and port for what they
/// receive (inbound, at the destination node); L4 or L7 and why.
fn protocols(mesh: &Mesh) -> Vec<Value> {
    let layer = |p: Protocol| match p {
        Protocol::Http => "L7 (HTTP/1.1 or h2c)",
        Protocol::Http2 => "L7 (HTTP/2)",
        Protocol::Tcp => "L4",
        Protocol::Sniff => "L4 in pods; sniffed on the agent's host",
    };
    let mut out = Vec::new();
    for s in &mesh.services {
        for p in &s.ports {
            out.push(json!({
                "direction": "outbound",
                "workload": "every pod",
                "service": s.hostname,
                "port": p.port,
                "layer": layer(p.protocol),
                "why": p.protocol_from,
            }));
        }
    }
    for pod in mesh.pods.iter().filter(|p| p.enrolled) {
        for (port, svc, def) in mesh.inbound_ports_of(&pod.ips) {
            let l = if matches!(def.protocol, Protocol::Http | Protocol::Http2) { layer(def.protocol) } else { "L4" };
            out.push(json!({
                "direction": "inbound",
                "workload": format!("{}/{}", pod.namespace, pod.name),
                "service": mesh.services[svc].hostname,
                "port": port,
                "layer": l,
                "why": format!("{} of service port {}", def.protocol_from, def.port),
            }));
        }
    }
    out
}

fn routes(mesh: &Mesh) -> Vec<Value> {
    let describe = |m: &StringMatcher| match m {
        StringMatcher::Exact(e) => format!("exact {e}"),
        StringMatcher::Prefix(p) => format!("prefix {p}"),
        StringMatcher::Regex(r) => format!("regex {}", r.as_str()),
    };
    let mut routes = Vec::new();
    let mut keys: Vec<&usize> = mesh.http_routes.keys().collect();
    keys.sort();
    for svc in keys {
        for r in &mesh.http_routes[svc] {
            let matches: Vec<String> = r
                .matches
                .iter()
                .map(|m| {
                    let mut parts = Vec::new();
                    if let Some(u) = &m.uri {
                        parts.push(format!("uri {}", describe(u)));
                    }
                    if let Some(x) = &m.method {
                        parts.push(format!("method {}", describe(x)));
                    }
                    if let Some(x) = &m.authority {
                        parts.push(format!("authority {}", describe(x)));
                    }
                    for (h, x) in &m.headers {
                        parts.push(format!("header {h} {}", describe(x)));
                    }
                    for (q, x) in &m.query_params {
                        parts.push(format!("query {q} {}", describe(x)));
                    }
                    if let Some(p) = m.port {
                        parts.push(format!("port {p}"));
                    }
                    parts.join(", ")
                })
                .collect();
            let action = match &r.action {
                Action::Redirect(red) => {
                    format!("redirect {}", red.uri.clone().or(red.authority.clone()).unwrap_or_default())
                }
                Action::Route(ds) => ds
                    .iter()
                    .map(|d| {
                        let mut t = mesh.services[d.service].hostname.clone();
                        if let Some(s) = &d.subset {
                            t.push_str(&format!("|{s}"));
                        }
                        format!("{t} {}%", d.weight)
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            routes.push(json!({
                "service": mesh.services[*svc].hostname,
                "rule": r.source,
                "match": if matches.is_empty() { vec!["*".to_string()] } else { matches },
                "action": action,
                "fault": r.fault.is_some(),
                "retries": r.retries.as_ref().map(|x| x.attempts),
                "timeout_ms": r.timeout.map(|t| t.as_millis() as u64),
            }));
        }
    }
    routes
}

fn clusters(mesh: &Mesh) -> Vec<Value> {
    let mut clusters = Vec::new();
    for (i, s) in mesh.services.iter().enumerate() {
        let mut push = |subset: Option<&str>, port: Option<u16>, p: Option<&EffectivePolicy>| {
            clusters.push(json!({
                "service": s.hostname,
                "subset": subset,
                "port": port,
                "lb": p.map_or(LbPolicy::RoundRobin, |p| p.lb.clone()),
                "max_connections": p.and_then(|p| p.pool.max_connections),
                "max_pending_requests": p.and_then(|p| p.pool.max_pending),
                "max_requests": p.and_then(|p| p.pool.max_requests),
                "outlier_detection": p.and_then(|p| p.outlier.as_ref()).map(|o| json!({
                    "consecutive_5xx": o.consecutive_5xx,
                    "consecutive_gateway": o.consecutive_gateway,
                    "base_ejection_ms": o.base_ejection.as_millis() as u64,
                    "max_ejection_percent": o.max_ejection_percent,
                })),
            }));
        };
        match mesh.policies.get(&i) {
            None => push(None, None, None),
            Some(p) => {
                push(None, None, Some(&p.top));
                for (name, sp) in &p.subsets {
                    push(Some(name), None, Some(sp));
                }
                for ((name, port), pp) in &p.ports {
                    push(name.as_deref(), Some(*port), Some(pp));
                }
            }
        }
    }
    clusters
}
