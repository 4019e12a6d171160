//! Plans, consumers and keys in JetStream KV buckets, and the watchers that bring other
//! nodes' writes to this one.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::wire::{KeyRecord, decode_key, kv_id, kv_key};
use super::{CACHED_META, CONSUMERS_BUCKET, NatsBackend, PLANS_BUCKET, nats_error};
use crate::base::{Shutdown, stopped};
use crate::model::{ApiKey, Consumer, Plan, StateData};
use crate::state::{Catalog, Replica, StateChange, StateError};

impl NatsBackend {
    fn get_json<T: for<'de> Deserialize<'de>>(&self, store: &kv::Store, id: &str) -> Result<Option<T>, StateError> {
        let value = self.block("get", async {
            store.get(kv_key(id)).await.map_err(|e| nats_error("get", e))
        })?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    fn put_json(&self, store: &kv::Store, id: &str, value: &impl Serialize) -> Result<(), StateError> {
        let bytes = Bytes::from(serde_json::to_vec(value).map_err(|e| nats_error("encode", e))?);
        self.block("put", async {
            store
                .put(kv_key(id), bytes)
                .await
                .map(|_| ())
                .map_err(|e| nats_error("put", e))
        })
    }

    /// Deletes `id` from a bucket; `NotFound` (naming it as `what`) when it is not there.
    fn delete_existing(&self, store: &kv::Store, id: &str, what: &str) -> Result<(), StateError> {
        let found = self.block("get", async {
            store.get(kv_key(id)).await.map_err(|e| nats_error("get", e))
        })?;
        if found.is_none() {
            return Err(StateError::NotFound(format!("{what} {id}")));
        }
        self.delete(store, id)
    }

    fn delete(&self, store: &kv::Store, id: &str) -> Result<(), StateError> {
        self.block("delete", async {
            store.delete(kv_key(id)).await.map_err(|e| nats_error("delete", e))
        })
    }

    fn all_keys(&self) -> Result<Vec<ApiKey>, StateError> {
        let mut keys = Vec::new();
        self.block("reading keys", async {
            all_entries(&self.jet()?.keys, |entry| keys.extend(decode_key(&entry.value))).await
        })?;
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(keys)
    }
}

pub(super) async fn bucket(js: &jetstream::Context, name: &str, replicas: usize) -> Result<kv::Store, StateError> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: name.to_string(),
        history: 1,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| nats_error(&format!("creating bucket {name}"), e))
}

/// Every live entry of a bucket, read with one watcher (last value per key), not one
/// request per key.
async fn all_entries(store: &kv::Store, mut each: impl FnMut(kv::Entry)) -> Result<(), StateError> {
    // Fresh stream info: `kv::Store::status` answers from the info cached when the bucket
    // was opened, so a bucket empty then would read as empty for ever (no keys listed).
    let info = store
        .stream
        .get_info()
        .await
        .map_err(|e| nats_error("bucket status", e))?;
    if info.state.messages == 0 {
        return Ok(());
    }
    let mut watch = store
        .watch_with_history(">")
        .await
        .map_err(|e| nats_error("reading bucket", e))?;
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| nats_error("reading bucket", e))?;
        let last = entry.delta == 0;
        if entry.operation == kv::Operation::Put {
            each(entry);
        }
        if last {
            break;
        }
    }
    Ok(())
}

/// Forwards every write to a bucket (from any node) as a [`StateChange`].
///
/// Reads the bucket's stream with an ordered *pull* consumer rather than the KV push
/// watcher: across a supercluster's gateways a push consumer's first deliveries waited
/// about a second for interest to propagate; pull requests carry their reply route.
/// After an interruption it resumes after the last sequence it saw, so nothing is missed.
pub(super) async fn watch_bucket(
    js: jetstream::Context,
    bucket: &'static str,
    start: u64,
    tx: mpsc::UnboundedSender<StateChange>,
    mut shutdown: Shutdown,
) {
    let mut next = Some(start);
    loop {
        tokio::select! {
            result = watch_bucket_once(&js, bucket, &tx, &mut next) => match result {
                Ok(()) => return,
                Err(error) => tracing::warn!(%error, bucket, "watching a state bucket interrupted; resuming"),
            },
            _ = stopped(&mut shutdown) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stopped(&mut shutdown) => return,
        }
    }
}

async fn watch_bucket_once(
    js: &jetstream::Context,
    bucket: &str,
    tx: &mpsc::UnboundedSender<StateChange>,
    next: &mut Option<u64>,
) -> Result<(), StateError> {
    let stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| nats_error("bucket stream", e))?;
    let deliver_policy = match *next {
        Some(start_sequence) => consumer::DeliverPolicy::ByStartSequence { start_sequence },
        None => consumer::DeliverPolicy::New,
    };
    let ordered = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("$KV.{bucket}.>"),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| nats_error("bucket consumer", e))?;
    let mut messages = ordered.messages().await.map_err(|e| nats_error("bucket consumer", e))?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| nats_error("bucket", e))?;
        if let Ok(info) = message.info() {
            *next = Some(info.stream_sequence + 1);
        }
        let key = kv_id(message.subject.as_str().rsplit('.').next().unwrap_or_default());
        let deleted = message
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
        let value = &message.payload;
        let change = match bucket {
            PLANS_BUCKET => {
                let plan = (!deleted).then(|| serde_json::from_slice::<Plan>(value).ok()).flatten();
                let name = plan.as_ref().map_or(key, |p| p.name.clone());
                Some(StateChange::Plan(name, plan))
            }
            CONSUMERS_BUCKET => {
                let consumer = (!deleted)
                    .then(|| serde_json::from_slice::<Consumer>(value).ok())
                    .flatten();
                let id = consumer.as_ref().map_or(key, |c| c.id.clone());
                Some(StateChange::Consumer(id, consumer))
            }
            _ => decode_key(value).map(StateChange::Key),
        };
        if let Some(change) = change
            && tx.send(change).is_err()
        {
            return Ok(());
        }
    }
    Err(nats_error("bucket", "watch ended"))
}

