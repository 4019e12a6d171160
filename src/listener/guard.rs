//! Reads each HTTP/1 request head under the gateway's own rules before hyper sees it:
//! a head that is slow (`header_read_timeout` → 408), oversized (`max_header_bytes` → 431)
//! or outside RFC 9112's framing and `Host` rules (`framing::check_head` → 400/501) is
//! answered with the JSON error body and the connection closed. Bodies of known length
//! are followed, so heads pipelined behind them are checked too. Idle keep-alive
//! connections are closed after `idle_timeout`; a client that stops reading its response
//! for `send_timeout` is disconnected. Bytes pass through unchanged; the guard only
//! watches them.
//!
//! The guard knows where a head starts because the response of the previous request
//! signals `ConnPhase::response_finished` when hyper is done with it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::framing::{self, BodyLength};
use crate::base::Deadline;
use crate::base::{ConnPhase, ErrorKind, Phase, new_request_id, raw_error_response};
use crate::metrics::{Metrics, Protection};

/// How long a rejected connection is drained so the client reads the error before the close.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    /// Idle time after which a keep-alive connection is parked (see [`GuardedStream::parked`]).
    pub park_after: Duration,
    /// How long a write to the client may stay blocked (NGINX's `send_timeout`).
    pub send_timeout: Duration,
}

/// Where a parked connection goes: the listener waits on its socket with no HTTP state.
pub type ParkSlot<S> = tokio::sync::oneshot::Sender<(S, Instant)>;

/// A client connection the guard can watch: plain TCP, or TLS over it.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The socket underneath: a parked connection waits for it to become readable.
    fn socket(&self) -> &TcpStream;
    /// Writes a final error response if the socket takes it now, then ends the writing
    /// side (best effort: the connection is closing anyway).
    fn write_final(&mut self, bytes: &[u8]);
    /// Writes what the transport takes of `bytes` now (`poll_write`, unless the
    /// transport has a cheaper way).
    fn poll_send(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(self).poll_write(cx, bytes)
    }
    /// Reads what the transport has onto the end of `buf` (`read_buf`, unless the
    /// transport has a cheaper way for a head); `Ok(0)` at the end of input.
    fn poll_recv_head(&mut self, cx: &mut Context<'_>, buf: &mut bytes::BytesMut) -> Poll<std::io::Result<usize>> {
        let read = tokio::io::AsyncReadExt::read_buf(self, buf);
        tokio::pin!(read);
        read.poll(cx)
    }
}

impl Transport for TcpStream {
    fn socket(&self) -> &TcpStream {
        self
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        crate::base::sock::poll_send(self, cx, bytes)
    }

    fn poll_recv_head(&mut self, cx: &mut Context<'_>, buf: &mut bytes::BytesMut) -> Poll<std::io::Result<usize>> {
        crate::base::sock::poll_recv_small(self, cx, buf)
    }

    fn write_final(&mut self, bytes: &[u8]) {
        // The socket buffer of a connection that is sending us a head has room for a few
        // hundred bytes; if not, the client only misses the explanation.
        let _ = self.try_write(bytes);
        let _ = socket2::SockRef::from(&*self).shutdown(std::net::Shutdown::Write);
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    fn socket(&self) -> &TcpStream {
        self.get_ref().0
    }

    fn write_final(&mut self, bytes: &[u8]) {
        // rustls takes the bytes into its buffer; one flush attempt sends what the socket
        // takes now, then `close_notify` and the TCP close follow.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _ = Pin::new(&mut *self).poll_write(&mut cx, bytes);
        self.get_mut().1.send_close_notify();
        let _ = Pin::new(&mut *self).poll_flush(&mut cx);
        let _ = socket2::SockRef::from(self.socket()).shutdown(std::net::Shutdown::Write);
    }
}

enum State {
    /// Waiting for the first byte of a head; `first` = first request on the connection.
    Waiting {
        first: bool,
    },
    /// Inside a head; its bytes so far are in `head`.
    Head,
    /// Inside a body of known length, `remaining` bytes of it still to come.
    Body {
        remaining: u64,
    },
    /// The head went to hyper; the body and response are not the guard's business.
    Passing,
    Unguarded,
    /// An error response was written; discard input until EOF or the linger ends.
    Rejecting {
        drained: usize,
    },
}

pub struct GuardedStream<S> {
    /// `None` once parked: hyper then sees end of input and lets go of the connection.
    inner: Option<S>,
    park: Option<ParkSlot<S>>,
    /// When an idle keep-alive connection closes; it is parked before that.
    idle_until: Instant,
    phase: Arc<ConnPhase>,
    limits: HeadLimits,
    state: State,
    head: Vec<u8>,
    /// An incomplete pipelined head that arrived with the previous request.
    pipelined: Vec<u8>,
    timer: Deadline,
    /// Armed while a write to the client is blocked.
    write_timer: Option<Deadline>,
    metrics: Arc<Metrics>,
    /// Where refused heads are recorded (`[logs]`); boxed, as most connections never
    /// refuse one.
    refusals: Option<Box<super::refusal::RefusalLog>>,
}

impl<S: Transport> GuardedStream<S> {
    /// A new connection: the first head must be complete by `head_deadline` (its start
    /// plus `header_read_timeout`, or earlier when the fast path read part of it).
    pub fn new(
        inner: S,
        phase: Arc<ConnPhase>,
        limits: HeadLimits,
        head_deadline: Instant,
        park: Option<ParkSlot<S>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let now = Instant::now();
        GuardedStream {
            inner: Some(inner),
            park,
            idle_until: now + limits.idle_timeout,
            phase,
            limits,
            state: State::Waiting { first: true },
            head: Vec::new(),
            pipelined: Vec::new(),
            timer: Deadline::new(head_deadline),
            write_timer: None,
            metrics,
            refusals: None,
        }
    }

