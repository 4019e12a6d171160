//! `logging`'s access-log part: the request's record, in two steps: what the request head
//! says (before the exchange consumes the request), then what came of it. The record is
//! finished by the response body (bytes sent, total latency). The schema is in
//! docs/access-logs.md; no credential reaches it: keys and tokens are never read into it,
//! and credential parameters are removed from a recorded query.

use http::StatusCode;

use super::{Caller, Head, RequestCtx};
use crate::base::ErrorKind;
use crate::gateway::Route;
use crate::logs::log_key;
use crate::logs::{Pending, RecordSettings};

/// Query parameters that may carry a secret, compared without case after decoding.
const SECRET_PARAMETERS: &[&str] = &[
    "api_key",
    "api-key",
    "apikey",
    "key",
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "auth",
    "authorization",
    "password",
    "passwd",
    "secret",
    "client_secret",
    "signature",
    "sig",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
];

/// The head's part: method, path (normalized), query if configured, Referer host, body
/// length, protocol.
pub(super) fn record_request(record: &mut Pending, settings: &RecordSettings, ctx: &RequestCtx<'_>, head: Head<'_>) {
    let include_query = settings.include_query;
    let mut fields = record.fields();
    fields
        .request_id(log_key!("request_id"), ctx.request_id)
        // A method is a token: no character a JSON string must escape.
        .trusted(log_key!("method"), head.method.as_str())
        .bytes(
            log_key!("path"),
            ctx.path.as_deref().unwrap_or(head.uri.path()).as_bytes(),
        );
    match head.uri.query().filter(|_| include_query) {
        Some(query) => fields.str(log_key!("query"), &without_secrets(query)),
        None => fields.null(log_key!("query")),
    };
    let referer = match &ctx.caller {
        Caller::Anonymous { referer_host } => referer_host.clone(),
        _ => head
            .text(&http::header::REFERER)
            .and_then(crate::auth::referer_host)
            .filter(|host| host.len() <= 253),
    };
    fields
        .opt_str(log_key!("referer_host"), referer.as_deref())
        .trusted(log_key!("protocol"), version_name(head.version));
}

/// What came of the request: who called, how it was decided, where it went.
pub(super) fn record_response(
    record: &mut Pending,
    settings: &RecordSettings,
    route: Option<&Route>,
    ctx: &RequestCtx<'_>,
    status: StatusCode,
) {
    let sample = settings.sample;
    let mut fields = record.fields();
    let bytes_in = ctx.body_read.as_ref().map_or(ctx.declared_body, |read| {
        read.load(std::sync::atomic::Ordering::Relaxed)
    });
    fields.u64(log_key!("bytes_in"), bytes_in);
    match route {
        Some(route) => fields.checked(log_key!("route"), &route.name, route.plain_name),
        None => fields.null(log_key!("route")),
    };
    let auth = match &ctx.caller {
        Caller::Key { .. } => "api_key",
        Caller::Jwt(_) => "jwt",
        Caller::Anonymous { .. } => "anonymous",
        Caller::Public => "none",
    };
    match ctx.caller.identity() {
        // Names checked when the key was loaded (`KeyEntry::plain_names`).
        Some(id) => fields
            .checked(log_key!("consumer"), &id.consumer_id, id.plain_names)
            .checked(log_key!("key_id"), &id.key_id, id.plain_names),
        None => fields.null(log_key!("consumer")).null(log_key!("key_id")),
    };
    fields.trusted(log_key!("auth"), auth);
    if ctx.caller_ip == ctx.conn.peer.ip() {
        // Rendered once per connection already, by `IpAddr`'s `Display`: digits, dots,
        // colons and hex letters, nothing to escape.
        fields.trusted_bytes(log_key!("client_ip"), ctx.conn.forwarded.peer_ip());
    } else {
        fields.display(log_key!("client_ip"), &ctx.caller_ip);
    }
    fields.u64(log_key!("status"), u64::from(status.as_u16()));
    match ctx.error {
        Some(kind) => fields.trusted(log_key!("error"), kind.code()),
        None => fields.null(log_key!("error")),
    };
    match (&ctx.error, &ctx.limit) {
        // Group names come from the configuration: escaped like any text.
        (Some(ErrorKind::RateLimited | ErrorKind::QuotaExceeded), Some(limit)) => {
            fields.str(log_key!("decision"), &limit.name.policy())
        }
        _ if ctx.admitted => fields.trusted(log_key!("decision"), "admitted"),
        _ => fields.null(log_key!("decision")),
    };
    match &ctx.upstream_addr {
        Some(addr) => fields.addr(log_key!("upstream"), addr),
        None => fields.null(log_key!("upstream")),
    };
    fields
        .opt_u64(log_key!("upstream_status"), ctx.upstream_status.map(u64::from))
        .u64(log_key!("tries"), u64::from(ctx.tries))
        .opt_millis(log_key!("upstream_latency_ms"), ctx.upstream_micros);
    match ctx.conn.tls_version {
        Some(version) => fields.trusted(log_key!("tls"), version),
        None => fields.null(log_key!("tls")),
    };
    // Errors and refusals are always kept; successes by the configured share.
    if sample < 1.0 && status.as_u16() < 400 && ctx.error.is_none() && fastrand::f64() >= sample {
        record.sample_out();
    }
}

fn version_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "other",
    }
}

/// `query` without parameters that may carry a credential.
fn without_secrets(query: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
            let decoded = percent_decode_lower(name);
            !SECRET_PARAMETERS.contains(&decoded.as_str())
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn percent_decode_lower(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_parameters_never_reach_the_record() {
        assert_eq!(
            without_secrets("q=1&api_key=tg_live_x&API%5Fkey=y&Token=z&x=2&access_token=t&sig=s"),
            "q=1&x=2"
        );
        assert_eq!(without_secrets("api-key"), "");
        assert_eq!(without_secrets("keyboard=1"), "keyboard=1");
    }
}
