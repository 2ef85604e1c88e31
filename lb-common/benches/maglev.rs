//! Maglev table builder benchmark: build time, balance and disruption, as a markdown report.
//!
//! `cargo bench -p lb-common --bench maglev` prints the report and writes it to
//! `bench/maglev.md` at the workspace root. `-- --quick` (or `MAGLEV_BENCH_QUICK=1`) runs few
//! trials and only prints, so a smoke run never overwrites the recorded numbers.

use lb_common::maglev::{Builder, Identity, build};
use std::error::Error;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const SIZES: [u32; 3] = [16381, 65537, 655373];
const BACKENDS: [usize; 3] = [10, 100, 1000];
/// Backends removed in the disruption runs, out of 1000 (0.1%, 1%, 5%, 10%).
const REMOVED: [usize; 4] = [1, 10, 50, 100];
const SEED: u64 = 0x6b70_6c62;

/// Published and locally measured reference points: (M, N, milliseconds).
const PAPER_MS: [(u32, usize, f64); 2] = [(65537, 1000, 1.8), (655373, 1000, 22.9)];
const C_ANCHOR_MS: [(u32, usize, f64); 2] = [(65537, 1000, 1.83), (655373, 1000, 25.6)];

struct Config {
    quick: bool,
    /// Timed builds per (M, N) for M below 100k, and for larger M.
    runs_small: usize,
    runs_large: usize,
    disruption_trials: usize,
}

impl Config {
    fn from_env() -> Self {
        let quick = std::env::args().any(|a| a == "--quick")
            || std::env::var_os("MAGLEV_BENCH_QUICK").is_some_and(|v| v != "0");
        if quick {
            Self {
                quick,
                runs_small: 5,
                runs_large: 3,
                disruption_trials: 3,
            }
        } else {
            Self {
                quick,
                runs_small: 51,
                runs_large: 21,
                disruption_trials: 20,
            }
        }
    }
}

/// splitmix64: a tiny deterministic generator, so runs are repeatable without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `n` distinct pod-like backends (10.x.y.z:8080).
fn backends(n: usize, rng: &mut Rng) -> Vec<Identity> {
    let mut set = std::collections::BTreeSet::new();
    while set.len() < n {
        let ip = Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff));
        set.insert(Identity::new(IpAddr::V4(ip), 8080));
    }
    let mut v: Vec<Identity> = set.into_iter().collect();
    // Shuffle: the builder must not benefit from sorted input.
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
    v
}

struct Stats {
    min: f64,
    median: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let at = |i: usize| v.get(i).copied().unwrap_or(f64::NAN);
    Stats {
        min: at(0),
        median: at(v.len() / 2),
        max: at(v.len().saturating_sub(1)),
    }
}

fn reference(table: &[(u32, usize, f64)], m: u32, n: usize) -> String {
    table
        .iter()
        .find(|&&(rm, rn, _)| rm == m && rn == n)
        .map_or_else(|| "".to_string(), |&(_, _, ms)| format!("{ms:.2}"))
}

fn build_times(cfg: &Config, out: &mut String) -> Result<(), Box<dyn Error>> {
    writeln!(out, "## Build time\n")?;
    writeln!(
        out,
        "`build()` from a shuffled list (sort, hash, fill, fresh allocations), milliseconds; \
         the last column reuses one `Builder` and its output buffer across runs.\n"
    )?;
    writeln!(
        out,
        "| M | N | runs | min | median | max | paper | plain C on this VM | median, reused |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut builder = Builder::default();
    let mut reused = Vec::new();
    let mut rng = Rng(SEED);
    for &m in &SIZES {
        for &n in &BACKENDS {
            let runs = if m > 100_000 {
                cfg.runs_large
            } else {
                cfg.runs_small
            };
            let (mut fresh_ms, mut reused_ms) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let list = backends(n, &mut rng);
                let seed = rng.next();
                let start = Instant::now();
                let table = build(&list, m, seed)?;
                fresh_ms.push(start.elapsed().as_secs_f64() * 1e3);
                std::hint::black_box(table);
                let start = Instant::now();
                builder.build_into(&list, m, seed, &mut reused)?;
                reused_ms.push(start.elapsed().as_secs_f64() * 1e3);
                std::hint::black_box(&reused);
            }
            let s = stats(fresh_ms);
            writeln!(
                out,
                "| {m} | {n} | {runs} | {:.3} | {:.3} | {:.3} | {} | {} | {:.3} |",
                s.min,
                s.median,
                s.max,
                reference(&PAPER_MS, m, n),
                reference(&C_ANCHOR_MS, m, n),
                stats(reused_ms).median
            )?;
        }
    }
    writeln!(out)?;
    Ok(())
}

