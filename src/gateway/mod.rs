//! The control plane: what the request path reads, and everything that changes it. The
//! gateway is built at start-up from the configuration and the state backends, compiles
//! the configuration into a [`Snapshot`] and the plans into a `PlanTable`, swaps either
//! whole on a reload or a plan write, applies writes replicated from other nodes, and
//! says when the node is ready. The proxy (`crate::proxy`) only reads it; the admin API
//! writes through it (docs/architecture.md, "Modules").
//!
//! Files: `snapshot` (compiled configuration), `plans` (compiled plans, rate sharing),
//! `catalog` (admin writes), `replication` (writes from other nodes), `usage` (the usage
//! flusher), `services` (every background service, started in one place).

mod catalog;
mod plans;
mod replication;
pub mod services;
mod snapshot;
pub mod usage;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use arc_swap::ArcSwap;

pub use catalog::{KeyChange, valid_id};
pub use snapshot::{ClientCache, Route, Snapshot, USAGE_PAGE_ROUTE, UpstreamPool, UsagePage};
pub use usage::{Retention, Usage};

use crate::auth::KeyTable;
use crate::config::{self, Config, ConfigErrors};
use crate::limits::PlanTable;
use crate::limits::window::Clock;
use crate::metrics::Metrics;
use crate::model::StateData;
use crate::state::{Backends, Catalog, Replica, StateError};
use crate::tls::ServerTls;

/// The plan of keys whose consumer has none and that name none themselves.
pub const DEFAULT_PLAN: &str = "default";

/// This node's slot name in usage counters until nodes are named by `[cluster]`.
pub const LOCAL_NODE: &str = "local";

/// A thread's copy of what an `ArcSwap` holds. Checking that it is current is a plain
/// load, where `ArcSwap::load` costs two locked instructions (docs/benchmarks.md, "Locked
/// instructions"). It keeps the `ArcSwap` alive, so the address it is compared by is not
/// reused while it is held.
type LocalCopy<T> = arc_swap::Cache<Arc<ArcSwap<T>>, Arc<T>>;

thread_local! {
    static SNAPSHOT: std::cell::RefCell<Option<LocalCopy<Snapshot>>> = const { std::cell::RefCell::new(None) };
    static PLANS: std::cell::RefCell<Option<LocalCopy<PlanTable>>> = const { std::cell::RefCell::new(None) };
}

/// What `source` holds now, through this thread's copy in `slot` (made anew when it copies
/// another gateway's: tests run several on one thread).
fn latest<'a, T>(slot: &'a mut Option<LocalCopy<T>>, source: &Arc<ArcSwap<T>>) -> &'a Arc<T> {
    let copy = match slot.take() {
        Some(copy) if std::ptr::eq(copy.arc_swap(), &**source) => copy,
        _ => arc_swap::Cache::new(source.clone()),
    };
    slot.insert(copy).load()
}

/// State shared by every worker and the admin API.
pub struct Gateway {
    /// Shared with each worker thread's copy (`SNAPSHOT`).
    snapshot: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    /// API keys for the request path; rebuilt from the catalog at start, updated per write.
    pub keys: KeyTable,
    pub catalog: Arc<dyn Catalog>,
    /// Present in global mode.
    pub replica: Option<Arc<dyn Replica>>,
    /// The HTTPS listeners' certificates and settings (`[server.tls]`).
    pub tls: Option<Arc<ServerTls>>,
    /// `[logs]`: where workers hand their access-log records.
    pub access_log: Option<Arc<crate::logs::AccessLog>>,
    /// Plans and consumers as last written, for the admin API and for compiling plans;
    /// never read per request. Held only for in-memory work, never across an `.await`.
    data: RwLock<StateData>,
    /// Serialises admin writes, so the catalog and memory see them in the same order.
    /// Readers never wait on it.
    writes: tokio::sync::Mutex<()>,
    /// Plans compiled for the request path; shared with each worker thread's copy (`PLANS`).
    plans: Arc<ArcSwap<PlanTable>>,
    /// How many live nodes share each plan's rate limit (`[cluster] divide_rate`).
    rate_share: AtomicU32,
    pub usage: Arc<Usage>,
    /// Page views per key of the customer usage page (`[usage_page]`), across reloads.
    pub usage_page_rate: crate::limits::keyed::KeyedRate,
    clients: ClientCache,
    workers: usize,
    ready: AtomicBool,
    reload_lock: tokio::sync::Mutex<()>,
}

