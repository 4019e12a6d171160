//! The upstream exchange: `upstream_peer` picks an endpoint, the request is sent under the
//! pool's timeouts, and a failed try goes to another endpoint when it may (retry budget,
//! idempotent or unwritten requests); a protocol switch becomes a byte tunnel.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::body::BodyTimes;
use super::{ProxyBody, RequestCtx, Worker, forward};
use crate::base::{ErrorKind, ErrorSource, ProxyError};
use crate::config::HashKey;
use crate::gateway::{Route, Snapshot, UpstreamPool};
use crate::upstream::body::{ClientBody, Inbound, RequestBody, UpstreamBody};
use crate::upstream::client::{PooledConn, SendError};
use crate::upstream::{InflightGuard, Selected, Tried};

/// The endpoint chosen for one try.
struct Peer {
    target: std::net::SocketAddr,
    guard: InflightGuard,
    /// The endpoint's place in its pool (retries skip it) and whether this try is a
    /// half-open breaker's probe.
    index: usize,
    probe: bool,
}

impl Peer {
    /// Takes the endpoint's next address and counts the try in its in-flight load.
    fn new(selected: Selected, ctx: &mut RequestCtx<'_>) -> Option<Peer> {
        let target = selected.endpoint.target()?;
        ctx.upstream_addr = Some(target);
        Some(Peer {
            guard: InflightGuard::new(selected.endpoint),
            target,
            index: selected.index,
            probe: selected.probe,
        })
    }
}

/// The upstream's response head, and the pooled connection its body comes on.
type Answer = (Response<UpstreamBody>, Option<PooledConn>);

/// One try's result, as the client returned it or the head's deadline cut it.
type Sent = Result<Result<Answer, SendError>, HeadTimeout>;

