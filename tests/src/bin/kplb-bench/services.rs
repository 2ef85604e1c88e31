//! The synthetic cluster every dataplane is built from: `n` ClusterIP Services of one TCP port
//! (80 -> 8080) with 10 endpoints each. The measured Service is the last one (`n - 1`), the one a
//! linear rule walk reaches last; its endpoints are the 10 netexec pods of the lab node that
//! serves it. Every other endpoint is an address in 10.128.0.0/9 that nothing answers (never
//! connected to), distinct up to [`ENDPOINT_POOL`] addresses: 30k services × 10 endpoints reuse
//! some (Kubernetes' tested limit is 150k pods per cluster, so they would share pods anyway, and
//! kplb's backend map holds 262,144 entries).

use std::{fmt::Write as _, fs, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};
use lb_tests::manifests::{Endpoint, EndpointSlice, Port, Protocol, Service};

pub const PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
pub const ENDPOINTS: usize = 10;
/// Distinct dummy endpoint addresses.
pub const ENDPOINT_POOL: usize = 200_000;

/// ClusterIP of service `i`: the (i+1)-th address of 172.30.0.0/15 (room for 131,071).
pub fn vip(i: usize) -> Ipv4Addr {
    assert!(
        i < 0x1_ffff,
        "service {i} has no ClusterIP in 172.30.0.0/15"
    );
    Ipv4Addr::from(0xac1e_0000 + i as u32 + 1)
}

/// The real backend pods of lab node `node`: 10.0.K.10 .. 10.0.K.19 (the node's pod CIDR).
pub fn pod_ip(node: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, node as u8, 10 + j as u8)
}

/// Endpoint `j` of filler service `i`: an address nothing answers, never connected to.
pub fn dummy_endpoint(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a80_0000 + ((i * ENDPOINTS + j) % ENDPOINT_POOL) as u32)
}

pub fn name(i: usize) -> String {
    format!("svc-{i}")
}

/// `services` Services as lab node `node` sees them: the measured (last) one's endpoints are
/// that node's pods, so several nodes can each serve the same cluster to their own client.
#[derive(Clone, Copy, Debug)]
pub struct Cluster {
    pub services: usize,
    pub node: usize,
}

impl Cluster {
    pub fn measured(&self) -> usize {
        self.services - 1
    }

    /// The EndpointSlices' `nodeName` (the agent's `--node-name`).
    pub fn node_name(&self) -> String {
        format!("node{}", self.node)
    }

    /// Endpoint `j` of service `i`.
    pub fn endpoint(&self, i: usize, j: usize) -> Ipv4Addr {
        if i == self.measured() {
            pod_ip(self.node, j)
        } else {
            dummy_endpoint(i, j)
        }
    }

    /// Service `i` and its EndpointSlice with the first `endpoints` endpoints, as compact JSON
    /// documents (JSON is YAML; the agent reads multi-document files).
    pub fn documents(&self, i: usize, endpoints: usize, out: &mut String) -> Result<()> {
        let svc_name = name(i);
        let node = self.node_name();
        let svc = Service::new(&svc_name)
            .cluster_ip(&vip(i).to_string())
            .port(Port::tcp(PORT, TARGET_PORT).named("http"))
            .to_json();
        let slice = (0..endpoints).fold(
            EndpointSlice::new(&format!("{svc_name}-1"), &svc_name).port(
                Some("http"),
                Protocol::Tcp,
                TARGET_PORT,
            ),
            |s, j| s.endpoint(Endpoint::ready_on(&self.endpoint(i, j).to_string(), &node)),
        );
        for doc in [svc, slice.to_json()] {
            out.push_str("---\n");
            out.push_str(&serde_json::to_string(&doc).context("serializing a manifest")?);
            out.push('\n');
        }
        Ok(())
    }

    /// The agent's manifest directory: the measured Service alone in `measured.yaml` (a
    /// change rewrites a small file, as one EndpointSlice update would arrive), the rest in
    /// `bulk.yaml`.
    pub fn write_manifests(&self, dir: &Path) -> Result<()> {
        self.write_manifest(dir, "bulk.yaml", 0..self.measured())?;
        self.write_manifest(dir, "measured.yaml", self.measured()..self.services)
    }

    /// Writes services `range` (each with all 10 endpoints) to `dir/file`, atomically.
    fn write_manifest(&self, dir: &Path, file: &str, range: std::ops::Range<usize>) -> Result<()> {
        let mut text = String::with_capacity(range.len() * 1200);
        for i in range {
            self.documents(i, ENDPOINTS, &mut text)?;
        }
        write_atomic(dir, file, &text)
    }
}

/// Writes `dir/file` through a dot-file renamed into place, so the agent never reads half a
/// file.
pub fn write_atomic(dir: &Path, file: &str, text: &str) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{file}.tmp"));
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, dir.join(file)).with_context(|| format!("renaming {}", tmp.display()))
}

/// kube-proxy names its chains with a 16-character base32 hash of the service port (and
/// endpoint); this is the same shape from FNV-1a (the exact hash does not matter, only that
/// names have the real length and are unique).
pub fn chain_hash(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut h2 = h.rotate_left(29).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = String::with_capacity(16);
    for k in 0..16 {
        let v = if k < 12 { h } else { h2 };
        let _ = out.write_char(ALPHABET[(v & 31) as usize] as char);
        if k < 12 {
            h >>= 5;
        } else {
            h2 >>= 5;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(vip(0), Ipv4Addr::new(172, 30, 0, 1));
        assert_eq!(vip(29_999), Ipv4Addr::new(172, 30, 117, 48));
        assert_eq!(vip(99_999), Ipv4Addr::new(172, 31, 134, 160));
        let c = Cluster {
            services: 3,
            node: 2,
        };
        assert_eq!(c.endpoint(2, 4), Ipv4Addr::new(10, 0, 2, 14));
        assert_eq!(c.endpoint(1, 0), Ipv4Addr::new(10, 128, 0, 10));
        assert_eq!(chain_hash("a").len(), 16);
        assert_ne!(chain_hash("a"), chain_hash("b"));
    }

    #[test]
    fn the_measured_service_is_served_by_its_nodes_pods() {
        let c = Cluster {
            services: 2,
            node: 3,
        };
        let mut text = String::new();
        c.documents(1, 9, &mut text).unwrap();
        assert!(text.contains("\"10.0.3.18\""));
        assert!(!text.contains("\"10.0.3.19\""));
        assert!(text.contains("\"nodeName\":\"node3\""));
    }
}
