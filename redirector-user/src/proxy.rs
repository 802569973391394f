//! The node proxy's transparent TCP path: accept on the outbound listener,
//! recover the original destination, connect to it, copy both ways.
//!
//! It does not know how a connection was captured: `SO_ORIGINAL_DST` is
//! answered by our getsockopt program under eBPF capture and by conntrack
//! under iptables capture. Routing, mTLS and L7 come later along this path.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

use crate::mesh::http::{self as l7, Upstreams};
use crate::mesh::model::{Address, Protocol};
use crate::mesh::MeshHandle;

/// Settings of the transparent path.
#[derive(Clone)]
pub struct ProxySettings {
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Mark set on upstream sockets so the capture never takes them again.
    pub mark: u32,
    /// The mesh in force (empty: every connection goes to its original
    /// destination).
    pub mesh: MeshHandle,
    /// HTTP clients for L7 routing.
    pub upstreams: Upstreams,
    pub metrics: Arc<crate::mesh::metrics::Metrics>,
    pub access_log: bool,
    /// Source workload names by cgroup.
    pub workloads: Arc<Workloads>,
    /// The workload whose listener this is: where upstream sockets are
    /// made and who the connections are from.
    pub workload: Arc<crate::inpod::WorkloadNet>,
    /// HBONE to enrolled pods (absent: plain TCP everywhere).
    pub hbone: Option<Arc<crate::mesh::hbone::Pool>>,
    /// Close open connections when the listeners stop (a pod that left),
    /// instead of draining them.
    pub close_on_stop: bool,
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

    pub fn open_count(&self) -> usize {
        self.open.lock().expect("stats lock").len()
    }
}

/// Removes a connection from the open table however its task ends.
struct OpenGuard<'a> {
    stats: &'a ProxyStats,
    id: u64,
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.stats.open.lock().expect("stats lock").remove(&self.id);
    }
}

/// The original destination of an accepted connection, by the same
/// getsockopt a sidecar proxy uses under iptables capture.
/// The client's cgroup id, as the kernel programs recorded it at connect()
/// (eBPF capture; `None` under iptables capture or for an unknown socket).
pub fn source_cgroup(stream: &TcpStream) -> Option<u64> {
    let mut id: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: an 8-byte buffer and its length.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            redirector_common::SO_REDIRECTOR_SOURCE_CGROUP,
            (&mut id as *mut u64).cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize == std::mem::size_of::<u64>() && id != 0).then_some(id)
}

/// Names of workloads by cgroup id: the cgroup directory's name (`redirector
/// exec --workload NAME` makes `redirector-workloads/NAME`). The kernel
/// turns the id into the directory (open_by_handle_at on the cgroup2
/// mount, as bpftool does), so a workload is named from its first
/// connection.
pub struct Workloads {
    mount: std::path::PathBuf,
    names: Mutex<std::collections::HashMap<u64, String>>,
}

/// The file handle type of kernfs (cgroup2) inodes.
const FILEID_KERNFS: libc::c_int = 0xfe;

#[repr(C)]
struct CgroupHandle {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    id: u64,
}

