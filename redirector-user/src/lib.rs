//! The redirector node agent: eBPF capture (loader, pinned maps), the
//! transparent node proxy, the admin endpoint and the CLI commands.
//!
//! Data path, top to bottom: [`ebpf`] (capture in the kernel) → [`proxy`]
//! (accept, original destination, upstream connect, copy).

pub mod admin;
pub mod agent;
pub mod cgroup;
pub mod clustercmd;
pub mod commands;
pub mod config;
pub mod ebpf;
pub mod features;
pub mod identity;
pub mod inpod;
pub mod iptables;
pub mod kubernetes;
pub mod logtime;
pub mod manifest;
pub mod mesh;
pub mod podcgroup;
pub mod proxy;
pub mod state;
pub mod system;
pub mod tls;
