//! Section 1: per-packet cost of kplb's XDP paths with `BPF_PROG_TEST_RUN`.
//!
//! Method:
//! - kplb's program is the one the real agent attached to node1's eth0 in native mode (found
//!   through the interface's XDP program id), so its maps and runtime configuration are
//!   exactly what the agent wrote. Services: one NodePort service (TCP 80 -> 8080, nodePort
//!   30080) whose 10 endpoints are remote (on node2's pod CIDR, so the path includes the FIB
//!   lookup and SNAT), plus `n - 1` filler services for n = 1, 1k, 10k and 100k: each a
//!   ClusterIP (172.30.0.0/15) and an external IP (198.18.0.0/15) on TCP 80, so the XDP path's
//!   lookups run against external frontends too, with 10 endpoints from a pool of 200,000
//!   addresses. A filler makes 4 `KPLB_SVC` entries (ClusterIP; external IP in both scopes;
//!   the external IP's any-port marker): 400k at 100k services, within the map's 524,288.
//!   Backends stay under 200,000; `--maglev-table-size 251` keeps 100k tables small.
//! - Translating paths rewrite the packet, and the kernel reuses the buffer across `repeat`
//!   iterations, so every path is timed with `repeat = 1` (the input is copied in afresh on
//!   every call) and reported as median(kernel duration) - median(floor duration):
//!   `new flow` (a TCP SYN from a new source port each call: conntrack miss, Maglev pick,
//!   two conntrack inserts, NAT, FIB), `established` (the same ACK again and again: conntrack
//!   hit), `not a service` (node IP, port 22: lookups miss, XDP_PASS), `reject` (a SYN to a
//!   NodePort service without endpoints: answered with a TCP RST, XDP_TX).
//! - The harness floor is a hand-assembled XDP program that only returns XDP_PASS, timed the
//!   same way with the same context and, like the measured program, attached in native mode
//!   (so the kernel calls both through its XDP dispatcher); plus `repeat = 1000` calls (the
//!   per-iteration cost without the per-call overhead) as a sanity check.
//! - The calls run on a thread pinned to one CPU inside the node's netns, with an `xdp_md`
//!   context whose ingress interface is the node's eth0, so FIB lookups see its routes.
//! - Every size (and every other agent build, `--xdp-variants name=PATH,...`) runs its own
//!   agent on its own node, all loaded at once, and they are measured side by side: every path
//!   of every size and build in rounds of [`ROUND`] calls, in a freshly shuffled order each
//!   round, so that growth with the number of services and differences between builds are
//!   not drifts of the shared machine between one measurement and the next.
//! - When the agent attaches no XDP program the kplb part is skipped with a note.

