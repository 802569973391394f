//! Finding a Kubernetes pod's cgroups from its UID, for the node agent to
//! enroll the pod (issue 6). Both cgroup drivers and both common runtimes:
//!
//! | driver | runtime | pod / container cgroup |
//! |---|---|---|
//! | systemd | containerd | `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope` |
//! | systemd | CRI-O | `…/kubepods-<qos>-pod<uid_>.slice/crio-<id>.scope` (and `crio-conmon-<id>.scope`, not a container) |
//! | cgroupfs | containerd | `kubepods/<qos>/pod<uid>/<id>` |
//! | cgroupfs | CRI-O | `kubepods/<qos>/pod<uid>/crio-<id>` |
//!
//! Guaranteed pods have no QoS level (`kubepods-pod<uid_>.slice`,
//! `kubepods/pod<uid>`); with the systemd driver the UID's dashes are
//! underscores. The kubepods tree may sit below another slice (kind, a
//! kubelet in a container), so it is searched for, a few levels deep.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    /// A bare container ID (containerd with the cgroupfs driver).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub runtime: Runtime,
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroups {
    pub driver: Driver,
    pub pod: PathBuf,
    /// The containers' cgroups (where a pod's processes run; the kernel
    /// programs see these ids).
    pub containers: Vec<Container>,
}

fn is_cgroup(p: &Path) -> bool {
    p.join("cgroup.procs").exists()
}

/// The runtime and container ID a container cgroup's name carries; `None`
/// for cgroups that hold no container (CRI-O's conmon, systemd helpers).
pub fn container_of(name: &str) -> Option<(Runtime, String)> {
    let hex = |s: &str| s.len() >= 12 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let (runtime, rest) = if let Some(r) = name.strip_prefix("cri-containerd-") {
        (Runtime::Containerd, r)
    } else if let Some(r) = name.strip_prefix("crio-") {
        (Runtime::CriO, r)
    } else if let Some(r) = name.strip_prefix("docker-") {
        (Runtime::Docker, r)
    } else {
        (Runtime::Unknown, name)
    };
    let id = rest.strip_suffix(".scope").unwrap_or(rest);
    hex(id).then(|| (runtime, id.to_string()))
}

/// Whether a directory name is the pod cgroup of `uid`, and under which
/// driver.
fn pod_dir(name: &str, uid: &str) -> Option<Driver> {
    let underscored = uid.replace('-', "_");
    if name == format!("pod{uid}") {
        Some(Driver::Cgroupfs)
    } else if name.contains("kubepods") && name.ends_with(&format!("-pod{underscored}.slice")) {
        Some(Driver::Systemd)
    } else {
        None
    }
}

/// Find the pod with this UID under the cgroup2 `root` (breadth first, at
/// most `depth` levels: kubepods, QoS, pod, plus room for a parent slice).
pub fn find_pod(root: &Path, uid: &str) -> Option<PodCgroups> {
    const DEPTH: usize = 5;
    let mut level = vec![root.to_path_buf()];
    for _ in 0..DEPTH {
        let mut next = Vec::new();
        for dir in level {
            let Ok(rd) = std::fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                if !p.is_dir() || !is_cgroup(&p) {
                    continue;
                }
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(driver) = pod_dir(&name, uid) {
                    return Some(PodCgroups { driver, containers: containers(&p), pod: p });
                }
                // Only descend where pods can be.
                if name.contains("kubepods") || name.ends_with(".slice") || name == "burstable" || name == "besteffort"
                {
                    next.push(p);
                }
            }
        }
        level = next;
    }
    None
}

