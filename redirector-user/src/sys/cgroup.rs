//! cgroup v2: finding the mount, naming cgroups by path and id, creating the
//! agent's own cgroups and moving processes into them.
//!
//! A cgroup's id, as `bpf_get_current_cgroup_id()` returns it, is the inode
//! number of its directory in the cgroup2 filesystem.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("cgroup v2 is not mounted; mount it with `mount -t cgroup2 none /sys/fs/cgroup` (or boot with systemd.unified_cgroup_hierarchy=1)")]
    NotMounted,
    #[error("the agent runs in a private cgroup namespace and could not enter the host's: run it with hostPID: true and CAP_SYS_ADMIN (as the DaemonSet does)")]
    PrivateNamespace,
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cgroup {0} does not exist; create it (mkdir) or name an existing cgroup v2 directory")]
    Missing(PathBuf),
    #[error("{0} is not inside the cgroup v2 mount {1}; give a path under it")]
    Outside(PathBuf, PathBuf),
    #[error("process {0} does not exist (it may have exited); give the PID of a running process")]
    NoSuchProcess(u32),
    #[error("process {0} has no cgroup v2 membership in /proc/{0}/cgroup")]
    NoV2Membership(u32),
    #[error("cannot create cgroup {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot move process {pid} into cgroup {path}: {source}")]
    Move { pid: u32, path: PathBuf, source: io::Error },
}

/// The cgroup2 mount point, from a mountinfo table.
pub fn find_cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mountpoint options... - fstype source superopts
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mut f = pre.split_whitespace();
        let root = f.nth(3)?;
        let mount_point = f.next()?;
        // A bind mount of a sub-tree is not the hierarchy's root.
        if root != "/" {
            return None;
        }
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() + 1 && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// The cgroup2 mount point of this machine, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.into(), source })?;
    find_cgroup2_mount_in(&text).ok_or(if text.lines().any(|l| l.contains(" - cgroup2 ")) {
        CgroupError::PrivateNamespace
    } else {
        CgroupError::NotMounted
    })
}

/// The id of the cgroup at `path` (the inode number of its directory).
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() && path.join("cgroup.procs").exists() => Ok(m.ino()),
        Ok(_) => Err(CgroupError::Missing(path.into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(CgroupError::Missing(path.into())),
        Err(source) => Err(CgroupError::Read { path: path.into(), source }),
    }
}

/// The cgroup v2 path of a line set from /proc/PID/cgroup (the `0::` line).
pub fn v2_relative_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::")).map(str::trim)
}

/// The cgroup directory a process belongs to.
pub fn cgroup_of_pid(mount: &Path, pid: u32) -> Result<PathBuf, CgroupError> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(CgroupError::NoSuchProcess(pid)),
        Err(source) => return Err(CgroupError::Read { path, source }),
    };
    let rel = v2_relative_path(&text).ok_or(CgroupError::NoV2Membership(pid))?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// Enter the host's cgroup namespace when the agent starts in a private
/// one (a container's default on cgroup v2): there the cgroup2 mount and
/// every `/proc/<pid>/cgroup` are shown relative to the container's own
/// cgroup, so neither the hierarchy nor any pod's cgroup could be named.
/// The host's is PID 1's (the agent shares the host's PID namespace);
/// entering it takes CAP_SYS_ADMIN. Call from the main thread before any
/// other thread starts (a thread's namespace is inherited by the threads
/// it creates). Returns whether it moved.
pub fn enter_host_cgroup_namespace() -> io::Result<bool> {
    let ino = |pid: u32| fs::metadata(format!("/proc/{pid}/ns/cgroup")).map(|m| m.ino());
    let own = fs::metadata("/proc/self/ns/cgroup")?.ino();
    // PID 1, else the nearest ancestor in another cgroup namespace (the
    // container runtime's shim), where PID 1 keeps its namespaces to itself.
    let mut candidates = vec![1];
    let mut pid = std::os::unix::process::parent_id();
    while pid > 1 && candidates.len() < 16 {
        candidates.push(pid);
        pid = parent_of(pid).unwrap_or(0);
    }
    // None in another namespace (or none readable): this one is the
    // host's, the usual case.
    let Some(host) = candidates.into_iter().find(|p| ino(*p).is_ok_and(|i| i != own)) else {
        return Ok(false);
    };
    let ns = fs::File::open(format!("/proc/{host}/ns/cgroup"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: a namespace descriptor, entered by this (the only) thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWCGROUP) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// The parent of `pid` (`PPid` of its status).
fn parent_of(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok())
}

/// Resolve a cgroup given by the user: absolute (under the mount) or relative
/// to the mount.
pub fn resolve(mount: &Path, given: &Path) -> Result<PathBuf, CgroupError> {
    let path = if given.is_absolute() { given.to_path_buf() } else { mount.join(given) };
    if !path.starts_with(mount) {
        return Err(CgroupError::Outside(path, mount.into()));
    }
    cgroup_id(&path)?;
    Ok(path)
}

/// Create a cgroup (and its parents) if needed.
pub fn ensure(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(path).map_err(|source| CgroupError::Create { path: path.into(), source })
}

/// Move a process (all its threads) into the cgroup at `path`. PID 0 is the
/// calling process.
pub fn move_pid(path: &Path, pid: u32) -> Result<(), CgroupError> {
    fs::write(path.join("cgroup.procs"), pid.to_string()).map_err(|source| CgroupError::Move {
        pid,
        path: path.into(),
        source,
    })
}

/// Remove an empty cgroup; a cgroup that still has processes stays.
pub fn remove_if_empty(path: &Path) -> bool {
    fs::remove_dir(path).is_ok()
}

/// The file handle type of kernfs (cgroup2) inodes.
const FILEID_KERNFS: libc::c_int = 0xfe;

#[repr(C)]
struct CgroupHandle {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    id: u64,
}

/// The directory of the cgroup with this id (the kernel turns the id into
/// the directory: open_by_handle_at on the cgroup2 mount, as bpftool does).
pub fn path_of_id(mount: &Path, cgroup_id: u64) -> Option<PathBuf> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mount = std::fs::File::open(mount).ok()?;
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
            &raw mut handle,
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

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const UNIFIED: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn finds_the_unified_mount_in_the_hybrid_layout() {
        assert_eq!(find_cgroup2_mount_in(HYBRID), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn finds_the_cgroup2_mount_when_it_is_alone() {
        assert_eq!(find_cgroup2_mount_in(UNIFIED), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn no_cgroup2_line_means_not_mounted() {
        let v1_only = "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        assert_eq!(find_cgroup2_mount_in(v1_only), None);
    }

    #[test]
    fn escaped_mount_points_are_unescaped() {
        let line = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2_mount_in(line), Some(PathBuf::from("/mnt/my cgroups")));
    }

    #[test]
    fn reads_the_v2_line_of_proc_cgroup() {
        let text = "9:name=systemd:/\n4:memory:/a/b\n0::/redirector-workloads/app\n";
        assert_eq!(v2_relative_path(text), Some("/redirector-workloads/app"));
        assert_eq!(v2_relative_path("4:memory:/a\n"), None);
    }

    #[test]
    fn paths_outside_the_mount_are_refused() {
        let err = resolve(Path::new("/sys/fs/cgroup/unified"), Path::new("/tmp")).unwrap_err();
        assert!(matches!(err, CgroupError::Outside(..)));
    }
}
