//! Listeners and workers, NGINX-style: one thread per worker, each with its own
//! current-thread tokio runtime and its own `SO_REUSEPORT` socket per listen address, so
//! the kernel spreads connections and a connection never leaves its thread.

mod fast;
pub mod framing;
mod guard;
mod limits;
pub mod proxy_protocol;
mod refusal;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;

pub use guard::{GuardedStream, HeadLimits, ParkSlot, Transport};
pub use limits::{ClientConnections, WorkerConnections};

use crate::base::{ConnPhase, ConnStreams, ErrorKind, new_request_id, raw_error_response, stopped};

use crate::gateway::Gateway;
use crate::metrics::{ConnectionGuard, Protection};
use crate::proxy::{ConnInfo, Worker};
use crate::tls::ServerTls;

/// The proxy's sockets: for each worker, its own `SO_REUSEPORT` socket per address
/// (flagged when it speaks TLS), and the addresses bound.
pub struct Bound {
    pub per_worker: Vec<Vec<(std::net::TcpListener, bool)>>,
    pub plain: Vec<SocketAddr>,
    pub tls: Vec<SocketAddr>,
}

/// Binds `workers` sockets per address with `SO_REUSEPORT`. Port 0 is resolved by the first
/// bind and reused for the rest, so all workers share one port.
pub fn bind(plain: &[SocketAddr], tls: &[SocketAddr], workers: usize) -> std::io::Result<Bound> {
    let mut bound = Bound {
        per_worker: (0..workers).map(|_| Vec::new()).collect(),
        plain: Vec::new(),
        tls: Vec::new(),
    };
    for (addr, is_tls) in plain.iter().map(|a| (a, false)).chain(tls.iter().map(|a| (a, true))) {
        let mut actual = *addr;
        for listeners in bound.per_worker.iter_mut() {
            let listener = reuseport_listener(actual)?;
            actual = listener.local_addr()?;
            listeners.push((listener, is_tls));
        }
        if is_tls {
            bound.tls.push(actual);
        } else {
            bound.plain.push(actual);
        }
    }
    Ok(bound)
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Starts one worker thread per entry of `listeners`. Each stops accepting when `shutdown`
/// turns true, then lets open connections finish for up to `grace`.
pub fn spawn_workers(
    gateway: Arc<Gateway>,
    listeners: Vec<Vec<(std::net::TcpListener, bool)>>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut handles = Vec::new();
    let server = &gateway.snapshot().config.server;
    let per_ip = Arc::new(ClientConnections::new(
        server.max_connections_per_ip,
        server.connections_ipv6_prefix,
    ));
    let max_per_worker = server.max_connections;
    for (id, listeners) in listeners.into_iter().enumerate() {
        let worker = Worker {
            gateway: gateway.clone(),
            id,
        };
        let shutdown = shutdown.clone();
        let counts = Counts {
            per_ip: per_ip.clone(),
            worker: Arc::new(WorkerConnections::new(max_per_worker)),
        };
        let handle = std::thread::Builder::new()
            .name(format!("tollgate-worker-{id}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::error!(%error, "cannot start worker runtime");
                        return;
                    }
                };
                let access_log = worker.gateway.access_log.clone();
                if let Some(log) = &access_log {
                    crate::logs::lane::install(log);
                }
                runtime.block_on(run_worker(worker, listeners, counts, shutdown, grace));
                // Bodies still held by unfinished connections finish their records as the
                // runtime drops them; then the lane goes to the writer.
                drop(runtime);
                crate::logs::lane::close();
            })?;
        handles.push(handle);
    }
    Ok(handles)
}

/// The connection counts a worker's limits are checked against.
#[derive(Clone)]
struct Counts {
    per_ip: Arc<ClientConnections>,
    worker: Arc<WorkerConnections>,
}

