//! Header rewriting between client and upstream: hop-by-hop removal, forwarding headers,
//! request ids.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::base::http1::{RawHeaders, field_text, hop_by_hop_index};
use crate::base::{RequestId, new_request_id};
use crate::limits::LimitStatus;
use crate::upstream::h1::FieldValue;

pub static HOST: HeaderName = header::HOST;
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
pub static X_CLIENT_CERT_SUBJECT: HeaderName = HeaderName::from_static("x-client-cert-subject");
pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub static X_CONSUMER_ID: HeaderName = HeaderName::from_static("x-consumer-id");
pub static X_PLAN: HeaderName = HeaderName::from_static("x-plan");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Which names a request's header map holds, as a 64-bit filter: a lookup of a name the
/// filter rules out skips hashing the name and probing the map. Most of the pipeline's
/// lookups are for fields a request rarely carries (`X-Request-Id`, `X-Forwarded-For`,
/// `Authorization`, `Referer`, `Upgrade`, `Connection`), and each cost about 150
/// instructions (docs/benchmarks.md). A name in the map always passes; one that is not
/// may pass too, and is then looked up. Made once per request, before any lookup; the
/// pipeline adds none of these fields to the client's map afterwards (only `Host`, on a
/// retry, which is not looked up through the filter).
#[derive(Debug, Clone, Copy)]
pub struct Names(u64);

/// Rules nothing out: a map whose names were not taken is looked up as before.
impl Default for Names {
    fn default() -> Names {
        Names(u64::MAX)
    }
}

impl Names {
    pub fn of(headers: &HeaderMap) -> Names {
        Names(headers.keys().fold(0, |set, name| set | name_bit(name)))
    }

    /// `name` may be in the map.
    pub fn may_have(self, name: &HeaderName) -> bool {
        self.0 & name_bit(name) != 0
    }

    /// `headers.get(name)`, skipped when the filter rules `name` out.
    pub fn get<'h>(self, headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h HeaderValue> {
        if self.may_have(name) { headers.get(name) } else { None }
    }
}

/// The client's request fields, wherever they are: in the request's map (hyper's server,
/// HTTP/2), or as read by the purpose-built HTTP/1.1 server, which builds no map for them
/// (docs/benchmarks.md, "Request fields as read"). Values are the bytes received.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    map: &'a HeaderMap,
    /// Which names `map` may hold.
    names: Names,
    /// The fields as read; `map` is then empty.
    read: Option<&'a RawHeaders>,
}

impl<'a> Fields<'a> {
    pub fn new(map: &'a HeaderMap, names: Names, read: Option<&'a RawHeaders>) -> Fields<'a> {
        Fields { map, names, read }
    }

    /// A map's fields, its names taken now.
    pub fn of_map(map: &'a HeaderMap) -> Fields<'a> {
        Fields::new(map, Names::of(map), None)
    }

    /// The first value of field `name`.
    pub fn get(self, name: &HeaderName) -> Option<&'a [u8]> {
        match self.read {
            Some(read) => read.get(name.as_str().as_bytes()),
            None => self.names.get(self.map, name).map(HeaderValue::as_bytes),
        }
    }

    /// The first value of a field named in the configuration (in any case).
    pub fn get_named(self, name: &str) -> Option<&'a [u8]> {
        match self.read {
            Some(read) => read.get(name.as_bytes()),
            None => self.map.get(name).map(HeaderValue::as_bytes),
        }
    }

    /// Every value of field `name`, in order.
    pub fn get_all(self, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
        let read = self
            .read
            .into_iter()
            .flat_map(move |read| read.get_all(name.as_str().as_bytes()));
        let map = self
            .read
            .is_none()
            .then(|| self.map.get_all(name).iter().map(HeaderValue::as_bytes))
            .into_iter()
            .flatten();
        read.chain(map)
    }

    /// The first value of `name` as text, when it is visible ASCII (as
    /// `HeaderValue::to_str` has it).
    pub fn text(self, name: &HeaderName) -> Option<&'a str> {
        self.get(name).and_then(field_text)
    }

    /// The first value of `name` as a header value of its own (sharing the bytes read).
    pub fn value(self, name: &HeaderName) -> Option<HeaderValue> {
        match self.read {
            Some(read) => read
                .get(name.as_str().as_bytes())
                .and_then(|value| HeaderValue::from_maybe_shared(read.shared(value)).ok()),
            None => self.names.get(self.map, name).cloned(),
        }
    }
}

