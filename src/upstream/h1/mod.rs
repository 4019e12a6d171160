//! A purpose-built HTTP/1.1 client for the common upstream exchange: a request without a
//! body (most API calls) on a keep-alive connection of the worker's pool. The request's
//! own task writes the head and reads the response: no connection task, no channel
//! between the two, no per-request allocation for the body's plumbing, and one read
//! buffer per connection reused for every response (docs/benchmarks.md, "A purpose-built
//! HTTP/1.1 client"). Requests with a body and protocol switches go through hyper's
//! client, which sends a body while it already waits for an early answer.
//!
//! Response framing follows RFC 9112 §6.3: no body for `HEAD`, 1xx, 204 and 304;
//! `Transfer-Encoding` ending in `chunked` is decoded (and wins over `Content-Length`, the
//! connection then not reused); a valid `Content-Length` is exact; otherwise the body runs
//! to the connection's close.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

mod body;
mod chunked;

use body::Framing;
pub use body::{BodyError, H1Body};
use chunked::{Chunked, Step};

use crate::base::http1::{
    FramingField, RawFields, RawHeaders, has_token, parse_length, push_decimal, same_name, trim_ows, write_field,
};
use crate::base::{Deadline, ErrorKind, ProxyError};
use crate::upstream::body::RequestBody;

/// The most a response head may take (status line and headers).
const MAX_HEAD_BYTES: usize = 256 * 1024;
/// The most header lines a response may have (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// What a read asks the socket for at least.
const READ_SIZE: usize = 8 * 1024;

/// An upstream connection's transport.
pub enum Io {
    Plain(TcpStream),
    /// Boxed: the rustls state is large and most pools are plain.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(stream) => crate::base::sock::poll_send(stream, cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One keep-alive connection and its buffers, kept between exchanges.
pub struct Conn {
    io: Io,
    /// Bytes read and not yet consumed; response bodies are handed out as slices of it.
    buf: BytesMut,
    /// The request head being written.
    out: Vec<u8>,
    /// The response head's deadline of the exchange in progress.
    timer: Deadline,
    /// When its last request was sent: its idle stamp in the pool, read no later than
    /// its release, so it is never kept past `IDLE_TIMEOUT` of true idleness, and no
    /// clock read is spent on the release.
    pub(crate) sent_at: Instant,
}

impl Conn {
    pub fn new(io: Io) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            timer: Deadline::new(Instant::now()),
            sent_at: Instant::now(),
        }
    }

    /// An idle connection may take a request: the upstream has neither closed it nor sent
    /// anything unasked. Costs no system call unless the socket became readable.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut byte = [0u8; 1];
        match &mut self.io {
            // Asked without a waker: a poll that finds nothing would store one under the
            // socket's lock, two locked instructions a request for a waker nothing needs
            // (docs/benchmarks.md, "A pooled connection checked without a waker").
            Io::Plain(stream) => {
                matches!(stream.try_read(&mut byte), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock)
            }
            Io::Tls(stream) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut probe = ReadBuf::new(&mut byte);
                matches!(Pin::new(stream.as_mut()).poll_read(&mut cx, &mut probe), Poll::Pending)
            }
        }
    }

    /// Reads more of a response's head (and what comes with it) into the buffer; `Ok(0)`
    /// at the end of input. Plain sockets skip libc's cancellation brackets
    /// ([`crate::base::sock::poll_recv_small`]).
    fn poll_fill_head(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        match &self.io {
            Io::Plain(stream) => crate::base::sock::poll_recv_small(stream, cx, &mut self.buf),
            Io::Tls(_) => self.poll_fill(cx),
        }
    }

    /// Reads more of the response into the buffer; `Ok(0)` at the end of input.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.buf.reserve(READ_SIZE);
        let read = self.io.read_buf(&mut self.buf);
        tokio::pin!(read);
        read.as_mut().poll(cx)
    }
}

