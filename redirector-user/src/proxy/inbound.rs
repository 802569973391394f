//! The inbound side of a pod: plaintext connections steered to its 15006
//! listener, and HBONE (HTTP/2 CONNECT in mutual TLS 1.3) on its 15008
//! listener, the way Istio ambient's ztunnel receives traffic.
//!
//! An HBONE connection must present a mesh client certificate; its SPIFFE
//! identity is recorded, PeerAuthentication and AuthorizationPolicy are
//! checked (the decision is [`crate::mesh::security`]), and the proxy
//! connects from inside the pod's namespace to the CONNECT authority,
//! which must be the pod's own address. The client side of HBONE is
//! [`crate::transport::hbone`].

#![forbid(unsafe_code)]

pub(crate) mod l7;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::copy::{until_idle, Tracked};
use crate::identity::{CertStore, Identity};
use crate::mesh::model::Protocol;
use crate::proxy::caps::Caps;
use crate::telemetry::connection::{ConnectionRecord, Ended, Side};
use crate::telemetry::Metrics;
use crate::transport::h2stream::H2Stream;
use crate::transport::hbone::{
    CONNECTION_WINDOW, FRAME_SIZE, KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT, MAX_HEADER_LIST, MAX_STREAMS, STREAM_WINDOW,
};
use crate::transport::socket::WorkloadNet;

/// What the inbound side of one pod needs.
pub struct Inbound {
    pub workload: Arc<WorkloadNet>,
    pub certs: Arc<CertStore>,
    pub mark: u32,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub metrics: Arc<Metrics>,
    pub mesh: crate::mesh::MeshHandle,
    /// `proxy.accessLog`: one access-log line per connection (per request
    /// on an HTTP port).
    pub access_log: bool,
    /// The proxy's own ports ([`crate::config::AgentConfig::own_ports`]):
    /// never a destination.
    pub own_ports: Arc<[u16]>,
    /// Destination-side L7, for HTTP-declared ports.
    pub l7: Arc<l7::Local>,
    /// A delivered connection or tunnel on which nothing has moved for
    /// this long is closed (`proxy.idleTimeout`, as outbound).
    pub idle_timeout: Duration,
    pub caps: InboundCaps,
}

impl Inbound {
    /// Carry a connection admitted to this pod (plaintext on 15006, or an
    /// HBONE stream from `peer_id`) to the app, with the proxy's copy
    /// buffers (small, grown for bulk transfers); count it and write its
    /// access-log line.
    async fn deliver(
        &self,
        client: Delivered,
        mut upstream: tokio::net::TcpStream,
        peer: SocketAddr,
        peer_id: Option<&Identity>,
        dst: SocketAddr,
        source: Option<&(String, String)>,
    ) {
        let security = if peer_id.is_some() { "mutual_tls" } else { "none" };
        let mut labels = self.metrics.inbound_labels(self.workload.labels(), peer_id, security);
        if let Some((name, ns)) = source {
            labels.source_workload = crate::telemetry::label(name);
            labels.source_workload_namespace = crate::telemetry::label(ns);
        }
        let workload = (self.workload.namespace.as_str(), self.workload.name.as_str());
        let side = Side::Inbound { peer, dst, workload, hbone: peer_id.is_some() };
        let record = ConnectionRecord::open(&self.metrics, labels, side, self.access_log, Instant::now())
            .principals(peer_id, self.workload.identity.as_ref());
        // Both directions cross the app's socket: its activity is the
        // connection's, for the idle timeout.
        let (activity, epoch) = (Arc::new(std::sync::atomic::AtomicU64::new(0)), Instant::now());
        let (upstream_read, upstream_write) = upstream.split();
        let upstream_read = Tracked::new(upstream_read, Arc::clone(&activity), epoch, Arc::default());
        let upstream_write = Tracked::new(upstream_write, Arc::clone(&activity), epoch, Arc::default());
        let copied = async {
            match client {
                Delivered::Plain(mut client) => {
                    let (client_read, client_write) = client.split();
                    tokio::try_join!(
                        crate::copy::copy_one_way(client_read, upstream_write),
                        crate::copy::copy_one_way(upstream_read, client_write),
                    )
                }
                // Straight between h2's frames and the app's socket.
                Delivered::Hbone(tunnel) => {
                    let (mut from_peer, mut to_peer) = tunnel.into_split();
                    tokio::try_join!(
                        crate::transport::h2stream::copy_out(&mut from_peer, upstream_write),
                        crate::transport::h2stream::copy_into(upstream_read, &mut to_peer),
                    )
                }
            }
        };
        let ((request, response), ended) = match until_idle(copied, &activity, epoch, self.idle_timeout).await {
            Ok(Some(bytes)) => (bytes, Ended::Closed),
            Ok(None) => ((0, 0), Ended::IdleTimeout),
            Err(e) => ((0, 0), Ended::Failed(e)),
        };
        record.close(request, response, &ended);
    }

