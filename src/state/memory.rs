//! An in-memory catalog and usage store, for unit tests.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Catalog, StateError, UsageStore};
use crate::model::{ApiKey, Consumer, Plan, Scope, StateData, StoredRow, UsageRow};
use crate::usage::report::UsageScan;

/// For unit tests and `data_dir`-less runs.
#[derive(Default)]
pub struct MemoryBackend {
    data: Mutex<MemoryData>,
}

/// (subject, scope, day, node) of a stored usage slot; the value is (consumer, count).
type SlotKey = (String, Scope, u32, String);

#[derive(Default)]
struct MemoryData {
    plans: BTreeMap<String, Plan>,
    consumers: BTreeMap<String, Consumer>,
    keys: BTreeMap<String, ApiKey>,
    usage: BTreeMap<SlotKey, (Option<String>, u64)>,
}

impl MemoryBackend {
    fn with<T>(&self, f: impl FnOnce(&mut MemoryData) -> Result<T, StateError>) -> Result<T, StateError> {
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut data)
    }
}

impl Catalog for MemoryBackend {
    fn load(&self) -> Result<StateData, StateError> {
        self.with(|d| {
            Ok(StateData {
                plans: d.plans.clone(),
                consumers: d.consumers.clone(),
            })
        })
    }

    fn for_each_key(&self, f: &mut dyn FnMut(ApiKey)) -> Result<(), StateError> {
        self.with(|d| {
            d.keys.values().cloned().for_each(f);
            Ok(())
        })
    }

    fn get_key(&self, id: &str) -> Result<Option<ApiKey>, StateError> {
        self.with(|d| Ok(d.keys.get(id).cloned()))
    }

    fn list_keys(&self) -> Result<Vec<ApiKey>, StateError> {
        self.with(|d| Ok(d.keys.values().cloned().collect()))
    }

    fn consumer_keys(&self, consumer: &str) -> Result<Vec<ApiKey>, StateError> {
        self.with(|d| Ok(d.keys.values().filter(|k| k.consumer == consumer).cloned().collect()))
    }

    fn put_plan(&self, plan: &Plan) -> Result<(), StateError> {
        self.with(|d| {
            d.plans.insert(plan.name.clone(), plan.clone());
            Ok(())
        })
    }

    fn delete_plan(&self, name: &str) -> Result<(), StateError> {
        self.with(|d| {
            d.plans
                .remove(name)
                .map(|_| ())
                .ok_or_else(|| StateError::NotFound(format!("plan {name}")))
        })
    }

    fn create_consumer(&self, consumer: &Consumer) -> Result<(), StateError> {
        self.with(|d| {
            if d.consumers.contains_key(&consumer.id) {
                return Err(StateError::Conflict(format!("consumer {}", consumer.id)));
            }
            d.consumers.insert(consumer.id.clone(), consumer.clone());
            Ok(())
        })
    }

    fn delete_consumer(&self, id: &str) -> Result<(), StateError> {
        self.with(|d| {
            d.consumers
                .remove(id)
                .ok_or_else(|| StateError::NotFound(format!("consumer {id}")))?;
            for key in d.keys.values_mut().filter(|k| k.consumer == id) {
                key.revoked = true;
            }
            Ok(())
        })
    }

    fn create_key(&self, key: &ApiKey) -> Result<(), StateError> {
        self.with(|d| {
            if !d.consumers.contains_key(&key.consumer) {
                return Err(StateError::NotFound(format!("consumer {}", key.consumer)));
            }
            d.keys.insert(key.id.clone(), key.clone());
            Ok(())
        })
    }

    fn revoke_key(&self, id: &str) -> Result<(), StateError> {
        self.with(|d| {
            let key = d
                .keys
                .get_mut(id)
                .ok_or_else(|| StateError::NotFound(format!("key {id}")))?;
            key.revoked = true;
            Ok(())
        })
    }

    fn update_key(&self, key: &ApiKey) -> Result<(), StateError> {
        self.with(|d| {
            let stored = d
                .keys
                .get_mut(&key.id)
                .ok_or_else(|| StateError::NotFound(format!("key {}", key.id)))?;
            stored.plan = key.plan.clone();
            stored.expires_at = key.expires_at;
            stored.allowed_routes = key.allowed_routes.clone();
            Ok(())
        })
    }

    fn update_consumer(&self, consumer: &Consumer) -> Result<(), StateError> {
        self.with(|d| {
            let stored = d
                .consumers
                .get_mut(&consumer.id)
                .ok_or_else(|| StateError::NotFound(format!("consumer {}", consumer.id)))?;
            stored.plan = consumer.plan.clone();
            Ok(())
        })
    }
}

impl UsageStore for MemoryBackend {
    fn write_usage(&self, node: &str, rows: &[UsageRow]) -> Result<(), StateError> {
        self.with(|d| {
            for row in rows {
                let slot = d
                    .usage
                    .entry((row.subject.clone(), row.scope.clone(), row.day, node.to_string()))
                    .or_insert((row.consumer.clone(), 0));
                slot.1 = slot.1.max(row.count);
            }
            Ok(())
        })
    }

    fn scan_usage(&self, scan: &UsageScan, f: &mut dyn FnMut(StoredRow)) -> Result<(), StateError> {
        let rows: Vec<StoredRow> = self.with(|d| {
            Ok(d.usage
                .iter()
                .map(|((subject, scope, day, node), (consumer, count))| StoredRow {
                    row: UsageRow {
                        subject: subject.clone(),
                        consumer: consumer.clone(),
                        scope: scope.clone(),
                        day: *day,
                        count: *count,
                    },
                    node: node.clone(),
                })
                .filter(|row| scan.matches(row))
                .collect())
        })?;
        rows.into_iter().for_each(f);
        Ok(())
    }

    fn prune_usage(&self, key_day: u32, anonymous_day: u32) -> Result<usize, StateError> {
        self.with(|d| {
            let before = d.usage.len();
            d.usage.retain(|(subject, _, day, _), _| {
                *day >= if subject.starts_with("key:") {
                    key_day
                } else {
                    anonymous_day
                }
            });
            Ok(before - d.usage.len())
        })
    }
}
