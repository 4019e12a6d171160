//! The head filters on either side of the exchange: `upstream_request_filter` turns the
//! client's request head into the upstream's, `response_filter` the response head into
//! the client's.

use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header};

use super::{Caller, ConnInfo, KeySource, ProxyBody, RequestCtx, headers};
use crate::auth::KEY_PREFIX;
use crate::base::http1::{RawHeaders, same_name};
use crate::base::{ErrorKind, ProxyError};
use crate::config::UpstreamProtocol;
use crate::gateway::Route;
use crate::upstream::h1::{Edits, FieldValue};

/// Phase 3, the target: the URI (prefix stripped, key removed from the query) and the
/// version the upstream gets, set on the request. The fields are [`forwarding`]'s.
pub(super) fn upstream_request_filter<B>(
    route: &Route,
    ctx: &RequestCtx<'_>,
    req: &mut Request<B>,
) -> Result<(), ProxyError> {
    let pool = &route.upstream.pool;
    let strip = route.strip_prefix.then_some(route.path.as_str());
    // Stripped on every route, keyed or not: a caller's secret never reaches an upstream.
    let key_in_query = req.uri().query().is_some_and(has_api_key);
    // Origin-form; the HTTP/2 client adds scheme and authority itself.
    *req.uri_mut() = Uri::from(upstream_target(req.uri(), ctx.path.as_deref(), strip, key_in_query)?);
    *req.version_mut() = match pool.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 => Version::HTTP_2,
    };
    Ok(())
}

/// Phase 3, the fields: `Host`, forwarding headers, request id and the caller as
/// identified, hop-by-hop headers and the caller's credentials removed, as the
/// [`Forwarding`] to write (or apply) when the request is sent. Apart from the target,
/// which can fail, so that the 488-byte `Forwarding` is built where it is kept rather than
/// returned in a `Result` (docs/benchmarks.md, "Fewer and smaller moves").
/// `endpoint_host` is the chosen endpoint's `Host` (used unless the pool preserves the
/// client's).
pub(super) fn forwarding<'c>(
    route: &Route,
    anonymous_plan: &HeaderValue,
    ctx: &RequestCtx<'c>,
    headers: &mut HeaderMap,
    endpoint_host: &'c HeaderValue,
) -> Forwarding<'c> {
    let host = match (&ctx.host, route.upstream.pool.preserve_host) {
        (Some(host), true) => host.clone(),
        _ => FieldValue::Borrowed(endpoint_host),
    };
    Forwarding::new(headers, ctx, host, anonymous_plan)
}

/// Where each field Tollgate sets is in `Forwarding::add`.
const HOST_FIELD: usize = 0;
const FORWARDED_HOST_FIELD: usize = 1;
const REQUEST_ID_FIELD: usize = 2;
/// The connection's own four ([`crate::proxy::ConnFields`]) come last, from here.
const CONN_FIELDS_AT: usize = 6;
const FORWARDED_FOR_FIELD: usize = CONN_FIELDS_AT;
const REAL_IP_FIELD: usize = CONN_FIELDS_AT + 1;
const FORWARDED_PROTO_FIELD: usize = CONN_FIELDS_AT + 2;
const FORWARDED_PORT_FIELD: usize = CONN_FIELDS_AT + 3;

/// What a field of the client's is to the upstream's head, by its name alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Named {
    /// Never forwarded, whatever the route: the caller's credentials (`X-API-Key`), and
    /// the identity fields only Tollgate sets.
    Dropped,
    Authorization,
    /// `Connection` or `Upgrade`: forwarded for a protocol switch only.
    Switch,
    /// Set by Tollgate, at this place in `Forwarding::add`, when it has a value.
    Set(usize),
}

