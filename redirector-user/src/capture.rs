//! Capture: how an enrolled workload's connections reach the proxy. Two
//! implementations of one contract, [`Capture`]: eBPF programs on the
//! workload's cgroup ([`ebpf`]) or Istio's nat REDIRECT rules
//! ([`iptables`]). The agent chooses one at start ([`select`], asking the
//! kernel feature by feature through [`features`]) and never branches on
//! the mode again; the CLI works on the installed one through
//! [`Installed`]. Either way the proxy asks [`orig_dst`] where the client
//! was going and never learns which mode runs.
//!
//! It does not decide where a connection goes once captured.

pub mod features;
pub mod ebpf;
pub mod iptables;
pub mod orig_dst;
pub mod status;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use crate::config::{AgentConfig, CaptureMode, Storage};
use crate::sys::{cgroup, machine};
use crate::transport::socket::WorkloadNet;
use ebpf::{EbpfCapture, PinnedMaps, PodSteering};
use features::{Feature, Tier};
use iptables::IptablesCapture;

/// A step that undoes what a capture call did (a pod that fails half-way
/// or leaves).
pub type Undo = Box<dyn FnOnce() + Send + Sync>;

/// A pod's proxy listeners, as inbound steering needs them.
pub struct PodListeners<'a> {
    pub inbound: &'a tokio::net::TcpListener,
    /// The IPv6 plaintext listener, where the pod's namespace has IPv6.
    pub inbound6: Option<&'a tokio::net::TcpListener>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub hbone_port: u16,
}

/// What the agent asks of the capture it installed.
pub trait Capture: Send + Sync {
    fn mode(&self) -> CaptureMode;

    /// Whether an earlier agent's capture was found and adopted.
    fn adopted(&self) -> bool {
        false
    }

    /// Refuse the connects of a pod that is enrolled but whose proxy is not
    /// ready. `None`: this capture cannot refuse per cgroup, and the pod
    /// must be held (frozen) instead.
    fn refuse_until_ready(&self, cgroups: &[PathBuf]) -> Result<Option<Undo>>;

    /// Steer the pod's inbound connections to its plaintext listener, so
    /// STRICT holds for clients that never went near our hooks.
    fn steer_inbound(&self, pod: &WorkloadNet, listeners: &PodListeners<'_>) -> Result<Undo>;

    /// Capture the pod's outbound connections: the last step of serving
    /// it, replacing a refusal.
    fn enroll(&self, cgroups: &[PathBuf]) -> Result<Undo>;

    /// Lift the refusals a previous agent left on pods that were pending.
    fn clear_leftover_refusals(&self);

    /// The agent stops: eBPF capture stays pinned for the next agent (this
    /// says so); iptables rules, which would send workloads to a closed
    /// port, go when the capture is dropped.
    fn finish(&self);

    /// The agent handed over to the next, which serves with this capture
    /// as it is: nothing is removed when this one is dropped.
    fn hand_over(&self) {}
}

/// The capture mode chosen, and what the kernel was found to have.
pub struct Selection {
    pub mode: CaptureMode,
    /// eBPF: original destinations in per-socket storage (else keyed maps).
    pub socket_storage: bool,
    pub reason: String,
    pub probed: Vec<Feature>,
    /// Another program (Cilium's socket LB) uses the connect hooks.
    pub cilium: bool,
}

/// Where the agent stands in the cgroup tree, for installing capture.
pub struct Placement<'a> {
    pub mount: &'a Path,
    pub root: &'a Path,
    pub proxy_cgroup: &'a Path,
    pub proxy_cgroup_id: u64,
}

/// Install the selected capture. `taking_over`: an agent with the same
/// settings runs it now and hands over, so rules in place are kept as they
/// are (rewriting them would open a gap).
pub fn install(cfg: &AgentConfig, sel: &Selection, at: &Placement<'_>, taking_over: bool) -> Result<Box<dyn Capture>> {
    let installed: Box<dyn Capture> = if sel.mode == CaptureMode::Iptables {
        let rel = iptables::relative(at.mount, at.proxy_cgroup)?;
        let rules = if taking_over { IptablesCapture::adopt(cfg, rel)? } else { IptablesCapture::install(cfg, rel)? };
        Box::new(Iptables { rules, cfg: cfg.clone(), taking_over })
    } else {
        let capture = EbpfCapture::install(cfg, at.root, at.proxy_cgroup_id, sel.socket_storage)?;
        Box::new(Ebpf { steering: capture.steering.clone(), capture, cfg: cfg.clone(), taking_over })
    };
    info!(mode = sel.mode.name(), reason = %sel.reason, "capture mode chosen");
    if sel.cilium {
        warn!(advice = features::CILIUM_ADVICE, "another program uses the connect hooks");
    }
    if installed.adopted() {
        info!("adopted the capture a previous agent left pinned");
    }
    Ok(installed)
}

