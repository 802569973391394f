//! Developer tasks: `cargo xtask setup | build | run | test`.
//!
//! `setup` makes sure the pieces for building Rust eBPF are present and
//! installs them where it can; the other tasks call it when something is
//! missing.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod fn_length;
mod kernel_test;
mod layering;

/// bpf-linker release known to build against the machine's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM of Debian's rustc-web (the BPF-capable rustc with a precompiled core).
const DEBIAN_LLVM: &str = "22";
const DEBIAN_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf", "llvm-22-dev"];
const BPF_TARGET: &str = "bpfel-unknown-none";

#[derive(Parser)]
#[command(name = "xtask", about = "redirector developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check and install the eBPF toolchain (BPF-capable rustc, bpf-linker).
    Setup,
    /// Build the kernel programs and the `redirector` binary (release).
    Build,
    /// Build everything and start the agent with the embedded configuration.
    Run {
        /// Extra arguments for `redirector run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmark eBPF capture against iptables capture and direct on one
    /// host, and the cross-node HBONE path against direct between two
    /// nodes (root; needs nginx, iperf3 and oha). Writes
    /// results/bench.{md,json,svg} and results/bench-cross-node.svg.
    Bench {
        /// A short run (under 2 minutes).
        #[arg(long)]
        quick: bool,
        /// Also write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Rounds of every mode (interleaved).
        #[arg(long)]
        rounds: Option<usize>,
        /// Seconds per scenario.
        #[arg(long)]
        seconds: Option<f64>,
        /// Only these modes (comma-separated: direct,iptables,ebpf,ebpf+sockmap,ebpf+l7
        /// on one host; direct,hbone,hbone-iptables across nodes).
        #[arg(long)]
        modes: Option<String>,
        /// Only these suites (comma-separated: local,cross-node).
        #[arg(long)]
        suite: Option<String>,
        /// Only these scenarios (comma-separated: standard,max-rps,conn-rate,bulk,
        /// takeover; takeover replaces the agent under a steady load, in the
        /// ebpf and iptables modes).
        #[arg(long)]
        scenarios: Option<String>,
    },
    /// The lint CI runs: the module layering (no import cycle between
    /// files; see ARCHITECTURE.md), function length, rustfmt --check and
    /// clippy with warnings denied.
    Lint,
    /// Boot other kernels under QEMU and run the capture checks inside them.
    KernelTest {
        /// Comma-separated kernel series: 5.10, 6.1, 6.12.
        #[arg(long, default_value = "6.1")]
        kernels: String,
        /// Also write the matrix as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Seconds per kernel before it counts as no verdict.
        #[arg(long, default_value_t = 240)]
        timeout: u64,
    },
    /// Build, then run every test (unit tests and, as root, the privileged
    /// end-to-end tests).
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.task {
        Task::Setup => setup(true),
        Task::Build => setup(false).and_then(|()| build(true)),
        Task::Run { args } => setup(false).and_then(|()| run(&args)),
        Task::Test { args } => setup(false).and_then(|()| test(&args)),
        Task::Lint => setup(false).and_then(|()| lint()),
        Task::KernelTest { kernels, json, timeout } => setup(false).and_then(|()| {
            build(true)?;
            let ks: Vec<String> = kernels.split(',').map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).collect();
            kernel_test::kernel_test(&root_dir(), &ks, json.as_deref(), std::time::Duration::from_secs(timeout))
        }),
        Task::Bench { quick, json, rounds, seconds, modes, suite, scenarios } => {
            setup(false).and_then(|()| bench(quick, json, rounds, seconds, modes, suite, scenarios))
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn which(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH").map(|p| env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(h) = env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(h).join("bin"));
    }
    if let Some(h) = env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn debian_rustc_ready() -> bool {
    Path::new("/usr/bin/rustc").exists() && Path::new("/usr/lib/rustlib").join(BPF_TARGET).exists()
}

fn nightly_ready() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("lib/rustlib/src/rust/library/core").exists()
        })
}

fn step(n: usize, total: usize, what: &str) {
    eprintln!("[{n}/{total}] {what}");
}

fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Check the eBPF toolchain and install what is missing where possible.
/// `verbose` prints a line for what is already there too.
fn setup(verbose: bool) -> Result<()> {
    let apt = Path::new("/usr/bin/apt-get").exists();
    let rustc_ok = debian_rustc_ready() || nightly_ready();
    let linker_ok = which("bpf-linker").is_some();
    if rustc_ok && linker_ok {
        if verbose {
            step(1, 2, "BPF-capable rustc: present");
            step(2, 2, "bpf-linker: present");
            eprintln!("setup: everything needed to build the kernel programs is installed");
        }
        return Ok(());
    }

    // 1. The compiler.
    step(1, 2, "BPF-capable rustc");
    if rustc_ok {
        eprintln!("      present");
    } else if apt && is_root() {
        eprintln!("      installing {} with apt-get (about 30 s)", DEBIAN_PACKAGES.join(" "));
        sh(Command::new("apt-get").args(["update", "-q"]))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(DEBIAN_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    } else if which("rustup").is_some() && !apt {
        eprintln!("      installing a rustup nightly with rust-src");
        sh(Command::new("rustup").args(["toolchain", "install", "nightly", "--component", "rust-src"]))?;
    }
    if !(debian_rustc_ready() || nightly_ready()) {
        bail!(
            "missing: a rustc that builds for {BPF_TARGET}; fix: {}",
            if apt {
                format!("sudo apt-get install {}", DEBIAN_PACKAGES.join(" "))
            } else {
                "rustup toolchain install nightly --component rust-src".to_string()
            }
        );
    }

    // 2. The linker, matched to the compiler's LLVM.
    step(2, 2, "bpf-linker");
    if which("bpf-linker").is_some() {
        eprintln!("      present");
        return Ok(());
    }
    let llvm_prefix = PathBuf::from(format!("/usr/lib/llvm-{DEBIAN_LLVM}"));
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")]);
    if debian_rustc_ready() {
        if !llvm_prefix.join("lib").exists() {
            bail!(
                "missing: LLVM {DEBIAN_LLVM} development files for bpf-linker; fix: sudo apt-get install llvm-{DEBIAN_LLVM}-dev"
            );
        }
        cmd.args(["--no-default-features", "--features", &format!("llvm-{DEBIAN_LLVM}")])
            .env("LLVM_PREFIX", &llvm_prefix);
    }
    eprintln!("      building bpf-linker {BPF_LINKER_VERSION} from crates.io (about 2 minutes on 2 cores)");
    if let Err(e) = sh(&mut cmd) {
        bail!(
            "missing: bpf-linker ({e}); fix: LLVM_PREFIX={} cargo install bpf-linker@{BPF_LINKER_VERSION} --no-default-features --features llvm-{DEBIAN_LLVM}",
            llvm_prefix.display()
        );
    }
    eprintln!("setup: done");
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root_dir());
    c
}

fn build(release: bool) -> Result<()> {
    let mut c = cargo();
    c.args(["build", "--package", "redirector-user", "--bin", "redirector"]);
    if release {
        c.arg("--release");
    }
    sh(&mut c)
}

fn run(args: &[String]) -> Result<()> {
    build(true)?;
    let bin = root_dir().join("target/release/redirector");
    if !is_root() {
        bail!("the agent needs root to load eBPF programs; run: sudo {} run {}", bin.display(), args.join(" "));
    }
    eprintln!(
        "starting the agent; in another terminal try:\n  sudo {bin} exec -- curl -sI http://example.invalid/   # or any server you run\n  sudo {bin} status\nCtrl-C stops the agent; `sudo {bin} uninstall` removes the capture.",
        bin = bin.display()
    );
    let status = Command::new(&bin).arg("run").args(args).status()?;
    if !status.success() {
        bail!("the agent exited with {status}");
    }
    Ok(())
}