async fn run_worker(
    worker: Worker,
    listeners: Vec<(std::net::TcpListener, bool)>,
    counts: Counts,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    // Every connection task holds a clone of `alive`; `recv` returns `None` once all are gone.
    let (alive, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    let mut accept_loops = tokio::task::JoinSet::new();
    if let Some(log) = &worker.gateway.access_log {
        // The worker's records go to the writer at least this often (the most a crash
        // can lose), whatever the traffic.
        let every = log.flush_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                crate::logs::lane::flush();
            }
        });
    }
    for (listener, tls) in listeners {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%error, "cannot register listener");
                continue;
            }
        };
        accept_loops.spawn(accept_loop(
            worker.clone(),
            listener,
            tls,
            counts.clone(),
            shutdown.clone(),
            alive.clone(),
        ));
    }
    while accept_loops.join_next().await.is_some() {}
    drop(alive);
    if tokio::time::timeout(grace, all_closed.recv()).await.is_err() {
        tracing::warn!(
            worker = worker.id,
            "shutdown grace period ended with connections still open"
        );
    }
}

/// What every connection of a worker's listener shares.
struct ConnSettings {
    limits: HeadLimits,
    parking: bool,
    proxy_protocol: bool,
    /// Present on TLS listeners.
    tls: Option<Arc<ServerTls>>,
    /// The port clients connect to, for `X-Forwarded-Port`.
    port: u16,
    builder: auto::Builder<TokioExecutor>,
    counts: Counts,
    max_requests: u64,
    max_premature_resets: u32,
}

impl ConnSettings {
    fn new(config: &crate::config::Config, tls: Option<Arc<ServerTls>>, port: u16, counts: Counts) -> ConnSettings {
        let server = &config.server;
        let limits = HeadLimits {
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            max_header_bytes: server.max_header_bytes,
            park_after: server.park_idle_after,
            send_timeout: server.send_timeout,
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            // The guard enforces header timeouts and limits. Without a timer hyper arms no
            // header timer of its own (it would allocate one per request); its buffer only
            // has to be larger than the guard's limit.
            .max_buf_size((limits.max_header_bytes * 2).max(64 * 1024))
            // One flat buffer per write: 2 % fewer instructions per request than queued
            // vectored writes for API-sized responses (docs/benchmarks.md).
            .writev(false);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes as u32)
            .max_concurrent_streams(server.http2_max_concurrent_streams)
            // Streams reset before the service took them (h2's own rapid-reset guard);
            // those reset after are counted by `ConnStreams`.
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(1024))
            .keep_alive_interval(Some(server.http2_keepalive_interval))
            .keep_alive_timeout(Duration::from_secs(20));
        ConnSettings {
            limits,
            parking: !server.park_idle_after.is_zero(),
            proxy_protocol: server.proxy_protocol,
            tls,
            port,
            builder,
            counts,
            max_requests: server.max_requests_per_connection,
            max_premature_resets: server.http2_max_premature_resets,
        }
    }
}

async fn accept_loop(
    worker: Worker,
    listener: tokio::net::TcpListener,
    tls: bool,
    counts: Counts,
    mut shutdown: watch::Receiver<bool>,
    alive: tokio::sync::mpsc::Sender<()>,
) {
    let port = listener.local_addr().map_or(0, |a| a.port());
    let tls = if tls {
        match worker.gateway.tls.clone() {
            Some(tls) => Some(tls),
            None => {
                tracing::error!("a TLS listener without TLS settings; not accepting");
                return;
            }
        }
    } else {
        None
    };
    let settings = Arc::new(ConnSettings::new(&worker.gateway.snapshot().config, tls, port, counts));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        // At the worker's limit a connection is closed at once: answering would cost what
        // the limit is there to save.
        let Some(slot) = settings.counts.worker.open() else {
            worker.gateway.metrics.protected(Protection::ConnectionsPerWorker);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let held = (worker.gateway.metrics.connection_opened(), alive.clone(), slot);
        tokio::spawn(serve_connection(
            worker.clone(),
            settings.clone(),
            stream,
            peer,
            shutdown.clone(),
            held,
        ));
    }
}

