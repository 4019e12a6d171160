//! Global mode (docs/multi-region.md): every region is a full peer. A region's nodes publish
//! catalog writes (plans, consumers, keys) and usage batches to that region's own streams;
//! every node follows every region's streams and merges them into its own view.
//!
//! Each node also keeps a local SQLite file: its view of every node's usage slots (what
//! reports read, and what a restart restores from), the outbox of its own slots that
//! NATS has not acknowledged yet (so an outage loses nothing, on disk and bounded by the
//! number of distinct slots, not by requests), and a cache of keys, consumers and plans.
//!
//! Calls of the [`Catalog`] and [`UsageStore`] traits come from blocking threads and wait
//! on the async client through the runtime handle. The files: `wire` (records as stored
//! and published), `regions` (per-region streams and their followers), `merge` (how
//! concurrent catalog writes converge), `catalog`, `usage` (the outbox and usage batches),
//! `snapshots`, `liveness` (heartbeats); this one connects and attaches.
//!
//! Every loop here ends when the shutdown signal given to [`NatsBackend::connect`] turns.

mod catalog;
mod leases;
mod liveness;
mod merge;
mod regions;
mod snapshots;
mod usage;
mod wire;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Replica, ReplicaHooks, SqliteBackend, StateChange, StateError, UsageSink};
use crate::base::{Shutdown, stopped};
use crate::config::ClusterSection;

use regions::{Log, Regions};

/// One object store per region (`tollgate_snapshots_<region>`).
pub const SNAPSHOTS_PREFIX: &str = "tollgate_snapshots_";
/// How long one call to NATS may take before the caller gets an error.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Core NATS (not a stream): every node says it is alive every `HEARTBEAT`; a node not
/// heard from for `LIVE_WINDOW` is no longer counted.
const HEARTBEAT_SUBJECT: &str = "tollgate.nodes";
const HEARTBEAT: Duration = Duration::from_secs(1);
const LIVE_WINDOW: Duration = Duration::from_millis(3500);
/// Rows per published batch (well under NATS's default 1 MiB message limit).
const BATCH_ROWS: usize = 4000;
/// Set once this disk holds a complete copy of the catalog (after a start with JetStream).
const CACHED_META: &str = "state_cached";
/// How long a start waits for this region's catalog stream (which holds copies of every
/// region's writes) to be replayed before it serves what it has; other regions are waited
/// for only while they answer (an unreachable one is stale, its writes arrive later).
const CATALOG_CATCH_UP: Duration = Duration::from_secs(30);

fn nats_error(context: &str, error: impl std::fmt::Display) -> StateError {
    StateError::Backend(format!("nats: {context}: {error}"))
}

pub struct NatsBackend {
    handle: tokio::runtime::Handle,
    client: async_nats::Client,
    /// JetStream and this region's streams, once reached: at start, or later when the node
    /// started from its disk while NATS was unreachable.
    jet: tokio::sync::SetOnce<Jet>,
    local: SqliteBackend,
    pub node: String,
    pub region: String,
    changes: Mutex<Option<mpsc::UnboundedReceiver<StateChange>>>,
    /// Where merged catalog changes go once the start-up replay is over.
    changes_tx: OnceLock<mpsc::UnboundedSender<StateChange>>,
    regions: Regions,
    hlc: merge::Hlc,
    /// Catalog merges one at a time (followers of several regions, and admin writes).
    apply_lock: Mutex<()>,
    /// Nodes heard from within `LIVE_WINDOW`, this one included.
    live_nodes: std::sync::atomic::AtomicU32,
    /// Nodes heard from: name → (region, last heartbeat).
    peers: Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
    /// Lease buckets of the regions this node has claimed from.
    lease_buckets: Mutex<std::collections::HashMap<String, async_nats::jetstream::kv::Store>>,
    lease_stats: leases::LeaseStats,
    /// The last attempt to make this region's streams source the others failed.
    sources_missing: std::sync::atomic::AtomicBool,
    snapshot_interval: Duration,
    shutdown: Shutdown,
}

