//! The embedded default backend: one SQLite file under `data_dir`.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use super::{ApiKey, Consumer, Plan, StateBackend, StateData, StateError};

pub struct SqliteBackend {
    // Admin writes are rare and run on the blocking pool; one connection is enough.
    conn: Mutex<Connection>,
}

const KEY_COLUMNS: &str = "id, consumer, plan, hash, prefix, created_at, expires_at, allowed_routes, revoked";

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

fn backend_error(e: rusqlite::Error) -> StateError {
    StateError::Backend(e.to_string())
}

impl SqliteBackend {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StateError::Backend(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(backend_error)?;
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
                 allowed_routes TEXT NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);",
        )
        .map_err(backend_error)?;
        Ok(SqliteBackend { conn: Mutex::new(conn) })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StateError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&conn).map_err(backend_error)
    }
}

impl StateBackend for SqliteBackend {
    fn load(&self) -> Result<StateData, StateError> {
        self.with(|c| {
            let mut data = StateData::default();
            let mut stmt = c.prepare("SELECT name, rate_per_second, burst, daily, monthly FROM plans")?;
            for plan in stmt.query_map([], |r| {
                Ok(Plan {
                    name: r.get(0)?,
                    rate_per_second: r.get(1)?,
                    burst: r.get(2)?,
                    daily: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    monthly: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
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
                "INSERT INTO plans (name, rate_per_second, burst, daily, monthly) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(name) DO UPDATE SET rate_per_second = ?2, burst = ?3, daily = ?4, monthly = ?5",
                params![
                    plan.name,
                    plan.rate_per_second,
                    plan.burst,
                    plan.daily.map(|v| v as i64),
                    plan.monthly.map(|v| v as i64)
                ],
            )
            .map(|_| ())
        })
    }

    fn delete_plan(&self, name: &str) -> Result<(), StateError> {
        match self.with(|c| c.execute("DELETE FROM plans WHERE name = ?1", params![name]))? {
            0 => Err(StateError::NotFound(format!("plan {name}"))),
            _ => Ok(()),
        }
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
        if deleted == 0 {
            return Err(StateError::NotFound(format!("consumer {id}")));
        }
        Ok(())
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
        self.with(|c| {
            c.execute(
                "INSERT INTO api_keys (id, consumer, plan, hash, prefix, created_at, expires_at, allowed_routes, revoked)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
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
        })
    }

    fn revoke_key(&self, id: &str) -> Result<(), StateError> {
        match self.with(|c| c.execute("UPDATE api_keys SET revoked = 1 WHERE id = ?1", params![id]))? {
            0 => Err(StateError::NotFound(format!("key {id}"))),
            _ => Ok(()),
        }
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
}
