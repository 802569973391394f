//! The agent's DNS server (Istio's 15053): enrolled workloads' queries to
//! port 53 arrive here (the kernel programs redirect them, and make the
//! replies appear to come from the resolver the workload asked). Mesh
//! names are answered with the service's addresses: `name`,
//! `name.namespace`, `name.namespace.svc[.cluster.local]` and ServiceEntry
//! hosts; every other name is forwarded to the node's resolvers.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::mesh::{Mesh, MeshHandle};

/// TTL of mesh answers: short, so changes reach clients soon.
const TTL: u32 = 30;

/// Queries one DNS listener forwards to the node's resolvers at once.
/// Past that a query is dropped (the client's resolver asks again), so a
/// flood of names the mesh does not know cannot pile up tasks and sockets
/// in the agent; mesh names are answered inline either way.
const MAX_FORWARDS: usize = 64;

/// The nameservers of /etc/resolv.conf.
pub fn system_resolvers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|s| s.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

impl Mesh {
    /// The service a DNS name means to a client in namespace `client_ns`,
    /// if it is a mesh name exported to that namespace (a name another
    /// namespace keeps to itself is forwarded, as if the mesh did not
    /// know it).
    pub fn resolve_name(&self, name: &str, client_ns: Option<&str>) -> Option<usize> {
        self.resolve_any(name).filter(|i| self.services[*i].export.visible_to(client_ns))
    }

    fn resolve_any(&self, name: &str) -> Option<usize> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(i) = self.service_by_host(&name) {
            return Some(i);
        }
        let dots = name.matches('.').count();
        let candidate = match dots {
            0 => format!("{name}.default.svc.cluster.local"),
            1 => format!("{name}.svc.cluster.local"),
            _ if name.ends_with(".svc") => format!("{name}.cluster.local"),
            _ => return None,
        };
        if let Some(i) = self.service_by_host(&candidate) {
            return Some(i);
        }
        if dots == 0 {
            // A bare name outside `default`: the one service of that name.
            let prefix = format!("{name}.");
            let mut found = self
                .services
                .iter()
                .enumerate()
                .filter(|(_, s)| s.hostname.starts_with(&prefix) && s.hostname.ends_with(".svc.cluster.local"));
            let first = found.next().map(|(i, _)| i);
            if found.next().is_none() {
                return first;
            }
        }
        None
    }
}

/// The answer to a query, when it is for a mesh name with addresses;
/// `None`: forward it.
pub fn answer(mesh: &Mesh, query: &[u8], client_ns: Option<&str>) -> Option<Vec<u8>> {
    let req = Message::from_vec(query).ok()?;
    if req.metadata.message_type != MessageType::Query || req.metadata.op_code != OpCode::Query {
        return None;
    }
    let q = req.queries.first()?.clone();
    let svc = mesh.resolve_name(&q.name().to_ascii(), client_ns)?;
    let vips = &mesh.services[svc].vips;
    if vips.is_empty() {
        return None;
    }
    let mut resp = Message::response(req.metadata.id, OpCode::Query);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.authoritative = true;
    resp.metadata.response_code = ResponseCode::NoError;
    resp.add_query(q.clone());
    for ip in vips {
        let rdata = match (ip, q.query_type()) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => RData::A(A(*v4)),
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => RData::AAAA(AAAA(*v6)),
            _ => continue,
        };
        resp.add_answer(Record::from_rdata(q.name().clone(), TTL, rdata));
    }
    resp.to_vec().ok()
}

async fn forward(query: &[u8], upstreams: &[SocketAddr], mark: u32) -> Option<Vec<u8>> {
    for up in upstreams {
        let bind: SocketAddr = if up.is_ipv4() { "0.0.0.0:0".parse().ok()? } else { "[::]:0".parse().ok()? };
        let Ok(sock) = UdpSocket::bind(bind).await else { continue };
        let _ = socket2::SockRef::from(&sock).set_mark(mark);
        if sock.send_to(query, up).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 65535];
        match tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) if from == *up => return Some(buf[..n].to_vec()),
            _ => debug!(upstream = %up, "DNS upstream did not answer"),
        }
    }
    None
}

fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let req = Message::from_vec(query).ok()?;
    let mut m = Message::error_msg(req.metadata.id, req.metadata.op_code, ResponseCode::ServFail);
    m.add_queries(req.queries.iter().cloned());
    m.to_vec().ok()
}

/// Serve DNS on `socket` until `stop`, for clients in namespace
/// `client_ns` (a pod's; `None` on the node: only names exported to every
/// namespace).
pub fn serve(
    socket: UdpSocket,
    client_ns: Option<String>,
    mesh: MeshHandle,
    upstreams: Arc<Vec<SocketAddr>>,
    mark: u32,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let socket = Arc::new(socket);
    let forwards = Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS));
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        let mut dropped: u64 = 0;
        loop {
            let (n, client) = tokio::select! {
                r = socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "DNS receive");
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            let query = buf[..n].to_vec();
            if let Some(reply) = answer(&mesh.current(), &query, client_ns.as_deref()) {
                let _ = socket.send_to(&reply, client).await;
                continue;
            }
            let Ok(slot) = Arc::clone(&forwards).try_acquire_owned() else {
                dropped += 1;
                if dropped.is_power_of_two() {
                    warn!(dropped, limit = MAX_FORWARDS, "DNS forwards at their limit: query dropped");
                }
                continue;
            };
            let socket = Arc::clone(&socket);
            let upstreams = Arc::clone(&upstreams);
            tokio::spawn(async move {
                let _slot = slot;
                let reply = match forward(&query, &upstreams, mark).await {
                    Some(r) => Some(r),
                    None => servfail(&query),
                };
                if let Some(r) = reply {
                    let _ = socket.send_to(&r, client).await;
                }
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::source_dir::{load_text, Documents};
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn mesh() -> Mesh {
        let mut docs = Documents::default();
        let mut errors = Vec::new();
        load_text(
            std::path::Path::new("m.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: bookinfo}\nspec: {clusterIP: 10.96.0.20, ports: [{port: 9080}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: httpbin}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\nspec: {hosts: [api.example.com], addresses: [240.0.0.1], ports: [{number: 443, name: tls}], resolution: STATIC, endpoints: [{address: 203.0.113.9}]}\n",
            &mut docs,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        Mesh::compile(&docs).unwrap()
    }

    fn ask(m: &Mesh, name: &str, t: RecordType) -> Option<Message> {
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        answer(m, &q.to_vec().unwrap(), None).map(|b| Message::from_vec(&b).unwrap())
    }

    #[test]
    fn mesh_names_in_every_form_get_the_service_address() {
        let m = mesh();
        for n in [
            "httpbin",
            "httpbin.default",
            "httpbin.default.svc",
            "httpbin.default.svc.cluster.local.",
            "reviews",
            "reviews.bookinfo",
        ] {
            let r = ask(&m, n, RecordType::A).unwrap_or_else(|| panic!("{n} not answered"));
            assert_eq!(r.answers.len(), 1, "{n}");
        }
        let r = ask(&m, "api.example.com", RecordType::A).unwrap();
        assert_eq!(r.answers[0].data, RData::A(A("240.0.0.1".parse().unwrap())));
        // No IPv6 address: an empty answer, not a forward.
        assert!(ask(&m, "httpbin", RecordType::AAAA).unwrap().answers.is_empty());
        assert!(ask(&m, "example.org", RecordType::A).is_none(), "not a mesh name: forwarded");
    }

    proptest::proptest! {
        /// Any datagram: an answer, or nothing to say (forwarded), never a
        /// panic; a query for any name of the mesh's shape likewise.
        #[test]
        fn any_datagram_is_answered_or_forwarded(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let m = mesh();
            let _ = answer(&m, &bytes, None);
            let _ = answer(&m, &bytes, Some("bookinfo"));
        }

        #[test]
        fn a_query_for_any_name_is_answered_or_forwarded(labels in proptest::collection::vec("[a-z0-9-]{1,20}", 1..6), t in 0u16..300) {
            let m = mesh();
            if let Ok(name) = Name::from_ascii(labels.join(".")) {
                let mut q = Message::query();
                q.add_query(Query::query(name, RecordType::from(t)));
                let _ = answer(&m, &q.to_vec().unwrap(), Some("default"));
            }
        }
    }
}
