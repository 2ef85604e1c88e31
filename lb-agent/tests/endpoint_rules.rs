//! kube-proxy's EndpointSlice rules (its endpointslicecache and CategorizeEndpoints behaviour),
//! re-created as scenarios: de-duplication across slices, ready/terminating fallback,
//! internalTrafficPolicy Local, session affinity, and the per-service Maglev table size.

mod common;

use common::*;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_agent::objects::ANNOTATION_MAGLEV_SIZE;
use lb_common::{SVC_F_AFFINITY, maglev::DEFAULT_TABLE_SIZE};

const VIP: &str = "172.30.0.10";

/// Service "svc" at VIP with one unnamed TCP port 80.
fn svc() -> Svc {
    Svc::new("svc", VIP).port("", "TCP", 80)
}

/// A slice of "svc" with the matching unnamed port 8080.
fn slice(name: &str) -> Slice {
    Slice::v4(name, "svc").port("", "TCP", 8080)
}

fn run(services: &[Service], slices: &[EndpointSlice]) -> Run {
    run_objects(services, slices, &node(NODE))
}

/// The backend addresses of VIP:80 (all on port 8080).
fn backends(services: &[Service], slices: &[EndpointSlice]) -> Vec<String> {
    let r = run(services, slices);
    assert!(r.warnings.is_empty(), "{:#?}", r.warnings);
    r.backends(&tcp(VIP, 80))
        .into_iter()
        .map(|(a, p)| {
            assert_eq!(p, 8080);
            a.to_string()
        })
        .collect()
}

// ---- De-duplication across slices --------------------------------------------------------------

#[test]
fn an_address_in_two_slices_is_counted_once() {
    let a = slice("svc-a").ready(&["10.0.1.1", "10.0.1.2"]).build();
    let b = slice("svc-b").ready(&["10.0.1.2", "10.0.1.3"]).build();
    assert_eq!(
        backends(&[svc().build()], &[a, b]),
        ["10.0.1.1", "10.0.1.2", "10.0.1.3"]
    );
}

#[test]
fn a_terminating_copy_never_overrides_a_ready_one() {
    // Both slice orders: the terminating copy sorts first, then last.
    for (first, second) in [("svc-a", "svc-b"), ("svc-b", "svc-a")] {
        let terminating = slice(first)
            .ep(Ep::new("10.0.1.1").serving_terminating())
            .ep(Ep::new("10.0.1.2").terminating())
            .build();
        let ready = slice(second).ready(&["10.0.1.1", "10.0.1.2"]).build();
        let one_ready = slice("svc-c").ready(&["10.0.1.3"]).build();
        // 10.0.1.1 and 10.0.1.2 count as ready: the terminating copies do not hide them, and
        // because ready endpoints exist, no fallback to terminating ones happens.
        assert_eq!(
            backends(
                &[svc().build()],
                &[terminating.clone(), ready.clone(), one_ready]
            ),
            ["10.0.1.1", "10.0.1.2", "10.0.1.3"],
            "terminating copy in {first}"
        );
        // Same without other ready endpoints.
        assert_eq!(
            backends(&[svc().build()], &[terminating, ready]),
            ["10.0.1.1", "10.0.1.2"]
        );
    }
}

#[test]
fn a_not_ready_copy_never_overrides_a_ready_one() {
    let not_ready = slice("svc-a").ep(Ep::new("10.0.1.1").not_ready()).build();
    let ready = slice("svc-b").ready(&["10.0.1.1"]).build();
    assert_eq!(
        backends(&[svc().build()], &[not_ready, ready]),
        ["10.0.1.1"]
    );
}

#[test]
fn serving_terminating_in_two_slices_is_one_fallback_backend() {
    let a = slice("svc-a")
        .ep(Ep::new("10.0.1.1").serving_terminating())
        .build();
    let b = slice("svc-b")
        .ep(Ep::new("10.0.1.1").serving_terminating())
        .build();
    assert_eq!(backends(&[svc().build()], &[a, b]), ["10.0.1.1"]);
}

#[test]
fn only_the_first_address_of_an_endpoint_is_used() {
    let mut ep = Ep::new("10.0.1.1");
    ep.0.addresses.push("10.0.1.2".to_string());
    let s = slice("svc-a").ep(ep).ep(Ep(Default::default())).build();
    assert_eq!(backends(&[svc().build()], &[s]), ["10.0.1.1"]);
}