impl Worker {
    /// Phases 2 and 3 and the exchange, with retries on other endpoints.
    pub(super) async fn proxy(
        &self,
        snapshot: &Snapshot,
        route: &Route,
        ctx: &mut RequestCtx<'_>,
        req: Box<Request<Option<Inbound>>>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // Before a pool slot is taken: a slow body holds nothing upstream.
        let body_timeout = snapshot.config.server.client_body_timeout;
        let logged = self.gateway.access_log.is_some();
        // The body takes its upstream form at once: each `map` of the request moves its
        // 224-byte head (docs/benchmarks.md, "Fewer and smaller moves").
        let mut req = (*req).map(|body| {
            let body = ClientBody::new(body, route.max_body_bytes, body_timeout);
            // A body of no declared length (chunked, or HTTP/2 without one) is counted for
            // the access log's `bytes_in` as it streams.
            RequestBody::Client(
                if logged && ctx.declared_body == 0 && !hyper::body::Body::is_end_stream(&body) {
                    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
                    ctx.body_read = Some(counter.clone());
                    body.with_counter(counter)
                } else {
                    body
                },
            )
        });
        if let RequestBody::Client(body) = req.body_mut()
            && !hyper::body::Body::is_end_stream(body)
        {
            body.prefetch()
                .await
                .map_err(|fault| ProxyError::with_cause(fault.kind(), fault))?;
        }
        let upstream = &route.upstream;
        let pool = &upstream.pool;
        let _slot = pool
            .acquire()
            .ok_or_else(|| ProxyError::new(ErrorKind::UpstreamOverloaded))?;
        pool.earn_retry_budget();
        let mut tried = Tried::default();
        let fields = super::headers::Fields::new(req.headers(), ctx.names, ctx.read);
        let mut peer = upstream_peer(upstream, ctx, fields, &tried)?;
        let client_upgrade = ctx.upgrade.then(|| hyper::upgrade::on(&mut req));
        // Borrowed from the pool (the route's, which outlives the exchange), not from the
        // peer's guard: the upstream's head borrows it with no reference count touched.
        let endpoint_host = pool
            .endpoints
            .get(peer.index)
            .map(|endpoint| &endpoint.host_header)
            .ok_or_else(|| ProxyError::new(ErrorKind::Internal))?;
        forward::upstream_request_filter(route, ctx, &mut req)?;
        let mut forwarding =
            forward::forwarding(route, &snapshot.anonymous_plan, ctx, req.headers_mut(), endpoint_host);
        // A request without a body whose method may be repeated can be sent again after it
        // reached an endpoint; keep its head for that. Others are retried only when none of
        // them was written (a failed connect).
        let repeatable = pool.retries.attempts > 0
            && client_upgrade.is_none()
            && hyper::body::Body::is_end_stream(req.body())
            && pool.idempotent(req.method());
        let client = &upstream.clients[self.id % upstream.clients.len()];
        // A client that only borrows the request leaves it here to send again: no copy. It
        // writes the forwarding edits as it encodes the head; hyper's needs them applied.
        let borrowed = client.borrows(&req);
        if !borrowed {
            forwarding.apply(req.headers_mut(), ctx.read);
        }
        let head = (repeatable && !borrowed).then(|| copy_head(&req));
        let mut req = Some(req);
        let total_deadline = pool.timeouts.total.map(|t| ctx.start + t);
        let mut attempt = 0;
        // `read` counts from handing the request to the pool, so it includes a connect when
        // no idle connection exists; the connector enforces `connect` on its own.
        let per_try = pool.retries.per_try_timeout.unwrap_or(pool.timeouts.read);
        loop {
            let sent_at = Instant::now();
            let head_deadline = sent_at + per_try;
            let head_deadline = total_deadline.map_or(head_deadline, |t| t.min(head_deadline));
            let endpoint = peer.guard.endpoint();
            let mut sent: Sent = match (borrowed, &req) {
                (true, Some(kept)) => {
                    let keep = |name: &[u8]| forwarding.keeps(name);
                    let edits = forwarding.edits(&keep, ctx.read);
                    // The deadline is the connection's own timer, not one registered per
                    // request around the send (docs/benchmarks.md, "Where the time goes").
                    match client
                        .send_borrowed(endpoint, peer.target, kept, &edits, sent_at, Some(head_deadline))
                        .await
                    {
                        Err(SendError { timed_out: true, .. }) => Err(HeadTimeout),
                        sent => Ok(sent),
                    }
                }
                _ => {
                    let Some(owned) = req.take() else {
                        return Err(ProxyError::new(ErrorKind::Internal));
                    };
                    // Boxed: hyper's client futures would otherwise widen every request's
                    // future, bodiless ones included, which are moved per request.
                    let send = Box::pin(client.send(endpoint, peer.target, owned));
                    tokio::time::timeout_at(head_deadline, send)
                        .await
                        .map_err(|_| HeadTimeout)
                }
            };
            ctx.tries += 1;
            let answered_at = Instant::now();
            ctx.upstream_micros = Some((answered_at - sent_at).as_micros() as u64);
            ctx.answered_at = Some(answered_at);
            ctx.upstream_status = match &sent {
                Ok(Ok((response, _))) => Some(response.status().as_u16()),
                _ => None,
            };
            let kept = req.as_ref().filter(|_| borrowed);
            // Judged in place: the answer, a response of several hundred bytes, is moved
            // only when it is the one returned (docs/benchmarks.md, "Fewer and smaller moves").
            let again = judge(
                upstream,
                &peer,
                &mut sent,
                head.as_ref().or(kept.filter(|_| repeatable)),
                kept,
            );
            let retry = match again {
                Some(request) if attempt < pool.retries.attempts => {
                    tried.insert(peer.index);
                    retry_peer(upstream, ctx, &tried).map(|next| (request, next))
                }
                _ => None,
            };
            let Some((mut request, next)) = retry else {
                let (response, pooled) = answer(sent)?;
                let tunnel_idle = TunnelIdle {
                    after: snapshot.config.server.tunnel_idle_timeout,
                    metrics: &self.gateway.metrics,
                };
                return Ok(respond(
                    response,
                    pooled,
                    peer,
                    client_upgrade,
                    BodyTimes {
                        idle: pool.timeouts.read,
                        deadline: total_deadline,
                        answered_at,
                    },
                    tunnel_idle,
                ));
            };
            match &sent {
                Ok(Ok((response, _))) => {
                    tracing::debug!(upstream = %pool.name, status = response.status().as_u16(), "retrying on another endpoint")
                }
                Ok(Err(SendError { error, .. })) => {
                    tracing::debug!(upstream = %pool.name, %error, "retrying on another endpoint")
                }
                Err(HeadTimeout) => {
                    tracing::debug!(upstream = %pool.name, "retrying on another endpoint after a timeout")
                }
            }
            peer = next;
            if !pool.preserve_host
                && let Some(endpoint) = pool.endpoints.get(peer.index)
            {
                let host = &endpoint.host_header;
                if borrowed {
                    forwarding.set_host(host);
                } else {
                    request.headers_mut().insert(header::HOST, host.clone());
                }
            }
            req = Some(request);
            attempt += 1;
        }
    }
}

