//! kube-proxy's three dataplanes rebuilt from the synthetic Services with their real rule
//! layouts (as kube-proxy 1.3x writes them for ClusterIP services with a cluster CIDR of
//! 10.0.0.0/8), for the client node's network namespace.

use std::fmt::Write as _;

use crate::services::{self, Cluster, ENDPOINTS, PORT, TARGET_PORT};

const CLUSTER_CIDR: &str = "10.0.0.0/8";

/// `iptables-restore` input for the nat table (the measured service last in KUBE-SERVICES):
///
/// ```text
/// PREROUTING/OUTPUT -> KUBE-SERVICES: one rule per service port, matched in order
///   -d VIP/32 -p tcp --dport 80 -j KUBE-SVC-<hash>
/// KUBE-SVC-<hash>: masquerade off-cluster sources, then endpoint i of 10 with
///   -m statistic --mode random --probability 1/(10-i) -j KUBE-SEP-<hash>  (last one unconditional)
/// KUBE-SEP-<hash>: hairpin masquerade mark, then -j DNAT --to-destination ip:8080
/// KUBE-SERVICES ends with the NodePort jump (addrtype LOCAL); POSTROUTING masquerades marked packets.
/// ```
pub fn iptables(cluster: &Cluster) -> String {
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
    for i in 0..cluster.services {
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
            let ep = cluster.endpoint(i, j);
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

/// Services per pair of nftables transactions (see [`nftables`]).
const NFT_PART: usize = 10_000;

/// `nft -f` inputs for kube-proxy's nftables layout (table `ip kube-proxy`), loaded one after
/// another:
///
/// ```text
/// nat-prerouting / nat-output (type nat, priority dstnat = -100) -> services:
///   ip daddr . meta l4proto . th dport vmap @service-ips      (one hash lookup, any n)
/// service-ips: VIP . tcp . 80 : goto service-<hash>-default/svc-i/tcp/http
/// service-...: masquerade off-cluster sources; numgen random mod 10 vmap { 0 : goto endpoint-..., ... }
/// endpoint-...: hairpin masquerade mark; meta l4proto tcp dnat to ip:8080
/// ```
///
/// kube-proxy writes its first sync as one transaction; here the same objects are split so
/// that the load is not dominated by three costs of this kernel and nft 1.0.x:
/// - every transaction with a rule or an element makes `nft` fetch the table's chain list
///   first, a kernel dump that restarts its walk for each message batch (quadratic in the
///   number of chains, ~15 s at 330k chains); a transaction of `add chain` only needs no cache;
/// - binding an anonymous set (each `numgen ... vmap { }`) walks the transaction built so far
///   (`__nft_set_trans_bind`), so those rules go first in their transaction;
/// - creating one walks every set of the table (name allocation, lookups by name), quadratic
///   in services; that part is inherent in the layout (kube-proxy pays it too).
///
/// So: the table, its base chains and map; then per part of [`NFT_PART`] services one
/// transaction with the part's chains and one with its rules and map elements, the `numgen`
/// rules first. The load time reported is the sum.
pub fn nftables(c: &Cluster) -> Vec<String> {
    nftables_in_parts(c, NFT_PART)
}

fn nftables_in_parts(c: &Cluster, part_size: usize) -> Vec<String> {
    let mut out = vec![nft_base()];
    for start in (0..c.services).step_by(part_size) {
        let part: Vec<NftService> = (start..c.services.min(start + part_size))
            .map(|i| NftService::new(c, i))
            .collect();
        out.push(part.iter().map(NftService::chains).collect());
        let numgen: String = part.iter().map(NftService::numgen_rule).collect();
        out.push(numgen + &part.iter().map(NftService::rules).collect::<String>());
    }
    out
}

const NFT_TABLE: &str = "ip kube-proxy";

/// The table, base chains, service map and the rules that do not depend on services.
fn nft_base() -> String {
    const T: &str = NFT_TABLE;
    format!(
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
         add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips\n"
    )
}

/// One service port's chain names and endpoints in kube-proxy's nftables naming.
struct NftService {
    vip: std::net::Ipv4Addr,
    chain: String,
    /// (endpoint, its chain)
    endpoints: Vec<(std::net::Ipv4Addr, String)>,
}

impl NftService {
    fn new(c: &Cluster, i: usize) -> Self {
        let port_name = format!("default/{}/tcp/http", services::name(i));
        let endpoints = (0..ENDPOINTS)
            .map(|j| {
                let ep = c.endpoint(i, j);
                let hash = services::chain_hash(&format!("{port_name}{ep}"));
                (
                    ep,
                    format!("endpoint-{}-{port_name}__{ep}/{TARGET_PORT}", &hash[..8]),
                )
            })
            .collect();
        Self {
            vip: services::vip(i),
            chain: format!(
                "service-{}-{port_name}",
                &services::chain_hash(&port_name)[..8]
            ),
            endpoints,
        }
    }

    fn chains(&self) -> String {
        std::iter::once(&self.chain)
            .chain(self.endpoints.iter().map(|(_, chain)| chain))
            .map(|chain| format!("add chain {NFT_TABLE} {chain}\n"))
            .collect()
    }

    fn numgen_rule(&self) -> String {
        let vmap: Vec<String> = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(j, (_, chain))| format!("{j} : goto {chain}"))
            .collect();
        format!(
            "add rule {NFT_TABLE} {} numgen random mod {ENDPOINTS} vmap {{ {} }}\n",
            self.chain,
            vmap.join(", ")
        )
    }

    /// Everything else: the endpoint chains' rules, the masquerade rule (inserted before the
    /// `numgen` rule, where kube-proxy has it) and the service's map element.
    fn rules(&self) -> String {
        const T: &str = NFT_TABLE;
        let mut out = String::new();
        for (ep, chain) in &self.endpoints {
            let _ = writeln!(
                out,
                "add rule {T} {chain} ip saddr {ep} jump mark-for-masquerade\n\
                 add rule {T} {chain} meta l4proto tcp dnat to {ep}:{TARGET_PORT}"
            );
        }
        let (vip, chain) = (self.vip, &self.chain);
        let _ = writeln!(
            out,
            "insert rule {T} {chain} ip daddr {vip} tcp dport {PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n\
             add element {T} service-ips {{ {vip} . tcp . {PORT} : goto {chain} }}"
        );
        out
    }
}

/// IPVS as kube-proxy's ipvs mode sets it up: every ClusterIP on the dummy interface
/// `kube-ipvs0` (so the packet is local and reaches IPVS at LOCAL_IN), one virtual server per
/// service port with the rr scheduler, and its 10 endpoints as masqueraded (NAT) real servers.
/// Returns (`ip -batch` lines, `ipvsadm-restore` input).
pub fn ipvs(c: &Cluster) -> (Vec<String>, String) {
    let mut ip = vec![
        "link add kube-ipvs0 type dummy".to_owned(),
        "link set kube-ipvs0 up".to_owned(),
    ];
    let mut restore = String::new();
    for i in 0..c.services {
        let vip = services::vip(i);
        ip.push(format!("addr add {vip}/32 dev kube-ipvs0"));
        let _ = writeln!(restore, "-A -t {vip}:{PORT} -s rr");
        for j in 0..ENDPOINTS {
            let _ = writeln!(
                restore,
                "-a -t {vip}:{PORT} -r {}:{TARGET_PORT} -m -w 1",
                c.endpoint(i, j)
            );
        }
    }
    (ip, restore)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn cluster(services: usize) -> Cluster {
        Cluster { services, node: 1 }
    }

    #[test]
    fn layouts_have_the_expected_sizes() {
        let ipt = iptables(&cluster(3));
        assert_eq!(ipt.matches("-j DNAT").count(), 30);
        assert_eq!(ipt.matches("--probability").count(), 27);
        let last_svc = ipt.lines().rfind(|l| l.starts_with("-A KUBE-SERVICES -d"));
        assert!(last_svc.is_some_and(|l| l.contains("172.30.0.3/32")));
        let nft = nftables(&cluster(3)).concat();
        assert_eq!(nft.matches("dnat to").count(), 30);
        assert_eq!(nft.matches("numgen random mod 10").count(), 3);
        assert_eq!(nft.matches("add element").count(), 3);
        let (ip, restore) = ipvs(&cluster(2));
        assert_eq!(ip.len(), 4);
        assert_eq!(restore.lines().count(), 22);
    }

    /// The chain a command adds, or the chains it adds rules to and jumps to.
    fn chain_refs(cmd: &str) -> (Option<&str>, Vec<&str>) {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let target = |k: usize| words.get(k).copied();
        let created = (cmd.starts_with("add chain")).then(|| target(4)).flatten();
        let mut used: Vec<&str> = words
            .windows(2)
            .filter(|w| w[0] == "goto" || w[0] == "jump")
            .map(|w| w[1].trim_end_matches([',', '}']))
            .collect();
        if cmd.starts_with("add rule") || cmd.starts_with("insert rule") {
            used.extend(target(4));
        }
        (created, used)
    }

    #[test]
    fn nft_transactions_create_chains_before_use_and_bind_anonymous_sets_first() {
        let txs = nftables_in_parts(&cluster(9), 4);
        assert_eq!(txs.len(), 1 + 2 * 3);
        let mut known: HashSet<&str> = HashSet::new();
        for (k, tx) in txs.iter().enumerate() {
            let cmds: Vec<&str> = tx.lines().collect();
            let adds_chains = cmds.iter().filter(|c| c.starts_with("add chain")).count();
            match k {
                0 => assert!(tx.starts_with("add table")),
                // Chains alone: such a transaction needs no chain cache.
                k if k % 2 == 1 => assert_eq!(adds_chains, cmds.len()),
                _ => {
                    assert_eq!(adds_chains, 0);
                    let first_other = cmds.iter().position(|c| !c.contains("numgen"));
                    let last_numgen = cmds.iter().rposition(|c| c.contains("numgen"));
                    assert!(last_numgen < first_other, "numgen rules come first");
                }
            }
            known.extend(cmds.iter().filter_map(|c| chain_refs(c).0));
            for c in &cmds {
                for chain in chain_refs(c).1 {
                    assert!(known.contains(chain), "{chain} used before it exists: {c}");
                }
            }
        }
        assert_eq!(known.len(), 6 + 9 * (1 + ENDPOINTS));
    }

    #[test]
    fn the_masquerade_rule_precedes_the_endpoint_choice() {
        let rules = NftService::new(&cluster(1), 0).rules();
        assert!(rules.contains("insert rule ip kube-proxy service-"));
        assert!(rules.contains("jump mark-for-masquerade"));
    }
}
