//! Running a gateway: bind, start workers and the admin API, handle signals, drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Gateway;

/// A started gateway.
pub struct Running {
    pub proxy_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    shutdown: watch::Sender<bool>,
    stop_flusher: watch::Sender<bool>,
    flusher: tokio::task::JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
    admin: tokio::task::JoinHandle<()>,
}

pub fn worker_count(config: &Config) -> usize {
    match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Binds every listener, starts the workers, the admin API and the resolver.
pub async fn start(config: Config) -> std::io::Result<Running> {
    let workers = worker_count(&config);
    let grace = config.server.shutdown_grace;
    let (listeners, proxy_addrs) = crate::listener::bind(&config.listen, workers)?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.admin_listen)))?;
    let admin_addr = admin_listener.local_addr()?;
    let (store, nats): (Arc<dyn crate::state::StateBackend>, _) = match &config.cluster {
        Some(cluster) => {
            let nats = crate::state::nats::NatsBackend::connect(cluster, &config.data_dir, cluster.node_name())
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            tracing::info!(node = %nats.node, region = %nats.region, "global mode: state in NATS JetStream");
            let started = std::time::Instant::now();
            if let Some((rows, sequence)) = nats
                .bootstrap()
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?
            {
                tracing::info!(
                    rows,
                    sequence,
                    millis = started.elapsed().as_millis() as u64,
                    "usage snapshot loaded"
                );
            }
            (
                nats.clone(),
                Some((nats, cluster.snapshot_interval, cluster.divide_rate)),
            )
        }
        None => {
            let sqlite = crate::state::SqliteBackend::open(&config.data_dir.join("tollgate.db"))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            (Arc::new(sqlite), None)
        }
    };
    let clock = crate::limits::window::Clock::from_env().map_err(std::io::Error::other)?;
    let flush_interval = config.usage.flush_interval;
    let gateway = Gateway::new(config, Arc::new(Metrics::default()), workers, store, clock)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    // The flusher stops after the workers, so counts of drained requests are written too.
    let (stop_flusher, flusher_rx) = watch::channel(false);
    let worker_handles = crate::listener::spawn_workers(gateway.clone(), listeners, shutdown_rx.clone(), grace)?;
    let admin = tokio::spawn(crate::admin::serve(
        admin_listener,
        gateway.clone(),
        shutdown_rx.clone(),
    ));
    tokio::spawn(resolve_periodically(gateway.clone(), shutdown_rx.clone()));
    let checked = gateway.clone();
    let mut health_shutdown = shutdown_rx.clone();
    tokio::spawn(crate::upstream::check::run(
        move || checked.snapshot().pools.values().map(|p| p.pool.clone()).collect(),
        move || async move { crate::listener::stopped(&mut health_shutdown).await },
    ));
    tokio::spawn(refresh_jwks_periodically(gateway.clone(), shutdown_rx));
    let flusher = tokio::spawn(gateway.usage.clone().run(flush_interval, flusher_rx));
    match nats {
        Some((nats, snapshot_interval, divide_rate)) => {
            tokio::spawn(
                nats.clone()
                    .snapshot_periodically(snapshot_interval, gateway.usage.clock),
            );
            let sharing = gateway.clone();
            tokio::spawn(nats.clone().track_live_nodes(move |live| {
                let sharing = sharing.clone();
                async move {
                    if divide_rate {
                        sharing.set_rate_share(live).await;
                    }
                }
            }));
            if !nats.is_attached() {
                // Started from this node's disk: serve now; the view catches up once
                // JetStream answers.
                gateway.set_ready(true);
            }
            if let Some(changes) = nats.take_changes() {
                tokio::spawn(gateway.clone().apply_changes(changes, nats.clone()));
            }
            // Not ready until this node's view holds every node's usage up to the stream's
            // tail at start.
            let (caught_up, rebuilt) = tokio::sync::oneshot::channel();
            let view = gateway.clone();
            tokio::spawn(nats.follow_usage(
                move |own, rows| {
                    let now = view.usage.clock.now();
                    for (row, grown) in rows {
                        view.usage.table.apply_replicated(&row, own, grown, now);
                    }
                },
                caught_up,
            ));
            let ready = gateway.clone();
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                if rebuilt.await.is_ok() {
                    tracing::info!(
                        millis = started.elapsed().as_millis() as u64,
                        "usage view rebuilt; ready"
                    );
                    ready.set_ready(true);
                }
            });
        }
        None => gateway.set_ready(true),
    }
    tracing::info!(proxy = ?proxy_addrs, admin = %admin_addr, workers, "tollgate ready");
    Ok(Running {
        proxy_addrs,
        admin_addr,
        gateway,
        shutdown,
        stop_flusher,
        flusher,
        workers: worker_handles,
        admin,
    })
}

impl Running {
    /// Serves until SIGTERM or SIGINT; SIGHUP reloads the configuration.
    pub async fn run_until_signalled(self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = signal(SignalKind::hangup())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP: reloading configuration");
                    let _ = self.gateway.reload().await;
                }
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
        self.stop().await;
        Ok(())
    }

    /// Stops accepting, lets in-flight requests finish within the grace period, and waits
    /// for every worker.
    pub async fn stop(self) {
        tracing::info!("shutting down: draining connections");
        self.gateway.set_ready(false);
        let _ = self.shutdown.send(true);
        let workers = self.workers;
        let _ = tokio::task::spawn_blocking(move || {
            for worker in workers {
                let _ = worker.join();
            }
        })
        .await;
        let _ = self.admin.await;
        let _ = self.stop_flusher.send(true);
        let _ = self.flusher.await;
        tracing::info!("stopped");
    }
}

/// Re-resolves host-name endpoints of the live configuration at each pool's interval.
async fn resolve_periodically(gateway: Arc<Gateway>, mut shutdown: watch::Receiver<bool>) {
    let mut last: std::collections::HashMap<String, tokio::time::Instant> = Default::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = crate::listener::stopped(&mut shutdown) => return,
        }
        let snapshot = gateway.snapshot();
        for upstream in snapshot.pools.values() {
            let pool = &upstream.pool;
            if !pool.endpoints.iter().any(|e| e.needs_resolution()) {
                continue;
            }
            let due = last
                .get(&pool.name)
                .is_none_or(|t| t.elapsed() >= pool.resolve_interval);
            if due {
                last.insert(pool.name.clone(), tokio::time::Instant::now());
                pool.resolve().await;
            }
        }
    }
}

/// Fetches JWKS URLs of the live configuration again at each issuer's `jwks_refresh`.
async fn refresh_jwks_periodically(gateway: Arc<Gateway>, mut shutdown: watch::Receiver<bool>) {
    // Keyed by snapshot and issuer: a reload brings a new verifier, fetched when built.
    let mut last: std::collections::HashMap<(usize, usize), tokio::time::Instant> = Default::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = crate::listener::stopped(&mut shutdown) => return,
        }
        let snapshot = gateway.snapshot();
        let generation = Arc::as_ptr(&snapshot) as usize;
        let urls = snapshot.jwt.jwks_urls();
        if urls.is_empty() {
            continue;
        }
        let now = tokio::time::Instant::now();
        let mut due = Vec::new();
        for (index, _, interval) in &urls {
            let entry = last.entry((generation, *index)).or_insert(now);
            if now.duration_since(*entry) >= *interval {
                *entry = now;
                due.push(*index);
            }
        }
        crate::auth::jwks_fetch::refresh(&snapshot.jwt, |index| due.contains(&index)).await;
        last.retain(|(g, _), _| *g == generation);
    }
}
