//! The node proxy's listeners and what they share. A connection is
//! accepted here ([`serve`]: the connection limit, back-off on accept
//! errors, stop and drain), then handled by direction:
//! [`outbound`] (15001: original destination, source, route, transport,
//! copy), [`inbound`] (a pod's 15006 and 15008), [`gateway`] (the ingress
//! gateway's ports) and [`dns`] (15053). [`source`] names who a captured
//! connection comes from.
//!
//! The proxy does not know how a connection was captured: see
//! [`crate::capture::orig_dst`].

#![forbid(unsafe_code)]

pub(crate) mod outbound;
pub(crate) mod source;
pub(crate) mod inbound;
pub(crate) mod gateway;
pub(crate) mod dns;
pub(crate) mod caps;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

use crate::endpoint::Balancer;
use crate::mesh::MeshHandle;
use crate::telemetry::connection::ProxyStats;
use crate::telemetry::Metrics;
use crate::transport::http_client::Upstreams;
use crate::transport::socket::WorkloadNet;
use crate::transport::Transport;

/// What the handlers of one workload's listeners share.
#[derive(Clone)]
pub struct ProxySettings {
    pub(crate) max_connections: usize,
    pub(crate) idle_timeout: Duration,
    /// How upstreams are reached (mark, connect timeout, HBONE pool).
    pub(crate) transport: Transport,
    /// The mesh in force (empty: every connection goes to its original
    /// destination).
    pub(crate) mesh: MeshHandle,
    /// HTTP clients for L7 routing.
    pub(crate) upstreams: Upstreams,
    /// Load-balancing state, kept across config reloads.
    pub(crate) balancer: Arc<Balancer>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) access_log: bool,
    /// Source workload names by cgroup.
    pub(crate) workloads: Arc<source::Workloads>,
    /// The workload whose listener this is: where upstream sockets are
    /// made and who the connections are from.
    pub(crate) workload: Arc<WorkloadNet>,
    /// Open connections end when this turns true or its sender goes (a
    /// pod that left, an agent that stops), independently of the
    /// listeners' stop (a pod handed to the next agent drains). `None`:
    /// they drain for the `drain` time after the listeners stop.
    pub(crate) close: Option<watch::Receiver<bool>>,
}

/// Serve `listeners` until `shutdown` turns true: at most
/// `max_connections` at once (over it, a connection is closed and
/// counted), `handle` for each. Then wait up to `drain` for open
/// connections to finish. With `close`, open connections end when it
/// says instead (see [`ProxySettings::close`]).
pub(crate) async fn serve<F, Fut>(
    listeners: Vec<TcpListener>,
    max_connections: usize,
    close: Option<watch::Receiver<bool>>,
    stats: Arc<ProxyStats>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    handle: F,
) where
    F: FnOnce(TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max_connections));
    let mut accept_tasks = Vec::new();
    for listener in listeners {
        let limit = Arc::clone(&limit);
        let stats = Arc::clone(&stats);
        let handle = handle.clone();
        let mut shutdown = shutdown.clone();
        let close = close.clone();
        accept_tasks.push(tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    r = listener.accept() => r,
                    _ = shutdown.changed() => break,
                };
                let (stream, client) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                    stats.rejected_over_limit.fetch_add(1, Ordering::Relaxed);
                    warn!(%client, limit = max_connections, "connection limit reached; closing");
                    continue;
                };
                let close = close.clone();
                let handle = handle.clone();
                tokio::spawn(async move {
                    // Built inside the task, so the connection's (large)
                    // future is laid out in place, not moved into it.
                    let conn = handle(stream, client);
                    if let Some(mut close) = close {
                        tokio::select! {
                            () = conn => {}
                            _ = close.wait_for(|c| *c) => {}
                        }
                    } else {
                        conn.await;
                    }
                    drop(permit);
                });
            }
        }));
    }
    let _ = shutdown.changed().await;
    for t in accept_tasks {
        let _ = t.await;
    }
    let deadline = Instant::now() + drain;
    while stats.open_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = stats.open_count();
    if left > 0 {
        warn!(open = left, "drain timeout: closing the connections still open");
    } else {
        info!("drained");
    }
}
