//! The eBPF capture mode: loading the embedded kernel object, attaching its
//! programs to a cgroup subtree with BPF links, pinning links and maps under
//! a bpffs directory so capture outlives the agent, adopting a previous
//! agent's pins, and removing everything on uninstall.
//!
//! Layout under the bpffs directory (default /sys/fs/bpf/redirector):
//! `<MAP NAME>` for each pinned map and `links/<program>` for each link.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuHashMap};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use aya::programs::links::PinnedLink;
use aya::programs::Program;
use aya::{Ebpf, EbpfLoader};
use redirector_common::{
    maps, programs, AccelCount, CaptureConfig, ConnKey, CounterKey, Decision, Enrollment, OriginalDst, PodInbound,
    SockKey, FLAG_ACCELERATE, FLAG_CAPTURE_LOOPBACK,
};
use thiserror::Error;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::net::Cidr;

/// The kernel object, built from redirector-ebpf by the build script.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector.bpf.o"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Error)]
pub enum EbpfError {
    #[error("bpffs is not mounted at {0} and could not be mounted ({1}); mount it with `mount -t bpf bpf {0}`")]
    BpffsNotMounted(PathBuf, io::Error),
    #[error("{0} is not on a bpffs mount; choose a directory under /sys/fs/bpf")]
    NotBpffs(PathBuf),
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("loading the kernel object failed: {0}; run `redirector verify` to see which kernel feature is missing")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel refused program {program}: {}; run `redirector verify` for the kernel's features (kernel 5.10+ with BTF and cgroup BPF is needed)", short_error(.source))]
    Program { program: &'static str, source: aya::programs::ProgramError },
    #[error("cannot attach program {program} to the cgroup: {source}; BPF links for cgroups need kernel 5.7+")]
    Attach {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinned map {0} is missing; is the agent installed? start it with `redirector run`")]
    NotInstalled(PathBuf),
    #[error("pinning {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("the enrolled-cgroup map is full ({0} entries); unenroll unused cgroups")]
    EnrolledFull(u32),
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

/// Make sure `dir`'s bpffs is mounted (mounting /sys/fs/bpf if it is not),
/// and create `dir`.
pub fn ensure_bpffs(dir: &Path) -> Result<(), EbpfError> {
    let base = Path::new("/sys/fs/bpf");
    if dir.starts_with(base) && !is_bpffs(base) {
        let src = CString::new("bpf").expect("no NUL");
        let target = CString::new("/sys/fs/bpf").expect("no NUL");
        // SAFETY: valid C strings, no data argument.
        let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), src.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            return Err(EbpfError::BpffsNotMounted(base.into(), io::Error::last_os_error()));
        }
        info!(path = %base.display(), "mounted bpffs");
    }
    let parent = dir.parent().unwrap_or(dir);
    if !is_bpffs(parent) && !is_bpffs(dir) {
        return Err(EbpfError::NotBpffs(dir.into()));
    }
    for d in [dir.to_path_buf(), dir.join("links")] {
        fs::create_dir_all(&d).map_err(|source| EbpfError::Create { path: d, source })?;
    }
    Ok(())
}

pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &raw mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// A loaded, attached and pinned capture.
pub struct EbpfCapture {
    /// Keeps the programs' user-space handles (and the log reader) alive.
    _ebpf: Ebpf,
    pub pin_dir: PathBuf,
    /// Whether an earlier agent's links were found and replaced.
    pub adopted: bool,
    /// Inbound steering in pods' namespaces; `None` when this kernel has no
    /// sk_lookup (5.9+) and pods get the nat PREROUTING rule instead.
    pub steering: Option<std::sync::Arc<PodSteering>>,
}

impl EbpfCapture {
    /// Load the embedded object (reusing pinned maps), write the settings,
    /// attach every program to `cgroup_root` and pin the links, replacing any
    /// links a previous agent left.
    ///
    /// On error nothing new stays attached: links are only pinned once every
    /// program is attached, and maps pinned by this call are removed.
    /// `socket_storage`: keep original destinations in per-socket storage
    /// (false: the keyed-map tier, without the shortcut).
    pub fn install(
        cfg: &AgentConfig,
        cgroup_root: &Path,
        proxy_cgroup_id: u64,
        socket_storage: bool,
    ) -> Result<EbpfCapture, EbpfError> {
        let pin_dir = cfg.bpffs_dir.clone();
        let fresh = !pin_dir.join(maps::CONFIG).exists();
        ensure_bpffs(&pin_dir)?;
        drop_outdated_pins(&pin_dir);
        let result = Self::install_inner(cfg, cgroup_root, proxy_cgroup_id, &pin_dir, socket_storage);
        if result.is_err() && fresh {
            remove_pins(&pin_dir);
        }
        result
    }

