//! Socket-level load balancing on cgroup v2 hooks.
//!
//! connect/sendmsg rewrite `frontend:port` to `backend:targetPort` once per connection (or per
//! unconnected UDP send) and remember the frontend per socket; recvmsg/getpeername put the
//! frontend back so the application never sees the backend address.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_ns,
        generated::{bpf_get_netns_cookie, bpf_set_retval},
    },
    programs::SockAddrContext,
};
use lb_common::{
    AFFINITY_NETNS, AffinityKey, IPPROTO_UDP, RevSkKey, RevSkVal, SCOPE_INTERNAL, SkFrontend,
    SvcKey, SvcVal, addr, hash::socket_hash, types::counter,
};

use crate::{
    affinity,
    maps::{REV_SK, SK_FRONTEND, account, count},
    select::{Pick, lookup, pick},
};

/// Verdicts of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Which hook translates: `connect()` fixes the socket's peer (remembered in the socket's own
/// storage), `sendmsg()` translates one datagram of an unconnected UDP socket (remembered per
/// socket and backend in `KPLB_REV_SK`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect,
    Sendmsg,
}

#[inline(always)]
fn read_addr(sa: *const bpf_sock_addr, family: Family) -> [u32; 4] {
    // SAFETY: `sa` is the program context; the verifier permits 4-byte loads of these fields.
    unsafe {
        match family {
            Family::V4 => addr::from_v4_word((*sa).user_ip4),
            Family::V6 => [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
        }
    }
}

/// Writes `a` as the destination. A v4 hook can only take an IPv4 backend; returns false if the
/// backend's family does not fit (never write a mangled address).
#[inline(always)]
fn write_addr(sa: *mut bpf_sock_addr, family: Family, a: &[u32; 4], port: u16) -> bool {
    // SAFETY: context stores the verifier allows for these hooks.
    unsafe {
        match family {
            Family::V4 => match addr::to_v4_word(a) {
                Some(w) => (*sa).user_ip4 = w,
                None => return false,
            },
            Family::V6 => {
                (*sa).user_ip6[0] = a[0];
                (*sa).user_ip6[1] = a[1];
                (*sa).user_ip6[2] = a[2];
                (*sa).user_ip6[3] = a[3];
            }
        }
        (*sa).user_port = u32::from(port);
    }
    true
}

/// Frontend key of the destination the application asked for; `None` for non-TCP/UDP sockets.
#[inline(always)]
fn dest_key(sa: *const bpf_sock_addr, family: Family) -> Option<SvcKey> {
    // SAFETY: context loads.
    let (proto, port) = unsafe { ((*sa).protocol, (*sa).user_port) };
    let proto = match proto {
        6 | 17 => proto as u8,
        _ => return None,
    };
    Some(SvcKey {
        addr: read_addr(sa, family),
        port: port as u16,
        proto,
        scope: SCOPE_INTERNAL,
    })
}

/// A socket connected again, to something that is not translated, must not keep showing the
/// frontend of its previous connection.
#[inline(always)]
fn forget_connection(ctx: &SockAddrContext, hook: Hook) {
    if hook != Hook::Connect {
        return;
    }
    // SAFETY: the helper reads the context's socket; the pointer is checked before use.
    let p = unsafe { SK_FRONTEND.get_ptr_mut(ctx) };
    if !p.is_null() {
        // SAFETY: non-null storage of this socket.
        unsafe { (*p).backend_port = 0 };
    }
}

/// connect4/6 and sendmsg4/6: translate a frontend to a backend.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, family: Family, hook: Hook) -> i32 {
    let sa = ctx.sock_addr;
    let Some(key) = dest_key(sa, family) else {
        return ALLOW;
    };
    let Some(svc) = lookup(&key) else {
        forget_connection(ctx, hook);
        return ALLOW;
    };
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let choice = if svc.affinity_timeout != 0 {
        sticky_pick(ctx, &svc, cookie)
    } else {
        pick(&svc, socket_hash(cookie))
    };
    match choice {
        Pick::Miss => {
            count(counter::SOCK_MISS);
            forget_connection(ctx, hook);
            ALLOW
        }
        Pick::NoBackends => {
            count(counter::SOCK_REJECT);
            // kube-proxy REJECTs: the caller gets ECONNREFUSED instead of a timeout.
            // SAFETY: helper valid for connect/sendmsg hooks.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
        Pick::Backend(_, b) => {
            if !write_addr(sa, family, &b.addr, b.port) {
                count(counter::SOCK_MISS);
                forget_connection(ctx, hook);
                return ALLOW;
            }
            let remembered =
                hook == Hook::Connect && remember_connection(ctx, &key, &b.addr, b.port);
            // UDP replies are matched in KPLB_REV_SK (unconnected sockets, and connected ones
            // whose storage could not be allocated). A failed insert or allocation only loses
            // the reverse mapping (the peer shows the backend address); the traffic still flows.
            if !remembered && key.proto == IPPROTO_UDP {
                let rev_key = RevSkKey {
                    cookie,
                    addr: b.addr,
                    port: b.port,
                    _pad: [0; 6],
                };
                let rev = RevSkVal {
                    addr: key.addr,
                    port: key.port,
                    _pad: [0; 2],
                };
                let _ = REV_SK.insert(rev_key, rev, 0);
            }
            count(counter::SOCK_XLATE);
            account(svc.group_id, 0, 0, 1);
            ALLOW
        }
    }
}

/// Records a connected socket's translation in its own storage; false if none could be
/// allocated.
#[inline(always)]
fn remember_connection(ctx: &SockAddrContext, key: &SvcKey, backend: &[u32; 4], port: u16) -> bool {
    // SAFETY: the helper reads the context's socket and creates its storage (zeroed).
    let p = unsafe { SK_FRONTEND.get_or_insert_ptr_mut(ctx, None) };
    if p.is_null() {
        return false;
    }
    let v = SkFrontend {
        frontend: key.addr,
        backend: *backend,
        frontend_port: key.port,
        backend_port: port,
        _pad: [0; 4],
    };
    // SAFETY: non-null storage of this socket, written only by this socket's own hooks.
    unsafe { *p = v };
    true
}

/// sessionAffinity: ClientIP. A pod is one network namespace, so its netns cookie identifies
/// the client: within the timeout of its last connection it gets the same backend; otherwise a
/// per-socket Maglev pick (like kube-proxy's random first pick) is made and remembered.
#[inline(always)]
fn sticky_pick(ctx: &SockAddrContext, svc: &SvcVal, cookie: u64) -> Pick {
    if svc.backend_count == 0 {
        return Pick::NoBackends;
    }
    // SAFETY: helpers valid for sock_addr programs.
    let (netns, now) = unsafe { (bpf_get_netns_cookie(ctx.as_ptr()), bpf_ktime_get_ns()) };
    let key = AffinityKey {
        client: [netns as u32, (netns >> 32) as u32, 0, 0],
        group_id: svc.group_id,
        kind: AFFINITY_NETNS,
    };
    if let Some((id, b)) = affinity::sticky(&key, svc.affinity_timeout, now) {
        return Pick::Backend(id, b);
    }
    let p = pick(svc, socket_hash(cookie));
    if let Pick::Backend(id, _) = p {
        affinity::remember(&key, id, now);
    }
    p
}

/// recvmsg4/6 and getpeername4/6: show the frontend the application addressed.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, family: Family) -> i32 {
    let sa = ctx.sock_addr;
    let addr = read_addr(sa, family);
    // SAFETY: context loads.
    let (port, proto) = unsafe { ((*sa).user_port as u16, (*sa).protocol) };
    // A connected socket's peer: its own storage (most sockets have none: one pointer read).
    // SAFETY: the helper reads the context's socket; the pointer is checked before use.
    let p = unsafe { SK_FRONTEND.get_ptr_mut(ctx) };
    if !p.is_null() {
        // SAFETY: non-null storage of this socket.
        let fe = unsafe { *p };
        if fe.backend_port == port
            && fe.backend == addr
            && write_addr(sa, family, &fe.frontend, fe.frontend_port)
        {
            count(counter::SOCK_REV_XLATE);
            return ALLOW;
        }
    }
    // Only UDP sends to a service without connecting (TCP always connects first).
    if proto != u32::from(IPPROTO_UDP) {
        return ALLOW;
    }
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = RevSkKey {
        cookie,
        addr,
        port,
        _pad: [0; 6],
    };
    // SAFETY: copied out immediately.
    if let Some(rev) = unsafe { REV_SK.get(key) }.copied()
        && write_addr(sa, family, &rev.addr, rev.port)
    {
        count(counter::SOCK_REV_XLATE);
    }
    // These hooks must always return 1.
    ALLOW
}
