//! Plans compiled for the request path: the configuration's plans, overridden by stored
//! ones of the same name, each with this node's share of its rate limit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::DEFAULT_PLAN;
use super::Gateway;
use crate::config::Config;
use crate::limits::{PlanLimits, PlanTable};
use crate::metrics::Metrics;
use crate::model::{Plan, StateData};

/// Every plan: the file's, overridden by stored ones of the same name.
pub(super) fn effective(config: &Config, data: &StateData) -> BTreeMap<String, Plan> {
    let mut plans = data.plans.clone();
    for (name, plan) in &config.plans {
        plans.entry(name.clone()).or_insert_with(|| file_plan(name, plan));
    }
    plans
}

/// A `[plans.NAME]` section as a plan.
fn file_plan(name: &str, plan: &crate::config::PlanSection) -> Plan {
    Plan {
        name: name.to_string(),
        rate_per_second: plan.rate.as_ref().map(|r| r.per_second),
        burst: plan.rate.as_ref().and_then(|r| r.burst),
        daily: plan.daily,
        monthly: plan.monthly,
        groups: plan.groups.clone(),
        on_partition: plan.on_partition,
        partition_allowance: plan.partition_allowance,
    }
}

/// `rate_share`: how many live nodes share each plan's rate limit.
pub(super) fn compile(config: &Config, data: &StateData, metrics: &Metrics, rate_share: u32) -> PlanTable {
    let plans = effective(config, data);
    PlanTable::new(
        plans
            .values()
            .map(|plan| PlanLimits::from_plan(plan, rate_share, metrics.plan(&plan.name))),
        DEFAULT_PLAN,
        metrics.plan(DEFAULT_PLAN),
    )
}

impl Gateway {
    /// Every plan: the file's, overridden by stored ones of the same name.
    pub fn effective_plans(&self) -> BTreeMap<String, Plan> {
        effective(&self.snapshot().config, &self.read_data())
    }

    /// One plan as `effective_plans` has it (a stored plan overrides the file's).
    pub fn effective_plan(&self, name: &str) -> Option<Plan> {
        if let Some(stored) = self.read_data().plans.get(name) {
            return Some(stored.clone());
        }
        self.snapshot().config.plans.get(name).map(|plan| file_plan(name, plan))
    }

    /// Recompiles the request path's plans after a plan write or a reload; applies to the
    /// next request, and usage counts are untouched.
    pub(super) fn rebuild_plans(&self, data: &StateData) {
        let snapshot = self.snapshot();
        let share = self.rate_share.load(Ordering::Relaxed);
        let table = compile(&snapshot.config, data, &self.metrics, share);
        self.usage.table.set_anonymous_month(
            table
                .get(&snapshot.config.anonymous.plan)
                .is_some_and(|p| p.tracks_month()),
        );
        self.usage
            .table
            .set_max_anonymous(snapshot.config.anonymous.max_subjects);
        self.plans.store(Arc::new(table));
    }

    /// `[cluster] divide_rate`: each plan's rate limit is shared by `nodes` live nodes from
    /// the next request on.
    pub fn set_rate_share(&self, nodes: u32) {
        let nodes = nodes.max(1);
        if self.rate_share.swap(nodes, Ordering::Relaxed) != nodes {
            // Under the write lock: rebuilds never race each other to the store.
            self.rebuild_plans(&self.write_data());
            tracing::info!(nodes, "rate limits now shared by this many live nodes");
        }
    }
}
