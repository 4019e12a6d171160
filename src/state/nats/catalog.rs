//! Plans, consumers and keys in global mode: every region accepts admin writes, publishes
//! them to its own catalog stream, and every node merges every region's stream into its
//! disk by the rules of [`super::merge`]. Reads are served from that disk, so they work
//! while any region (this one's NATS included) is unreachable.

use bytes::Bytes;

use super::merge::{self, CatalogEvent, Kind};
use super::regions::Log;
use super::wire::{KeyRecord, id_token};
use super::{NatsBackend, nats_error};
use crate::model::{ApiKey, Consumer, Plan, StateData};
use crate::state::{Catalog, StateChange, StateError};

/// How long an admin write waits for this region's NATS to come back before it answers
/// 503 (a client reconnecting after a server restart takes a moment).
const RECONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

impl NatsBackend {
    /// Applies one region's catalog message to this node's disk; what changed goes to the
    /// gateway's tables.
    pub(super) fn apply_catalog_message(&self, payload: &[u8]) -> Result<(), StateError> {
        let Ok(event) = serde_json::from_slice::<CatalogEvent>(payload) else {
            tracing::warn!("unreadable catalog event skipped");
            return Ok(());
        };
        if let Some(change) = self.apply_event(event)?
            && let Some(tx) = self.changes_tx.get()
        {
            let _ = tx.send(change);
        }
        Ok(())
    }

    /// Merges `event` into the disk copy; returns the record's new state when it changed.
    fn apply_event(&self, event: CatalogEvent) -> Result<Option<StateChange>, StateError> {
        let _serial = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.hlc.observe(event.hlc);
        let kind = event.kind.as_str();
        let stored = self.local.clock(kind, &event.id)?;
        let newer = merge::newer(
            (event.hlc, &event.node),
            stored.as_ref().map(|(hlc, node)| (*hlc, node.as_str())),
        );
        let change = match event.kind {
            Kind::Key => {
                let Some(incoming) = event.key.and_then(KeyRecord::into_key) else {
                    return Ok(None);
                };
                let current = self.local.get_key(&event.id)?;
                match merge::merge_key(current.as_ref(), incoming, newer) {
                    Some(key) => {
                        self.local.cache_keys(std::slice::from_ref(&key))?;
                        Some(StateChange::Key(key))
                    }
                    None => None,
                }
            }
            Kind::Plan if newer => {
                match &event.plan {
                    Some(plan) => self.local.put_plan(plan)?,
                    None => ignore_missing(self.local.delete_plan(&event.id))?,
                }
                Some(StateChange::Plan(event.id.clone(), event.plan))
            }
            Kind::Consumer if newer => {
                match &event.consumer {
                    Some(consumer) => self.local.cache_consumer(consumer)?,
                    None => self.local.uncache_consumer(&event.id)?,
                }
                Some(StateChange::Consumer(event.id.clone(), event.consumer))
            }
            Kind::Plan | Kind::Consumer => None,
        };
        // After the record: a crash between the two re-applies the write, which is harmless.
        if newer {
            self.local.set_clock(kind, &event.id, event.hlc, &event.node)?;
        }
        Ok(change)
    }

    /// Publishes a write to this region's catalog stream (acknowledged by JetStream) and
    /// applies it here; every other node merges it from the stream.
    fn write(&self, kind: Kind, id: &str, fill: impl FnOnce(&mut CatalogEvent)) -> Result<(), StateError> {
        if !self.wait_connected(RECONNECT_GRACE) {
            return Err(StateError::Unavailable(format!(
                "this region's NATS ({}) is unreachable",
                self.region
            )));
        }
        let mut event = CatalogEvent {
            kind,
            id: id.to_string(),
            hlc: self.hlc.stamp(merge::wall_ms()),
            node: self.node.clone(),
            plan: None,
            consumer: None,
            key: None,
        };
        fill(&mut event);
        let subject = format!(
            "{}.{}.{}",
            Log::Catalog.subject_root(&self.region),
            kind.as_str(),
            id_token(id)
        );
        let payload = Bytes::from(serde_json::to_vec(&event).map_err(|e| nats_error("encode", e))?);
        self.block("publishing a catalog write", async {
            self.jet()?
                .js
                .publish(subject, payload)
                .await
                .map_err(|e| nats_error("publishing a catalog write", e))?
                .await
                .map(|_| ())
                .map_err(|e| nats_error("publishing a catalog write", e))
        })?;
        self.apply_event(event).map(|_| ())
    }

