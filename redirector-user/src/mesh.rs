//! Mesh configuration: Istio's and Kubernetes' objects from a directory of
//! YAML, compiled into routes the proxy applies per connection and per
//! request, reloaded live.

#![forbid(unsafe_code)]

// Sources, then what they feed: resources -> pods, model, security.
pub mod source_dir;
pub mod kubernetes;
pub mod resources;
pub mod pods;
pub mod model;
pub mod security;
pub mod export;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tracing::{error, info, warn};

pub use model::{Mesh, Scope};
pub use source_dir::{Documents, Problem};

/// The agent's load of a directory (at start and on each change), for an
/// agent of `scope`: YAML that does not parse
/// keeps the last good config (a file being edited must not take its
/// pods out of the mesh); a semantic error in an object rejects that
/// object only ([`Mesh::compile_tolerant`]).
pub fn reload(dir: &Path, scope: &Scope, previous: Option<&Documents>) -> Result<(Mesh, Documents), Vec<Problem>> {
    let docs = source_dir::load_dir(dir)?;
    Ok(Mesh::compile_tolerant(&docs, previous, scope))
}

/// Log the objects a tolerant compile left out (or compiled failing
/// closed), each once per change.
pub fn log_rejected(mesh: &Mesh) {
    for p in &mesh.rejected {
        error!(problem = %p, "object rejected; the rest of the config applies");
    }
}

/// The mesh in force, swapped whole on a good change. Readers take an
/// `Arc` per connection or request, so a change never disturbs traffic in
/// flight.
#[derive(Clone)]
pub struct MeshHandle {
    current: Arc<RwLock<Arc<Mesh>>>,
    /// Bumped on every applied change.
    version: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for MeshHandle {
    fn default() -> Self {
        MeshHandle::new(Mesh::default())
    }
}

impl MeshHandle {
    pub fn new(mesh: Mesh) -> MeshHandle {
        MeshHandle {
            current: Arc::new(RwLock::new(Arc::new(mesh))),
            version: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        }
    }

    pub fn current(&self) -> Arc<Mesh> {
        self.current.read().expect("mesh lock").clone()
    }

    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn replace(&self, mesh: Mesh) {
        *self.current.write().expect("mesh lock") = Arc::new(mesh);
        self.version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What identifies a directory's content cheaply: each YAML file's name,
/// size and modification time.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let p = e.path();
                    let yaml = p.extension().is_some_and(|x| x == "yaml" || x == "yml");
                    let m = e.metadata().ok()?;
                    (yaml && m.is_file()).then(|| (p, m.len(), m.modified().ok()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn log_warnings(mesh: &Mesh) {
    for w in &mesh.warnings {
        warn!(problem = %w, "mesh config");
    }
}

/// The directory as the mesh in force was read from it: a watch started
/// later (after a takeover's wait, say) applies every change made since
/// the read, not only those after the watch began.
pub struct Since {
    last: Vec<(PathBuf, u64, Option<SystemTime>)>,
    accepted: Option<Arc<Documents>>,
}

/// Read `dir` for the mesh to start with, and what a [`watch`] continues
/// from (the fingerprint taken first: a change while reading is seen
/// again, never missed).
pub fn read_dir(dir: &Path) -> (Result<Documents, Vec<source_dir::Problem>>, Since) {
    let last = fingerprint(dir);
    let docs = source_dir::load_dir(dir);
    let accepted = docs.as_ref().ok().map(|d| Arc::new(d.clone()));
    (docs, Since { last, accepted })
}

/// Watch `dir` from `since` and apply each good change; a bad one is
/// logged with its file, document, field and reason, and the last good
/// mesh stays.
pub fn watch(
    dir: PathBuf,
    scope: Scope,
    handle: MeshHandle,
    since: Since,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Since { mut last, mut accepted } = since;
        // `accepted`: what the mesh in force was compiled from; a rejected
        // change to an object falls back to its version there.
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let now = fingerprint(&dir);
            if now == last {
                continue;
            }
            // Let a writer finish the file it is writing.
            tokio::time::sleep(Duration::from_millis(100)).await;
            last = fingerprint(&dir);
            let (d, ns, prev) = (dir.clone(), scope.clone(), accepted.clone());
            match tokio::task::spawn_blocking(move || reload(&d, &ns, prev.as_deref())).await {
                Ok(Ok((mesh, docs))) => {
                    accepted = Some(Arc::new(docs));
                    log_warnings(&mesh);
                    log_rejected(&mesh);
                    let services = mesh.services.len();
                    handle.replace(mesh);
                    info!(dir = %dir.display(), version = handle.version(), services, "mesh config applied");
                }
                Ok(Err(problems)) => {
                    for p in &problems {
                        error!(problem = %p, "mesh config rejected; the last good config stays in force");
                    }
                }
                Err(e) => error!(error = %e, "mesh config reload failed"),
            }
        }
    })
}
