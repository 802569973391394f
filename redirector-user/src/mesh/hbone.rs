//! HBONE: TCP tunnelled as HTTP/2 CONNECT inside mutual TLS 1.3, on port
//! 15008, the way Istio ambient's ztunnel carries traffic between nodes.
//!
//! Outbound: the source pod's proxy dials the destination pod's address on
//! 15008 from inside the source pod's network namespace (so the source
//! address stays the pod's), presents the source workload's certificate,
//! checks that the server presents the destination's service account, and
//! opens one CONNECT stream per connection with the original destination
//! (`pod-ip:port`) as the authority. The h2 connections are pooled per
//! (source workload, destination address, destination identity): one TLS
//! session multiplexes every connection between the pair.
//!
//! Inbound: the destination node's proxy accepts on the 15008 listener it
//! opened in the destination pod's namespace, requires a mesh client
//! certificate, records its SPIFFE identity, checks policy, and connects
//! from inside the pod's namespace to the authority, which must be the
//! pod's own address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::identity::{CertStore, Identity};
use crate::inpod::WorkloadNet;
use crate::mesh::h2stream::H2Stream;

pub const HBONE_PORT: u16 = 15008;
/// A TLS handshake that has not finished by then is dropped (default of
/// `mesh.handshakeTimeout`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one client may have open on one connection (ztunnel's figure).
pub const MAX_STREAMS: u32 = 100;
/// Flow-control windows and frame size, as ztunnel sets them, so a bulk
/// stream is not held back by HTTP/2's 64 KiB defaults.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
const FRAME_SIZE: u32 = 1024 * 1024;
/// Largest header block accepted on an HBONE connection.
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// Counters of the HBONE path, shown on /metrics.
#[derive(Default, Debug)]
pub struct HboneStats {
    pub inbound_streams: AtomicU64,
    pub outbound_streams: AtomicU64,
    pub connections_opened: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub refused_not_local: AtomicU64,
    pub denied: AtomicU64,
}

/// What the inbound side of one pod needs.
pub struct Inbound {
    pub workload: Arc<WorkloadNet>,
    pub certs: Arc<CertStore>,
    pub mark: u32,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub stats: Arc<HboneStats>,
    pub metrics: Arc<crate::mesh::metrics::Metrics>,
    pub mesh: crate::mesh::MeshHandle,
    /// `proxy.accessLog`: one access-log line per connection.
    pub access_log: bool,
}

impl Inbound {
    /// Carry a connection admitted to this pod (plaintext on 15006, or an
    /// HBONE stream from `peer_id`) to the app, with the proxy's copy
    /// buffers (small, grown for bulk transfers); count it and write its
    /// access-log line.
    async fn deliver(&self, client: Delivered, mut upstream: tokio::net::TcpStream, peer: SocketAddr, peer_id: Option<&Identity>, dst: SocketAddr) {
        let (security, kind) = if peer_id.is_some() { ("mutual_tls", "HBONE") } else { ("none", "plaintext") };
        let series = self.metrics.tcp_series(self.metrics.inbound_labels(&self.workload, peer_id, security));
        series.opened.inc();
        let started = Instant::now();
        let (upstream_read, upstream_write) = upstream.split();
        let r = match client {
            Delivered::Plain(mut client) => {
                let (client_read, client_write) = client.split();
                tokio::try_join!(
                    crate::proxy::copy_one_way(client_read, upstream_write),
                    crate::proxy::copy_one_way(upstream_read, client_write),
                )
            }
            // Straight between h2's frames and the app's socket.
            Delivered::Hbone(tunnel) => {
                let (mut from_peer, mut to_peer) = tunnel.into_split();
                tokio::try_join!(
                    super::h2stream::copy_out(&mut from_peer, upstream_write),
                    super::h2stream::copy_into(upstream_read, &mut to_peer),
                )
            }
        };
        let (received, sent) = r.unwrap_or((0, 0));
        series.received.inc_by(received);
        series.sent.inc_by(sent);
        series.closed.inc();
        if !self.access_log {
            return;
        }
        info!(
            target: "access",
            direction = "inbound",
            src = %peer,
            source_principal = %crate::identity::Principal(peer_id),
            dst = %dst,
            destination_workload = %format_args!("{}/{}", self.workload.namespace, self.workload.name),
            bytes_received = received,
            bytes_sent = sent,
            duration_ms = started.elapsed().as_millis() as u64,
            "{kind} connection closed"
        );
    }