impl Workloads {
    pub fn new(mount: std::path::PathBuf) -> Workloads {
        Workloads {
            mount,
            names: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// The cgroup's path relative to the cgroup2 mount.
    fn path_of(&self, cgroup_id: u64) -> Option<std::path::PathBuf> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let mount = std::fs::File::open(&self.mount).ok()?;
        let mut handle = CgroupHandle {
            handle_bytes: std::mem::size_of::<u64>() as libc::c_uint,
            handle_type: FILEID_KERNFS,
            id: cgroup_id,
        };
        // SAFETY: a valid mount fd and a file handle of the declared size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                mount.as_raw_fd(),
                &mut handle as *mut CgroupHandle,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: the kernel returned a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()
    }

    pub fn name(&self, cgroup_id: u64) -> Option<String> {
        if let Some(n) = self.names.lock().expect("workloads lock").get(&cgroup_id) {
            return Some(n.clone());
        }
        let name = self.path_of(cgroup_id)?.file_name()?.to_string_lossy().into_owned();
        let mut names = self.names.lock().expect("workloads lock");
        if names.len() > 65_536 {
            names.clear();
        }
        names.insert(cgroup_id, name.clone());
        Some(name)
    }
}

/// The source workload of a connection: its cgroup's name (eBPF capture),
/// else the Pod or WorkloadEntry with the client's address; (name,
/// namespace).
pub fn source_workload(
    stream: &TcpStream,
    client: SocketAddr,
    workloads: &Workloads,
    mesh: &crate::mesh::Mesh,
) -> Option<(String, String)> {
    if let Some(name) = source_cgroup(stream).and_then(|id| workloads.name(id)) {
        return Some((name, "unknown".into()));
    }
    mesh.workload_at(client.ip())
}

/// The destination the client dialled. `peer` is the client's address as
/// accept() returned it: its family is the socket's, which picks the
/// option's level (no getsockname per connection).
pub fn original_dst(stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    // SAFETY: the buffers are sized for the structures the kernel writes.
    unsafe {
        if peer.is_ipv4() {
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::getsockopt(
                fd,
                libc::SOL_IP,
                redirector_common::SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in).cast(),
                &mut len,
            );
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                u16::from_be(sa.sin_port),
            )))
        } else {
            let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            let rc = libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                redirector_common::SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in6).cast(),
                &mut len,
            );
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
            let port = u16::from_be(sa.sin6_port);
            // An IPv4 destination reached over a dual-stack socket.
            Ok(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
            })
        }
    }
}

/// Whether `dst` is one of the proxy's own listeners: forwarding there would
/// loop.
fn is_self(dst: SocketAddr, listeners: &[SocketAddr]) -> bool {
    listeners
        .iter()
        .any(|l| l.port() == dst.port() && (dst.ip().is_loopback() || l.ip() == dst.ip()))
}

