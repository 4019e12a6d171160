//! Global mode (DESIGN §2.2): consumers, keys and plans in JetStream KV buckets shared by
//! every node; usage slots published in batches to a JetStream stream that every node
//! replays into its own view.
//!
//! Each node also keeps a local SQLite file: its view of every node's usage slots (what
//! reports read, and what a restart restores from), the outbox of its own slots that
//! NATS has not acknowledged yet (so an outage loses nothing, on disk and bounded by the
//! number of distinct slots, not by requests), and a cache of keys, consumers and plans.
//!
//! Calls of the [`StateBackend`] trait come from blocking threads and wait on the async
//! client through the runtime handle.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{ApiKey, Consumer, Plan, SqliteBackend, StateBackend, StateChange, StateData, StateError};
use crate::config::ClusterSection;
use crate::usage::report::UsageScan;
use crate::usage::{StoredRow, UsageRow};

pub const PLANS_BUCKET: &str = "tollgate_plans";
pub const CONSUMERS_BUCKET: &str = "tollgate_consumers";
pub const KEYS_BUCKET: &str = "tollgate_keys";
pub const USAGE_STREAM: &str = "TOLLGATE_USAGE";
pub const SNAPSHOTS_BUCKET: &str = "tollgate_snapshots";
const USAGE_SUBJECTS: &str = "tollgate.usage.>";
/// How long one call to NATS may take before the caller gets an error.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Core NATS (not a stream): every node says it is alive every `HEARTBEAT`; a node not
/// heard from for `LIVE_WINDOW` is no longer counted.
const HEARTBEAT_SUBJECT: &str = "tollgate.nodes";
const HEARTBEAT: Duration = Duration::from_secs(1);
const LIVE_WINDOW: Duration = Duration::from_millis(3500);
/// Rows per published batch (well under NATS's default 1 MiB message limit).
const BATCH_ROWS: usize = 4000;
const SEQ_META: &str = "usage_stream_seq";
/// Set once this disk holds a complete copy of the buckets (after a start with JetStream).
const CACHED_META: &str = "state_cached";

fn nats_error(context: &str, error: impl std::fmt::Display) -> StateError {
    StateError::Backend(format!("nats: {context}: {error}"))
}

