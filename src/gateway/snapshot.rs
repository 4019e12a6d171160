//! The runtime tables compiled from one configuration. A reload builds a new
//! [`Snapshot`] and swaps it in atomically; in-flight requests keep the one they started with.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::auth::jwt::JwtVerifier;
use crate::config::{AnonymousBy, AuthMethod, Config, UpstreamProtocol};
use crate::metrics::{Metrics, NO_ROUTE, RouteMetrics};
use crate::router::{EscapedSlashes, PathRules, RouteSpec, Router};
use crate::upstream::client::{LegacyClient, TlsLegacyClient, UpstreamClient};
use crate::upstream::{Endpoint, Pool, UpstreamTls};

/// A route with everything the request path needs resolved to direct references.
pub struct Route {
    pub name: Arc<str>,
    /// `name` needs no escaping in a JSON string (the access log's `route`).
    pub plain_name: bool,
    /// The route group whose plan quotas this route counts against.
    pub group: Option<Arc<str>>,
    pub path: String,
    pub strip_prefix: bool,
    /// Callers may present an API key (and must, unless `anonymous`).
    pub api_key: bool,
    /// Callers without credentials are served on the anonymous plan.
    pub anonymous: bool,
    /// Callers may present a JWT from a configured issuer.
    pub jwt: bool,
    pub upstream: Arc<UpstreamPool>,
    pub metrics: Arc<RouteMetrics>,
    /// `response_headers`: set on every response of the route.
    pub response_headers: Box<[(http::HeaderName, http::HeaderValue)]>,
    /// Largest request body; more is a `413`.
    pub max_body_bytes: u64,
}

/// A pool plus one client per worker thread, so each worker keeps its own keep-alive
/// connections and never contends with another on a pool lock.
pub struct UpstreamPool {
    pub pool: Arc<Pool>,
    pub clients: Box<[UpstreamClient]>,
}

pub struct Snapshot {
    pub config: Arc<Config>,
    pub router: Router,
    pub routes: Vec<Route>,
    pub pools: BTreeMap<String, Arc<UpstreamPool>>,
    pub no_route_metrics: Arc<RouteMetrics>,
    /// `X-Plan` for anonymous callers.
    pub anonymous_plan: http::HeaderValue,
    /// Anonymous requests are charged to the client IP (`[anonymous] by`).
    pub anonymous_by_ip: bool,
    pub jwt: JwtVerifier,
    /// How request paths are normalized before routing (`[server] normalize_path`).
    pub path_rules: PathRules,
    /// `[usage_page]`: the customer usage page, when enabled.
    pub usage_page: Option<UsagePage>,
}

/// The customer usage page (docs/customer-usage.md), compiled.
pub struct UsagePage {
    /// Matched against the normalized request path, before routes.
    pub path: String,
    /// Page views per key.
    pub rate: crate::limits::Gcra,
    pub metrics: Arc<RouteMetrics>,
}

/// The metrics label of the customer usage page's requests.
pub const USAGE_PAGE_ROUTE: &str = "(usage_page)";

/// HTTP/2 clients are keyed by worker and connect timeout, and kept across reloads so a
/// reload does not drop warm upstream connections. (HTTP/1.1 pools are per worker thread
/// and survive reloads by construction.)
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ClientKey {
    worker: usize,
    connect_timeout: Duration,
}

#[derive(Default)]
pub struct ClientCache {
    // Locked only while a snapshot is built.
    clients: Mutex<HashMap<ClientKey, LegacyClient>>,
}

impl ClientCache {
    fn http2(&self, key: ClientKey) -> LegacyClient {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(key)
            .or_insert_with(|| http2_builder().build(http_connector(key.connect_timeout)))
            .clone()
    }

    /// HTTP/2 over TLS for one pool: built with the pool (its TLS settings are its own),
    /// and so replaced by a reload.
    fn http2_tls(tls: &UpstreamTls, first: Option<&Endpoint>, connect_timeout: Duration) -> TlsLegacyClient {
        // hyper-rustls sets ALPN itself (`enable_http2`) and refuses settings that have one.
        let mut config = (*tls.config).clone();
        config.alpn_protocols.clear();
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only();
        // One name for the pool's connections: the override, else the first endpoint's host.
        let builder = match first.and_then(|e| tls.name_for(e)) {
            Some(name) => builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name)),
            None => builder,
        };
        let connector = builder.enable_http2().wrap_connector(http_connector(connect_timeout));
        http2_builder().build(connector)
    }
}

fn http_connector(connect_timeout: Duration) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    // hyper-rustls hands `https` URIs to this connector.
    connector.enforce_http(false);
    connector
}

fn http2_builder() -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .http2_only(true);
    builder
}

