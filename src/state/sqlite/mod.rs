//! The embedded default backend: one SQLite file under `data_dir` (`catalog`: plans,
//! consumers, keys; `usage`: usage slots and the global-mode outbox).

mod catalog;
mod usage;

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, params};

use super::StateError;
use crate::model::{ApiKey, Scope};

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
        // And before plans chose what happens to their quotas during a partition.
        add_column(&conn, "plans", "on_partition", "TEXT")?;
        add_column(&conn, "plans", "partition_allowance", "INTEGER")?;
        // Global mode: how much of each own slot NATS has acknowledged, and where this
        // node's replay of the usage stream stands.
        add_column(&conn, "usage", "published", "INTEGER NOT NULL DEFAULT 0")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS catalog_clock (
                 kind TEXT NOT NULL, id TEXT NOT NULL, hlc INTEGER NOT NULL, node TEXT NOT NULL,
                 PRIMARY KEY (kind, id)) WITHOUT ROWID;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Consumer, Plan, UsageRow};
    use crate::state::{Catalog, UsageStore};
    use crate::usage::report::{ScopeFilter, UsageScan};

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
                on_partition: Some(crate::model::PartitionMode::Strict),
                partition_allowance: Some(3),
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
        assert_eq!(
            data.plans["pro"].on_partition,
            Some(crate::model::PartitionMode::Strict)
        );
        assert_eq!(data.plans["pro"].partition_allowance, Some(3));
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
