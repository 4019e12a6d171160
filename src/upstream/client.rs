//! Upstream clients. HTTP/1.1 goes through a keep-alive pool of our own, one per worker
//! thread: a checkout is a `Vec::pop` on a thread-local list, with no lock, no channel and
//! no boxed future, which measured faster than hyper-util's shared pool (docs/benchmarks.md).
//! HTTP/2 pools multiplex streams over one connection and use hyper-util's client.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::client::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustc_hash::FxHashMap;
use tokio::time::Instant;

use super::body::{ClientBodyError, RequestBody, UpstreamBody};
use super::{Endpoint, UpstreamTls, h1};
use crate::base::{ErrorKind, ProxyError};
use rustls::pki_types::ServerName;

/// Idle upstream connections older than this are closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most idle connections kept per endpoint address and worker (NGINX's `keepalive`).
const MAX_IDLE_PER_ADDR: usize = 256;

pub type LegacyClient = Client<HttpConnector, RequestBody>;
pub type TlsLegacyClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, RequestBody>;

/// A failed send, with the request when none of it was written (safe to send elsewhere).
pub struct SendError {
    pub error: ProxyError,
    pub unsent: Option<Request<RequestBody>>,
    /// None of a request the client only borrowed (`send_borrowed`) was written.
    pub unwritten: bool,
    /// The response head had not come by the deadline given to `send_borrowed`.
    pub timed_out: bool,
}

impl From<ProxyError> for SendError {
    fn from(error: ProxyError) -> Self {
        SendError {
            error,
            unsent: None,
            unwritten: false,
            timed_out: false,
        }
    }
}

/// Idle connections are kept per endpoint address and TLS settings (a pool's own, by
/// identity), so a connection is only reused the way it was set up.
pub(crate) type IdleKey = (SocketAddr, usize);

fn idle_key(addr: SocketAddr, tls: Option<&Arc<UpstreamTls>>) -> IdleKey {
    (addr, tls.map_or(0, |t| Arc::as_ptr(t) as usize))
}

struct IdleConn {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

thread_local! {
    static IDLE: RefCell<FxHashMap<IdleKey, Vec<IdleConn>>> = RefCell::default();
    /// The purpose-built client's idle connections (`h1`), apart from hyper's.
    static IDLE_H1: RefCell<FxHashMap<IdleKey, Vec<IdleH1>>> = RefCell::default();
}

/// An idle connection of the purpose-built client, idle since its `sent_at`; boxed as the
/// response body that lends it out holds it.
type IdleH1 = Box<h1::Conn>;

/// Takes back a connection whose response was read to its end.
pub(crate) fn release_h1(key: IdleKey, conn: Box<h1::Conn>) {
    IDLE_H1.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_ADDR {
            list.push(conn);
        }
    });
}

/// An idle connection for `key` that has been idle less than `IDLE_TIMEOUT` at `now`.
fn checkout_h1(key: IdleKey, now: Instant) -> Option<Box<h1::Conn>> {
    IDLE_H1.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&key)?;
        // Idle since its last request was sent (`h1::Conn::sent_at`).
        while let Some(mut conn) = list.pop() {
            if now.saturating_duration_since(conn.sent_at) < IDLE_TIMEOUT && conn.is_usable() {
                return Some(conn);
            }
        }
        None
    })
}

/// An HTTP/1.1 connection lent to one exchange; it goes back to the worker's pool when the
/// response body has been read to its end.
pub struct PooledConn {
    key: IdleKey,
    sender: http1::SendRequest<RequestBody>,
}

impl PooledConn {
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = idle.entry(self.key).or_default();
            if list.len() < MAX_IDLE_PER_ADDR {
                list.push(IdleConn {
                    sender: self.sender,
                    since: Instant::now(),
                });
            }
        });
    }
}

fn checkout(key: IdleKey) -> Option<http1::SendRequest<RequestBody>> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&key)?;
        while let Some(conn) = list.pop() {
            if !conn.sender.is_closed() && conn.since.elapsed() < IDLE_TIMEOUT {
                return Some(conn.sender);
            }
        }
        None
    })
}

