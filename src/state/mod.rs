//! Where plans, consumers, API keys and usage rows are kept: the SQLite file of a single
//! node, or NATS JetStream in global mode (with SQLite as each node's local view). The
//! proxy never reads a backend on the request path; it reads the in-memory tables in
//! [`crate::auth`] and [`crate::usage`], which the gateway fills from a backend at start
//! and updates after every write.
//!
//! Three small seams: [`Catalog`] (plans, consumers, keys), [`UsageStore`] (usage slots)
//! and, in global mode, [`Replica`] (writes from other nodes, and the services that
//! follow the cluster). [`open`] picks the implementation from the configuration.

mod memory;
pub mod nats;
mod sqlite;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::base::Shutdown;
use crate::config::Config;
use crate::limits::window::Clock;
use crate::model::{ApiKey, Consumer, Plan, StateData, StoredRow, UsageRow};
use crate::usage::report::UsageScan;

pub use memory::MemoryBackend;
pub use sqlite::SqliteBackend;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
    #[error("state backend: {0}")]
    Backend(String),
    /// The shared state cannot be reached now (global mode); the call may succeed later.
    #[error("state unavailable: {0}")]
    Unavailable(String),
}

/// Plans, consumers and API keys. Calls block; callers run them on the blocking pool.
pub trait Catalog: Send + Sync + 'static {
    /// Plans and consumers.
    fn load(&self) -> Result<StateData, StateError>;
    /// Every key, one at a time, without holding them all.
    fn for_each_key(&self, f: &mut dyn FnMut(ApiKey)) -> Result<(), StateError>;
    fn get_key(&self, id: &str) -> Result<Option<ApiKey>, StateError>;
    fn list_keys(&self) -> Result<Vec<ApiKey>, StateError>;
    fn consumer_keys(&self, consumer: &str) -> Result<Vec<ApiKey>, StateError>;
    fn put_plan(&self, plan: &Plan) -> Result<(), StateError>;
    fn delete_plan(&self, name: &str) -> Result<(), StateError>;
    fn create_consumer(&self, consumer: &Consumer) -> Result<(), StateError>;
    fn delete_consumer(&self, id: &str) -> Result<(), StateError>;
    fn create_key(&self, key: &ApiKey) -> Result<(), StateError>;
    fn revoke_key(&self, id: &str) -> Result<(), StateError>;
    /// Replaces a key's plan, expiry and routes (not its secret, consumer or revocation).
    fn update_key(&self, key: &ApiKey) -> Result<(), StateError>;
    fn update_consumer(&self, consumer: &Consumer) -> Result<(), StateError>;
    /// Whether the shared catalog can be reached now. A key missing from memory while it
    /// cannot is refused with 503, not 401: it may exist.
    fn available(&self) -> bool {
        true
    }
}

/// Usage slots: one row per (subject, scope, day, node). Calls block.
pub trait UsageStore: Send + Sync + 'static {
    /// Writes this node's slots; a stored slot keeps the larger count (idempotent).
    fn write_usage(&self, node: &str, rows: &[UsageRow]) -> Result<(), StateError>;
    fn scan_usage(&self, scan: &UsageScan, f: &mut dyn FnMut(StoredRow)) -> Result<(), StateError>;
    /// Deletes key rows before `key_day` and anonymous rows before `anonymous_day`.
    fn prune_usage(&self, key_day: u32, anonymous_day: u32) -> Result<usize, StateError>;
    /// Called every flush interval: catches up on anything owed to shared state (global
    /// mode publishes its outbox after an outage).
    fn sync(&self) -> Result<(), StateError> {
        Ok(())
    }
    /// Regions whose usage this node's view has not heard from recently (global mode):
    /// reports answer from the view and say they may be behind.
    fn stale_regions(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A write made on another node (global mode), to apply to this node's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange {
    Plan(String, Option<Plan>),
    Consumer(String, Option<Consumer>),
    Key(ApiKey),
}

/// Where a replica hands the usage slots that grew in this node's view (`true`: this
/// node's own, replayed), with how much each grew.
pub type UsageSink = Box<dyn Fn(bool, Vec<(UsageRow, u64)>) + Send + Sync>;

