//! YAML fixtures (real Kubernetes schema, multi-document) through the whole pure pipeline:
//! `parse_documents` -> `inventory` -> `desired_state`.

mod common;

use std::collections::BTreeSet;

use common::*;
use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP, SCOPE_INTERNAL, SvcKey,
    maglev::{DEFAULT_TABLE_SIZE, recommended_min_size},
};

fn keys(run: &Run) -> BTreeSet<SvcKey> {
    run.desired.frontends.keys().copied().collect()
}

#[test]
fn frontend_key_layout_is_v4_mapped_network_order() {
    let k = tcp("172.30.0.10", 53);
    let bytes: Vec<u8> = k.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    assert_eq!(
        bytes,
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 172, 30, 0, 10]
    );
    assert_eq!(k.port.to_ne_bytes(), [0, 53]);
    assert_eq!((k.proto, k.scope), (IPPROTO_TCP, SCOPE_INTERNAL));
    assert_eq!(udp("172.30.0.10", 53).proto, IPPROTO_UDP);
}

#[test]
fn clusterip_services_from_fixture() {
    let run = run_yaml(&fixture("clusterip.yaml"), &node(NODE));

    let expected: BTreeSet<SvcKey> = [
        tcp("172.30.0.10", 53),
        udp("172.30.0.10", 53),
        tcp("172.30.0.20", 80),
        tcp("172.30.0.30", 80),
        tcp("172.30.0.30", 443),
    ]
    .into();
    assert_eq!(keys(&run), expected, "{:#?}", run.desired.frontends.keys());

    // Named ports with the same number, matched by name and protocol; targetPort from the slice.
    let dns = eps(&[("10.0.1.53", 5353), ("10.0.2.53", 5353)]);
    assert_eq!(run.backends(&tcp("172.30.0.10", 53)), dns);
    assert_eq!(run.backends(&udp("172.30.0.10", 53)), dns);
    assert_eq!(
        run.frontend(&tcp("172.30.0.10", 53)).group.port_name,
        "dns-tcp"
    );
    assert_eq!(run.frontend(&udp("172.30.0.10", 53)).group.port_name, "dns");
    assert_ne!(
        run.frontend(&tcp("172.30.0.10", 53)).group,
        run.frontend(&udp("172.30.0.10", 53)).group,
        "TCP and UDP never share a table"
    );

    // Unnamed single port 80 -> 8080; "ready" unset counts as ready; not-ready left out; the
    // FQDN slice and the unlabelled slice add nothing.
    assert_eq!(
        run.backends(&tcp("172.30.0.20", 80)),
        eps(&[("10.0.1.1", 8080), ("10.0.2.1", 8080)])
    );

    // Two named ports, endpoints from two slices (listing the ports in different orders).
    assert_eq!(
        run.backends(&tcp("172.30.0.30", 80)),
        eps(&[
            ("10.0.1.30", 8080),
            ("10.0.2.30", 8080),
            ("10.0.2.31", 8080)
        ])
    );
    assert_eq!(
        run.backends(&tcp("172.30.0.30", 443)),
        eps(&[
            ("10.0.1.30", 8443),
            ("10.0.2.30", 8443),
            ("10.0.2.31", 8443)
        ])
    );

    // Plain defaults: no affinity, cluster-wide; "local" follows nodeName. Only sockets read
    // these tables (no external frontends), so each is sized to its backends, not the global
    // size.
    for (k, fe) in &run.desired.frontends {
        assert_eq!(fe.flags, 0, "{}", show_key(k));
        assert!(!fe.group.local_only);
        let g = &run.desired.groups[&fe.group];
        assert_eq!(
            g.table_size,
            recommended_min_size(g.backends.len()),
            "{}",
            show_key(k)
        );
        assert!(g.table_size < DEFAULT_TABLE_SIZE);
    }
    for b in all_backends(&run.desired) {
        assert_eq!(b.local, b.addr.to_string().starts_with("10.0.1."), "{b:?}");
    }

    // The only complaint: the slice that cannot be joined to a service.
    assert_eq!(run.warnings.len(), 1, "{:#?}", run.warnings);
    assert!(
        run.warnings[0].contains("EndpointSlice default/unlabelled"),
        "{:?}",
        run.warnings
    );
    assert!(
        run.warnings[0].contains("kubernetes.io/service-name"),
        "{:?}",
        run.warnings
    );
}

#[test]
fn local_flag_follows_the_node_name() {
    let run = run_yaml(&fixture("clusterip.yaml"), &node("node2"));
    for b in all_backends(&run.desired) {
        assert_eq!(b.local, b.addr.to_string().starts_with("10.0.2."), "{b:?}");
    }
}

