//! The embedded default backend: one SQLite file under `data_dir`.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use super::{Catalog, StateError, UsageStore};
use crate::model::{ApiKey, Consumer, Plan, Scope, StateData, StoredRow, UsageRow};
use crate::usage::report::{ScopeFilter, UsageScan};

pub struct SqliteBackend {
    // Admin writes are rare and run on the blocking pool; one connection is enough for
    // them and for the usage flusher's batches.
    conn: Mutex<Connection>,
    /// Reports read on their own connection (WAL lets it run beside writes), so a long
    /// report never delays a usage flush.
    reader: Mutex<Connection>,
}

const KEY_COLUMNS: &str = "id, consumer, plan, hash, prefix, created_at, expires_at, allowed_routes, revoked";

/// A stored scope (`""`, `route:NAME`, `group:NAME`) read back.
fn scope_at(r: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Scope> {
    let text: String = r.get(index)?;
    Scope::parse(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            format!("unknown usage scope {text:?}").into(),
        )
    })
}

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ApiKey> {
    let hash: Vec<u8> = r.get(3)?;
    let routes: String = r.get(7)?;
    Ok(ApiKey {
        id: r.get(0)?,
        consumer: r.get(1)?,
        plan: r.get(2)?,
        hash: hash.try_into().unwrap_or([0; 32]),
        prefix: r.get(4)?,
        created_at: r.get(5)?,
        expires_at: r.get(6)?,
        allowed_routes: routes
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        revoked: r.get::<_, i64>(8)? != 0,
    })
}

/// Adds a column that databases written by earlier versions lack.
fn add_column(conn: &Connection, table: &str, column: &str, definition: &str) -> Result<(), StateError> {
    let present: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
            params![table, column],
            |r| r.get(0),
        )
        .map_err(backend_error)?;
    if present == 0 {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {definition}"))
            .map_err(backend_error)?;
    }
    Ok(())
}

/// Inserts a key row; `replace` updates the mutable fields of an existing one (the local
/// cache of global mode) instead of failing.
fn insert_key(c: &Connection, key: &ApiKey, replace: bool) -> rusqlite::Result<()> {
    let upsert = if replace {
        " ON CONFLICT (id) DO UPDATE SET plan = ?3, expires_at = ?7, allowed_routes = ?8, revoked = ?9"
    } else {
        ""
    };
    c.execute(
        &format!(
            "INSERT INTO api_keys (id, consumer, plan, hash, prefix, created_at, expires_at, allowed_routes, revoked)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9){upsert}"
        ),
        params![
            key.id,
            key.consumer,
            key.plan,
            &key.hash[..],
            key.prefix,
            key.created_at,
            key.expires_at,
            key.allowed_routes.join(","),
            key.revoked as i64
        ],
    )
    .map(|_| ())
}

/// A write that must have touched a row: none means the thing does not exist.
fn touched(rows: usize, what: impl FnOnce() -> String) -> Result<(), StateError> {
    match rows {
        0 => Err(StateError::NotFound(what())),
        _ => Ok(()),
    }
}

fn backend_error(e: rusqlite::Error) -> StateError {
    StateError::Backend(e.to_string())
}

