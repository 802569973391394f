//! The agent's runtime record (`<state dir>/agent.json`): where its capture
//! is pinned and attached and how to reach its admin endpoint, so `status`,
//! `exec`, `enroll` and `uninstall` find a running (or crashed) agent.

#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const DEFAULT_STATE_DIR: &str = "/run/redirector";
pub const ENV_STATE_DIR: &str = "REDIRECTOR_STATE_DIR";
const FILE: &str = "agent.json";

/// The cgroup the agent moves itself into, under the capture subtree.
pub const PROXY_CGROUP: &str = "redirector-proxy";
/// Where `redirector exec` puts workloads, under the capture subtree.
pub const WORKLOADS_CGROUP: &str = "redirector-workloads";

#[derive(Debug, Error)]
pub enum StateError {
    #[error("no agent state in {0}: the agent has not run here; start it with `redirector run` (or `cargo xtask run`), or pass --state-dir")]
    Missing(PathBuf),
    #[error("cannot read agent state {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("cannot write agent state {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    pub pid: u32,
    pub mode: crate::config::CaptureMode,
    /// Why this mode (requested, or what `auto` found).
    #[serde(default)]
    pub mode_reason: String,
    pub cgroup_root: PathBuf,
    pub proxy_cgroup: PathBuf,
    pub bpffs_dir: PathBuf,
    pub admin: SocketAddr,
    pub outbound_port: u16,
    pub version: String,
    /// eBPF mode: original destinations in per-socket storage (false: the
    /// keyed-map tier, which has no shortcut).
    #[serde(default = "yes")]
    pub socket_storage: bool,
}

fn yes() -> bool {
    true
}

impl AgentState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE)
    }

    pub fn load(dir: &Path) -> Result<AgentState, StateError> {
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StateError::Missing(dir.into())),
            Err(e) => return Err(StateError::Read { path, message: e.to_string() }),
        };
        serde_json::from_str(&text).map_err(|e| StateError::Read { path, message: e.to_string() })
    }

    pub fn store(&self, dir: &Path) -> Result<(), StateError> {
        let path = Self::path(dir);
        let werr = |source| StateError::Write { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(werr)?;
        let tmp = dir.join(format!("{FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("serializable")).map_err(werr)?;
        std::fs::rename(&tmp, &path).map_err(werr)
    }

    /// Whether the process that wrote this record is alive, and still an
    /// agent: a pid reused by another process after a crash is not ours to
    /// signal.
    pub fn agent_running(&self) -> bool {
        pid_alive(self.pid)
            && std::fs::read_to_string(format!("/proc/{}/comm", self.pid))
                .is_ok_and(|c| c.trim_end().starts_with("redirector"))
    }
}

/// Whether a process with this pid exists.
pub fn pid_alive(pid: u32) -> bool {
    crate::sys::process::pid_alive(pid)
}
