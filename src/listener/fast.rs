//! The purpose-built HTTP/1.1 server path for the common request: a complete HTTP/1.1
//! head with no body, no protocol switch and no `Expect`, which is most API traffic. The
//! connection's task reads the head into one buffer kept for the connection, parses it
//! once (`httparse`) into a request whose header values share the buffer's bytes, runs
//! the pipeline, and writes the response head and body itself — one read and one write
//! per exchange when the body is at hand (docs/benchmarks.md, "A purpose-built HTTP/1.1
//! path").
//!
//! Everything else goes to the general path (the listener guard and hyper) with the bytes
//! already read, until the connection is parked there, when it comes back: a head the guard would
//! refuse — malformed, too large, or not complete by `header_read_timeout` — which it
//! answers with its own error and access-log record, bodies, upgrades, `Expect`,
//! `CONNECT`, HTTP/1.0, HTTP/2 (a preface, over TLS by ALPN or in cleartext), and requests
//! pipelined behind one another.
//!
//! Between requests the connection waits here: closed after `idle_timeout`, and after
//! `park_idle_after` it lets go of its read buffer and counts as parked.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, EXPECT, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::framing::{self, BodyLength};
use super::guard::trim_leading_crlf;
use super::{ConnSettings, Transport};
use crate::base::{Deadline, stopped};
use crate::metrics::{Metrics, Protection};
use crate::proxy::{ConnInfo, ProxyBody, Worker};

/// What a read asks the socket for at least.
const READ_SIZE: usize = 8 * 1024;
/// Body data up to this size is copied behind the head so both leave in one write.
const COALESCE_BYTES: usize = 16 * 1024;

/// Serves an HTTP/1 connection (plain, or TLS without `h2` in use): on this path while
/// its requests allow, on the general one from the first that does not.
pub(super) async fn serve<S: Transport>(
    worker: Worker,
    settings: Arc<ConnSettings>,
    mut stream: S,
    mut conn: ConnInfo,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut head_deadline = Instant::now() + settings.limits.header_read_timeout;
    // Set when the general path handed the connection back parked: when it closes.
    let mut parked: Option<Instant> = None;
    loop {
        let outcome = {
            let stop = stopped(&mut shutdown);
            tokio::pin!(stop);
            let mut exchange = Exchange {
                worker: &worker,
                settings: &settings,
                conn: &conn,
                buf: BytesMut::new(),
                out: Vec::new(),
                timer: Deadline::new(head_deadline),
            };
            exchange.run(&mut stream, head_deadline, parked, stop.as_mut()).await
        };
        let Some((buffered, deadline)) = outcome else {
            return;
        };
        let rewind = Rewind {
            prefix: buffered,
            inner: stream,
        };
        // Boxed: its state would otherwise take room in every connection's task.
        let general = super::serve_http(
            worker.clone(),
            settings.clone(),
            rewind,
            conn,
            shutdown.clone(),
            deadline,
        );
        let Some((rewind, idle_until, back)) = Box::pin(general).await else {
            return;
        };
        // Parked after its last request: hyper has read everything this path gave it.
        if !rewind.prefix.is_empty() {
            return;
        }
        stream = rewind.inner;
        conn = back;
        parked = Some(idle_until);
        head_deadline = idle_until;
    }
}

/// One connection's state on this path.
struct Exchange<'a> {
    worker: &'a Worker,
    settings: &'a ConnSettings,
    conn: &'a ConnInfo,
    /// Bytes read and not yet used; request heads are split off it and shared.
    buf: BytesMut,
    /// The response head being written (and small bodies behind it).
    out: Vec<u8>,
    /// Idle and park time between requests, moved rather than re-armed.
    timer: Deadline,
}

/// Why a response was written the way it was, and whether the connection goes on.
enum Next {
    KeepAlive,
    Close,
}

