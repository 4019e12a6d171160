//! The request pipeline. Every request runs the same named phases, in this order, with one
//! [`RequestCtx`] carried through them (the phase chart is in `docs/architecture.md`):
//!
//! `request_filter (identify → limit_filter) → upstream_peer → upstream_request_filter →
//! (exchange) → response_filter → logging`, and `fail_to_proxy` when any of them fails.
//!
//! One concern per file: `identify` (route and caller), `limit` (plan limits and usage),
//! `forward` (request and response head filters), `exchange` (the upstream exchange with
//! its retries, and tunnels), `error` (errors as responses). Phases that only need the
//! request head take a [`Head`] (borrowed method, URI, version and headers), so they are
//! tested on a `Request<()>` without a socket. They call into modules that know nothing of
//! hyper (router, auth, limits, usage, upstream).

mod access_log;
pub mod body;
mod error;
mod exchange;
mod forward;
pub mod headers;
mod identify;
mod limit;
mod usage_page;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use tokio::time::Instant;

/// The client's request body as the listener hands it over.
pub use crate::upstream::body::Inbound;
pub use body::ProxyBody;
pub use identify::{Caller, Credentials, KeySource, presented_credentials};

use crate::auth::{self, Identity};
use crate::base::http1::RawHeaders;
use crate::base::{ConnPhase, ConnStreams, ErrorKind, ErrorSource, ProxyError, RequestId};
use crate::gateway::{Gateway, Snapshot};
use crate::limits::LimitStatus;
use crate::upstream::h1::FieldValue;

/// The request head as the phases read it, borrowed from the request whatever its body:
/// the pipeline's `Request<Incoming>`, or a `Request<()>` in a unit test. (Splitting the
/// request into `http::request::Parts` and joining it again would move the head twice
/// more per request.)
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub version: Version,
    /// Looked up through [`Head::get`].
    pub fields: headers::Fields<'a>,
}

impl<'a> Head<'a> {
    pub fn of<B>(req: &'a Request<B>) -> Head<'a> {
        Head::with(req, headers::Names::of(req.headers()), None)
    }

    /// With `names` already made from the request's map (once per request), and the
    /// fields as read when the purpose-built server left that map empty.
    pub fn with<B>(req: &'a Request<B>, names: headers::Names, read: Option<&'a RawHeaders>) -> Head<'a> {
        Head {
            method: req.method(),
            uri: req.uri(),
            version: req.version(),
            fields: headers::Fields::new(req.headers(), names, read),
        }
    }

    /// The first value of field `name`.
    pub fn get(&self, name: &HeaderName) -> Option<&'a [u8]> {
        self.fields.get(name)
    }

    /// The first value of field `name` as text (visible ASCII).
    pub fn text(&self, name: &HeaderName) -> Option<&'a str> {
        self.fields.text(name)
    }
}

/// What the connection knows about itself, shared by its requests.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The upstream head's fields that only the connection decides, rendered once.
    pub forwarded: ConnFields,
    /// Present on HTTP/1 connections guarded by the listener's head reader.
    pub phase: Option<Arc<ConnPhase>>,
    /// The verified client certificate's identity (mTLS), sent upstream as
    /// `X-Client-Cert-Subject`; the hook for certificate-based auth.
    pub client_identity: Option<HeaderValue>,
    /// Its requests, for the per-connection limits (set by the listener).
    pub streams: ConnStreams,
    /// The negotiated TLS version, on TLS listeners (for the access log).
    pub tls_version: Option<&'static str>,
    /// The key this connection presented last, so a keep-alive client's key is hashed
    /// once (`auth::KeyMemo`). Locked only around the hash, never across an await. Boxed
    /// on first use: an idle connection that never sent a key holds 16 bytes for it.
    key_memo: std::sync::Mutex<Option<Box<auth::KeyMemo>>>,
}

impl ConnInfo {
    /// `f` with the connection's key memo; with a fresh one in the rare case another
    /// stream of the connection holds it (HTTP/2), rather than waiting.
    pub fn with_key_memo<R>(&self, f: impl FnOnce(&mut auth::KeyMemo) -> R) -> R {
        match self.key_memo.try_lock() {
            Ok(mut memo) => f(memo.get_or_insert_with(Box::default)),
            Err(_) => f(&mut auth::KeyMemo::default()),
        }
    }

    /// With the per-connection limits' counts (set by the listener).
    pub fn with_streams(mut self, streams: ConnStreams) -> ConnInfo {
        self.streams = streams;
        self
    }

