//! Section 3: NodePort packets per second through node1's veth.
//!
//! Two lab nodes. A generator netns on the lab bridge blasts pre-built 60-byte UDP frames (64
//! flows: source ports cycled, so every flow is established after its first packet) at
//! node1's IP and NodePort 30080 with an AF_PACKET socket and `sendmmsg` batches of 64,
//! pinned to CPU 1. (The kernel has no pktgen: CONFIG_NET_PKTGEN is off.) The Service's
//! endpoint is remote (10.0.2.10 behind node2), so a NodePort packet is translated (DNAT to the
//! endpoint, SNAT to node1) and sent back out of node1's eth0 towards node2. Modes:
//!
//! - `xdp_drop`: a counting XDP_DROP program on node1's eth0: the floor, what the generator,
//!   bridge and veth can deliver to XDP on that interface;
//! - `kplb`: the agent's XDP program on node1's eth0 in native mode (conntrack hit, SNAT, FIB
//!   lookup, XDP_TX);
//! - `iptables`: kube-proxy's NodePort rules in node1 (KUBE-NODEPORTS -> KUBE-EXT -> KUBE-SVC
//!   -> KUBE-SEP DNAT, masquerade), forwarded by the kernel.
//!
//! For `kplb` and `iptables` the translated packets are counted and dropped by the same
//! counting XDP program on the bridge side of node1's veth (`n1`), as they leave node1: the
//! rate is node1's translation rate, without the rest of the trip. (A veth also accepts XDP_TX
//! frames from its peer only when the peer runs XDP.) node1 gets a permanent neighbour entry
//! for node2 and the bridge a static entry for node1. Everything (generator, bridge, veth, XDP,
//! forwarding) runs in softirq on the generator's CPU, so the rates compare per-packet costs on
//! one core, not line rates.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_tests::manifests::{Endpoint, EndpointSlice, Port, Protocol, Service, ServiceType};
use serde_json::{Value, json};

use crate::{
    bpf,
    lab::{BenchLab, CLIENT_CPU, NODE, RunningAgent, pin_thread},
    services,
    stats::Rng,
};

pub struct Config {
    pub seconds: f64,
    pub runs: usize,
}

const GEN: &str = "gen";
const GEN_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const NODE_PORT: u16 = 30080;
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 10);
const NODE2: &str = "node2";
const FABRIC: &str = "fabric";
/// The fabric (bridge) side of node1's eth0.
const NODE1_PEER: &str = "n1";
const NODE2_IP: &str = "192.168.0.3";
const FLOWS: u16 = 64;

fn mac(bl: &BenchLab, ns: &str) -> Result<[u8; 6]> {
    let out = bl.lab.run_ok(ns, &["ip", "-j", "link", "show", "eth0"])?;
    let v: Value = serde_json::from_str(&out)?;
    let s = v[0]["address"].as_str().context("no MAC for eth0")?;
    let mut m = [0u8; 6];
    for (d, part) in m.iter_mut().zip(s.split(':')) {
        *d = u8::from_str_radix(part, 16)?;
    }
    Ok(m)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 + UDP (checksum 0) + 18 bytes of payload: 60 bytes.
fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], sport: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total: u16 = 20 + 8 + 18;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&GEN_IP.octets());
    ip[16..20].copy_from_slice(&NODE_IP.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&NODE_PORT.to_be_bytes());
    f.extend_from_slice(&(8u16 + 18).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(b"kplb-bench nodeprt");
    f
}

/// Sends `frames` round-robin out of this thread's netns' eth0 for `dur`; returns packets sent.
fn blast(frames: &[Vec<u8>], dur: Duration) -> Result<u64> {
    // SAFETY: plain socket(2), owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: a descriptor we just created.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a NUL-terminated interface name.
    let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
    if ifindex == 0 {
        bail!("no eth0 in the generator netns");
    }
    // SAFETY: zeroed sockaddr_ll is valid; the fields set are its address.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` outlives the call and the length is its size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const sll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("binding to eth0");
    }
    let one: libc::c_int = 1;
    // PACKET_QDISC_BYPASS: straight to the driver (veth), no qdisc.
    // SAFETY: `one` outlives the call.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        );
    }
    let mut iovs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    // SAFETY: zeroed mmsghdr is valid; each points at one iovec that outlives the sends.
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < dur {
        for _ in 0..16 {
            // SAFETY: `msgs` describes valid buffers for the whole call.
            let n = unsafe {
                libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0)
            };
            if n > 0 {
                sent += n as u64;
            }
        }
    }
    Ok(sent)
}

