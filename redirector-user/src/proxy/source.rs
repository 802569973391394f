//! Who a captured connection comes from: the source workload's name and
//! namespace, from the cgroup the kernel programs recorded (eBPF capture)
//! or from the mesh's address book. It does not decide where the
//! connection goes.

use std::net::SocketAddr;
use std::sync::Mutex;

use tokio::net::TcpStream;

use crate::capture::orig_dst::source_cgroup;

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
        Workloads { mount, names: Mutex::new(std::collections::HashMap::new()) }
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
