//! Transport: how the proxy reaches the destination it routed to. This is
//! the one place that chooses between a plain TCP connection from the
//! workload's namespace and an HBONE tunnel (HTTP/2 CONNECT in mutual TLS)
//! to an enrolled pod, for every caller: L4 outbound, the HTTP client of L7
//! routing, the ingress gateway and mirroring.
//!
//! It does not decide where a connection goes (that is [`crate::route`] and
//! [`crate::endpoint`]) and it does not copy bytes (that is [`crate::copy`]).

#![forbid(unsafe_code)]

pub(crate) mod socket;
pub(crate) mod hbone;
pub(crate) mod h2stream;
pub(crate) mod http_client;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;

use crate::config::HBONE_PORT;
use crate::copy::SMALL_BUFFER;
use crate::identity::Identity;
use crate::mesh::model::Mesh;
use h2stream::H2Stream;
use hbone::{Pool, TunnelError};
use socket::WorkloadNet;

/// How every caller reaches upstreams: the proxy's socket mark, the
/// connect timeout, and the HBONE pool (absent: plain TCP everywhere).
#[derive(Clone)]
pub(crate) struct Transport {
    pub(crate) mark: u32,
    pub(crate) connect_timeout: Duration,
    pub(crate) hbone: Option<Arc<Pool>>,
}

/// Whether a caller's connections may be carried over HBONE. The L7 path
/// and the gateway dial plain TCP until they carry the source's identity
/// per request (the L7-for-pods work decides which callers may tunnel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mtls {
    /// HBONE to an enrolled pod when the source workload has an identity.
    WhenEnrolled,
    /// Always a plain connection.
    Never,
}

/// The proxy's side of a forwarded connection.
pub(crate) enum Upstream {
    Plain(TcpStream),
    Hbone(H2Stream),
}

/// A connection made, with the identity the peer proved (HBONE) and how
/// many of the client's first bytes already went out with the CONNECT.
pub(crate) struct Connected {
    pub(crate) upstream: Upstream,
    pub(crate) peer_identity: Option<Identity>,
    pub(crate) early_bytes: u64,
}

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connect to {target} timed out")]
    Timeout { target: SocketAddr },
    #[error("connect to {target} failed: {source}")]
    Io { target: SocketAddr, source: io::Error },
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

impl From<ConnectError> for io::Error {
    fn from(e: ConnectError) -> io::Error {
        match e {
            ConnectError::Timeout { .. } => io::Error::new(io::ErrorKind::TimedOut, e.to_string()),
            ConnectError::Io { source, .. } => source,
            ConnectError::Tunnel(t) => io::Error::other(t),
        }
    }
}

impl Transport {
    /// Connect `from` to `target`: over HBONE when `mtls` allows it, the
    /// target is an enrolled pod and `from` has an identity; else plain TCP
    /// from `from`'s namespace.
    ///
    /// Over HBONE, what the client has already sent (`client`'s first
    /// bytes, read without waiting) goes out with the CONNECT, in the same
    /// TLS record, instead of one round trip later.
    pub(crate) async fn connect(
        &self,
        mesh: &Mesh,
        target: SocketAddr,
        from: &WorkloadNet,
        mtls: Mtls,
        client: Option<&mut TcpStream>,
    ) -> Result<Connected, ConnectError> {
        if let Some((pool, peer_identity)) = self.tunnel_to(mesh, target, from, mtls) {
            let early = client.map(optimistic_bytes).unwrap_or_default();
            let early_bytes = early.len() as u64;
            let peer = SocketAddr::new(target.ip(), HBONE_PORT);
            let tunnel = pool.tunnel(from, peer, peer_identity.clone(), target, early).await?;
            return Ok(Connected {
                upstream: Upstream::Hbone(tunnel),
                peer_identity: Some(peer_identity),
                early_bytes,
            });
        }
        match tokio::time::timeout(self.connect_timeout, from.connect(target, self.mark)).await {
            Ok(Ok(s)) => Ok(Connected { upstream: Upstream::Plain(s), peer_identity: None, early_bytes: 0 }),
            Ok(Err(source)) => Err(ConnectError::Io { target, source }),
            Err(_) => Err(ConnectError::Timeout { target }),
        }
    }

    /// The pool and the identity the peer must prove, when this connection
    /// goes over HBONE.
    fn tunnel_to(
        &self,
        mesh: &Mesh,
        target: SocketAddr,
        from: &WorkloadNet,
        mtls: Mtls,
    ) -> Option<(&Arc<Pool>, Identity)> {
        if mtls == Mtls::Never || from.identity.is_none() {
            return None;
        }
        let pool = self.hbone.as_ref()?;
        let pod = mesh.pod_at(target.ip()).filter(|p| p.enrolled)?;
        Some((pool, Identity::new(pool.certs().trust_domain(), &pod.namespace, &pod.service_account)))
    }
}

/// What the client has sent already, read with one poll of the socket:
/// nothing there yet (or a server-first protocol) opens the tunnel without
/// it, and the copy carries everything after. A partial read tells tokio
/// the socket is drained, so the copy that follows waits for the next
/// bytes instead of first asking the kernel again.
fn optimistic_bytes(client: &mut TcpStream) -> Bytes {
    use futures_util::FutureExt;
    use tokio::io::AsyncReadExt;
    let mut first = BytesMut::with_capacity(SMALL_BUFFER);
    match client.read_buf(&mut first).now_or_never() {
        Some(Ok(n)) if n > 0 => first.freeze(),
        _ => Bytes::new(),
    }
}
