//! HTTP/1.1 wire helpers shared by the listener's head checks, the purpose-built server
//! path, the upstream codec and the access log: field values (RFC 9110 §5.6), decimal
//! numbers written without `fmt`, and header fields kept as the bytes read (`RawHeaders`).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

/// Most header lines a head may have (the listener refuses more with a 431).
pub const MAX_HEADERS: usize = 128;

/// `bytes` without optional whitespace (spaces and tabs) around it.
pub fn trim_ows(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

/// A `Content-Length` value (RFC 9110 §8.6): digits only, no sign, no list.
pub fn parse_length(value: &[u8]) -> Option<u64> {
    let value = trim_ows(value);
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// `list` (a comma-separated field value) holds `token`, compared without case.
pub fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|&b| b == b',')
        .any(|item| trim_ows(item).eq_ignore_ascii_case(token))
}

/// `value` in decimal, written at the end of `buffer`.
pub fn format_decimal(buffer: &mut [u8; 20], mut value: u64) -> &[u8] {
    let mut at = buffer.len();
    loop {
        at -= 1;
        buffer[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    &buffer[at..]
}

/// Appends `value` in decimal.
pub fn push_decimal(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(format_decimal(&mut [0; 20], value));
}

/// Where a parsed head's fields lie in the bytes it was parsed from, taken while the
/// parse borrows them; [`RawHeaders::new`] pairs them with those bytes once split off
/// and frozen.
pub struct RawFields(Vec<RawField>);

impl RawFields {
    /// `headers` were parsed from `buf`.
    pub fn of(buf: &[u8], headers: &[httparse::Header<'_>]) -> RawFields {
        RawFields(
            headers
                .iter()
                .map(|header| RawField {
                    name: offset(buf, header.name.as_bytes()),
                    value: offset(buf, header.value),
                    hop: false,
                })
                .collect(),
        )
    }
}

fn field(head: &[u8], (start, end): (u32, u32)) -> &[u8] {
    &head[start as usize..end as usize]
}

/// The hop-by-hop field names (RFC 9110 §7.6.1, with `Keep-Alive` and
/// `Proxy-Connection`), lower-case; the one list both paths use.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// Where `name` (in any case) is in [`HOP_BY_HOP`], if it is a hop-by-hop field.
pub fn hop_by_hop_index(name: &[u8]) -> Option<usize> {
    HOP_BY_HOP
        .iter()
        .position(|known| known.len() == name.len() && known.as_bytes().eq_ignore_ascii_case(name))
}

pub fn is_hop_by_hop(name: &[u8]) -> bool {
    hop_by_hop_index(name).is_some()
}

#[derive(Debug, Clone, Copy)]
struct RawField {
    name: (u32, u32),
    value: (u32, u32),
    /// Describes the connection it came on: not forwarded.
    hop: bool,
}

/// A head's header fields as they were read: its bytes and where each name and value lie
/// in them. Forwarded by copying those bytes (docs/architecture.md, "Two HTTP/1.1 paths"),
/// not through a header map; names keep the sender's case.
#[derive(Debug)]
pub struct RawHeaders {
    head: Bytes,
    fields: Vec<RawField>,
}

impl RawHeaders {
    /// The fields over `head` (the bytes they were parsed from, frozen), with the
    /// connection's own fields marked.
    pub fn new(head: Bytes, fields: RawFields) -> RawHeaders {
        let mut fields = fields.0;
        for f in fields.iter_mut() {
            f.hop = is_hop_by_hop(field(&head, f.name));
        }
        // Fields a `Connection` header names describe the connection too (RFC 9110
        // §7.6.1); rare, so looked for only when one is there.
        for i in 0..fields.len() {
            if !field(&head, fields[i].name).eq_ignore_ascii_case(b"connection") {
                continue;
            }
            let named = field(&head, fields[i].value);
            for token in named.split(|&b| b == b',').map(trim_ows).filter(|t| !t.is_empty()) {
                for f in fields.iter_mut() {
                    f.hop |= field(&head, f.name).eq_ignore_ascii_case(token);
                }
            }
        }
        RawHeaders { head, fields }
    }

    /// Every field, in order: (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|f| (field(&self.head, f.name), field(&self.head, f.value)))
    }

    /// The values of every field named `name` (compared without case).
    pub fn get_all<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }

    /// The fields that go on to the next hop: all but the connection's own.
    pub fn forwarded(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .filter(|f| !f.hop)
            .map(|f| (field(&self.head, f.name), field(&self.head, f.value)))
    }

    /// Merges the forwarded fields into `headers` (for a writer that needs a map: hyper's
    /// server, HTTP/2). Names already in `headers` were set by the pipeline and replace
    /// the fields read; a field `http` does not take is left out.
    pub fn merge_into(self, headers: &mut HeaderMap) {
        let set = std::mem::take(headers);
        let mut merged = HeaderMap::with_capacity(self.fields.len() + set.len());
        for (name, value) in self.forwarded() {
            let Ok(name) = HeaderName::from_bytes(name) else {
                continue;
            };
            if set.contains_key(&name) {
                continue;
            }
            if let Ok(value) = HeaderValue::from_maybe_shared(self.head.slice_ref(value)) {
                merged.append(name, value);
            }
        }
        let mut last: Option<HeaderName> = None;
        for (name, value) in set {
            if let Some(name) = name {
                last = Some(name);
            }
            if let Some(name) = &last {
                merged.append(name.clone(), value);
            }
        }
        *headers = merged;
    }
}

/// Where `part` (a slice of `buf`) starts and ends in `buf`.
pub fn offset(buf: &[u8], part: &[u8]) -> (u32, u32) {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    (start as u32, (start + part.len()) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_values_and_numbers() {
        assert_eq!(parse_length(b" 42 "), Some(42));
        for bad in [&b""[..], b"-1", b"+1", b"1,1", b"1x", b"99999999999999999999"] {
            assert_eq!(parse_length(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(has_token(b"keep-alive, Close", b"close"));
        assert!(!has_token(b"closed", b"close"));
        let mut out = Vec::new();
        push_decimal(&mut out, 0);
        out.push(b' ');
        push_decimal(&mut out, u64::MAX);
        assert_eq!(out, b"0 18446744073709551615");
    }

    #[test]
    fn fields_as_read_drop_the_connections_own_and_merge_under_the_map() {
        let mut slots = [httparse::EMPTY_HEADER; 8];
        let raw = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: keep-alive, X-Hop\r\nx-hop: s\r\n\
            Keep-Alive: timeout=5\r\nTE: trailers\r\nx-a: 2\r\nX-Id: up\r\n\r\n";
        let mut response = httparse::Response::new(&mut slots);
        response.parse(raw).unwrap();
        let fields = RawHeaders::new(Bytes::from_static(raw), RawFields::of(raw, response.headers));
        assert_eq!(fields.iter().count(), 7);
        assert_eq!(
            fields.get_all(b"CONNECTION").collect::<Vec<_>>(),
            [b"keep-alive, X-Hop"]
        );
        let forwarded: Vec<_> = fields.forwarded().collect();
        assert_eq!(
            forwarded,
            [(&b"X-A"[..], &b"1"[..]), (b"x-a", b"2"), (b"X-Id", b"up")],
            "hop-by-hop fields and the one Connection names are dropped"
        );
        let mut map = HeaderMap::new();
        map.insert("x-id", HeaderValue::from_static("ours"));
        map.append("x-ours", HeaderValue::from_static("1"));
        map.append("x-ours", HeaderValue::from_static("2"));
        fields.merge_into(&mut map);
        assert_eq!(map.get_all("x-a").iter().collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(
            map.get_all("x-id").iter().collect::<Vec<_>>(),
            ["ours"],
            "the map's names replace"
        );
        assert_eq!(map.get_all("x-ours").iter().count(), 2);
        assert_eq!(map.len(), 5);
    }
}