    /// The AuthorizationPolicy check for a connection from `peer`
    /// (`None`: plaintext) at `src` to `dst`.
    pub fn authorize(&self, peer: Option<&Identity>, src: SocketAddr, dst: SocketAddr) -> Result<(), String> {
        let mesh = self.mesh.current();
        match mesh.pods.iter().find(|p| p.namespace == self.workload.namespace && p.name == self.workload.name) {
            Some(pod) => mesh.security.authorize(pod, peer, src.ip(), dst.port()),
            None => Ok(()),
        }
    }

    /// Whether plaintext is accepted on `port` (PeerAuthentication).
    pub fn accepts_plaintext(&self, port: u16) -> bool {
        let mesh = self.mesh.current();
        mesh.pods
            .iter()
            .find(|p| p.namespace == self.workload.namespace && p.name == self.workload.name)
            .is_none_or(|pod| mesh.security.mtls_mode(pod, port).accepts_plaintext())
    }
}

/// What an admitted inbound connection arrived as.
enum Delivered {
    Plain(tokio::net::TcpStream),
    Hbone(H2Stream),
}

/// Serve the pod's plaintext inbound listener (15006): connections from
/// outside the mesh, steered here by the pod's inbound capture. STRICT
/// refuses them; otherwise AuthorizationPolicy decides (with no identity).
pub async fn serve_plaintext(listener: TcpListener, ctx: Arc<Inbound>, stop: watch::Receiver<bool>) {
    accept_until_stopped(listener, stop, "inbound", move |client, peer| plaintext_connection(client, peer, ctx.clone())).await
}

/// Accept until `stop` turns true; each connection's task ends with
/// `stop` too (a pod that leaves has its connections closed).
async fn accept_until_stopped<F, Fut>(listener: TcpListener, mut stop: watch::Receiver<bool>, what: &'static str, handle: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, listener = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let conn = handle(tcp, peer);
        let mut stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = stop.changed() => {}
            }
        });
    }
}

async fn plaintext_connection(client: tokio::net::TcpStream, peer: SocketAddr, ctx: Arc<Inbound>) {
    let dst = match crate::proxy::original_dst(&client, peer) {
        Ok(d) => d,
        Err(_) => match client.local_addr() {
            Ok(d) => d,
            Err(_) => return,
        },
    };
    if !ctx.workload.ips.contains(&dst.ip()) {
        warn!(%peer, %dst, workload = %ctx.workload.describe(), "plaintext inbound connection to an address that is not this workload's; closed");
        return;
    }
    if !ctx.accepts_plaintext(dst.port()) {
        ctx.stats.denied.fetch_add(1, Ordering::Relaxed);
        ctx.metrics.denied(&ctx.workload, None).inc();
        info!(%peer, %dst, workload = %ctx.workload.describe(), reason = "PeerAuthentication STRICT: mTLS required", "connection denied by policy");
        return;
    }
    if let Err(why) = ctx.authorize(None, peer, dst) {
        ctx.stats.denied.fetch_add(1, Ordering::Relaxed);
        ctx.metrics.denied(&ctx.workload, None).inc();
        info!(%peer, %dst, workload = %ctx.workload.describe(), reason = %why, "connection denied by policy");
        return;
    }
    let upstream = match tokio::time::timeout(ctx.connect_timeout, ctx.workload.connect(dst, ctx.mark)).await {
        Ok(Ok(s)) => s,
        _ => {
            info!(%peer, %dst, "inbound: the workload refused the connection");
            return;
        }
    };
    ctx.deliver(Delivered::Plain(client), upstream, peer, None, dst).await;
}

/// Serve HBONE on `listener` until `stop` turns true; then every tunnel
/// of this pod is closed.
pub async fn serve(listener: TcpListener, ctx: Arc<Inbound>, stop: watch::Receiver<bool>) {
    let identity = ctx.workload.identity.clone().expect("an in-pod workload has an identity");
    let tls = match crate::tls::server_config(&ctx.certs, &identity) {
        Ok(c) => tokio_rustls::TlsAcceptor::from(c),
        Err(e) => {
            warn!(workload = %ctx.workload.describe(), error = %e, "no HBONE listener: TLS config failed");
            return;
        }
    };
    accept_until_stopped(listener, stop, "HBONE", move |tcp, peer| serve_connection(tcp, peer, tls.clone(), ctx.clone())).await
}

