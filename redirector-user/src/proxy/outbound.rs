//! The outbound listener (15001): a captured connection read forward.
//! [`proxy_to`] is the whole path as a pipeline of calls: original
//! destination → source → route → transport → copy → record. Each step
//! lives in its own module; this file only strings them together and says
//! what happened.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::{debug, info, warn};

use super::{source, ProxySettings};
use crate::capture::orig_dst::original_dst;
use crate::copy::{copy_one_way, until_idle, Tracked};
use crate::identity::Identity;
use crate::mesh::model::{Address, Mesh, Protocol};
use crate::route::http::{self as l7};
use crate::telemetry::connection::ProxyStats;
use crate::telemetry::connection::{ConnectionRecord, Ended, Side};
use crate::telemetry::{label, Labels};
use crate::transport::{Mtls, Upstream};

/// Serve the outbound listeners until `shutdown` turns true, then wait up to
/// `drain` for open connections to finish.
pub(crate) async fn run(
    listeners: Vec<TcpListener>,
    settings: ProxySettings,
    stats: Arc<ProxyStats>,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let own: Arc<[SocketAddr]> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let (max, close) = (settings.max_connections, settings.close.clone());
    let settings = Arc::new(settings);
    let handler_stats = Arc::clone(&stats);
    // Cloned once per connection (three reference counts), then consumed.
    super::serve(listeners, max, close, stats, shutdown, drain, move |stream, client| async move {
        let Some(dst) = destination(&stream, client, &own, &handler_stats) else { return };
        proxy_to(stream, client, dst, &settings, &handler_stats).await;
    })
    .await;
}

/// The original destination of an accepted connection, unless it has none
/// (not captured) or it is one of the proxy's own listeners (a loop).
fn destination(stream: &TcpStream, client: SocketAddr, own: &[SocketAddr], stats: &ProxyStats) -> Option<SocketAddr> {
    let dst = match original_dst(stream, client) {
        Ok(d) => d,
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            warn!(%client, error = %e, "no original destination for this connection (was it captured?); closing");
            return None;
        }
    };
    if is_self(dst, own) {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        warn!(%client, %dst, "original destination is the proxy itself; closing to avoid a loop");
        return None;
    }
    Some(dst)
}

/// Whether `dst` is one of the proxy's own listeners: forwarding there would
/// loop.
fn is_self(dst: SocketAddr, listeners: &[SocketAddr]) -> bool {
    listeners.iter().any(|l| l.port() == dst.port() && (dst.ip().is_loopback() || l.ip() == dst.ip()))
}

/// Where the L4 path sends a connection: the target and what the metrics
/// say about it, with the destination's connection slot held for its life.
struct TcpDecision {
    target: SocketAddr,
    labels: Option<Labels>,
    _slot: Option<OwnedSemaphorePermit>,
}

/// What the route step decided for one connection.
#[expect(clippy::large_enum_variant, reason = "one per connection, on the stack, moved once")]
enum Decision {
    /// HTTP to a mesh service: routed per request.
    Http {
        service: usize,
        protocol: Protocol,
    },
    Tcp(TcpDecision),
    /// Refused, with Envoy's response flag and the reason for the log.
    Refused {
        flags: &'static str,
        reason: &'static str,
        service: Option<String>,
    },
}