/// Serve the outbound listeners until `shutdown` turns true, then wait up to
/// `drain` for open connections to finish.
pub async fn run_outbound(
    listeners: Vec<TcpListener>,
    settings: ProxySettings,
    stats: Arc<ProxyStats>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let addrs: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let settings = Arc::new(settings);
    let mut accept_tasks = Vec::new();
    for listener in listeners {
        let limit = limit.clone();
        let stats = stats.clone();
        let settings = settings.clone();
        let addrs = addrs.clone();
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
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    stats.rejected_over_limit.fetch_add(1, Ordering::Relaxed);
                    warn!(%client, limit = settings.max_connections, "connection limit reached; closing");
                    continue;
                };
                let stats = stats.clone();
                let settings = settings.clone();
                let addrs = addrs.clone();
                let mut stop = shutdown.clone();
                tokio::spawn(async move {
                    if settings.close_on_stop {
                        tokio::select! {
                            _ = handle(stream, client, &settings, &stats, &addrs) => {}
                            _ = stop.changed() => {}
                        }
                    } else {
                        handle(stream, client, &settings, &stats, &addrs).await;
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

/// Connect to `dst` from a socket carrying the proxy's mark, which tells
/// the kernel programs (and iptables) this is the proxy.
pub async fn connect_marked(dst: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_mark(mark)?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    TcpSocket::from_std_stream(socket.into()).connect(dst).await
}

/// The proxy's side of a forwarded connection: a TCP connection to the
/// destination, or an HBONE tunnel to it.
enum Upstream {
    Plain(TcpStream),
    Hbone(crate::mesh::h2stream::H2Stream),
}

/// Connect to `target`: over HBONE when it is an enrolled pod and this
/// workload has an identity, else plain TCP from the workload's namespace.
/// Over HBONE, what the client has already sent (`client`'s first bytes,
/// read without waiting) goes out with the CONNECT, in the same TLS
/// record, instead of one round trip later; those bytes are returned for
/// the byte counts.
async fn connect_upstream(
    target: SocketAddr,
    settings: &ProxySettings,
    mesh: &crate::mesh::Mesh,
    client: &mut TcpStream,
) -> io::Result<(Upstream, Option<crate::identity::Identity>, u64)> {
    if let (Some(pool), Some(_)) = (&settings.hbone, &settings.workload.identity) {
        if let Some(pod) = mesh.pod_at(target.ip()).filter(|p| p.enrolled) {
            let peer_id = crate::identity::Identity::new(pool.certs().trust_domain(), &pod.namespace, &pod.service_account);
            let peer = SocketAddr::new(target.ip(), crate::mesh::hbone::HBONE_PORT);
            let mut first = bytes::BytesMut::with_capacity(SMALL_BUFFER);
            // Nothing there yet (or a server-first protocol): the tunnel
            // opens without it; the copy carries everything after. One
            // poll of the socket's read: a partial read tells tokio the
            // socket is drained, so the copy that follows waits for the
            // next bytes instead of first asking the kernel again.
            use futures_util::FutureExt;
            use tokio::io::AsyncReadExt;
            let early = match client.read_buf(&mut first).now_or_never() {
                Some(Ok(n)) if n > 0 => first.freeze(),
                _ => bytes::Bytes::new(),
            };
            let sent = early.len() as u64;
            return match pool.tunnel(&settings.workload, peer, peer_id.clone(), target, early).await {
                Ok(t) => Ok((Upstream::Hbone(t), Some(peer_id), sent)),
                Err(e) => Err(io::Error::other(e.to_string())),
            };
        }
    }
    match tokio::time::timeout(settings.connect_timeout, settings.workload.connect(target, settings.mark)).await {
        Ok(r) => r.map(|s| (Upstream::Plain(s), None, 0)),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timeout")),
    }
}

/// A port that declares no protocol: HTTP if the client's first bytes are
/// an HTTP request line or the HTTP/2 preface, opaque TCP otherwise (also
/// when the client says nothing for a moment: server-first protocols).
async fn sniff(stream: &TcpStream) -> Protocol {
    let deadline = Instant::now() + Duration::from_millis(100);
    let mut buf = [0u8; 16];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(left, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return Protocol::Tcp,
        };
        if n == 0 {
            return Protocol::Tcp;
        }
        let seen = &buf[..n];
        if l7::looks_like_http(seen) {
            return Protocol::Http;
        }
        // Could still become a request line: wait for more bytes.
        let prefix = |p: &[u8]| p.starts_with(seen) || seen.starts_with(p);
        let possible = [&b"GET "[..], b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ", b"PRI * HTTP/2.0"]
            .iter()
            .any(|m| prefix(m));
        if !possible || n == buf.len() || Instant::now() >= deadline {
            return Protocol::Tcp;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Where a TCP connection to a mesh service goes: its TCP route (weighted)
/// or the service's endpoints. `None`: the service has no endpoint.
async fn tcp_target(mesh: &crate::mesh::Mesh, svc: usize, dst: SocketAddr) -> Option<(SocketAddr, usize, Option<String>, u16)> {
    let service = &mesh.services[svc];
    if service.passthrough {
        return Some((dst, svc, None, dst.port()));
    }
    let rule = mesh
        .tcp_routes
        .get(&svc)
        .and_then(|rules| rules.iter().find(|r| r.port.is_none_or(|p| p == dst.port())));
    let (target_svc, subset, port) = match rule {
        Some(r) => {
            let total: u32 = r.route.iter().map(|d| d.weight).sum();
            let mut pick = mesh.random(total.max(1) as usize) as u32;
            let d = r.route.iter().find(|d| {
                if pick < d.weight {
                    true
                } else {
                    pick -= d.weight;
                    false
                }
            })?;
            let port = d.port.unwrap_or(dst.port());
            (d.service, d.subset.clone(), port)
        }
        None => (svc, None, dst.port()),
    };
    let (addr, port) = mesh.pick_endpoint(target_svc, subset.as_deref(), port)?;
    let a = match addr {
        Address::Ip(ip) => SocketAddr::new(ip, port),
        Address::Dns(host) => tokio::net::lookup_host((host.as_str(), port)).await.ok()?.next()?,
    };
    Some((a, target_svc, subset, port))
}

async fn handle(
    mut client_stream: TcpStream,
    client: SocketAddr,
    settings: &ProxySettings,
    stats: &ProxyStats,
    listeners: &[SocketAddr],
) {
    let started = Instant::now();
    let dst = match original_dst(&client_stream, client) {
        Ok(d) => d,
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            warn!(%client, error = %e, "no original destination for this connection (was it captured?); closing");
            return;
        }
    };
    if is_self(dst, listeners) {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        warn!(%client, %dst, "original destination is the proxy itself; closing to avoid a loop");
        return;
    }
    let id = stats.next_id.fetch_add(1, Ordering::Relaxed);
    stats.open.lock().expect("stats lock").insert(
        id,
        Entry {
            client,
            original_dst: dst,
            upstream_local: None,
            started,
        },
    );
    let _guard = OpenGuard { stats, id };

    // A mesh service: HTTP is routed per request; TCP goes to the
    // service's endpoints (or its TCP route). Anything else goes where the
    // client was going.
    let mesh = settings.mesh.current();
    let source = match settings.workload.netns {
        // In a pod's namespace: the pod is the source.
        Some(_) => settings
            .workload
            .ips
            .first()
            .and_then(|ip| mesh.workload_at(*ip))
            .or_else(|| Some((settings.workload.name.clone(), settings.workload.namespace.clone()))),
        None => source_workload(&client_stream, client, &settings.workloads, &mesh),
    };
    let in_pod = settings.workload.netns.is_some();
    let mut target = dst;
    let mut _slot = None;
    // A service's label set when the destination is one, else Istio's
    // PassthroughCluster's (built once, below).
    let mut service_labels = None;
    if let Some((svc, port)) = mesh.service_at(dst) {
        let protocol = match port.protocol {
            // In a pod's namespace the node proxy is L4, as ztunnel is:
            // every port is carried over HBONE as TCP, and nothing is
            // sniffed (a server-first protocol would wait for bytes the
            // client never sends).
            _ if in_pod => Protocol::Tcp,
            Protocol::Sniff => sniff(&client_stream).await,
            p => p,
        };
        if matches!(protocol, Protocol::Http | Protocol::Http2) {
            stats.forwarded.fetch_add(1, Ordering::Relaxed);
            let ctx = l7::ConnContext {
                mesh: settings.mesh.clone(),
                upstreams: settings.upstreams.clone(),
                client,
                original_dst: dst,
                service: Some(svc),
                gateway_port: None,
                protocol,
                metrics: settings.metrics.clone(),
                access_log: settings.access_log,
                source: source.clone(),
            };
            drop(mesh);
            l7::serve(client_stream, ctx).await;
            info!(%client, original_dst = %dst, duration_ms = started.elapsed().as_millis() as u64, "HTTP connection closed");
            return;
        }
        match tcp_target(&mesh, svc, dst).await {
            Some((t, tsvc, subset, tport)) => {
                target = t;
                let s = &mesh.services[tsvc];
                let endpoint = s.endpoints.iter().find(|e| e.address == Address::Ip(t.ip()));
                let ep_label = |k: &str| endpoint.and_then(|e| e.labels.get(k)).map(String::as_str).unwrap_or("unknown");
                service_labels = Some(crate::mesh::metrics::Labels::to_service(
                    &s.hostname,
                    &s.namespace,
                    ep_label("app"),
                    ep_label("version"),
                    "tcp",
                ));
                // tcp.maxConnections: over the limit, the connection is
                // refused (Envoy's UO).
                let cluster = mesh.cluster(tsvc, subset.as_deref(), tport);
                if let Some(sem) = &cluster.connections {
                    match sem.clone().try_acquire_owned() {
                        Ok(p) => _slot = Some(p),
                        Err(_) => {
                            stats.failed.fetch_add(1, Ordering::Relaxed);
                            info!(%client, original_dst = %dst, response_flags = "UO", "connection limit of the destination reached; closing");
                            return;
                        }
                    }
                }
            }
            None => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                info!(%client, original_dst = %dst, service = %mesh.services[svc].hostname, response_flags = "UH", "no endpoint for this service; closing");
                return;
            }
        }
    }
    let connected = connect_upstream(target, settings, &mesh, &mut client_stream).await;
    drop(mesh);
    let (upstream, peer_identity, early) = match connected {
        Ok(s) => s,
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            info!(%client, original_dst = %dst, %target, error = %e, "upstream connect failed");
            return;
        }
    };
    let mut labels = service_labels.unwrap_or_else(|| crate::mesh::metrics::Labels::passthrough(dst));
    if let Some((name, ns)) = &source {
        labels.source_workload = crate::mesh::metrics::label(name);
        labels.source_workload_namespace = crate::mesh::metrics::label(ns);
    }
    if let Some(id) = &settings.workload.identity {
        if peer_identity.is_some() {
            labels.source_principal = id.to_string().into();
        }
    }
    if let Some(p) = &peer_identity {
        labels.destination_principal = p.to_string().into();
        labels.connection_security_policy = "mutual_tls".into();
    }
    let upstream_local = match &upstream {
        Upstream::Plain(s) => s.local_addr().ok(),
        Upstream::Hbone(_) => None,
    };
    if let Some(e) = stats.open.lock().expect("stats lock").get_mut(&id) {
        e.upstream_local = upstream_local;
    }
    stats.forwarded.fetch_add(1, Ordering::Relaxed);
    let series = settings.metrics.tcp_series(labels);
    series.opened.inc();
    debug!(%client, original_dst = %dst, "connected upstream");

    let activity = Arc::new(AtomicU64::new(0));
    let up_bytes = Arc::new(AtomicU64::new(early));
    let down_bytes = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let (client_read, client_write) = client_stream.split();
    let client_read = Tracked::new(client_read, activity.clone(), epoch, up_bytes.clone());
    let idle = settings.idle_timeout;
    let outcome = match upstream {
        Upstream::Plain(mut upstream) => {
            let (upstream_read, upstream_write) = upstream.split();
            let copy = async {
                tokio::try_join!(
                    copy_one_way(client_read, Tracked::new(upstream_write, activity.clone(), epoch, Arc::default())),
                    copy_one_way(
                        Tracked::new(upstream_read, activity.clone(), epoch, down_bytes.clone()),
                        Tracked::new(client_write, activity.clone(), epoch, Arc::default()),
                    ),
                )
            };
            until_idle(copy, &activity, epoch, idle).await
        }
        Upstream::Hbone(tunnel) => {
            // Both directions straight between the socket and h2's frames.
            let (mut from_peer, mut to_peer) = tunnel.into_split();
            let copy = async {
                tokio::try_join!(
                    crate::mesh::h2stream::copy_into(client_read, &mut to_peer),
                    crate::mesh::h2stream::copy_out(&mut from_peer, Tracked::counting_writes(client_write, activity.clone(), epoch, down_bytes.clone())),
                )
            };
            until_idle(copy, &activity, epoch, idle).await
        }
    };
    let (up, down) = (up_bytes.load(Ordering::Relaxed), down_bytes.load(Ordering::Relaxed));
    stats.bytes_up.fetch_add(up, Ordering::Relaxed);
    stats.bytes_down.fetch_add(down, Ordering::Relaxed);
    series.sent.inc_by(up);
    series.received.inc_by(down);
    series.closed.inc();
    if !settings.access_log {
        return;
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    // The access log's target (`access`), as the destination's line and
    // ztunnel's: one filter (`REDIRECTOR_LOG=...,access=off`) governs both.
    match outcome {
        Ok(Some(_)) => info!(
            target: "access",
            direction = "outbound",
            %client, original_dst = %dst,
            upstream_local = ?upstream_local,
            source_principal = %crate::identity::Principal(settings.workload.identity.as_ref()),
            destination_principal = %crate::identity::Principal(peer_identity.as_ref()),
            bytes_up = up, bytes_down = down, duration_ms,
            "connection closed"
        ),
        Ok(None) => info!(
            target: "access",
            direction = "outbound",
            %client, original_dst = %dst, bytes_up = up, bytes_down = down, duration_ms,
            "idle timeout: connection closed"
        ),
        Err(e) => info!(
            target: "access",
            direction = "outbound",
            %client, original_dst = %dst, bytes_up = up, bytes_down = down, duration_ms,
            error = %e, "connection ended with an error"
        ),
    }
}

/// Run `copy` until it ends, or until nothing has moved for `idle` (by
/// `activity`, milliseconds since `epoch`): `Ok(None)`.
async fn until_idle<F, T>(copy: F, activity: &AtomicU64, epoch: Instant, idle: Duration) -> io::Result<Option<T>>
where
    F: std::future::Future<Output = io::Result<T>>,
{
    tokio::pin!(copy);
    loop {
        let last = Duration::from_millis(activity.load(Ordering::Relaxed));
        let idle_left = idle.saturating_sub(epoch.elapsed().saturating_sub(last));
        tokio::select! {
            r = &mut copy => return r.map(Some),
            _ = tokio::time::sleep(idle_left) => {
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                if epoch.elapsed().saturating_sub(last) >= idle {
                    return Ok(None);
                }
            }
        }
    }
}

/// A connection starts with small copy buffers (most carry requests and
/// responses); one that keeps filling them, a bulk transfer, gets large
/// ones, so it crosses the proxy in fewer, larger reads and writes.
pub(crate) const SMALL_BUFFER: usize = 16 * 1024;
pub(crate) const LARGE_BUFFER: usize = 256 * 1024;
/// Consecutive reads that fill the small buffer before it grows.
pub(crate) const FULL_READS_TO_GROW: u32 = 4;

/// Copy until `from` ends, then half-close `to` (the other direction may
/// go on). Returns the bytes copied.
pub(crate) async fn copy_one_way<R, W>(mut from: R, mut to: W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Read into the buffer's spare capacity: nothing is zeroed first.
    let mut buf = Vec::with_capacity(SMALL_BUFFER);
    let mut full_reads = 0;
    let mut total = 0u64;
    loop {
        buf.clear();
        let n = from.read_buf(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
        if n == buf.capacity() && buf.capacity() < LARGE_BUFFER {
            full_reads += 1;
            if full_reads >= FULL_READS_TO_GROW {
                buf.reserve_exact(LARGE_BUFFER - buf.len());
            }
        } else {
            full_reads = 0;
        }
    }
}

/// One half of a stream that records the time of its last read or write,
/// for the idle timeout, and counts what it read (or, made with
/// `counting_writes`, what was written to it).
struct Tracked<T> {
    inner: T,
    activity: Arc<AtomicU64>,
    epoch: Instant,
    read_bytes: Arc<AtomicU64>,
    written_bytes: Option<Arc<AtomicU64>>,
    /// Set while waiting to retry a write the kernel refused with ENOMEM.
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Tracked<T> {
    fn new(
        inner: T,
        activity: Arc<AtomicU64>,
        epoch: Instant,
        read_bytes: Arc<AtomicU64>,
    ) -> Self {
        Tracked {
            inner,
            activity,
            epoch,
            read_bytes,
            written_bytes: None,
            retry: None,
        }
    }
    fn counting_writes(inner: T, activity: Arc<AtomicU64>, epoch: Instant, written: Arc<AtomicU64>) -> Self {
        Tracked { written_bytes: Some(written), ..Tracked::new(inner, activity, epoch, Arc::default()) }
    }
    fn touch(&self) {
        self.activity
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read_bytes.fetch_add(n as u64, Ordering::Relaxed);
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            if let Some(sleep) = self.retry.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.retry = None;
            }
            let r = Pin::new(&mut self.inner).poll_write(cx, buf);
            match r {
                // The same-node shortcut (sockmap ingress redirect) has no
                // flow control: a receiver that falls behind makes the
                // kernel refuse the write with ENOMEM. Back off and retry,
                // as a full send buffer would have made us wait.
                Poll::Ready(Err(e)) if e.raw_os_error() == Some(libc::ENOMEM) => {
                    self.retry = Some(Box::pin(tokio::time::sleep(Duration::from_millis(1))));
                }
                Poll::Ready(Ok(n)) if n > 0 => {
                    if let Some(w) = &self.written_bytes {
                        w.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    self.touch();
                    return Poll::Ready(Ok(n));
                }
                other => return other,
            }
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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
}