/// A new connection to `addr`, over TLS when `tls` names the server; the TCP connect and
/// the TLS handshake together get `connect_timeout`.
async fn connect(
    addr: SocketAddr,
    connect_timeout: Duration,
    tls: Option<(&UpstreamTls, ServerName<'static>)>,
) -> Result<h1::Io, ProxyError> {
    let deadline = Instant::now() + connect_timeout;
    let stream = match tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => return Err(ProxyError::new(ErrorKind::UpstreamTimeout)),
        Ok(Err(e)) => return Err(ProxyError::with_cause(ErrorKind::UpstreamConnect, e)),
        Ok(Ok(stream)) => stream,
    };
    let _ = stream.set_nodelay(true);
    let Some((tls, name)) = tls else {
        return Ok(h1::Io::Plain(stream));
    };
    match tokio::time::timeout_at(deadline, tls.connector.connect(name, stream)).await {
        Err(_) => Err(ProxyError::new(ErrorKind::UpstreamTimeout)),
        Ok(Err(e)) => Err(ProxyError::with_cause(ErrorKind::UpstreamTls, e)),
        Ok(Ok(stream)) => Ok(h1::Io::Tls(Box::new(stream))),
    }
}

async fn handshake<IO>(addr: SocketAddr, io: IO) -> Result<http1::SendRequest<RequestBody>, ProxyError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        // Flat writes, as on the client side of the listener.
        .writev(false)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ProxyError::with_cause(ErrorKind::UpstreamConnect, e))?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%addr, %error, "upstream connection closed with error");
        }
    });
    Ok(sender)
}

/// How one pool talks to its endpoints.
pub enum UpstreamClient {
    Http1 {
        connect_timeout: Duration,
        /// Connects in progress on this worker, against `max_pending`.
        connecting: Arc<AtomicUsize>,
        max_pending: usize,
        tls: Option<Arc<UpstreamTls>>,
    },
    Http2(Box<LegacyClient>),
    /// HTTP/2 over TLS (ALPN `h2`).
    Http2Tls(Box<TlsLegacyClient>),
}

/// One of a worker's connects in progress, counted against `max_pending_connections`
/// until dropped: a connect that is cancelled (a per-try timeout, a client gone) gives its
/// slot back like one that ends.
struct PendingConnect<'a>(&'a AtomicUsize);

impl<'a> PendingConnect<'a> {
    /// A slot, unless `max` (0 = no limit) are taken.
    fn take(connecting: &'a AtomicUsize, max: usize) -> Option<Self> {
        if max > 0 && connecting.load(Ordering::Relaxed) >= max {
            return None;
        }
        connecting.fetch_add(1, Ordering::Relaxed);
        Some(PendingConnect(connecting))
    }
}

