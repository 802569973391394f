//! Where the agent's process sits in the cgroup tree: its own cgroup
//! inside the capture subtree, so its accepted sockets are seen by sockops
//! and getsockopt and its own connects are recognised by the cgroup's id.
//! A start that fails before capture is installed moves the agent back
//! (the guard's drop), so nothing is left behind.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};

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
        let proxy_cgroup = root.join(PROXY_CGROUP);
        let created = !proxy_cgroup.exists();
        cgroup::ensure(&proxy_cgroup)?;
        let previous = cgroup::cgroup_of_pid(&mount, std::process::id())?;
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
