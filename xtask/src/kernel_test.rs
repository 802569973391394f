//! `cargo xtask kernel-test`: the capture checks on other kernels, booted
//! under QEMU (software emulation), never installed on the host.
//!
//! For each kernel: resolve Debian's `linux-image-amd64` of the suite that
//! ships it (the host's own suites for 6.1; a private apt state for others,
//! pointed at the mirrors this machine already uses), download the package,
//! unpack its vmlinuz, boot it with a small initramfs (busybox, the
//! `redirector` binary and its libraries, `guest/init.sh`), and read the
//! verdict from qemu's exit status (isa-debug-exit) and the per-check lines
//! on the serial console.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const GUEST_INIT: &str = include_str!("../guest/init.sh");
const GUEST_CONFIG: &str =
    "capture:\n  mode: ebpf\n  captureLoopback: true\n  excludePorts: []\nproxy:\n  drainTimeout: 1s\n";
/// isa-debug-exit turns the byte written as `v` into exit status `v << 1 | 1`.
const EXIT_PASS: i32 = 3;

/// Where a kernel series comes from: the host's suites, or another suite
/// (on the host's Debian or Debian-security mirror).
fn suite_of(kernel: &str) -> Result<Option<(&'static str, bool)>> {
    Ok(match kernel {
        "6.1" => None,
        "5.10" => Some(("bullseye-security", true)),
        "6.12" => Some(("trixie", false)),
        other => bail!("kernel {other} is not in the matrix; choose from 5.10, 6.1, 6.12"),
    })
}

/// The mirrors the host's apt already uses: (debian, debian-security).
fn host_mirrors() -> Result<(String, String)> {
    let mut text = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            text.push('\n');
            text.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    let mut uris: Vec<String> = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(u) = l.strip_prefix("URIs:") {
            uris.extend(u.split_whitespace().map(str::to_string));
        } else if l.starts_with("deb ") {
            if let Some(u) = l.split_whitespace().find(|w| w.contains("://")) {
                uris.push(u.to_string());
            }
        }
    }
    let security = uris.iter().find(|u| u.trim_end_matches('/').ends_with("debian-security")).cloned();
    let main = uris.iter().find(|u| u.trim_end_matches('/').ends_with("/debian")).cloned();
    match (main, security) {
        (Some(m), Some(s)) => Ok((m, s)),
        _ => bail!("cannot find the Debian mirrors in the host's apt sources; kernel-test needs a Debian host"),
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// apt with a private state for `suite` (the host's apt state is untouched).
fn private_apt(work: &Path, tool: &str, suite: &str, security: bool) -> Result<Command> {
    let (main, sec) = host_mirrors()?;
    let dir = work.join("apt").join(suite);
    for d in ["lists/partial", "archives/partial"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let list = dir.join("sources.list");
    let uri = if security { sec } else { main };
    std::fs::write(&list, format!("deb {uri} {suite} main\n"))?;
    let mut c = Command::new(tool);
    c.arg("-o")
        .arg(format!("Dir::Etc::sourcelist={}", list.display()))
        .arg("-o")
        .arg("Dir::Etc::sourceparts=-")
        .arg("-o")
        .arg(format!("Dir::State::Lists={}", dir.join("lists").display()))
        .arg("-o")
        .arg(format!("Dir::Cache::Archives={}", dir.join("archives").display()))
        .arg("-o")
        .arg("Dir::State::status=/dev/null")
        .arg("-o")
        .arg("Debug::NoLocking=1");
    Ok(c)
}

/// Download the kernel package and unpack its vmlinuz; returns its path.
fn fetch_kernel(work: &Path, kernel: &str) -> Result<PathBuf> {
    let kdir = work.join(format!("linux-{kernel}"));
    std::fs::create_dir_all(&kdir)?;
    let depends = match suite_of(kernel)? {
        None => run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?,
        Some((suite, sec)) => {
            run(private_apt(work, "apt-get", suite, sec)?.args(["update", "-q"]))?;
            run(private_apt(work, "apt-cache", suite, sec)?.args(["depends", "linux-image-amd64"]))?
        }
    };
    let pkg = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|p| p.trim().to_string())
        .filter(|p| p.starts_with("linux-image-"))
        .with_context(|| format!("no linux-image package for kernel {kernel}"))?;
    let existing = |d: &Path| -> Option<PathBuf> {
        std::fs::read_dir(d)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_"))))
    };
    let deb = if let Some(d) = existing(&kdir) {
        d
    } else {
        let mut c = match suite_of(kernel)? {
            None => Command::new("apt-get"),
            Some((suite, sec)) => private_apt(work, "apt-get", suite, sec)?,
        };
        run(c.current_dir(&kdir).args(["download", "-q", &pkg]))?;
        existing(&kdir).context("downloaded package not found")?
    };
    let boot = kdir.join("boot");
    if !boot.exists() {
        let tar = Command::new("dpkg-deb").arg("--fsys-tarfile").arg(&deb).stdout(Stdio::piped()).spawn()?;
        let st = Command::new("tar")
            .args(["-x", "--wildcards", "./boot/vmlinuz-*"])
            .current_dir(&kdir)
            .stdin(tar.stdout.context("dpkg-deb output")?)
            .status()?;
        if !st.success() {
            bail!("unpacking {}", deb.display());
        }
    }
    std::fs::read_dir(&boot)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .context("no vmlinuz in the package")
}

/// The initramfs: busybox, the agent binary with its shared libraries, the
/// guest init and settings.
fn build_initramfs(work: &Path, redirector: &Path) -> Result<PathBuf> {
    let root = work.join("initramfs");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "sbin", "proc", "sys", "dev", "tmp", "run", "etc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("busybox is missing: apt-get install busybox-static")?;
    std::fs::copy(&busybox, root.join("bin/busybox"))?;
    std::fs::copy(redirector, root.join("redirector"))?;
    let ldd = run(Command::new("ldd").arg(redirector))?;
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let dst = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().unwrap())?;
        std::fs::copy(lib, &dst).with_context(|| format!("copying {lib}"))?;
    }
    std::fs::write(root.join("init"), GUEST_INIT)?;
    std::fs::write(root.join("cfg.yaml"), GUEST_CONFIG)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755))?;
    let img = work.join("initramfs.cpio.gz");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("cd '{}' && find . | cpio -o -H newc 2>/dev/null | gzip -1 > '{}'", root.display(), img.display()))
        .status()?;
    if !st.success() {
        bail!("building the initramfs failed (cpio and gzip are needed)");
    }
    Ok(img)
}

