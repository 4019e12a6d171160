//! One access-log record as one NDJSON line (the schema is in docs/access-logs.md).
//!
//! Written by hand rather than through serde: the record is assembled on the request path
//! in two parts (what the request head says, then what came of it), straight into a
//! reused buffer, with no allocation per field.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::base::RequestId;
use crate::base::http1::push_decimal;
use crate::base::json::plain_string;

/// A record's key as [`JsonObject`]'s methods take it: `log_key!("status")` is
/// `,"status":`, made at compile time.
macro_rules! log_key {
    ($name:literal) => {
        concat!(",\"", $name, "\":")
    };
}
pub(crate) use log_key;

/// The IPv4 socket address a worker's [`JsonObject::addr`] wrote last, as it wrote it.
#[derive(Clone, Copy)]
struct RenderedAddr {
    addr: Option<std::net::SocketAddrV4>,
    /// `"255.255.255.255:65535"` at the longest, quotes included.
    text: [u8; RenderedAddr::ROOM],
    len: u8,
}

impl RenderedAddr {
    const ROOM: usize = 24;
}

thread_local! {
    static LAST_ADDR: std::cell::Cell<RenderedAddr> = const {
        std::cell::Cell::new(RenderedAddr { addr: None, text: [0; RenderedAddr::ROOM], len: 0 })
    };
}

/// Appends `"key":value` pairs to a JSON object under construction.
pub struct JsonObject<'b> {
    out: &'b mut Vec<u8>,
    /// No pair written yet: the next key takes no comma.
    first: bool,
}

impl<'b> JsonObject<'b> {
    /// Starts an object (`{`) in `out`.
    pub fn open(out: &'b mut Vec<u8>) -> JsonObject<'b> {
        out.push(b'{');
        JsonObject { out, first: true }
    }

    /// Continues an object whose first pairs are already in `out`.
    pub fn resume(out: &'b mut Vec<u8>) -> JsonObject<'b> {
        JsonObject { out, first: false }
    }

    /// `key` is `,"name":` as [`log_key!`] makes it: one copy of a
    /// constant length per field, which compiles to a few moves, where the comma, the name
    /// and the colon apart cost three copies and three checks of the line's capacity
    /// (docs/benchmarks.md, "Keys as one literal").
    #[inline(always)]
    fn key(&mut self, key: &str) {
        debug_assert!(
            key.starts_with(",\"") && key.ends_with("\":"),
            "{key} is not a log_key!"
        );
        let key = if self.first {
            self.first = false;
            &key[1..]
        } else {
            key
        };
        self.out.extend_from_slice(key.as_bytes());
    }

    /// A string the caller knows needs no escaping (constants, validated ids, method
    /// tokens, rendered addresses): copied as it is.
    #[inline(always)]
    pub fn trusted(&mut self, key: &str, value: &str) -> &mut Self {
        self.trusted_bytes(key, value.as_bytes())
    }

    /// A request id: a generated one is hex digits, copied as they are; a client's own is
    /// printable ASCII (`proxy::headers::request_id`), which may still hold `"`.
    #[inline(always)]
    pub fn request_id(&mut self, key: &str, id: &RequestId) -> &mut Self {
        match id {
            RequestId::Generated(digits) => self.trusted_bytes(key, digits),
            RequestId::Given(value) => self.bytes(key, value.as_bytes()),
        }
    }

    /// [`JsonObject::trusted`] for bytes known to be such a string.
    #[inline(always)]
    pub fn trusted_bytes(&mut self, key: &str, value: &[u8]) -> &mut Self {
        debug_assert!(plain_string(value), "{value:?} needs escaping");
        self.key(key);
        self.out.push(b'"');
        self.out.extend_from_slice(value);
        self.out.push(b'"');
        self
    }

    /// A string checked once, where it was loaded ([`plain_string`]): copied as it is when
    /// `plain` says it may be, else escaped.
    #[inline(always)]
    pub fn checked(&mut self, key: &str, value: &str, plain: bool) -> &mut Self {
        if plain {
            self.trusted(key, value)
        } else {
            self.str(key, value)
        }
    }

    #[inline(always)]
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.bytes(key, value.as_bytes())
    }

    /// A string from bytes that may not be UTF-8 (header values): invalid bytes become
    /// U+FFFD, so every line stays valid JSON.
    #[inline(always)]
    pub fn bytes(&mut self, key: &str, value: &[u8]) -> &mut Self {
        self.key(key);
        escape_into(self.out, value);
        self
    }

    /// A value whose `Display` needs no escaping (addresses, numbers), formatted straight
    /// into the line.
    #[inline(always)]
    pub fn display(&mut self, key: &str, value: &impl std::fmt::Display) -> &mut Self {
        use std::io::Write;
        self.key(key);
        self.out.push(b'"');
        let _ = write!(self.out, "{value}");
        self.out.push(b'"');
        self
    }

    /// A socket address; IPv4 written by hand, since `fmt` cost about 2,000 instructions
    /// per record (docs/benchmarks.md), and copied as the worker last wrote it when it is
    /// the same address: most records name one of a pool's few upstreams, and writing
    /// five numbers cost five calls to `memcpy` (docs/benchmarks.md, "an upstream's
    /// address written once").
    pub fn addr(&mut self, key: &str, addr: &std::net::SocketAddr) -> &mut Self {
        let std::net::SocketAddr::V4(v4) = addr else {
            return self.display(key, addr);
        };
        self.key(key);
        let at = self.out.len();
        let last = LAST_ADDR.get();
        if last.addr == Some(*v4) {
            // A constant-length copy (a few moves), cut back to the text's length.
            self.out.extend_from_slice(&last.text);
            self.out.truncate(at + usize::from(last.len));
            return self;
        }
        self.out.push(b'"');
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            if i > 0 {
                self.out.push(b'.');
            }
            push_decimal(self.out, u64::from(octet));
        }
        self.out.push(b':');
        push_decimal(self.out, u64::from(v4.port()));
        self.out.push(b'"');
        let written = &self.out[at..];
        let mut text = [0; RenderedAddr::ROOM];
        if let Some(room) = text.get_mut(..written.len()) {
            room.copy_from_slice(written);
            LAST_ADDR.set(RenderedAddr {
                addr: Some(*v4),
                text,
                len: written.len() as u8,
            });
        }
        self
    }

