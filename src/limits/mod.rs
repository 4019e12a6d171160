//! Plan enforcement as pure functions: a GCRA rate limit and calendar quotas, decided from
//! counts the caller passes in. The usage table ([`crate::usage`]) holds the counts and
//! calls these under its lock, so a check and its increment are one step.

pub mod keyed;
pub mod lease;
pub mod window;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use window::Now;

const NANOS: u64 = 1_000_000_000;

/// Generic cell rate algorithm: one timestamp per subject (the theoretical arrival time),
/// `burst` requests at once, then one per `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    pub per_second: u32,
    pub burst: u32,
    interval_ns: u64,
}

/// The state after an admitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateAdmit {
    pub tat: u64,
    /// Requests that could still be sent right now.
    pub remaining: u64,
    /// Nanoseconds until the full burst is available again.
    pub reset_ns: u64,
}

impl Gcra {
    /// `burst` defaults to one second's worth of requests.
    pub fn new(per_second: u32, burst: Option<u32>) -> Option<Gcra> {
        if per_second == 0 {
            return None;
        }
        let burst = burst.unwrap_or(per_second).max(1);
        Some(Gcra {
            per_second,
            burst,
            // Configuration refuses rates above 10⁹/s; a stored plan from before that check
            // is held to one request per nanosecond rather than an interval of zero.
            interval_ns: (NANOS / u64::from(per_second)).max(1),
        })
    }

    /// This node's share when `nodes` nodes enforce the same limit: the rate divided (the
    /// interval multiplied) and the burst divided, rounded up to at least one request.
    pub fn shared(self, nodes: u32) -> Gcra {
        let nodes = nodes.max(1);
        Gcra {
            per_second: (self.per_second / nodes).max(1),
            burst: self.burst.div_ceil(nodes).max(1),
            interval_ns: self.interval_ns * u64::from(nodes),
        }
    }

    fn capacity_ns(&self) -> u64 {
        self.interval_ns * u64::from(self.burst)
    }

    /// Admits one request at `now` given the stored `tat`, or says how many nanoseconds
    /// until one would be admitted.
    pub fn check(&self, tat: u64, now: u64) -> Result<RateAdmit, u64> {
        let next = tat.max(now) + self.interval_ns;
        let ahead = next - now;
        let capacity = self.capacity_ns();
        if ahead > capacity {
            return Err(ahead - capacity);
        }
        Ok(RateAdmit {
            tat: next,
            remaining: (capacity - ahead) / self.interval_ns,
            reset_ns: ahead,
        })
    }

    /// The policy window: `burst` requests per `burst / per_second` seconds (at least 1).
    pub fn window_secs(&self) -> u64 {
        self.capacity_ns().div_ceil(NANOS).max(1)
    }
}

/// Quotas for the routes of one route group (`group = "..."` on a route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLimits {
    pub name: Arc<str>,
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
}

/// A plan compiled for the request path.
#[derive(Debug)]
pub struct PlanLimits {
    pub name: Arc<str>,
    pub rate: Option<Gcra>,
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
    pub groups: Vec<GroupLimits>,
    pub decisions: Arc<PlanDecisions>,
    /// Global mode, while a lease authority is unreachable (docs/multi-region.md).
    pub on_partition: crate::model::PartitionMode,
    pub partition_allowance: Option<u64>,
}

impl PlanLimits {
    pub fn group(&self, name: Option<&str>) -> Option<&GroupLimits> {
        let name = name?;
        self.groups.iter().find(|g| &*g.name == name)
    }

    /// Whether subjects on this plan need a month counter in memory.
    pub fn tracks_month(&self) -> bool {
        self.monthly.is_some() || self.groups.iter().any(|g| g.monthly.is_some())
    }
}

impl PlanLimits {
    /// `rate_share`: how many nodes share the plan's rate limit (1 unless `divide_rate`).
    pub fn from_plan(plan: &crate::model::Plan, rate_share: u32, decisions: Arc<PlanDecisions>) -> PlanLimits {
        PlanLimits {
            name: plan.name.as_str().into(),
            rate: plan
                .rate_per_second
                .and_then(|rate| Gcra::new(rate, plan.burst))
                .map(|gcra| gcra.shared(rate_share)),
            daily: plan.daily,
            monthly: plan.monthly,
            groups: plan
                .groups
                .iter()
                .map(|(name, quota)| GroupLimits {
                    name: name.as_str().into(),
                    daily: quota.daily,
                    monthly: quota.monthly,
                })
                .collect(),
            decisions,
            on_partition: plan.on_partition.unwrap_or_default(),
            partition_allowance: plan.partition_allowance,
        }
    }
}

