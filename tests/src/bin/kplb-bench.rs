//! kplb-bench: the lab half of `cargo xtask bench` (root). Writes one JSON document of raw
//! results; `cargo xtask bench` turns it into tables, `bench/RESULTS.md` and the chart.
//!
//! ```text
//! kplb-bench [--quick] --out FILE [--sections xdp,conn,nodeport,control] [--sizes 100,1000]
//!            [--load-limit SECONDS] [--client PATH] [--xdp-variants name=PATH,...]
//! ```
//! Sections (see each module): `xdp` = per-packet cost of the XDP paths (BPF_PROG_TEST_RUN,
//! minus an XDP_PASS floor); `conn` = connection rate/latency through a ClusterIP for no load
//! balancer, kplb, kube-proxy iptables / nftables / IPVS at several service counts; `nodeport`
//! = NodePort packets per second on a veth; `control` = the agent's full sync, change latency
//! and memory at 10k services. `--sizes` sets the service counts of `xdp` and `conn`;
//! `--load-limit` the time box of one dataplane's load in `conn`. Each section's wall time is
//! printed and recorded (`wall_s`). `--xdp-variants` measures other lb-agent builds side by side
//! in the `xdp` section. Everything runs in a lab (network namespaces, cgroups, bpffs
//! dirs under the `kplab-<pid>-` prefix) that is removed at the end, also on failure.
//! Needs `$KPLB_AGENT_BIN` (a release lb-agent) and `kplb-connclient`/`netexec` next to itself.

#[path = "kplb-bench/bpf.rs"]
mod bpf;
#[path = "kplb-bench/bpf_stats.rs"]
mod bpf_stats;
#[path = "kplb-bench/conn.rs"]
mod conn;
#[path = "kplb-bench/control.rs"]
mod control;
#[path = "kplb-bench/lab.rs"]
mod lab;
#[path = "kplb-bench/nodeport.rs"]
mod nodeport;
#[path = "kplb-bench/rules.rs"]
mod rules;
#[path = "kplb-bench/services.rs"]
mod services;
#[path = "kplb-bench/stats.rs"]
mod stats;
#[path = "kplb-bench/xdp.rs"]
mod xdp;

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

struct Args {
    quick: bool,
    out: PathBuf,
    sections: Vec<String>,
    sizes: Option<Vec<usize>>,
    load_limit: Option<Duration>,
    client: Option<PathBuf>,
    xdp_variants: Vec<(String, PathBuf)>,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        quick: false,
        out: PathBuf::new(),
        sections: ["xdp", "conn", "nodeport", "control"]
            .map(String::from)
            .to_vec(),
        sizes: None,
        load_limit: None,
        client: None,
        xdp_variants: Vec::new(),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--quick" => a.quick = true,
            "--out" => a.out = PathBuf::from(value()?),
            "--sections" => a.sections = value()?.split(',').map(str::to_owned).collect(),
            "--sizes" => {
                a.sizes = Some(
                    value()?
                        .split(',')
                        .map(|s| s.parse().with_context(|| format!("size {s:?}")))
                        .collect::<Result<_>>()?,
                );
            }
            "--load-limit" => {
                let v = value()?;
                let secs: f64 = v.parse().with_context(|| format!("--load-limit {v:?}"))?;
                a.load_limit = Some(Duration::from_secs_f64(secs));
            }
            "--client" => a.client = Some(PathBuf::from(value()?)),
            "--xdp-variants" => {
                a.xdp_variants = value()?
                    .split(',')
                    .map(|v| {
                        let (name, path) = v
                            .split_once('=')
                            .with_context(|| format!("--xdp-variants: {v:?} is not name=PATH"))?;
                        Ok((name.to_owned(), PathBuf::from(path)))
                    })
                    .collect::<Result<_>>()?;
            }
            _ => bail!("unknown flag {flag}"),
        }
    }
    if a.out.as_os_str().is_empty() {
        bail!("--out FILE is required");
    }
    Ok(a)
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let p = exe.with_file_name(name);
    if !p.is_file() {
        bail!("{} not found (build the lb-tests binaries)", p.display());
    }
    Ok(p)
}