async fn serve_connection(tcp: tokio::net::TcpStream, peer: SocketAddr, tls: tokio_rustls::TlsAcceptor, ctx: Arc<Inbound>) {
    let stream = match tokio::time::timeout(ctx.handshake_timeout, tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            ctx.stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            ctx.metrics.hbone_refused("handshake").inc();
            warn!(%peer, workload = %ctx.workload.describe(), error = %e, "HBONE handshake refused");
            return;
        }
        Err(_) => {
            ctx.stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            ctx.metrics.hbone_refused("handshake_timeout").inc();
            warn!(%peer, workload = %ctx.workload.describe(), timeout = ?ctx.handshake_timeout, "HBONE handshake did not complete in time; closed (mesh.handshakeTimeout)");
            return;
        }
    };
    let Some(peer_id) = crate::tls::peer_identity(stream.get_ref().1.peer_certificates()) else {
        ctx.stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
        ctx.metrics.hbone_refused("no_identity").inc();
        warn!(%peer, "HBONE peer certificate carries no SPIFFE identity; closed");
        return;
    };
    debug!(%peer, peer_identity = %peer_id, "HBONE connection");
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(MAX_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME_SIZE)
        // An HTTP/2 flood (streams opened and reset faster than served)
        // ends the connection with GOAWAY, others unaffected.
        .max_pending_accept_reset_streams(50)
        .max_local_error_reset_streams(Some(100))
        // A CONNECT is a few dozen bytes of headers; h2's own limit is
        // 16 MiB (hyper's, used before, 16 KiB).
        .max_header_list_size(MAX_HEADER_LIST);
    let mut conn = match tokio::time::timeout(ctx.handshake_timeout, builder.handshake::<_, Bytes>(stream)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return h2_failed(&ctx, peer, &peer_id, &e),
        Err(_) => {
            ctx.metrics.hbone_refused("handshake_timeout").inc();
            warn!(%peer, peer_identity = %peer_id, "HBONE peer sent no HTTP/2 preface in time; closed (mesh.handshakeTimeout)");
            return;
        }
    };
    let dead = Arc::new(tokio::sync::Notify::new());
    let pinger = conn.ping_pong().map(|p| tokio::spawn(super::h2stream::keep_alive(p, KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT, dead.clone())));
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            _ = dead.notified() => {
                debug!(%peer, "HBONE peer stopped answering pings; closed");
                break;
            }
        };
        match next {
            Some(Ok((req, respond))) => {
                let ctx = ctx.clone();
                let peer_id = peer_id.clone();
                tokio::spawn(async move { tunnel_inbound(req, respond, peer, peer_id, ctx).await });
            }
            Some(Err(e)) => {
                h2_failed(&ctx, peer, &peer_id, &e);
                break;
            }
            None => {
                // GOAWAY: finish what is in flight.
                let _ = std::future::poll_fn(|cx| conn.poll_closed(cx)).await;
                break;
            }
        }
    }
    if let Some(p) = pinger {
        p.abort();
    }
}

/// How often an idle HBONE connection is pinged, and how long the peer
/// has to answer.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// An HBONE connection ended on an error: a peer that breaks HTTP/2's
/// rules (a flood of streams opened and reset, bad frames) is logged and
/// counted; other connections and the pod's other peers are untouched.
fn h2_failed(ctx: &Inbound, peer: SocketAddr, peer_id: &Identity, e: &h2::Error) {
    let protocol = e.is_library() || e.reason().is_some_and(|r| r != h2::Reason::NO_ERROR && r != h2::Reason::CANCEL);
    if protocol && !e.is_io() {
        ctx.metrics.hbone_refused("h2_protocol_error").inc();
        warn!(%peer, peer_identity = %peer_id, workload = %ctx.workload.describe(), error = %e, "HBONE connection closed on an HTTP/2 protocol error");
    } else {
        debug!(%peer, error = %e, "HBONE connection ended");
    }
}

/// Answer a CONNECT that is not carried out.
fn refuse(mut respond: h2::server::SendResponse<Bytes>, code: StatusCode) {
    let mut r = Response::new(());
    *r.status_mut() = code;
    let _ = respond.send_response(r, true);
}

