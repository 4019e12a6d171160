//! The usage stream: this node's slots published from its outbox (SQLite rows NATS has
//! not acknowledged), and every node's batches merged into this node's view.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;

use super::wire::{BatchRow, UsageBatch};
use super::{BATCH_ROWS, NatsBackend, SEQ_META, USAGE_STREAM, USAGE_SUBJECTS, nats_error};
use crate::base::{Shutdown, stopped};
use crate::model::{StoredRow, UsageRow};
use crate::state::{Catalog, StateError, UsageSink, UsageStore};
use crate::usage::report::UsageScan;

impl NatsBackend {
    /// Publishes this node's unacknowledged slots; what NATS does not acknowledge stays in
    /// the local outbox for the next attempt.
    fn publish_outbox(&self) -> Result<usize, StateError> {
        if !self.available() {
            return Ok(0);
        }
        let subject = format!("tollgate.usage.{}.{}", self.region, self.node);
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

    /// The sequence this node's view has merged up to (0 = never followed the stream).
    pub(super) async fn applied_sequence(self: &Arc<Self>) -> Result<Option<u64>, StateError> {
        let local = self.clone();
        tokio::task::spawn_blocking(move || local.local.meta(SEQ_META))
            .await
            .map_err(|e| nats_error("meta", e))?
    }

    /// The usage stream and what it holds now.
    pub(super) async fn usage_stream(&self) -> Result<(stream::Stream, stream::State), StateError> {
        let mut stream = self
            .jet()?
            .js
            .get_stream(USAGE_STREAM)
            .await
            .map_err(|e| nats_error("usage stream", e))?;
        let state = stream
            .info()
            .await
            .map_err(|e| nats_error("usage stream", e))?
            .state
            .clone();
        Ok((stream, state))
    }

    /// Own slots still waiting for NATS.
    pub fn outbox_len(&self) -> u64 {
        self.local.unpublished_count(&self.node).unwrap_or(0)
    }

    /// Replays the usage stream from where this node stopped, merging every node's slots
    /// into the local view and handing what grew to `apply` (with whether the slots are
    /// this node's own); `caught_up` fires once the
    /// stream's tail at start has been applied. Runs until the process ends, resuming
    /// after NATS outages.
    pub async fn follow_usage(
        self: Arc<Self>,
        apply: UsageSink,
        caught_up: tokio::sync::oneshot::Sender<()>,
        mut shutdown: Shutdown,
    ) {
        let mut caught_up = Some(caught_up);
        if !self.wait_attached().await {
            return;
        }
        loop {
            tokio::select! {
                result = self.follow_once(&apply, &mut caught_up) => {
                    if let Err(error) = result {
                        tracing::warn!(%error, "usage stream interrupted; resuming");
                    }
                }
                _ = stopped(&mut shutdown) => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stopped(&mut shutdown) => return,
            }
        }
    }

    async fn follow_once(
        self: &Arc<Self>,
        apply: &(dyn Fn(bool, Vec<(UsageRow, u64)>) + Send + Sync),
        caught_up: &mut Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(), StateError> {
        let start = self.applied_sequence().await?.unwrap_or(0) + 1;
        let (mut stream, state) = self.usage_stream().await?;
        let tail = state.last_sequence;
        if tail < start
            && let Some(done) = caught_up.take()
        {
            let _ = done.send(());
        }
        let ordered = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: USAGE_SUBJECTS.to_string(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
                ..Default::default()
            })
            .await
            .map_err(|e| nats_error("usage consumer", e))?;
        let mut messages = ordered.messages().await.map_err(|e| nats_error("usage consumer", e))?;
        let mut applied = start.saturating_sub(1);
        loop {
            // A consumer can outlive its server (a restarted NATS forgets it): when the
            // stream has moved past what arrived, start a new one where this node stopped.
            let message = match tokio::time::timeout(Duration::from_secs(2), messages.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => return Ok(()),
                Err(_) => {
                    let last = stream
                        .info()
                        .await
                        .map_err(|e| nats_error("usage stream", e))?
                        .state
                        .last_sequence;
                    if last > applied {
                        return Err(nats_error("usage stream", "consumer stalled behind the stream"));
                    }
                    continue;
                }
            };
            let message = message.map_err(|e| nats_error("usage stream", e))?;
            let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
            applied = sequence;
            let batch: Option<UsageBatch> = serde_json::from_slice(&message.payload).ok();
            let local = self.clone();
            let merged = tokio::task::spawn_blocking(move || -> Result<_, StateError> {
                let mut grown = None;
                // This node's own batches count too: after a restart on an empty disk they
                // are how its own slots come back (an echo of a live batch grows nothing).
                if let Some(batch) = batch {
                    let rows: Vec<UsageRow> = batch.rows.into_iter().filter_map(BatchRow::into_row).collect();
                    let deltas = local.local.merge_usage(&batch.node, &rows)?;
                    let changed: Vec<(UsageRow, u64)> = rows.into_iter().zip(deltas).filter(|(_, d)| *d > 0).collect();
                    grown = Some((batch.node, changed));
                }
                local.local.set_meta(SEQ_META, sequence)?;
                Ok(grown)
            })
            .await
            .map_err(|e| nats_error("merging usage", e))??;
            if let Some((node, grown)) = merged
                && !grown.is_empty()
            {
                apply(node == self.node, grown);
            }
            if sequence >= tail
                && let Some(done) = caught_up.take()
            {
                let _ = done.send(());
            }
        }
    }
}

impl UsageStore for NatsBackend {
    fn write_usage(&self, node: &str, rows: &[UsageRow]) -> Result<(), StateError> {
        // Durable locally first: from here on an outage can delay these counts, not lose them.
        self.local.write_usage(node, rows)?;
        if let Err(error) = self.publish_outbox() {
            tracing::warn!(%error, backlog = self.outbox_len(), "usage not published yet; kept in the outbox");
        }
        Ok(())
    }

    fn scan_usage(&self, scan: &UsageScan, f: &mut dyn FnMut(StoredRow)) -> Result<(), StateError> {
        self.local.scan_usage(scan, f)
    }

    fn prune_usage(&self, key_day: u32, anonymous_day: u32) -> Result<usize, StateError> {
        self.local.prune_usage(key_day, anonymous_day)
    }

    fn sync(&self) -> Result<(), StateError> {
        self.publish_outbox().map(|_| ())
    }
}
