//! Plans, consumers and keys in SQLite; in global mode, the disk copy of the buckets.

use rusqlite::{OptionalExtension, params};

use super::{KEY_COLUMNS, SqliteBackend, insert_key, key_row, touched};
use crate::model::{ApiKey, Consumer, Plan, StateData};
use crate::state::{Catalog, StateError};

/// Global mode: a copy of the buckets, so a node starts without JetStream.
impl SqliteBackend {
    /// Writes keys to the local copy in one transaction (global mode caches plans,
    /// consumers and keys here, so a node restarted while NATS is down knows every key).
    pub fn cache_keys(&self, keys: &[ApiKey]) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            for key in keys {
                insert_key(&tx, key, true)?;
            }
            tx.commit()
        })
    }

    pub fn cache_consumer(&self, consumer: &Consumer) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO consumers (id, plan, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET plan = ?2",
                params![consumer.id, consumer.plan, consumer.created_at],
            )
            .map(|_| ())
        })
    }

    /// The stamp (HLC, node) of the last write applied to a catalog record (global mode).
    pub fn clock(&self, kind: &str, id: &str) -> Result<Option<(u64, String)>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT hlc, node FROM catalog_clock WHERE kind = ?1 AND id = ?2",
                params![kind, id],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()
        })
    }

    pub fn set_clock(&self, kind: &str, id: &str, hlc: u64, node: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO catalog_clock (kind, id, hlc, node) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (kind, id) DO UPDATE SET hlc = ?3, node = ?4",
                params![kind, id, hlc as i64, node],
            )
            .map(|_| ())
        })
    }

    pub fn get_consumer(&self, id: &str) -> Result<Option<Consumer>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT id, plan, created_at FROM consumers WHERE id = ?1",
                params![id],
                |r| {
                    Ok(Consumer {
                        id: r.get(0)?,
                        plan: r.get(1)?,
                        created_at: r.get(2)?,
                    })
                },
            )
            .optional()
        })
    }

    pub fn uncache_consumer(&self, id: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute("DELETE FROM consumers WHERE id = ?1", params![id])
                .map(|_| ())
        })
    }
}

impl Catalog for SqliteBackend {
    fn load(&self) -> Result<StateData, StateError> {
        self.with(|c| {
            let mut data = StateData::default();
            let mut stmt = c.prepare("SELECT name, rate_per_second, burst, daily, monthly, groups, on_partition, partition_allowance FROM plans")?;
            for plan in stmt.query_map([], |r| {
                let groups: Option<String> = r.get(5)?;
                Ok(Plan {
                    name: r.get(0)?,
                    rate_per_second: r.get(1)?,
                    burst: r.get(2)?,
                    daily: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    monthly: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                    groups: groups.and_then(|g| serde_json::from_str(&g).ok()).unwrap_or_default(),
                    on_partition: r
                        .get::<_, Option<String>>(6)?
                        .and_then(|m| serde_json::from_value(serde_json::Value::String(m)).ok()),
                    partition_allowance: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
                })
            })? {
                let plan = plan?;
                data.plans.insert(plan.name.clone(), plan);
            }
            let mut stmt = c.prepare("SELECT id, plan, created_at FROM consumers")?;
            for consumer in stmt.query_map([], |r| {
                Ok(Consumer {
                    id: r.get(0)?,
                    plan: r.get(1)?,
                    created_at: r.get(2)?,
                })
            })? {
                let consumer = consumer?;
                data.consumers.insert(consumer.id.clone(), consumer);
            }
            Ok(data)
        })
    }

