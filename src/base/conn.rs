//! Where an HTTP/1 connection is between requests. The listener's head guard and the
//! response body of each request share it: the body says when the response is finished,
//! so the guard knows the next bytes start a new head (docs/architecture.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Waker;

const AWAITING_HEAD: u8 = 0;
const IN_REQUEST: u8 = 1;
const UNGUARDED: u8 = 2;

/// What the connection is doing, as the guard sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The next bytes start a request head.
    AwaitingHead,
    /// A request (its body or its response) is in progress.
    InRequest,
    /// The connection switched protocols: nothing more to watch.
    Unguarded,
}

#[derive(Debug)]
pub struct ConnPhase {
    state: AtomicU8,
    /// The guard's read, woken when a response finishes: hyper may already be waiting for
    /// the next head, and the guard must start its idle and park timers.
    reader: atomic_waker::AtomicWaker,
}

impl ConnPhase {
    pub fn new() -> Arc<Self> {
        Arc::new(ConnPhase {
            state: AtomicU8::new(AWAITING_HEAD),
            reader: atomic_waker::AtomicWaker::new(),
        })
    }

    /// A head was read and handed on: a request is now in progress.
    pub fn request_started(&self) {
        self.state.store(IN_REQUEST, Ordering::Release);
    }

    /// The response was written out: the next bytes start a new request head.
    pub fn response_finished(&self) {
        if self
            .state
            .compare_exchange(IN_REQUEST, AWAITING_HEAD, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.reader.wake();
        }
    }

    /// The connection switched protocols (WebSocket): stop watching it.
    pub fn upgraded(&self) {
        self.state.store(UNGUARDED, Ordering::Release);
    }

    /// The current phase; `waker` is woken when a response finishes after this call.
    /// Registers before looking, so a response finishing in between still wakes it.
    pub fn watch(&self, waker: &Waker) -> Phase {
        self.reader.register(waker);
        match self.state.load(Ordering::Acquire) {
            AWAITING_HEAD => Phase::AwaitingHead,
            UNGUARDED => Phase::Unguarded,
            _ => Phase::InRequest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_response_awaits_the_next_head_and_an_upgrade_ends_watching() {
        let phase = ConnPhase::new();
        let waker = Waker::noop();
        assert_eq!(phase.watch(waker), Phase::AwaitingHead);
        phase.request_started();
        assert_eq!(phase.watch(waker), Phase::InRequest);
        phase.response_finished();
        assert_eq!(phase.watch(waker), Phase::AwaitingHead);
        // Finishing twice (a body dropped after its end) changes nothing.
        phase.response_finished();
        assert_eq!(phase.watch(waker), Phase::AwaitingHead);
        phase.request_started();
        phase.upgraded();
        phase.response_finished();
        assert_eq!(phase.watch(waker), Phase::Unguarded);
    }
}
