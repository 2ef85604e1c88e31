//! `netexec serve`: HTTP and UDP answers, one thread per listener and per connection.

use std::{
    io::{self, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::Arc,
    thread,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    sys,
    wire::{query_param, read_head, show},
};

pub struct Config {
    pub name: String,
    pub bind: IpAddr,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
    pub verbose: bool,
}

/// Binds every port first (so a bad port fails fast), then serves forever.
pub fn serve(config: Config) -> Result<()> {
    let listeners = config
        .tcp
        .iter()
        .map(|&p| {
            sys::tcp_listener(SocketAddr::new(config.bind, p))
                .with_context(|| format!("tcp port {p}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let sockets = config
        .udp
        .iter()
        .map(|&p| {
            sys::udp_socket(SocketAddr::new(config.bind, p))
                .with_context(|| format!("udp port {p}"))
        })
        .collect::<Result<Vec<_>>>()?;
    eprintln!(
        "netexec {}: tcp {:?} udp {:?} on {}",
        config.name, config.tcp, config.udp, config.bind
    );
    let config = Arc::new(config);
    for listener in listeners {
        let config = Arc::clone(&config);
        thread::spawn(move || accept_loop(&listener, &config));
    }
    for socket in sockets {
        let config = Arc::clone(&config);
        thread::spawn(move || udp_loop(&socket, &config));
    }
    loop {
        thread::park();
    }
}

fn accept_loop(listener: &TcpListener, config: &Arc<Config>) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let config = Arc::clone(config);
                thread::spawn(move || {
                    if let Err(e) = handle_http(stream, peer, &config)
                        && config.verbose
                    {
                        eprintln!("netexec: {}: {e}", show(peer));
                    }
                });
            }
            Err(e) => {
                eprintln!("netexec: accept: {e}");
                thread::sleep(Duration::from_millis(10)); // e.g. EMFILE: do not spin
            }
        }
    }
}

fn handle_http(mut stream: TcpStream, peer: SocketAddr, config: &Config) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = read_head(&mut stream)?;
    let target = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if config.verbose {
        eprintln!("netexec {}: {} GET {target}", config.name, show(peer));
    }
    let (status, body) = match path {
        "/hostname" => (200, config.name.clone()),
        "/clientip" => (200, show(peer)),
        // Both on one connection, so a client can pair a backend with the address it saw.
        "/whoami" => (200, format!("{} {}", config.name, show(peer))),
        "/localaddr" => (200, show(stream.local_addr()?)),
        "/echo" => (200, query_param(query, "msg").unwrap_or_default()),
        "/healthz" => (200, "ok".to_owned()),
        "/stream" => return echo_stream(stream),
        _ => (404, format!("no handler for {path}")),
    };
    let reason = if status == 200 { "OK" } else { "Not Found" };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.shutdown(Shutdown::Write)
}

/// `GET /stream`: a 200 head, then every byte read is written back until the client's EOF.
fn echo_stream(mut stream: TcpStream) -> io::Result<()> {
    stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut reader = stream.try_clone()?;
    io::copy(&mut reader, &mut stream)?;
    stream.shutdown(Shutdown::Write)
}

fn udp_loop(socket: &UdpSocket, config: &Config) {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("netexec: udp recv: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let text = String::from_utf8_lossy(&buf[..n]);
        let msg = text.trim_end_matches(['\r', '\n']);
        if config.verbose {
            eprintln!("netexec {}: {} udp {msg:?}", config.name, show(peer));
        }
        let reply = match msg.split_once(' ').unwrap_or((msg, "")) {
            ("hostname", _) => config.name.clone(),
            ("clientip", _) => show(peer),
            ("echo", rest) => rest.to_owned(),
            _ => format!("unknown command {msg:?}"),
        };
        if let Err(e) = socket.send_to(reply.as_bytes(), peer) {
            eprintln!("netexec: udp reply to {}: {e}", show(peer));
        }
    }
}