/// Which of the names [`Forwarding::keeps`] decides on `name` (in any case) is, if any.
/// Most names are ruled out by their length alone, and the rest compared with the one or
/// two of that length: going through every list for each field cost about 130
/// instructions a field (docs/benchmarks.md, "Forwarding by name length").
fn named(name: &[u8]) -> Option<Named> {
    let candidates: &[(&str, Named)] = match name.len() {
        4 => &[("host", Named::Set(HOST_FIELD))],
        6 => &[("x-plan", Named::Dropped)],
        7 => &[("upgrade", Named::Switch)],
        9 => &[("x-api-key", Named::Dropped), ("x-real-ip", Named::Set(REAL_IP_FIELD))],
        10 => &[("connection", Named::Switch)],
        12 => &[("x-request-id", Named::Set(REQUEST_ID_FIELD))],
        13 => &[
            ("authorization", Named::Authorization),
            ("x-consumer-id", Named::Dropped),
        ],
        15 => &[("x-forwarded-for", Named::Set(FORWARDED_FOR_FIELD))],
        16 => &[
            ("x-forwarded-host", Named::Set(FORWARDED_HOST_FIELD)),
            ("x-forwarded-port", Named::Set(FORWARDED_PORT_FIELD)),
        ],
        17 => &[("x-forwarded-proto", Named::Set(FORWARDED_PROTO_FIELD))],
        21 => &[("x-client-cert-subject", Named::Dropped)],
        _ => return None,
    };
    candidates
        .iter()
        .find(|(known, _)| same_name(known.as_bytes(), name))
        .map(|&(_, named)| named)
}

/// How the upstream's request head differs from the client's fields: written by the
/// purpose-built client as it encodes the head, so the client's map is neither edited
/// nor copied (docs/architecture.md, "Two HTTP/1.1 paths"), or applied to the map for
/// hyper's client.
pub(super) struct Forwarding<'c> {
    /// Set by Tollgate, replacing any the client sent (`None`: the client's is kept, or
    /// for the identity fields, removed). The connection's own values are borrowed.
    add: [(&'static HeaderName, Option<FieldValue<'c>>); 10],
    /// The client's `Authorization` carried our credentials: it stays here.
    drop_authorization: bool,
    /// A protocol switch: `Connection: upgrade` and `Upgrade` go on.
    upgrade: bool,
    /// The connection's four fields as rendered lines, when they are what `add` holds
    /// for them (the caller is the peer and sent no `X-Forwarded-For`).
    conn_lines: Option<&'c [u8]>,
}

impl<'c> Forwarding<'c> {
    /// `headers` (the client's) lose here only the fields a `Connection` header names,
    /// which are rare; everything else is decided per field as the head is written.
    /// Fields read without a map have theirs marked as read, and are not written (a
    /// protocol switch, which would keep two of them, is never read that way).
    fn new(headers: &mut HeaderMap, ctx: &RequestCtx<'c>, host: FieldValue<'c>, anonymous_plan: &HeaderValue) -> Self {
        let names = ctx.names;
        if ctx.read.is_none()
            && (ctx.upgrade || (names.may_have(&header::CONNECTION) && headers.contains_key(header::CONNECTION)))
        {
            headers::remove_hop_by_hop(headers, ctx.upgrade);
        }
        let fields = headers::Fields::new(headers, names, ctx.read);
        let conn: &'c ConnInfo = ctx.conn;
        // The caller as Tollgate identified it (after trusted proxies and PROXY protocol).
        let from_peer = ctx.caller_ip == ctx.client_addr.ip();
        let real_ip = if from_peer {
            FieldValue::Read(conn.forwarded.peer_ip())
        } else {
            FieldValue::Header(headers::ip_header_value(ctx.caller_ip))
        };
        let forwarded_for = headers::forwarded_for(fields, conn.forwarded.peer_ip());
        let conn_lines =
            (from_peer && matches!(forwarded_for, Some(FieldValue::Read(_)))).then(|| conn.forwarded.lines());
        // A bearer that is not ours (on a public route) is the upstream's business.
        let our_bearer = fields
            .text(&header::AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|token| token.trim().starts_with(KEY_PREFIX));
        // Who the caller is, from Tollgate only.
        let consumer = ctx.identity().and_then(|i| FieldValue::text(&i.consumer_id));
        let plan = match (&ctx.caller, ctx.identity()) {
            (_, Some(identity)) => FieldValue::text(&identity.plan),
            (Caller::Anonymous { .. }, None) => Some(anonymous_plan.clone().into()),
            _ => None,
        };
        Forwarding {
            add: [
                (&headers::HOST, Some(host)),
                (&headers::X_FORWARDED_HOST, ctx.host.clone()),
                (
                    &headers::X_REQUEST_ID,
                    Some(FieldValue::Read(ctx.request_id.as_bytes())),
                ),
                // Only Tollgate says which client certificate was verified.
                (
                    &headers::X_CLIENT_CERT_SUBJECT,
                    conn.client_identity.as_ref().map(FieldValue::Borrowed),
                ),
                (&headers::X_CONSUMER_ID, consumer),
                (&headers::X_PLAN, plan),
                (&headers::X_FORWARDED_FOR, forwarded_for),
                (&headers::X_REAL_IP, Some(real_ip)),
                (
                    &headers::X_FORWARDED_PROTO,
                    Some(FieldValue::Read(conn.forwarded.proto())),
                ),
                (
                    &headers::X_FORWARDED_PORT,
                    Some(FieldValue::Read(conn.forwarded.port())),
                ),
            ],
            drop_authorization: our_bearer || ctx.caller.credentials() == Some(KeySource::Bearer),
            upgrade: ctx.upgrade,
            conn_lines,
        }
    }

