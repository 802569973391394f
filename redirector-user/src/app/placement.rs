//! Where the agent's process sits in the cgroup tree: its own cgroup
//! inside the capture subtree, so its accepted sockets are seen by sockops
//! and getsockopt and its own connects are recognised by the cgroup's id,
//! and under the cgroup it was started in, so its pod's limits bind it.
//! A start that fails before capture is installed moves the agent back
//! (the guard's drop), so nothing is left behind.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use tracing::warn;

use crate::config::AgentConfig;
use crate::state::PROXY_CGROUP;
use crate::sys::cgroup;

/// The agent moved into its proxy cgroup; moved back on drop unless
/// [`Placement::keep`] was called.
pub(super) struct Placement {
    pub(super) mount: PathBuf,
    /// The capture subtree (the whole cgroup2 mount by default).
    pub(super) root: PathBuf,
    pub(super) proxy_cgroup: PathBuf,
    pub(super) proxy_cgroup_id: u64,
    previous: PathBuf,
    created: bool,
    kept: bool,
}

impl Placement {
    pub(super) fn enter(cfg: &AgentConfig) -> Result<Placement> {
        let mount = cgroup::cgroup2_mount()?;
        let root = match &cfg.cgroup_root {
            Some(p) => cgroup::resolve(&mount, p).map_err(|e| anyhow!("capture.cgroupRoot: {e}"))?,
            None => mount.clone(),
        };
        let previous = cgroup::cgroup_of_pid(&mount, std::process::id())?;
        let proxy_cgroup = proxy_cgroup_for(&previous, &root);
        if !proxy_cgroup.starts_with(&previous) && !root.starts_with(&previous) {
            warn!(
                agent_cgroup = %previous.display(), proxy_cgroup = %proxy_cgroup.display(),
                "the agent's cgroup is outside capture.cgroupRoot: its memory and CPU limits do not bind the proxy's cgroup"
            );
        }
        let created = !proxy_cgroup.exists();
        cgroup::ensure(&proxy_cgroup)?;
        cgroup::move_pid(&proxy_cgroup, 0)?;
        // From here a failure drops the guard, which moves the agent back.
        let mut placement = Placement { mount, root, proxy_cgroup, proxy_cgroup_id: 0, previous, created, kept: false };
        placement.proxy_cgroup_id = cgroup::cgroup_id(&placement.proxy_cgroup)?;
        Ok(placement)
    }

    /// The capture is installed: the agent stays where it is.
    pub(super) fn keep(&mut self) {
        self.kept = true;
    }

    pub(super) fn capture_at(&self) -> crate::capture::Placement<'_> {
        crate::capture::Placement {
            mount: &self.mount,
            root: &self.root,
            proxy_cgroup: &self.proxy_cgroup,
            proxy_cgroup_id: self.proxy_cgroup_id,
        }
    }

    pub(super) fn mount(&self) -> &Path {
        &self.mount
    }
}

/// The proxy's cgroup: a child of the agent's own cgroup (`previous`, its
/// pod's container in a cluster) when that lies in the capture subtree, so
/// the limits its pod sets keep binding it (the hierarchy charges a child
/// to its parents); otherwise (an agent started from outside the subtree,
/// as on a dev box with a narrow `cgroupRoot`) a child of the capture root.
/// It must lie in the capture subtree: sockops and getsockopt see the
/// proxy's accepted sockets there.
fn proxy_cgroup_for(previous: &Path, root: &Path) -> PathBuf {
    if previous.ends_with(PROXY_CGROUP) && previous.starts_with(root) {
        // Started from inside a proxy cgroup (a re-exec): stay.
        return previous.to_path_buf();
    }
    if previous.starts_with(root) {
        previous.join(PROXY_CGROUP)
    } else {
        root.join(PROXY_CGROUP)
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let _ = cgroup::move_pid(&self.previous, 0);
        if self.created {
            cgroup::remove_if_empty(&self.proxy_cgroup);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a cluster the agent's container cgroup lies in the capture
    /// subtree: the proxy's cgroup is its child, bound by the pod's limits.
    /// An agent started outside a narrow capture root gets the root's.
    #[test]
    fn the_proxy_cgroup_stays_under_the_agents_own_when_it_can() {
        let mount = Path::new("/sys/fs/cgroup");
        let container =
            mount.join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podu.slice/cri-containerd-c.scope");
        assert_eq!(proxy_cgroup_for(&container, mount), container.join(PROXY_CGROUP));
        assert_eq!(proxy_cgroup_for(mount, mount), mount.join(PROXY_CGROUP));
        let narrow = mount.join("test/capture");
        assert_eq!(proxy_cgroup_for(mount, &narrow), narrow.join(PROXY_CGROUP));
        assert_eq!(proxy_cgroup_for(&narrow.join(PROXY_CGROUP), &narrow), narrow.join(PROXY_CGROUP));
    }
}
