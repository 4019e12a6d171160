//! One checker per section: each reads its section, checks what serde cannot (addresses,
//! ranges, references between sections) and records every error with its location.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use toml_edit::{Item, Table};

use super::error::ErrorSink;
use super::read::{element_span, field_span, key_span, read_section};
use super::schema::{
    self, AdminSection, AnonymousSection, ClientAuth, ClusterSection, JwtSection, PlanSection, RouteSection,
    TlsSection, TlsVersion, UnknownSni,
};
use super::{HashKey, LbPolicy, ServerSection, UpstreamSection, UsageSection};

mod listeners;
mod logs;
mod upstreams;

pub use logs::LogsConfig;
pub(super) use logs::logs;

pub(super) use listeners::{admin, admin_tls, server, tls};
pub(super) use upstreams::upstreams;

/// The most requests per second a plan may allow: the rate limiter counts in
/// nanoseconds, so a faster rate would be an interval of zero.
pub const MAX_RATE_PER_SECOND: u32 = 1_000_000_000;

/// Top-level keys that are not sections.
pub(super) fn unknown_sections(sink: &mut ErrorSink<'_>, root: &Table) {
    for (key, item) in root.iter() {
        if !schema::SECTIONS.contains(&key) {
            let span = root.key(key).and_then(|k| k.span()).or_else(|| item.span());
            sink.push(
                span,
                key,
                format!(
                    "unknown section `{key}`, expected one of {}",
                    schema::SECTIONS.join(", ")
                ),
            );
        }
    }
}

/// A section that may be left out (its defaults apply); `None` after an error.
fn optional<T: serde::de::DeserializeOwned + Default>(sink: &mut ErrorSink<'_>, root: &Table, name: &str) -> Option<T> {
    match root.get(name) {
        Some(item) => read_section(sink, item, name),
        None => Some(T::default()),
    }
}

pub(super) fn anonymous(sink: &mut ErrorSink<'_>, root: &Table) -> Option<AnonymousSection> {
    let section: AnonymousSection = optional(sink, root, "anonymous")?;
    if section.ipv6_prefix > 128 {
        let span = root.get("anonymous").and_then(|i| field_span(i, "ipv6_prefix"));
        sink.push(span, "anonymous.ipv6_prefix", "must be between 0 and 128");
    }
    Some(section)
}

/// `[jwt]`; its issuers' keys are loaded to check them (files relative to `path`).
pub(super) fn jwt(sink: &mut ErrorSink<'_>, root: &Table, path: &Path) -> JwtSection {
    let jwt: JwtSection = root
        .get("jwt")
        .and_then(|item| read_section(sink, item, "jwt"))
        .unwrap_or_default();
    if let Err(message) =
        crate::auth::jwt::JwtVerifier::from_config(&jwt.issuers, path.parent().unwrap_or(Path::new(".")))
    {
        let span = root.get("jwt").and_then(|i| field_span(i, "issuers"));
        sink.push(span, "jwt.issuers", message);
    }
    jwt
}

/// `[plans.NAME]`: a rate limit allows between 1 and [`MAX_RATE_PER_SECOND`] requests
/// per second.
pub(super) fn plans(sink: &mut ErrorSink<'_>, root: &Table) -> BTreeMap<String, PlanSection> {
    let mut plans = BTreeMap::new();
    match root.get("plans") {
        Some(Item::Table(table)) => {
            for (name, item) in table.iter() {
                if let Some(plan) = read_section::<PlanSection>(sink, item, &format!("plans.{name}")) {
                    plans.insert(name.to_string(), plan);
                }
            }
        }
        Some(other) => sink.push(other.span(), "plans", "expected a table of named plans"),
        None => {}
    }
    for (name, plan) in &plans {
        let Some(rate) = &plan.rate else { continue };
        if let Err(message) = check_rate(rate.per_second) {
            let item = root.get("plans").and_then(|p| p.get(name));
            sink.push(
                item.and_then(|i| i.get("rate"))
                    .and_then(|i| field_span(i, "per_second")),
                &format!("plans.{name}.rate.per_second"),
                message,
            );
        }
    }
    plans
}

/// A plan's `rate_per_second` (configuration or admin API).
pub fn check_rate(per_second: u32) -> Result<(), String> {
    if per_second == 0 {
        Err("must be at least 1".into())
    } else if per_second > MAX_RATE_PER_SECOND {
        Err(format!("must be at most {MAX_RATE_PER_SECOND}"))
    } else {
        Ok(())
    }
}

/// `[usage]`: the flush interval and how long day rows are kept.
pub(super) fn usage(sink: &mut ErrorSink<'_>, root: &Table) -> UsageSection {
    let usage: UsageSection = root
        .get("usage")
        .and_then(|item| read_section(sink, item, "usage"))
        .unwrap_or_default();
    let item = root.get("usage");
    if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&usage.flush_interval) {
        sink.push(
            item.and_then(|i| field_span(i, "flush_interval")),
            "usage.flush_interval",
            "must be between 10ms and 60s",
        );
    }
    for (field, value) in [
        ("retention", usage.retention),
        ("anonymous_retention", usage.anonymous_retention),
    ] {
        // A month's counters are rebuilt from its days at start, so a month must survive.
        if value < Duration::from_secs(32 * 86_400) {
            sink.push(
                item.and_then(|i| field_span(i, field)),
                &format!("usage.{field}"),
                "must be at least 32 days",
            );
        }
    }
    usage
}

