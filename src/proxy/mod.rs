//! The request pipeline. Every request runs the same named phases, in this order, with one
//! [`RequestCtx`] carried through them (the phase chart is in `docs/architecture.md`):
//!
//! `request_filter → upstream_peer → upstream_request_filter → (exchange) →
//! response_filter → logging`
//!
//! Phases call into modules that know nothing of hyper (router, upstream selection);
//! only this module and the listener touch hyper types.

pub mod body;
mod client;
pub mod deadline;
mod error;
pub mod headers;
mod snapshot;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use tokio::time::Instant;

pub use body::{ProxyBody, RequestBody};
pub use error::{ErrorKind, ErrorSource, ProxyError, error_body, error_response, limit_response, raw_error_response};
pub use snapshot::{ClientCache, Route, Snapshot, UpstreamPool};

use crate::auth::{AuthError, Identity, KeyTable};
use crate::config::{self, Config, ConfigErrors, HashKey, UpstreamProtocol};
use crate::limits::{LimitStatus, PlanLimits, PlanTable};
use crate::listener::ConnPhase;
use crate::metrics::Metrics;
use crate::state::{StateBackend, StateData};
use crate::upstream::{InflightGuard, Target};
use crate::usage::flush::{Retention, Usage};
use crate::usage::{Charge, SubjectRef};

/// State shared by every worker: the live configuration snapshot and the metrics.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    /// API keys for the request path; rebuilt from `store` at start, updated per write.
    pub keys: KeyTable,
    pub store: Arc<dyn StateBackend>,
    /// The backend's contents as last written, for the admin API; never used per request.
    /// Its plans are the stored ones; [`Gateway::plans`] merges them with the file's.
    pub state: tokio::sync::Mutex<StateData>,
    /// Plans compiled for the request path.
    plans: ArcSwap<PlanTable>,
    /// How many live nodes share each plan's rate limit (`[cluster] divide_rate`).
    rate_share: std::sync::atomic::AtomicU32,
    pub usage: Arc<Usage>,
    clients: ClientCache,
    workers: usize,
    ready: AtomicBool,
    reload_lock: tokio::sync::Mutex<()>,
}