/// The response head had not come by the try's deadline.
struct HeadTimeout;

/// What one try came to, fed to the endpoint's health: the request to send again if it
/// may be retried (the answer stays in `sent`). Unwritten requests may go elsewhere
/// whatever their method; written ones only when repeatable (`head` kept) — a streamed
/// body is never replayed. `kept`: the request, when the client only borrowed it.
fn judge(
    upstream: &UpstreamPool,
    peer: &Peer,
    sent: &mut Sent,
    head: Option<&Request<RequestBody>>,
    kept: Option<&Request<RequestBody>>,
) -> Option<Request<RequestBody>> {
    let pool = &upstream.pool;
    match sent {
        Ok(Ok((response, _))) => {
            let status = response.status();
            pool.record(peer.guard.endpoint(), peer.probe, !status.is_server_error());
            let retry_status = status.is_server_error() && pool.retries.on_statuses.contains(&status.as_u16());
            retry_status.then(|| head.map(copy_head)).flatten()
        }
        // The client's body broke the exchange (too large, stalled, malformed): not the
        // endpoint's fault, and not to be sent again.
        Ok(Err(SendError { error, .. })) if error.kind.source() == ErrorSource::Client => None,
        Ok(Err(SendError { unsent, unwritten, .. })) => {
            pool.record(peer.guard.endpoint(), peer.probe, false);
            let unsent = unsent.take().or_else(|| kept.filter(|_| *unwritten).map(copy_head));
            unsent.or_else(|| head.map(copy_head))
        }
        Err(HeadTimeout) => {
            pool.record(peer.guard.endpoint(), peer.probe, false);
            head.map(copy_head)
        }
    }
}

/// The last try's answer, or the error it ended in.
fn answer(sent: Sent) -> Result<Answer, ProxyError> {
    match sent {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(SendError { error, .. })) => Err(error),
        Err(HeadTimeout) => Err(ProxyError::new(ErrorKind::UpstreamTimeout)),
    }
}

/// Phase 2: picks the endpoint by the pool's policy among those health allows; none left
/// → `503` at once, without waiting on timeouts.
fn upstream_peer(
    upstream: &UpstreamPool,
    ctx: &mut RequestCtx<'_>,
    fields: super::headers::Fields<'_>,
    tried: &Tried,
) -> Result<Peer, ProxyError> {
    let client_ip;
    let hash: Option<&[u8]> = match &upstream.pool.hash_key {
        None => None,
        Some(HashKey::ClientIp) => {
            client_ip = ctx.caller_ip.to_string();
            Some(client_ip.as_bytes())
        }
        Some(HashKey::Header(name)) => fields.get_named(name),
    };
    upstream
        .pool
        .select_healthy(hash, tried)
        .and_then(|selected| Peer::new(selected, ctx))
        .ok_or_else(|| ProxyError::new(ErrorKind::NoEndpoint))
}

