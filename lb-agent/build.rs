//! Builds the eBPF programs (nightly, bpfel-unknown-none, BTF) and embeds them in the agent.
//! aya-build re-runs this whenever anything under lb-ebpf/ changes, so the embedded object is
//! never stale; a missing toolchain fails the build instead of embedding nothing.
use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    if std::process::Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("bpf-linker not found: run `cargo xtask setup` (installs the eBPF toolchain)");
    }
    let metadata = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .args(["metadata", "--format-version=1", "--no-deps"])
        .output()
        .context("cargo metadata")?;
    let meta: serde_json::Value =
        serde_json::from_slice(&metadata.stdout).context("cargo metadata json")?;
    let pkg = meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "lb-ebpf"))
        .context("lb-ebpf not in workspace")?;
    let manifest = pkg["manifest_path"].as_str().context("manifest_path")?;
    let root = std::path::Path::new(manifest)
        .parent()
        .context("lb-ebpf dir")?;
    let root = root.to_str().context("utf-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building lb-ebpf (run `cargo xtask setup` if the nightly toolchain or rust-src is missing)")
}
