//! The shutdown signal every background service and listener honours: a `watch` channel
//! that turns `true` once. Services are started in one place (`gateway::services`) with a
//! receiver each, so none outlives the process's orderly stop.

use tokio::sync::watch;

/// A receiver of the shutdown signal.
pub type Shutdown = watch::Receiver<bool>;

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut Shutdown) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
