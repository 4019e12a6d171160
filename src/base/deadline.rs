//! A deadline that is cheap to move: moving it later only stores an `Instant`; the timer
//! is re-armed when it fires early. Connections and bodies move their deadline on every
//! request or chunk, and re-registering a tokio timer each time would cost more than
//! the rest of the bookkeeping. The timer itself is allocated on first wait only.
//!
//! A wait while the timer already holds the task's waker does not poll it again: each
//! poll of a pending tokio timer registers the waker anew, four locked instructions, and
//! a connection waits on its deadline twice per request (docs/benchmarks.md, "Locked
//! instructions").

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

pub struct Deadline {
    at: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The waker the armed timer holds (from its last pending poll), until it fires or
    /// is reset.
    armed: Option<Waker>,
}

impl Deadline {
    pub fn new(at: Instant) -> Self {
        Deadline {
            at,
            sleep: None,
            armed: None,
        }
    }

    pub fn set(&mut self, at: Instant) {
        self.at = at;
        if let Some(sleep) = &mut self.sleep
            && at < sleep.deadline()
        {
            sleep.as_mut().reset(at);
            self.armed = None;
        }
    }

    /// Ready once the deadline has passed; registers the task's waker otherwise.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let at = self.at;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        loop {
            // Not fired, and it will wake this task when it does: nothing to register.
            if !sleep.is_elapsed() && self.armed.as_ref().is_some_and(|armed| armed.will_wake(cx.waker())) {
                return Poll::Pending;
            }
            self.armed = None;
            if sleep.as_mut().poll(cx).is_pending() {
                self.armed = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if Instant::now() >= self.at {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(self.at);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn moving_later_delays_expiry_and_earlier_advances_it() {
        let start = Instant::now();
        let mut deadline = Deadline::new(start + Duration::from_secs(1));
        std::future::poll_fn(|cx| {
            assert!(deadline.poll_expired(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        deadline.set(start + Duration::from_secs(5));
        std::future::poll_fn(|cx| deadline.poll_expired(cx)).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
        deadline.set(Instant::now() + Duration::from_millis(10));
        std::future::poll_fn(|cx| deadline.poll_expired(cx)).await;
        assert_eq!(Instant::now() - start, Duration::from_millis(5010));
    }

    /// Waits with the timer already armed for the same task skip the timer; a wait from
    /// another task (another waker) registers that one, and each is woken on expiry.
    #[tokio::test(start_paused = true)]
    async fn an_armed_timer_wakes_its_task_and_a_new_waker_is_registered() {
        let start = Instant::now();
        let mut deadline = Deadline::new(start + Duration::from_secs(1));
        let first = std::sync::Arc::new(Counter::default());
        let first_waker = Waker::from(first.clone());
        let mut cx = Context::from_waker(&first_waker);
        assert!(deadline.poll_expired(&mut cx).is_pending());
        assert!(deadline.poll_expired(&mut cx).is_pending(), "second wait, same task");
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(
            first.0.load(std::sync::atomic::Ordering::SeqCst) >= 1,
            "the armed waker was not woken"
        );
        assert!(deadline.poll_expired(&mut cx).is_ready());

        // Moved later: fires early, re-arms, and wakes whichever task waited last.
        deadline.set(Instant::now() + Duration::from_secs(2));
        assert!(deadline.poll_expired(&mut cx).is_pending());
        let second = std::sync::Arc::new(Counter::default());
        let second_waker = Waker::from(second.clone());
        assert!(
            deadline
                .poll_expired(&mut Context::from_waker(&second_waker))
                .is_pending()
        );
        tokio::time::advance(Duration::from_millis(2100)).await;
        assert!(
            second.0.load(std::sync::atomic::Ordering::SeqCst) >= 1,
            "the new waker was not registered"
        );
        assert!(
            deadline
                .poll_expired(&mut Context::from_waker(&second_waker))
                .is_ready()
        );

        // Moved earlier while armed: the timer is reset and still wakes the task.
        let mut deadline = Deadline::new(Instant::now() + Duration::from_secs(60));
        let third = std::sync::Arc::new(Counter::default());
        let third_waker = Waker::from(third.clone());
        assert!(
            deadline
                .poll_expired(&mut Context::from_waker(&third_waker))
                .is_pending()
        );
        deadline.set(Instant::now() + Duration::from_secs(1));
        assert!(
            deadline
                .poll_expired(&mut Context::from_waker(&third_waker))
                .is_pending()
        );
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(
            third.0.load(std::sync::atomic::Ordering::SeqCst) >= 1,
            "the reset timer did not wake"
        );
        assert!(deadline.poll_expired(&mut Context::from_waker(&third_waker)).is_ready());
    }

    #[derive(Default)]
    struct Counter(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counter {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}
