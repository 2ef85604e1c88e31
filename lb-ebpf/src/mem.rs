//! Zeroing without `memset`. bpf-linker has LLVM expand only `memcpy` inline
//! (`--bpf-expand-memcpy-in-order`): the `memset` that zeroing 16 or more bytes turns into
//! (`mem::zeroed`, `[0; N]`, a struct literal of mostly zeros) becomes a call to an out-of-line
//! byte loop, tens of nanoseconds for a conntrack value. Volatile word stores are never merged
//! back into one.

use core::mem::MaybeUninit;

/// Sets every byte of `*dst` to zero, one 4-byte word at a time.
///
/// # Safety
/// `dst` is valid for writes, and all-zero bytes are a valid `T` (as for `mem::zeroed`).
#[inline(always)]
pub unsafe fn zero<T>(dst: *mut T) {
    const {
        assert!(size_of::<T>().is_multiple_of(4) && align_of::<T>() >= 4);
    }
    let w = dst.cast::<u32>();
    let mut i = 0;
    while i < size_of::<T>() / 4 {
        // SAFETY: in bounds of `*dst` and aligned (asserted above).
        unsafe { w.add(i).write_volatile(0) };
        i += 1;
    }
}

/// Zeroes `slot` in place and returns it (see [`zero`]; returning the value instead would copy
/// it, and LLVM turns a copy of known zeros back into `memset`).
///
/// # Safety
/// All-zero bytes are a valid `T`.
#[inline(always)]
pub unsafe fn zeroed_in<T>(slot: &mut MaybeUninit<T>) -> &mut T {
    // SAFETY: the slot is ours to write; the caller vouches for the value.
    unsafe {
        zero(slot.as_mut_ptr());
        slot.assume_init_mut()
    }
}