    fn write_key(&self, key: &ApiKey) -> Result<(), StateError> {
        self.write(Kind::Key, &key.id, |e| e.key = Some(KeyRecord::from(key)))
    }
}

fn ignore_missing(result: Result<(), StateError>) -> Result<(), StateError> {
    match result {
        Err(StateError::NotFound(_)) => Ok(()),
        other => other,
    }
}

impl Catalog for NatsBackend {
    fn load(&self) -> Result<StateData, StateError> {
        self.local.load()
    }

    fn for_each_key(&self, f: &mut dyn FnMut(ApiKey)) -> Result<(), StateError> {
        self.local.for_each_key(f)
    }

    fn get_key(&self, id: &str) -> Result<Option<ApiKey>, StateError> {
        self.local.get_key(id)
    }

    fn list_keys(&self) -> Result<Vec<ApiKey>, StateError> {
        self.local.list_keys()
    }

    fn consumer_keys(&self, consumer: &str) -> Result<Vec<ApiKey>, StateError> {
        self.local.consumer_keys(consumer)
    }

    fn put_plan(&self, plan: &Plan) -> Result<(), StateError> {
        self.write(Kind::Plan, &plan.name, |e| e.plan = Some(plan.clone()))
    }

    fn delete_plan(&self, name: &str) -> Result<(), StateError> {
        if !self.local.load()?.plans.contains_key(name) {
            return Err(StateError::NotFound(format!("plan {name}")));
        }
        self.write(Kind::Plan, name, |_| {})
    }

    fn create_consumer(&self, consumer: &Consumer) -> Result<(), StateError> {
        if self.local.get_consumer(&consumer.id)?.is_some() {
            return Err(StateError::Conflict(format!("consumer {}", consumer.id)));
        }
        self.write(Kind::Consumer, &consumer.id, |e| e.consumer = Some(consumer.clone()))
    }

    fn delete_consumer(&self, id: &str) -> Result<(), StateError> {
        if self.local.get_consumer(id)?.is_none() {
            return Err(StateError::NotFound(format!("consumer {id}")));
        }
        for mut key in self.local.consumer_keys(id)? {
            if !key.revoked {
                key.revoked = true;
                self.write_key(&key)?;
            }
        }
        self.write(Kind::Consumer, id, |_| {})
    }

    fn create_key(&self, key: &ApiKey) -> Result<(), StateError> {
        if self.local.get_consumer(&key.consumer)?.is_none() {
            return Err(StateError::NotFound(format!("consumer {}", key.consumer)));
        }
        if self.local.get_key(&key.id)?.is_some() {
            return Err(StateError::Conflict(format!("key {}", key.id)));
        }
        self.write_key(key)
    }

    fn revoke_key(&self, id: &str) -> Result<(), StateError> {
        let mut key = self
            .local
            .get_key(id)?
            .ok_or_else(|| StateError::NotFound(format!("key {id}")))?;
        key.revoked = true;
        self.write_key(&key)
    }

    fn update_key(&self, key: &ApiKey) -> Result<(), StateError> {
        let mut stored = self
            .local
            .get_key(&key.id)?
            .ok_or_else(|| StateError::NotFound(format!("key {}", key.id)))?;
        stored.plan = key.plan.clone();
        stored.expires_at = key.expires_at;
        stored.allowed_routes = key.allowed_routes.clone();
        self.write_key(&stored)
    }

    fn update_consumer(&self, consumer: &Consumer) -> Result<(), StateError> {
        let mut stored = self
            .local
            .get_consumer(&consumer.id)?
            .ok_or_else(|| StateError::NotFound(format!("consumer {}", consumer.id)))?;
        stored.plan = consumer.plan.clone();
        self.write(Kind::Consumer, &consumer.id, |e| e.consumer = Some(stored))
    }

    /// A key missing here may exist only while this region is in the minority: its own
    /// NATS unreachable, or most regions' catalogs unheard (it may be cut off from writes
    /// made elsewhere). The majority side answers 401 for unknown keys.
    fn available(&self) -> bool {
        if !self.connected() {
            return false;
        }
        let (fresh, known) = self.regions.fresh(Log::Catalog);
        2 * fresh > known
    }
}