    fn for_each_key(&self, f: &mut dyn FnMut(ApiKey)) -> Result<(), StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!("SELECT {KEY_COLUMNS} FROM api_keys"))?;
            for key in stmt.query_map([], key_row)? {
                f(key?);
            }
            Ok(())
        })
    }

    fn get_key(&self, id: &str) -> Result<Option<ApiKey>, StateError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
                params![id],
                key_row,
            )
            .optional()
        })
    }

    fn list_keys(&self) -> Result<Vec<ApiKey>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id"))?;
            stmt.query_map([], key_row)?.collect()
        })
    }

    fn consumer_keys(&self, consumer: &str) -> Result<Vec<ApiKey>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE consumer = ?1"))?;
            stmt.query_map(params![consumer], key_row)?.collect()
        })
    }

    fn put_plan(&self, plan: &Plan) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO plans (name, rate_per_second, burst, daily, monthly, groups, on_partition, partition_allowance)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(name) DO UPDATE SET rate_per_second = ?2, burst = ?3, daily = ?4, monthly = ?5,
                 groups = ?6, on_partition = ?7, partition_allowance = ?8",
                params![
                    plan.name,
                    plan.rate_per_second,
                    plan.burst,
                    plan.daily.map(|v| v as i64),
                    plan.monthly.map(|v| v as i64),
                    (!plan.groups.is_empty()).then(|| serde_json::to_string(&plan.groups).unwrap_or_default()),
                    plan.on_partition.map(|m| match m {
                        crate::model::PartitionMode::Available => "available",
                        crate::model::PartitionMode::Strict => "strict",
                    }),
                    plan.partition_allowance.map(|v| v as i64)
                ],
            )
            .map(|_| ())
        })
    }

    fn delete_plan(&self, name: &str) -> Result<(), StateError> {
        let rows = self.with(|c| c.execute("DELETE FROM plans WHERE name = ?1", params![name]))?;
        touched(rows, || format!("plan {name}"))
    }

    fn create_consumer(&self, consumer: &Consumer) -> Result<(), StateError> {
        let exists = self.with(|c| {
            c.query_row(
                "SELECT 1 FROM consumers WHERE id = ?1",
                params![consumer.id],
                |_| Ok(()),
            )
            .optional()
        })?;
        if exists.is_some() {
            return Err(StateError::Conflict(format!("consumer {}", consumer.id)));
        }
        self.with(|c| {
            c.execute(
                "INSERT INTO consumers (id, plan, created_at) VALUES (?1, ?2, ?3)",
                params![consumer.id, consumer.plan, consumer.created_at],
            )
            .map(|_| ())
        })
    }

    fn delete_consumer(&self, id: &str) -> Result<(), StateError> {
        let deleted = self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let n = tx.execute("DELETE FROM consumers WHERE id = ?1", params![id])?;
            tx.execute("UPDATE api_keys SET revoked = 1 WHERE consumer = ?1", params![id])?;
            tx.commit()?;
            Ok(n)
        })?;
        touched(deleted, || format!("consumer {id}"))
    }

    fn create_key(&self, key: &ApiKey) -> Result<(), StateError> {
        let consumer = self.with(|c| {
            c.query_row("SELECT 1 FROM consumers WHERE id = ?1", params![key.consumer], |_| {
                Ok(())
            })
            .optional()
        })?;
        if consumer.is_none() {
            return Err(StateError::NotFound(format!("consumer {}", key.consumer)));
        }
        self.with(|c| insert_key(c, key, false))
    }

    fn revoke_key(&self, id: &str) -> Result<(), StateError> {
        let rows = self.with(|c| c.execute("UPDATE api_keys SET revoked = 1 WHERE id = ?1", params![id]))?;
        touched(rows, || format!("key {id}"))
    }

    fn update_key(&self, key: &ApiKey) -> Result<(), StateError> {
        let updated = self.with(|c| {
            c.execute(
                "UPDATE api_keys SET plan = ?2, expires_at = ?3, allowed_routes = ?4 WHERE id = ?1",
                params![key.id, key.plan, key.expires_at, key.allowed_routes.join(",")],
            )
        })?;
        touched(updated, || format!("key {}", key.id))
    }

    fn update_consumer(&self, consumer: &Consumer) -> Result<(), StateError> {
        let updated = self.with(|c| {
            c.execute(
                "UPDATE consumers SET plan = ?2 WHERE id = ?1",
                params![consumer.id, consumer.plan],
            )
        })?;
        touched(updated, || format!("consumer {}", consumer.id))
    }
}