    fn install_inner(
        cfg: &AgentConfig,
        cgroup_root: &Path,
        proxy_cgroup_id: u64,
        pin_dir: &Path,
        socket_storage: bool,
    ) -> Result<EbpfCapture, EbpfError> {
        let mut ebpf =
            loader(socket_storage).default_map_pin_directory(pin_dir).load(OBJECT).map_err(EbpfError::Load)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_forwarder(logger),
            Err(e) => warn!(error = %e, "kernel program logs are not available"),
        }

        write_settings(&mut ebpf, cfg, proxy_cgroup_id)?;

        let cgroup =
            File::open(cgroup_root).map_err(|source| EbpfError::Cgroup { path: cgroup_root.into(), source })?;
        // The shortcut's program is optional: a kernel without sk_msg still
        // gets eBPF capture (the tier below), unless the shortcut was asked for.
        if socket_storage {
            if let Err(e) = attach_sk_msg(&mut ebpf) {
                if cfg.accelerate {
                    return Err(e);
                }
                warn!(error = %e, "same-node shortcut unavailable on this kernel; capture works without it");
            }
        }
        let mut new_links: Vec<(&'static str, OwnedFd)> = Vec::new();
        for name in programs::ALL {
            let link = attach(&mut ebpf, name, &cgroup)?;
            new_links.push((name, link));
        }

        // Every program is attached: now swap the pins. The previous agent's
        // links stay attached until the new ones are pinned, so capture has
        // no gap.
        let links_dir = pin_dir.join("links");
        let mut adopted = false;
        for (name, link) in new_links {
            let path = links_dir.join(name);
            let old = if path.exists() {
                match PinnedLink::from_pin(&path) {
                    Ok(p) => {
                        Some(p.unpin().map_err(|e| EbpfError::Pin { path: path.clone(), message: e.to_string() })?)
                    }
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "removing an unreadable link pin");
                        let _ = fs::remove_file(&path);
                        None
                    }
                }
            } else {
                None
            };
            obj_pin(link.as_fd(), &path).map_err(|e| EbpfError::Pin { path: path.clone(), message: e.to_string() })?;
            drop(link); // the pin keeps the link
            if let Some(old) = old {
                adopted = true;
                drop(old); // detaches the previous agent's program
            }
        }
        // Inbound steering in pods is optional: without it a pod's inbound
        // goes through a nat PREROUTING rule in its namespace.
        let steering = match load_sk_lookup(&mut ebpf) {
            Ok(prog) => Some(std::sync::Arc::new(PodSteering { prog, pin_dir: pin_dir.to_path_buf() })),
            Err(e) => {
                warn!(error = %e, "this kernel cannot steer pods' inbound connections with sk_lookup (5.9+); pods get a nat PREROUTING rule instead");
                None
            }
        };
        info!(
            cgroup = %cgroup_root.display(),
            pins = %pin_dir.display(),
            adopted,
            pod_inbound = if steering.is_some() { "sk_lookup" } else { "iptables" },
            "kernel programs attached"
        );
        Ok(EbpfCapture { _ebpf: ebpf, pin_dir: pin_dir.to_path_buf(), adopted, steering })
    }
}

/// Pinned maps an older agent made with a different value layout cannot be
/// adopted (the programs would not load): remove them so they are made
/// afresh. They hold only connections in their handshake.
fn drop_outdated_pins(dir: &Path) {
    let want = std::mem::size_of::<OriginalDst>() as u32;
    for name in [maps::PENDING, maps::DST_BY_COOKIE, maps::DNS_ORIG] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let size = MapData::from_pin(&path).ok().and_then(|m| m.info().ok()).map(|i| i.value_size());
        if size != Some(want) {
            warn!(map = name, found = ?size, want, "replacing a pinned map an older agent made");
            let _ = fs::remove_file(&path);
        }
    }
}

