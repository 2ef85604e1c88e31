//! Section 1: per-packet cost of kplb's XDP paths with `BPF_PROG_TEST_RUN`.
//!
//! Method:
//! - The harness floor is a hand-assembled XDP program that only returns XDP_PASS, loaded and
//!   run in this same process: `repeat = 1` calls (the kernel's per-call `duration`) and one
//!   `repeat = 1000` call (the per-iteration cost without the per-call overhead), measured
//!   again before every kplb size so floor and program share the same conditions.
//! - kplb's program is the one the real agent attached to node1's eth0 (found through the
//!   interface's XDP program id), so its maps and runtime configuration are exactly what the
//!   agent wrote. Services: one NodePort service (TCP 80 -> 8080, nodePort 30080) whose 10
//!   endpoints are remote (on node2's pod CIDR, so the path includes the FIB lookup and
//!   SNAT), plus `n - 1` filler services for n = 1, 1k, 10k and 100k: each a ClusterIP
//!   (172.30.0.0/15) and an external IP (198.18.0.0/15) on TCP 80, so the XDP path's lookups
//!   run against external frontends too, with 10 endpoints from a pool of 200,000 addresses.
//!   A filler makes 4 `KPLB_SVC` entries (ClusterIP; external IP in both scopes; the external
//!   IP's any-port marker): 400k at 100k services, within the map's 524,288. Backends stay
//!   under 200,000; `--maglev-table-size 251` keeps 100k tables small.
//! - Translating paths rewrite the packet, and the kernel reuses the buffer across `repeat`
//!   iterations, so every path is timed with `repeat = 1` (the input is copied in afresh on
//!   every call) and reported as median(kernel duration) - median(floor duration):
//!   `new flow` (a TCP SYN from a new source port each call: conntrack miss, Maglev pick,
//!   two conntrack inserts, NAT, FIB), `established` (the same ACK again and again: conntrack
//!   hit), `not a service` (node IP, port 22: lookups miss, XDP_PASS).
//! - The calls run on a thread inside node1's netns, with an `xdp_md` context whose ingress
//!   interface is node1's eth0, so FIB lookups see the node's routes.
//! - When the agent attaches no XDP program the kplb part is skipped with a note.

use std::{net::Ipv4Addr, os::fd::OwnedFd, time::Duration};

use anyhow::{Context, Result};
use lb_tests::{
    Lab,
    manifests::{Endpoint, EndpointSlice, Port, Protocol, Service, ServiceType},
};
use serde_json::{Value, json};

use crate::{
    bpf,
    lab::{NODE, RunningAgent},
    services::{self, ENDPOINTS},
    stats::{percentile, sorted},
};

