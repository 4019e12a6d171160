//! The bodies on either side of an upstream exchange: the client's request body under its
//! limits (`ClientBody`), what is sent (`RequestBody`), and the upstream's response body
//! (`UpstreamBody`: hyper's, or the purpose-built client's).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use super::h1;
use crate::base::ErrorKind;
use crate::base::http1::RawHeaders;

/// The body of a request sent upstream: the client's, streamed, or none (a retry of a
/// request that had no body is rebuilt from its head).
pub enum RequestBody {
    Client(ClientBody),
    Empty,
}

impl RequestBody {
    /// The whole body, when the purpose-built server read it with the head and none of
    /// it has been taken: the purpose-built client writes it behind the head.
    pub fn whole(&self) -> Option<&Bytes> {
        match self {
            RequestBody::Client(body) => body.whole(),
            RequestBody::Empty => None,
        }
    }
}

/// Where a client's request body comes from.
pub enum Inbound {
    /// Read whole, with its head, by the purpose-built HTTP/1.1 server (`listener::fast`):
    /// a body of declared length that arrived with the head.
    Read(Bytes),
    /// Streamed by hyper's server.
    Hyper(Incoming),
}

impl Inbound {
    /// What is known of its length: exact for a body read whole or declared by
    /// `Content-Length`, a lower bound for one that streams.
    pub fn size_hint(&self) -> SizeHint {
        match self {
            Inbound::Read(bytes) => SizeHint::with_exact(bytes.len() as u64),
            Inbound::Hyper(inner) => inner.size_hint(),
        }
    }
}

/// The client's request body under the route's size limit and the body read timeout; a
/// breach ends it with a [`ClientBodyError`], which the send's error carries back so the
/// client is answered `413`/`408`/`400`, not a `502` (docs/security.md).
pub struct ClientBody {
    /// `None`: a request the purpose-built HTTP/1.1 server read without a body.
    inner: Option<Inbound>,
    /// The first frame, read before the upstream is chosen (see [`ClientBody::prefetch`]).
    /// Boxed, with `timer`: most bodies are empty, and the request moves a few times.
    peeked: Option<Box<Frame<Bytes>>>,
    /// Bytes still allowed.
    allowed: u64,
    timeout: Duration,
    timer: Option<Box<crate::base::Deadline>>,
    /// Bytes read so far, for the access log, on bodies of no declared length.
    counted: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl ClientBody {
    pub fn new(inner: Option<Inbound>, max_bytes: u64, timeout: Duration) -> ClientBody {
        ClientBody {
            inner,
            peeked: None,
            allowed: max_bytes,
            timeout,
            timer: None,
            counted: None,
        }
    }

    /// Counts the bytes read into `counter` (a chunked body's size is known only then).
    pub fn with_counter(mut self, counter: std::sync::Arc<std::sync::atomic::AtomicU64>) -> ClientBody {
        self.counted = Some(counter);
        self
    }
}

impl ClientBody {
    /// Reads the body's first frame before anything is sent upstream, so a body that is
    /// malformed from its first bytes (a bad chunk size), too large or never sent is
    /// answered without an upstream ever seeing its head. Later frames stream as they come.
    pub async fn prefetch(&mut self) -> Result<(), ClientBodyError> {
        match &self.inner {
            // Already whole: only its size is checked, and it stays for `whole`.
            Some(Inbound::Read(bytes)) if self.peeked.is_none() => {
                return if bytes.len() as u64 > self.allowed {
                    Err(ClientBodyError::TooLarge)
                } else {
                    Ok(())
                };
            }
            Some(Inbound::Hyper(inner)) if self.peeked.is_none() && !inner.is_end_stream() => {}
            _ => return Ok(()),
        }
        match std::future::poll_fn(|cx| self.poll_inner(cx)).await {
            Some(Ok(frame)) => self.peeked = Some(Box::new(frame)),
            Some(Err(error)) => return Err(error),
            None => {}
        }
        Ok(())
    }

