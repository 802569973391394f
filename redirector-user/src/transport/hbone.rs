//! The HBONE client: TCP tunnelled as HTTP/2 CONNECT inside mutual TLS 1.3
//! to a destination pod's port 15008, the way Istio ambient's ztunnel
//! carries traffic between nodes.
//!
//! The source pod's proxy dials the destination pod's address from inside
//! the source pod's network namespace (so the source address stays the
//! pod's), presents the source workload's certificate, checks that the
//! server presents the destination's service account, and opens one
//! CONNECT stream per connection with the original destination
//! (`pod-ip:port`) as the authority. The h2 connections are pooled per
//! (source workload, destination address, destination identity): one TLS
//! session multiplexes every connection between the pair. The server side
//! is [`crate::proxy::inbound`].

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use hyper::{Method, Request, StatusCode};
use tracing::{debug, info};

use crate::config::HANDSHAKE_TIMEOUT;
use crate::identity::{CertStore, Identity};
use crate::transport::h2stream::H2Stream;
use crate::transport::socket::WorkloadNet;

/// Streams one client may have open on one connection (ztunnel's figure).
pub(crate) const MAX_STREAMS: u32 = 100;
/// Flow-control windows and frame size, as ztunnel sets them, so a bulk
/// stream is not held back by HTTP/2's 64 KiB defaults.
pub(crate) const STREAM_WINDOW: u32 = 1024 * 1024;
pub(crate) const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
pub(crate) const FRAME_SIZE: u32 = 1024 * 1024;
/// Largest header block accepted on an HBONE connection.
pub(crate) const MAX_HEADER_LIST: u32 = 16 * 1024;

/// How often an idle HBONE connection is pinged, and how long the peer
/// has to answer.
pub(crate) const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub(crate) const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

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
            tokio_rustls::TlsConnector::from(cfg)
                .connect(rustls::pki_types::ServerName::IpAddress(peer.ip().into()), tcp),
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
        let pinger = conn.ping_pong().map(|p| {
            tokio::spawn(crate::transport::h2stream::keep_alive(
                p,
                KEEP_ALIVE_INTERVAL,
                KEEP_ALIVE_TIMEOUT,
                Arc::clone(&dead),
            ))
        });
        let ended = Arc::clone(&closed);
        tokio::spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    debug!(%peer, error = %e, "HBONE connection ended");
                },
                () = dead.notified() => debug!(%peer, "HBONE peer stopped answering pings; closed"),
            }
            ended.store(true, Ordering::Relaxed);
            if let Some(p) = pinger {
                p.abort();
            }
        });
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
        let gate = Arc::clone(self.dialing.lock().expect("pool lock").entry(key.clone()).or_default());
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
        let key = PoolKey { netns: from.netns.as_ref().map_or(0, |n| n.inode), source, peer, peer_identity };
        // A pooled connection the peer has just closed fails the first
        // request: dial again. Twice: during a takeover at the peer, the
        // fresh connection may land on the agent that is just stopping
        // (its GOAWAY refuses the stream before anything of it was read).
        let mut attempt = 0;
        loop {
            attempt += 1;
            let pooled = self.sender(from, &key).await?;
            let mut req = Request::builder().method(Method::CONNECT).uri(authority.to_string());
            // The source's address (RFC 7239), as ztunnel sends it: the
            // destination names the source workload from it, if the
            // workload there has the identity the certificate proves.
            if let Some(ip) = from.ips.first() {
                req = req.header("forwarded", forwarded_for(*ip));
            }
            let req = req.body(()).expect("a CONNECT request");
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
                Err(e) if attempt < 3 => {
                    debug!(%peer, error = %e, "pooled HBONE connection failed; dialling again");
                    self.conns.lock().expect("pool lock").remove(&key);
                    continue;
                }
                Err(e) => return Err(TunnelError::H2 { peer, message: e.to_string() }),
            };
            if resp.status() != StatusCode::OK {
                return Err(TunnelError::Refused { peer, authority, status: resp.status() });
            }
            return Ok(H2Stream::new(stream, resp.into_body()));
        }
    }

    /// Drop pooled connections of a workload that left.
    pub fn forget(&self, netns: u64) {
        self.conns.lock().expect("pool lock").retain(|k, _| k.netns != netns);
        self.dialing.lock().expect("pool lock").retain(|k, _| k.netns != netns);
    }
}

/// `for=IP` of a `Forwarded` header (IPv6 quoted and bracketed).
fn forwarded_for(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => format!("for={v4}"),
        std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The address of `for=` in a `Forwarded` header value.
pub fn forwarded_ip(value: &str) -> Option<std::net::IpAddr> {
    value.split([';', ',']).find_map(|part| {
        let v = part.trim().strip_prefix("for=")?.trim_matches('"');
        v.trim_start_matches('[').split(']').next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_round_trips_and_reads_rfc_7239_forms() {
        for ip in ["198.18.0.5", "fd00::7"] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(forwarded_ip(&forwarded_for(ip)), Some(ip));
        }
        assert_eq!(forwarded_ip("proto=http;for=10.0.0.1, for=10.0.0.2"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(forwarded_ip("for=\"[fd00::1]:4711\""), Some("fd00::1".parse().unwrap()));
        assert_eq!(forwarded_ip("for=unknown"), None);
        assert_eq!(forwarded_ip("by=10.0.0.1"), None);
    }
}
