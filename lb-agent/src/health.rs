//! kube-proxy-compatible `/healthz` and `/livez`, and Prometheus `/metrics`, on a tiny
//! blocking HTTP server (one thread per listener; requests are tiny and rare).
//!
//! Like kube-proxy's healthz server: the agent is unhealthy when a queued change has waited
//! longer than the health timeout without reaching the maps (a stuck sync loop), and `/healthz`
//! (not `/livez`) also fails while this node is being deleted, so that external load balancers
//! drain it. Additionally `/healthz` answers 503 until the first full sync is in the maps.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tracing::debug;

use crate::{changes::ChangeQueue, metrics::Metrics, sync::SyncStats};

/// How long a queued change may wait before the agent reports unhealthy: kube-proxy uses twice
/// its sync period (2 x 30 s).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("spawning the http thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Shared state the sync loop updates and the servers read.
pub struct Health {
    changes: Arc<ChangeQueue>,
    timeout: Duration,
    synced: AtomicBool,
    node_eligible: AtomicBool,
    last_updated: Mutex<Option<SystemTime>>,
    pub metrics: Metrics,
}

/// One HTTP answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Health {
    pub fn new(changes: Arc<ChangeQueue>, timeout: Duration) -> Self {
        Self {
            changes,
            timeout,
            synced: AtomicBool::new(false),
            node_eligible: AtomicBool::new(true),
            last_updated: Mutex::new(None),
            metrics: Metrics::default(),
        }
    }

    pub fn changes(&self) -> &Arc<ChangeQueue> {
        &self.changes
    }

    /// A sync is in the maps: updates the health state and the sync metrics. `triggers` are the
    /// EndpointSlice trigger times of the changes it applied.
    pub fn record_sync(&self, stats: &SyncStats, took: Duration, triggers: &[SystemTime]) {
        let now = SystemTime::now();
        let m = &self.metrics;
        let r = Ordering::Relaxed;
        m.syncs.fetch_add(1, r);
        m.sync_errors.fetch_add(stats.errors as u64, r);
        m.frontends.store(stats.frontends as u64, r);
        m.backends.store(stats.backends as u64, r);
        m.sync_duration.observe(took.as_secs_f64());
        for t in triggers {
            // A trigger time in the future (clock skew) counts as zero.
            m.network_programming
                .observe(now.duration_since(*t).unwrap_or_default().as_secs_f64());
        }
        m.set_last_sync(now);
        self.mark_synced_at(now);
    }

    /// Whether a full sync has reached the maps.
    pub fn has_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The maps reflect the objects (first sync done, or a later one).
    pub fn mark_synced(&self) {
        self.mark_synced_at(SystemTime::now());
    }

    fn mark_synced_at(&self, t: SystemTime) {
        self.synced.store(true, Ordering::Release);
        *self.last_updated.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
    }

    /// Whether this node may receive traffic: false while it is being deleted or no longer
    /// exists.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.node_eligible.store(eligible, Ordering::Release);
    }

    /// No queued change has waited longer than the timeout.
    fn fresh(&self, now: Instant) -> bool {
        self.changes
            .oldest_unapplied()
            .is_none_or(|t| now.saturating_duration_since(t) < self.timeout)
    }

    /// kube-proxy's `/healthz`: synced, fresh, and the node is not going away. Like kube-proxy,
    /// a healthy answer reports `lastUpdated` as the current time.
    pub fn healthz(&self) -> Response {
        let eligible = self.node_eligible.load(Ordering::Acquire);
        let healthy = self.synced.load(Ordering::Acquire) && self.fresh(Instant::now()) && eligible;
        self.metrics.count_probe(false, healthy);
        let (last, now) = self.times(healthy);
        json(
            healthy,
            format!(
                "{{\"lastUpdated\": \"{last}\",\"currentTime\": \"{now}\", \"nodeEligible\": {eligible}}}"
            ),
        )
    }

    /// kube-proxy's `/livez`: like `/healthz` but ignoring node deletion (a node being drained
    /// must not have its proxy restarted) and healthy while starting.
    pub fn livez(&self) -> Response {
        let healthy = self.fresh(Instant::now());
        self.metrics.count_probe(true, healthy);
        let (last, now) = self.times(healthy);
        json(
            healthy,
            format!("{{\"lastUpdated\": \"{last}\",\"currentTime\": \"{now}\"}}"),
        )
    }

    fn times(&self, healthy: bool) -> (String, String) {
        let now = SystemTime::now();
        let last = if healthy {
            Some(now)
        } else {
            *self.last_updated.lock().unwrap_or_else(|e| e.into_inner())
        };
        (last.map(rfc3339).unwrap_or_default(), rfc3339(now))
    }

    pub fn metrics_text(&self) -> Response {
        Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: self.metrics.render(self.changes.last_queued()),
        }
    }

    /// Routes a request path (a query string is ignored).
    pub fn handle(&self, path: &str) -> Response {
        match path.split('?').next().unwrap_or("/") {
            "/healthz" => self.healthz(),
            "/livez" => self.livez(),
            "/metrics" => self.metrics_text(),
            _ => Response {
                status: 404,
                content_type: "text/plain; charset=utf-8",
                body: "not found\n".into(),
            },
        }
    }
}

fn json(healthy: bool, body: String) -> Response {
    Response {
        status: if healthy { 200 } else { 503 },
        content_type: "application/json",
        body,
    }
}

/// Serves `/healthz`, `/livez` and `/metrics` on `addr` from a background thread. Returns the
/// bound address (useful with port 0).
pub fn serve(addr: SocketAddr, health: Arc<Health>) -> Result<SocketAddr, HealthError> {
    let listener = TcpListener::bind(addr).map_err(|source| HealthError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HealthError::Bind { addr, source })?;
    std::thread::Builder::new()
        .name(format!("http-{local}"))
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                if let Err(e) = respond(conn, &health) {
                    debug!("http: {e}");
                }
            }
        })
        .map_err(HealthError::Spawn)?;
    Ok(local)
}

fn respond(mut conn: TcpStream, health: &Health) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let r = health.handle(path);
    let reason = match r.status {
        200 => "OK",
        503 => "Service Unavailable",
        _ => "Not Found",
    };
    write!(
        conn,
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{}",
        r.status,
        r.content_type,
        r.body.len(),
        r.body
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
