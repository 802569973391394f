//! The admin endpoint (localhost only, Istio's 15000): `/stats` (the proxy's
//! totals and open connections, JSON) and `/healthz/ready`.

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

use crate::proxy::{ProxyStats, StatsSnapshot};

pub async fn serve(listener: TcpListener, stats: Arc<ProxyStats>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = shutdown.changed() => return,
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let stats = stats.clone();
                async move { Ok::<_, Infallible>(route(&req, &stats)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "admin connection");
            }
        });
    }
}

fn route(req: &Request<hyper::body::Incoming>, stats: &ProxyStats) -> Response<Full<Bytes>> {
    let (status, body, ctype) = match req.uri().path() {
        "/stats" => (
            StatusCode::OK,
            serde_json::to_vec(&stats.snapshot()).expect("serializable"),
            "application/json",
        ),
        "/healthz/ready" => (StatusCode::OK, b"ready\n".to_vec(), "text/plain"),
        _ => (StatusCode::NOT_FOUND, b"not found\n".to_vec(), "text/plain"),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

/// Fetch `/stats` from a running agent (blocking; for the CLI).
pub fn fetch_stats(addr: SocketAddr) -> std::io::Result<StatsSnapshot> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /stats HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| std::io::Error::other("malformed admin response"))?;
    serde_json::from_str(body).map_err(std::io::Error::other)
}