/// The cgroup ids of `cgroups`.
fn ids(cgroups: &[PathBuf]) -> Result<Vec<u64>> {
    Ok(cgroups.iter().map(|c| cgroup::cgroup_id(c)).collect::<Result<Vec<u64>, _>>()?)
}

/// Apply `set` to every cgroup's id in the pinned maps under `dir`, all or
/// nothing: a failure half-way runs `unset` on every id and returns the
/// error; success returns the undo that runs `unset`.
fn each_cgroup(
    dir: &Path,
    cgroups: &[PathBuf],
    set: impl Fn(&PinnedMaps, u64) -> Result<(), ebpf::EbpfError>,
    unset: fn(&PinnedMaps, u64),
) -> Result<Undo> {
    let maps = PinnedMaps::open(dir)?;
    let ids = ids(cgroups)?;
    let all = ids.iter().try_for_each(|id| set(&maps, *id));
    let dir = dir.to_path_buf();
    let undo = move || {
        if let Ok(maps) = PinnedMaps::open(&dir) {
            for id in &ids {
                unset(&maps, *id);
            }
        }
    };
    if let Err(e) = all {
        undo();
        return Err(e.into());
    }
    Ok(Box::new(undo))
}

/// eBPF capture: the cgroup programs, the pinned maps, sk_lookup steering.
struct Ebpf {
    capture: EbpfCapture,
    /// Inbound steering in pods' namespaces; `None` on kernels without
    /// sk_lookup, where pods get a nat PREROUTING rule.
    steering: Option<Arc<PodSteering>>,
    cfg: AgentConfig,
    /// Pods' nat rules an agent handing over left are kept.
    taking_over: bool,
}

impl Capture for Ebpf {
    fn mode(&self) -> CaptureMode {
        CaptureMode::Ebpf
    }

    fn adopted(&self) -> bool {
        self.capture.adopted
    }

    fn refuse_until_ready(&self, cgroups: &[PathBuf]) -> Result<Option<Undo>> {
        // All or nothing: a refusal that fails half-way is taken back.
        let undo = each_cgroup(
            &self.cfg.bpffs_dir,
            cgroups,
            |m, id| m.enroll_with(id, redirector_common::ENROLL_PENDING),
            |m, id| {
                let _ = m.unenroll_if_pending(id);
            },
        )?;
        Ok(Some(undo))
    }

    fn steer_inbound(&self, pod: &WorkloadNet, listeners: &PodListeners<'_>) -> Result<Undo> {
        let ns = Arc::clone(pod.netns.as_ref().context("an in-pod workload has a namespace")?);
        // sk_lookup, both families, on kernels that have it; otherwise the
        // nat rules (iptables and ip6tables), as ztunnel's in-pod mode does.
        let Some(steering) = self.steering.as_ref().filter(|_| !pod.ips.is_empty()) else {
            return nat_steering(ns, &self.cfg, false, self.taking_over);
        };
        // Rules an iptables-mode agent left in this namespace go first.
        let _ = iptables::remove_in_pod(&ns);
        let ports = redirector_common::PodInbound {
            hbone_port: listeners.hbone_port.into(),
            inbound_port: listeners.inbound_port.into(),
            outbound_port: listeners.outbound_port.into(),
            _pad: 0,
        };
        steering
            .steer(
                ns.as_fd(),
                ns.inode,
                &pod.ips,
                listeners.inbound.as_fd(),
                listeners.inbound6.map(AsFd::as_fd),
                ports,
            )
            .context("steering the pod's inbound connections (sk_lookup)")?;
        let (steering, inode, ips) = (Arc::clone(steering), ns.inode, pod.ips.clone());
        Ok(Box::new(move || steering.unsteer(inode, &ips)))
    }

    fn enroll(&self, cgroups: &[PathBuf]) -> Result<Undo> {
        each_cgroup(&self.cfg.bpffs_dir, cgroups, PinnedMaps::enroll, |m, id| {
            let _ = m.unenroll(id);
        })
    }

    fn clear_leftover_refusals(&self) {
        if let Ok(maps) = PinnedMaps::open(&self.cfg.bpffs_dir) {
            if let Ok(n) = maps.clear_pending() {
                if n > 0 {
                    info!(cgroups = n, "lifted the refusals a previous agent left on pending pods");
                }
            }
        }
    }

