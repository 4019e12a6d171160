//! The last hour of traffic by route, sampled by the node itself from its own counters, so
//! the console (docs/console.md) draws requests/s, error rate and p50/p99 latency without a
//! Prometheus. A sample is the difference between two reads of the cumulative counters;
//! the series are computed from the samples when asked for, never per request.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use super::{LATENCY_BUCKETS, Metrics, STATUS_MIN};

/// How often the sampler reads the counters.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept: one hour.
const KEEP: usize = 720;
/// The series of every route summed.
pub const ALL_ROUTES: &str = "(all)";

/// One route's counts: cumulative when read from [`Metrics`], per interval in a sample.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteCounts {
    pub requests: u64,
    /// Answers with a 5xx status.
    pub errors: u64,
    /// Answers with a 4xx status (refusals: auth, limits, bad requests).
    pub refused: u64,
    /// Requests per latency bucket (not cumulative), the last one past the largest bound.
    pub buckets: [u64; LATENCY_BUCKETS.len() + 1],
}

impl RouteCounts {
    fn minus(&self, earlier: &RouteCounts) -> RouteCounts {
        let mut buckets = [0; LATENCY_BUCKETS.len() + 1];
        for (i, b) in buckets.iter_mut().enumerate() {
            *b = self.buckets[i].saturating_sub(earlier.buckets[i]);
        }
        RouteCounts {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            refused: self.refused.saturating_sub(earlier.refused),
            buckets,
        }
    }

    fn add(&mut self, other: &RouteCounts) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.refused += other.refused;
        for (b, o) in self.buckets.iter_mut().zip(other.buckets) {
            *b += o;
        }
    }
}

impl Metrics {
    /// Every route's cumulative counts, read now (the `(none)` label included).
    pub fn route_counts(&self) -> Vec<(String, RouteCounts)> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        routes
            .iter()
            .map(|(name, m)| {
                let mut counts = RouteCounts::default();
                for (slot, count) in m.status.iter().enumerate() {
                    let count = count.load(Ordering::Relaxed);
                    let status = slot as u16 + STATUS_MIN;
                    counts.requests += count;
                    match status {
                        400..=499 => counts.refused += count,
                        500.. => counts.errors += count,
                        _ => {}
                    }
                }
                for (b, atomic) in counts.buckets.iter_mut().zip(&m.latency.buckets) {
                    *b = atomic.load(Ordering::Relaxed);
                }
                (name.clone(), counts)
            })
            .collect()
    }
}

struct Sample {
    /// Unix seconds at the end of the interval.
    at: u64,
    seconds: f64,
    routes: Vec<(String, RouteCounts)>,
}

#[derive(Default)]
struct Inner {
    /// The cumulative counts of the last read, and when it was made.
    last: Option<(u64, std::time::Instant, BTreeMap<String, RouteCounts>)>,
    samples: VecDeque<Sample>,
}

/// One point of a series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// Unix seconds at the end of the interval.
    pub t: u64,
    pub requests: u64,
    pub rps: f64,
    pub errors: u64,
    /// 5xx answers ÷ requests (0 when there were none).
    pub error_rate: f64,
    pub refused: u64,
    /// Estimated from the latency histogram; absent when there were no requests.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Traffic {
    pub interval_seconds: u64,
    /// `(all)` first, then each route by name.
    pub routes: Vec<String>,
    pub series: BTreeMap<String, Vec<Point>>,
}

/// Counters read at a moment: (unix seconds, the monotonic instant, each route's counts).
pub type Reading = (u64, std::time::Instant, Vec<(String, RouteCounts)>);

/// The samples of the last hour.
#[derive(Default)]
pub struct TrafficHistory {
    inner: Mutex<Inner>,
}

impl TrafficHistory {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a sample: what each route answered since the previous read. The first read
    /// only sets the baseline.
    pub fn record(&self, at: u64, now: std::time::Instant, counts: Vec<(String, RouteCounts)>) {
        let mut inner = self.lock();
        let current: BTreeMap<String, RouteCounts> = counts.into_iter().collect();
        if let Some((_, then, last)) = &inner.last {
            let sample = Sample {
                at,
                seconds: now.duration_since(*then).as_secs_f64(),
                routes: difference(&current, last),
            };
            if inner.samples.len() == KEEP {
                inner.samples.pop_front();
            }
            inner.samples.push_back(sample);
        }
        inner.last = Some((at, now, current));
    }

    /// The series since `since` (unix seconds), plus a last, partial point from the
    /// counts read now (`current`), so traffic shows before the next sample is due.
    pub fn series(&self, since: u64, current: Option<Reading>) -> Traffic {
        let inner = self.lock();
        let partial = current.and_then(|(at, now, counts)| {
            let (_, then, last) = inner.last.as_ref()?;
            let seconds = now.duration_since(*then).as_secs_f64();
            // Under a second the rate of a partial interval is mostly noise.
            (seconds >= 1.0).then(|| Sample {
                at,
                seconds,
                routes: difference(&counts.into_iter().collect(), last),
            })
        });
        let samples: Vec<&Sample> = inner
            .samples
            .iter()
            .chain(partial.as_ref())
            .filter(|s| s.at >= since)
            .collect();
        let mut names: Vec<String> = samples
            .iter()
            .flat_map(|s| s.routes.iter().map(|(name, _)| name.clone()))
            .collect();
        names.sort();
        names.dedup();
        let mut series: BTreeMap<String, Vec<Point>> = BTreeMap::new();
        for sample in &samples {
            let mut all = RouteCounts::default();
            for name in &names {
                let counts = sample
                    .routes
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, c)| c.clone())
                    .unwrap_or_default();
                all.add(&counts);
                series
                    .entry(name.clone())
                    .or_default()
                    .push(point(sample.at, sample.seconds, &counts));
            }
            series
                .entry(ALL_ROUTES.to_string())
                .or_default()
                .push(point(sample.at, sample.seconds, &all));
        }
        let mut routes = vec![ALL_ROUTES.to_string()];
        routes.extend(names);
        Traffic {
            interval_seconds: SAMPLE_EVERY.as_secs(),
            routes,
            series,
        }
    }
}

