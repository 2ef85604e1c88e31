//! One address form for both families: 16 bytes in network order, IPv4 as IPv4-mapped IPv6
//! (`::ffff:a.b.c.d`). Words are the raw bytes reinterpreted in host order, which is exactly what
//! the kernel's `user_ip4` / `user_ip6[]` context fields hold.

/// The third word of an IPv4-mapped address (`00 00 ff ff`).
pub const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `user_ip4` (network order, as read from the context) to the shared 16-byte form.
#[inline(always)]
pub const fn from_v4_word(ip: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_PREFIX, ip]
}

/// The IPv4 word of a mapped address, if it is one.
#[inline(always)]
pub const fn to_v4_word(addr: &[u32; 4]) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_PREFIX {
        Some(addr[3])
    } else {
        None
    }
}

#[cfg(any(test, feature = "std"))]
mod std_conv {
    use std::net::{IpAddr, Ipv6Addr};

    /// Host address to the map form.
    pub fn from_ip(ip: IpAddr) -> [u32; 4] {
        let octets = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let mut words = [0u32; 4];
        for (w, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
            *w = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        words
    }

    /// Map form back to a host address (IPv4-mapped becomes IPv4).
    pub fn to_ip(addr: &[u32; 4]) -> IpAddr {
        let mut octets = [0u8; 16];
        for (chunk, w) in octets.chunks_exact_mut(4).zip(addr) {
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        let v6 = Ipv6Addr::from(octets);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

#[cfg(any(test, feature = "std"))]
pub use std_conv::{from_ip, to_ip};

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn v4_round_trip_matches_kernel_word() {
        let ip: IpAddr = "172.30.0.10".parse().unwrap();
        let a = from_ip(ip);
        // The kernel's user_ip4 is the address bytes in memory order.
        assert_eq!(a, from_v4_word(u32::from_ne_bytes([172, 30, 0, 10])));
        assert_eq!(to_ip(&a), ip);
        assert_eq!(to_v4_word(&a), Some(u32::from_ne_bytes([172, 30, 0, 10])));
    }

    #[test]
    fn v6_round_trip() {
        let ip: IpAddr = "fd00:172:30::a".parse().unwrap();
        let a = from_ip(ip);
        assert_eq!(to_ip(&a), ip);
        assert_eq!(to_v4_word(&a), None);
    }
}
