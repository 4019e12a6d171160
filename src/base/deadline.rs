//! A deadline that is cheap to move: moving it later only stores an `Instant`; the timer
//! is re-armed when it fires early. Connections and bodies move their deadline on every
//! request or chunk, and re-registering a tokio timer each time would cost more than
//! the rest of the bookkeeping. The timer itself is allocated on first wait only.
//!
//! A wait while the timer already holds the task's waker does not poll it again
//! ([`Armed`]).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::time::{Instant, Sleep};

use super::armed::Armed;

pub struct Deadline {
    at: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The timer's registration, until it fires or is reset.
    armed: Armed,
}

impl Deadline {
    pub fn new(at: Instant) -> Self {
        Deadline {
            at,
            sleep: None,
            armed: Armed::default(),
        }
    }

    pub fn set(&mut self, at: Instant) {
        self.at = at;
        if let Some(sleep) = &mut self.sleep
            && at < sleep.deadline()
        {
            sleep.as_mut().reset(at);
            self.armed.forget();
        }
    }

    /// Ready once the deadline has passed; registers the task's waker otherwise.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Deadline { at, sleep, armed } = self;
        let sleep = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*at)));
        loop {
            // Not fired yet: it wakes the task it holds when it does.
            let quiet = !sleep.is_elapsed();
            ready!(armed.poll(cx, quiet, |cx| sleep.as_mut().poll(cx)));
            if Instant::now() >= *at {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(*at);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;
    use std::time::Duration;

    use super::*;
    use crate::base::armed::WakeCount;

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
        let poll = |deadline: &mut Deadline, waker: &Waker| deadline.poll_expired(&mut Context::from_waker(waker));
        let start = Instant::now();
        let mut deadline = Deadline::new(start + Duration::from_secs(1));
        let (first, first_waker) = WakeCount::waker();
        assert!(poll(&mut deadline, &first_waker).is_pending());
        assert!(poll(&mut deadline, &first_waker).is_pending(), "second wait, same task");
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(first.get() >= 1, "the armed waker was not woken");
        assert!(poll(&mut deadline, &first_waker).is_ready());

        // Moved later: fires early, re-arms, and wakes whichever task waited last.
        deadline.set(Instant::now() + Duration::from_secs(2));
        assert!(poll(&mut deadline, &first_waker).is_pending());
        let (second, second_waker) = WakeCount::waker();
        assert!(poll(&mut deadline, &second_waker).is_pending());
        tokio::time::advance(Duration::from_millis(2100)).await;
        assert!(second.get() >= 1, "the new waker was not registered");
        assert!(poll(&mut deadline, &second_waker).is_ready());

        // Moved earlier while armed: the timer is reset and still wakes the task.
        let mut deadline = Deadline::new(Instant::now() + Duration::from_secs(60));
        let (third, third_waker) = WakeCount::waker();
        assert!(poll(&mut deadline, &third_waker).is_pending());
        deadline.set(Instant::now() + Duration::from_secs(1));
        assert!(poll(&mut deadline, &third_waker).is_pending());
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(third.get() >= 1, "the reset timer did not wake");
        assert!(poll(&mut deadline, &third_waker).is_ready());
    }
}
