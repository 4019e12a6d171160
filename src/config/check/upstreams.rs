//! `[upstreams.NAME]`: endpoints, balancing, health, retries, timeouts and TLS to them.

use super::*;

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
pub(in crate::config) fn upstreams(
    sink: &mut ErrorSink<'_>,
    root: &Table,
    path: &Path,
) -> BTreeMap<String, UpstreamSection> {
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
