//! The one place where a request-path error becomes the client's response: the status of
//! its kind and the JSON body of docs/operations.md ("What callers see").

use bytes::Bytes;
use http::{HeaderValue, Response, header};

use super::body::ProxyBody;
use crate::base::{ErrorKind, RequestId, error_body};
use crate::limits::{LimitStatus, Now, window};

/// A 429: the error body names the limit, how many requests it allows, and when it resets
/// (docs/operations.md); `Retry-After` is set by the response phase with the `RateLimit`
/// headers. `status` is the limit that refused, `retry_after` in seconds.
pub fn limit_response(
    kind: ErrorKind,
    status: &LimitStatus,
    retry_after: u64,
    now: Now,
    request_id: &RequestId,
) -> Response<ProxyBody> {
    let policy = status.name.policy();
    let message = match kind {
        ErrorKind::RateLimited => format!(
            "rate limit of {} requests per {} s exceeded; retry in {} s",
            status.quota, status.window_secs, retry_after
        ),
        _ => format!(
            "{policy} quota of {} requests is used up; it resets at {}",
            status.quota,
            window::format_timestamp(now.secs() + status.reset_secs)
        ),
    };
    let body = serde_json::json!({
        "error": {
            "code": kind.code(),
            "message": message,
            "request_id": request_id.as_str(),
            "policy": policy,
            "window": status.name.window(),
            "limit": status.quota,
            "remaining": 0,
            "reset": window::format_timestamp(now.secs() + retry_after),
            "retry_after": retry_after,
        }
    });
    let mut response = Response::new(ProxyBody::full(Bytes::from(body.to_string())));
    *response.status_mut() = kind.status();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(&super::headers::X_REQUEST_ID, request_id.to_header());
    response
}

/// The response a client sees for `kind`.
pub fn error_response(kind: ErrorKind, request_id: &RequestId) -> Response<ProxyBody> {
    let body = error_body(kind.code(), kind.message(), request_id.as_str());
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = kind.status();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(&super::headers::X_REQUEST_ID, request_id.to_header());
    response
}
