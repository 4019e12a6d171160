//! Every background service of a node, started in one place, each ending on the shared
//! shutdown signal (docs/operations.md, "Shutdown"): the usage flusher, DNS
//! re-resolution, active health checks, JWKS refresh and, in global mode, the replica's
//! services (heartbeats, usage stream, snapshots) and the applier of replicated writes.
//! The flusher stops last, after the workers have drained, so the counts of drained
//! requests are written too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Gateway;
use crate::base::{Shutdown, stopped};
use crate::state::ReplicaHooks;

/// The running services of a node.
pub struct Services {
    background: Vec<JoinHandle<()>>,
    /// The access log's writer and uploader: stopped after the workers, before the rest.
    logs: Option<crate::logs::service::LogService>,
    flusher: JoinHandle<()>,
    stop_flusher: watch::Sender<bool>,
    force: watch::Sender<bool>,
}

/// Starts every background service; all but the flusher end when `shutdown` turns. Marks
/// the gateway ready at once (single node, or a node serving from its disk while the
/// cluster is unreachable) or once its usage view has caught up with the cluster.
pub fn start(gateway: &Arc<Gateway>, shutdown: &Shutdown, logs: Option<crate::logs::service::LogService>) -> Services {
    let (stop_flusher, flusher_stop) = watch::channel(false);
    let (force, forced) = watch::channel(false);
    let flush_interval = gateway.snapshot().config.usage.flush_interval;
    let flusher = tokio::spawn(gateway.usage.clone().run(flush_interval, flusher_stop, forced));
    let checked = gateway.clone();
    let mut background = vec![
        tokio::spawn(resolve_periodically(gateway.clone(), shutdown.clone())),
        tokio::spawn(crate::upstream::check::run(
            move || checked.snapshot().pools.values().map(|p| p.pool.clone()).collect(),
            shutdown.clone(),
        )),
        tokio::spawn(refresh_jwks_periodically(gateway.clone(), shutdown.clone())),
        tokio::spawn(sample_traffic(gateway.metrics.clone(), shutdown.clone())),
    ];
    if gateway.tls.is_some() {
        background.push(tokio::spawn(watch_certificates(gateway.clone(), shutdown.clone())));
    }
    match &gateway.replica {
        Some(replica) => background.extend(start_replica(gateway, replica.clone(), shutdown)),
        None => gateway.set_ready(true),
    }
    Services {
        background,
        logs,
        flusher,
        stop_flusher,
        force,
    }
}

/// Samples the route counters for the console's last hour (docs/console.md).
async fn sample_traffic(metrics: Arc<crate::metrics::Metrics>, mut shutdown: Shutdown) {
    let mut ticks = tokio::time::interval(crate::metrics::history::SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let counts = metrics.route_counts();
                metrics.traffic.record(crate::auth::unix_now() as u64, std::time::Instant::now(), counts);
            }
            _ = stopped(&mut shutdown) => return,
        }
    }
}

fn start_replica(
    gateway: &Arc<Gateway>,
    replica: Arc<dyn crate::state::Replica>,
    shutdown: &Shutdown,
) -> Vec<JoinHandle<()>> {
    let mut handles = Vec::new();
    if !replica.is_attached() {
        // Started from this node's disk: serve now; the view catches up once the cluster
        // answers.
        gateway.set_ready(true);
    }
    if let Some(changes) = replica.take_changes() {
        handles.push(tokio::spawn(gateway.clone().apply_changes(changes, shutdown.clone())));
    }
    // Not ready until this node's view holds every node's usage up to the stream's tail
    // at start.
    let (caught_up, rebuilt) = oneshot::channel();
    let divide_rate = gateway
        .snapshot()
        .config
        .cluster
        .as_ref()
        .is_some_and(|c| c.divide_rate);
    let (view, sharing) = (gateway.clone(), gateway.clone());
    // Quota leases: claims from the request path to the replica, answers back to the table.
    let (claims_tx, claims_rx) = tokio::sync::mpsc::unbounded_channel();
    gateway.usage.table.leasing.enable(claims_tx);
    let granting = gateway.clone();
    let grants: crate::state::GrantSink = Box::new(move |claim, granted| {
        granting
            .usage
            .table
            .apply_grant(claim, granted, granting.usage.clock.now());
    });
    let hooks = ReplicaHooks {
        usage: Box::new(move |own, rows| {
            let now = view.usage.clock.now();
            for (row, grown) in rows {
                view.usage.table.apply_replicated(&row, own, grown, now);
            }
        }),
        live_nodes: Box::new(move |live| {
            sharing.usage.table.leasing.set_nodes(live);
            if divide_rate {
                sharing.set_rate_share(live);
            }
        }),
        caught_up,
        clock: gateway.usage.clock.clone(),
        claims: Some((claims_rx, grants)),
    };
    handles.extend(replica.start(hooks, shutdown.clone()));
    let ready = gateway.clone();
    let mut stop = shutdown.clone();
    handles.push(tokio::spawn(async move {
        let started = std::time::Instant::now();
        tokio::select! {
            rebuilt = rebuilt => if rebuilt.is_ok() {
                tracing::info!(millis = started.elapsed().as_millis() as u64, "usage view rebuilt; ready");
                ready.set_ready(true);
            },
            _ = stopped(&mut stop) => {}
        }
    }));
    handles
}

