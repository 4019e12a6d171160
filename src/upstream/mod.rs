//! Upstream pools: endpoints, their resolved addresses, and load balancing.
//!
//! Nothing here knows about hyper: the proxy asks a [`Pool`] for an endpoint and holds an
//! [`InflightGuard`] while the exchange runs, so least-requests sees every exit path.

mod balancer;
pub mod body;
pub mod check;
pub mod client;
pub mod h1;
pub mod health;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

pub use balancer::Balancer;
use health::{Admission, Health, OutlierPolicy, Transition};

use crate::config::{
    HashKey, HealthSection, LbPolicy, RetriesSection, TimeoutsSection, UpstreamProtocol, UpstreamSection,
};
use crate::metrics::{HealthEvent, UpstreamMetrics};
use rustls::pki_types::ServerName;

/// How a pool speaks TLS to its endpoints (`tls = true` or `https://` endpoints).
pub struct UpstreamTls {
    pub connector: tokio_rustls::TlsConnector,
    /// The same settings, for the HTTP/2 client.
    pub config: Arc<rustls::ClientConfig>,
    /// SNI and the name verified; `None`: each endpoint's host.
    pub server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl UpstreamTls {
    /// The pool's TLS settings. Files were checked when the configuration was read; if
    /// they no longer load, every handshake fails (502 `upstream_tls`) rather than any
    /// request going out in clear text.
    fn from_section(name: &str, section: &UpstreamSection) -> UpstreamTls {
        let alpn: &[&[u8]] = match section.protocol {
            UpstreamProtocol::Http1 => &[b"http/1.1"],
            UpstreamProtocol::Http2 => &[b"h2"],
        };
        let identity = section
            .tls_cert
            .as_deref()
            .zip(section.tls_key.as_deref())
            .map(|(c, k)| (std::path::Path::new(c), std::path::Path::new(k)));
        let config = crate::tls::client_config(section.tls_ca.as_deref().map(std::path::Path::new), identity, alpn)
            .unwrap_or_else(|error| {
                tracing::error!(upstream = name, %error, "upstream TLS settings unusable; every handshake will fail");
                crate::tls::client_config_trusting_nothing()
            });
        let config = Arc::new(config);
        UpstreamTls {
            connector: tokio_rustls::TlsConnector::from(config.clone()),
            config,
            server_name: section
                .tls_server_name
                .as_ref()
                .and_then(|n| ServerName::try_from(n.clone()).ok()),
        }
    }

    /// The name to send and verify for `endpoint`: the override, else its host.
    pub fn name_for(&self, endpoint: &Endpoint) -> Option<ServerName<'static>> {
        self.server_name.clone().or_else(|| {
            let host = endpoint
                .address
                .rsplit_once(':')
                .map_or(endpoint.address.as_str(), |(host, _)| host)
                .trim_start_matches('[')
                .trim_end_matches(']');
            ServerName::try_from(host.to_string()).ok()
        })
    }
}

/// A configured endpoint (`host:port` with a weight) and the addresses it resolves to.
#[derive(Debug)]
pub struct Endpoint {
    pub address: String,
    pub weight: u32,
    /// `host:port` as configured, sent as `Host` when the pool does not preserve it.
    pub host_header: http::HeaderValue,
    /// The address itself when it is an IP and port: read with no atomic operation on
    /// every request (docs/benchmarks.md, "Locked instructions").
    literal: Option<SocketAddr>,
    /// What a host name resolved to last.
    targets: ArcSwap<Vec<SocketAddr>>,
    next_target: AtomicUsize,
    inflight: AtomicUsize,
    pub health: Health,
}

impl Endpoint {
    fn new(address: &str, weight: u32) -> Self {
        Endpoint {
            literal: address.parse::<SocketAddr>().ok(),
            address: address.to_string(),
            weight,
            host_header: http::HeaderValue::from_str(address).unwrap_or_else(|_| http::HeaderValue::from_static("")),
            targets: ArcSwap::from_pointee(Vec::new()),
            next_target: AtomicUsize::new(0),
            inflight: AtomicUsize::new(0),
            health: Health::default(),
        }
    }