/// One connection, from its PROXY-protocol header (and TLS handshake) to its close.
/// `_held` (the open-connection gauge and the worker's drain count) lives as long as it.
/// Not an `async fn`, for the reason `fast::serve` gives: one copy of the arguments.
#[allow(clippy::manual_async_fn, reason = "an async fn keeps a second copy of its arguments")]
fn serve_connection(
    worker: Worker,
    settings: Arc<ConnSettings>,
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    held: (ConnectionGuard, tokio::sync::mpsc::Sender<()>, limits::WorkerSlot),
) -> impl std::future::Future<Output = ()> {
    async move {
        let _held = held;
        let limits = settings.limits;
        let peer = if settings.proxy_protocol {
            // Boxed: its 536-byte buffer would otherwise stay in every connection's task.
            match Box::pin(proxy_protocol::read_header(&mut stream, limits.header_read_timeout)).await {
                Ok(source) => source.unwrap_or(peer),
                Err(error) => {
                    tracing::debug!(%peer, %error, "connection refused: PROXY protocol");
                    return;
                }
            }
        } else {
            peer
        };
        // Counted after the PROXY header: behind a load balancer the client is its source.
        let Some(_ip_slot) = settings.counts.per_ip.open(peer.ip()) else {
            worker.gateway.metrics.protected(Protection::ConnectionsPerIp);
            tracing::debug!(%peer, "connection refused: max_connections_per_ip");
            if settings.tls.is_none() {
                refuse_connection(stream).await;
            }
            return;
        };
        let Some(tls) = settings.tls.clone() else {
            // Made in the call: a local would keep a copy's room in the task.
            let streams = ConnStreams::new(settings.max_premature_resets);
            return fast::serve(
                worker,
                settings.clone(),
                stream,
                ConnInfo::new(peer, settings.port, false).with_streams(streams),
                shutdown,
            )
            .await;
        };
        // Boxed: the handshake and the rustls state would otherwise make every plain
        // connection's task as large as a TLS one (10,000 idle connections: 46 → 98 MiB).
        Box::pin(serve_tls(worker, settings, stream, peer, tls, shutdown)).await;
    }
}

/// The access log's name of a TLS version.
fn tls_version_name(version: rustls::ProtocolVersion) -> &'static str {
    match version {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        _ => "other",
    }
}