/// What this node uses in JetStream.
struct Jet {
    js: jetstream::Context,
    snapshots: async_nats::jetstream::object_store::ObjectStore,
}

/// How long a node that has run before waits for JetStream at start before it starts from
/// its own disk (cached keys, plans, consumers and usage) and keeps trying in the background.
const START_FROM_DISK_AFTER: Duration = Duration::from_secs(5);

/// Opens this region's streams and snapshot store, creating them when missing.
async fn open_jet(js: jetstream::Context, cluster: &ClusterSection) -> Result<Jet, StateError> {
    // `[cluster] region` is checked to be a stream-name and subject token.
    let token = &cluster.region;
    for log in [Log::Catalog, Log::Usage] {
        regions::own_stream(&js, log, token, cluster.replicas, cluster.usage_max_age).await?;
    }
    let leases = format!("{}{token}", leases::LEASES_PREFIX);
    regions::retry_race(|| async {
        if js.get_key_value(&leases).await.is_ok() {
            return Ok(());
        }
        js.create_key_value(async_nats::jetstream::kv::Config {
            bucket: leases.clone(),
            history: 1,
            // Records of ended windows: a month and a few days at most.
            max_age: Duration::from_secs(40 * 86_400),
            num_replicas: cluster.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(|e| nats_error("creating the lease bucket", e))
    })
    .await?;
    let bucket = format!("{SNAPSHOTS_PREFIX}{token}");
    let snapshots = regions::retry_race(|| async {
        if let Ok(store) = js.get_object_store(&bucket).await {
            return Ok(store);
        }
        js.create_object_store(async_nats::jetstream::object_store::Config {
            bucket: bucket.clone(),
            num_replicas: cluster.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| nats_error("creating the snapshot bucket", e))
    })
    .await?;
    Ok(Jet { js, snapshots })
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
            .max_reconnects(None)
            // The default backs off to 4 s; convergence after an outage waits on this,
            // and a retry twice a second against this region's own servers costs nothing.
            .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 100).min(500)));
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
            changes_tx: OnceLock::new(),
            regions: Regions::default(),
            hlc: merge::Hlc::default(),
            apply_lock: Mutex::new(()),
            live_nodes: std::sync::atomic::AtomicU32::new(1),
            peers: Mutex::default(),
            lease_buckets: Mutex::new(Default::default()),
            lease_stats: Default::default(),
            sources_missing: Default::default(),
            snapshot_interval: cluster.snapshot_interval,
            shutdown,
        });
        let wait = if disk_has_state {
            START_FROM_DISK_AFTER
        } else {
            Duration::from_secs(30)
        };
        match tokio::time::timeout(wait, open_jet(js.clone(), cluster)).await {
            Ok(Ok(jet)) => backend.clone().attach(jet, tx, false).await,
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

    /// Makes JetStream available to every call and follows every region's catalog; waits
    /// (up to [`CATALOG_CATCH_UP`]) until the catalogs are replayed to their tails, so what
    /// the gateway loads next is complete. Changes merged after that go to the gateway.
    ///
    /// `serving`: the gateway already loaded its tables (the node started from its disk),
    /// so every change merged from now on must reach them, the replay's included.
    async fn attach(self: Arc<Self>, jet: Jet, tx: mpsc::UnboundedSender<StateChange>, serving: bool) {
        if serving {
            let _ = self.changes_tx.set(tx.clone());
        }
        let _ = self.jet.set(jet);
        let (caught_up, replayed) = oneshot::channel();
        let handler: regions::Handler = Arc::new(|backend, _region, payload| backend.apply_catalog_message(&payload));
        tokio::spawn(self.clone().follow_regions(Log::Catalog, handler, caught_up));
        if tokio::time::timeout(CATALOG_CATCH_UP, replayed).await.is_err() {
            tracing::warn!(
                stale = ?self.regions.stale(Log::Catalog),
                "catalog not replayed from every region yet; serving what this disk has"
            );
        }
        let _ = self.changes_tx.set(tx);
        let local = self.clone();
        let cached = tokio::task::spawn_blocking(move || local.local.set_meta(CACHED_META, 1)).await;
        if let Ok(Err(error)) = cached {
            tracing::warn!(%error, "could not mark the catalog copy on disk");
        }
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
                    Ok(Ok(jet)) => {
                        self.clone().attach(jet, tx.clone(), true).await;
                        tracing::info!("JetStream reached: following the cluster again");
                        return;
                    }
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

    /// Whether this region's NATS answers now (and JetStream was reached since start).
    fn connected(&self) -> bool {
        self.is_attached() && self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Blocking: waits up to `grace` for [`Self::connected`].
    fn wait_connected(&self, grace: Duration) -> bool {
        let deadline = std::time::Instant::now() + grace;
        while !self.connected() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
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

    fn start(self: Arc<Self>, hooks: ReplicaHooks, shutdown: Shutdown) -> Vec<JoinHandle<()>> {
        let ReplicaHooks {
            usage,
            live_nodes,
            caught_up,
            clock,
            claims,
        } = hooks;
        let sink: Arc<UsageSink> = Arc::new(usage);
        let handler: regions::Handler =
            Arc::new(move |backend, _region, payload| backend.apply_usage_message(&payload, &sink));
        let follower = self.clone();
        let mut services = Vec::new();
        if let Some((claims, grants)) = claims {
            services.push(tokio::spawn(self.clone().serve_claims(
                claims,
                grants,
                shutdown.clone(),
            )));
        }
        services.extend([
            tokio::spawn(self.clone().snapshot_periodically(clock, shutdown.clone())),
            tokio::spawn(self.clone().track_live_nodes(live_nodes, shutdown)),
            tokio::spawn(async move {
                if follower.wait_attached().await {
                    follower.follow_regions(Log::Usage, handler, caught_up).await;
                }
            }),
        ]);
        services
    }

    fn status(&self) -> crate::state::ClusterStatus {
        crate::state::ClusterStatus {
            node: self.node.clone(),
            region: self.region.clone(),
            connected: self.connected(),
            attached: self.is_attached(),
            live_nodes: self.live_nodes.load(std::sync::atomic::Ordering::Relaxed),
            nodes: self.live_peers(),
            regions: self.regions.status(),
            outbox_slots: self.outbox_len(),
        }
    }

    fn render_metrics(&self, out: &mut String) {
        crate::metrics::single(
            out,
            "tollgate_cluster_connected",
            "gauge",
            "1 while this node is connected to its region's NATS.",
            u8::from(self.connected()),
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
        out.push_str(
            "# HELP tollgate_quota_lease_claims_total Quota lease claims answered, by outcome.\n\
             # TYPE tollgate_quota_lease_claims_total counter\n",
        );
        for (outcome, counter) in [
            ("granted", &self.lease_stats.granted),
            ("refused", &self.lease_stats.refused),
            ("unreachable", &self.lease_stats.unreachable),
            ("released", &self.lease_stats.released),
        ] {
            out.push_str(&format!(
                "tollgate_quota_lease_claims_total{{outcome=\"{outcome}\"}} {}\n",
                counter.load(std::sync::atomic::Ordering::Relaxed)
            ));
        }
        out.push_str(
            "# HELP tollgate_cluster_stale_regions Regions whose stream this node has not read in the last 3 s.\n\
             # TYPE tollgate_cluster_stale_regions gauge\n",
        );
        for log in [Log::Catalog, Log::Usage] {
            let (fresh, known) = self.regions.fresh(log);
            out.push_str(&format!(
                "tollgate_cluster_stale_regions{{log=\"{}\"}} {}\n",
                log.name(),
                known - fresh
            ));
        }
    }
}
