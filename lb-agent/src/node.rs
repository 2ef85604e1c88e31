//! This node's addresses and the datapath's runtime configuration derived from the flags.

use std::{ffi::CStr, net::IpAddr};

use lb_common::{
    addr,
    ct::{CFG_F_SVC_CIDR, Config, LB_MODE_DSR, LB_MODE_SNAT},
};

use crate::objects::{Invalid, parse_cidr};

/// Addresses of `interfaces` (link-local IPv6 left out: they are not NodePort addresses).
pub fn interface_addrs(interfaces: &[String]) -> std::io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: walking the list getifaddrs returned.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a C string for every entry.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if !interfaces.iter().any(|i| *i == name) {
            continue;
        }
        // SAFETY: the family says which sockaddr this is.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes()))
                }
                libc::AF_INET6 => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Some(IpAddr::from(sa.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        match ip {
            Some(IpAddr::V6(v6)) if v6.is_unicast_link_local() => {}
            Some(ip) => out.push(ip),
            None => {}
        }
    }
    // SAFETY: the list from getifaddrs above.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

/// Node IPs inside any of `cidrs` (all of them when `cidrs` is empty).
pub fn nodeport_ips(node_ips: &[IpAddr], cidrs: &[String]) -> Result<Vec<IpAddr>, Invalid> {
    if cidrs.is_empty() {
        return Ok(node_ips.to_vec());
    }
    let nets: Vec<(IpAddr, u8)> = cidrs
        .iter()
        .map(|c| parse_cidr(c))
        .collect::<Result<_, _>>()?;
    Ok(node_ips
        .iter()
        .copied()
        .filter(|ip| nets.iter().any(|(n, p)| contains(*n, *p, *ip)))
        .collect())
}

fn contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(n) & m == u32::from(i) & m
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(n) & m == u128::from(i) & m
        }
        _ => false,
    }
}

/// What [`config`] needs besides the node IPs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub service_cidrs: Vec<String>,
    pub snat_ports: (u16, u16),
    /// `--lb-mode dsr`: tunnel to remote backends' nodes (IPv4) instead of SNAT.
    pub dsr: bool,
}

/// Parses `lo-hi`.
pub fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.trim().split_once('-')?;
    let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a > 0 && a <= b).then_some((a, b))
}

/// The datapath's runtime configuration: SNAT addresses (the first node IP of each family),
/// service CIDRs, conntrack timeouts, SNAT ports.
pub fn config(node_ips: &[IpAddr], s: &Settings) -> Result<Config, Invalid> {
    let mut cfg = Config {
        timeout_syn_s: 60,
        timeout_established_s: 6 * 3600,
        timeout_closing_s: 10,
        timeout_udp_s: 60,
        snat_port_min: s.snat_ports.0,
        snat_port_max: s.snat_ports.1,
        lb_mode: if s.dsr { LB_MODE_DSR } else { LB_MODE_SNAT },
        ..Config::default()
    };
    if let Some(v4) = node_ips.iter().find(|i| i.is_ipv4()) {
        cfg.node_ip4 = addr::from_ip(*v4);
    }
    if let Some(v6) = node_ips.iter().find(|i| i.is_ipv6()) {
        cfg.node_ip6 = addr::from_ip(*v6);
    }
    for (i, c) in s.service_cidrs.iter().take(2).enumerate() {
        let (net, prefix) = parse_cidr(c)?;
        let bits = u32::from(prefix) + if net.is_ipv4() { 96 } else { 0 };
        let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
        cfg.svc_net[i] = addr::from_ip(net.to_canonical_v6_mapped());
        cfg.svc_mask[i] = addr::from_ip(IpAddr::V6(mask.into()));
        cfg.flags |= CFG_F_SVC_CIDR;
    }
    Ok(cfg)
}

trait Mapped {
    fn to_canonical_v6_mapped(self) -> IpAddr;
}

impl Mapped for IpAddr {
    fn to_canonical_v6_mapped(self) -> IpAddr {
        match self {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            v6 => v6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_cidr_mask_matches_mapped_addresses() {
        let s = Settings {
            service_cidrs: vec!["172.30.0.0/16".into()],
            snat_ports: (61001, 65535),
            dsr: false,
        };
        let cfg = config(&["192.168.0.2".parse().unwrap()], &s).unwrap();
        let a = addr::from_ip("172.30.9.9".parse().unwrap());
        let inside = (0..4).all(|i| a[i] & cfg.svc_mask[0][i] == cfg.svc_net[0][i]);
        assert!(inside);
        let b = addr::from_ip("172.31.0.1".parse().unwrap());
        assert!(!(0..4).all(|i| b[i] & cfg.svc_mask[0][i] == cfg.svc_net[0][i]));
        assert_eq!(cfg.node_ip4, addr::from_ip("192.168.0.2".parse().unwrap()));
    }

    #[test]
    fn nodeport_addresses_filter() {
        let ips: Vec<IpAddr> = vec!["192.168.0.2".parse().unwrap(), "10.9.0.1".parse().unwrap()];
        assert_eq!(
            nodeport_ips(&ips, &["192.168.0.0/24".into()]).unwrap(),
            vec![ips[0]]
        );
        assert_eq!(nodeport_ips(&ips, &[]).unwrap(), ips);
    }
}