impl Drop for PendingConnect<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl UpstreamClient {
    /// Sends `req` (origin-form URI) to `target`. A connection taken from the pool that
    /// turns out to be closed before the request was written is replaced transparently.
    /// On failure the request comes back when none of it reached the endpoint.
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        target: SocketAddr,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, Option<PooledConn>), SendError> {
        match self {
            UpstreamClient::Http2(client) => {
                set_absolute_uri(&mut req, http::uri::Scheme::HTTP, target)?;
                let response = client.request(req).await.map_err(classify_legacy_error)?;
                Ok((response.map(UpstreamBody::Hyper), None))
            }
            UpstreamClient::Http2Tls(client) => {
                set_absolute_uri(&mut req, http::uri::Scheme::HTTPS, target)?;
                let response = client.request(req).await.map_err(classify_legacy_error)?;
                Ok((response.map(UpstreamBody::Hyper), None))
            }
            UpstreamClient::Http1 { tls, .. } => {
                let key = idle_key(target, tls.as_ref());
                if h1::can_send(&req) {
                    return match self
                        .send_borrowed(endpoint, target, &req, &h1::Edits::NONE, Instant::now(), None)
                        .await
                    {
                        Ok(answer) => Ok(answer),
                        Err(mut failed) => {
                            failed.unsent = failed.unwritten.then_some(req);
                            Err(failed)
                        }
                    };
                }
                loop {
                    let (mut sender, reused) = match checkout(key) {
                        Some(sender) => (sender, true),
                        None => match self.open(endpoint, target).await {
                            // Boxed, as connects are: rare, and large.
                            Ok(io) => match Box::pin(handshake(target, io)).await {
                                Ok(sender) => (sender, false),
                                Err(error) => {
                                    return Err(SendError {
                                        error,
                                        unsent: Some(req),
                                        unwritten: true,
                                        timed_out: false,
                                    });
                                }
                            },
                            Err(error) => {
                                return Err(SendError {
                                    error,
                                    unsent: Some(req),
                                    unwritten: true,
                                    timed_out: false,
                                });
                            }
                        },
                    };
                    if let Err(error) = sender.ready().await {
                        if reused {
                            continue;
                        }
                        return Err(SendError {
                            error: ProxyError::with_cause(ErrorKind::UpstreamProtocol, error),
                            unsent: Some(req),
                            unwritten: true,
                            timed_out: false,
                        });
                    }
                    match sender.try_send_request(req).await {
                        Ok(response) => {
                            return Ok((response.map(UpstreamBody::Hyper), Some(PooledConn { key, sender })));
                        }
                        Err(mut error) => match error.take_message() {
                            // Never written: the idle connection was closed under us; use another.
                            Some(unsent) if reused => req = unsent,
                            unsent => {
                                let error = error.into_error();
                                let kind = ClientBodyError::find(&error)
                                    .map_or(ErrorKind::UpstreamProtocol, ClientBodyError::kind);
                                return Err(SendError {
                                    error: ProxyError::with_cause(kind, error),
                                    unwritten: unsent.is_some(),
                                    unsent,
                                    timed_out: false,
                                });
                            }
                        },
                    }
                }
            }
        }
    }

    /// Whether `send_borrowed` can take this request: a bodiless one (no protocol switch)
    /// to an HTTP/1.1 pool. The caller keeps the request, so it needs no copy to retry.
    pub fn borrows(&self, req: &Request<RequestBody>) -> bool {
        matches!(self, UpstreamClient::Http1 { .. }) && h1::can_send(req)
    }

    /// A bodiless request through the purpose-built client (`h1`), borrowed. A reused
    /// connection that fails before the head is written, or (for a method that may be
    /// repeated) closes before a byte of the answer, is the keep-alive race: the request
    /// goes on another connection, as NGINX does with its cached ones. `now`: the time
    /// the caller read as it sent (idle connections are judged by it). `deadline`: when
    /// the response head must have come (a connect included), unless the caller bounds
    /// the send itself; past it, the error says `timed_out`.
    pub async fn send_borrowed(
        &self,
        endpoint: &Endpoint,
        target: SocketAddr,
        req: &Request<RequestBody>,
        edits: &h1::Edits<'_>,
        now: Instant,
        deadline: Option<Instant>,
    ) -> Result<(Response<UpstreamBody>, Option<PooledConn>), SendError> {
        let UpstreamClient::Http1 { tls, .. } = self else {
            return Err(ProxyError::new(ErrorKind::Internal).into());
        };
        let key = idle_key(target, tls.as_ref());
        loop {
            let (conn, reused) = match checkout_h1(key, now) {
                Some(conn) => (conn, true),
                None => {
                    let opened = match deadline {
                        Some(deadline) => tokio::time::timeout_at(deadline, self.open(endpoint, target)).await,
                        None => Ok(self.open(endpoint, target).await),
                    };
                    match opened {
                        Ok(Ok(io)) => (Box::new(h1::Conn::new(io)), false),
                        Ok(Err(error)) => {
                            return Err(SendError {
                                error,
                                unsent: None,
                                unwritten: true,
                                timed_out: false,
                            });
                        }
                        Err(_) => {
                            return Err(SendError {
                                error: ProxyError::new(ErrorKind::UpstreamTimeout),
                                unsent: None,
                                unwritten: true,
                                timed_out: true,
                            });
                        }
                    }
                }
            };
            match h1::send(conn, key, req, edits, now, deadline).await {
                Ok(response) => return Ok((response.map(UpstreamBody::H1), None)),
                Err(failure) => {
                    if reused
                        && !failure.timed_out
                        && (failure.unsent || (failure.closed_early && req.method().is_idempotent()))
                    {
                        continue;
                    }
                    return Err(SendError {
                        error: failure.error,
                        unsent: None,
                        unwritten: failure.unsent,
                        timed_out: failure.timed_out,
                    });
                }
            }
        }
    }

    /// A new connection for an HTTP/1.1 pool, within the worker's pending-connect limit.
    async fn open(&self, endpoint: &Endpoint, target: SocketAddr) -> Result<h1::Io, ProxyError> {
        let UpstreamClient::Http1 {
            connect_timeout,
            connecting,
            max_pending,
            tls,
        } = self
        else {
            return Err(ProxyError::new(ErrorKind::Internal));
        };
        let Some(_slot) = PendingConnect::take(connecting, *max_pending) else {
            return Err(ProxyError::new(ErrorKind::UpstreamOverloaded));
        };
        let name = match tls.as_deref() {
            Some(tls) => match tls.name_for(endpoint) {
                Some(name) => Some((tls, name)),
                None => return Err(ProxyError::new(ErrorKind::UpstreamTls)),
            },
            None => None,
        };
        // Boxed: the TCP connect and TLS handshake state would otherwise be part of every
        // request's future, moved with it on every request though most never connect.
        Box::pin(connect(target, *connect_timeout, name)).await
    }
}

