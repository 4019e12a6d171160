//! Writes made on other nodes (global mode), applied to this node's tables (the replica
//! has already kept them on its disk, merged).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{DEFAULT_PLAN, Gateway};
use crate::base::{Shutdown, stopped};
use crate::model::ApiKey;
use crate::state::StateChange;

impl Gateway {
    /// Applies `changes` until the replica stops sending them or `shutdown` turns.
    pub async fn apply_changes(
        self: Arc<Self>,
        mut changes: mpsc::UnboundedReceiver<StateChange>,
        mut shutdown: Shutdown,
    ) {
        // The buckets are watched separately, so a key can arrive before its consumer;
        // it waits here (refused meanwhile) and is applied when the consumer arrives.
        let mut orphans: HashMap<String, Vec<ApiKey>> = HashMap::new();
        loop {
            let change = tokio::select! {
                change = changes.recv() => change,
                _ = stopped(&mut shutdown) => None,
            };
            let Some(change) = change else { break };
            match change {
                StateChange::Plan(name, plan) => self.apply_plan(name, plan),
                StateChange::Consumer(id, consumer) => {
                    let waiting = orphans.remove(&id).unwrap_or_default();
                    self.apply_consumer(id, consumer, waiting).await;
                }
                StateChange::Key(key) => {
                    let data = self.write_data();
                    self.keys.upsert(&key, &data, DEFAULT_PLAN);
                    if !data.consumers.contains_key(&key.consumer) {
                        orphans.entry(key.consumer.clone()).or_default().push(key);
                    }
                }
            }
        }
    }

    fn apply_plan(&self, name: String, plan: Option<crate::model::Plan>) {
        let mut data = self.write_data();
        match plan {
            Some(plan) => data.plans.insert(name, plan),
            None => data.plans.remove(&name),
        };
        self.rebuild_plans(&data);
    }

    /// A consumer created, changed or deleted elsewhere; `waiting` are keys that arrived
    /// before it.
    async fn apply_consumer(&self, id: String, consumer: Option<crate::model::Consumer>, waiting: Vec<ApiKey>) {
        let (existed, plan_changed) = {
            let data = self.read_data();
            let old = data.consumers.get(&id);
            (
                old.is_some(),
                old.map(|c| &c.plan) != consumer.as_ref().map(|c| &c.plan),
            )
        };
        let catalog = self.catalog.clone();
        let owner = id.clone();
        // Keys follow their consumer's plan (and die with it).
        let keys = if existed && plan_changed {
            tokio::task::spawn_blocking(move || catalog.consumer_keys(&owner).ok())
                .await
                .ok()
                .flatten()
        } else {
            None
        };
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
