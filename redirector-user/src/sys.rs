//! The operating system underneath: cgroup v2 files, network namespaces,
//! and facts about the machine (kernel, BTF, capabilities). Mechanism only:
//! nothing here knows about the mesh or the proxy.

pub mod cgroup;
pub mod handover;
pub mod machine;
pub mod netns;
pub mod process;