/// Answers a connection over the per-IP limit with a `429` (plain HTTP only) and closes it
/// once the client has read it or after a second.
async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let response = raw_error_response(ErrorKind::TooManyConnections, new_request_id().as_str());
    stream.write_final(&response);
    let mut scratch = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(stream.read(&mut scratch).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// A TLS connection: the handshake within `header_read_timeout`, then HTTP over it.
async fn serve_tls(
    worker: Worker,
    settings: Arc<ConnSettings>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Arc<ServerTls>,
    shutdown: watch::Receiver<bool>,
) {
    let limits = settings.limits;
    // The handshake is part of the request head's time budget.
    // Fallible: a refused handshake gives the socket back, so the failure is counted before
    // it closes and whoever saw the close (the client, a test) also sees the count.
    let handshake = tls.acceptor().accept(stream).into_fallible();
    let accepted = tokio::time::timeout(limits.header_read_timeout, handshake).await;
    tls.handshake_done(matches!(accepted, Ok(Ok(_))));
    match accepted {
        Ok(Ok(stream)) => {
            let mut conn = ConnInfo::new(peer, settings.port, true);
            conn.tls_version = stream.get_ref().1.protocol_version().map(tls_version_name);
            conn.client_identity = crate::tls::client_identity(stream.get_ref().1)
                .and_then(|identity| http::HeaderValue::from_str(&identity).ok());
            conn.streams = ConnStreams::new(settings.max_premature_resets);
            fast::serve(worker, settings, stream, conn, shutdown).await;
        }
        Ok(Err((error, _socket))) => tracing::debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// A connection parked by the general path, handed back to the fast path: its socket, when
/// it closes if no request comes, and what it knows about itself.
type HandedBack<S> = (S, tokio::time::Instant, ConnInfo);

/// HTTP on a ready connection, on the general path: hyper serves it while requests come.
/// Once it is idle for `park_idle_after` it is parked — hyper's state freed — and handed
/// back (`Some`) to the fast path, which waits on its socket. The first head must be
/// complete by `head_deadline`.
async fn serve_http<S: Transport>(
    worker: Worker,
    settings: Arc<ConnSettings>,
    stream: S,
    mut conn: ConnInfo,
    mut shutdown: watch::Receiver<bool>,
    head_deadline: tokio::time::Instant,
) -> Option<HandedBack<S>> {
    let limits = settings.limits;
    let peer = conn.peer;
    let metrics = worker.gateway.metrics.clone();
    let access_log = worker.gateway.access_log.clone();
    let phase = ConnPhase::new();
    conn.phase = Some(phase.clone());
    let conn = Arc::new(conn);
    let max_requests = settings.max_requests;
    let service_conn = conn.clone();
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let handler = worker.clone();
        let conn = service_conn.clone();
        async move {
            let stream = conn.streams.start();
            let http1 = req.version() < http::Version::HTTP_2;
            let response = handler
                .handle(
                    Box::new(req.map(|body| Some(crate::proxy::Inbound::Hyper(body)))),
                    None,
                    &conn,
                )
                .await;
            stream.answered();
            // hyper writes only the map: the upstream's fields as read join it.
            let (mut parts, mut body) = response.into_parts();
            body.merge_upstream_head(&mut parts.headers);
            let mut response = hyper::Response::from_parts(parts, body);
            // NGINX's keepalive_requests: the last request of the connection says so.
            if http1
                && max_requests > 0
                && conn.streams.started() >= max_requests
                && response.status() != http::StatusCode::SWITCHING_PROTOCOLS
            {
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                handler.gateway.metrics.protected(Protection::RequestsPerConnection);
            }
            Ok::<_, Infallible>(response)
        }
    });
    let (park, parked) = park_slot(settings.parking);
    let refusals = access_log.as_ref().map(|log| {
        Box::new(refusal::RefusalLog {
            log: log.clone(),
            client_ip: conn.forwarded.peer_ip().into(),
            tls: conn.tls_version,
        })
    });
    let io =
        GuardedStream::new(stream, phase.clone(), limits, head_deadline, park, metrics.clone()).with_refusals(refusals);
    // Boxed so that a parked connection does not keep room for hyper's state.
    let mut connection = Box::pin(
        settings
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service.clone()),
    );
    // HTTP/1 idle time is the guard's; this closes HTTP/2 connections with no stream
    // open (an h2c preface and nothing more): idle at two looks `idle_timeout` apart
    // with no stream begun in between — no clock read per request.
    let mut idle_check = Box::pin(tokio::time::sleep(limits.idle_timeout));
    let mut last_look = (conn.streams.started(), true);
    let result = loop {
        tokio::select! {
            // The connection first: no random branch order on every wake.
            biased;
            result = connection.as_mut() => break result,
            _ = stopped(&mut shutdown) => {
                // Finish the request in flight (HTTP/2: GOAWAY), then close.
                connection.as_mut().graceful_shutdown();
                break connection.as_mut().await;
            }
            _ = std::future::poll_fn(|cx| conn.streams.poll_abused(cx)) => {
                // Rapid reset: the connection is dropped without finishing anything.
                metrics.protected(Protection::PrematureResets);
                tracing::debug!(%peer, "connection closed: streams reset before their response");
                return None;
            }
            _ = idle_check.as_mut() => {
                let look = (conn.streams.started(), conn.streams.is_idle());
                if look.1 && look == last_look {
                    metrics.protected(Protection::Http2Idle);
                    connection.as_mut().graceful_shutdown();
                    let closing = tokio::time::timeout(Duration::from_secs(5), connection.as_mut()).await;
                    break closing.unwrap_or(Ok(()));
                }
                last_look = look;
                idle_check.as_mut().reset(tokio::time::Instant::now() + limits.idle_timeout);
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with error");
    }
    // hyper's buffers, the service and its hold on the connection's info go now.
    drop(connection);
    drop(idle_check);
    drop(service);
    let (stream, idle_until) = parked?.try_recv().ok()?;
    let mut conn = Arc::try_unwrap(conn).ok()?;
    // The guard that watched the phase is gone; the fast path needs no signal.
    conn.phase = None;
    Some((stream, idle_until, conn))
}

type Parked<S> = tokio::sync::oneshot::Receiver<(S, tokio::time::Instant)>;

fn park_slot<S>(enabled: bool) -> (Option<guard::ParkSlot<S>>, Option<Parked<S>>) {
    if !enabled {
        return (None, None);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    (Some(tx), Some(rx))
}