    /// `peer`: the socket peer, or the PROXY-protocol source; `port`: the listener's.
    pub fn new(peer: SocketAddr, port: u16, tls: bool) -> ConnInfo {
        ConnInfo {
            peer,
            forwarded: ConnFields::new(peer.ip(), if tls { "https" } else { "http" }, port),
            phase: None,
            client_identity: None,
            streams: ConnStreams::new(0),
            tls_version: None,
            key_memo: std::sync::Mutex::default(),
        }
    }
}

/// `X-Forwarded-For` (the peer alone), `X-Real-IP`, `X-Forwarded-Proto` and
/// `X-Forwarded-Port` as the lines of the upstream's head, rendered once per connection:
/// a request whose caller is the peer and that sent no `X-Forwarded-For` of its own, the
/// usual case, gets all four in one copy (docs/benchmarks.md, "Forwarding by name
/// length"). Their values are read off the lines.
pub struct ConnFields {
    lines: Box<[u8]>,
    peer_ip: (u16, u16),
    proto: (u16, u16),
    port: (u16, u16),
}

impl ConnFields {
    fn new(ip: std::net::IpAddr, proto: &str, port: u16) -> ConnFields {
        let ip = ip.to_string();
        let port = port.to_string();
        let mut lines = Vec::with_capacity(128);
        // Where each value lands in the lines.
        let mut line = |name: &HeaderName, value: &str| {
            lines.extend_from_slice(name.as_str().as_bytes());
            lines.extend_from_slice(b": ");
            let start = lines.len() as u16;
            lines.extend_from_slice(value.as_bytes());
            let end = lines.len() as u16;
            lines.extend_from_slice(b"\r\n");
            (start, end)
        };
        line(&headers::X_FORWARDED_FOR, &ip);
        let peer_ip = line(&headers::X_REAL_IP, &ip);
        let proto = line(&headers::X_FORWARDED_PROTO, proto);
        let port = line(&headers::X_FORWARDED_PORT, &port);
        ConnFields {
            lines: lines.into_boxed_slice(),
            peer_ip,
            proto,
            port,
        }
    }

    fn part(&self, (start, end): (u16, u16)) -> &[u8] {
        self.lines.get(usize::from(start)..usize::from(end)).unwrap_or_default()
    }

    /// The four fields' lines.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// The peer's IP as text.
    pub fn peer_ip(&self) -> &[u8] {
        self.part(self.peer_ip)
    }

    /// `https` on TLS listeners, else `http`.
    pub fn proto(&self) -> &[u8] {
        self.part(self.proto)
    }

    /// The listener's port.
    pub fn port(&self) -> &[u8] {
        self.part(self.port)
    }
}

/// Per-request state carried through the phases.
pub struct RequestCtx<'c> {
    /// Borrowed from `Worker::handle`, which owns it: the upstream's head borrows it too,
    /// with no reference count touched (docs/benchmarks.md, "Locked instructions").
    pub request_id: &'c RequestId,
    /// Which names the client's header map may hold (`headers::Names`).
    pub names: headers::Names,
    /// The client's fields as read, when the purpose-built server built no map for them.
    pub read: Option<&'c RawHeaders>,
    pub start: Instant,
    pub client_addr: SocketAddr,
    /// The connection the request came on (peer, scheme, port, client certificate),
    /// read where needed rather than copied into every request.
    pub conn: &'c ConnInfo,
    /// The `Host` the client asked for (header, or authority on HTTP/2), borrowed when
    /// it was read without a map.
    pub host: Option<FieldValue<'c>>,
    /// The request path normalized, when it differs from the one received: what routes
    /// match and the upstream receives.
    pub path: Option<String>,
    /// Index into `Snapshot::routes` once `request_filter` matched one.
    pub route: Option<usize>,
    pub upstream_addr: Option<SocketAddr>,
    pub error: Option<ErrorKind>,
    /// An HTTP/1.1 protocol switch (WebSocket) was asked for.
    pub upgrade: bool,
    /// Who is calling, once identified.
    pub caller: Caller,
    /// The client after trusted proxies (`server.trusted_proxies`) are looked through.
    pub caller_ip: IpAddr,
    /// The limit closest to exhaustion (or the one that refused), for the `RateLimit`
    /// headers and a 429's body.
    pub limit: Option<LimitStatus>,
    /// Seconds, on a 429.
    pub retry_after: Option<u64>,
    /// The methods the best-matching route takes, on a 405.
    pub allow: Option<HeaderValue>,
    /// The body length the request declared (`Content-Length`, as hyper read it; 0 for
    /// none or chunked), checked against the route's limit before anything is charged.
    pub declared_body: u64,
    /// The caller passed `limit_filter` (counted, or not limited).
    pub admitted: bool,
    /// The last upstream try: its status, and the time from sending to its answer.
    pub upstream_status: Option<u16>,
    pub upstream_micros: Option<u64>,
    /// Upstream tries made (retries included).
    pub tries: u32,
    /// Body bytes read so far, for a body of no declared length (with `[logs]` only).
    pub body_read: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Global mode: refused only because this node's quota lease ran out and more was
    /// asked for; `handle` waits for the answer and decides again.
    pub lease_pending: bool,
    /// The request is for the customer usage page (`[usage_page]`), not a route.
    pub usage_page: bool,
    /// When a decision after a lease wait is made; the first decision, made as the request
    /// arrives, uses `start` and reads no clock of its own.
    pub decided_at: Option<Instant>,
    /// When the last upstream try's head arrived: the request's latency in the metrics
    /// ends there when it was proxied, without another clock read.
    pub answered_at: Option<Instant>,
}