    #[inline(always)]
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.str(key, value),
            None => self.null(key),
        }
    }

    #[inline(always)]
    pub fn null(&mut self, key: &str) -> &mut Self {
        self.key(key);
        self.out.extend_from_slice(b"null");
        self
    }

    #[inline(always)]
    pub fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        push_decimal(self.out, value);
        self
    }

    #[inline(always)]
    pub fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.key(key);
        self.out.extend_from_slice(if value { b"true" } else { b"false" });
        self
    }

    #[inline(always)]
    pub fn opt_u64(&mut self, key: &str, value: Option<u64>) -> &mut Self {
        match value {
            Some(value) => self.u64(key, value),
            None => self.null(key),
        }
    }

    /// Milliseconds with microsecond precision (`12.345`), from microseconds.
    #[inline(always)]
    pub fn millis(&mut self, key: &str, micros: u64) -> &mut Self {
        self.key(key);
        push_decimal(self.out, micros / 1000);
        self.out.push(b'.');
        let fraction = micros % 1000;
        self.out.extend_from_slice(&[
            b'0' + (fraction / 100) as u8,
            b'0' + (fraction / 10 % 10) as u8,
            b'0' + (fraction % 10) as u8,
        ]);
        self
    }

    #[inline(always)]
    pub fn opt_millis(&mut self, key: &str, micros: Option<u64>) -> &mut Self {
        match micros {
            Some(micros) => self.millis(key, micros),
            None => self.null(key),
        }
    }

    /// RFC 3339 UTC with microseconds: `2026-12-02T10:44:18.123456Z`.
    pub fn time(&mut self, key: &str, at: SystemTime) -> &mut Self {
        self.key(key);
        self.out.push(b'"');
        write_rfc3339_micros(self.out, at);
        self.out.push(b'"');
        self
    }

    /// [`JsonObject::time`] of the time `since` the Unix epoch, with the date and second
    /// rendered once per second in `cache` (the worker's).
    pub fn time_cached(&mut self, key: &str, since: Duration, cache: &mut SecondCache) -> &mut Self {
        if cache.second != Some(since.as_secs()) {
            let mut text = Vec::with_capacity(27);
            write_rfc3339_micros(&mut text, UNIX_EPOCH + since);
            cache.prefix.copy_from_slice(&text[..20]);
            cache.second = Some(since.as_secs());
        }
        self.key(key);
        self.out.push(b'"');
        self.out.extend_from_slice(&cache.prefix);
        let mut digits = [b'0'; 6];
        let mut rest = since.subsec_micros();
        for digit in digits.iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        self.out.extend_from_slice(&digits);
        self.out.extend_from_slice(b"Z\"");
        self
    }

    /// Ends the object and the line.
    pub fn close_line(self) {
        self.out.extend_from_slice(b"}\n");
    }
}

