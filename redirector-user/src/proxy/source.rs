//! Who a captured connection comes from: the source workload's name and
//! namespace, from the cgroup the kernel programs recorded (eBPF capture)
//! or from the mesh's address book. It does not decide where the
//! connection goes.

#![forbid(unsafe_code)]

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

impl Workloads {
    pub fn new(mount: std::path::PathBuf) -> Workloads {
        Workloads { mount, names: Mutex::new(std::collections::HashMap::new()) }
    }

    pub fn name(&self, cgroup_id: u64) -> Option<String> {
        if let Some(n) = self.names.lock().expect("workloads lock").get(&cgroup_id) {
            return Some(n.clone());
        }
        let name = crate::sys::cgroup::path_of_id(&self.mount, cgroup_id)?.file_name()?.to_string_lossy().into_owned();
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