impl<'c> RequestCtx<'c> {
    #[inline]
    fn new(
        request_id: &'c RequestId,
        names: headers::Names,
        read: Option<&'c RawHeaders>,
        conn: &'c ConnInfo,
    ) -> RequestCtx<'c> {
        RequestCtx {
            request_id,
            names,
            read,
            start: Instant::now(),
            client_addr: conn.peer,
            conn,
            host: None,
            path: None,
            route: None,
            upstream_addr: None,
            error: None,
            upgrade: false,
            caller: Caller::Public,
            caller_ip: conn.peer.ip(),
            limit: None,
            retry_after: None,
            allow: None,
            declared_body: 0,
            admitted: false,
            upstream_status: None,
            upstream_micros: None,
            tries: 0,
            body_read: None,
            lease_pending: false,
            decided_at: None,
            answered_at: None,
            usage_page: false,
        }
    }

    /// The key's (or JWT's) identity, for keyed callers.
    pub fn identity(&self) -> Option<&Identity> {
        self.caller.identity()
    }
}

/// One worker's handle on the pipeline; `id` selects the worker's upstream clients.
#[derive(Clone)]
pub struct Worker {
    pub gateway: Arc<Gateway>,
    pub id: usize,
}

/// How long a request waits for a quota lease its node asked for, deciding again after
/// every answer (docs/multi-region.md, "Quota leases"); then it is refused with 503.
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_millis(1500);

