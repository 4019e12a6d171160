//! Reads each HTTP/1 request head under the gateway's own rules before hyper sees it:
//! a head that is slow (`header_read_timeout` → 408), oversized (`max_header_bytes` → 431)
//! or carries both `Content-Length` and `Transfer-Encoding` (→ 400, a request-smuggling
//! vector hyper would otherwise accept by dropping `Content-Length`) is answered with the
//! JSON error body and the connection closed. Idle keep-alive connections are closed after
//! `idle_timeout`. Bytes pass through unchanged; the guard only watches them.
//!
//! The guard knows where a head starts because the response of the previous request
//! signals [`ConnPhase::response_finished`] when hyper is done with it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::proxy::{ErrorKind, headers::new_request_id, raw_error_response};

const AWAITING_HEAD: u8 = 0;
const IN_REQUEST: u8 = 1;
const UNGUARDED: u8 = 2;

/// How long a rejected connection is drained so the client reads the error before the close.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// Where an HTTP/1 connection is between requests, shared by the guard and the responses.
#[derive(Debug)]
pub struct ConnPhase(AtomicU8);

impl ConnPhase {
    pub fn new() -> Arc<Self> {
        Arc::new(ConnPhase(AtomicU8::new(AWAITING_HEAD)))
    }

    /// The response was written out: the next bytes start a new request head.
    pub fn response_finished(&self) {
        let _ = self
            .0
            .compare_exchange(IN_REQUEST, AWAITING_HEAD, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The connection switched protocols (WebSocket): stop watching it.
    pub fn upgraded(&self) {
        self.0.store(UNGUARDED, Ordering::Release);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
}

enum State {
    /// Waiting for the first byte of a head; `first` = first request on the connection.
    Waiting { first: bool },
    /// Inside a head; its bytes so far are in `head`.
    Head,
    /// The head went to hyper; the body and response are not the guard's business.
    Passing,
    Unguarded,
    /// An error response was written; discard input until EOF or the linger ends.
    Rejecting { drained: usize },
}

pub struct GuardedStream {
    inner: TcpStream,
    phase: Arc<ConnPhase>,
    limits: HeadLimits,
    state: State,
    head: Vec<u8>,
    timer: Pin<Box<Sleep>>,
}

impl GuardedStream {
    pub fn new(inner: TcpStream, phase: Arc<ConnPhase>, limits: HeadLimits) -> Self {
        GuardedStream {
            inner,
            phase,
            limits,
            state: State::Waiting { first: true },
            head: Vec::new(),
            timer: Box::pin(tokio::time::sleep(limits.header_read_timeout)),
        }
    }

    fn reject(&mut self, kind: ErrorKind) {
        let response = raw_error_response(kind, new_request_id().to_str().unwrap_or(""));
        // Best effort: the socket buffer of a connection that is sending us a head has room
        // for a few hundred bytes; if not, the client only misses the explanation.
        let _ = self.inner.try_write(&response);
        let _ = socket2::SockRef::from(&self.inner).shutdown(std::net::Shutdown::Write);
        self.state = State::Rejecting { drained: 0 };
        self.timer.as_mut().reset(Instant::now() + LINGER);
        tracing::debug!(code = kind.code(), "request head refused");
    }

    /// Scans newly read bytes of a head. `Some(kind)` = refuse the request.
    fn scan(&mut self, new: &[u8]) -> Option<ErrorKind> {
        // Clients may send stray CRLFs between requests; they are not part of a head.
        let new = if self.head.is_empty() {
            let start = new.iter().position(|b| *b != b'\r' && *b != b'\n').unwrap_or(new.len());
            &new[start..]
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
        if self.head.is_empty()
            && let Some(end) = find_head_end(new)
        {
            // The common case: the whole head arrived in one read; no copy needed.
            if end > self.limits.max_header_bytes {
                return Some(ErrorKind::HeadersTooLarge);
            }
            self.state = State::Passing;
            self.phase.0.store(IN_REQUEST, Ordering::Release);
            return check_head(&new[..end]);
        }
        let search_from = self.head.len().saturating_sub(3);
        let room = self.limits.max_header_bytes + 4 - self.head.len().min(self.limits.max_header_bytes + 4);
        self.head.extend_from_slice(&new[..new.len().min(room)]);
        match find_head_end(&self.head[search_from..]) {
            Some(end) => {
                let end = search_from + end;
                if end > self.limits.max_header_bytes {
                    return Some(ErrorKind::HeadersTooLarge);
                }
                let verdict = check_head(&self.head[..end]);
                self.head.clear();
                self.state = State::Passing;
                self.phase.0.store(IN_REQUEST, Ordering::Release);
                verdict
            }
            None if self.head.len() > self.limits.max_header_bytes => Some(ErrorKind::HeadersTooLarge),
            None => None,
        }
    }
}

fn find_head_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Refuses heads with both `Content-Length` and `Transfer-Encoding`. Other malformations
/// are left to hyper, which answers them with its own 400.
fn check_head(head: &[u8]) -> Option<ErrorKind> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {
            let has = |name: &str| request.headers.iter().any(|h| h.name.eq_ignore_ascii_case(name));
            (has("content-length") && has("transfer-encoding")).then_some(ErrorKind::BadRequest)
        }
        Err(httparse::Error::TooManyHeaders) => Some(ErrorKind::HeadersTooLarge),
        _ => None,
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.state, State::Passing) {
            match this.phase.0.load(Ordering::Acquire) {
                AWAITING_HEAD => {
                    this.state = State::Waiting { first: false };
                    this.timer.as_mut().reset(Instant::now() + this.limits.idle_timeout);
                }
                UNGUARDED => this.state = State::Unguarded,
                _ => {}
            }
        }
        match this.state {
            State::Passing | State::Unguarded => return Pin::new(&mut this.inner).poll_read(cx, buf),
            State::Rejecting { drained } => {
                let mut scratch = [0u8; 8192];
                let mut drained = drained;
                loop {
                    if this.timer.as_mut().poll(cx).is_ready() || drained > LINGER_BYTES {
                        return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
                    }
                    let mut sink = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut this.inner).poll_read(cx, &mut sink) {
                        Poll::Ready(Ok(())) if sink.filled().is_empty() => {
                            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
                        }
                        Poll::Ready(Ok(())) => {
                            drained += sink.filled().len();
                            this.state = State::Rejecting { drained };
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
            State::Waiting { .. } | State::Head => {}
        }

        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {
                ready!(this.timer.as_mut().poll(cx));
                match this.state {
                    // An idle keep-alive connection just closes, as in NGINX.
                    State::Waiting { first: false } => Poll::Ready(Ok(())),
                    _ => {
                        this.reject(ErrorKind::HeaderTimeout);
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
                        this.timer.as_mut().reset(Instant::now() + this.limits.header_read_timeout);
                    }
                }
                match this.scan(&buf.filled()[before..filled]) {
                    None => Poll::Ready(Ok(())),
                    Some(kind) => {
                        // hyper must not act on a refused head.
                        buf.set_filled(before);
                        this.reject(kind);
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                }
            }
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_checks() {
        assert_eq!(check_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), None);
        assert_eq!(
            check_head(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(ErrorKind::BadRequest)
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
    }
}
