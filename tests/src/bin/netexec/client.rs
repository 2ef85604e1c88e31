//! `netexec client`: one JSON line per attempt on stdout.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde_json::{Value, json};

use crate::{
    sys::error_name,
    wire::{read_head, show},
};

pub enum Mode {
    /// A new TCP connection per attempt, `GET path`.
    Http { target: SocketAddr, path: String },
    /// One TCP connection to `GET /stream` for `duration`.
    Stream {
        target: SocketAddr,
        duration: Duration,
    },
    /// One datagram per attempt, from a new socket unless `connected`.
    Udp {
        target: SocketAddr,
        msg: String,
        connected: bool,
        local_port: Option<u16>,
        /// Connected only: after `count` attempts, `connect()` the same socket here and make
        /// `count` more.
        reconnect: Option<SocketAddr>,
    },
}

pub struct Config {
    pub mode: Mode,
    pub count: u32,
    pub timeout: Duration,
    pub interval: Duration,
}

pub fn run(config: &Config) -> Result<()> {
    let mut out = io::stdout().lock();
    let began = Instant::now();
    // `at`: when the attempt ended, in ms since the client started (to line up with changes).
    let mut emit = |mut v: Value| {
        v["at"] = json!(ms(began));
        writeln!(out, "{v}").and_then(|()| out.flush())
    };
    match &config.mode {
        Mode::Stream { target, duration } => emit(stream(*target, *duration, config.timeout))?,
        Mode::Http { target, path } => {
            repeat(config, || emit(http(*target, path, config.timeout)))?
        }
        Mode::Udp {
            target,
            msg,
            connected: false,
            local_port,
            ..
        } => repeat(config, || {
            let start = Instant::now();
            let v = match udp_socket(*target, *local_port) {
                Ok(sock) => udp_exchange(&sock, Some(*target), msg, config.timeout, start),
                Err(e) => failure(start, &error_name(&e, "timeout"), None, None),
            };
            emit(v)
        })?,
        Mode::Udp {
            target,
            msg,
            connected: true,
            local_port,
            reconnect,
        } => {
            let sock = udp_socket(*target, *local_port).and_then(|s| s.connect(target).map(|()| s));
            let mut attempts = |sock: &io::Result<UdpSocket>| {
                repeat(config, || {
                    let start = Instant::now();
                    emit(match sock {
                        Ok(sock) => udp_exchange(sock, None, msg, config.timeout, start),
                        Err(e) => failure(start, &error_name(e, "timeout"), None, None),
                    })
                })
            };
            attempts(&sock)?;
            if let Some(next) = reconnect {
                let sock = sock.and_then(|s| s.connect(next).map(|()| s));
                attempts(&sock)?;
            }
        }
    }
    Ok(())
}

fn repeat(config: &Config, mut attempt: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    for i in 0..config.count {
        if i > 0 && !config.interval.is_zero() {
            thread::sleep(config.interval);
        }
        attempt()?;
    }
    Ok(())
}

fn ms(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

fn failure(start: Instant, error: &str, peer: Option<&str>, local: Option<&str>) -> Value {
    let mut v = json!({"ok": false, "error": error, "ms": ms(start)});
    if let Some(p) = peer {
        v["peer"] = json!(p);
    }
    if let Some(l) = local {
        v["local"] = json!(l);
    }
    v
}

/// Connects (bounded by `timeout`) and returns the stream with its peer/local addresses.
fn connect(target: SocketAddr, timeout: Duration) -> Result<(TcpStream, String, String), String> {
    let stream =
        TcpStream::connect_timeout(&target, timeout).map_err(|e| error_name(&e, "ETIMEDOUT"))?;
    let peer = stream.peer_addr().map(show).unwrap_or_default();
    let local = stream.local_addr().map(show).unwrap_or_default();
    Ok((stream, peer, local))
}

fn remaining(start: Instant, timeout: Duration) -> Duration {
    timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(1))
}