/// A counting program attached to eth0 of `ns` (detached when the returned fds drop).
struct Counter {
    map: OwnedFd,
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl Counter {
    fn attach(bl: &BenchLab, ns: &str, ifname: &str) -> Result<Self> {
        let map = bpf::percpu_counter()?;
        let prog = bpf::load_counting_xdp(&map, bpf::XDP_DROP)?;
        let link = attach(bl, ns, ifname, &prog)?;
        Ok(Self {
            map,
            _prog: prog,
            _link: link,
        })
    }

    fn read(&self) -> Result<u64> {
        bpf::read_counter(&self.map)
    }
}

/// Attaches `prog` to `ifname` in `ns` (the ifindex is resolved in that netns).
fn attach(bl: &BenchLab, ns: &str, ifname: &str, prog: &OwnedFd) -> Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname)?;
    bl.lab.in_netns(ns, || {
        // SAFETY: a NUL-terminated interface name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no {ifname} in {ns}");
        }
        bpf::attach_xdp(prog, ifindex)
    })
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    XdpDrop,
    Iptables,
    Kplb,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::XdpDrop => "xdp_drop",
            Self::Iptables => "iptables",
            Self::Kplb => "kplb",
        }
    }
}

pub fn run(cfg: &Config, rng: &mut Rng) -> Result<Value> {
    let mut bl = BenchLab::new_nodes(2)?;
    bl.lab.add_external_client(GEN, &GEN_IP.to_string())?;
    let frames: Vec<Vec<u8>> = {
        let (dst, src) = (mac(&bl, NODE)?, mac(&bl, GEN)?);
        (0..FLOWS).map(|k| frame(dst, src, 20_000 + k)).collect()
    };
    let node2_mac = mac(&bl, NODE2)?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    bl.node_ok(
        NODE,
        &[
            "ip",
            "neigh",
            "replace",
            NODE2_IP,
            "lladdr",
            &node2_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
        Duration::from_secs(10),
    )?;
    // node1's MAC pinned on its bridge port: when n1 drops everything node1 sends, the
    // bridge could not learn it and would flood the generator's frames to every port.
    let node1_mac = mac(&bl, NODE)?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    bl.lab.run_ok(
        FABRIC,
        &[
            "bridge", "fdb", "replace", &node1_mac, "dev", NODE1_PEER, "master", "static",
        ],
    )?;

    let mut skipped = serde_json::Map::new();
    let mut modes = vec![Mode::XdpDrop];
    match bl.node_probe(NODE, &["iptables-restore", "--version"]) {
        Ok(()) => modes.push(Mode::Iptables),
        Err(e) => {
            skipped.insert("iptables".into(), json!(e));
        }
    }
    match kplb_has_xdp(&bl) {
        Ok(None) => modes.push(Mode::Kplb),
        Ok(Some(why)) => {
            skipped.insert("kplb".into(), json!(why));
        }
        Err(e) => {
            skipped.insert("kplb".into(), json!(format!("{e:#}")));
        }
    }
    rng.shuffle(&mut modes);
    let mut results = Vec::new();
    for mode in modes.clone() {
        eprintln!("kplb-bench: nodeport: {}", mode.name());
        let r = measure(&bl, cfg, mode, &frames).unwrap_or_else(|e| {
            eprintln!("kplb-bench: nodeport {}: {e:#}", mode.name());
            json!({"mode": mode.name(), "error": format!("{e:#}")})
        });
        results.push(r);
    }
    Ok(json!({
        "seconds": cfg.seconds,
        "runs": cfg.runs,
        "flows": FLOWS,
        "frame_bytes": 60,
        "order": modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "skipped": skipped,
        "results": results,
    }))
}

fn manifests(bl: &BenchLab) -> Result<std::path::PathBuf> {
    let dir = bl.lab.tmp_dir().join("nodeport-manifests");
    let svc = Service::new("np")
        .type_(ServiceType::NodePort)
        .cluster_ip("172.30.200.1")
        .port(Port::udp(80, 8080).named("udp").node_port(NODE_PORT))
        .to_json();
    let slice = EndpointSlice::new("np-1", "np")
        .port(Some("udp"), Protocol::Udp, 8080)
        .endpoint(Endpoint::ready_on(&BACKEND_IP.to_string(), NODE2))
        .to_json();
    lb_tests::manifests::write(&dir, "np.yaml", &[svc, slice])?;
    Ok(dir)
}

/// `None` when the agent attaches an XDP program to eth0; else why the kplb column is skipped.
fn kplb_has_xdp(bl: &BenchLab) -> Result<Option<String>> {
    let dir = manifests(bl)?;
    let mut agent = RunningAgent::start(&bl.lab, 1, &dir, &["--xdp-mode", "native"])?;
    agent.wait_synced(Duration::from_secs(60))?;
    let link = bl.node_ok(
        NODE,
        &["ip", "-j", "link", "show", "eth0"],
        Duration::from_secs(10),
    )?;
    agent.stop_and_clean()?;
    let v: Value = serde_json::from_str(&link)?;
    Ok(if v[0].get("xdp").is_some() {
        None
    } else {
        Some(
            "XDP datapath not present in this build: lb-agent --interfaces eth0 attached no XDP program"
                .into(),
        )
    })
}

fn iptables_nodeport() -> String {
    let ep = BACKEND_IP;
    let svc = format!("KUBE-SVC-{}", services::chain_hash("default/np:udptcp"));
    let ext = format!("KUBE-EXT-{}", services::chain_hash("default/np:udpext"));
    let sep = format!("KUBE-SEP-{}", services::chain_hash("default/np:udpsep"));
    format!(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
         :{svc} - [0:0]\n:{ext} - [0:0]\n:{sep} - [0:0]\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n\
         -A KUBE-SERVICES -d 172.30.200.1/32 -p udp -m comment --comment \"default/np:udp cluster IP\" -m udp --dport 80 -j {svc}\n\
         -A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         -A KUBE-NODEPORTS -p udp -m comment --comment \"default/np:udp\" -m udp --dport {NODE_PORT} -j {ext}\n\
         -A {ext} -m comment --comment \"masquerade traffic for default/np:udp external destinations\" -j KUBE-MARK-MASQ\n\
         -A {ext} -j {svc}\n\
         -A {svc} -m comment --comment \"default/np:udp -> {ep}:8080\" -j {sep}\n\
         -A {sep} -s {ep}/32 -j KUBE-MARK-MASQ\n\
         -A {sep} -p udp -m udp -j DNAT --to-destination {ep}:8080\n\
         COMMIT\n"
    )
}

fn measure(bl: &BenchLab, cfg: &Config, mode: Mode, frames: &[Vec<u8>]) -> Result<Value> {
    let limit = Duration::from_secs(60);
    let mut agent = None;
    let counter = match mode {
        Mode::XdpDrop => Counter::attach(bl, NODE, "eth0")?,
        Mode::Iptables => {
            let file = bl.lab.tmp_dir().join("nodeport.rules");
            std::fs::write(&file, iptables_nodeport())?;
            bl.node_ok(
                NODE,
                &["iptables-restore", file.to_str().context("path")?],
                limit,
            )?;
            Counter::attach(bl, FABRIC, NODE1_PEER)?
        }
        Mode::Kplb => {
            let dir = manifests(bl)?;
            let mut a = RunningAgent::start(&bl.lab, 1, &dir, &["--xdp-mode", "native"])?;
            a.wait_synced(Duration::from_secs(60))?;
            agent = Some(a);
            Counter::attach(bl, FABRIC, NODE1_PEER)?
        }
    };
    if let Ok(secs) = std::env::var("KPLB_BENCH_PAUSE") {
        eprintln!("kplb-bench: pausing {secs} s (lab {})", bl.lab.prefix());
        std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(60)));
    }
    let dur = Duration::from_secs_f64(cfg.seconds);
    let mut runs = Vec::new();
    let result = (|| -> Result<()> {
        // Warm-up: conntrack entries, neighbours, caches.
        bl.lab.in_netns(GEN, || {
            pin_thread(CLIENT_CPU);
            blast(frames, Duration::from_millis(200))
        })?;
        for _ in 0..cfg.runs {
            let before = counter.read()?;
            let t = Instant::now();
            let sent = bl.lab.in_netns(GEN, || {
                pin_thread(CLIENT_CPU);
                blast(frames, dur)
            })?;
            // Let the last batch drain out of the veth rings.
            std::thread::sleep(Duration::from_millis(50));
            let secs = t.elapsed().as_secs_f64() - 0.05;
            let counted = counter.read()? - before;
            runs.push(json!({
                "sent_pps": sent as f64 / secs,
                "counted_pps": counted as f64 / secs,
            }));
        }
        Ok(())
    })();
    drop(counter);
    match mode {
        Mode::XdpDrop => {}
        Mode::Iptables => {
            bl.node_ok(NODE, &["iptables", "-t", "nat", "-F"], limit)?;
            bl.node_ok(NODE, &["iptables", "-t", "nat", "-X"], limit)?;
            if bl.node_probe(NODE, &["nft", "--version"]).is_ok() {
                bl.node_ok(NODE, &["nft", "flush", "ruleset"], limit)?;
            }
        }
        Mode::Kplb => {
            if let Some(a) = agent {
                a.stop_and_clean()?;
            }
        }
    }
    result?;
    Ok(json!({"mode": mode.name(), "runs": runs}))
}
