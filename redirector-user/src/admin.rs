//! The agent's HTTP endpoints, on Istio's ports: admin on 127.0.0.1:15000
//! (`/stats`: the proxy's totals and open connections; `/config_dump`: the
//! mesh in force; `/healthz/ready`), Prometheus metrics on 15020
//! (`/stats/prometheus`, `/metrics`, and `/node`: this node's agent as the
//! cluster-wide `redirector status` and `version` read it) and readiness on
//! 15021 (`/healthz/ready`).

#![forbid(unsafe_code)]

pub mod config_dump;

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

use crate::mesh::MeshHandle;
use crate::telemetry::connection::{ProxyStats, StatsSnapshot};
use crate::telemetry::Metrics;

/// What the endpoints read.
#[derive(Clone)]
pub struct Sources {
    pub stats: Arc<ProxyStats>,
    pub mesh: MeshHandle,
    pub(crate) balancer: Arc<crate::endpoint::Balancer>,
    pub metrics: Arc<Metrics>,
    /// This node's agent: version, capture, config version, pods served.
    pub node: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Metrics,
    Readiness,
}

/// Connections one of these listeners serves at once, and from one
/// address; more are closed as they arrive (a scraper or a probe needs a
/// few, and one client holding its share leaves the rest to others).
const MAX_CONNECTIONS: usize = 1024;
const MAX_PER_PEER: usize = 32;

/// Serve `role`'s endpoints on `listener` until `shutdown`. A connection
/// whose request head has not arrived within `header_read_timeout` (from
/// its opening or its previous response) is closed, so slow or idle
/// clients cannot hold the listener; at most [`MAX_CONNECTIONS`] at once,
/// [`MAX_PER_PEER`] from one address.
pub async fn serve(
    listener: TcpListener,
    role: Role,
    sources: Sources,
    header_read_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = crate::proxy::caps::Caps::new(MAX_CONNECTIONS, MAX_PER_PEER);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Some(slot) = slots.admit(peer.ip()) else {
            sources.stats.rejected_over_limit.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            continue;
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let sources = sources.clone();
                async move { Ok::<_, Infallible>(route(&req, role, &sources)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            if let Err(e) = served {
                debug!(error = %e, "admin connection");
            }
            drop(slot);
        });
    }
}

/// Why the agent is not ready, from its node status: the cluster not yet
/// listed (so pods it should serve may be unknown), or pods held until
/// their listeners are open. The capture is attached and the host
/// listeners open before this server starts.
fn not_ready(node: &serde_json::Value) -> Option<String> {
    if node["kubernetes"].is_object() && node["kubernetes"]["synced"] != true {
        return Some("the cluster's objects are not yet listed".into());
    }
    let held: Vec<&str> =
        node["held"].as_array().map(|a| a.iter().filter_map(|p| p.as_str()).collect()).unwrap_or_default();
    if !held.is_empty() {
        return Some(format!("{} pod(s) held until their listeners are open: {}", held.len(), held.join(", ")));
    }
    None
}

fn route(req: &Request<hyper::body::Incoming>, role: Role, src: &Sources) -> Response<Full<Bytes>> {
    let json = |v: Vec<u8>| (StatusCode::OK, v, "application/json");
    let (status, body, ctype) = match (role, req.uri().path()) {
        (_, "/healthz/ready") => match not_ready(&(src.node)()) {
            None => (StatusCode::OK, b"ready\n".to_vec(), "text/plain"),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n").into_bytes(), "text/plain"),
        },
        (Role::Admin, "/stats") => json(serde_json::to_vec(&src.stats.snapshot()).expect("serializable")),
        (Role::Admin, "/config_dump") => {
            let mut dump = config_dump::dump(&src.mesh.current(), &|host, ip| src.balancer.is_ejected(host, ip));
            dump["version"] = serde_json::json!(src.mesh.version());
            json(serde_json::to_vec_pretty(&dump).expect("serializable"))
        }
        (Role::Admin | Role::Metrics, "/node") => json(serde_json::to_vec_pretty(&(src.node)()).expect("serializable")),
        (Role::Metrics, "/stats/prometheus" | "/metrics") => (
            StatusCode::OK,
            {
                src.metrics.config_rejected.set(i64::try_from(src.mesh.current().rejected.len()).unwrap_or(i64::MAX));
                src.metrics.encode().into_bytes()
            },
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => (StatusCode::NOT_FOUND, b"not found\n".to_vec(), "text/plain"),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

/// GET `path` from a running agent's admin endpoint (blocking; for the
/// CLI); returns the body.
pub fn fetch(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .ok_or_else(|| std::io::Error::other("malformed admin response"))
}

/// Fetch `/stats` from a running agent (blocking; for the CLI).
pub fn fetch_stats(addr: SocketAddr) -> std::io::Result<StatsSnapshot> {
    serde_json::from_str(&fetch(addr, "/stats")?).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::not_ready;
    use serde_json::json;

    /// Ready only once the cluster is listed and no pod is held.
    #[test]
    fn readiness_waits_for_the_cluster_and_the_held_pods() {
        assert_eq!(not_ready(&json!({"kubernetes": null, "held": []})), None);
        let unsynced = not_ready(&json!({"kubernetes": {"synced": false}, "held": []})).unwrap();
        assert!(unsynced.contains("not yet listed"), "{unsynced}");
        let held = not_ready(&json!({"kubernetes": {"synced": true}, "held": ["default/a2"]})).unwrap();
        assert!(held.contains("1 pod(s) held") && held.contains("default/a2"), "{held}");
        assert_eq!(not_ready(&json!({"kubernetes": {"synced": true}, "held": []})), None);
    }
}