/// Why an exchange failed, and what that allows.
#[derive(Debug)]
pub struct Failure {
    pub error: ProxyError,
    /// The request head was not completely written: the endpoint cannot have acted on it.
    pub unsent: bool,
    /// The connection ended before a byte of the response: on a reused connection, the
    /// upstream closed it as it was taken (the keep-alive race).
    pub closed_early: bool,
    /// The response head had not come by the caller's deadline.
    pub timed_out: bool,
}

impl Failure {
    fn protocol(why: &'static str) -> Failure {
        Failure {
            error: ProxyError::with_cause(ErrorKind::UpstreamProtocol, Malformed(why)),
            unsent: false,
            closed_early: false,
            timed_out: false,
        }
    }

    fn timed_out(unsent: bool) -> Failure {
        Failure {
            error: ProxyError::new(ErrorKind::UpstreamTimeout),
            unsent,
            closed_early: false,
            timed_out: true,
        }
    }
}

/// A response the upstream sent that breaks HTTP/1.1's rules.
#[derive(Debug, thiserror::Error)]
#[error("upstream response: {0}")]
pub struct Malformed(&'static str);

/// Whether a request can take this path: without a body, or with one read whole with its
/// head (`RequestBody::whole`); not a protocol switch (hyper tunnels those), not `CONNECT`.
pub fn can_send(req: &Request<RequestBody>) -> bool {
    (req.body().is_end_stream() || req.body().whole().is_some())
        && req.method() != Method::CONNECT
        // A walk over the few fields a request has: cheaper than hashing the name.
        && !req.headers().keys().any(|name| name == http::header::UPGRADE)
}

/// Sends a request that `can_send` on `conn` (its whole body behind the head, in the same
/// write) and reads the response head; the body streams from the returned response,
/// which gives the connection back to the worker's pool when it has been read to its end.
///
/// `deadline`: when the response head must have come, if the caller does not bound the
/// exchange itself. It is the connection's own timer, moved from one request to the next
/// rather than registered anew for each (docs/benchmarks.md, "Where the time goes").
pub async fn send(
    mut conn: Box<Conn>,
    key: crate::upstream::client::IdleKey,
    req: &Request<RequestBody>,
    edits: &Edits<'_>,
    sent_at: Instant,
    deadline: Option<Instant>,
) -> Result<Response<H1Body>, Failure> {
    conn.sent_at = sent_at;
    let body = req.body().whole().map_or(&[][..], |body| &body[..]);
    encode_request(&mut conn.out, req, edits, body);
    let mut out = std::mem::take(&mut conn.out);
    if let Some(deadline) = deadline {
        conn.timer.set(deadline);
    }
    let written = {
        let Conn { io, timer, .. } = &mut *conn;
        let expired = std::future::poll_fn(|cx| match deadline {
            Some(_) => timer.poll_expired(cx),
            None => Poll::Pending,
        });
        tokio::select! {
            biased;
            written = io.write_all(&out) => Some(written),
            () = expired => None,
        }
    };
    out.clear();
    conn.out = out;
    match written {
        Some(Ok(())) => {}
        Some(Err(error)) => {
            return Err(Failure {
                error: ProxyError::with_cause(ErrorKind::UpstreamProtocol, error),
                unsent: true,
                closed_early: true,
                timed_out: false,
            });
        }
        None => return Err(Failure::timed_out(true)),
    }
    let head_request = req.method() == Method::HEAD;
    let mut seen = false;
    loop {
        if !conn.buf.is_empty() {
            seen = true;
            if let Some(parsed) = parse_head(&mut conn.buf)? {
                // Interim answers (100 Continue, 103 Early Hints) are not forwarded.
                if parsed.status.is_informational() {
                    if parsed.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(Failure::protocol("a protocol switch that was not asked for"));
                    }
                    continue;
                }
                let (framing, reusable) = framing(&parsed, head_request)?;
                return Ok(respond(parsed, conn, key, framing, reusable));
            }
            if conn.buf.len() > MAX_HEAD_BYTES {
                return Err(Failure::protocol("head too large"));
            }
        }
        let filled = std::future::poll_fn(|cx| {
            if let Poll::Ready(filled) = conn.poll_fill_head(cx) {
                return Poll::Ready(Some(filled));
            }
            match deadline {
                Some(_) => conn.timer.poll_expired(cx).map(|()| None),
                None => Poll::Pending,
            }
        })
        .await;
        match filled {
            Some(Ok(0)) => {
                return Err(Failure {
                    error: ProxyError::with_cause(
                        ErrorKind::UpstreamProtocol,
                        Malformed("connection closed before the response ended its head"),
                    ),
                    unsent: false,
                    closed_early: !seen,
                    timed_out: false,
                });
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                return Err(Failure {
                    error: ProxyError::with_cause(ErrorKind::UpstreamProtocol, error),
                    unsent: false,
                    closed_early: !seen,
                    timed_out: false,
                });
            }
            None => return Err(Failure::timed_out(false)),
        }
    }
}