fn balance(out: &mut String) -> Result<(), Box<dyn Error>> {
    writeln!(out, "## Entries per backend\n")?;
    writeln!(out, "| M | N | M/N | min | max | max/min |")?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|")?;
    let mut rng = Rng(SEED ^ 1);
    for &m in &SIZES {
        for &n in &BACKENDS {
            let list = backends(n, &mut rng);
            let table = build(&list, m, rng.next())?;
            let mut count = vec![0u32; n];
            for &i in &table {
                count[i as usize] += 1;
            }
            let min = count.iter().copied().min().unwrap_or(0);
            let max = count.iter().copied().max().unwrap_or(0);
            writeln!(
                out,
                "| {m} | {n} | {:.1} | {min} | {max} | {:.4} |",
                f64::from(m) / n as f64,
                f64::from(max) / f64::from(min.max(1))
            )?;
        }
    }
    writeln!(out)?;
    Ok(())
}

/// Percentage of slots whose backend changes when `k` random backends of `list` are removed.
fn changed_after_removing(
    list: &[Identity],
    k: usize,
    m: u32,
    seed: u64,
    rng: &mut Rng,
    builder: &mut Builder,
) -> Result<f64, Box<dyn Error>> {
    let mut before = Vec::new();
    builder.build_into(list, m, seed, &mut before)?;
    // Partial Fisher-Yates: the first k of `order` are removed.
    let mut order: Vec<usize> = (0..list.len()).collect();
    for i in 0..k {
        let j = i + rng.below(list.len() - i);
        order.swap(i, j);
    }
    let kept = &order[k..];
    let rest: Vec<Identity> = kept.iter().map(|&i| list[i]).collect();
    let mut after = Vec::new();
    builder.build_into(&rest, m, seed, &mut after)?;
    let changed = before
        .iter()
        .zip(&after)
        .filter(|&(&b, &a)| b as usize != kept[a as usize]);
    Ok(changed.count() as f64 * 100.0 / f64::from(m))
}

fn disruption(cfg: &Config, out: &mut String) -> Result<(), Box<dyn Error>> {
    const N: usize = 1000;
    writeln!(out, "## Disruption when backends leave\n")?;
    writeln!(
        out,
        "N = {N}; remove k random backends, rebuild with the same seed, count changed slots \
         (the paper's Fig. 12 method); {} trials per row. Ideal = k/N (only the removed \
         backends' slots move).\n",
        cfg.disruption_trials
    )?;
    writeln!(
        out,
        "| M | removed | ideal % | changed % (mean) | min | max | reference |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut rng = Rng(SEED ^ 2);
    let mut builder = Builder::default();
    for m in [65537, 655373] {
        for k in REMOVED {
            let mut pct = Vec::with_capacity(cfg.disruption_trials);
            for _ in 0..cfg.disruption_trials {
                let list = backends(N, &mut rng);
                let seed = rng.next();
                pct.push(changed_after_removing(
                    &list,
                    k,
                    m,
                    seed,
                    &mut rng,
                    &mut builder,
                )?);
            }
            let mean = pct.iter().sum::<f64>() / pct.len().max(1) as f64;
            let s = stats(pct);
            let reference = if (m, k) == (65537, 1) { "0.69" } else { "" };
            writeln!(
                out,
                "| {m} | {k} ({:.1}%) | {:.1} | {mean:.3} | {:.3} | {:.3} | {reference} |",
                k as f64 * 100.0 / N as f64,
                k as f64 * 100.0 / N as f64,
                s.min,
                s.max
            )?;
        }
    }
    writeln!(out)?;
    Ok(())
}

fn machine(out: &mut String) -> Result<(), Box<dyn Error>> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    writeln!(out, "- Date (UTC): {}", utc_now())?;
    writeln!(out, "- Kernel (`uname -r`): {kernel}")?;
    writeln!(out, "- CPUs (`nproc`): {cpus}")?;
    writeln!(out, "- CPU model: {cpu}")?;
    writeln!(
        out,
        "- Build: `cargo bench` (release profile), single thread\n"
    )?;
    Ok(())
}

/// `YYYY-MM-DD HH:MM` from the system clock (days-to-civil conversion, proleptic Gregorian).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn main() -> Result<(), Box<dyn Error>> {
    let cfg = Config::from_env();
    let mut out = String::new();
    writeln!(out, "# Maglev table builder benchmark\n")?;
    writeln!(
        out,
        "Generated by `cargo bench -p lb-common --bench maglev`{}. Reference figures: the \
         Maglev paper (NSDI 2016: 1.8 ms at M=65537 and 22.9 ms at M=655373 for \
         N=1000), a plain C implementation timed on this VM, and the 0.69% of entries changed \
         by removing 1 of 1000 backends at M=65537 quoted in kplb's design issue.\n",
        if cfg.quick {
            " -- --quick (few trials: indicative only)"
        } else {
            ""
        }
    )?;
    machine(&mut out)?;
    build_times(&cfg, &mut out)?;
    balance(&mut out)?;
    disruption(&cfg, &mut out)?;
    print!("{out}");
    if !cfg.quick {
        // The workspace root is lb-common's parent.
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = manifest.parent().unwrap_or(manifest).join("bench");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("maglev.md");
        std::fs::write(&path, &out)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