pub struct Config {
    pub calls: usize,
    pub sizes: Vec<usize>,
    /// Longest the agent may take to sync one size (recorded as an error beyond).
    pub sync_limit: Duration,
}

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const NODE_PORT: u16 = 30080;
/// Outside the fillers' ClusterIPs (172.30.0.0/15).
const NP_CLUSTER_IP: &str = "172.29.0.1";
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 + TCP (20-byte header) + 6 bytes of payload: 60 bytes, valid checksums.
fn tcp_packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 60];
    p[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    p[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&46u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum(ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut p[34..60];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp[20..26].copy_from_slice(b"kplbbn");
    let mut pseudo = 0u32;
    for w in [src.octets(), dst.octets()] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
        pseudo += u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    pseudo += 6 + 26;
    let c = checksum(&p[34..60], pseudo);
    p[50..52].copy_from_slice(&c.to_be_bytes());
    p
}

/// `struct xdp_md` for a packet of `len` bytes arriving on `ifindex`.
fn xdp_md(len: usize, ifindex: u32) -> [u8; 24] {
    let mut c = [0u8; 24];
    c[4..8].copy_from_slice(&(len as u32).to_ne_bytes()); // data_end
    c[12..16].copy_from_slice(&ifindex.to_ne_bytes()); // ingress_ifindex
    c
}

/// Kernel durations (ns) of `calls` repeat=1 runs of `packet(k)`, plus verdict counts.
/// `ifindex`: the ingress interface in the `xdp_md` context (it must have XDP attached in
/// native mode); `None` runs without a context (the loopback device).
fn timed(
    prog: &OwnedFd,
    ifindex: Option<u32>,
    calls: usize,
    mut packet: impl FnMut(usize) -> Vec<u8>,
) -> Result<(Vec<f64>, Value)> {
    let mut out = vec![0u8; 256];
    let mut durations = Vec::with_capacity(calls);
    let mut verdicts = std::collections::BTreeMap::<String, usize>::new();
    for k in 0..calls {
        let p = packet(k);
        let ctx = ifindex.map(|i| xdp_md(p.len(), i));
        let (verdict, ns, _) = bpf::test_run(prog, &p, 1, ctx.as_ref().map(|c| &c[..]), &mut out)?;
        durations.push(f64::from(ns));
        *verdicts.entry(verdict_name(verdict)).or_default() += 1;
    }
    Ok((sorted(durations), json!(verdicts)))
}

fn verdict_name(v: u32) -> String {
    match v {
        0 => "XDP_ABORTED".into(),
        1 => "XDP_DROP".into(),
        2 => "XDP_PASS".into(),
        3 => "XDP_TX".into(),
        4 => "XDP_REDIRECT".into(),
        other => format!("verdict {other}"),
    }
}

fn dist(d: &[f64]) -> Value {
    json!({
        "calls": d.len(),
        "p10_ns": percentile(d, 10.0),
        "median_ns": percentile(d, 50.0),
        "p90_ns": percentile(d, 90.0),
    })
}

/// The XDP_PASS floor: repeat=1 calls and one repeat=1000 call.
fn floor(pass: &OwnedFd, ifindex: Option<u32>, calls: usize) -> Result<Value> {
    let p = tcp_packet(Ipv4Addr::new(203, 0, 113, 10), 40000, NODE_IP, 80, TCP_ACK);
    let (d, _) = timed(pass, ifindex, calls, |_| p.clone())?;
    let ctx = ifindex.map(|i| xdp_md(p.len(), i));
    let mut out = vec![0u8; 256];
    let mut per_iter = Vec::new();
    for _ in 0..5 {
        per_iter.push(f64::from(
            bpf::test_run(pass, &p, 1000, ctx.as_ref().map(|c| &c[..]), &mut out)?.1,
        ));
    }
    let per_iter = sorted(per_iter);
    Ok(json!({"repeat1": dist(&d), "repeat1000_ns": percentile(&per_iter, 50.0)}))
}

fn manifests(dir: &std::path::Path, n: usize) -> Result<()> {
    let mut text = String::new();
    let np = Service::new("np")
        .type_(ServiceType::NodePort)
        .cluster_ip(NP_CLUSTER_IP)
        .port(Port::tcp(80, 8080).named("http").node_port(NODE_PORT))
        .to_json();
    let slice = (0..ENDPOINTS).fold(
        EndpointSlice::new("np-1", "np").port(Some("http"), Protocol::Tcp, 8080),
        |s, j| s.endpoint(Endpoint::ready_on(&format!("10.0.2.{}", 10 + j), "node2")),
    );
    for doc in [np, slice.to_json()] {
        text.push_str("---\n");
        text.push_str(&serde_json::to_string(&doc)?);
        text.push('\n');
    }
    for i in 0..n.saturating_sub(1) {
        let ext = Ipv4Addr::from(0xc612_0000 + i as u32 + 1); // 198.18.0.0/15
        let svc = Service::new(&services::name(i))
            .cluster_ip(&services::vip(i).to_string())
            .external_ip(&ext.to_string())
            .port(Port::tcp(80, 8080).named("http"))
            .to_json();
        let slice = (0..ENDPOINTS).fold(
            EndpointSlice::new(&format!("{}-1", services::name(i)), &services::name(i)).port(
                Some("http"),
                Protocol::Tcp,
                8080,
            ),
            |s, j| {
                s.endpoint(Endpoint::ready_on(
                    &services::dummy_endpoint(i, j).to_string(),
                    "node2",
                ))
            },
        );
        for doc in [svc, slice.to_json()] {
            text.push_str("---\n");
            text.push_str(&serde_json::to_string(&doc)?);
            text.push('\n');
        }
    }
    services::write_atomic(dir, "services.yaml", &text)
}

/// The id of the XDP program attached to eth0 in `ns`, if any.
fn attached_xdp(lab: &Lab, ns: &str) -> Result<Option<u32>> {
    let out = lab.run_ok(ns, &["ip", "-j", "-d", "link", "show", "eth0"])?;
    let v: Value = serde_json::from_str(&out)?;
    let xdp = &v[0]["xdp"];
    if xdp.is_null() {
        return Ok(None);
    }
    let id = xdp["prog"]["id"]
        .as_u64()
        .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64())
        .context("XDP attached but no program id in `ip -j link`")?;
    Ok(Some(id as u32))
}

pub fn run(cfg: &Config) -> Result<Value> {
    let lab = Lab::new(2)?;
    // node2 is only the next hop of the remote endpoints: a permanent neighbour entry on
    // node1, so the FIB lookup always resolves.
    let out = lab.run_ok("node2", &["ip", "-j", "link", "show", "eth0"])?;
    let v: Value = serde_json::from_str(&out)?;
    let node2_mac = v[0]["address"].as_str().context("node2 eth0 MAC")?;
    lab.run_ok(
        NODE,
        &[
            "ip",
            "neigh",
            "replace",
            "192.168.0.3",
            "lladdr",
            node2_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )?;
    let ifindex = lab.in_netns(NODE, || {
        // SAFETY: a NUL-terminated interface name.
        Ok(unsafe { libc::if_nametoindex(c"eth0".as_ptr()) })
    })?;
    let pass = bpf::load_xdp_pass()?;
    // No XDP on eth0 yet, so no ingress context (the kernel wants a registered XDP rxq).
    let first_floor = lab.in_netns(NODE, || floor(&pass, None, cfg.calls))?;
    let mut sizes = Vec::new();
    let mut skipped = Value::Null;
    for &n in &cfg.sizes {
        eprintln!("kplb-bench: xdp: {n} services");
        let t = std::time::Instant::now();
        let dir = lab.tmp_dir().join(format!("xdp-{n}"));
        manifests(&dir, n)?;
        let mut agent = RunningAgent::start(
            &lab,
            1,
            &dir,
            &["--maglev-table-size", "251", "--xdp-mode", "native"],
        )?;
        let synced = agent.wait_synced(cfg.sync_limit);
        let result = (|| -> Result<Option<Value>> {
            let (wall, line) = synced?;
            let Some(id) = attached_xdp(&lab, NODE)? else {
                return Ok(None);
            };
            let prog = bpf::prog_by_id(id)?;
            let r = lab.in_netns(NODE, || measure(&prog, &pass, ifindex, cfg.calls))?;
            Ok(Some(
                json!({"services": n, "synced": line, "start_to_synced_s": wall, "paths": r}),
            ))
        })();
        agent.stop_and_clean()?;
        let wall_s = t.elapsed().as_secs_f64();
        match result {
            Ok(Some(mut v)) => {
                v["wall_s"] = json!(wall_s);
                sizes.push(v);
            }
            Ok(None) => {
                skipped = json!(
                    "XDP datapath not present in this build: lb-agent attached no XDP program to --interfaces eth0"
                );
                break;
            }
            Err(e) => {
                sizes.push(json!({"services": n, "error": format!("{e:#}"), "wall_s": wall_s}));
            }
        }
    }
    Ok(json!({
        "calls": cfg.calls,
        "sync_limit_s": cfg.sync_limit.as_secs_f64(),
        "floor": first_floor,
        "kplb": sizes,
        "skipped": skipped,
    }))
}

fn measure(prog: &OwnedFd, pass: &OwnedFd, ifindex: u32, calls: usize) -> Result<Value> {
    let ifindex = Some(ifindex);
    let fl = floor(pass, ifindex, calls).context("XDP_PASS floor with an eth0 context")?;
    let floor_median = fl["repeat1"]["median_ns"].as_f64().unwrap_or(0.0);
    let client = |k: usize| Ipv4Addr::new(203, 0, 113, 10 + (k / 50_000) as u8);
    let mut paths = serde_json::Map::new();
    let new_flow = timed(prog, ifindex, calls, |k| {
        tcp_packet(
            client(k),
            10_000 + (k % 50_000) as u16,
            NODE_IP,
            NODE_PORT,
            TCP_SYN,
        )
    })?;
    let hot = Ipv4Addr::new(203, 0, 113, 200);
    let mut out = vec![0u8; 256];
    let syn = tcp_packet(hot, 40_000, NODE_IP, NODE_PORT, TCP_SYN);
    let ctx = ifindex.map(|i| xdp_md(syn.len(), i));
    bpf::test_run(prog, &syn, 1, ctx.as_ref().map(|c| &c[..]), &mut out)?;
    let ack = tcp_packet(hot, 40_000, NODE_IP, NODE_PORT, TCP_ACK);
    let established = timed(prog, ifindex, calls, |_| ack.clone())?;
    let other = tcp_packet(
        Ipv4Addr::new(203, 0, 113, 201),
        40_001,
        NODE_IP,
        22,
        TCP_ACK,
    );
    let not_service = timed(prog, ifindex, calls, |_| other.clone())?;
    for (name, (d, verdicts)) in [
        ("new_flow", new_flow),
        ("established", established),
        ("not_a_service", not_service),
    ] {
        let median = percentile(&d, 50.0);
        paths.insert(
            name.into(),
            json!({"dist": dist(&d), "verdicts": verdicts, "minus_floor_ns": median - floor_median}),
        );
    }
    let mut r = json!({"floor": fl, "paths": paths});
    if r["paths"]["new_flow"]["verdicts"].get("XDP_PASS").is_some() {
        r["warning"] = json!("new flows got XDP_PASS: the NodePort frontend was not translated");
    }
    Ok(r)
}
