//! Flow hashing shared by the datapath and by tests that predict its choices.

/// A 32-bit avalanche mix (murmur3's finalizer): consecutive socket cookies land on unrelated
/// Maglev slots.
#[inline(always)]
pub const fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Per-socket selection hash for connect-time load balancing.
#[inline(always)]
pub const fn socket_hash(cookie: u64) -> u32 {
    mix32((cookie as u32) ^ mix32((cookie >> 32) as u32))
}

/// Selection hash of a packet flow on the XDP path: the 5-tuple as it arrives (addresses in
/// the 16-byte form, ports in network order). Equal on every node (no per-node seed), so a flow
/// the upstream router re-hashes to another node still lands on the same backend.
/// With `affinity` (sessionAffinity: ClientIP) the client port is left out.
#[inline(always)]
pub const fn flow_hash(
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    affinity: bool,
) -> u32 {
    let mut h = mix32(src[0] ^ 0x9e37_79b9);
    h = mix32(h ^ src[1]);
    h = mix32(h ^ src[2]);
    h = mix32(h ^ src[3]);
    h = mix32(h ^ dst[0]);
    h = mix32(h ^ dst[1]);
    h = mix32(h ^ dst[2]);
    h = mix32(h ^ dst[3]);
    let sport = if affinity { 0 } else { sport as u32 };
    mix32(h ^ (sport << 16 | dport as u32) ^ ((proto as u32) << 24))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_cookies_spread() {
        // 3 backends on a 251-slot table: consecutive cookies should not map to one slot region.
        let slots: std::collections::BTreeSet<u32> =
            (1..64u64).map(|c| socket_hash(c) % 251).collect();
        assert!(slots.len() > 50, "poor spread: {}", slots.len());
    }
}