/// A loader with the load-time constants this kernel (and the chosen tier)
/// needs.
fn loader(socket_storage: bool) -> EbpfLoader<'static> {
    use aya::programs::ProgramType;
    use aya::sys::{is_helper_supported, BpfHelper};
    static NO: u32 = 0;
    let mut l = EbpfLoader::new();
    // The programs use no CO-RE relocations: skip parsing the kernel's
    // type information (several MiB of vmlinux BTF the agent would keep in
    // its heap for nothing). Map BTF comes from the object itself.
    l.btf(None);
    let has_cookie = |t: ProgramType| is_helper_supported(t, BpfHelper::BPF_FUNC_get_netns_cookie).unwrap_or(false);
    // The keyed tier's getsockopt builds the same key as sockops: both
    // carry the cookie or neither does.
    let cookie = has_cookie(ProgramType::SockOps) && (socket_storage || has_cookie(ProgramType::CgroupSockopt));
    if !cookie {
        warn!("this kernel has no bpf_get_netns_cookie in sockops or getsockopt programs (5.15+): capture keys cannot tell network namespaces apart; run one workload namespace per node or upgrade the kernel");
        l.override_global(redirector_common::globals::NETNS_COOKIE, &NO, true);
    }
    if !socket_storage {
        l.override_global(redirector_common::globals::SOCKET_STORAGE, &NO, true);
    }
    l
}

/// Load the sk_msg program and attach it to the pinned SOCK_PAIRS map. The
/// attachment belongs to the map, so it lives as long as the map's pin (a
/// restarted agent's program replaces it); no link to keep.
fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    let name = programs::SK_MSG;
    let perr = |source| EbpfError::Program { program: name, source };
    let map_fd = {
        let map = ebpf.map(maps::SOCK_PAIRS).ok_or_else(|| EbpfError::NotInstalled(maps::SOCK_PAIRS.into()))?;
        let Map::SockHash(data) = map else {
            return Err(EbpfError::NotInstalled(maps::SOCK_PAIRS.into()));
        };
        data.fd().as_fd().as_raw_fd()
    };
    let Some(Program::SkMsg(p)) = ebpf.program_mut(name) else {
        return Err(EbpfError::Program { program: name, source: aya::programs::ProgramError::UnexpectedProgramType });
    };
    p.load().map_err(perr)?;
    let prog_fd = p.fd().map_err(perr)?.as_fd().as_raw_fd();
    let mut attr = ProgAttachAttr {
        target_fd: map_fd as u32,
        attach_bpf_fd: prog_fd as u32,
        attach_type: BPF_SK_MSG_VERDICT,
        ..Default::default()
    };
    bpf_syscall(BPF_PROG_ATTACH, &mut attr).map_err(|e| EbpfError::Attach { program: name, source: e })?;
    Ok(())
}

/// Kernel attach types (include/uapi/linux/bpf.h).
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_GETSOCKOPT: u32 = 21;
const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
const BPF_CGROUP_UDP6_RECVMSG: u32 = 20;
const BPF_SK_MSG_VERDICT: u32 = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 6],
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _rest: [u32; 7],
}

#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

fn bpf_syscall<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a properly sized, zero-initialised bpf_attr prefix.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut::<T>(attr).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

const BPF_SK_LOOKUP: u32 = 36;

fn load_sk_lookup(ebpf: &mut Ebpf) -> Result<aya::programs::ProgramFd, EbpfError> {
    let name = programs::SK_LOOKUP;
    let perr = |source| EbpfError::Program { program: name, source };
    let Some(Program::SkLookup(p)) = ebpf.program_mut(name) else {
        return Err(perr(aya::programs::ProgramError::UnexpectedProgramType));
    };
    p.load().map_err(perr)?;
    p.fd().map_err(perr)?.try_clone().map_err(|e| EbpfError::Attach { program: name, source: e })
}

