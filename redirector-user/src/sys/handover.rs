//! Handing open sockets from one process to another: a set of named
//! descriptors ([`Sockets`]) and the unix seqpacket channel that carries
//! them (SCM_RIGHTS), with the peer's credentials. The receiver gets the
//! same kernel sockets, not copies: a listening socket handed over keeps
//! its accept queue, so no connection waiting in it is lost or refused.
//! Mechanism only: what is handed over, and when, is the agent's.

use std::collections::BTreeMap;
use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{
    self, sockopt, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};

/// At most this many descriptors travel in one message (the kernel's
/// SCM_MAX_FD is 253).
pub const FDS_PER_MESSAGE: usize = 200;
/// The largest message body.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Named descriptors: the sockets a process would hand over, or those it
/// was handed. Each is its own duplicate, so closing the original (a pod
/// that leaves closes its listeners) does not close it: remove it too.
#[derive(Default)]
pub struct Sockets {
    map: Mutex<BTreeMap<String, OwnedFd>>,
}

impl Sockets {
    /// Keep a duplicate of `fd` under `name` (replacing one of that name).
    pub fn keep(&self, name: impl Into<String>, fd: BorrowedFd<'_>) -> io::Result<()> {
        let dup = fd.try_clone_to_owned()?;
        self.map.lock().expect("sockets lock").insert(name.into(), dup);
        Ok(())
    }

    /// Put a descriptor in as it is.
    pub fn insert(&self, name: impl Into<String>, fd: OwnedFd) {
        self.map.lock().expect("sockets lock").insert(name.into(), fd);
    }

    /// Take the descriptor named `name` out, if there is one.
    pub fn take(&self, name: &str) -> Option<OwnedFd> {
        self.map.lock().expect("sockets lock").remove(name)
    }

    /// Close and forget every descriptor whose name starts with `prefix`.
    pub fn forget(&self, prefix: &str) -> usize {
        let mut map = self.map.lock().expect("sockets lock");
        let before = map.len();
        map.retain(|k, _| !k.starts_with(prefix));
        before - map.len()
    }

    /// The names held, in order.
    pub fn names(&self) -> Vec<String> {
        self.map.lock().expect("sockets lock").keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("sockets lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A duplicate of every descriptor, with its name.
    pub fn duplicates(&self) -> io::Result<Vec<(String, OwnedFd)>> {
        let map = self.map.lock().expect("sockets lock");
        map.iter().map(|(k, fd)| Ok((k.clone(), fd.try_clone()?))).collect()
    }
}

/// The sockets of one agent: those it was handed by the agent it took
/// over from, claimed by name as its listeners open, and its own, which it
/// would hand to the next.
#[derive(Default)]
pub struct Handover {
    pub inherited: Sockets,
    pub ours: Sockets,
}

impl Handover {
    /// The TCP listener named `name`: the one handed over if there is one
    /// (a descriptor that is not a listening socket is dropped), else
    /// `bind`'s; kept in ours either way.
    pub fn tcp(
        &self,
        name: &str,
        bind: impl FnOnce() -> io::Result<std::net::TcpListener>,
    ) -> io::Result<std::net::TcpListener> {
        let l = match self.inherited.take(name).filter(|fd| is_listening(fd.as_fd())) {
            Some(fd) => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                l
            }
            None => bind()?,
        };
        self.ours.keep(name, l.as_fd())?;
        Ok(l)
    }

    /// As [`Handover::tcp`], as a tokio listener (in the runtime).
    pub fn tokio_tcp(
        &self,
        name: &str,
        bind: impl FnOnce() -> io::Result<tokio::net::TcpListener>,
    ) -> io::Result<tokio::net::TcpListener> {
        let l = self.tcp(name, || bind().and_then(tokio::net::TcpListener::into_std))?;
        tokio::net::TcpListener::from_std(l)
    }

    /// The UDP socket named `name`, handed over or bound.
    pub fn udp(
        &self,
        name: &str,
        bind: impl FnOnce() -> io::Result<std::net::UdpSocket>,
    ) -> io::Result<std::net::UdpSocket> {
        let s = match self.inherited.take(name) {
            Some(fd) => std::net::UdpSocket::from(fd),
            None => bind()?,
        };
        self.ours.keep(name, s.as_fd())?;
        Ok(s)
    }
}

/// A unix seqpacket listener at `path` (a leftover file there is
/// replaced), readable and writable by its owner only.
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    let addr = socket::UnixAddr::new(path)?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    socket::bind(fd.as_raw_fd(), &addr)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    socket::listen(&fd, socket::Backlog::new(8).map_err(io::Error::from)?)?;
    Ok(fd)
}