    /// The client's field `name` (in any case) goes upstream. The caller's credentials
    /// never reach the upstream, on any route; who they are does, from Tollgate only.
    pub(super) fn keeps(&self, name: &[u8]) -> bool {
        match named(name) {
            Some(Named::Dropped) => false,
            Some(Named::Authorization) => !self.drop_authorization,
            Some(Named::Switch) => self.upgrade,
            Some(Named::Set(at)) => self.add.get(at).is_none_or(|(_, value)| value.is_none()),
            None => !crate::base::http1::is_hop_by_hop(name),
        }
    }

    /// The edits the HTTP/1.1 encoder writes: `keep` (this `keeps`), then the fields
    /// Tollgate sets, the connection's own four as one run of rendered lines when they
    /// can be.
    pub(super) fn edits<'e>(
        &'e self,
        keep: &'e (dyn Fn(&[u8]) -> bool + Sync),
        read: Option<&'e RawHeaders>,
    ) -> Edits<'e> {
        let (add, lines): (&[_], &[u8]) = match self.conn_lines {
            Some(lines) => (self.add.get(..CONN_FIELDS_AT).unwrap_or_default(), lines),
            None => (&self.add, b""),
        };
        Edits { keep, add, lines, read }
    }

    /// A retry's endpoint's `Host`.
    pub(super) fn set_host(&mut self, host: &'c HeaderValue) {
        self.add[HOST_FIELD].1 = Some(FieldValue::Borrowed(host));
    }

    /// Edits `headers` (the client's) into the upstream's, for hyper's client.
    /// `read`: the client's fields as read, when its map is empty.
    pub(super) fn apply(&self, headers: &mut HeaderMap, read: Option<&RawHeaders>) {
        let keep = |name: &[u8]| self.keeps(name);
        Edits {
            keep: &keep,
            add: &self.add,
            lines: b"",
            read,
        }
        .apply(headers);
    }
}

