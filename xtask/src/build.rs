//! Build, lint, test, demo and bench runners.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn run(mut cmd: Command) -> anyhow::Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Builds the agent (whose build script builds the programs) and exports the object.
pub fn ebpf() -> anyhow::Result<PathBuf> {
    let out = cargo()
        .args([
            "build",
            "-p",
            "lb-agent",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo build -p lb-agent")?;
    if !out.status.success() {
        bail!("building lb-agent (and the eBPF programs) failed");
    }
    let out_dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            m["reason"] == "build-script-executed"
                && m["package_id"]
                    .as_str()
                    .is_some_and(|p| p.contains("lb-agent"))
        })
        .find_map(|m| m["out_dir"].as_str().map(PathBuf::from))
        .context("lb-agent build script output not found")?;
    let dest_dir = workspace_root().join("target/bpf");
    std::fs::create_dir_all(&dest_dir).context("creating target/bpf")?;
    let dest = dest_dir.join("lb-ebpf.o");
    std::fs::copy(out_dir.join("lb-ebpf"), &dest).context("copying the eBPF object")?;
    eprintln!("xtask: eBPF object: {}", dest.display());
    Ok(dest)
}

pub fn lint() -> anyhow::Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt)?;
    let mut host = cargo();
    host.args([
        "clippy",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(host)?;
    // The eBPF crate alone, so features do not unify with std users.
    let mut bpf = Command::new("rustup");
    bpf.current_dir(workspace_root())
        .args([
            "run", "nightly", "cargo", "clippy", "-p", "lb-ebpf", "--", "-D", "warnings",
        ])
        .args(["-C", "panic=abort"]);
    run(bpf)
}

pub fn test(extra: &[String]) -> anyhow::Result<()> {
    let mut build = cargo();
    build.args([
        "build",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
    ]);
    run(build)?;
    lint()?;
    let agent = workspace_root().join("target/debug/lb-agent");
    let mut test = cargo();
    test.args([
        "test",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--no-fail-fast",
    ])
    .env("KPLB_AGENT_BIN", &agent)
    .args(["--"])
    .args(extra);
    run(test)
}

pub fn demo() -> anyhow::Result<()> {
    let mut build = cargo();
    build.args(["build", "-p", "lb-agent", "-p", "lb-tests", "--bins"]);
    run(build)?;
    let mut demo = Command::new(workspace_root().join("target/debug/kplb-demo"));
    demo.env(
        "KPLB_AGENT_BIN",
        workspace_root().join("target/debug/lb-agent"),
    );
    run(demo)
}

pub fn bench(quick: bool) -> anyhow::Result<()> {
    crate::bench::run(quick)
}