impl Gateway {
    /// Compiles `config` and resolves its host-name endpoints.
    pub async fn new(
        config: Config,
        metrics: Arc<Metrics>,
        workers: usize,
        store: Arc<dyn StateBackend>,
        clock: crate::limits::window::Clock,
    ) -> Result<Arc<Gateway>, crate::state::StateError> {
        let clients = ClientCache::default();
        let snapshot = Snapshot::build(Arc::new(config), None, &metrics, &clients, workers);
        snapshot.resolve_new_endpoints().await;
        crate::auth::jwks_fetch::refresh(&snapshot.jwt, |_| true).await;
        let loader = store.clone();
        let data = tokio::task::spawn_blocking(move || loader.load())
            .await
            .map_err(|e| crate::state::StateError::Backend(e.to_string()))??;
        let source = store.clone();
        // Keys stream from the backend into the table; they are never all held twice.
        let (keys, data) = tokio::task::spawn_blocking(move || {
            let keys = KeyTable::default();
            keys.load(&data, DEFAULT_PLAN, |add| source.for_each_key(add))
                .map(|()| (keys, data))
        })
        .await
        .map_err(|e| crate::state::StateError::Backend(e.to_string()))??;
        let days = |d: std::time::Duration| (d.as_secs() / 86_400) as u32;
        let node = snapshot
            .config
            .cluster
            .as_ref()
            .map_or_else(|| LOCAL_NODE.to_string(), |c| c.node_name());
        let usage = Arc::new(Usage::new(
            node,
            clock,
            store.clone(),
            metrics.clone(),
            Retention {
                key_days: days(snapshot.config.usage.retention),
                anonymous_days: days(snapshot.config.usage.anonymous_retention),
            },
        ));
        let plans = plan_table(&snapshot.config, &data, &metrics, 1);
        usage
            .table
            .set_anonymous_month(plans.get(&snapshot.config.anonymous.plan).tracks_month());
        let restoring = usage.clone();
        let restored = tokio::task::spawn_blocking(move || restoring.restore())
            .await
            .map_err(|e| crate::state::StateError::Backend(e.to_string()))??;
        tracing::info!(
            slots = restored,
            subjects = usage.table.len(),
            "usage counters restored"
        );
        Ok(Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(snapshot),
            plans: ArcSwap::from_pointee(plans),
            rate_share: std::sync::atomic::AtomicU32::new(1),
            usage,
            metrics,
            keys,
            store,
            state: tokio::sync::Mutex::new(data),
            clients,
            workers,
            ready: AtomicBool::new(false),
            reload_lock: tokio::sync::Mutex::new(()),
        }))
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Every plan: the file's, overridden by stored ones of the same name.
    pub fn effective_plans(&self, data: &StateData) -> std::collections::BTreeMap<String, crate::state::Plan> {
        effective_plans(&self.snapshot().config, data)
    }

    /// Recompiles the request path's plans after a plan write or a reload; applies to the
    /// next request, and usage counts are untouched.
    pub fn rebuild_plans(&self, data: &StateData) {
        let snapshot = self.snapshot();
        let share = self.rate_share.load(Ordering::Relaxed);
        let table = plan_table(&snapshot.config, data, &self.metrics, share);
        self.usage
            .table
            .set_anonymous_month(table.get(&snapshot.config.anonymous.plan).tracks_month());
        self.plans.store(Arc::new(table));
    }

    /// `[cluster] divide_rate`: each plan's rate limit is shared by `nodes` live nodes from
    /// the next request on.
    pub async fn set_rate_share(&self, nodes: u32) {
        let nodes = nodes.max(1);
        if self.rate_share.swap(nodes, Ordering::Relaxed) != nodes {
            let data = self.state.lock().await;
            self.rebuild_plans(&data);
            tracing::info!(nodes, "rate limits now shared by this many live nodes");
        }
    }

    /// Applies writes made on other nodes (global mode) to this node's tables, and keeps
    /// a copy in `cache` so a restart does not depend on NATS being up.
    pub async fn apply_changes(
        self: Arc<Self>,
        mut changes: tokio::sync::mpsc::UnboundedReceiver<crate::state::StateChange>,
        cache: Arc<crate::state::nats::NatsBackend>,
    ) {
        use crate::state::StateChange;
        // The buckets are watched separately, so a key can arrive before its consumer;
        // it waits here (refused meanwhile) and is applied when the consumer arrives.
        let mut orphans: std::collections::HashMap<String, Vec<crate::state::ApiKey>> = Default::default();
        // Keys reach the disk cache in batches: a replay of the whole bucket (a node that
        // started from its disk attaching) would otherwise be one transaction per key.
        let mut uncached_keys = Vec::new();
        while let Some(change) = changes.recv().await {
            let mut data = self.state.lock().await;
            match change {
                StateChange::Plan(name, plan) => {
                    match plan {
                        Some(plan) => {
                            let cached = plan.clone();
                            let cache = cache.clone();
                            let _ = tokio::task::spawn_blocking(move || cache.local().put_plan(&cached)).await;
                            data.plans.insert(name, plan);
                        }
                        None => {
                            data.plans.remove(&name);
                        }
                    }
                    self.rebuild_plans(&data);
                }
                StateChange::Consumer(id, consumer) => {
                    let plan_changed = data.consumers.get(&id).map(|c| &c.plan) != consumer.as_ref().map(|c| &c.plan);
                    let existed = data.consumers.contains_key(&id);
                    match &consumer {
                        Some(consumer) => {
                            data.consumers.insert(id.clone(), consumer.clone());
                        }
                        None => {
                            data.consumers.remove(&id);
                        }
                    }
                    let store = self.store.clone();
                    let cached = consumer.clone();
                    let owner = id.clone();
                    let cache = cache.clone();
                    let keys = tokio::task::spawn_blocking(move || {
                        let _ = match &cached {
                            Some(consumer) => cache.local().cache_consumer(consumer),
                            None => cache.local().uncache_consumer(&owner),
                        };
                        // Keys follow their consumer's plan (and die with it).
                        if existed && plan_changed {
                            store.consumer_keys(&owner).ok()
                        } else {
                            None
                        }
                    })
                    .await
                    .ok()
                    .flatten();
                    for key in keys.unwrap_or_default() {
                        self.keys.upsert(&key, &data, DEFAULT_PLAN);
                    }
                    // Waiting keys are applied when their consumer arrives, dropped when it
                    // is deleted (they stay refused either way until then).
                    for key in orphans.remove(&id).unwrap_or_default() {
                        if consumer.is_some() {
                            self.keys.upsert(&key, &data, DEFAULT_PLAN);
                        }
                    }
                }
                StateChange::Key(key) => {
                    self.keys.upsert(&key, &data, DEFAULT_PLAN);
                    if !data.consumers.contains_key(&key.consumer) {
                        orphans.entry(key.consumer.clone()).or_default().push(key.clone());
                    }
                    uncached_keys.push(key);
                }
            }
            drop(data);
            if !uncached_keys.is_empty() && (changes.is_empty() || uncached_keys.len() >= 1_000) {
                let keys = std::mem::take(&mut uncached_keys);
                let cache = cache.clone();
                let _ = tokio::task::spawn_blocking(move || cache.local().cache_keys(&keys)).await;
            }
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Reads the configuration file again and swaps it in when valid. An invalid file is
    /// rejected with all its errors and the running configuration stays.
    pub async fn reload(&self) -> Result<(), ConfigErrors> {
        let _serialized = self.reload_lock.lock().await;
        let current = self.snapshot();
        let result = config::load(&current.config.path);
        let config = match result {
            Ok(config) => config,
            Err(errors) => {
                self.metrics.reload(false);
                tracing::warn!(errors = %errors, "configuration reload rejected; keeping the running configuration");
                return Err(errors);
            }
        };
        if config.listen != current.config.listen || config.admin_listen != current.config.admin_listen {
            tracing::warn!("listen addresses changed; they take effect on restart only");
        }
        let next = Snapshot::build(
            Arc::new(config),
            Some(&current),
            &self.metrics,
            &self.clients,
            self.workers,
        );
        next.resolve_new_endpoints().await;
        self.snapshot.store(Arc::new(next));
        self.rebuild_plans(&*self.state.lock().await);
        self.metrics.reload(true);
        tracing::info!("configuration reloaded");
        Ok(())
    }
}

/// The plan of keys whose consumer has none and that name none themselves.
pub const DEFAULT_PLAN: &str = "default";

/// This node's slot name in usage counters until nodes are named by `[cluster]`.
pub const LOCAL_NODE: &str = "local";

fn effective_plans(config: &Config, data: &StateData) -> std::collections::BTreeMap<String, crate::state::Plan> {
    let mut plans = data.plans.clone();
    for (name, plan) in &config.plans {
        plans.entry(name.clone()).or_insert_with(|| crate::state::Plan {
            name: name.clone(),
            rate_per_second: plan.rate.as_ref().map(|r| r.per_second),
            burst: plan.rate.as_ref().and_then(|r| r.burst),
            daily: plan.daily,
            monthly: plan.monthly,
            groups: plan.groups.clone(),
        });
    }
    plans
}

fn plan_table(config: &Config, data: &StateData, metrics: &Metrics, rate_share: u32) -> PlanTable {
    let plans = effective_plans(config, data);
    PlanTable::new(
        plans
            .values()
            .map(|plan| PlanLimits::from_plan(plan, rate_share, metrics.plan(&plan.name))),
        metrics.plan(crate::limits::UNDEFINED_PLAN),
    )
}

/// Where the caller's API key was found, so it can be removed before proxying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Header,
    Bearer,
    Query,
}