/// The upstream's request target: the normalized path (`normalized`, when it differs),
/// `strip` (the route's prefix) removed from it, `api-key`/`api_key` removed from the
/// query when the key came in it.
fn upstream_target(
    uri: &Uri,
    normalized: Option<&str>,
    strip: Option<&str>,
    key_in_query: bool,
) -> Result<PathAndQuery, ProxyError> {
    if normalized.is_none() && strip.is_none() && !key_in_query {
        return Ok(uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")));
    }
    let path = normalized.unwrap_or(uri.path());
    let path = match strip {
        Some(prefix) => crate::router::strip_route_prefix(prefix, path),
        None => path,
    };
    let query = uri
        .query()
        .map(|q| {
            if key_in_query {
                without_api_key(q)
            } else {
                q.to_string()
            }
        })
        .filter(|q| !q.is_empty());
    let rewritten = match query {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    PathAndQuery::try_from(rewritten).map_err(|e| ProxyError::with_cause(ErrorKind::BadRequest, e))
}

/// The query has an `api-key`/`api_key` parameter.
fn has_api_key(query: &str) -> bool {
    query.split('&').any(|pair| {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        name == "api-key" || name == "api_key"
    })
}

/// The query string without `api-key`/`api_key` parameters.
pub(super) fn without_api_key(query: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
            name != "api-key" && name != "api_key"
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Phase 4: edits the response head for the client: hop-by-hop headers removed (kept on
/// a protocol switch), the route's `response_headers` (e.g. HSTS), `X-Request-Id`, and the
/// `RateLimit` headers of the limit closest to exhaustion (with `Retry-After` on a 429).
pub(super) fn response_filter(ctx: &RequestCtx<'_>, route: Option<&Route>, response: &mut Response<ProxyBody>) {
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers::remove_hop_by_hop(headers, switching);
    for (name, value) in route.map_or(&[][..], |r| &r.response_headers) {
        headers.insert(name, value.clone());
    }
    // Beside the upstream's fields as read, or in the map of a response of Tollgate's own.
    let set = headers::SetFields::new(ctx.request_id.clone(), ctx.limit.clone(), ctx.retry_after);
    match response.body_mut().set_fields_mut() {
        Some(slot) => *slot = set,
        None => set.insert_into(response.headers_mut()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::auth::Identity;
    use crate::proxy::ConnInfo;

    fn ctx(caller: Caller) -> RequestCtx<'static> {
        let conn = Box::leak(Box::new(ConnInfo::new("203.0.113.9:5000".parse().unwrap(), 8443, true)));
        let request_id = Box::leak(Box::new(crate::base::RequestId::Given(HeaderValue::from_static(
            "req-1",
        ))));
        let mut ctx = RequestCtx::new(request_id, Default::default(), None, conn);
        ctx.host = Some(FieldValue::Header(HeaderValue::from_static("api.example.com")));
        ctx.caller = caller;
        ctx
    }

    /// The client's fields as the upstream gets them, through every way of sending them:
    /// written as the head is encoded (the purpose-built client) from the map or from the
    /// fields as read (the purpose-built server builds no map), and applied to the map
    /// (hyper's); all must agree.
    fn forwarding_headers(
        headers: &mut HeaderMap,
        mut ctx: RequestCtx<'_>,
        host: &HeaderValue,
        anonymous: &HeaderValue,
    ) {
        let raw: &'static _ = Box::leak(Box::new(fields_as_read(headers)));
        // As the pipeline does: the names are taken from the client's map first.
        ctx.names = headers::Names::of(headers);
        let forwarding = Forwarding::new(headers, &ctx, FieldValue::Borrowed(host), anonymous);
        let mut request = Request::new(());
        *request.headers_mut() = headers.clone();
        let keep = |name: &[u8]| forwarding.keeps(name);
        let edits = forwarding.edits(&keep, None);
        let mut written = Vec::new();
        crate::upstream::h1::encode_request(&mut written, &request, &edits, &[]);
        forwarding.apply(headers, None);
        let applied: Vec<(String, Vec<u8>)> = sorted(
            headers
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec())),
        );
        assert_eq!(parsed_fields(&written), applied, "written and applied edits agree");

        let mut empty = HeaderMap::new();
        ctx.names = headers::Names::of(&empty);
        ctx.read = Some(raw);
        let from_read = Forwarding::new(&mut empty, &ctx, FieldValue::Borrowed(host), anonymous);
        let keep = |name: &[u8]| from_read.keeps(name);
        let edits = from_read.edits(&keep, ctx.read);
        let mut written = Vec::new();
        crate::upstream::h1::encode_request(&mut written, &Request::new(()), &edits, &[]);
        assert_eq!(parsed_fields(&written), applied, "fields as read are edited alike");
        let mut map = HeaderMap::new();
        from_read.apply(&mut map, ctx.read);
        let applied_read = sorted(map.iter().map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec())));
        assert_eq!(applied_read, applied, "and applied to a map alike");
    }

    fn sorted(fields: impl Iterator<Item = (String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
        let mut fields: Vec<_> = fields.collect();
        fields.sort();
        fields
    }

    /// The fields of a request head, names in lower case, sorted.
    fn parsed_fields(written: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Request::new(&mut slots);
        parsed.parse(written).unwrap();
        sorted(
            parsed
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())),
        )
    }

    /// `headers` as the purpose-built server reads them: a head parsed where it lies, the
    /// names in the case a client might send them.
    fn fields_as_read(headers: &HeaderMap) -> crate::base::http1::RawHeaders {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for (i, (name, value)) in headers.iter().enumerate() {
            let name = if i % 2 == 0 {
                name.as_str().to_ascii_uppercase()
            } else {
                name.to_string()
            };
            crate::base::http1::write_field(&mut head, name.as_bytes(), value.as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        crate::base::http1::RawHeaders::of_request_head(head.into())
    }

    fn key_caller(source: KeySource) -> Caller {
        Caller::Key {
            identity: Identity::new("key_1".into(), Arc::from("acme"), Arc::from("pro")),
            source,
        }
    }

    /// `named` knows every field Tollgate sets at its place in `add`, the fields never
    /// forwarded, and the protocol-switch fields, in any case; other names (hop-by-hop
    /// ones included, which `keeps` checks against the shared list) are not its.
    #[test]
    fn names_are_told_apart_by_length_then_bytes() {
        let dropped = ["x-api-key", "x-client-cert-subject", "x-consumer-id", "x-plan"];
        let mut empty = HeaderMap::new();
        let ctx = ctx(key_caller(KeySource::Header));
        let host = HeaderValue::from_static("10.0.0.5:9000");
        let forwarding = Forwarding::new(
            &mut empty,
            &ctx,
            FieldValue::Borrowed(&host),
            &HeaderValue::from_static("a"),
        );
        let cases = |name: &str| [name.to_string(), name.to_ascii_uppercase()];
        for (at, (name, _)) in forwarding.add.iter().enumerate() {
            let expected = if dropped.contains(&name.as_str()) {
                Named::Dropped
            } else {
                Named::Set(at)
            };
            for name in cases(name.as_str()) {
                assert_eq!(named(name.as_bytes()), Some(expected), "{name}");
            }
        }
        for name in dropped {
            assert_eq!(named(name.as_bytes()), Some(Named::Dropped), "{name}");
            assert!(!forwarding.keeps(name.to_ascii_uppercase().as_bytes()));
        }
        assert_eq!(named(b"Authorization"), Some(Named::Authorization));
        for name in crate::base::http1::HOP_BY_HOP {
            let switch = ["connection", "upgrade"].contains(&name);
            assert_eq!(named(name.as_bytes()), switch.then_some(Named::Switch), "{name}");
            assert!(!forwarding.keeps(name.as_bytes()), "{name}");
        }
        for name in [
            "accept",
            "user-agent",
            "x-forwarded-hosts",
            "x-plan2",
            "x-api-kez",
            "hosT2",
            "x-forwarded-fox",
        ] {
            assert_eq!(named(name.as_bytes()), None, "{name}");
            assert!(forwarding.keeps(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn targets_lose_the_prefix_and_a_key_in_the_query() {
        let uri: Uri = "/geo/v1/8.8.8.8?lang=en&api_key=tg_live_x&x=1".parse().unwrap();
        assert_eq!(
            upstream_target(&uri, None, None, false).unwrap(),
            uri.path_and_query().unwrap().clone()
        );
        assert_eq!(
            upstream_target(&uri, None, Some("/geo"), true).unwrap().as_str(),
            "/v1/8.8.8.8?lang=en&x=1"
        );
        let only_key: Uri = "/geo?api-key=tg_live_x".parse().unwrap();
        assert_eq!(
            upstream_target(&only_key, None, Some("/geo"), true).unwrap().as_str(),
            "/"
        );
        assert_eq!(upstream_target(&only_key, None, None, true).unwrap().as_str(), "/geo");
        // The normalized path is what goes upstream, query kept.
        let dotted: Uri = "/public/../v1/x?a=1".parse().unwrap();
        assert_eq!(
            upstream_target(&dotted, Some("/v1/x"), None, false).unwrap().as_str(),
            "/v1/x?a=1"
        );
    }

    #[test]
    fn credentials_never_reach_the_upstream_and_identity_does() {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static("tg_live_secret"));
        headers.insert("x-consumer-id", HeaderValue::from_static("spoofed"));
        headers.insert("connection", HeaderValue::from_static("x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.9.9.9"));
        let host = HeaderValue::from_static("10.0.0.5:9000");
        forwarding_headers(
            &mut headers,
            ctx(key_caller(KeySource::Header)),
            &host,
            &HeaderValue::from_static("anon"),
        );
        assert!(!headers.contains_key("x-api-key") && !headers.contains_key("x-hop"));
        assert_eq!(headers["x-consumer-id"], "acme");
        assert_eq!(headers["x-plan"], "pro");
        assert_eq!(headers["host"], "10.0.0.5:9000");
        assert_eq!(headers["x-forwarded-host"], "api.example.com");
        assert_eq!(headers["x-forwarded-for"], "10.9.9.9, 203.0.113.9");
        assert_eq!(headers["x-real-ip"], "203.0.113.9");
        assert_eq!(headers["x-request-id"], "req-1");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-port"], "8443");

        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer eyJ.x.y"));
        headers.insert("x-plan", HeaderValue::from_static("spoofed"));
        let jwt = Caller::Jwt(Identity::new("jwt:sub".into(), Arc::from("sub"), Arc::from("default")));
        forwarding_headers(&mut headers, ctx(jwt), &host, &HeaderValue::from_static("anon"));
        assert!(!headers.contains_key("authorization"));
        assert_eq!(headers["x-plan"], "default");

        // A public route: a key sent anyway is removed; the upstream's own bearer is kept.
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static("tg_live_secret"));
        headers.insert("authorization", HeaderValue::from_static("Bearer tg_live_secret"));
        forwarding_headers(
            &mut headers,
            ctx(Caller::Public),
            &host,
            &HeaderValue::from_static("anon"),
        );
        assert!(!headers.contains_key("x-api-key") && !headers.contains_key("authorization"));
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer upstream-token"));
        forwarding_headers(
            &mut headers,
            ctx(Caller::Public),
            &host,
            &HeaderValue::from_static("anon"),
        );
        assert_eq!(headers["authorization"], "Bearer upstream-token");

        let mut headers = HeaderMap::new();
        headers.insert("x-plan", HeaderValue::from_static("spoofed"));
        headers.insert("x-consumer-id", HeaderValue::from_static("spoofed"));
        headers.insert("x-client-cert-subject", HeaderValue::from_static("spoofed"));
        let anonymous = Caller::Anonymous { referer_host: None };
        forwarding_headers(&mut headers, ctx(anonymous), &host, &HeaderValue::from_static("anon"));
        assert_eq!(headers["x-plan"], "anon");
        assert!(!headers.contains_key("x-consumer-id"));
        assert!(
            !headers.contains_key("x-client-cert-subject"),
            "only a verified certificate names one"
        );
    }
}