/// How the head the upstream gets differs from the request's map, applied as the head is
/// written rather than to the map first (docs/architecture.md, "Two HTTP/1.1 paths"): the
/// request is the client's, borrowed, and stays as it came for a retry.
pub struct Edits<'a> {
    /// Whether a field of the client's (named in any case) goes upstream.
    pub keep: &'a (dyn Fn(&[u8]) -> bool + Sync),
    /// Fields written after the kept ones (`None`: nothing to write).
    pub add: &'a [(&'static HeaderName, Option<FieldValue<'a>>)],
    /// More fields set, already as HTTP/1.1 lines (each ending in CRLF), written after
    /// `add` by the encoder. A map writer takes its fields from `add` alone, so this is
    /// empty for `apply`.
    pub lines: &'a [u8],
    /// The client's fields as read, when the request's map is empty: written from there
    /// (docs/benchmarks.md, "Request fields as read").
    pub read: Option<&'a RawHeaders>,
}

/// A value the pipeline sets: a header value it holds, one it borrows (the endpoint's
/// `Host`, the client certificate's subject: cloning it would cost two locked instructions per request,
/// docs/benchmarks.md, "Locked instructions"), text checked to be a valid one and kept
/// inline when short, so a name per request (the caller's consumer and plan) costs no
/// allocation, or bytes borrowed from what was read or rendered once per connection.
#[derive(Debug, Clone)]
pub enum FieldValue<'a> {
    Header(HeaderValue),
    Borrowed(&'a HeaderValue),
    Text(compact_str::CompactString),
    /// Bytes known to be a valid field value: the client's, as read (httparse took
    /// them), or the connection's own, rendered once (`proxy::ConnFields`).
    Read(&'a [u8]),
}

impl FieldValue<'_> {
    /// `text` as a field value, if it is one (no control characters but tabs: what
    /// `HeaderValue::from_str` takes).
    pub fn text(text: &str) -> Option<FieldValue<'static>> {
        crate::base::http1::is_field_value(text.as_bytes()).then(|| FieldValue::Text(text.into()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            FieldValue::Header(value) => value.as_bytes(),
            FieldValue::Borrowed(value) => value.as_bytes(),
            FieldValue::Text(text) => text.as_bytes(),
            FieldValue::Read(value) => value,
        }
    }

    pub fn to_header(&self) -> Option<HeaderValue> {
        match self {
            FieldValue::Header(value) => Some(value.clone()),
            FieldValue::Borrowed(value) => Some((*value).clone()),
            FieldValue::Text(text) => HeaderValue::from_str(text).ok(),
            FieldValue::Read(value) => HeaderValue::from_bytes(value).ok(),
        }
    }
}

impl From<HeaderValue> for FieldValue<'_> {
    fn from(value: HeaderValue) -> Self {
        FieldValue::Header(value)
    }
}

