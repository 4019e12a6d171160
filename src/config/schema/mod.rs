//! The file format: what operators write. Checked and turned into [`super::Config`].
//! The upstream sections are in `upstream`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};

use crate::base::time::parse_duration;

mod logs;
mod upstream;

pub use logs::{LogsSection, LogsUploadSection};

pub use upstream::{
    EndpointSpec, HealthKind, HealthSection, LbPolicy, OutlierSection, RetriesSection, TimeoutsSection,
    UpstreamProtocol, UpstreamSection,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// Worker threads, each with its own runtime and `SO_REUSEPORT` listener; 0 = one per core.
    #[serde(default)]
    pub workers: usize,
    #[serde(default = "default_header_read_timeout", deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// An idle HTTP/1 keep-alive connection hands its HTTP buffers back after this long and
    /// waits as a bare socket; `"0s"` keeps every connection's buffers until it closes.
    #[serde(default = "default_park_idle_after", deserialize_with = "duration")]
    pub park_idle_after: Duration,
    #[serde(default = "default_shutdown_grace", deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Expect a PROXY protocol (v1 or v2) header on every connection.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Peers (CIDRs or addresses) whose `X-Forwarded-For` is believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Normalize request paths before routing (dot segments, escapes, `//`).
    #[serde(default = "default_true")]
    pub normalize_path: bool,
    /// With `normalize_path`: `//` counts as `/`.
    #[serde(default = "default_true")]
    pub merge_slashes: bool,
    /// With `normalize_path`: `%2F` / `%5C` in a path are refused, or kept opaque.
    #[serde(default)]
    pub escaped_slashes: EscapedSlashesSetting,
    /// HTTPS listeners (`[server.tls]`): read and checked on their own (`config::check::tls`).
    pub tls: Option<serde::de::IgnoredAny>,
    // Protective limits (docs/security.md); 0 = no limit where a count is asked for.
    /// Open client connections per worker (NGINX's `worker_connections`).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open client connections per client IP, across workers.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// IPv6 clients are counted per network of this many bits for
    /// `max_connections_per_ip`.
    #[serde(default = "default_connections_ipv6_prefix")]
    pub connections_ipv6_prefix: u8,
    /// Requests on one HTTP/1 keep-alive connection before it is closed (NGINX's
    /// `keepalive_requests`).
    #[serde(default = "default_max_requests_per_connection")]
    pub max_requests_per_connection: u64,
    /// Request body size for routes that do not set their own (NGINX's
    /// `client_max_body_size`).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Longest wait for the next piece of a request body (NGINX's `client_body_timeout`).
    #[serde(default = "default_body_timeout", deserialize_with = "duration")]
    pub client_body_timeout: Duration,
    /// Longest a write to the client may stay blocked (NGINX's `send_timeout`).
    #[serde(default = "default_body_timeout", deserialize_with = "duration")]
    pub send_timeout: Duration,
    /// HTTP/2 streams open at once per connection (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    #[serde(default = "default_http2_max_concurrent_streams")]
    pub http2_max_concurrent_streams: u32,
    /// Interval of HTTP/2 keep-alive pings; an unanswered ping closes the connection.
    #[serde(default = "default_http2_keepalive_interval", deserialize_with = "duration")]
    pub http2_keepalive_interval: Duration,
    /// Streams a client may reset before their response, once they are more than half of
    /// its streams, before the connection is closed (CVE-2023-44487).
    #[serde(default = "default_http2_max_premature_resets")]
    pub http2_max_premature_resets: u32,
    /// `Upgrade` protocols tunnelled to the upstream; any other `Upgrade` is ignored.
    #[serde(default = "default_upgrades")]
    pub upgrades: Vec<String>,
    /// A tunnel (WebSocket) with no bytes either way for this long is closed.
    #[serde(default = "default_tunnel_idle_timeout", deserialize_with = "duration")]
    pub tunnel_idle_timeout: Duration,
}

fn default_max_connections() -> usize {
    16_384
}
fn default_max_connections_per_ip() -> usize {
    1_024
}
fn default_connections_ipv6_prefix() -> u8 {
    64
}
fn default_max_requests_per_connection() -> u64 {
    1_000
}
fn default_max_body_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_http2_max_concurrent_streams() -> u32 {
    128
}
fn default_http2_keepalive_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_http2_max_premature_resets() -> u32 {
    100
}
fn default_upgrades() -> Vec<String> {
    vec!["websocket".to_string()]
}
fn default_tunnel_idle_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashesSetting {
    #[default]
    Reject,
    Keep,
}

