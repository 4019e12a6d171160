//! HTTP/1.1 wire helpers shared by the listener's head checks, the purpose-built server
//! path, the upstream codec and the access log: field values (RFC 9110 §5.6), decimal
//! numbers written without `fmt`, and header fields kept as the bytes read (`RawHeaders`).

use std::ops::Range;

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

/// Appends `value` in decimal (`itoa`: two digits per step from a table, about a quarter
/// of the instructions of a digit-by-digit loop for the nine-digit quotas in `RateLimit`).
pub fn push_decimal(out: &mut impl bytes::BufMut, value: u64) {
    out.put_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// A small field value the pipeline writes (a `RateLimit` value, a request id), cut from
/// a per-thread arena: one allocation per few KiB of values instead of one (or, for a
/// `Vec` turned into shared `Bytes`, two) per value. `write` appends the value's bytes
/// straight into the arena.
pub fn arena_value(write: impl FnOnce(&mut bytes::BytesMut)) -> Bytes {
    const BLOCK: usize = 4096;
    /// Room a value is expected to fit in; a longer one still works, as the arena then
    /// grows into a new block of its own.
    const ROOM: usize = 256;
    thread_local! {
        static ARENA: std::cell::RefCell<bytes::BytesMut> = std::cell::RefCell::new(bytes::BytesMut::new());
    }
    ARENA.with(|arena| {
        let arena = &mut *arena.borrow_mut();
        if arena.capacity() - arena.len() < ROOM {
            *arena = bytes::BytesMut::with_capacity(BLOCK);
        }
        write(arena);
        arena.split().freeze()
    })
}

/// Where a parsed head's fields lie in the bytes it was parsed from, taken while the
/// parse borrows them; [`RawHeaders::new`] pairs them with those bytes once split off
/// and frozen.
pub struct RawFields(Vec<RawField>);

impl RawFields {
    /// `headers` were parsed from `buf`. The list is one a head of this thread gave back
    /// when there is one: two heads a request (the client's and the upstream's) would
    /// otherwise cost an allocation and a free each.
    pub fn of(buf: &[u8], headers: &[httparse::Header<'_>]) -> RawFields {
        let mut list = FIELD_LISTS
            .try_with(|lists| lists.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        list.extend(headers.iter().map(|header| RawField {
            name: offset(buf, header.name.as_bytes()),
            value: offset(buf, header.value),
            hop: false,
            known: None,
        }));
        RawFields(list)
    }
}

thread_local! {
    static FIELD_LISTS: std::cell::RefCell<Vec<Vec<RawField>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Gives the list back for the thread's next head (`RawFields::of`), unless it grew large
/// or the thread keeps enough already.
impl Drop for RawHeaders {
    fn drop(&mut self) {
        const KEPT: usize = 32;
        let mut list = std::mem::take(&mut self.fields);
        if list.capacity() == 0 || list.capacity() > MAX_HEADERS {
            return;
        }
        list.clear();
        // At thread exit the pool may be gone already; the list is then simply freed.
        let _ = FIELD_LISTS.try_with(|lists| {
            let mut lists = lists.borrow_mut();
            if lists.len() < KEPT {
                lists.push(list);
            }
        });
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

/// The lengths of the [`HOP_BY_HOP`] names, as a set of bits ([`length_bit`]).
const HOP_BY_HOP_LENGTHS: u64 = {
    let mut set = 0;
    let mut i = 0;
    while i < HOP_BY_HOP.len() {
        set |= length_bit(HOP_BY_HOP[i].len());
        i += 1;
    }
    set
};

/// Where `name` (in any case) is in [`HOP_BY_HOP`], if it is a hop-by-hop field.
///
/// Most names are ruled out by their length alone, here, inlined where a head's fields
/// are classified: as a call, the comparisons' saved registers cost a plain name about
/// twenty instructions (docs/benchmarks.md, "Names by length").
#[inline]
pub fn hop_by_hop_index(name: &[u8]) -> Option<usize> {
    if HOP_BY_HOP_LENGTHS & length_bit(name.len()) == 0 {
        return None;
    }
    hop_by_hop_of_length(name)
}

/// [`hop_by_hop_index`] for a name of a hop-by-hop name's length: compared with the one
/// or two of that length.
#[inline(never)]
fn hop_by_hop_of_length(name: &[u8]) -> Option<usize> {
    let candidates: &[usize] = match name.len() {
        2 => &[3],
        7 => &[4, 6],
        10 => &[0, 1],
        16 => &[2],
        17 => &[5],
        19 => &[7],
        _ => return None,
    };
    candidates.iter().copied().find(|&at| {
        HOP_BY_HOP
            .get(at)
            .is_some_and(|known| same_name(known.as_bytes(), name))
    })
}

/// Two field names are the same (compared without case, RFC 9110 §5.1). Eight bytes at
/// a time: names are ASCII tokens, and the byte-by-byte `eq_ignore_ascii_case` cost
/// several times more for the lookups a request makes (docs/benchmarks.md, "Request
/// fields as read").
#[inline]
pub fn same_name(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if a.len() < 8 {
        return same_word(short_word(a), short_word(b));
    }
    // Whole words, then the last eight bytes (overlapping the last word when the length
    // is not a multiple of eight): no copy of a partial word.
    let last = a.len() - 8;
    a.chunks_exact(8)
        .zip(b.chunks_exact(8))
        .all(|(x, y)| same_word(word(x), word(y)))
        && same_word(word(&a[last..]), word(&b[last..]))
}

/// Eight bytes as a word.
#[inline]
fn word(bytes: &[u8]) -> u64 {
    bytes.first_chunk::<8>().map_or(0, |bytes| u64::from_le_bytes(*bytes))
}

/// Fewer than eight bytes as a word, zero-padded: built byte by byte, as copying a
/// slice of unknown length into a word calls `memcpy`.
#[inline]
fn short_word(bytes: &[u8]) -> u64 {
    bytes.iter().rev().fold(0, |word, &b| (word << 8) | u64::from(b))
}

/// Eight ASCII bytes each equal to the other's without case; bytes past ASCII (not in a
/// token) are compared one by one.
#[inline]
fn same_word(x: u64, y: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    if (x | y) & HIGH != 0 {
        return x.to_le_bytes().eq_ignore_ascii_case(&y.to_le_bytes());
    }
    // A byte is upper-case when adding `0x80 - 'A'` sets its high bit and adding
    // `0x80 - 'Z' - 1` does not; no sum carries into the next byte below 0x80.
    let lower = |w: u64| {
        let at_least_a = w.wrapping_add(ONES * u64::from(0x80 - b'A'));
        let past_z = w.wrapping_add(ONES * u64::from(0x80 - b'Z' - 1));
        w | ((at_least_a & !past_z & HIGH) >> 2)
    };
    lower(x) == lower(y)
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
    /// Which framing field it is, if one: named once, when the head is read.
    known: Option<FramingField>,
}

/// The fields that frame a message (RFC 9112 §6), looked up by [`RawHeaders::values`]
/// without comparing names again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingField {
    Connection,
    TransferEncoding,
    ContentLength,
}

impl FramingField {
    /// Which framing field `name` is, given its place in [`HOP_BY_HOP`].
    fn of(name: &[u8], hop: Option<usize>) -> Option<FramingField> {
        match hop.map(|at| HOP_BY_HOP[at]) {
            Some("connection") => Some(FramingField::Connection),
            Some("transfer-encoding") => Some(FramingField::TransferEncoding),
            Some(_) => None,
            None => same_name(name, b"content-length").then_some(FramingField::ContentLength),
        }
    }
}

/// A head's header fields as they were read: its bytes and where each name and value lie
/// in them. Forwarded by copying those bytes (docs/architecture.md, "Two HTTP/1.1 paths"),
/// not through a header map; names keep the sender's case.
#[derive(Debug)]
pub struct RawHeaders {
    head: Bytes,
    fields: Vec<RawField>,
    /// Bit `n % 64` for every name of `n` bytes: a lookup of a name no field could have
    /// (most of a request's lookups, for fields it rarely carries) ends at one test
    /// instead of a walk over the fields (docs/benchmarks.md, "Names by length").
    lengths: u64,
}

/// The bit of a set of name lengths (a head's, [`RawHeaders`]' `lengths`, or the
/// hop-by-hop names') for a name of `len` bytes: lengths 64 apart share one, so a set
/// rules names out, and a name it lets through is still compared.
const fn length_bit(len: usize) -> u64 {
    1 << (len % 64)
}

impl RawHeaders {
    /// A whole request head's fields, parsed here (for tests).
    #[cfg(test)]
    pub fn of_request_head(head: Bytes) -> RawHeaders {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut slots);
        parsed.parse(&head).unwrap();
        let fields = RawFields::of(&head, parsed.headers);
        RawHeaders::new(head.clone(), fields)
    }

    /// The fields over `head` (the bytes they were parsed from, frozen), with the
    /// connection's own fields marked.
    pub fn new(head: Bytes, fields: RawFields) -> RawHeaders {
        let mut fields = fields.0;
        let mut lengths = 0;
        for f in fields.iter_mut() {
            let name = field(&head, f.name);
            lengths |= length_bit(name.len());
            let hop = hop_by_hop_index(name);
            f.hop = hop.is_some();
            f.known = FramingField::of(name, hop);
        }
        // Fields a `Connection` header names describe the connection too (RFC 9110
        // §7.6.1); rare, so looked for only when one is there. The usual tokens
        // (`keep-alive`, `close`) name no field of the head, which the lengths show
        // without comparing a name; a field already known to be hop-by-hop is not
        // compared either.
        for i in 0..fields.len() {
            if fields[i].known != Some(FramingField::Connection) {
                continue;
            }
            let named = field(&head, fields[i].value);
            for token in named.split(|&b| b == b',').map(trim_ows).filter(|t| !t.is_empty()) {
                if lengths & length_bit(token.len()) == 0 {
                    continue;
                }
                for f in fields.iter_mut() {
                    if !f.hop && (f.name.1 - f.name.0) as usize == token.len() {
                        f.hop = same_name(field(&head, f.name), token);
                    }
                }
            }
        }
        RawHeaders { head, fields, lengths }
    }

    /// Every field, in order: (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|f| (field(&self.head, f.name), field(&self.head, f.value)))
    }

    /// The values of every field named `name` (compared without case), in order. A walk
    /// over the few fields a head has, most ruled out by their length alone: cheaper than
    /// building a map to hash into (docs/benchmarks.md, "Request fields as read").
    pub fn get_all<'a, 'n>(&'a self, name: &'n [u8]) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        let candidates: &[RawField] = if self.lengths & length_bit(name.len()) != 0 {
            &self.fields
        } else {
            &[]
        };
        candidates
            .iter()
            // The length from the offsets first: cheaper than slicing every name to compare.
            .filter(move |f| (f.name.1 - f.name.0) as usize == name.len() && same_name(field(&self.head, f.name), name))
            .map(|f| field(&self.head, f.value))
    }

    /// The first value of field `name` (compared without case).
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.get_all(name).next()
    }

    /// `part` (a value these fields gave) as shared bytes, with no copy.
    pub fn shared(&self, part: &[u8]) -> Bytes {
        self.head.slice_ref(part)
    }

    /// The values of every `which` field, in order: what `get_all` gives for its name,
    /// without comparing names.
    pub fn values(&self, which: FramingField) -> impl Iterator<Item = &[u8]> {
        self.fields
            .iter()
            .filter(move |f| f.known == Some(which))
            .map(|f| field(&self.head, f.value))
    }

    /// The fields that go on to the next hop: all but the connection's own.
    pub fn forwarded(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.forwarded_lines().map(|(name, value, _)| (name, value))
    }

    /// The forwarded fields, each with where its whole line lies in [`RawHeaders::bytes`]
    /// (name to CRLF) when it ends in CRLF: a writer copies a run of adjacent lines it
    /// keeps as one slice, as it was read.
    pub fn forwarded_lines(&self) -> impl Iterator<Item = (&[u8], &[u8], Option<Range<usize>>)> {
        let head = &self.head[..];
        self.fields
            .iter()
            .enumerate()
            .filter(|(_, f)| !f.hop)
            .map(move |(i, f)| {
                // A line ends where the next begins; the last, before the blank line.
                let end = match self.fields.get(i + 1) {
                    Some(next) => next.name.0 as usize,
                    None => head.len().saturating_sub(2),
                };
                let start = f.name.0 as usize;
                let line =
                    (end >= f.value.1 as usize + 2 && head.get(end - 2..end) == Some(b"\r\n")).then_some(start..end);
                (field(head, f.name), field(head, f.value), line)
            })
    }

    /// The bytes the fields were read from.
    pub fn bytes(&self) -> &[u8] {
        &self.head
    }

    /// Writes the forwarded fields `keep` takes (given each name as read) to `out`: runs of
    /// adjacent lines as they were read, in one copy each, and a line that did not end in
    /// CRLF written again.
    pub fn write_forwarded(&self, out: &mut Vec<u8>, mut keep: impl FnMut(&[u8]) -> bool) {
        let mut run: Option<Range<usize>> = None;
        for (name, value, line) in self.forwarded_lines() {
            if !keep(name) {
                continue;
            }
            match (&mut run, line) {
                (Some(run), Some(line)) if run.end == line.start => run.end = line.end,
                (_, line) => {
                    if let Some(done) = run.take() {
                        out.extend_from_slice(&self.head[done]);
                    }
                    match line {
                        Some(line) => run = Some(line),
                        None => write_field(out, name, value),
                    }
                }
            }
        }
        if let Some(done) = run {
            out.extend_from_slice(&self.head[done]);
        }
    }

    /// Merges the forwarded fields into `headers` (for a writer that needs a map: hyper's
    /// server, HTTP/2). Names already in `headers` were set by the pipeline and replace
    /// the fields read; a field `http` does not take is left out.
    pub fn merge_into(self, headers: &mut HeaderMap) {
        let set = std::mem::take(headers);
        let mut merged = HeaderMap::with_capacity(self.fields.len() + set.len());
        self.append_forwarded(&mut merged, |name| !set.contains_key(name));
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

    /// Appends the forwarded fields to `headers` (for a client that writes a map: hyper's,
    /// HTTP/2); a field `http` does not take is left out.
    pub fn copy_into(&self, headers: &mut HeaderMap) {
        headers.reserve(self.fields.len());
        self.append_forwarded(headers, |_| true);
    }

    fn append_forwarded(&self, headers: &mut HeaderMap, take: impl Fn(&HeaderName) -> bool) {
        for (name, value) in self.forwarded() {
            let Ok(name) = HeaderName::from_bytes(name) else {
                continue;
            };
            if !take(&name) {
                continue;
            }
            if let Ok(value) = HeaderValue::from_maybe_shared(self.head.slice_ref(value)) {
                headers.append(name, value);
            }
        }
    }
}

/// A field line, `name: value`, as HTTP/1.1 writes it.
pub fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `value` may be sent as a field value as it is: no control character but tabs, and no
/// DEL (what `HeaderValue::from_bytes` takes).
pub fn is_field_value(value: &[u8]) -> bool {
    value.iter().all(|&b| b == b'\t' || (b >= b' ' && b != 0x7f))
}

/// A field value as text when it is visible ASCII (and tabs): what
/// `HeaderValue::to_str` accepts, for values read without a header map. `value` is one
/// httparse or `http` took, so it holds no control character but tabs and no DEL: being
/// ASCII is then being visible ASCII, checked a word at a time rather than byte by byte.
pub fn field_text(value: &[u8]) -> Option<&str> {
    if value.is_ascii() {
        std::str::from_utf8(value).ok()
    } else {
        None
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
    fn every_hop_by_hop_name_is_found_in_any_case_and_nothing_else_is() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name.as_bytes()), Some(i), "{name}");
            assert_eq!(
                hop_by_hop_index(name.to_ascii_uppercase().as_bytes()),
                Some(i),
                "{name}"
            );
            // One letter off, and one letter longer: not hop-by-hop.
            let mut near = name.as_bytes().to_vec();
            near[0] ^= 1;
            assert_eq!(hop_by_hop_index(&near), None, "{name}");
            assert_eq!(hop_by_hop_index(format!("{name}s").as_bytes()), None, "{name}");
            // 64 bytes longer: the same bit of the length set, still compared, not found.
            assert_eq!(
                hop_by_hop_index(format!("{name}{}", "x".repeat(64)).as_bytes()),
                None,
                "{name}"
            );
        }
        for other in ["host", "content-length", "x-api-key", "accept", "t", "", "upgrades"] {
            assert!(!is_hop_by_hop(other.as_bytes()), "{other}");
        }
    }

    #[test]
    fn lookups_by_name_find_what_a_walk_finds() {
        let long = "a".repeat(65);
        let head = format!("HTTP/1.1 200 OK\r\nHost: h\r\n{long}: 65\r\nX-Api-Key: k1\r\nx-api-key: k2\r\n\r\n");
        let head: &'static [u8] = Box::leak(head.into_bytes().into_boxed_slice());
        let raw = raw_headers(head);
        // Names of every length up to 130, present or not, and names whose length shares
        // a bit with a present one (1 and 65, 9 and 73).
        for len in 0..=130 {
            for letter in [b'a', b'x'] {
                let name = vec![letter; len];
                let walked: Vec<&[u8]> = raw
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(&name))
                    .map(|(_, v)| v)
                    .collect();
                assert_eq!(raw.get_all(&name).collect::<Vec<_>>(), walked, "{len}");
            }
        }
        assert_eq!(raw.get(long.as_bytes()), Some(&b"65"[..]));
        assert_eq!(raw.get(b"HOST"), Some(&b"h"[..]));
        assert_eq!(raw.get_all(b"x-API-key").collect::<Vec<_>>(), [&b"k1"[..], b"k2"]);
        assert_eq!(raw.get(b"a"), None);
        assert_eq!(raw.get(b"referer"), None);
    }

    #[test]
    fn names_are_the_same_in_any_case_and_only_then() {
        let tchars = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        // Every token character against every other, at every place in names of every
        // length up to 25 (short words, two overlapping words, and the loop of words).
        for len in (1..=17).chain([23, 24, 25]) {
            for at in 0..len {
                for &x in tchars.iter().chain([0x80u8, 0xc3, 0xff].iter()) {
                    for &y in tchars.iter().chain([0x80u8, 0xe3].iter()) {
                        let mut a = vec![b'k'; len];
                        let mut b = vec![b'K'; len];
                        a[at] = x;
                        b[at] = y;
                        assert_eq!(same_name(&a, &b), a.eq_ignore_ascii_case(&b), "{a:?} {b:?}");
                    }
                }
            }
        }
        assert!(same_name(b"X-API-Key", b"x-api-key"));
        assert!(!same_name(b"x-api-key", b"x-api-ke"));
        assert!(same_name(b"", b""));
    }

    #[test]
    fn field_text_is_to_str_for_values_http_takes() {
        for value in [
            &b"plain"[..],
            b"with\ttab and space",
            b"caf\xc3\xa9",
            b"",
            b"~!\"#",
            b"\x80",
        ] {
            let header = HeaderValue::from_bytes(value).unwrap();
            assert_eq!(field_text(value), header.to_str().ok(), "{value:?}");
        }
    }

    #[test]
    fn arena_values_are_separate_whatever_their_length() {
        let a = arena_value(|v| v.extend_from_slice(b"\"rate\";q=10;w=1"));
        let long = arena_value(|v| v.extend_from_slice(&[b'x'; 10_000]));
        let b = arena_value(|v| push_decimal(v, 18_446_744_073_709_551_615));
        assert_eq!(&a[..], b"\"rate\";q=10;w=1");
        assert_eq!(long.len(), 10_000);
        assert!(long.iter().all(|&c| c == b'x'));
        assert_eq!(&b[..], b"18446744073709551615");
        let many: Vec<Bytes> = (0..1000u64).map(|i| arena_value(|v| push_decimal(v, i))).collect();
        assert!(many.iter().enumerate().all(|(i, v)| v[..] == *i.to_string().as_bytes()));
    }

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

    /// A whole response head's fields, as the upstream client keeps them.
    fn raw_headers(raw: &'static [u8]) -> RawHeaders {
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut slots);
        response.parse(raw).unwrap();
        RawHeaders::new(Bytes::from_static(raw), RawFields::of(raw, response.headers))
    }

    #[test]
    fn fields_are_found_in_any_case_and_absent_ones_are_not() {
        let fields =
            raw_headers(b"HTTP/1.1 200 OK\r\nX-Api-KEY: k\r\nreferer: r\r\nSet-Cookie: a\r\nset-cookie: b\r\n\r\n");
        assert_eq!(fields.get(b"x-api-key"), Some(&b"k"[..]));
        assert_eq!(fields.get(b"X-API-Key"), Some(&b"k"[..]));
        assert_eq!(fields.get(b"REFERER"), Some(&b"r"[..]));
        assert_eq!(fields.get_all(b"set-cookie").collect::<Vec<_>>(), [&b"a"[..], b"b"]);
        for absent in [
            &b"x-request-id"[..],
            b"x-forwarded-for",
            b"authorization",
            b"upgrade",
            b"connection",
            b"x-api-kez",
            b"referer2",
            b"",
        ] {
            assert_eq!(fields.get(absent), None, "{absent:?}");
        }
    }

    #[test]
    fn forwarded_lines_are_whole_crlf_lines_and_bare_lf_ones_are_not_offered() {
        let lines = |raw: &'static [u8]| {
            let fields = raw_headers(raw);
            fields
                .forwarded_lines()
                .map(|(name, value, line)| {
                    (
                        String::from_utf8(name.to_vec()).unwrap(),
                        String::from_utf8(value.to_vec()).unwrap(),
                        line.map(|line| String::from_utf8(fields.bytes()[line].to_vec()).unwrap()),
                    )
                })
                .collect::<Vec<_>>()
        };
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            lines(b"HTTP/1.1 200 OK\r\nServer: up \r\nConnection: close\r\nX-A:1\r\nDate: d\r\n\r\n"),
            [
                ("Server".into(), "up".into(), some("Server: up \r\n")),
                ("X-A".into(), "1".into(), some("X-A:1\r\n")),
                ("Date".into(), "d".into(), some("Date: d\r\n")),
            ],
            "the hop-by-hop line is left out; the others are whole, as read"
        );
        assert_eq!(
            lines(b"HTTP/1.1 200 OK\nServer: up\nX-A: 1\r\nDate: d\n\n"),
            [
                ("Server".into(), "up".into(), None),
                ("X-A".into(), "1".into(), some("X-A: 1\r\n")),
                ("Date".into(), "d".into(), None),
            ],
            "a line ended by a bare LF is written again, not copied"
        );
        assert_eq!(
            lines(b"HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Blank:  \r\nX-B: 1\r\n\r\n"),
            [
                ("X-Empty".into(), "".into(), some("X-Empty:\r\n")),
                ("X-Blank".into(), "".into(), some("X-Blank:  \r\n")),
                ("X-B".into(), "1".into(), some("X-B: 1\r\n")),
            ],
            "empty values are lines like the others"
        );
    }

    #[test]
    fn framing_fields_are_named_once_in_any_case_and_others_are_not_taken_for_them() {
        let raw = b"HTTP/1.1 200 OK\r\nCONTENT-length: 5\r\nConnection: close\r\nTransfer-Encoding: gzip\r\n\
            content-length: 5\r\nContent-Type: text/plain\r\nX-Connection: no\r\nKeep-Alive: timeout=5\r\n\
            transfer-ENCODING: chunked\r\nContent-Length-X: 9\r\n\r\n";
        let fields = raw_headers(raw);
        for (which, name) in [
            (FramingField::Connection, &b"connection"[..]),
            (FramingField::TransferEncoding, b"transfer-encoding"),
            (FramingField::ContentLength, b"content-length"),
        ] {
            assert_eq!(
                fields.values(which).collect::<Vec<_>>(),
                fields.get_all(name).collect::<Vec<_>>(),
                "{which:?}"
            );
        }
        assert_eq!(
            fields.values(FramingField::ContentLength).collect::<Vec<_>>(),
            [b"5", b"5"]
        );
        assert_eq!(
            fields.values(FramingField::TransferEncoding).collect::<Vec<_>>(),
            [&b"gzip"[..], b"chunked"]
        );
        assert_eq!(fields.values(FramingField::Connection).collect::<Vec<_>>(), [b"close"]);
    }

    #[test]
    fn a_connection_token_marks_every_field_of_its_name_and_no_other() {
        let long = format!("x-{}", "a".repeat(64));
        let raw = format!(
            "HTTP/1.1 200 OK\r\nX-Abc: 1\r\nConnection: close,  x-abc ,x-bcd, X-Z\r\nX-Bcd: 2\r\nX-Cde: 3\r\n\
             x-abc: 4\r\nX-Y: 5\r\n{long}: 6\r\nConnection: {}\r\nX-Z: 7\r\n\r\n",
            &long[..2]
        );
        let fields = raw_headers(raw.leak().as_bytes());
        let forwarded: Vec<_> = fields.forwarded().collect();
        assert_eq!(
            forwarded,
            [(&b"X-Cde"[..], &b"3"[..]), (b"X-Y", b"5"), (long.as_bytes(), b"6")],
            "both x-abc, x-bcd and X-Z are named; X-Cde and X-Y have their lengths only, and \
             the long name's length is 64 more than a token's"
        );
    }

    #[test]
    fn fields_as_read_drop_the_connections_own_and_merge_under_the_map() {
        let raw = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: keep-alive, X-Hop\r\nx-hop: s\r\n\
            Keep-Alive: timeout=5\r\nTE: trailers\r\nx-a: 2\r\nX-Id: up\r\n\r\n";
        let fields = raw_headers(raw);
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
