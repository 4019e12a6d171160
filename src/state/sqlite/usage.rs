//! Usage slots in SQLite: written with the larger count kept, scanned for reports; in
//! global mode also the outbox of slots NATS has not acknowledged, and every node's slots
//! merged from the usage stream.

use rusqlite::{OptionalExtension, params};

use super::{SqliteBackend, backend_error, scope_at};
use crate::model::{Scope, StoredRow, UsageRow};
use crate::state::{StateError, UsageStore};
use crate::usage::report::{ScopeFilter, UsageScan};

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

    /// Names of the meta rows that start with `prefix`.
    pub fn meta_names(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT name FROM meta WHERE substr(name, 1, length(?1)) = ?1")?;
            stmt.query_map(params![prefix], |r| r.get(0))?.collect()
        })
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
