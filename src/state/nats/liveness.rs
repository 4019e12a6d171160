//! Heartbeats on core NATS: how many gateway nodes are alive (for `[cluster] divide_rate`),
//! and which regions have nodes (a new one is followed at once).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;

use super::{HEARTBEAT, HEARTBEAT_SUBJECT, LIVE_WINDOW, NatsBackend};
use crate::base::{Shutdown, stopped};

impl NatsBackend {
    /// Nodes heard from: name → (region, last heartbeat).
    pub(super) fn peers(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (String, std::time::Instant)>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The nodes heard from within the live window, this one first.
    pub(super) fn live_peers(&self) -> Vec<crate::state::NodeStatus> {
        let mut nodes = vec![crate::state::NodeStatus {
            node: self.node.clone(),
            region: self.region.clone(),
            last_seen_ms: 0,
        }];
        let mut others: Vec<crate::state::NodeStatus> = self
            .peers()
            .iter()
            .filter(|(node, (_, at))| **node != self.node && at.elapsed() < LIVE_WINDOW)
            .map(|(node, (region, at))| crate::state::NodeStatus {
                node: node.clone(),
                region: region.clone(),
                last_seen_ms: at.elapsed().as_millis() as u64,
            })
            .collect();
        others.sort_by(|a, b| a.node.cmp(&b.node));
        nodes.extend(others);
        nodes
    }

    /// Publishes this node's heartbeat and counts the nodes heard from (this one always
    /// included); `on_change` gets every new count. While NATS is unreachable the others
    /// go unheard, so the count falls to 1: a cut-off node enforces whole limits.
    pub async fn track_live_nodes(self: Arc<Self>, on_change: Box<dyn Fn(u32) + Send + Sync>, mut shutdown: Shutdown) {
        let mut heard = match self.client.subscribe(HEARTBEAT_SUBJECT).await {
            Ok(subscriber) => subscriber,
            Err(error) => {
                tracing::error!(%error, "cannot subscribe to node heartbeats; live nodes stay 1");
                return;
            }
        };
        let mut ticks = tokio::time::interval(HEARTBEAT);
        // The first count is reported once every live node has had time to be heard, even
        // when it equals the initial 1 (quota leases start from a cautious guess).
        let started = std::time::Instant::now();
        let mut reported = false;
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    if self.connected() {
                        let beat = format!("{}\n{}", self.node, self.region);
                        let _ = self.client.publish(HEARTBEAT_SUBJECT, Bytes::from(beat)).await;
                    }
                    let live = {
                        let mut peers = self.peers();
                        let now = std::time::Instant::now();
                        peers.retain(|_, (_, at)| now.duration_since(*at) < LIVE_WINDOW);
                        1 + peers.keys().filter(|node| **node != self.node).count() as u32
                    };
                    let first = !reported && started.elapsed() >= HEARTBEAT * 3 / 2;
                    if self.live_nodes.swap(live, std::sync::atomic::Ordering::Relaxed) != live || first {
                        reported = true;
                        on_change(live);
                    }
                }
                message = heard.next() => match message {
                    Some(message) => {
                        // "node\nregion" (a node of an older version sends its name alone).
                        if let Ok(beat) = std::str::from_utf8(&message.payload) {
                            let (node, region) = beat.split_once('\n').unwrap_or((beat, ""));
                            if !region.is_empty() {
                                self.regions.seen_node_of(region);
                            }
                            self.peers().insert(node.to_string(), (region.to_string(), std::time::Instant::now()));
                        }
                    }
                    None => return,
                },
                _ = stopped(&mut shutdown) => return,
            }
        }
    }
}
