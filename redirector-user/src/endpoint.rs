//! The balancer: which endpoint of a destination a connection or request
//! goes to (round robin, least request, random, consistent hash), outlier
//! detection (ejection and return), and the connection-pool limits that
//! are Envoy's circuit breakers.
//!
//! Its state is keyed by what it describes (service hostname, subset,
//! port; endpoint address), not by positions in the compiled mesh, so a
//! config reload keeps ejections, in-flight counts and pool slots. It does
//! not choose among a VirtualService's routes (that is [`crate::route`])
//! and opens no connection.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
// tokio's clock, so ejection times follow paused time in tests.
use tokio::time::Instant;

use crate::mesh::model::{Address, Endpoint, LbPolicy, Mesh, PoolLimits};
use crate::mesh::source_dir::labels_match;

/// Circuit-breaker state of one destination (service and subset).
#[derive(Debug)]
pub(crate) struct Cluster {
    pub(crate) connections: Option<Arc<Semaphore>>,
    pub(crate) requests: Option<Arc<Semaphore>>,
    pub(crate) pending: AtomicUsize,
    pub(crate) limits: PoolLimits,
}

#[derive(Debug, Default, Clone)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// A chosen endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Picked {
    pub(crate) address: Address,
    pub(crate) port: u16,
    pub(crate) labels: BTreeMap<String, String>,
}

/// How a request to an endpoint ended, for outlier detection.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Result5xx {
    /// A response with this status.
    Status(u16),
    /// No response: connect failure, reset, timeout (counted as a
    /// gateway error, as Envoy does for locally originated failures).
    Failed,
}

/// A destination whose pool limits apply: service hostname, subset, port.
type ClusterKey = (String, Option<String>, u16);

/// The runtime state of load balancing, shared by every listener and kept
/// across config reloads.
#[derive(Default)]
pub(crate) struct Balancer {
    /// Round-robin positions per (service hostname, subset).
    cursors: Mutex<HashMap<(String, Option<String>), usize>>,
    /// Requests in flight per endpoint, for LEAST_REQUEST.
    in_flight: Mutex<HashMap<SocketAddr, usize>>,
    clusters: Mutex<HashMap<ClusterKey, Arc<Cluster>>>,
    /// Outlier detection per (service hostname, endpoint).
    health: Mutex<HashMap<(String, SocketAddr), Health>>,
}

