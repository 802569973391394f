//! The ingress gateway: the agent listens on the ports of the Gateways it
//! serves (HTTP, and HTTPS terminated with the certificate the Gateway
//! names, from files or from its `credentialName` Secret) and routes each
//! request by the VirtualServices bound to them. Listeners follow
//! configuration changes: a port opens or closes with its servers, and a
//! new certificate (a rotated Secret) is taken in place, so the port never
//! stops accepting and connections already open keep theirs.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::endpoint::Balancer;
use crate::mesh::model::{GatewayTls, Protocol};
use crate::mesh::MeshHandle;
use crate::route::http as l7;
use crate::telemetry::Metrics;
use crate::transport::http_client::Upstreams;

/// What a port terminates: nothing (HTTP) or TLS with this acceptor.
type Acceptor = Option<tokio_rustls::TlsAcceptor>;

/// What every gateway connection needs.
#[derive(Clone)]
pub struct GatewayContext {
    pub mesh: MeshHandle,
    pub upstreams: Upstreams,
    pub balancer: Arc<Balancer>,
    pub metrics: Arc<Metrics>,
    pub access_log: bool,
    /// A request head not in by then (from the connection's opening or
    /// its previous response) closes the connection.
    pub header_read_timeout: Duration,
    /// A TLS handshake not finished by then is dropped.
    pub handshake_timeout: Duration,
    /// Connections one gateway port serves at once; more are closed as
    /// they arrive.
    pub max_connections: usize,
    /// Its listeners, handed over from the agent before or to the next.
    pub handover: Arc<crate::sys::handover::Handover>,
}

/// The acceptor of a port's HTTPS servers (`None` for plain HTTP), which
/// picks each server's certificate by the client's SNI.
fn acceptor(certs: &[GatewayTls]) -> Result<Acceptor> {
    if certs.is_empty() {
        return Ok(None);
    }
    let mut servers = Vec::with_capacity(certs.len());
    for t in certs {
        let key = crate::tls::gateway_certified_key(&t.cert, &t.key).with_context(|| t.source.clone())?;
        servers.push((t.hosts.clone(), key));
    }
    Ok(Some(tokio_rustls::TlsAcceptor::from(crate::tls::gateway_server_config(servers))))
}

/// For logs: where a port's certificates come from.
fn sources(certs: &[GatewayTls]) -> String {
    certs.iter().map(|t| t.source.as_str()).collect::<Vec<_>>().join(", ")
}

fn listen(port: u16, acceptor: watch::Receiver<Acceptor>, ctx: GatewayContext) -> Result<JoinHandle<()>> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = ctx
        .handover
        .tcp(&format!("gateway/{port}"), || {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .and_then(TcpListener::from_std)
        .with_context(|| format!("gateway port {port}: cannot listen on {addr}"))?;
    let slots = Arc::new(tokio::sync::Semaphore::new(ctx.max_connections));
    Ok(tokio::spawn(async move {
        loop {
            let (stream, client) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "gateway accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                warn!(%client, port, limit = ctx.max_connections, "gateway connection limit reached; closing");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().unwrap_or(addr);
            // The certificate in force when the connection arrived.
            let acceptor = acceptor.borrow().clone();
            let conn = l7::ConnContext {
                mesh: ctx.mesh.clone(),
                upstreams: ctx.upstreams.clone(),
                balancer: Arc::clone(&ctx.balancer),
                client,
                original_dst: local,
                service: None,
                gateway_port: Some(port),
                forwarded_proto: Some(if acceptor.is_some() { "https" } else { "http" }),
                protocol: Protocol::Http,
                metrics: Arc::clone(&ctx.metrics),
                access_log: ctx.access_log,
                source: None,
                header_read_timeout: Some(ctx.header_read_timeout),
            };
            let handshake = ctx.handshake_timeout;
            tokio::spawn(async move {
                match acceptor {
                    None => l7::serve(stream, conn).await,
                    Some(a) => match tokio::time::timeout(handshake, a.accept(stream)).await {
                        Ok(Ok(tls)) => l7::serve(tls, conn).await,
                        Ok(Err(e)) => debug!(%client, error = %e, "gateway TLS handshake failed"),
                        Err(_) => debug!(%client, "gateway TLS handshake timed out"),
                    },
                }
                drop(slot);
            });
        }
    }))
}

/// One open gateway port.
struct Open {
    tls: Vec<GatewayTls>,
    acceptor: watch::Sender<Acceptor>,
    task: JoinHandle<()>,
}

fn open(port: u16, tls: Vec<GatewayTls>, ctx: GatewayContext) -> Result<Open> {
    let a = acceptor(&tls).with_context(|| format!("gateway port {port}"))?;
    let (acceptor, rx) = watch::channel(a);
    let task = listen(port, rx, ctx)?;
    info!(port, tls = %sources(&tls), "gateway listening");
    Ok(Open { tls, acceptor, task })
}

/// The gateway's listeners, reconciled with the mesh in force.
pub struct Gateways {
    ctx: GatewayContext,
    open: BTreeMap<u16, Open>,
}

impl Gateways {
    /// Open the listeners of the current mesh; an error (a port in use)
    /// fails the start.
    pub fn start(ctx: GatewayContext) -> Result<Gateways> {
        let mut g = Gateways { ctx, open: BTreeMap::new() };
        for (port, tls) in g.ctx.mesh.current().gateway_ports() {
            let o = open(port, tls, g.ctx.clone())?;
            g.open.insert(port, o);
        }
        Ok(g)
    }

    async fn reconcile(&mut self) {
        let mut want = self.ctx.mesh.current().gateway_ports();
        let gone: Vec<u16> = self.open.keys().filter(|p| !want.contains_key(p)).copied().collect();
        for p in gone {
            if let Some(o) = self.open.remove(&p) {
                o.task.abort();
                let _ = o.task.await;
                drop(self.ctx.handover.ours.take(&format!("gateway/{p}")));
                info!(port = p, "gateway listener closed");
            }
        }
        for (port, o) in &mut self.open {
            let Some(tls) = want.remove(port) else { continue };
            if tls == o.tls {
                continue;
            }
            // Same port, new certificate (or TLS turned on or off): taken
            // in place for the next connection.
            match acceptor(&tls) {
                Ok(a) => {
                    o.acceptor.send_replace(a);
                    info!(port, tls = %sources(&tls), "gateway certificate updated");
                    o.tls = tls;
                }
                Err(e) => {
                    error!(port, error = %format!("{e:#}"), "gateway certificate not updated; the last one stays");
                }
            }
        }
        for (port, tls) in want {
            match open(port, tls, self.ctx.clone()) {
                Ok(o) => {
                    self.open.insert(port, o);
                }
                Err(e) => error!(error = %format!("{e:#}"), "gateway listener not opened"),
            }
        }
    }

    /// Follow configuration changes until `stop`.
    pub fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut seen = self.ctx.mesh.version();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => break,
                }
                let v = self.ctx.mesh.version();
                if v != seen {
                    seen = v;
                    self.reconcile().await;
                }
            }
            for (_, o) in std::mem::take(&mut self.open) {
                o.task.abort();
            }
        })
    }
}
