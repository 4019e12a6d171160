//! The shutdown signal every background service and listener honours: a `watch` channel
//! that turns `true` once. Services are started in one place (`gateway::services`) with a
//! receiver each, so none outlives the process's orderly stop.

use std::future::Future;
use std::task::{Poll, Waker};

use tokio::sync::watch;

/// A receiver of the shutdown signal.
pub type Shutdown = watch::Receiver<bool>;

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut Shutdown) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// [`stopped`], for a wait that is polled again and again (a connection's, twice per
/// request): while nothing was sent since it registered this task's waker, a poll returns
/// at once. Polling the channel's own wait registers the waker anew each time, two locked
/// instructions (docs/benchmarks.md, "Locked instructions").
pub fn stopped_armed(shutdown: &mut Shutdown) -> impl Future<Output = ()> + Send + '_ {
    let probe = shutdown.clone();
    let mut waiting = Box::pin(stopped(shutdown));
    let mut armed: Option<Waker> = None;
    std::future::poll_fn(move |cx| {
        // `has_changed` is a plain load; an error (the sender gone) ends the wait too.
        let quiet = !probe.has_changed().unwrap_or(true);
        if quiet && armed.as_ref().is_some_and(|armed| armed.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        match waiting.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(()),
            Poll::Pending => {
                armed = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Context;

    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl std::task::Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn an_armed_wait_ends_when_shutdown_is_sent_and_wakes_the_last_waker() {
        let (tx, mut rx) = watch::channel(false);
        let stop = stopped_armed(&mut rx);
        let mut stop = std::pin::pin!(stop);
        let first = Arc::new(Counter::default());
        let first_waker = Waker::from(first.clone());
        assert!(stop.as_mut().poll(&mut Context::from_waker(&first_waker)).is_pending());
        assert!(stop.as_mut().poll(&mut Context::from_waker(&first_waker)).is_pending());
        // Another task polls it: that task's waker is the one woken.
        let second = Arc::new(Counter::default());
        let second_waker = Waker::from(second.clone());
        assert!(stop.as_mut().poll(&mut Context::from_waker(&second_waker)).is_pending());
        tx.send(true).unwrap();
        assert_eq!(second.0.load(Ordering::SeqCst), 1, "the last waker was not woken");
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