impl Exchange<'_> {
    /// Serves requests until the connection ends (`None`) or one must go to the general
    /// path: then the bytes read and the deadline of the head they begin.
    /// `parked`: the connection comes back parked from the general path, to be closed at
    /// that time if no request comes.
    async fn run<S: Transport>(
        &mut self,
        stream: &mut S,
        first_deadline: Instant,
        parked: Option<Instant>,
        mut stop: Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Option<(Bytes, Instant)> {
        let limits = self.settings.limits;
        let metrics = &self.worker.gateway.metrics;
        if let Some(idle_until) = parked
            && !self.wait_parked(stream, stop.as_mut(), metrics, idle_until).await
        {
            return None;
        }
        // The first head must begin (and end) by `first_deadline`; a later one within
        // `header_read_timeout` of its first bytes, a time read only when it is needed
        // (a head that arrives whole, the common case, needs none).
        let mut head_deadline = if parked.is_some() { None } else { Some(first_deadline) };
        let deadline =
            |at: &mut Option<Instant>| *at.get_or_insert_with(|| Instant::now() + limits.header_read_timeout);
        let mut first = parked.is_none();
        loop {
            let skip = self.buf.len() - trim_leading_crlf(&self.buf).len();
            self.buf.advance(skip);
            if self.buf.is_empty() {
                if first {
                    self.timer.set(first_deadline);
                    match self.read(stream, stop.as_mut()).await {
                        Wait::Read => {}
                        // The guard answers the late head with its 408.
                        Wait::Timeout => return Some((Bytes::new(), first_deadline)),
                        Wait::Closed => return None,
                    }
                } else {
                    if !self.wait_idle(stream, stop.as_mut(), metrics).await {
                        return None;
                    }
                    head_deadline = None;
                }
                continue;
            }
            first = false;
            let Some(end) = memchr::memmem::find(&self.buf, b"\r\n\r\n").map(|at| at + 4) else {
                // Part of a head: read on while it is well-formed so far and within its
                // limits; otherwise the guard refuses it as it would have (431, 400, or
                // 408 once `head_deadline` has passed).
                if self.buf.len() > limits.max_header_bytes
                    || framing::has_bare_lf(&self.buf, 0)
                    || framing::check_partial(&self.buf).is_err()
                {
                    return Some((self.buf.split().freeze(), deadline(&mut head_deadline)));
                }
                self.timer.set(deadline(&mut head_deadline));
                match self.read(stream, stop.as_mut()).await {
                    Wait::Read => continue,
                    Wait::Timeout => return Some((self.buf.split().freeze(), deadline(&mut head_deadline))),
                    Wait::Closed => return None,
                }
            };
            // Requests pipelined behind this one are the guard's: it checks every head in
            // a read before any is served, so a smuggling attempt behind an innocent
            // request is refused as a whole.
            if end < self.buf.len() {
                return Some((self.buf.split().freeze(), deadline(&mut head_deadline)));
            }
            let Some(request) = self.parse(end) else {
                return Some((self.buf.split().freeze(), deadline(&mut head_deadline)));
            };
            let (request, close) = request;
            let head_only = request.method() == Method::HEAD;
            let answer = self.conn.streams.start();
            // Boxed: inline, the pipeline's state would make every connection's task as
            // large as a request in flight, idle ones too.
            let response = Box::pin(self.worker.handle(request, self.conn)).await;
            answer.answered();
            let max_requests = self.settings.max_requests;
            let mut close = close;
            if max_requests > 0 && self.conn.streams.started() >= max_requests {
                // NGINX's keepalive_requests: the last request of the connection says so.
                close = true;
                metrics.protected(Protection::RequestsPerConnection);
            }
            match self.respond(stream, response, head_only, close).await {
                Ok(Next::KeepAlive) => {}
                Ok(Next::Close) => {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), tokio::io::AsyncWriteExt::shutdown(stream)).await;
                    return None;
                }
                Err(error) => {
                    tracing::debug!(peer = %self.conn.peer, %error, "connection ended with error");
                    return None;
                }
            }
        }
    }

    /// Reads more into the buffer, until the timer or shutdown.
    async fn read<S: Transport>(
        &mut self,
        stream: &mut S,
        stop: Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Wait {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 2 {
            self.buf.reserve(READ_SIZE);
        }
        let timer = &mut self.timer;
        tokio::select! {
            biased;
            read = stream.read_buf(&mut self.buf) => match read {
                Ok(0) | Err(_) => Wait::Closed,
                Ok(_) => Wait::Read,
            },
            () = std::future::poll_fn(|cx| timer.poll_expired(cx)) => Wait::Timeout,
            () = stop => Wait::Closed,
        }
    }

    /// Between requests: waits for the next head's first bytes (`true` when they came),
    /// parks after `park_idle_after`, closes after `idle_timeout` or at shutdown.
    async fn wait_idle<S: Transport>(
        &mut self,
        stream: &mut S,
        mut stop: Pin<&mut impl std::future::Future<Output = ()>>,
        metrics: &Arc<Metrics>,
    ) -> bool {
        let limits = self.settings.limits;
        let now = Instant::now();
        let idle_until = now + limits.idle_timeout;
        let parking = !limits.park_after.is_zero();
        self.timer
            .set(if parking { now + limits.park_after } else { idle_until });
        match self.read(stream, stop.as_mut()).await {
            Wait::Read => return true,
            Wait::Closed => return false,
            Wait::Timeout if !parking => return false,
            Wait::Timeout => {}
        }
        if Instant::now() >= idle_until {
            return false;
        }
        // Parked: the buffer goes; the socket is all that is kept.
        self.buf = BytesMut::new();
        self.out = Vec::new();
        self.wait_parked(stream, stop, metrics, idle_until).await
    }

    /// Parked: waits on the socket alone until bytes come (`true`, read into the
    /// buffer), `idle_until` or shutdown.
    async fn wait_parked<S: Transport>(
        &mut self,
        stream: &mut S,
        mut stop: Pin<&mut impl std::future::Future<Output = ()>>,
        metrics: &Arc<Metrics>,
        idle_until: Instant,
    ) -> bool {
        let _parked = metrics.connection_parked();
        self.timer.set(idle_until);
        let timer = &mut self.timer;
        tokio::select! {
            biased;
            ready = stream.socket().readable() => if ready.is_err() { return false },
            () = std::future::poll_fn(|cx| timer.poll_expired(cx)) => return false,
            () = stop.as_mut() => return false,
        }
        matches!(self.read(stream, stop).await, Wait::Read)
    }

    /// The head at the front of the buffer (`end` bytes) as a request, when this path can
    /// serve it; with whether the client asked to close after it. `None` leaves the
    /// buffer as it was.
    fn parse(&mut self, end: usize) -> Option<(Request<Option<hyper::body::Incoming>>, bool)> {
        let head = &self.buf[..end];
        if end > self.settings.limits.max_header_bytes
            || head.starts_with(b"PRI * HTTP/2.0")
            || framing::has_bare_lf(head, 0)
        {
            return None;
        }
        // Parsed once: the guard's RFC 9112 checks run on the same parse.
        let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; framing::MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut []);
        framing::parse_complete(&mut parsed, head, &mut slots).ok()?;
        if parsed.version != Some(1) || !matches!(framing::check_parsed(&parsed), Ok(BodyLength::None)) {
            return None;
        }
        let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
        if method == Method::CONNECT {
            return None;
        }
        let base = head.as_ptr() as usize;
        let offset = |bytes: &[u8]| bytes.as_ptr() as usize - base;
        let target = parsed.path?;
        let target = (offset(target.as_bytes()), target.len());
        let mut spans = [(0u32, 0u32, 0u32, 0u32); framing::MAX_HEADERS];
        let count = parsed.headers.len();
        let mut close = false;
        for (span, header) in spans.iter_mut().zip(parsed.headers.iter()) {
            let name = header.name.as_bytes();
            if name.eq_ignore_ascii_case(UPGRADE.as_str().as_bytes())
                || name.eq_ignore_ascii_case(EXPECT.as_str().as_bytes())
            {
                return None;
            }
            if name.eq_ignore_ascii_case(CONNECTION.as_str().as_bytes())
                && header
                    .value
                    .split(|&b| b == b',')
                    .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
            {
                close = true;
            }
            let (n, v) = (offset(name), offset(header.value));
            *span = (
                n as u32,
                (n + name.len()) as u32,
                v as u32,
                (v + header.value.len()) as u32,
            );
        }
        // Checked: from here the head is consumed.
        let head = self.buf.split_to(end).freeze();
        let uri = Uri::from_maybe_shared(head.slice(target.0..target.0 + target.1));
        // Room for what the pipeline adds (forwarding headers, request id, caller), so
        // the map is not grown on the way upstream.
        let mut headers = HeaderMap::with_capacity(count + 12);
        let mut valid = uri.is_ok();
        for &(ns, ne, vs, ve) in &spans[..count] {
            let name = HeaderName::from_bytes(&head[ns as usize..ne as usize]);
            let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize));
            match (name, value) {
                (Ok(name), Ok(value)) => {
                    headers.append(name, value);
                }
                _ => valid = false,
            }
        }
        if !valid {
            // httparse and `http` disagree on this head: put it back for hyper.
            let mut restored = BytesMut::with_capacity(head.len() + self.buf.len());
            restored.extend_from_slice(&head);
            restored.extend_from_slice(&self.buf);
            self.buf = restored;
            return None;
        }
        let mut request = Request::new(None);
        *request.method_mut() = method;
        *request.uri_mut() = uri.ok()?;
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = headers;
        Some((request, close))
    }

    /// Writes the response: the head, then the body, framed by its known length or
    /// chunked; a body that fails after the head was sent ends the connection.
    async fn respond<S: Transport>(
        &mut self,
        stream: &mut S,
        mut response: http::Response<ProxyBody>,
        head_only: bool,
        close: bool,
    ) -> io::Result<Next> {
        let status = response.status();
        let close = close
            || response
                .headers()
                .get_all(CONNECTION)
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let bodiless = head_only
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let body = response.body_mut();
        let length = body.size_hint().exact();
        let chunked = !bodiless && length.is_none();
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut has_date = false;
        let mut has_length = false;
        for (name, value) in response.headers() {
            if name == TRANSFER_ENCODING || name == CONNECTION {
                continue;
            }
            if name == CONTENT_LENGTH {
                // A HEAD or 304 answer keeps the length of what a GET would get.
                if !bodiless {
                    continue;
                }
                has_length = true;
            }
            has_date |= name == DATE;
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !has_date {
            out.extend_from_slice(b"date: ");
            http_date(out);
            out.extend_from_slice(b"\r\n");
        }
        match (bodiless, length) {
            (false, Some(n)) => write_length(out, n),
            (true, Some(n)) if head_only && !has_length && n > 0 => write_length(out, n),
            (false, None) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            _ => {}
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        let send_timeout = self.settings.limits.send_timeout;
        let metrics = &self.worker.gateway.metrics;
        if bodiless {
            write_all(stream, out, send_timeout, metrics).await?;
            return Ok(if close { Next::Close } else { Next::KeepAlive });
        }
        let mut body = Pin::new(response.body_mut());
        let mut head_sent = false;
        loop {
            let frame = if head_sent {
                std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            } else {
                // The body's first data, when it is at hand, leaves with the head.
                match std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        write_all(stream, out, send_timeout, metrics).await?;
                        out.clear();
                        head_sent = true;
                        continue;
                    }
                }
            };
            let data = match frame {
                None => break,
                Some(Err(error)) => return Err(io::Error::other(error)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    _ => continue,
                },
            };
            if chunked {
                write_chunk_size(out, data.len());
            }
            if data.len() <= COALESCE_BYTES {
                out.extend_from_slice(&data);
            } else {
                write_all(stream, out, send_timeout, metrics).await?;
                out.clear();
                write_all(stream, &data, send_timeout, metrics).await?;
            }
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
            if !body.is_end_stream() {
                // More is coming, maybe not soon: what is here leaves now.
                write_all(stream, out, send_timeout, metrics).await?;
                out.clear();
                head_sent = true;
            }
        }
        if chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        if !out.is_empty() {
            write_all(stream, out, send_timeout, metrics).await?;
            out.clear();
        }
        // The body's drop finishes its access-log record and frees the upstream's slot.
        drop(response);
        Ok(if close { Next::Close } else { Next::KeepAlive })
    }
}

