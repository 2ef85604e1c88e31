//! BPF_PROG_TEST_RUN fixtures for the north-south datapath (XDP + tc egress): an input frame,
//! the expected verdict and the expected output bytes, built by an independent packet builder
//! (its own RFC 1071 checksums) and checked again with `pkt::verify`.
//!
//! Each test runs in a private network namespace (unshared on its own thread) with a veth whose
//! neighbours are static, so `bpf_fib_lookup` gives deterministic next hops. Needs root; skips
//! with a message otherwise (fails under CI=true).

mod common;

use std::process::Command;

use aya::{
    maps::{PerCpuArray, PerCpuHashMap},
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use common::pkt::{self, ACK, CLIENT_MAC, L4, NODE_MAC, Pkt, RST, SYN};
use lb_agent::{
    datapath::{BpfDatapath, LoadOptions, TC_EGRESS_PROGRAM, TC_INGRESS_PROGRAM, XDP_PROGRAM},
    sync::{Datapath as _, TableLoc},
};
use lb_common::{
    AFFINITY_CLIENT_IP, AffinityKey, BACKEND_F_LOCAL, Backend, MaglevSlot, SCOPE_EXTERNAL,
    SVC_F_AFFINITY, SVC_F_EXT_LOCAL, SVC_F_FRONTEND_IP, SVC_F_SRC_RANGES, SvcCounters, SvcKey,
    SvcSlot, SvcVal, addr,
    ct::{CFG_F_SVC_CIDR, Config, LB_MODE_DSR},
    hash::flow_hash,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
const CLIENT: &str = "203.0.113.10";
const NODE: &str = "192.168.0.2";
const SNAT_MIN: u16 = 61000;
const SNAT_MAX: u16 = 61999;
const TABLE: u32 = 251;

fn root() -> bool {
    common::root("xdp fixtures", "BPF_PROG_TEST_RUN and a private netns")
}

fn ip(args: &str) {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("running ip");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A loaded datapath in a private netns with the lab's node1 view of the world.
struct Fx {
    dp: BpfDatapath,
    ifindex: u32,
    next_backend: u32,
}

fn a(s: &str) -> [u32; 4] {
    addr::from_ip(s.parse().unwrap())
}

fn v4_config() -> Config {
    let mut cfg = Config {
        node_ip4: a(NODE),
        node_ip6: a("2001:db8::2"),
        timeout_syn_s: 60,
        timeout_established_s: 3600,
        timeout_closing_s: 10,
        timeout_udp_s: 60,
        snat_port_min: SNAT_MIN,
        snat_port_max: SNAT_MAX,
        flags: CFG_F_SVC_CIDR,
        ..Config::default()
    };
    cfg.svc_net[0] = a("172.30.0.0");
    cfg.svc_mask[0] = [
        u32::MAX,
        u32::MAX,
        u32::MAX,
        u32::from_ne_bytes([255, 255, 0, 0]),
    ];
    cfg
}

/// Loads a program, again when the kernel gave up with EAGAIN: the verifier stops when a
/// signal is pending, and the other tests' `ip` children exit meanwhile (libbpf retries too).
fn load_retrying(mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>) {
    for _ in 0..4 {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) => {}
            r => return r.unwrap(),
        }
    }
    load().unwrap()
}

impl Fx {
    fn new() -> Option<Self> {
        if !root() {
            return None;
        }
        // SAFETY: this test's thread gets its own network namespace.
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "unshare(CLONE_NEWNET)"
        );
        ip(&format!(
            "link add veth0 address {} type veth peer name veth1 address {}",
            mac(NODE_MAC),
            mac(NODE2_MAC)
        ));
        ip("link set veth0 up");
        ip("link set veth1 up");
        ip("addr add 192.168.0.2/24 dev veth0");
        ip("addr add 2001:db8::2/64 dev veth0 nodad");
        ip(&format!(
            "neigh add 192.168.0.3 lladdr {} dev veth0 nud permanent",
            mac(NODE2_MAC)
        ));
        ip(&format!(
            "neigh add 203.0.113.10 lladdr {} dev veth0 nud permanent",
            mac(CLIENT_MAC)
        ));
        ip("route add 203.0.113.0/24 dev veth0");
        ip("route add 10.0.2.0/24 via 192.168.0.3");
        ip(&format!(
            "neigh add 2001:db8::3 lladdr {} dev veth0 nud permanent",
            mac(NODE2_MAC)
        ));
        ip(&format!(
            "neigh add 2001:db8::10 lladdr {} dev veth0 nud permanent",
            mac(CLIENT_MAC)
        ));
        ip("route add fd00:10:0:2::/64 via 2001:db8::3");
        // bpf_fib_lookup answers only for interfaces that forward.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").unwrap();
        let ifindex = unsafe { libc::if_nametoindex(c"veth0".as_ptr()) };
        let mut dp = BpfDatapath::load_unpinned(LoadOptions {
            conntrack_max: 4096,
        })
        .expect("loading programs");
        dp.set_config(&v4_config()).unwrap();
        // Every north-south program, so each is verified here (tc ingress is not run).
        for name in [XDP_PROGRAM, TC_EGRESS_PROGRAM, TC_INGRESS_PROGRAM] {
            let p = dp.ebpf_mut().program_mut(name).unwrap();
            match p {
                aya::programs::Program::Xdp(x) => load_retrying(|| x.load()),
                aya::programs::Program::SchedClassifier(c) => load_retrying(|| c.load()),
                _ => unreachable!(),
            }
        }
        Some(Self {
            dp,
            ifindex,
            next_backend: 1,
        })
    }

    fn backend(&mut self, ip: &str, port: u16, local: bool) -> u32 {
        let id = self.next_backend;
        self.next_backend += 1;
        let b = Backend {
            addr: a(ip),
            port: port.to_be(),
            proto: 0,
            flags: if local { BACKEND_F_LOCAL } else { 0 },
            node: [0; 4],
        };
        self.dp.set_backend(id, &b).unwrap();
        id
    }

    /// A remote backend whose node is `node` (DSR tunnels to it).
    fn backend_on(&mut self, ip: &str, port: u16, node: &str) -> u32 {
        let id = self.backend(ip, port, false);
        let b = Backend {
            addr: a(ip),
            port: port.to_be(),
            proto: 0,
            flags: 0,
            node: a(node),
        };
        self.dp.set_backend(id, &b).unwrap();
        id
    }

    /// Frontend `ip:port/proto` (external scope) over a table where every slot is `(cur, prev)`.
    /// An external frontend whose whole table names one backend.
    fn frontend_to(&mut self, key: (&str, u16, u8), group: u32, backend: u32) {
        let slot = MaglevSlot { backend, prev: 0 };
        self.frontend(key, group, slot, 1, 0);
    }

    fn frontend(
        &mut self,
        (ip, port, proto): (&str, u16, u8),
        group: u32,
        slot: MaglevSlot,
        count: u32,
        flags: u32,
    ) {
        let table = if count > 0 {
            self.dp.write_table(&vec![slot; TABLE as usize]).unwrap()
        } else {
            TableLoc { loc: 0, size: 0 }
        };
        let key = SvcKey {
            addr: a(ip),
            port: port.to_be(),
            proto,
            scope: SCOPE_EXTERNAL,
        };
        let val = SvcVal {
            group_id: group,
            table_loc: table.loc,
            table_size: table.size,
            backend_count: count,
            flags,
            affinity_timeout: 0,
        };
        self.dp.set_frontend(&key, &val).unwrap();
    }

    fn xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let ifindex = self.ifindex;
        let prog: &mut Xdp = self
            .dp
            .ebpf_mut()
            .program_mut(XDP_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; frame.len() + 512];
        // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .expect("test_run");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn tc(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut SchedClassifier = self
            .dp
            .ebpf_mut()
            .program_mut(TC_EGRESS_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; frame.len() + 512];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("test_run");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }
}

/// Runs a fixture table: (name, input, verdict, expected output; `None` = untouched input).
/// (name, input, verdict, expected output; `None` = the input, untouched).
type Case<'a> = (&'a str, Vec<u8>, u32, Option<Vec<u8>>);

