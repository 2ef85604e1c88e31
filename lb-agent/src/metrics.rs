//! Prometheus metrics: the agent's registry and the text exposition format.
//!
//! kube-proxy's names are used where the meaning is the same (so existing dashboards and
//! alerts keep working); kplb's own metrics are prefixed `kplb_`.

use std::{
    fmt::Write as _,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use lb_common::maps;

/// `start, start*factor, ...` (`count` bounds), as in client_golang.
pub fn exponential_buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    std::iter::successors(Some(start), |b| Some(b * factor))
        .take(count)
        .collect()
}

/// `start, start+width, ...` (`count` bounds), as in client_golang.
pub fn linear_buckets(start: f64, width: f64, count: usize) -> Vec<f64> {
    (0..count).map(|i| start + width * i as f64).collect()
}

/// A histogram with fixed bucket bounds (the implicit `+Inf` bucket is added when written).
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    state: Mutex<HistogramState>,
}

#[derive(Debug, Default, Clone)]
struct HistogramState {
    /// Per bucket (not cumulative), one more than `bounds` for `+Inf`.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    pub fn new(mut bounds: Vec<f64>) -> Self {
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        let counts = vec![0; bounds.len() + 1];
        Self {
            bounds,
            state: Mutex::new(HistogramState { counts, sum: 0.0 }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HistogramState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        let mut st = self.lock();
        st.counts[i] += 1;
        st.sum += v;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.lock().counts.iter().sum()
    }
}

/// Builds a text exposition (format 0.0.4): one HELP and TYPE line per family, then samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn finish(self) -> String {
        self.out
    }

    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, help, "counter");
        self.sample(name, &[], value as f64);
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.header(name, help, "gauge");
        self.sample(name, &[], value);
    }

    /// One family with a sample per label set.
    pub fn family(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        samples: &[(Vec<(&str, &str)>, f64)],
    ) {
        self.header(name, help, kind);
        for (labels, v) in samples {
            self.sample(name, labels, *v);
        }
    }

    /// Cumulative `_bucket{le=..}` samples ending in `+Inf`, then `_sum` and `_count`.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        let st = h.lock().clone();
        self.header(name, help, "histogram");
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (i, n) in st.counts.iter().enumerate() {
            cumulative += n;
            let le = h
                .bounds
                .get(i)
                .map_or("+Inf".to_string(), |b| format_value(*b));
            self.sample(&bucket, &[("le", &le)], cumulative as f64);
        }
        self.sample(&format!("{name}_sum"), &[], st.sum);
        self.sample(&format!("{name}_count"), &[], cumulative as f64);
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus' float syntax: `+Inf`, `-Inf`, `NaN`, else the shortest round-trip decimal.
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// Per-CPU datapath counters, summed over CPUs; index = `lb_common::types::counter`.
pub trait CounterSource: Send {
    fn read(&mut self) -> Result<Vec<u64>, String>;
}

/// Per-service-port counters summed over CPUs, by group id.
pub trait ServiceCounterSource: Send {
    fn read(&mut self) -> Result<std::collections::BTreeMap<u32, lb_common::SvcCounters>, String>;
}

/// Prometheus labels of one group (service port, family, endpoint scope), by group id.
pub type ServiceLabels = std::collections::BTreeMap<u32, Vec<(&'static str, String)>>;

/// Everything `/metrics` reports.
pub struct Metrics {
    /// kube-proxy's `sync_proxy_rules_duration_seconds`: how long a sync took.
    pub sync_duration: Histogram,
    /// kube-proxy's `network_programming_duration_seconds`: from an EndpointSlice's
    /// last-change-trigger-time to the change being in the maps.
    pub network_programming: Histogram,
    last_sync: Mutex<Option<SystemTime>>,
    pub syncs: AtomicU64,
    pub sync_errors: AtomicU64,
    pub frontends: AtomicU64,
    pub backends: AtomicU64,
    /// Maglev table slots in use (or waiting for reuse), and in all slabs.
    table_slots_used: AtomicU64,
    table_slots: AtomicU64,
    healthz: [AtomicU64; 2],
    livez: [AtomicU64; 2],
    datapath: Mutex<Option<Box<dyn CounterSource>>>,
    services: Mutex<Option<Box<dyn ServiceCounterSource>>>,
    service_labels: Mutex<ServiceLabels>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            // kube-proxy's buckets: 1 ms doubling to ~16 s.
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // kube-proxy's buckets: 0.25 s, 0.5 s, 1-59 s, 60-115 s by 5, 2-5 min by 30 s.
            network_programming: Histogram::new(
                [
                    linear_buckets(0.25, 0.25, 2),
                    linear_buckets(1.0, 1.0, 59),
                    linear_buckets(60.0, 5.0, 12),
                    linear_buckets(120.0, 30.0, 7),
                ]
                .concat(),
            ),
            last_sync: Mutex::new(None),
            syncs: AtomicU64::new(0),
            sync_errors: AtomicU64::new(0),
            frontends: AtomicU64::new(0),
            backends: AtomicU64::new(0),
            table_slots_used: AtomicU64::new(0),
            table_slots: AtomicU64::new(0),
            healthz: Default::default(),
            livez: Default::default(),
            datapath: Mutex::new(None),
            services: Mutex::new(None),
            service_labels: Mutex::new(ServiceLabels::new()),
        }
    }
}

