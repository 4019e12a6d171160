//! The state seam: consumers, API keys and plans. The proxy never reads a backend on the
//! request path; it reads the in-memory tables in [`crate::auth`], which are rebuilt from
//! a backend at start and updated after every admin write.

pub mod nats;
mod sqlite;

use std::collections::BTreeMap;

use crate::usage::report::UsageScan;
use crate::usage::{StoredRow, UsageRow};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub use sqlite::SqliteBackend;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Plan {
    pub name: String,
    /// Requests per second (GCRA), with `burst` requests at once.
    pub rate_per_second: Option<u32>,
    pub burst: Option<u32>,
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
    /// Quotas of route groups (`group = "..."` on routes), by group name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, GroupQuota>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupQuota {
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Consumer {
    pub id: String,
    /// The plan of the consumer's keys unless a key names its own.
    pub plan: Option<String>,
    pub created_at: i64,
}

/// A stored API key: only the SHA-256 of the secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub consumer: String,
    pub plan: Option<String>,
    pub hash: [u8; 32],
    /// The readable start of the secret (`tg_live_ab12…`), to recognise a key in listings.
    pub prefix: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    /// Route names this key may call; empty = all.
    pub allowed_routes: Vec<String>,
    pub revoked: bool,
}

/// Plans and consumers, held in memory by the admin API. Keys are not: a million of them
/// are read from the backend straight into the request-path table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateData {
    pub plans: BTreeMap<String, Plan>,
    pub consumers: BTreeMap<String, Consumer>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
    #[error("state backend: {0}")]
    Backend(String),
}

/// Where consumers, keys and plans are stored. Calls block; the admin API runs them on
/// the blocking pool.
pub trait StateBackend: Send + Sync + 'static {
    /// Plans and consumers.
    fn load(&self) -> Result<StateData, StateError>;
    /// Every key, one at a time, without holding them all.
    fn for_each_key(&self, f: &mut dyn FnMut(ApiKey)) -> Result<(), StateError>;
    fn get_key(&self, id: &str) -> Result<Option<ApiKey>, StateError>;
    fn list_keys(&self) -> Result<Vec<ApiKey>, StateError>;
    fn consumer_keys(&self, consumer: &str) -> Result<Vec<ApiKey>, StateError>;
    fn put_plan(&self, plan: &Plan) -> Result<(), StateError>;
    fn delete_plan(&self, name: &str) -> Result<(), StateError>;
    fn create_consumer(&self, consumer: &Consumer) -> Result<(), StateError>;
    fn delete_consumer(&self, id: &str) -> Result<(), StateError>;
    fn create_key(&self, key: &ApiKey) -> Result<(), StateError>;
    fn revoke_key(&self, id: &str) -> Result<(), StateError>;
    /// Replaces a key's plan, expiry and routes (not its secret, consumer or revocation).
    fn update_key(&self, key: &ApiKey) -> Result<(), StateError>;
    fn update_consumer(&self, consumer: &Consumer) -> Result<(), StateError>;
    /// Writes this node's slots; a stored slot keeps the larger count (idempotent).
    fn write_usage(&self, node: &str, rows: &[UsageRow]) -> Result<(), StateError>;
    fn scan_usage(&self, scan: &UsageScan, f: &mut dyn FnMut(StoredRow)) -> Result<(), StateError>;
    /// Deletes key rows before `key_day` and anonymous rows before `anonymous_day`.
    fn prune_usage(&self, key_day: u32, anonymous_day: u32) -> Result<usize, StateError>;
    /// Whether the shared store can be reached now. A key missing from memory while it
    /// cannot is refused with 503, not 401: it may exist.
    fn available(&self) -> bool {
        true
    }
    /// Called every flush interval: catches up on anything owed to shared state (global
    /// mode publishes its outbox after an outage).
    fn sync(&self) -> Result<(), StateError> {
        Ok(())
    }
    /// Backend-specific lines for `/metrics` (Prometheus text format).
    fn render_metrics(&self, _out: &mut String) {}
}

/// A write made on another node (global mode), to apply to this node's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange {
    Plan(String, Option<Plan>),
    Consumer(String, Option<Consumer>),
    Key(ApiKey),
}

/// For unit tests and `data_dir`-less runs.
#[derive(Default)]
pub struct MemoryBackend {
    data: Mutex<MemoryData>,
}

/// (subject, scope, day, node) of a stored usage slot; the value is (consumer, count).
type SlotKey = (String, String, u32, String);

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

impl StateBackend for MemoryBackend {
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
