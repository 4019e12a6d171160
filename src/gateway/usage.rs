//! Moving counts between memory and the usage store: restore at start, write changed
//! slots every `usage.flush_interval`, write everything at shutdown, prune once a day.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::base::{Shutdown, stopped};
use crate::limits::window::{self, Clock};
use crate::metrics::Metrics;
use crate::model::{StoredRow, UsageRow};
use crate::state::{StateError, UsageStore};
use crate::usage::UsageTable;
use crate::usage::report::{self, ReportRow, ScopeFilter, UsageQuery, UsageScan};

/// Rows that failed to write are kept for the next attempt; past this many they are
/// compacted (one row per slot, the largest count), which loses nothing.
const COMPACT_PENDING_AT: usize = 100_000;

/// How long stored day rows are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub key_days: u32,
    pub anonymous_days: u32,
}

impl Retention {
    /// `usage.retention` and `usage.anonymous_retention`, in whole days.
    pub fn of(config: &crate::config::Config) -> Retention {
        let days = |d: Duration| (d.as_secs() / 86_400) as u32;
        Retention {
            key_days: days(config.usage.retention),
            anonymous_days: days(config.usage.anonymous_retention),
        }
    }
}

/// The usage table of this node with its persistence.
pub struct Usage {
    pub table: UsageTable,
    pub node: String,
    pub clock: Clock,
    store: Arc<dyn UsageStore>,
    metrics: Arc<Metrics>,
    retention: Retention,
    /// Collected rows not yet written; the lock also serialises flushes.
    pending: tokio::sync::Mutex<Vec<UsageRow>>,
    pruned_day: AtomicU32,
}

impl Usage {
    /// The table's gauges and counters for `/metrics`: subjects held, anonymous ones,
    /// evictions and dropped rows since the last report.
    fn report_table(&self) {
        self.metrics.usage.set_counters(self.table.len());
        self.metrics.anonymous_table(
            self.table.anonymous_len(),
            self.table.take_evictions(),
            self.table.take_rows_dropped(),
        );
    }

    pub fn new(
        node: String,
        clock: Clock,
        store: Arc<dyn UsageStore>,
        metrics: Arc<Metrics>,
        retention: Retention,
    ) -> Usage {
        let today = clock.now().day();
        Usage {
            table: UsageTable::default(),
            node,
            clock,
            store,
            metrics,
            retention,
            pending: Default::default(),
            pruned_day: AtomicU32::new(today),
        }
    }

    /// Loads this month's stored counts (blocking; called before the node is ready).
    pub fn restore(&self) -> Result<usize, StateError> {
        let now = self.clock.now();
        let today = now.day();
        let month_start = window::month_start(now.month());
        let mut restored = 0;
        let mut apply = |stored: StoredRow| {
            let own = stored.node == self.node;
            if self.table.restore(&stored, own, now) {
                restored += 1;
            }
        };
        let scan = |from_day, to_day, subject_prefix| UsageScan {
            from_day,
            to_day,
            subject: None,
            subject_prefix,
            consumer: None,
            scope: ScopeFilter::All,
        };
        self.store.scan_usage(&scan(today, today, None), &mut apply)?;
        if today > month_start {
            // Earlier days of the month feed month counters: keys always, anonymous
            // subjects only when their plan has a monthly quota.
            let mut prefixes = vec!["key:"];
            if self.table.anonymous_month() {
                prefixes.extend(["ip:", "referer:"]);
            }
            for prefix in prefixes {
                self.store
                    .scan_usage(&scan(month_start, today - 1, Some(prefix)), &mut apply)?;
            }
        }
        self.report_table();
        Ok(restored)
    }

