//! One access-log record as one NDJSON line (the schema is in docs/access-logs.md).
//!
//! Written by hand rather than through serde: the record is assembled on the request path
//! in two parts (what the request head says, then what came of it), straight into a
//! reused buffer, with no allocation per field.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::base::RequestId;
use crate::base::http1::push_decimal;

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

    // Inlined everywhere: with the key a literal, each copy below has a constant length
    // and compiles to a few moves instead of a call to memcpy (most of a record's cost).
    #[inline(always)]
    fn key(&mut self, key: &str) {
        if self.first {
            self.first = false;
            self.out.extend_from_slice(b"\"");
        } else {
            self.out.extend_from_slice(b",\"");
        }
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
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
        debug_assert!(value.iter().all(|&b| SAFE[usize::from(b)]), "{value:?} needs escaping");
        self.key(key);
        self.out.push(b'"');
        self.out.extend_from_slice(value);
        self.out.push(b'"');
        self
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
    /// per record (docs/benchmarks.md).
    pub fn addr(&mut self, key: &str, addr: &std::net::SocketAddr) -> &mut Self {
        let std::net::SocketAddr::V4(v4) = addr else {
            return self.display(key, addr);
        };
        self.key(key);
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
    if all_safe(value) {
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

/// Whether every byte of `value` is one [`SAFE`] holds, eight at a time: a byte-wise table
/// lookup took about a hundred instructions for a request id alone, a record having
/// several such values (docs/benchmarks.md, "Fewer and smaller moves").
fn all_safe(value: &[u8]) -> bool {
    let mut words = value.chunks_exact(8);
    for word in &mut words {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(word);
        if !word_safe(u64::from_le_bytes(bytes)) {
            return false;
        }
    }
    words.remainder().iter().all(|&b| SAFE[usize::from(b)])
}

/// [`SAFE`] for eight bytes at once. Each test below is exact for "any byte", which is all
/// that is asked (the classic bit tricks for bytes below, above or equal to a value).
fn word_safe(x: u64) -> bool {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGH != 0;
    // Adding 1 sets the high bit of 0x7f; bytes already at 0x80 and above have it.
    let above_tilde = (x.wrapping_add(ONES) | x) & HIGH != 0;
    !(below_space || above_tilde || zero_byte(x ^ (ONES * u64::from(b'"'))) || zero_byte(x ^ (ONES * u64::from(b'\\'))))
}

/// Bytes a JSON string holds as they are: printable ASCII but `"` and `\`.
static SAFE: [bool; 256] = {
    let mut safe = [false; 256];
    let mut b = 0x20;
    while b < 0x7f {
        safe[b] = b != b'"' as usize && b != b'\\' as usize;
        b += 1;
    }
    safe
};

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
            o.bytes("a", b"quote\" back\\ nl\n tab\t ctl\x01 del\x7f bad\xff end");
        });
        assert_eq!(
            value["a"],
            "quote\" back\\ nl\n tab\t ctl\u{1} del\u{7f} bad\u{fffd} end"
        );
    }

    #[test]
    fn eight_bytes_at_a_time_agree_with_the_table() {
        // Every byte value at every place of a word, and in the tail behind one.
        for len in [1, 7, 8, 9, 16, 17] {
            for place in 0..len {
                for b in 0..=255u8 {
                    let mut value = vec![b'a'; len];
                    value[place] = b;
                    assert_eq!(
                        all_safe(&value),
                        SAFE[usize::from(b)],
                        "byte {b:#04x} at {place} of {len}"
                    );
                }
            }
        }
        // Neighbours of the limits together, where a borrow between bytes could hide one.
        for pair in [
            [0x1f, 0x20],
            [0x20, 0x1f],
            [0x7e, 0x7f],
            [0x7f, 0x7e],
            [0x00, 0xff],
            [0x21, 0x23],
            [0x5b, 0x5d],
        ] {
            let mut value = *b"abcdefgh";
            value[3..5].copy_from_slice(&pair);
            let expected = pair.iter().all(|&b| SAFE[usize::from(b)]);
            assert_eq!(all_safe(&value), expected, "{pair:?}");
        }
        assert!(all_safe(b""));
        assert!(all_safe(b"0123456789abcdef0123456789abcdef"));
    }

    #[test]
    fn numbers_nulls_and_millis() {
        let value = line(|o| {
            o.u64("zero", 0)
                .u64("max", u64::MAX)
                .null("none")
                .millis("ms", 12_345)
                .millis("small", 7)
                .opt_u64("absent", None);
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
                    o.addr("a", &addr);
                })["a"],
                addr.to_string()
            );
        }
    }

    #[test]
    fn request_ids_are_recorded_as_they_read() {
        let made = crate::base::new_request_id();
        let given = RequestId::Given(http::HeaderValue::from_static("a\"b\\c"));
        let value = line(|o| {
            o.request_id("made", &made).request_id("given", &given);
        });
        assert_eq!(value["made"], made.as_str());
        assert_eq!(value["given"], "a\"b\\c");
    }

    #[test]
    fn time_is_rfc3339_with_microseconds() {
        let at = UNIX_EPOCH + Duration::from_micros(1_796_208_258_000_042);
        let value = line(|o| {
            o.time("time", at);
        });
        assert_eq!(value["time"], "2026-12-02T10:44:18.000042Z");
        let mut cache = SecondCache::default();
        for micros in [42, 999_999, 1_000_001] {
            let at = UNIX_EPOCH + Duration::from_micros(1_796_208_258_000_000 + micros);
            let cached = line(|o| {
                o.time_cached("time", at.duration_since(UNIX_EPOCH).unwrap(), &mut cache);
            });
            let plain = line(|o| {
                o.time("time", at);
            });
            assert_eq!(cached, plain);
        }
        assert_eq!(file_stamp(at), "20261202T104418.000042Z");
        // Leap day and the turn of a century.
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
    }
}