    fn stream(&mut self) -> io::Result<&mut S> {
        self.inner.as_mut().ok_or_else(|| io::ErrorKind::NotConnected.into())
    }

    /// Hands the socket to the park slot. hyper keeps ~30 KiB of buffers and state per
    /// HTTP/1 connection for as long as it lives; a parked socket costs a few hundred bytes,
    /// and a fresh hyper connection takes it over when the next request arrives (what NGINX
    /// does with its keep-alive state).
    fn park(&mut self) -> bool {
        match (self.park.take(), self.inner.take()) {
            (Some(slot), Some(stream)) => match slot.send((stream, self.idle_until)) {
                Ok(()) => true,
                Err((stream, _)) => {
                    self.inner = Some(stream);
                    false
                }
            },
            (slot, stream) => {
                self.park = slot;
                self.inner = stream;
                false
            }
        }
    }

    /// Records refused heads in the access log.
    pub fn with_refusals(mut self, refusals: Option<Box<super::refusal::RefusalLog>>) -> Self {
        self.refusals = refusals;
        self
    }

    /// `head`: what was read of the refused head, for the record's method and path.
    fn reject(&mut self, kind: ErrorKind, head: &[u8]) {
        let request_id = new_request_id();
        let response = raw_error_response(kind, request_id.as_str());
        if let Some(stream) = &mut self.inner {
            stream.write_final(&response);
        }
        if let Some(refusals) = &self.refusals {
            super::refusal::record(refusals, kind, &request_id, head, response.len());
        }
        self.state = State::Rejecting { drained: 0 };
        self.timer.set(Instant::now() + LINGER);
        if let Some(protection) = Protection::of_error(kind) {
            self.metrics.protected(protection);
        }
        tracing::debug!(code = kind.code(), "request head refused");
    }

    /// Scans newly read bytes of a head. `Some(kind)` = refuse the request.
    fn scan(&mut self, new: &[u8]) -> Option<ErrorKind> {
        let new = if self.head.is_empty() {
            trim_leading_crlf(new)
        } else {
            new
        };
        if new.is_empty() {
            return None;
        }
        if self.head.is_empty() && new.starts_with(b"PRI * HTTP/2.0") {
            // HTTP/2 prior knowledge: h2 enforces its own header limits.
            self.state = State::Unguarded;
            return None;
        }
        let max = self.limits.max_header_bytes;
        let mut owned = Vec::new();
        let (head, rest): (&[u8], &[u8]) = if self.head.is_empty()
            && let Some(end) = find_head_end(new)
        {
            // The common case: the whole head arrived in one read; no copy needed.
            (&new[..end], &new[end..])
        } else {
            let old = self.head.len();
            let search_from = old.saturating_sub(3);
            let room = (max + 4).saturating_sub(old);
            self.head.extend_from_slice(&new[..new.len().min(room)]);
            // hyper would end a head at a bare LF the guard does not look for.
            if framing::has_bare_lf(&self.head, old) {
                return Some(ErrorKind::BadRequest);
            }
            match find_head_end(&self.head[search_from..]) {
                None if self.head.len() <= max => {
                    // hyper parses partial heads too; refuse before it can.
                    return framing::check_partial(&self.head).err();
                }
                Some(end) => {
                    owned = std::mem::take(&mut self.head);
                    let end = search_from + end;
                    (&owned[..end], &owned[end..])
                }
                None if self.head.len() > max => return Some(ErrorKind::HeadersTooLarge),
                None => return None,
            }
        };
        if head.len() > max {
            return Some(ErrorKind::HeadersTooLarge);
        }
        self.phase.request_started();
        let body = match framing::check_head(head) {
            Ok(body) => body,
            Err(kind) => {
                // Kept for the refusal's access-log record.
                if !owned.is_empty() {
                    self.head = owned;
                }
                return Some(kind);
            }
        };
        self.pipelined.clear();
        self.follow(body, rest)
    }

