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

pub async fn serve(listener: TcpListener, role: Role, sources: Sources, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = shutdown.changed() => return,
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let sources = sources.clone();
                async move { Ok::<_, Infallible>(route(&req, role, &sources)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await
            {
                debug!(error = %e, "admin connection");
            }
        });
    }
}

fn route(req: &Request<hyper::body::Incoming>, role: Role, src: &Sources) -> Response<Full<Bytes>> {
    let json = |v: Vec<u8>| (StatusCode::OK, v, "application/json");
    let (status, body, ctype) = match (role, req.uri().path()) {
        (_, "/healthz/ready") => (StatusCode::OK, b"ready\n".to_vec(), "text/plain"),
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
