//! `cargo xtask bench [--quick]`: every benchmark in one run (root), tables on stdout,
//! `bench/RESULTS.md` and `bench/services.svg`.
//!
//! Steps: build release binaries (agent, lab bench, connection client, netexec, the in-process
//! sync bench); record the machine; run the in-process sync bench (`lb-agent/benches/sync.rs`),
//! the lab bench (`kplb-bench`: XDP per-packet cost, ClusterIP connections through each
//! dataplane, NodePort packet rate, the agent's control plane) and the Maglev bench; render.
//! Raw results go to `bench/results.json`. A `--quick` run (fewer sizes and iterations) writes
//! `target/bench/RESULTS-quick.md` and its chart instead, so it never replaces recorded numbers.
//! No timing is asserted anywhere: targets are printed beside the results.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::build::workspace_root;

/// Release executables by name, from cargo's JSON messages.
fn build_release(args: &[&str]) -> Result<Vec<PathBuf>> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root())
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit());
    eprintln!("xtask: {cmd:?}");
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .collect())
}

fn find(exes: &[PathBuf], name: &str) -> Result<PathBuf> {
    exes.iter()
        .find(|p| {
            p.file_name().and_then(|f| f.to_str()).is_some_and(|f| {
                f == name || f.strip_prefix(name).is_some_and(|r| r.starts_with('-'))
            })
        })
        .cloned()
        .with_context(|| format!("no {name} among the built executables"))
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .current_dir(workspace_root())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let dirty = !sh("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    json!({
        "cpu": cpu,
        "nproc": sh("nproc", &[]),
        "kernel": sh("uname", &["-r"]),
        "commit": sh("git", &["rev-parse", "HEAD"]),
        "dirty": dirty,
        "date": sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "iptables": sh("iptables", &["--version"]),
        "nft": sh("nft", &["--version"]),
        "rustc": sh("rustc", &["--version"]),
    })
}

/// Runs `cmd` pinned to CPU 1 (`taskset`), output inherited, failing on a non-zero exit.
fn run_pinned(exe: &Path, args: &[&str], env: &[(&str, &Path)]) -> Result<()> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1"]).arg(exe).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn read_json(path: &Path) -> Value {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| json!({"error": format!("no results in {}", path.display())}))
}

/// Wall time of each step of a run, printed as it ends and recorded in the results.
#[derive(Default)]
struct Steps(serde_json::Map<String, Value>);

impl Steps {
    fn time<T>(&mut self, name: &str, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        let secs = t.elapsed().as_secs_f64();
        eprintln!("xtask: step {name} took {secs:.0} s");
        self.0.insert(name.into(), json!(secs));
        r
    }
}

struct Binaries {
    agent: PathBuf,
    lab_bench: PathBuf,
    sync_bench: PathBuf,
}

fn build_binaries() -> Result<Binaries> {
    let exes = build_release(&[
        "build",
        "--release",
        "-p",
        "lb-agent",
        "-p",
        "lb-tests",
        "--bins",
    ])?;
    let sync_bench = find(
        &build_release(&["bench", "-p", "lb-agent", "--bench", "sync", "--no-run"])?,
        "sync",
    )?;
    // The Maglev bench is built here too, so its timed run does not compile.
    build_release(&["bench", "-p", "lb-common", "--bench", "maglev", "--no-run"])?;
    Ok(Binaries {
        agent: find(&exes, "lb-agent")?,
        lab_bench: find(&exes, "kplb-bench")?,
        sync_bench,
    })
}

/// `kplb-bench` (it pins its own processes: client CPU 1, backends CPU 0); a failure still
/// leaves what it recorded.
fn run_lab_bench(bins: &Binaries, args: &[&str]) {
    let mut cmd = Command::new(&bins.lab_bench);
    cmd.args(args).env("KPLB_AGENT_BIN", &bins.agent);
    eprintln!("xtask: {cmd:?}");
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("xtask: kplb-bench exited with {s}; rendering what it recorded"),
        Err(e) => eprintln!("xtask: kplb-bench: {e}"),
    }
}