/// Every plan by name, for the request path; swapped whole when a plan changes.
pub struct PlanTable {
    plans: rustc_hash::FxHashMap<Arc<str>, Arc<PlanLimits>>,
    /// The plan of consumers created without one, when the configuration does not define
    /// it: no limits (docs/limits.md, "Plans").
    implicit_default: Arc<PlanLimits>,
}

impl PlanTable {
    /// `default`: the name of the plan given to consumers created without one, and its
    /// decision counters.
    pub fn new(
        plans: impl IntoIterator<Item = PlanLimits>,
        default: &str,
        default_decisions: Arc<PlanDecisions>,
    ) -> PlanTable {
        PlanTable {
            plans: plans.into_iter().map(|p| (p.name.clone(), Arc::new(p))).collect(),
            implicit_default: Arc::new(PlanLimits {
                name: default.into(),
                rate: None,
                daily: None,
                monthly: None,
                groups: Vec::new(),
                decisions: default_decisions,
                on_partition: Default::default(),
                partition_allowance: None,
            }),
        }
    }

    /// The plan of this name; `None` when it is not defined (deleted, misspelt, never
    /// created) — callers on such a plan are refused, not let through unlimited.
    pub fn get(&self, name: &str) -> Option<&Arc<PlanLimits>> {
        self.plans
            .get(name)
            .or_else(|| (*self.implicit_default.name == *name).then_some(&self.implicit_default))
    }
}

/// Admitted and rejected requests of one plan, for `/metrics`.
#[derive(Debug, Default)]
pub struct PlanDecisions {
    pub admitted: AtomicU64,
    pub rate_limited: AtomicU64,
    pub quota_exceeded: AtomicU64,
}

impl PlanDecisions {
    pub fn record(&self, outcome: Result<(), RejectKind>) {
        let counter = match outcome {
            Ok(()) => &self.admitted,
            Err(RejectKind::RateLimited) => &self.rate_limited,
            Err(RejectKind::QuotaExceeded) => &self.quota_exceeded,
            Err(RejectKind::LeasePending) => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Which limit a status describes; names the policy in the `RateLimit` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitName {
    Rate,
    Daily,
    Monthly,
    GroupDaily(Arc<str>),
    GroupMonthly(Arc<str>),
}

impl LimitName {
    pub fn policy(&self) -> std::borrow::Cow<'static, str> {
        match self {
            LimitName::Rate => "rate".into(),
            LimitName::Daily => "daily".into(),
            LimitName::Monthly => "monthly".into(),
            LimitName::GroupDaily(group) => format!("{group}-daily").into(),
            LimitName::GroupMonthly(group) => format!("{group}-monthly").into(),
        }
    }

    /// `day` or `month` for quotas.
    pub fn window(&self) -> &'static str {
        match self {
            LimitName::Rate => "second",
            LimitName::Daily | LimitName::GroupDaily(_) => "day",
            LimitName::Monthly | LimitName::GroupMonthly(_) => "month",
        }
    }
}

/// One limit as a caller sees it after a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitStatus {
    pub name: LimitName,
    pub quota: u64,
    pub window_secs: u64,
    pub remaining: u64,
    /// Seconds until the limit is fully available again (quota: until the window ends).
    pub reset_secs: u64,
}

