//! Endpoint health: active checks' verdict, passive outlier detection and the circuit
//! breaker, as atomics read by the balancer on every pick. One state machine:
//!
//! ```text
//!  closed ──N consecutive failures──► open (ejected for base × 2^(ejections−1), capped)
//!    ▲                                  │ time is up
//!    │ probe succeeds                   ▼
//!    └──── (slow start) ◄──────────  half-open: at most `half_open_requests` at once
//!                                       │ probe fails → open again, longer
//! ```
//!
//! A passing active check also closes an open breaker. Times are milliseconds since the
//! process started, passed in by the caller, so the machine is tested without sleeping.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Milliseconds since the first call (a monotonic clock for health decisions).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// 0 = passive health off.
    pub consecutive_failures: u32,
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    pub half_open_requests: u32,
    pub slow_start_ms: u64,
}

impl OutlierPolicy {
    pub fn from_config(outlier: &crate::config::OutlierSection, slow_start: Duration) -> Self {
        OutlierPolicy {
            consecutive_failures: outlier.consecutive_failures,
            base_ejection_ms: outlier.base_ejection_time.as_millis() as u64,
            max_ejection_ms: outlier.max_ejection_time.as_millis() as u64,
            half_open_requests: outlier.half_open_requests.max(1),
            slow_start_ms: slow_start.as_millis() as u64,
        }
    }
}

/// What the balancer may do with an endpoint right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Healthy (possibly in slow start: `share` of its normal traffic, 0–1).
    Serve { share: f64 },
    /// Ejection over: a limited number of probe requests.
    Probe,
    /// Active check down, or ejected.
    Refuse,
}

/// A state change worth a log line and a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Ejected { for_ms: u64, ejections: u32 },
    Restored,
    ActiveDown,
    ActiveUp,
}

#[derive(Debug, Default)]
pub struct Health {
    active_down: AtomicBool,
    active_successes: AtomicU32,
    active_failures: AtomicU32,
    consecutive_failures: AtomicU32,
    /// 0 = closed; else the ms at which the ejection ends (then half-open).
    open_until: AtomicU64,
    ejections: AtomicU32,
    probes: AtomicU32,
    /// When the endpoint last came back, for slow start (0 = long ago).
    restored_at: AtomicU64,
    pub total_failures: AtomicU64,
}

impl Health {
    pub fn admission(&self, now: u64, policy: &OutlierPolicy) -> Admission {
        if self.active_down.load(Ordering::Relaxed) {
            return Admission::Refuse;
        }
        let until = self.open_until.load(Ordering::Relaxed);
        if until != 0 {
            if now < until {
                return Admission::Refuse;
            }
            return if self.probes.load(Ordering::Relaxed) < policy.half_open_requests {
                Admission::Probe
            } else {
                Admission::Refuse
            };
        }
        let restored = self.restored_at.load(Ordering::Relaxed);
        if restored != 0 {
            let since = now.saturating_sub(restored);
            if since < policy.slow_start_ms {
                let share = since as f64 / policy.slow_start_ms as f64;
                return Admission::Serve { share: share.max(0.05) };
            }
            // Slow start is over: "long ago" again, so picks need no clock (`is_timed`).
            // A `now` older than the restore (see `is_timed`) lands in the branch above.
            let _ = self
                .restored_at
                .compare_exchange(restored, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
        Admission::Serve { share: 1.0 }
    }

    /// Whether a decision about this endpoint depends on the time: its breaker is open or
    /// half-open, or it is in slow start. Most endpoints never are, and then a pick or a
    /// success skips the clock read (two per request). Deciding with a time older than
    /// a change made meanwhile by another worker is deciding as of just before it,
    /// which is what the caller saw: so a caller that found no endpoint timed passes 0.
    pub fn is_timed(&self) -> bool {
        self.open_until.load(Ordering::Relaxed) != 0 || self.restored_at.load(Ordering::Relaxed) != 0
    }

    /// Marks a request as one of the half-open probes (after the balancer chose it).
    pub fn start_probe(&self) {
        self.probes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        let until = self.open_until.load(Ordering::Relaxed);
        until != 0 && now < until
    }

    pub fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Relaxed) != 0
    }

    pub fn is_active_down(&self) -> bool {
        self.active_down.load(Ordering::Relaxed)
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn breaker_state(&self, now: u64) -> &'static str {
        match self.open_until.load(Ordering::Relaxed) {
            0 => "closed",
            until if now < until => "open",
            _ => "half_open",
        }
    }

