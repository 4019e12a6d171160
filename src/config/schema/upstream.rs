//! `[upstreams.NAME]`: endpoints, balancing, health checks, outlier detection, retries
//! and timeouts.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::{duration, optional_duration};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    RoundRobin,
    LeastRequests,
    ConsistentHash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c) to the endpoints.
    Http2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default = "default_lb")]
    pub lb: LbPolicy,
    /// For `consistent_hash`: `client_ip` or `header:<name>`.
    #[serde(default)]
    pub hash_key: Option<String>,
    #[serde(default = "default_protocol")]
    pub protocol: UpstreamProtocol,
    #[serde(default = "default_resolve_interval", deserialize_with = "duration")]
    pub resolve_interval: Duration,
    /// Send the client's `Host` upstream (true) or the endpoint's `host:port` (false).
    #[serde(default = "default_true")]
    pub preserve_host: bool,
    #[serde(default)]
    pub timeouts: TimeoutsSection,
    /// Active health checks; off unless this section is present.
    #[serde(default)]
    pub health: Option<HealthSection>,
    /// Passive health (outlier detection) and the per-endpoint circuit breaker.
    #[serde(default)]
    pub outlier: OutlierSection,
    #[serde(default)]
    pub retries: RetriesSection,
    /// Most requests in flight to the whole pool; beyond it `503 upstream_overloaded`
    /// (0 = no limit).
    #[serde(default)]
    pub max_requests: usize,
    /// Most TCP connects in progress per worker (0 = no limit).
    #[serde(default)]
    pub max_pending_connections: usize,
    /// An endpoint back in service gets a share of traffic that grows over this long.
    #[serde(default = "default_slow_start", deserialize_with = "duration")]
    pub slow_start: Duration,
    /// Speak TLS to the endpoints (also implied by `https://` endpoints).
    #[serde(default)]
    pub tls: bool,
    /// PEM file of the CAs endpoint certificates must chain to (default: the public
    /// webpki roots).
    pub tls_ca: Option<String>,
    /// The name sent as SNI and verified (default: each endpoint's host).
    pub tls_server_name: Option<String>,
    /// A client certificate (PEM chain) and key to present to the endpoints.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
}

fn default_slow_start() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Http,
    Tcp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    #[serde(default = "default_health_kind")]
    pub kind: HealthKind,
    #[serde(default = "default_health_method")]
    pub method: String,
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Statuses that count as healthy; default 200–399.
    #[serde(default)]
    pub expected_statuses: Vec<u16>,
    /// `Host` header of the probe; default the endpoint's `host:port`.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "default_health_interval", deserialize_with = "duration")]
    pub interval: Duration,
    #[serde(default = "default_health_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(default = "default_two")]
    pub healthy_threshold: u32,
    #[serde(default = "default_two")]
    pub unhealthy_threshold: u32,
}

fn default_health_kind() -> HealthKind {
    HealthKind::Http
}
fn default_health_method() -> String {
    "GET".into()
}
fn default_health_path() -> String {
    "/".into()
}
fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_two() -> u32 {
    2
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierSection {
    /// Consecutive failures (connect errors, resets, timeouts, 5xx) that open an
    /// endpoint's breaker (eject it); 0 turns passive health off.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// First ejection time; doubles with each repeat ejection, up to `max_ejection_time`.
    #[serde(default = "default_base_ejection", deserialize_with = "duration")]
    pub base_ejection_time: Duration,
    #[serde(default = "default_max_ejection", deserialize_with = "duration")]
    pub max_ejection_time: Duration,
    /// Largest share of the pool ejected at once, in percent.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
    /// Requests let through at once to an endpoint whose ejection has run out (half-open).
    #[serde(default = "default_one")]
    pub half_open_requests: u32,
}

impl Default for OutlierSection {
    fn default() -> Self {
        OutlierSection {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_time: default_base_ejection(),
            max_ejection_time: default_max_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
            half_open_requests: default_one(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(10)
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(300)
}
fn default_max_ejection_percent() -> u32 {
    50
}
fn default_one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriesSection {
    /// Further tries on other endpoints (0 = no retries).
    #[serde(default = "default_retry_attempts")]
    pub attempts: u32,
    /// Longest wait for one try's response head (default: `timeouts.read`).
    #[serde(default, deserialize_with = "optional_duration")]
    pub per_try_timeout: Option<Duration>,
    /// Upstream statuses retried (idempotent requests only).
    #[serde(default = "default_retry_statuses")]
    pub on_statuses: Vec<u16>,
    /// Retries may add at most this share of the pool's requests (percent).
    #[serde(default = "default_retry_budget")]
    pub budget_percent: u32,
    /// Methods retried besides GET, HEAD, OPTIONS, PUT, DELETE.
    #[serde(default)]
    pub also_methods: Vec<String>,
}

impl Default for RetriesSection {
    fn default() -> Self {
        RetriesSection {
            attempts: default_retry_attempts(),
            per_try_timeout: None,
            on_statuses: default_retry_statuses(),
            budget_percent: default_retry_budget(),
            also_methods: Vec::new(),
        }
    }
}

fn default_retry_attempts() -> u32 {
    2
}
fn default_retry_statuses() -> Vec<u16> {
    vec![502, 503, 504]
}
fn default_retry_budget() -> u32 {
    20
}

fn default_lb() -> LbPolicy {
    LbPolicy::RoundRobin
}
fn default_protocol() -> UpstreamProtocol {
    UpstreamProtocol::Http1
}
fn default_resolve_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSection {
    /// TCP connect to an endpoint.
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    pub connect: Duration,
    /// Longest wait for the response head (counted from handing the request to the pool, so
    /// it includes a connect), and for each response body chunk after it.
    #[serde(default = "default_read_timeout", deserialize_with = "duration")]
    pub read: Duration,
    /// Deadline for the whole exchange, from sending the request to the last body byte.
    #[serde(default, deserialize_with = "optional_duration")]
    pub total: Option<Duration>,
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        Self {
            connect: default_connect_timeout(),
            read: default_read_timeout(),
            total: None,
        }
    }
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `"10.0.0.1:9000"` or `{ address = "10.0.0.1:9000", weight = 2 }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub address: String,
    pub weight: u32,
}

impl<'de> Deserialize<'de> for EndpointSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EndpointVisitor;

        impl<'de> Visitor<'de> for EndpointVisitor {
            type Value = EndpointSpec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"host:port\" or { address = \"host:port\", weight = N }")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<EndpointSpec, E> {
                Ok(EndpointSpec {
                    address: v.to_string(),
                    weight: 1,
                })
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EndpointSpec, A::Error> {
                let mut address = None;
                let mut weight = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "address" => address = Some(map.next_value::<String>()?),
                        "weight" => weight = Some(map.next_value::<u32>()?),
                        other => return Err(de::Error::unknown_field(other, &["address", "weight"])),
                    }
                }
                Ok(EndpointSpec {
                    address: address.ok_or_else(|| de::Error::missing_field("address"))?,
                    weight: weight.unwrap_or(1),
                })
            }
        }

        deserializer.deserialize_any(EndpointVisitor)
    }
}