/// `[cluster]` (global mode): NATS URLs, the region and node names, replicas.
/// `[usage_page]`, when present and enabled.
pub(super) fn usage_page(sink: &mut ErrorSink<'_>, root: &Table) -> Option<schema::UsagePageSection> {
    let item = root.get("usage_page")?;
    let page: schema::UsagePageSection = read_section(sink, item, "usage_page")?;
    let path = &page.path;
    // Compared with the normalized request path: it must be a normalized path itself.
    let normal = path.starts_with('/')
        && path.len() > 1
        && !path.ends_with('/')
        && path.bytes().all(|b| b.is_ascii_graphic() && !b"?#%\\".contains(&b))
        && !path.contains("//")
        && !path.split('/').any(|segment| segment == "." || segment == "..");
    if !normal {
        sink.push(
            field_span(item, "path"),
            "usage_page.path",
            format!("{path:?}: expected a normalized absolute path such as \"/usage\" (no query, '%', '.' or '..' segments, or trailing '/')"),
        );
    }
    if !(1..=100_000).contains(&page.rate_per_minute) {
        sink.push(
            field_span(item, "rate_per_minute"),
            "usage_page.rate_per_minute",
            "must be between 1 and 100000",
        );
    }
    page.enabled.then_some(page)
}

pub(super) fn cluster(sink: &mut ErrorSink<'_>, root: &Table) -> Option<ClusterSection> {
    let cluster: ClusterSection = root
        .get("cluster")
        .and_then(|item| read_section(sink, item, "cluster"))?;
    let item = root.get("cluster");
    let span = |key: &str| item.and_then(|i| field_span(i, key));
    if cluster.nats.is_empty() {
        sink.push(span("nats"), "cluster.nats", "at least one NATS URL is required");
    }
    for url in &cluster.nats {
        if !(url.starts_with("nats://") || url.starts_with("tls://")) || url.len() < 8 {
            sink.push(
                span("nats"),
                "cluster.nats",
                format!("invalid NATS URL {url:?}: expected nats://host:port or tls://host:port"),
            );
        }
    }
    let token_ok = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !token_ok(&cluster.region) {
        sink.push(span("region"), "cluster.region", "use letters, digits, '-' and '_'");
    }
    if cluster.node_id.as_deref().is_some_and(|n| !token_ok(n)) {
        sink.push(span("node_id"), "cluster.node_id", "use letters, digits, '-' and '_'");
    }
    if !(1..=5).contains(&cluster.replicas) {
        sink.push(span("replicas"), "cluster.replicas", "must be between 1 and 5");
    }
    Some(cluster)
}

/// `[[routes]]`: each checked on its own, names unique, upstreams declared. Routes are
/// checked against every declared upstream, even one that failed to parse, so a typo in
/// an upstream does not also flag every route that uses it.
pub(super) fn routes(sink: &mut ErrorSink<'_>, root: &Table) -> Vec<RouteSection> {
    let declared_upstreams: HashSet<&str> = root
        .get("upstreams")
        .and_then(Item::as_table)
        .map(|t| t.iter().map(|(k, _)| k).collect())
        .unwrap_or_default();
    let mut routes = Vec::new();
    match root.get("routes") {
        Some(Item::ArrayOfTables(array)) => {
            for (i, table) in array.iter().enumerate() {
                let item = Item::Table(table.clone());
                let field = format!("routes[{i}]");
                if let Some(route) = read_section::<RouteSection>(sink, &item, &field) {
                    routes.push((i, route, item));
                }
            }
        }
        Some(other) => sink.push(other.span(), "routes", "expected [[routes]] tables"),
        None => {}
    }
    let mut seen_names = HashSet::new();
    for (i, route, item) in &routes {
        let field = format!("routes[{i}]");
        check_route(sink, item, &field, route);
        if !seen_names.insert(route.name.as_str()) {
            sink.push(
                field_span(item, "name"),
                &format!("{field}.name"),
                format!("duplicate route name {:?}", route.name),
            );
        }
        if !declared_upstreams.contains(route.upstream.as_str()) {
            sink.push(
                field_span(item, "upstream"),
                &format!("{field}.upstream"),
                format!("unknown upstream {:?}", route.upstream),
            );
        }
    }
    routes.into_iter().map(|(_, route, _)| route).collect()
}

fn check_route(sink: &mut ErrorSink<'_>, item: &Item, field: &str, route: &RouteSection) {
    for (name, value) in &route.response_headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() || http::HeaderValue::from_str(value).is_err() {
            sink.push(
                field_span(item, "response_headers"),
                &format!("{field}.response_headers"),
                format!("invalid header {name:?}: {value:?}"),
            );
        }
    }
    if route.name.trim().is_empty() {
        sink.push(
            field_span(item, "name"),
            &format!("{field}.name"),
            "route name must not be empty",
        );
    }
    if !route.path.starts_with('/') {
        sink.push(
            field_span(item, "path"),
            &format!("{field}.path"),
            format!("path {:?} must start with '/'", route.path),
        );
    }
    for host in &route.hosts {
        let bare = host.strip_prefix("*.").unwrap_or(host);
        let valid = !bare.is_empty()
            && !bare.contains('*')
            && bare
                .split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if !valid {
            sink.push(
                field_span(item, "hosts"),
                &format!("{field}.hosts"),
                format!("invalid host {host:?}: expected a name like api.example.com or *.example.com"),
            );
        }
    }
    for method in &route.methods {
        if http::Method::from_bytes(method.as_bytes()).is_err() || method.bytes().any(|b| b.is_ascii_lowercase()) {
            sink.push(
                field_span(item, "methods"),
                &format!("{field}.methods"),
                format!("invalid method {method:?}: expected an upper-case HTTP method such as GET"),
            );
        }
    }
}
