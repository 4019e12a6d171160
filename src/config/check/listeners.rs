//! `[server]`, `[server.tls]` and `[admin]`: the addresses clients and operators connect to,
//! their limits and their certificates.

use super::*;

/// A `listen` list, parsed: at least one `ip:port`, each error reported at `span`.
fn listen_addresses(
    sink: &mut ErrorSink<'_>,
    span: Option<std::ops::Range<usize>>,
    field: &str,
    list: &[String],
) -> Vec<SocketAddr> {
    let mut listen = Vec::new();
    for text in list {
        match text.parse::<SocketAddr>() {
            Ok(addr) => listen.push(addr),
            Err(_) => sink.push(
                span.clone(),
                field,
                format!("invalid listen address {text:?}: expected ip:port"),
            ),
        }
    }
    if list.is_empty() {
        sink.push(span, field, "at least one listen address is required");
    }
    listen
}

/// `[server]`, with its listen addresses and trusted proxies parsed.
pub(in crate::config) fn server(
    sink: &mut ErrorSink<'_>,
    root: &Table,
) -> Option<(ServerSection, Vec<SocketAddr>, Vec<ipnet::IpNet>)> {
    let server: ServerSection = optional(sink, root, "server")?;
    let item = root.get("server");
    let span = |key: &str| item.and_then(|i| field_span(i, key));
    let listen = listen_addresses(sink, span("listen"), "server.listen", &server.listen);
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
pub(in crate::config) fn tls(sink: &mut ErrorSink<'_>, root: &Table, path: &Path) -> Option<crate::config::TlsConfig> {
    let item = root.get("server")?.get("tls")?;
    let section: TlsSection = read_section(sink, item, "server.tls")?;
    let span = |key: &str| field_span(item, key);
    let listen = listen_addresses(sink, span("listen"), "server.tls.listen", &section.listen);
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
    Some(crate::config::TlsConfig { listen, options })
}

/// `[admin] tls`: the admin API's certificate, loaded and checked.
pub(in crate::config) fn admin_tls(
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
pub(in crate::config) fn admin(sink: &mut ErrorSink<'_>, root: &Table) -> Option<(AdminSection, SocketAddr)> {
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
