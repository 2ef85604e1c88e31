//! kube-proxy's three dataplanes rebuilt from the synthetic Services with their real rule
//! layouts (as kube-proxy 1.3x writes them for ClusterIP services with a cluster CIDR of
//! 10.0.0.0/8), for the client node's network namespace.

use std::fmt::Write as _;

use crate::services::{self, ENDPOINTS, PORT, TARGET_PORT};

const CLUSTER_CIDR: &str = "10.0.0.0/8";

/// `iptables-restore` input for the nat table, services `0..n` (the measured one last):
///
/// ```text
/// PREROUTING/OUTPUT -> KUBE-SERVICES: one rule per service port, matched in order
///   -d VIP/32 -p tcp --dport 80 -j KUBE-SVC-<hash>
/// KUBE-SVC-<hash>: masquerade off-cluster sources, then endpoint i of 10 with
///   -m statistic --mode random --probability 1/(10-i) -j KUBE-SEP-<hash>  (last one unconditional)
/// KUBE-SEP-<hash>: hairpin masquerade mark, then -j DNAT --to-destination ip:8080
/// KUBE-SERVICES ends with the NodePort jump (addrtype LOCAL); POSTROUTING masquerades marked packets.
/// ```
pub fn iptables(n: usize) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let c = &mut chains;
    let r = &mut rules;
    let _ = writeln!(c, "*nat");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-NODEPORTS",
    ] {
        let _ = writeln!(c, ":{chain} - [0:0]");
    }
    let _ = writeln!(
        r,
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    );
    for i in 0..n {
        let port_name = format!("default/{}:http", services::name(i));
        let vip = services::vip(i);
        let svc_chain = format!(
            "KUBE-SVC-{}",
            services::chain_hash(&format!("{port_name}tcp"))
        );
        let _ = writeln!(c, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            r,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {PORT} -j {svc_chain}"
        );
        let _ = writeln!(
            r,
            "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {vip}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {PORT} -j KUBE-MARK-MASQ"
        );
        for j in 0..ENDPOINTS {
            let ep = services::endpoint(n, i, j);
            let sep = format!(
                "KUBE-SEP-{}",
                services::chain_hash(&format!("{port_name}tcp{ep}:{TARGET_PORT}"))
            );
            let _ = writeln!(c, ":{sep} - [0:0]");
            let remaining = ENDPOINTS - j;
            if remaining > 1 {
                let _ = writeln!(
                    r,
                    "-A {svc_chain} -m comment --comment \"{port_name} -> {ep}:{TARGET_PORT}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / remaining as f64
                );
            } else {
                let _ = writeln!(
                    r,
                    "-A {svc_chain} -m comment --comment \"{port_name} -> {ep}:{TARGET_PORT}\" -j {sep}"
                );
            }
            let _ = writeln!(
                r,
                "-A {sep} -s {ep}/32 -m comment --comment \"{port_name}\" -j KUBE-MARK-MASQ\n\
                 -A {sep} -p tcp -m comment --comment \"{port_name}\" -m tcp -j DNAT --to-destination {ep}:{TARGET_PORT}"
            );
        }
    }
    let _ = writeln!(
        r,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT"
    );
    chains + &rules
}