async fn tunnel_inbound(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: SocketAddr,
    peer_id: Identity,
    ctx: Arc<Inbound>,
) {
    if req.method() != Method::CONNECT {
        return refuse(respond, StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(dst) = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok()) else {
        warn!(%peer, peer_identity = %peer_id, uri = %req.uri(), "HBONE CONNECT without an ip:port authority; refused");
        return refuse(respond, StatusCode::BAD_REQUEST);
    };
    // Only this pod's own addresses: the proxy must not be an open relay.
    if !ctx.workload.ips.contains(&dst.ip()) {
        ctx.stats.refused_not_local.fetch_add(1, Ordering::Relaxed);
        ctx.metrics.hbone_refused("not_local").inc();
        warn!(%peer, peer_identity = %peer_id, %dst, workload = %ctx.workload.describe(), "HBONE CONNECT to an address that is not this workload's; refused");
        return refuse(respond, StatusCode::BAD_REQUEST);
    }
    if let Err(why) = ctx.authorize(Some(&peer_id), peer, dst) {
        ctx.stats.denied.fetch_add(1, Ordering::Relaxed);
        ctx.metrics.denied(&ctx.workload, Some(&peer_id)).inc();
        info!(%peer, peer_identity = %peer_id, %dst, workload = %ctx.workload.describe(), reason = %why, "connection denied by policy");
        return refuse(respond, StatusCode::UNAUTHORIZED);
    }
    let upstream = match tokio::time::timeout(ctx.connect_timeout, ctx.workload.connect(dst, ctx.mark)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(%peer, peer_identity = %peer_id, %dst, error = %e, "HBONE: the workload refused the connection");
            return refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
        }
        Err(_) => {
            info!(%peer, peer_identity = %peer_id, %dst, "HBONE: connect to the workload timed out");
            return refuse(respond, StatusCode::GATEWAY_TIMEOUT);
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "HBONE stream closed before it opened");
            return;
        }
    };
    ctx.stats.inbound_streams.fetch_add(1, Ordering::Relaxed);
    let tunnel = H2Stream::new(send, req.into_body());
    ctx.deliver(Delivered::Hbone(tunnel), upstream, peer, Some(&peer_id), dst).await;
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct PoolKey {
    /// The source workload's network namespace (its inode; 0: the agent's).
    netns: u64,
    source: Identity,
    peer: SocketAddr,
    peer_identity: Identity,
}

/// Pooled HBONE connections.
pub struct Pool {
    certs: Arc<CertStore>,
    mark: u32,
    connect_timeout: Duration,
    conns: Mutex<HashMap<PoolKey, Pooled>>,
    /// One dial at a time per key, so a burst of new connections shares
    /// one TLS handshake.
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    pub stats: Arc<HboneStats>,
}

