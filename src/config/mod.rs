//! Configuration: the TOML file format ([`schema`]) is read, every error in it is collected
//! with its file, line and field ([`ConfigErrors`]), and the result is a checked [`Config`]
//! snapshot that the rest of the gateway compiles into its runtime tables.

mod error;
pub mod schema;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{DeserializeOwned, IntoDeserializer};
use toml_edit::{Item, Value};

use error::ErrorSink;
pub use error::{ConfigError, ConfigErrors};
pub use schema::{
    AdminSection, AnonymousBy, AnonymousSection, AuthMethod, EndpointSpec, JwtSection, LbPolicy, PlanSection,
    RouteSection, ServerSection, TimeoutsSection, UpstreamProtocol, UpstreamSection, UsageSection,
};
pub use schema::{ClusterSection, HealthKind, HealthSection, OutlierSection, RetriesSection};

/// A checked configuration. Only [`load`] and [`parse`] build one.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from; reloads read it again.
    pub path: PathBuf,
    pub data_dir: PathBuf,
    pub server: ServerSection,
    pub listen: Vec<SocketAddr>,
    pub admin: AdminSection,
    pub admin_listen: SocketAddr,
    pub upstreams: BTreeMap<String, UpstreamSection>,
    pub routes: Vec<RouteSection>,
    pub plans: BTreeMap<String, PlanSection>,
    pub anonymous: AnonymousSection,
    pub jwt: JwtSection,
    pub usage: UsageSection,
    /// Present in global mode.
    pub cluster: Option<ClusterSection>,
    /// `server.trusted_proxies`, parsed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// How a consistent-hash pool picks its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    /// Lower-case header name.
    Header(String),
}

impl HashKey {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once(':') {
            None if text == "client_ip" => Ok(HashKey::ClientIp),
            Some(("header", name)) if http::HeaderName::from_bytes(name.trim().as_bytes()).is_ok() => {
                Ok(HashKey::Header(name.trim().to_ascii_lowercase()))
            }
            _ => Err(format!(
                "invalid hash_key {text:?}: expected \"client_ip\" or \"header:<name>\""
            )),
        }
    }
}

/// Reads and checks a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let source = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read file: {e}"),
        }])
    })?;
    parse(path, &source)
}

