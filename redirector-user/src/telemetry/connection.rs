//! One record per connection, after ztunnel's `ConnectionResult`: made
//! when the connection is decided, it writes Istio's TCP series, the
//! totals and open-connection table `redirector status` shows, and the
//! access-log line, each once, when the connection ends. Handlers never
//! spell out counters or log fields themselves.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::info;

use super::{Labels, Metrics, TcpSeries};
use crate::identity::{Identity, Principal};

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
    pub fn open(&self, client: SocketAddr, original_dst: SocketAddr, started: Instant) -> OpenGuard<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.open.lock().expect("stats lock").insert(id, Entry { client, original_dst, upstream_local: None, started });
        OpenGuard { stats: self, id }
    }

    pub fn open_count(&self) -> usize {
        self.open.lock().expect("stats lock").len()
    }
}

/// Removes a connection from the open table however its task ends.
pub struct OpenGuard<'a> {
    stats: &'a ProxyStats,
    id: u64,
}

impl OpenGuard<'_> {
    /// Record the proxy's own address on the upstream connection.
    fn set_upstream_local(&self, local: Option<SocketAddr>) {
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

/// Which side of the mesh recorded a connection, and what its access line
/// names (borrowed: a record allocates nothing of its own).
pub enum Side<'a> {
    /// The source's proxy: the client and where it was going.
    Outbound { client: SocketAddr, original_dst: SocketAddr },
    /// The destination's proxy: the peer, the pod's address and the pod.
    Inbound { peer: SocketAddr, dst: SocketAddr, workload: (&'a str, &'a str), hbone: bool },
}

/// How a connection's copy ended.
pub enum Ended {
    Closed,
    IdleTimeout,
    Failed(std::io::Error),
}

/// The record of one connection: opened when it is connected, written once
/// when it ends (or dropped unwritten if it never was).
pub struct ConnectionRecord<'a> {
    side: Side<'a>,
    series: TcpSeries,
    /// Outbound: the totals and the open-connection table.
    stats: Option<(&'a ProxyStats, OpenGuard<'a>)>,
    source_principal: Option<&'a Identity>,
    destination_principal: Option<&'a Identity>,
    upstream_local: Option<SocketAddr>,
    access_log: bool,
    started: Instant,
}

impl<'a> ConnectionRecord<'a> {
    /// A connection carried under `labels`: counted as opened now.
    pub fn open(
        metrics: &Metrics,
        labels: Labels,
        side: Side<'a>,
        access_log: bool,
        started: Instant,
    ) -> ConnectionRecord<'a> {
        let series = metrics.tcp_series(labels);
        series.opened.inc();
        ConnectionRecord {
            side,
            series,
            stats: None,
            source_principal: None,
            destination_principal: None,
            upstream_local: None,
            access_log,
            started,
        }
    }

    /// Count it in the proxy's totals and its open-connection entry
    /// (`redirector status`), with the proxy's own end upstream.
    pub fn in_status(mut self, stats: &'a ProxyStats, open: OpenGuard<'a>, upstream_local: Option<SocketAddr>) -> Self {
        stats.forwarded.fetch_add(1, Ordering::Relaxed);
        open.set_upstream_local(upstream_local);
        self.upstream_local = upstream_local;
        self.stats = Some((stats, open));
        self
    }

    /// The identities both ends proved, for the access line.
    pub fn principals(mut self, source: Option<&'a Identity>, destination: Option<&'a Identity>) -> Self {
        self.source_principal = source;
        self.destination_principal = destination;
        self
    }

    /// The connection ended: `request` bytes went from the client toward
    /// the server, `response` bytes back.
    pub fn close(self, request: u64, response: u64, ended: &Ended) {
        // As the series have always been counted on each side: the source
        // counts the request as sent, the destination as received.
        let (sent, received) = match self.side {
            Side::Outbound { .. } => (request, response),
            Side::Inbound { .. } => (response, request),
        };
        self.series.sent.inc_by(sent);
        self.series.received.inc_by(received);
        self.series.closed.inc();
        if let Some((stats, _)) = &self.stats {
            stats.bytes_up.fetch_add(request, Ordering::Relaxed);
            stats.bytes_down.fetch_add(response, Ordering::Relaxed);
        }
        if self.access_log {
            self.log(request, response, ended);
        }
    }

    /// The access log's target (`access`), on both sides and as ztunnel's:
    /// one filter (`REDIRECTOR_LOG=...,access=off`) governs both.
    fn log(&self, up: u64, down: u64, ended: &Ended) {
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let (src, dst) = (Principal(self.source_principal), Principal(self.destination_principal));
        match (&self.side, ended) {
            (Side::Outbound { client, original_dst }, Ended::Closed) => info!(
                target: "access",
                direction = "outbound",
                %client, %original_dst,
                upstream_local = ?self.upstream_local,
                source_principal = %src,
                destination_principal = %dst,
                bytes_up = up, bytes_down = down, duration_ms,
                "connection closed"
            ),
            (Side::Outbound { client, original_dst }, Ended::IdleTimeout) => info!(
                target: "access",
                direction = "outbound",
                %client, %original_dst, bytes_up = up, bytes_down = down, duration_ms,
                "idle timeout: connection closed"
            ),
            (Side::Outbound { client, original_dst }, Ended::Failed(e)) => info!(
                target: "access",
                direction = "outbound",
                %client, %original_dst, bytes_up = up, bytes_down = down, duration_ms,
                error = %e, "connection ended with an error"
            ),
            (Side::Inbound { peer, dst: to, workload, hbone }, _) => info!(
                target: "access",
                direction = "inbound",
                src = %peer,
                source_principal = %src,
                dst = %to,
                destination_workload = %format_args!("{}/{}", workload.0, workload.1),
                bytes_received = up,
                bytes_sent = down,
                duration_ms,
                "{} connection closed", if *hbone { "HBONE" } else { "plaintext" }
            ),
        }
    }
}
