//! Types shared by the kplb datapath (`lb-ebpf`, no_std) and the agent (`lb-agent`).
//!
//! Every map key and value is `#[repr(C)]`, has explicit padding and a compile-time size
//! assertion, so both sides agree byte for byte. Addresses and ports are stored in network byte
//! order exactly as the kernel hands them to the programs; userspace converts in [`addr`].
#![cfg_attr(not(any(test, feature = "std")), no_std)]

pub mod addr;
pub mod ct;
pub mod hash;
pub mod maps;
pub mod types;

#[cfg(any(test, feature = "std"))]
pub mod maglev;

pub use types::*;
