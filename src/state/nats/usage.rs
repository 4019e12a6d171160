//! Usage: this node's slots published from its outbox (SQLite rows NATS has not
//! acknowledged) to its region's usage stream, and every region's batches merged into
//! this node's view (followed by [`super::regions`]).

use bytes::Bytes;

use super::regions::Log;
use super::wire::{BatchRow, UsageBatch};
use super::{BATCH_ROWS, NatsBackend, nats_error};
use crate::model::{StoredRow, UsageRow};
use crate::state::{StateError, UsageSink, UsageStore};
use crate::usage::report::UsageScan;

impl NatsBackend {
    /// Publishes this node's unacknowledged slots; what NATS does not acknowledge stays in
    /// the local outbox for the next attempt.
    fn publish_outbox(&self) -> Result<usize, StateError> {
        if !self.connected() {
            return Ok(0);
        }
        let subject = format!("{}.{}", Log::Usage.subject_root(&self.region), self.node);
        let mut published = 0;
        loop {
            let rows = self.local.unpublished(&self.node, BATCH_ROWS)?;
            if rows.is_empty() {
                return Ok(published);
            }
            let batch = UsageBatch {
                node: self.node.clone(),
                region: self.region.clone(),
                rows: rows.iter().cloned().map(BatchRow::from).collect(),
            };
            let payload = Bytes::from(serde_json::to_vec(&batch).map_err(|e| nats_error("encode", e))?);
            self.block("publishing usage", async {
                self.jet()?
                    .js
                    .publish(subject.clone(), payload)
                    .await
                    .map_err(|e| nats_error("publishing usage", e))?
                    .await
                    .map_err(|e| nats_error("publishing usage", e))
            })?;
            self.local.mark_published(&self.node, &rows)?;
            published += rows.len();
        }
    }

    /// Own slots still waiting for NATS.
    pub fn outbox_len(&self) -> u64 {
        self.local.unpublished_count(&self.node).unwrap_or(0)
    }

    /// Merges one region's usage batch into this node's view; `sink` gets the slots that
    /// grew (with whether they are this node's own: after a restart on an empty disk they
    /// are how its own slots come back; an echo of a live batch grows nothing).
    pub(super) fn apply_usage_message(&self, payload: &[u8], sink: &UsageSink) -> Result<(), StateError> {
        let Ok(batch) = serde_json::from_slice::<UsageBatch>(payload) else {
            tracing::warn!("unreadable usage batch skipped");
            return Ok(());
        };
        let rows: Vec<UsageRow> = batch.rows.into_iter().filter_map(BatchRow::into_row).collect();
        let deltas = self.local.merge_usage(&batch.node, &rows)?;
        let grown: Vec<(UsageRow, u64)> = rows.into_iter().zip(deltas).filter(|(_, d)| *d > 0).collect();
        if !grown.is_empty() {
            sink(batch.node == self.node, grown);
        }
        Ok(())
    }
}

impl UsageStore for NatsBackend {
    /// Durable locally; published by [`UsageStore::sync`] (the flusher's next step), so a
    /// report, which writes first, never waits on NATS.
    fn write_usage(&self, node: &str, rows: &[UsageRow]) -> Result<(), StateError> {
        self.local.write_usage(node, rows)
    }

    fn scan_usage(&self, scan: &UsageScan, f: &mut dyn FnMut(StoredRow)) -> Result<(), StateError> {
        self.local.scan_usage(scan, f)
    }

    fn prune_usage(&self, key_day: u32, anonymous_day: u32) -> Result<usize, StateError> {
        self.local.prune_usage(key_day, anonymous_day)
    }

    fn sync(&self) -> Result<(), StateError> {
        self.publish_outbox().map(|_| ()).inspect_err(|error| {
            tracing::warn!(%error, backlog = self.outbox_len(), "usage not published yet; kept in the outbox");
        })
    }

    fn stale_regions(&self) -> Vec<String> {
        if !self.connected() {
            // Nothing is heard while this region's NATS is gone.
            return self.regions.known(Log::Usage);
        }
        self.regions.stale(Log::Usage)
    }
}
