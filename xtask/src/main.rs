//! Project tasks. `cargo xtask demo` and `cargo xtask test` are the two commands a newcomer runs;
//! both install what a fresh machine lacks first (`setup`).

mod bench;
mod build;
mod setup;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "kplb project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent): nightly rust-src, LLVM 22 dev
    /// packages, bpf-linker built for LLVM 22, bpftool, iproute2, and iptables, nftables and
    /// ipvsadm for the benchmarks; mount bpffs.
    Setup,
    /// Build the eBPF programs (release, with BTF) and copy the object to target/bpf/lb-ebpf.o.
    BuildEbpf,
    /// cargo fmt --check and clippy -D warnings (host crates and the eBPF crate separately).
    Lint,
    /// The whole suite: setup, build, lints, unit tests, BPF_PROG_TEST_RUN and lab end-to-end
    /// tests (root needed; under CI=true a test that cannot run fails instead of skipping).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// A 2-node lab of network namespaces with one agent per node, real ClusterIP traffic, and
    /// the backend spread, then teardown.
    Demo,
    /// Benchmarks (root): XDP per-packet cost, ClusterIP connections through kplb and kube-proxy's
    /// iptables/nftables/IPVS dataplanes at 100..30k services, NodePort packet rate, control
    /// plane, Maglev. Writes bench/RESULTS.md and bench/services.svg.
    Bench {
        /// Fewer sizes and iterations (under 5 minutes); writes target/bench/RESULTS-quick.md.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::BuildEbpf => build::ebpf().map(|_| ()),
        Cmd::Lint => build::lint(),
        Cmd::Test { args } => setup::run().and_then(|()| build::test(&args)),
        Cmd::Demo => setup::run().and_then(|()| build::demo()),
        Cmd::Bench { quick } => setup::run().and_then(|()| build::bench(quick)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