/// The absolute URI hyper-util's client needs: `scheme://endpoint/path`.
fn set_absolute_uri(
    req: &mut Request<RequestBody>,
    scheme: http::uri::Scheme,
    target: SocketAddr,
) -> Result<(), ProxyError> {
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(scheme);
    // A socket address always renders as a valid authority.
    parts.authority = Some(
        http::uri::Authority::try_from(target.to_string())
            .map_err(|e| ProxyError::with_cause(ErrorKind::Internal, e))?,
    );
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| ProxyError::with_cause(ErrorKind::Internal, e))?;
    Ok(())
}

fn classify_legacy_error(error: hyper_util::client::legacy::Error) -> ProxyError {
    if let Some(fault) = ClientBodyError::find(&error) {
        return ProxyError::with_cause(fault.kind(), error);
    }
    let mut timed_out = false;
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&error);
    while let Some(inner) = source {
        if inner
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            timed_out = true;
            break;
        }
        source = inner.source();
    }
    let kind = match (error.is_connect(), timed_out) {
        (_, true) => ErrorKind::UpstreamTimeout,
        (true, false) => ErrorKind::UpstreamConnect,
        (false, false) => ErrorKind::UpstreamProtocol,
    };
    ProxyError::with_cause(kind, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback listener whose accept queue is full: the kernel drops further SYNs, so a
    /// connect to it waits (retransmitting) instead of completing or failing.
    async fn unanswered_listener() -> (socket2::Socket, SocketAddr, Vec<tokio::net::TcpStream>) {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        socket.listen(0).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let mut queued = Vec::new();
        // Fill the queue: connects complete until one no longer does.
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => queued.push(stream),
                _ => break,
            }
        }
        (socket, addr, queued)
    }

    #[tokio::test]
    async fn a_cancelled_connect_gives_its_pending_slot_back() {
        let (_listener, addr, _queued) = unanswered_listener().await;
        let connecting = Arc::new(AtomicUsize::new(0));
        let client = UpstreamClient::Http1 {
            connect_timeout: Duration::from_secs(30),
            connecting: connecting.clone(),
            max_pending: 1,
            tls: None,
        };
        let target = addr;
        let endpoint = Endpoint::new(&addr.to_string(), 1);
        for _ in 0..3 {
            let send = client.send(&endpoint, target, Request::new(RequestBody::Empty));
            tokio::pin!(send);
            // The caller gives up while the connect waits (a per-try timeout, a client gone).
            tokio::select! {
                outcome = &mut send => panic!("the connect should still be waiting: {:?}", outcome.err().map(|e| e.error.to_string())),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            assert_eq!(
                connecting.load(Ordering::Relaxed),
                1,
                "the waiting connect holds the one slot"
            );
        }
        // Each cancelled connect gave its slot back: none is left held, and the pool is not
        // answered `upstream_overloaded` forever after.
        assert_eq!(connecting.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn pending_connects_are_bounded_and_freed_on_drop() {
        let connecting = AtomicUsize::new(0);
        let first = PendingConnect::take(&connecting, 2).unwrap();
        let second = PendingConnect::take(&connecting, 2).unwrap();
        assert!(PendingConnect::take(&connecting, 2).is_none());
        drop(first);
        assert!(PendingConnect::take(&connecting, 2).is_some());
        drop(second);
        assert_eq!(connecting.load(Ordering::Relaxed), 0);
        // 0 = no limit.
        let many: Vec<_> = (0..10).map(|_| PendingConnect::take(&connecting, 0).unwrap()).collect();
        assert_eq!(connecting.load(Ordering::Relaxed), 10);
        drop(many);
        assert_eq!(connecting.load(Ordering::Relaxed), 0);
    }
}
