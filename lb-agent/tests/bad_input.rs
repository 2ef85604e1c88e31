//! Bad input: every invalid object is reported with its name and the reason, skipped, and
//! changes nothing else (the other services' desired state is identical with and without it).

mod common;

use common::*;
use lb_agent::standalone;

/// Good services (IPv4, IPv6 and dual-stack) the bad objects are added to.
fn baseline() -> String {
    join(&[&fixture("clusterip.yaml"), &fixture("dualstack.yaml")])
}

/// Adds `bad` to the baseline and checks: the desired state is unchanged, and exactly the
/// warnings `expect` were added, each naming the object and giving the reason.
fn assert_skipped(bad: &str, expect: &[(&str, &str)]) {
    let base = run_yaml(&baseline(), &node(NODE));
    let with = run_yaml(&join(&[&baseline(), bad]), &node(NODE));
    assert_eq!(
        with.desired, base.desired,
        "bad object changed the desired state:\n{bad}"
    );
    let new: Vec<&String> = with
        .warnings
        .iter()
        .filter(|w| !base.warnings.contains(w))
        .collect();
    assert_eq!(
        new.len(),
        expect.len(),
        "warnings {new:#?}, expected {expect:?}"
    );
    for (warning, (object, reason)) in new.iter().zip(expect) {
        assert!(
            warning.contains(object) && warning.contains(reason),
            "warning {warning:?} should name {object:?} and say {reason:?}"
        );
    }
}

fn service(name: &str, cluster_ip: &str, port: &str, protocol: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: \"{cluster_ip}\"\n  ports:\n  - {{port: {port}, protocol: {protocol}}}\n"
    )
}

/// A valid slice for `service` (so a service that is skipped really had endpoints).
fn slice(name: &str, service: &str, port: &str, addrs: &[&str]) -> String {
    let eps: String = addrs
        .iter()
        .map(|a| format!("- addresses: [\"{a}\"]\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\n\
         addressType: IPv4\nports:\n- {{port: {port}}}\nendpoints:\n{eps}"
    )
}

fn service_with_slice(name: &str, cluster_ip: &str, port: &str, protocol: &str) -> String {
    join(&[
        &service(name, cluster_ip, port, protocol),
        &slice(&format!("{name}-1"), name, "8080", &["10.0.1.99"]),
    ])
}

#[test]
fn bad_cluster_ip() {
    for ip in [
        "172.30.0.300",
        "not-an-ip",
        "172.30.0.0/24",
        "172.30.0.1:80",
    ] {
        assert_skipped(
            &service_with_slice("bad-ip", ip, "80", "TCP"),
            &[("Service default/bad-ip", "invalid IP address")],
        );
    }
}

#[test]
fn leading_zero_ipv4_is_refused_not_read_as_octal() {
    // CVE-2021-29923: "010.0.0.1" must never become 8.0.0.1 (or 10.0.0.1).
    assert_skipped(
        &service_with_slice("octal", "010.0.0.1", "80", "TCP"),
        &[("Service default/octal", "\"010.0.0.1\"")],
    );
    assert_skipped(
        &service_with_slice("octal2", "172.030.0.1", "80", "TCP"),
        &[("Service default/octal2", "invalid IP address")],
    );
    // In clusterIPs, externalIPs and endpoint addresses too.
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: octal3}\n\
               spec: {clusterIP: 172.30.0.91, clusterIPs: [172.030.0.91], ports: [{port: 80}]}";
    assert_skipped(svc, &[("Service default/octal3", "invalid IP address")]);
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: octal4}\n\
               spec: {clusterIP: 172.30.0.92, externalIPs: [192.168.099.1], ports: [{port: 80}]}";
    assert_skipped(svc, &[("Service default/octal4", "invalid IP address")]);
    assert_skipped(
        &slice("web-octal", "web", "8080", &["010.0.1.7"]),
        &[("EndpointSlice default/web-octal", "\"010.0.1.7\"")],
    );
    for text in ["010.0.0.1", "10.0.0.01", "0x0a.0.0.1", "10.1", "167772161"] {
        assert!(
            lb_agent::objects::parse_ip(text).is_err(),
            "{text} must be refused"
        );
    }
}

#[test]
fn port_out_of_range() {
    assert_skipped(
        &service_with_slice("port-zero", "172.30.0.93", "0", "TCP"),
        &[("Service default/port-zero", "invalid port 0")],
    );
    assert_skipped(
        &service_with_slice("port-big", "172.30.0.94", "70000", "TCP"),
        &[("Service default/port-big", "invalid port 70000")],
    );
    assert_skipped(
        &service_with_slice("port-neg", "172.30.0.95", "-1", "TCP"),
        &[("Service default/port-neg", "invalid port -1")],
    );
    // A bad slice of a good service: the slice goes, the service keeps its other slices.
    assert_skipped(
        &slice("web-bigport", "web", "70000", &["10.0.1.98"]),
        &[("EndpointSlice default/web-bigport", "invalid port 70000")],
    );
}