    fn finish(&self) {
        info!(pins = %self.capture.pin_dir.display(), "eBPF capture stays installed for the next agent; `redirector uninstall` removes it");
    }
}

/// iptables capture: Istio's nat rules in our own chains.
struct Iptables {
    /// Removed when dropped, unless handed over.
    rules: IptablesCapture,
    cfg: AgentConfig,
    taking_over: bool,
}

impl Capture for Iptables {
    fn mode(&self) -> CaptureMode {
        CaptureMode::Iptables
    }

    fn refuse_until_ready(&self, _: &[PathBuf]) -> Result<Option<Undo>> {
        // No per-cgroup refusal in nat rules: a pending pod is held.
        Ok(None)
    }

    fn steer_inbound(&self, pod: &WorkloadNet, _: &PodListeners<'_>) -> Result<Undo> {
        let ns = Arc::clone(pod.netns.as_ref().context("an in-pod workload has a namespace")?);
        // The pod's rules capture its outbound connections too.
        nat_steering(ns, &self.cfg, true, self.taking_over)
    }

    fn enroll(&self, _: &[PathBuf]) -> Result<Undo> {
        // The pod's own nat rules (`steer_inbound`) already capture it.
        Ok(Box::new(|| {}))
    }

    fn clear_leftover_refusals(&self) {}

    fn finish(&self) {}

    fn hand_over(&self) {
        self.rules.keep_installed();
    }
}

/// Nat rules in the pod's namespace: inbound to the plaintext listener,
/// and with `outbound` the pod's connects to its outbound listener. With
/// `keep`, rules already there (an agent handing over put them) stay.
fn nat_steering(ns: Arc<crate::sys::netns::Netns>, cfg: &AgentConfig, outbound: bool, keep: bool) -> Result<Undo> {
    if !(keep && iptables::in_pod_present(&ns, outbound)) {
        iptables::install_in_pod(&ns, cfg, outbound).context("installing the pod's iptables rules")?;
    }
    Ok(Box::new(move || {
        if let Err(e) = iptables::remove_in_pod(&ns) {
            warn!(error = %e, "removing a pod's iptables rules");
        }
    }))
}

/// The mode to run in, whether eBPF keeps original destinations in
/// per-socket storage, and why. The kernel is asked feature by feature
/// (never by version); `auto` then loads every program through the verifier
/// and takes iptables if one is refused. A forced `ebpf` on a kernel that
/// lacks a feature fails here, naming it.
pub fn select(cfg: &AgentConfig) -> Result<Selection> {
    let probed = features::probe();
    let cilium = features::cilium_socket_lb();
    let (mode, socket_storage, reason) = choose(cfg, &probed)?;
    Ok(Selection { mode, socket_storage, reason, probed, cilium })
}

