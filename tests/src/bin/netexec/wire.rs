//! Bits of HTTP and address formatting shared by server and client.

use std::{
    io::{self, Read},
    net::SocketAddr,
};

/// `ip:port` as a peer would print it: IPv4-mapped IPv6 (a v4 client of a dual-stack
/// socket) as plain IPv4, other IPv6 as `[ip]:port`.
pub fn show(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())).to_string(),
            None => addr.to_string(),
        },
        SocketAddr::V4(_) => addr.to_string(),
    }
}

/// Reads up to and including the blank line that ends an HTTP head, one byte at a time so
/// that nothing after it is consumed (the stream mode echoes those bytes).
pub fn read_head(stream: &mut impl Read) -> io::Result<String> {
    const LIMIT: usize = 16 * 1024;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= LIMIT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "HTTP head too long",
            ));
        }
        if stream.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF in HTTP head",
            ));
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// The value of `key` in a query string, percent-decoded (`+` is a space).
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| pct_decode(v))
}

fn pct_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries_and_unmaps_v4() {
        assert_eq!(
            query_param("a=1&msg=hi%20there+x%2", "msg").as_deref(),
            Some("hi there x%2")
        );
        assert_eq!(query_param("a=1", "msg"), None);
        assert_eq!(show("[::ffff:10.0.1.2]:80".parse().unwrap()), "10.0.1.2:80");
        assert_eq!(show("[fd00::1]:80".parse().unwrap()), "[fd00::1]:80");
    }

    #[test]
    fn head_stops_at_blank_line() {
        let mut input: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest";
        assert_eq!(
            read_head(&mut input).unwrap(),
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        assert_eq!(input, b"rest");
    }
}
