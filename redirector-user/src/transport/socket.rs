//! Plain sockets the proxy originates: in the agent's own namespace or a
//! pod's, always with the proxy's mark so no capture takes them again.
//! [`WorkloadNet`] is where a workload's sockets live and who it is; it
//! does not decide whether a connection is tunnelled (that is
//! [`crate::transport::connect`]).

#![forbid(unsafe_code)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use crate::identity::Identity;
use crate::sys::netns::Netns;

/// Where a workload's sockets live and who it is.
#[derive(Debug)]
pub struct WorkloadNet {
    /// `None`: the agent's own namespace (the host's on a dev box).
    pub netns: Option<Arc<Netns>>,
    pub name: String,
    pub namespace: String,
    pub identity: Option<Identity>,
    pub ips: Vec<IpAddr>,
    /// Outbound sockets made ahead in the workload's namespace (IPv4,
    /// IPv6), with the mark they carry: entering a namespace costs two
    /// setns calls, so they are made a batch at a time.
    spare: Mutex<[Vec<(u32, socket2::Socket)>; 2]>,
}

/// Outbound sockets made per visit to a pod's namespace.
const SPARE_BATCH: usize = 16;

impl WorkloadNet {
    /// A pod's workload: its namespace, who it is, its addresses.
    pub fn pod(
        netns: Arc<Netns>,
        name: String,
        namespace: String,
        identity: Option<Identity>,
        ips: Vec<IpAddr>,
    ) -> WorkloadNet {
        WorkloadNet { netns: Some(netns), name, namespace, identity, ips, spare: Mutex::default() }
    }

    /// The agent's own namespace, as one more workload.
    pub fn host(identity: Option<Identity>) -> WorkloadNet {
        WorkloadNet {
            netns: None,
            name: "host".into(),
            namespace: "default".into(),
            identity,
            ips: Vec::new(),
            spare: Mutex::default(),
        }
    }

    /// A new TCP socket in this workload's namespace.
    pub fn socket(&self, domain: socket2::Domain) -> io::Result<socket2::Socket> {
        let make = || socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP));
        match &self.netns {
            Some(ns) => ns.run(make)?,
            None => make(),
        }
    }

    /// A non-blocking TCP socket for an outbound connection, with `mark`
    /// and no Nagle delay: from the spares, made a batch at a time.
    fn outbound_socket(&self, domain: socket2::Domain, mark: u32) -> io::Result<socket2::Socket> {
        let make = || -> io::Result<socket2::Socket> {
            let s = socket2::Socket::new(
                domain,
                socket2::Type::STREAM.nonblocking().cloexec(),
                Some(socket2::Protocol::TCP),
            )?;
            // The agent's mark is never 0 (config rejects it); 0 is the
            // in-process tests' unprivileged proxy, which sets no mark.
            if mark != 0 {
                s.set_mark(mark)?;
            }
            s.set_nodelay(true)?;
            Ok(s)
        };
        let Some(ns) = &self.netns else { return make() };
        let slot = usize::from(domain == socket2::Domain::IPV6);
        let mut spare = self.spare.lock().expect("spare sockets lock");
        while let Some((m, s)) = spare[slot].pop() {
            if m == mark {
                return Ok(s);
            }
        }
        let mut batch = ns.run(|| (0..SPARE_BATCH).map(|_| make()).collect::<io::Result<Vec<_>>>())??;
        let s = batch.pop().expect("a batch of sockets");
        spare[slot].extend(batch.into_iter().map(|s| (mark, s)));
        Ok(s)
    }

    /// A listener on `addr` in this workload's namespace.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let s = self.socket(socket2::Domain::for_address(addr))?;
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        // Accepted connections inherit it (no Nagle delay on replies).
        s.set_nodelay(true)?;
        if addr.is_ipv6() {
            // An IPv6 listener takes IPv6 alone; IPv4 has its own.
            s.set_only_v6(true)?;
        }
        if addr.ip().is_unspecified() {
            // Accept connections to any address (the pod's, and the
            // original destinations of redirected connections).
            s.set_ip_transparent(true).ok();
        }
        s.bind(&addr.into())?;
        s.listen(1024)?;
        tokio::net::TcpListener::from_std(s.into())
    }

    /// Connect to `dst` from this workload's namespace on a socket with the
    /// proxy's mark, so no capture takes it again.
    pub async fn connect(&self, dst: SocketAddr, mark: u32) -> io::Result<tokio::net::TcpStream> {
        let s = self.outbound_socket(socket2::Domain::for_address(dst), mark)?;
        tokio::net::TcpSocket::from_std_stream(s.into()).connect(dst).await
    }

    /// This workload as metric labels name it.
    pub fn labels(&self) -> crate::telemetry::Workload<'_> {
        crate::telemetry::Workload { name: &self.name, namespace: &self.namespace, identity: self.identity.as_ref() }
    }

    pub fn describe(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
