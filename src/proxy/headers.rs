//! Header rewriting between client and upstream: hop-by-hop removal, forwarding headers,
//! request ids.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
fn hop_by_hop() -> [&'static HeaderName; 8] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHORIZATION,
    ]
}

/// True when the client asks to switch protocols (WebSocket) on an HTTP/1.1 connection.
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has_token(headers, "upgrade")
}

fn connection_has_token(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers, including those named by `Connection`. When `keep_upgrade`
/// is set, `Connection: upgrade` and `Upgrade` survive so the switch can be forwarded.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names is cheaper than eight removals.
    if !keep_upgrade && !headers.keys().any(|name| hop_by_hop().contains(&name)) {
        return;
    }
    if headers.get_all(header::CONNECTION).iter().nth(1).is_some() {
        // Several Connection lines: rare enough to join them into one first.
        let joined: Vec<u8> = headers
            .get_all(header::CONNECTION)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect::<Vec<_>>()
            .join(&b","[..]);
        if let Ok(value) = HeaderValue::from_bytes(&joined) {
            headers.insert(header::CONNECTION, value);
        }
    }
    if let Some(connection) = headers.remove(header::CONNECTION) {
        for token in connection.to_str().unwrap_or("").split(',').map(str::trim) {
            // `&str` keys are looked up without allocating a HeaderName.
            let kept = token.is_empty() || (keep_upgrade && token.eq_ignore_ascii_case("upgrade"));
            if !kept {
                headers.remove(token);
            }
        }
    }
    for name in hop_by_hop() {
        if keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
            continue;
        }
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Appends the client address to `X-Forwarded-For` (as NGINX's `$proxy_add_x_forwarded_for`).
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    use std::io::Write;
    // Formatted on the stack: one allocation (the header value) per request.
    let mut buf = [0u8; 512];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let written = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
        Some(existing) if !existing.is_empty() => {
            cursor.write_all(existing).and_then(|()| write!(cursor, ", {client}"))
        }
        _ => write!(cursor, "{client}"),
    };
    let len = cursor.position() as usize;
    let value = match written {
        Ok(()) => HeaderValue::from_bytes(&buf[..len]),
        // A very long chain from the client: fall back to the heap.
        Err(_) => {
            let existing = headers.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes).unwrap_or(b"");
            let mut value = existing.to_vec();
            value.extend_from_slice(format!(", {client}").as_bytes());
            HeaderValue::from_bytes(&value)
        }
    };
    if let Ok(value) = value {
        headers.insert(&X_FORWARDED_FOR, value);
    }
}

/// The client's request id when it is short and printable, else a new random one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(value) = headers.get(&X_REQUEST_ID) {
        let bytes = value.as_bytes();
        if !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic()) {
            return value.clone();
        }
    }
    new_request_id()
}

/// 128 random bits as 32 hex digits. Uses the thread-local fast generator: ids need to be
/// unique, not unpredictable, and a syscall per request would cost more than the proxying.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = fastrand::u128(..);
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = HEX[((bits >> (124 - 4 * i)) & 0xf) as usize];
    }
    // An owned array: the id is cloned into the upstream request and the response, and
    // clones of owner-backed bytes only bump a count.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(out)).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_connection_tokens_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret-hop"));
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert(&KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn upgrade_survives_when_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade_request(&headers));
        remove_hop_by_hop(&mut headers, true);
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::CONNECTION], "upgrade");
    }

    #[test]
    fn forwarded_for_appends() {
        let mut headers = HeaderMap::new();
        append_forwarded_for(&mut headers, "10.0.0.1".parse().unwrap());
        append_forwarded_for(&mut headers, "10.0.0.2".parse().unwrap());
        assert_eq!(headers[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2");
        let long = "1".repeat(600);
        headers.insert(&X_FORWARDED_FOR, HeaderValue::from_str(&long).unwrap());
        append_forwarded_for(&mut headers, "::1".parse().unwrap());
        assert_eq!(headers[&X_FORWARDED_FOR], format!("{long}, ::1").as_str());
    }

    #[test]
    fn request_ids() {
        let generated = new_request_id();
        assert_eq!(generated.len(), 32);
        assert_ne!(generated, new_request_id());
        let mut headers = HeaderMap::new();
        headers.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers), "abc-123");
        headers.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_eq!(request_id(&headers).len(), 32);
    }
}