/// One of 64 bits for a (lower-case) name, from its length, middle and last bytes: no
/// field the pipeline looks up shares a bit with a field browsers and API clients commonly
/// send (the unit test below checks a list of them).
fn name_bit(name: &HeaderName) -> u64 {
    let bytes = name.as_str().as_bytes();
    let (Some(&last), Some(&middle)) = (bytes.last(), bytes.get(bytes.len() / 2)) else {
        return 1;
    };
    1 << ((bytes.len() * 11 + usize::from(last) * 3 + usize::from(middle)) % 64)
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), as bits:
/// bit `i` is `base::http1::HOP_BY_HOP[i]`.
const CONNECTION_BIT: u8 = 1;
const UPGRADE_BIT: u8 = 1 << 6;

fn hop_by_hop_bit(name: &str) -> u8 {
    hop_by_hop_index(name.as_bytes()).map_or(0, |i| 1 << i)
}

/// `base::http1::HOP_BY_HOP` as `HeaderName`s, in its order, so removal needs no parsing.
static HOP_BY_HOP_NAMES: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The `RateLimit-Policy` value of `status` (`"name";q=quota;w=window`), or with `current`
/// its `RateLimit` value (`"name";r=remaining;t=reset`).
fn rate_limit_value(out: &mut impl bytes::BufMut, name: &str, status: &LimitStatus, current: bool) {
    rate_limit_name(out, name);
    rate_limit_numbers(out, status, current);
}

/// The part of [`rate_limit_value`] before the numbers: `"name";`.
fn rate_limit_name(out: &mut impl bytes::BufMut, name: &str) {
    out.put_slice(b"\"");
    out.put_slice(name.as_bytes());
    out.put_slice(b"\";");
}

/// The part of [`rate_limit_value`] after the name: `q=quota;w=window`, or with `current`
/// `r=remaining;t=reset`.
fn rate_limit_numbers(out: &mut impl bytes::BufMut, status: &LimitStatus, current: bool) {
    let (a, x, b, y) = if current {
        (b'r', status.remaining, b't', status.reset_secs)
    } else {
        (b'q', status.quota, b'w', status.window_secs)
    };
    out.put_slice(&[a, b'=']);
    crate::base::http1::push_decimal(out, x);
    out.put_slice(&[b';', b, b'=']);
    crate::base::http1::push_decimal(out, y);
}

thread_local! {
    static POLICY_LINES: std::cell::RefCell<PolicyLines> = std::cell::RefCell::new(PolicyLines::default());
}

/// The `RateLimit-Policy` line a worker wrote last, and the start of the `RateLimit`
/// line that goes with it, with what they were rendered from. The policy is the same for
/// every response of one plan's limit, so most responses copy the line rather than
/// format the limit's name and two numbers again (docs/benchmarks.md, "Request ids
/// inline").
#[derive(Default)]
struct PolicyLines {
    /// The limit's name, quota and window the lines were rendered for.
    of: Option<(crate::limits::LimitName, u64, u64)>,
    /// `ratelimit-policy: "name";q=…;w=…` and CRLF, then `ratelimit: "name";`; empty
    /// when the name is no field value (`HeaderValue` would refuse it, and `insert_into`
    /// leaves such fields out).
    lines: Vec<u8>,
}

impl PolicyLines {
    fn write(&mut self, out: &mut Vec<u8>, status: &LimitStatus) {
        let current = self.of.as_ref().is_some_and(|(name, quota, window)| {
            *quota == status.quota && *window == status.window_secs && *name == status.name
        });
        if !current {
            self.render(status);
        }
        if self.lines.is_empty() {
            return;
        }
        out.reserve(self.lines.len() + 48);
        out.extend_from_slice(&self.lines);
        rate_limit_numbers(out, status, true);
        out.extend_from_slice(b"\r\n");
    }

    fn render(&mut self, status: &LimitStatus) {
        self.lines.clear();
        self.of = Some((status.name.clone(), status.quota, status.window_secs));
        let name = status.name.policy();
        if !crate::base::http1::is_field_value(name.as_bytes()) {
            return;
        }
        self.lines.extend_from_slice(b"ratelimit-policy: ");
        rate_limit_value(&mut self.lines, &name, status, false);
        self.lines.extend_from_slice(b"\r\nratelimit: ");
        rate_limit_name(&mut self.lines, &name);
    }
}

