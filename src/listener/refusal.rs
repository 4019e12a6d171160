//! The access-log record of a request head the guard refused (docs/access-logs.md): the
//! same fields as a proxied request's, read off the request line as far as it is well
//! formed.

use std::sync::Arc;

use super::guard::trim_leading_crlf;
use crate::base::ErrorKind;
use crate::logs::log_key;

/// What a refused head's access-log record needs from its connection.
pub struct RefusalLog {
    pub log: Arc<crate::logs::AccessLog>,
    /// The client's address as the access log writes it.
    pub client_ip: Box<[u8]>,
    pub tls: Option<&'static str>,
}

/// A refused head's access-log record: the same fields as a request's
/// (docs/access-logs.md), with the method, path and protocol read off the request line
/// as far as they are well formed. The query is never recorded: it may hold a key.
pub(super) fn record(
    refusals: &RefusalLog,
    kind: ErrorKind,
    request_id: &crate::base::RequestId,
    head: &[u8],
    sent: usize,
) {
    let (method, path, protocol) = request_line(head);
    let mut record = crate::logs::Pending::begin(&refusals.log, tokio::time::Instant::now());
    let mut fields = record.fields();
    fields.request_id(log_key!("request_id"), request_id);
    match method {
        Some(method) => fields.bytes(log_key!("method"), method),
        None => fields.null(log_key!("method")),
    };
    match path {
        Some(path) => fields.bytes(log_key!("path"), path),
        None => fields.null(log_key!("path")),
    };
    fields
        .null(log_key!("query"))
        .null(log_key!("referer_host"))
        .opt_str(log_key!("protocol"), protocol)
        .u64(log_key!("bytes_in"), 0)
        .null(log_key!("route"))
        .null(log_key!("consumer"))
        .null(log_key!("key_id"))
        .str(log_key!("auth"), "none")
        .bytes(log_key!("client_ip"), &refusals.client_ip)
        .u64(log_key!("status"), u64::from(kind.status().as_u16()))
        .str(log_key!("error"), kind.code())
        .null(log_key!("decision"))
        .null(log_key!("upstream"))
        .null(log_key!("upstream_status"))
        .u64(log_key!("tries"), 0)
        .null(log_key!("upstream_latency_ms"))
        .opt_str(log_key!("tls"), refusals.tls);
    record.sent(sent);
    record.completed();
}

/// The method, path (without query) and protocol of a head's request line, each only when
/// it is well formed enough to be worth recording.
fn request_line(head: &[u8]) -> (Option<&[u8]>, Option<&[u8]>, Option<&'static str>) {
    let head = trim_leading_crlf(head);
    let line = &head[..memchr::memchr(b'\n', head).unwrap_or(head.len()).min(2048)];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let method = parts
        .next()
        .filter(|m| !m.is_empty() && m.len() <= 20 && m.iter().all(|b| b.is_ascii_alphabetic()));
    let target = parts.next().filter(|_| method.is_some());
    let path = target.map(|t| &t[..memchr::memchr2(b'?', b'#', t).unwrap_or(t.len())]);
    let protocol = match parts.next() {
        Some(b"HTTP/1.1") => Some("HTTP/1.1"),
        Some(b"HTTP/1.0") => Some("HTTP/1.0"),
        _ => None,
    };
    (method, path, protocol)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_request_lines() {
        let (method, path, protocol) = request_line(b"\r\nGET /a<b?api_key=secret HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            (method, path, protocol),
            (Some(&b"GET"[..]), Some(&b"/a<b"[..]), Some("HTTP/1.1"))
        );
        assert_eq!(request_line(b"\x16\x03\x01 garbage"), (None, None, None));
        assert_eq!(request_line(b""), (None, None, None));
    }
}