use std::{collections::BTreeMap, net::Ipv4Addr, os::fd::OwnedFd, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use lb_common::ct::CtKey;
use lb_tests::{
    Agent, Lab,
    manifests::{Endpoint, EndpointSlice, Port, Protocol, Service, ServiceType},
};
use serde_json::{Value, json};

use crate::{
    bpf,
    lab::{CLIENT_CPU, RunningAgent, pin_thread},
    services::{self, ENDPOINTS},
    stats::{Rng, percentile, sorted, trimmed_mean},
};

pub struct Config {
    pub calls: usize,
    pub sizes: Vec<usize>,
    /// Longest an agent may take to sync one size (recorded as an error beyond).
    pub sync_limit: Duration,
    /// Other agent builds measured side by side with `$KPLB_AGENT_BIN`: (name, binary).
    pub variants: Vec<(String, PathBuf)>,
}

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const NODE_PORT: u16 = 30080;
/// Outside the fillers' ClusterIPs (172.30.0.0/15).
const NP_CLUSTER_IP: &str = "172.29.0.1";
/// A NodePort service without endpoints: its SYNs are answered with a TCP RST (REJECT).
const EMPTY_CLUSTER_IP: &str = "172.29.0.2";
const EMPTY_NODE_PORT: u16 = 30081;
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
    let empty = Service::new("np-empty")
        .type_(ServiceType::NodePort)
        .cluster_ip(EMPTY_CLUSTER_IP)
        .port(Port::tcp(80, 8080).named("http").node_port(EMPTY_NODE_PORT))
        .to_json();
    for doc in [np, slice.to_json(), empty] {
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

fn eth0_index(lab: &Lab, ns: &str) -> Result<u32> {
    lab.in_netns(ns, || {
        // SAFETY: a NUL-terminated interface name.
        Ok(unsafe { libc::if_nametoindex(c"eth0".as_ptr()) })
    })
}

/// The lab node of the `i`-th measured agent (sizes × builds): node1, then node3, node4, ... (node2 is the
/// remote endpoints' node and every measured node's next hop).
fn node_of(i: usize) -> usize {
    if i == 0 { 1 } else { i + 2 }
}

/// One agent to start: which size's services, which build.
struct Slot {
    size: usize,
    build: usize,
    node: usize,
}

pub fn run(cfg: &Config, rng: &mut Rng) -> Result<Value> {
    let builds: Vec<(String, PathBuf)> = std::iter::once(("kplb".to_owned(), Agent::bin()?))
        .chain(cfg.variants.iter().cloned())
        .collect();
    // Every size and build on its own node, all loaded at once, so their rounds can alternate:
    // growth from 1 to 100k services is then measured under the same machine noise, not in
    // minutes far apart.
    let slots: Vec<Slot> = (0..cfg.sizes.len())
        .flat_map(|s| (0..builds.len()).map(move |b| (s, b)))
        .enumerate()
        .map(|(i, (size, build))| Slot {
            size,
            build,
            node: node_of(i),
        })
        .collect();
    let lab = Lab::new(slots.last().map_or(2, |s| s.node).max(2))?;
    // node2 is only the next hop of the remote endpoints: a permanent neighbour entry on
    // every measured node, so the FIB lookup always resolves.
    let out = lab.run_ok("node2", &["ip", "-j", "link", "show", "eth0"])?;
    let v: Value = serde_json::from_str(&out)?;
    let node2_mac = v[0]["address"].as_str().context("node2 eth0 MAC")?;
    for s in &slots {
        let ns = format!("node{}", s.node);
        let argv = ["ip", "neigh", "replace", "192.168.0.3", "lladdr", node2_mac];
        lab.run_ok(
            &ns,
            &[&argv[..], &["dev", "eth0", "nud", "permanent"]].concat(),
        )?;
    }
    let pass = bpf::load_xdp_pass()?;
    // Attached in native mode (to node2, where it changes nothing), the floor program sits in
    // the kernel's XDP dispatcher like the agents' programs: BPF_PROG_TEST_RUN then calls
    // both directly. Unattached, it would be called through a retpoline, which makes the floor
    // higher than the measured program's share of the harness.
    let _pass_link = bpf::attach_xdp(&pass, eth0_index(&lab, "node2")?)
        .context("attaching the XDP_PASS floor program to node2's eth0")?;
    let mut agents = Vec::new();
    for (si, &n) in cfg.sizes.iter().enumerate() {
        let dir = lab.tmp_dir().join(format!("xdp-{n}"));
        manifests(&dir, n)?;
        for s in slots.iter().filter(|s| s.size == si) {
            eprintln!("kplb-bench: xdp: {n} services on node{}", s.node);
            let args = ["--maglev-table-size", "251", "--xdp-mode", "native"];
            let bin = &builds[s.build].1;
            agents.push(RunningAgent::start_bin(&lab, s.node, bin, &dir, &args)?);
        }
    }
    // (a row per size, why kplb was skipped).
    let result = (|| -> Result<(Vec<Value>, Value)> {
        // A size whose agent does not sync in time (or attaches nothing) is reported as such;
        // the others are still measured.
        let mut synced: Vec<Result<(f64, Value)>> = Vec::new();
        let deadline = std::time::Instant::now() + cfg.sync_limit;
        for a in &mut agents {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            synced.push(a.wait_synced(left.max(Duration::from_secs(1))));
        }
        let mut targets = Vec::new();
        let mut size_error: BTreeMap<usize, String> = BTreeMap::new();
        let mut skipped = Value::Null;
        for (i, s) in slots.iter().enumerate() {
            let ns = format!("node{}", s.node);
            if let Err(e) = &synced[i] {
                size_error.entry(s.size).or_insert(format!("{e:#}"));
                continue;
            }
            let Some(id) = attached_xdp(&lab, &ns)? else {
                skipped = json!(
                    "XDP datapath not present in this build: lb-agent attached no XDP program to --interfaces eth0"
                );
                continue;
            };
            targets.push((
                i,
                Target {
                    ns: ns.clone(),
                    ip: lab.node(s.node)?.ipv4,
                    prog: bpf::prog_by_id(id)?,
                    ct: bpf::obj_get(&agents[i].maps_dir().join("KPLB_CT"))?,
                    ifindex: eth0_index(&lab, &ns)?,
                },
            ));
        }
        if !skipped.is_null() {
            return Ok((Vec::new(), skipped));
        }
        let (idx, only): (Vec<usize>, Vec<Target>) = targets.into_iter().unzip();
        let measured = measure(&lab, &only, &pass, cfg.calls, rng)?;
        let mut by_slot: BTreeMap<usize, Value> = idx.into_iter().zip(measured).collect();
        let mut rows = Vec::new();
        for (si, &n) in cfg.sizes.iter().enumerate() {
            if let Some(e) = size_error.get(&si) {
                rows.push(json!({"services": n, "error": e}));
                continue;
            }
            let mut row = json!({"services": n});
            for (i, s) in slots.iter().enumerate().filter(|(_, s)| s.size == si) {
                let m = by_slot.remove(&i).unwrap_or(Value::Null);
                if s.build == 0 {
                    if let Ok((wall, line)) = &synced[i] {
                        row["synced"] = line.clone();
                        row["start_to_synced_s"] = json!(wall);
                    }
                    row["paths"] = m;
                } else {
                    row["variants"][&builds[s.build].0] = m;
                }
            }
            rows.push(row);
        }
        Ok((rows, Value::Null))
    })();
    for a in agents {
        a.stop_and_clean()?;
    }
    let (sizes, skipped) = result?;
    Ok(json!({
        "calls": cfg.calls,
        "sync_limit_s": cfg.sync_limit.as_secs_f64(),
        "round": ROUND,
        "variants": builds.iter().skip(1).map(|(n, b)| json!({"name": n, "agent": b})).collect::<Vec<_>>(),
        "floor": sizes
            .iter()
            .find(|r| !r["paths"].is_null())
            .map_or(Value::Null, |s| s["paths"]["floor"].clone()),
        "kplb": sizes,
        "skipped": skipped,
    }))
}

/// An agent's XDP program and what measuring it needs.
struct Target {
    /// The node's netns (as the lab names it), where its eth0 ifindex is valid.
    ns: String,
    ip: Ipv4Addr,
    prog: OwnedFd,
    /// The agent's pinned conntrack map.
    ct: OwnedFd,
    ifindex: u32,
}

/// Calls per path and agent in one round. Rounds alternate between the agents, so builds
/// compared side by side share whatever else the machine does meanwhile.
const ROUND: usize = 500;

/// The measured paths, in the order of [`Samples`] in [`measure`].
const PATHS: [&str; 5] = [
    "floor",
    "new_flow",
    "established",
    "not_a_service",
    "reject",
];

#[derive(Default)]
struct Samples {
    ns: Vec<f64>,
    verdicts: BTreeMap<String, usize>,
}

/// Every path of every target, `calls` times each, in alternating rounds.
fn measure(
    lab: &Lab,
    targets: &[Target],
    pass: &OwnedFd,
    calls: usize,
    rng: &mut Rng,
) -> Result<Vec<Value>> {
    let mut acc: Vec<[Samples; 5]> = targets.iter().map(|_| Default::default()).collect();
    let mut per_iter = Vec::new();
    for t in targets {
        per_iter.push(lab.in_netns(&t.ns, || floor_per_iteration(pass, t.ifindex))?);
    }
    let mut order: Vec<usize> = (0..targets.len()).collect();
    for r in 0..calls.div_ceil(ROUND) {
        rng.shuffle(&mut order);
        for &i in &order {
            let t = &targets[i];
            lab.in_netns(&t.ns, || round(t, pass, r, &mut acc[i]))?;
        }
    }
    Ok(acc
        .into_iter()
        .zip(per_iter)
        .map(|(samples, per_iter)| summary(samples, per_iter))
        .collect())
}

/// The floor program's cost per iteration with `repeat = 1000` (no per-call overhead).
fn floor_per_iteration(pass: &OwnedFd, ifindex: u32) -> Result<f64> {
    let p = tcp_packet(CLIENT, 40000, NODE_IP, 80, TCP_ACK);
    let ctx = xdp_md(p.len(), ifindex);
    let mut out = vec![0u8; 256];
    let mut runs = Vec::new();
    for _ in 0..5 {
        runs.push(f64::from(
            bpf::test_run(pass, &p, 1000, Some(&ctx), &mut out)?.1,
        ));
    }
    Ok(percentile(&sorted(runs), 50.0))
}

/// One round on one target: `ROUND` calls of every path. Conntrack is emptied first, so new
/// flows find the table as a quiet node would (20k flows to 10 backends would otherwise fill
/// the SNAT port range and time failed port searches); the hot flow is then opened again.
fn round(t: &Target, pass: &OwnedFd, r: usize, acc: &mut [Samples; 5]) -> Result<()> {
    pin_thread(CLIENT_CPU);
    for key in bpf::keys(&t.ct, size_of::<CtKey>())? {
        bpf::delete(&t.ct, &key)?;
    }
    let hot = Ipv4Addr::new(203, 0, 113, 200);
    let mut out = vec![0u8; 256];
    let syn = tcp_packet(hot, 40_000, t.ip, NODE_PORT, TCP_SYN);
    bpf::test_run(
        &t.prog,
        &syn,
        1,
        Some(&xdp_md(syn.len(), t.ifindex)),
        &mut out,
    )?;
    let floor = tcp_packet(CLIENT, 40000, t.ip, 80, TCP_ACK);
    let ack = tcp_packet(hot, 40_000, t.ip, NODE_PORT, TCP_ACK);
    let other = tcp_packet(Ipv4Addr::new(203, 0, 113, 201), 40_001, t.ip, 22, TCP_ACK);
    let reject = tcp_packet(
        Ipv4Addr::new(203, 0, 113, 202),
        40_002,
        t.ip,
        EMPTY_NODE_PORT,
        TCP_SYN,
    );
    let [fl, new, est, not, rej] = acc;
    timed(pass, t.ifindex, fl, |_| floor.clone())?;
    timed(&t.prog, t.ifindex, new, |i| {
        let k = r * ROUND + i;
        let client = Ipv4Addr::new(203, 0, 113, 10 + (k / 50_000) as u8);
        tcp_packet(
            client,
            10_000 + (k % 50_000) as u16,
            t.ip,
            NODE_PORT,
            TCP_SYN,
        )
    })?;
    timed(&t.prog, t.ifindex, est, |_| ack.clone())?;
    timed(&t.prog, t.ifindex, not, |_| other.clone())?;
    timed(&t.prog, t.ifindex, rej, |_| reject.clone())
}

/// `struct xdp_md` for a packet of `len` bytes arriving on `ifindex`.
fn xdp_md(len: usize, ifindex: u32) -> [u8; 24] {
    let mut c = [0u8; 24];
    c[4..8].copy_from_slice(&(len as u32).to_ne_bytes()); // data_end
    c[12..16].copy_from_slice(&ifindex.to_ne_bytes()); // ingress_ifindex
    c
}

/// `ROUND` repeat=1 runs of `packet(i)` arriving on `ifindex` (which must have XDP attached in
/// native mode), added to `acc`.
fn timed(
    prog: &OwnedFd,
    ifindex: u32,
    acc: &mut Samples,
    mut packet: impl FnMut(usize) -> Vec<u8>,
) -> Result<()> {
    let mut out = vec![0u8; 256];
    for i in 0..ROUND {
        let p = packet(i);
        let ctx = xdp_md(p.len(), ifindex);
        let (verdict, ns, _) = bpf::test_run(prog, &p, 1, Some(&ctx), &mut out)?;
        acc.ns.push(f64::from(ns));
        *acc.verdicts.entry(verdict_name(verdict)).or_default() += 1;
    }
    Ok(())
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
        // Finer than the median where durations come in the clock's 10 ns steps.
        "trimmed_mean_ns": trimmed_mean(d, 10.0),
    })
}

/// One target's results in the report's layout: the floor and every path minus it.
fn summary(samples: [Samples; 5], floor_per_iter: f64) -> Value {
    let [floor, rest @ ..] = samples;
    let floor = sorted(floor.ns);
    let floor_median = percentile(&floor, 50.0);
    let mut paths = serde_json::Map::new();
    for (name, s) in PATHS[1..].iter().zip(rest) {
        let d = sorted(s.ns);
        let median = percentile(&d, 50.0);
        paths.insert(
            (*name).into(),
            json!({"dist": dist(&d), "verdicts": s.verdicts, "minus_floor_ns": median - floor_median}),
        );
    }
    let mut r = json!({
        "floor": {"repeat1": dist(&floor), "repeat1000_ns": floor_per_iter},
        "paths": paths,
    });
    if r["paths"]["new_flow"]["verdicts"].get("XDP_PASS").is_some() {
        r["warning"] = json!("new flows got XDP_PASS: the NodePort frontend was not translated");
    }
    if r["paths"]["reject"]["verdicts"].get("XDP_TX").is_none() {
        r["warning"] = json!("SYNs to the service without endpoints were not answered (no XDP_TX)");
    }
    r
}
