//! The purpose-built HTTP/1.1 server path for the common request: a complete HTTP/1.1
//! head with no body or a body of declared length that came whole with it, no protocol
//! switch and no `Expect`, which is most API traffic. The
//! connection's task reads the head into one buffer kept for the connection, parses it
//! once (`httparse`) into a request whose header values share the buffer's bytes, runs
//! the pipeline, and writes the response head and body itself — one read and one write
//! per exchange when the body is at hand (docs/benchmarks.md, "A purpose-built HTTP/1.1
//! path").
//!
//! Everything else goes to the general path (the listener guard and hyper) with the bytes
//! already read, until the connection is parked there, when it comes back: a head the guard would
//! refuse — malformed, too large, or not complete by `header_read_timeout` — which it
//! answers with its own error and access-log record, chunked bodies and bodies still
//! arriving, upgrades, `Expect`,
//! `CONNECT`, HTTP/1.0, HTTP/2 (a preface, over TLS by ALPN or in cleartext), and requests
//! pipelined behind one another.
//!
//! Between requests the connection waits here: closed after `idle_timeout`, and after
//! `park_idle_after` it lets go of its read buffer and counts as parked.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{EXPECT, UPGRADE};
use http::{Method, Request, Uri, Version};
use tokio::sync::watch;
use tokio::time::Instant;

mod respond;
mod rewind;

use respond::Next;
use rewind::Rewind;

use super::framing::{self, BodyLength, HeadScan};
use super::guard::trim_leading_crlf;
use super::{ConnSettings, Transport};
use crate::base::http1::{FramingField, MAX_HEADERS, RawFields, RawHeaders, has_token, same_name};
use crate::base::{Deadline, stopped, stopped_armed};
use crate::metrics::{Metrics, Protection};
use crate::proxy::{ConnInfo, Inbound, Worker};

/// What a read asks the socket for at least.
const READ_SIZE: usize = 8 * 1024;

