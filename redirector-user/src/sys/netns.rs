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
        setns(&self.fd)?;
        let r = f();
        // A thread left in a pod's namespace would put the next socket
        // it makes there: not recoverable.
        setns(home).expect("returning to the agent's network namespace");
        Ok(r)
    }
}

/// The agent's own network namespace's inode.
pub fn home_inode() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let fd = HOME.get()?;
    let f = std::fs::File::from(fd.try_clone().ok()?);
    f.metadata().ok().map(|m| m.ino())
}