    /// True when the address is a host name that must be resolved (and re-resolved).
    pub fn needs_resolution(&self) -> bool {
        self.literal.is_none()
    }

    /// The next resolved address, rotating over all of them.
    pub fn target(&self) -> Option<SocketAddr> {
        if self.literal.is_some() {
            return self.literal;
        }
        let targets = self.targets.load();
        match targets.len() {
            0 => None,
            1 => Some(targets[0]),
            n => Some(targets[self.next_target.fetch_add(1, Ordering::Relaxed) % n]),
        }
    }

    pub fn is_resolved(&self) -> bool {
        self.literal.is_some() || !self.targets.load().is_empty()
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn set_targets(&self, addrs: Vec<SocketAddr>) {
        self.targets.store(Arc::new(addrs));
    }

    pub fn resolved_addrs(&self) -> Vec<SocketAddr> {
        match self.literal {
            Some(addr) => vec![addr],
            None => self.targets.load().to_vec(),
        }
    }

    /// Resolves a host-name endpoint again; keeps the previous addresses when lookup fails.
    pub async fn resolve(&self) -> std::io::Result<()> {
        if !self.needs_resolution() {
            return Ok(());
        }
        let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(self.address.as_str()).await?.collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"));
        }
        if addrs != self.resolved_addrs() {
            tracing::info!(endpoint = %self.address, ?addrs, "upstream endpoint resolved");
            self.set_targets(addrs);
        }
        Ok(())
    }
}

/// The endpoints a request has tried, by their place in the pool: the first 64 as bits,
/// any beyond in a list (which allocates only for pools that large), so nothing wraps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tried {
    low: u64,
    more: Vec<usize>,
}

impl Tried {
    pub fn insert(&mut self, index: usize) {
        if index < 64 {
            self.low |= 1 << index;
        } else if !self.more.contains(&index) {
            self.more.push(index);
        }
    }

    pub fn contains(&self, index: usize) -> bool {
        if index < 64 {
            self.low & (1 << index) != 0
        } else {
            self.more.contains(&index)
        }
    }
}

/// Counts a request against an endpoint until dropped.
#[derive(Debug)]
pub struct InflightGuard(Arc<Endpoint>);

impl InflightGuard {
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(endpoint)
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A named pool of endpoints with its balancing policy and timeouts.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub protocol: UpstreamProtocol,
    pub timeouts: TimeoutsSection,
    pub preserve_host: bool,
    pub resolve_interval: Duration,
    pub hash_key: Option<HashKey>,
    balancer: Balancer,
    pub policy: OutlierPolicy,
    max_ejection_percent: u32,
    pub retries: RetriesSection,
    pub health_check: Option<HealthSection>,
    pub max_requests: usize,
    pub max_pending_connections: usize,
    /// Present when the pool speaks TLS to its endpoints.
    pub tls: Option<Arc<UpstreamTls>>,
    inflight_total: Arc<AtomicUsize>,
    retry_tokens: AtomicI64,
    pub metrics: Arc<UpstreamMetrics>,
}

/// A retry may spend one token; every request earns `budget_percent / 100` of one.
const RETRY_TOKEN: i64 = 1000;
/// Unspent budget is capped, so a quiet pool cannot save up for a retry storm.
const RETRY_TOKENS_MAX: i64 = 10 * RETRY_TOKEN;

/// The pool's in-flight count while held (`max_requests`).
#[derive(Debug)]
pub struct PoolSlot(Option<Arc<AtomicUsize>>);