/// `[server.tls]`: addresses that speak HTTPS, and the certificates they serve.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub listen: Vec<String>,
    pub certificates: Vec<CertificateSpec>,
    /// `"1.2"` (TLS 1.2 and 1.3) or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// What a client naming a host no certificate has gets.
    #[serde(default)]
    pub unknown_sni: UnknownSni,
    /// PEM file of the CAs client certificates must chain to (mTLS).
    pub client_ca: Option<String>,
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// One certificate chain and its key (PEM files, relative to the configuration file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSpec {
    pub cert: String,
    pub key: String,
    /// Host names it is served for (`*.example.com` allowed); default: its DNS names.
    #[serde(default)]
    pub names: Vec<String>,
    /// Served to clients whose name no certificate has (default: the first certificate).
    #[serde(default)]
    pub default: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownSni {
    /// The default certificate.
    #[default]
    Default,
    /// A handshake failure.
    Reject,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// A client without a valid certificate is refused.
    #[default]
    Required,
    /// A client may present none; one it presents must be valid.
    Optional,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            workers: 0,
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
            max_header_bytes: default_max_header_bytes(),
            park_idle_after: default_park_idle_after(),
            shutdown_grace: default_shutdown_grace(),
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
            normalize_path: true,
            merge_slashes: true,
            escaped_slashes: EscapedSlashesSetting::default(),
            tls: None,
            max_connections: default_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
            connections_ipv6_prefix: default_connections_ipv6_prefix(),
            max_requests_per_connection: default_max_requests_per_connection(),
            max_body_bytes: default_max_body_bytes(),
            client_body_timeout: default_body_timeout(),
            send_timeout: default_body_timeout(),
            http2_max_concurrent_streams: default_http2_max_concurrent_streams(),
            http2_keepalive_interval: default_http2_keepalive_interval(),
            http2_max_premature_resets: default_http2_max_premature_resets(),
            upgrades: default_upgrades(),
            tunnel_idle_timeout: default_tunnel_idle_timeout(),
        }
    }
}