#[derive(Debug, serde::Serialize)]
pub struct KernelResult {
    pub kernel: String,
    pub release: Option<String>,
    pub passed: bool,
    pub error: Option<String>,
    pub checks: BTreeMap<String, bool>,
    /// program -> instructions the verifier processed (kernels 5.16+
    /// report it)
    pub verifier_instructions: BTreeMap<String, u64>,
    /// program -> the program's own length in instructions, as loaded
    pub instructions: BTreeMap<String, u64>,
    /// The tier `redirector verify` found in the guest.
    pub tier: Option<String>,
    pub seconds: f64,
}

fn boot(kernel: &str, vmlinuz: &Path, initramfs: &Path, timeout: Duration) -> KernelResult {
    let started = Instant::now();
    let mut r = KernelResult {
        kernel: kernel.into(),
        release: None,
        passed: false,
        error: None,
        checks: BTreeMap::new(),
        verifier_instructions: BTreeMap::new(),
        instructions: BTreeMap::new(),
        tier: None,
        seconds: 0.0,
    };
    let out = Command::new("timeout")
        .arg("--kill-after=5")
        .arg(timeout.as_secs().to_string())
        .arg("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .output();
    r.seconds = started.elapsed().as_secs_f64();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            r.error = Some(format!("qemu did not run: {e}"));
            return r;
        }
    };
    let console = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::write(
        vmlinuz.parent().and_then(Path::parent).unwrap_or(Path::new(".")).join("console.log"),
        console.as_bytes(),
    );
    for line in console.lines() {
        let line = line.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
        if let Some(rest) = line.strip_prefix("CHECK ") {
            let mut f = rest.split_whitespace();
            if let (Some(name), Some(v)) = (f.next(), f.next()) {
                r.checks.insert(name.into(), v == "PASS");
            }
        } else if let Some(rel) = line.strip_prefix("KERNEL ") {
            r.release = Some(rel.trim().into());
        } else if let Some(json) = line.strip_prefix("VERIFY_JSON ") {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(json) {
                r.tier = v["tier"].as_str().map(str::to_string);
                for p in v["programs"].as_array().into_iter().flatten() {
                    let name = p["program"].as_str().unwrap_or_default().to_string();
                    if let Some(n) = p["verified_instructions"].as_u64() {
                        r.verifier_instructions.insert(name.clone(), n);
                    }
                    if let Some(n) = p["instructions"].as_u64() {
                        r.instructions.insert(name, n);
                    }
                }
            }
        }
    }
    match out.status.code() {
        Some(EXIT_PASS) => r.passed = r.checks.values().all(|v| *v) && !r.checks.is_empty(),
        Some(124 | 137) => r.error = Some(format!("no verdict within {} s", timeout.as_secs())),
        Some(c) => r.error = Some(format!("guest verdict: fail (qemu exit {c})")),
        None => r.error = Some("qemu was killed".into()),
    }
    if !r.passed && r.error.is_none() {
        r.error = Some("a check failed".into());
    }
    r
}

