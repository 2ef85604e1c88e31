//! kplb datapath programs. Entry points only; logic lives in the modules.
#![no_std]
#![no_main]

mod affinity;
mod csum;
mod ct;
mod dsr;
mod frag;
mod fwd;
mod icmp;
mod maps;
mod mem;
mod nat;
mod parse;
mod reject;
mod select;
mod sock;
mod tc;
mod xdp;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use sock::{Family, Hook, forward, reverse};

#[cgroup_sock_addr(connect4)]
pub fn kplb_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V4, Hook::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn kplb_connect6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V6, Hook::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn kplb_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V4, Hook::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn kplb_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V6, Hook::Sendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn kplb_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn kplb_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V6)
}

#[cgroup_sock_addr(getpeername4)]
pub fn kplb_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4)
}

#[cgroup_sock_addr(getpeername6)]
pub fn kplb_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V6)
}

/// NodePort / LoadBalancer / external IP frontends on `--interfaces`.
#[xdp]
pub fn kplb_xdp(ctx: XdpContext) -> u32 {
    xdp::run(&ctx)
}

/// Reverse translation of local backends' replies on `--interfaces` (tc egress).
#[classifier]
pub fn kplb_tc_egress(ctx: TcContext) -> i32 {
    tc::egress(&ctx)
}

/// Hands XDP-translated packets whose next hop needs neighbour resolution on (tc ingress).
#[classifier]
pub fn kplb_tc_ingress(ctx: TcContext) -> i32 {
    tc::ingress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: needed for GPL-only helpers (FIB lookup on the XDP path).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
