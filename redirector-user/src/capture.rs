//! Capture: how an enrolled workload's connections reach the proxy. Two
//! implementations, one contract: eBPF programs on the workload's cgroup
//! ([`ebpf`]) or Istio's nat REDIRECT rules ([`iptables`]); either way the
//! proxy asks [`orig_dst`] where the client was going and never learns
//! which mode runs. [`features`] probes what the kernel can load.
//!
//! It does not decide where a connection goes once captured.

pub mod ebpf;
pub mod features;
pub mod iptables;
pub mod orig_dst;