fn difference(
    current: &BTreeMap<String, RouteCounts>,
    last: &BTreeMap<String, RouteCounts>,
) -> Vec<(String, RouteCounts)> {
    current
        .iter()
        .map(|(name, counts)| {
            let delta = match last.get(name) {
                Some(earlier) => counts.minus(earlier),
                None => counts.clone(),
            };
            (name.clone(), delta)
        })
        .collect()
}

/// A point from one interval's counts.
pub fn point(at: u64, seconds: f64, counts: &RouteCounts) -> Point {
    let rate = |n: u64| if seconds > 0.0 { n as f64 / seconds } else { 0.0 };
    Point {
        t: at,
        requests: counts.requests,
        rps: round(rate(counts.requests), 3),
        errors: counts.errors,
        error_rate: if counts.requests == 0 {
            0.0
        } else {
            round(counts.errors as f64 / counts.requests as f64, 4)
        },
        refused: counts.refused,
        p50_ms: quantile(&counts.buckets, 0.5).map(|s| round(s * 1000.0, 3)),
        p99_ms: quantile(&counts.buckets, 0.99).map(|s| round(s * 1000.0, 3)),
    }
}

fn round(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}

/// The `q` quantile in seconds, interpolated linearly inside the bucket it falls in (as
/// Prometheus' `histogram_quantile` does); past the largest bound it is that bound.
pub fn quantile(buckets: &[u64; LATENCY_BUCKETS.len() + 1], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, &count) in buckets.iter().enumerate() {
        if count == 0 {
            continue;
        }
        if (seen + count) as f64 >= rank {
            let Some(&upper) = LATENCY_BUCKETS.get(i) else {
                return LATENCY_BUCKETS.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
            let within = (rank - seen as f64) / count as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        seen += count;
    }
    LATENCY_BUCKETS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, errors: u64, bucket: usize) -> RouteCounts {
        let mut c = RouteCounts {
            requests,
            errors,
            ..Default::default()
        };
        c.buckets[bucket] = requests;
        c
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        let mut buckets = [0; LATENCY_BUCKETS.len() + 1];
        assert_eq!(quantile(&buckets, 0.5), None);
        // 100 requests between 1 ms and 2.5 ms: the median is half-way.
        buckets[2] = 100;
        let p50 = quantile(&buckets, 0.5).unwrap();
        assert!((p50 - 0.00175).abs() < 1e-9, "{p50}");
        // One slow request in the 0.5 s – 1 s bucket moves p99 only when it is the 99th.
        buckets[10] = 1;
        assert!(quantile(&buckets, 0.99).unwrap() < 0.0025);
        buckets[10] = 5;
        assert!(quantile(&buckets, 0.99).unwrap() > 0.5);
        // Past the largest bound: the bound.
        let mut over = [0; LATENCY_BUCKETS.len() + 1];
        over[LATENCY_BUCKETS.len()] = 3;
        assert_eq!(quantile(&over, 0.5), Some(10.0));
    }

    #[test]
    fn samples_are_differences_and_all_sums_routes() {
        let history = TrafficHistory::default();
        let start = std::time::Instant::now();
        history.record(100, start, vec![("a".into(), counts(10, 0, 1))]);
        history.record(
            105,
            start + Duration::from_secs(5),
            vec![("a".into(), counts(60, 5, 1)), ("b".into(), counts(20, 0, 3))],
        );
        let traffic = history.series(0, None);
        assert_eq!(traffic.routes, vec!["(all)", "a", "b"]);
        let a = &traffic.series["a"];
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].t, a[0].requests, a[0].errors), (105, 50, 5));
        assert_eq!(a[0].rps, 10.0);
        assert_eq!(a[0].error_rate, 0.1);
        let all = &traffic.series["(all)"][0];
        assert_eq!((all.requests, all.errors), (70, 5));
        assert_eq!(all.rps, 14.0);
        // Since a later time: nothing.
        assert!(history.series(106, None).series.is_empty());
    }

    #[test]
    fn the_partial_point_shows_traffic_before_the_next_sample() {
        let history = TrafficHistory::default();
        let start = std::time::Instant::now();
        history.record(100, start, vec![("a".into(), counts(0, 0, 0))]);
        let now = start + Duration::from_secs(2);
        let traffic = history.series(0, Some((102, now, vec![("a".into(), counts(8, 0, 0))])));
        assert_eq!(traffic.series["a"].len(), 1);
        assert_eq!(traffic.series["a"][0].rps, 4.0);
        // Too soon after the last sample: no partial point.
        let soon = start + Duration::from_millis(300);
        let traffic = history.series(0, Some((100, soon, vec![("a".into(), counts(8, 0, 0))])));
        assert!(traffic.series.is_empty());
    }

    #[test]
    fn an_hour_is_kept() {
        let history = TrafficHistory::default();
        let start = std::time::Instant::now();
        for i in 0..=(KEEP as u64 + 10) {
            history.record(
                i * 5,
                start + Duration::from_secs(i * 5),
                vec![("a".into(), counts(i, 0, 0))],
            );
        }
        assert_eq!(history.series(0, None).series["a"].len(), KEEP);
    }
}