/// A request counted as in flight to an endpoint until dropped.
pub(crate) struct InFlight<'a> {
    balancer: &'a Balancer,
    endpoint: SocketAddr,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.balancer.in_flight.lock().expect("lb lock").get_mut(&self.endpoint) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Balancer {
    /// The circuit-breaker state of a destination, made on first use. A
    /// reload that keeps its limits keeps its state (slots held, requests
    /// queued); one that changes them starts a new one, and what the old
    /// one holds drains with the requests holding it.
    pub(crate) fn cluster(&self, mesh: &Mesh, svc: usize, subset: Option<&str>, port: u16) -> Arc<Cluster> {
        let limits = mesh.policy(svc, subset, port).map(|p| p.pool.clone()).unwrap_or_default();
        let key = (mesh.services[svc].hostname.clone(), subset.map(str::to_string), port);
        let mut clusters = self.clusters.lock().expect("cluster lock");
        match clusters.get(&key) {
            Some(c) if c.limits == limits => Arc::clone(c),
            _ => {
                let c = Arc::new(Cluster {
                    connections: limits.max_connections.map(|n| Arc::new(Semaphore::new(n))),
                    requests: limits.max_requests.map(|n| Arc::new(Semaphore::new(n))),
                    pending: AtomicUsize::new(0),
                    limits,
                });
                clusters.insert(key, Arc::clone(&c));
                c
            }
        }
    }

    /// Count a request in flight to `endpoint` (LEAST_REQUEST) until the
    /// returned guard drops.
    pub(crate) fn start_request(&self, endpoint: SocketAddr) -> InFlight<'_> {
        *self.in_flight.lock().expect("lb lock").entry(endpoint).or_insert(0) += 1;
        InFlight { balancer: self, endpoint }
    }

    /// Whether outlier detection has `ip` of service `hostname` ejected now.
    pub(crate) fn is_ejected(&self, hostname: &str, ip: IpAddr) -> bool {
        let now = Instant::now();
        self.health
            .lock()
            .expect("health lock")
            .iter()
            .any(|((host, a), h)| host == hostname && a.ip() == ip && h.ejected_until.is_some_and(|t| t > now))
    }

    /// Choose an endpoint of `svc` (restricted to `subset`) for `port` (the
    /// service port), skipping ejected ones. Returns the address to connect
    /// to.
    pub(crate) fn pick_endpoint(
        &self,
        mesh: &Mesh,
        svc: usize,
        subset: Option<&str>,
        port: u16,
    ) -> Option<(Address, u16)> {
        self.pick(mesh, svc, subset, port, None).map(|e| (e.address, e.port))
    }

    /// [`Balancer::pick_endpoint`] with the endpoint's labels. `hash`: the
    /// request's consistent-hash key, where the policy hashes.
    pub(crate) fn pick(
        &self,
        mesh: &Mesh,
        svc: usize,
        subset: Option<&str>,
        port: u16,
        hash: Option<u64>,
    ) -> Option<Picked> {
        let service = &mesh.services[svc];
        let port_def = service.port(port).or_else(|| service.ports.first())?;
        let policy = mesh.policy(svc, subset, port_def.port);
        if subset.is_some() && policy.is_none() {
            return None;
        }
        let labels = policy.and_then(|p| p.labels.as_ref());
        let lb = policy.map_or(LbPolicy::RoundRobin, |p| p.lb.clone());
        let port_of =
            |e: &Endpoint| e.ports.get(&port_def.name).copied().or(port_def.target_port).unwrap_or(port_def.port);
        let all: Vec<&Endpoint> =
            service.endpoints.iter().filter(|e| labels.is_none_or(|l| labels_match(l, &e.labels))).collect();
        if all.is_empty() {
            return None;
        }
        // Outlier detection: leave ejected endpoints out; if every one is
        // ejected, use them all (Envoy's panic mode).
        let now = Instant::now();
        let health = self.health.lock().expect("health lock");
        let ejected = |e: &Endpoint| match &e.address {
            Address::Ip(ip) => health
                .get(&(service.hostname.clone(), SocketAddr::new(*ip, port_of(e))))
                .and_then(|h| h.ejected_until)
                .is_some_and(|t| t > now),
            Address::Dns(_) => false,
        };
        let healthy: Vec<&Endpoint> = all.iter().copied().filter(|e| !ejected(e)).collect();
        drop(health);
        let candidates = if healthy.is_empty() { all } else { healthy };
        let chosen = match lb {
            LbPolicy::HashHeader(_) | LbPolicy::HashQueryParameter(_) | LbPolicy::HashSourceIp if hash.is_some() => {
                use std::hash::{Hash, Hasher};
                let key = hash.unwrap_or_default();
                let score = |e: &Endpoint| {
                    let mut h = std::hash::DefaultHasher::new();
                    key.hash(&mut h);
                    match &e.address {
                        Address::Ip(ip) => ip.hash(&mut h),
                        Address::Dns(n) => n.hash(&mut h),
                    }
                    port_of(e).hash(&mut h);
                    h.finish()
                };
                candidates.iter().copied().max_by_key(|e| score(e)).expect("not empty")
            }
            LbPolicy::Random => candidates[mesh.random(candidates.len())],
            LbPolicy::LeastRequest => {
                let in_flight = self.in_flight.lock().expect("lb lock");
                // Power of two choices, as Envoy does.
                let a = candidates[mesh.random(candidates.len())];
                let b = candidates[mesh.random(candidates.len())];
                let load = |e: &Endpoint| match &e.address {
                    Address::Ip(ip) => in_flight.get(&SocketAddr::new(*ip, port_of(e))).copied().unwrap_or(0),
                    Address::Dns(_) => 0,
                };
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
            _ => {
                let mut cursors = self.cursors.lock().expect("lb lock");
                let c = cursors.entry((service.hostname.clone(), subset.map(str::to_string))).or_insert(0);
                let e = candidates[*c % candidates.len()];
                *c = c.wrapping_add(1);
                e
            }
        };
        Some(Picked { address: chosen.address.clone(), port: port_of(chosen), labels: chosen.labels.clone() })
    }

    /// Record how a request to `endpoint` of `svc` ended; eject the
    /// endpoint when outlier detection says so. Returns true when this
    /// result ejected it.
    pub(crate) fn report(
        &self,
        mesh: &Mesh,
        svc: usize,
        subset: Option<&str>,
        port: u16,
        endpoint: SocketAddr,
        result: Result5xx,
    ) -> bool {
        let Some(o) = mesh.policy(svc, subset, port).and_then(|p| p.outlier.clone()) else {
            return false;
        };
        let service = &mesh.services[svc];
        let total = service.endpoints.len().max(1);
        let mut health = self.health.lock().expect("health lock");
        let now = Instant::now();
        // maxEjectionPercent is of this service's endpoints, as Envoy's is
        // of its cluster's.
        let ejected_now = health
            .iter()
            .filter(|((host, _), h)| *host == service.hostname && h.ejected_until.is_some_and(|t| t > now))
            .count();
        let h = health.entry((service.hostname.clone(), endpoint)).or_default();
        let (five, gateway) = match result {
            Result5xx::Status(s) => (s >= 500, matches!(s, 502..=504)),
            Result5xx::Failed => (true, true),
        };
        if !five {
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
            return false;
        }
        h.consecutive_5xx += 1;
        if gateway {
            h.consecutive_gateway += 1;
        } else {
            h.consecutive_gateway = 0;
        }
        let trip = (o.consecutive_5xx > 0 && h.consecutive_5xx >= o.consecutive_5xx)
            || (o.consecutive_gateway > 0 && h.consecutive_gateway >= o.consecutive_gateway);
        let allowed = (ejected_now + 1) * 100 <= total * o.max_ejection_percent as usize;
        if trip && allowed && h.ejected_until.is_none_or(|t| t <= now) {
            h.ejections += 1;
            h.ejected_until = Some(now + o.base_ejection * h.ejections);
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::source_dir::{load_text, Documents};

    fn compile(yaml: &str) -> Mesh {
        let mut docs = Documents::default();
        let mut errors = Vec::new();
        load_text(std::path::Path::new("m.yaml"), yaml, &mut docs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        Mesh::compile(&docs).expect("compiles")
    }

    /// Two endpoints of `web`, outlier detection ejecting after one 5xx,
    /// and one connection allowed; `extra` is the reload's change.
    fn mesh(extra: &str) -> Mesh {
        compile(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.5, ports: [{{name: http, port: 80}}]}}\n---\n\
             apiVersion: v1\nkind: Endpoints\nmetadata: {{name: web}}\nsubsets: [{{addresses: [{{ip: 198.18.0.2}}, {{ip: 198.18.0.3}}], ports: [{{name: http, port: 8080}}]}}]\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web}}\nspec:\n  host: web\n  trafficPolicy:\n    connectionPool: {{tcp: {{maxConnections: 1}}}}\n    outlierDetection: {{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}}\n{extra}"
        ))
    }

    fn web(m: &Mesh) -> usize {
        m.service_by_host("web.default.svc.cluster.local").expect("web")
    }

    #[test]
    fn an_ejected_endpoint_stays_ejected_across_a_config_reload() {
        let balancer = Balancer::default();
        let before = mesh("");
        let bad: SocketAddr = "198.18.0.2:8080".parse().unwrap();
        assert!(balancer.report(&before, web(&before), None, 80, bad, Result5xx::Status(503)), "one 5xx ejects it");
        // The reload: another service appears, so every index may move.
        let after = mesh("---\napiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec: {clusterIP: 10.96.0.4, ports: [{name: http, port: 81}]}\n");
        assert!(balancer.is_ejected("web.default.svc.cluster.local", bad.ip()));
        for _ in 0..10 {
            let p = balancer.pick(&after, web(&after), None, 80, None).expect("an endpoint");
            assert_eq!(
                p.address,
                Address::Ip("198.18.0.3".parse().unwrap()),
                "the ejected endpoint is skipped after the reload"
            );
        }
    }

    #[test]
    fn a_circuit_breaker_slot_held_before_a_reload_still_counts_after_it() {
        let balancer = Balancer::default();
        let before = mesh("");
        let held =
            balancer.cluster(&before, web(&before), None, 80).connections.clone().unwrap().try_acquire_owned().unwrap();
        let after = mesh("---\napiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec: {clusterIP: 10.96.0.4, ports: [{name: http, port: 81}]}\n");
        let cluster = balancer.cluster(&after, web(&after), None, 80);
        assert!(cluster.connections.clone().unwrap().try_acquire_owned().is_err(), "maxConnections 1 is still taken");
        drop(held);
        assert!(cluster.connections.clone().unwrap().try_acquire_owned().is_ok());
    }

    #[test]
    fn changed_pool_limits_start_a_new_breaker() {
        let balancer = Balancer::default();
        let before = mesh("");
        let _held =
            balancer.cluster(&before, web(&before), None, 80).connections.clone().unwrap().try_acquire_owned().unwrap();
        let after = compile(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.5, ports: [{name: http, port: 80}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web}\nspec:\n  host: web\n  trafficPolicy:\n    connectionPool: {tcp: {maxConnections: 2}}\n",
        );
        let cluster = balancer.cluster(&after, web(&after), None, 80);
        assert_eq!(cluster.limits.max_connections, Some(2));
        assert!(cluster.connections.clone().unwrap().try_acquire_owned().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_returns_after_its_base_ejection_time() {
        let balancer = Balancer::default();
        let m = mesh("");
        let bad: SocketAddr = "198.18.0.2:8080".parse().unwrap();
        assert!(balancer.report(&m, web(&m), None, 80, bad, Result5xx::Failed));
        tokio::time::advance(std::time::Duration::from_secs(29)).await;
        assert!(balancer.is_ejected("web.default.svc.cluster.local", bad.ip()), "30 s have not passed");
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        assert!(!balancer.is_ejected("web.default.svc.cluster.local", bad.ip()));
        let picked: std::collections::BTreeSet<String> =
            (0..4).map(|_| format!("{:?}", balancer.pick(&m, web(&m), None, 80, None).unwrap().address)).collect();
        assert_eq!(picked.len(), 2, "both endpoints are picked again");
        // A second ejection lasts twice as long (Envoy multiplies the base
        // time by the number of ejections).
        assert!(balancer.report(&m, web(&m), None, 80, bad, Result5xx::Status(502)));
        tokio::time::advance(std::time::Duration::from_secs(59)).await;
        assert!(balancer.is_ejected("web.default.svc.cluster.local", bad.ip()));
    }

    #[test]
    fn round_robin_continues_across_a_reload() {
        let balancer = Balancer::default();
        let before = mesh("");
        let first = balancer.pick(&before, web(&before), None, 80, None).unwrap().address;
        let after = mesh("---\napiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec: {clusterIP: 10.96.0.4, ports: [{name: http, port: 81}]}\n");
        let second = balancer.pick(&after, web(&after), None, 80, None).unwrap().address;
        assert_ne!(first, second, "the cursor is not reset by the reload");
    }
}
