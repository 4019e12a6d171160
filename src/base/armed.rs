//! A wait's registration, remembered: a future polled again by the same task while
//! nothing has happened to it need not register that task's waker again. Registering a
//! waker with a tokio timer or channel costs two to four locked instructions, and a
//! connection waits on its timer and on shutdown twice per request (docs/benchmarks.md,
//! "Locked instructions").

use std::task::{Context, Poll, Waker};

/// The waker the wait left registered at its last pending poll.
#[derive(Default)]
pub struct Armed(Option<Waker>);

impl Armed {
    /// Runs `poll` on the wait, unless the wait is `quiet` (nothing has happened to it
    /// since it registered) and holds this task's waker already: then it stays pending.
    pub fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        quiet: bool,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        let holds = self.0.as_ref().is_some_and(|armed| armed.will_wake(cx.waker()));
        if quiet && holds {
            return Poll::Pending;
        }
        let polled = poll(cx);
        if polled.is_ready() {
            self.0 = None;
        } else if !holds {
            self.0 = Some(cx.waker().clone());
        }
        polled
    }

    /// The wait was reset: its next poll registers again.
    pub fn forget(&mut self) {
        self.0 = None;
    }
}

/// A waker that counts its wakes, for tests of waits.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct WakeCount(std::sync::atomic::AtomicUsize);

#[cfg(test)]
impl WakeCount {
    pub(crate) fn waker() -> (std::sync::Arc<WakeCount>, Waker) {
        let count = std::sync::Arc::new(WakeCount::default());
        let waker = Waker::from(count.clone());
        (count, waker)
    }

    pub(crate) fn get(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
impl std::task::Wake for WakeCount {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls a wait that never finishes through `armed`: pending, and whether it was polled.
    fn wait(armed: &mut Armed, waker: &Waker, quiet: bool) -> (bool, bool) {
        let mut polled = false;
        let pending = armed
            .poll(&mut Context::from_waker(waker), quiet, |_| {
                polled = true;
                Poll::<()>::Pending
            })
            .is_pending();
        (pending, polled)
    }

    #[test]
    fn a_quiet_wait_that_holds_the_waker_is_not_polled_and_any_other_is() {
        let mut armed = Armed::default();
        let (_, first) = WakeCount::waker();
        let (_, second) = WakeCount::waker();
        assert_eq!(wait(&mut armed, &first, true), (true, true), "the first wait registers");
        assert_eq!(wait(&mut armed, &first, true), (true, false), "quiet, same task");
        assert_eq!(wait(&mut armed, &first, false), (true, true), "something happened");
        assert_eq!(wait(&mut armed, &second, true), (true, true), "another task");
        armed.forget();
        assert_eq!(wait(&mut armed, &second, true), (true, true), "after a reset");
        let ready = armed.poll(&mut Context::from_waker(&second), false, |_| Poll::Ready(()));
        assert!(ready.is_ready());
        assert!(armed.0.is_none(), "a finished wait holds no waker");
    }
}