impl SqliteBackend {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StateError::Backend(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(backend_error)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(backend_error)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS plans (
                 name TEXT PRIMARY KEY, rate_per_second INTEGER, burst INTEGER,
                 daily INTEGER, monthly INTEGER);
             CREATE TABLE IF NOT EXISTS consumers (
                 id TEXT PRIMARY KEY, plan TEXT, created_at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS api_keys (
                 id TEXT PRIMARY KEY, consumer TEXT NOT NULL, plan TEXT, hash BLOB NOT NULL UNIQUE,
                 prefix TEXT NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER,
                 allowed_routes TEXT NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS usage (
                 subject TEXT NOT NULL, scope TEXT NOT NULL, day INTEGER NOT NULL, node TEXT NOT NULL,
                 consumer TEXT, count INTEGER NOT NULL,
                 PRIMARY KEY (subject, scope, day, node)) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS usage_by_day ON usage (day);
             CREATE INDEX IF NOT EXISTS usage_by_consumer ON usage (consumer, day) WHERE consumer IS NOT NULL;",
        )
        .map_err(backend_error)?;
        // Databases created before plans had route-group quotas.
        add_column(&conn, "plans", "groups", "TEXT")?;
        // Global mode: how much of each own slot NATS has acknowledged, and where this
        // node's replay of the usage stream stands.
        add_column(&conn, "usage", "published", "INTEGER NOT NULL DEFAULT 0")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS usage_outbox ON usage (node) WHERE count > published;",
        )
        .map_err(backend_error)?;
        let reader = Connection::open(path).map_err(backend_error)?;
        reader
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(backend_error)?;
        Ok(SqliteBackend {
            conn: Mutex::new(conn),
            reader: Mutex::new(reader),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StateError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&conn).map_err(backend_error)
    }
}

/// Global-mode bookkeeping on top of the usage table.
impl SqliteBackend {
    /// Own slots whose count NATS has not acknowledged yet (the outbox, kept on disk).
    pub fn unpublished(&self, node: &str, limit: usize) -> Result<Vec<UsageRow>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT subject, scope, day, consumer, count FROM usage
                 WHERE node = ?1 AND count > published LIMIT ?2",
            )?;
            stmt.query_map(params![node, limit as i64], |r| {
                Ok(UsageRow {
                    subject: r.get(0)?,
                    scope: scope_at(r, 1)?,
                    day: r.get(2)?,
                    consumer: r.get(3)?,
                    count: r.get::<_, i64>(4)?.max(0) as u64,
                })
            })?
            .collect()
        })
    }

    pub fn unpublished_count(&self, node: &str) -> Result<u64, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM usage WHERE node = ?1 AND count > published",
                params![node],
                |r| r.get::<_, i64>(0),
            )
        })
        .map(|n| n.max(0) as u64)
    }

    pub fn mark_published(&self, node: &str, rows: &[UsageRow]) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            {
                let mut update = tx.prepare_cached(
                    "UPDATE usage SET published = max(published, ?5)
                     WHERE subject = ?1 AND scope = ?2 AND day = ?3 AND node = ?4",
                )?;
                for row in rows {
                    update.execute(params![
                        row.subject,
                        row.scope.to_string(),
                        row.day,
                        node,
                        row.count as i64
                    ])?;
                }
            }
            tx.commit()
        })
    }

    /// Merges another node's slots (max per slot) and returns, per row, by how much the
    /// stored slot grew: replays and duplicates grow nothing.
    pub fn merge_usage(&self, node: &str, rows: &[UsageRow]) -> Result<Vec<u64>, StateError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let mut grown = Vec::with_capacity(rows.len());
            {
                let mut read = tx.prepare_cached(
                    "SELECT count FROM usage WHERE subject = ?1 AND scope = ?2 AND day = ?3 AND node = ?4",
                )?;
                let mut upsert = tx.prepare_cached(
                    "INSERT INTO usage (subject, scope, day, node, consumer, count, published) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
                     ON CONFLICT (subject, scope, day, node) DO UPDATE SET count = max(count, excluded.count),
                       published = max(published, excluded.count)",
                )?;
                for row in rows {
                    let before: i64 = read
                        .query_row(params![row.subject, row.scope.to_string(), row.day, node], |r| r.get(0))
                        .optional()?
                        .unwrap_or(0);
                    let before = before.max(0) as u64;
                    if row.count > before {
                        upsert.execute(params![
                            row.subject,
                            row.scope.to_string(),
                            row.day,
                            node,
                            row.consumer,
                            row.count as i64
                        ])?;
                    }
                    grown.push(row.count.saturating_sub(before));
                }
            }
            tx.commit()?;
            Ok(grown)
        })
    }

    pub fn meta(&self, name: &str) -> Result<Option<u64>, StateError> {
        self.with(|c| {
            c.query_row("SELECT value FROM meta WHERE name = ?1", params![name], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
        })
        .map(|v| v.map(|v| v.max(0) as u64))
    }

    pub fn set_meta(&self, name: &str, value: u64) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO meta (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET value = ?2",
                params![name, value as i64],
            )
            .map(|_| ())
        })
    }

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

    /// Replaces the cached plans and consumers with `data` (what the cluster holds now).
    pub fn cache_state(&self, data: &StateData) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute("DELETE FROM consumers", [])?;
            for consumer in data.consumers.values() {
                tx.execute(
                    "INSERT INTO consumers (id, plan, created_at) VALUES (?1, ?2, ?3)",
                    params![consumer.id, consumer.plan, consumer.created_at],
                )?;
            }
            tx.commit()
        })?;
        // Plans through the backend's own write, which knows their columns.
        let stale: Vec<String> = self
            .load()?
            .plans
            .into_keys()
            .filter(|name| !data.plans.contains_key(name))
            .collect();
        for name in stale {
            self.delete_plan(&name)?;
        }
        for plan in data.plans.values() {
            self.put_plan(plan)?;
        }
        Ok(())
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
            let mut stmt = c.prepare("SELECT name, rate_per_second, burst, daily, monthly, groups FROM plans")?;
            for plan in stmt.query_map([], |r| {
                let groups: Option<String> = r.get(5)?;
                Ok(Plan {
                    name: r.get(0)?,
                    rate_per_second: r.get(1)?,
                    burst: r.get(2)?,
                    daily: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    monthly: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                    groups: groups.and_then(|g| serde_json::from_str(&g).ok()).unwrap_or_default(),
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
                "INSERT INTO plans (name, rate_per_second, burst, daily, monthly, groups) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name) DO UPDATE SET rate_per_second = ?2, burst = ?3, daily = ?4, monthly = ?5, groups = ?6",
                params![
                    plan.name,
                    plan.rate_per_second,
                    plan.burst,
                    plan.daily.map(|v| v as i64),
                    plan.monthly.map(|v| v as i64),
                    (!plan.groups.is_empty()).then(|| serde_json::to_string(&plan.groups).unwrap_or_default())
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

impl UsageStore for SqliteBackend {
    fn write_usage(&self, node: &str, rows: &[UsageRow]) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            {
                let mut upsert = tx.prepare_cached(
                    "INSERT INTO usage (subject, scope, day, node, consumer, count) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (subject, scope, day, node) DO UPDATE SET count = max(count, excluded.count)",
                )?;
                for row in rows {
                    upsert.execute(params![
                        row.subject,
                        row.scope.to_string(),
                        row.day,
                        node,
                        row.consumer,
                        row.count as i64
                    ])?;
                }
            }
            tx.commit()
        })
    }

    fn scan_usage(&self, scan: &UsageScan, f: &mut dyn FnMut(StoredRow)) -> Result<(), StateError> {
        use rusqlite::types::Value;
        let mut sql =
            String::from("SELECT subject, scope, day, node, consumer, count FROM usage WHERE day BETWEEN ?1 AND ?2");
        let mut values = vec![
            Value::from(i64::from(scan.from_day)),
            Value::from(i64::from(scan.to_day)),
        ];
        let mut bind = |sql: &mut String, clause: &str, value: Value| {
            values.push(value);
            sql.push_str(&clause.replace('?', &format!("?{}", values.len())));
        };
        if let Some(subject) = &scan.subject {
            bind(&mut sql, " AND subject = ?", Value::from(subject.clone()));
        }
        if let Some(prefix) = scan.subject_prefix {
            // Prefix ranges use the primary key, unlike LIKE.
            bind(&mut sql, " AND subject >= ?", Value::from(prefix.to_string()));
            let mut end = prefix.to_string();
            end.pop();
            end.push(';');
            bind(&mut sql, " AND subject < ?", Value::from(end));
        }
        if let Some(consumer) = &scan.consumer {
            bind(&mut sql, " AND consumer = ?", Value::from(consumer.clone()));
        }
        match &scan.scope {
            ScopeFilter::All => {}
            ScopeFilter::Total => sql.push_str(" AND scope = ''"),
            ScopeFilter::AnyRoute => sql.push_str(" AND scope >= 'route:' AND scope < 'route;'"),
            ScopeFilter::Route(route) => bind(
                &mut sql,
                " AND scope = ?",
                Value::from(Scope::Route(route.as_str().into()).to_string()),
            ),
        }
        let conn = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        let mut stmt = conn.prepare(&sql).map_err(backend_error)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(values), |r| {
                Ok(StoredRow {
                    row: UsageRow {
                        subject: r.get(0)?,
                        scope: scope_at(r, 1)?,
                        day: r.get(2)?,
                        consumer: r.get(4)?,
                        count: r.get::<_, i64>(5)?.max(0) as u64,
                    },
                    node: r.get(3)?,
                })
            })
            .map_err(backend_error)?;
        for row in rows {
            f(row.map_err(backend_error)?);
        }
        Ok(())
    }

    fn prune_usage(&self, key_day: u32, anonymous_day: u32) -> Result<usize, StateError> {
        self.with(|c| {
            let keys = c.execute(
                "DELETE FROM usage WHERE day < ?1 AND subject >= 'key:' AND subject < 'key;'",
                params![key_day],
            )?;
            let anonymous = c.execute(
                "DELETE FROM usage WHERE day < ?1 AND NOT (subject >= 'key:' AND subject < 'key;')",
                params![anonymous_day],
            )?;
            Ok(keys + anonymous)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_key(id: &str, consumer: &str) -> ApiKey {
        ApiKey {
            id: id.to_string(),
            consumer: consumer.to_string(),
            plan: Some("pro".into()),
            hash: [7; 32],
            prefix: "tg_live_0123".into(),
            created_at: 1,
            expires_at: Some(99),
            allowed_routes: vec!["lookup".into(), "batch".into()],
            revoked: false,
        }
    }

    #[test]
    fn data_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let db = SqliteBackend::open(&path).unwrap();
            db.put_plan(&Plan {
                name: "pro".into(),
                rate_per_second: Some(100),
                burst: Some(200),
                daily: None,
                monthly: Some(2_000_000),
                groups: [(
                    "batch".to_string(),
                    crate::model::GroupQuota {
                        daily: Some(5),
                        monthly: None,
                    },
                )]
                .into(),
            })
            .unwrap();
            db.create_consumer(&Consumer {
                id: "acme".into(),
                plan: None,
                created_at: 1,
            })
            .unwrap();
            assert!(matches!(
                db.create_consumer(&Consumer {
                    id: "acme".into(),
                    plan: None,
                    created_at: 2
                }),
                Err(StateError::Conflict(_))
            ));
            db.create_key(&sample_key("key_1", "acme")).unwrap();
            assert!(matches!(
                db.create_key(&sample_key("key_2", "nobody")),
                Err(StateError::NotFound(_))
            ));
            db.revoke_key("key_1").unwrap();
        }
        let db = SqliteBackend::open(&path).unwrap();
        let data = db.load().unwrap();
        assert_eq!(data.plans["pro"].monthly, Some(2_000_000));
        assert_eq!(data.plans["pro"].groups["batch"].daily, Some(5));
        assert_eq!(data.consumers["acme"].created_at, 1);
        let key = &db.get_key("key_1").unwrap().unwrap();
        assert_eq!(db.list_keys().unwrap().len(), 1);
        assert_eq!(db.consumer_keys("acme").unwrap().len(), 1);
        let mut streamed = 0;
        db.for_each_key(&mut |_| streamed += 1).unwrap();
        assert_eq!(streamed, 1);
        assert!(key.revoked);
        assert_eq!(key.allowed_routes, vec!["lookup", "batch"]);
        assert_eq!(key.hash, [7; 32]);
        db.delete_consumer("acme").unwrap();
        assert!(matches!(db.delete_consumer("acme"), Err(StateError::NotFound(_))));
    }

    #[test]
    fn usage_slots_keep_the_larger_count_and_scan_by_filter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let row = |subject: &str, scope: &str, day, count| UsageRow {
            subject: subject.into(),
            consumer: subject.starts_with("key:").then(|| "acme".to_string()),
            scope: Scope::parse(scope).unwrap(),
            day,
            count,
        };
        {
            let db = SqliteBackend::open(&path).unwrap();
            db.write_usage("n1", &[row("key:a", "", 10, 5), row("key:a", "route:lookup", 10, 5)])
                .unwrap();
            // A replayed, older value never lowers a slot.
            db.write_usage("n1", &[row("key:a", "", 10, 3), row("ip:10.0.0.1", "", 10, 2)])
                .unwrap();
            db.write_usage("n2", &[row("key:a", "", 10, 4), row("referer:x.com", "", 3, 1)])
                .unwrap();
        }
        let db = SqliteBackend::open(&path).unwrap();
        let scan = |subject_prefix, scope| UsageScan {
            from_day: 0,
            to_day: 100,
            subject: None,
            subject_prefix,
            consumer: None,
            scope,
        };
        let mut seen = Vec::new();
        db.scan_usage(&scan(Some("key:"), ScopeFilter::Total), &mut |r| {
            seen.push((r.node, r.row.count))
        })
        .unwrap();
        seen.sort();
        assert_eq!(seen, vec![("n1".to_string(), 5), ("n2".to_string(), 4)]);
        let mut routes = 0;
        db.scan_usage(&scan(None, ScopeFilter::AnyRoute), &mut |_| routes += 1)
            .unwrap();
        assert_eq!(routes, 1);
        let mut all = 0;
        db.scan_usage(&scan(None, ScopeFilter::All), &mut |_| all += 1).unwrap();
        assert_eq!(all, 5);
        // Key rows are kept longer than anonymous ones.
        assert_eq!(db.prune_usage(5, 11).unwrap(), 2);
        let mut left = Vec::new();
        db.scan_usage(&scan(None, ScopeFilter::All), &mut |r| left.push(r.row.subject))
            .unwrap();
        assert!(left.iter().all(|s| s == "key:a") && left.len() == 3);
    }
}
