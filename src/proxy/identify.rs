//! `request_filter`: the route, then who is calling — an API key, a JWT, the anonymous
//! plan, or nobody on a public route — then the plan's limits (`limit`). Everything here
//! reads only the request head.

use http::{HeaderValue, Version, header};

use super::{ConnInfo, Head, RequestCtx, Worker, headers};
use crate::auth::{self, AuthError, Identity, KEY_PREFIX};
use crate::base::http1::{RawHeaders, field_text};
use crate::base::{ErrorKind, ProxyError};
use crate::config::AnonymousBy;
use crate::gateway::{DEFAULT_PLAN, Route, Snapshot};
use crate::metrics::Protection;
use crate::router;
use crate::upstream::h1::FieldValue;

/// Where the caller's API key was found, so it can be removed before proxying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Header,
    Bearer,
    Query,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A route without `auth`: nobody is identified or charged.
    Public,
    /// A valid API key, found where `source` says.
    Key { identity: Identity, source: KeySource },
    /// A verified JWT (a bearer token) of a configured issuer.
    Jwt(Identity),
    /// The no-sign-up tier: charged to the client IP and, when known, the Referer host.
    Anonymous { referer_host: Option<String> },
}

impl Caller {
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Caller::Key { identity, .. } | Caller::Jwt(identity) => Some(identity),
            Caller::Public | Caller::Anonymous { .. } => None,
        }
    }

    /// Where the credentials travelled, so `upstream_request_filter` removes them.
    pub fn credentials(&self) -> Option<KeySource> {
        match self {
            Caller::Key { source, .. } => Some(*source),
            Caller::Jwt(_) => Some(KeySource::Bearer),
            Caller::Public | Caller::Anonymous { .. } => None,
        }
    }
}

/// What the caller presented, as far as the route accepts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials<'a> {
    Key(&'a str, KeySource),
    Jwt(&'a str),
    None,
}

impl Worker {
    /// Phase 1, first for every request: finds the route, identifies the caller and applies
    /// the plan's limits; any of them may answer at once by returning an error.
    pub(super) fn request_filter<'s>(
        &self,
        snapshot: &'s Snapshot,
        ctx: &mut RequestCtx<'_>,
        head: Head<'_>,
    ) -> Result<&'s Route, ProxyError> {
        ctx.host = request_host(head, ctx.read);
        ctx.path = router::normalize(head.uri.path(), &snapshot.path_rules)
            .map_err(|e| ProxyError::with_cause(ErrorKind::BadRequest, format!("request path refused: {e:?}")))?;
        // Made text only for a router that looks at it: `str::from_utf8` cost about 130
        // instructions per request for a host no route names (docs/benchmarks.md).
        let host = ctx
            .host
            .as_ref()
            .filter(|_| snapshot.router.routes_by_host())
            .and_then(|h| field_text(h.as_bytes()));
        let path = ctx.path.as_deref().unwrap_or(head.uri.path());
        let index = match snapshot.router.find(host, head.method.as_str(), path) {
            Some(router::Found::Route(index)) => index,
            Some(router::Found::MethodNotAllowed(allow)) => {
                ctx.allow = HeaderValue::try_from(allow).ok();
                return Err(ProxyError::new(ErrorKind::MethodNotAllowed));
            }
            None => return Err(ProxyError::new(ErrorKind::RouteNotFound)),
        };
        ctx.route = Some(index);
        ctx.upgrade = head.version == Version::HTTP_11 && headers::is_upgrade_request(head.fields);
        if ctx.upgrade && !headers::upgrade_allowed(head.fields, &snapshot.config.server.upgrades) {
            // Not tunnelled: `Upgrade` goes with the other hop-by-hop headers and the
            // request is proxied as an ordinary one (RFC 9110 §7.8 lets a server ignore it).
            ctx.upgrade = false;
            self.gateway.metrics.protected(Protection::UpgradeRefused);
        }
        let route = snapshot
            .routes
            .get(index)
            .ok_or_else(|| ProxyError::new(ErrorKind::Internal))?;
        let trusted = &snapshot.config.trusted_proxies;
        if !trusted.is_empty() {
            let forwarded = head.text(&headers::X_FORWARDED_FOR);
            ctx.caller_ip = auth::client_ip(ctx.client_addr.ip(), forwarded, trusted);
        }
        ctx.caller = self.identify(snapshot, route, head, ctx.conn)?;
        // A declared length over the route's limit is refused before anything is charged;
        // a body that grows past it is cut off in the exchange.
        if ctx.declared_body > route.max_body_bytes {
            return Err(ProxyError::new(ErrorKind::PayloadTooLarge));
        }
        self.limit_filter(snapshot, route, ctx)?;
        ctx.admitted = true;
        Ok(route)
    }

    /// The caller of `route`: a presented key must be valid even where anonymous calls
    /// are allowed; no credentials on a keyed route is a 401.
    fn identify(
        &self,
        snapshot: &Snapshot,
        route: &Route,
        head: Head<'_>,
        conn: &ConnInfo,
    ) -> Result<Caller, ProxyError> {
        match presented_credentials(route.api_key, route.jwt, head) {
            Credentials::Jwt(token) => snapshot
                .jwt
                .verify(token, DEFAULT_PLAN)
                .map(Caller::Jwt)
                .map_err(|e| ProxyError::new(ErrorKind::InvalidToken(e.reason()))),
            Credentials::Key(key, source) => conn
                .with_key_memo(|memo| {
                    auth::authenticate(&self.gateway.keys, Some(key), &route.name, auth::unix_now, memo)
                })
                .map(|identity| Caller::Key { identity, source })
                .map_err(|e| self.key_refused(e)),
            Credentials::None if route.anonymous => {
                let anonymous = &snapshot.config.anonymous;
                let by_referer = anonymous.by.contains(&AnonymousBy::Referer);
                let mut referer_host = by_referer.then(|| referer_host(head)).flatten();
                // Random long hosts would each cost a counter; the IP still counts.
                if referer_host
                    .as_ref()
                    .is_some_and(|host| host.len() > anonymous.max_referer_host)
                {
                    referer_host = None;
                    self.gateway.metrics.protected(Protection::RefererTooLong);
                }
                Ok(Caller::Anonymous { referer_host })
            }
            Credentials::None if route.api_key || route.jwt => Err(ProxyError::new(ErrorKind::MissingCredentials)),
            Credentials::None => Ok(Caller::Public),
        }
    }
}

