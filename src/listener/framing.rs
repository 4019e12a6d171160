//! RFC 9112's rules for a request head, checked before anything is proxied
//! (docs/security.md, "Strict HTTP/1.1"). A pure function over the head's bytes, so every
//! case is a unit test and a fuzz target.
//!
//! hyper would accept some of these heads (it drops `Content-Length` beside
//! `Transfer-Encoding`, and serves a head whose lines end in a bare LF, which the guard
//! would not see end) or answer them with a bare 400 of its own; here each is refused with
//! the JSON error body.

use crate::base::ErrorKind;
use crate::base::http1::{MAX_HEADERS, parse_length, same_name, trim_ows};

/// What follows a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    None,
    Length(u64),
    Chunked,
}

/// Checks a complete head (request line to the empty line) and tells what body follows.
pub fn check_head(head: &[u8]) -> Result<BodyLength, ErrorKind> {
    if has_bare_lf(head, 0) {
        return Err(ErrorKind::BadRequest);
    }
    // Uninitialised slots: initialising 128 headers would cost more than the parse.
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    parse_complete(&mut request, head, &mut headers)?;
    check_parsed(&request)
}

/// Parses a complete head (which must not hold a bare LF: see [`has_bare_lf`]).
pub fn parse_complete<'h, 'b>(
    request: &mut httparse::Request<'h, 'b>,
    head: &'b [u8],
    slots: &'h mut [std::mem::MaybeUninit<httparse::Header<'b>>],
) -> Result<(), ErrorKind> {
    match request.parse_with_uninit_headers(head, slots) {
        Ok(httparse::Status::Complete(_)) => Ok(()),
        Ok(httparse::Status::Partial) => Err(ErrorKind::BadRequest),
        Err(httparse::Error::TooManyHeaders) => Err(ErrorKind::HeadersTooLarge),
        Err(_) => Err(ErrorKind::BadRequest),
    }
}

/// [`check_head`]'s rules over a head already parsed.
pub fn check_parsed(request: &httparse::Request<'_, '_>) -> Result<BodyLength, ErrorKind> {
    let (Some(method), Some(target), Some(minor)) = (request.method, request.path, request.version) else {
        return Err(ErrorKind::BadRequest);
    };
    // A gateway of APIs tunnels nothing with CONNECT.
    if method == "CONNECT" {
        return Err(ErrorKind::NotImplemented);
    }
    check_target(method, target)?;
    let mut host = None;
    let mut length = None;
    let mut chunked = false;
    for header in request.headers.iter() {
        let name = header.name;
        if same_name(name.as_bytes(), b"host") {
            // §3.2: more than one Host is a 400.
            if host.replace(header.value).is_some() {
                return Err(ErrorKind::BadRequest);
            }
        } else if same_name(name.as_bytes(), b"content-length") {
            // §6.3: an invalid length is unrecoverable; duplicates are refused as NGINX
            // does rather than guessing which one the upstream would believe.
            if length.is_some() {
                return Err(ErrorKind::BadRequest);
            }
            length = Some(parse_length(header.value).ok_or(ErrorKind::BadRequest)?);
        } else if same_name(name.as_bytes(), b"transfer-encoding") {
            // §6.1: a request must end in `chunked`, applied once; other codings are not
            // supported (501, as the RFC suggests).
            for coding in header.value.split(|b| *b == b',').map(trim_ows) {
                if coding.is_empty() {
                    continue;
                }
                if chunked {
                    return Err(ErrorKind::BadRequest);
                }
                if coding.eq_ignore_ascii_case(b"chunked") {
                    chunked = true;
                } else {
                    return Err(ErrorKind::NotImplemented);
                }
            }
            if !chunked {
                return Err(ErrorKind::BadRequest);
            }
        }
    }
    match host {
        // §3.2: an HTTP/1.1 request without Host is a 400; HTTP/1.0 may omit it.
        None if minor == 1 => return Err(ErrorKind::BadRequest),
        Some(value) if !valid_authority(value) => return Err(ErrorKind::BadRequest),
        _ => {}
    }
    if chunked {
        // §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing; beside Content-Length
        // it is a request-smuggling vector (§6.3).
        if minor == 0 || length.is_some() {
            return Err(ErrorKind::BadRequest);
        }
        return Ok(BodyLength::Chunked);
    }
    Ok(match length {
        Some(n) if n > 0 => BodyLength::Length(n),
        _ => BodyLength::None,
    })
}

/// An incomplete head that can already be refused: hyper parses what it has and answers a
/// request line it finds invalid (a wrong version, a stray space) with a bare 400 of its
/// own, so the guard must refuse such bytes before they reach it.
pub fn check_partial(head: &[u8]) -> Result<(), ErrorKind> {
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    match request.parse_with_uninit_headers(head, &mut headers) {
        Ok(_) => Ok(()),
        Err(httparse::Error::TooManyHeaders) => Err(ErrorKind::HeadersTooLarge),
        Err(_) => Err(ErrorKind::BadRequest),
    }
}