#[test]
fn slices_of_other_services_and_namespaces_are_not_mixed_in() {
    let mine = slice("svc-a").ready(&["10.0.1.1"]).build();
    let other_service = Slice::v4("other-a", "other")
        .port("", "TCP", 8080)
        .ready(&["10.0.1.2"]);
    let mut other_namespace = slice("svc-a").ready(&["10.0.1.3"]).build();
    other_namespace.metadata.namespace = Some("prod".to_string());
    let got = backends(
        &[svc().build()],
        &[mine, other_service.build(), other_namespace],
    );
    assert_eq!(got, ["10.0.1.1"]);
}

#[test]
fn slice_ports_must_match_name_and_protocol() {
    let s = Svc::new("svc", VIP)
        .port("http", "TCP", 80)
        .port("dns", "UDP", 53)
        .build();
    let wrong = Slice::v4("svc-a", "svc")
        .port("http", "UDP", 8080) // right name, wrong protocol
        .port("metrics", "TCP", 9090) // not a service port
        .ready(&["10.0.1.1"])
        .build();
    let right = Slice::v4("svc-b", "svc")
        .port("dns", "UDP", 5353)
        .port("http", "TCP", 8080)
        .ready(&["10.0.1.2"])
        .build();
    let r = run(&[s], &[wrong, right]);
    assert_eq!(r.backends(&tcp(VIP, 80)), eps(&[("10.0.1.2", 8080)]));
    assert_eq!(r.backends(&udp(VIP, 53)), eps(&[("10.0.1.2", 5353)]));
}

// ---- Ready first, then serving-terminating ----------------------------------------------------

#[test]
fn ready_endpoints_are_used_before_terminating_ones() {
    let s = slice("svc-a")
        .ep(Ep::new("10.0.1.1").cond(true, true, false))
        .ep(Ep::new("10.0.1.2")) // conditions unset: ready
        .ep(Ep::new("10.0.1.3").serving_terminating())
        .ep(Ep::new("10.0.1.4").terminating())
        .ep(Ep::new("10.0.1.5").not_ready())
        .build();
    assert_eq!(backends(&[svc().build()], &[s]), ["10.0.1.1", "10.0.1.2"]);
}

#[test]
fn serving_terminating_endpoints_are_used_when_none_is_ready() {
    let s = slice("svc-a")
        .ep(Ep::new("10.0.1.3").serving_terminating())
        .ep(Ep::new("10.0.1.6").serving_terminating())
        .ep(Ep::new("10.0.1.4").terminating())
        .ep(Ep::new("10.0.1.5").not_ready())
        .build();
    assert_eq!(backends(&[svc().build()], &[s]), ["10.0.1.3", "10.0.1.6"]);
}

#[test]
fn serving_unset_on_a_terminating_endpoint_means_serving() {
    // The EndpointSlice API (and kube-proxy): a nil `serving` is true.
    let mut ep = Ep::new("10.0.1.3");
    ep.0.conditions = Some(k8s_openapi::api::discovery::v1::EndpointConditions {
        ready: Some(false),
        serving: None,
        terminating: Some(true),
    });
    let s = slice("svc-a")
        .ep(ep)
        .ep(Ep::new("10.0.1.4").terminating())
        .build();
    assert_eq!(backends(&[svc().build()], &[s]), ["10.0.1.3"]);
}

#[test]
fn not_serving_terminating_endpoints_are_never_used() {
    let s = slice("svc-a")
        .ep(Ep::new("10.0.1.4").terminating())
        .ep(Ep::new("10.0.1.5").not_ready())
        .build();
    let r = run(&[svc().build()], &[s]);
    // The frontend stays, with nothing behind it (connections are refused).
    assert!(r.backends(&tcp(VIP, 80)).is_empty());
}

#[test]
fn a_service_without_slices_has_a_frontend_and_no_backends() {
    let r = run(&[svc().build()], &[]);
    assert!(r.backends(&tcp(VIP, 80)).is_empty());
}

// ---- internalTrafficPolicy: Local -----------------------------------------------------------

