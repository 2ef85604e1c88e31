//! Incremental Internet checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')). Words are the raw
//! packet bytes read in host order; the one's complement sum does not depend on byte order as
//! long as the checksum field is read and written the same way.

/// Accumulates `~old + new` for every 16-bit word that changes.
#[derive(Clone, Copy)]
pub struct Diff(u64);

impl Diff {
    #[inline(always)]
    pub const fn new() -> Self {
        Self(0)
    }

    #[inline(always)]
    pub fn word(&mut self, old: u16, new: u16) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    #[inline(always)]
    pub fn word32(&mut self, old: u32, new: u32) {
        self.word(old as u16, new as u16);
        self.word((old >> 16) as u16, (new >> 16) as u16);
    }

    /// An address change: only the IPv4 word for v4 (mapped) addresses.
    #[inline(always)]
    pub fn addr(&mut self, old: &[u32; 4], new: &[u32; 4], v6: bool) {
        if v6 {
            self.word32(old[0], new[0]);
            self.word32(old[1], new[1]);
            self.word32(old[2], new[2]);
        }
        self.word32(old[3], new[3]);
    }

    /// The updated checksum field.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        !fold(u64::from(!check) + self.0)
    }
}

/// Folds a 64-bit one's complement sum to 16 bits.
#[inline(always)]
pub fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Sum of `N` 16-bit words at `p` (bounds already checked by the caller).
#[inline(always)]
pub fn sum_words<const N: usize>(p: *const u8) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i < N {
        // SAFETY: the caller checked that 2*N bytes at p are in the packet.
        s += u64::from(unsafe { (p.add(i * 2) as *const u16).read_unaligned() });
        i += 1;
    }
    s
}

/// Sum of an address as it sits in a pseudo header (4 bytes for v4, 16 for v6).
#[inline(always)]
pub fn sum_addr(a: &[u32; 4], v6: bool) -> u64 {
    let w = |x: u32| u64::from(x as u16) + u64::from((x >> 16) as u16);
    if v6 {
        w(a[0]) + w(a[1]) + w(a[2]) + w(a[3])
    } else {
        w(a[3])
    }
}
