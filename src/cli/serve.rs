//! Running a gateway: bind, start workers and the admin API, handle signals, drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::watch;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::gateway::services::Services;
use crate::metrics::Metrics;

/// A started gateway.
pub struct Running {
    pub proxy_addrs: Vec<SocketAddr>,
    /// The HTTPS listeners (`[server.tls] listen`).
    pub tls_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    shutdown: watch::Sender<bool>,
    services: Services,
    workers: Vec<JoinHandle<()>>,
    admin: tokio::task::JoinHandle<()>,
}

pub fn worker_count(config: &Config) -> usize {
    match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Binds every listener, opens the state backends, and starts the workers, the admin API
/// and the background services.
pub async fn start(config: Config) -> std::io::Result<Running> {
    let workers = worker_count(&config);
    let grace = config.server.shutdown_grace;
    let tls_listen = config.tls.as_ref().map(|t| t.listen.clone()).unwrap_or_default();
    let bound = crate::listener::bind(&config.listen, &tls_listen, workers)?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.admin_listen)))?;
    let admin_addr = admin_listener.local_addr()?;
    let admin_tls = match &config.admin_tls {
        Some(options) => Some(Arc::new(
            crate::tls::ServerTls::new(options).map_err(|e| std::io::Error::other(format!("admin TLS: {e}")))?,
        )),
        None => None,
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    let backends = crate::state::open(&config, &shutdown_rx)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let clock = crate::limits::window::Clock::from_env().map_err(std::io::Error::other)?;
    let (access_log, log_service) = match &config.logs {
        Some(logs) => {
            let node = crate::gateway::log_node_name(&config);
            let region = config.cluster.as_ref().map(|c| c.region.as_str());
            let (log, service) = crate::logs::service::start(logs, &node, region)?;
            (Some(log), Some(service))
        }
        None => (None, None),
    };
    let gateway = Gateway::new(
        config,
        Arc::new(Metrics::default()),
        workers,
        backends,
        clock,
        access_log,
    )
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    let worker_handles = crate::listener::spawn_workers(gateway.clone(), bound.per_worker, shutdown_rx.clone(), grace)?;
    let admin = tokio::spawn(crate::admin::serve(
        admin_listener,
        gateway.clone(),
        admin_tls,
        shutdown_rx.clone(),
    ));
    let services = crate::gateway::services::start(&gateway, &shutdown_rx, log_service);
    tracing::info!(proxy = ?bound.plain, tls = ?bound.tls, admin = %admin_addr, workers, "tollgate ready");
    Ok(Running {
        proxy_addrs: bound.plain,
        tls_addrs: bound.tls,
        admin_addr,
        gateway,
        shutdown,
        services,
        workers: worker_handles,
        admin,
    })
}

/// The signals a running gateway answers, taken over before it says it is ready: a
/// SIGTERM sent as soon as "ready" is printed must drain, not kill, the process.
pub struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    /// Within a tokio runtime.
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

impl Running {
    /// Serves until SIGTERM or SIGINT; SIGHUP reloads the configuration.
    pub async fn run_until_signalled(self, signals: Signals) -> std::io::Result<()> {
        let Signals {
            mut hangup,
            mut terminate,
            mut interrupt,
        } = signals;
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
        // A second signal while stopping gives up a final usage flush that keeps failing.
        let stopping = self.stop_with(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            tracing::warn!("second signal: stopping without waiting for the usage store");
        });
        stopping.await;
        Ok(())
    }

    /// Stops accepting, lets in-flight requests finish within the grace period, and waits
    /// for every worker.
    pub async fn stop(self) {
        self.stop_with(std::future::pending()).await;
    }

    /// [`Running::stop`], giving up a failing final flush when `force` resolves.
    async fn stop_with(self, force: impl std::future::Future<Output = ()>) {
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
        self.services.stop(force).await;
        tracing::info!("stopped");
    }
}
