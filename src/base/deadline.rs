//! A deadline that is cheap to move: moving it later only stores an `Instant`; the timer
//! is re-armed when it fires early. Connections and bodies move their deadline on every
//! request or chunk, and re-registering a tokio timer each time would cost more than
//! the rest of the bookkeeping. The timer itself is allocated on first wait only.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::time::{Instant, Sleep};

pub struct Deadline {
    at: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Deadline {
    pub fn new(at: Instant) -> Self {
        Deadline { at, sleep: None }
    }

    pub fn set(&mut self, at: Instant) {
        self.at = at;
        if let Some(sleep) = &mut self.sleep
            && at < sleep.deadline()
        {
            sleep.as_mut().reset(at);
        }
    }

    /// Ready once the deadline has passed; registers the task's waker otherwise.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let at = self.at;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        loop {
            ready!(sleep.as_mut().poll(cx));
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
}