/// KV keys allow `[-/_=.a-zA-Z0-9]`; ids may hold more (`@` in consumer ids), so other
/// bytes are written as `=XX`.
pub fn kv_key(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// The id a KV key was made from by [`kv_key`].
pub fn kv_id(key: &str) -> String {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'=')
            .then(|| key.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An API key as stored in the keys bucket (the secret's SHA-256 in hex, never the secret).
#[derive(Serialize, Deserialize)]
struct KeyRecord {
    id: String,
    consumer: String,
    plan: Option<String>,
    hash: String,
    prefix: String,
    created_at: i64,
    expires_at: Option<i64>,
    routes: Vec<String>,
    revoked: bool,
}

impl From<&ApiKey> for KeyRecord {
    fn from(key: &ApiKey) -> Self {
        KeyRecord {
            id: key.id.clone(),
            consumer: key.consumer.clone(),
            plan: key.plan.clone(),
            hash: key.hash.iter().map(|b| format!("{b:02x}")).collect(),
            prefix: key.prefix.clone(),
            created_at: key.created_at,
            expires_at: key.expires_at,
            routes: key.allowed_routes.clone(),
            revoked: key.revoked,
        }
    }
}

impl KeyRecord {
    fn into_key(self) -> Option<ApiKey> {
        let mut hash = [0u8; 32];
        if self.hash.len() != 64 {
            return None;
        }
        for (i, byte) in hash.iter_mut().enumerate() {
            *byte = u8::from_str_radix(self.hash.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ApiKey {
            id: self.id,
            consumer: self.consumer,
            plan: self.plan,
            hash,
            prefix: self.prefix,
            created_at: self.created_at,
            expires_at: self.expires_at,
            allowed_routes: self.routes,
            revoked: self.revoked,
        })
    }
}

fn decode_key(value: &[u8]) -> Option<ApiKey> {
    serde_json::from_slice::<KeyRecord>(value).ok()?.into_key()
}

/// One published batch of a node's usage slots.
#[derive(Serialize, Deserialize)]
struct UsageBatch {
    node: String,
    region: String,
    rows: Vec<BatchRow>,
}

/// One slot on the wire, with short field names (a batch or snapshot holds many).
#[derive(Serialize, Deserialize)]
struct BatchRow {
    s: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    p: String,
    d: u32,
    n: u64,
}

impl From<UsageRow> for BatchRow {
    fn from(row: UsageRow) -> BatchRow {
        BatchRow {
            s: row.subject,
            c: row.consumer,
            p: row.scope,
            d: row.day,
            n: row.count,
        }
    }
}

impl From<BatchRow> for UsageRow {
    fn from(row: BatchRow) -> UsageRow {
        UsageRow {
            subject: row.s,
            consumer: row.c,
            scope: row.p,
            day: row.d,
            count: row.n,
        }
    }
}

pub struct NatsBackend {
    handle: tokio::runtime::Handle,
    client: async_nats::Client,
    /// JetStream's buckets and stream, once reached: at start, or later when the node
    /// started from its disk while NATS was unreachable.
    jet: tokio::sync::SetOnce<Jet>,
    local: SqliteBackend,
    pub node: String,
    pub region: String,
    changes: Mutex<Option<mpsc::UnboundedReceiver<StateChange>>>,
    /// Nodes heard from within `LIVE_WINDOW`, this one included.
    live_nodes: std::sync::atomic::AtomicU32,
}

/// A compacted copy of one node's usage view: every node's slots of this month and the
/// last, and the usage-stream sequence they include.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    node: String,
    sequence: u64,
    rows: Vec<SnapshotRow>,
}

/// A slot of any node: the batch fields plus the owner.
#[derive(Serialize, Deserialize)]
struct SnapshotRow {
    #[serde(flatten)]
    row: BatchRow,
    o: String,
}

async fn bucket(js: &jetstream::Context, name: &str, replicas: usize) -> Result<kv::Store, StateError> {
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
    let status = store.status().await.map_err(|e| nats_error("bucket status", e))?;
    if status.values() == 0 {
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

/// What this node uses in JetStream.
struct Jet {
    js: jetstream::Context,
    plans: kv::Store,
    consumers: kv::Store,
    keys: kv::Store,
    snapshots: async_nats::jetstream::object_store::ObjectStore,
}

/// How long a node that has run before waits for JetStream at start before it starts from
/// its own disk (cached keys, plans, consumers and usage) and keeps trying in the background.
const START_FROM_DISK_AFTER: Duration = Duration::from_secs(5);

/// Opens (creating when missing) the buckets, the usage stream and the snapshot store.
async fn open_jet(js: jetstream::Context, cluster: &ClusterSection) -> Result<Jet, StateError> {
    let plans = bucket(&js, PLANS_BUCKET, cluster.replicas).await?;
    let consumers = bucket(&js, CONSUMERS_BUCKET, cluster.replicas).await?;
    let keys = bucket(&js, KEYS_BUCKET, cluster.replicas).await?;
    js.get_or_create_stream(stream::Config {
        name: USAGE_STREAM.to_string(),
        subjects: vec![USAGE_SUBJECTS.to_string()],
        max_age: cluster.usage_max_age,
        num_replicas: cluster.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| nats_error("creating the usage stream", e))?;
    let snapshots = match js.get_object_store(SNAPSHOTS_BUCKET).await {
        Ok(store) => store,
        Err(_) => js
            .create_object_store(async_nats::jetstream::object_store::Config {
                bucket: SNAPSHOTS_BUCKET.to_string(),
                num_replicas: cluster.replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| nats_error("creating the snapshot bucket", e))?,
    };
    Ok(Jet {
        js,
        plans,
        consumers,
        keys,
        snapshots,
    })
}

impl NatsBackend {
    /// Connects, creates the buckets and the usage stream if missing, and starts watching
    /// the buckets for writes made on other nodes. A node whose disk has followed the
    /// cluster before starts from that disk when JetStream does not answer within
    /// [`START_FROM_DISK_AFTER`], and attaches when it does.
    pub async fn connect(cluster: &ClusterSection, data_dir: &Path, node: String) -> Result<Arc<Self>, StateError> {
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("tollgate {node}"))
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .max_reconnects(None);
        if let Some(path) = &cluster.credentials {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| nats_error(&format!("credentials {path}"), e))?;
        }
        if let (Some(user), Some(password)) = (&cluster.user, &cluster.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &cluster.token {
            options = options.token(token.clone());
        }
        if let Some(ca) = &cluster.tls_ca {
            options = options.add_root_certificates(PathBuf::from(ca)).require_tls(true);
        }
        let urls: Vec<async_nats::ServerAddr> = cluster
            .nats
            .iter()
            .map(|u| u.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| nats_error("server URL", e))?;
        let client = options.connect(urls).await.map_err(|e| nats_error("connecting", e))?;
        let js = jetstream::new(client.clone());
        let local = SqliteBackend::open(&data_dir.join("tollgate.db"))?;
        // A disk that holds a full copy of the buckets may serve without them.
        let disk_has_state = local.meta(CACHED_META)?.is_some();
        let (tx, rx) = mpsc::unbounded_channel();
        let backend = Arc::new(NatsBackend {
            handle: tokio::runtime::Handle::current(),
            client,
            jet: tokio::sync::SetOnce::new(),
            local,
            node,
            region: cluster.region.clone(),
            changes: Mutex::new(Some(rx)),
            live_nodes: std::sync::atomic::AtomicU32::new(1),
        });
        let wait = if disk_has_state {
            START_FROM_DISK_AFTER
        } else {
            Duration::from_secs(30)
        };
        match tokio::time::timeout(wait, open_jet(js.clone(), cluster)).await {
            Ok(Ok(jet)) => backend.attach(jet, false, tx).await?,
            Ok(Err(error)) if !disk_has_state => return Err(error),
            Err(_) if !disk_has_state => {
                return Err(nats_error("connecting", "JetStream did not answer within 30 s"));
            }
            Ok(Err(error)) => backend.clone().attach_later(js, cluster.clone(), tx, error.to_string()),
            Err(_) => backend
                .clone()
                .attach_later(js, cluster.clone(), tx, "no answer".to_string()),
        }
        Ok(backend)
    }

    /// Starts watching the buckets and makes JetStream available to every call. `replay`:
    /// from each bucket's first entry, so writes made while this node ran from its disk
    /// reach it (as changes); otherwise from after the entries the start-up load reads.
    async fn attach(&self, jet: Jet, replay: bool, tx: mpsc::UnboundedSender<StateChange>) -> Result<(), StateError> {
        for bucket in [PLANS_BUCKET, CONSUMERS_BUCKET, KEYS_BUCKET] {
            let start = if replay {
                1
            } else {
                // Fixed before the gateway loads the buckets: a write between the two is
                // seen twice, not never.
                let mut stream = jet
                    .js
                    .get_stream(format!("KV_{bucket}"))
                    .await
                    .map_err(|e| nats_error("bucket stream", e))?;
                stream
                    .info()
                    .await
                    .map_err(|e| nats_error("bucket stream", e))?
                    .state
                    .last_sequence
                    + 1
            };
            tokio::spawn(watch_bucket(jet.js.clone(), bucket, start, tx.clone()));
        }
        let _ = self.jet.set(jet);
        Ok(())
    }

    fn attach_later(
        self: Arc<Self>,
        js: jetstream::Context,
        cluster: ClusterSection,
        tx: mpsc::UnboundedSender<StateChange>,
        why: String,
    ) {
        tracing::warn!(
            error = %why,
            "JetStream unreachable at start: serving from this node's disk (cached keys, plans, usage) until it answers"
        );
        tokio::spawn(async move {
            loop {
                match tokio::time::timeout(Duration::from_secs(30), open_jet(js.clone(), &cluster)).await {
                    Ok(Ok(jet)) => match self.attach(jet, true, tx.clone()).await {
                        Ok(()) => {
                            tracing::info!("JetStream reached: following the cluster again");
                            return;
                        }
                        Err(error) => tracing::warn!(%error, "attaching to JetStream failed; retrying"),
                    },
                    Ok(Err(error)) => tracing::debug!(%error, "JetStream still unreachable"),
                    Err(_) => tracing::debug!("JetStream still unreachable"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Whether JetStream has been reached since start.
    pub fn is_attached(&self) -> bool {
        self.jet.get().is_some()
    }

    fn jet(&self) -> Result<&Jet, StateError> {
        self.jet
            .get()
            .ok_or_else(|| nats_error("JetStream", "not reached since this node started"))
    }

    async fn wait_attached(&self) {
        self.jet.wait().await;
    }

    /// Publishes this node's heartbeat and counts the nodes heard from (this one always
    /// included); `on_change` gets every new count. While NATS is unreachable the others
    /// go unheard, so the count falls to 1: a cut-off node enforces whole limits.
    pub async fn track_live_nodes<F, Fut>(self: Arc<Self>, on_change: F)
    where
        F: Fn(u32) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut heard = match self.client.subscribe(HEARTBEAT_SUBJECT).await {
            Ok(subscriber) => subscriber,
            Err(error) => {
                tracing::error!(%error, "cannot subscribe to node heartbeats; live nodes stay 1");
                return;
            }
        };
        let mut last_heard: std::collections::HashMap<String, std::time::Instant> = Default::default();
        let mut ticks = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    if self.available() {
                        let _ = self.client.publish(HEARTBEAT_SUBJECT, Bytes::from(self.node.clone())).await;
                    }
                    let now = std::time::Instant::now();
                    last_heard.retain(|_, at| now.duration_since(*at) < LIVE_WINDOW);
                    let live = 1 + last_heard.keys().filter(|node| **node != self.node).count() as u32;
                    if self.live_nodes.swap(live, std::sync::atomic::Ordering::Relaxed) != live {
                        on_change(live).await;
                    }
                }
                message = heard.next() => match message {
                    Some(message) => {
                        if let Ok(node) = std::str::from_utf8(&message.payload) {
                            last_heard.insert(node.to_string(), std::time::Instant::now());
                        }
                    }
                    None => return,
                },
            }
        }
    }

    /// Writes made on other nodes (and echoes of this node's), in bucket order.
    pub fn take_changes(&self) -> Option<mpsc::UnboundedReceiver<StateChange>> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    pub fn local(&self) -> &SqliteBackend {
        &self.local
    }

    fn block<T>(&self, what: &str, future: impl Future<Output = Result<T, StateError>>) -> Result<T, StateError> {
        self.handle
            .block_on(async { tokio::time::timeout(OP_TIMEOUT, future).await })
            .map_err(|_| nats_error(what, "timed out"))?
    }

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

    /// Before the node loads its view: when this disk has never followed the usage stream,
    /// or fell behind what the stream still holds, the newest snapshot is loaded first so
    /// only the stream's tail needs replaying. Returns (rows, sequence) when one was used.
    pub async fn bootstrap(self: &Arc<Self>) -> Result<Option<(usize, u64)>, StateError> {
        if !self.is_attached() {
            return Ok(None);
        }
        let applied = self.applied_sequence().await?;
        let (_, state) = self.usage_stream().await?;
        if applied.is_some_and(|seq| seq + 1 >= state.first_sequence) {
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
            let sequence = info.metadata.get("sequence").and_then(|s| s.parse().ok()).unwrap_or(0);
            if newest.as_ref().is_none_or(|(best, _)| sequence > *best) {
                newest = Some((sequence, info.name));
            }
        }
        let Some((sequence, name)) = newest else {
            return Ok(None);
        };
        if applied.is_some_and(|seq| seq >= sequence) {
            return Ok(None);
        }
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
                by_node.entry(row.o).or_default().push(row.row.into());
            }
            for (node, rows) in by_node {
                local.local.merge_usage(&node, &rows)?;
            }
            local.local.set_meta(SEQ_META, snapshot.sequence)?;
            Ok(Some((count, snapshot.sequence)))
        })
        .await
        .map_err(|e| nats_error("snapshot", e))?
    }

    /// Writes this node's view as a snapshot every `interval`.
    pub async fn snapshot_periodically(self: Arc<Self>, interval: Duration, clock: crate::limits::window::Clock) {
        self.wait_attached().await;
        loop {
            tokio::time::sleep(interval).await;
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
        let (sequence, bytes, rows) = tokio::task::spawn_blocking(move || -> Result<_, StateError> {
            // The sequence is read first: rows merged meanwhile are newer, never missing.
            let sequence = local.local.meta(SEQ_META)?.unwrap_or(0);
            let mut rows = Vec::new();
            let scan = UsageScan {
                from_day,
                to_day,
                subject: None,
                subject_prefix: None,
                consumer: None,
                scope: crate::usage::report::ScopeFilter::All,
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
                sequence,
                rows,
            };
            let bytes = serde_json::to_vec(&snapshot).map_err(|e| nats_error("encode", e))?;
            Ok((sequence, bytes, count))
        })
        .await
        .map_err(|e| nats_error("snapshot", e))??;
        let meta = async_nats::jetstream::object_store::ObjectMetadata {
            name: self.node.clone(),
            metadata: [("sequence".to_string(), sequence.to_string())].into(),
            ..Default::default()
        };
        self.jet()?
            .snapshots
            .put(meta, &mut bytes.as_slice())
            .await
            .map_err(|e| nats_error("snapshot", e))?;
        Ok(rows)
    }

    /// The sequence this node's view has merged up to (0 = never followed the stream).
    async fn applied_sequence(self: &Arc<Self>) -> Result<Option<u64>, StateError> {
        let local = self.clone();
        tokio::task::spawn_blocking(move || local.local.meta(SEQ_META))
            .await
            .map_err(|e| nats_error("meta", e))?
    }

    /// The usage stream and what it holds now.
    async fn usage_stream(&self) -> Result<(stream::Stream, stream::State), StateError> {
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
        apply: impl Fn(bool, Vec<(UsageRow, u64)>) + Send + 'static,
        caught_up: tokio::sync::oneshot::Sender<()>,
    ) {
        let mut caught_up = Some(caught_up);
        self.wait_attached().await;
        loop {
            if let Err(error) = self.follow_once(&apply, &mut caught_up).await {
                tracing::warn!(%error, "usage stream interrupted; resuming");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn follow_once(
        self: &Arc<Self>,
        apply: &(impl Fn(bool, Vec<(UsageRow, u64)>) + Send + 'static),
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
                    let rows: Vec<UsageRow> = batch.rows.into_iter().map(UsageRow::from).collect();
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

/// Forwards every write to a bucket (from any node) as a [`StateChange`].
///
/// Reads the bucket's stream with an ordered *pull* consumer rather than the KV push
/// watcher: across a supercluster's gateways a push consumer's first deliveries waited
/// about a second for interest to propagate; pull requests carry their reply route.
/// After an interruption it resumes after the last sequence it saw, so nothing is missed.
async fn watch_bucket(
    js: jetstream::Context,
    bucket: &'static str,
    start: u64,
    tx: mpsc::UnboundedSender<StateChange>,
) {
    let mut next = Some(start);
    loop {
        match watch_bucket_once(&js, bucket, &tx, &mut next).await {
            Ok(()) => return,
            Err(error) => tracing::warn!(%error, bucket, "watching a state bucket interrupted; resuming"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
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

impl StateBackend for NatsBackend {
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

    fn available(&self) -> bool {
        self.is_attached() && self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn sync(&self) -> Result<(), StateError> {
        self.publish_outbox().map(|_| ())
    }

    fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        crate::metrics::describe(
            out,
            "tollgate_cluster_connected",
            "gauge",
            "1 while this node is connected to NATS.",
        );
        let _ = writeln!(out, "tollgate_cluster_connected {}", u8::from(self.available()));
        crate::metrics::describe(
            out,
            "tollgate_cluster_live_nodes",
            "gauge",
            "Gateway nodes heard from in the last 3.5 s, this one included.",
        );
        let live = self.live_nodes.load(std::sync::atomic::Ordering::Relaxed);
        let _ = writeln!(out, "tollgate_cluster_live_nodes {live}");
        crate::metrics::describe(
            out,
            "tollgate_usage_outbox_slots",
            "gauge",
            "Own usage slots not yet acknowledged by NATS (kept on disk).",
        );
        let _ = writeln!(out, "tollgate_usage_outbox_slots {}", self.outbox_len());
        crate::metrics::describe(
            out,
            "tollgate_usage_stream_sequence",
            "gauge",
            "Last usage-stream sequence merged into this node's view.",
        );
        let _ = writeln!(
            out,
            "tollgate_usage_stream_sequence {}",
            self.local.meta(SEQ_META).ok().flatten().unwrap_or(0)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_keys_escape_what_nats_does_not_allow() {
        assert_eq!(kv_key("key_ab12"), "key_ab12");
        assert_eq!(kv_key("jane@example.com"), "jane=40example.com");
        assert_eq!(kv_key("a=b"), "a=3Db");
        for id in ["jane@example.com", "a=b", "plain-id_1.x"] {
            assert_eq!(kv_id(&kv_key(id)), id);
        }
        let key = ApiKey {
            id: "key_1".into(),
            consumer: "acme".into(),
            plan: Some("pro".into()),
            hash: [0xab; 32],
            prefix: "tg_live_abcd".into(),
            created_at: 1,
            expires_at: None,
            allowed_routes: vec!["lookup".into()],
            revoked: false,
        };
        let encoded = serde_json::to_vec(&KeyRecord::from(&key)).unwrap();
        assert_eq!(decode_key(&encoded), Some(key));
        assert_eq!(decode_key(b"{}"), None);
    }
}