fn choose(cfg: &AgentConfig, probed: &[Feature]) -> Result<(CaptureMode, bool, String)> {
    if cfg.mode == CaptureMode::Iptables {
        return Ok((CaptureMode::Iptables, true, "requested".into()));
    }
    let release = machine::kernel_release();
    let best = features::tier(probed);
    let socket_storage = match cfg.storage {
        Storage::Socket => true,
        Storage::Map => false,
        Storage::Auto => best != Tier::EbpfKeyed,
    };
    let tier = if socket_storage { Tier::Ebpf } else { Tier::EbpfKeyed };
    let lacking = features::missing_for(probed, tier);
    let shortcut_lacking = features::missing_for(probed, Tier::EbpfSockmap);
    let storage_note = if socket_storage {
        String::new()
    } else if cfg.storage == Storage::Map {
        "; original destinations in a keyed map (capture.storage: map)".to_string()
    } else {
        format!(
            "; kernel {release} lacks {}: original destinations in a keyed map",
            features::missing_for(probed, Tier::Ebpf).join(", ")
        )
    };
    if cfg.accelerate && !socket_storage {
        bail!("the same-node shortcut (--accelerate) needs per-socket storage, but capture.storage is `map` or the kernel lacks it; drop --accelerate or use storage socket");
    }
    if cfg.accelerate && !shortcut_lacking.is_empty() {
        bail!(
            "kernel {release} cannot run the same-node shortcut (--accelerate): it lacks {}; drop --accelerate",
            shortcut_lacking.join(", ")
        );
    }
    if cfg.mode == CaptureMode::Ebpf {
        if !lacking.is_empty() {
            bail!(
                "kernel {release} cannot run --mode ebpf (tier {}): it lacks {}; use --mode iptables, or --mode auto (it picks {})",
                tier.name(),
                lacking.join(", "),
                best.name()
            );
        }
        let t = if socket_storage && shortcut_lacking.is_empty() { Tier::EbpfSockmap } else { tier };
        return Ok((CaptureMode::Ebpf, socket_storage, format!("requested; tier {}{storage_note}", t.name())));
    }
    // auto
    if !lacking.is_empty() {
        let reason = format!("auto: kernel {release} lacks {}; tier iptables", lacking.join(", "));
        warn!("{reason}");
        return Ok((CaptureMode::Iptables, true, reason));
    }
    match ebpf::check_programs(socket_storage) {
        // The shortcut's sk_msg program is optional: without it the kernel
        // still gets eBPF capture.
        Ok(checks) => match checks.iter().find(|c| !c.ok && c.program != redirector_common::programs::SK_MSG) {
            None => {
                let msg_ok = checks.iter().any(|c| c.ok && c.program == redirector_common::programs::SK_MSG);
                let t = if socket_storage && shortcut_lacking.is_empty() && msg_ok { Tier::EbpfSockmap } else { tier };
                if !socket_storage && cfg.storage == Storage::Auto {
                    warn!(
                        "kernel {release} lacks {} (per-socket storage); tier {} chosen instead",
                        features::missing_for(probed, Tier::Ebpf).join(", "),
                        t.name()
                    );
                }
                Ok((
                    CaptureMode::Ebpf,
                    socket_storage,
                    format!("auto: kernel {release} loads every program; tier {}{storage_note}", t.name()),
                ))
            }
            Some(bad) => {
                let reason = format!(
                    "auto: kernel {release} refused {} ({}); tier iptables",
                    bad.program,
                    bad.error.clone().unwrap_or_default()
                );
                warn!("{reason}");
                Ok((CaptureMode::Iptables, true, reason))
            }
        },
        Err(e) => Ok((CaptureMode::Iptables, true, format!("auto: eBPF unavailable ({e}); tier iptables"))),
    }
}

/// What the CLI asks of the capture a running (or stopped) agent left:
/// enrollment through the eBPF map or a rule per workload, and what
/// `status` shows.
pub(crate) trait Installed {
    fn enroll(&self, cgroup: &Path) -> Result<()>;
    /// Returns whether the cgroup was enrolled.
    fn unenroll(&self, cgroup: &Path) -> Result<bool>;
    /// Programs or chains, cgroups and counters, for `redirector status`.
    fn view(&self, cgroup_root: &Path) -> Result<status::CaptureView>;
    /// The same-node shortcut's kill switch (eBPF only).
    fn set_accelerate(&self, on: bool) -> Result<()>;
}

/// The capture recorded as `mode`, with its pins under `bpffs_dir`.
pub(crate) fn installed(mode: CaptureMode, bpffs_dir: &Path) -> Result<Box<dyn Installed>> {
    Ok(match mode {
        CaptureMode::Iptables => Box::new(IptablesRules { mount: cgroup::cgroup2_mount()? }),
        _ => Box::new(EbpfMaps { maps: PinnedMaps::open(bpffs_dir)?, dir: bpffs_dir.to_path_buf() }),
    })
}

struct EbpfMaps {
    maps: PinnedMaps,
    dir: PathBuf,
}

impl Installed for EbpfMaps {
    fn enroll(&self, cgroup: &Path) -> Result<()> {
        Ok(self.maps.enroll(cgroup::cgroup_id(cgroup)?)?)
    }
    fn unenroll(&self, cgroup: &Path) -> Result<bool> {
        Ok(self.maps.unenroll(cgroup::cgroup_id(cgroup)?)?)
    }
    fn view(&self, cgroup_root: &Path) -> Result<status::CaptureView> {
        status::ebpf_view(&self.dir, cgroup_root)
    }
    fn set_accelerate(&self, on: bool) -> Result<()> {
        Ok(self.maps.set_accelerate(on)?)
    }
}

struct IptablesRules {
    mount: PathBuf,
}

impl Installed for IptablesRules {
    fn enroll(&self, cgroup: &Path) -> Result<()> {
        Ok(iptables::enroll(&iptables::relative(&self.mount, cgroup)?)?)
    }
    fn unenroll(&self, cgroup: &Path) -> Result<bool> {
        Ok(iptables::unenroll(&iptables::relative(&self.mount, cgroup)?)?)
    }
    fn view(&self, _: &Path) -> Result<status::CaptureView> {
        status::iptables_view()
    }
    fn set_accelerate(&self, _: bool) -> Result<()> {
        bail!("same-node acceleration needs eBPF capture; the agent runs in iptables mode (start it with --mode ebpf)")
    }
}