    /// The AuthorizationPolicy check for a connection from `peer`
    /// (`None`: plaintext) at `src` to `dst`.
    pub fn authorize(&self, peer: Option<&Identity>, src: SocketAddr, dst: SocketAddr) -> Result<(), String> {
        let mesh = self.mesh.current();
        match mesh.pods.iter().find(|p| p.namespace == self.workload.namespace && p.name == self.workload.name) {
            Some(pod) => mesh.security.authorize(pod, peer, src.ip(), dst.port()),
            // Served but gone from the mesh (leaving as we speak): its
            // policy is unknown, so nothing is admitted.
            None => Err("the pod is no longer in the mesh's configuration".into()),
        }
    }

    /// The Service whose HTTP-declared port targets `dst` (Istio's inbound
    /// protocol): then requests are served here one by one. Undeclared and
    /// TCP ports are carried as bytes.
    fn http_port(&self, dst: SocketAddr) -> Option<(usize, Protocol)> {
        let mesh = self.mesh.current();
        // An address of the pod the API does not list (a second network,
        // link-local) is served as the pod's listed addresses are.
        let (svc, port) = std::iter::once(dst.ip())
            .chain(self.workload.ips.iter().copied())
            .find_map(|ip| mesh.inbound_port(ip, dst.port()))?;
        matches!(port.protocol, Protocol::Http | Protocol::Http2).then_some((svc, port.protocol))
    }

    /// The source workload (name, namespace) a CONNECT's `Forwarded` header
    /// names, if the pod at that address runs as the identity the peer
    /// proved (a peer cannot name another workload as itself).
    fn source_named(&self, forwarded: Option<&str>, peer_id: &Identity) -> Option<(String, String)> {
        let ip = crate::transport::hbone::forwarded_ip(forwarded?)?;
        let mesh = self.mesh.current();
        let pod = mesh.pod_at(ip)?;
        if pod.namespace != peer_id.namespace || pod.service_account != peer_id.service_account {
            return None;
        }
        mesh.workload_at(ip)
    }

    /// A destination on one of the proxy's own ports is a self-call: the
    /// proxy would dial its own listener in the pod, again and again (each
    /// hop a new connection to the same address), or nest a second hop
    /// whose policy sees the pod as the source. Refused at once, counted
    /// and logged, as ztunnel's self-call check does.
    fn self_call(&self, listener: &'static str, peer: SocketAddr, dst: SocketAddr, peer_id: Option<&Identity>) -> bool {
        if !self.own_ports.contains(&dst.port()) {
            return false;
        }
        self.metrics.self_call(listener).inc();
        warn!(%peer, peer_identity = ?peer_id.map(ToString::to_string), %dst, listener, workload = %self.workload.describe(), "connection to one of the proxy's own ports refused (a self-call)");
        true
    }