/// The fields the pipeline sets on a proxied response: `X-Request-Id`, and the
/// `RateLimit` fields of the limit closest to exhaustion. Kept as values beside the
/// upstream's fields as read, not in the response's map: the purpose-built server writes
/// them straight into the head, and only a writer that needs a map (hyper's) gets them
/// inserted into one (docs/benchmarks.md, "Response fields without a map"). They replace
/// any field of the same name the upstream sent.
#[derive(Debug, Default)]
pub struct SetFields {
    request_id: Option<RequestId>,
    limit: Option<LimitStatus>,
    retry_after: Option<u64>,
}

impl SetFields {
    pub fn new(request_id: RequestId, limit: Option<LimitStatus>, retry_after: Option<u64>) -> SetFields {
        SetFields {
            request_id: Some(request_id),
            limit,
            retry_after,
        }
    }

    /// A field named `name` (in any case) is set here. Told apart by length first, as
    /// each of the upstream's fields is asked (docs/benchmarks.md, "Forwarding by name
    /// length").
    pub fn sets(&self, name: &[u8]) -> bool {
        use crate::base::http1::same_name;
        match name.len() {
            12 => self.request_id.is_some() && same_name(name, b"x-request-id"),
            9 => self.limit.is_some() && same_name(name, b"ratelimit"),
            16 => self.limit.is_some() && same_name(name, b"ratelimit-policy"),
            11 => self.retry_after.is_some() && same_name(name, b"retry-after"),
            _ => false,
        }
    }

