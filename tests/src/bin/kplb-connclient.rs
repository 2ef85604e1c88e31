//! kplb-connclient: the connection benchmark's client (`cargo xtask bench`, section 2).
//!
//! ```text
//! kplb-connclient --targets IP:PORT[,IP:PORT...] --count N [--warmup W] [--cpu C] [--timeout-ms T]
//!                 [--max-errors E]
//! ```
//! One new TCP connection per request, one request after another: `socket`, `connect`, send
//! `GET /hostname HTTP/1.0`, read to EOF, close with `SO_LINGER 0` (a RST, so tens of thousands
//! of connections leave no TIME_WAIT behind to exhaust ports or grow the conntrack table).
//! Targets are used round-robin. Each request's latency (connect to EOF) is taken with
//! `Instant`; `--warmup` requests run first and are not recorded. Prints one JSON line:
//! `{"count","errors","elapsed_s","conn_per_s","p50_us","p90_us","p99_us","max_us","bodies"}`,
//! where `bodies` counts distinct response bodies (netexec answers its pod name).
//! `--max-errors` stops after that many failed requests (a check that must all succeed fails
//! at once instead of waiting out every timeout).
//!
//! Run it inside a pod's netns and cgroup (`Lab::command`) so the socket-level load balancer
//! sees its `connect()`.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    process::ExitCode,
    time::{Duration, Instant},
};

struct Args {
    targets: Vec<SocketAddr>,
    count: usize,
    warmup: usize,
    cpu: Option<usize>,
    timeout: Duration,
    max_errors: Option<usize>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        targets: Vec::new(),
        count: 1000,
        warmup: 100,
        cpu: None,
        timeout: Duration::from_secs(2),
        max_errors: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = || {
            value
                .parse::<usize>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--targets" => {
                for t in value.split(',') {
                    a.targets
                        .push(t.parse().map_err(|e| format!("target {t:?}: {e}"))?);
                }
            }
            "--count" => a.count = num()?,
            "--warmup" => a.warmup = num()?,
            "--cpu" => a.cpu = Some(num()?),
            "--timeout-ms" => a.timeout = Duration::from_millis(num()? as u64),
            "--max-errors" => a.max_errors = Some(num()?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.targets.is_empty() || a.count == 0 {
        return Err("need --targets and a --count above 0".into());
    }
    Ok(a)
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// One request on a new connection; returns the response body.
fn request(target: &SocketAddr, timeout: Duration, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(target, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    s.write_all(b"GET /hostname HTTP/1.0\r\n\r\n")?;
    buf.clear();
    s.read_to_end(buf)?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` outlives the call and the length is its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    Ok(())
}

fn body(resp: &[u8]) -> String {
    let at = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(resp.len(), |i| i + 4);
    String::from_utf8_lossy(&resp[at..]).into_owned()
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kplb-connclient: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(cpu) = a.cpu {
        pin(cpu);
    }
    let mut buf = Vec::with_capacity(512);
    let mut errors = 0usize;
    let mut first_error = String::new();
    for i in 0..a.warmup {
        if request(&a.targets[i % a.targets.len()], a.timeout, &mut buf).is_err() {
            errors += 1;
        }
    }
    let mut lat_ns: Vec<u64> = Vec::with_capacity(a.count);
    let mut bodies: BTreeMap<String, usize> = BTreeMap::new();
    let start = Instant::now();
    for i in 0..a.count {
        let t = Instant::now();
        match request(&a.targets[i % a.targets.len()], a.timeout, &mut buf) {
            Ok(()) => {
                lat_ns.push(t.elapsed().as_nanos() as u64);
                *bodies.entry(body(&buf)).or_default() += 1;
            }
            Err(e) => {
                errors += 1;
                if first_error.is_empty() {
                    first_error = e.to_string();
                }
                if a.max_errors.is_some_and(|max| errors >= max) {
                    break;
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat_ns.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat_ns.is_empty() {
            return 0.0;
        }
        // Nearest rank.
        let rank = ((p / 100.0) * lat_ns.len() as f64).ceil().max(1.0) as usize;
        lat_ns[rank.min(lat_ns.len()) - 1] as f64 / 1e3
    };
    let summary = serde_json::json!({
        "count": lat_ns.len(),
        "errors": errors,
        "elapsed_s": elapsed,
        "conn_per_s": lat_ns.len() as f64 / elapsed,
        "p50_us": pct(50.0),
        "p90_us": pct(90.0),
        "p99_us": pct(99.0),
        "max_us": pct(100.0),
        "bodies": bodies.len(),
        "first_error": first_error,
    });
    println!("{summary}");
    if lat_ns.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
