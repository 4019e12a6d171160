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

/// `[server]`, with its listen addresses and trusted proxies parsed.
pub(super) fn server(
    sink: &mut ErrorSink<'_>,
    root: &Table,
) -> Option<(ServerSection, Vec<SocketAddr>, Vec<ipnet::IpNet>)> {
    let server: ServerSection = optional(sink, root, "server")?;
    let item = root.get("server");
    let span = |key: &str| item.and_then(|i| field_span(i, key));
    let mut listen = Vec::new();
    for text in &server.listen {
        match text.parse::<SocketAddr>() {
            Ok(addr) => listen.push(addr),
            Err(_) => sink.push(
                span("listen"),
                "server.listen",
                format!("invalid listen address {text:?}: expected ip:port"),
            ),
        }
    }
    if server.listen.is_empty() {
        sink.push(
            span("listen"),
            "server.listen",
            "at least one listen address is required",
        );
    }
    let mut trusted_proxies = Vec::new();
    for text in &server.trusted_proxies {
        let parsed = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => sink.push(
                span("trusted_proxies"),
                "server.trusted_proxies",
                format!("invalid CIDR {text:?}: expected e.g. 10.0.0.0/8 or 192.0.2.1"),
            ),
        }
    }
    if server.max_header_bytes < 1024 {
        sink.push(
            span("max_header_bytes"),
            "server.max_header_bytes",
            "must be at least 1024",
        );
    }
    if server.connections_ipv6_prefix > 128 {
        sink.push(
            span("connections_ipv6_prefix"),
            "server.connections_ipv6_prefix",
            "must be between 0 and 128",
        );
    }
    if server.http2_max_concurrent_streams == 0 {
        sink.push(
            span("http2_max_concurrent_streams"),
            "server.http2_max_concurrent_streams",
            "must be at least 1",
        );
    }
    for (key, value) in [
        ("client_body_timeout", server.client_body_timeout),
        ("send_timeout", server.send_timeout),
        ("tunnel_idle_timeout", server.tunnel_idle_timeout),
        ("idle_timeout", server.idle_timeout),
        ("header_read_timeout", server.header_read_timeout),
    ] {
        if value.is_zero() {
            sink.push(span(key), &format!("server.{key}"), "must be more than 0s");
        }
    }
    Some((server, listen, trusted_proxies))
}

/// `[server.tls]`: its addresses parsed and every certificate loaded and checked (files
/// relative to `path`).
pub(super) fn tls(sink: &mut ErrorSink<'_>, root: &Table, path: &Path) -> Option<super::TlsConfig> {
    let item = root.get("server")?.get("tls")?;
    let section: TlsSection = read_section(sink, item, "server.tls")?;
    let span = |key: &str| field_span(item, key);
    let mut listen = Vec::new();
    for text in &section.listen {
        match text.parse::<SocketAddr>() {
            Ok(addr) => listen.push(addr),
            Err(_) => sink.push(
                span("listen"),
                "server.tls.listen",
                format!("invalid listen address {text:?}: expected ip:port"),
            ),
        }
    }
    if section.listen.is_empty() {
        sink.push(
            span("listen"),
            "server.tls.listen",
            "at least one listen address is required",
        );
    }
    if section.certificates.is_empty() {
        sink.push(
            span("certificates"),
            "server.tls.certificates",
            "at least one certificate is required",
        );
    }
    if section.certificates.iter().filter(|c| c.default).count() > 1 {
        sink.push(
            span("certificates"),
            "server.tls.certificates",
            "at most one certificate may be the default",
        );
    }
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let certificates: Vec<crate::tls::CertFiles> = section
        .certificates
        .iter()
        .map(|c| crate::tls::CertFiles {
            cert: base.join(&c.cert),
            key: base.join(&c.key),
            names: c.names.clone(),
            default: c.default,
        })
        .collect();
    for (i, files) in certificates.iter().enumerate() {
        if let Err(message) = crate::tls::load_certificate(files) {
            sink.push(
                element_span(item, "certificates", i),
                &format!("server.tls.certificates[{i}]"),
                message,
            );
        }
    }
    let options = crate::tls::TlsOptions {
        certificates,
        min_version: match section.min_version {
            TlsVersion::Tls12 => crate::tls::MinVersion::Tls12,
            TlsVersion::Tls13 => crate::tls::MinVersion::Tls13,
        },
        reject_unknown_sni: section.unknown_sni == UnknownSni::Reject,
        client_ca: section.client_ca.as_ref().map(|ca| base.join(ca)),
        client_auth_required: section.client_auth == ClientAuth::Required,
    };
    if options.client_ca.is_some()
        && let Err(message) = crate::tls::server_config(&options)
        && message.starts_with("client_ca")
    {
        sink.push(span("client_ca"), "server.tls.client_ca", message);
    }
    Some(super::TlsConfig { listen, options })
}