    /// Writes every changed slot; returns how many rows were written. Failed rows stay
    /// queued for the next flush.
    pub async fn flush(&self) -> Result<usize, StateError> {
        let mut pending = self.pending.lock().await;
        self.table.collect(&mut pending);
        if pending.is_empty() {
            return Ok(0);
        }
        let rows = std::mem::take(&mut *pending);
        let store = self.store.clone();
        let node = self.node.clone();
        let started = Instant::now();
        let written = tokio::task::spawn_blocking(move || {
            let result = store.write_usage(&node, &rows);
            (rows, result)
        })
        .await;
        let took = started.elapsed();
        match written {
            Ok((rows, Ok(()))) => {
                self.metrics.usage.flushed(Ok(rows.len()), took);
                Ok(rows.len())
            }
            Ok((rows, Err(error))) => {
                self.metrics.usage.flushed(Err(()), took);
                *pending = rows;
                if pending.len() > COMPACT_PENDING_AT {
                    compact(&mut pending);
                }
                Err(error)
            }
            Err(join) => {
                self.metrics.usage.flushed(Err(()), took);
                Err(StateError::Backend(format!("usage write panicked: {join}")))
            }
        }
    }

    /// Hands what the store owes to shared state (global mode: the outbox) to it.
    pub async fn sync(&self) -> Result<(), StateError> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.sync()).await {
            Ok(result) => result,
            Err(join) => Err(StateError::Backend(join.to_string())),
        }
    }

    /// Regions the stored view has not heard from recently (global mode).
    pub fn stale_regions(&self) -> Vec<String> {
        self.store.stale_regions()
    }

    /// A usage report: this node's counts written first, then every node's stored slots
    /// summed as `query` asks.
    pub async fn report(&self, query: &UsageQuery) -> Result<Vec<ReportRow>, StateError> {
        self.flush().await?;
        let store = self.store.clone();
        let query = query.clone();
        tokio::task::spawn_blocking(move || {
            let mut stored = Vec::new();
            store
                .scan_usage(&query.scan, &mut |row| stored.push(row))
                .map(|()| report::aggregate(stored, &query))
        })
        .await
        .map_err(|e| StateError::Backend(e.to_string()))?
    }

    /// Once per UTC day: drops ended windows from memory and expired rows from the store.
    async fn prune_if_new_day(&self) {
        let now = self.clock.now();
        let day = now.day();
        if self.pruned_day.swap(day, Ordering::Relaxed) == day {
            return;
        }
        let removed = self.table.prune(now);
        let store = self.store.clone();
        let retention = self.retention;
        let deleted = tokio::task::spawn_blocking(move || {
            store.prune_usage(
                day.saturating_sub(retention.key_days),
                day.saturating_sub(retention.anonymous_days),
            )
        })
        .await;
        match deleted {
            Ok(Ok(rows)) => tracing::info!(removed, rows, "pruned ended usage windows"),
            Ok(Err(error)) => tracing::warn!(%error, "pruning stored usage failed"),
            Err(error) => tracing::warn!(%error, "pruning stored usage failed"),
        }
    }

    /// Flushes every `interval` until `shutdown`, then once more (see
    /// [`Usage::flush_for_shutdown`]).
    pub async fn run(self: Arc<Self>, interval: Duration, mut shutdown: Shutdown, force: Shutdown) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stopped(&mut shutdown) => break,
            }
            if let Err(error) = self.flush().await {
                tracing::warn!(%error, "usage flush failed; will retry");
            }
            // A failure is logged by the store; the outbox keeps the counts.
            let _ = self.sync().await;
            self.table.release_idle(self.clock.now());
            self.prune_if_new_day().await;
            self.report_table();
        }
        self.flush_for_shutdown(force).await;
    }

    /// The last flush: what is not written now is lost, so it is retried (backing off up
    /// to 5 s) for as long as it fails, until it succeeds or `force` turns (a second
    /// SIGTERM or SIGINT: the operator's call). Rows given up are logged and counted.
    pub async fn flush_for_shutdown(&self, mut force: Shutdown) {
        let mut wait = Duration::from_millis(250);
        for attempt in 0u32.. {
            match self.flush().await {
                Ok(rows) => {
                    tracing::info!(rows, "usage flushed at shutdown");
                    // What NATS does not take now stays in the on-disk outbox for the next start.
                    let _ = self.sync().await;
                    return;
                }
                Err(error) => {
                    let pending = self.pending.lock().await.len();
                    tracing::error!(%error, attempt, pending, "usage flush at shutdown failed; retrying (a second SIGTERM gives up)");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopped(&mut force) => break,
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        let mut pending = self.pending.lock().await;
        self.table.collect(&mut pending);
        self.metrics.usage.abandoned(pending.len());
        tracing::error!(rows = pending.len(), "usage rows abandoned at a forced stop");
    }
}

/// One row per (subject, scope, day) with the largest count.
fn compact(rows: &mut Vec<UsageRow>) {
    rows.sort_by(|a, b| {
        (&a.subject, &a.scope, a.day)
            .cmp(&(&b.subject, &b.scope, b.day))
            .then(b.count.cmp(&a.count))
    });
    rows.dedup_by(|later, first| {
        later.subject == first.subject && later.scope == first.scope && later.day == first.day
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_keeps_the_largest_count_per_slot() {
        let row = |subject: &str, day, count| UsageRow {
            subject: subject.into(),
            consumer: None,
            scope: crate::model::Scope::Total,
            day,
            count,
        };
        let mut rows = vec![
            row("ip:1.1.1.1", 1, 3),
            row("ip:1.1.1.1", 1, 9),
            row("ip:1.1.1.1", 2, 1),
            row("ip:1.1.1.1", 1, 4),
        ];
        compact(&mut rows);
        assert_eq!(rows, vec![row("ip:1.1.1.1", 1, 9), row("ip:1.1.1.1", 2, 1)]);
    }

    /// A store whose writes fail `failures` times, then land in memory.
    struct Flaky {
        failures: std::sync::atomic::AtomicUsize,
        written: crate::state::MemoryBackend,
    }

    impl UsageStore for Flaky {
        fn write_usage(&self, node: &str, rows: &[UsageRow]) -> Result<(), StateError> {
            let left = self.failures.load(Ordering::Relaxed);
            if left > 0 {
                self.failures.store(left - 1, Ordering::Relaxed);
                return Err(StateError::Backend("disk full".into()));
            }
            self.written.write_usage(node, rows)
        }

        fn scan_usage(&self, scan: &UsageScan, f: &mut dyn FnMut(StoredRow)) -> Result<(), StateError> {
            self.written.scan_usage(scan, f)
        }

        fn prune_usage(&self, key_day: u32, anonymous_day: u32) -> Result<usize, StateError> {
            self.written.prune_usage(key_day, anonymous_day)
        }
    }

    /// A usage table holding one admitted request, over a store that fails `failures` times.
    fn counted(failures: usize) -> (Usage, Arc<Flaky>) {
        let store = Arc::new(Flaky {
            failures: failures.into(),
            written: Default::default(),
        });
        let usage = Usage::new(
            "n1".into(),
            Clock::default(),
            store.clone(),
            Arc::new(Metrics::default()),
            Retention {
                key_days: 400,
                anonymous_days: 35,
            },
        );
        let subject = crate::model::Subject::Key("key_1".into());
        let charge = crate::usage::Charge {
            subject: subject.as_ref(),
            consumer: None,
            route: None,
        };
        let plan = crate::limits::PlanLimits::with_quotas(None, None);
        usage
            .table
            .admit(&crate::usage::Charges::One(charge), &plan, None, usage.clock.now())
            .unwrap();
        (usage, store)
    }

    fn total(store: &Flaky) -> u64 {
        let scan = UsageScan {
            from_day: 0,
            to_day: u32::MAX,
            subject: None,
            subject_prefix: None,
            consumer: None,
            scope: ScopeFilter::All,
        };
        let mut total = 0;
        store.scan_usage(&scan, &mut |row| total += row.row.count).unwrap();
        total
    }

    #[tokio::test(start_paused = true)]
    async fn the_final_flush_keeps_trying_while_the_store_fails() {
        // More failures than the 20 tries the final flush used to allow.
        let (usage, store) = counted(40);
        let (_force, forced) = tokio::sync::watch::channel(false);
        usage.flush_for_shutdown(forced).await;
        assert_eq!(total(&store), 1, "the count was written once the store recovered");
        assert_eq!(store.failures.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_forced_stop_gives_up_and_counts_what_it_abandons() {
        let (usage, store) = counted(usize::MAX);
        let (force, forced) = tokio::sync::watch::channel(false);
        let give_up = async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            let _ = force.send(true);
        };
        tokio::join!(usage.flush_for_shutdown(forced), give_up);
        assert_eq!(total(&store), 0);
        assert!(
            usage.metrics.render().contains("tollgate_usage_rows_abandoned_total 1"),
            "the abandoned row is counted"
        );
    }
}