/// What a buffer that starts with a request head holds, as one pass over its line ends
/// finds it: the head's end, or a bare LF before it (see [`has_bare_lf`]), or neither yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadScan {
    /// The head ends (after its CRLF CRLF) at this length, with no bare LF before it.
    End(usize),
    /// A bare LF comes before any end of the head.
    BareLf,
    /// Part of a head, every line end so far a CRLF.
    Partial,
}

/// Finds where the head at the start of `bytes` ends, checking its line ends on the way:
/// the same answer as searching for CRLF CRLF and then for a bare LF before it, in one
/// pass instead of two (docs/benchmarks.md, "One pass to a head's end").
pub fn scan_head(bytes: &[u8]) -> HeadScan {
    for i in memchr::memchr_iter(b'\n', bytes) {
        if i == 0 || bytes[i - 1] != b'\r' {
            return HeadScan::BareLf;
        }
        // This CRLF ends an empty line: the one before it ended at i - 2.
        if i >= 3 && bytes[i - 2] == b'\n' && bytes[i - 3] == b'\r' {
            return HeadScan::End(i + 1);
        }
    }
    HeadScan::Partial
}

/// A bare LF (not after CR) at or after `from`: RFC 9112 §2.2 lets a recipient accept it,
/// but the guard finds a head's end by CRLF CRLF, and the upstream may read lines either
/// way — refusing keeps every party's view of where the head ends the same.
pub fn has_bare_lf(bytes: &[u8], from: usize) -> bool {
    let Some(tail) = bytes.get(from..) else {
        return false;
    };
    memchr::memchr_iter(b'\n', tail).any(|i| from + i == 0 || bytes[from + i - 1] != b'\r')
}

/// §3.2: origin-form (`/path?query`), absolute-form (`http://authority/path`) or, for
/// OPTIONS only, `*`.
fn check_target(method: &str, target: &str) -> Result<(), ErrorKind> {
    let bytes = target.as_bytes();
    if !bytes.iter().all(|b| TARGET[*b as usize]) {
        return Err(ErrorKind::BadRequest);
    }
    if bytes.first() == Some(&b'/') {
        return Ok(());
    }
    if target == "*" {
        return if method == "OPTIONS" {
            Ok(())
        } else {
            Err(ErrorKind::BadRequest)
        };
    }
    let rest = ["http://", "https://"]
        .iter()
        .find_map(|scheme| {
            target
                .get(..scheme.len())
                .filter(|s| s.eq_ignore_ascii_case(scheme))
                .map(|_| &target[scheme.len()..])
        })
        .ok_or(ErrorKind::BadRequest)?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if !valid_authority(authority.as_bytes()) || rest[end..].starts_with('#') {
        return Err(ErrorKind::BadRequest);
    }
    Ok(())
}

/// `host[:port]` as RFC 3986 allows it in `Host` (§3.2.2: no userinfo): a reg-name or an
/// IPv4 address of unreserved, percent and sub-delim characters, or a bracketed IPv6
/// literal; the port all digits. Empty is refused: an `http` URI must name a host.
fn valid_authority(value: &[u8]) -> bool {
    let value = trim_ows(value);
    let (host, port) = if value.first() == Some(&b'[') {
        let Some(close) = value.iter().position(|b| *b == b']') else {
            return false;
        };
        let literal = &value[1..close];
        if literal.is_empty() || !literal.iter().all(|b| b.is_ascii_hexdigit() || b":.".contains(b)) {
            return false;
        }
        (&value[..=close], &value[close + 1..])
    } else {
        match value.iter().rposition(|b| *b == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &value[value.len()..]),
        }
    };
    let port_ok = port.is_empty() || (port[0] == b':' && port.len() <= 6 && port[1..].iter().all(u8::is_ascii_digit));
    let host_ok = !host.is_empty() && (host[0] == b'[' || host.iter().all(|b| REG_NAME[*b as usize]));
    host_ok && port_ok
}

/// The bytes a request target may hold: visible ASCII, less what is never part of a URI
/// and what hyper's URI parser refuses with a bare 400 of its own (`<`, `>`, `` ` ``), and
/// `#` (§3.2: a request target has no fragment).
const TARGET: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0x21;
    while b < 0x7f {
        table[b] = !matches!(b as u8, b'<' | b'>' | b'`' | b'#');
        b += 1;
    }
    table
};