#[test]
fn unknown_protocol() {
    assert_skipped(
        &service_with_slice("icmp", "172.30.0.96", "80", "ICMP"),
        &[("Service default/icmp", "unknown protocol \"ICMP\"")],
    );
    assert_skipped(
        &service_with_slice("lower", "172.30.0.97", "80", "tcp"),
        &[("Service default/lower", "unknown protocol \"tcp\"")],
    );
    let bad_slice = slice("web-icmp", "web", "8080", &["10.0.1.97"]).replace(
        "ports:\n- {port: 8080}",
        "ports:\n- {port: 8080, protocol: ICMP}",
    );
    assert_skipped(
        &bad_slice,
        &[("EndpointSlice default/web-icmp", "unknown protocol")],
    );
}

#[test]
fn a_bad_copy_of_a_service_does_not_replace_the_good_one() {
    // Same name as the fixture's "web", in another file, with a bad clusterIP.
    assert_skipped(
        &service("web", "172.30.0.999", "80", "TCP"),
        &[("Service default/web", "invalid IP address")],
    );
}

#[test]
fn sctp_port_is_skipped_other_ports_kept() {
    let with_sctp = "apiVersion: v1\nkind: Service\nmetadata: {name: mixed}\n\
        spec:\n  clusterIP: 172.30.0.80\n  ports:\n\
        \x20 - {name: http, port: 80}\n\
        \x20 - {name: sig, port: 9999, protocol: SCTP}\n\
        \x20 - {name: dns, port: 53, protocol: UDP}\n";
    let without_sctp = with_sctp.replace("  - {name: sig, port: 9999, protocol: SCTP}\n", "");
    let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
        metadata: {name: mixed-1, labels: {kubernetes.io/service-name: mixed}}\n\
        addressType: IPv4\n\
        ports: [{name: http, port: 8080}, {name: sig, port: 9999, protocol: SCTP}, {name: dns, port: 53, protocol: UDP}]\n\
        endpoints: [{addresses: [10.0.1.80]}]\n";
    let a = run_yaml(&join(&[&baseline(), with_sctp, slice]), &node(NODE));
    let b = run_yaml(&join(&[&baseline(), &without_sctp, slice]), &node(NODE));
    assert_eq!(a.desired, b.desired);
    assert_eq!(
        a.backends(&tcp("172.30.0.80", 80)),
        eps(&[("10.0.1.80", 8080)])
    );
    assert_eq!(
        a.backends(&udp("172.30.0.80", 53)),
        eps(&[("10.0.1.80", 53)])
    );
    let w = a.warnings_about("Service default/mixed");
    assert_eq!(w.len(), 1, "{:#?}", a.warnings);
    assert!(w[0].contains("SCTP") && w[0].contains("9999"), "{w:?}");
    assert!(b.warnings_about("mixed").is_empty());
}

#[test]
fn syntax_error_fails_the_whole_text() {
    let mut problems = Vec::new();
    let broken = "apiVersion: v1\nkind: Service\nmetadata: {name: x\n";
    let err = standalone::parse_documents(broken, &mut problems).unwrap_err();
    assert!(err.contains("invalid YAML"), "{err}");
    let err = standalone::parse_documents(&join(&[&baseline(), broken]), &mut problems);
    assert!(err.is_err(), "a syntax error anywhere fails the stream");
    let err = standalone::parse_documents("a: [1, 2\n", &mut problems);
    assert!(err.is_err());
}

#[test]
fn schema_error_skips_only_that_object() {
    let cases = [
        // A port that is not a number.
        (
            "Service eighty",
            "apiVersion: v1\nkind: Service\nmetadata: {name: eighty}\nspec: {clusterIP: 172.30.0.81, ports: [{port: eighty}]}",
        ),
        // ports must be a list.
        (
            "Service scalar-ports",
            "apiVersion: v1\nkind: Service\nmetadata: {name: scalar-ports}\nspec: {clusterIP: 172.30.0.82, ports: 80}",
        ),
        // Wrong apiVersion for the kind.
        (
            "Service wrong-api",
            "apiVersion: v2\nkind: Service\nmetadata: {name: wrong-api}\nspec: {clusterIP: 172.30.0.83, ports: [{port: 80}]}",
        ),
        // addressType missing.
        (
            "default/no-type", // unknown addressType ""
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: no-type, labels: {kubernetes.io/service-name: web}}\nendpoints: [{addresses: [10.0.1.96]}]",
        ),
        // endpoints.addresses must be a list.
        (
            "EndpointSlice scalar-addr",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: scalar-addr, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: 10.0.1.96}]",
        ),
    ];
    for (object, doc) in cases {
        // Mid-stream, so documents before and after it are kept.
        let text = join(&[&fixture("clusterip.yaml"), doc, &fixture("dualstack.yaml")]);
        assert_skipped_text(&text, object);
    }
}