#[test]
fn service_types_and_labels() {
    let run = run_yaml(&fixture("types.yaml"), &node(NODE));
    assert!(run.warnings.is_empty(), "{:#?}", run.warnings);

    // NodePort and LoadBalancer keep their ClusterIP frontend.
    assert_eq!(
        run.backends(&tcp("172.30.0.43", 80)),
        eps(&[("10.0.1.43", 8080)])
    );
    assert_eq!(
        run.backends(&tcp("172.30.0.44", 80)),
        eps(&[("10.0.2.44", 8080)])
    );

    // Headless, ExternalName, another proxy's and labelled-headless services: nothing at all.
    let cluster_ip_keys: BTreeSet<String> = keys(&run)
        .iter()
        .filter(|k| k.scope == SCOPE_INTERNAL)
        .map(show_key)
        .filter(|k| k.starts_with("172.30."))
        .collect();
    assert_eq!(
        cluster_ip_keys,
        [
            show_key(&tcp("172.30.0.43", 80)),
            show_key(&tcp("172.30.0.44", 80))
        ]
        .into()
    );
    let services: BTreeSet<&str> = run
        .desired
        .groups
        .keys()
        .map(|g| g.service.name.as_str())
        .collect();
    assert_eq!(services, ["lb", "nodeport"].into());
}

#[test]
fn ipv6_and_dual_stack() {
    let run = run_yaml(&fixture("dualstack.yaml"), &node(NODE));
    assert!(run.warnings.is_empty(), "{:#?}", run.warnings);

    // IPv6 single-stack: the key is the plain 16-byte address.
    let v6 = tcp("fd00:172:30::50", 80);
    assert_eq!(v6.addr, lb_common::addr::from_ip(ip("fd00:172:30::50")));
    assert_eq!(
        run.backends(&v6),
        eps(&[("fd00:10:1::50", 8080), ("fd00:10:2::50", 8080)])
    );

    // Dual-stack: each family's frontend gets only that family's endpoints.
    let v4_eps = eps(&[("10.0.1.60", 8080), ("10.0.2.60", 8080)]);
    let v6_eps = eps(&[("fd00:10:1::60", 8080)]);
    assert_eq!(run.backends(&tcp("172.30.0.60", 80)), v4_eps);
    assert_eq!(run.backends(&tcp("fd00:172:30::60", 80)), v6_eps);
    assert_eq!(
        run.backends(&udp("172.30.0.60", 53)),
        eps(&[("10.0.1.60", 5353), ("10.0.2.60", 5353)])
    );
    assert_eq!(
        run.backends(&udp("fd00:172:30::60", 53)),
        eps(&[("fd00:10:1::60", 5353)])
    );

    // Single-stack IPv4 with a stray IPv6 slice: IPv4 endpoints only.
    assert_eq!(
        run.backends(&tcp("172.30.0.70", 80)),
        eps(&[("10.0.1.70", 80)])
    );

    // No frontend ever reaches a backend of the other family.
    for (k, fe) in &run.desired.frontends {
        let v6_frontend = lb_common::addr::to_ip(&k.addr).is_ipv6();
        for b in run.desired.groups[&fe.group].backends.iter() {
            assert_eq!(
                b.addr.is_ipv6(),
                v6_frontend,
                "{} -> {}",
                show_key(k),
                b.addr
            );
        }
    }
}

#[test]
fn all_fixtures_together_equal_each_alone() {
    // Services never influence each other: the union of the fixtures is the union of results.
    let names = ["clusterip.yaml", "types.yaml", "dualstack.yaml"];
    let texts: Vec<String> = names.iter().map(|n| fixture(n)).collect();
    let all = run_yaml(
        &join(&texts.iter().map(String::as_str).collect::<Vec<_>>()),
        &node(NODE),
    );
    let mut frontends = 0;
    for text in &texts {
        let alone = run_yaml(text, &node(NODE));
        for (k, fe) in &alone.desired.frontends {
            assert_eq!(all.desired.frontends.get(k), Some(fe));
            assert_eq!(
                all.desired.groups.get(&fe.group),
                alone.desired.groups.get(&fe.group)
            );
        }
        frontends += alone.desired.frontends.len();
    }
    assert_eq!(all.desired.frontends.len(), frontends);
}

#[test]
fn desired_state_is_deterministic() {
    let text = join(&[&fixture("clusterip.yaml"), &fixture("dualstack.yaml")]);
    let a = run_yaml(&text, &node(NODE));
    let b = run_yaml(&text, &node(NODE));
    assert_eq!(a.desired, b.desired);
    assert_eq!(a.warnings, b.warnings);
    for g in a.desired.groups.values() {
        assert!(
            g.backends.windows(2).all(|w| w[0] < w[1]),
            "sorted and unique: {g:?}"
        );
    }
}