/// The bytes of an RFC 3986 reg-name (or IPv4 address): unreserved, `%` of an escape, and
/// sub-delims; a table, as this runs on every request.
const REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The two passes `scan_head` replaces: CRLF CRLF searched for, then a bare LF
    /// before it (or anywhere, when there is no end yet).
    fn two_passes(bytes: &[u8]) -> HeadScan {
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|at| at + 4);
        match end {
            Some(end) if has_bare_lf(&bytes[..end], 0) => HeadScan::BareLf,
            Some(end) => HeadScan::End(end),
            None if has_bare_lf(bytes, 0) => HeadScan::BareLf,
            None => HeadScan::Partial,
        }
    }

    #[test]
    fn one_pass_to_the_end_agrees_with_two() {
        // Every string of up to 8 bytes over the bytes that matter, and a byte that does not.
        let alphabet = [b'\r', b'\n', b'a'];
        for len in 0..=8u32 {
            for n in 0..alphabet.len().pow(len) {
                let mut rest = n;
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        let b = alphabet[rest % alphabet.len()];
                        rest /= alphabet.len();
                        b
                    })
                    .collect();
                assert_eq!(scan_head(&bytes), two_passes(&bytes), "{bytes:?}");
            }
        }
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Api-Key: k\r\n\r\n";
        assert_eq!(scan_head(head), HeadScan::End(head.len()));
        // Pipelined requests and a body: the first head's end.
        let two = [&head[..], b"body\nGET / HTTP/1.1\r\n\r\n"].concat();
        assert_eq!(scan_head(&two), HeadScan::End(head.len()));
        assert_eq!(scan_head(&head[..head.len() - 1]), HeadScan::Partial);
        assert_eq!(scan_head(b"GET / HTTP/1.1\nHost: a\r\n\r\n"), HeadScan::BareLf);
        assert_eq!(scan_head(b"GET / HTTP/1.1\r\nHost: a\r\n\n"), HeadScan::BareLf);
    }

    fn check(head: &str) -> Result<bool, ErrorKind> {
        check_head(head.as_bytes()).map(|body| body != BodyLength::None)
    }

    #[test]
    fn well_formed_heads_and_their_bodies() {
        assert_eq!(check("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(false));
        assert_eq!(
            check_head(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n"),
            Ok(BodyLength::Length(3))
        );
        assert_eq!(
            check("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"),
            Ok(false)
        );
        assert_eq!(
            check("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(true)
        );
        assert_eq!(check("GET / HTTP/1.0\r\n\r\n"), Ok(false));
        assert_eq!(
            check("GET http://a.example:8080/x HTTP/1.1\r\nHost: b\r\n\r\n"),
            Ok(false)
        );
        assert_eq!(check("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(false));
        assert_eq!(check("GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n"), Ok(false));
        assert_eq!(check("GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n"), Ok(false));
    }

    #[test]
    fn framing_that_parties_could_read_differently_is_refused() {
        let bad = ErrorKind::BadRequest;
        for head in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\n Transfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nX: y\r\n folded\r\n\r\n",
            "POST / HTTP/1.1\nHost: a\nContent-Length: 3\nTransfer-Encoding: chunked\n\n",
            "GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n",
        ] {
            assert_eq!(check(head), Err(bad), "{head:?}");
        }
        assert_eq!(
            check("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Err(ErrorKind::NotImplemented)
        );
        assert_eq!(
            check("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            Err(bad)
        );
    }

    #[test]
    fn partial_heads_are_refused_as_soon_as_they_go_wrong() {
        assert_eq!(check_partial(b"GET /api HTTP/1.1\r\nHo"), Ok(()));
        assert_eq!(check_partial(b"GET /api HTT"), Ok(()));
        assert_eq!(check_partial(b"GET /api HTTP/1.2\r\n"), Err(ErrorKind::BadRequest));
        assert_eq!(check_partial(b"GET  /api"), Err(ErrorKind::BadRequest));
    }

    #[test]
    fn host_is_held_to_rfc_9112() {
        let bad = Err(ErrorKind::BadRequest);
        assert_eq!(check("GET / HTTP/1.1\r\n\r\n"), bad);
        assert_eq!(check("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), bad);
        assert_eq!(check("GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n"), bad);
        assert_eq!(check("GET / HTTP/1.1\r\nHost:\r\n\r\n"), bad);
        assert_eq!(check("GET / HTTP/1.1\r\nHost: user@a\r\n\r\n"), bad);
        assert_eq!(check("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"), bad);
        assert_eq!(check("GET / HTTP/1.1\r\nHost: a b\r\n\r\n"), bad);
        assert_eq!(check("GET / HTTP/1.1\r\nHost: a:80x\r\n\r\n"), bad);
        assert_eq!(check("GET / HTTP/1.1\r\nHost: [zz]\r\n\r\n"), bad);
        assert_eq!(check("GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n"), bad);
        assert_eq!(check("GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n"), bad);
    }

    #[test]
    fn request_lines_outside_the_grammar_are_refused() {
        let bad = Err(ErrorKind::BadRequest);
        for head in [
            "GET /\r\n\r\n",
            "GET / HTTP/1.2\r\nHost: a\r\n\r\n",
            "GET / http/1.1\r\nHost: a\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
            "G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET x HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a<b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a?b=<> HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a`b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n: empty-name\r\n\r\n",
        ] {
            assert_eq!(check(head), bad, "{head:?}");
        }
        assert_eq!(
            check("CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n"),
            Err(ErrorKind::NotImplemented)
        );
        let many: String = (0..200).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            check(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")),
            Err(ErrorKind::HeadersTooLarge)
        );
    }
}