fn assert_skipped_text(text: &str, object: &str) {
    let base = run_yaml(&baseline(), &node(NODE));
    let with = run_yaml(text, &node(NODE));
    assert_eq!(with.desired, base.desired, "{object}");
    let new: Vec<&String> = with
        .warnings
        .iter()
        .filter(|w| !base.warnings.contains(w))
        .collect();
    assert_eq!(new.len(), 1, "{object}: {new:#?}");
    assert!(new[0].contains(object), "{new:?} should name {object}");
}

#[test]
fn forbidden_backend_addresses_are_dropped() {
    let forbidden_v4 = [
        "127.0.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
    ];
    let mut addrs: Vec<&str> = forbidden_v4.to_vec();
    addrs.push("10.0.2.1"); // already a web endpoint: its slice itself is fine
    let expect: Vec<(&str, &str)> = forbidden_v4
        .iter()
        .map(|a| ("EndpointSlice default/web-evil", *a))
        .collect();
    assert_skipped(&slice("web-evil", "web", "8080", &addrs), &expect);

    let forbidden_v6 = ["::1", "fe80::1", "::", "ff02::1", "::ffff:10.0.1.1"];
    let eps: String = forbidden_v6
        .iter()
        .map(|a| format!("- addresses: [\"{a}\"]\n"))
        .collect();
    let v6_slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: v6-evil, labels: {{kubernetes.io/service-name: v6}}}}\n\
         addressType: IPv6\nports: [{{name: http, port: 8080}}]\nendpoints:\n{eps}"
    );
    let expect: Vec<(&str, &str)> = forbidden_v6
        .iter()
        .map(|_| ("EndpointSlice default/v6-evil", "may not be a backend"))
        .collect();
    assert_skipped(&v6_slice, &expect);
}

#[test]
fn forbidden_addresses_are_never_backends_even_alone() {
    // Without any good endpoint the service still exists, with no backends (reject), rather
    // than sending traffic to the node itself or to the metadata server.
    let text = join(&[
        &service("meta", "172.30.0.84", "80", "TCP"),
        &slice("meta-1", "meta", "80", &["169.254.169.254", "127.0.0.1"]),
    ]);
    let run = run_yaml(&text, &node(NODE));
    assert!(run.backends(&tcp("172.30.0.84", 80)).is_empty());
    assert_eq!(
        run.warnings_about("EndpointSlice default/meta-1").len(),
        2,
        "{:#?}",
        run.warnings
    );
}

#[test]
fn endpoint_family_must_match_address_type() {
    let wrong_family = slice("web-mixed", "web", "8080", &["fd00:10:1::99"]);
    assert_skipped(
        &wrong_family,
        &[(
            "EndpointSlice default/web-mixed",
            "does not match addressType IPv4",
        )],
    );
    let v4_in_v6 = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
        metadata: {name: v6-mixed, labels: {kubernetes.io/service-name: v6}}\n\
        addressType: IPv6\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.0.1.99]}]\n";
    assert_skipped(
        v4_in_v6,
        &[(
            "EndpointSlice default/v6-mixed",
            "does not match addressType IPv6",
        )],
    );
}

#[test]
fn slice_without_service_label_is_skipped() {
    let unlabelled = slice("loose", "web", "8080", &["10.0.1.95"])
        .replace("  labels: {kubernetes.io/service-name: web}\n", "");
    assert_skipped(
        &unlabelled,
        &[("EndpointSlice default/loose", "kubernetes.io/service-name")],
    );
}

#[test]
fn object_without_a_name_is_skipped() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {namespace: default}\n\
                spec: {clusterIP: 172.30.0.85, ports: [{port: 80}]}";
    assert_skipped(
        text,
        &[("Service default/<unnamed>", "missing metadata.name")],
    );
}

#[test]
fn unknown_address_type_is_reported() {
    let text = slice("web-v5", "web", "8080", &["10.0.1.94"])
        .replace("addressType: IPv4", "addressType: IPv5");
    assert_skipped(
        &text,
        &[(
            "EndpointSlice default/web-v5",
            "unknown addressType \"IPv5\"",
        )],
    );
}