/// Accept one connection (blocking).
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let raw = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Connect to the seqpacket listener at `path`.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    socket::connect(fd.as_raw_fd(), &socket::UnixAddr::new(path)?)?;
    Ok(fd)
}

/// The peer's process id and user id (SO_PEERCRED: fixed when it
/// connected, so a peer cannot pretend to be another).
pub fn peer(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let c = socket::getsockopt(&fd, sockopt::PeerCredentials)?;
    Ok((u32::try_from(c.pid()).unwrap_or(0), c.uid()))
}

/// Wait at most `timeout` for each message received (`None`: no limit).
pub fn set_timeout(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<()> {
    let tv = nix::sys::time::TimeVal::from(libc::timeval {
        tv_sec: timeout.map_or(0, |t| libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX)),
        tv_usec: timeout.map_or(0, |t| libc::suseconds_t::from(t.subsec_micros().max(u32::from(t.is_zero())))),
    });
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
    Ok(())
}

/// Send one message: `body` and, attached, `fds` (at most
/// [`FDS_PER_MESSAGE`]).
pub fn send(fd: BorrowedFd<'_>, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > FDS_PER_MESSAGE || body.len() > MAX_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "message too large to hand over"));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let sent = socket::sendmsg::<()>(fd.as_raw_fd(), &[IoSlice::new(body)], cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    if sent != body.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "message cut short"));
    }
    Ok(())
}

/// Receive one message and the descriptors attached to it. An empty body
/// with no descriptors is the peer's close.
pub fn recv(fd: BorrowedFd<'_>) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut body = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let (len, truncated, fds) = {
        let mut iov = [IoSliceMut::new(&mut body)];
        let msg = socket::recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: SCM_RIGHTS installed these descriptors in this
                // process for us; nothing else owns them.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        (msg.bytes, msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC), fds)
    };
    if truncated {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "a handed-over message was cut short"));
    }
    body.truncate(len);
    Ok((body, fds))
}

/// Whether `fd` is a listening socket (SO_ACCEPTCONN) of this type.
pub fn is_listening(fd: BorrowedFd<'_>) -> bool {
    socket::getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Descriptors sent over the channel arrive as the same sockets: a
    /// listener handed over accepts what was queued on it before.
    #[test]
    fn a_listener_handed_over_keeps_its_queue() {
        let dir = std::env::temp_dir().join(format!("redirector-handover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.sock");
        let server = listen(&path).unwrap();
        let client = connect(&path).unwrap();
        let accepted = accept(server.as_fd()).unwrap();
        assert_eq!(peer(accepted.as_fd()).unwrap(), (std::process::id(), nix::unistd::getuid().as_raw()));

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();
        send(client.as_fd(), b"one", &[tcp.as_fd()]).unwrap();
        drop(tcp);
        let (body, fds) = recv(accepted.as_fd()).unwrap();
        assert_eq!(body, b"one");
        assert_eq!(fds.len(), 1);
        assert!(is_listening(fds[0].as_fd()));
        let handed = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        let (_, from) = handed.accept().unwrap();
        assert_eq!(from, queued.local_addr().unwrap());

        set_timeout(accepted.as_fd(), Some(Duration::from_millis(50))).unwrap();
        let err = recv(accepted.as_fd()).unwrap_err();
        assert!(matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{err}");
        drop(client);
        assert_eq!(recv(accepted.as_fd()).unwrap().0.len(), 0, "the peer's close");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