/// Carry one captured connection to `dst`: name the source, route, connect,
/// copy both ways, record.
pub(crate) async fn proxy_to(
    mut client_stream: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
    settings: &ProxySettings,
    stats: &ProxyStats,
) {
    let started = Instant::now();
    let open = stats.open(client, dst, started);
    let mesh = settings.mesh.current();
    let source = source_of(&client_stream, client, settings, &mesh);
    let client_ns = source.as_ref().map(|s| s.1.as_str());
    let tcp = match decide(&mesh, &client_stream, dst, client_ns, settings).await {
        Decision::Http { service, protocol } => {
            stats.forwarded.fetch_add(1, Ordering::Relaxed);
            let ctx = l7::ConnContext {
                mesh: settings.mesh.clone(),
                upstreams: settings.upstreams.clone(),
                balancer: Arc::clone(&settings.balancer),
                client,
                original_dst: dst,
                service: Some(service),
                gateway_port: None,
                forwarded_proto: None,
                protocol,
                metrics: Arc::clone(&settings.metrics),
                access_log: settings.access_log,
                source,
                // A pod's keep-alive connections live as long as an idle
                // L4 connection does (Envoy's idle timeout is an hour too).
                header_read_timeout: Some(settings.idle_timeout),
            };
            drop(mesh);
            l7::serve(client_stream, ctx).await;
            info!(%client, original_dst = %dst, duration_ms = started.elapsed().as_millis() as u64, "HTTP connection closed");
            return;
        }
        Decision::Refused { flags, reason, service } => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            info!(%client, original_dst = %dst, service = service.as_deref().unwrap_or("-"), response_flags = flags, "{reason}; closing");
            return;
        }
        Decision::Tcp(d) => d,
    };
    let connected = settings
        .transport
        .connect(&mesh, tcp.target, &settings.workload, Mtls::WhenEnrolled, Some(&mut client_stream))
        .await;
    drop(mesh);
    let connected = match connected {
        Ok(c) => c,
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            info!(%client, original_dst = %dst, target = %tcp.target, error = %e, "upstream connect failed");
            return;
        }
    };
    let upstream_local = match &connected.upstream {
        Upstream::Plain(s) => s.local_addr().ok(),
        Upstream::Hbone(_) => None,
    };
    let labels = tcp_labels(
        tcp.labels.clone(),
        source.as_ref(),
        settings.workload.identity.as_ref(),
        connected.peer_identity.as_ref(),
    );
    let side = Side::Outbound { client, original_dst: dst };
    let record = ConnectionRecord::open(&settings.metrics, labels, side, settings.access_log, started)
        .in_status(stats, open, upstream_local)
        .principals(settings.workload.identity.as_ref(), connected.peer_identity.as_ref());
    debug!(%client, original_dst = %dst, "connected upstream");
    let copied = copy(client_stream, connected.upstream, connected.early_bytes, settings.idle_timeout).await;
    record.close(copied.up, copied.down, &copied.ended);
    drop(tcp);
}

/// Who the connection is from: in a pod's namespace, the pod; else the
/// client's cgroup (eBPF capture) or address.
fn source_of(
    stream: &TcpStream,
    client: SocketAddr,
    settings: &ProxySettings,
    mesh: &Mesh,
) -> Option<(String, String)> {
    match settings.workload.netns {
        Some(_) => settings
            .workload
            .ips
            .first()
            .and_then(|ip| mesh.workload_at(*ip))
            .or_else(|| Some((settings.workload.name.clone(), settings.workload.namespace.clone()))),
        None => source::source_workload(stream, client, &settings.workloads, mesh),
    }
}

/// The route step: a mesh service's HTTP port is routed per request; its
/// TCP goes to the service's endpoints (or its TCP route); anything else
/// goes where the client was going.
async fn decide(
    mesh: &Mesh,
    stream: &TcpStream,
    dst: SocketAddr,
    client_ns: Option<&str>,
    settings: &ProxySettings,
) -> Decision {
    // A service not exported to the client's namespace is not a mesh
    // service for it: the connection goes where it was going.
    let Some((svc, port)) = mesh.service_at(dst).filter(|(s, _)| mesh.services[*s].export.visible_to(client_ns)) else {
        return Decision::Tcp(TcpDecision { target: dst, labels: None, _slot: None });
    };
    let protocol = match port.protocol {
        // In a pod's namespace only a declared protocol decides, as in
        // Istio's sidecar with detection off: an HTTP port is routed per
        // request, and an undeclared one is L4, never sniffed (a
        // server-first protocol would wait for bytes the client never
        // sends).
        Protocol::Sniff if settings.workload.netns.is_some() => Protocol::Tcp,
        Protocol::Sniff => crate::route::sniff::sniff(stream).await,
        p => p,
    };
    if matches!(protocol, Protocol::Http | Protocol::Http2) {
        return Decision::Http { service: svc, protocol };
    }
    let Some((target, tsvc, subset, tport)) =
        crate::route::tcp_target(mesh, &settings.balancer, svc, dst, client_ns).await
    else {
        return Decision::Refused {
            flags: "UH",
            reason: "no endpoint for this service",
            service: Some(mesh.services[svc].hostname.clone()),
        };
    };
    let s = &mesh.services[tsvc];
    let endpoint = s.endpoints.iter().find(|e| e.address == Address::Ip(target.ip()));
    let ep_label = |k: &str| endpoint.and_then(|e| e.labels.get(k)).map_or("unknown", String::as_str);
    let labels = Labels::to_service(&s.hostname, &s.namespace, ep_label("app"), ep_label("version"), "tcp");
    // tcp.maxConnections: over the limit, the connection is refused
    // (Envoy's UO).
    let cluster = settings.balancer.cluster(mesh, tsvc, subset.as_deref(), tport);
    let slot = match &cluster.connections {
        Some(sem) => match Arc::clone(sem).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                return Decision::Refused {
                    flags: "UO",
                    reason: "connection limit of the destination reached",
                    service: Some(s.hostname.clone()),
                }
            }
        },
        None => None,
    };
    Decision::Tcp(TcpDecision { target, labels: Some(labels), _slot: slot })
}