/// One pooled HBONE connection: the handle that opens streams on it, and
/// whether its task has ended.
#[derive(Clone)]
struct Pooled {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl Pooled {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot reach {peer}: {source}")]
    Connect { peer: SocketAddr, source: std::io::Error },
    #[error("mTLS with {peer} failed: {source}")]
    Tls { peer: SocketAddr, source: std::io::Error },
    #[error("HTTP/2 with {peer} failed: {message}")]
    H2 { peer: SocketAddr, message: String },
    #[error("{peer} answered CONNECT {authority} with {status}")]
    Refused { peer: SocketAddr, authority: SocketAddr, status: StatusCode },
    #[error("the source workload has no identity")]
    NoIdentity,
}

impl Pool {
    pub fn new(certs: Arc<CertStore>, mark: u32, connect_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            certs,
            mark,
            connect_timeout,
            conns: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            stats: Arc::new(HboneStats::default()),
        })
    }

    pub fn certs(&self) -> &Arc<CertStore> {
        &self.certs
    }

    async fn dial(&self, from: &WorkloadNet, key: &PoolKey) -> Result<Pooled, TunnelError> {
        let peer = key.peer;
        let tcp = match tokio::time::timeout(self.connect_timeout, from.connect(peer, self.mark)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(TunnelError::Connect { peer, source: e }),
            Err(_) => return Err(TunnelError::Connect { peer, source: std::io::ErrorKind::TimedOut.into() }),
        };
        let cfg = crate::tls::client_config(&self.certs, &key.source, vec![key.peer_identity.clone()])
            .map_err(|e| TunnelError::Tls { peer, source: std::io::Error::other(e) })?;
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(cfg).connect(rustls::pki_types::ServerName::IpAddress(peer.ip().into()), tcp),
        )
        .await
        .map_err(|_| TunnelError::Tls { peer, source: std::io::ErrorKind::TimedOut.into() })?
        .map_err(|e| TunnelError::Tls { peer, source: e })?;
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| TunnelError::H2 { peer, message: e.to_string() })?;
        let closed = Arc::new(AtomicBool::new(false));
        let dead = Arc::new(tokio::sync::Notify::new());
        let pinger = conn
            .ping_pong()
            .map(|p| tokio::spawn(super::h2stream::keep_alive(p, KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT, dead.clone())));
        let ended = closed.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    debug!(%peer, error = %e, "HBONE connection ended");
                },
                _ = dead.notified() => debug!(%peer, "HBONE peer stopped answering pings; closed"),
            }
            ended.store(true, Ordering::Relaxed);
            if let Some(p) = pinger {
                p.abort();
            }
        });
        self.stats.connections_opened.fetch_add(1, Ordering::Relaxed);
        info!(%peer, source = %key.source, peer_identity = %key.peer_identity, "HBONE connection opened");
        Ok(Pooled { send, closed })
    }

    async fn sender(&self, from: &WorkloadNet, key: &PoolKey) -> Result<Pooled, TunnelError> {
        let live = |m: &mut HashMap<PoolKey, Pooled>| match m.get(key) {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                m.remove(key);
                None
            }
            None => None,
        };
        if let Some(s) = live(&mut self.conns.lock().expect("pool lock")) {
            return Ok(s);
        }
        let gate = self.dialing.lock().expect("pool lock").entry(key.clone()).or_default().clone();
        let _g = gate.lock().await;
        if let Some(s) = live(&mut self.conns.lock().expect("pool lock")) {
            return Ok(s);
        }
        let s = self.dial(from, key).await?;
        self.conns.lock().expect("pool lock").insert(key.clone(), s.clone());
        Ok(s)
    }

    /// A tunnel from `from` to `authority` through the HBONE listener at
    /// `peer`, which must present `peer_identity`. `early`, the client's
    /// first bytes when it has sent some already, follows the CONNECT
    /// without waiting for its answer: both leave in one TLS record, and
    /// the peer delivers them once it has connected. This is the
    /// "optimistic data" of the IETF's CONNECT-TCP draft: over HTTP/2 a
    /// client may send stream content before the response, within the
    /// proxy's initial window (ours sends at most 16 KiB; the window is
    /// 1 MiB), and a refusal discards it with the stream.
    pub async fn tunnel(
        &self,
        from: &WorkloadNet,
        peer: SocketAddr,
        peer_identity: Identity,
        authority: SocketAddr,
        early: Bytes,
    ) -> Result<H2Stream, TunnelError> {
        let source = from.identity.clone().ok_or(TunnelError::NoIdentity)?;
        let key = PoolKey {
            netns: from.netns.as_ref().map(|n| n.inode).unwrap_or(0),
            source,
            peer,
            peer_identity,
        };
        // A pooled connection the peer has just closed fails the first
        // request: dial once more.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let pooled = self.sender(from, &key).await?;
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(authority.to_string())
                .body(())
                .expect("a CONNECT request");
            let sent = async {
                let mut send = pooled.send.ready().await?;
                let (response, mut stream) = send.send_request(req, false)?;
                if !early.is_empty() {
                    stream.send_data(early.clone(), false)?;
                }
                Ok::<_, h2::Error>((response.await?, stream))
            }
            .await;
            let (resp, stream) = match sent {
                Ok(r) => r,
                Err(e) if attempt == 1 => {
                    debug!(%peer, error = %e, "pooled HBONE connection failed; dialling again");
                    self.conns.lock().expect("pool lock").remove(&key);
                    continue;
                }
                Err(e) => return Err(TunnelError::H2 { peer, message: e.to_string() }),
            };
            if resp.status() != StatusCode::OK {
                return Err(TunnelError::Refused { peer, authority, status: resp.status() });
            }
            self.stats.outbound_streams.fetch_add(1, Ordering::Relaxed);
            return Ok(H2Stream::new(stream, resp.into_body()));
        }
    }

    /// Drop pooled connections of a workload that left.
    pub fn forget(&self, netns: u64) {
        self.conns.lock().expect("pool lock").retain(|k, _| k.netns != netns);
        self.dialing.lock().expect("pool lock").retain(|k, _| k.netns != netns);
    }

    /// Open pooled connections (status, tests).
    pub fn pooled(&self) -> usize {
        self.conns.lock().expect("pool lock").values().filter(|s| !s.is_closed()).count()
    }
}
