//! Facts about the machine the agent runs on: kernel version, BTF,
//! capabilities. Each check names the fix when it fails.

#![forbid(unsafe_code)]

use std::path::Path;

use serde::Serialize;

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_BPF: u32 = 39;

/// Effective capabilities from a /proc/PID/status text.
pub fn effective_caps(status: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The capabilities the agent needs that this process lacks, by name.
pub fn missing_capabilities() -> Vec<&'static str> {
    let caps = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| effective_caps(&s)).unwrap_or(0);
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN also grants what CAP_BPF does on kernels before 5.8.
    for (bit, name) in [(CAP_BPF, "CAP_BPF"), (CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")] {
        if caps & (1u64 << bit) == 0 {
            missing.push(name);
        }
    }
    missing
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(|_| "unknown".into(), |s| s.trim().to_string())
}

pub fn has_btf() -> bool {
    Path::new("/sys/kernel/btf/vmlinux").exists()
}

/// One row of `redirector verify`.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Check {
        Check { name: name.into(), ok, detail: detail.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_effective_capabilities() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let caps = effective_caps(s).unwrap();
        assert!(caps & (1 << CAP_BPF) != 0);
        assert!(caps & (1 << CAP_SYS_ADMIN) != 0);
        assert_eq!(effective_caps("CapEff:\t0000000000000000\n"), Some(0));
        assert_eq!(effective_caps("Name: x\n"), None);
    }
}
