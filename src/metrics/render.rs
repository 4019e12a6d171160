//! `/metrics`: every counter of [`Metrics`] in the Prometheus text exposition format.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::*;

impl Metrics {
    /// Every metric in the Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.render_routes(&mut out);
        self.render_upstreams(&mut out);
        self.render_connections(&mut out);
        self.render_limits(&mut out);
        out
    }

    fn render_routes(&self, out: &mut String) {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        describe(
            out,
            REQUESTS_TOTAL,
            "counter",
            "Requests answered, by route and status code.",
        );
        for (name, m) in &routes {
            for (slot, count) in m.status.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    let status = slot as u16 + STATUS_MIN;
                    let _ = writeln!(
                        out,
                        "{REQUESTS_TOTAL}{{route=\"{}\",status=\"{status}\"}} {count}",
                        escape(name)
                    );
                }
            }
        }
        describe(
            out,
            REQUEST_DURATION,
            "histogram",
            "Time from request head to response head, by route.",
        );
        for (name, m) in &routes {
            m.latency
                .render(out, REQUEST_DURATION, &format!("route=\"{}\",", escape(name)));
        }
    }

    fn render_upstreams(&self, out: &mut String) {
        let upstreams = self.upstreams.lock().unwrap_or_else(|e| e.into_inner()).clone();
        describe(
            out,
            UPSTREAM_ERRORS_TOTAL,
            "counter",
            "Failed upstream exchanges, by upstream and kind.",
        );
        for (name, m) in &upstreams {
            for (i, kind) in ERROR_KINDS.iter().enumerate() {
                let count = m.errors[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "{UPSTREAM_ERRORS_TOTAL}{{upstream=\"{}\",kind=\"{}\"}} {count}",
                    escape(name),
                    kind.code()
                );
            }
        }
        describe(
            out,
            "tollgate_upstream_events_total",
            "counter",
            "Resilience events, by upstream: ejections, restorations, active health transitions, retries, retries refused by the budget.",
        );
        for (name, m) in &upstreams {
            for (event, counter) in [
                ("ejection", &m.ejections),
                ("restoration", &m.restorations),
                ("active_unhealthy", &m.active_down),
                ("active_healthy", &m.active_up),
                ("retry", &m.retries),
                ("retry_budget_exhausted", &m.retry_budget_exhausted),
            ] {
                let _ = writeln!(
                    out,
                    "tollgate_upstream_events_total{{upstream=\"{}\",event=\"{event}\"}} {}",
                    escape(name),
                    counter.load(Ordering::Relaxed)
                );
            }
        }
    }

    fn render_connections(&self, out: &mut String) {
        single(
            out,
            OPEN_CONNECTIONS,
            "gauge",
            "Client connections currently open.",
            self.open_connections(),
        );
        single(
            out,
            PARKED_CONNECTIONS,
            "gauge",
            "Idle keep-alive connections parked without HTTP buffers.",
            self.parked_connections.load(Ordering::Relaxed),
        );
        single(
            out,
            CONNECTIONS_TOTAL,
            "counter",
            "Client connections accepted.",
            self.connections_total.load(Ordering::Relaxed),
        );
        describe(
            out,
            PROTECTIONS_TOTAL,
            "counter",
            "Requests refused and connections closed by a protective limit, by limit.",
        );
        for protection in Protection::ALL {
            let _ = writeln!(
                out,
                "{PROTECTIONS_TOTAL}{{limit=\"{}\"}} {}",
                protection.label(),
                self.protections(protection)
            );
        }
        single(
            out,
            ANONYMOUS_SUBJECTS,
            "gauge",
            "Anonymous-tier subjects (client IPs, Referer hosts) held in memory.",
            self.anonymous_subjects.load(Ordering::Relaxed),
        );
        single(
            out,
            ANONYMOUS_EVICTIONS_TOTAL,
            "counter",
            "Anonymous-tier subjects evicted from memory (their counts stay in the store).",
            self.anonymous_evictions.load(Ordering::Relaxed),
        );
        single(
            out,
            ANONYMOUS_ROWS_DROPPED_TOTAL,
            "counter",
            "Anonymous usage rows dropped because a flood outran the usage store (decisions unaffected).",
            self.anonymous_rows_dropped.load(Ordering::Relaxed),
        );
        labelled(
            out,
            CONFIG_RELOADS_TOTAL,
            "counter",
            "Configuration reloads, by result.",
            "result",
            &[
                ("success", self.reloads_ok.load(Ordering::Relaxed)),
                ("failure", self.reloads_failed.load(Ordering::Relaxed)),
            ],
        );
    }

    fn render_limits(&self, out: &mut String) {
        let plans = self.plans.lock().unwrap_or_else(|e| e.into_inner()).clone();
        describe(
            out,
            LIMIT_DECISIONS_TOTAL,
            "counter",
            "Plan decisions on charged requests, by plan and decision.",
        );
        for (name, d) in &plans {
            let name = escape(name);
            for (decision, counter) in [
                ("admitted", &d.admitted),
                ("rate_limited", &d.rate_limited),
                ("quota_exceeded", &d.quota_exceeded),
            ] {
                let _ = writeln!(
                    out,
                    "{LIMIT_DECISIONS_TOTAL}{{plan=\"{name}\",decision=\"{decision}\"}} {}",
                    counter.load(Ordering::Relaxed)
                );
            }
        }
        let u = &self.usage;
        single(
            out,
            USAGE_COUNTERS,
            "gauge",
            "Subjects with usage counters held in memory.",
            u.counters.load(Ordering::Relaxed),
        );
        labelled(
            out,
            USAGE_FLUSHES_TOTAL,
            "counter",
            "Usage flushes to the state backend, by result.",
            "result",
            &[
                ("success", u.flushes_ok.load(Ordering::Relaxed)),
                ("failure", u.flushes_failed.load(Ordering::Relaxed)),
            ],
        );
        single(
            out,
            USAGE_ROWS_WRITTEN_TOTAL,
            "counter",
            "Counter slots written to the state backend.",
            u.rows_written.load(Ordering::Relaxed),
        );
        single(
            out,
            USAGE_ROWS_ABANDONED_TOTAL,
            "counter",
            "Counter slots not written because a forced stop ended the final flush.",
            u.rows_abandoned.load(Ordering::Relaxed),
        );
        describe(
            out,
            USAGE_FLUSH_DURATION,
            "histogram",
            "Time to write one batch of usage slots.",
        );
        u.duration.render(out, USAGE_FLUSH_DURATION, "");
    }
}

/// A metric without labels: its help, type and one sample.
pub fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    describe(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// A metric with one label: its help, type and a sample per label value.
pub fn labelled(out: &mut String, name: &str, kind: &str, help: &str, label: &str, samples: &[(&str, u64)]) {
    describe(out, name, kind, help);
    for (value, sample) in samples {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {sample}");
    }
}

/// The `# HELP` and `# TYPE` lines of one metric.
pub fn describe(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