/// Serves an HTTP/1 connection (plain, or TLS without `h2` in use): on this path while
/// its requests allow, on the general one from the first that does not.
///
/// Not an `async fn`: that would keep a second copy of its arguments (the connection's
/// info alone is 264 bytes) in every state of every connection's task; the block below
/// keeps the ones it captured (docs/benchmarks.md, "Idle connections").
#[allow(clippy::manual_async_fn, reason = "an async fn keeps a second copy of its arguments")]
pub(super) fn serve<S: Transport>(
    worker: Worker,
    settings: Arc<ConnSettings>,
    mut stream: S,
    mut conn: ConnInfo,
    mut shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> {
    async move {
        let mut head_deadline = Instant::now() + settings.limits.header_read_timeout;
        // Set when the connection was parked (here or by the general path): when it closes.
        let mut parked: Option<Instant> = None;
        loop {
            if let Some(idle_until) = parked
                && !wait_parked(&mut stream, &mut shutdown, &worker.gateway.metrics, idle_until).await
            {
                return;
            }
            let outcome = {
                let stop = stopped_armed(&mut shutdown);
                tokio::pin!(stop);
                let mut exchange = Exchange {
                    worker: &worker,
                    settings: &settings,
                    conn: &conn,
                    buf: BytesMut::new(),
                    out: Vec::new(),
                    timer: Deadline::new(head_deadline),
                    responded_at: None,
                };
                // Boxed, and dropped when the connection parks: a parked connection's task
                // then holds only what `wait_parked` needs, not the few KiB an exchange in
                // flight does (docs/benchmarks.md, "Idle connections").
                Box::pin(exchange.run(&mut stream, head_deadline, parked.is_some(), stop.as_mut())).await
            };
            let (buffered, deadline) = match outcome {
                Outcome::Closed => return,
                Outcome::Parked(idle_until) => {
                    parked = Some(idle_until);
                    head_deadline = idle_until;
                    continue;
                }
                Outcome::General(buffered, deadline) => (buffered, deadline),
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
}

/// Parked: waits on the socket alone until bytes come (`true`), `idle_until` or shutdown,
/// counted in the parked gauge meanwhile.
async fn wait_parked<S: Transport>(
    stream: &mut S,
    shutdown: &mut watch::Receiver<bool>,
    metrics: &Arc<Metrics>,
    idle_until: Instant,
) -> bool {
    let _parked = metrics.connection_parked();
    let stop = stopped(shutdown);
    tokio::select! {
        biased;
        ready = stream.socket().readable() => ready.is_ok(),
        () = tokio::time::sleep_until(idle_until) => false,
        () = stop => false,
    }
}

/// How a run of exchanges on this path ended.
enum Outcome {
    /// The connection is over.
    Closed,
    /// A request this path does not serve: the bytes read and the deadline of the head
    /// they begin, for the general path.
    General(Bytes, Instant),
    /// Idle past `park_idle_after`: parked, to be closed at this time if no byte comes.
    Parked(Instant),
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
    /// When the last response was written out: the idle wait after it starts there, and
    /// the response's access-log record ends there, from one clock read.
    responded_at: Option<Instant>,
}

impl Exchange<'_> {
    /// Serves requests until the connection ends, parks, or has a request the general
    /// path must serve. `resumed`: the connection was parked and its socket has become
    /// readable (the read is still bounded by `first_deadline`, when it was to close).
    async fn run<S: Transport>(
        &mut self,
        stream: &mut S,
        first_deadline: Instant,
        resumed: bool,
        mut stop: Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Outcome {
        let limits = self.settings.limits;
        let metrics = &self.worker.gateway.metrics;
        if resumed && !matches!(self.read(stream, stop.as_mut()).await, Wait::Read) {
            return Outcome::Closed;
        }
        // The first head must begin (and end) by `first_deadline`; a later one within
        // `header_read_timeout` of its first bytes, a time read only when it is needed
        // (a head that arrives whole, the common case, needs none).
        let mut head_deadline = if resumed { None } else { Some(first_deadline) };
        let deadline =
            |at: &mut Option<Instant>| *at.get_or_insert_with(|| Instant::now() + limits.header_read_timeout);
        let mut first = !resumed;
        let mut pipeline = None;
        loop {
            let skip = self.buf.len() - trim_leading_crlf(&self.buf).len();
            self.buf.advance(skip);
            if self.buf.is_empty() {
                if first {
                    self.timer.set(first_deadline);
                    match self.read(stream, stop.as_mut()).await {
                        Wait::Read => {}
                        // The guard answers the late head with its 408.
                        Wait::Timeout => return Outcome::General(Bytes::new(), first_deadline),
                        Wait::Closed => return Outcome::Closed,
                    }
                } else {
                    match self.wait_idle(stream, stop.as_mut()).await {
                        Idle::Read => {}
                        Idle::Closed => return Outcome::Closed,
                        Idle::Park(idle_until) => return Outcome::Parked(idle_until),
                    }
                    head_deadline = None;
                }
                continue;
            }
            first = false;
            let end = match framing::scan_head(&self.buf) {
                HeadScan::End(end) => end,
                // The guard refuses it (400), as it would have.
                HeadScan::BareLf => {
                    return Outcome::General(self.buf.split().freeze(), deadline(&mut head_deadline));
                }
                // Part of a head: read on while it is well-formed so far and within its
                // limits; otherwise the guard refuses it as it would have (431, 400, or
                // 408 once `head_deadline` has passed).
                HeadScan::Partial => {
                    if self.buf.len() > limits.max_header_bytes || framing::check_partial(&self.buf).is_err() {
                        return Outcome::General(self.buf.split().freeze(), deadline(&mut head_deadline));
                    }
                    self.timer.set(deadline(&mut head_deadline));
                    match self.read(stream, stop.as_mut()).await {
                        Wait::Read => continue,
                        Wait::Timeout => {
                            return Outcome::General(self.buf.split().freeze(), deadline(&mut head_deadline));
                        }
                        Wait::Closed => return Outcome::Closed,
                    }
                }
            };
            // Requests pipelined behind this one (`parse` sees bytes beyond its body) are
            // the guard's: it checks every head in a read before any is served, so a
            // smuggling attempt behind an innocent request is refused as a whole.
            let Some((request, fields, close)) = self.parse(end) else {
                return Outcome::General(self.buf.split().freeze(), deadline(&mut head_deadline));
            };
            let head_only = request.method() == Method::HEAD;
            // This task alone counts the connection's requests while it serves them here.
            let answer = self.conn.streams.start_alone();
            // Boxed: inline, the pipeline's state would make every connection's task as
            // large as a request in flight, idle ones too. One box for all the requests of
            // this run: the state (about 3 KiB) is too large for the allocator's per-thread
            // cache, so reusing it saves an allocation and a free per request.
            let (worker, conn) = (self.worker, self.conn);
            let mut response = boxed_again(&mut pipeline, || worker.handle(request, Some(fields), conn)).await;
            answer.answered();
            let max_requests = self.settings.max_requests;
            let mut close = close;
            if max_requests > 0 && self.conn.streams.started() >= max_requests {
                // NGINX's keepalive_requests: the last request of the connection says so.
                close = true;
                metrics.protected(Protection::RequestsPerConnection);
            }
            let written = self.respond(stream, &mut response, head_only, close).await;
            // Now, not at the end of this turn: the body's drop finishes the access-log
            // record and gives the upstream connection back before any wait.
            drop(response);
            match written {
                Ok(Next::KeepAlive) => {}
                Ok(Next::Close) => {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), tokio::io::AsyncWriteExt::shutdown(stream)).await;
                    return Outcome::Closed;
                }
                Err(error) => {
                    tracing::debug!(peer = %self.conn.peer, %error, "connection ended with error");
                    return Outcome::Closed;
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
            read = std::future::poll_fn(|cx| stream.poll_recv_head(cx, &mut self.buf)) => match read {
                Ok(0) | Err(_) => Wait::Closed,
                Ok(_) => Wait::Read,
            },
            () = std::future::poll_fn(|cx| timer.poll_expired(cx)) => Wait::Timeout,
            () = stop => Wait::Closed,
        }
    }

    /// Between requests: waits for the next head's first bytes, closes after
    /// `idle_timeout` or at shutdown, and after `park_idle_after` says to park.
    async fn wait_idle<S: Transport>(
        &mut self,
        stream: &mut S,
        stop: Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Idle {
        let limits = self.settings.limits;
        // Taken, so a later wait reads the clock unless another response has just ended.
        let now = self.responded_at.take().unwrap_or_else(Instant::now);
        let idle_until = now + limits.idle_timeout;
        let parking = !limits.park_after.is_zero();
        self.timer
            .set(if parking { now + limits.park_after } else { idle_until });
        match self.read(stream, stop).await {
            Wait::Read => Idle::Read,
            Wait::Closed => Idle::Closed,
            Wait::Timeout if !parking => Idle::Closed,
            Wait::Timeout if Instant::now() >= idle_until => Idle::Closed,
            // The buffers go with this run's state; the socket is all that is kept.
            Wait::Timeout => Idle::Park(idle_until),
        }
    }

    /// The head at the front of the buffer (`end` bytes) as a request, when this path can
    /// serve it; with its fields as read (its map is left empty) and whether the client
    /// asked to close after it. A body of declared
    /// length is served here when it arrived whole with the head and nothing follows it
    /// (the common API call: a small JSON body written with its head); the rest go to
    /// the general path, which streams them. `None` leaves the buffer as it was.
    /// `end`: where the head ends, with no bare LF before it (`framing::scan_head`).
    fn parse(&mut self, end: usize) -> Option<(ClientRequest, RawHeaders, bool)> {
        let head = &self.buf[..end];
        if end > self.settings.limits.max_header_bytes || head.starts_with(b"PRI * HTTP/2.0") {
            return None;
        }
        // Split off and frozen before the parse, so the target and header values can
        // share these bytes as they are read; given back if this path cannot serve it.
        let head = self.buf.split_to(end).freeze();
        match request_parts(head, self.buf.len() as u64) {
            Ok(parts) => {
                let body = (parts.body_len > 0).then(|| Inbound::Read(self.buf.split().freeze()));
                // Boxed: the pipeline moves it whole several times on its way upstream.
                let mut request = Box::new(Request::new(body));
                *request.method_mut() = parts.method;
                *request.uri_mut() = parts.uri;
                *request.version_mut() = Version::HTTP_11;
                Some((request, parts.fields, parts.close))
            }
            Err(head) => {
                let rest = std::mem::take(&mut self.buf);
                self.buf = match head.try_into_mut() {
                    // Nothing else holds the head: its bytes are rejoined in place.
                    Ok(mut head) => {
                        head.unsplit(rest);
                        head
                    }
                    Err(head) => {
                        let mut whole = BytesMut::from(&head[..]);
                        whole.extend_from_slice(&rest);
                        whole
                    }
                };
                None
            }
        }
    }
}

/// A request as the pipeline takes it, boxed: it moves it whole several times on its way
/// upstream.
type ClientRequest = Box<Request<Option<Inbound>>>;

/// A request head this path can serve.
struct Parts {
    method: Method,
    uri: Uri,
    /// The fields, as read.
    fields: RawHeaders,
    /// The client asked to close after it.
    close: bool,
    /// The body's declared length (0 for none).
    body_len: u64,
}

/// The request `head` holds, when the purpose-built path can serve it (else `head` back):
/// its body must be exactly the `at_hand` bytes that follow the head, all of it and
/// nothing more. Checked here rather than by a filter on the answer, which would move its
/// 144 bytes once more. The head moves into the fields as read rather than being shared
/// with them: each share of a `Bytes` is a locked increment, and its drop a locked
/// decrement (docs/benchmarks.md, "The head moved, not shared, into its fields").
fn request_parts(head: Bytes, at_hand: u64) -> Result<Parts, Bytes> {
    let Some((method, uri, fields, body_len)) = head_parts(&head, at_hand) else {
        return Err(head);
    };
    let fields = RawHeaders::new(head, fields);
    let close = fields
        .values(FramingField::Connection)
        .any(|value| has_token(value, b"close"));
    Ok(Parts {
        method,
        uri,
        fields,
        close,
        body_len,
    })
}

/// The method, target, fields and body length of the request `head` holds, when this path
/// can serve it ([`request_parts`]).
fn head_parts(head: &Bytes, at_hand: u64) -> Option<(Method, Uri, RawFields, u64)> {
    // Parsed once: the guard's RFC 9112 checks run on the same parse (they refuse
    // CONNECT, conflicting framing and bad targets; chunked bodies are the general path's).
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    framing::parse_complete(&mut parsed, head, &mut slots).ok()?;
    if parsed.version != Some(1) {
        return None;
    }
    let length = match framing::check_parsed(&parsed) {
        Ok(BodyLength::None) => 0,
        Ok(BodyLength::Length(n)) => n,
        Ok(BodyLength::Chunked) | Err(_) => return None,
    };
    if length != at_hand {
        return None;
    }
    let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    // No map is built: the pipeline reads the fields where they lie, and the upstream's
    // head copies them from there (docs/benchmarks.md, "Request fields as read").
    // One pass over the parsed names finds a protocol switch or an `Expect`, both the
    // general path's, before anything is built.
    if parsed.headers.iter().any(|header| {
        let name = header.name.as_bytes();
        same_name(name, UPGRADE.as_str().as_bytes()) || same_name(name, EXPECT.as_str().as_bytes())
    }) {
        return None;
    }
    let uri = Uri::from_maybe_shared(head.slice_ref(parsed.path?.as_bytes())).ok()?;
    let fields = RawFields::of(head, parsed.headers);
    Some((method, uri, fields, length))
}

/// `make()`'s future, put straight into its allocation: `Box::pin(future)` builds the
/// future on the stack and then copies all of it, and the pipeline's is several KiB of
/// which only the arguments are set before its first poll (docs/benchmarks.md).
fn boxed_in_place<F: std::future::Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// `make()`'s future in `slot`'s allocation when it has one (the last future there has
/// finished), else in a new one ([`boxed_in_place`]).
fn boxed_again<F: std::future::Future>(slot: &mut Option<Pin<Box<F>>>, make: impl FnOnce() -> F) -> &mut Pin<Box<F>> {
    match slot {
        Some(running) => {
            running.set(make());
            running
        }
        None => slot.insert(boxed_in_place(make)),
    }
}

enum Idle {
    Read,
    Closed,
    Park(Instant),
}

enum Wait {
    Read,
    Timeout,
    Closed,
}