/// The host the client asked for: the request target's authority when it has one (an
/// absolute-form HTTP/1.1 target, where RFC 9112 §3.2.2 says `Host` is ignored, or
/// HTTP/2's `:authority`), else the `Host` header.
///
/// `read`: the request's fields as read, which the value then borrows (a `HeaderValue`
/// made of it would check it again, byte by byte).
pub(super) fn request_host<'c>(head: Head<'_>, read: Option<&'c RawHeaders>) -> Option<FieldValue<'c>> {
    match (head.uri.authority(), read) {
        (Some(authority), _) => FieldValue::text(authority.as_str()),
        (None, Some(read)) => read.get(header::HOST.as_str().as_bytes()).map(FieldValue::Read),
        (None, None) => head.fields.value(&header::HOST).map(FieldValue::Header),
    }
}

/// The credentials a route of these auth methods reads: an API key (`X-API-Key`, then
/// `Authorization: Bearer`, then query `api-key`/`api_key`), or a JWT — a bearer value
/// that is not one of our keys, on routes that take JWTs.
pub fn presented_credentials(api_key: bool, jwt: bool, head: Head<'_>) -> Credentials<'_> {
    let presented = if api_key { find_api_key(head) } else { None };
    match presented {
        Some((value, KeySource::Bearer)) if jwt && !value.starts_with(KEY_PREFIX) => Credentials::Jwt(value),
        Some((key, source)) => Credentials::Key(key, source),
        None if jwt => bearer(head).map_or(Credentials::None, Credentials::Jwt),
        None => Credentials::None,
    }
}

fn find_api_key(head: Head<'_>) -> Option<(&str, KeySource)> {
    // A key header that is not text is a wrong key, not a reason to look elsewhere
    // (found by `tests/fuzz.rs`).
    if let Some(key) = head.get(&headers::X_API_KEY) {
        return Some((field_text(key).unwrap_or("").trim(), KeySource::Header));
    }
    if let Some(key) = bearer(head) {
        return Some((key, KeySource::Bearer));
    }
    head.uri
        .query()?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == "api-key" || *name == "api_key")
        .map(|(_, key)| (key, KeySource::Query))
}