impl Worker {
    /// Waits (at most [`LEASE_WAIT`]) for the answer to the lease claim `request_filter`
    /// made, and runs it again; still waiting then: `503 state_unavailable`.
    async fn after_lease<'s>(
        &self,
        snapshot: &'s Snapshot,
        ctx: &mut RequestCtx<'_>,
        head: Head<'_>,
        mut filtered: Result<&'s crate::gateway::Route, ProxyError>,
    ) -> Result<&'s crate::gateway::Route, ProxyError> {
        let deadline = tokio::time::Instant::now() + LEASE_WAIT;
        let leasing = &self.gateway.usage.table.leasing;
        while ctx.lease_pending {
            let answered = leasing.answered.notified();
            // A short poll as well: an answer between the refusal and `notified` is not
            // missed for long.
            let poll = tokio::time::Instant::now() + std::time::Duration::from_millis(20);
            if tokio::time::timeout_at(poll.min(deadline), answered).await.is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return filtered;
            }
            ctx.lease_pending = false;
            ctx.limit = None;
            ctx.retry_after = None;
            ctx.decided_at = Some(tokio::time::Instant::now());
            filtered = self.request_filter(snapshot, ctx, head);
        }
        filtered
    }

    /// Runs a request through every phase. Never fails: errors become JSON responses. The
    /// body is hyper's, the one the purpose-built HTTP/1.1 server (`listener::fast`) read
    /// with the head, or `None` for a bodiless request read by that server.
    pub async fn handle(
        &self,
        req: Box<Request<Option<Inbound>>>,
        read: Option<RawHeaders>,
        conn: &ConnInfo,
    ) -> Response<ProxyBody> {
        let snapshot = self.gateway.snapshot();
        let read = read.as_ref();
        let names = headers::Names::of(req.headers());
        let request_id = headers::request_id(headers::Fields::new(req.headers(), names, read));
        let mut ctx = RequestCtx::new(&request_id, names, read, conn);
        ctx.declared_body = req.body().as_ref().map_or(0, |body| body.size_hint().lower());
        let page = snapshot
            .usage_page
            .as_ref()
            .filter(|page| usage_page::requested(page, Head::with(&req, names, read), &snapshot));
        // `Ok(None)`: the usage page, which has no route.
        let filtered = match page {
            Some(page) => self
                .usage_page_filter(page, &mut ctx, Head::with(&req, names, read))
                .map(|()| None),
            None => {
                let mut filtered = self.request_filter(&snapshot, &mut ctx, Head::with(&req, names, read));
                if ctx.lease_pending {
                    // Boxed, like the usage page below: rare, and kept out of every
                    // request's future.
                    filtered =
                        Box::pin(self.after_lease(&snapshot, &mut ctx, Head::with(&req, names, read), filtered)).await;
                }
                filtered.map(Some)
            }
        };
        let mut record = self.gateway.access_log.as_ref().map(|log| {
            let mut record = crate::logs::Pending::begin(log, ctx.start);
            access_log::record_request(&mut record, &log.settings, &ctx, Head::with(&req, names, read));
            record
        });
        // Each arm ends in the response: a `Result` bound first would be one more move of
        // it (docs/benchmarks.md, "Fewer and smaller moves").
        let mut response = match filtered {
            Ok(Some(route)) => match self.proxy(&snapshot, route, &mut ctx, req).await {
                Ok(response) => response,
                Err(error) => self.fail_to_proxy(&snapshot, &mut ctx, error),
            },
            Ok(None) => match Box::pin(self.usage_page(&ctx, Head::with(&req, names, read))).await {
                Ok(response) => response,
                Err(error) => self.fail_to_proxy(&snapshot, &mut ctx, error),
            },
            Err(error) => self.fail_to_proxy(&snapshot, &mut ctx, error),
        };
        forward::response_filter(&ctx, ctx.route.and_then(|i| snapshot.routes.get(i)), &mut response);
        if let Some(phase) = &conn.phase {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                phase.upgraded();
            } else {
                response.body_mut().set_finished_signal(phase.clone());
            }
        }
        self.logging(&snapshot, &ctx, response.status());
        if let (Some(mut record), Some(log)) = (record.take(), &self.gateway.access_log) {
            let route = ctx.route.and_then(|i| snapshot.routes.get(i));
            access_log::record_response(&mut record, &log.settings, route, &ctx, response.status());
            response.body_mut().set_record(record);
        }
        response
    }

    /// Last for every request: records metrics and a debug event (the access log's record
    /// is finished by the response body, see `access_log`).
    fn logging(&self, snapshot: &Snapshot, ctx: &RequestCtx<'_>, status: StatusCode) {
        let elapsed = ctx.answered_at.map_or_else(|| ctx.start.elapsed(), |at| at - ctx.start);
        let route = ctx.route.and_then(|i| snapshot.routes.get(i));
        let metrics = match (route, &snapshot.usage_page) {
            (Some(route), _) => &route.metrics,
            (None, Some(page)) if ctx.usage_page => &page.metrics,
            (None, _) => &snapshot.no_route_metrics,
        };
        metrics.record(status.as_u16(), elapsed);
        tracing::debug!(
            target: "tollgate::access",
            request_id = ?ctx.request_id,
            route = route.map_or("", |r| &*r.name),
            client = %ctx.caller_ip,
            upstream = ?ctx.upstream_addr,
            status = status.as_u16(),
            error = ctx.error.map_or("", ErrorKind::code),
            micros = elapsed.as_micros() as u64,
            "request"
        );
    }

    /// Maps an error to the client's response; the only place errors become HTTP.
    fn fail_to_proxy(&self, snapshot: &Snapshot, ctx: &mut RequestCtx<'_>, error: ProxyError) -> Response<ProxyBody> {
        ctx.error = Some(error.kind);
        match error.kind.source() {
            ErrorSource::Upstream => {
                if let Some(route) = ctx.route.and_then(|i| snapshot.routes.get(i)) {
                    route.upstream.pool.metrics.record_error(error.kind);
                }
                tracing::warn!(request_id = ?ctx.request_id, upstream = ?ctx.upstream_addr, %error, "upstream request failed");
            }
            ErrorSource::Internal => tracing::error!(request_id = ?ctx.request_id, %error, "internal error"),
            ErrorSource::Client => {
                if let Some(protection) = crate::metrics::Protection::of_error(error.kind) {
                    self.gateway.metrics.protected(protection);
                }
                tracing::debug!(request_id = ?ctx.request_id, %error, "request refused")
            }
        }
        match (error.kind, &ctx.limit, ctx.retry_after) {
            (ErrorKind::RateLimited | ErrorKind::QuotaExceeded, Some(limit), Some(retry_after)) => {
                error::limit_response(
                    error.kind,
                    limit,
                    retry_after,
                    self.gateway.usage.clock.now(),
                    ctx.request_id,
                )
            }
            (ErrorKind::MethodNotAllowed, _, _) => {
                let mut response = error::error_response(error.kind, ctx.request_id);
                if let Some(allow) = ctx.allow.take() {
                    response.headers_mut().insert(http::header::ALLOW, allow);
                }
                response
            }
            _ => error::error_response(error.kind, ctx.request_id),
        }
    }
}