impl Snapshot {
    /// Compiles `config`. Endpoints of `previous` with the same address are reused.
    pub fn build(
        config: Arc<Config>,
        previous: Option<&Snapshot>,
        metrics: &Metrics,
        clients: &ClientCache,
        workers: usize,
    ) -> Snapshot {
        let mut pools = BTreeMap::new();
        for (name, section) in &config.upstreams {
            let old = previous.and_then(|p| p.pools.get(name)).map(|p| p.pool.as_ref());
            let pool = Arc::new(Pool::from_config(name, section, old, metrics.upstream(name)));
            let clients = (0..workers)
                .map(|worker| match (pool.protocol, &pool.tls) {
                    (UpstreamProtocol::Http1, tls) => UpstreamClient::Http1 {
                        connect_timeout: pool.timeouts.connect,
                        connecting: Default::default(),
                        max_pending: pool.max_pending_connections,
                        tls: tls.clone(),
                    },
                    (UpstreamProtocol::Http2, None) => UpstreamClient::Http2(Box::new(clients.http2(ClientKey {
                        worker,
                        connect_timeout: pool.timeouts.connect,
                    }))),
                    (UpstreamProtocol::Http2, Some(tls)) => UpstreamClient::Http2Tls(Box::new(ClientCache::http2_tls(
                        tls,
                        pool.endpoints.first().map(|e| e.as_ref()),
                        pool.timeouts.connect,
                    ))),
                })
                .collect();
            pools.insert(name.clone(), Arc::new(UpstreamPool { pool, clients }));
        }
        let specs: Vec<RouteSpec> = config.routes.iter().map(RouteSpec::from).collect();
        let routes = config
            .routes
            .iter()
            .filter_map(|r| {
                // `config::parse` guarantees every route names a declared upstream.
                let upstream = pools.get(&r.upstream)?.clone();
                Some(Route {
                    name: r.name.as_str().into(),
                    plain_name: crate::base::json::plain_string(r.name.as_bytes()),
                    group: r.group.as_deref().map(Arc::from),
                    path: r.path.clone(),
                    strip_prefix: r.strip_prefix,
                    api_key: r.auth.contains(&AuthMethod::ApiKey),
                    anonymous: r.auth.contains(&AuthMethod::Anonymous),
                    jwt: r.auth.contains(&AuthMethod::Jwt),
                    upstream,
                    metrics: metrics.route(&r.name),
                    // Checked when the file was read.
                    response_headers: r
                        .response_headers
                        .iter()
                        .filter_map(|(name, value)| {
                            Some((
                                http::HeaderName::from_bytes(name.as_bytes()).ok()?,
                                http::HeaderValue::from_str(value).ok()?,
                            ))
                        })
                        .collect(),
                    max_body_bytes: r.max_body_bytes.unwrap_or(config.server.max_body_bytes),
                })
            })
            .collect();
        Snapshot {
            router: Router::new(&specs),
            routes,
            pools,
            no_route_metrics: metrics.route(NO_ROUTE),
            usage_page: config.usage_page.as_ref().and_then(|page| {
                Some(UsagePage {
                    path: page.path.clone(),
                    rate: crate::limits::Gcra::per_minute(page.rate_per_minute)?,
                    metrics: metrics.route(USAGE_PAGE_ROUTE),
                })
            }),
            jwt: JwtVerifier::from_config(
                &config.jwt.issuers,
                config.path.parent().unwrap_or(std::path::Path::new(".")),
            )
            .unwrap_or_else(|error| {
                // Checked when the file was parsed; a JWKS file may have changed since.
                tracing::error!(%error, "JWT issuers unusable; tokens will be refused");
                JwtVerifier::default()
            }),
            anonymous_by_ip: config.anonymous.by.contains(&AnonymousBy::Ip),
            path_rules: PathRules {
                normalize: config.server.normalize_path,
                merge_slashes: config.server.merge_slashes,
                escaped_slashes: match config.server.escaped_slashes {
                    crate::config::schema::EscapedSlashesSetting::Reject => EscapedSlashes::Reject,
                    crate::config::schema::EscapedSlashesSetting::Keep => EscapedSlashes::Keep,
                },
            },
            anonymous_plan: http::HeaderValue::from_str(&config.anonymous.plan)
                .unwrap_or_else(|_| http::HeaderValue::from_static("anonymous")),
            config,
        }
    }

    /// Resolves host-name endpoints that have no address yet (new pools).
    pub async fn resolve_new_endpoints(&self) {
        for upstream in self.pools.values() {
            for endpoint in &upstream.pool.endpoints {
                if !endpoint.is_resolved()
                    && let Err(error) = endpoint.resolve().await
                {
                    tracing::warn!(upstream = %upstream.pool.name, endpoint = %endpoint.address, %error, "cannot resolve upstream endpoint");
                }
            }
        }
    }
}