fn spread() -> Slice {
    slice("svc-a")
        .ep(Ep::new("10.0.1.1").on("node1"))
        .ep(Ep::new("10.0.1.2").on("node1").serving_terminating())
        .ep(Ep::new("10.0.2.1").on("node2"))
        .ep(Ep::new("10.0.9.1")) // no nodeName: never local
}

#[test]
fn internal_local_uses_only_this_nodes_ready_endpoints() {
    let r = run(&[svc().internal_local().build()], &[spread().build()]);
    assert_eq!(r.backends(&tcp(VIP, 80)), eps(&[("10.0.1.1", 8080)]));
    assert!(r.frontend(&tcp(VIP, 80)).group.local_only);
    assert!(r.group(&tcp(VIP, 80)).backends.iter().all(|b| b.local));

    // Cluster policy on the same endpoints: every ready one, wherever it runs.
    let r = run(&[svc().build()], &[spread().build()]);
    assert_eq!(
        r.backends(&tcp(VIP, 80)),
        eps(&[("10.0.1.1", 8080), ("10.0.2.1", 8080), ("10.0.9.1", 8080)])
    );
    assert!(!r.frontend(&tcp(VIP, 80)).group.local_only);

    // Seen from node2.
    let r = run_objects(
        &[svc().internal_local().build()],
        &[spread().build()],
        &node("node2"),
    );
    assert_eq!(r.backends(&tcp(VIP, 80)), eps(&[("10.0.2.1", 8080)]));
}

#[test]
fn internal_local_falls_back_to_local_serving_terminating() {
    // node1's only ready endpoint goes away; node2 still has a ready one, but Local must not
    // use it: node1's serving-terminating endpoint is used instead.
    let s = slice("svc-a")
        .ep(Ep::new("10.0.1.1").on("node1").terminating())
        .ep(Ep::new("10.0.1.2").on("node1").serving_terminating())
        .ep(Ep::new("10.0.2.1").on("node2"))
        .build();
    let r = run(&[svc().internal_local().build()], &[s]);
    assert_eq!(r.backends(&tcp(VIP, 80)), eps(&[("10.0.1.2", 8080)]));
}

#[test]
fn internal_local_with_no_local_endpoint_has_no_backends() {
    let s = slice("svc-a").ep(Ep::new("10.0.2.1").on("node2")).build();
    let r = run(&[svc().internal_local().build()], &[s]);
    assert!(
        r.backends(&tcp(VIP, 80)).is_empty(),
        "never falls back to remote endpoints"
    );
}

#[test]
fn cluster_policy_falls_back_only_when_no_endpoint_anywhere_is_ready() {
    // A ready remote endpoint wins over a serving-terminating local one.
    let s = slice("svc-a")
        .ep(Ep::new("10.0.1.2").on("node1").serving_terminating())
        .ep(Ep::new("10.0.2.1").on("node2"))
        .build();
    assert_eq!(backends(&[svc().build()], &[s]), ["10.0.2.1"]);
}

// ---- Session affinity -------------------------------------------------------------------------

#[test]
fn session_affinity_client_ip_sets_the_flag() {
    let s = slice("svc-a").ready(&["10.0.1.1"]).build();
    let r = run(&[svc().affinity().build()], std::slice::from_ref(&s));
    assert_eq!(
        r.frontend(&tcp(VIP, 80)).flags & SVC_F_AFFINITY,
        SVC_F_AFFINITY
    );
    let r = run(&[svc().build()], &[s]);
    assert_eq!(r.frontend(&tcp(VIP, 80)).flags, 0);
}

// ---- Maglev table size ------------------------------------------------------------------------

fn table_size(r: &Run) -> u32 {
    r.group(&tcp(VIP, 80)).table_size
}

/// `svc` with an external IP: its table is read by XDP, so every node must size it alike.
fn external(s: Svc) -> Service {
    let mut svc = s.build();
    if let Some(spec) = svc.spec.as_mut() {
        spec.external_ips = Some(vec!["192.168.99.10".to_string()]);
    }
    svc
}

