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