/// What the connection knows about itself, shared by its requests.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's IP rendered once, for `X-Forwarded-For`.
    pub peer_ip: HeaderValue,
    /// Present on HTTP/1 connections guarded by the listener's head reader.
    pub phase: Option<Arc<ConnPhase>>,
}

/// Per-request state carried through the phases.
pub struct RequestCtx {
    pub request_id: HeaderValue,
    pub start: Instant,
    pub client_addr: SocketAddr,
    /// The socket peer (or PROXY-protocol source) rendered once, for `X-Forwarded-For`.
    pub peer_ip: HeaderValue,
    /// The `Host` the client asked for (header, or authority on HTTP/2).
    pub host: Option<HeaderValue>,
    /// Index into `Snapshot::routes` once `request_filter` matched one.
    pub route: Option<usize>,
    pub upstream_addr: Option<SocketAddr>,
    pub error: Option<ErrorKind>,
    pub upgrade: bool,
    pub identity: Option<Identity>,
    pub key_source: Option<KeySource>,
    /// The client after trusted proxies (`server.trusted_proxies`) are looked through.
    pub caller_ip: std::net::IpAddr,
    /// Served on the anonymous plan, charged to `caller_ip` and `referer_host`.
    pub anonymous: bool,
    pub referer_host: Option<String>,
    /// The limit closest to exhaustion, for the `RateLimit` headers.
    pub limit: Option<LimitStatus>,
    /// Seconds, on a 429.
    pub retry_after: Option<u64>,
}

