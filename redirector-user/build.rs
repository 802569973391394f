//! Builds the kernel programs (redirector-ebpf) for bpfel-unknown-none and
//! hands the object to the `redirector` binary, which embeds it.
//!
//! Two compilers can build Rust for the BPF target, chosen in this order:
//! 1. a rustc with a precompiled `core` for bpfel-unknown-none (Debian's
//!    `rustc-web` + `libstd-rust-web-dev-bpf`, at /usr/bin/rustc), used
//!    through `RUSTC` with `RUSTC_BOOTSTRAP` for aya-ebpf's one unstable
//!    feature;
//! 2. a rustup nightly with `rust-src`, through `-Z build-std=core`.
//!
//! `REDIRECTOR_BPF_RUSTC` names another rustc of the first kind. When neither
//! is present the build stops with the command that installs one.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const TARGET: &str = "bpfel-unknown-none";

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent().context("workspace root")?.to_path_buf();
    let ebpf_dir = root.join("redirector-ebpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    for p in ["src", "Cargo.toml", "common/src", "common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=REDIRECTOR_BPF_RUSTC");

    // The kernel object gets its own target directory so this nested cargo
    // never waits on the lock the outer build holds.
    let target_dir = env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from).join("bpf");

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = match bpf_compiler() {
        Some(Compiler::Precompiled(rustc)) => {
            let mut c = Command::new(&cargo);
            c.env("RUSTC", rustc).env("RUSTC_BOOTSTRAP", "1");
            c
        }
        Some(Compiler::Nightly) => {
            let mut c = Command::new("rustup");
            c.args(["run", "nightly", "cargo"]);
            c.env_remove("RUSTC");
            c
        }
        None => bail!(
            "no compiler for the BPF target: run `cargo xtask setup` (on Debian: apt-get install \
             rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev; elsewhere: rustup toolchain \
             install nightly --component rust-src), then build again"
        ),
    };
    let Some(linker) = which("bpf-linker") else {
        bail!(
            "bpf-linker is not installed: run `cargo xtask setup` (or LLVM_PREFIX=/usr/lib/llvm-22 \
             cargo install bpf-linker --no-default-features --features llvm-22)"
        );
    };
    // rustc finds bpf-linker on PATH; make sure the one found is there.
    let mut path: Vec<PathBuf> = vec![linker.parent().context("bpf-linker dir")?.to_path_buf()];
    path.extend(env::var_os("PATH").map(|p| env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default());
    cmd.env("PATH", env::join_paths(path)?);
    cmd.current_dir(&ebpf_dir)
        .args(["build", "--release", "--target", TARGET, "--bin", "redirector-ebpf"])
        .arg("--target-dir")
        .arg(&target_dir)
        // BTF is needed for the socket storage map; debug info feeds it.
        .env("CARGO_ENCODED_RUSTFLAGS", ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"))
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR");
    for (k, _) in env::vars() {
        if k.starts_with("CARGO_FEATURE_") || k.starts_with("CARGO_CFG_") || k == "TARGET" {
            cmd.env_remove(k);
        }
    }
    if matches!(bpf_compiler(), Some(Compiler::Nightly)) {
        cmd.args(["-Z", "build-std=core"]);
    }
    let status = cmd.status().context("running cargo for the kernel programs")?;
    if !status.success() {
        bail!("building the kernel programs (redirector-ebpf) failed; see the errors above");
    }
    let obj = target_dir.join(TARGET).join("release").join("redirector-ebpf");
    std::fs::copy(&obj, out_dir.join("redirector.bpf.o")).with_context(|| format!("copying {}", obj.display()))?;
    Ok(())
}

enum Compiler {
    Precompiled(PathBuf),
    Nightly,
}

fn bpf_compiler() -> Option<Compiler> {
    if let Some(rustc) = env::var_os("REDIRECTOR_BPF_RUSTC") {
        return Some(Compiler::Precompiled(rustc.into()));
    }
    let debian = Path::new("/usr/bin/rustc");
    if debian.exists() && Path::new("/usr/lib/rustlib").join(TARGET).exists() {
        return Some(Compiler::Precompiled(debian.to_path_buf()));
    }
    let nightly_src = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .is_some_and(|sysroot| sysroot.join("lib/rustlib/src/rust/library/core").exists());
    nightly_src.then_some(Compiler::Nightly)
}

fn which(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH").map(|p| env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}