/// `2026-12-02T10:44:18.` for the last second a record was stamped in.
#[derive(Default)]
pub struct SecondCache {
    second: Option<u64>,
    prefix: [u8; 20],
}

/// A JSON string literal of `value`; bytes that are not UTF-8 become U+FFFD.
fn escape_into(out: &mut Vec<u8>, value: &[u8]) {
    out.push(b'"');
    // Most values (ids, paths, names) are printable ASCII with nothing to escape.
    if plain_string(value) {
        out.extend_from_slice(value);
        out.push(b'"');
        return;
    }
    for chunk in value.utf8_chunks() {
        let valid = chunk.valid().as_bytes();
        let mut start = 0;
        for (i, &b) in valid.iter().enumerate() {
            let escape: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..=0x1f | 0x7f => b"",
                _ => continue,
            };
            out.extend_from_slice(&valid[start..i]);
            if escape.is_empty() {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            } else {
                out.extend_from_slice(escape);
            }
            start = i + 1;
        }
        out.extend_from_slice(&valid[start..]);
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
    out.push(b'"');
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Seconds since the epoch to a civil UTC date and time.
pub fn civil(unix_secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let at = i64::try_from(unix_secs)
        .ok()
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    (
        i64::from(at.year()),
        u32::from(u8::from(at.month())),
        u32::from(at.day()),
        u32::from(at.hour()),
        u32::from(at.minute()),
        u32::from(at.second()),
    )
}

fn write_rfc3339_micros(out: &mut Vec<u8>, at: SystemTime) {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (year, month, day, hour, minute, second) = civil(since.as_secs());
    let micros = since.subsec_micros();
    let two =
        |value: u32, out: &mut Vec<u8>| out.extend_from_slice(&[b'0' + (value / 10) as u8, b'0' + (value % 10) as u8]);
    let year = year.clamp(0, 9999) as u32;
    two(year / 100, out);
    two(year % 100, out);
    out.push(b'-');
    two(month, out);
    out.push(b'-');
    two(day, out);
    out.push(b'T');
    two(hour, out);
    out.push(b':');
    two(minute, out);
    out.push(b':');
    two(second, out);
    out.push(b'.');
    let mut digits = [b'0'; 6];
    let mut rest = micros;
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// RFC 3339 UTC with microseconds, as a string (what `time` fields hold).
pub fn rfc3339_micros(at: SystemTime) -> String {
    let mut out = Vec::with_capacity(27);
    write_rfc3339_micros(&mut out, at);
    String::from_utf8(out).unwrap_or_default()
}

/// A compact, sortable UTC stamp for file names: `20261202T104418.123456Z`.
pub fn file_stamp(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (year, month, day, hour, minute, second) = civil(since.as_secs());
    format!(
        "{year:04}{month:02}{day:02}T{hour:02}{minute:02}{second:02}.{:06}Z",
        since.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn line(build: impl FnOnce(&mut JsonObject<'_>)) -> serde_json::Value {
        let mut out = Vec::new();
        let mut object = JsonObject::open(&mut out);
        build(&mut object);
        object.close_line();
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).expect("valid JSON")
    }

    #[test]
    fn strings_are_escaped_and_invalid_bytes_replaced() {
        let value = line(|o| {
            o.bytes(log_key!("a"), b"quote\" back\\ nl\n tab\t ctl\x01 del\x7f bad\xff end");
        });
        assert_eq!(
            value["a"],
            "quote\" back\\ nl\n tab\t ctl\u{1} del\u{7f} bad\u{fffd} end"
        );
    }

    #[test]
    fn checked_strings_are_copied_only_when_plain() {
        let value = line(|o| {
            o.checked(log_key!("plain"), "key_0123", true)
                .checked(log_key!("escaped"), "a\"b\\c\n", false);
        });
        assert_eq!(value["plain"], "key_0123");
        assert_eq!(value["escaped"], "a\"b\\c\n");
    }

    #[test]
    fn keys_join_with_commas_after_the_first() {
        let mut out = Vec::new();
        let mut object = JsonObject::open(&mut out);
        object.u64(log_key!("a"), 1).null(log_key!("b"));
        object.close_line();
        assert_eq!(out, b"{\"a\":1,\"b\":null}\n");
    }

    #[test]
    fn numbers_nulls_and_millis() {
        let value = line(|o| {
            o.u64(log_key!("zero"), 0)
                .u64(log_key!("max"), u64::MAX)
                .null(log_key!("none"))
                .millis(log_key!("ms"), 12_345)
                .millis(log_key!("small"), 7)
                .opt_u64(log_key!("absent"), None);
        });
        assert_eq!(value["zero"], 0);
        assert_eq!(value["max"], u64::MAX);
        assert!(value["none"].is_null());
        assert_eq!(value["ms"].as_f64(), Some(12.345));
        assert_eq!(value["small"].as_f64(), Some(0.007));
        assert!(value["absent"].is_null());
    }

    #[test]
    fn addresses_as_display_writes_them() {
        for addr in ["10.0.0.5:9000", "0.0.0.0:0", "255.255.255.255:65535", "[::1]:8080"] {
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            assert_eq!(
                line(|o| {
                    o.addr(log_key!("a"), &addr);
                })["a"],
                addr.to_string()
            );
        }
    }

    #[test]
    fn an_address_written_again_reads_the_same_and_a_new_one_replaces_it() {
        let first: std::net::SocketAddr = "255.255.255.255:65535".parse().unwrap();
        let second: std::net::SocketAddr = "10.0.0.5:80".parse().unwrap();
        for addr in [first, first, second, second, first] {
            let value = line(|o| {
                o.u64(log_key!("before"), 7)
                    .addr(log_key!("a"), &addr)
                    .u64(log_key!("after"), 9);
            });
            assert_eq!(value["a"], addr.to_string());
            assert_eq!((value["before"].as_u64(), value["after"].as_u64()), (Some(7), Some(9)));
        }
    }

    #[test]
    fn request_ids_are_recorded_as_they_read() {
        let made = crate::base::new_request_id();
        let given = RequestId::Given(http::HeaderValue::from_static("a\"b\\c"));
        let value = line(|o| {
            o.request_id(log_key!("made"), &made)
                .request_id(log_key!("given"), &given);
        });
        assert_eq!(value["made"], made.as_str());
        assert_eq!(value["given"], "a\"b\\c");
    }

    #[test]
    fn time_is_rfc3339_with_microseconds() {
        let at = UNIX_EPOCH + Duration::from_micros(1_796_208_258_000_042);
        let value = line(|o| {
            o.time(log_key!("time"), at);
        });
        assert_eq!(value["time"], "2026-12-02T10:44:18.000042Z");
        let mut cache = SecondCache::default();
        for micros in [42, 999_999, 1_000_001] {
            let at = UNIX_EPOCH + Duration::from_micros(1_796_208_258_000_000 + micros);
            let cached = line(|o| {
                o.time_cached(log_key!("time"), at.duration_since(UNIX_EPOCH).unwrap(), &mut cache);
            });
            let plain = line(|o| {
                o.time(log_key!("time"), at);
            });
            assert_eq!(cached, plain);
        }
        assert_eq!(file_stamp(at), "20261202T104418.000042Z");
        // Leap day and the turn of a century.
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
    }
}
