//! Prometheus metrics. Counters are plain atomics resolved once per configuration (a
//! route holds its own `Arc<RouteMetrics>`), so recording costs a few relaxed atomic adds
//! and no map lookup or lock on the request path. Rendering happens on scrape.
//!
//! Hand-written rather than `prometheus-client`/`metrics`: those resolve label sets
//! through a locked map per observation, which is the cost this design avoids.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod history;
mod protection;
mod render;

pub use protection::Protection;
pub use render::{describe, labelled, single};

use crate::base::ErrorKind;
use crate::limits::PlanDecisions;

pub const REQUESTS_TOTAL: &str = "tollgate_requests_total";
pub const REQUEST_DURATION: &str = "tollgate_request_duration_seconds";
pub const UPSTREAM_ERRORS_TOTAL: &str = "tollgate_upstream_errors_total";
pub const OPEN_CONNECTIONS: &str = "tollgate_open_connections";
pub const CONNECTIONS_TOTAL: &str = "tollgate_connections_total";
pub const PARKED_CONNECTIONS: &str = "tollgate_parked_connections";
pub const CONFIG_RELOADS_TOTAL: &str = "tollgate_config_reloads_total";
pub const LIMIT_DECISIONS_TOTAL: &str = "tollgate_limit_decisions_total";
pub const USAGE_COUNTERS: &str = "tollgate_usage_counters";
pub const USAGE_FLUSH_DURATION: &str = "tollgate_usage_flush_duration_seconds";
pub const USAGE_FLUSHES_TOTAL: &str = "tollgate_usage_flushes_total";
pub const USAGE_ROWS_WRITTEN_TOTAL: &str = "tollgate_usage_rows_written_total";
pub const USAGE_ROWS_ABANDONED_TOTAL: &str = "tollgate_usage_rows_abandoned_total";
pub const PROTECTIONS_TOTAL: &str = "tollgate_protections_total";
pub const ANONYMOUS_SUBJECTS: &str = "tollgate_anonymous_subjects";
pub const ANONYMOUS_EVICTIONS_TOTAL: &str = "tollgate_anonymous_evictions_total";
pub const ANONYMOUS_ROWS_DROPPED_TOTAL: &str = "tollgate_anonymous_usage_rows_dropped_total";