impl Edits<'_> {
    /// The head as the request's map has it.
    pub const NONE: Edits<'static> = Edits {
        keep: &|_| true,
        add: &[],
        lines: b"",
        read: None,
    };

    /// Applies the edits to `headers`, for a client that writes the map (hyper's).
    pub fn apply(&self, headers: &mut HeaderMap) {
        debug_assert!(self.lines.is_empty(), "a map writer gets its fields from `add`");
        if let Some(read) = self.read {
            read.copy_into(headers);
        }
        let dropped: Vec<HeaderName> = headers
            .keys()
            .filter(|name| !(self.keep)(name.as_str().as_bytes()))
            .cloned()
            .collect();
        for name in dropped {
            headers.remove(name);
        }
        for (name, value) in self.add {
            if let Some(value) = value.as_ref().and_then(FieldValue::to_header) {
                headers.append(*name, value);
            }
        }
    }
}

/// The request in HTTP/1.1 wire form: the request's target (set by the pipeline), its
/// fields as `edits` change them, and `body` (the whole of it). The framing is this
/// client's: the body's length, and `content-length: 0` for a bodiless request where a
/// body could be expected.
pub fn encode_request<B>(out: &mut Vec<u8>, req: &Request<B>, edits: &Edits<'_>, body: &[u8]) {
    out.clear();
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |target| target.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut framed = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
    if let Some(read) = edits.read {
        framed |= read.values(FramingField::TransferEncoding).next().is_some();
        read.write_forwarded(out, |name| {
            if same_name(name, b"content-length") {
                framed = true;
                return false;
            }
            (edits.keep)(name)
        });
    }
    for (name, value) in req.headers() {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            framed = true;
            continue;
        }
        if (edits.keep)(name.as_str().as_bytes()) {
            write_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    for (name, value) in edits.add {
        if let Some(value) = value {
            write_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    out.extend_from_slice(edits.lines);
    // The length is the body's as read, whatever the client declared (they were checked
    // to agree when it was read); none at all for a bodiless method that sent none.
    if framed || !body.is_empty() {
        out.extend_from_slice(b"content-length: ");
        push_decimal(out, body.len() as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// A response head parsed from the front of the buffer (which it consumes).
struct Parsed {
    status: StatusCode,
    version: Version,
    headers: RawHeaders,
}

/// Parses a complete head at the front of `buf`, or `None` if more bytes are needed.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Parsed>, Failure> {
    // Left uninitialized: filling 100 slots cost more than parsing a short head.
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Failure::protocol("too many headers")),
        Err(_) => return Err(Failure::protocol("malformed head")),
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| Failure::protocol("bad status code"))?;
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let fields = RawFields::of(buf, response.headers);
    // Kept as read: the client's side copies the fields it forwards from these bytes.
    let headers = RawHeaders::new(buf.split_to(len).freeze(), fields);
    Ok(Some(Parsed {
        status,
        version,
        headers,
    }))
}

/// How the response's body is delimited, and whether the connection outlives it.
fn framing(parsed: &Parsed, head_request: bool) -> Result<(Framing, bool), Failure> {
    let headers = &parsed.headers;
    let mut reusable =
        parsed.version == Version::HTTP_11 && !headers.values(FramingField::Connection).any(|v| has_token(v, b"close"));
    let status = parsed.status;
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Length(0), reusable));
    }
    let mut codings = headers.values(FramingField::TransferEncoding).peekable();
    if codings.peek().is_some() && parsed.version == Version::HTTP_10 {
        // RFC 9112 §6.1: faulty framing in HTTP/1.0; refused, as hyper does.
        return Err(Failure::protocol("Transfer-Encoding in an HTTP/1.0 response"));
    }
    if codings.peek().is_some() {
        let chunked = codings.last().is_some_and(|last| {
            last.rsplit(|&b| b == b',')
                .next()
                .is_some_and(|coding| trim_ows(coding).eq_ignore_ascii_case(b"chunked"))
        });
        if headers.values(FramingField::ContentLength).next().is_some() {
            // RFC 9112 §6.3 (3): Transfer-Encoding wins; the connection is not trusted after.
            reusable = false;
        }
        return Ok(if chunked {
            (Framing::Chunked(Chunked::default()), reusable)
        } else {
            (Framing::Close, false)
        });
    }
    let mut length: Option<u64> = None;
    for value in headers.values(FramingField::ContentLength) {
        // A list of the same length repeated is one length (RFC 9110 §8.6).
        for item in value.split(|&b| b == b',') {
            let n = parse_length(item).ok_or_else(|| Failure::protocol("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Failure::protocol("conflicting Content-Length"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), reusable),
        None => (Framing::Close, false),
    })
}

fn respond(
    parsed: Parsed,
    conn: Box<Conn>,
    key: crate::upstream::client::IdleKey,
    framing: Framing,
    reusable: bool,
) -> Response<H1Body> {
    let mut body = H1Body {
        conn: Some(conn),
        key,
        framing,
        reusable,
        head: Some(parsed.headers),
    };
    body.release_if_done();
    // The map starts empty, with nothing allocated: the fields travel as read, with the
    // body (`H1Body::head`), and the pipeline's own beside them (`proxy::headers::SetFields`).
    let mut response = Response::new(body);
    *response.status_mut() = parsed.status;
    *response.version_mut() = parsed.version;
    response
}

/// What this client reads from a whole response held in memory: status, head length,
/// body, and whether the connection could be reused after it — the codec without the
/// socket, for differential tests against hyper (tests/fuzz.rs). Interim (1xx) heads are
/// skipped as on a connection; `Err` is a response refused as malformed or cut short.
pub fn decode_response(bytes: &[u8], head_request: bool) -> Result<(u16, Vec<u8>, bool), &'static str> {
    let mut buf = BytesMut::from(bytes);
    let parsed = loop {
        let parsed = parse_head(&mut buf)
            .map_err(|_| "malformed head")?
            .ok_or("incomplete head")?;
        if parsed.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err("protocol switch");
        }
        if !parsed.status.is_informational() {
            break parsed;
        }
    };
    let (framing, reusable) = framing(&parsed, head_request).map_err(|_| "bad framing")?;
    let body = match framing {
        Framing::Length(n) => {
            let n = usize::try_from(n).map_err(|_| "too long")?;
            if buf.len() < n {
                return Err("body cut short");
            }
            buf.split_to(n).to_vec()
        }
        Framing::Chunked(mut chunked) => {
            let mut body = Vec::new();
            loop {
                match chunked.step(&mut buf)? {
                    Step::Data(data) => body.extend_from_slice(&data),
                    Step::More => return Err("chunked body cut short"),
                    Step::End => break,
                }
            }
            body
        }
        Framing::Close | Framing::Done => buf.split().to_vec(),
    };
    Ok((parsed.status.as_u16(), body, reusable && buf.is_empty()))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn head(text: &str) -> Parsed {
        parse_head(&mut BytesMut::from(text.as_bytes())).unwrap().unwrap()
    }

    #[test]
    fn field_values_from_text_are_what_header_values_take() {
        for text in ["acme", "pro plan", "tab\there", "~!#$%&'*+-.^_`|", "", "caf\u{e9}"] {
            let value = FieldValue::text(text).expect(text);
            assert_eq!(value.as_bytes(), text.as_bytes());
            assert_eq!(value.to_header().unwrap(), HeaderValue::from_str(text).unwrap());
        }
        for text in ["new\nline", "cr\r", "nul\0", "del\x7f"] {
            assert!(FieldValue::text(text).is_none(), "{text:?}");
            assert!(HeaderValue::from_str(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let cases = [
            ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false, "len5", true),
            ("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", false, "len5", true),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                "chunked",
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
                false,
                "chunked",
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                false,
                "close",
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", false, "close", false),
            ("HTTP/1.1 204 No Content\r\n\r\n", false, "len0", true),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
                false,
                "len0",
                true,
            ),
            ("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true, "len0", true),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
                false,
                "len1",
                false,
            ),
            ("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false, "len1", false),
        ];
        for (text, head_request, want, want_reuse) in cases {
            let (framing, reusable) = framing(&head(text), head_request).unwrap();
            let got = match framing {
                Framing::Length(n) => format!("len{n}"),
                Framing::Chunked(_) => "chunked".into(),
                Framing::Close => "close".into(),
                Framing::Done => "done".into(),
            };
            assert_eq!((got.as_str(), reusable), (want, want_reuse), "{text:?}");
        }
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
        ] {
            assert!(framing(&head(bad), false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn heads_parse_into_fields_as_read() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 404 Not Found\r\nX-A: 1\r\nx-a: 2\r\nServer: up\r\n\r\nbody"[..]);
        let parsed = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!(parsed.status, 404);
        assert_eq!(parsed.headers.get_all(b"x-a").count(), 2);
        assert_eq!(parsed.headers.get_all(b"server").collect::<Vec<_>>(), [b"up"]);
        assert_eq!(&buf[..], b"body");
        assert!(
            parse_head(&mut BytesMut::from(&b"HTTP/1.1 200 OK\r\nX: 1\r\n"[..]))
                .unwrap()
                .is_none()
        );
        assert!(parse_head(&mut BytesMut::from(&b"HTTP/1.1 2000 OK\r\n\r\n"[..])).is_err());
        assert!(parse_head(&mut BytesMut::from(&b"HTTP/1.1 200 OK\r\nBad Name: 1\r\n\r\n"[..])).is_err());
    }

    #[test]
    fn request_heads_carry_the_pipelines_headers_and_our_framing() {
        let mut req = Request::get("/v1/x?a=1").body(()).unwrap();
        req.headers_mut().insert("host", HeaderValue::from_static("up"));
        req.headers_mut()
            .insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let mut out = Vec::new();
        encode_request(&mut out, &req, &Edits::NONE, &[]);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "GET /v1/x?a=1 HTTP/1.1\r\nhost: up\r\ncontent-length: 0\r\n\r\n"
        );
        let req = Request::delete("/k").body(()).unwrap();
        encode_request(&mut out, &req, &Edits::NONE, &[]);
        assert_eq!(String::from_utf8(out.clone()).unwrap(), "DELETE /k HTTP/1.1\r\n\r\n");
        let req = Request::post("/k").body(()).unwrap();
        encode_request(&mut out, &req, &Edits::NONE, &[]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /k HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
        );
    }

    /// A pooled connection is usable while its upstream has sent nothing and not closed
    /// it; anything unasked, or the close, rules it out, seen without a waker stored.
    #[tokio::test]
    async fn an_idle_connection_is_usable_until_its_upstream_speaks_or_closes() {
        use tokio::io::AsyncWriteExt;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Until the socket reports what happened: readiness comes from the reactor, a turn
        // or more after the peer's write; bounded by 5 s so a lost event fails the test.
        async fn until_unusable(conn: &mut Conn) -> bool {
            for _ in 0..500 {
                if !conn.is_usable() {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            false
        }

        let mut conn = Conn::new(Io::Plain(TcpStream::connect(addr).await.unwrap()));
        let (mut upstream, _) = listener.accept().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(conn.is_usable(), "a quiet connection");
        assert!(conn.is_usable(), "asking again changes nothing");
        upstream.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        assert!(until_unusable(&mut conn).await, "bytes nobody asked for");

        let mut conn = Conn::new(Io::Plain(TcpStream::connect(addr).await.unwrap()));
        let (upstream, _) = listener.accept().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(conn.is_usable());
        drop(upstream);
        assert!(until_unusable(&mut conn).await, "closed by the upstream");
    }
}