    /// Writes the fields as HTTP/1.1 lines, the names as literals.
    pub fn write(&self, out: &mut Vec<u8>) {
        if let Some(id) = &self.request_id {
            crate::base::http1::write_field(out, b"x-request-id", id.as_bytes());
        }
        if let Some(status) = &self.limit {
            POLICY_LINES.with(|lines| match lines.try_borrow_mut() {
                Ok(mut lines) => lines.write(out, status),
                Err(_) => PolicyLines::default().write(out, status),
            });
        }
        if let Some(seconds) = self.retry_after {
            out.extend_from_slice(b"retry-after: ");
            crate::base::http1::push_decimal(out, seconds);
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Inserts the fields into `headers`, replacing any of the same name: for a writer
    /// that needs a map (hyper's server), and for a response Tollgate makes itself.
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        if let Some(id) = &self.request_id {
            headers.insert(&X_REQUEST_ID, id.to_header());
        }
        if let Some(status) = &self.limit {
            // Both values written by hand and cut from the per-thread arena: `format!` and
            // its `String`s cost ~1,000 instructions per limited request (docs/benchmarks.md).
            let name = status.name.policy();
            let item = |current: bool| {
                crate::base::http1::arena_value(|value| rate_limit_value(value, &name, status, current))
            };
            if let (Ok(policy), Ok(current)) = (
                HeaderValue::from_maybe_shared(item(false)),
                HeaderValue::from_maybe_shared(item(true)),
            ) {
                headers.insert(&RATELIMIT_POLICY, policy);
                headers.insert(&RATELIMIT, current);
            }
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
    }
}

/// True when the client asks to switch protocols (WebSocket) on an HTTP/1.1 connection.
pub fn is_upgrade_request(fields: Fields<'_>) -> bool {
    fields.get(&header::UPGRADE).is_some()
        && fields
            .get_all(&header::CONNECTION)
            .filter_map(field_text)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Every protocol the `Upgrade` header asks for is in `allowed` (`server.upgrades`;
/// names compared without case, versions ignored: `websocket`, `h2c`).
pub fn upgrade_allowed(fields: Fields<'_>, allowed: &[String]) -> bool {
    fields
        .get_all(&header::UPGRADE)
        .flat_map(|v| v.split(|b| *b == b','))
        .map(|p| p.split(|b| *b == b'/').next().unwrap_or_default().trim_ascii())
        .filter(|p| !p.is_empty())
        .all(|protocol| allowed.iter().any(|a| a.as_bytes().eq_ignore_ascii_case(protocol)))
}

/// Removes hop-by-hop headers, including those named by `Connection`. When `keep_upgrade`
/// is set, `Connection: upgrade` and `Upgrade` survive so the switch can be forwarded.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names finds which are present; most messages carry none or one.
    let present = headers
        .keys()
        .fold(0u8, |acc, name| acc | hop_by_hop_bit(name.as_str()));
    if present == 0 && !keep_upgrade {
        return;
    }
    let mut present = present;
    if present & CONNECTION_BIT != 0 {
        // Removed here with the headers it names, so not again below.
        present &= !CONNECTION_BIT;
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
                // Standard hop-by-hop names are removed below; `&str` keys are looked up
                // without allocating a HeaderName.
                if !token.is_empty() && hop_by_hop_bit(token) == 0 {
                    headers.remove(token);
                }
            }
        }
    }
    for (bit, name) in HOP_BY_HOP_NAMES.iter().enumerate() {
        let bit = 1u8 << bit;
        let kept = keep_upgrade && bit == UPGRADE_BIT;
        if present & bit != 0 && !kept {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// `X-Forwarded-For` with the client address appended (as NGINX's
/// `$proxy_add_x_forwarded_for`). `client` is the address already rendered as a header
/// value (once per connection), borrowed when it is the whole field: no reference count
/// is touched for it per request (docs/benchmarks.md, "Locked instructions").
pub fn forwarded_for<'c>(fields: Fields<'_>, client: &'c [u8]) -> Option<FieldValue<'c>> {
    match fields.get(&X_FORWARDED_FOR) {
        Some(existing) if !existing.is_empty() => {
            let mut joined = Vec::with_capacity(existing.len() + 2 + client.len());
            joined.extend_from_slice(existing);
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(client);
            HeaderValue::from_maybe_shared(bytes::Bytes::from(joined))
                .ok()
                .map(FieldValue::Header)
        }
        _ => Some(FieldValue::Read(client)),
    }
}

/// An IP address as a header value whose clones share one buffer.
pub fn ip_header_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(ip.to_string())).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The client's request id when it is short and printable, else a new random one.
pub fn request_id(fields: Fields<'_>) -> RequestId {
    if let Some(bytes) = fields.get(&X_REQUEST_ID)
        && !bytes.is_empty()
        && bytes.len() <= 128
        && bytes.iter().all(|b| b.is_ascii_graphic())
        && let Some(value) = fields.value(&X_REQUEST_ID)
    {
        return RequestId::Given(value);
    }
    new_request_id()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fields browsers and API clients commonly send.
    const COMMON: [&str; 29] = [
        "host",
        "user-agent",
        "accept",
        "accept-encoding",
        "accept-language",
        "content-type",
        "content-length",
        "x-api-key",
        "cookie",
        "origin",
        "cache-control",
        "sec-fetch-mode",
        "sec-fetch-site",
        "sec-fetch-dest",
        "pragma",
        "dnt",
        "if-none-match",
        "if-modified-since",
        "x-forwarded-proto",
        "traceparent",
        "x-amzn-trace-id",
        "sec-ch-ua",
        "sec-ch-ua-mobile",
        "sec-ch-ua-platform",
        "upgrade-insecure-requests",
        "priority",
        "te",
        "accept-charset",
        "x-requested-with",
    ];

    /// The rarely present fields the pipeline looks up through `Names`.
    const LOOKED_UP: [&str; 6] = [
        "x-request-id",
        "x-forwarded-for",
        "authorization",
        "referer",
        "upgrade",
        "connection",
    ];

    #[test]
    fn a_map_of_common_fields_rules_out_every_field_looked_up_and_nothing_it_holds() {
        let mut headers = HeaderMap::new();
        for name in COMMON {
            headers.append(HeaderName::from_static(name), HeaderValue::from_static("v"));
        }
        let names = Names::of(&headers);
        for name in COMMON {
            let name = HeaderName::from_static(name);
            assert!(names.may_have(&name), "{name}");
            assert_eq!(names.get(&headers, &name), headers.get(&name), "{name}");
        }
        for name in LOOKED_UP {
            assert!(
                !names.may_have(&HeaderName::from_static(name)),
                "{name} shares a bit with a common field"
            );
        }
    }

    #[test]
    fn a_field_in_the_map_is_always_found_through_its_names() {
        // Any set of names: each one present is found, whatever else is there.
        let all: Vec<&str> = COMMON.iter().chain(LOOKED_UP.iter()).copied().collect();
        for (i, present) in all.iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert(HeaderName::from_static(present), HeaderValue::from_static("yes"));
            headers.insert(
                HeaderName::from_static(all[(i * 7 + 3) % all.len()]),
                HeaderValue::from_static("v"),
            );
            let names = Names::of(&headers);
            for name in &all {
                let name = HeaderName::from_static(name);
                assert_eq!(names.get(&headers, &name), headers.get(&name), "{name} with {present}");
            }
        }
        // Made without a map, nothing is ruled out.
        let mut headers = HeaderMap::new();
        headers.insert("referer", HeaderValue::from_static("https://a.example/"));
        assert_eq!(
            Names::default().get(&headers, &header::REFERER),
            headers.get(header::REFERER)
        );
    }

    #[test]
    fn hop_by_hop_headers_and_connection_tokens_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret-hop"));
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
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
        assert!(is_upgrade_request(Fields::of_map(&headers)));
        remove_hop_by_hop(&mut headers, true);
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::CONNECTION], "upgrade");
    }

    #[test]
    fn only_allowed_upgrades_are_tunnelled() {
        let allowed = vec!["websocket".to_string()];
        let upgrade = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::UPGRADE, HeaderValue::from_static(value));
            upgrade_allowed(Fields::of_map(&headers), &allowed)
        };
        assert!(upgrade("websocket"));
        assert!(upgrade("WebSocket"));
        assert!(!upgrade("h2c"));
        assert!(!upgrade("websocket, h2c"));
        assert!(!upgrade("TLS/1.2"));
    }

    #[test]
    fn forwarded_for_appends() {
        let append = |headers: &mut HeaderMap, ip: &str| {
            let client = ip_header_value(ip.parse().unwrap());
            let value = forwarded_for(Fields::of_map(headers), client.as_bytes()).unwrap();
            headers.insert(&X_FORWARDED_FOR, HeaderValue::from_bytes(value.as_bytes()).unwrap());
        };
        let mut headers = HeaderMap::new();
        append(&mut headers, "10.0.0.1");
        append(&mut headers, "10.0.0.2");
        assert_eq!(headers[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2");
        append(&mut headers, "::1");
        assert_eq!(headers[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2, ::1");
    }

    #[test]
    fn request_ids() {
        let generated = new_request_id();
        assert_eq!(generated.as_bytes().len(), 32);
        assert_ne!(generated, new_request_id());
        let mut headers = HeaderMap::new();
        headers.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(Fields::of_map(&headers)), "abc-123");
        headers.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_eq!(request_id(Fields::of_map(&headers)).as_bytes().len(), 32);
    }

    #[test]
    fn fields_as_read_are_found_as_in_the_map() {
        let head = b"GET / HTTP/1.1\r\nHost: api.example.com\r\nX-API-KEY: tg_live_1 \r\n\
            accept: text/html\r\nAccept: application/json\r\nX-Forwarded-For: 10.0.0.1\r\n\
            x-request-id: abc-123\r\nReferer: https://caf\xc3\xa9.example/\r\n\
            Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let read = RawHeaders::of_request_head(bytes::Bytes::from_static(head));
        let mut map = HeaderMap::new();
        for (name, value) in read.iter() {
            map.append(
                HeaderName::from_bytes(name).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        let empty = HeaderMap::new();
        let from_map = Fields::of_map(&map);
        let from_read = Fields::new(&empty, Names::of(&empty), Some(&read));
        for name in COMMON
            .iter()
            .chain(LOOKED_UP.iter())
            .chain(["x-api-key", "X-Missing"].iter())
        {
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert_eq!(from_read.get(&name), from_map.get(&name), "{name}");
            assert_eq!(
                from_read.get_all(&name).collect::<Vec<_>>(),
                from_map.get_all(&name).collect::<Vec<_>>(),
                "{name}"
            );
            assert_eq!(from_read.text(&name), from_map.text(&name), "{name}");
            assert_eq!(from_read.value(&name), from_map.value(&name), "{name}");
        }
        assert_eq!(
            from_read.text(&header::REFERER),
            None,
            "not visible ASCII, as to_str has it"
        );
        assert_eq!(from_read.get_all(&header::ACCEPT).count(), 2);
        assert_eq!(request_id(from_read), "abc-123");
        assert!(is_upgrade_request(from_read) && is_upgrade_request(from_map));
        let client = HeaderValue::from_static("10.0.0.2");
        assert_eq!(
            forwarded_for(from_read, client.as_bytes()).unwrap().as_bytes(),
            b"10.0.0.1, 10.0.0.2"
        );
    }

    #[test]
    fn the_pipelines_fields_are_written_as_a_map_would_hold_them() {
        use crate::limits::LimitName;
        let status = |name: LimitName| LimitStatus {
            name,
            quota: 1_000_000_000,
            window_secs: 86_400,
            remaining: 999_999_998,
            reset_secs: 3_600,
        };
        let other = |name: LimitName, quota: u64, window_secs: u64, remaining: u64| LimitStatus {
            name,
            quota,
            window_secs,
            remaining,
            reset_secs: 7,
        };
        // In this order on one thread, the worker's policy lines are reused (the same
        // limit again, other counts) and rendered anew (another name, quota or window).
        for (limit, retry_after) in [
            (None, None),
            (Some(status(LimitName::Daily)), None),
            (Some(other(LimitName::Daily, 1_000_000_000, 86_400, 5)), None),
            (Some(other(LimitName::Daily, 1_000_000_001, 86_400, 5)), None),
            (Some(other(LimitName::Daily, 1_000_000_001, 86_401, 0)), None),
            (Some(other(LimitName::Monthly, 1_000_000_001, 86_401, 0)), None),
            (Some(status(LimitName::GroupMonthly("geo".into()))), Some(30)),
            (Some(status(LimitName::GroupMonthly("geo2".into()))), Some(30)),
            (Some(status(LimitName::GroupDaily("bad\u{7f}name".into()))), None),
            (
                Some(other(LimitName::GroupDaily("bad\u{7f}name".into()), 3, 60, 1)),
                None,
            ),
            (Some(status(LimitName::Rate)), None),
            (None, Some(5)),
        ] {
            let id = match retry_after {
                Some(_) => new_request_id(),
                None => RequestId::Given(HeaderValue::from_static("req-1")),
            };
            let set = SetFields::new(id, limit.clone(), retry_after);
            let mut written = b"HTTP/1.1 200 OK\r\n".to_vec();
            set.write(&mut written);
            written.extend_from_slice(b"\r\n");
            let mut slots = [httparse::EMPTY_HEADER; 8];
            let mut parsed = httparse::Response::new(&mut slots);
            parsed.parse(&written).unwrap();
            let mut lines: Vec<(String, Vec<u8>)> = parsed
                .headers
                .iter()
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect();
            let mut map = HeaderMap::new();
            set.insert_into(&mut map);
            let mut inserted: Vec<(String, Vec<u8>)> = map
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect();
            lines.sort();
            inserted.sort();
            assert_eq!(lines, inserted, "{limit:?} {retry_after:?}");
            for (name, _) in &lines {
                assert!(set.sets(name.to_ascii_uppercase().as_bytes()), "{name}");
            }
            assert!(!set.sets(b"x-request"));
            assert_eq!(set.sets(b"RateLimit"), limit.is_some());
            assert_eq!(set.sets(b"retry-after"), retry_after.is_some());
        }
        let mut map = HeaderMap::new();
        SetFields::new(
            RequestId::Given(HeaderValue::from_static("r")),
            Some(status(LimitName::Rate)),
            None,
        )
        .insert_into(&mut map);
        assert_eq!(map["ratelimit-policy"], "\"rate\";q=1000000000;w=86400");
        assert_eq!(map["ratelimit"], "\"rate\";r=999999998;t=3600");
    }

    #[test]
    fn hop_by_hop_names_follow_the_shared_list() {
        for (i, name) in crate::base::http1::HOP_BY_HOP.iter().enumerate() {
            assert_eq!(HOP_BY_HOP_NAMES[i].as_str(), *name);
            assert_eq!(hop_by_hop_bit(name), 1 << i);
        }
        assert_eq!(hop_by_hop_bit("Connection"), CONNECTION_BIT);
        assert_eq!(hop_by_hop_bit("UPGRADE"), UPGRADE_BIT);
        assert_eq!(hop_by_hop_bit("x-hop"), 0);
    }
}
