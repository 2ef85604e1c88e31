//! kube-proxy-compatible `/healthz` and `/livez`, and Prometheus `/metrics`, on a tiny
//! blocking HTTP server (one thread per listener; requests are tiny and rare).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use tracing::debug;

/// Shared state the sync loop updates and the servers read.
#[derive(Default)]
pub struct Health {
    synced: AtomicBool,
    last_updated: Mutex<Option<SystemTime>>,
    pub syncs: AtomicU64,
    pub sync_errors: AtomicU64,
    pub frontends: AtomicU64,
    pub backends: AtomicU64,
    pub tables: AtomicU64,
    pub last_sync_micros: AtomicU64,
}

impl Health {
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
        if let Ok(mut t) = self.last_updated.lock() {
            *t = Some(SystemTime::now());
        }
    }

    fn healthz(&self) -> (u16, String) {
        let last = self.last_updated.lock().ok().and_then(|t| *t);
        let body = format!(
            "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"}}",
            last.map(rfc3339).unwrap_or_default(),
            rfc3339(SystemTime::now())
        );
        let code = if self.synced.load(Ordering::Acquire) {
            200
        } else {
            503
        };
        (code, body)
    }

    fn metrics(&self) -> String {
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        format!(
            "# HELP kplb_syncs_total Syncs of desired state into the maps.\n# TYPE kplb_syncs_total counter\n\
             kplb_syncs_total {}\n\
             # HELP kplb_sync_errors_total Map operations that failed.\n# TYPE kplb_sync_errors_total counter\n\
             kplb_sync_errors_total {}\n\
             # HELP kplb_frontends Frontends programmed.\n# TYPE kplb_frontends gauge\nkplb_frontends {}\n\
             # HELP kplb_backends Backends programmed.\n# TYPE kplb_backends gauge\nkplb_backends {}\n\
             # HELP kplb_maglev_tables Maglev tables programmed.\n# TYPE kplb_maglev_tables gauge\nkplb_maglev_tables {}\n\
             # HELP kubeproxy_sync_proxy_rules_last_duration_seconds Duration of the last sync.\n\
             # TYPE kubeproxy_sync_proxy_rules_last_duration_seconds gauge\n\
             kubeproxy_sync_proxy_rules_last_duration_seconds {}\n",
            g(&self.syncs),
            g(&self.sync_errors),
            g(&self.frontends),
            g(&self.backends),
            g(&self.tables),
            g(&self.last_sync_micros) as f64 / 1e6,
        )
    }
}

/// Serves `/healthz`, `/livez` and `/metrics` on `addr` from a background thread.
pub fn serve(addr: SocketAddr, health: Arc<Health>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    std::thread::Builder::new()
        .name(format!("http-{addr}"))
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                if let Err(e) = respond(conn, &health) {
                    debug!("http: {e}");
                }
            }
        })
        .context("spawning http thread")?;
    Ok(())
}

fn respond(mut conn: TcpStream, health: &Health) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (code, ctype, body) = match path.split('?').next().unwrap_or("/") {
        "/healthz" | "/livez" => {
            let (code, body) = health.healthz();
            (code, "application/json", body)
        }
        "/metrics" => (200, "text/plain; version=0.0.4", health.metrics()),
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    let reason = match code {
        200 => "OK",
        503 => "Service Unavailable",
        _ => "Not Found",
    };
    write!(
        conn,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// RFC 3339 UTC timestamp (civil-from-days, H. Hinnant's algorithm).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // leap-year February end
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.000000000Z");
    }
}