fn default_listen() -> Vec<String> {
    vec!["127.0.0.1:8080".to_string()]
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_park_idle_after() -> Duration {
    Duration::from_millis(100)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    #[serde(default)]
    pub token: Option<String>,
    /// Serve the admin API over HTTPS with this certificate (`{ cert, key }`, PEM).
    pub tls: Option<AdminTls>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTls {
    pub cert: String,
    pub key: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
            tls: None,
        }
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:9901".to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub name: String,
    /// Exact (`api.example.com`) or wildcard (`*.example.com`); empty = any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Path prefix, matched on segment boundaries; the longest match wins.
    #[serde(default = "default_path")]
    pub path: String,
    /// Empty = any method.
    #[serde(default)]
    pub methods: Vec<String>,
    pub upstream: String,
    #[serde(default)]
    pub strip_prefix: bool,
    /// Route group whose quotas (`[plans.NAME.groups.GROUP]`) this route counts against.
    #[serde(default)]
    pub group: Option<String>,
    /// How callers must identify themselves; empty = public route.
    #[serde(default)]
    pub auth: Vec<AuthMethod>,
    /// Headers set on every response of the route, proxied or generated (e.g.
    /// `Strict-Transport-Security` on HTTPS routes).
    #[serde(default)]
    pub response_headers: BTreeMap<String, String>,
    /// Largest request body (`413` beyond); default `server.max_body_bytes`.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// `X-API-Key`, `Authorization: Bearer <key>`, or query `api-key` / `api_key`.
    ApiKey,
    /// Callers without credentials get the `[anonymous]` plan (the no-sign-up free tier).
    Anonymous,
    /// `Authorization: Bearer <jwt>` from a `[[jwt.issuers]]` issuer.
    Jwt,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    #[serde(default)]
    pub issuers: Vec<crate::auth::jwt::IssuerConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnonymousBy {
    Ip,
    Referer,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnonymousSection {
    #[serde(default = "default_anonymous_plan")]
    pub plan: String,
    /// The subjects an anonymous request is charged to.
    #[serde(default = "default_anonymous_by")]
    pub by: Vec<AnonymousBy>,
    /// Subjects (client IPs, Referer hosts) held in memory at most; the least recently
    /// used whose counts are flushed make room (their counts stay in the store).
    #[serde(default = "default_max_subjects")]
    pub max_subjects: usize,
    /// A longer Referer host is not counted as a subject (the caller is counted by IP).
    #[serde(default = "default_max_referer_host")]
    pub max_referer_host: usize,
    /// IPv6 clients are counted per prefix of this length (a /64 is one subscriber).
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
}

impl Default for AnonymousSection {
    fn default() -> Self {
        AnonymousSection {
            plan: default_anonymous_plan(),
            by: default_anonymous_by(),
            max_subjects: default_max_subjects(),
            max_referer_host: default_max_referer_host(),
            ipv6_prefix: default_ipv6_prefix(),
        }
    }
}

fn default_max_subjects() -> usize {
    100_000
}
fn default_max_referer_host() -> usize {
    // The longest DNS name.
    253
}
fn default_ipv6_prefix() -> u8 {
    64
}

fn default_anonymous_plan() -> String {
    "anonymous".to_string()
}
fn default_anonymous_by() -> Vec<AnonymousBy> {
    vec![AnonymousBy::Ip, AnonymousBy::Referer]
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSection {
    pub per_second: u32,
    #[serde(default)]
    pub burst: Option<u32>,
}

/// A plan defined in the file; plans can also be created through the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSection {
    #[serde(default)]
    pub rate: Option<RateSection>,
    #[serde(default)]
    pub daily: Option<u64>,
    #[serde(default)]
    pub monthly: Option<u64>,
    /// Quotas of route groups, by group name.
    #[serde(default)]
    pub groups: BTreeMap<String, crate::model::GroupQuota>,
    /// Global mode: `available` (default) or `strict` while a lease authority is unreachable.
    #[serde(default)]
    pub on_partition: Option<crate::model::PartitionMode>,
    #[serde(default)]
    pub partition_allowance: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageSection {
    /// How often changed counters are written to the state backend.
    #[serde(default = "default_flush_interval", deserialize_with = "duration")]
    pub flush_interval: Duration,
    /// How long per-key usage (per consumer, route and day) is kept for reports.
    #[serde(default = "default_retention", deserialize_with = "duration")]
    pub retention: Duration,
    /// How long anonymous usage (per IP and Referer) is kept.
    #[serde(default = "default_anonymous_retention", deserialize_with = "duration")]
    pub anonymous_retention: Duration,
}

impl Default for UsageSection {
    fn default() -> Self {
        UsageSection {
            flush_interval: default_flush_interval(),
            retention: default_retention(),
            anonymous_retention: default_anonymous_retention(),
        }
    }
}

fn default_flush_interval() -> Duration {
    Duration::from_millis(200)
}
fn default_retention() -> Duration {
    Duration::from_secs(400 * 86_400)
}
fn default_anonymous_retention() -> Duration {
    Duration::from_secs(35 * 86_400)
}

/// Global mode: keys, plans and usage shared through NATS JetStream (docs/multi-region.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Server URLs of this region's NATS cluster.
    pub nats: Vec<String>,
    /// This node's region (one NATS cluster per region).
    pub region: String,
    /// This node's name: its slot in every usage counter. Must be unique in the cluster and
    /// stable across restarts of the same node (defaults to the host name).
    #[serde(default)]
    pub node_id: Option<String>,
    /// A NATS `.creds` file (JWT + NKey).
    #[serde(default)]
    pub credentials: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the servers' certificates; implies TLS.
    #[serde(default)]
    pub tls_ca: Option<String>,
    /// Replicas of the buckets and the usage stream (1 or 3 in a 3-node cluster).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// How long usage batches stay in the stream (monthly counts also live in snapshots).
    #[serde(default = "default_usage_max_age", deserialize_with = "duration")]
    pub usage_max_age: Duration,
    /// How often this node writes a compacted snapshot of its usage view (this month and
    /// last) for nodes that start on an empty disk or fell behind the stream's age limit.
    #[serde(default = "default_snapshot_interval", deserialize_with = "duration")]
    pub snapshot_interval: Duration,
    /// Divide each plan's per-second rate and burst by the number of live nodes (seen by
    /// their heartbeats), so a caller spread over N nodes gets about the plan's rate in
    /// total rather than N times it.
    #[serde(default)]
    pub divide_rate: bool,
}

fn default_snapshot_interval() -> Duration {
    Duration::from_secs(300)
}

impl ClusterSection {
    /// `node_id`, else the host name.
    pub fn node_name(&self) -> String {
        self.node_id.clone().unwrap_or_else(host_name)
    }
}

/// The host name, as a node name (letters, digits, `-`, `_`).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

fn default_replicas() -> usize {
    1
}
fn default_usage_max_age() -> Duration {
    Duration::from_secs(7 * 86_400)
}

fn default_path() -> String {
    "/".to_string()
}

/// Top-level sections; each is checked on its own so one bad section does not hide another.
pub const SECTIONS: &[&str] = &[
    "data_dir",
    "server",
    "admin",
    "upstreams",
    "routes",
    "plans",
    "anonymous",
    "jwt",
    "usage",
    "logs",
    "cluster",
    "usage_page",
];

/// `[usage_page]`: the customer usage page on the proxy listeners (docs/customer-usage.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsagePageSection {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Served at this exact path; it takes precedence over routes.
    #[serde(default = "default_usage_page_path")]
    pub path: String,
    /// Page views per minute per key (all at once at most).
    #[serde(default = "default_usage_page_rate")]
    pub rate_per_minute: u32,
}

fn default_usage_page_path() -> String {
    "/usage".to_string()
}

fn default_usage_page_rate() -> u32 {
    30
}

pub type Upstreams = BTreeMap<String, UpstreamSection>;

pub(super) fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text).map_err(de::Error::custom)
}

pub(super) fn optional_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}