/// Upper bounds of the latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// A latency histogram over `LATENCY_BUCKETS`, as atomics.
#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// `NAME_bucket`, `NAME_sum` and `NAME_count` lines; `labels` is `""` or `key="v",`.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let plain = labels.trim_end_matches(',');
        let braces = if plain.is_empty() {
            String::new()
        } else {
            format!("{{{plain}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

const STATUS_MIN: u16 = 100;
const STATUS_SLOTS: usize = 500;

/// Requests and latency of one route, by status code.
pub struct RouteMetrics {
    status: Box<[AtomicU64]>,
    latency: Histogram,
}

impl RouteMetrics {
    fn new() -> Self {
        RouteMetrics {
            status: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            latency: Histogram::default(),
        }
    }

    pub fn record(&self, status: u16, latency: Duration) {
        let slot = usize::from(status.saturating_sub(STATUS_MIN)).min(STATUS_SLOTS - 1);
        self.status[slot].fetch_add(1, Ordering::Relaxed);
        self.latency.observe(latency);
    }
}

const ERROR_KINDS: [ErrorKind; 5] = [
    ErrorKind::NoEndpoint,
    ErrorKind::UpstreamConnect,
    ErrorKind::UpstreamTls,
    ErrorKind::UpstreamTimeout,
    ErrorKind::UpstreamProtocol,
];

/// Failed upstream exchanges of one pool, by kind, and its resilience events.
#[derive(Default, Debug)]
pub struct UpstreamMetrics {
    errors: [AtomicU64; ERROR_KINDS.len()],
    ejections: AtomicU64,
    restorations: AtomicU64,
    active_down: AtomicU64,
    active_up: AtomicU64,
    retries: AtomicU64,
    retry_budget_exhausted: AtomicU64,
}

/// An endpoint's health change, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthEvent {
    Ejected,
    Restored,
    ActiveDown,
    ActiveUp,
}

impl UpstreamMetrics {
    pub fn record_health(&self, event: HealthEvent) {
        let counter = match event {
            HealthEvent::Ejected => &self.ejections,
            HealthEvent::Restored => &self.restorations,
            HealthEvent::ActiveDown => &self.active_down,
            HealthEvent::ActiveUp => &self.active_up,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_retry(&self, allowed: bool) {
        let counter = if allowed {
            &self.retries
        } else {
            &self.retry_budget_exhausted
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_error(&self, kind: ErrorKind) {
        if let Some(i) = ERROR_KINDS.iter().position(|&k| k == kind) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// All metrics of one process. Per-route and per-upstream entries are kept by name, so
/// counts survive configuration reloads.
#[derive(Default)]
pub struct Metrics {
    // Locked only when a configuration is compiled and on scrape, never per request.
    routes: Mutex<BTreeMap<String, Arc<RouteMetrics>>>,
    upstreams: Mutex<BTreeMap<String, Arc<UpstreamMetrics>>>,
    open_connections: AtomicI64,
    connections_total: AtomicU64,
    parked_connections: AtomicI64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    plans: Mutex<BTreeMap<String, Arc<PlanDecisions>>>,
    pub usage: UsageMetrics,
    protections: [AtomicU64; Protection::ALL.len()],
    anonymous_subjects: AtomicI64,
    anonymous_evictions: AtomicU64,
    anonymous_rows_dropped: AtomicU64,
    /// The last hour by route, for the console (sampled by a background service).
    pub traffic: history::TrafficHistory,
}

/// The usage flusher's health: how many counters are held and how writes go.
#[derive(Default)]
pub struct UsageMetrics {
    counters: AtomicI64,
    flushes_ok: AtomicU64,
    flushes_failed: AtomicU64,
    rows_written: AtomicU64,
    rows_abandoned: AtomicU64,
    duration: Histogram,
}

impl UsageMetrics {
    pub fn set_counters(&self, count: usize) {
        self.counters.store(count as i64, Ordering::Relaxed);
    }

    pub fn flushed(&self, result: Result<usize, ()>, took: Duration) {
        match result {
            Ok(rows) => {
                self.flushes_ok.fetch_add(1, Ordering::Relaxed);
                self.rows_written.fetch_add(rows as u64, Ordering::Relaxed);
            }
            Err(()) => drop(self.flushes_failed.fetch_add(1, Ordering::Relaxed)),
        }
        self.duration.observe(took);
    }

    /// Rows given up at shutdown (a forced stop while the store kept failing).
    pub fn abandoned(&self, rows: usize) {
        self.rows_abandoned.fetch_add(rows as u64, Ordering::Relaxed);
    }
}

/// Keeps `tollgate_open_connections` right on every exit path of a connection.
pub struct ConnectionGuard(Arc<Metrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct ParkedGuard(Arc<Metrics>);

impl Drop for ParkedGuard {
    fn drop(&mut self) {
        self.0.parked_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Label used for requests that matched no route.
pub const NO_ROUTE: &str = "(none)";

impl Metrics {
    pub fn route(&self, name: &str) -> Arc<RouteMetrics> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(RouteMetrics::new()))
            .clone()
    }

    /// Decision counters of a plan; kept by name across plan edits and reloads.
    pub fn plan(&self, name: &str) -> Arc<PlanDecisions> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        plans.entry(name.to_string()).or_default().clone()
    }

    pub fn upstream(&self, name: &str) -> Arc<UpstreamMetrics> {
        let mut upstreams = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        upstreams.entry(name.to_string()).or_default().clone()
    }

    pub fn connection_opened(self: &Arc<Self>) -> ConnectionGuard {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.clone())
    }

    /// Counts a keep-alive connection waiting without HTTP state, until the guard drops.
    pub fn connection_parked(self: &Arc<Self>) -> ParkedGuard {
        self.parked_connections.fetch_add(1, Ordering::Relaxed);
        ParkedGuard(self.clone())
    }

    pub fn protected(&self, protection: Protection) {
        self.protections[protection as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn protections(&self, protection: Protection) -> u64 {
        self.protections[protection as usize].load(Ordering::Relaxed)
    }

    /// The anonymous tier's table: subjects held in memory, and how many were evicted.
    pub fn anonymous_table(&self, held: usize, evicted: u64, rows_dropped: u64) {
        self.anonymous_subjects.store(held as i64, Ordering::Relaxed);
        self.anonymous_evictions.fetch_add(evicted, Ordering::Relaxed);
        self.anonymous_rows_dropped.fetch_add(rows_dropped, Ordering::Relaxed);
    }

    pub fn open_connections(&self) -> i64 {
        self.open_connections.load(Ordering::Relaxed)
    }

    pub fn reload(&self, ok: bool) {
        let counter = if ok { &self.reloads_ok } else { &self.reloads_failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_histogram() {
        let metrics = Arc::new(Metrics::default());
        let route = metrics.route("lookup");
        route.record(200, Duration::from_micros(300));
        route.record(200, Duration::from_millis(30));
        route.record(404, Duration::from_millis(2));
        metrics.upstream("geo").record_error(ErrorKind::UpstreamTimeout);
        let _conn = metrics.connection_opened();
        metrics.reload(true);
        let text = metrics.render();
        assert!(
            text.contains("tollgate_requests_total{route=\"lookup\",status=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains("tollgate_requests_total{route=\"lookup\",status=\"404\"} 1"));
        assert!(text.contains("tollgate_request_duration_seconds_bucket{route=\"lookup\",le=\"0.0005\"} 1"));
        assert!(text.contains("tollgate_request_duration_seconds_bucket{route=\"lookup\",le=\"0.05\"} 3"));
        assert!(text.contains("tollgate_request_duration_seconds_count{route=\"lookup\"} 3"));
        assert!(text.contains("tollgate_upstream_errors_total{upstream=\"geo\",kind=\"upstream_timeout\"} 1"));
        assert!(text.contains("tollgate_open_connections 1"));
        assert!(text.contains("tollgate_config_reloads_total{result=\"success\"} 1"));
        assert!(Arc::ptr_eq(&route, &metrics.route("lookup")));
    }
}