    /// After a checked head: follows its body through `rest` (what came after the head in
    /// the same read), and checks each further head there — hyper finds those in its
    /// buffer and acts on them without reading again. An incomplete one is remembered so
    /// its timer starts when its turn comes.
    fn follow(&mut self, mut body: BodyLength, mut rest: &[u8]) -> Option<ErrorKind> {
        let max = self.limits.max_header_bytes;
        loop {
            match body {
                // Chunk sizes are hyper's to parse; heads pipelined behind a chunked body in
                // the same read meet hyper's parser only (and are re-framed upstream).
                BodyLength::Chunked => {
                    self.state = State::Passing;
                    return None;
                }
                BodyLength::Length(length) => match usize::try_from(length).ok().filter(|n| *n <= rest.len()) {
                    Some(n) => rest = &rest[n..],
                    None => {
                        self.state = State::Body {
                            remaining: length - rest.len() as u64,
                        };
                        return None;
                    }
                },
                BodyLength::None => {}
            }
            self.state = State::Passing;
            rest = trim_leading_crlf(rest);
            if rest.is_empty() {
                return None;
            }
            match find_head_end(rest) {
                Some(end) if end > max => return Some(ErrorKind::HeadersTooLarge),
                Some(end) => {
                    body = match framing::check_head(&rest[..end]) {
                        Ok(body) => body,
                        Err(kind) => return Some(kind),
                    };
                    rest = &rest[end..];
                }
                None if rest.len() > max => return Some(ErrorKind::HeadersTooLarge),
                None if framing::has_bare_lf(rest, 0) => return Some(ErrorKind::BadRequest),
                None => {
                    self.pipelined.extend_from_slice(rest);
                    return None;
                }
            }
        }
    }
}

pub(super) fn trim_leading_crlf(bytes: &[u8]) -> &[u8] {
    // Clients may send stray CRLFs between requests; they are not part of a head.
    let start = bytes
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(bytes.len());
    &bytes[start..]
}

fn find_head_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

impl<S: Transport> GuardedStream<S> {
    /// While a request is in progress: once its response has finished, the next bytes
    /// start a head — wait for them (idle and park timers), or read the pipelined ones.
    fn follow_phase(&mut self, cx: &mut Context<'_>) {
        match self.phase.watch(cx.waker()) {
            Phase::AwaitingHead if self.pipelined.is_empty() => {
                let now = Instant::now();
                self.state = State::Waiting { first: false };
                self.idle_until = now + self.limits.idle_timeout;
                let park_at = now + self.limits.park_after;
                let wake_at = if self.park.is_some() {
                    park_at.min(self.idle_until)
                } else {
                    self.idle_until
                };
                self.timer.set(wake_at);
            }
            Phase::AwaitingHead => {
                self.state = State::Head;
                self.head = std::mem::take(&mut self.pipelined);
                self.timer.set(Instant::now() + self.limits.header_read_timeout);
            }
            Phase::Unguarded => self.state = State::Unguarded,
            Phase::InRequest => {}
        }
    }

