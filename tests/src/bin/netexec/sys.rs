//! Socket setup std cannot do (IPV6_V6ONLY off before bind) and errno names for reports.

use std::{
    io,
    mem::size_of,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    let len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` outlives the call and `len` is its size.
    check(unsafe { libc::setsockopt(fd, level, name, (&raw const value).cast(), len) }).map(|_| ())
}

/// A socket of type `ty` bound to `addr` with SO_REUSEADDR; IPv6 sockets also accept IPv4
/// (IPV6_V6ONLY off, whatever net.ipv6.bindv6only says).
fn bound(addr: SocketAddr, ty: libc::c_int) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd =
        unsafe { OwnedFd::from_raw_fd(check(libc::socket(family, ty | libc::SOCK_CLOEXEC, 0))?) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    set_int(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    // SAFETY: zeroed sockaddr_storage is a valid (empty) address.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            set_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: `storage` holds a valid address of `len` bytes.
    check(unsafe { libc::bind(raw, (&raw const storage).cast(), len as libc::socklen_t) })?;
    Ok(fd)
}

pub fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let fd = bound(addr, libc::SOCK_STREAM)?;
    // SAFETY: a bound stream socket.
    check(unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&fd), 1024) })?;
    Ok(TcpListener::from(fd))
}

pub fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    Ok(UdpSocket::from(bound(addr, libc::SOCK_DGRAM)?))
}

/// How an error is reported: the errno name, or `timeout_name` for timeouts (connect
/// timeouts read `ETIMEDOUT`, read timeouts `timeout`).
pub fn error_name(e: &io::Error, timeout_name: &str) -> String {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => timeout_name.to_owned(),
        Some(code) => errno_name(code),
        None if matches!(
            e.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        ) =>
        {
            timeout_name.to_owned()
        }
        None => format!("{:?}", e.kind()),
    }
}

fn errno_name(code: i32) -> String {
    let name = match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::EPIPE => "EPIPE",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ENETRESET => "ENETRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOBUFS => "ENOBUFS",
        libc::EISCONN => "EISCONN",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EALREADY => "EALREADY",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::EPROTO => "EPROTO",
        _ => return format!("errno {code}"),
    };
    name.to_owned()
}
