//! Where an HTTP/1 connection is between requests. The listener's head guard and the
//! response body of each request share it: the body says when the response is finished,
//! so the guard knows the next bytes start a new head (docs/architecture.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
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

/// The requests (HTTP/2 streams) of one connection, for the limits that count them:
/// requests per connection, idle time with no stream open, and streams the client reset
/// before their response (HTTP/2 rapid reset, CVE-2023-44487). A few relaxed atomics per
/// request, no clock read: idle time is judged by the listener's periodic check, which
/// compares `started` between two looks.
#[derive(Debug)]
pub struct ConnStreams {
    started: AtomicU64,
    active: AtomicU32,
    premature_resets: AtomicU32,
    max_premature_resets: u32,
    abusive: AtomicBool,
    /// The connection's task, woken once the connection is found abusive.
    closer: atomic_waker::AtomicWaker,
}

impl ConnStreams {
    pub fn new(max_premature_resets: u32) -> ConnStreams {
        ConnStreams {
            started: AtomicU64::new(0),
            active: AtomicU32::new(0),
            premature_resets: AtomicU32::new(0),
            max_premature_resets,
            abusive: AtomicBool::new(false),
            closer: atomic_waker::AtomicWaker::new(),
        }
    }

    /// A request begins; the returned guard counts it as reset unless `answered`.
    pub fn start(&self) -> StreamGuard<'_> {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            streams: self,
            answered: false,
            alone: false,
        }
    }

    /// [`ConnStreams::start`] for a connection whose requests come one at a time from one
    /// task, which alone writes these counts while the guard lives (HTTP/1 on the
    /// purpose-built path; other tasks only read them). A plain load and store then
    /// count as well as a locked add does, without the lock: three locked instructions a
    /// request (docs/benchmarks.md, "Locked instructions").
    pub fn start_alone(&self) -> StreamGuard<'_> {
        self.started
            .store(self.started.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        self.active
            .store(self.active.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        StreamGuard {
            streams: self,
            answered: false,
            alone: true,
        }
    }

    /// Requests begun on the connection so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// No request is open now.
    pub fn is_idle(&self) -> bool {
        self.active.load(Ordering::Acquire) == 0
    }

    /// The client reset too many streams before their response: close the connection.
    pub fn is_abusive(&self) -> bool {
        self.abusive.load(Ordering::Relaxed)
    }

    /// Ready once the connection has been found abusive; registers `cx`'s waker.
    pub fn poll_abused(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.is_abusive() {
            return std::task::Poll::Ready(());
        }
        self.closer.register(cx.waker());
        if self.is_abusive() {
            return std::task::Poll::Ready(());
        }
        std::task::Poll::Pending
    }

    fn ended(&self, answered: bool, alone: bool) {
        if alone {
            self.active
                .store(self.active.load(Ordering::Relaxed).saturating_sub(1), Ordering::Release);
        } else {
            self.active.fetch_sub(1, Ordering::Release);
        }
        if answered || self.max_premature_resets == 0 {
            return;
        }
        let resets = self.premature_resets.fetch_add(1, Ordering::Relaxed) + 1;
        // Envoy's rule: past the limit, and more than half of all streams.
        if resets >= self.max_premature_resets
            && u64::from(resets) * 2 > self.started()
            && !self.abusive.swap(true, Ordering::Relaxed)
        {
            self.closer.wake();
        }
    }
}

/// One request in progress; dropped unanswered (the client reset the stream or went
/// away before the response head) it counts as a premature reset.
pub struct StreamGuard<'a> {
    streams: &'a ConnStreams,
    answered: bool,
    /// Counted by [`ConnStreams::start_alone`].
    alone: bool,
}

impl StreamGuard<'_> {
    pub fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.streams.ended(self.answered, self.alone);
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

    #[test]
    fn streams_reset_before_their_answer_mark_the_connection_abusive() {
        let streams = ConnStreams::new(3);
        streams.start().answered();
        assert!(streams.is_idle());
        let open = streams.start();
        assert!(!streams.is_idle());
        drop(open);
        drop(streams.start());
        assert!(!streams.is_abusive(), "2 resets of 3 streams: under the limit");
        drop(streams.start());
        assert!(streams.is_abusive(), "3 resets, 3 of 4 streams");
        assert_eq!(streams.started(), 4);

        // Mostly answered: resets past the count but not half the streams are tolerated.
        let streams = ConnStreams::new(2);
        for _ in 0..10 {
            streams.start().answered();
        }
        drop(streams.start());
        drop(streams.start());
        assert!(!streams.is_abusive());
    }

    #[test]
    fn requests_counted_alone_are_counted_as_locked_ones_are() {
        let streams = ConnStreams::new(2);
        let open = streams.start_alone();
        assert!(!streams.is_idle());
        assert_eq!(streams.started(), 1);
        open.answered();
        assert!(streams.is_idle());
        // Unanswered ones still count as resets, up to the connection found abusive.
        drop(streams.start_alone());
        assert!(!streams.is_abusive());
        drop(streams.start_alone());
        assert!(streams.is_abusive(), "2 resets of 3 streams");
        assert!(streams.is_idle());
        assert_eq!(streams.started(), 3);
        // The general path's locked counts carry on from the same numbers.
        let open = streams.start();
        assert_eq!(streams.started(), 4);
        open.answered();
        assert!(streams.is_idle());
    }
}
