//! The ingress gateway: the agent listens on the ports of the Gateways it
//! serves (HTTP, and HTTPS terminated with the certificate files the
//! Gateway names) and routes each request by the VirtualServices bound to
//! them. Listeners follow configuration changes.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, error, info};

use crate::endpoint::Balancer;
use crate::mesh::model::Protocol;
use crate::mesh::MeshHandle;
use crate::route::http as l7;
use crate::telemetry::Metrics;
use crate::transport::http_client::Upstreams;

type Tls = Option<(PathBuf, PathBuf)>;

/// What every gateway connection needs.
#[derive(Clone)]
pub struct GatewayContext {
    pub mesh: MeshHandle,
    pub upstreams: Upstreams,
    pub balancer: Arc<Balancer>,
    pub metrics: Arc<Metrics>,
    pub access_log: bool,
}

fn tls_acceptor(cert: &PathBuf, key: &PathBuf) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn listen(port: u16, tls: &Tls, ctx: GatewayContext) -> Result<JoinHandle<()>> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener =
        TcpListener::bind(addr).await.with_context(|| format!("gateway port {port}: cannot listen on {addr}"))?;
    let acceptor = match tls {
        Some((c, k)) => Some(tls_acceptor(c, k).with_context(|| format!("gateway port {port}"))?),
        None => None,
    };
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
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().unwrap_or(addr);
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
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    None => l7::serve(stream, conn).await,
                    Some(a) => match a.accept(stream).await {
                        Ok(tls) => l7::serve(tls, conn).await,
                        Err(e) => debug!(%client, error = %e, "gateway TLS handshake failed"),
                    },
                }
            });
        }
    }))
}

/// The gateway's listeners, reconciled with the mesh in force.
pub struct Gateways {
    ctx: GatewayContext,
    open: BTreeMap<u16, (Tls, JoinHandle<()>)>,
}

impl Gateways {
    /// Open the listeners of the current mesh; an error (a port in use, a
    /// bad certificate) fails the start.
    pub async fn start(ctx: GatewayContext) -> Result<Gateways> {
        let mut g = Gateways { ctx, open: BTreeMap::new() };
        let want = g.ctx.mesh.current().gateway_ports();
        for (port, tls) in want {
            let task = listen(port, &tls, g.ctx.clone()).await?;
            info!(port, tls = tls.is_some(), "gateway listening");
            g.open.insert(port, (tls, task));
        }
        Ok(g)
    }

    async fn reconcile(&mut self) {
        let want = self.ctx.mesh.current().gateway_ports();
        let stale: Vec<u16> =
            self.open.iter().filter(|(p, (tls, _))| want.get(p) != Some(tls)).map(|(p, _)| *p).collect();
        for p in stale {
            if let Some((_, t)) = self.open.remove(&p) {
                t.abort();
                let _ = t.await;
                info!(port = p, "gateway listener closed");
            }
        }
        for (port, tls) in want {
            if self.open.contains_key(&port) {
                continue;
            }
            match listen(port, &tls, self.ctx.clone()).await {
                Ok(task) => {
                    info!(port, tls = tls.is_some(), "gateway listening");
                    self.open.insert(port, (tls, task));
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
            for (_, (_, t)) in std::mem::take(&mut self.open) {
                t.abort();
            }
        })
    }
}
