//! The redirector node agent: capture in the kernel, the node proxy, and
//! the control plane that tells it what to do.
//!
//! # Layout
//!
//! The data path, in the order a connection meets it (each module imports
//! only modules further down this list, and the control plane):
//!
//! 1. [`capture`]: the kernel programs' loader ([`capture::ebpf`]) or the
//!    nat rules ([`capture::iptables`]) behind one `Capture` trait, and
//!    [`capture::orig_dst`], the original destination both modes answer.
//! 2. [`proxy`]: the listeners and their accept loop; [`proxy::outbound`]
//!    (15001), [`proxy::inbound`] (a pod's 15006 and 15008),
//!    [`proxy::gateway`], [`proxy::dns`]; [`proxy::source`] names the
//!    client.
//! 3. [`route`]: the L4 decision, [`route::sniff`], and [`route::http`]
//!    (per-request selection, filters and the forwarding loop).
//! 4. [`endpoint`]: the balancer: endpoint choice, outlier ejection and
//!    connection-pool limits, state that outlives a config reload.
//! 5. [`transport`]: the one place that chooses plain TCP or HBONE, for
//!    every caller; [`transport::socket`], [`transport::hbone`],
//!    [`transport::h2stream`], [`transport::http_client`].
//! 6. [`copy`]: bytes both ways, idle timeout, byte counts.
//! 7. [`telemetry`]: Istio's metrics and the access-log clock.
//!
//! The control plane, which never imports the data path: [`config`] (the
//! agent's settings), [`net`], [`mesh`] (sources: [`mesh::source_dir`],
//! [`mesh::kubernetes`]; [`mesh::resources`] → [`mesh::model`] and
//! [`mesh::security`]), [`identity`] and [`tls`]; and [`ca`], the mesh's
//! CA service (`redirector ca serve`, a Deployment of its own: the only
//! holder of the signing key).
//!
//! The node around them: [`inpod`] (the pods this node serves), [`sys`]
//! (cgroups, namespaces, machine facts: the system calls), [`state`],
//! [`admin`] (15000/15020/15021), [`app`] (the composition root that
//! starts all of it) and [`cmd`] (the CLI commands). `ARCHITECTURE.md`
//! follows one connection through these files.

// Modules only the agent itself uses are `pub(crate)`, so the compiler
// reports what nothing calls; the rest serve the binary and the tests.

// The data path.
pub mod capture;
pub(crate) mod proxy;
pub(crate) mod route;
pub(crate) mod endpoint;
pub(crate) mod transport;
pub(crate) mod copy;
pub mod telemetry;

// The control plane.
pub mod config;
pub(crate) mod net;
pub mod mesh;
pub mod identity;
pub(crate) mod tls;
pub mod ca;

// The node.
pub(crate) mod inpod;
pub mod sys;
pub mod state;
pub mod admin;
pub mod app;
pub mod cmd;
