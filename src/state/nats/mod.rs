//! Global mode (docs/multi-region.md): consumers, keys and plans in JetStream KV buckets shared by
//! every node; usage slots published in batches to a JetStream stream that every node
//! replays into its own view.
//!
//! Each node also keeps a local SQLite file: its view of every node's usage slots (what
//! reports read, and what a restart restores from), the outbox of its own slots that
//! NATS has not acknowledged yet (so an outage loses nothing, on disk and bounded by the
//! number of distinct slots, not by requests), and a cache of keys, consumers and plans.
//!
//! Calls of the [`Catalog`] and [`UsageStore`] traits come from blocking threads and wait
//! on the async client through the runtime handle. The files: `wire` (records as stored
//! and published), `catalog` (KV buckets and their watchers), `usage` (the usage stream
//! and the outbox), `snapshots`, `liveness` (heartbeats); this one connects and attaches.
//!
//! Every loop here ends when the shutdown signal given to [`NatsBackend::connect`] turns.

mod catalog;
mod liveness;
mod snapshots;
mod usage;
mod wire;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Catalog, Replica, ReplicaHooks, SqliteBackend, StateChange, StateError};
use crate::base::{Shutdown, stopped};
use crate::config::ClusterSection;
use crate::model::{ApiKey, Consumer, Plan};

pub use wire::{kv_id, kv_key};

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
    snapshot_interval: Duration,
    shutdown: Shutdown,
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
    let plans = catalog::bucket(&js, PLANS_BUCKET, cluster.replicas).await?;
    let consumers = catalog::bucket(&js, CONSUMERS_BUCKET, cluster.replicas).await?;
    let keys = catalog::bucket(&js, KEYS_BUCKET, cluster.replicas).await?;
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
    pub async fn connect(
        cluster: &ClusterSection,
        data_dir: &Path,
        node: String,
        shutdown: Shutdown,
    ) -> Result<Arc<Self>, StateError> {
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
            snapshot_interval: cluster.snapshot_interval,
            shutdown,
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
            tokio::spawn(catalog::watch_bucket(
                jet.js.clone(),
                bucket,
                start,
                tx.clone(),
                self.shutdown.clone(),
            ));
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
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let attempt = tokio::time::timeout(Duration::from_secs(30), open_jet(js.clone(), &cluster));
                let outcome = tokio::select! {
                    outcome = attempt => outcome,
                    _ = stopped(&mut shutdown) => return,
                };
                match outcome {
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
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stopped(&mut shutdown) => return,
                }
            }
        });
    }

    fn jet(&self) -> Result<&Jet, StateError> {
        self.jet
            .get()
            .ok_or_else(|| nats_error("JetStream", "not reached since this node started"))
    }

    /// Waits until JetStream is reached; `false` when shutdown came first.
    async fn wait_attached(&self) -> bool {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = self.jet.wait() => true,
            _ = stopped(&mut shutdown) => false,
        }
    }

    fn block<T>(&self, what: &str, future: impl Future<Output = Result<T, StateError>>) -> Result<T, StateError> {
        self.handle
            .block_on(async { tokio::time::timeout(OP_TIMEOUT, future).await })
            .map_err(|_| nats_error(what, "timed out"))?
    }
}

impl Replica for NatsBackend {
    /// Whether JetStream has been reached since start.
    fn is_attached(&self) -> bool {
        self.jet.get().is_some()
    }

    /// Writes made on other nodes (and echoes of this node's), in bucket order.
    fn take_changes(&self) -> Option<mpsc::UnboundedReceiver<StateChange>> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn cache_plan(&self, plan: &Plan) -> Result<(), StateError> {
        self.local.put_plan(plan)
    }

    fn cache_consumer(&self, id: &str, consumer: Option<&Consumer>) -> Result<(), StateError> {
        match consumer {
            Some(consumer) => self.local.cache_consumer(consumer),
            None => self.local.uncache_consumer(id),
        }
    }

    fn cache_keys(&self, keys: &[ApiKey]) -> Result<(), StateError> {
        self.local.cache_keys(keys)
    }

    fn start(self: Arc<Self>, hooks: ReplicaHooks, shutdown: Shutdown) -> Vec<JoinHandle<()>> {
        let ReplicaHooks {
            usage,
            live_nodes,
            caught_up,
            clock,
        } = hooks;
        vec![
            tokio::spawn(self.clone().snapshot_periodically(clock, shutdown.clone())),
            tokio::spawn(self.clone().track_live_nodes(live_nodes, shutdown.clone())),
            tokio::spawn(self.follow_usage(usage, caught_up, shutdown)),
        ]
    }

    fn render_metrics(&self, out: &mut String) {
        crate::metrics::single(
            out,
            "tollgate_cluster_connected",
            "gauge",
            "1 while this node is connected to NATS.",
            u8::from(self.available()),
        );
        let live = self.live_nodes.load(std::sync::atomic::Ordering::Relaxed);
        crate::metrics::single(
            out,
            "tollgate_cluster_live_nodes",
            "gauge",
            "Gateway nodes heard from in the last 3.5 s, this one included.",
            live,
        );
        crate::metrics::single(
            out,
            "tollgate_usage_outbox_slots",
            "gauge",
            "Own usage slots not yet acknowledged by NATS (kept on disk).",
            self.outbox_len(),
        );
        crate::metrics::single(
            out,
            "tollgate_usage_stream_sequence",
            "gauge",
            "Last usage-stream sequence merged into this node's view.",
            self.local.meta(SEQ_META).ok().flatten().unwrap_or(0),
        );
    }
}