fn bench(
    quick: bool,
    json: Option<PathBuf>,
    rounds: Option<usize>,
    seconds: Option<f64>,
    modes: Option<String>,
    suite: Option<String>,
    scenarios: Option<String>,
) -> Result<()> {
    build(true)?;
    sh(cargo().args(["build", "--release", "--package", "redirector-tests", "--bin", "redirector-bench"]))?;
    sh(cargo().args(["build", "--release", "--package", "redirector-tests", "--bin", "takeover-bench"]))?;
    if !is_root() {
        bail!("the benchmark needs root (namespaces, cgroups, eBPF, iptables); run: sudo -E cargo xtask bench");
    }
    // `takeover` is its own binary (it replaces the agent mid-run); the
    // other scenarios are the throughput and latency suites.
    let (takeover, rest) = match scenarios.as_deref() {
        None => (suite.is_none(), None),
        Some(list) => {
            let rest: Vec<&str> = list.split(',').filter(|s| *s != "takeover").collect();
            (rest.len() < list.split(',').count(), (!rest.is_empty()).then(|| rest.join(",")))
        }
    };
    let takeover_modes: Option<Vec<&str>> =
        modes.as_deref().map(|m| m.split(',').filter(|m| ["ebpf", "iptables"].contains(m)).collect());
    let root = root_dir();
    if rest.is_some() || scenarios.is_none() {
        let mut c = Command::new(root.join("target/release/redirector-bench"));
        c.env("REDIRECTOR_BIN", root.join("target/release/redirector")).arg("--results").arg(root.join("results"));
        if quick {
            c.arg("--quick");
        }
        if let Some(j) = json {
            c.arg("--json").arg(j);
        }
        if let Some(r) = rounds {
            c.args(["--rounds", &r.to_string()]);
        }
        if let Some(s) = seconds {
            c.args(["--seconds", &s.to_string()]);
        }
        if let Some(m) = &modes {
            c.args(["--modes", m]);
        }
        if let Some(s) = rest {
            c.args(["--scenarios", &s]);
        }
        if let Some(s) = suite {
            c.args(["--suite", &s]);
        }
        sh(&mut c)?;
    }
    if takeover && takeover_modes.as_ref().is_none_or(|m| !m.is_empty()) {
        let mut c = Command::new(root.join("target/release/takeover-bench"));
        c.env("REDIRECTOR_BIN", root.join("target/release/redirector")).arg("--results").arg(root.join("results"));
        if quick {
            c.arg("--quick");
        }
        if let Some(r) = rounds {
            c.args(["--rounds", &r.to_string()]);
        }
        if let Some(s) = seconds {
            c.args(["--seconds", &s.max(3.0).to_string()]);
        }
        if let Some(m) = takeover_modes {
            c.args(["--modes", &m.join(",")]);
        }
        sh(&mut c)?;
    }
    Ok(())
}

fn lint() -> Result<()> {
    step(1, 4, "module layering");
    let (files, edges) = layering::check(&root_dir().join("redirector-user/src"))?;
    eprintln!("      {files} files, {edges} imports between them, no cycle, every import allowed");
    step(2, 4, "function length");
    let n = fn_length::check(&root_dir(), &["redirector-user/src", "redirector-ebpf/src", "xtask/src"])?;
    eprintln!("      {n} functions, none over the limit");
    step(3, 4, "rustfmt --check");
    sh(cargo().args(["fmt", "--all", "--check"])).context("fix: cargo fmt --all")?;
    step(4, 4, "clippy (warnings denied)");
    sh(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))
        .context("fix what clippy reports above")?;
    eprintln!("lint: clean");
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    // The end-to-end tests drive the real binary.
    build(false)?;
    if !is_root() {
        eprintln!(
            "note: not root: the privileged end-to-end tests will be skipped (CI runs them as root); run `sudo -E cargo xtask test` to include them"
        );
    }
    for tool in ["ip", "nsenter", "curl", "bpftool", "bash", "python3", "iptables-save"] {
        if is_root() && which(tool).is_none() && !Path::new("/usr/sbin").join(tool).exists() {
            bail!("missing: {tool}, needed by the end-to-end tests; fix: sudo apt-get install iproute2 util-linux curl bpftool bash python3 iptables");
        }
    }
    let mut c = cargo();
    c.args(["test", "--workspace"]).args(args);
    let unit_and_e2e = sh(&mut c);

    // The kernel matrix: the capture checks on other kernels under QEMU.
    let matrix = if !is_root() {
        Ok(())
    } else if which("qemu-system-x86_64").is_none() {
        if env::var_os("CI").is_some() {
            Err(anyhow::anyhow!(
                "the kernel matrix needs qemu-system-x86, busybox-static and cpio; .ci/run installs them"
            ))
        } else {
            eprintln!("SKIPPED: the kernel matrix (apt-get install --no-install-recommends qemu-system-x86 busybox-static cpio to run it)");
            Ok(())
        }
    } else {
        build(true).and_then(|()| {
            let ks: Vec<String> = KERNEL_MATRIX.iter().map(std::string::ToString::to_string).collect();
            kernel_test::kernel_test(&root_dir(), &ks, None, std::time::Duration::from_mins(4))
        })
    };
    unit_and_e2e.and(matrix)
}

/// The kernels `cargo xtask test` boots: the oldest and newest Debian LTS
/// series our users run, and the one between.
const KERNEL_MATRIX: [&str; 3] = ["5.10", "6.1", "6.12"];