impl Drop for PoolSlot {
    fn drop(&mut self) {
        if let Some(count) = &self.0 {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The endpoint chosen for one try.
pub struct Selected {
    pub index: usize,
    pub endpoint: Arc<Endpoint>,
    /// A half-open breaker's probe request.
    pub probe: bool,
}

impl Pool {
    /// Builds a pool, reusing endpoints of `previous` with the same address so their
    /// in-flight counts survive a reload.
    pub fn from_config(
        name: &str,
        section: &UpstreamSection,
        previous: Option<&Pool>,
        metrics: Arc<UpstreamMetrics>,
    ) -> Self {
        let endpoints: Vec<Arc<Endpoint>> = section
            .endpoints
            .iter()
            .map(|spec| {
                previous
                    .and_then(|p| {
                        p.endpoints
                            .iter()
                            .find(|e| e.address == spec.address && e.weight == spec.weight)
                    })
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(&spec.address, spec.weight)))
            })
            .collect();
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let hash_key = match (section.lb, section.hash_key.as_deref()) {
            (_, Some(text)) => HashKey::parse(text).ok(),
            (LbPolicy::ConsistentHash, None) => Some(HashKey::ClientIp),
            _ => None,
        };
        let balancer = match section.lb {
            LbPolicy::RoundRobin => Balancer::round_robin(&weights),
            LbPolicy::LeastRequests => Balancer::least_requests(&weights),
            LbPolicy::ConsistentHash => {
                let addresses: Vec<&str> = endpoints.iter().map(|e| e.address.as_str()).collect();
                Balancer::consistent_hash(&addresses, &weights)
            }
        };
        Pool {
            name: name.to_string(),
            endpoints,
            protocol: section.protocol,
            timeouts: section.timeouts.clone(),
            preserve_host: section.preserve_host,
            resolve_interval: section.resolve_interval,
            hash_key,
            balancer,
            policy: OutlierPolicy::from_config(&section.outlier, section.slow_start),
            max_ejection_percent: section.outlier.max_ejection_percent,
            retries: section.retries.clone(),
            health_check: section.health.clone(),
            max_requests: section.max_requests,
            max_pending_connections: section.max_pending_connections,
            tls: section.tls.then(|| Arc::new(UpstreamTls::from_section(name, section))),
            inflight_total: previous.map_or_else(Default::default, |p| p.inflight_total.clone()),
            retry_tokens: AtomicI64::new(RETRY_TOKENS_MAX),
            metrics,
        }
    }

    /// Takes a slot of `max_requests`; `None` when the pool is full.
    pub fn acquire(&self) -> Option<PoolSlot> {
        // Without a limit there is nothing to count: no shared counter touched per request.
        if self.max_requests == 0 {
            return Some(PoolSlot(None));
        }
        let now = self.inflight_total.fetch_add(1, Ordering::Relaxed);
        let slot = PoolSlot(Some(self.inflight_total.clone()));
        (now < self.max_requests).then_some(slot)
    }

    /// Every request earns retry budget; a retry spends it. False when it is spent.
    pub fn earn_retry_budget(&self) {
        let earned = i64::from(self.retries.budget_percent) * RETRY_TOKEN / 100;
        let tokens = self.retry_tokens.load(Ordering::Relaxed);
        if tokens < RETRY_TOKENS_MAX {
            self.retry_tokens.fetch_add(earned, Ordering::Relaxed);
        }
    }

    pub fn spend_retry_budget(&self) -> bool {
        if self.retry_tokens.fetch_sub(RETRY_TOKEN, Ordering::Relaxed) >= RETRY_TOKEN {
            return true;
        }
        self.retry_tokens.fetch_add(RETRY_TOKEN, Ordering::Relaxed);
        false
    }

    /// Picks an endpoint that has an address and that health allows, skipping those in
    /// `tried`. `None` when none can take a request: the caller answers 503 at once
    /// instead of waiting on timeouts.
    pub fn select_healthy(&self, hash: Option<&[u8]>, tried: &Tried) -> Option<Selected> {
        let now = if self.endpoints.iter().any(|e| e.health.is_timed()) {
            health::now_ms()
        } else {
            0
        };
        let skip = |i: usize| tried.contains(i);
        let pick = |slow_start: bool| {
            self.balancer.pick(
                self.endpoints.len(),
                hash,
                |i| {
                    !skip(i)
                        && self.endpoints[i].is_resolved()
                        && match self.endpoints[i].health.admission(now, &self.policy) {
                            Admission::Serve { share } => !slow_start || share >= 1.0 || fastrand::f64() < share,
                            Admission::Probe => true,
                            Admission::Refuse => false,
                        }
                },
                |i| self.endpoints[i].inflight(),
            )
        };
        // Slow start thins an endpoint's traffic; if that leaves nothing, it still serves.
        let index = pick(true).or_else(|| pick(false))?;
        let endpoint = self.endpoints.get(index)?.clone();
        // Only an open breaker can be half-open: one load in the common case.
        let probe = endpoint.health.is_open() && endpoint.health.admission(now, &self.policy) == Admission::Probe;
        if probe {
            endpoint.health.start_probe();
        }
        Some(Selected { index, endpoint, probe })
    }

    /// Feeds one try's outcome to the endpoint's passive health and breaker.
    pub fn record(&self, endpoint: &Endpoint, probe: bool, ok: bool) {
        // A success against an endpoint with no timed state changes nothing timed.
        let now = if ok && !endpoint.health.is_timed() {
            0
        } else {
            health::now_ms()
        };
        // Counted only when a failure would eject. A pool of one has nothing to fail over
        // to: passive ejection never empties a pool beyond its cap (active checks still can).
        let below_cap = || {
            let ejected = self.endpoints.iter().filter(|e| e.health.is_ejected(now)).count();
            ejected < self.endpoints.len() * self.max_ejection_percent as usize / 100
        };
        let transition = endpoint.health.record(ok, probe, now, &self.policy, below_cap);
        if let Some(transition) = transition {
            self.report(endpoint, transition);
        }
    }

    /// Logs and counts a health transition of one endpoint.
    pub fn report(&self, endpoint: &Endpoint, transition: Transition) {
        self.metrics.record_health(match transition {
            Transition::Ejected { .. } => HealthEvent::Ejected,
            Transition::Restored => HealthEvent::Restored,
            Transition::ActiveDown => HealthEvent::ActiveDown,
            Transition::ActiveUp => HealthEvent::ActiveUp,
        });
        match transition {
            Transition::Ejected { for_ms, ejections } => tracing::warn!(
                upstream = %self.name, endpoint = %endpoint.address, for_ms, ejections,
                "endpoint ejected (breaker open)"
            ),
            Transition::Restored => tracing::info!(
                upstream = %self.name, endpoint = %endpoint.address, "endpoint back in rotation (breaker closed)"
            ),
            Transition::ActiveDown => tracing::warn!(
                upstream = %self.name, endpoint = %endpoint.address, "active health check: unhealthy"
            ),
            Transition::ActiveUp => tracing::info!(
                upstream = %self.name, endpoint = %endpoint.address, "active health check: healthy"
            ),
        }
    }

    /// Whether `method` may be retried after the request reached an endpoint.
    pub fn idempotent(&self, method: &http::Method) -> bool {
        matches!(
            *method,
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::PUT | http::Method::DELETE
        ) || self
            .retries
            .also_methods
            .iter()
            .any(|m| m.eq_ignore_ascii_case(method.as_str()))
    }

    /// Resolves every host-name endpoint; errors are logged, old addresses kept.
    pub async fn resolve(&self) {
        for endpoint in &self.endpoints {
            if let Err(error) = endpoint.resolve().await {
                tracing::warn!(upstream = %self.name, endpoint = %endpoint.address, %error, "cannot resolve upstream endpoint");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EndpointSpec;

    fn section(endpoints: &[(&str, u32)], lb: LbPolicy) -> UpstreamSection {
        UpstreamSection {
            endpoints: endpoints
                .iter()
                .map(|(a, w)| EndpointSpec {
                    address: a.to_string(),
                    weight: *w,
                })
                .collect(),
            lb,
            hash_key: None,
            protocol: UpstreamProtocol::Http1,
            resolve_interval: Duration::from_secs(30),
            preserve_host: true,
            timeouts: TimeoutsSection::default(),
            health: None,
            outlier: Default::default(),
            retries: Default::default(),
            max_requests: 0,
            max_pending_connections: 0,
            slow_start: Duration::from_secs(10),
            tls: false,
            tls_ca: None,
            tls_server_name: None,
            tls_cert: None,
            tls_key: None,
        }
    }

    fn pool(name: &str, section: &UpstreamSection, previous: Option<&Pool>) -> Pool {
        Pool::from_config(name, section, previous, Default::default())
    }

    #[tokio::test]
    async fn host_names_resolve_and_literals_need_nothing() {
        let pool = pool(
            "p",
            &section(&[("localhost:8080", 1), ("10.0.0.1:80", 1)], LbPolicy::RoundRobin),
            None,
        );
        assert!(!pool.endpoints[0].is_resolved());
        assert!(pool.endpoints[1].is_resolved());
        // Unresolved endpoints are skipped by the balancer.
        for _ in 0..4 {
            assert_eq!(
                pool.select_healthy(None, &Tried::default()).unwrap().endpoint.address,
                "10.0.0.1:80"
            );
        }
        pool.resolve().await;
        let addrs = pool.endpoints[0].resolved_addrs();
        assert!(
            addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 8080),
            "{addrs:?}"
        );
        assert!(!addrs.is_empty());
    }

    #[test]
    fn retries_skip_tried_endpoints_in_pools_of_any_size() {
        let addresses: Vec<String> = (0..100)
            .map(|i| format!("10.0.{}.{}:80", i / 250, i % 250 + 1))
            .collect();
        let endpoints: Vec<(&str, u32)> = addresses.iter().map(|a| (a.as_str(), 1)).collect();
        let pool = pool("big", &section(&endpoints, LbPolicy::RoundRobin), None);
        let mut tried = Tried::default();
        for _ in 0..100 {
            let selected = pool.select_healthy(None, &tried).expect("an untried endpoint is left");
            assert!(
                !tried.contains(selected.index),
                "endpoint {} tried twice",
                selected.index
            );
            tried.insert(selected.index);
        }
        // Every endpoint tried, including those past the 64th: none is left.
        assert!((0..100).all(|i| tried.contains(i)));
        assert!(pool.select_healthy(None, &tried).is_none());
        tried.insert(70);
        assert_eq!(tried.more.len(), 36, "an index is kept once");
    }

    #[test]
    fn reload_keeps_endpoint_state_for_unchanged_addresses() {
        let old = pool(
            "p",
            &section(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)], LbPolicy::RoundRobin),
            None,
        );
        let guard = InflightGuard::new(old.endpoints[0].clone());
        let new = pool(
            "p",
            &section(&[("10.0.0.1:80", 1), ("10.0.0.3:80", 1)], LbPolicy::LeastRequests),
            Some(&old),
        );
        assert!(Arc::ptr_eq(&new.endpoints[0], &old.endpoints[0]));
        assert_eq!(new.endpoints[0].inflight(), 1);
        drop(guard);
        assert_eq!(new.endpoints[0].inflight(), 0);
        assert!(!Arc::ptr_eq(&new.endpoints[1], &old.endpoints[1]));
    }

    #[test]
    fn endpoint_rotates_over_its_addresses() {
        let endpoint = Endpoint::new("api.internal:80", 1);
        endpoint.set_targets(vec!["10.0.0.1:80".parse().unwrap(), "10.0.0.2:80".parse().unwrap()]);
        let seen: Vec<SocketAddr> = (0..4).map(|_| endpoint.target().unwrap()).collect();
        assert_eq!(seen[0], seen[2]);
        assert_ne!(seen[0], seen[1]);
        assert_eq!(endpoint.host_header, "api.internal:80");
    }
}