enum Wait {
    Read,
    Timeout,
    Closed,
}

fn write_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    crate::proxy::headers::push_decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

fn write_chunk_size(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `Date` value of the current second, formatted once per second per worker.
    static DATE_CACHE: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((0, [0; 29])) };
}

/// Appends the current time as an HTTP date (RFC 9110 §5.6.7).
fn http_date(out: &mut Vec<u8>) {
    let now = std::time::SystemTime::now();
    let secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE_CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                cache.1.copy_from_slice(text.as_bytes());
                cache.0 = secs;
            }
        }
        out.extend_from_slice(&cache.1);
    });
}

/// Writes all of `bytes`, giving up when a write stays blocked for `send_timeout` (the
/// client stopped reading); flushes what a TLS stream buffered.
async fn write_all<S: Transport>(
    stream: &mut S,
    bytes: &[u8],
    send_timeout: Duration,
    metrics: &Metrics,
) -> io::Result<()> {
    let mut written = 0;
    let mut timer: Option<Deadline> = None;
    std::future::poll_fn(|cx| {
        loop {
            let step = if written < bytes.len() {
                Pin::new(&mut *stream).poll_write(cx, &bytes[written..])
            } else {
                Pin::new(&mut *stream).poll_flush(cx).map_ok(|()| usize::MAX)
            };
            match step {
                Poll::Ready(Ok(usize::MAX)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    written += n;
                    timer = None;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {
                    let timer = timer.get_or_insert_with(|| Deadline::new(Instant::now() + send_timeout));
                    ready!(timer.poll_expired(cx));
                    metrics.protected(Protection::SendTimeout);
                    return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                }
            }
        }
    })
    .await
}

/// A connection handed to the general path: the bytes this path read come first.
pub(super) struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: Transport> AsyncRead for Rewind<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: Transport> AsyncWrite for Rewind<S> {
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

impl<S: Transport> Transport for Rewind<S> {
    fn socket(&self) -> &tokio::net::TcpStream {
        self.inner.socket()
    }

    fn write_final(&mut self, bytes: &[u8]) {
        self.inner.write_final(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_chunk_sizes_are_written_without_formatting() {
        let mut out = Vec::new();
        write_length(&mut out, 0);
        write_length(&mut out, 1234567);
        write_chunk_size(&mut out, 0x1f);
        write_chunk_size(&mut out, 0);
        assert_eq!(out, b"content-length: 0\r\ncontent-length: 1234567\r\n1f\r\n0\r\n");
    }

    #[test]
    fn dates_are_rfc_9110_imf_fixdate() {
        let mut out = Vec::new();
        http_date(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.len(), 29);
        assert!(text.ends_with(" GMT"), "{text}");
        assert!(httpdate::parse_http_date(&text).is_ok(), "{text}");
    }
}