pub fn kernel_test(root: &Path, kernels: &[String], json: Option<&Path>, timeout: Duration) -> Result<()> {
    for tool in ["qemu-system-x86_64", "cpio", "dpkg-deb", "apt-get", "timeout"] {
        if crate::which(tool).is_none() {
            bail!("missing: {tool}; fix: sudo apt-get install --no-install-recommends qemu-system-x86 busybox-static cpio");
        }
    }
    let work = root.join("target/kernel-test");
    std::fs::create_dir_all(&work)?;
    let initramfs = build_initramfs(&work, &root.join("target/release/redirector"))?;
    let mut results = Vec::new();
    for (i, k) in kernels.iter().enumerate() {
        eprintln!("[{}/{}] kernel {k}: fetching", i + 1, kernels.len());
        let r = match fetch_kernel(&work, k) {
            Ok(vmlinuz) => {
                eprintln!("[{}/{}] kernel {k}: booting {} under QEMU (TCG)", i + 1, kernels.len(), vmlinuz.display());
                boot(k, &vmlinuz, &initramfs, timeout)
            }
            Err(e) => KernelResult {
                kernel: k.clone(),
                release: None,
                passed: false,
                error: Some(format!("{e:#}")),
                checks: BTreeMap::new(),
                verifier_instructions: BTreeMap::new(),
                instructions: BTreeMap::new(),
                tier: None,
                seconds: 0.0,
            },
        };
        results.push(r);
    }

    // The matrix: kernel x check.
    let mut names: Vec<String> = results.iter().flat_map(|r| r.checks.keys().cloned()).collect();
    names.sort();
    names.dedup();
    println!();
    print!("{:<32}", "check");
    for r in &results {
        print!(" {:>16}", r.release.clone().unwrap_or_else(|| r.kernel.clone()));
    }
    println!();
    for n in &names {
        print!("{n:<32}");
        for r in &results {
            let v = match r.checks.get(n) {
                Some(true) => "pass",
                Some(false) => "FAIL",
                None => "-",
            };
            print!(" {v:>16}");
        }
        println!();
    }
    print!("{:<32}", "tier");
    for r in &results {
        print!(" {:>16}", r.tier.as_deref().unwrap_or("-"));
    }
    println!();
    let mut progs: Vec<String> = results.iter().flat_map(|r| r.instructions.keys().cloned()).collect();
    progs.sort();
    progs.dedup();
    for (label, pick) in [
        ("insns", (|r: &KernelResult| &r.instructions) as fn(&KernelResult) -> &BTreeMap<String, u64>),
        ("verified", |r: &KernelResult| &r.verifier_instructions),
    ] {
        for p in &progs {
            print!("{:<32}", format!("{label} {}", p.trim_start_matches("redirector_")));
            for r in &results {
                let v = pick(r).get(p).map_or_else(|| "-".into(), std::string::ToString::to_string);
                print!(" {v:>16}");
            }
            println!();
        }
    }
    for r in &results {
        if let Some(e) = &r.error {
            println!("kernel {}: {e} (serial console: target/kernel-test/linux-{}/console.log)", r.kernel, r.kernel);
        }
    }
    let report = serde_json::to_string_pretty(&results)?;
    let path = json.map_or_else(|| work.join("matrix.json"), Path::to_path_buf);
    std::fs::write(&path, report)?;
    eprintln!("matrix written to {}", path.display());
    let failed: Vec<&str> = results.iter().filter(|r| !r.passed).map(|r| r.kernel.as_str()).collect();
    if !failed.is_empty() {
        bail!("kernel-test failed on {}", failed.join(", "));
    }
    Ok(())
}
