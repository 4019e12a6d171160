//! The one error type of the request path: a kind (which decides the status, the stable
//! code and who is to blame) and an optional cause. `proxy::error` turns it into the
//! client's response; the listener writes it as raw bytes before hyper has a request.

use std::fmt;

use bytes::Bytes;
use http::StatusCode;

/// Who caused a failure: decides logging level and which metric counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    Client,
    Upstream,
    Internal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No route matches host and path.
    RouteNotFound,
    MissingCredentials,
    InvalidApiKey,
    /// A bearer JWT was refused; the reason goes into the message.
    InvalidToken(&'static str),
    KeyRevoked,
    KeyExpired,
    RouteNotAllowed,
    /// The plan's rate limit (GCRA) refused the request.
    RateLimited,
    /// A daily or monthly quota of the plan is used up.
    QuotaExceeded,
    /// Malformed request (e.g. both `Content-Length` and `Transfer-Encoding`).
    BadRequest,
    /// The request head did not arrive within `server.header_read_timeout`.
    HeaderTimeout,
    /// No route of the best-matching path takes this method (`405`, with `Allow`).
    MethodNotAllowed,
    /// The request body is larger than the route's `max_body_bytes`.
    PayloadTooLarge,
    /// The request body stalled longer than `server.client_body_timeout`.
    BodyTimeout,
    /// A transfer coding other than `chunked` (RFC 9112 §6.1).
    NotImplemented,
    /// The connection is over `server.max_connections_per_ip` (or the worker's limit).
    TooManyConnections,
    /// The key's or consumer's plan is not defined: refused rather than unlimited.
    PlanNotFound,
    /// The request head is larger than `server.max_header_bytes`.
    HeadersTooLarge,
    /// The pool has no endpoint with an address to send to.
    NoEndpoint,
    /// The key is not known here and the shared state (NATS) cannot be asked.
    StateUnavailable,
    /// The pool's `max_requests` are all in flight.
    UpstreamOverloaded,
    /// The TCP connection to the endpoint was refused or failed.
    UpstreamConnect,
    /// The TLS handshake with the endpoint failed (untrusted or wrong certificate, no
    /// common protocol); nothing was sent in clear text.
    UpstreamTls,
    /// Connecting, or waiting for the response head, took longer than configured.
    UpstreamTimeout,
    /// The endpoint closed or broke the exchange, or answered with invalid HTTP.
    UpstreamProtocol,
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::RouteNotFound => StatusCode::NOT_FOUND,
            ErrorKind::MissingCredentials | ErrorKind::InvalidApiKey | ErrorKind::InvalidToken(_) => {
                StatusCode::UNAUTHORIZED
            }
            ErrorKind::KeyRevoked | ErrorKind::KeyExpired | ErrorKind::RouteNotAllowed => StatusCode::FORBIDDEN,
            ErrorKind::RateLimited | ErrorKind::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::HeaderTimeout | ErrorKind::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::NotImplemented => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::PlanNotFound => StatusCode::FORBIDDEN,
            ErrorKind::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorKind::NoEndpoint | ErrorKind::StateUnavailable | ErrorKind::UpstreamOverloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorKind::UpstreamConnect | ErrorKind::UpstreamTls | ErrorKind::UpstreamProtocol => {
                StatusCode::BAD_GATEWAY
            }
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code in the JSON error body.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::RouteNotFound => "route_not_found",
            ErrorKind::MissingCredentials => "missing_credentials",
            ErrorKind::InvalidApiKey => "invalid_api_key",
            ErrorKind::InvalidToken(_) => "invalid_token",
            ErrorKind::KeyRevoked => "key_revoked",
            ErrorKind::KeyExpired => "key_expired",
            ErrorKind::RouteNotAllowed => "route_not_allowed",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::QuotaExceeded => "quota_exceeded",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::HeaderTimeout => "request_timeout",
            ErrorKind::BodyTimeout => "body_timeout",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::NotImplemented => "not_implemented",
            ErrorKind::TooManyConnections => "too_many_connections",
            ErrorKind::PlanNotFound => "plan_not_found",
            ErrorKind::HeadersTooLarge => "headers_too_large",
            ErrorKind::NoEndpoint => "upstream_unavailable",
            ErrorKind::StateUnavailable => "state_unavailable",
            ErrorKind::UpstreamOverloaded => "upstream_overloaded",
            ErrorKind::UpstreamConnect => "upstream_connect_failed",
            ErrorKind::UpstreamTls => "upstream_tls",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::UpstreamProtocol => "upstream_error",
            ErrorKind::Internal => "internal_error",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            ErrorKind::RouteNotFound => "no route matches this host and path",
            ErrorKind::MissingCredentials => "an API key is required (X-API-Key, Authorization: Bearer, or ?api_key=)",
            ErrorKind::InvalidApiKey => "the API key is not valid",
            ErrorKind::InvalidToken(reason) => reason,
            ErrorKind::KeyRevoked => "the API key has been revoked",
            ErrorKind::KeyExpired => "the API key has expired",
            ErrorKind::RouteNotAllowed => "the API key may not call this route",
            ErrorKind::RateLimited => "too many requests; slow down",
            ErrorKind::QuotaExceeded => "the plan's quota is used up",
            ErrorKind::BadRequest => "malformed request",
            ErrorKind::HeaderTimeout => "the request head was not received in time",
            ErrorKind::BodyTimeout => "the request body was not received in time",
            ErrorKind::MethodNotAllowed => "this route does not take this method; see Allow",
            ErrorKind::PayloadTooLarge => "the request body is larger than this route accepts",
            ErrorKind::NotImplemented => "transfer codings other than chunked are not supported",
            ErrorKind::TooManyConnections => "too many connections from this client",
            ErrorKind::PlanNotFound => "the caller's plan is not defined; ask the API's operator",
            ErrorKind::HeadersTooLarge => "request headers are too large",
            ErrorKind::NoEndpoint => "no upstream endpoint is available",
            ErrorKind::UpstreamOverloaded => "the upstream pool is at its limit of requests in flight",
            ErrorKind::StateUnavailable => "the key cannot be checked right now (shared state unreachable); retry",
            ErrorKind::UpstreamConnect => "could not connect to the upstream",
            ErrorKind::UpstreamTls => "the TLS handshake with the upstream failed",
            ErrorKind::UpstreamTimeout => "the upstream did not answer in time",
            ErrorKind::UpstreamProtocol => "the upstream failed to answer",
            ErrorKind::Internal => "internal error",
        }
    }

    pub fn source(self) -> ErrorSource {
        match self {
            ErrorKind::RouteNotFound
            | ErrorKind::MissingCredentials
            | ErrorKind::InvalidApiKey
            | ErrorKind::InvalidToken(_)
            | ErrorKind::KeyRevoked
            | ErrorKind::KeyExpired
            | ErrorKind::RouteNotAllowed
            | ErrorKind::RateLimited
            | ErrorKind::QuotaExceeded
            | ErrorKind::BadRequest
            | ErrorKind::HeaderTimeout
            | ErrorKind::BodyTimeout
            | ErrorKind::MethodNotAllowed
            | ErrorKind::PayloadTooLarge
            | ErrorKind::NotImplemented
            | ErrorKind::TooManyConnections
            | ErrorKind::PlanNotFound
            | ErrorKind::HeadersTooLarge => ErrorSource::Client,
            ErrorKind::NoEndpoint
            | ErrorKind::UpstreamOverloaded
            | ErrorKind::UpstreamConnect
            | ErrorKind::UpstreamTls
            | ErrorKind::UpstreamTimeout
            | ErrorKind::UpstreamProtocol => ErrorSource::Upstream,
            ErrorKind::Internal | ErrorKind::StateUnavailable => ErrorSource::Internal,
        }
    }
}