#[test]
fn maglev_table_size_annotation() {
    let s = slice("svc-a").ready(&["10.0.1.1", "10.0.1.2"]).build();
    let with = |v: &str, ext: bool| {
        let svc = svc().annotate(ANNOTATION_MAGLEV_SIZE, v);
        let svc = if ext { external(svc) } else { svc.build() };
        run(&[svc], std::slice::from_ref(&s))
    };

    // A supported prime is used as it is, with external frontends or without.
    for ext in [false, true] {
        let r = with("4093", ext);
        assert_eq!(table_size(&r), 4093);
        assert!(r.warnings.is_empty(), "{:#?}", r.warnings);
    }

    // Anything else falls back to the default size, with a warning naming the service: the
    // global size for a table XDP reads, ~100 slots per backend for one only sockets read.
    for bad in ["4096", "4091", "0", "1", "-7", "big", ""] {
        for (ext, want) in [(true, DEFAULT_TABLE_SIZE), (false, 251)] {
            let r = with(bad, ext);
            assert_eq!(table_size(&r), want, "annotation {bad:?}, external {ext}");
            assert_eq!(r.warnings.len(), 1, "annotation {bad:?}: {:#?}", r.warnings);
            assert!(r.warnings[0].contains("svc"), "{:?}", r.warnings);
        }
    }

    // No annotation: with external frontends, the global size, whatever it is.
    let small_global = lb_agent::model::NodeConfig {
        maglev_table_size: 1021,
        ..node(NODE)
    };
    let r = run_objects(&[external(svc())], std::slice::from_ref(&s), &small_global);
    assert_eq!(table_size(&r), 1021);
    // Without: sized to the backends, never above the global size.
    let r = run_objects(&[svc().build()], &[many(30)], &node(NODE));
    assert_eq!(table_size(&r), 4093, "> 100 slots for each of 30 backends");
    let r = run_objects(&[svc().build()], &[many(30)], &small_global);
    assert_eq!(table_size(&r), 1021);
}

#[test]
fn socket_only_tables_follow_the_backend_count_under_one_group() {
    let sizes: Vec<(usize, u32)> = [1, 2, 3, 5, 10, 11, 40, 200]
        .into_iter()
        .map(|n| (n, table_size(&run(&[svc().build()], &[many(n)]))))
        .collect();
    assert_eq!(
        sizes,
        [
            (1, 251),
            (2, 251),
            (3, 509),
            (5, 509),
            (10, 1021),
            (11, 2039),
            (40, 4093),
            (200, 16381)
        ]
    );
    // The group (and so its id, affinity pins and counters) is the same whatever the size.
    let a = run(&[svc().build()], &[many(2)]);
    let b = run(&[svc().build()], &[many(40)]);
    assert_eq!(
        a.frontend(&tcp(VIP, 80)).group,
        b.frontend(&tcp(VIP, 80)).group
    );
}

fn many(n: usize) -> EndpointSlice {
    let addrs: Vec<String> = (0..n)
        .map(|i| format!("10.0.{}.{}", 100 + i / 250, 1 + i % 250))
        .collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    slice("svc-a").ready(&refs).build()
}

#[test]
fn more_backends_than_the_table_gets_a_bigger_supported_prime() {
    let r = run(
        &[svc().annotate(ANNOTATION_MAGLEV_SIZE, "251").build()],
        &[many(300)],
    );
    assert_eq!(r.backends(&tcp(VIP, 80)).len(), 300);
    assert_eq!(table_size(&r), 509);
    assert_eq!(r.warnings.len(), 1, "{:#?}", r.warnings);
    assert!(
        r.warnings[0].contains("default/svc") && r.warnings[0].contains("300"),
        "{:?}",
        r.warnings
    );

    // Exactly as many backends as slots does not fit either (Maglev needs M > N).
    let r = run(
        &[svc().annotate(ANNOTATION_MAGLEV_SIZE, "251").build()],
        &[many(251)],
    );
    assert_eq!(table_size(&r), 509);
    let r = run(
        &[svc().annotate(ANNOTATION_MAGLEV_SIZE, "251").build()],
        &[many(250)],
    );
    assert_eq!(table_size(&r), 251);

    // The same through the global size.
    let small = lb_agent::model::NodeConfig {
        maglev_table_size: 251,
        ..node(NODE)
    };
    let r = run_objects(&[svc().build()], &[many(300)], &small);
    assert_eq!(table_size(&r), 509);
    assert_eq!(r.warnings.len(), 1, "{:#?}", r.warnings);
}
