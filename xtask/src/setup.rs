//! Idempotent installation of everything the build and the tests need on a fresh Debian
//! machine. Each step checks first and says what it found or did.

use std::process::Command;

use anyhow::{Context as _, bail};

/// bpf-linker's LLVM 22 build; its default feature wants LLVM 23.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libclang-22-dev",
    "bpftool",
    "iproute2",
    // `cargo xtask bench` rebuilds kube-proxy's dataplanes to compare against.
    "iptables",
    "nftables",
    "ipvsadm",
];

pub fn run() -> anyhow::Result<()> {
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    bpffs()?;
    Ok(())
}

fn ok(what: &str) {
    eprintln!("setup: ok      {what}");
}

fn doing(what: &str) {
    eprintln!("setup: install {what}");
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        ok(&format!("apt packages ({})", APT_PACKAGES.join(" ")));
        return Ok(());
    }
    if !is_root() {
        bail!("missing packages {missing:?}: run `cargo xtask setup` as root (apt-get)");
    }
    doing(&format!("apt packages: {}", missing.join(" ")));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn rust_src() -> anyhow::Result<()> {
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        doing("nightly toolchain (for the BPF target)");
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("rustup component list")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        ok("nightly with rust-src");
        return Ok(());
    }
    doing("rust-src for nightly (build-std=core)");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = &version
        && out.status.success()
    {
        ok(&format!(
            "bpf-linker ({})",
            String::from_utf8_lossy(&out.stdout).trim()
        ));
        return Ok(());
    }
    doing(&format!(
        "bpf-linker {BPF_LINKER_VERSION} for LLVM 22 (a few minutes)"
    ));
    // Without LLVM_PREFIX its build script finds Debian's default llvm-config (an older LLVM).
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
    });
    if mounted {
        ok("bpffs on /sys/fs/bpf");
        return Ok(());
    }
    if !is_root() {
        eprintln!("setup: skip    mounting bpffs on /sys/fs/bpf (needs root)");
        return Ok(());
    }
    doing("bpffs on /sys/fs/bpf");
    // Inside an image build there is no mount privilege, and only the tests need bpffs.
    if let Err(e) = run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])) {
        eprintln!("setup: warning could not mount bpffs ({e:#}); tests that pin maps will fail");
    }
    Ok(())
}