    /// After an error response: discards input until the client closes, the linger ends
    /// or too much arrives; then the connection is aborted.
    fn poll_drain(&mut self, cx: &mut Context<'_>, mut drained: usize) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; 8192];
        loop {
            if self.timer.poll_expired(cx).is_ready() || drained > LINGER_BYTES {
                return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
            }
            let mut sink = ReadBuf::new(&mut scratch);
            match Pin::new(self.stream()?).poll_read(cx, &mut sink) {
                Poll::Ready(Ok(())) if sink.filled().is_empty() => {
                    return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
                }
                Poll::Ready(Ok(())) => {
                    drained += sink.filled().len();
                    self.state = State::Rejecting { drained };
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: Transport> GuardedStream<S> {
    /// Reads a body of known length, then checks whatever follows it in the same read.
    fn poll_body(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>, remaining: u64) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(self.stream()?).poll_read(cx, buf))?;
        let read = buf.filled().len() - before;
        if read == 0 {
            return Poll::Ready(Ok(()));
        }
        let Some(after) = usize::try_from(remaining).ok().filter(|n| *n < read) else {
            let remaining = remaining - read as u64;
            self.state = if remaining == 0 {
                State::Passing
            } else {
                State::Body { remaining }
            };
            return Poll::Ready(Ok(()));
        };
        let rest = buf.filled()[before + after..].to_vec();
        match self.follow(BodyLength::None, &rest) {
            None => Poll::Ready(Ok(())),
            Some(kind) => {
                buf.set_filled(before);
                self.reject(kind, &rest);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    /// A write to the client is blocked: past `send_timeout`, the connection is given up.
    fn write_blocked<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let send_timeout = self.limits.send_timeout;
        let timer = self
            .write_timer
            .get_or_insert_with(|| Deadline::new(Instant::now() + send_timeout));
        ready!(timer.poll_expired(cx));
        self.metrics.protected(Protection::SendTimeout);
        Poll::Ready(Err(io::ErrorKind::TimedOut.into()))
    }

    fn write_done<T>(&mut self, cx: &mut Context<'_>, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match result {
            Poll::Pending => self.write_blocked(cx),
            ready => {
                self.write_timer = None;
                ready
            }
        }
    }
}

impl<S: Transport> AsyncRead for GuardedStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.state, State::Passing) {
            this.follow_phase(cx);
        }
        match this.state {
            State::Unguarded => return Pin::new(this.stream()?).poll_read(cx, buf),
            State::Passing => return Pin::new(this.stream()?).poll_read(cx, buf),
            State::Body { remaining } => return this.poll_body(cx, buf, remaining),
            State::Rejecting { drained } => return this.poll_drain(cx, drained),
            State::Waiting { .. } | State::Head => {}
        }

        let before = buf.filled().len();
        match Pin::new(this.stream()?).poll_read(cx, buf) {
            Poll::Pending => {
                ready!(this.timer.poll_expired(cx));
                match this.state {
                    // Between requests: park the socket, or close it once idle_timeout has
                    // passed, as NGINX does. Either way hyper sees a clean end of input.
                    State::Waiting { first: false } => {
                        if Instant::now() < this.idle_until && !this.park() {
                            // No park slot: wait out the idle timeout.
                            let until = this.idle_until;
                            this.timer.set(until);
                            ready!(this.timer.poll_expired(cx));
                        }
                        Poll::Ready(Ok(()))
                    }
                    _ => {
                        let head = std::mem::take(&mut this.head);
                        this.reject(ErrorKind::HeaderTimeout, &head);
                        Poll::Ready(Err(io::ErrorKind::TimedOut.into()))
                    }
                }
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                let filled = buf.filled().len();
                if filled == before {
                    return Poll::Ready(Ok(()));
                }
                if let State::Waiting { first } = this.state {
                    this.state = State::Head;
                    if !first {
                        this.timer.set(Instant::now() + this.limits.header_read_timeout);
                    }
                }
                match this.scan(&buf.filled()[before..filled]) {
                    None => Poll::Ready(Ok(())),
                    Some(kind) => {
                        // hyper must not act on a refused head.
                        let head = if this.head.is_empty() {
                            buf.filled()[before..filled].to_vec()
                        } else {
                            std::mem::take(&mut this.head)
                        };
                        buf.set_filled(before);
                        this.reject(kind, &head);
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                }
            }
        }
    }
}

impl<S: Transport> AsyncWrite for GuardedStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(this.stream()?).poll_write(cx, buf);
        this.write_done(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(this.stream()?).poll_write_vectored(cx, bufs);
        this.write_done(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(S::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = match this.inner.as_mut() {
            Some(stream) => Pin::new(stream).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        };
        this.write_done(cx, result)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().inner.as_mut() {
            Some(stream) => Pin::new(stream).poll_shutdown(cx),
            // Parked: the socket lives on elsewhere and must not be shut down.
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_ends() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\n"), None);
    }
}