fn bearer(head: Head<'_>) -> Option<&str> {
    head.text(&header::AUTHORIZATION)
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn referer_host(head: Head<'_>) -> Option<String> {
    head.text(&header::REFERER).and_then(auth::referer_host)
}

impl Worker {
    /// A key's refusal as the request's error, for every place a key is checked.
    pub(super) fn key_refused(&self, error: AuthError) -> ProxyError {
        match error {
            // Created elsewhere and not seen here yet: it may be valid.
            AuthError::InvalidApiKey if !self.gateway.catalog.available() => {
                ProxyError::new(ErrorKind::StateUnavailable)
            }
            error => ProxyError::new(auth_error_kind(error)),
        }
    }
}

fn auth_error_kind(error: AuthError) -> ErrorKind {
    match error {
        AuthError::MissingCredentials => ErrorKind::MissingCredentials,
        AuthError::InvalidApiKey => ErrorKind::InvalidApiKey,
        AuthError::KeyRevoked => ErrorKind::KeyRevoked,
        AuthError::KeyExpired => ErrorKind::KeyExpired,
        AuthError::RouteNotAllowed => ErrorKind::RouteNotAllowed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut builder = http::Request::builder().uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn keys_are_read_from_header_then_bearer_then_query() {
        let both = request("/v1?api_key=q", &[("x-api-key", " h "), ("authorization", "Bearer b")]);
        assert_eq!(
            presented_credentials(true, false, Head::of(&both)),
            Credentials::Key("h", KeySource::Header)
        );
        let bearer = request("/v1?api_key=q", &[("authorization", "Bearer tg_live_b")]);
        assert_eq!(
            presented_credentials(true, false, Head::of(&bearer)),
            Credentials::Key("tg_live_b", KeySource::Bearer)
        );
        let query = request("/v1?x=1&api-key=q", &[]);
        assert_eq!(
            presented_credentials(true, false, Head::of(&query)),
            Credentials::Key("q", KeySource::Query)
        );
        assert_eq!(
            presented_credentials(true, false, Head::of(&request("/v1?x=1", &[]))),
            Credentials::None
        );
        // A route that takes no keys reads none.
        assert_eq!(presented_credentials(false, false, Head::of(&both)), Credentials::None);
    }

    #[test]
    fn a_bearer_that_is_not_a_key_is_a_jwt_where_jwts_are_taken() {
        let jwt = request("/", &[("authorization", "Bearer eyJhbGciOi.x.y")]);
        assert_eq!(
            presented_credentials(true, true, Head::of(&jwt)),
            Credentials::Jwt("eyJhbGciOi.x.y")
        );
        assert_eq!(
            presented_credentials(false, true, Head::of(&jwt)),
            Credentials::Jwt("eyJhbGciOi.x.y")
        );
        // Keys keep their prefix, so a keyed bearer stays a key on a JWT route.
        let key = request("/", &[("authorization", "Bearer tg_live_abc")]);
        assert_eq!(
            presented_credentials(true, true, Head::of(&key)),
            Credentials::Key("tg_live_abc", KeySource::Bearer)
        );
        // Without JWT routes, any bearer is checked as a key (and refused if it is not one).
        assert_eq!(
            presented_credentials(true, false, Head::of(&jwt)),
            Credentials::Key("eyJhbGciOi.x.y", KeySource::Bearer)
        );
        // A key header beside a JWT: the key is what is checked.
        let both = request("/", &[("x-api-key", "k"), ("authorization", "Bearer eyJ.x.y")]);
        assert_eq!(
            presented_credentials(true, true, Head::of(&both)),
            Credentials::Key("k", KeySource::Header)
        );
    }

    #[test]
    fn the_host_is_the_header_or_the_authority() {
        let host = |uri: &str, headers: &[(&str, &str)]| {
            let request = request(uri, headers);
            let from_map = request_host(Head::of(&request), None).map(|h| h.as_bytes().to_vec());
            // The same head as the purpose-built server reads it, with no map.
            let mut head = format!("GET {uri} HTTP/1.1\r\n");
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            let read = RawHeaders::of_request_head(head.into());
            let bare = http::Request::builder().uri(uri).body(()).unwrap();
            let from_read = request_host(Head::with(&bare, Default::default(), Some(&read)), Some(&read))
                .map(|h| h.as_bytes().to_vec());
            assert_eq!(from_map, from_read, "{uri} {headers:?}");
            from_map.map(|h| String::from_utf8(h).unwrap())
        };
        assert_eq!(host("/", &[("host", "api.example.com")]).unwrap(), "api.example.com");
        assert_eq!(host("http://h2.example:8443/x", &[]).unwrap(), "h2.example:8443");
        assert_eq!(host("/", &[]), None);
        // Absolute form: the target's authority wins over a different Host.
        assert_eq!(
            host("http://keyed.example/v1", &[("host", "public.example")]).unwrap(),
            "keyed.example"
        );
    }

    #[test]
    fn referer_hosts_and_caller_credentials() {
        let referred = request("/", &[("referer", "https://Shop.Example:8443/page?q=1")]);
        assert_eq!(referer_host(Head::of(&referred)).as_deref(), Some("shop.example"));
        assert_eq!(referer_host(Head::of(&request("/", &[]))), None);
        let anonymous = Caller::Anonymous { referer_host: None };
        assert_eq!((anonymous.identity(), anonymous.credentials()), (None, None));
        assert_eq!(Caller::Public.credentials(), None);
    }
}
