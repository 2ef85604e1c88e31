//! healthCheckNodePort servers with kube-proxy's contract: `200` and the local endpoint count
//! while the service has ready endpoints on this node, `503` with none. One listener per port;
//! a port closes when its service is deleted or stops using externalTrafficPolicy: Local.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use tracing::{info, warn};

use crate::model::HealthCheck;

struct Server {
    state: Arc<Mutex<HealthCheck>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The running servers, updated after every sync.
#[derive(Default)]
pub struct HealthChecks {
    servers: BTreeMap<u16, Server>,
}

/// The response for `hc`: status, body and the endpoint-weight header value.
pub fn response(hc: &HealthCheck) -> (u16, String) {
    let code = if hc.local_endpoints > 0 { 200 } else { 503 };
    let body = format!(
        "{{\"service\":{{\"namespace\":{},\"name\":{}}},\"localEndpoints\":{},\"serviceProxyHealthy\":true}}",
        serde_json::Value::from(hc.service.namespace.as_str()),
        serde_json::Value::from(hc.service.name.as_str()),
        hc.local_endpoints
    );
    (code, body)
}

impl HealthChecks {
    /// Starts, updates and stops servers to match `wanted`.
    pub fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        let gone: Vec<u16> = self
            .servers
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some(mut s) = self.servers.remove(&port) {
                s.stop.store(true, Ordering::SeqCst);
                if let Some(t) = s.thread.take() {
                    let _ = t.join();
                }
                info!(port, "health check port closed");
            }
        }
        for (&port, hc) in wanted {
            if let Some(s) = self.servers.get(&port) {
                if let Ok(mut st) = s.state.lock() {
                    *st = hc.clone();
                }
                continue;
            }
            match start(port, hc.clone()) {
                Ok(s) => {
                    info!(port, service = %hc.service, "health check port open");
                    self.servers.insert(port, s);
                }
                Err(e) => warn!(port, service = %hc.service, "health check port: {e}"),
            }
        }
    }
}

fn start(port: u16, hc: HealthCheck) -> std::io::Result<Server> {
    // Dual-stack where available, IPv4 otherwise.
    let listener = TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))))?;
    listener.set_nonblocking(true)?;
    let state = Arc::new(Mutex::new(hc));
    let stop = Arc::new(AtomicBool::new(false));
    let (st, sp) = (state.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name(format!("healthcheck-{port}"))
        .spawn(move || {
            while !sp.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let hc = st.lock().map(|h| h.clone()).ok();
                        if let Some(hc) = hc {
                            let _ = respond(conn, &hc);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })?;
    Ok(Server {
        state,
        stop,
        thread: Some(thread),
    })
}

fn respond(mut conn: TcpStream, hc: &HealthCheck) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    // Read the request head (any path answers, as with kube-proxy).
    let mut reader = BufReader::new(&conn);
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let (code, body) = response(hc);
    let reason = if code == 200 {
        "OK"
    } else {
        "Service Unavailable"
    };
    write!(
        conn,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
         X-Load-Balancing-Endpoint-Weight: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        hc.local_endpoints,
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::ServiceName;

    #[test]
    fn contract_bodies() {
        let mut hc = HealthCheck {
            service: ServiceName {
                namespace: "default".into(),
                name: "web".into(),
            },
            local_endpoints: 2,
        };
        let (code, body) = response(&hc);
        assert_eq!(code, 200);
        assert_eq!(
            body,
            r#"{"service":{"namespace":"default","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
        hc.local_endpoints = 0;
        assert_eq!(response(&hc).0, 503);
    }
}