/// `[admin] tls`: the admin API's certificate, loaded and checked.
pub(super) fn admin_tls(
    sink: &mut ErrorSink<'_>,
    root: &Table,
    admin: &AdminSection,
    path: &Path,
) -> Option<crate::tls::TlsOptions> {
    let tls = admin.tls.as_ref()?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let files = crate::tls::CertFiles {
        cert: base.join(&tls.cert),
        key: base.join(&tls.key),
        names: vec![],
        default: true,
    };
    if let Err(message) = crate::tls::load_certificate(&files) {
        let span = root.get("admin").and_then(|i| field_span(i, "tls"));
        sink.push(span, "admin.tls", message);
    }
    Some(crate::tls::TlsOptions {
        certificates: vec![files],
        min_version: crate::tls::MinVersion::Tls12,
        reject_unknown_sni: false,
        client_ca: None,
        client_auth_required: false,
    })
}

/// `[admin]`, with its listen address parsed; beyond loopback it needs a token.
pub(super) fn admin(sink: &mut ErrorSink<'_>, root: &Table) -> Option<(AdminSection, SocketAddr)> {
    let admin: AdminSection = optional(sink, root, "admin")?;
    let item = root.get("admin");
    if admin.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        // Usually `token = "${TOLLGATE_ADMIN_TOKEN}"` with the variable unset or empty:
        // starting would silently turn admin authentication off.
        sink.push(
            item.and_then(|i| key_span(i, "token")),
            "admin.token",
            "is empty (an unset environment variable?): remove it to run without a token on loopback, or set it",
        );
    }
    match admin.listen.parse::<SocketAddr>() {
        Ok(addr) => {
            if !addr.ip().is_loopback() && admin.token.as_deref().unwrap_or("").is_empty() {
                sink.push(
                    item.and_then(|i| key_span(i, "token").or_else(|| field_span(i, "listen"))),
                    "admin.token",
                    "an admin API listening beyond loopback requires a token",
                );
            }
            Some((admin, addr))
        }
        Err(_) => {
            sink.push(
                item.and_then(|i| field_span(i, "listen")),
                "admin.listen",
                format!("invalid listen address {:?}: expected ip:port", admin.listen),
            );
            None
        }
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

/// `https://` endpoints turn `tls` on (a pool speaks TLS to all its endpoints or to none);
/// TLS file paths become relative to the configuration file and are loaded to check them.
fn upstream_tls(sink: &mut ErrorSink<'_>, item: &Item, field: &str, upstream: &mut UpstreamSection, base: &Path) {
    let mut schemes = HashSet::new();
    for (i, endpoint) in upstream.endpoints.iter_mut().enumerate() {
        let (https, rest) = match endpoint.address.split_once("://") {
            Some(("https", rest)) => (true, rest.to_string()),
            Some(("http", rest)) => (false, rest.to_string()),
            Some((scheme, _)) => {
                sink.push(
                    element_span(item, "endpoints", i),
                    &format!("{field}.endpoints[{i}]"),
                    format!("unknown scheme {scheme:?}: use https:// or http:// (or none)"),
                );
                continue;
            }
            None => (upstream.tls, endpoint.address.clone()),
        };
        schemes.insert(https);
        endpoint.address = rest.trim_end_matches('/').to_string();
    }
    if schemes.len() > 1 {
        sink.push(
            field_span(item, "endpoints"),
            &format!("{field}.endpoints"),
            "a pool speaks TLS to all its endpoints or to none: do not mix https:// and plain ones",
        );
    }
    upstream.tls |= schemes.contains(&true);
    let resolve = |path: &mut Option<String>| {
        if let Some(p) = path {
            *p = base.join(&*p).display().to_string();
        }
    };
    resolve(&mut upstream.tls_ca);
    resolve(&mut upstream.tls_cert);
    resolve(&mut upstream.tls_key);
    if upstream.tls_cert.is_some() != upstream.tls_key.is_some() {
        sink.push(
            field_span(item, "tls_cert"),
            &format!("{field}.tls_cert"),
            "tls_cert and tls_key go together",
        );
    } else if upstream.tls {
        let identity = upstream
            .tls_cert
            .as_deref()
            .zip(upstream.tls_key.as_deref())
            .map(|(c, k)| (Path::new(c), Path::new(k)));
        if let Err(message) = crate::tls::client_config(upstream.tls_ca.as_deref().map(Path::new), identity, &[]) {
            sink.push(field_span(item, "tls_ca"), &format!("{field}.tls"), message);
        }
    }
}

/// `[upstreams.NAME]`, each checked on its own.
pub(super) fn upstreams(sink: &mut ErrorSink<'_>, root: &Table, path: &Path) -> BTreeMap<String, UpstreamSection> {
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let mut upstreams = BTreeMap::new();
    match root.get("upstreams") {
        Some(Item::Table(table)) => {
            for (name, item) in table.iter() {
                let field = format!("upstreams.{name}");
                if let Some(mut upstream) = read_section::<UpstreamSection>(sink, item, &field) {
                    upstream_tls(sink, item, &field, &mut upstream, base);
                    check_upstream(sink, item, &field, &upstream);
                    upstreams.insert(name.to_string(), upstream);
                }
            }
        }
        Some(other) => sink.push(other.span(), "upstreams", "expected a table of named upstreams"),
        None => {}
    }
    upstreams
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

fn check_upstream(sink: &mut ErrorSink<'_>, item: &Item, field: &str, upstream: &UpstreamSection) {
    if upstream.endpoints.is_empty() {
        sink.push(
            field_span(item, "endpoints"),
            &format!("{field}.endpoints"),
            "at least one endpoint is required",
        );
    }
    for (i, endpoint) in upstream.endpoints.iter().enumerate() {
        if let Err(message) = check_host_port(&endpoint.address) {
            sink.push(
                element_span(item, "endpoints", i),
                &format!("{field}.endpoints[{i}]"),
                message,
            );
        }
        if endpoint.weight == 0 || endpoint.weight > 1000 {
            sink.push(
                element_span(item, "endpoints", i),
                &format!("{field}.endpoints[{i}].weight"),
                "weight must be between 1 and 1000",
            );
        }
    }
    match (&upstream.lb, &upstream.hash_key) {
        (_, Some(key)) => {
            if let Err(message) = HashKey::parse(key) {
                sink.push(field_span(item, "hash_key"), &format!("{field}.hash_key"), message);
            }
        }
        (LbPolicy::ConsistentHash, None) => {}
        _ => {}
    }
    if upstream.timeouts.connect.is_zero() || upstream.timeouts.read.is_zero() {
        sink.push(
            field_span(item, "timeouts"),
            &format!("{field}.timeouts"),
            "timeouts must be greater than zero",
        );
    }
}

fn check_host_port(address: &str) -> Result<(), String> {
    if address.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("invalid endpoint {address:?}: expected host:port"));
    };
    if port.parse::<u16>().is_err() {
        return Err(format!("invalid endpoint {address:?}: bad port {port:?}"));
    }
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid_host {
        return Err(format!("invalid endpoint {address:?}: bad host name {host:?}"));
    }
    Ok(())
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
