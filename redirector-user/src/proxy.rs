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

pub(crate) mod dns;
pub(crate) mod gateway;
pub(crate) mod inbound;
pub(crate) mod outbound;
pub(crate) mod source;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

use crate::endpoint::Balancer;
use crate::mesh::MeshHandle;
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
    /// Close open connections when the listeners stop (a pod that left),
    /// instead of draining them.
    pub(crate) close_on_stop: bool,
}

/// One connection the proxy is carrying, as `redirector status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub id: u64,
    pub client: SocketAddr,
    pub original_dst: SocketAddr,
    /// The proxy's own address on the upstream connection: what the server
    /// sees as its peer.
    pub upstream_local: Option<SocketAddr>,
    pub age_ms: u128,
}

struct Entry {
    client: SocketAddr,
    original_dst: SocketAddr,
    upstream_local: Option<SocketAddr>,
    started: Instant,
}

/// The connections open right now and totals since start.
#[derive(Default)]
pub struct ProxyStats {
    next_id: AtomicU64,
    open: Mutex<BTreeMap<u64, Entry>>,
    pub accepted: AtomicU64,
    pub forwarded: AtomicU64,
    pub failed: AtomicU64,
    pub rejected_over_limit: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub accepted: u64,
    pub forwarded: u64,
    pub failed: u64,
    pub rejected_over_limit: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub open: Vec<ConnectionInfo>,
}

impl ProxyStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let open = self
            .open
            .lock()
            .expect("stats lock")
            .iter()
            .map(|(id, e)| ConnectionInfo {
                id: *id,
                client: e.client,
                original_dst: e.original_dst,
                upstream_local: e.upstream_local,
                age_ms: e.started.elapsed().as_millis(),
            })
            .collect();
        StatsSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            forwarded: self.forwarded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            rejected_over_limit: self.rejected_over_limit.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            open,
        }
    }

    /// Add a connection to the open table until the guard drops.
    pub(crate) fn open(&self, client: SocketAddr, original_dst: SocketAddr, started: Instant) -> OpenGuard<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.open.lock().expect("stats lock").insert(id, Entry { client, original_dst, upstream_local: None, started });
        OpenGuard { stats: self, id }
    }

    pub fn open_count(&self) -> usize {
        self.open.lock().expect("stats lock").len()
    }
}

/// Removes a connection from the open table however its task ends.
pub(crate) struct OpenGuard<'a> {
    stats: &'a ProxyStats,
    id: u64,
}

impl OpenGuard<'_> {
    /// Record the proxy's own address on the upstream connection.
    pub(crate) fn set_upstream_local(&self, local: Option<SocketAddr>) {
        if let Some(e) = self.stats.open.lock().expect("stats lock").get_mut(&self.id) {
            e.upstream_local = local;
        }
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.stats.open.lock().expect("stats lock").remove(&self.id);
    }
}

/// Serve `listeners` until `shutdown` turns true: at most
/// `max_connections` at once (over it, a connection is closed and
/// counted), `handle` for each. Then wait up to `drain` for open
/// connections to finish. With `close_on_stop`, open connections end with
/// the listeners instead (a pod that left).
pub(crate) async fn serve<F, Fut>(
    listeners: Vec<TcpListener>,
    max_connections: usize,
    close_on_stop: bool,
    stats: Arc<ProxyStats>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max_connections));
    let mut accept_tasks = Vec::new();
    for listener in listeners {
        let limit = Arc::clone(&limit);
        let stats = Arc::clone(&stats);
        let handle = handle.clone();
        let mut shutdown = shutdown.clone();
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
                let conn = handle(stream, client);
                let mut stop = shutdown.clone();
                tokio::spawn(async move {
                    if close_on_stop {
                        tokio::select! {
                            () = conn => {}
                            _ = stop.changed() => {}
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