// The time boxes keep each section within `cargo xtask bench`'s time plan (its run-time
// section): xdp ≤ 2 min (the agent's sync boxed per size), conn ≤ 13 min (at 30k services the
// loads take at most 8 min together), nodeport 1 min; control rides on conn's kplb agent at
// 10k services (changes boxed to 45 s).

fn control_config(quick: bool) -> control::Config {
    control::Config {
        services: if quick { 1000 } else { 10_000 },
        cold_starts: if quick { 2 } else { 3 },
        changes: 1000,
        change_budget: Duration::from_secs(if quick { 15 } else { 45 }),
    }
}

fn xdp_config(a: &Args) -> xdp::Config {
    xdp::Config {
        calls: if a.quick { 2000 } else { 20_000 },
        sizes: a.sizes.clone().unwrap_or_else(|| {
            if a.quick {
                vec![1, 1000]
            } else {
                vec![1, 1000, 10_000, 100_000]
            }
        }),
        sync_limit: Duration::from_secs(if a.quick { 60 } else { 90 }),
        variants: a.xdp_variants.clone(),
    }
}

fn conn_config(a: &Args) -> Result<conn::Config> {
    Ok(conn::Config {
        sizes: a.sizes.clone().unwrap_or_else(|| {
            if a.quick {
                vec![100, 1000]
            } else {
                vec![100, 1000, 10_000, 30_000]
            }
        }),
        runs: if a.quick { 3 } else { 9 },
        count: if a.quick { 1000 } else { 3000 },
        warmup: if a.quick { 100 } else { 200 },
        client: match &a.client {
            Some(p) => p.clone(),
            None => sibling("kplb-connclient")?,
        },
        load_limit: a
            .load_limit
            .unwrap_or(Duration::from_secs(if a.quick { 60 } else { 240 })),
        partial: a.out.with_extension("conn-partial.json"),
        // Section 4 rides on kplb's agent at its size when both are asked for.
        control: a
            .sections
            .iter()
            .any(|s| s == "control")
            .then(|| control_config(a.quick)),
    })
}

fn nodeport_config(quick: bool) -> nodeport::Config {
    nodeport::Config {
        seconds: if quick { 1.0 } else { 2.0 },
        runs: if quick { 3 } else { 5 },
    }
}

fn run(a: &Args) -> Result<Value> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("kplb-bench creates network namespaces and loads eBPF programs: run it as root");
    }
    let started = Instant::now();
    let mut rng = stats::Rng::from_clock();
    let seed = rng.0;
    let mut out = serde_json::Map::new();
    out.insert("quick".into(), json!(a.quick));
    out.insert("shuffle_seed".into(), json!(seed));
    for section in &a.sections {
        let t = Instant::now();
        eprintln!("kplb-bench: section {section}");
        let res = match section.as_str() {
            "conn" => conn_config(a).and_then(|cfg| {
                let (conn, control) = conn::run(&cfg, &mut rng)?;
                if let Some(c) = control {
                    out.insert("control".into(), c);
                }
                Ok(conn)
            }),
            "xdp" => xdp::run(&xdp_config(a), &mut rng),
            "nodeport" => nodeport::run(&nodeport_config(a.quick), &mut rng),
            "control" if out.contains_key("control") => continue,
            "control" => control::run(&control_config(a.quick), &mut rng),
            other => bail!("unknown section {other:?}"),
        };
        let mut v = res.unwrap_or_else(|e| {
            eprintln!("kplb-bench: section {section} failed: {e:#}");
            json!({"error": format!("{e:#}")})
        });
        let wall = t.elapsed().as_secs_f64();
        eprintln!("kplb-bench: section {section} took {wall:.1} s");
        v["wall_s"] = json!(wall);
        out.insert(section.clone(), v);
        // Keep what is done so far, in case a later section is interrupted.
        std::fs::write(&a.out, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", a.out.display()))?;
    }
    eprintln!(
        "kplb-bench: all sections took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(Value::Object(out))
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kplb-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kplb-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