fn table(fx: &mut Fx, cases: Vec<Case<'_>>) {
    let mut failures = Vec::new();
    for (name, input, verdict, expected) in cases {
        let (v, out) = fx.xdp(&input);
        let touched = expected.is_some();
        let expected = expected.unwrap_or_else(|| input.clone());
        if v != verdict {
            failures.push(format!("{name}: verdict {v}, expected {verdict}"));
            continue;
        }
        if out != expected {
            failures.push(format!(
                "{name}: output differs\n  got      {}\n  expected {}",
                hex(&out),
                hex(&expected)
            ));
            continue;
        }
        if touched && let Err(e) = pkt::verify(&out) {
            failures.push(format!("{name}: bad checksum in output: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The SNAT port the datapath tries first for `p`'s flow.
fn snat_port(p: &Pkt) -> u16 {
    snat_candidate(p, 0)
}

/// The `i`-th SNAT port the datapath tries for `p`'s flow.
fn snat_candidate(p: &Pkt, i: u32) -> u16 {
    let (sport, dport) = match p.l4 {
        L4::Tcp { sport, dport, .. }
        | L4::Udp { sport, dport }
        | L4::UdpNoCsum { sport, dport } => (sport, dport),
        L4::Raw { .. } => unreachable!(),
    };
    let h = flow_hash(
        &addr::from_ip(p.src),
        &addr::from_ip(p.dst),
        sport.to_be(),
        dport.to_be(),
        p.proto(),
        false,
    );
    let h = h.wrapping_add(i.wrapping_mul(0x9e37_79b1));
    SNAT_MIN + (h % u32::from(SNAT_MAX - SNAT_MIN + 1)) as u16
}

fn with_dst(p: &Pkt, dst: &str, dport: u16) -> Pkt {
    let mut q = p.clone();
    q.dst = dst.parse().unwrap();
    set_ports(&mut q, None, Some(dport));
    q
}

/// `p` as it leaves for a remote backend: source NATed to `src:sport`, destination the
/// backend, routed on (MACs of the next hop, one hop less).
fn routed_snat(p: &Pkt, src: &str, sport: u16, dst: &str, dport: u16, mac: [u8; 6]) -> Pkt {
    let mut q = with_dst(p, dst, dport);
    q.src = src.parse().unwrap();
    set_ports(&mut q, Some(sport), None);
    q.src_mac = NODE_MAC;
    q.dst_mac = mac;
    q.ttl = 63;
    q
}

fn set_ports(p: &mut Pkt, sp: Option<u16>, dp: Option<u16>) {
    match &mut p.l4 {
        L4::Tcp { sport, dport, .. }
        | L4::Udp { sport, dport }
        | L4::UdpNoCsum { sport, dport } => {
            if let Some(s) = sp {
                *sport = s;
            }
            if let Some(d) = dp {
                *dport = d;
            }
        }
        L4::Raw { .. } => {}
    }
}

#[test]
fn nodeport_local_remote_and_reply() {
    let Some(mut fx) = Fx::new() else { return };
    let local = fx.backend("10.0.1.5", 8080, true);
    let remote = fx.backend("10.0.2.5", 8080, false);
    fx.frontend_to((NODE, 30080, 6), 1, local);
    fx.frontend_to((NODE, 30081, 6), 2, remote);
    fx.frontend_to((NODE, 30082, 17), 3, remote);

    let syn_local = Pkt::tcp(CLIENT, 40000, NODE, 30080, SYN);
    let syn_remote = Pkt::tcp(CLIENT, 40001, NODE, 30081, SYN);
    let port = snat_port(&syn_remote);
    let snat = routed_snat(&syn_remote, NODE, port, "10.0.2.5", 8080, NODE2_MAC);
    // The backend's SYN-ACK to node:port goes back to the client from the frontend.
    let mut reply = Pkt::tcp("10.0.2.5", 8080, NODE, port, SYN | ACK);
    reply.src_mac = NODE2_MAC;
    let mut reply_out = Pkt::tcp(NODE, 30081, CLIENT, 40001, SYN | ACK);
    reply_out.src_mac = NODE_MAC;
    reply_out.dst_mac = CLIENT_MAC;
    reply_out.ttl = 63;

    let udp = Pkt::udp(CLIENT, 5353, NODE, 30082);
    let uport = snat_port(&udp);
    let udp_out = routed_snat(&udp, NODE, uport, "10.0.2.5", 8080, NODE2_MAC);
    let mut udp_nocsum = Pkt::new(
        CLIENT,
        NODE,
        L4::UdpNoCsum {
            sport: 5354,
            dport: 30082,
        },
    )
    .payload(b"x");
    udp_nocsum.ip_id = 7;
    let unport = snat_port(&udp_nocsum);
    let mut udp_nocsum_out = udp_nocsum.clone();
    udp_nocsum_out.src = NODE.parse().unwrap();
    udp_nocsum_out.dst = "10.0.2.5".parse().unwrap();
    udp_nocsum_out.l4 = L4::UdpNoCsum {
        sport: unport,
        dport: 8080,
    };
    udp_nocsum_out.src_mac = NODE_MAC;
    udp_nocsum_out.dst_mac = NODE2_MAC;
    udp_nocsum_out.ttl = 63;

    table(
        &mut fx,
        vec![
            (
                "tcp syn -> local backend: DNAT, client kept, to the kernel",
                syn_local.build(),
                XDP_PASS,
                Some(with_dst(&syn_local, "10.0.1.5", 8080).build()),
            ),
            (
                "tcp syn -> remote backend: DNAT+SNAT, XDP_TX to node2's MAC",
                syn_remote.build(),
                XDP_TX,
                Some(snat.build()),
            ),
            (
                "reply from remote backend -> client, frontend as source",
                reply.build(),
                XDP_TX,
                Some(reply_out.build()),
            ),
            (
                "udp -> remote backend",
                udp.build(),
                XDP_TX,
                Some(udp_out.build()),
            ),
            (
                "udp without checksum stays without",
                udp_nocsum.build(),
                XDP_TX,
                Some(udp_nocsum_out.build()),
            ),
            (
                "not a frontend port on the node IP: untouched",
                Pkt::tcp(CLIENT, 40000, NODE, 22, SYN).build(),
                XDP_PASS,
                None,
            ),
            (
                "not ours at all: untouched",
                Pkt::tcp(CLIENT, 40000, "8.8.8.8", 53, SYN).build(),
                XDP_PASS,
                None,
            ),
        ],
    );
    let ct = fx.dp.ct_entries();
    assert_eq!(
        ct.len(),
        8,
        "forward + reply entry for each of 4 flows: {ct:?}"
    );
}

/// Routed flows keep their next hop (MACs, interface, MTU) in their conntrack entries instead
/// of a FIB lookup per packet: a changed neighbour is used once the cached hop is older than
/// its revalidation period (1 s), not before; the reply direction caches its own.
#[test]
fn next_hop_cached_in_conntrack_and_refreshed() {
    let Some(mut fx) = Fx::new() else { return };
    let remote = fx.backend("10.0.2.5", 8080, false);
    fx.frontend_to((NODE, 30081, 6), 2, remote);
    let syn = Pkt::tcp(CLIENT, 40001, NODE, 30081, SYN);
    let ack = Pkt::tcp(CLIENT, 40001, NODE, 30081, ACK);
    let port = snat_port(&syn);
    let to_node2 = |p: &Pkt, mac| routed_snat(p, NODE, port, "10.0.2.5", 8080, mac).build();
    let mut reply = Pkt::tcp("10.0.2.5", 8080, NODE, port, SYN | ACK);
    reply.src_mac = NODE2_MAC;
    let mut reply_out = Pkt::tcp(NODE, 30081, CLIENT, 40001, SYN | ACK);
    reply_out.src_mac = NODE_MAC;
    reply_out.dst_mac = CLIENT_MAC;
    reply_out.ttl = 63;
    table(
        &mut fx,
        vec![
            ("syn", syn.build(), XDP_TX, Some(to_node2(&syn, NODE2_MAC))),
            ("reply", reply.build(), XDP_TX, Some(reply_out.build())),
        ],
    );
    // The entries by source: the client's (original direction), the backend's (reply).
    let hop_of = |fx: &Fx, src: &str| {
        let entries = fx.dp.ct_entries();
        entries
            .iter()
            .find(|(k, _)| k.src == a(src))
            .map(|(_, v)| v.hop)
            .unwrap_or_else(|| panic!("no conntrack entry from {src}: {entries:?}"))
    };
    let (fwd, rev) = (hop_of(&fx, CLIENT), hop_of(&fx, "10.0.2.5"));
    assert_eq!(fwd.macs, [NODE2_MAC, NODE_MAC].concat()[..]);
    assert_eq!(rev.macs, [CLIENT_MAC, NODE_MAC].concat()[..]);
    for hop in [fwd, rev] {
        assert_eq!((hop.iif, hop.oif), (fx.ifindex, fx.ifindex), "{hop:?}");
        // At least the packet it was looked up for fits (40-byte IP datagrams here).
        assert!(hop.until > 0 && hop.mtu >= 40, "{hop:?}");
    }

    // node2 moves to another MAC: the cached hop is still used within its period...
    const NEW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x33];
    ip(&format!(
        "neigh replace 192.168.0.3 lladdr {} dev veth0 nud permanent",
        mac(NEW_MAC)
    ));
    table(
        &mut fx,
        vec![(
            "cached",
            ack.build(),
            XDP_TX,
            Some(to_node2(&ack, NODE2_MAC)),
        )],
    );
    assert_eq!(
        hop_of(&fx, CLIENT),
        fwd,
        "a fresh hop is not looked up again"
    );
    // ... and looked up again once it is older than that.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    table(
        &mut fx,
        vec![(
            "refreshed",
            ack.build(),
            XDP_TX,
            Some(to_node2(&ack, NEW_MAC)),
        )],
    );
    let refreshed = hop_of(&fx, CLIENT);
    assert_eq!(refreshed.macs, [NEW_MAC, NODE_MAC].concat()[..]);
    assert!(refreshed.until > fwd.until);
    // A packet longer than the cached hop's MTU is looked up again and gets the kernel's
    // answer (too big: to the kernel, translated, which then sends "fragmentation needed").
    let big = ack.clone().payload(&[0x55; 1600]);
    let mut big_out = with_dst(&big, "10.0.2.5", 8080);
    big_out.src = NODE.parse().unwrap();
    set_ports(&mut big_out, Some(port), None);
    table(
        &mut fx,
        vec![(
            "longer than the MTU",
            big.build(),
            XDP_PASS,
            Some(big_out.build()),
        )],
    );
}

/// A new flow whose first SNAT port is held by another live flow takes its next candidate.
#[test]
fn snat_port_held_by_another_flow_is_skipped() {
    let Some(mut fx) = Fx::new() else { return };
    let remote = fx.backend("10.0.2.5", 8080, false);
    fx.frontend_to((NODE, 30081, 6), 2, remote);
    let syn = |sport| Pkt::tcp(CLIENT, sport, NODE, 30081, SYN);
    let first = snat_port(&syn(30000));
    let other = (30001..40000)
        .find(|&p| snat_port(&syn(p)) == first && snat_candidate(&syn(p), 1) != first)
        .expect("two flows with the same first SNAT port");
    let out = |p: &Pkt, port| routed_snat(p, NODE, port, "10.0.2.5", 8080, NODE2_MAC).build();
    let (a, b) = (syn(30000), syn(other));
    table(
        &mut fx,
        vec![
            ("first flow", a.build(), XDP_TX, Some(out(&a, first))),
            (
                "second flow, same first port: the next one",
                b.build(),
                XDP_TX,
                Some(out(&b, snat_candidate(&b, 1))),
            ),
        ],
    );
}

/// Per-service counters: two groups whose counter slot is the same one (ids 4096 apart) take it
/// over from each other, and each one's total (moved out plus in its slot) stays exact.
#[test]
fn service_counters_survive_groups_sharing_a_slot() {
    let Some(mut fx) = Fx::new() else { return };
    let local = fx.backend("10.0.1.5", 8080, true);
    let slot = MaglevSlot {
        backend: local,
        prev: 0,
    };
    let (a, b) = (1, 1 + lb_common::maps::SVC_HOT_SLOTS);
    fx.frontend((NODE, 30080, 6), a, slot, 1, 0);
    fx.frontend((NODE, 30081, 6), b, slot, 1, 0);
    let to_a = |flags| Pkt::tcp(CLIENT, 40000, NODE, 30080, flags).build();
    let to_b = |flags| Pkt::tcp(CLIENT, 40001, NODE, 30081, flags).build();
    for frame in [
        to_a(SYN),
        to_a(ACK),
        to_b(SYN),
        to_a(ACK),
        to_b(ACK),
        to_a(ACK),
    ] {
        assert_eq!(fx.xdp(&frame).0, XDP_PASS);
    }
    let ebpf = fx.dp.ebpf_mut();
    let slots: PerCpuArray<_, SvcSlot> =
        PerCpuArray::try_from(ebpf.map(lb_common::maps::SVC_HOT).unwrap()).unwrap();
    let slots: Vec<SvcSlot> = slots
        .iter()
        .flat_map(|per_cpu| per_cpu.unwrap().iter().copied().collect::<Vec<_>>())
        .collect();
    let moved: PerCpuHashMap<_, u32, SvcCounters> =
        PerCpuHashMap::try_from(ebpf.map(lb_common::maps::SVC_STATS).unwrap()).unwrap();
    let moved = moved
        .iter()
        .map(|e| {
            let (group, per_cpu) = e.unwrap();
            let packets = per_cpu.iter().map(|c| c.packets).sum();
            let connections = per_cpu.iter().map(|c| c.connections).sum();
            let bytes = per_cpu.iter().map(|c| c.bytes).sum();
            (
                group,
                SvcCounters {
                    packets,
                    bytes,
                    connections,
                },
            )
        })
        .collect();
    let totals = lb_agent::stats::totals(moved, &slots);
    let frame_len = to_a(ACK).len() as u64;
    for (group, packets) in [(a, 4), (b, 2)] {
        let t = totals[&group];
        assert_eq!(
            (t.packets, t.bytes, t.connections),
            (packets, packets * frame_len, 1),
            "group {group}: {totals:?}"
        );
    }
}

#[test]
fn conntrack_keeps_flows_and_prev_owner() {
    let Some(mut fx) = Fx::new() else { return };
    let b1 = fx.backend("10.0.1.5", 8080, true);
    let b2 = fx.backend("10.0.1.6", 8080, true);
    fx.frontend_to((NODE, 30080, 6), 1, b1);
    let syn = Pkt::tcp(CLIENT, 40000, NODE, 30080, SYN);
    let ack = Pkt::tcp(CLIENT, 40000, NODE, 30080, ACK);
    table(
        &mut fx,
        vec![(
            "syn -> b1",
            syn.build(),
            XDP_PASS,
            Some(with_dst(&syn, "10.0.1.5", 8080).build()),
        )],
    );
    // The table moves every slot to b2 (b1 still exists): the established flow stays on b1.
    fx.frontend(
        (NODE, 30080, 6),
        1,
        MaglevSlot {
            backend: b2,
            prev: b1,
        },
        2,
        0,
    );
    let new_syn = Pkt::tcp(CLIENT, 40001, NODE, 30080, SYN);
    let stray_ack = Pkt::tcp(CLIENT, 40002, NODE, 30080, ACK);
    table(
        &mut fx,
        vec![
            (
                "conntrack hit keeps b1",
                ack.build(),
                XDP_PASS,
                Some(with_dst(&ack, "10.0.1.5", 8080).build()),
            ),
            (
                "new SYN -> current owner b2",
                new_syn.build(),
                XDP_PASS,
                Some(with_dst(&new_syn, "10.0.1.6", 8080).build()),
            ),
            (
                "non-SYN without conntrack -> previous owner b1",
                stray_ack.build(),
                XDP_PASS,
                Some(with_dst(&stray_ack, "10.0.1.5", 8080).build()),
            ),
        ],
    );
    // prev gone from the backends map: current owner.
    fx.dp.del_backend(b1).unwrap();
    fx.dp.settle().unwrap(); // deleted after a grace period
    let stray2 = Pkt::tcp(CLIENT, 40003, NODE, 30080, ACK);
    table(
        &mut fx,
        vec![
            (
                "prev deleted -> current owner",
                stray2.build(),
                XDP_PASS,
                Some(with_dst(&stray2, "10.0.1.6", 8080).build()),
            ),
            (
                "conntrack hit on a deleted backend re-selects",
                ack.build(),
                XDP_PASS,
                Some(with_dst(&ack, "10.0.1.6", 8080).build()),
            ),
        ],
    );
}

/// sessionAffinity: ClientIP (kube-proxy semantics): a client's new flows within the timeout of
/// its last one stay on its backend even when the table moves; after the timeout, or once that
/// backend is gone, a fresh pick is made.
#[test]
fn client_ip_affinity_pins_and_expires() {
    const GROUP: u32 = 7;
    const TIMEOUT_S: u32 = 5;
    let Some(mut fx) = Fx::new() else { return };
    let b1 = fx.backend("10.0.1.5", 8080, true);
    let b2 = fx.backend("10.0.1.6", 8080, true);
    let svc = |fx: &mut Fx, owner: u32| {
        let table = fx
            .dp
            .write_table(&vec![
                MaglevSlot {
                    backend: owner,
                    prev: 0,
                };
                TABLE as usize
            ])
            .unwrap();
        let key = SvcKey {
            addr: a(NODE),
            port: 30090u16.to_be(),
            proto: 6,
            scope: SCOPE_EXTERNAL,
        };
        let val = SvcVal {
            group_id: GROUP,
            table_loc: table.loc,
            table_size: table.size,
            backend_count: 2,
            flags: SVC_F_AFFINITY,
            affinity_timeout: TIMEOUT_S,
        };
        fx.dp.set_frontend(&key, &val).unwrap();
    };
    let pin = AffinityKey {
        client: a(CLIENT),
        group_id: GROUP,
        kind: AFFINITY_CLIENT_IP,
    };
    let syn = |sport| Pkt::tcp(CLIENT, sport, NODE, 30090, SYN);
    let case = |name, p: Pkt, to: &str| {
        let out = with_dst(&p, to, 8080).build();
        (name, p.build(), XDP_PASS, Some(out))
    };

    svc(&mut fx, b1);
    table(
        &mut fx,
        vec![case(
            "first flow -> table's pick b1",
            syn(41000),
            "10.0.1.5",
        )],
    );
    assert_eq!(fx.dp.affinity_map().get(&pin, 0).unwrap().backend_id, b1);

    // A backend change moves every slot to b2: the client keeps b1, another client does not.
    svc(&mut fx, b2);
    let other = Pkt::tcp("203.0.113.11", 41000, NODE, 30090, SYN);
    table(
        &mut fx,
        vec![
            case(
                "second flow, other port -> still b1",
                syn(41001),
                "10.0.1.5",
            ),
            case("third flow -> still b1", syn(41002), "10.0.1.5"),
            case("another client -> b2", other, "10.0.1.6"),
        ],
    );

    // No connection for longer than the timeout: a fresh pick, which is then remembered.
    let mut v = fx.dp.affinity_map().get(&pin, 0).unwrap();
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    v.last_ns = now.saturating_sub(u64::from(TIMEOUT_S + 1) * 1_000_000_000);
    fx.dp.affinity_map().insert(pin, v, 0).unwrap();
    table(
        &mut fx,
        vec![case("aged pin -> fresh pick b2", syn(41003), "10.0.1.6")],
    );
    assert_eq!(fx.dp.affinity_map().get(&pin, 0).unwrap().backend_id, b2);

    // The pinned backend is deleted: a fresh pick at once.
    svc(&mut fx, b1);
    fx.dp.del_backend(b2).unwrap();
    fx.dp.settle().unwrap(); // deleted after a grace period
    table(
        &mut fx,
        vec![case("pinned backend gone -> b1", syn(41004), "10.0.1.5")],
    );
    assert_eq!(fx.dp.affinity_map().get(&pin, 0).unwrap().backend_id, b1);
}

/// The RST the datapath builds: window 0, DF set, IP id 0.
fn rst_bytes(p: &Pkt, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut seg = p.segment();
    seg[14..18].copy_from_slice(&[0, 0, 0, 0]);
    let mut ph = [&src[..], &dst[..], &[0, 6, 0, 20]].concat();
    ph.extend(&seg);
    let c = pkt::checksum(&ph);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    p.eth(&p.ip_with(&seg, 0x4000))
}

#[test]
fn reject_drop_and_source_ranges() {
    let Some(mut fx) = Fx::new() else { return };
    let b = fx.backend("10.0.1.5", 8080, true);
    fx.frontend((NODE, 30090, 6), 1, MaglevSlot::default(), 0, 0);
    fx.frontend((NODE, 30091, 17), 2, MaglevSlot::default(), 0, 0);
    fx.frontend(
        (NODE, 30092, 6),
        3,
        MaglevSlot::default(),
        0,
        SVC_F_EXT_LOCAL,
    );
    fx.frontend(
        ("1.2.3.4", 80, 6),
        4,
        MaglevSlot {
            backend: b,
            prev: 0,
        },
        1,
        SVC_F_SRC_RANGES,
    );
    fx.frontend(
        ("1.2.3.4", 0, 0),
        4,
        MaglevSlot {
            backend: b,
            prev: 0,
        },
        1,
        SVC_F_FRONTEND_IP,
    );
    fx.dp
        .set_src_range(4, "203.0.113.0".parse().unwrap(), 28, true)
        .unwrap();

    let syn = Pkt::tcp(CLIENT, 40000, NODE, 30090, SYN).payload(b"");
    let mut rst = Pkt::new(
        NODE,
        CLIENT,
        L4::Tcp {
            sport: 30090,
            dport: 40000,
            seq: 0,
            ack: 1001,
            flags: RST | ACK,
        },
    );
    rst.ip_id = 0;
    rst.src_mac = NODE_MAC;
    rst.dst_mac = CLIENT_MAC;
    let rst_frame = rst_bytes(&rst, [192, 168, 0, 2], [203, 0, 113, 10]);
    let udp = Pkt::udp(CLIENT, 5353, NODE, 30091);
    let unreach = {
        let orig = udp.ip();
        let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend(&orig[..28]);
        let c = pkt::checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut p = Pkt::new(
            NODE,
            CLIENT,
            L4::Raw {
                proto: 1,
                bytes: icmp,
            },
        );
        p.ip_id = 0;
        p.src_mac = NODE_MAC;
        p.dst_mac = CLIENT_MAC;
        let seg = p.segment();
        p.eth(&p.ip_with(&seg, 0x4000))
    };
    let lb_ok = Pkt::tcp("203.0.113.5", 40000, "1.2.3.4", 80, SYN);
    let lb_other_port = Pkt::tcp("203.0.113.5", 40000, "1.2.3.4", 81, SYN);
    let mut lb_rst = Pkt::new(
        "1.2.3.4",
        "203.0.113.5",
        L4::Tcp {
            sport: 81,
            dport: 40000,
            seq: 0,
            ack: 1001,
            flags: RST | ACK,
        },
    );
    lb_rst.ip_id = 0;
    lb_rst.src_mac = NODE_MAC;
    lb_rst.dst_mac = CLIENT_MAC;
    let lb_rst_frame = rst_bytes(&lb_rst, [1, 2, 3, 4], [203, 0, 113, 5]);
    table(
        &mut fx,
        vec![
            (
                "tcp to a frontend without endpoints: RST",
                syn.build(),
                XDP_TX,
                Some(rst_frame),
            ),
            (
                "udp to a frontend without endpoints: ICMP port unreachable",
                udp.build(),
                XDP_TX,
                Some(unreach),
            ),
            (
                "policy Local without local endpoints: drop",
                Pkt::tcp(CLIENT, 40000, NODE, 30092, SYN).build(),
                XDP_DROP,
                None,
            ),
            (
                "LB IP from an allowed source",
                lb_ok.build(),
                XDP_PASS,
                Some(with_dst(&lb_ok, "10.0.1.5", 8080).build()),
            ),
            (
                "LB IP from another source: drop",
                Pkt::tcp("198.51.100.7", 40000, "1.2.3.4", 80, SYN).build(),
                XDP_DROP,
                None,
            ),
            (
                "LB IP on a port no service uses: RST",
                lb_other_port.build(),
                XDP_TX,
                Some(lb_rst_frame),
            ),
            (
                "unused service IP: drop",
                Pkt::tcp(CLIENT, 40000, "172.30.9.9", 80, SYN).build(),
                XDP_DROP,
                None,
            ),
        ],
    );
}

/// Malformed and unusual input: dropped or passed untouched, never forwarded mangled.
#[test]
fn malformed_and_unusual_input() {
    let Some(mut fx) = Fx::new() else { return };
    let b = fx.backend("10.0.1.5", 8080, true);
    fx.frontend_to((NODE, 30080, 6), 1, b);
    fx.frontend_to((NODE, 30083, 17), 2, b);
    let good = Pkt::tcp(CLIENT, 40000, NODE, 30080, SYN).build();
    let mut ihl4 = good.clone();
    ihl4[14] = 0x44;
    let mut long = good.clone();
    long[16..18].copy_from_slice(&2000u16.to_be_bytes());
    let mut short_tot = good.clone();
    short_tot[16..18].copy_from_slice(&30u16.to_be_bytes());
    let mut doff = good.clone();
    doff[14 + 20 + 12] = 0x40;
    let mut bad_udp_len = Pkt::udp(CLIENT, 5353, NODE, 30083).build();
    bad_udp_len[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());
    let gre = Pkt::new(
        CLIENT,
        NODE,
        L4::Raw {
            proto: 47,
            bytes: vec![0; 8],
        },
    )
    .build();
    let mut opts = Pkt::tcp(CLIENT, 40000, NODE, 30080, SYN);
    opts.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    let mut vlan = Pkt::tcp(CLIENT, 40001, NODE, 30080, SYN);
    vlan.vlan = Some(100);
    let mut v6 = Pkt::tcp("2001:db8::10", 40000, "2001:db8::2", 30080, SYN);
    v6.v6_dest_opts = true;
    table(
        &mut fx,
        vec![
            (
                "runt: Ethernet header only",
                good[..14].to_vec(),
                XDP_PASS,
                None,
            ),
            ("truncated IPv4 header", good[..30].to_vec(), XDP_PASS, None),
            (
                "truncated TCP header",
                good[..14 + 20 + 10].to_vec(),
                XDP_PASS,
                None,
            ),
            ("IHL < 5", ihl4, XDP_PASS, None),
            ("total length beyond the frame", long, XDP_PASS, None),
            (
                "total length shorter than the headers",
                short_tot,
                XDP_PASS,
                None,
            ),
            ("TCP data offset < 5", doff, XDP_PASS, None),
            ("UDP length < 8", bad_udp_len, XDP_PASS, None),
            ("unknown L4 protocol to a frontend IP", gre, XDP_PASS, None),
            (
                "not IP (ARP)",
                [&good[..12], &[0x08, 0x06], &[0u8; 28][..]].concat(),
                XDP_PASS,
                None,
            ),
            (
                "IPv4 options: L4 found after them",
                opts.build(),
                XDP_PASS,
                Some(with_dst(&opts, "10.0.1.5", 8080).build()),
            ),
            (
                "802.1Q tag kept",
                vlan.build(),
                XDP_PASS,
                Some(with_dst(&vlan, "10.0.1.5", 8080).build()),
            ),
        ],
    );
    // IPv6 with a destination-options header before TCP.
    let b6 = fx.backend("fd00:10:0:1::5", 8080, true);
    fx.frontend_to(("2001:db8::2", 30080, 6), 3, b6);
    table(
        &mut fx,
        vec![(
            "IPv6 extension header walked",
            v6.build(),
            XDP_PASS,
            Some(with_dst(&v6, "fd00:10:0:1::5", 8080).build()),
        )],
    );
}

#[test]
fn fragments_follow_the_first() {
    let Some(mut fx) = Fx::new() else { return };
    let b = fx.backend("10.0.1.5", 8080, true);
    fx.frontend_to((NODE, 30083, 17), 1, b);
    let big = Pkt::udp(CLIENT, 5353, NODE, 30083).payload(&[7u8; 40]);
    let seg = big.segment(); // 48 bytes: first fragment 24, second 24
    let first = big.eth(&big.ip_with(&seg[..24], 0x2000));
    let later = big.eth(&big.ip_with(&seg[24..], 3)); // offset 3*8 = 24
    let out = with_dst(&big, "10.0.1.5", 8080);
    let oseg = out.segment();
    let mut other = big.clone();
    other.ip_id = 0x9999;
    let stray = other.eth(&other.ip_with(&seg[24..], 3));
    table(
        &mut fx,
        vec![
            (
                "first fragment: translated with ports",
                first,
                XDP_PASS,
                Some(out.eth(&out.ip_with(&oseg[..24], 0x2000))),
            ),
            (
                "later fragment: same L3 translation",
                later,
                XDP_PASS,
                Some(out.eth(&out.ip_with(&oseg[24..], 3))),
            ),
            (
                "later fragment without a first: untouched",
                stray,
                XDP_PASS,
                None,
            ),
        ],
    );
}

#[test]
fn icmp_frag_needed_translated_back() {
    let Some(mut fx) = Fx::new() else { return };
    let b = fx.backend("10.0.1.5", 8080, true);
    fx.frontend_to((NODE, 30080, 6), 1, b);
    let syn = Pkt::tcp(CLIENT, 40000, NODE, 30080, SYN);
    table(
        &mut fx,
        vec![(
            "syn",
            syn.build(),
            XDP_PASS,
            Some(with_dst(&syn, "10.0.1.5", 8080).build()),
        )],
    );
    // A router on the client's side: "fragmentation needed" about the frontend's reply.
    let icmp_for = |quoted: &Pkt, dst: &str| {
        let q = quoted.ip();
        let mut body = vec![3u8, 4, 0, 0, 0, 0, 0x05, 0xdc];
        body.extend(&q[..28]);
        let c = pkt::checksum(&body);
        body[2..4].copy_from_slice(&c.to_be_bytes());
        Pkt::new(
            "198.51.100.1",
            dst,
            L4::Raw {
                proto: 1,
                bytes: body,
            },
        )
        .build()
    };
    let reply = Pkt::tcp(NODE, 30080, CLIENT, 40000, SYN | ACK);
    let backend_reply = Pkt::tcp("10.0.1.5", 8080, CLIENT, 40000, SYN | ACK);
    table(
        &mut fx,
        vec![(
            "frag needed about the frontend's reply -> backend",
            icmp_for(&reply, NODE),
            XDP_PASS,
            Some(icmp_for(&backend_reply, "10.0.1.5")),
        )],
    );
}

#[test]
fn tc_egress_restores_frontend_source() {
    let Some(mut fx) = Fx::new() else { return };
    let b = fx.backend("10.0.1.5", 8080, true);
    fx.frontend_to((NODE, 30080, 6), 1, b);
    let syn = Pkt::tcp(CLIENT, 40000, NODE, 30080, SYN);
    table(
        &mut fx,
        vec![(
            "syn",
            syn.build(),
            XDP_PASS,
            Some(with_dst(&syn, "10.0.1.5", 8080).build()),
        )],
    );
    let from_pod = Pkt::tcp("10.0.1.5", 8080, CLIENT, 40000, SYN | ACK).payload(b"hello");
    let expected = Pkt::tcp(NODE, 30080, CLIENT, 40000, SYN | ACK)
        .payload(b"hello")
        .build();
    let (v, out) = fx.tc(&from_pod.build());
    assert_eq!(v, 0, "TC_ACT_OK");
    assert_eq!(hex(&out), hex(&expected));
    pkt::verify(&out).unwrap();
    let unrelated = Pkt::tcp("10.0.1.5", 8080, CLIENT, 40999, ACK).build();
    let (v, out) = fx.tc(&unrelated);
    assert_eq!((v, out), (0, unrelated), "unrelated traffic untouched");
}

/// Packets XDP routes on lose one hop (IPv4 TTL with its header checksum, IPv6 hop limit);
/// one that would leave with TTL 0 is answered like the kernel's forwarding path does, with
/// ICMP time exceeded quoting what the client sent. Local backends keep the TTL (the kernel
/// routes those itself).
#[test]
fn ttl_decremented_on_forwarded_packets() {
    let Some(mut fx) = Fx::new() else { return };
    let local = fx.backend("10.0.1.5", 8080, true);
    let remote = fx.backend("10.0.2.5", 8080, false);
    let remote6 = fx.backend("fd00:10:0:2::5", 8080, false);
    let slot = |backend| MaglevSlot { backend, prev: 0 };
    fx.frontend((NODE, 30080, 6), 1, slot(local), 1, 0);
    fx.frontend((NODE, 30081, 6), 2, slot(remote), 1, 0);
    fx.frontend((NODE, 30082, 17), 3, slot(remote), 1, 0);
    fx.frontend(("2001:db8::2", 30081, 6), 4, slot(remote6), 1, 0);

    let snat_out = |p: &Pkt, node: &str, backend: &str, ttl: u8| {
        let mut o = with_dst(p, backend, 8080);
        o.src = node.parse().unwrap();
        set_ports(&mut o, Some(snat_port(p)), None);
        o.src_mac = NODE_MAC;
        o.dst_mac = NODE2_MAC;
        o.ttl = ttl;
        o.build()
    };
    let mut ttl2 = Pkt::tcp(CLIENT, 40010, NODE, 30081, SYN);
    ttl2.ttl = 2;
    let mut ttl1 = Pkt::tcp(CLIENT, 40011, NODE, 30081, SYN);
    ttl1.ttl = 1;
    let mut udp1 = Pkt::udp(CLIENT, 5300, NODE, 30082);
    udp1.ttl = 1;
    let mut local1 = Pkt::tcp(CLIENT, 40012, NODE, 30080, SYN);
    local1.ttl = 1;
    let v6 = Pkt::tcp("2001:db8::10", 40013, "2001:db8::2", 30081, SYN);
    let mut v6_1 = Pkt::tcp("2001:db8::10", 40014, "2001:db8::2", 30081, SYN);
    v6_1.ttl = 1;
    let exceeded = |p: &Pkt, from: &str, to: &str| {
        let q = p.ip();
        let quote = if p.src.is_ipv4() { &q[..28] } else { &q[..48] };
        let ty = if p.src.is_ipv4() { 11 } else { 3 };
        let mut e = pkt::icmp_error(from, to, ty, 0, [0; 4], quote);
        e.ip_id = 0;
        let seg = e.segment();
        e.eth(&e.ip_with(&seg, if p.src.is_ipv4() { 0x4000 } else { 0 }))
    };
    table(
        &mut fx,
        vec![
            (
                "TTL 64 -> remote backend leaves with 63",
                Pkt::tcp(CLIENT, 40009, NODE, 30081, SYN).build(),
                XDP_TX,
                Some(snat_out(
                    &Pkt::tcp(CLIENT, 40009, NODE, 30081, SYN),
                    NODE,
                    "10.0.2.5",
                    63,
                )),
            ),
            (
                "TTL 2 -> remote backend leaves with 1",
                ttl2.build(),
                XDP_TX,
                Some(snat_out(&ttl2, NODE, "10.0.2.5", 1)),
            ),
            (
                "TTL 1 TCP -> remote backend: ICMP time exceeded to the client",
                ttl1.build(),
                XDP_TX,
                Some(exceeded(&ttl1, NODE, CLIENT)),
            ),
            (
                "TTL 1 UDP -> remote backend: ICMP time exceeded to the client",
                udp1.build(),
                XDP_TX,
                Some(exceeded(&udp1, NODE, CLIENT)),
            ),
            (
                "TTL 1 -> local backend: DNAT only, TTL left to the kernel",
                local1.build(),
                XDP_PASS,
                Some(with_dst(&local1, "10.0.1.5", 8080).build()),
            ),
            (
                "IPv6 hop limit 64 -> remote backend leaves with 63",
                v6.build(),
                XDP_TX,
                Some(snat_out(&v6, "2001:db8::2", "fd00:10:0:2::5", 63)),
            ),
            (
                "IPv6 hop limit 1 -> remote backend: ICMPv6 time exceeded",
                v6_1.build(),
                XDP_TX,
                Some(exceeded(&v6_1, "2001:db8::2", "2001:db8::10")),
            ),
        ],
    );
    // The reply of the TTL-2 flow from the backend, arriving with TTL 1: it must not be
    // routed on to the client either; the backend gets the time exceeded.
    let mut reply = Pkt::tcp("10.0.2.5", 8080, NODE, snat_port(&ttl2), SYN | ACK);
    reply.src_mac = NODE2_MAC;
    reply.ttl = 1;
    let mut back = {
        let q = reply.ip();
        pkt::icmp_error(NODE, "10.0.2.5", 11, 0, [0; 4], &q[..28])
    };
    back.ip_id = 0;
    back.dst_mac = NODE2_MAC;
    let seg = back.segment();
    let back = back.eth(&back.ip_with(&seg, 0x4000));
    table(
        &mut fx,
        vec![(
            "reply with TTL 1: time exceeded back to the backend",
            reply.build(),
            XDP_TX,
            Some(back),
        )],
    );
}

/// ICMPv6 errors about translated flows go back to the backend: the quoted packet and the
/// outer destination reverse-translated, the quoted UDP checksum and the ICMPv6 checksum (with
/// its pseudo header) fixed. Local backends: to the kernel; remote (SNAT) ones: routed on.
#[test]
fn icmpv6_errors_translated_back() {
    let Some(mut fx) = Fx::new() else { return };
    let local = fx.backend("fd00:10:0:1::5", 8080, true);
    let remote = fx.backend("fd00:10:0:2::5", 8080, false);
    let slot = |backend| MaglevSlot { backend, prev: 0 };
    fx.frontend(("2001:db8::2", 30080, 6), 1, slot(local), 1, 0);
    fx.frontend(("2001:db8::2", 30082, 17), 2, slot(remote), 1, 0);
    const FE: &str = "2001:db8::2";
    const C6: &str = "2001:db8::10";
    const ROUTER: &str = "2001:db8::1";
    let syn = Pkt::tcp(C6, 40000, FE, 30080, SYN);
    let udp = Pkt::udp(C6, 5353, FE, 30082).payload(&[9u8; 64]);
    let uport = snat_port(&udp);
    let udp_out = routed_snat(&udp, FE, uport, "fd00:10:0:2::5", 8080, NODE2_MAC);
    table(
        &mut fx,
        vec![
            (
                "syn",
                syn.build(),
                XDP_PASS,
                Some(with_dst(&syn, "fd00:10:0:1::5", 8080).build()),
            ),
            ("udp", udp.build(), XDP_TX, Some(udp_out.build())),
        ],
    );
    // A router on the client's side complains about the frontend's replies.
    let error = |ty: u8, code: u8, rest: [u8; 4], quoted: &Pkt, dst: &str| {
        let q = quoted.ip();
        let mut e = pkt::icmp_error(ROUTER, dst, ty, code, rest, &q[..48]);
        e.src_mac = CLIENT_MAC;
        e.dst_mac = NODE_MAC;
        e
    };
    let mtu = 1280u32.to_be_bytes();
    let reply = Pkt::tcp(FE, 30080, C6, 40000, SYN | ACK);
    let backend_reply = Pkt::tcp("fd00:10:0:1::5", 8080, C6, 40000, SYN | ACK);
    let ureply = Pkt::udp(FE, 30082, C6, 5353).payload(b"answer");
    let ubackend = Pkt::udp("fd00:10:0:2::5", 8080, FE, uport).payload(b"answer");
    let mut routed = error(2, 0, mtu, &ubackend, "fd00:10:0:2::5");
    routed.src_mac = NODE_MAC;
    routed.dst_mac = NODE2_MAC;
    routed.ttl = 63;
    let other = Pkt::tcp(FE, 30080, C6, 49999, SYN | ACK);
    table(
        &mut fx,
        vec![
            (
                "packet too big about the frontend's reply -> local backend",
                error(2, 0, mtu, &reply, FE).build(),
                XDP_PASS,
                Some(error(2, 0, mtu, &backend_reply, "fd00:10:0:1::5").build()),
            ),
            (
                "port unreachable about the frontend's reply -> local backend",
                error(1, 4, [0; 4], &reply, FE).build(),
                XDP_PASS,
                Some(error(1, 4, [0; 4], &backend_reply, "fd00:10:0:1::5").build()),
            ),
            (
                "packet too big about a SNATed UDP reply -> routed to the remote backend",
                error(2, 0, mtu, &ureply, FE).build(),
                XDP_TX,
                Some(routed.build()),
            ),
            (
                "error about an untracked flow: untouched",
                error(2, 0, mtu, &other, FE).build(),
                XDP_PASS,
                None,
            ),
            (
                "echo request: untouched",
                {
                    let mut e = pkt::icmp_error(C6, FE, 128, 0, [0, 1, 0, 1], b"ping");
                    e.src_mac = CLIENT_MAC;
                    e.dst_mac = NODE_MAC;
                    e.build()
                },
                XDP_PASS,
                None,
            ),
        ],
    );
}

/// An IPv6 fragment of `p`'s L4 segment: fragment header (id, offset in bytes, more flag)
/// between the IPv6 header and `part`.
fn v6_fragment(p: &Pkt, part: &[u8], offset: usize, more: bool, id: u32) -> Vec<u8> {
    let mut body = vec![p.proto(), 0];
    body.extend((((offset / 8) << 3) as u16 | u16::from(more)).to_be_bytes());
    body.extend(id.to_be_bytes());
    body.extend(part);
    let mut ip = p.ip_with(&body, 0);
    ip[6] = 44; // next header: fragment
    p.eth(&ip)
}

/// IPv6 fragments follow their first fragment like IPv4 ones: the first is translated with
/// its ports and remembered by (addresses, 32-bit id, protocol); later ones get the same
/// address rewrite (to a local backend: PASS; remote: routed on); a later fragment without a
/// tracked first is passed untouched, never rewritten on a guess.
#[test]
fn ipv6_fragments_follow_the_first() {
    let Some(mut fx) = Fx::new() else { return };
    let local = fx.backend("fd00:10:0:1::5", 8080, true);
    let remote = fx.backend("fd00:10:0:2::5", 8080, false);
    let slot = |backend| MaglevSlot { backend, prev: 0 };
    fx.frontend(("2001:db8::2", 30083, 17), 1, slot(local), 1, 0);
    fx.frontend(("2001:db8::2", 30084, 17), 2, slot(remote), 1, 0);
    let big = Pkt::udp("2001:db8::10", 5353, "2001:db8::2", 30083).payload(&[7u8; 40]);
    let seg = big.segment(); // 48 bytes: 24 + 24
    let out = with_dst(&big, "fd00:10:0:1::5", 8080);
    let oseg = out.segment();
    let rbig = Pkt::udp("2001:db8::10", 5354, "2001:db8::2", 30084).payload(&[8u8; 40]);
    let rseg = rbig.segment();
    let rout = routed_snat(
        &rbig,
        "2001:db8::2",
        snat_port(&rbig),
        "fd00:10:0:2::5",
        8080,
        NODE2_MAC,
    );
    let roseg = rout.segment();
    table(
        &mut fx,
        vec![
            (
                "first fragment: translated with ports",
                v6_fragment(&big, &seg[..24], 0, true, 0xabcd_0001),
                XDP_PASS,
                Some(v6_fragment(&out, &oseg[..24], 0, true, 0xabcd_0001)),
            ),
            (
                "later fragment: same address translation",
                v6_fragment(&big, &seg[24..], 24, false, 0xabcd_0001),
                XDP_PASS,
                Some(v6_fragment(&out, &oseg[24..], 24, false, 0xabcd_0001)),
            ),
            (
                "later fragment of another id: untouched",
                v6_fragment(&big, &seg[24..], 24, false, 0xabcd_0002),
                XDP_PASS,
                None,
            ),
            (
                "first fragment to a remote backend: SNAT, routed",
                v6_fragment(&rbig, &rseg[..24], 0, true, 7),
                XDP_TX,
                Some(v6_fragment(&rout, &roseg[..24], 0, true, 7)),
            ),
            (
                "its later fragment: routed the same way",
                v6_fragment(&rbig, &rseg[24..], 24, false, 7),
                XDP_TX,
                Some(v6_fragment(&rout, &roseg[24..], 24, false, 7)),
            ),
        ],
    );
}

#[test]
fn ipv6_reject_and_translate() {
    let Some(mut fx) = Fx::new() else { return };
    let b6 = fx.backend("fd00:10:0:1::5", 8080, true);
    fx.frontend_to(("2001:db8::2", 30080, 17), 1, b6);
    fx.frontend(("2001:db8::2", 30091, 17), 2, MaglevSlot::default(), 0, 0);
    let udp = Pkt::udp("2001:db8::10", 5353, "2001:db8::2", 30080);
    let udp_rej = Pkt::udp("2001:db8::10", 5353, "2001:db8::2", 30091);
    let unreach = {
        let orig = udp_rej.ip();
        let mut icmp = vec![1u8, 4, 0, 0, 0, 0, 0, 0];
        icmp.extend(&orig[..48]);
        let mut p = Pkt::new(
            "2001:db8::2",
            "2001:db8::10",
            L4::Raw {
                proto: 58,
                bytes: icmp.clone(),
            },
        );
        // ICMPv6 checksum over the pseudo header.
        let mut ph: Vec<u8> = Vec::new();
        ph.extend(
            "2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        ph.extend(
            "2001:db8::10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        ph.extend((icmp.len() as u32).to_be_bytes());
        ph.extend([0, 0, 0, 58]);
        ph.extend(&icmp);
        let c = pkt::checksum(&ph);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        p.l4 = L4::Raw {
            proto: 58,
            bytes: icmp,
        };
        p.src_mac = NODE_MAC;
        p.dst_mac = CLIENT_MAC;
        p.build()
    };
    table(
        &mut fx,
        vec![
            (
                "IPv6 UDP -> local backend",
                udp.build(),
                XDP_PASS,
                Some(with_dst(&udp, "fd00:10:0:1::5", 8080).build()),
            ),
            (
                "IPv6 UDP without endpoints: ICMPv6 port unreachable",
                udp_rej.build(),
                XDP_TX,
                Some(unreach),
            ),
        ],
    );
}

fn dsr_config() -> Config {
    Config {
        lb_mode: LB_MODE_DSR,
        ..v4_config()
    }
}

/// The tunnel header the front node puts in front of a DSR packet, built here from the
/// specification in `lb-ebpf/src/dsr.rs` with its own checksum: IPv4 with IHL 7, DF as given,
/// TTL 64, protocol 4 (IPIP), node -> backend's node, option 0x9e/8 with frontend port and
/// address.
fn ipip_header(src: &str, dst: &str, inner_len: usize, df: bool, fe: (&str, u16)) -> Vec<u8> {
    let ip4 = |x: &str| x.parse::<std::net::Ipv4Addr>().unwrap().octets();
    let mut h = vec![0x47, 0];
    h.extend(((inner_len + 28) as u16).to_be_bytes());
    h.extend([0, 0, if df { 0x40 } else { 0 }, 0, 64, 4, 0, 0]);
    h.extend(ip4(src));
    h.extend(ip4(dst));
    h.extend([0x9e, 8]);
    h.extend(fe.1.to_be_bytes());
    h.extend(ip4(fe.0));
    let c = pkt::checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// An Ethernet frame `dst_mac <- src_mac` carrying `ip` (IPv4).
fn eth4(dst_mac: [u8; 6], src_mac: [u8; 6], ip: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(dst_mac);
    f.extend(src_mac);
    f.extend([0x08, 0x00]);
    f.extend(ip);
    f
}

/// `--lb-mode dsr`, front node: a new flow to a remote backend is DNATed (client source kept,
/// TTL 63) and tunnelled in IPIP to the backend's node (XDP_TX to its MAC); conntrack keeps
/// later packets on it; a packet that would not fit once encapsulated gets "fragmentation
/// needed" (DF) or is dropped (no DF); a backend without a known node falls back to SNAT.
#[test]
fn dsr_encapsulates_to_the_backend_node() {
    let Some(mut fx) = Fx::new() else { return };
    fx.dp.set_config(&dsr_config()).unwrap();
    let remote = fx.backend_on("10.0.2.5", 8080, "192.168.0.3");
    let nodeless = fx.backend("10.0.2.6", 8080, false);
    let slot = |backend| MaglevSlot { backend, prev: 0 };
    fx.frontend((NODE, 30081, 6), 1, slot(remote), 1, 0);
    fx.frontend(("1.2.3.4", 80, 17), 2, slot(remote), 1, 0);
    fx.frontend((NODE, 30085, 6), 3, slot(nodeless), 1, 0);

    let tunnelled = |p: &Pkt, fe: (&str, u16), df: bool| {
        let mut inner = with_dst(p, "10.0.2.5", 8080);
        inner.ttl = p.ttl - 1;
        let seg = inner.segment();
        let ip = inner.ip_with(&seg, if df { 0x4000 } else { 0 });
        // The inner packet on its own must be a valid packet (DNAT + L4 checksum).
        pkt::verify(&eth4(NODE2_MAC, NODE_MAC, &ip)).expect("expected inner packet");
        let mut outer = ipip_header(NODE, "192.168.0.3", ip.len(), df, fe);
        outer.extend(&ip);
        eth4(NODE2_MAC, NODE_MAC, &outer)
    };
    let syn = Pkt::tcp(CLIENT, 40000, NODE, 30081, SYN);
    let ack = Pkt::tcp(CLIENT, 40000, NODE, 30081, ACK).payload(b"GET / HTTP/1.1\r\n\r\n");
    let udp = Pkt::udp(CLIENT, 5353, "1.2.3.4", 80);
    let with_df = |p: &Pkt| {
        let seg = p.segment();
        p.eth(&p.ip_with(&seg, 0x4000))
    };
    // 1500-byte MTU on veth0: 1480 bytes of IP fit as they are, not with 28 more.
    let big = Pkt::tcp(CLIENT, 40001, NODE, 30081, ACK).payload(&[1u8; 1440]);
    let frag_needed = {
        let q = big.ip_with(&big.segment(), 0x4000);
        let mut e = pkt::icmp_error(NODE, CLIENT, 3, 4, [0, 0, 0x05, 0xc0], &q[..28]);
        e.ip_id = 0;
        let seg = e.segment();
        e.eth(&e.ip_with(&seg, 0x4000))
    };
    let snat_syn = Pkt::tcp(CLIENT, 40002, NODE, 30085, SYN);
    let snat_out = routed_snat(
        &snat_syn,
        NODE,
        snat_port(&snat_syn),
        "10.0.2.6",
        8080,
        NODE2_MAC,
    );
    table(
        &mut fx,
        vec![
            (
                "tcp syn: DNAT, IPIP to node2",
                syn.build(),
                XDP_TX,
                Some(tunnelled(&syn, (NODE, 30081), false)),
            ),
            (
                "conntrack hit: same tunnel",
                ack.build(),
                XDP_TX,
                Some(tunnelled(&ack, (NODE, 30081), false)),
            ),
            (
                "DF is copied to the outer header",
                with_df(&Pkt::tcp(CLIENT, 40000, NODE, 30081, ACK)),
                XDP_TX,
                Some(tunnelled(
                    &Pkt::tcp(CLIENT, 40000, NODE, 30081, ACK),
                    (NODE, 30081),
                    true,
                )),
            ),
            (
                "udp to a LoadBalancer IP: the option carries 1.2.3.4:80",
                udp.build(),
                XDP_TX,
                Some(tunnelled(&udp, ("1.2.3.4", 80), false)),
            ),
            (
                "too big once encapsulated, DF: frag needed (MTU 1472) to the client",
                with_df(&big),
                XDP_TX,
                Some(frag_needed),
            ),
            (
                "too big once encapsulated, no DF: dropped, never sent oversize",
                big.build(),
                XDP_DROP,
                None,
            ),
            (
                "backend without a known node: SNAT as before",
                snat_syn.build(),
                XDP_TX,
                Some(snat_out.build()),
            ),
        ],
    );
    let ct = fx.dp.ct_entries();
    assert_eq!(
        ct.len(),
        5,
        "one entry per DSR flow (3), forward + reply for the SNAT one: {ct:?}"
    );
}

/// `--lb-mode dsr`, backend node: the tunnel from node2 (192.168.0.3) to this node is
/// stripped (XDP_PASS with the inner packet, MACs kept), and the pod's reply gets the frontend
/// from the tunnel option as its source on tc egress. Tunnels that are not ours, or arrive
/// while the node is in SNAT mode, are left to the kernel untouched.
#[test]
fn dsr_decapsulates_for_local_pods() {
    let Some(mut fx) = Fx::new() else { return };
    fx.dp.set_config(&dsr_config()).unwrap();
    let inner = Pkt::tcp(CLIENT, 40000, "10.0.1.5", 8080, SYN);
    let ip = inner.ip();
    let frame = |fe: (&str, u16), opt_type: u8, dst: &str| {
        let mut outer = ipip_header("192.168.0.3", dst, ip.len(), false, fe);
        outer[20] = opt_type;
        outer[10..12].copy_from_slice(&[0, 0]);
        let c = pkt::checksum(&outer);
        outer[10..12].copy_from_slice(&c.to_be_bytes());
        outer.extend(&ip);
        eth4(NODE_MAC, NODE2_MAC, &outer)
    };
    let udp_inner = Pkt::udp(CLIENT, 5353, "10.0.1.5", 5353);
    let uip = udp_inner.ip();
    let mut udp_outer = ipip_header("192.168.0.3", NODE, uip.len(), false, ("1.2.3.4", 53));
    udp_outer.extend(&uip);
    table(
        &mut fx,
        vec![
            (
                "tunnelled SYN for a local pod: decapsulated",
                frame((NODE, 30081), 0x9e, NODE),
                XDP_PASS,
                Some(eth4(NODE_MAC, NODE2_MAC, &ip)),
            ),
            (
                "tunnelled UDP to an LB IP: decapsulated",
                eth4(NODE_MAC, NODE2_MAC, &udp_outer),
                XDP_PASS,
                Some(eth4(NODE_MAC, NODE2_MAC, &uip)),
            ),
            (
                "IPIP without our option: untouched",
                frame((NODE, 30081), 0x94, NODE),
                XDP_PASS,
                None,
            ),
            (
                "IPIP to another address: untouched",
                frame((NODE, 30081), 0x9e, "192.168.0.9"),
                XDP_PASS,
                None,
            ),
        ],
    );
    // The pod answers the client directly; tc egress puts the frontend in as its source.
    let reply = Pkt::tcp("10.0.1.5", 8080, CLIENT, 40000, SYN | ACK);
    let (v, out) = fx.tc(&reply.build());
    assert_eq!(v, 0, "TC_ACT_OK");
    let expected = Pkt::tcp(NODE, 30081, CLIENT, 40000, SYN | ACK).build();
    assert_eq!(hex(&out), hex(&expected));
    pkt::verify(&out).unwrap();
    let ureply = Pkt::udp("10.0.1.5", 5353, CLIENT, 5353);
    let (_, out) = fx.tc(&ureply.build());
    assert_eq!(
        hex(&out),
        hex(&Pkt::udp("1.2.3.4", 53, CLIENT, 5353).build())
    );

    // A node in SNAT mode never decapsulates.
    fx.dp.set_config(&v4_config()).unwrap();
    table(
        &mut fx,
        vec![(
            "SNAT mode: tunnel untouched",
            frame((NODE, 30081), 0x9e, NODE),
            XDP_PASS,
            None,
        )],
    );
}

/// Per-packet cost of each XDP path: median BPF_PROG_TEST_RUN duration (repeat=1, fresh input
/// each call, so rewriting paths never see their own output) and, with
/// kernel.bpf_stats_enabled=1, the kernel's run_time_ns / run_cnt for the same calls.
/// `cargo test -p lb-agent --test xdp_fixtures --release -- --ignored --nocapture costs`
#[test]
#[ignore]
fn costs() {
    let Some(mut fx) = Fx::new() else { return };
    let local = fx.backend("10.0.1.5", 8080, true);
    let remote = fx.backend("10.0.2.5", 8080, false);
    fx.frontend_to((NODE, 30080, 6), 1, local);
    fx.frontend_to((NODE, 30081, 6), 2, remote);
    fx.frontend((NODE, 30090, 6), 3, MaglevSlot::default(), 0, 0);
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    // Paths that do not rewrite the packet can use repeat (no per-call harness cost); measured
    // with bpf_stats off, since the stats add two clock reads per run.
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    let arp0 = [
        &Pkt::tcp(CLIENT, 1, NODE, 1, SYN).build()[..12],
        &[0x08, 0x06],
        &[0u8; 46][..],
    ]
    .concat();
    let non_vip = Pkt::tcp(CLIENT, 40000, "8.8.8.8", 53, SYN).build();
    for (name, f) in [
        ("floor (ARP), repeat=10000", arp0),
        ("non-VIP TCP, repeat=10000", non_vip),
    ] {
        let ifindex = fx.ifindex;
        let prog: &mut Xdp = fx
            .dp
            .ebpf_mut()
            .program_mut(XDP_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let md: [u32; 6] = [0, f.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; f.len() + 512];
        let opts = TestRunOptions {
            data_in: Some(&f),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat: 10000,
            ..Default::default()
        };
        let r = prog.test_run(opts).unwrap();
        println!("{name:<34} {:>5} ns per packet", r.duration.as_nanos());
    }
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    const N: u16 = 3000;
    let mut measure = |name: &str, frames: &mut dyn FnMut(u16) -> Vec<u8>| {
        let stats = |fx: &mut Fx| {
            let prog: &mut Xdp = fx
                .dp
                .ebpf_mut()
                .program_mut(XDP_PROGRAM)
                .unwrap()
                .try_into()
                .unwrap();
            let info = prog.info().unwrap();
            (info.run_time().as_nanos() as u64, info.run_count())
        };
        let mut run = |fx: &mut Fx, i: u16| {
            let f = frames(i);
            let ifindex = fx.ifindex;
            let prog: &mut Xdp = fx
                .dp
                .ebpf_mut()
                .program_mut(XDP_PROGRAM)
                .unwrap()
                .try_into()
                .unwrap();
            let md: [u32; 6] = [0, f.len() as u32, 0, ifindex, 0, 0];
            let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let mut out = vec![0u8; f.len() + 512];
            let opts = TestRunOptions {
                data_in: Some(&f),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            };
            prog.test_run(opts).unwrap().duration.as_nanos()
        };
        // Pass 1, stats off: BPF_PROG_TEST_RUN durations (repeat=1, fresh input each call).
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
        let mut d: Vec<u128> = (0..N).map(|i| run(&mut fx, i)).collect();
        d.sort_unstable();
        // Pass 2, stats on: the kernel's own per-run accounting (adds its clock reads).
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
        let (t0, c0) = stats(&mut fx);
        for i in 0..N {
            run(&mut fx, N + i);
        }
        let (t1, c1) = stats(&mut fx);
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
        let stats_ns = if c1 > c0 {
            (t1 - t0) as f64 / (c1 - c0) as f64
        } else {
            f64::NAN
        };
        println!(
            "{name:<36} test_run median {:>5} ns  p90 {:>5} ns | bpf_stats {:>7.1} ns/run",
            d[d.len() / 2],
            d[d.len() * 9 / 10],
            stats_ns
        );
    };
    let arp = [
        &Pkt::tcp(CLIENT, 1, NODE, 1, SYN).build()[..12],
        &[0x08, 0x06],
        &[0u8; 46][..],
    ]
    .concat();
    measure("floor (ARP, not IP)", &mut |_| arp.clone());
    measure("non-VIP TCP (pass)", &mut |_| {
        Pkt::tcp(CLIENT, 40000, "8.8.8.8", 53, SYN).build()
    });
    measure("new flow, local backend (DNAT)", &mut |i| {
        Pkt::tcp(CLIENT, 10000 + i, NODE, 30080, SYN).build()
    });
    measure("conntrack hit, local backend", &mut |_| {
        Pkt::tcp(CLIENT, 10000, NODE, 30080, ACK).build()
    });
    measure("new flow, remote backend (SNAT+TX)", &mut |i| {
        Pkt::tcp(CLIENT, 20000 + i, NODE, 30081, SYN).build()
    });
    measure("conntrack hit, remote backend", &mut |_| {
        Pkt::tcp(CLIENT, 20000, NODE, 30081, ACK).build()
    });
    let port = snat_port(&Pkt::tcp(CLIENT, 20000, NODE, 30081, SYN));
    measure("reply from remote backend", &mut |_| {
        Pkt::tcp("10.0.2.5", 8080, NODE, port, ACK).build()
    });
    measure("reject (TCP RST)", &mut |i| {
        Pkt::tcp(CLIENT, 30000 + i, NODE, 30090, SYN).build()
    });
}