fn http(target: SocketAddr, path: &str, timeout: Duration) -> Value {
    let start = Instant::now();
    let (mut stream, peer, local) = match connect(target, timeout) {
        Ok(c) => c,
        Err(e) => return failure(start, &e, None, None),
    };
    let fail = |e: &io::Error| failure(start, &error_name(e, "timeout"), Some(&peer), Some(&local));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    let io = stream
        .set_read_timeout(Some(remaining(start, timeout)))
        .and_then(|()| stream.set_write_timeout(Some(remaining(start, timeout))))
        .and_then(|()| stream.write_all(request.as_bytes()));
    if let Err(e) = io {
        return fail(&e);
    }
    let mut response = Vec::new();
    if let Err(e) = stream.read_to_end(&mut response) {
        return fail(&e);
    }
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        let what = if response.is_empty() {
            "empty response"
        } else {
            "bad response"
        };
        return failure(start, what, Some(&peer), Some(&local));
    };
    let status = head.split(' ').nth(1).unwrap_or("?");
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    let body = length.and_then(|n| body.get(..n)).unwrap_or(body);
    if status != "200" {
        let mut v = failure(start, &format!("HTTP {status}"), Some(&peer), Some(&local));
        v["body"] = json!(body);
        return v;
    }
    json!({"ok": true, "body": body, "peer": peer, "local": local, "ms": ms(start)})
}

/// Writes a 17-byte counter line every 10 ms and checks each comes back unchanged.
fn stream(target: SocketAddr, duration: Duration, timeout: Duration) -> Value {
    let start = Instant::now();
    let (mut stream, peer, local) = match connect(target, timeout) {
        Ok(c) => c,
        Err(e) => return failure(start, &e, None, None),
    };
    let mut bytes = 0u64;
    let mut exchange = || -> io::Result<Option<String>> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(format!("GET /stream HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())?;
        let head = read_head(&mut stream)?;
        if !head.starts_with("HTTP/1.1 200") {
            return Ok(Some(format!("bad stream head {head:?}")));
        }
        let end = start + duration;
        let mut echoed = [0u8; 17];
        for n in 0u64.. {
            let line = format!("{n:016}\n");
            stream.write_all(line.as_bytes())?;
            stream.read_exact(&mut echoed)?;
            if echoed != line.as_bytes() {
                return Ok(Some(format!("echo mismatch at {n}")));
            }
            bytes += line.len() as u64;
            if Instant::now() >= end {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        stream.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest)?;
        Ok((!rest.is_empty()).then(|| format!("{} unexpected bytes after EOF", rest.len())))
    };
    let result = exchange();
    let mut v = match result {
        Ok(None) => json!({"ok": true, "peer": peer, "local": local, "ms": ms(start)}),
        Ok(Some(problem)) => failure(start, &problem, Some(&peer), Some(&local)),
        Err(e) => failure(start, &error_name(&e, "timeout"), Some(&peer), Some(&local)),
    };
    v["bytes"] = json!(bytes);
    v
}

fn udp_socket(target: SocketAddr, local_port: Option<u16>) -> io::Result<UdpSocket> {
    let port = local_port.unwrap_or(0);
    match target {
        SocketAddr::V4(_) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::V6(_) => UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)),
    }
}

/// Sends `msg` (to `target`, or on the connected socket) and waits for one reply.
fn udp_exchange(
    sock: &UdpSocket,
    target: Option<SocketAddr>,
    msg: &str,
    timeout: Duration,
    start: Instant,
) -> Value {
    let local = || sock.local_addr().map(show).ok();
    let sent = match target {
        Some(t) => sock.send_to(msg.as_bytes(), t),
        None => sock.send(msg.as_bytes()),
    };
    let received = sent.and_then(|_| {
        sock.set_read_timeout(Some(remaining(start, timeout)))?;
        let mut buf = vec![0u8; 65536];
        let (n, from) = sock.recv_from(&mut buf)?;
        buf.truncate(n);
        Ok((buf, from))
    });
    match received {
        Ok((buf, from)) => json!({
            "ok": true,
            "body": String::from_utf8_lossy(&buf),
            "from": show(from),
            "local": local(),
            "ms": ms(start),
        }),
        Err(e) => failure(start, &error_name(&e, "timeout"), None, local().as_deref()),
    }
}
