//! The response body type of the proxy: either a small generated body or the upstream's
//! streamed body under read-idle and total deadlines.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::headers::SetFields;
use crate::base::http1::RawHeaders;
use crate::base::{ConnPhase, Deadline};
use crate::logs::Pending;
use crate::upstream::InflightGuard;
use crate::upstream::body::UpstreamBody;
use crate::upstream::client::PooledConn;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body, plus what must live exactly as long as it: the endpoint's in-flight
/// count, the connection's "response finished" signal and the request's access-log
/// record (finished with the bytes sent when the body is dropped).
pub struct ProxyBody {
    kind: Kind,
    _inflight: Option<InflightGuard>,
    finished: Option<Arc<ConnPhase>>,
    record: Option<Pending>,
}

// The upstream's body is boxed although it is the common case: a response is moved a
// dozen times on its way out of the pipeline's async functions, and 288 bytes inline made
// each move copy 488 bytes instead of 240; one allocation costs less than those copies
// (docs/benchmarks.md, "Fewer and smaller moves").
enum Kind {
    Full(Option<Bytes>),
    Upstream(Box<TimedBody>),
}

struct TimedBody {
    inner: UpstreamBody,
    idle: Duration,
    deadline: Option<Instant>,
    timer: Deadline,
    /// Returned to the worker's pool once the body has been read to its end.
    conn: Option<PooledConn>,
    /// The last frame was read.
    ended: bool,
    /// The pipeline's fields for the response head.
    set: SetFields,
}

impl TimedBody {
    /// `ended`: the body just returned its last frame (a chunked body never reports
    /// `is_end_stream`, so the caller says so).
    fn release_if_done(&mut self, ended: bool) {
        if (ended || self.inner.is_end_stream())
            && let Some(conn) = self.conn.take()
        {
            conn.release();
        }
    }
}

/// How long an upstream body may take.
pub struct BodyTimes {
    /// Longest wait for the next frame.
    pub idle: Duration,
    /// When the whole exchange must be over, if ever.
    pub deadline: Option<Instant>,
    /// When the response's head arrived: the first wait counts from there, so no clock
    /// read is needed for it.
    pub answered_at: Instant,
}

#[derive(Debug, thiserror::Error)]
#[error("upstream body {0}")]
pub struct BodyTimeout(&'static str);

impl ProxyBody {
    pub fn full(bytes: Bytes) -> Self {
        ProxyBody {
            kind: Kind::Full(Some(bytes)),
            _inflight: None,
            finished: None,
            record: None,
        }
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    /// Streams `inner`, failing when no frame arrives for `times.idle` or
    /// `times.deadline` passes.
    pub fn upstream(inner: UpstreamBody, times: BodyTimes, inflight: InflightGuard, conn: Option<PooledConn>) -> Self {
        let BodyTimes {
            idle,
            deadline,
            answered_at,
        } = times;
        let first = deadline.map_or(answered_at + idle, |d| d.min(answered_at + idle));
        ProxyBody {
            kind: Kind::Upstream(Box::new(TimedBody {
                inner,
                idle,
                deadline,
                timer: Deadline::new(first),
                conn,
                ended: false,
                set: SetFields::default(),
            })),
            _inflight: Some(inflight),
            finished: None,
            record: None,
        }
    }

    /// Signals `phase` when this body has been written out (or abandoned).
    pub fn set_finished_signal(&mut self, phase: Arc<ConnPhase>) {
        self.finished = Some(phase);
    }

    /// Carries the request's access-log record until the body is done.
    pub fn set_record(&mut self, record: Pending) {
        self.record = Some(record);
    }

    /// The response was written out at `at` (its record's end).
    pub fn ended_at(&mut self, at: Instant) {
        if let Some(record) = self.record.as_mut() {
            record.ended_at(at);
        }
    }

    /// The upstream's header fields as read, when the purpose-built client read them:
    /// they are part of the response's head beside its map (docs/architecture.md, "Two
    /// HTTP/1.1 paths").
    pub fn upstream_head(&self) -> Option<&RawHeaders> {
        match &self.kind {
            Kind::Upstream(timed) => timed.inner.head(),
            Kind::Full(_) => None,
        }
    }

    /// The fields the pipeline set on the upstream's response (`None` for a response
    /// of its own, whose map holds them).
    pub fn set_fields(&self) -> Option<&SetFields> {
        match &self.kind {
            Kind::Upstream(timed) => Some(&timed.set),
            Kind::Full(_) => None,
        }
    }

    pub(super) fn set_fields_mut(&mut self) -> Option<&mut SetFields> {
        match &mut self.kind {
            Kind::Upstream(timed) => Some(&mut timed.set),
            Kind::Full(_) => None,
        }
    }

    /// Moves the upstream's header fields and the pipeline's into `headers`, for a
    /// writer that only knows the map (hyper's server); names already there replace the
    /// fields read, and the pipeline's replace both.
    pub fn merge_upstream_head(&mut self, headers: &mut http::HeaderMap) {
        if let Kind::Upstream(timed) = &mut self.kind {
            timed.set.insert_into(headers);
            if let Some(head) = timed.inner.take_head() {
                head.merge_into(headers);
            }
        }
    }

    /// The whole body was produced (not cut short by the client or the upstream).
    fn is_complete(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            Kind::Upstream(timed) => timed.ended || timed.inner.is_end_stream(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // hyper stops polling a body once its announced length is written, so the end may
        // only be visible here.
        if let Kind::Upstream(timed) = &mut self.kind {
            timed.release_if_done(false);
        }
        if let Some(phase) = &self.finished {
            phase.response_finished();
        }
        if self.record.is_some()
            && self.is_complete()
            && let Some(record) = self.record.as_mut()
        {
            record.completed();
        }
    }
}

fn next_deadline(idle: Duration, deadline: Option<Instant>) -> Instant {
    let idle_at = Instant::now() + idle;
    deadline.map_or(idle_at, |d| d.min(idle_at))
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Full(bytes) => {
                let frame = bytes.take().filter(|b| !b.is_empty());
                if let (Some(record), Some(bytes)) = (this.record.as_mut(), &frame) {
                    record.sent(bytes.len());
                }
                Poll::Ready(frame.map(|b| Ok(Frame::data(b))))
            }
            Kind::Upstream(timed) => {
                if let Poll::Ready(frame) = Pin::new(&mut timed.inner).poll_frame(cx) {
                    match &frame {
                        Some(frame) => {
                            // A body that just ended waits no more: no clock read for it.
                            if !timed.inner.is_end_stream() {
                                let next = next_deadline(timed.idle, timed.deadline);
                                timed.timer.set(next);
                            }
                            if let (Some(record), Ok(frame)) = (this.record.as_mut(), frame)
                                && let Some(data) = frame.data_ref()
                            {
                                record.sent(data.len());
                            }
                        }
                        None => timed.ended = true,
                    }
                    timed.release_if_done(frame.is_none());
                    return Poll::Ready(frame);
                }
                ready!(timed.timer.poll_expired(cx));
                let which = match timed.deadline {
                    Some(d) if Instant::now() >= d => "exceeded the total timeout",
                    _ => "stalled longer than the read timeout",
                };
                Poll::Ready(Some(Err(Box::new(BodyTimeout(which)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            Kind::Upstream(timed) => timed.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(timed) => timed.inner.size_hint(),
        }
    }
}
