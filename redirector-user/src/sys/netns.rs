//! Network namespaces: the agent's own, recorded at start, and a pod's,
//! entered by one thread for the moment it takes to make a socket. A
//! socket belongs to the namespace of the thread that created it, for
//! life. This is mechanism only: which sockets to make, and for whom, is
//! decided elsewhere.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The agent's own network namespace, opened before any thread switches.
static HOME: OnceLock<OwnedFd> = OnceLock::new();

/// Remember the agent's own network namespace. Call once at start, from
/// the main thread.
pub fn init_home() -> io::Result<()> {
    if HOME.get().is_none() {
        let f = std::fs::File::open("/proc/thread-self/ns/net")?;
        let _ = HOME.set(f.into());
    }
    Ok(())
}

/// A pod's network namespace.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    pub path: PathBuf,
    /// The namespace's inode: the same namespace under two paths is one.
    pub inode: u64,
}

fn setns(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: a valid namespace descriptor; only this thread changes.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Netns {
    pub fn open(path: &Path) -> io::Result<Netns> {
        use std::os::unix::fs::MetadataExt;
        let f = std::fs::File::open(path)?;
        let inode = f.metadata()?.ino();
        Ok(Netns { fd: f.into(), path: path.to_path_buf(), inode })
    }

    /// The namespace's descriptor.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Run `f` on this thread inside the namespace, then come back.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = HOME
            .get()
            .ok_or_else(|| io::Error::other("the agent's own network namespace was not recorded at start"))?;
        /// Back home on every way out of `f`, a panic's unwinding too.
        struct Return<'a>(&'a OwnedFd);
        impl Drop for Return<'_> {
            fn drop(&mut self) {
                // A thread left in a pod's namespace would put the next
                // socket it makes there: not recoverable.
                if setns(self.0).is_err() {
                    std::process::abort();
                }
            }
        }
        setns(&self.fd)?;
        let _back = Return(home);
        Ok(f())
    }
}

/// The addresses of the current thread's network namespace's interfaces,
/// loopback left out (call inside [`Netns::run`] for a pod's).
pub fn interface_addresses() -> io::Result<Vec<std::net::IpAddr>> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; its
    // netlink socket is made in this thread's namespace.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not freed yet;
        // `ifa_addr` is null or points at a sockaddr of its family.
        let ip = unsafe {
            let a = (*cur).ifa_addr;
            cur = (*cur).ifa_next;
            if a.is_null() {
                continue;
            }
            match i32::from((*a).sa_family) {
                libc::AF_INET => {
                    let s = std::ptr::read_unaligned(a.cast::<libc::sockaddr_in>());
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let s = std::ptr::read_unaligned(a.cast::<libc::sockaddr_in6>());
                    IpAddr::V6(Ipv6Addr::from(s.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        if !ip.is_loopback() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The agent's own network namespace's inode.
pub fn home_inode() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let fd = HOME.get()?;
    let f = std::fs::File::from(fd.try_clone().ok()?);
    f.metadata().ok().map(|m| m.ino())
}