/// Datapath counter names by index (`lb_common::types::counter`); an index missing here is
/// still exported, as `counter_<index>`, once it counts something.
pub const COUNTER_NAMES: &[(u32, &str)] = {
    use lb_common::types::counter;
    &[
        (counter::SOCK_XLATE, "sock_xlate"),
        (counter::SOCK_REJECT, "sock_reject"),
        (counter::SOCK_REV_XLATE, "sock_rev_xlate"),
        (counter::SOCK_MISS, "sock_miss"),
        (counter::XDP_NEW, "xdp_new_flow"),
        (counter::XDP_CT_HIT, "xdp_conntrack_hit"),
        (counter::XDP_REJECT, "xdp_reject"),
        (counter::XDP_DROP, "xdp_drop"),
        (counter::XDP_BAD, "xdp_malformed"),
        (counter::XDP_FRAG, "xdp_fragment"),
        (counter::XDP_FIB_MISS, "xdp_fib_miss"),
        (counter::TC_REV_XLATE, "tc_reverse_xlate"),
        (counter::ICMP_XLATE, "icmp_xlate"),
        (counter::SNAT_EXHAUSTED, "snat_ports_exhausted"),
        (counter::XDP_TTL_EXCEEDED, "xdp_ttl_exceeded"),
        (counter::DSR_ENCAP, "dsr_encap"),
        (counter::DSR_DECAP, "dsr_decap"),
        (counter::DSR_TOO_BIG, "dsr_too_big"),
    ]
};

impl Metrics {
    pub fn set_last_sync(&self, t: SystemTime) {
        *self.last_sync.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
    }

    /// Counts a `/healthz` (or, with `livez`, a `/livez`) answer.
    pub fn count_probe(&self, livez: bool, healthy: bool) {
        let set = if livez { &self.livez } else { &self.healthz };
        set[usize::from(!healthy)].fetch_add(1, Ordering::Relaxed);
    }