/// Checks configuration text; `path` is used for error locations and relative paths.
pub fn parse(path: &Path, source: &str) -> Result<Config, ConfigErrors> {
    let mut sink = ErrorSink::new(path, source);
    let doc = match toml_edit::Document::parse(source) {
        Ok(doc) => doc,
        Err(e) => {
            sink.push(e.span(), "", e.message().to_string());
            return Err(ConfigErrors(sink.errors));
        }
    };
    let root = doc.as_table();

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

    let data_dir: Option<String> = root
        .get("data_dir")
        .and_then(|item| read_section(&mut sink, item, "data_dir"));
    let server: Option<ServerSection> = match root.get("server") {
        Some(item) => read_section(&mut sink, item, "server"),
        None => Some(ServerSection::default()),
    };
    let admin: Option<AdminSection> = match root.get("admin") {
        Some(item) => read_section(&mut sink, item, "admin"),
        None => Some(AdminSection::default()),
    };

    let mut upstreams = BTreeMap::new();
    match root.get("upstreams") {
        Some(Item::Table(table)) => {
            for (name, item) in table.iter() {
                let field = format!("upstreams.{name}");
                if let Some(upstream) = read_section::<UpstreamSection>(&mut sink, item, &field) {
                    check_upstream(&mut sink, item, &field, &upstream);
                    upstreams.insert(name.to_string(), upstream);
                }
            }
        }
        Some(other) => sink.push(other.span(), "upstreams", "expected a table of named upstreams"),
        None => {}
    }
    // Routes are checked against every declared upstream, even one that failed to parse,
    // so a typo in an upstream does not also flag every route that uses it.
    let declared_upstreams: HashSet<&str> = root
        .get("upstreams")
        .and_then(Item::as_table)
        .map(|t| t.iter().map(|(k, _)| k).collect())
        .unwrap_or_default();

    let anonymous: Option<AnonymousSection> = match root.get("anonymous") {
        Some(item) => read_section(&mut sink, item, "anonymous"),
        None => Some(AnonymousSection::default()),
    };

    let jwt: JwtSection = match root.get("jwt") {
        Some(item) => read_section(&mut sink, item, "jwt").unwrap_or_default(),
        None => JwtSection::default(),
    };
    if let Err(message) =
        crate::auth::jwt::JwtVerifier::from_config(&jwt.issuers, path.parent().unwrap_or(Path::new(".")))
    {
        let span = root.get("jwt").and_then(|i| field_span(i, "issuers"));
        sink.push(span, "jwt.issuers", message);
    }

    let mut plans = BTreeMap::new();
    match root.get("plans") {
        Some(Item::Table(table)) => {
            for (name, item) in table.iter() {
                if let Some(plan) = read_section::<PlanSection>(&mut sink, item, &format!("plans.{name}")) {
                    plans.insert(name.to_string(), plan);
                }
            }
        }
        Some(other) => sink.push(other.span(), "plans", "expected a table of named plans"),
        None => {}
    }

    for (name, plan) in &plans {
        let item = root.get("plans").and_then(|p| p.get(name));
        if plan.rate.as_ref().is_some_and(|r| r.per_second == 0) {
            sink.push(
                item.and_then(|i| i.get("rate"))
                    .and_then(|i| field_span(i, "per_second")),
                &format!("plans.{name}.rate.per_second"),
                "must be at least 1",
            );
        }
    }

    let usage: UsageSection = match root.get("usage") {
        Some(item) => read_section(&mut sink, item, "usage").unwrap_or_default(),
        None => UsageSection::default(),
    };
    let usage_item = root.get("usage");
    if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&usage.flush_interval) {
        sink.push(
            usage_item.and_then(|i| field_span(i, "flush_interval")),
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
                usage_item.and_then(|i| field_span(i, field)),
                &format!("usage.{field}"),
                "must be at least 32 days",
            );
        }
    }

    let cluster: Option<ClusterSection> = root
        .get("cluster")
        .and_then(|item| read_section(&mut sink, item, "cluster"));
    if let Some(cluster) = &cluster {
        let item = root.get("cluster");
        if cluster.nats.is_empty() {
            sink.push(
                item.and_then(|i| field_span(i, "nats")),
                "cluster.nats",
                "at least one NATS URL is required",
            );
        }
        for url in &cluster.nats {
            if !(url.starts_with("nats://") || url.starts_with("tls://")) || url.len() < 8 {
                sink.push(
                    item.and_then(|i| field_span(i, "nats")),
                    "cluster.nats",
                    format!("invalid NATS URL {url:?}: expected nats://host:port or tls://host:port"),
                );
            }
        }
        let token_ok =
            |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !token_ok(&cluster.region) {
            sink.push(
                item.and_then(|i| field_span(i, "region")),
                "cluster.region",
                "use letters, digits, '-' and '_'",
            );
        }
        if cluster.node_id.as_deref().is_some_and(|n| !token_ok(n)) {
            sink.push(
                item.and_then(|i| field_span(i, "node_id")),
                "cluster.node_id",
                "use letters, digits, '-' and '_'",
            );
        }
        if !(1..=5).contains(&cluster.replicas) {
            sink.push(
                item.and_then(|i| field_span(i, "replicas")),
                "cluster.replicas",
                "must be between 1 and 5",
            );
        }
    }

    let mut routes = Vec::new();
    match root.get("routes") {
        Some(Item::ArrayOfTables(array)) => {
            for (i, table) in array.iter().enumerate() {
                let item = Item::Table(table.clone());
                let field = format!("routes[{i}]");
                if let Some(route) = read_section::<RouteSection>(&mut sink, &item, &field) {
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
        check_route(&mut sink, item, &field, route);
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

    let mut listen = Vec::new();
    let mut trusted_proxies = Vec::new();
    if let Some(server) = &server {
        let server_item = root.get("server");
        for text in &server.listen {
            match text.parse::<SocketAddr>() {
                Ok(addr) => listen.push(addr),
                Err(_) => sink.push(
                    server_item.and_then(|i| field_span(i, "listen")),
                    "server.listen",
                    format!("invalid listen address {text:?}: expected ip:port"),
                ),
            }
        }
        if server.listen.is_empty() {
            sink.push(
                server_item.and_then(|i| field_span(i, "listen")),
                "server.listen",
                "at least one listen address is required",
            );
        }
        for text in &server.trusted_proxies {
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => trusted_proxies.push(net),
                Err(_) => sink.push(
                    server_item.and_then(|i| field_span(i, "trusted_proxies")),
                    "server.trusted_proxies",
                    format!("invalid CIDR {text:?}: expected e.g. 10.0.0.0/8 or 192.0.2.1"),
                ),
            }
        }
        if server.max_header_bytes < 1024 {
            sink.push(
                server_item.and_then(|i| field_span(i, "max_header_bytes")),
                "server.max_header_bytes",
                "must be at least 1024",
            );
        }
    }

    let mut admin_listen = None;
    if let Some(admin) = &admin {
        let admin_item = root.get("admin");
        match admin.listen.parse::<SocketAddr>() {
            Ok(addr) => {
                if !addr.ip().is_loopback() && admin.token.as_deref().unwrap_or("").is_empty() {
                    sink.push(
                        admin_item.and_then(|i| key_span(i, "token").or_else(|| field_span(i, "listen"))),
                        "admin.token",
                        "an admin API listening beyond loopback requires a token",
                    );
                }
                admin_listen = Some(addr);
            }
            Err(_) => sink.push(
                admin_item.and_then(|i| field_span(i, "listen")),
                "admin.listen",
                format!("invalid listen address {:?}: expected ip:port", admin.listen),
            ),
        }
    }

    if !sink.errors.is_empty() {
        sink.errors.sort_by_key(|e| (e.line, e.column));
        return Err(ConfigErrors(sink.errors));
    }
    // All sections parsed: any `None` above has pushed an error, so these are present.
    let (Some(server), Some(admin), Some(admin_listen), Some(anonymous)) = (server, admin, admin_listen, anonymous)
    else {
        return Err(ConfigErrors(sink.errors));
    };
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let data_dir = base.join(data_dir.unwrap_or_else(|| "./data".to_string()));
    Ok(Config {
        path: path.to_path_buf(),
        data_dir,
        server,
        listen,
        admin,
        admin_listen,
        upstreams,
        routes: routes.into_iter().map(|(_, r, _)| r).collect(),
        plans,
        anonymous,
        jwt,
        usage,
        cluster,
        trusted_proxies,
    })
}

/// Deserializes one section on its own, after `${ENV}` substitution, recording any error.
fn read_section<T: DeserializeOwned>(sink: &mut ErrorSink<'_>, item: &Item, field: &str) -> Option<T> {
    let mut substituted = item.clone();
    substitute_env(sink, &mut substituted, item, field);
    let value = match substituted.into_value() {
        Ok(value) => value,
        Err(_) => {
            sink.push(item.span(), field, "expected a value");
            return None;
        }
    };
    // serde stops at the first bad field; to report every one, drop the offending key and
    // try again until the rest parses or an error cannot be pinned to a key.
    let mut value = value;
    for _ in 0..64 {
        match T::deserialize(value.clone().into_deserializer()) {
            // A section parsed without its bad keys (defaults in their place) still goes
            // through the semantic checks, so one run reports those errors too; the
            // configuration as a whole is refused because errors were recorded.
            Ok(section) => return Some(section),
            Err(e) => {
                let span = e.span().or_else(|| item_span(item));
                let inner = span.as_ref().and_then(|s| field_at(item, s.start)).unwrap_or_default();
                let path = if inner.is_empty() {
                    field.to_string()
                } else {
                    format!("{field}.{inner}")
                };
                sink.push(span, &path, e.message().to_string());
                let top_key = inner.split(['.', '[']).next().unwrap_or("");
                let removed =
                    !top_key.is_empty() && value.as_inline_table_mut().is_some_and(|t| t.remove(top_key).is_some());
                if !removed {
                    return None;
                }
            }
        }
    }
    None
}

/// Replaces `${NAME}` in every string value with the environment variable `NAME`.
fn substitute_env(sink: &mut ErrorSink<'_>, item: &mut Item, original: &Item, field: &str) {
    match item {
        Item::Value(value) => substitute_value(sink, value, original.span(), field),
        Item::Table(table) => {
            for (key, child) in table.iter_mut() {
                let child_field = format!("{field}.{}", key.get());
                let orig = original.get(key.get()).unwrap_or(&Item::None);
                substitute_env(sink, child, orig, &child_field);
            }
        }
        Item::ArrayOfTables(array) => {
            for (i, table) in array.iter_mut().enumerate() {
                for (key, child) in table.iter_mut() {
                    let child_field = format!("{field}[{i}].{}", key.get());
                    substitute_env(sink, child, &Item::None, &child_field);
                }
            }
        }
        Item::None => {}
    }
}

fn substitute_value(sink: &mut ErrorSink<'_>, value: &mut Value, span: Option<Range<usize>>, field: &str) {
    match value {
        Value::String(s) if s.value().contains("${") => match expand_env(s.value()) {
            Ok(expanded) => *value = Value::from(expanded),
            Err(message) => sink.push(span.or_else(|| value.span()), field, message),
        },
        Value::Array(array) => {
            for v in array.iter_mut() {
                let span = v.span();
                substitute_value(sink, v, span, field);
            }
        }
        Value::InlineTable(table) => {
            for (key, v) in table.iter_mut() {
                let span = v.span();
                let child_field = format!("{field}.{}", key.get());
                substitute_value(sink, v, span, &child_field);
            }
        }
        _ => {}
    }
}

/// Expands `${NAME}` from the process environment; `$${` is a literal `${`.
pub fn expand_env(text: &str) -> Result<String, String> {
    expand_with(text, |name| std::env::var(name).ok())
}

fn expand_with(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                return Err(format!("unterminated ${{...}} in {text:?}"));
            };
            let name = &after[..end];
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => return Err(format!("environment variable {name} is not set")),
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn item_span(item: &Item) -> Option<Range<usize>> {
    match item {
        Item::Table(t) => t.span(),
        Item::ArrayOfTables(a) => a.span(),
        other => other.span(),
    }
}

/// The span of `key` inside a table-like item (its value, else its key), or the item's
/// own span when the key is absent.
fn field_span(item: &Item, key: &str) -> Option<Range<usize>> {
    key_span(item, key).or_else(|| item_span(item))
}

fn key_span(item: &Item, key: &str) -> Option<Range<usize>> {
    let table = item.as_table_like()?;
    let (k, v) = table.get_key_value(key)?;
    v.span().or_else(|| k.span())
}

/// The span of element `index` of the array under `key`.
fn element_span(item: &Item, key: &str, index: usize) -> Option<Range<usize>> {
    let array = item.as_table_like()?.get(key)?.as_array()?;
    array.get(index)?.span().or_else(|| field_span(item, key))
}

/// The dotted path (relative to `item`) of the deepest key whose key or value contains `offset`.
fn field_at(item: &Item, offset: usize) -> Option<String> {
    let contains =
        |span: Option<Range<usize>>| span.is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1));
    if let Some(table) = item.as_table_like() {
        for (key, child) in table.iter() {
            let key_span = table.get_key_value(key).and_then(|(k, _)| k.span());
            let inner = field_at(child, offset);
            if contains(key_span) || contains(child.span()) || inner.is_some() {
                return Some(match inner {
                    Some(inner) if inner.starts_with('[') => format!("{key}{inner}"),
                    Some(inner) if !inner.is_empty() => format!("{key}.{inner}"),
                    _ => key.to_string(),
                });
            }
        }
    }
    if let Some(Value::Array(array)) = item.as_value() {
        for (i, v) in array.iter().enumerate() {
            if contains(v.span()) {
                let inner = field_at(&Item::Value(v.clone()), offset).unwrap_or_default();
                return Some(if inner.is_empty() {
                    format!("[{i}]")
                } else {
                    format!("[{i}].{inner}")
                });
            }
        }
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(src: &str) -> Vec<ConfigError> {
        parse(Path::new("t.toml"), src)
            .expect_err("config should be rejected")
            .0
    }

    const VALID: &str = r#"
[server]
listen = ["127.0.0.1:0"]

[upstreams.geo]
endpoints = ["127.0.0.1:9000", { address = "localhost:9001", weight = 3 }]
lb = "least_requests"

[[routes]]
name = "lookup"
path = "/v1/lookup"
upstream = "geo"
"#;

    #[test]
    fn valid_config_parses() {
        let config = parse(Path::new("/etc/t.toml"), VALID).expect("valid");
        assert_eq!(config.routes.len(), 1);
        assert_eq!(config.upstreams["geo"].endpoints[1].weight, 3);
        assert_eq!(config.upstreams["geo"].lb, LbPolicy::LeastRequests);
        assert_eq!(config.data_dir, PathBuf::from("/etc/./data"));
    }

    #[test]
    fn every_error_is_reported_with_line_and_field() {
        let src = r#"
[server]
listen = ["127.0.0.1:0"]
lsten = 3

[upstreams.geo]
endpoints = ["127.0.0.1:9000"]
lb = "fastest"

[[routes]]
name = "a"
upstream = "nope"
"#;
        let errs = errors(src);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert_eq!((errs[0].line, errs[0].field.as_str()), (4, "server.lsten"));
        assert!(errs[0].message.contains("unknown field"), "{}", errs[0].message);
        assert_eq!((errs[1].line, errs[1].field.as_str()), (8, "upstreams.geo.lb"));
        assert_eq!((errs[2].line, errs[2].field.as_str()), (12, "routes[0].upstream"));
    }

    #[test]
    fn syntax_error_names_the_line() {
        let errs = errors("[server]\nlisten = [\"a\"\n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].line >= 2, "{:?}", errs[0]);
    }

    #[test]
    fn env_substitution() {
        let path = std::env::var("PATH").expect("PATH is set");
        let src = format!("{VALID}\n[admin]\ntoken = \"x${{PATH}}y\"\n");
        let config = parse(Path::new("t.toml"), &src).expect("valid");
        assert_eq!(config.admin.token, Some(format!("x{path}y")));
        let fake = |name: &str| (name == "A").then(|| "1".to_string());
        assert_eq!(expand_with("${A}-${A}", fake).unwrap(), "1-1");
        assert!(expand_with("${A", fake).is_err());
        let src = format!("{VALID}\n[admin]\ntoken = \"${{TG_TEST_UNSET_VAR}}\"\n");
        let errs = errors(&src);
        assert_eq!(errs[0].field, "admin.token");
        assert!(errs[0].message.contains("TG_TEST_UNSET_VAR"));
        assert_eq!(expand_env("a$${b}c$").unwrap(), "a${b}c$");
    }

    #[test]
    fn bad_duration_and_hash_key() {
        let src = r#"
[upstreams.geo]
endpoints = ["127.0.0.1:9000"]
lb = "consistent_hash"
hash_key = "cookie:x"

[upstreams.geo.timeouts]
connect = "3 parsecs"
"#;
        let errs = errors(src);
        assert!(
            errs.iter()
                .any(|e| e.field == "upstreams.geo.timeouts.connect" && e.line == 8),
            "{errs:?}"
        );
    }

    #[test]
    fn semantic_errors() {
        let src = r#"
[server]
listen = ["nowhere"]

[admin]
listen = "0.0.0.0:9901"

[upstreams.geo]
endpoints = ["bad host:80", { address = "127.0.0.1:1", weight = 0 }]
hash_key = "cookie:x"

[[routes]]
name = "a"
path = "v1"
hosts = ["*.*.x"]
methods = ["get"]
upstream = "geo"

[[routes]]
name = "a"
upstream = "geo"
"#;
        let fields: Vec<String> = errors(src).into_iter().map(|e| e.field).collect();
        for expected in [
            "server.listen",
            "admin.token",
            "upstreams.geo.endpoints[0]",
            "upstreams.geo.endpoints[1].weight",
            "upstreams.geo.hash_key",
            "routes[0].path",
            "routes[0].hosts",
            "routes[0].methods",
            "routes[1].name",
        ] {
            assert!(fields.iter().any(|f| f == expected), "missing {expected} in {fields:?}");
        }
    }
}