/// The endpoint chosen for one try.
pub struct Peer {
    pub target: Target,
    pub guard: InflightGuard,
    /// The endpoint's place in its pool (retries skip it) and whether this try is a
    /// half-open breaker's probe.
    pub index: usize,
    pub probe: bool,
}

impl Peer {
    /// Takes the endpoint's next address and counts the try in its in-flight load.
    fn new(selected: crate::upstream::Selected, ctx: &mut RequestCtx) -> Option<Peer> {
        let target = selected.endpoint.target()?;
        ctx.upstream_addr = Some(target.addr);
        Some(Peer {
            guard: InflightGuard::new(selected.endpoint),
            target,
            index: selected.index,
            probe: selected.probe,
        })
    }
}

fn bit(index: usize) -> u64 {
    if index < 64 { 1 << index } else { 0 }
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

/// One worker's handle on the pipeline; `id` selects the worker's upstream clients.
#[derive(Clone)]
pub struct Worker {
    pub gateway: Arc<Gateway>,
    pub id: usize,
}

impl Worker {
    /// Runs a request through every phase. Never fails: errors become JSON responses.
    pub async fn handle(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<ProxyBody> {
        let snapshot = self.gateway.snapshot();
        let mut ctx = RequestCtx {
            request_id: headers::request_id(req.headers()),
            start: Instant::now(),
            client_addr: conn.peer,
            peer_ip: conn.peer_ip.clone(),
            host: None,
            route: None,
            upstream_addr: None,
            error: None,
            upgrade: false,
            identity: None,
            key_source: None,
            caller_ip: conn.peer.ip(),
            anonymous: false,
            referer_host: None,
            limit: None,
            retry_after: None,
        };
        let mut response = match self.proxy(&snapshot, &mut ctx, req).await {
            Ok(response) => response,
            Err(error) => self.fail_to_proxy(&snapshot, &mut ctx, error),
        };
        self.response_filter(&mut ctx, &mut response);
        if let Some(phase) = &conn.phase {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                phase.upgraded();
            } else {
                response.body_mut().set_finished_signal(phase.clone());
            }
        }
        self.logging(&snapshot, &ctx, response.status());
        response
    }

    async fn proxy(
        &self,
        snapshot: &Snapshot,
        ctx: &mut RequestCtx,
        mut req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let route = self.request_filter(snapshot, ctx, &req)?;
        let upstream = &route.upstream;
        let pool = &upstream.pool;
        let _slot = pool
            .acquire()
            .ok_or_else(|| ProxyError::new(ErrorKind::UpstreamOverloaded))?;
        pool.earn_retry_budget();
        let mut tried = 0u64;
        let mut peer = self.upstream_peer(upstream, ctx, &req, tried)?;
        let client_upgrade = ctx.upgrade.then(|| hyper::upgrade::on(&mut req));
        self.upstream_request_filter(&snapshot.anonymous_plan, route, ctx, &mut req, &peer)?;
        // A request without a body whose method may be repeated can be sent again after it
        // reached an endpoint; keep its head for that. Others are retried only when none of
        // them was written (a failed connect).
        let repeatable = pool.retries.attempts > 0
            && client_upgrade.is_none()
            && hyper::body::Body::is_end_stream(req.body())
            && pool.idempotent(req.method());
        let head = repeatable.then(|| copy_head(&req));
        let mut req = req.map(RequestBody::Client);

        let timeouts = &pool.timeouts;
        let total_deadline = timeouts.total.map(|t| ctx.start + t);
        let per_try = pool.retries.per_try_timeout.unwrap_or(timeouts.read);
        let client = &upstream.clients[self.id % upstream.clients.len()];
        let mut attempt = 0;
        loop {
            // `read` counts from handing the request to the pool, so it includes a connect when
            // no idle connection exists; the connector enforces `connect` on its own.
            let head_deadline = Instant::now() + per_try;
            let head_deadline = total_deadline.map_or(head_deadline, |t| t.min(head_deadline));
            let outcome = tokio::time::timeout_at(head_deadline, client.send(&peer.target, req)).await;
            // What to answer if this try is the last, and what to send if it is not. Unwritten
            // requests may go elsewhere whatever their method; written ones only when
            // repeatable (no body, idempotent) — a streamed body is never replayed.
            let (last_answer, again) = match outcome {
                Ok(Ok((response, pooled))) => {
                    let status = response.status();
                    pool.record(peer.guard.endpoint(), peer.probe, !status.is_server_error());
                    let again = (status.is_server_error() && pool.retries.on_statuses.contains(&status.as_u16()))
                        .then(|| head.as_ref().map(copy_head))
                        .flatten();
                    (Ok((response, pooled)), again)
                }
                Ok(Err(failed)) => {
                    pool.record(peer.guard.endpoint(), peer.probe, false);
                    (
                        Err(failed.error),
                        failed.unsent.or_else(|| head.as_ref().map(copy_head)),
                    )
                }
                Err(_) => {
                    pool.record(peer.guard.endpoint(), peer.probe, false);
                    (
                        Err(ProxyError::new(ErrorKind::UpstreamTimeout)),
                        head.as_ref().map(copy_head),
                    )
                }
            };
            let retry = match again {
                Some(request) if attempt < pool.retries.attempts => self
                    .retry_peer(upstream, ctx, tried | bit(peer.index))
                    .map(|next| (request, next)),
                _ => None,
            };
            let Some((mut request, next)) = retry else {
                let (mut response, pooled) = last_answer?;
                if response.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(client_upgrade) = client_upgrade
                {
                    let upstream_upgrade = hyper::upgrade::on(&mut response);
                    tokio::spawn(tunnel(client_upgrade, upstream_upgrade, peer.guard));
                    return Ok(response.map(|_| ProxyBody::empty()));
                }
                return Ok(
                    response.map(|body| ProxyBody::upstream(body, timeouts.read, total_deadline, peer.guard, pooled))
                );
            };
            match &last_answer {
                Ok((response, _)) => {
                    tracing::debug!(upstream = %pool.name, status = response.status().as_u16(), "retrying on another endpoint")
                }
                Err(error) => tracing::debug!(upstream = %pool.name, %error, "retrying on another endpoint"),
            }
            tried |= bit(peer.index);
            peer = next;
            if !pool.preserve_host {
                request
                    .headers_mut()
                    .insert(header::HOST, peer.guard.endpoint().host_header.clone());
            }
            req = request;
            attempt += 1;
        }
    }

    /// The endpoint for a retry, if one is left and the pool's retry budget allows it.
    fn retry_peer(&self, upstream: &UpstreamPool, ctx: &mut RequestCtx, tried: u64) -> Option<Peer> {
        let pool = &upstream.pool;
        let selected = pool.select_healthy(None, tried)?;
        let allowed = pool.spend_retry_budget();
        pool.metrics.record_retry(allowed);
        if !allowed {
            return None;
        }
        Peer::new(selected, ctx)
    }

    /// Phase 1, first for every request: finds the route, identifies the caller and applies
    /// the plan's limits; any of them may answer at once by returning an error.
    fn request_filter<'s>(
        &self,
        snapshot: &'s Snapshot,
        ctx: &mut RequestCtx,
        req: &Request<Incoming>,
    ) -> Result<&'s Route, ProxyError> {
        ctx.host = match req.headers().get(header::HOST) {
            Some(host) => Some(host.clone()),
            None => req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        let host = ctx.host.as_ref().and_then(|h| h.to_str().ok());
        let index = snapshot
            .router
            .find(host, req.method().as_str(), req.uri().path())
            .ok_or_else(|| ProxyError::new(ErrorKind::RouteNotFound))?;
        ctx.route = Some(index);
        ctx.upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade_request(req.headers());
        let route = snapshot
            .routes
            .get(index)
            .ok_or_else(|| ProxyError::new(ErrorKind::Internal))?;
        let trusted = &snapshot.config.trusted_proxies;
        if !trusted.is_empty() {
            let forwarded = req
                .headers()
                .get(&headers::X_FORWARDED_FOR)
                .and_then(|v| v.to_str().ok());
            ctx.caller_ip = crate::auth::client_ip(ctx.client_addr.ip(), forwarded, trusted);
        }
        let presented = if route.api_key { find_api_key(req) } else { None };
        // A bearer value that is not one of our keys is a JWT on routes that take them.
        let token = match presented {
            Some((value, KeySource::Bearer)) if route.jwt && !value.starts_with(crate::auth::KEY_PREFIX) => Some(value),
            None if route.jwt => bearer(req),
            _ => None,
        };
        if let Some(token) = token {
            let identity = snapshot
                .jwt
                .verify(token, DEFAULT_PLAN)
                .map_err(|e| ProxyError::new(ErrorKind::InvalidToken(e.reason())))?;
            ctx.identity = Some(identity);
            ctx.key_source = Some(KeySource::Bearer);
            return Ok(route);
        }
        match presented {
            // A key that is presented must be valid, even where anonymous calls are allowed.
            Some((key, source)) => {
                let identity =
                    crate::auth::authenticate(&self.gateway.keys, Some(key), &route.name, crate::auth::unix_now())
                        .map_err(|e| match e {
                            // Created elsewhere and not seen here yet: it may be valid.
                            AuthError::InvalidApiKey if !self.gateway.store.available() => {
                                ProxyError::new(ErrorKind::StateUnavailable)
                            }
                            e => ProxyError::new(auth_error_kind(e)),
                        })?;
                ctx.identity = Some(identity);
                ctx.key_source = Some(source);
            }
            None if route.anonymous => {
                ctx.anonymous = true;
                if snapshot
                    .config
                    .anonymous
                    .by
                    .contains(&crate::config::AnonymousBy::Referer)
                {
                    ctx.referer_host = req
                        .headers()
                        .get(header::REFERER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(crate::auth::referer_host);
                }
            }
            None if route.api_key || route.jwt => return Err(ProxyError::new(ErrorKind::MissingCredentials)),
            None => {}
        }
        self.limit_filter(snapshot, route, ctx)?;
        Ok(route)
    }

    /// Charges the request to its subjects under the caller's plan: the key (or JWT
    /// consumer), or the client IP and Referer host of an anonymous caller. Refuses with
    /// 429 when a rate limit or quota is exhausted; nothing is charged then.
    fn limit_filter(&self, snapshot: &Snapshot, route: &Route, ctx: &mut RequestCtx) -> Result<(), ProxyError> {
        let usage = &self.gateway.usage;
        let plans = self.gateway.plans.load();
        let now = usage.clock.now();
        let (plan, outcome) = if let Some(identity) = &ctx.identity {
            let plan = plans.get(&identity.plan);
            let charge = Charge {
                subject: SubjectRef::Key(&identity.key_id),
                consumer: Some(&identity.consumer_id),
                route: Some(&route.name),
            };
            let group = plan.group(route.group.as_deref());
            (plan, usage.table.admit(&[charge], plan, group, now))
        } else if ctx.anonymous {
            let plan = plans.get(&snapshot.config.anonymous.plan);
            let ip = snapshot.anonymous_by_ip.then_some(SubjectRef::Ip(ctx.caller_ip));
            let referer = ctx.referer_host.as_deref().map(SubjectRef::Referer);
            let charge = |subject| Charge {
                subject,
                consumer: None,
                route: None,
            };
            let (one, two);
            let charges: &[Charge<'_>] = match (ip, referer) {
                (Some(ip), Some(referer)) => {
                    two = [charge(ip), charge(referer)];
                    &two
                }
                (Some(subject), None) | (None, Some(subject)) => {
                    one = [charge(subject)];
                    &one
                }
                (None, None) => &[],
            };
            let group = plan.group(route.group.as_deref());
            (plan, usage.table.admit(charges, plan, group, now))
        } else {
            return Ok(());
        };
        plan.decisions.record(outcome.as_ref().map(|_| ()).map_err(|r| r.kind));
        match outcome {
            Ok(status) => {
                ctx.limit = status;
                Ok(())
            }
            Err(rejection) => {
                ctx.limit = Some(rejection.status.clone());
                ctx.retry_after = Some(rejection.retry_after);
                Err(ProxyError::limited(rejection))
            }
        }
    }

    /// Phase 2: picks the endpoint by the pool's policy among those health allows; none
    /// left → `503` at once, without waiting on timeouts.
    fn upstream_peer(
        &self,
        upstream: &UpstreamPool,
        ctx: &mut RequestCtx,
        req: &Request<Incoming>,
        tried: u64,
    ) -> Result<Peer, ProxyError> {
        let client_ip;
        let hash: Option<&[u8]> = match &upstream.pool.hash_key {
            None => None,
            Some(HashKey::ClientIp) => {
                client_ip = ctx.caller_ip.to_string();
                Some(client_ip.as_bytes())
            }
            Some(HashKey::Header(name)) => req.headers().get(name.as_str()).map(HeaderValue::as_bytes),
        };
        upstream
            .pool
            .select_healthy(hash, tried)
            .and_then(|selected| Peer::new(selected, ctx))
            .ok_or_else(|| ProxyError::new(ErrorKind::NoEndpoint))
    }

    /// Phase 3: turns the client's request into the upstream's: URI, `Host`, forwarding
    /// headers, request id; hop-by-hop headers removed.
    fn upstream_request_filter(
        &self,
        anonymous_plan: &HeaderValue,
        route: &Route,
        ctx: &RequestCtx,
        req: &mut Request<Incoming>,
        peer: &Peer,
    ) -> Result<(), ProxyError> {
        let pool = &route.upstream.pool;
        let key_in_query = ctx.key_source == Some(KeySource::Query);
        let path_and_query = if route.strip_prefix || key_in_query {
            let path = if route.strip_prefix {
                crate::router::strip_route_prefix(&route.path, req.uri().path())
            } else {
                req.uri().path()
            };
            let query = req
                .uri()
                .query()
                .map(|q| {
                    if key_in_query {
                        without_api_key(q)
                    } else {
                        q.to_string()
                    }
                })
                .filter(|q| !q.is_empty());
            let rewritten = match query {
                Some(query) => format!("{path}?{query}"),
                None => path.to_string(),
            };
            PathAndQuery::try_from(rewritten).map_err(|e| ProxyError::with_cause(ErrorKind::BadRequest, e))?
        } else {
            req.uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"))
        };
        // Origin-form; the HTTP/2 client adds scheme and authority itself.
        *req.uri_mut() = Uri::from(path_and_query);
        *req.version_mut() = match pool.protocol {
            UpstreamProtocol::Http1 => Version::HTTP_11,
            UpstreamProtocol::Http2 => Version::HTTP_2,
        };

        let headers = req.headers_mut();
        headers::remove_hop_by_hop(headers, ctx.upgrade);
        let host = if pool.preserve_host { ctx.host.clone() } else { None };
        match host {
            Some(host) => headers.insert(header::HOST, host),
            None => headers.insert(header::HOST, peer.guard.endpoint().host_header.clone()),
        };
        if let Some(host) = &ctx.host {
            headers.insert(&headers::X_FORWARDED_HOST, host.clone());
        }
        headers::append_forwarded_for(headers, &ctx.peer_ip);
        // The caller as Tollgate identified it (after trusted proxies and PROXY protocol).
        let real_ip = if ctx.caller_ip == ctx.client_addr.ip() {
            ctx.peer_ip.clone()
        } else {
            headers::ip_header_value(ctx.caller_ip)
        };
        headers.insert(&headers::X_REAL_IP, real_ip);
        headers.insert(&headers::X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        headers.insert(&headers::X_REQUEST_ID, ctx.request_id.clone());
        // The caller's credentials never reach the upstream; who they are does.
        match ctx.key_source {
            Some(KeySource::Header) => drop(headers.remove(&headers::X_API_KEY)),
            Some(KeySource::Bearer) => drop(headers.remove(header::AUTHORIZATION)),
            Some(KeySource::Query) | None => {}
        }
        headers.remove(&headers::X_CONSUMER_ID);
        headers.remove(&headers::X_PLAN);
        if ctx.anonymous {
            headers.insert(&headers::X_PLAN, anonymous_plan.clone());
        }
        if let Some(identity) = &ctx.identity {
            if let Ok(value) = HeaderValue::from_str(&identity.consumer_id) {
                headers.insert(&headers::X_CONSUMER_ID, value);
            }
            if let Ok(value) = HeaderValue::from_str(&identity.plan) {
                headers.insert(&headers::X_PLAN, value);
            }
        }
        Ok(())
    }

    /// Phase 4: edits the response head for the client: hop-by-hop headers removed
    /// (kept on a protocol switch) and `X-Request-Id` set.
    fn response_filter(&self, ctx: &mut RequestCtx, response: &mut Response<ProxyBody>) {
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers::remove_hop_by_hop(headers, switching);
        headers.insert(&headers::X_REQUEST_ID, ctx.request_id.clone());
        if let Some(status) = &ctx.limit {
            headers::insert_rate_limit(headers, status, ctx.retry_after);
        }
    }

    /// Phase 5, last for every request: records metrics and the access log event.
    fn logging(&self, snapshot: &Snapshot, ctx: &RequestCtx, status: StatusCode) {
        let elapsed = ctx.start.elapsed();
        let route = ctx.route.and_then(|i| snapshot.routes.get(i));
        let metrics = route.map_or(&snapshot.no_route_metrics, |r| &r.metrics);
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
    fn fail_to_proxy(&self, snapshot: &Snapshot, ctx: &mut RequestCtx, error: ProxyError) -> Response<ProxyBody> {
        ctx.error = Some(error.kind);
        match error.kind.source() {
            ErrorSource::Upstream => {
                if let Some(route) = ctx.route.and_then(|i| snapshot.routes.get(i)) {
                    route.upstream.pool.metrics.record_error(error.kind);
                }
                tracing::warn!(request_id = ?ctx.request_id, upstream = ?ctx.upstream_addr, %error, "upstream request failed");
            }
            ErrorSource::Internal => tracing::error!(request_id = ?ctx.request_id, %error, "internal error"),
            ErrorSource::Client => tracing::debug!(request_id = ?ctx.request_id, %error, "request refused"),
        }
        match &error.rejection {
            Some(rejection) => limit_response(error.kind, rejection, self.gateway.usage.clock.now(), &ctx.request_id),
            None => error_response(error.kind, &ctx.request_id),
        }
    }
}

/// Copies bytes both ways between an upgraded client connection and the upstream one.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade, _inflight: InflightGuard) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%error, "protocol switch failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%error, "upgraded connection closed with error");
    }
}

/// The caller's API key: `X-API-Key`, then `Authorization: Bearer`, then query `api-key`/`api_key`.
fn find_api_key(req: &Request<Incoming>) -> Option<(&str, KeySource)> {
    if let Some(key) = req.headers().get(&headers::X_API_KEY).and_then(|v| v.to_str().ok()) {
        return Some((key.trim(), KeySource::Header));
    }
    if let Some(key) = bearer(req) {
        return Some((key, KeySource::Bearer));
    }
    req.uri()
        .query()?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == "api-key" || *name == "api_key")
        .map(|(_, key)| (key, KeySource::Query))
}

fn bearer(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The query string without `api-key`/`api_key` parameters.
fn without_api_key(query: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
            name != "api-key" && name != "api_key"
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn auth_error_kind(error: AuthError) -> ErrorKind {
    match error {
        AuthError::MissingCredentials => ErrorKind::MissingCredentials,
        AuthError::InvalidApiKey => ErrorKind::InvalidApiKey,
        AuthError::KeyRevoked => ErrorKind::KeyRevoked,
        AuthError::KeyExpired => ErrorKind::KeyExpired,
        AuthError::RouteNotAllowed => ErrorKind::RouteNotAllowed,
    }
}