impl LimitStatus {
    /// The status closer to exhaustion: lower share of the quota remaining.
    pub fn closer<'a>(&'a self, other: &'a LimitStatus) -> &'a LimitStatus {
        let mine = u128::from(self.remaining) * u128::from(other.quota);
        let theirs = u128::from(other.remaining) * u128::from(self.quota);
        if theirs < mine || (theirs == mine && other.remaining < self.remaining) {
            other
        } else {
            self
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    RateLimited,
    QuotaExceeded,
    /// Global mode: this node holds no lease for the request and has asked for one; the
    /// caller waits for it (docs/multi-region.md, "Quota leases").
    LeasePending,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: RejectKind,
    pub status: LimitStatus,
    /// Seconds the caller should wait (`Retry-After`), at least 1.
    pub retry_after: u64,
}

/// A subject's usage in the current windows (all nodes), before this request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub day: u64,
    pub month: u64,
    pub group_day: u64,
    pub group_month: u64,
}

fn keep_closest(best: &mut Option<LimitStatus>, candidate: LimitStatus) {
    match best {
        Some(current) if current.closer(&candidate) == current => {}
        _ => *best = Some(candidate),
    }
}

fn quota_check(
    name: LimitName,
    limit: Option<u64>,
    used: u64,
    window_secs: u64,
    reset_secs: u64,
    best: &mut Option<LimitStatus>,
) -> Result<(), Rejection> {
    let Some(quota) = limit else { return Ok(()) };
    let status = LimitStatus {
        name,
        quota,
        window_secs,
        remaining: quota.saturating_sub(used + 1),
        reset_secs,
    };
    if used >= quota {
        return Err(Rejection {
            kind: RejectKind::QuotaExceeded,
            retry_after: reset_secs.max(1),
            status: LimitStatus { remaining: 0, ..status },
        });
    }
    keep_closest(best, status);
    Ok(())
}

/// Decides the quotas of `plan` (and of `group`, the route's group) for one more request
/// by a subject with `counts`. On admission, returns the status closest to exhaustion.
pub fn check_quotas(
    plan: &PlanLimits,
    group: Option<&GroupLimits>,
    counts: &Counts,
    now: Now,
) -> Result<Option<LimitStatus>, Rejection> {
    let calendar = window::Calendar::of(now);
    let day_reset = calendar.day_end.saturating_sub(now.secs());
    let month_reset = calendar.month_end.saturating_sub(now.secs());
    let month_secs = calendar.month_secs;
    let mut best = None;
    quota_check(LimitName::Daily, plan.daily, counts.day, 86_400, day_reset, &mut best)?;
    quota_check(
        LimitName::Monthly,
        plan.monthly,
        counts.month,
        month_secs,
        month_reset,
        &mut best,
    )?;
    if let Some(group) = group {
        quota_check(
            LimitName::GroupDaily(group.name.clone()),
            group.daily,
            counts.group_day,
            86_400,
            day_reset,
            &mut best,
        )?;
        quota_check(
            LimitName::GroupMonthly(group.name.clone()),
            group.monthly,
            counts.group_month,
            month_secs,
            month_reset,
            &mut best,
        )?;
    }
    Ok(best)
}

/// Decides the rate limit for a subject whose stored arrival time is `tat`.
pub fn check_rate(gcra: &Gcra, tat: u64, now: Now) -> Result<(RateAdmit, LimitStatus), Rejection> {
    let status = |remaining, reset_ns: u64| LimitStatus {
        name: LimitName::Rate,
        quota: u64::from(gcra.burst),
        window_secs: gcra.window_secs(),
        remaining,
        reset_secs: reset_ns.div_ceil(NANOS),
    };
    match gcra.check(tat, now.0) {
        Ok(admit) => Ok((admit, status(admit.remaining, admit.reset_ns))),
        Err(wait_ns) => Err(Rejection {
            kind: RejectKind::RateLimited,
            retry_after: wait_ns.div_ceil(NANOS).max(1),
            status: status(0, tat.saturating_sub(now.0)),
        }),
    }
}

#[cfg(test)]
impl PlanLimits {
    /// A plan named `p` with these quotas and no rate limit.
    pub(crate) fn with_quotas(daily: Option<u64>, monthly: Option<u64>) -> PlanLimits {
        PlanLimits {
            name: "p".into(),
            rate: None,
            daily,
            monthly,
            groups: vec![],
            decisions: Default::default(),
            on_partition: Default::default(),
            partition_allowance: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(daily: Option<u64>, monthly: Option<u64>) -> PlanLimits {
        PlanLimits::with_quotas(daily, monthly)
    }

    #[test]
    fn gcra_allows_the_burst_then_the_rate() {
        let gcra = Gcra::new(10, Some(5)).unwrap();
        let start = 1_000 * NANOS;
        let mut tat = 0;
        for expected_remaining in (0..5).rev() {
            let admit = gcra.check(tat, start).unwrap();
            assert_eq!(admit.remaining, expected_remaining);
            tat = admit.tat;
        }
        // Burst spent: the next one waits one interval (100 ms).
        assert_eq!(gcra.check(tat, start), Err(100_000_000));
        assert_eq!(gcra.check(tat, start + 99_999_999), Err(1));
        let admit = gcra.check(tat, start + 100_000_000).unwrap();
        assert_eq!(admit.remaining, 0);
        // At the steady rate (one per 100 ms) every request passes.
        tat = admit.tat;
        for i in 2..50u64 {
            let admit = gcra.check(tat, start + i * 100_000_000).unwrap();
            tat = admit.tat;
        }
        // After a quiet half second the burst is back.
        let admit = gcra.check(tat, start + 60 * 100_000_000).unwrap();
        assert_eq!(admit.remaining, 4);
        assert_eq!(gcra.window_secs(), 1);
        assert_eq!(Gcra::new(2, Some(10)).unwrap().window_secs(), 5);
        assert_eq!(Gcra::new(0, None), None);
        assert_eq!(Gcra::new(3, None).unwrap().burst, 3);
    }

    #[test]
    fn the_fastest_rates_never_divide_by_zero() {
        for per_second in [1_000_000_000, 1_000_000_001, u32::MAX] {
            let gcra = Gcra::new(per_second, Some(5)).unwrap();
            let now = Now::from_secs(1_000);
            let (admit, status) = check_rate(&gcra, 0, now).unwrap();
            assert_eq!(status.remaining, 4);
            assert!(check_rate(&gcra, admit.tat, now).is_ok());
            assert_eq!(gcra.window_secs(), 1);
        }
    }

    #[test]
    fn a_rate_shared_by_nodes_is_divided() {
        let gcra = Gcra::new(10, Some(10)).unwrap();
        assert_eq!(gcra.shared(1), gcra);
        let third = gcra.shared(3);
        // 10/s over 3 nodes: one request per 300 ms here, a burst of 4 (rounded up).
        assert_eq!((third.per_second, third.burst), (3, 4));
        let start = 1_000 * NANOS;
        let mut tat = 0;
        for _ in 0..4 {
            tat = third.check(tat, start).unwrap().tat;
        }
        assert_eq!(third.check(tat, start), Err(300_000_000));
        // More nodes than requests per second: still one request per node per window.
        let many = Gcra::new(2, Some(2)).unwrap().shared(5);
        assert_eq!((many.per_second, many.burst), (1, 1));
        assert_eq!(Gcra::new(5, None).unwrap().shared(0), Gcra::new(5, None).unwrap());
    }

    #[test]
    fn rate_rejection_says_when_to_retry() {
        let gcra = Gcra::new(1, Some(1)).unwrap();
        let now = Now::from_secs(50);
        let (admit, status) = check_rate(&gcra, 0, now).unwrap();
        assert_eq!((status.remaining, status.reset_secs, status.quota), (0, 1, 1));
        let rejection = check_rate(&gcra, admit.tat, now).unwrap_err();
        assert_eq!(rejection.kind, RejectKind::RateLimited);
        assert_eq!(rejection.retry_after, 1);
    }

    #[test]
    fn quotas_admit_exactly_up_to_the_limit() {
        let plan = plan(Some(3), Some(100));
        let now = Now::from_secs(u64::from(window::parse_day("2026-11-23").unwrap()) * 86_400 + 86_000);
        for used in 0..3 {
            let status = check_quotas(
                &plan,
                None,
                &Counts {
                    day: used,
                    month: used,
                    ..Default::default()
                },
                now,
            )
            .unwrap()
            .unwrap();
            assert_eq!(status.name, LimitName::Daily);
            assert_eq!(status.remaining, 2 - used);
            assert_eq!(status.reset_secs, 400);
        }
        let rejection = check_quotas(
            &plan,
            None,
            &Counts {
                day: 3,
                month: 3,
                ..Default::default()
            },
            now,
        )
        .unwrap_err();
        assert_eq!(rejection.kind, RejectKind::QuotaExceeded);
        assert_eq!(rejection.status.name, LimitName::Daily);
        assert_eq!((rejection.status.quota, rejection.retry_after), (3, 400));
        // The monthly quota is the closer one when little of it is left.
        let status = check_quotas(
            &plan,
            None,
            &Counts {
                day: 0,
                month: 98,
                ..Default::default()
            },
            now,
        )
        .unwrap()
        .unwrap();
        assert_eq!((status.name, status.remaining), (LimitName::Monthly, 1));
        assert_eq!(status.window_secs, 30 * 86_400);
        let rejection = check_quotas(
            &plan,
            None,
            &Counts {
                day: 0,
                month: 100,
                ..Default::default()
            },
            now,
        )
        .unwrap_err();
        assert_eq!(rejection.status.name, LimitName::Monthly);
        assert_eq!(rejection.retry_after, 7 * 86_400 + 400);
    }

    #[test]
    fn group_quotas_apply_to_their_routes() {
        let mut plan = plan(None, None);
        plan.groups.push(GroupLimits {
            name: "batch".into(),
            daily: Some(2),
            monthly: None,
        });
        let now = Now::from_secs(0);
        let group = plan.group(Some("batch"));
        assert!(group.is_some() && plan.group(Some("other")).is_none() && plan.group(None).is_none());
        let counts = Counts {
            group_day: 2,
            ..Default::default()
        };
        let rejection = check_quotas(&plan, group, &counts, now).unwrap_err();
        assert_eq!(rejection.status.name.policy(), "batch-daily");
        assert_eq!(check_quotas(&plan, None, &counts, now), Ok(None));
    }
}