    /// Whether plaintext is accepted on `port` (PeerAuthentication).
    pub fn accepts_plaintext(&self, port: u16) -> bool {
        let mesh = self.mesh.current();
        mesh.pods
            .iter()
            .find(|p| p.namespace == self.workload.namespace && p.name == self.workload.name)
            .is_some_and(|pod| mesh.security.mtls_mode(pod, port).accepts_plaintext())
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
pub async fn serve_plaintext(listener: TcpListener, ctx: Arc<Inbound>, ending: Ending) {
    let (caps, metrics) = (Arc::clone(&ctx.caps.plaintext), Arc::clone(&ctx.metrics));
    accept_until_stopped(listener, ending, "inbound", caps, metrics, Duration::ZERO, move |client, peer, _| {
        plaintext_connection(client, peer, Arc::clone(&ctx))
    })
    .await;
}

/// The caps of a pod's inbound listeners ([`crate::proxy::caps`]).
pub struct InboundCaps {
    /// Plaintext connections (15006), in total.
    pub plaintext: Arc<Caps>,
    /// HBONE connections (15008), in total and per peer address.
    pub hbone: Arc<Caps>,
    /// HBONE handshakes in progress (before the peer is authenticated), in
    /// total and per peer address: a peer that opens connections and
    /// never finishes them holds only its own share.
    pub handshakes: Arc<Caps>,
}

impl InboundCaps {
    /// Caps for at most `max_connections` connections per listener.
    pub fn new(max_connections: usize) -> InboundCaps {
        InboundCaps {
            plaintext: Caps::new(max_connections, max_connections),
            hbone: Caps::new(max_connections, HBONE_PER_PEER),
            handshakes: Caps::new(HANDSHAKES, HANDSHAKES_PER_PEER),
        }
    }
}

/// HBONE connections from one peer address: a node multiplexes its pods'
/// streams over a few; this leaves a wide margin.
const HBONE_PER_PEER: usize = 256;
/// HBONE handshakes in progress on one listener, and from one peer.
const HANDSHAKES: usize = 512;
const HANDSHAKES_PER_PEER: usize = 64;

/// How long an HBONE connection has, once told to close, to say goodbye
/// (its streams reset, TLS close_notify) before it is cut.
const GOODBYE: Duration = Duration::from_secs(2);

/// When a pod's inbound listeners and connections end.
#[derive(Clone)]
pub struct Ending {
    /// Turned true: the listeners stop accepting and HBONE connections
    /// send GOAWAY (a pod that leaves, an agent that stops or hands over).
    pub stop: watch::Receiver<bool>,
    /// Turned true or dropped: open connections end, `GOODBYE` later at
    /// most (at once for a pod that leaves; after the drain for one handed
    /// to the next agent).
    pub close: watch::Receiver<bool>,
}

/// Accept until `ending.stop` turns true; each connection's task ends
/// `goodbye` after `ending.close`: the connection is handed `ending` to
/// end itself cleanly first.
async fn accept_until_stopped<F, Fut>(
    listener: TcpListener,
    ending: Ending,
    what: &'static str,
    caps: Arc<Caps>,
    metrics: Arc<Metrics>,
    goodbye: Duration,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, Ending) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut stop = ending.stop.clone();
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
        let Some(slot) = caps.admit(peer.ip()) else {
            let refused = metrics.over_limit(what);
            refused.inc();
            if refused.get().is_power_of_two() {
                warn!(%peer, listener = what, refused = refused.get(), "connection over the listener's cap or its peer's; closed (counted in redirector_connections_over_limit_total)");
            }
            continue;
        };
        let conn = handle(tcp, peer, ending.clone());
        let mut close = ending.close.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let cut = async {
                let _ = close.wait_for(|c| *c).await;
                tokio::time::sleep(goodbye).await;
            };
            tokio::select! {
                () = conn => {}
                () = cut => {}
            }
        });
    }
}

