//! The shutdown signal every background service and listener honours: a `watch` channel
//! that turns `true` once. Services are started in one place (`gateway::services`) with a
//! receiver each, so none outlives the process's orderly stop.

use std::future::Future;

use tokio::sync::watch;

use super::armed::Armed;

/// A receiver of the shutdown signal.
pub type Shutdown = watch::Receiver<bool>;

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut Shutdown) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// [`stopped`], for a wait that is polled again and again (a connection's, twice per
/// request): while nothing was sent since it registered this task's waker, a poll returns
/// at once ([`Armed`]).
pub fn stopped_armed(shutdown: &mut Shutdown) -> impl Future<Output = ()> + Send + '_ {
    let probe = shutdown.clone();
    let mut waiting = Box::pin(stopped(shutdown));
    let mut armed = Armed::default();
    std::future::poll_fn(move |cx| {
        // `has_changed` is a plain load; an error (the sender gone) ends the wait too.
        let quiet = !probe.has_changed().unwrap_or(true);
        armed.poll(cx, quiet, |cx| waiting.as_mut().poll(cx))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::armed::WakeCount;
    use std::task::Context;

    #[tokio::test]
    async fn an_armed_wait_ends_when_shutdown_is_sent_and_wakes_the_last_waker() {
        let (tx, mut rx) = watch::channel(false);
        let stop = stopped_armed(&mut rx);
        let mut stop = std::pin::pin!(stop);
        let (_, first_waker) = WakeCount::waker();
        assert!(stop.as_mut().poll(&mut Context::from_waker(&first_waker)).is_pending());
        assert!(stop.as_mut().poll(&mut Context::from_waker(&first_waker)).is_pending());
        // Another task polls it: that task's waker is the one woken.
        let (second, second_waker) = WakeCount::waker();
        assert!(stop.as_mut().poll(&mut Context::from_waker(&second_waker)).is_pending());
        tx.send(true).unwrap();
        assert_eq!(second.get(), 1, "the last waker was not woken");
        assert!(stop.as_mut().poll(&mut Context::from_waker(&second_waker)).is_ready());
    }

    #[tokio::test]
    async fn an_armed_wait_ends_at_once_when_already_stopped_or_the_sender_is_gone() {
        let (tx, mut rx) = watch::channel(true);
        stopped_armed(&mut rx).await;
        let (tx2, mut rx2) = watch::channel(false);
        drop(tx2);
        stopped_armed(&mut rx2).await;
        drop(tx);
    }
}
