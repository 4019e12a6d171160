//! Compacted copies of a node's usage view in its region's JetStream object store, so a
//! new node loads one and replays only the tail of every region's usage stream.

use std::sync::Arc;

use futures_util::StreamExt;

use super::regions::Log;
use super::wire::{Snapshot, SnapshotRow};
use super::{NatsBackend, nats_error};
use crate::base::{Shutdown, stopped};
use crate::limits::window::Clock;
use crate::model::UsageRow;
use crate::state::{Replica, StateError, UsageStore};
use crate::usage::report::{ScopeFilter, UsageScan};

impl NatsBackend {
    /// Before the node loads its view: when this disk has never followed the usage stream,
    /// or fell behind what the stream still holds, the newest snapshot is loaded first so
    /// only the stream's tail needs replaying. Returns (rows, sequence) when one was used.
    pub async fn bootstrap(self: &Arc<Self>) -> Result<Option<(usize, u64)>, StateError> {
        if !self.is_attached() {
            return Ok(None);
        }
        // A region whose stream no longer holds what this disk lacks (never followed, or
        // aged out): the snapshot has it.
        let mut behind = false;
        for region in self.known_regions(Log::Usage).await {
            let Ok(mut stream) = self.quick_js()?.get_stream(Log::Usage.stream(&region)).await else {
                continue;
            };
            let Ok(info) = stream.info().await else { continue };
            let applied = self.local.meta(&Log::Usage.sequence_meta(&region))?.unwrap_or(0);
            if applied + 1 < info.state.first_sequence {
                behind = true;
            }
        }
        if !behind {
            return Ok(None);
        }
        let mut newest: Option<(u64, String)> = None;
        let mut list = self
            .jet()?
            .snapshots
            .list()
            .await
            .map_err(|e| nats_error("snapshots", e))?;
        while let Some(info) = list.next().await {
            let Ok(info) = info else { continue };
            let written = info.metadata.get("written").and_then(|s| s.parse().ok()).unwrap_or(0);
            if newest.as_ref().is_none_or(|(best, _)| written > *best) {
                newest = Some((written, info.name));
            }
        }
        let Some((_, name)) = newest else {
            return Ok(None);
        };
        let mut object = self
            .jet()?
            .snapshots
            .get(&name)
            .await
            .map_err(|e| nats_error("snapshot", e))?;
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes)
            .await
            .map_err(|e| nats_error("snapshot", e))?;
        let local = self.clone();
        tokio::task::spawn_blocking(move || {
            let snapshot: Snapshot = serde_json::from_slice(&bytes).map_err(|e| nats_error("snapshot", e))?;
            let mut by_node: std::collections::BTreeMap<String, Vec<UsageRow>> = Default::default();
            let count = snapshot.rows.len();
            for row in snapshot.rows {
                by_node.entry(row.o).or_default().extend(row.row.into_row());
            }
            for (node, rows) in by_node {
                local.local.merge_usage(&node, &rows)?;
            }
            // Slots keep the largest count, so a snapshot older than this disk lowers nothing.
            let mut furthest = 0;
            for (region, sequence) in snapshot.sequences {
                let meta = Log::Usage.sequence_meta(&region);
                if local.local.meta(&meta)?.unwrap_or(0) < sequence {
                    local.local.set_meta(&meta, sequence)?;
                }
                furthest = furthest.max(sequence);
            }
            Ok(Some((count, furthest)))
        })
        .await
        .map_err(|e| nats_error("snapshot", e))?
    }

    /// Writes this node's view as a snapshot every `interval`.
    pub async fn snapshot_periodically(self: Arc<Self>, clock: Clock, mut shutdown: Shutdown) {
        if !self.wait_attached().await {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.snapshot_interval) => {}
                _ = stopped(&mut shutdown) => return,
            }
            match self.write_snapshot(clock.now()).await {
                Ok(rows) => tracing::debug!(rows, "usage snapshot written"),
                Err(error) => tracing::warn!(%error, "usage snapshot not written"),
            }
        }
    }

    pub async fn write_snapshot(self: &Arc<Self>, now: crate::limits::Now) -> Result<usize, StateError> {
        let local = self.clone();
        let from_day = crate::limits::window::month_start(now.month().saturating_sub(1));
        let to_day = now.day();
        let (bytes, rows) = tokio::task::spawn_blocking(move || -> Result<_, StateError> {
            // The sequences are read first: rows merged meanwhile are newer, never missing.
            let prefix = Log::Usage.sequence_meta("");
            let mut sequences = std::collections::BTreeMap::new();
            for name in local.local.meta_names(&prefix)? {
                let sequence = local.local.meta(&name)?.unwrap_or(0);
                sequences.insert(name[prefix.len()..].to_string(), sequence);
            }
            let mut rows = Vec::new();
            let scan = UsageScan {
                from_day,
                to_day,
                subject: None,
                subject_prefix: None,
                consumer: None,
                scope: ScopeFilter::All,
            };
            local.local.scan_usage(&scan, &mut |stored| {
                rows.push(SnapshotRow {
                    row: stored.row.into(),
                    o: stored.node,
                })
            })?;
            let count = rows.len();
            let snapshot = Snapshot {
                node: local.node.clone(),
                sequences,
                rows,
            };
            let bytes = serde_json::to_vec(&snapshot).map_err(|e| nats_error("encode", e))?;
            Ok((bytes, count))
        })
        .await
        .map_err(|e| nats_error("snapshot", e))??;
        let meta = async_nats::jetstream::object_store::ObjectMetadata {
            name: self.node.clone(),
            metadata: [("written".to_string(), super::merge::wall_ms().to_string())].into(),
            ..Default::default()
        };
        self.jet()?
            .snapshots
            .put(meta, &mut bytes.as_slice())
            .await
            .map_err(|e| nats_error("snapshot", e))?;
        Ok(rows)
    }
}