/// The key of a pod address in the steering maps: IPv4-mapped, words in
/// network order, as the program reads them.
fn steering_key(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => redirector_common::map_v4(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

type SteeringListeners = aya::maps::SockHash<MapData, [u32; 4]>;
type SteeringPods = HashMap<MapData, [u32; 4], PodInbound>;

/// Inbound steering in pods' namespaces: the sk_lookup program attached to
/// a pod's namespace with a pinned link (so a crashed or restarting agent
/// leaves no gap: the program refuses new connections until the new
/// listener is in place), and the pod's addresses mapped to its plaintext
/// listener.
pub struct PodSteering {
    prog: aya::programs::ProgramFd,
    pin_dir: PathBuf,
}

impl PodSteering {
    fn link_pin(&self, netns_inode: u64) -> PathBuf {
        self.pin_dir.join("links").join(format!("pod-inbound-{netns_inode}"))
    }

    fn maps(&self) -> Result<(SteeringListeners, SteeringPods), EbpfError> {
        let listeners = aya::maps::SockHash::try_from(Map::SockHash(open_pinned(&self.pin_dir, maps::POD_LISTENERS)?))
            .map_err(map_err(maps::POD_LISTENERS))?;
        let inbound = HashMap::try_from(Map::HashMap(open_pinned(&self.pin_dir, maps::POD_INBOUND)?))
            .map_err(map_err(maps::POD_INBOUND))?;
        Ok((listeners, inbound))
    }

    /// Steer TCP connections to `ips` in the namespace `netns` (its
    /// descriptor and inode) to `listener` (IPv4) or `listener6` (IPv6),
    /// except those to `ports`' ports. An IPv6 address without an IPv6
    /// listener is still the pod's: connections to it are refused.
    pub fn steer(
        &self,
        netns: BorrowedFd<'_>,
        netns_inode: u64,
        ips: &[IpAddr],
        listener: BorrowedFd<'_>,
        listener6: Option<BorrowedFd<'_>>,
        ports: PodInbound,
    ) -> Result<(), EbpfError> {
        let (mut listeners, mut inbound) = self.maps()?;
        for ip in ips {
            let key = steering_key(*ip);
            let to = if ip.is_ipv4() { Some(listener) } else { listener6 };
            if let Some(to) = to {
                listeners.insert(key, to.as_raw_fd(), 0).map_err(map_err(maps::POD_LISTENERS))?;
            }
            inbound.insert(key, ports, 0).map_err(map_err(maps::POD_INBOUND))?;
        }
        let mut attr = LinkCreateAttr {
            prog_fd: self.prog.as_fd().as_raw_fd() as u32,
            target_fd: netns.as_raw_fd() as u32,
            attach_type: BPF_SK_LOOKUP,
            ..Default::default()
        };
        let fd = bpf_syscall(BPF_LINK_CREATE, &mut attr)
            .map_err(|e| EbpfError::Attach { program: programs::SK_LOOKUP, source: e })?;
        // SAFETY: the kernel returned a new file descriptor we now own.
        let link = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // A link a crashed agent left on this namespace is replaced once
        // the new one is pinned.
        let path = self.link_pin(netns_inode);
        let old = if path.exists() {
            let old = PinnedLink::from_pin(&path).ok().and_then(|p| p.unpin().ok());
            let _ = fs::remove_file(&path);
            old
        } else {
            None
        };
        obj_pin(link.as_fd(), &path).map_err(|e| EbpfError::Pin { path: path.clone(), message: e.to_string() })?;
        drop(old);
        Ok(())
    }

    /// Stop steering a pod: detach the program from its namespace and
    /// forget its addresses.
    pub fn unsteer(&self, netns_inode: u64, ips: &[IpAddr]) {
        let path = self.link_pin(netns_inode);
        if let Ok(l) = PinnedLink::from_pin(&path) {
            let _ = l.unpin();
        }
        let _ = fs::remove_file(&path);
        if let Ok((mut listeners, mut inbound)) = self.maps() {
            for ip in ips {
                let key = steering_key(*ip);
                let _ = listeners.remove(&key);
                let _ = inbound.remove(&key);
            }
        }
    }
}

/// Pin a BPF object (here: a link) at `path`.
fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut attr = ObjPinAttr { pathname: c.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, ..Default::default() };
    bpf_syscall(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Load a program and attach it to the cgroup with a BPF link. The link is
/// created here rather than through aya because aya 0.14 cannot hand out
/// the link of a cgroup sockopt program for pinning; doing all four the same
/// way keeps one code path. The link detaches when the returned fd closes,
/// unless it was pinned.
fn attach(ebpf: &mut Ebpf, name: &'static str, cgroup: &File) -> Result<OwnedFd, EbpfError> {
    let perr = |source| EbpfError::Program { program: name, source };
    let program = ebpf
        .program_mut(name)
        .ok_or(EbpfError::Program { program: name, source: aya::programs::ProgramError::UnexpectedProgramType })?;
    let attach_type = match program {
        Program::CgroupSockAddr(p) => {
            p.load().map_err(perr)?;
            match name {
                programs::CONNECT4 => BPF_CGROUP_INET4_CONNECT,
                programs::CONNECT6 => BPF_CGROUP_INET6_CONNECT,
                programs::SENDMSG4 => BPF_CGROUP_UDP4_SENDMSG,
                programs::SENDMSG6 => BPF_CGROUP_UDP6_SENDMSG,
                programs::RECVMSG4 => BPF_CGROUP_UDP4_RECVMSG,
                _ => BPF_CGROUP_UDP6_RECVMSG,
            }
        }
        Program::SockOps(p) => {
            p.load().map_err(perr)?;
            BPF_CGROUP_SOCK_OPS
        }
        Program::CgroupSockopt(p) => {
            p.load().map_err(perr)?;
            BPF_CGROUP_GETSOCKOPT
        }
        _ => {
            return Err(EbpfError::Program {
                program: name,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })
        }
    };
    let prog_fd = program.fd().map_err(perr)?.as_fd().as_raw_fd();
    let mut attr = LinkCreateAttr {
        prog_fd: prog_fd as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    let fd = bpf_syscall(BPF_LINK_CREATE, &mut attr).map_err(|e| EbpfError::Attach { program: name, source: e })?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn spawn_log_forwarder(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // aya-log writes to the `log` facade; tracing-subscriber's log bridge
    // turns those records into tracing events.
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        // SAFETY: the logger owns its ring buffer fd for as long as AsyncFd
        // holds the logger.
        let Ok(mut fd) =
            (unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) })
        else {
            return;
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

fn write_settings(ebpf: &mut Ebpf, cfg: &AgentConfig, proxy_cgroup_id: u64) -> Result<(), EbpfError> {
    let mut config: Array<_, CaptureConfig> =
        Array::try_from(ebpf.map_mut(maps::CONFIG).ok_or_else(|| EbpfError::NotInstalled(maps::CONFIG.into()))?)
            .map_err(map_err(maps::CONFIG))?;
    config
        .set(
            0,
            CaptureConfig {
                proxy_cgroup_id,
                proxy_mark: cfg.proxy_mark,
                flags: (if cfg.capture_loopback { FLAG_CAPTURE_LOOPBACK } else { 0 })
                    | (if cfg.accelerate { FLAG_ACCELERATE } else { 0 }),
                outbound_port: cfg.outbound_port,
                dns_port: if cfg.dns_capture { cfg.dns_port } else { 0 },
                _pad: [0; 4],
            },
            0,
        )
        .map_err(map_err(maps::CONFIG))?;

    let mut ports: HashMap<_, u16, u8> = HashMap::try_from(
        ebpf.map_mut(maps::EXCLUDED_PORTS).ok_or_else(|| EbpfError::NotInstalled(maps::EXCLUDED_PORTS.into()))?,
    )
    .map_err(map_err(maps::EXCLUDED_PORTS))?;
    let stale: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
    for p in stale.iter().filter(|p| !cfg.exclude_ports.contains(p)) {
        ports.remove(p).map_err(map_err(maps::EXCLUDED_PORTS))?;
    }
    for p in &cfg.exclude_ports {
        ports.insert(p, 1, 0).map_err(map_err(maps::EXCLUDED_PORTS))?;
    }

    sync_cidrs::<4>(ebpf, maps::EXCLUDED_CIDRS4, &cfg.exclude_cidrs)?;
    sync_cidrs::<16>(ebpf, maps::EXCLUDED_CIDRS6, &cfg.exclude_cidrs)?;
    Ok(())
}

fn sync_cidrs<const N: usize>(ebpf: &mut Ebpf, name: &'static str, cidrs: &[Cidr]) -> Result<(), EbpfError> {
    let mut trie: LpmTrie<_, [u8; N], u8> =
        LpmTrie::try_from(ebpf.map_mut(name).ok_or_else(|| EbpfError::NotInstalled(name.into()))?)
            .map_err(map_err(name))?;
    let stale: Vec<Key<[u8; N]>> = trie.keys().filter_map(Result::ok).collect();
    for k in stale {
        trie.remove(&k).map_err(map_err(name))?;
    }
    for c in cidrs {
        let bytes: Vec<u8> = match c.addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        if let Ok(data) = <[u8; N]>::try_from(bytes.as_slice()) {
            trie.insert(&Key::new(u32::from(c.prefix_len), data), 1, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// Remove every link and map pinned under `dir`, detaching the programs
/// (unless a running agent still holds them), then the directory itself.
/// Returns what was removed.
pub fn remove_pins(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let links = dir.join("links");
    if let Ok(entries) = fs::read_dir(&links) {
        for e in entries.flatten() {
            let path = e.path();
            match PinnedLink::from_pin(&path) {
                Ok(l) => {
                    if l.unpin().is_ok() {
                        removed.push(path);
                    }
                }
                Err(_) => {
                    if fs::remove_file(&path).is_ok() {
                        removed.push(path);
                    }
                }
            }
        }
        let _ = fs::remove_dir(&links);
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if fs::remove_file(e.path()).is_ok() {
                removed.push(e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
    removed
}

/// The pinned maps of an installed capture, opened for reading and for
/// enrolling cgroups without the agent.
pub struct PinnedMaps {
    dir: PathBuf,
}

fn open_pinned(dir: &Path, name: &'static str) -> Result<MapData, EbpfError> {
    let path = dir.join(name);
    if !path.exists() {
        return Err(EbpfError::NotInstalled(path));
    }
    MapData::from_pin(&path).map_err(map_err(name))
}

/// Counters of one cgroup, indexed by [`Decision`].
pub type DecisionCounts = [u64; Decision::COUNT];

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<PinnedMaps, EbpfError> {
        open_pinned(dir, maps::ENROLLED)?;
        Ok(PinnedMaps { dir: dir.into() })
    }

    fn enrolled_map(&self) -> Result<HashMap<MapData, u64, Enrollment>, EbpfError> {
        HashMap::try_from(Map::HashMap(open_pinned(&self.dir, maps::ENROLLED)?)).map_err(map_err(maps::ENROLLED))
    }

    pub fn enroll(&self, cgroup_id: u64) -> Result<(), EbpfError> {
        self.enroll_with(cgroup_id, 0)
    }

    /// Enroll with `ENROLL_*` flags (an existing entry is replaced).
    pub fn enroll_with(&self, cgroup_id: u64, flags: u32) -> Result<(), EbpfError> {
        let mut m = self.enrolled_map()?;
        m.insert(cgroup_id, Enrollment { flags, _pad: 0 }, 0).map_err(|e| {
            if let aya::maps::MapError::SyscallError(s) = &e {
                if s.io_error.raw_os_error() == Some(libc::E2BIG) {
                    return EbpfError::EnrolledFull(redirector_common::MAX_ENROLLED);
                }
            }
            EbpfError::Map { name: maps::ENROLLED, source: e }
        })
    }

    /// Returns whether the cgroup was enrolled.
    pub fn unenroll(&self, cgroup_id: u64) -> Result<bool, EbpfError> {
        let mut m = self.enrolled_map()?;
        match m.remove(&cgroup_id) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(aya::maps::MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(EbpfError::Map { name: maps::ENROLLED, source: e }),
        }
    }

    /// Remove a cgroup's entry only while it is still pending (a pod that
    /// became served keeps its enrollment).
    pub fn unenroll_if_pending(&self, cgroup_id: u64) -> Result<bool, EbpfError> {
        let m = self.enrolled_map()?;
        match m.get(&cgroup_id, 0) {
            Ok(e) if e.flags & redirector_common::ENROLL_PENDING != 0 => self.unenroll(cgroup_id),
            _ => Ok(false),
        }
    }

    /// Remove every pending entry (a previous agent's; the pods still
    /// pending are held again by this one).
    pub fn clear_pending(&self) -> Result<usize, EbpfError> {
        let m = self.enrolled_map()?;
        let pending: Vec<u64> = m
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, e)| e.flags & redirector_common::ENROLL_PENDING != 0)
            .map(|(k, _)| k)
            .collect();
        for id in &pending {
            self.unenroll(*id)?;
        }
        Ok(pending.len())
    }

    pub fn enrolled(&self) -> Result<Vec<u64>, EbpfError> {
        let m = self.enrolled_map()?;
        let mut v: Vec<u64> = m.keys().filter_map(Result::ok).collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Per-cgroup counters, summed over CPUs.
    pub fn counters(&self) -> Result<BTreeMap<u64, DecisionCounts>, EbpfError> {
        let m: PerCpuHashMap<MapData, CounterKey, u64> =
            PerCpuHashMap::try_from(Map::PerCpuHashMap(open_pinned(&self.dir, maps::COUNTERS)?))
                .map_err(map_err(maps::COUNTERS))?;
        let mut out: BTreeMap<u64, DecisionCounts> = BTreeMap::new();
        for item in &m {
            let (k, values) = item.map_err(map_err(maps::COUNTERS))?;
            let Some(d) = Decision::from_u32(k.decision) else {
                continue;
            };
            out.entry(k.cgroup_id).or_default()[d as usize] += values.iter().sum::<u64>();
        }
        Ok(out)
    }

    /// Handshakes whose original destination is still in the shared map.
    pub fn pending(&self) -> Result<usize, EbpfError> {
        let m: HashMap<MapData, ConnKey, OriginalDst> =
            HashMap::try_from(Map::HashMap(open_pinned(&self.dir, maps::PENDING)?)).map_err(map_err(maps::PENDING))?;
        Ok(m.keys().count())
    }

    /// Turn the same-node shortcut on or off for new connections (the kill
    /// switch; connections already in it keep it until they close, and stop
    /// redirecting at once when switched off).
    pub fn set_accelerate(&self, on: bool) -> Result<(), EbpfError> {
        let mut cfg: Array<MapData, CaptureConfig> =
            Array::try_from(Map::Array(open_pinned(&self.dir, maps::CONFIG)?)).map_err(map_err(maps::CONFIG))?;
        let mut c = cfg.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        if on {
            c.flags |= FLAG_ACCELERATE;
        } else {
            c.flags &= !FLAG_ACCELERATE;
        }
        cfg.set(0, c, 0).map_err(map_err(maps::CONFIG))
    }

    pub fn accelerate(&self) -> Result<bool, EbpfError> {
        let cfg: Array<MapData, CaptureConfig> =
            Array::try_from(Map::Array(open_pinned(&self.dir, maps::CONFIG)?)).map_err(map_err(maps::CONFIG))?;
        Ok(cfg.get(&0, 0).map_err(map_err(maps::CONFIG))?.flags & FLAG_ACCELERATE != 0)
    }

    /// Per-socket counters of the sockets in the shortcut now.
    pub fn accelerated_sockets(&self) -> Result<Vec<(SockKey, AccelCount)>, EbpfError> {
        let m: HashMap<MapData, SockKey, AccelCount> =
            HashMap::try_from(Map::HashMap(open_pinned(&self.dir, maps::ACCEL_SOCKETS)?))
                .map_err(map_err(maps::ACCEL_SOCKETS))?;
        Ok(m.iter().filter_map(Result::ok).collect())
    }

    /// Shortcut totals since load: (messages redirected, bytes redirected,
    /// messages passed to the TCP stack). Only sockets in the shortcut count.
    pub fn accel_totals(&self) -> Result<(u64, u64, u64), EbpfError> {
        let m: aya::maps::PerCpuArray<MapData, u64> =
            aya::maps::PerCpuArray::try_from(Map::PerCpuArray(open_pinned(&self.dir, maps::ACCEL_TOTALS)?))
                .map_err(map_err(maps::ACCEL_TOTALS))?;
        let sum =
            |i: u32| -> Result<u64, EbpfError> { Ok(m.get(&i, 0).map_err(map_err(maps::ACCEL_TOTALS))?.iter().sum()) };
        Ok((sum(0)?, sum(1)?, sum(2)?))
    }

    /// Names of the pinned links (the attached programs).
    pub fn links(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.dir.join("links"))
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// What `redirector verify` learns by loading each program into the kernel
/// (without attaching it).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgramCheck {
    pub program: String,
    pub ok: bool,
    /// Instructions the verifier processed, where the kernel reports it.
    pub verified_instructions: Option<u32>,
    /// The program's own length in instructions, as the kernel holds it
    /// after loading (xlated).
    pub instructions: Option<u32>,
    pub error: Option<String>,
}

/// Load every program through the verifier into a scratch bpffs directory,
/// then unload it all.
pub fn check_programs(socket_storage: bool) -> Result<Vec<ProgramCheck>, EbpfError> {
    let scratch = PathBuf::from(format!("/sys/fs/bpf/redirector-verify-{}", std::process::id()));
    ensure_bpffs(&scratch)?;
    let result = (|| {
        let mut ebpf =
            loader(socket_storage).default_map_pin_directory(&scratch).load(OBJECT).map_err(EbpfError::Load)?;
        let mut out = Vec::new();
        for name in programs::ALL.iter().copied().chain([programs::SK_MSG, programs::SK_LOOKUP]) {
            // (verifier-processed, own) instruction counts.
            fn counts(
                info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>,
            ) -> (Option<u32>, Option<u32>) {
                match info {
                    Ok(i) => (i.verified_instruction_count(), i.size_translated().map(|b| b / 8)),
                    Err(_) => (None, None),
                }
            }
            let prog = ebpf.program_mut(name);
            let r: Result<(Option<u32>, Option<u32>), String> = match prog {
                Some(Program::CgroupSockAddr(p)) => p.load().map_err(|e| short_error(&e)).map(|()| counts(p.info())),
                Some(Program::SockOps(p)) => p.load().map_err(|e| short_error(&e)).map(|()| counts(p.info())),
                Some(Program::CgroupSockopt(p)) => p.load().map_err(|e| short_error(&e)).map(|()| counts(p.info())),
                Some(Program::SkMsg(p)) => p.load().map_err(|e| short_error(&e)).map(|()| counts(p.info())),
                Some(Program::SkLookup(p)) => p.load().map_err(|e| short_error(&e)).map(|()| counts(p.info())),
                _ => Err("not found in the kernel object".into()),
            };
            out.push(match r {
                Ok((verified, own)) => ProgramCheck {
                    program: name.into(),
                    ok: true,
                    verified_instructions: verified,
                    instructions: own,
                    error: None,
                },
                Err(e) => ProgramCheck {
                    program: name.into(),
                    ok: false,
                    verified_instructions: None,
                    instructions: None,
                    error: Some(e),
                },
            });
        }
        Ok(out)
    })();
    remove_pins(&scratch);
    result
}

/// A program error on one line: the verifier's log is long, its verdict is
/// the line just before "verification time". The whole log goes to the debug
/// log.
fn short_error(e: &aya::programs::ProgramError) -> String {
    let full = e.to_string();
    tracing::debug!(error = %full, "program load failed");
    let mut lines = full.lines();
    let first = lines.next().unwrap_or_default().to_string();
    let all: Vec<&str> = full.lines().collect();
    let verdict =
        all.iter().position(|l| l.starts_with("verification time")).and_then(|i| i.checked_sub(1)).map(|i| all[i]);
    match verdict {
        Some(v) => format!("{} (verifier: {v})", first.split(" Verifier output").next().unwrap_or(&first)),
        None => first,
    }
}