    /// Records one exchange's outcome. `may_eject` says whether the pool is below its cap
    /// of ejected endpoints; it is asked only when this failure would eject.
    pub fn record(
        &self,
        ok: bool,
        probe: bool,
        now: u64,
        policy: &OutlierPolicy,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Transition> {
        if probe {
            self.probes.fetch_sub(1, Ordering::Relaxed);
        }
        if ok {
            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
            let until = self.open_until.load(Ordering::Relaxed);
            if until != 0 && now >= until {
                return self.restore(now);
            }
            return None;
        }
        self.total_failures.fetch_add(1, Ordering::Relaxed);
        if policy.consecutive_failures == 0 {
            return None;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let until = self.open_until.load(Ordering::Relaxed);
        let half_open_failed = until != 0 && now >= until;
        let threshold_reached = until == 0 && failures >= policy.consecutive_failures && may_eject();
        if !(half_open_failed || threshold_reached) {
            return None;
        }
        let ejections = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let for_ms = policy
            .base_ejection_ms
            .saturating_mul(1 << (ejections - 1).min(20))
            .min(policy.max_ejection_ms);
        let next = now + for_ms.max(1);
        // Active checks must pass `healthy_threshold` times afresh to end this ejection early.
        self.active_successes.store(0, Ordering::Relaxed);
        let previous = self.open_until.swap(next, Ordering::Relaxed);
        // Another worker may have opened it for the same failures.
        (previous == 0 || previous <= now).then_some(Transition::Ejected { for_ms, ejections })
    }

    fn restore(&self, now: u64) -> Option<Transition> {
        let was = self.open_until.swap(0, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.restored_at.store(now, Ordering::Relaxed);
        (was != 0).then_some(Transition::Restored)
    }

    /// Records an active check. Returns a transition when a threshold flips the verdict,
    /// or when a passing check ends an ejection.
    pub fn record_active(
        &self,
        ok: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
        now: u64,
    ) -> Option<Transition> {
        if ok {
            self.active_failures.store(0, Ordering::Relaxed);
            let streak = self.active_successes.fetch_add(1, Ordering::Relaxed) + 1;
            if self.active_down.load(Ordering::Relaxed) && streak >= healthy_threshold {
                self.active_down.store(false, Ordering::Relaxed);
                self.restored_at.store(now, Ordering::Relaxed);
                return Some(Transition::ActiveUp);
            }
            if self.is_open() && streak >= healthy_threshold {
                return self.restore(now);
            }
            None
        } else {
            self.active_successes.store(0, Ordering::Relaxed);
            let streak = self.active_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.active_down.load(Ordering::Relaxed) && streak >= unhealthy_threshold {
                self.active_down.store(true, Ordering::Relaxed);
                return Some(Transition::ActiveDown);
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: OutlierPolicy = OutlierPolicy {
        consecutive_failures: 3,
        base_ejection_ms: 1000,
        max_ejection_ms: 3000,
        half_open_requests: 1,
        slow_start_ms: 1000,
    };

    #[test]
    fn ejection_grows_and_a_probe_restores() {
        let health = Health::default();
        assert!(!health.is_timed(), "a fresh endpoint is decided without the clock");
        assert_eq!(health.admission(0, &POLICY), Admission::Serve { share: 1.0 });
        assert_eq!(health.record(false, false, 10, &POLICY, || true), None);
        assert_eq!(health.record(false, false, 11, &POLICY, || true), None);
        // A success in between resets the count.
        assert_eq!(health.record(true, false, 12, &POLICY, || true), None);
        assert_eq!(health.record(false, false, 13, &POLICY, || true), None);
        assert_eq!(health.record(false, false, 14, &POLICY, || true), None);
        assert_eq!(
            health.record(false, false, 15, &POLICY, || true),
            Some(Transition::Ejected {
                for_ms: 1000,
                ejections: 1
            })
        );
        assert!(health.is_timed());
        assert_eq!(health.admission(500, &POLICY), Admission::Refuse);
        assert_eq!(health.breaker_state(500), "open");
        // Half-open: one probe at a time.
        assert_eq!(health.admission(1015, &POLICY), Admission::Probe);
        health.start_probe();
        assert_eq!(health.admission(1016, &POLICY), Admission::Refuse);
        // The probe fails: open again for twice as long.
        assert_eq!(
            health.record(false, true, 1020, &POLICY, || true),
            Some(Transition::Ejected {
                for_ms: 2000,
                ejections: 2
            })
        );
        assert_eq!(health.admission(3000, &POLICY), Admission::Refuse);
        assert_eq!(health.admission(3020, &POLICY), Admission::Probe);
        health.start_probe();
        assert_eq!(
            health.record(true, true, 3030, &POLICY, || true),
            Some(Transition::Restored)
        );
        // Slow start: a growing share of traffic.
        assert!(health.is_timed());
        // A time from before the restore (a caller that saw nothing timed passes 0).
        assert_eq!(health.admission(0, &POLICY), Admission::Serve { share: 0.05 });
        assert_eq!(health.admission(3530, &POLICY), Admission::Serve { share: 0.5 });
        assert_eq!(health.admission(4100, &POLICY), Admission::Serve { share: 1.0 });
        assert_eq!(health.breaker_state(4100), "closed");
        // Slow start over: picks and successes need no clock again.
        assert!(!health.is_timed());
        assert_eq!(health.admission(0, &POLICY), Admission::Serve { share: 1.0 });
    }

    #[test]
    fn the_pool_cap_and_the_cap_on_ejection_time_hold() {
        let health = Health::default();
        for t in 0..10 {
            assert_eq!(
                health.record(false, false, t, &POLICY, || false),
                None,
                "the pool is at its cap"
            );
        }
        let health = Health::default();
        let mut now = 0;
        let mut longest = 0;
        for _ in 0..6 {
            for _ in 0..3 {
                if let Some(Transition::Ejected { for_ms, .. }) = health.record(false, false, now, &POLICY, || true) {
                    longest = for_ms;
                    now += for_ms;
                }
            }
        }
        assert_eq!(longest, 3000);
    }

    #[test]
    fn active_checks_flip_after_thresholds_and_end_ejections() {
        let health = Health::default();
        assert_eq!(health.record_active(false, 2, 2, 0), None);
        assert_eq!(health.record_active(false, 2, 2, 1), Some(Transition::ActiveDown));
        assert_eq!(health.admission(2, &POLICY), Admission::Refuse);
        assert_eq!(health.record_active(true, 2, 2, 3), None);
        assert_eq!(health.record_active(true, 2, 2, 4), Some(Transition::ActiveUp));
        assert!(matches!(health.admission(5, &POLICY), Admission::Serve { .. }));
        for t in 0..3 {
            health.record(false, false, 10 + t, &POLICY, || true);
        }
        assert!(health.is_ejected(20));
        health.record_active(true, 2, 2, 30);
        assert_eq!(health.record_active(true, 2, 2, 31), Some(Transition::Restored));
        assert!(!health.is_open());
    }
}