/// The Maglev bench's markdown report (it also rewrites `bench/maglev.md` in a full run).
fn maglev_bench(quick: bool) -> Result<String> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1"])
        .arg(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args(["bench", "-p", "lb-common", "--bench", "maglev"])
        .stderr(Stdio::inherit());
    if quick {
        cmd.args(["--", "--quick"]);
    }
    eprintln!("xtask: {cmd:?}");
    let out = cmd.output().context("running the Maglev bench")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(quick: bool) -> Result<()> {
    // Re-render recorded raw results without measuring (for working on the report).
    if let Some(raw) = std::env::var_os("KPLB_BENCH_RENDER") {
        let all: Value = serde_json::from_str(&std::fs::read_to_string(&raw)?)?;
        let dir = workspace_root().join("target/bench");
        std::fs::create_dir_all(&dir)?;
        let maglev =
            std::fs::read_to_string(workspace_root().join("bench/maglev.md")).unwrap_or_default();
        std::fs::write(
            dir.join("RESULTS-render.md"),
            report::markdown(&all, &maglev),
        )?;
        std::fs::write(
            dir.join("services-render.svg"),
            report::svg(&all["lab"]["conn"]),
        )?;
        eprintln!(
            "xtask: rendered {} into {}",
            PathBuf::from(raw).display(),
            dir.display()
        );
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmarks create network namespaces and load eBPF programs: run `cargo xtask bench` as root"
        );
    }
    let started = Instant::now();
    let root = workspace_root();
    let mut steps = Steps::default();
    let bins = steps.time("build", build_binaries)?;

    let out_dir = if quick {
        root.join("target/bench")
    } else {
        root.join("bench")
    };
    std::fs::create_dir_all(&out_dir).context("creating the output directory")?;
    let scratch = root.join("target/bench");
    std::fs::create_dir_all(&scratch)?;

    // Load average, sampled through the whole run.
    let samples = Arc::new(Mutex::new(vec![loadavg()]));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (samples, stop) = (samples.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..100 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                if let Ok(mut s) = samples.lock() {
                    s.push(loadavg());
                }
            }
        })
    };
    let mut machine = machine();

    let q: &[&str] = if quick { &["--quick"] } else { &[] };
    let sync_json = scratch.join("sync.json");
    let _ = std::fs::remove_file(&sync_json);
    let mut args = q.to_vec();
    args.extend(["--out", sync_json.to_str().context("path")?]);
    steps.time("sync_bench", || {
        if let Err(e) = run_pinned(&bins.sync_bench, &args, &[]) {
            eprintln!("xtask: sync bench: {e:#}");
        }
    });
    let lab_json = scratch.join("lab.json");
    let _ = std::fs::remove_file(&lab_json);
    let mut args = q.to_vec();
    args.extend(["--out", lab_json.to_str().context("path")?]);
    steps.time("lab", || run_lab_bench(&bins, &args));
    let maglev = steps.time("maglev", || maglev_bench(quick))?;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let mut load: Vec<f64> = samples.lock().map(|s| s.clone()).unwrap_or_default();
    load.push(loadavg());
    machine["load"] = json!(load);
    machine["wall_s"] = json!(started.elapsed().as_secs_f64());
    machine["steps_s"] = Value::Object(steps.0);
    machine["quick"] = json!(quick);

    let all = json!({
        "machine": machine,
        "sync": read_json(&sync_json),
        "lab": read_json(&lab_json),
    });
    let md = report::markdown(&all, &maglev);
    let svg = report::svg(&all["lab"]["conn"]);
    println!("{md}");
    let (md_path, svg_path) = if quick {
        (
            out_dir.join("RESULTS-quick.md"),
            out_dir.join("services-quick.svg"),
        )
    } else {
        (out_dir.join("RESULTS.md"), out_dir.join("services.svg"))
    };
    std::fs::write(&md_path, md).with_context(|| format!("writing {}", md_path.display()))?;
    std::fs::write(&svg_path, svg).with_context(|| format!("writing {}", svg_path.display()))?;
    let raw = out_dir.join(if quick {
        "results-quick.json"
    } else {
        "results.json"
    });
    std::fs::write(&raw, serde_json::to_string_pretty(&all)?)?;
    eprintln!(
        "xtask: wrote {}, {} and {} in {:.0} s",
        md_path.display(),
        svg_path.display(),
        raw.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Markdown and SVG from the raw results.
mod report {
    use super::*;

    pub fn num(v: &Value) -> Option<f64> {
        v.as_f64()
    }

    pub fn mmm(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some((v[0], v[(v.len() - 1) / 2], v[v.len() - 1]))
    }

    fn fmt_mmm(m: Option<(f64, f64, f64)>, prec: usize) -> String {
        match m {
            Some((lo, med, hi)) => format!("{med:.prec$} ({lo:.prec$}–{hi:.prec$})"),
            None => "–".into(),
        }
    }

    fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
        Some(a? / b?)
    }

    fn fmt_ratio(r: Option<f64>) -> String {
        r.map_or("–".into(), |r| format!("{r:.3}"))
    }

    /// Per (dataplane, size): medians of each run's p50, p99 and conn/s, with min–max.
    pub struct ConnRow {
        pub dataplane: String,
        pub services: u64,
        pub p50: Option<(f64, f64, f64)>,
        pub p99: Option<(f64, f64, f64)>,
        pub cps: Option<(f64, f64, f64)>,
        pub load_s: Option<f64>,
        pub error: Option<String>,
        pub detail: Value,
        /// Each round's run, in round order.
        pub runs: Vec<Value>,
        /// kplb: its socket programs' kernel run time over one extra run.
        pub hooks: Value,
    }

    /// The median over rounds of `r`'s `key` divided by the baseline's in the same round
    /// (rounds are seconds apart, so the pair shares the machine's state of the moment).
    pub fn paired(r: &ConnRow, base: Option<&ConnRow>, key: &str) -> Option<f64> {
        let base = base?;
        let v: Vec<f64> = r
            .runs
            .iter()
            .zip(&base.runs)
            .filter_map(|(a, b)| Some(num(&a[key])? / num(&b[key])?))
            .filter(|x| x.is_finite())
            .collect();
        med(mmm(v))
    }

    pub fn conn_rows(conn: &Value) -> Vec<ConnRow> {
        conn["results"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        let runs = r["runs"].as_array().cloned().unwrap_or_default();
                        let col = |k: &str| mmm(runs.iter().filter_map(|x| num(&x[k])).collect());
                        ConnRow {
                            dataplane: r["dataplane"].as_str().unwrap_or("?").to_owned(),
                            services: r["services"].as_u64().unwrap_or(0),
                            p50: col("p50_us"),
                            p99: col("p99_us"),
                            cps: col("conn_per_s"),
                            load_s: num(&r["load_s"]),
                            error: r["error"].as_str().map(str::to_owned),
                            detail: r["detail"].clone(),
                            runs,
                            hooks: r["hooks"].clone(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    const ORDER: [&str; 5] = ["none", "kplb", "iptables", "nftables", "ipvs"];

    fn label(dp: &str) -> &str {
        match dp {
            "none" => "no load balancer (pod IPs)",
            "kplb" => "kplb (socket LB)",
            "iptables" => "kube-proxy iptables",
            "nftables" => "kube-proxy nftables",
            "ipvs" => "kube-proxy IPVS",
            other => other,
        }
    }

    /// The shuffled orders of a size's rounds, compactly: ` (rounds: kplb → none → …; …)`;
    /// empty when not recorded.
    fn rounds(orders: &Value) -> String {
        let orders: Vec<String> = orders
            .as_array()
            .map(|rounds| {
                rounds
                    .iter()
                    .filter_map(|r| r.as_array())
                    .map(|r| {
                        let dps: Vec<&str> = r.iter().filter_map(|v| v.as_str()).collect();
                        dps.join(" → ")
                    })
                    .collect()
            })
            .unwrap_or_default();
        if orders.is_empty() {
            return String::new();
        }
        format!(" (rounds: {})", orders.join("; "))
    }

    /// A count for a table cell (the agent's log numbers arrive as floats).
    fn int(v: &Value) -> String {
        num(v).map_or("–".into(), |x| format!("{x:.0}"))
    }

    fn med(m: Option<(f64, f64, f64)>) -> Option<f64> {
        m.map(|(_, m, _)| m)
    }

    pub fn markdown(all: &Value, maglev: &str) -> String {
        let mut o = String::new();
        let m = &all["machine"];
        let lab = &all["lab"];
        let configs = all["sync"]["configs"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        // The largest configuration is the one the targets are about.
        let primary = configs
            .iter()
            .max_by_key(|c| c["services"].as_u64().unwrap_or(0))
            .cloned()
            .unwrap_or_else(|| all["sync"].clone());
        let sync = &primary;
        let quick = m["quick"].as_bool().unwrap_or(false);
        let _ = writeln!(o, "# kplb benchmarks\n");
        let _ = writeln!(
            o,
            "Generated by `cargo xtask bench{}` (as root) in one run of {:.1} minutes. Nothing here is asserted by a test; \
             targets are printed beside the results. Raw numbers: `{}`.\n",
            if quick { " --quick" } else { "" },
            num(&m["wall_s"]).unwrap_or(0.0) / 60.0,
            if quick {
                "target/bench/results-quick.json"
            } else {
                "bench/results.json"
            }
        );
        let load = mmm(m["load"]
            .as_array()
            .map(|a| a.iter().filter_map(num).filter(|x| x.is_finite()).collect())
            .unwrap_or_default());
        let _ = writeln!(o, "| | |\n|---|---|");
        let _ = writeln!(o, "| date | {} |", m["date"].as_str().unwrap_or(""));
        let _ = writeln!(
            o,
            "| commit | `{}`{} |",
            m["commit"].as_str().unwrap_or(""),
            if m["dirty"].as_bool().unwrap_or(false) {
                " (plus uncommitted changes in the working tree)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            o,
            "| machine | {}, {} vCPUs |",
            m["cpu"].as_str().unwrap_or(""),
            m["nproc"].as_str().unwrap_or("")
        );
        let _ = writeln!(o, "| kernel | {} |", m["kernel"].as_str().unwrap_or(""));
        let _ = writeln!(
            o,
            "| load average (1 min) during the run | median {} (min–max; sampled every 10 s; the benchmark's own client, backends and agents count in it) |",
            fmt_mmm(load, 2)
        );
        let _ = writeln!(
            o,
            "| tools | {}; {}; {} |",
            m["iptables"].as_str().unwrap_or("iptables: none"),
            m["nft"].as_str().unwrap_or("nft: none"),
            m["rustc"].as_str().unwrap_or("")
        );
        let _ = writeln!(
            o,
            "| pinning | connection client and packet generator on CPU 1, netexec backends on CPU 0, in-process benches on CPU 1 |\n"
        );

        targets(&mut o, lab, sync);
        xdp(&mut o, &lab["xdp"]);
        conn(&mut o, &lab["conn"]);
        nodeport(&mut o, &lab["nodeport"]);
        control(&mut o, &lab["control"], sync, &configs);
        maglev_section(&mut o, maglev, quick);
        timing(&mut o, all);
        o
    }

    fn maglev_section(o: &mut String, maglev: &str, quick: bool) {
        let _ = writeln!(o, "## 5. Maglev table builder\n");
        let _ = writeln!(
            o,
            "The existing Maglev bench (`cargo bench -p lb-common --bench maglev{}`), run in the same invocation:\n",
            if quick { " -- --quick" } else { "" }
        );
        for line in maglev.lines() {
            if line.starts_with("# ") || line.starts_with("Generated by") || line.starts_with("- ")
            {
                continue;
            }
            if line.trim().is_empty() && o.ends_with("\n\n") {
                continue;
            }
            if let Some(h) = line.strip_prefix("## ") {
                let _ = writeln!(o, "### {h}");
            } else {
                let _ = writeln!(o, "{line}");
            }
        }
    }

    /// Where a step's time is recorded.
    enum Took {
        /// `machine.steps_s.<key>`, timed by xtask.
        Step(&'static str),
        /// `lab.<key>.wall_s`, timed by kplb-bench.
        Section(&'static str),
    }

    /// The time plan in minutes on a 2-vCPU VM: a full run from a fresh checkout, a quick run
    /// with the binaries built (`None`: not in its plan). kplb-bench's time boxes keep each
    /// lab step within it.
    const PLAN: [(&str, Took, f64, Option<f64>); 6] = [
        ("release build", Took::Step("build"), 11.0, None),
        (
            "in-process sync bench",
            Took::Step("sync_bench"),
            1.0,
            Some(0.3),
        ),
        (
            "1. XDP per-packet cost",
            Took::Section("xdp"),
            2.0,
            Some(0.5),
        ),
        (
            "2. ClusterIP (and 4. on kplb's agent)",
            Took::Section("conn"),
            13.0,
            Some(2.0),
        ),
        ("3. NodePort", Took::Section("nodeport"), 1.0, Some(0.5)),
        ("5. Maglev", Took::Step("maglev"), 0.5, Some(0.2)),
    ];

    fn timing(o: &mut String, all: &Value) {
        let m = &all["machine"];
        let quick = m["quick"].as_bool().unwrap_or(false);
        let _ = writeln!(o, "## 6. Run time\n");
        let _ = writeln!(
            o,
            "The plan: a full run completes in under 30 minutes on a fresh 2-vCPU machine, the release build \
             included (~11 minutes when nothing is built; another build sharing the VM makes it longer) and half a \
             minute for building xtask and checking the setup, and `--quick` in under 5 minutes once the binaries \
             are built. The slow parts are time-boxed, so that a slow dataplane or agent costs at most its box and \
             is reported with the time it took: in section 2 each dataplane's load gets {:.0} s and all loads of \
             one size {:.0} s together (at 30k services kube-proxy's iptables and nftables layouts take 2–5 \
             minutes each on this shared VM, most of it quadratic work in iptables-nft, nft and the kernel), in section 1 the \
             agent's sync gets {:.0} s per size, section 4's changes {:.0} s and the in-process bench's {:.0} s per \
             configuration. Section 4 runs on section 2's kplb agent, so its time is inside section 2's.\n",
            num(&all["lab"]["conn"]["load_limit_s"]).unwrap_or(0.0),
            2.0 * num(&all["lab"]["conn"]["load_limit_s"]).unwrap_or(0.0),
            num(&all["lab"]["xdp"]["sync_limit_s"]).unwrap_or(0.0),
            num(&all["lab"]["control"]["change_budget_s"]).unwrap_or(0.0),
            all["sync"]["configs"][0]["change"]["budget_s"]
                .as_f64()
                .unwrap_or(0.0)
        );
        let _ = writeln!(o, "| step | plan (min) | this run (min) |\n|---|---:|---:|");
        for (name, took, full, quick_plan) in PLAN {
            let secs = match took {
                Took::Step(k) => num(&m["steps_s"][k]),
                Took::Section(k) => num(&all["lab"][k]["wall_s"]),
            };
            let plan = if quick { quick_plan } else { Some(full) };
            let _ = writeln!(
                o,
                "| {name} | {} | {} |",
                plan.map_or("–".into(), |p| format!("{p:.1}")),
                secs.map_or("–".into(), |s| format!("{:.1}", s / 60.0))
            );
        }
        let _ = writeln!(
            o,
            "| **total** | **{}** | **{}** |\n",
            if quick { "< 5" } else { "< 30" },
            num(&m["wall_s"]).map_or("–".into(), |s| format!("{:.1}", s / 60.0))
        );
        conn_phases(o, &all["lab"]["conn"]);
    }

    /// Section 2's time per size and dataplane, by phase.
    fn conn_phases(o: &mut String, c: &Value) {
        let Some(results) = c["results"].as_array() else {
            return;
        };
        let _ = writeln!(
            o,
            "Section 2 by size and dataplane (seconds; \"runs\" is the sum of its rounds):\n\n\
             | services | dataplane | load | check | runs | teardown |\n|---:|---|---:|---:|---:|---:|"
        );
        for r in results {
            let p = &r["phases"];
            let s = |k: &str| num(&p[k]).map_or("–".into(), |v| format!("{v:.1}"));
            let _ = writeln!(
                o,
                "| {} | {} | {}{} | {} | {} | {} |",
                r["services"],
                r["dataplane"].as_str().unwrap_or("?"),
                s("load_s"),
                if r["error"].is_string() {
                    " (failed)"
                } else {
                    ""
                },
                s("check_s"),
                s("measure_s"),
                s("teardown_s")
            );
        }
        let _ = writeln!(o);
    }

    /// Services, then kplb's p50, p99 and conn/s as ratios to no load balancer.
    type Ratios = (u64, Option<f64>, Option<f64>, Option<f64>);

    /// kplb's ratios against no load balancer, per size.
    fn kplb_ratios(conn: &Value) -> Vec<Ratios> {
        let rows = conn_rows(conn);
        let mut sizes: Vec<u64> = rows.iter().map(|r| r.services).collect();
        sizes.sort_unstable();
        sizes.dedup();
        sizes
            .into_iter()
            .map(|n| {
                let get = |dp: &str| rows.iter().find(|r| r.services == n && r.dataplane == dp);
                let (k, b) = (get("kplb"), get("none"));
                (
                    n,
                    k.and_then(|r| paired(r, b, "p50_us")),
                    k.and_then(|r| paired(r, b, "p99_us")),
                    k.and_then(|r| paired(r, b, "conn_per_s")),
                )
            })
            .collect()
    }

    fn yes(ok: Option<bool>) -> &'static str {
        match ok {
            Some(true) => "**met**",
            Some(false) => "**missed**",
            None => "not measured",
        }
    }

    fn targets(o: &mut String, lab: &Value, sync: &Value) {
        let _ = writeln!(o, "## Targets at a glance\n");
        let _ = writeln!(o, "| target | measured | |\n|---|---|---|");
        let ratios = kplb_ratios(&lab["conn"]);
        let mut worst = (1.0f64, String::new());
        let mut all_ok: Option<bool> = None;
        for (n, p50, p99, cps) in &ratios {
            for (what, r, bad) in [
                ("p50", p50, p50.map(|r| r - 1.0)),
                ("p99", p99, p99.map(|r| r - 1.0)),
                ("conn/s", cps, cps.map(|r| 1.0 - r)),
            ] {
                if let (Some(r), Some(bad)) = (r, bad) {
                    let ok = bad <= 0.05;
                    all_ok = Some(all_ok.unwrap_or(true) && ok);
                    if bad > worst.0 - 1.0 || worst.1.is_empty() {
                        worst = (1.0 + bad, format!("{what} ×{r:.3} at {n} services"));
                    }
                }
            }
        }
        // kplb's own kernel time per connection, the largest share of the baseline p50.
        let rows = conn_rows(&lab["conn"]);
        let hooks = rows
            .iter()
            .filter(|r| r.dataplane == "kplb")
            .filter_map(|r| {
                let ns = num(&r.hooks["ns_per_connection"])?;
                let base = rows
                    .iter()
                    .find(|b| b.services == r.services && b.dataplane == "none")?;
                Some((ns, ns / 1e3 / med(base.p50)? * 100.0))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let _ = writeln!(
            o,
            "| ClusterIP via kplb within 5% of no load balancer (p50, p99, conn/s) at every size | worst: {}{} | {} |",
            if worst.1.is_empty() { "–" } else { &worst.1 },
            hooks.map_or(String::new(), |(ns, pct)| format!(
                " (kplb's socket programs: {ns:.0} ns per connection, {pct:.1}% of the p50)"
            )),
            yes(all_ok)
        );
        xdp_targets(o, &lab["xdp"]);
        let np = &lab["nodeport"];
        let rate = |mode: &str| {
            np["results"].as_array().and_then(|rs| {
                let r = rs.iter().find(|r| r["mode"] == mode)?;
                med(mmm(r["runs"]
                    .as_array()?
                    .iter()
                    .filter_map(|x| num(&x["counted_pps"]))
                    .collect()))
            })
        };
        let np_ratio = ratio(rate("kplb"), rate("xdp_drop"));
        let _ = writeln!(
            o,
            "| NodePort through kplb's XDP ≥ 80% of the same veth's XDP_DROP rate | {} | {} |",
            np_ratio.map_or("–".into(), |r| format!(
                "{:.1}% ({:.0} vs {:.0} pps)",
                r * 100.0,
                rate("kplb").unwrap_or(0.0),
                rate("xdp_drop").unwrap_or(0.0)
            )),
            yes(np_ratio.map(|r| r >= 0.8))
        );
        let inproc_p99 = num(&sync["change"]["total_ms"]["p99"]);
        let e2e_p99 = num(&lab["control"]["change_e2e_ms"]["p99"]);
        let _ = writeln!(
            o,
            "| one EndpointSlice change in the maps, p99 < 5 ms ({} services) | in-process {} ms; end to end (file → map) {} ms | {} |",
            sync["services"].as_u64().unwrap_or(0),
            inproc_p99.map_or("–".into(), |v| format!("{v:.1}")),
            e2e_p99.map_or("–".into(), |v| format!("{v:.1}")),
            yes(inproc_p99.map(|v| v < 5.0))
        );
        let cold: Vec<f64> = lab["control"]["cold_starts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| num(&c["synced"]["took_ms"]))
                    .collect()
            })
            .unwrap_or_default();
        let runs = cold.len();
        let spread = mmm(cold);
        let cold = med(spread);
        let _ = writeln!(
            o,
            "| full sync of {} services × 10 endpoints < 1 s | agent `took_ms` {} | {} |",
            lab["control"]["services"].as_u64().unwrap_or(0),
            spread.map_or("–".into(), |(lo, m, hi)| format!(
                "{:.2} s (median of {runs} cold starts; {:.2}–{:.2})",
                m / 1e3,
                lo / 1e3,
                hi / 1e3
            )),
            yes(cold.map(|v| v < 1000.0))
        );
        let rss = num(&lab["control"]["rss_kib_after_changes"]);
        let _ = writeln!(
            o,
            "| agent RSS < 100 MB ({} services) | {} | {} |\n",
            lab["control"]["services"].as_u64().unwrap_or(0),
            rss.map_or("–".into(), |v| format!("{:.1} MB", v / 1024.0)),
            yes(rss.map(|v| v < 100.0 * 1024.0))
        );
    }

    /// The XDP rows of the targets table: the worst size's cost over the floor per path, and
    /// the growth of that cost from the smallest to the largest size.
    fn xdp_targets(o: &mut String, x: &Value) {
        // (services, minus-floor ns) of one path, sizes that measured it.
        let costs = |key: &str| -> Vec<(u64, f64)> {
            x["kplb"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| {
                    let v = num(&r["paths"]["paths"][key]["minus_floor_ns"])?;
                    Some((r["services"].as_u64()?, v))
                })
                .collect()
        };
        for (key, what, limit) in [
            ("established", "conntrack hit", 60.0),
            ("new_flow", "new flow", 100.0),
        ] {
            let c = costs(key);
            let worst = c.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1));
            let _ = writeln!(
                o,
                "| XDP {what} within the harness floor + {limit:.0} ns (BPF_PROG_TEST_RUN, every size) | {} | {} |",
                worst.map_or("–".into(), |(n, v)| format!(
                    "floor + {v:.0} ns (worst size: {n} services)"
                )),
                yes(worst.map(|(_, v)| v <= limit))
            );
        }
        let mut growth = Vec::new();
        let mut ok = None;
        let mut largest = 0;
        for (key, what) in [("established", "conntrack hit"), ("new_flow", "new flow")] {
            let c = costs(key);
            let (Some(first), Some(last)) = (c.first(), c.last()) else {
                continue;
            };
            if first.0 == last.0 || first.1 <= 0.0 {
                continue;
            }
            largest = last.0;
            let g = last.1 / first.1 - 1.0;
            ok = Some(ok.unwrap_or(true) && g < 0.15);
            growth.push(format!(
                "{what} {:+.0}% ({} → {} services)",
                g * 100.0,
                first.0,
                last.0
            ));
        }
        let _ = writeln!(
            o,
            "| XDP cost over the floor grows < 15% from 1 to 100k services | {} | {} |",
            if growth.is_empty() {
                "–".into()
            } else {
                growth.join("; ")
            },
            if ok.is_some() && largest < 100_000 {
                "not measured at 100k"
            } else {
                yes(ok)
            }
        );
    }

    fn xdp(o: &mut String, x: &Value) {
        let _ = writeln!(
            o,
            "## 1. Per-packet cost of the XDP paths (BPF_PROG_TEST_RUN)\n"
        );
        let _ = writeln!(
            o,
            "Method: the program measured is the one the real agent attached to node1's eth0 (native mode), found \
             through the interface's program id, so maps and runtime configuration are what the agent wrote. One \
             NodePort service (TCP 80→8080, nodePort 30080) with 10 remote endpoints (node2's pod CIDR: SNAT, FIB \
             lookup, XDP_TX), plus n−1 filler services, each a ClusterIP (172.30.0.0/15) and an external IP \
             (198.18.0.0/15) on TCP 80 with 10 endpoints from a pool of 200,000 addresses, so the XDP path's lookups \
             run against external frontends: 4 `KPLB_SVC` entries per filler (ClusterIP; the external IP in both \
             scopes; its any-port marker), 400k at 100k services against the map's 524,288; \
             `--maglev-table-size 251`. Every size has its own agent on its own lab node, all loaded at once (their syncs boxed to {} s together), so that rounds of all sizes alternate. Rewriting paths see their own \
             output when `repeat` > 1, so each path runs as {} calls with `repeat=1` (the input copied in afresh \
             each call) on a thread pinned to one CPU in node1's netns with an `xdp_md` whose ingress is eth0; the \
             figure is the median kernel `duration` minus the median of a hand-assembled XDP_PASS program measured \
             the same way in the same rounds (the harness floor; attached in native mode elsewhere, so the kernel \
             calls it through the XDP dispatcher like the measured program, not through a retpoline). New flow = a \
             TCP SYN from a new source port each call (conntrack miss, Maglev pick, two conntrack inserts, SNAT \
             port); established = the same ACK again (conntrack hit); not a service = node IP, port 22; REJECT = a SYN to \
             a second NodePort service that has no endpoints (answered in place with a TCP RST, XDP_TX). Paths run \
             in rounds of {} calls, one round of every size (and of every other agent build given with \
             `--xdp-variants`, on nodes of their own) after another in a freshly shuffled order, so that the \
             machine's drifts fall on all sizes alike; conntrack is emptied before each round (so new flows find \
             free SNAT ports, as on a quiet node) and the hot flow opened again. Measuring sizes side by side \
             also means each round starts with the caches holding another agent's program and maps, which a \
             node running one agent would not see.\n",
            num(&x["sync_limit_s"]).unwrap_or(0.0),
            x["calls"].as_u64().unwrap_or(0),
            x["round"].as_u64().unwrap_or(0)
        );
        if let Some(e) = x["error"].as_str() {
            let _ = writeln!(o, "**Not measured**: {e}\n");
            return;
        }
        let fl = &x["floor"];
        let _ = writeln!(
            o,
            "Harness floor (XDP_PASS, first size): repeat=1 median {} ns (p10 {} – p90 {}); repeat=1000 {} ns per \
             iteration. Reference for this kind of VM (shared/README §4): 60–80 ns and 14–16 ns.\n",
            fl["repeat1"]["median_ns"],
            fl["repeat1"]["p10_ns"],
            fl["repeat1"]["p90_ns"],
            fl["repeat1000_ns"]
        );
        if let Some(s) = x["skipped"].as_str() {
            let _ = writeln!(o, "**kplb: skipped** — {s}.\n");
        }
        let rows = x["kplb"].as_array().cloned().unwrap_or_default();
        if !rows.is_empty() {
            let _ = writeln!(
                o,
                "| services | build | path | verdicts | median ns | floor ns | **minus floor** | Katran (1 VIP, 100 reals) |\n|---:|---|---|---|---:|---:|---:|---:|"
            );
        }
        for r in &rows {
            let n = r["services"].as_u64().unwrap_or(0);
            if let Some(e) = r["error"].as_str() {
                let _ = writeln!(
                    o,
                    "| {n} | – | – | error: {} | | | | |",
                    e.replace('|', "/")
                );
                continue;
            }
            let builds = std::iter::once(("kplb", &r["paths"])).chain(
                r["variants"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.as_str(), v)),
            );
            for (build, m) in builds {
                xdp_rows(o, n, build, m);
            }
            let synced = &r["synced"];
            if num(&synced["errors"]).is_some_and(|e| e > 0.0) {
                let _ = writeln!(
                    o,
                    "| {n} | – | warning | the agent's sync reported {} map errors ({} frontends written) | | | | |",
                    synced["errors"], synced["frontends"]
                );
            }
        }
        let _ = writeln!(o);
    }

    /// One build's rows of the XDP table at `n` services.
    fn xdp_rows(o: &mut String, n: u64, build: &str, m: &Value) {
        let floor = &m["floor"]["repeat1"]["median_ns"];
        for (key, name, katran) in [
            ("new_flow", "new flow", "611"),
            ("established", "established (1 hot flow)", "161"),
            ("not_a_service", "not a service", "50"),
            ("reject", "REJECT (no endpoints: TCP RST)", "–"),
        ] {
            let p = &m["paths"][key];
            let verdicts = p["verdicts"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "| {n} | {build} | {name} | {verdicts} | {} | {floor} | **{}** | {katran} |",
                p["dist"]["median_ns"],
                num(&p["minus_floor_ns"]).map_or("–".into(), |v| format!("{v:.0}"))
            );
        }
        if let Some(w) = m["warning"].as_str() {
            let _ = writeln!(o, "| {n} | {build} | warning | {w} | | | | |");
        }
    }

    /// kplb's socket programs' own time per connection at one size.
    fn hook_line(o: &mut String, h: &Value, base_p50_us: Option<f64>) {
        if let Some(e) = h["error"].as_str() {
            let _ = writeln!(o, "kplb's socket programs: not measured ({e}).\n");
            return;
        }
        let Some(total) = num(&h["ns_per_connection"]) else {
            return;
        };
        let progs: Vec<String> = h["programs"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, p)| {
                format!(
                    "`{name}` {:.0} ns × {:.2}",
                    num(&p["ns_per_call"]).unwrap_or(0.0),
                    num(&p["calls_per_connection"]).unwrap_or(0.0)
                )
            })
            .collect();
        let share = base_p50_us.map_or(String::new(), |b| {
            format!(
                " = {:.2}% of no load balancer's p50",
                total / 1e3 / b * 100.0
            )
        });
        let _ = writeln!(
            o,
            "kplb's socket programs ran {:.0} ns per connection in the kernel{share} ({}; {:.0} connections).\n",
            total,
            progs.join(", "),
            num(&h["connections"]).unwrap_or(0.0)
        );
    }

    fn conn(o: &mut String, c: &Value) {
        let _ = writeln!(
            o,
            "## 2. ClusterIP: connection rate and latency, a new TCP connection per request\n"
        );
        if let Some(e) = c["error"].as_str() {
            let _ = writeln!(o, "**Not measured**: {e}\n");
            return;
        }
        let _ = writeln!(
            o,
            "Method: one lab node (network namespace) per dataplane, each with its own 10 netexec backend pods \
             (pinned to CPU 0) and a client pod, so every dataplane can stay loaded while the others are measured \
             without being on their packet path; `kplb-connclient` runs inside the client pod's netns and cgroup \
             (pinned to CPU 1) and makes {} requests after {} warm-up ones, each on a new connection (`connect`, \
             `GET /hostname`, read to EOF, close with SO_LINGER 0), timing each with `Instant`. Every dataplane is \
             built from the same Services: n ClusterIP services (port 80 → 8080) with 10 endpoints each; the measured \
             service is the last one (last in KUBE-SERVICES) and its endpoints are its node's 10 pods, all other \
             endpoints are unused addresses, distinct up to 200,000 (so at 30k services some are shared by two \
             services: kplb's backend map holds 262,144 entries, fewer than 300k distinct endpoints, and Kubernetes' \
             tested limit of 150k pods per cluster means such endpoints would share pods anyway). Per size, each \
             dataplane is loaded once, within a time box of {:.0} s (and all of a size's loads within twice that; one \
             that does not load in time is reported with the time it took), and checked with 100 requests that must all succeed; then {} rounds run, each \
             measuring every dataplane once in a freshly shuffled order (recorded in the raw results), so that \
             changes in the shared machine's load spread over all dataplanes alike; then all are removed completely \
             (tables flushed, agent stopped and its pins removed). The table shows the median over rounds of each \
             run's p50, p99 and connections per second, with min–max. Ratios are to \"no load balancer\" \
             (straight to the pod IPs, round-robin, nothing installed) at the same size, measured in the same round, \
             as the median over rounds; the target is kplb within 5% (p50 and p99 ≤ ×1.05, conn/s ≥ ×0.95). A \
             single round's ratio moves by ±10–30% on this shared 2-vCPU VM, so after the rounds kplb's own share \
             is measured directly: one more run of the client with `kernel.bpf_stats_enabled=1`, reading the kernel \
             run time of kplb's socket programs (the statistics themselves add two clock reads to every program \
             run: ~0.2 µs here, measured with a build whose `getpeername` program returns at once).\n",
            c["count"],
            c["warmup"],
            num(&c["load_limit_s"]).unwrap_or(0.0),
            c["runs"]
        );
        let _ = writeln!(
            o,
            "- kplb: `lb-agent` in standalone mode with the n services' YAML (one multi-document file); the socket-level \
             hook rewrites `connect()`, so packets go straight to the pod. At the size section 4 uses, the agent \
             runs with `--poll-interval-ms 60000` (changes are noticed through inotify) and section 4 is measured on \
             it after the connection rounds.\n\
             - kube-proxy iptables: kube-proxy's nat-table layout, loaded with one `iptables-restore` (the system's \
             iptables, nf_tables backend): PREROUTING/OUTPUT → KUBE-SERVICES (one rule per service, matched in order) → \
             KUBE-SVC-* (`-m statistic --mode random --probability 1/(10-i)`) → KUBE-SEP-* (DNAT), masquerade chains.\n\
             - kube-proxy nftables: table `ip kube-proxy` with kube-proxy's layout: `ip daddr . meta l4proto . th dport \
             vmap @service-ips` → per-service chain with `numgen random mod 10 vmap` → per-endpoint chain (DNAT). \
             kube-proxy writes its first sync as one transaction; here the same objects go in several `nft -f` \
             transactions, because three costs of this kernel and nft 1.0 grow quadratically: every transaction that \
             adds a rule or element makes `nft` fetch the table's chain list first (a kernel dump that restarts its \
             walk per message batch: ~15 s at 30k services' 330k chains), binding each anonymous set (the `numgen` \
             vmaps) walks the transaction built so far, and creating each walks every set of the table. So: per \
             10,000 services one transaction of chains alone (needs no cache) and one of their rules and map \
             elements with the `numgen` rules first; the last cost is inherent in the layout (kube-proxy pays it \
             too). The load time is the sum.\n\
             - kube-proxy IPVS: `ipvsadm-restore` with one virtual server per service (rr, 10 masqueraded real servers) \
             and the VIPs on a dummy `kube-ipvs0`.\n"
        );
        if let Some(sk) = c["skipped"].as_object() {
            for (dp, why) in sk {
                let _ = writeln!(
                    o,
                    "**{}: skipped** — {}\n",
                    label(dp),
                    why.as_str().unwrap_or("").replace('\n', " ")
                );
            }
        }
        let rows = conn_rows(c);
        let mut sizes: Vec<u64> = rows.iter().map(|r| r.services).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let _ = writeln!(
            o,
            "![connection latency against number of services](services.svg)\n"
        );
        for n in sizes {
            let base = rows
                .iter()
                .find(|r| r.services == n && r.dataplane == "none");
            let _ = writeln!(
                o,
                "**{n} services**{}\n\n| dataplane | load (s) | p50 µs | p99 µs | conn/s | p50 × | p99 × | conn/s × |\n|---|---:|---:|---:|---:|---:|---:|---:|",
                rounds(&c["rounds"][n.to_string()])
            );
            for dp in ORDER {
                let Some(r) = rows.iter().find(|r| r.services == n && r.dataplane == dp) else {
                    continue;
                };
                if let Some(e) = &r.error {
                    let _ = writeln!(
                        o,
                        "| {} | {} | error: {} | | | | | |",
                        label(dp),
                        r.load_s.map_or("–".into(), |l| format!("{l:.1}")),
                        e.replace('|', "/").replace('\n', " ")
                    );
                    continue;
                }
                let load = match (dp, r.load_s) {
                    ("kplb", Some(l)) => format!(
                        "{l:.1} (sync {:.1})",
                        num(&r.detail["synced"]["took_ms"]).unwrap_or(0.0) / 1e3
                    ),
                    (_, Some(l)) => format!("{l:.1}"),
                    (_, None) => "–".into(),
                };
                let _ = writeln!(
                    o,
                    "| {} | {load} | {} | {} | {} | {} | {} | {} |",
                    label(dp),
                    fmt_mmm(r.p50, 0),
                    fmt_mmm(r.p99, 0),
                    fmt_mmm(r.cps, 0),
                    fmt_ratio(paired(r, base, "p50_us")),
                    fmt_ratio(paired(r, base, "p99_us")),
                    fmt_ratio(paired(r, base, "conn_per_s")),
                );
            }
            let _ = writeln!(o);
            let kplb = rows
                .iter()
                .find(|r| r.services == n && r.dataplane == "kplb");
            if let Some(h) = kplb.map(|r| &r.hooks).filter(|h| !h.is_null()) {
                hook_line(o, h, base.and_then(|b| med(b.p50)));
            }
        }
        let errors: Vec<String> = rows
            .iter()
            .filter(|r| num(&r.detail["synced"]["errors"]).is_some_and(|e| e > 0.0))
            .map(|r| {
                format!(
                    "{} errors at {} services",
                    r.detail["synced"]["errors"], r.services
                )
            })
            .collect();
        if !errors.is_empty() {
            let _ = writeln!(
                o,
                "kplb's `synced` line reported map errors: {}.\n",
                errors.join("; ")
            );
        }
    }

    fn nodeport(o: &mut String, np: &Value) {
        let _ = writeln!(
            o,
            "## 3. NodePort packets per second through XDP on a veth\n"
        );
        if let Some(e) = np["error"].as_str() {
            let _ = writeln!(o, "**Not measured**: {e}\n");
            return;
        }
        let _ = writeln!(
            o,
            "Method: two lab nodes. A generator netns on the lab bridge sends pre-built {}-byte UDP frames ({} flows, \
             source ports cycled, so every flow is established after its first packet) to node1's IP and NodePort \
             30080 from an AF_PACKET socket with `sendmmsg` (batches of 64, pinned to CPU 1; the kernel has no pktgen, \
             CONFIG_NET_PKTGEN is off) for {} s, {} times per mode in a shuffled order. The endpoint is remote \
             (10.0.2.10 behind node2), so a NodePort packet is translated (DNAT + SNAT to node1) and sent back out of \
             node1's eth0 to node2, whose eth0 counts and drops it with a counting XDP_DROP program. `xdp_drop` is that \
             same counting program on node1's eth0 itself (the floor: what the generator, bridge and veth deliver to \
             XDP there); `kplb` is the agent's XDP program in native mode (conntrack hit, SNAT, FIB lookup, XDP_TX); \
             `iptables` is kube-proxy's NodePort chain (KUBE-NODEPORTS → KUBE-EXT → KUBE-SVC → KUBE-SEP DNAT, \
             masquerade) forwarded by the kernel. The fabric side of node1's veth runs an XDP_PASS program in every \
             mode (a veth accepts XDP_TX frames only when its peer runs XDP). Everything runs in softirq on the \
             generator's CPU, so these are per-core rates of the whole chain, not line rates.\n",
            np["frame_bytes"], np["flows"], np["seconds"], np["runs"]
        );
        if let Some(sk) = np["skipped"].as_object() {
            for (m, why) in sk {
                let _ = writeln!(o, "**{m}: skipped** — {}\n", why.as_str().unwrap_or(""));
            }
        }
        let results = np["results"].as_array().cloned().unwrap_or_default();
        let rate = |r: &Value, k: &str| {
            mmm(r["runs"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| num(&x[k])).collect())
                .unwrap_or_default())
        };
        let drop = results
            .iter()
            .find(|r| r["mode"] == "xdp_drop")
            .and_then(|r| med(rate(r, "counted_pps")));
        let _ = writeln!(
            o,
            "| mode | sent pps | delivered pps | vs XDP_DROP |\n|---|---:|---:|---:|"
        );
        for mode in ["xdp_drop", "kplb", "iptables"] {
            let Some(r) = results.iter().find(|r| r["mode"] == mode) else {
                continue;
            };
            if let Some(e) = r["error"].as_str() {
                let _ = writeln!(o, "| {mode} | error: {} | | |", e.replace('|', "/"));
                continue;
            }
            let got = rate(r, "counted_pps");
            let _ = writeln!(
                o,
                "| {mode} | {} | {} | {} |",
                fmt_mmm(rate(r, "sent_pps"), 0),
                fmt_mmm(got, 0),
                ratio(med(got), drop).map_or("–".into(), |v| format!("{:.1}%", v * 100.0))
            );
        }
        let _ = writeln!(o, "\nTarget: kplb ≥ 80% of the XDP_DROP rate.\n");
    }

    fn control(o: &mut String, c: &Value, sync: &Value, configs: &[Value]) {
        let _ = writeln!(o, "## 4. Control plane\n");
        let _ = writeln!(
            o,
            "End to end through the real agent ({} services × 10 endpoints, standalone mode, `--poll-interval-ms {}`: \
             polling plays no part, changes are noticed through inotify; the measured service's Service and \
             EndpointSlice sit in their own small file, the rest in one multi-document file). In process: \
             `lb-agent/benches/sync.rs` runs the library pipeline the agent runs (the changed objects into \
             `view::ClusterView`, the affected services' desired state, `sync::Reconciler::apply` on the touched \
             keys) against real pinned maps (`BpfDatapath::load`), timing every map operation by kind.\n",
            c["services"], c["poll_interval_ms"]
        );
        if let Some(e) = c["error"].as_str() {
            let _ = writeln!(o, "**End to end not measured**: {e}\n");
        }
        let _ = writeln!(o, "### Full sync from a cold start\n");
        let _ = writeln!(
            o,
            "| run | agent start → `synced` (s) | `took_ms` in the line | frontends | tables | backends | errors |\n|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (i, cs) in c["cold_starts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let s = &cs["synced"];
            let _ = writeln!(
                o,
                "| {} | {:.2} | {:.0} | {} | {} | {} | {} |",
                i + 1,
                num(&cs["start_to_synced_s"]).unwrap_or(0.0),
                num(&s["took_ms"]).unwrap_or(0.0),
                int(&s["frontends"]),
                int(&s["tables"]),
                int(&s["backends"]),
                int(&s["errors"])
            );
        }
        // The full-sync breakdown comes from the largest configuration.
        let full_cfg = configs
            .iter()
            .max_by_key(|c| c["services"].as_u64().unwrap_or(0))
            .unwrap_or(sync);
        let f = &full_cfg["full_sync"];
        if f.is_object() {
            let _ = writeln!(
                o,
                "\nIn process, {} services: objects into the view {:.1} ms, desired state {:.1} ms, apply {:.1} ms \
                 (YAML parse of the objects, not part of a sync: {:.2} s); {} Maglev slabs, {} of {} slots used. Map \
                 operations during that apply:\n",
                full_cfg["services"],
                num(&f["inventory_ms"]).unwrap_or(0.0),
                num(&f["desired_ms"]).unwrap_or(0.0),
                num(&f["apply_ms"]).unwrap_or(0.0),
                num(&full_cfg["yaml_parse_s"]).unwrap_or(0.0),
                f["table_slabs"],
                f["table_slots_used"],
                f["table_slots"]
            );
            let _ = writeln!(
                o,
                "| operation | count | mean µs | total ms |\n|---|---:|---:|---:|"
            );
            if let Some(ops) = f["ops"].as_object() {
                for (k, v) in ops {
                    let _ = writeln!(
                        o,
                        "| {k} | {} | {:.1} | {:.0} |",
                        v["count"],
                        num(&v["mean_us"]).unwrap_or(0.0),
                        num(&v["total_ms"]).unwrap_or(0.0)
                    );
                }
            }
            let _ = writeln!(
                o,
                "\nA table is written into free space of an mmapable slab (`write_tables`: space for the whole \
                 batch reserved first, each slab mapped once) and a frontend is repointed with one hash update, so no \
                 map-in-map write (each of which waits for an RCU grace period, ~10 ms) happens per table; backends go \
                 in with one `BPF_MAP_UPDATE_BATCH` (`set_backends`). These services have no external frontends, so \
                 their tables get ~100 slots per backend ({} for 10) rather than the {}-slot default of tables XDP \
                 reads.\n",
                1021, full_cfg["maglev_table_size"]
            );
        }
        let _ = writeln!(o, "### One EndpointSlice change\n");
        let _ = writeln!(
            o,
            "| measured | changes | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|"
        );
        let row = |o: &mut String, name: String, v: &Value| {
            if v.is_object() {
                let _ = writeln!(
                    o,
                    "| {name} | {} | {:.2} | {:.2} | {:.2} |",
                    v["count"],
                    num(&v["p50"]).unwrap_or(0.0),
                    num(&v["p99"]).unwrap_or(0.0),
                    num(&v["max"]).unwrap_or(0.0)
                );
            }
        };
        for cfg in configs {
            let ch = &cfg["change"];
            let n = &cfg["services"];
            row(
                o,
                format!("in process, {n} services: the changed slice into the view"),
                &ch["inventory_ms"],
            );
            row(
                o,
                format!("in process, {n} services: its service's desired state"),
                &ch["desired_ms"],
            );
            row(
                o,
                format!("in process, {n} services: apply (diff + map writes)"),
                &ch["apply_ms"],
            );
            row(
                o,
                format!("**in process, {n} services: total**"),
                &ch["total_ms"],
            );
        }
        row(
            o,
            format!(
                "agent's own `applied changes` `took_ms`, {} services",
                c["services"]
            ),
            &c["agent_applied_took_ms"],
        );
        row(
            o,
            format!(
                "**end to end, {} services: file renamed → frontend updated in the pinned map**",
                c["services"]
            ),
            &c["change_e2e_ms"],
        );
        let _ = writeln!(
            o,
            "\nIn process: one service alternates between 10 and 9 endpoints (one new Maglev table, one frontend \
             rewrite, {:.1} map writes per change), up to {} changes or as many as fit in {:.0} s per configuration \
             (the count measured is in the table). End to end: up to {} changes or as many as fit in {:.0} s; each \
             rewrites the measured service's small file through a dot-file renamed into place, and the pinned \
             `KPLB_SVC` is polled every 0.1 ms until the service's `backend_count` changes (the agent was started \
             with `--poll-interval-ms {}`, so it notices the rename through inotify, not by polling).\n",
            num(&sync["change"]["writes_per_change"]).unwrap_or(0.0),
            sync["change"]["asked"],
            num(&sync["change"]["budget_s"]).unwrap_or(0.0),
            c["changes_asked"],
            num(&c["change_budget_s"]).unwrap_or(0.0),
            c["poll_interval_ms"]
        );
        let _ = writeln!(o, "### Memory at {} services\n", c["services"]);
        let kib = |v: &Value| num(v).map_or("–".into(), |k| format!("{:.1} MB", k / 1024.0));
        let _ = writeln!(
            o,
            "Agent VmRSS after the first sync: {}; after the changes: {}; peak (VmHWM): {}. Target: < 100 MB.\n",
            kib(&c["rss_kib_synced"]),
            kib(&c["rss_kib_after_changes"]),
            kib(&c["hwm_kib"])
        );
        if let Some(maps) = c["memlock"].as_array() {
            let total: f64 = maps.iter().filter_map(|m| num(&m["bytes"])).sum();
            let _ = writeln!(
                o,
                "BPF map memory (`memlock` from fdinfo, what `bpftool map show` prints as `bytes_memlock`):\n\n| map | maps | MB |\n|---|---:|---:|"
            );
            for mm in maps {
                let _ = writeln!(
                    o,
                    "| {} | {} | {:.1} |",
                    mm["map"].as_str().unwrap_or(""),
                    mm["maps"],
                    num(&mm["bytes"]).unwrap_or(0.0) / 1048576.0
                );
            }
            let _ = writeln!(o, "| **total** | | **{:.1}** |\n", total / 1048576.0);
        }
        let _ = writeln!(
            o,
            "### kube-proxy, for comparison (published behaviour, not measured here)\n\n\
             - kube-proxy batches changes: `minSyncPeriod` defaults to 1 s, so an endpoint change normally reaches the \
             rules up to a second later by design (Kubernetes documentation, \"Virtual IPs and Service Proxies\", \
             kubernetes.io/docs/reference/networking/virtual-ips/).\n\
             - In iptables mode the ruleset grows with services plus endpoints; kube-proxy originally rewrote all of \
             it on every sync with `iptables-restore`, which at tens of thousands of services means hundreds of \
             thousands of rules and syncs that take seconds; since 1.26–1.27 it writes only the chains of services \
             that changed (KEP-3453, \"Minimize iptables-restore input size\"). The nftables mode post says the same \
             about the data plane: the first packet of a connection is checked against one rule per service, O(n), \
             while nftables mode looks the service up in a verdict map (Kubernetes blog, \"NFTables mode for \
             kube-proxy\", 2025-02-28, kubernetes.io/blog/2025/02/28/nftables-kube-proxy/).\n\
             - Measured here for the same Services (section 2, load column): a full `iptables-restore` and a full \
             nftables load of each size, i.e. what kube-proxy's first sync costs on this machine.\n"
        );
    }

    /// Two panels against the number of services (log scale), one line per dataplane: p50
    /// latency, and p50 latency relative to no load balancer at the same size.
    pub fn svg(conn: &Value) -> String {
        let rows = conn_rows(conn);
        let mut sizes: Vec<u64> = rows.iter().map(|r| r.services).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let (w, h) = (980.0, 420.0);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15">ClusterIP: new TCP connection + request, against the number of services (medians of runs)</text>"#,
            w / 2.0
        );
        let colors = [
            ("none", "#555555", "6 3"),
            ("kplb", "#1f77b4", ""),
            ("iptables", "#d62728", ""),
            ("nftables", "#2ca02c", ""),
            ("ipvs", "#9467bd", ""),
        ];
        if sizes.is_empty() {
            let _ = writeln!(
                s,
                r#"<text x="40" y="80">no connection results</text></svg>"#
            );
            return s;
        }
        let (lx0, lx1) = (
            (sizes[0] as f64).log10(),
            (sizes[sizes.len() - 1] as f64)
                .log10()
                .max((sizes[0] as f64).log10() + 1.0),
        );
        let base = |n: u64| {
            rows.iter()
                .find(|r| r.services == n && r.dataplane == "none")
                .and_then(|r| med(r.p50))
        };
        for (panel, title) in [
            "p50 latency (µs)",
            "p50 latency relative to no load balancer (×)",
        ]
        .iter()
        .enumerate()
        {
            let (x0, y0, pw, ph) = (70.0 + panel as f64 * 470.0, 50.0, 380.0, 290.0);
            let value = |r: &ConnRow| {
                let v = med(r.p50)?;
                if panel == 0 {
                    Some(v)
                } else {
                    Some(v / base(r.services)?)
                }
            };
            let ymax = rows
                .iter()
                .filter_map(value)
                .fold(0.0f64, f64::max)
                .max(1.1);
            let ymax = nice(ymax * 1.1);
            let px = |n: u64| x0 + ((n as f64).log10() - lx0) / (lx1 - lx0) * pw;
            let py = |v: f64| y0 + ph - v / ymax * ph;
            let _ = writeln!(
                s,
                r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/><text x="{}" y="{}" text-anchor="middle" font-size="13">{title}</text>"##,
                x0 + pw / 2.0,
                y0 - 8.0
            );
            for k in 0..=5 {
                let v = ymax * f64::from(k) / 5.0;
                let y = py(v);
                let _ = writeln!(
                    s,
                    r##"<line x1="{x0}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                    x0 + pw,
                    x0 - 6.0,
                    y + 4.0,
                    if panel == 0 {
                        format!("{v:.0}")
                    } else {
                        format!("{v:.1}")
                    }
                );
            }
            if panel == 1 {
                let y = py(1.05);
                let _ = writeln!(
                    s,
                    r##"<line x1="{x0}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#1f77b4" stroke-dasharray="2 3"/><text x="{}" y="{:.1}" fill="#1f77b4" text-anchor="end">kplb target ×1.05</text>"##,
                    x0 + pw,
                    x0 + pw - 4.0,
                    y - 4.0
                );
            }
            for &n in &sizes {
                let x = px(n);
                let _ = writeln!(
                    s,
                    r##"<line x1="{x:.1}" x2="{x:.1}" y1="{y0}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                    y0 + ph,
                    y0 + ph + 16.0,
                    if n >= 1000 {
                        format!("{}k", n / 1000)
                    } else {
                        n.to_string()
                    }
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">services (log scale)</text>"#,
                x0 + pw / 2.0,
                y0 + ph + 34.0
            );
            for (dp, color, dash) in colors {
                let pts: Vec<(f64, f64)> = sizes
                    .iter()
                    .filter_map(|&n| {
                        let r = rows.iter().find(|r| r.services == n && r.dataplane == dp)?;
                        Some((px(n), py(value(r)?)))
                    })
                    .collect();
                if pts.is_empty() {
                    continue;
                }
                let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                let _ = writeln!(
                    s,
                    r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
                    path.join(" ")
                );
                for (x, y) in pts {
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}"/>"#
                    );
                }
            }
        }
        let mut lx = 70.0;
        for (dp, color, dash) in colors {
            if !rows.iter().any(|r| r.dataplane == dp && r.p50.is_some()) {
                continue;
            }
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" x2="{}" y1="{}" y2="{}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{}" y="{}">{}</text>"#,
                lx + 24.0,
                h - 22.0,
                h - 22.0,
                lx + 30.0,
                h - 18.0,
                label(dp)
            );
            lx += 190.0;
        }
        let _ = writeln!(s, "</svg>");
        s
    }

    /// A round axis maximum (1, 2 or 5 times a power of ten) at or above `v`.
    fn nice(v: f64) -> f64 {
        let p = 10f64.powf(v.log10().floor());
        [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * p)
            .find(|&c| c >= v)
            .unwrap_or(10.0 * p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(dp: &str, p50: f64) -> Value {
        json!({
            "dataplane": dp,
            "services": 100,
            "load_s": 1.0,
            "detail": {},
            "runs": [{"p50_us": p50, "p99_us": 2.0 * p50, "conn_per_s": 1000.0}],
            "phases": {"load_s": 1.0, "check_s": 0.1, "measure_s": 2.0, "teardown_s": 0.5},
        })
    }

    #[test]
    fn the_report_shows_rounds_failed_loads_with_their_time_and_the_run_time() {
        let all = json!({
            "machine": {"quick": false, "wall_s": 1200.0, "steps_s": {"build": 600.0}},
            "lab": {
                "conn": {
                    "load_limit_s": 240.0,
                    "rounds": {"100": [["kplb", "none"], ["none", "kplb"]]},
                    "results": [
                        measured("none", 100.0),
                        measured("kplb", 105.0),
                        {
                            "dataplane": "nftables",
                            "services": 100,
                            "load_s": 240.1,
                            "error": "did not load",
                            "phases": {"load_s": 240.1, "teardown_s": 1.0},
                        },
                    ],
                },
                "xdp": {"wall_s": 30.0, "sync_limit_s": 90.0},
            },
        });
        let md = report::markdown(&all, "");
        assert!(md.contains("**100 services** (rounds: kplb → none; none → kplb)"));
        assert!(md.contains("| kplb (socket LB) | 1.0 (sync 0.0) | 105 (105–105) |"));
        assert!(md.contains("| kube-proxy nftables | 240.1 | error: did not load |"));
        assert!(md.contains("| release build | 11.0 | 10.0 |"));
        assert!(md.contains("| 1. XDP per-packet cost | 2.0 | 0.5 |"));
        assert!(md.contains("| **total** | **< 30** | **20.0** |"));
        assert!(md.contains("| 100 | nftables | 240.1 (failed) | – | – | 1.0 |"));
    }
}