impl Services {
    /// After the workers have drained: the final usage flush, then waits for every service
    /// (they were told to stop with the shutdown signal). When `force` resolves first (a
    /// second SIGTERM), a final flush that keeps failing is given up.
    pub async fn stop(self, force: impl std::future::Future<Output = ()>) {
        let Services {
            background,
            logs,
            mut flusher,
            stop_flusher,
            force: give_up,
        } = self;
        if let Some(logs) = logs {
            logs.stop().await;
        }
        let _ = stop_flusher.send(true);
        tokio::select! {
            _ = &mut flusher => {}
            () = force => {
                let _ = give_up.send(true);
                let _ = flusher.await;
            }
        }
        for handle in background {
            let _ = handle.await;
        }
    }
}

/// How often certificate files are looked at for changes.
const CERTIFICATE_CHECK: Duration = Duration::from_secs(2);

/// Loads the listener's certificates again when their files change on disk (a renewal by
/// certbot or a secrets manager); a bad set is refused with an error and the running one
/// stays. New connections get the new certificates, open ones keep theirs.
async fn watch_certificates(gateway: Arc<Gateway>, mut shutdown: Shutdown) {
    /// A file's modification time and size, `None` while it cannot be read.
    type Stamp = Option<(std::time::SystemTime, u64)>;
    let stamp = |files: &[std::path::PathBuf]| -> Vec<Stamp> {
        files
            .iter()
            .map(|f| {
                std::fs::metadata(f)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    };
    let current = || gateway.snapshot().config.tls.clone();
    // As the files are now (the certificates were loaded moments ago).
    let mut last: Option<(Vec<std::path::PathBuf>, Vec<Stamp>)> = current().map(|section| {
        let files = section.options.files();
        let stamps = stamp(&files);
        (files, stamps)
    });
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CERTIFICATE_CHECK) => {}
            _ = stopped(&mut shutdown) => return,
        }
        let (Some(tls), Some(section)) = (&gateway.tls, current()) else {
            continue;
        };
        let files = section.options.files();
        let now = stamp(&files);
        let changed = match &last {
            // A reload may have changed which files are read: compare like with like.
            Some((seen_files, seen)) => *seen_files == files && *seen != now,
            None => false,
        };
        last = Some((files, now));
        if changed {
            match tls.reload(&section.options) {
                Ok(()) => tracing::info!("certificates changed on disk; reloaded for new connections"),
                Err(error) => {
                    tracing::error!(%error, "certificates changed on disk but cannot be used; keeping the running ones")
                }
            }
        }
    }
}

/// Re-resolves host-name endpoints of the live configuration at each pool's interval.
async fn resolve_periodically(gateway: Arc<Gateway>, mut shutdown: Shutdown) {
    let mut last: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopped(&mut shutdown) => return,
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
                last.insert(pool.name.clone(), Instant::now());
                pool.resolve().await;
            }
        }
    }
}

/// Fetches JWKS URLs of the live configuration again at each issuer's `jwks_refresh`;
/// sooner — every 10 s at most — for an issuer with no keys (a failed fetch) or one whose
/// JWKS lacked a token's `kid`.
async fn refresh_jwks_periodically(gateway: Arc<Gateway>, mut shutdown: Shutdown) {
    const SOONEST: Duration = Duration::from_secs(10);
    // Keyed by snapshot and issuer: a reload brings a new verifier, fetched when built.
    let mut last: HashMap<(usize, usize), Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopped(&mut shutdown) => return,
        }
        let snapshot = gateway.snapshot();
        let generation = Arc::as_ptr(&snapshot) as usize;
        let urls = snapshot.jwt.jwks_urls();
        if urls.is_empty() {
            continue;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        let wanted = snapshot.jwt.wanted();
        for (index, _, interval) in &urls {
            let entry = last.entry((generation, *index)).or_insert(now);
            let since = now.duration_since(*entry);
            if since >= *interval || (wanted.contains(index) && since >= SOONEST.min(*interval)) {
                *entry = now;
                due.push(*index);
            }
        }
        crate::auth::jwks_fetch::refresh(&snapshot.jwt, |index| due.contains(&index)).await;
        last.retain(|(g, _), _| *g == generation);
    }
}