fn containers(pod: &Path) -> Vec<Container> {
    let mut v: Vec<Container> = std::fs::read_dir(pod)
        .map(|rd| {
            rd.flatten()
                .filter(|e| is_cgroup(&e.path()))
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    container_of(&name).map(|(runtime, id)| Container { id, runtime, path: e.path() })
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "7f2a4c1e-3b5d-4e6f-8a9b-0c1d2e3f4a5b";
    const C1: &str = "4f1d2c3b4a5968778695a4b3c2d1e0f4f1d2c3b4a5968778695a4b3c2d1e0f0";
    const C2: &str = "9a8b7c6d5e4f30211203f4e5d6c7b8a99a8b7c6d5e4f30211203f4e5d6c7b8a9";

    /// A synthetic cgroup tree: every listed directory with a cgroup.procs.
    fn tree(name: &str, dirs: &[String]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("redirector-podcg-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in dirs {
            // Every level of a real cgroup tree is a cgroup.
            let mut p = root.clone();
            for part in Path::new(d).components() {
                p = p.join(part);
                std::fs::create_dir_all(&p).unwrap();
                std::fs::write(p.join("cgroup.procs"), "").unwrap();
            }
        }
        root
    }

    fn check(name: &str, pod: &str, containers: &[(&str, Runtime)], extra: &[&str], driver: Driver) {
        let mut dirs = vec![pod.to_string()];
        for (c, _) in containers {
            dirs.push(format!("{pod}/{c}"));
        }
        dirs.extend(extra.iter().map(std::string::ToString::to_string));
        let root = tree(name, &dirs);
        let found = find_pod(&root, UID).unwrap_or_else(|| panic!("{name}: pod not found"));
        assert_eq!(found.driver, driver, "{name}");
        assert_eq!(found.pod, root.join(pod), "{name}");
        let mut want: Vec<(String, Runtime)> =
            containers.iter().filter_map(|(c, r)| container_of(c).map(|(_, id)| (id, *r))).collect();
        want.sort();
        let got: Vec<(String, Runtime)> = found.containers.iter().map(|c| (c.id.clone(), c.runtime)).collect();
        assert_eq!(got, want, "{name}");
        assert!(find_pod(&root, "00000000-0000-0000-0000-000000000000").is_none());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn systemd_driver_with_containerd_in_each_qos_class() {
        let u = UID.replace('-', "_");
        let c1 = format!("cri-containerd-{C1}.scope");
        let c2 = format!("cri-containerd-{C2}.scope");
        let cs = [(c1.as_str(), Runtime::Containerd), (c2.as_str(), Runtime::Containerd)];
        check(
            "sd-ctr-burstable",
            &format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
            &cs,
            &["kubepods.slice/kubepods-besteffort.slice"],
            Driver::Systemd,
        );
        check(
            "sd-ctr-besteffort",
            &format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"),
            &cs,
            &[],
            Driver::Systemd,
        );
        check("sd-ctr-guaranteed", &format!("kubepods.slice/kubepods-pod{u}.slice"), &cs, &[], Driver::Systemd);
        // kind: the kubepods tree under the node container's slice.
        check("sd-ctr-kind", &format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{u}.slice"), &cs[..1], &[], Driver::Systemd);
    }

    #[test]
    fn systemd_driver_with_crio_skips_conmon() {
        let u = UID.replace('-', "_");
        let c1 = format!("crio-{C1}.scope");
        let conmon = format!("crio-conmon-{C1}.scope");
        check(
            "sd-crio",
            &format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
            &[(c1.as_str(), Runtime::CriO), (conmon.as_str(), Runtime::CriO)],
            &[],
            Driver::Systemd,
        );
    }

    #[test]
    fn cgroupfs_driver_with_containerd_and_crio() {
        check(
            "fs-ctr",
            &format!("kubepods/burstable/pod{UID}"),
            &[(C1, Runtime::Unknown), (C2, Runtime::Unknown)],
            &["kubepods/besteffort"],
            Driver::Cgroupfs,
        );
        check("fs-ctr-guaranteed", &format!("kubepods/pod{UID}"), &[(C1, Runtime::Unknown)], &[], Driver::Cgroupfs);
        let c1 = format!("crio-{C1}");
        check(
            "fs-crio",
            &format!("kubepods/besteffort/pod{UID}"),
            &[(c1.as_str(), Runtime::CriO)],
            &[],
            Driver::Cgroupfs,
        );
    }

    #[test]
    fn container_names_carry_runtime_and_id() {
        assert_eq!(container_of(&format!("docker-{C1}.scope")), Some((Runtime::Docker, C1.to_string())));
        assert_eq!(container_of("init.scope"), None);
        assert_eq!(container_of("system.slice"), None);
    }
}
