//! Writes made on other nodes (global mode), applied to this node's tables and kept on its
//! disk so a restart does not depend on the cluster being reachable.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{DEFAULT_PLAN, Gateway};
use crate::base::{Shutdown, stopped};
use crate::model::ApiKey;
use crate::state::{Replica, StateChange};

/// Keys reach the disk cache in batches of at most this many: a replay of a whole bucket
/// (a node that started from its disk attaching) would otherwise be one transaction per key.
const CACHE_BATCH: usize = 1_000;

impl Gateway {
    /// Applies `changes` until the replica stops sending them or `shutdown` turns.
    pub async fn apply_changes(
        self: Arc<Self>,
        mut changes: mpsc::UnboundedReceiver<StateChange>,
        replica: Arc<dyn Replica>,
        mut shutdown: Shutdown,
    ) {
        // The buckets are watched separately, so a key can arrive before its consumer;
        // it waits here (refused meanwhile) and is applied when the consumer arrives.
        let mut orphans: HashMap<String, Vec<ApiKey>> = HashMap::new();
        let mut uncached_keys = Vec::new();
        loop {
            let change = tokio::select! {
                change = changes.recv() => change,
                _ = stopped(&mut shutdown) => None,
            };
            let Some(change) = change else { break };
            match change {
                StateChange::Plan(name, plan) => self.apply_plan(&replica, name, plan).await,
                StateChange::Consumer(id, consumer) => {
                    let waiting = orphans.remove(&id).unwrap_or_default();
                    self.apply_consumer(&replica, id, consumer, waiting).await;
                }
                StateChange::Key(key) => {
                    let data = self.write_data();
                    self.keys.upsert(&key, &data, DEFAULT_PLAN);
                    if !data.consumers.contains_key(&key.consumer) {
                        orphans.entry(key.consumer.clone()).or_default().push(key.clone());
                    }
                    uncached_keys.push(key);
                }
            }
            if !uncached_keys.is_empty() && (changes.is_empty() || uncached_keys.len() >= CACHE_BATCH) {
                cache_keys(&replica, std::mem::take(&mut uncached_keys)).await;
            }
        }
        if !uncached_keys.is_empty() {
            cache_keys(&replica, uncached_keys).await;
        }
    }

    async fn apply_plan(&self, replica: &Arc<dyn Replica>, name: String, plan: Option<crate::model::Plan>) {
        if let Some(plan) = &plan {
            let cached = plan.clone();
            let replica = replica.clone();
            if let Ok(Err(error)) = tokio::task::spawn_blocking(move || replica.cache_plan(&cached)).await {
                tracing::warn!(%error, "replicated plan not cached on disk");
            }
        }
        let mut data = self.write_data();
        match plan {
            Some(plan) => data.plans.insert(name, plan),
            None => data.plans.remove(&name),
        };
        self.rebuild_plans(&data);
    }

    /// A consumer created, changed or deleted elsewhere; `waiting` are keys that arrived
    /// before it.
    async fn apply_consumer(
        &self,
        replica: &Arc<dyn Replica>,
        id: String,
        consumer: Option<crate::model::Consumer>,
        waiting: Vec<ApiKey>,
    ) {
        let (existed, plan_changed) = {
            let data = self.read_data();
            let old = data.consumers.get(&id);
            (
                old.is_some(),
                old.map(|c| &c.plan) != consumer.as_ref().map(|c| &c.plan),
            )
        };
        let catalog = self.catalog.clone();
        let replica = replica.clone();
        let (cached, owner) = (consumer.clone(), id.clone());
        // Keys follow their consumer's plan (and die with it).
        let keys = tokio::task::spawn_blocking(move || {
            if let Err(error) = replica.cache_consumer(&owner, cached.as_ref()) {
                tracing::warn!(%error, "replicated consumer not cached on disk");
            }
            (existed && plan_changed)
                .then(|| catalog.consumer_keys(&owner).ok())
                .flatten()
        })
        .await
        .ok()
        .flatten();
        let mut data = self.write_data();
        let present = consumer.is_some();
        match consumer {
            Some(consumer) => data.consumers.insert(id, consumer),
            None => data.consumers.remove(&id),
        };
        for key in keys.unwrap_or_default() {
            self.keys.upsert(&key, &data, DEFAULT_PLAN);
        }
        // Waiting keys are applied when their consumer arrives, dropped when it is deleted
        // (they stay refused either way until then).
        if present {
            for key in waiting {
                self.keys.upsert(&key, &data, DEFAULT_PLAN);
            }
        }
    }
}

async fn cache_keys(replica: &Arc<dyn Replica>, keys: Vec<ApiKey>) {
    let replica = replica.clone();
    if let Ok(Err(error)) = tokio::task::spawn_blocking(move || replica.cache_keys(&keys)).await {
        tracing::warn!(%error, "replicated keys not cached on disk");
    }
}