/// What the gateway hands a [`Replica`]'s services: where replicated usage and live-node
/// counts go.
pub struct ReplicaHooks {
    pub usage: UsageSink,
    /// The number of live nodes changed.
    pub live_nodes: Box<dyn Fn(u32) + Send + Sync>,
    /// Fires once the usage stream's tail at start has been applied.
    pub caught_up: oneshot::Sender<()>,
    pub clock: Clock,
    /// Quota lease claims from the usage table, and where their answers go
    /// (docs/multi-region.md, "Quota leases").
    pub claims: Option<(mpsc::UnboundedReceiver<crate::usage::Claim>, GrantSink)>,
}

/// Where the answer to a quota lease claim goes.
pub type GrantSink = Box<dyn Fn(&crate::usage::Claim, crate::usage::Granted) + Send + Sync>;

/// A node's membership of a cluster (global mode): the writes other nodes make, a copy of
/// them on this node's disk, and the services that follow the cluster.
pub trait Replica: Send + Sync + 'static {
    /// Whether the shared state has been reached since start (a node may start from its
    /// disk while it cannot be).
    fn is_attached(&self) -> bool;
    /// Writes made on other nodes, in order, as merged (the replica keeps them on this
    /// node's disk itself, so a restart does not depend on the cluster); taken once.
    fn take_changes(&self) -> Option<mpsc::UnboundedReceiver<StateChange>>;
    /// Starts the services that follow the cluster (heartbeats, usage stream, snapshots);
    /// each ends when `shutdown` turns true.
    fn start(self: Arc<Self>, hooks: ReplicaHooks, shutdown: Shutdown) -> Vec<JoinHandle<()>>;
    /// Backend-specific lines for `/metrics` (Prometheus text format; blocking).
    fn render_metrics(&self, out: &mut String);
    /// Where this node stands in the cluster, for `GET /v1/cluster` (blocking).
    fn status(&self) -> ClusterStatus;
}

/// A node's view of its cluster (docs/admin-api.md, `GET /v1/cluster`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterStatus {
    pub node: String,
    pub region: String,
    /// Connected to its region's NATS now.
    pub connected: bool,
    /// Reached the shared state since start (false: serving from its disk).
    pub attached: bool,
    pub live_nodes: u32,
    /// Gateway nodes heard from recently, this one included.
    pub nodes: Vec<NodeStatus>,
    pub regions: Vec<RegionStatus>,
    /// Own usage slots not yet acknowledged by NATS.
    pub outbox_slots: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub region: String,
    /// Since its last heartbeat (0 for this node).
    pub last_seen_ms: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RegionStatus {
    pub region: String,
    pub usage: Option<StreamStatus>,
    pub catalog: Option<StreamStatus>,
}

/// How this node follows one region's stream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamStatus {
    /// Since the stream last answered; absent when it never has.
    pub heard_ms_ago: Option<u64>,
    pub stale: bool,
    /// The last sequence applied on this node.
    pub applied: u64,
    /// Messages the stream held that this node had not applied when it last looked.
    pub behind: u64,
}

/// The backends of one node, chosen by the configuration.
pub struct Backends {
    pub catalog: Arc<dyn Catalog>,
    pub usage: Arc<dyn UsageStore>,
    /// Present in global mode (`[cluster]`).
    pub replica: Option<Arc<dyn Replica>>,
}

/// Opens the SQLite file under `data_dir`, or connects to the cluster of `[cluster]`
/// (loading the newest usage snapshot when this node's disk is behind).
pub async fn open(config: &Config, shutdown: &Shutdown) -> Result<Backends, StateError> {
    match &config.cluster {
        Some(cluster) => {
            let nats =
                nats::NatsBackend::connect(cluster, &config.data_dir, cluster.node_name(), shutdown.clone()).await?;
            tracing::info!(node = %nats.node, region = %nats.region, "global mode: state in NATS JetStream");
            let started = std::time::Instant::now();
            if let Some((rows, sequence)) = nats.bootstrap().await? {
                tracing::info!(
                    rows,
                    sequence,
                    millis = started.elapsed().as_millis() as u64,
                    "usage snapshot loaded"
                );
            }
            Ok(Backends {
                catalog: nats.clone(),
                usage: nats.clone(),
                replica: Some(nats),
            })
        }
        None => {
            let sqlite = Arc::new(SqliteBackend::open(&config.data_dir.join("tollgate.db"))?);
            Ok(Backends {
                catalog: sqlite.clone(),
                usage: sqlite,
                replica: None,
            })
        }
    }
}