    /// The whole body as read with the head, while none of it has been taken.
    pub fn whole(&self) -> Option<&Bytes> {
        match (&self.inner, &self.peeked) {
            (Some(Inbound::Read(bytes)), None) => Some(bytes),
            _ => None,
        }
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let inner = match self.inner.as_mut() {
            None => return Poll::Ready(None),
            Some(Inbound::Hyper(inner)) => inner,
            Some(Inbound::Read(bytes)) => {
                let bytes = std::mem::take(bytes);
                self.inner = None;
                if bytes.is_empty() {
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(self.admit(Frame::data(bytes))));
            }
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => {
                let at = Instant::now() + self.timeout;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::new(crate::base::Deadline::new(at)));
                match timer.poll_expired(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(ClientBodyError::Timeout))),
                    Poll::Pending => Poll::Pending,
                }
            }
            Poll::Ready(Some(Ok(frame))) => {
                self.timer = None;
                Poll::Ready(Some(self.admit(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(ClientBodyError::Broken(error)))),
            Poll::Ready(None) => Poll::Ready(None),
        }
    }

    /// A frame read, within the bytes still allowed, and counted.
    fn admit(&mut self, frame: Frame<Bytes>) -> Result<Frame<Bytes>, ClientBodyError> {
        let size = frame.data_ref().map_or(0, |d| d.len() as u64);
        let left = self.allowed.checked_sub(size).ok_or(ClientBodyError::TooLarge)?;
        self.allowed = left;
        if let Some(counted) = &self.counted {
            counted.fetch_add(size, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(frame)
    }
}

/// Why a client's request body was cut short: the client's fault, not the upstream's.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("request body larger than allowed")]
    TooLarge,
    #[error("request body stalled")]
    Timeout,
    #[error("request body malformed or cut short: {0}")]
    Broken(hyper::Error),
}

impl ClientBodyError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientBodyError::TooLarge => ErrorKind::PayloadTooLarge,
            ClientBodyError::Timeout => ErrorKind::BodyTimeout,
            ClientBodyError::Broken(_) => ErrorKind::BadRequest,
        }
    }

    /// The client-body fault somewhere in an error's chain of sources.
    pub fn find<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a ClientBodyError> {
        let mut current = Some(error);
        while let Some(error) = current {
            if let Some(found) = error.downcast_ref::<ClientBodyError>() {
                return Some(found);
            }
            current = error.source();
        }
        None
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        if let Some(frame) = this.peeked.take() {
            return Poll::Ready(Some(Ok(*frame)));
        }
        this.poll_inner(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.peeked.is_none()
            && match &self.inner {
                None => true,
                Some(Inbound::Read(bytes)) => bytes.is_empty(),
                Some(Inbound::Hyper(inner)) => inner.is_end_stream(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        let hint = self.inner.as_ref().map_or(SizeHint::with_exact(0), Inbound::size_hint);
        let Some(peeked) = self.peeked.as_deref().and_then(Frame::data_ref).map(|d| d.len() as u64) else {
            return hint;
        };
        // The length hyper sends as Content-Length includes the frame already read.
        let mut total = SizeHint::new();
        total.set_lower(hint.lower() + peeked);
        if let Some(upper) = hint.upper() {
            total.set_upper(upper + peeked);
        }
        total
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            RequestBody::Client(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Client(body) => body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Client(body) => body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A response body from an upstream: hyper's (HTTP/2, requests with a body, protocol
/// switches) or the purpose-built HTTP/1.1 client's.
pub enum UpstreamBody {
    Hyper(Incoming),
    H1(h1::H1Body),
}

impl UpstreamBody {
    /// The response's header fields as read, when they came through the purpose-built
    /// client; the response's own map then holds none of them.
    pub fn head(&self) -> Option<&RawHeaders> {
        match self {
            UpstreamBody::Hyper(_) => None,
            UpstreamBody::H1(body) => body.head(),
        }
    }

    pub fn take_head(&mut self) -> Option<RawHeaders> {
        match self {
            UpstreamBody::Hyper(_) => None,
            UpstreamBody::H1(body) => body.take_head(),
        }
    }
}

pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::from),
            UpstreamBody::H1(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(body) => body.is_end_stream(),
            UpstreamBody::H1(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Hyper(body) => body.size_hint(),
            UpstreamBody::H1(body) => body.size_hint(),
        }
    }
}