/// Istio's TCP labels of an outbound connection: the service's (or the
/// PassthroughCluster's), the source workload, and both principals when
/// the connection went over mTLS.
fn tcp_labels(
    service: Option<Labels>,
    source: Option<&(String, String)>,
    own: Option<&Identity>,
    peer: Option<&Identity>,
) -> Labels {
    let mut labels = service.unwrap_or_else(Labels::passthrough);
    if let Some((name, ns)) = source {
        labels.source_workload = label(name);
        labels.source_workload_namespace = label(ns);
    }
    if let Some(p) = peer {
        if let Some(id) = own {
            labels.source_principal = id.to_string().into();
        }
        labels.destination_principal = p.to_string().into();
        labels.connection_security_policy = "mutual_tls".into();
    }
    labels
}

/// What a copy moved and how it ended.
struct Copied {
    up: u64,
    down: u64,
    ended: Ended,
}

/// Copy both ways until both sides end, an error, or `idle` with nothing
/// moving.
async fn copy(mut client_stream: TcpStream, upstream: Upstream, early_bytes: u64, idle: Duration) -> Copied {
    let activity = Arc::new(AtomicU64::new(0));
    let up_bytes = Arc::new(AtomicU64::new(early_bytes));
    let down_bytes = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let (client_read, client_write) = client_stream.split();
    let client_read = Tracked::new(client_read, Arc::clone(&activity), epoch, Arc::clone(&up_bytes));
    let outcome = match upstream {
        Upstream::Plain(mut upstream) => {
            let (upstream_read, upstream_write) = upstream.split();
            let copy = async {
                tokio::try_join!(
                    copy_one_way(
                        client_read,
                        Tracked::new(upstream_write, Arc::clone(&activity), epoch, Arc::default())
                    ),
                    copy_one_way(
                        Tracked::new(upstream_read, Arc::clone(&activity), epoch, Arc::clone(&down_bytes)),
                        Tracked::new(client_write, Arc::clone(&activity), epoch, Arc::default()),
                    ),
                )
            };
            until_idle(copy, &activity, epoch, idle).await.map(|r| r.is_some())
        }
        Upstream::Hbone(tunnel) => {
            // Both directions straight between the socket and h2's frames.
            let (mut from_peer, mut to_peer) = tunnel.into_split();
            let copy = async {
                tokio::try_join!(
                    crate::transport::h2stream::copy_into(client_read, &mut to_peer),
                    crate::transport::h2stream::copy_out(
                        &mut from_peer,
                        Tracked::counting_writes(client_write, Arc::clone(&activity), epoch, Arc::clone(&down_bytes))
                    ),
                )
            };
            until_idle(copy, &activity, epoch, idle).await.map(|r| r.is_some())
        }
    };
    let ended = match outcome {
        Ok(true) => Ended::Closed,
        Ok(false) => Ended::IdleTimeout,
        Err(e) => Ended::Failed(e),
    };
    Copied { up: up_bytes.load(Ordering::Relaxed), down: down_bytes.load(Ordering::Relaxed), ended }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_on_the_proxy_port_of_loopback_is_the_proxy() {
        let l: Vec<SocketAddr> = vec!["127.0.0.1:15001".parse().unwrap()];
        assert!(is_self("127.0.0.1:15001".parse().unwrap(), &l));
        assert!(is_self("127.0.0.2:15001".parse().unwrap(), &l));
        assert!(!is_self("198.18.0.1:15001".parse().unwrap(), &l));
        assert!(!is_self("127.0.0.1:8080".parse().unwrap(), &l));
    }

    #[tokio::test]
    async fn an_uncaptured_connection_has_no_original_destination() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, peer) = l.accept().await.unwrap();
        assert!(original_dst(&s, peer).is_err());
    }

    /// Settings of an unprivileged outbound proxy for `yaml`: no mark, no
    /// HBONE, the agent's own namespace.
    fn settings(yaml: &str) -> ProxySettings {
        let mut docs = crate::mesh::source_dir::Documents::default();
        let mut errors = Vec::new();
        crate::mesh::source_dir::load_text(std::path::Path::new("m.yaml"), yaml, &mut docs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let mesh = crate::mesh::MeshHandle::new(Mesh::compile(&docs).unwrap());
        let transport = crate::transport::Transport { mark: 0, connect_timeout: Duration::from_secs(2), hbone: None };
        let workload = Arc::new(crate::transport::socket::WorkloadNet::host(None));
        let upstreams = crate::transport::http_client::Upstreams::new(crate::transport::http_client::Connector {
            transport: transport.clone(),
            from: Arc::clone(&workload),
            mesh: mesh.clone(),
            mtls: crate::transport::Mtls::WhenEnrolled,
        });
        ProxySettings {
            max_connections: 100,
            idle_timeout: Duration::from_secs(5),
            transport,
            mesh,
            upstreams,
            balancer: Arc::default(),
            metrics: Arc::default(),
            access_log: false,
            workloads: Arc::new(source::Workloads::new("/nonexistent".into())),
            workload,
            close: None,
        }
    }

    /// An echo server on 127.0.0.1:0 that counts its connections.
    async fn echo() -> (SocketAddr, Arc<AtomicU64>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&count);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (addr, count)
    }

    /// A connection to the proxy, handed to `proxy_to` for `dst` as capture
    /// would hand it; returns the client's end.
    async fn captured(settings: &Arc<ProxySettings>, stats: &Arc<ProxyStats>, dst: SocketAddr) -> TcpStream {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = l.accept().await.unwrap();
        let (settings, stats) = (Arc::clone(settings), Arc::clone(stats));
        tokio::spawn(async move { proxy_to(stream, peer, dst, &settings, &stats).await });
        client
    }

    async fn round_trip(c: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        c.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn a_connection_to_no_service_goes_to_its_original_destination_and_is_counted() {
        let (server, accepted) = echo().await;
        let (settings, stats) = (Arc::new(settings("")), Arc::new(ProxyStats::default()));
        let mut c = captured(&settings, &stats, server).await;
        assert_eq!(round_trip(&mut c, b"hello").await.unwrap(), b"hello");
        drop(c);
        for _ in 0..100 {
            if stats.open_count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!((accepted.load(Ordering::SeqCst), stats.open_count()), (1, 0));
        assert_eq!((stats.bytes_up.load(Ordering::SeqCst), stats.bytes_down.load(Ordering::SeqCst)), (5, 5));
        let text = settings.metrics.encode();
        assert!(text.contains("destination_service_name=\"PassthroughCluster\""), "{text}");
        // One series for every address outside the mesh (L5).
        assert!(text.contains("destination_service=\"unknown\""), "{text}");
        assert!(!text.contains(&format!("destination_service=\"{}\"", server.ip())), "{text}");
    }

    #[tokio::test]
    async fn a_service_port_goes_to_an_endpoint_and_max_connections_refuses_the_next() {
        let (server, accepted) = echo().await;
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: db}}\nspec: {{clusterIP: 10.96.0.7, ports: [{{name: tcp-db, port: 5432}}], selector: {{app: db}}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: db}}\nspec: {{address: 127.0.0.1, ports: {{tcp-db: {}}}, labels: {{app: db}}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: db}}\nspec: {{host: db, trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: 1}}}}}}}}\n",
            server.port()
        );
        let (settings, stats) = (Arc::new(settings(&yaml)), Arc::new(ProxyStats::default()));
        let vip: SocketAddr = "10.96.0.7:5432".parse().unwrap();
        let mut first = captured(&settings, &stats, vip).await;
        assert_eq!(round_trip(&mut first, b"select 1").await.unwrap(), b"select 1");
        let mut second = captured(&settings, &stats, vip).await;
        assert!(
            round_trip(&mut second, b"select 2").await.is_err(),
            "over maxConnections the connection is closed (UO)"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(stats.failed.load(Ordering::SeqCst), 1);
    }
}