/// The endpoint for a retry, if one is left and the pool's retry budget allows it.
fn retry_peer(upstream: &UpstreamPool, ctx: &mut RequestCtx<'_>, tried: &Tried) -> Option<Peer> {
    let pool = &upstream.pool;
    let selected = pool.select_healthy(None, tried)?;
    let allowed = pool.spend_retry_budget();
    pool.metrics.record_retry(allowed);
    if !allowed {
        return None;
    }
    Peer::new(selected, ctx)
}

/// The upstream's response for the client: its body streamed under the read-idle and
/// total deadlines, holding the endpoint's in-flight count; a protocol switch tunnelled.
fn respond(
    mut response: Response<UpstreamBody>,
    pooled: Option<PooledConn>,
    peer: Peer,
    client_upgrade: Option<OnUpgrade>,
    times: BodyTimes,
    tunnel_idle: TunnelIdle<'_>,
) -> Response<ProxyBody> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let metrics = tunnel_idle.metrics.clone();
        tokio::spawn(tunnel(
            client_upgrade,
            upstream_upgrade,
            peer.guard,
            tunnel_idle.after,
            metrics,
        ));
        return response.map(|_| ProxyBody::empty());
    }
    response.map(|body| ProxyBody::upstream(body, times, peer.guard, pooled))
}

/// A bodiless copy of a request's head: what a repeatable request is sent again from.
fn copy_head<B>(original: &Request<B>) -> Request<RequestBody> {
    let mut copy = Request::new(RequestBody::Empty);
    *copy.method_mut() = original.method().clone();
    *copy.uri_mut() = original.uri().clone();
    *copy.version_mut() = original.version();
    *copy.headers_mut() = original.headers().clone();
    copy
}

/// When an idle tunnel is closed, and where that is counted.
/// Borrowed: cloning the metrics' `Arc` for every response, tunnel or not, cost two
/// locked instructions (docs/benchmarks.md, "Locked instructions").
struct TunnelIdle<'a> {
    after: std::time::Duration,
    metrics: &'a std::sync::Arc<crate::metrics::Metrics>,
}

/// Copies bytes both ways between an upgraded client connection and the upstream one,
/// until either side closes or no byte has moved for `server.tunnel_idle_timeout`.
/// `idle_after`: `server.tunnel_idle_timeout`; a tunnel closed for it is counted in `metrics`.
async fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    _inflight: InflightGuard,
    idle_after: std::time::Duration,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%error, "protocol switch failed");
            return;
        }
    };
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let mut client = Watched::new(hyper_util::rt::TokioIo::new(client), start, &last);
    let mut upstream = Watched::new(hyper_util::rt::TokioIo::new(upstream), start, &last);
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        let idle_until = start + std::time::Duration::from_millis(last.load(Ordering::Relaxed)) + idle_after;
        tokio::select! {
            result = &mut copy => {
                if let Err(error) = result {
                    tracing::debug!(%error, "upgraded connection closed with error");
                }
                return;
            }
            _ = tokio::time::sleep_until(idle_until) => {
                let moved = start + std::time::Duration::from_millis(last.load(Ordering::Relaxed));
                if Instant::now() >= moved + idle_after {
                    metrics.protected(crate::metrics::Protection::TunnelIdle);
                    tracing::debug!("tunnel closed: idle");
                    return;
                }
            }
        }
    }
}

/// One side of a tunnel, noting when bytes last moved through it.
struct Watched<'a, T> {
    io: T,
    start: Instant,
    last: &'a AtomicU64,
}

impl<'a, T> Watched<'a, T> {
    fn new(io: T, start: Instant, last: &'a AtomicU64) -> Self {
        Watched { io, start, last }
    }

    fn moved(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.moved();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.moved();
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