/// `nft -f` inputs for kube-proxy's nftables layout (table `ip kube-proxy`), services `0..n`:
///
/// ```text
/// nat-prerouting / nat-output (type nat, priority dstnat = -100) -> services:
///   ip daddr . meta l4proto . th dport vmap @service-ips      (one hash lookup, any n)
/// service-ips: VIP . tcp . 80 : goto service-<hash>-default/svc-i/tcp/http
/// service-...: masquerade off-cluster sources; numgen random mod 10 vmap { 0 : goto endpoint-..., ... }
/// endpoint-...: hairpin masquerade mark; meta l4proto tcp dnat to ip:8080
/// ```
///
/// Returned as several transactions, loaded one after another: all chains first, then the
/// plain rules and map elements, then the per-service `numgen` rules in chunks. One
/// transaction with everything is quadratic on this kernel (a rule that names a chain, or an
/// anonymous set, created in the same transaction is found by walking the transaction list),
/// which at 10k services takes minutes; kube-proxy itself only writes the changes after its
/// first sync. The load time reported is the sum.
pub fn nftables(n: usize) -> Vec<String> {
    const T: &str = "ip kube-proxy";
    let mut chains = String::new();
    let _ = writeln!(
        chains,
        "add table {T} {{ comment \"rules for kube-proxy\" ; }}\n\
         add chain {T} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add chain {T} nat-output {{ type nat hook output priority -100 ; }}\n\
         add chain {T} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add chain {T} mark-for-masquerade\n\
         add chain {T} masquerading\n\
         add chain {T} services\n\
         add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add rule {T} nat-prerouting jump services\n\
         add rule {T} nat-output jump services\n\
         add rule {T} nat-postrouting jump masquerading\n\
         add rule {T} mark-for-masquerade mark set mark or 0x4000\n\
         add rule {T} masquerading mark and 0x4000 == 0 return\n\
         add rule {T} masquerading mark set mark xor 0x4000\n\
         add rule {T} masquerading masquerade fully-random\n\
         add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let mut plain = String::new();
    let mut numgen: Vec<String> = Vec::new();
    let mut chunk = String::new();
    for i in 0..n {
        let port_name = format!("default/{}/tcp/http", services::name(i));
        let vip = services::vip(i);
        let svc_chain = format!(
            "service-{}-{port_name}",
            &services::chain_hash(&port_name)[..8]
        );
        let _ = writeln!(chains, "add chain {T} {svc_chain}");
        let mut vmap = Vec::with_capacity(ENDPOINTS);
        for j in 0..ENDPOINTS {
            let ep = services::endpoint(n, i, j);
            let ep_chain = format!(
                "endpoint-{}-{port_name}__{ep}/{TARGET_PORT}",
                &services::chain_hash(&format!("{port_name}{ep}"))[..8]
            );
            let _ = writeln!(chains, "add chain {T} {ep_chain}");
            let _ = writeln!(
                plain,
                "add rule {T} {ep_chain} ip saddr {ep} jump mark-for-masquerade\n\
                 add rule {T} {ep_chain} meta l4proto tcp dnat to {ep}:{TARGET_PORT}"
            );
            vmap.push(format!("{j} : goto {ep_chain}"));
        }
        let _ = writeln!(
            plain,
            "add rule {T} {svc_chain} ip daddr {vip} tcp dport {PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n\
             add element {T} service-ips {{ {vip} . tcp . {PORT} : goto {svc_chain} }}"
        );
        let _ = writeln!(
            chunk,
            "add rule {T} {svc_chain} numgen random mod {ENDPOINTS} vmap {{ {} }}",
            vmap.join(", ")
        );
        if (i + 1) % 2500 == 0 {
            numgen.push(std::mem::take(&mut chunk));
        }
    }
    if !chunk.is_empty() {
        numgen.push(chunk);
    }
    let mut out = vec![chains, plain];
    out.extend(numgen);
    out
}

/// IPVS as kube-proxy's ipvs mode sets it up: every ClusterIP on the dummy interface
/// `kube-ipvs0` (so the packet is local and reaches IPVS at LOCAL_IN), one virtual server per
/// service port with the rr scheduler, and its 10 endpoints as masqueraded (NAT) real servers.
/// Returns (`ip -batch` lines, `ipvsadm-restore` input).
pub fn ipvs(n: usize) -> (Vec<String>, String) {
    let mut ip = vec![
        "link add kube-ipvs0 type dummy".to_owned(),
        "link set kube-ipvs0 up".to_owned(),
    ];
    let mut restore = String::new();
    for i in 0..n {
        let vip = services::vip(i);
        ip.push(format!("addr add {vip}/32 dev kube-ipvs0"));
        let _ = writeln!(restore, "-A -t {vip}:{PORT} -s rr");
        for j in 0..ENDPOINTS {
            let _ = writeln!(
                restore,
                "-a -t {vip}:{PORT} -r {}:{TARGET_PORT} -m -w 1",
                services::endpoint(n, i, j)
            );
        }
    }
    (ip, restore)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_the_expected_sizes() {
        let ipt = iptables(3);
        assert_eq!(ipt.matches("-j DNAT").count(), 30);
        assert_eq!(ipt.matches("--probability").count(), 27);
        let last_svc = ipt.lines().rfind(|l| l.starts_with("-A KUBE-SERVICES -d"));
        assert!(last_svc.is_some_and(|l| l.contains("172.30.0.3/32")));
        let nft = nftables(3).concat();
        assert_eq!(nft.matches("dnat to").count(), 30);
        assert_eq!(nft.matches("numgen random mod 10").count(), 3);
        let (ip, restore) = ipvs(2);
        assert_eq!(ip.len(), 4);
        assert_eq!(restore.lines().count(), 22);
    }
}