/// An error on the request path: what went wrong and, optionally, the underlying cause.
#[derive(Debug)]
pub struct ProxyError {
    pub kind: ErrorKind,
    pub cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ProxyError {
    pub fn new(kind: ErrorKind) -> Self {
        ProxyError { kind, cause: None }
    }

    pub fn with_cause(kind: ErrorKind, cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        ProxyError {
            kind,
            cause: Some(cause.into()),
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.code())?;
        if let Some(cause) = &self.cause {
            write!(f, ": {cause}")?;
            let mut source = cause.source();
            while let Some(inner) = source {
                write!(f, ": {inner}")?;
                source = inner.source();
            }
        }
        Ok(())
    }
}

impl std::error::Error for ProxyError {}

/// `{"error": {"code": ..., "message": ..., "request_id": ...}}` (docs/operations.md, "What callers see").
pub fn error_body(code: &str, message: &str, request_id: &str) -> Bytes {
    let body = serde_json::json!({
        "error": { "code": code, "message": message, "request_id": request_id }
    });
    Bytes::from(body.to_string())
}

/// The same response as raw HTTP/1.1 bytes, for errors found before hyper parses a
/// request (slow or oversized heads); the connection is closed after it.
pub fn raw_error_response(kind: ErrorKind, request_id: &str) -> Vec<u8> {
    let body = error_body(kind.code(), kind.message(), request_id);
    let status = kind.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        request_id
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// The two lower-case hex digits of every byte.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    pairs
};

/// A request's id: 32 lower-case hex digits made here, held inline, so the request, its
/// upstream head, its response and its log record share it with no allocation and no
/// reference count (docs/benchmarks.md, "Request ids inline"); or the client's own
/// `X-Request-Id` (printable ASCII, `proxy::headers::request_id`) sharing the bytes read.
#[derive(Clone, PartialEq, Eq)]
pub enum RequestId {
    Generated([u8; 32]),
    Given(http::HeaderValue),
}

impl RequestId {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            RequestId::Generated(digits) => digits,
            RequestId::Given(value) => value.as_bytes(),
        }
    }

    /// Both kinds are ASCII, so this is never empty for a real id.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    /// As a header value of its own, for a writer that needs a map.
    pub fn to_header(&self) -> http::HeaderValue {
        match self {
            RequestId::Given(value) => value.clone(),
            RequestId::Generated(digits) => {
                http::HeaderValue::from_bytes(digits).unwrap_or_else(|_| http::HeaderValue::from_static("0"))
            }
        }
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<&str> for RequestId {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

/// 128 random bits as 32 hex digits. Uses the thread-local fast generator: ids need to be
/// unique, not unpredictable, and a syscall per request would cost more than the proxying.
pub fn new_request_id() -> RequestId {
    let bits = fastrand::u128(..).to_be_bytes();
    let mut out = [0u8; 32];
    // Two digits per byte from a table: a quarter of the instructions of shifting the
    // 128-bit number four bits at a time.
    for (pair, byte) in out.chunks_exact_mut(2).zip(bits) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
    }
    RequestId::Generated(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_32_lower_case_hex_digits_and_differ() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_request_id().as_str().to_string()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "{id}");
        }
        // Every position takes all sixteen digits over a thousand ids: each half of each
        // random byte is written where it belongs.
        for at in 0..32 {
            let digits: std::collections::HashSet<u8> = ids.iter().map(|id| id.as_bytes()[at]).collect();
            assert_eq!(digits.len(), 16, "position {at}");
        }
    }

    #[test]
    fn request_ids_read_the_same_inline_or_given() {
        let made = new_request_id();
        assert!(matches!(made, RequestId::Generated(_)));
        assert_eq!(made.to_header().as_bytes(), made.as_bytes());
        assert_eq!(made.as_str().as_bytes(), made.as_bytes());
        assert_eq!(format!("{made:?}"), format!("{:?}", made.as_str()));
        let given = RequestId::Given(http::HeaderValue::from_static("abc-123"));
        assert_eq!(given, "abc-123");
        assert_eq!(given.to_header(), "abc-123");
        assert_eq!(format!("{given:?}"), "\"abc-123\"");
        assert_ne!(made, given);
    }
}