impl Gateway {
    /// Compiles `config`, resolves its host-name endpoints, loads the catalog into memory
    /// and restores today's usage counters. The node is not ready yet
    /// ([`services::start`] decides when it is).
    pub async fn new(
        config: Config,
        metrics: Arc<Metrics>,
        workers: usize,
        backends: Backends,
        clock: Clock,
        access_log: Option<Arc<crate::logs::AccessLog>>,
    ) -> Result<Arc<Gateway>, StateError> {
        // Checked when the file was read; a file may have changed since.
        let tls = match &config.tls {
            Some(tls) => Some(Arc::new(
                ServerTls::new(&tls.options).map_err(|e| StateError::Backend(format!("TLS: {e}")))?,
            )),
            None => None,
        };
        let Backends {
            catalog,
            usage: usage_store,
            replica,
        } = backends;
        let clients = ClientCache::default();
        let snapshot = Snapshot::build(Arc::new(config), None, &metrics, &clients, workers);
        snapshot.resolve_new_endpoints().await;
        crate::auth::jwks_fetch::refresh(&snapshot.jwt, |_| true).await;
        let (keys, data) = load_catalog(catalog.clone()).await?;
        let usage = Arc::new(Usage::new(
            node_name(&snapshot.config),
            clock,
            usage_store,
            metrics.clone(),
            Retention::of(&snapshot.config),
        ));
        let plans = plans::compile(&snapshot.config, &data, &metrics, 1);
        usage.table.set_anonymous_month(
            plans
                .get(&snapshot.config.anonymous.plan)
                .is_some_and(|p| p.tracks_month()),
        );
        usage.table.set_max_anonymous(snapshot.config.anonymous.max_subjects);
        let restoring = usage.clone();
        let restored = tokio::task::spawn_blocking(move || restoring.restore())
            .await
            .map_err(|e| StateError::Backend(e.to_string()))??;
        tracing::info!(
            slots = restored,
            subjects = usage.table.len(),
            "usage counters restored"
        );
        Ok(Arc::new(Gateway {
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            plans: Arc::new(ArcSwap::from_pointee(plans)),
            rate_share: AtomicU32::new(1),
            usage,
            usage_page_rate: Default::default(),
            metrics,
            keys,
            catalog,
            replica,
            tls,
            access_log,
            data: RwLock::new(data),
            writes: tokio::sync::Mutex::new(()),
            clients,
            workers,
            ready: AtomicBool::new(false),
            reload_lock: tokio::sync::Mutex::new(()),
        }))
    }

    /// The live configuration, compiled; a reload swaps it whole.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        SNAPSHOT.with(|copy| latest(&mut copy.borrow_mut(), &self.snapshot).clone())
    }

    /// Runs `f` on the plans as the request path uses them (`f` may not call this again).
    pub fn with_plans<R>(&self, f: impl FnOnce(&PlanTable) -> R) -> R {
        PLANS.with(|copy| f(latest(&mut copy.borrow_mut(), &self.plans)))
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Reads the configuration file again and swaps it in when valid. An invalid file is
    /// rejected with all its errors and the running configuration stays.
    pub async fn reload(&self) -> Result<(), ConfigErrors> {
        let _serialized = self.reload_lock.lock().await;
        let current = self.snapshot();
        let config = match config::load(&current.config.path) {
            Ok(config) => config,
            Err(errors) => {
                self.metrics.reload(false);
                tracing::warn!(errors = %errors, "configuration reload rejected; keeping the running configuration");
                return Err(errors);
            }
        };
        if config.listen != current.config.listen
            || config.admin_listen != current.config.admin_listen
            || config.tls.as_ref().map(|t| &t.listen) != current.config.tls.as_ref().map(|t| &t.listen)
        {
            tracing::warn!("listen addresses changed; they take effect on restart only");
        }
        if config.logs != current.config.logs {
            tracing::warn!("[logs] changed; it takes effect on restart only (docs/access-logs.md)");
        }
        // New certificates for new connections; open ones keep theirs.
        if let (Some(tls), Some(section)) = (&self.tls, &config.tls)
            && let Err(error) = tls.reload(&section.options)
        {
            self.metrics.reload(false);
            tracing::warn!(%error, "configuration reload rejected: TLS; keeping the running configuration");
            return Err(ConfigErrors(vec![crate::config::ConfigError {
                file: config.path.clone(),
                line: 0,
                column: 0,
                field: "server.tls".into(),
                message: error,
            }]));
        }
        let next = Snapshot::build(
            Arc::new(config),
            Some(&current),
            &self.metrics,
            &self.clients,
            self.workers,
        );
        next.resolve_new_endpoints().await;
        // JWKS keys before the configuration goes live: the previous fetch for the same
        // URLs, then a fresh one; a failed fetch keeps what was inherited.
        next.jwt.inherit(&current.jwt);
        crate::auth::jwks_fetch::refresh(&next.jwt, |_| true).await;
        self.snapshot.store(Arc::new(next));
        // Under the write lock: rebuilds never race each other to the store.
        self.rebuild_plans(&self.write_data());
        self.metrics.reload(true);
        tracing::info!("configuration reloaded");
        Ok(())
    }

    fn read_data(&self) -> RwLockReadGuard<'_, StateData> {
        // A panic while writing leaves maps that are still valid values.
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_data(&self) -> RwLockWriteGuard<'_, StateData> {
        self.data.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The node's name in usage slots: `[cluster]`'s, or [`LOCAL_NODE`].
pub fn node_name(config: &Config) -> String {
    config
        .cluster
        .as_ref()
        .map_or_else(|| LOCAL_NODE.to_string(), |c| c.node_name())
}

/// The access log's node name: `[cluster] node_id`, else the host name (a single node's
/// usage slot is `local`, which would not tell nodes' log files apart).
pub fn log_node_name(config: &Config) -> String {
    config
        .cluster
        .as_ref()
        .map_or_else(crate::config::schema::host_name, |c| c.node_name())
}

/// Plans and consumers, and every key streamed from the catalog into the request path's
/// table (keys are never all held twice).
async fn load_catalog(catalog: Arc<dyn Catalog>) -> Result<(KeyTable, StateData), StateError> {
    tokio::task::spawn_blocking(move || {
        let data = catalog.load()?;
        let keys = KeyTable::default();
        keys.load(&data, DEFAULT_PLAN, |add| catalog.for_each_key(add))?;
        Ok((keys, data))
    })
    .await
    .map_err(|e| StateError::Backend(e.to_string()))?
}
