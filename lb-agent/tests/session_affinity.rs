//! sessionAffinity: ClientIP and its timeout (`sessionAffinityConfig.clientIP.timeoutSeconds`),
//! exposed on every frontend of the service for the datapath.

mod common;

use common::*;
use k8s_openapi::api::core::v1::{ClientIPConfig, SessionAffinityConfig};
use lb_agent::objects::{DEFAULT_AFFINITY_TIMEOUT_S, MAX_AFFINITY_TIMEOUT_S};
use lb_common::SVC_F_AFFINITY;

const VIP: &str = "172.30.0.10";
const VIP6: &str = "fd00:172:30::10";

fn svc() -> Svc {
    Svc::new("svc", &format!("{VIP},{VIP6}"))
        .port("http", "TCP", 80)
        .port("dns", "UDP", 53)
}

fn with_timeout(s: Svc, seconds: Option<i32>) -> Svc {
    let mut s = s.affinity();
    s.0.spec.as_mut().unwrap().session_affinity_config = Some(SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: seconds,
        }),
    });
    s
}

/// `(flags, timeout)` of every frontend of the service.
fn frontends(s: Svc) -> Vec<(u32, u32)> {
    let r = run_objects(&[s.build()], &[], &node(NODE));
    assert!(r.warnings.is_empty(), "{:#?}", r.warnings);
    assert_eq!(r.desired.frontends.len(), 4, "2 ports x 2 families");
    r.desired
        .frontends
        .values()
        .map(|f| (f.flags, f.affinity_timeout_s))
        .collect()
}

#[test]
fn client_ip_affinity_defaults_to_three_hours() {
    assert_eq!(DEFAULT_AFFINITY_TIMEOUT_S, 10_800);
    for s in [svc().affinity(), with_timeout(svc(), None)] {
        assert!(
            frontends(s)
                .iter()
                .all(|f| *f == (SVC_F_AFFINITY, DEFAULT_AFFINITY_TIMEOUT_S))
        );
    }
}

#[test]
fn an_explicit_timeout_reaches_every_frontend() {
    for t in [1, 60, MAX_AFFINITY_TIMEOUT_S as i32] {
        let got = frontends(with_timeout(svc(), Some(t)));
        assert!(
            got.iter().all(|f| *f == (SVC_F_AFFINITY, t as u32)),
            "{t}: {got:?}"
        );
    }
}

#[test]
fn without_affinity_there_is_no_timeout() {
    assert!(frontends(svc()).iter().all(|f| *f == (0, 0)));
    // A config without ClientIP affinity is ignored, as kube-proxy does.
    let mut s = svc();
    s.0.spec.as_mut().unwrap().session_affinity_config = Some(SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: Some(60),
        }),
    });
    assert!(frontends(s).iter().all(|f| *f == (0, 0)));
}

#[test]
fn a_timeout_the_api_server_would_refuse_skips_the_service() {
    for bad in [0, -5, MAX_AFFINITY_TIMEOUT_S as i32 + 1] {
        let other = Svc::new("other", "172.30.0.11").port("", "TCP", 80);
        let r = run_objects(
            &[with_timeout(svc(), Some(bad)).build(), other.build()],
            &[],
            &node(NODE),
        );
        assert_eq!(
            r.desired.frontends.len(),
            1,
            "only the valid service: {bad}"
        );
        let w = r.warnings_about("timeoutSeconds");
        assert_eq!(w.len(), 1, "{bad}: {:#?}", r.warnings);
        assert!(
            w[0].contains("default/svc") && w[0].contains(&bad.to_string()),
            "{w:?}"
        );
    }
}