    /// Where `kplb_datapath_events_total` comes from (the pinned `KPLB_STATS` map).
    pub fn set_counter_source(&self, source: Box<dyn CounterSource>) {
        *self.datapath.lock().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// Where `kplb_service_*_total` come from (the pinned `KPLB_SVC_STATS` map).
    pub fn set_service_source(&self, source: Box<dyn ServiceCounterSource>) {
        *self.services.lock().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// The labels of the groups programmed now (after each sync).
    /// Maglev table slots in use (or waiting for reuse) and in all slabs.
    pub fn set_table_usage(&self, used: u64, total: u64) {
        self.table_slots_used.store(used, Ordering::Relaxed);
        self.table_slots.store(total, Ordering::Relaxed);
    }

    pub fn set_service_labels(&self, labels: ServiceLabels) {
        *self
            .service_labels
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = labels;
    }

    fn render_services(&self, e: &mut Exposition) {
        let mut source = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let Some(source) = source.as_mut() else {
            return;
        };
        let Ok(counters) = source.read() else {
            return;
        };
        let labels = self
            .service_labels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let rows: Vec<_> = counters
            .iter()
            .filter_map(|(g, c)| labels.get(g).map(|l| (l, c)))
            .collect();
        let family = |e: &mut Exposition,
                      name: &str,
                      help: &str,
                      get: fn(&lb_common::SvcCounters) -> u64| {
            let samples: Vec<(Vec<(&str, &str)>, f64)> = rows
                .iter()
                .map(|(l, c)| {
                    (
                        l.iter().map(|(k, v)| (*k, v.as_str())).collect(),
                        get(c) as f64,
                    )
                })
                .collect();
            e.family(name, help, "counter", &samples);
        };
        family(
            e,
            "kplb_service_packets_total",
            "Packets the XDP path translated to a service's backends.",
            |c| c.packets,
        );
        family(
            e,
            "kplb_service_bytes_total",
            "Bytes the XDP path translated to a service's backends.",
            |c| c.bytes,
        );
        family(
            e,
            "kplb_service_connections_total",
            "Connections (and new UDP flows) balanced to a service's backends, by the socket and XDP paths.",
            |c| c.connections,
        );
    }

    /// The exposition. `last_queued` is when the newest change arrived.
    pub fn render(&self, last_queued: Option<SystemTime>) -> String {
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let mut e = Exposition::default();
        e.histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            &self.sync_duration,
        );
        e.histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            &self.network_programming,
        );
        let last_sync = *self.last_sync.lock().unwrap_or_else(|e| e.into_inner());
        e.gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            last_sync.map_or(0.0, unix_seconds),
        );
        e.gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            last_queued.map_or(0.0, unix_seconds),
        );
        for (name, help, set) in [
            (
                "kubeproxy_proxy_healthz_total",
                "Cumulative proxy healthz HTTP status",
                &self.healthz,
            ),
            (
                "kubeproxy_proxy_livez_total",
                "Cumulative proxy livez HTTP status",
                &self.livez,
            ),
        ] {
            e.family(
                name,
                help,
                "counter",
                &[
                    (vec![("code", "200")], g(&set[0]) as f64),
                    (vec![("code", "503")], g(&set[1]) as f64),
                ],
            );
        }
        e.counter(
            "kplb_syncs_total",
            "Syncs of desired state into the maps.",
            g(&self.syncs),
        );
        e.counter(
            "kplb_sync_errors_total",
            "Map operations that failed.",
            g(&self.sync_errors),
        );
        // KPLB_MAGLEV counts slots: its slabs grow on demand, so capacity is what they hold now.
        let occupancy = [
            (
                maps::SERVICES,
                g(&self.frontends),
                u64::from(maps::MAX_SERVICES),
            ),
            (
                maps::BACKENDS,
                g(&self.backends),
                u64::from(maps::MAX_BACKENDS),
            ),
            (
                maps::MAGLEV,
                g(&self.table_slots_used),
                g(&self.table_slots),
            ),
        ];
        let entries: Vec<_> = occupancy
            .iter()
            .map(|(map, n, _)| (vec![("map", *map)], *n as f64))
            .collect();
        e.family(
            "kplb_map_entries",
            "Entries the agent has written to each map.",
            "gauge",
            &entries,
        );
        let capacity: Vec<_> = occupancy
            .iter()
            .map(|(map, _, max)| (vec![("map", *map)], *max as f64))
            .collect();
        e.family(
            "kplb_map_capacity",
            "Maximum entries of each map.",
            "gauge",
            &capacity,
        );
        self.render_datapath(&mut e);
        self.render_services(&mut e);
        e.finish()
    }

    fn render_datapath(&self, e: &mut Exposition) {
        let mut source = self.datapath.lock().unwrap_or_else(|e| e.into_inner());
        let Some(source) = source.as_mut() else {
            return;
        };
        let values = match source.read() {
            Ok(v) => v,
            Err(err) => {
                tracing::debug!("reading datapath counters: {err}");
                e.gauge(
                    "kplb_datapath_counters_up",
                    "Whether the datapath counters could be read.",
                    0.0,
                );
                return;
            }
        };
        let samples: Vec<(String, f64)> = values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let i = u32::try_from(i).ok()?;
                match COUNTER_NAMES.iter().find(|(idx, _)| *idx == i) {
                    Some((_, name)) => Some((name.to_string(), *v as f64)),
                    None if *v > 0 => Some((format!("counter_{i}"), *v as f64)),
                    None => None,
                }
            })
            .collect();
        let samples: Vec<_> = samples
            .iter()
            .map(|(n, v)| (vec![("event", n.as_str())], *v))
            .collect();
        e.gauge(
            "kplb_datapath_counters_up",
            "Whether the datapath counters could be read.",
            1.0,
        );
        e.family(
            "kplb_datapath_events_total",
            "Datapath events counted by the eBPF programs, summed over CPUs.",
            "counter",
            &samples,
        );
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_like_client_golang() {
        assert_eq!(exponential_buckets(1.0, 2.0, 4), [1.0, 2.0, 4.0, 8.0]);
        assert_eq!(linear_buckets(0.25, 0.25, 2), [0.25, 0.5]);
        let m = Metrics::default();
        assert_eq!(m.sync_duration.bounds.len(), 15);
        assert_eq!(m.network_programming.bounds.len(), 2 + 59 + 12 + 7);
        assert_eq!(m.network_programming.bounds.last(), Some(&300.0));
    }

    #[test]
    fn histogram_text_is_cumulative_with_inf_sum_and_count() {
        let h = Histogram::new(vec![0.5, 1.0]);
        for v in [0.1, 0.5, 0.7, 3.0] {
            h.observe(v);
        }
        let mut e = Exposition::default();
        e.histogram("x_seconds", "X.", &h);
        assert_eq!(
            e.finish(),
            "# HELP x_seconds X.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{le=\"0.5\"} 2\n\
             x_seconds_bucket{le=\"1\"} 3\n\
             x_seconds_bucket{le=\"+Inf\"} 4\n\
             x_seconds_sum 4.3\n\
             x_seconds_count 4\n"
        );
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut e = Exposition::default();
        e.family(
            "y",
            "line\\one\nline two",
            "gauge",
            &[(vec![("a", "q\"b\\s\nn")], 1.5)],
        );
        assert_eq!(
            e.finish(),
            "# HELP y line\\\\one\\nline two\n# TYPE y gauge\ny{a=\"q\\\"b\\\\s\\nn\"} 1.5\n"
        );
    }

    #[test]
    fn special_values() {
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(0.001 * 2f64.powi(7)), "0.128");
    }
}