async fn plaintext_connection(client: tokio::net::TcpStream, peer: SocketAddr, ctx: Arc<Inbound>) {
    let dst = match crate::capture::orig_dst::original_dst(&client, peer) {
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
    if ctx.self_call("inbound", peer, dst, None) {
        return;
    }
    if !ctx.accepts_plaintext(dst.port()) {
        ctx.metrics.denied(ctx.workload.labels(), None).inc();
        info!(%peer, %dst, workload = %ctx.workload.describe(), reason = "PeerAuthentication STRICT: mTLS required", "connection denied by policy");
        return;
    }
    if let Some((service, protocol)) = ctx.http_port(dst) {
        // Authorized request by request.
        let conn = l7::Conn { peer, peer_id: None, dst, service, protocol, source: None };
        return l7::serve(client, conn, Arc::clone(&ctx.l7)).await;
    }
    if let Err(why) = ctx.authorize(None, peer, dst) {
        ctx.metrics.denied(ctx.workload.labels(), None).inc();
        info!(%peer, %dst, workload = %ctx.workload.describe(), reason = %why, "connection denied by policy");
        return;
    }
    let Ok(Ok(upstream)) = tokio::time::timeout(ctx.connect_timeout, ctx.workload.connect(dst, ctx.mark)).await else {
        info!(%peer, %dst, "inbound: the workload refused the connection");
        return;
    };
    ctx.deliver(Delivered::Plain(client), upstream, peer, None, dst, None).await;
}

/// Serve HBONE on `listener` until `ending.stop` turns true; every tunnel
/// of this pod is closed at `ending.close`.
pub async fn serve(listener: TcpListener, ctx: Arc<Inbound>, ending: Ending) {
    let identity = ctx.workload.identity.clone().expect("an in-pod workload has an identity");
    let tls = match crate::tls::server_config(&ctx.certs, &identity) {
        Ok(c) => tokio_rustls::TlsAcceptor::from(c),
        Err(e) => {
            warn!(workload = %ctx.workload.describe(), error = %e, "no HBONE listener: TLS config failed");
            return;
        }
    };
    let (caps, metrics) = (Arc::clone(&ctx.caps.hbone), Arc::clone(&ctx.metrics));
    accept_until_stopped(listener, ending, "hbone", caps, metrics, GOODBYE, move |tcp, peer, ending| {
        serve_connection(tcp, peer, tls.clone(), Arc::clone(&ctx), ending)
    })
    .await;
}

/// One HBONE connection. When `ending.stop` turns true (the pod leaves,
/// the agent stops or hands over) it says goodbye as HTTP/2 and TLS ask:
/// GOAWAY, its tunnels finished (or reset at `ending.close`), then TLS
/// close_notify, so a peer moves new streams to a new connection without
/// an error (ztunnel logs a close without close_notify).
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
    ctx: Arc<Inbound>,
    ending: Ending,
) {
    let mut stop = ending.stop;
    let Some(handshaking) = ctx.caps.handshakes.admit(peer.ip()) else {
        ctx.metrics.over_limit("hbone_handshakes").inc();
        ctx.metrics.hbone_refused("handshakes_over_limit").inc();
        return;
    };
    let stream = match tokio::time::timeout(ctx.handshake_timeout, tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = crate::tls::PeerRefused::of(&e).map_or("handshake", |r| r.reason);
            ctx.metrics.hbone_refused(reason).inc();
            warn!(%peer, workload = %ctx.workload.describe(), error = %e, reason, "HBONE handshake refused");
            return;
        }
        Err(_) => {
            ctx.metrics.hbone_refused("handshake_timeout").inc();
            warn!(%peer, workload = %ctx.workload.describe(), timeout = ?ctx.handshake_timeout, "HBONE handshake did not complete in time; closed (mesh.handshakeTimeout)");
            return;
        }
    };
    let Some(peer_id) = crate::tls::peer_identity(stream.get_ref().1.peer_certificates()) else {
        ctx.metrics.hbone_refused("no_identity").inc();
        warn!(%peer, "HBONE peer certificate carries no SPIFFE identity; closed");
        return;
    };
    // A certificate of the mesh's root naming another trust domain is not
    // a member of this mesh (policies name principals without one).
    if peer_id.trust_domain != ctx.certs.trust_domain() {
        ctx.metrics.hbone_refused("foreign_trust_domain").inc();
        warn!(%peer, peer_identity = %peer_id, trust_domain = ctx.certs.trust_domain(), "HBONE peer of another trust domain; closed");
        return;
    }
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
    drop(handshaking);
    let dead = Arc::new(tokio::sync::Notify::new());
    let pinger = conn.ping_pong().map(|p| {
        tokio::spawn(crate::transport::h2stream::keep_alive(
            p,
            KEEP_ALIVE_INTERVAL,
            KEEP_ALIVE_TIMEOUT,
            Arc::clone(&dead),
        ))
    });
    let mut stopping = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            () = dead.notified() => {
                debug!(%peer, "HBONE peer stopped answering pings; closed");
                break;
            }
            _ = stop.changed(), if !stopping => {
                // GOAWAY now; h2 ends the connection (and the TLS session,
                // close_notify) once the streams, reset below, are gone.
                stopping = true;
                conn.graceful_shutdown();
                debug!(%peer, "HBONE connection: stopping; GOAWAY sent");
                continue;
            }
        };
        match next {
            Some(Ok((req, respond))) => {
                let ctx = Arc::clone(&ctx);
                let peer_id = peer_id.clone();
                let mut close = ending.close.clone();
                tokio::spawn(async move {
                    if *close.borrow_and_update() {
                        return;
                    }
                    tokio::select! {
                        () = tunnel_inbound(req, respond, peer, peer_id, ctx) => {}
                        _ = close.wait_for(|c| *c) => {}
                    }
                });
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

/// Where a CONNECT goes: its authority, which must be `ip:port` (HBONE
/// names addresses, never host names).
pub(crate) fn connect_target(uri: &hyper::Uri) -> Option<SocketAddr> {
    uri.authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok())
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
    let Some(dst) = connect_target(req.uri()) else {
        warn!(%peer, peer_identity = %peer_id, uri = %req.uri(), "HBONE CONNECT without an ip:port authority; refused");
        return refuse(respond, StatusCode::BAD_REQUEST);
    };
    // Only this pod's own addresses: the proxy must not be an open relay.
    if !ctx.workload.ips.contains(&dst.ip()) {
        ctx.metrics.hbone_refused("not_local").inc();
        warn!(%peer, peer_identity = %peer_id, %dst, workload = %ctx.workload.describe(), "HBONE CONNECT to an address that is not this workload's; refused");
        return refuse(respond, StatusCode::BAD_REQUEST);
    }
    if ctx.self_call("hbone", peer, dst, Some(&peer_id)) {
        return refuse(respond, StatusCode::BAD_REQUEST);
    }
    let forwarded = req.headers().get("forwarded").and_then(|v| v.to_str().ok());
    let source = ctx.source_named(forwarded, &peer_id);
    if let Some((service, protocol)) = ctx.http_port(dst) {
        // Authorized request by request, on the stream.
        let Ok(send) = respond.send_response(Response::new(()), false) else { return };
        let stream = H2Stream::new(send, req.into_body());
        let conn = l7::Conn { peer, peer_id: Some(peer_id), dst, service, protocol, source };
        return l7::serve(stream, conn, Arc::clone(&ctx.l7)).await;
    }
    if let Err(why) = ctx.authorize(Some(&peer_id), peer, dst) {
        ctx.metrics.denied(ctx.workload.labels(), Some(&peer_id)).inc();
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
    let tunnel = H2Stream::new(send, req.into_body());
    ctx.deliver(Delivered::Hbone(tunnel), upstream, peer, Some(&peer_id), dst, source.as_ref()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any CONNECT authority and any `Forwarded` header: an address or
        /// nothing, never a panic; an `ip:port` is read back exactly.
        #[test]
        fn any_connect_authority_is_an_address_or_refused(authority in "[ -~]{0,60}", forwarded in "[ -~]{0,80}") {
            if let Ok(uri) = hyper::Uri::builder().authority(authority.as_str()).build() {
                let _ = connect_target(&uri);
            }
            let _ = crate::transport::hbone::forwarded_ip(&forwarded);
        }

        #[test]
        fn an_address_and_port_are_read_back(ip in proptest::num::u32::ANY, v6 in proptest::num::u128::ANY, port in proptest::num::u16::ANY) {
            for addr in [SocketAddr::from((std::net::Ipv4Addr::from(ip), port)), SocketAddr::from((std::net::Ipv6Addr::from(v6), port))] {
                let uri = hyper::Uri::builder().authority(addr.to_string().as_str()).build().unwrap();
                proptest::prop_assert_eq!(connect_target(&uri), Some(addr));
            }
        }
    }
}