impl Catalog for NatsBackend {
    fn load(&self) -> Result<StateData, StateError> {
        if !self.is_attached() {
            // Started while JetStream was unreachable: the copy on this node's disk.
            return self.local.load();
        }
        let mut data = StateData::default();
        self.block("reading plans and consumers", async {
            all_entries(&self.jet()?.plans, |entry| {
                if let Ok(plan) = serde_json::from_slice::<Plan>(&entry.value) {
                    data.plans.insert(plan.name.clone(), plan);
                }
            })
            .await?;
            all_entries(&self.jet()?.consumers, |entry| {
                if let Ok(consumer) = serde_json::from_slice::<Consumer>(&entry.value) {
                    data.consumers.insert(consumer.id.clone(), consumer);
                }
            })
            .await
        })?;
        // Kept on disk for a start while JetStream is unreachable.
        self.local.cache_state(&data)?;
        Ok(data)
    }

    fn for_each_key(&self, f: &mut dyn FnMut(ApiKey)) -> Result<(), StateError> {
        if !self.is_attached() {
            return self.local.for_each_key(f);
        }
        const CACHE_BATCH: usize = 5_000;
        let mut batch = Vec::with_capacity(CACHE_BATCH);
        let mut cached = Ok(());
        self.block("reading keys", async {
            all_entries(&self.jet()?.keys, |entry| {
                if let Some(key) = decode_key(&entry.value) {
                    batch.push(key.clone());
                    if batch.len() == CACHE_BATCH && cached.is_ok() {
                        cached = self.local.cache_keys(&batch);
                        batch.clear();
                    }
                    f(key);
                }
            })
            .await
        })?;
        cached?;
        self.local.cache_keys(&batch)?;
        self.local.set_meta(CACHED_META, 1)
    }

    fn get_key(&self, id: &str) -> Result<Option<ApiKey>, StateError> {
        if !self.is_attached() {
            return self.local.get_key(id);
        }
        Ok(self
            .get_json::<KeyRecord>(&self.jet()?.keys, id)?
            .and_then(KeyRecord::into_key))
    }

    fn list_keys(&self) -> Result<Vec<ApiKey>, StateError> {
        if !self.is_attached() {
            return self.local.list_keys();
        }
        self.all_keys()
    }

    fn consumer_keys(&self, consumer: &str) -> Result<Vec<ApiKey>, StateError> {
        Ok(self
            .all_keys()?
            .into_iter()
            .filter(|k| k.consumer == consumer)
            .collect())
    }

    fn put_plan(&self, plan: &Plan) -> Result<(), StateError> {
        self.put_json(&self.jet()?.plans, &plan.name, plan)
    }

    fn delete_plan(&self, name: &str) -> Result<(), StateError> {
        self.delete_existing(&self.jet()?.plans, name, "plan")
    }

    fn create_consumer(&self, consumer: &Consumer) -> Result<(), StateError> {
        let bytes = Bytes::from(serde_json::to_vec(consumer).map_err(|e| nats_error("encode", e))?);
        self.block("create", async {
            match self.jet()?.consumers.create(kv_key(&consumer.id), bytes).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    Err(StateError::Conflict(format!("consumer {}", consumer.id)))
                }
                Err(e) => Err(nats_error("create", e)),
            }
        })
    }

    fn delete_consumer(&self, id: &str) -> Result<(), StateError> {
        if self.get_json::<Consumer>(&self.jet()?.consumers, id)?.is_none() {
            return Err(StateError::NotFound(format!("consumer {id}")));
        }
        for mut key in self.consumer_keys(id)? {
            key.revoked = true;
            self.put_json(&self.jet()?.keys, &key.id, &KeyRecord::from(&key))?;
        }
        self.delete(&self.jet()?.consumers, id)
    }

    fn create_key(&self, key: &ApiKey) -> Result<(), StateError> {
        if self
            .get_json::<Consumer>(&self.jet()?.consumers, &key.consumer)?
            .is_none()
        {
            return Err(StateError::NotFound(format!("consumer {}", key.consumer)));
        }
        self.put_json(&self.jet()?.keys, &key.id, &KeyRecord::from(key))
    }

    fn revoke_key(&self, id: &str) -> Result<(), StateError> {
        let mut key = self
            .get_key(id)?
            .ok_or_else(|| StateError::NotFound(format!("key {id}")))?;
        key.revoked = true;
        self.put_json(&self.jet()?.keys, id, &KeyRecord::from(&key))
    }

    fn update_key(&self, key: &ApiKey) -> Result<(), StateError> {
        let mut stored = self
            .get_key(&key.id)?
            .ok_or_else(|| StateError::NotFound(format!("key {}", key.id)))?;
        stored.plan = key.plan.clone();
        stored.expires_at = key.expires_at;
        stored.allowed_routes = key.allowed_routes.clone();
        self.put_json(&self.jet()?.keys, &key.id, &KeyRecord::from(&stored))
    }

    fn update_consumer(&self, consumer: &Consumer) -> Result<(), StateError> {
        let mut stored = self
            .get_json::<Consumer>(&self.jet()?.consumers, &consumer.id)?
            .ok_or_else(|| StateError::NotFound(format!("consumer {}", consumer.id)))?;
        stored.plan = consumer.plan.clone();
        self.put_json(&self.jet()?.consumers, &consumer.id, &stored)
    }

    fn available(&self) -> bool {
        self.is_attached() && self.client.connection_state() == async_nats::connection::State::Connected
    }
}
